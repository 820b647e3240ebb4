"""HFTokenCodec on real HF fast tokenizers: literal-text BPE (the project's kind), byte-level and Metaspace
BPEs built in memory, and the project tokenizer in assets/ when it has been built."""

from pathlib import Path

import pytest

from toolkit.data.coords import COORD_TOKENS
from toolkit.data.render import render_answer
from toolkit.rollout.codec import HFTokenCodec
from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.rollout.targets import build_channel_a_segment, build_channel_b_segment

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ASSETS_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tokenizer" / "tokenizer.json"
WORDS = ["cat", "dog", "traffic light", "person", "red bus", "chair"]


def scenes(n, unicode=False):
    out = []
    for k in range(n):
        descs = WORDS + (["crème brûlée", "ŋa"] if unicode else [])
        objs = [
            {
                "desc": descs[(k + i) % len(descs)],
                "bbox_2d": [(97 * k + 13 * i) % 500, (31 * k + 7 * i) % 500, 500 + (11 * k) % 499, 500 + i * 40],
            }
            for i in range(k % 4)
        ]
        out.append(objs)
    return out


def build_tokenizer(kind):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [render_answer(s) for s in scenes(60)]
    if kind == "literal":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z0-9_]+| ?[^A-Za-z0-9_\s]+|\s+"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        alphabet = [chr(c) for c in range(32, 127)]
    elif kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=kind.split(":")[1])
        tok.decoder = decoders.Metaspace(prepend_scheme=kind.split(":")[1])
        alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIALS],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )


def check_roundtrips(codec, unicode=False):
    for gt in scenes(24, unicode):
        text = render_answer(gt)
        ids = codec.encode(text)
        assert "".join(codec.pieces(ids)) == text
        res = parse_rollout(ids + [codec.im_end_id], codec)
        assert [(o.desc, list(o.bbox)) for o in res.objects] == [(g["desc"], g["bbox_2d"]) for g in gt]
        assert res.prefix_text == text[:-1] and "".join(codec.pieces(res.prefix_token_ids)) == res.prefix_text
        for cut in range(1, len(text), 9):  # truncated rollouts: cuts inside fused tokens get re-encoded
            part = parse_rollout(codec.encode(text[:cut]), codec)
            assert "".join(codec.pieces(part.prefix_token_ids)) == part.prefix_text
            assert text.startswith(part.prefix_text)
        match = match_boxes(
            [o.bbox for o in res.objects],
            [g["bbox_2d"] for g in gt],
            candidate_top_k=5,
            gate=0.5,
            resolution=256,
            fp_cost=1.0,
            fn_cost=1.0,
        )
        b = build_channel_b_segment([codec.im_end_id], res, gt, match, codec)
        a = build_channel_a_segment([codec.im_end_id], gt, codec)
        assert b.coord_pos == a.coord_pos and b.coord_bins == a.coord_bins and len(a.coord_pos) == 4 * len(gt)


@pytest.mark.parametrize(
    "kind, literal, unicode",
    [
        ("literal", True, False),
        ("bytelevel", False, True),
        ("metaspace:never", False, False),
    ],
)
def test_hf_codec_roundtrips_canonical_answers(kind, literal, unicode):
    codec = HFTokenCodec(build_tokenizer(kind))
    assert codec.literal is literal
    assert len(codec.coord_token_ids) == 1000 and codec.coord_bin(codec.coord_token_ids[7]) == 7
    assert codec.object_key_token_ids()
    check_roundtrips(codec, unicode)


def test_bytelevel_split_characters_fall_back_to_incremental_pieces():
    codec = HFTokenCodec(build_tokenizer("bytelevel"))
    ids = codec.encode('{"object_1": {"desc": "ŋ€"')
    pieces = codec.pieces(ids)
    assert "".join(pieces) == '{"object_1": {"desc": "ŋ€"' and "" in pieces  # a byte token carries no text


def test_tokenizer_that_prepends_a_space_is_rejected_up_front():
    with pytest.raises(ValueError, match="not text-faithful"):
        HFTokenCodec(build_tokenizer("metaspace:always"))


def test_missing_coord_tokens_are_rejected():
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    with pytest.raises(ValueError, match="<\\|coord_0\\|>"):
        HFTokenCodec(tok)


@pytest.mark.skipif(
    not ASSETS_TOKENIZER.exists(),
    reason=f"project tokenizer not built yet ({ASSETS_TOKENIZER} "
    "is absent; run `python assets/build_assets.py --only tokenizer`)",
)
def test_project_tokenizer_roundtrips_canonical_answers():
    codec = HFTokenCodec(transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_TOKENIZER)))
    assert codec.literal
    check_roundtrips(codec)


