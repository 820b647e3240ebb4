"""RoundPacker: post-rollout packing across server rounds (Channel-B, vLLM server mode)."""

import torch
from _pack_helpers import make_segment

from toolkit.trainer.packing import RoundPacker, collate_pack, plan_packs


def ids(packs):
    return [p.input_ids[0].tolist() for p in packs]


def segments(n: int):
    return [make_segment(seed=i, prompt_len=3 + 2 * i, n_boxes=1 + i % 3, channel="B") for i in range(n)]


def test_one_round_packs_like_plan_packs():
    segs = segments(9)
    cap = 2 * max(len(s) for s in segs)
    packer = RoundPacker(cap, min_fill=0.5)
    got = packer.add(segs) + packer.flush()
    want = [collate_pack([segs[i] for i in idx]) for idx in plan_packs([len(s) for s in segs], cap)]
    assert ids(got) == ids(want) and len(got) > 1


def test_rounds_carry_the_unfilled_rest_and_flush_at_the_end():
    segs = segments(9)
    cap = sum(len(s) for s in segs[:3])  # threshold = half of that: a round of one segment never fills it
    packer = RoundPacker(cap, min_fill=0.5)
    out = [packer.add([s]) for s in segs]
    assert out[0] == [] and len(packer.buffer) < 9  # the first round's segment waited; packs were cut later
    rest = packer.flush()
    assert packer.buffer == []
    packs = [p for round_packs in out for p in round_packs] + rest
    assert (
        torch.cat([p.input_ids[0] for p in packs]).sort().values.tolist()
        == torch.cat([torch.tensor(s.input_ids) for s in segs]).sort().values.tolist()
    )  # every token exactly once
    assert all(p.total_len <= cap for p in packs)
    assert any(p.n_segments > 1 for p in packs[: -len(rest) or None])  # segments of several rounds share a pack


def test_packing_off_gives_one_pack_per_segment_at_once():
    segs = segments(3)
    packer = RoundPacker(10_000, min_fill=0.5, packing=False)
    assert [p.n_segments for p in packer.add(segs[:2])] == [1, 1] and packer.flush() == []
