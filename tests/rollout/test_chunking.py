"""Server-mode chunk arithmetic: per-rank chunk, feasibility, per-server caps, allocation."""

import doctest
import itertools

import pytest

from toolkit.rollout import chunking
from toolkit.rollout.chunking import allocate_counts, per_rank_chunk, server_caps, split_counts


def test_doctests():
    assert doctest.testmod(chunking).failed == 0


@pytest.mark.parametrize(
    "dbs, sizes, w, chunk",
    [
        (4, [6], 2, 12),  # 6 server GPUs, 2 learners: 24 per round, about 4 per GPU
        (4, [7], 1, 28),  # the default launcher: 7 server GPUs, 1 learner
        (1, [1], 1, 1),
        (3, [2, 2], 4, 3),
        (1, [3], 2, 1),  # floor(1.5) = 1
        (2, [1], 2, 1),
    ],
)
def test_per_rank_chunk(dbs, sizes, w, chunk):
    assert per_rank_chunk(dbs, sizes, w) == chunk


def test_infeasible_names_every_factor():
    with pytest.raises(ValueError) as err:
        per_rank_chunk(1, [2], 3)
    msg = str(err.value)
    assert "decode_batch_size cap is infeasible for the current topology" in msg
    for part in ("decode_batch_size=1", "rollout_world_size=2", "learner_world_size=3", "Increase rollout server DP"):
        assert part in msg


@pytest.mark.parametrize("bad", [(0, [1], 1), (1, [], 1), (1, [0], 1), (1, [1], 0)])
def test_nonpositive_inputs_rejected(bad):
    with pytest.raises(ValueError):
        per_rank_chunk(*bad)


FEASIBLE = [
    (d, s, w)
    for d, s, w in itertools.product([1, 2, 4], [[1], [2], [1, 2], [3, 1, 2], [7]], [1, 2, 3, 5])
    if d * sum(s) >= w
]


@pytest.mark.parametrize("dbs, sizes, w", FEASIBLE)
def test_caps_sum_to_chunk_and_respect_server_budget(dbs, sizes, w):
    c = per_rank_chunk(dbs, sizes, w)
    caps = [server_caps(dbs, sizes, w, r) for r in range(w)]
    assert all(sum(cr) == c for cr in caps)
    per_server = [sum(cr[i] for cr in caps) for i in range(len(sizes))]
    # Each server's total over all ranks is its weighted slice of W·C, within one of the exact share.
    for total, size in zip(per_server, sizes):
        assert abs(total - w * c * size / sum(sizes)) < 1
    # No rollout GPU decodes more than decode_batch_size per synchronized round (up to rounding).
    for total, size in zip(per_server, sizes):
        assert total <= dbs * size + 1


def test_caps_contiguous_example():
    # C = 3; slices of W·C = 6 weighted 1:2 → [0,2) and [2,6); rank 0 owns [0,3), rank 1 [3,6).
    assert [server_caps(2, [1, 2], 2, r) for r in range(2)] == [[2, 1], [0, 3]]


def test_caps_rank_out_of_range():
    with pytest.raises(ValueError, match="outside learner_world_size"):
        server_caps(1, [1], 1, 1)


@pytest.mark.parametrize("caps", [[12], [2, 4], [0, 3], [1, 1, 1], [5, 0, 2]])
def test_allocate_counts_within_caps(caps):
    for n in range(sum(caps) + 1):
        counts = allocate_counts(n, caps)
        assert sum(counts) == n
        assert all(0 <= k <= cap for k, cap in zip(counts, caps))


def test_allocate_counts_too_many():
    with pytest.raises(ValueError, match="cannot send 4 requests"):
        allocate_counts(4, [1, 2])


def test_split_counts_rotation_spreads_small_batches():
    seen = [0, 0, 0]
    for call in range(6):
        for i, k in enumerate(split_counts(1, 3, start=call % 3)):
            seen[i] += k
    assert seen == [2, 2, 2]
    assert split_counts(7, 3) == [3, 2, 2] and split_counts(0, 2) == [0, 0]
    with pytest.raises(ValueError):
        split_counts(1, 0)