@pytest.mark.parametrize("kind", ["literal", "bytelevel", "metaspace:never"])
def test_encode_equals_the_wrappers_encode_on_random_texts(kind):
    """`encode` calls the Rust tokenizer directly when its state is the wrapper's; the ids must be
    `tok.encode`'s, also for special tokens inside the text and when the backend was left truncating or
    splitting special tokens (then the wrapper is used)."""
    import random

    tok = build_tokenizer(kind)
    codec = HFTokenCodec(tok)
    rng = random.Random(0)
    alphabet = list('{}[]",: abcxyz_019\n\t') + ["<|im_end|>", "<|coord_7|>", "<|endoftext|>", "é", "ŋ", "object_"]
    texts = ["", " "] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    texts += [render_answer(s) for s in scenes(10)]

    def wrapper(text):
        return tok.encode(text, add_special_tokens=False)

    assert [codec.encode(t) for t in texts] == [wrapper(t) for t in texts]
    tok.backend_tokenizer.enable_truncation(max_length=3)
    assert [codec.encode(t) for t in texts] == [wrapper(t) for t in texts]
    tok.split_special_tokens = True
    assert [codec.encode(t) for t in texts] == [wrapper(t) for t in texts]
    assert codec.encode("<|im_end|>") != [codec.im_end_id]


def test_literal_pieces_of_ids_of_any_integer_type_are_the_pieces_of_their_ints():
    """A literal codec looks ids up as given (no int() per id); an id of another type (numpy, torch, bool, a float,
    an id seen for the first time or not) gets the piece of int(id), the same as converting first."""
    import random

    import numpy as np
    import torch

    codec = HFTokenCodec(build_tokenizer("literal"))
    assert codec.literal
    rng = random.Random(3)
    vocab = len(codec.tok)
    for trial in range(50):
        ids = [rng.randrange(vocab + 5) for _ in range(rng.randint(0, 40))]  # a few ids past the vocabulary
        want = codec.pieces(ids) if trial % 2 else None  # half the trials: the other types come first
        kinds = [np.int64, lambda i: torch.tensor(i), float, lambda i: i + 0.25, lambda i: np.int32(i)]
        for kind in kinds:
            got = codec.pieces([kind(i) for i in ids])
            want = want if want is not None else codec.pieces(ids)
            assert got == want, (trial, kind)
    assert codec.pieces([True, False]) == codec.pieces([1, 0])
    assert all(type(k) is int for k in codec._literal_pieces)  # only plain ints are cached


def _coord_heavy_texts(rng, n):
    """Texts where coord tokens touch everything around them: spaces, quotes, letters, other added tokens, and
    strings that only look like coord tokens."""
    near = ["<|coord_0|>", "<|coord_9|>", "<|coord_42|>", "<|coord_999|>", "<|coord_1000|>", "<|coord_05|>"]
    near += ["<|coord_", "|>", "<|im_end|>", "<|endoftext|>", " ", "  ", '"', '", "', "]}, ", "cat", "é", "\n", "x"]
    near += ["\u0338"]  # NFC composes `>` + U+0338 into U+226F
    return [render_answer(s) for s in scenes(12, unicode=True)] + [
        "".join(rng.choice(near) for _ in range(rng.randint(1, 30))) for _ in range(n)
    ]


@pytest.mark.parametrize("kind", ["literal", "bytelevel", "metaspace:never"])
def test_text_between_coord_tokens_is_encoded_alone_with_the_same_ids(kind):
    """When the coord tokens are split off first (plain added tokens), `encode` encodes the text between them
    alone and caches it: the ids must be the whole text's, also after the cache was emptied."""
    import random

    codec = HFTokenCodec(build_tokenizer(kind))
    assert codec._split_at_coords
    texts = _coord_heavy_texts(random.Random(1), 400)
    whole = [codec._encode_whole(t) for t in texts]
    assert [codec.encode(t) for t in texts] == whole
    assert len(codec._part_ids) > 10  # the parts were cached ...
    codec._part_ids.clear()
    codec._part_ids.MAX = 5  # ... and a full cache is emptied, not wrong
    assert [codec.encode(t) for t in texts] == whole and len(codec._part_ids) <= 5


@pytest.mark.parametrize(
    "coord_flags, other",
    [({"lstrip": True}, None), ({"rstrip": True}, None), ({"single_word": True}, None), ({"special": True}, None)]
    + [({"normalized": True}, None)]
    + [({}, t) for t in ['"<|', "|>]", "_1|", "x<|coord_3|>"]],
)
def test_coord_tokens_that_the_tokenizer_may_not_split_off_first_are_encoded_whole(coord_flags, other):
    """Coord tokens that take the spaces around them, wait for a word boundary or are special, or an added token
    that overlaps one, or normalized coord tokens under a normalizer: the text is encoded whole (the ids are still
    the wrapper's)."""
    import random

    from tokenizers import AddedToken, normalizers

    tok = build_tokenizer("literal")
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.NFC()  # composes `>` + U+0338 into one character: not local to the parts
    flags = {"special": False, "normalized": False, **coord_flags}
    backend.add_tokens([AddedToken(t, **flags) for t in COORD_TOKENS])  # the same ids, new flags
    if other is not None:
        backend.add_tokens([AddedToken(other, special=False, normalized=False)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    codec = HFTokenCodec(tok)
    assert not codec._split_at_coords
    texts = _coord_heavy_texts(random.Random(2), 100)
    assert [codec.encode(t) for t in texts] == [tok.encode(t, add_special_tokens=False) for t in texts]
