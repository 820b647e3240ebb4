"""vLLM-side pure pieces that need neither vLLM nor a server: the post-hoc repeat cut (must equal the HF
rule exactly), engine arguments, checkpoint specs and the name check, bucket packing, and the gloo
weight-sync group between real processes (incl. a taken group port)."""

import random
import socket

import pytest
import torch
from _shared import vllm_settings

from toolkit.config.settings import DecodeSettings, RepeatSettings
from toolkit.rollout.completions import finish_rollout, repeat_cut, sampling_dict
from toolkit.rollout.errors import BadRequest, Conflict
from toolkit.rollout.repeat import should_stop
from toolkit.rollout.sync_group import SyncGroup
from toolkit.rollout.vllm_engine import engine_kwargs, resolve_dtype
from toolkit.rollout.weight_sync import (
    TensorSpec,
    check_specs,
    checkpoint_name,
    iter_buckets,
    pack_bucket,
    read_checkpoint_specs,
    spec_problems,
    specs_of,
    unpack_bucket,
)

EOS = 2
KEYS = frozenset({7, 8})
VCFG = dict(max_model_len=1024, enforce_eager=False, kv_cache_gb=None)


# ------------------------------------------------------------------ repeat-terminate parity


def _hf_cut(gen, rule, limit):
    """What the HF processor does: the first prefix length i (1..limit) that trips rule.should_stop."""
    return next((i for i in range(1, limit + 1) if should_stop(rule, gen[:i], KEYS)), None)


@pytest.mark.parametrize(
    "rule",
    [
        RepeatSettings(min_new_tokens=0, max_consecutive_token_repeats=3),
        RepeatSettings(min_new_tokens=5, ngram_size=2, ngram_repeats=3),
        RepeatSettings(min_new_tokens=2, max_object_keys=2),
        RepeatSettings(
            min_new_tokens=8, max_consecutive_token_repeats=8, ngram_size=8, ngram_repeats=3, max_object_keys=3
        ),
        RepeatSettings(),
    ],
)
def test_repeat_cut_equals_hf_rule(rule):
    rng = random.Random(0)
    for _ in range(2000):
        gen = [rng.choice([3, 4, 7, 8, 9]) for _ in range(rng.randint(0, 40))]
        limit = max(0, len(gen) - 1)
        assert repeat_cut(gen, rule, KEYS, limit) == _hf_cut(gen, rule, limit), gen


def test_finish_rollout_semantics():
    rule = RepeatSettings(max_consecutive_token_repeats=3)
    stop = finish_rollout([1], [5, 6, EOS], eos_id=EOS, rule=None, key_ids=KEYS, weight_version=4)
    assert (stop.completion_ids, stop.finish_reason, stop.weight_version) == ([5, 6, EOS], "stop", 4)
    length = finish_rollout([1], [5, 6, 5], eos_id=EOS, rule=None, key_ids=KEYS)
    assert (length.completion_ids, length.finish_reason) == ([5, 6, 5], "length")
    cut = finish_rollout([1], [5, 9, 9, 9, 9, 4], eos_id=EOS, rule=rule, key_ids=KEYS)
    assert (cut.completion_ids, cut.finish_reason) == ([5, 9, 9, 9, EOS], "repeat")
    # A loop in the very last position cannot be cut: HF has no position left to force <|im_end|>.
    tail = finish_rollout([1], [5, 9, 9, 9], eos_id=EOS, rule=rule, key_ids=KEYS)
    assert tail.finish_reason == "length"
    # A natural stop before any loop stays a stop.
    early = finish_rollout([1], [5, EOS], eos_id=EOS, rule=rule, key_ids=KEYS)
    assert early.finish_reason == "stop"


# ------------------------------------------------------------------ engine arguments


def test_engine_kwargs_cpu_defaults_and_knobs():
    kw = engine_kwargs(
        vllm_settings(**VCFG, max_num_seqs=8),
        model="/m",
        dtype="float32",
        seed=3,
        on_cpu=True,
        executor="external_launcher",
    )
    assert kw["kv_cache_memory_bytes"] == 1 << 30 and kw["skip_tokenizer_init"] and kw["max_num_seqs"] == 8
    assert kw["distributed_executor_backend"] == "external_launcher" and "max_num_batched_tokens" not in kw
    gpu = engine_kwargs(
        vllm_settings(**dict(VCFG, kv_cache_gb=2.5)), model="/m", dtype="bfloat16", seed=3, on_cpu=False, extension=True
    )
    assert gpu["kv_cache_memory_bytes"] == int(2.5 * (1 << 30)) and gpu["worker_extension_cls"].endswith(
        "WeightSyncExtension"
    )
    assert "distributed_executor_backend" not in gpu
    assert resolve_dtype("auto", "float32") == "float32" and resolve_dtype("bfloat16", "float32") == "bfloat16"


def test_sampling_dict_greedy_and_sampled():
    kw = dict(
        max_new_tokens=9,
        decode_batch_size=2,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        repetition_penalty=1.1,
        repeat=None,
        seed=0,
    )
    greedy = sampling_dict(DecodeSettings(do_sample=False, **kw), EOS, seed=11)
    assert greedy["temperature"] == 0.0 and greedy["seed"] is None and greedy["stop_token_ids"] == [EOS]
    sampled = sampling_dict(DecodeSettings(do_sample=True, **kw), EOS, seed=11)
    assert (sampled["temperature"], sampled["top_k"], sampled["seed"]) == (0.7, 5, 11)


# ------------------------------------------------------------------ names, specs, buckets


def test_checkpoint_specs_and_name_check(tiny_model, hf_model):
    served = read_checkpoint_specs(tiny_model)
    assert served["lm_head.weight"] == TensorSpec("lm_head.weight", "float32", (1319, 128))
    learner = specs_of((n, p.to("meta")) for n, p in hf_model.named_parameters())
    assert spec_problems(learner, served) == []
    check_specs(learner, served, where="x")
    assert read_checkpoint_specs(tiny_model / "nope") is None


def test_name_check_lists_every_mismatch(tiny_model, hf_model):
    served = read_checkpoint_specs(tiny_model)
    learner = specs_of(
        (("module." + n if i else n + ".extra"), p.to("meta")) for i, (n, p) in enumerate(hf_model.named_parameters())
    )
    learner["model.norm.weight"] = TensorSpec("model.norm.weight", "float32", (64,))
    with pytest.raises(ValueError) as err:
        check_specs(learner, served, where="http://srv:8000")
    msg = str(err.value)
    assert "http://srv:8000" in msg and "1 not sent by the learner: model.embed_tokens.weight" in msg
    assert "unknown to the served checkpoint: model.embed_tokens.weight.extra" in msg
    assert "shape mismatch: model.norm.weight: learner [64] vs served [128]" in msg


def test_checkpoint_name_strips_wrappers():
    assert (
        checkpoint_name("module._orig_mod.model.layers.1.mlp.up_proj.base_layer.weight")
        == "model.layers.1.mlp.up_proj.weight"
    )
    assert checkpoint_name("lm_head.weight") == "lm_head.weight"


def test_bucket_roundtrip_mixed_dtypes():
    named = [
        ("a", torch.randn(3, 4)),
        ("b", torch.arange(5, dtype=torch.int64)),
        ("c", torch.randn(7).to(torch.bfloat16)),
        ("d", torch.randn(300)),
    ]
    buckets = list(iter_buckets(named, bucket_bytes=64))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c"], ["d"]]
    for bucket in buckets:
        flat, specs = pack_bucket(bucket)
        back = unpack_bucket(flat.clone(), specs)
        for (n, t), (m, u) in zip(bucket, back):
            assert n == m and u.dtype == t.dtype and torch.equal(u, t)
    with pytest.raises(BadRequest, match="bucket holds"):
        unpack_bucket(torch.zeros(3, dtype=torch.uint8), [TensorSpec("x", "float32", (1,))])


# ------------------------------------------------------------------ the weight-sync group


def _member(rank, world, port, queue):
    group = SyncGroup("127.0.0.1", port, world, rank, "gloo", timeout_s=30)
    group.open_store(is_master=rank == 0)
    group.join()
    t = torch.arange(6, dtype=torch.uint8) if rank == world - 1 else torch.zeros(6, dtype=torch.uint8)
    group.broadcast(t, src=world - 1)
    queue.put((rank, t.tolist(), torch.distributed.is_initialized()))
    group.close()


def test_gloo_group_broadcasts_without_default_group():
    import multiprocessing as mp

    from _shared import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_member, args=(r, 3, port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == [(r, [0, 1, 2, 3, 4, 5], False) for r in range(3)]


def test_taken_group_port_names_the_port():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Conflict, match=f"group_port {port} is already in use"):
            SyncGroup("127.0.0.1", port, 2, 0, "gloo", timeout_s=5).open_store(is_master=True)
