"""Placement (toolkit/config/placement.py): the placement flags parsed once, checked against each other, each
error naming the flag to fix."""

from __future__ import annotations

import pytest

from toolkit.config.placement import GpuListError, Placement, PlacementError, parse_gpu_list


@pytest.mark.parametrize(
    "flags, layout",
    [
        ({}, (None, 1, 1)),
        ({"gpus": "cpu", "nproc": 3}, (None, 3, 3)),
        ({"gpus": "CPU"}, (None, 1, 1)),
        ({"gpus": "0,1"}, ((0, 1), 2, 2)),
        ({"gpus": "2, 3", "nproc": 2}, ((2, 3), 2, 2)),
        ({"gpus": "0,1", "nnodes": 2, "rdzv_endpoint": "n1:29500"}, ((0, 1), 2, 4)),
    ],
)
def test_learner_layout_and_world_size(flags, layout):
    p = Placement.from_flags(**flags)
    assert (p.learner_gpus, p.nproc_per_node, p.world_size) == layout
    assert p.cpu == (layout[0] is None)


def test_server_flags_and_rendezvous_are_kept_parsed():
    p = Placement.from_flags(
        gpus="0", server_gpus="2,3", server_dp=2, nnodes=2, node_rank=1, rdzv_endpoint="node001:29500"
    )
    assert (p.server_gpus, p.server_dp, p.server_tp, p.node_rank) == ((2, 3), 2, None, 1)
    assert p.rdzv == ("node001", 29500) and p.rdzv_endpoint == "node001:29500"
    assert Placement.from_flags().server_gpus is None and Placement.from_flags().rdzv_endpoint is None


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"gpus": "0,1", "nproc": 3}, "--nproc 3 disagrees with --gpus 0,1"),
        ({"gpus": "cpu", "nproc": 0}, "--nproc must be ≥ 1, got 0"),
        ({"gpus": "0,0"}, "--gpus '0,0': expected distinct GPU ids"),
        ({"gpus": "a"}, "--gpus 'a': expected comma-separated GPU ids"),
        ({"gpus": "0", "server_gpus": "-1"}, "--server-gpus '-1': expected distinct GPU ids"),
        ({"server_gpus": "cpu"}, "--server-gpus takes GPU ids (e.g. 2,3), not 'cpu'"),
        ({"gpus": "0,1", "server_gpus": "1,2"}, "--gpus 0,1 and --server-gpus 1,2 must be disjoint; both hold GPU 1"),
        ({"nnodes": 0}, "--nnodes must be ≥ 1"),
        ({"nnodes": 2}, "--nnodes 2 needs --rdzv-endpoint"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "--node-rank 2 is outside 0..1"),
        ({"nnodes": 2, "rdzv_endpoint": "nohostport"}, "--rdzv-endpoint 'nohostport': expected HOST:PORT"),
    ],
)
def test_bad_flags_name_the_flag(flags, message):
    with pytest.raises(PlacementError) as err:
        Placement.from_flags(**flags)
    assert message in str(err.value)


def test_a_malformed_list_is_its_own_error():
    """`stage2 preflight` turns this one into a usage error (exit 2), the others into exit 1."""
    assert parse_gpu_list(None, "--gpus") is None and parse_gpu_list(" cpu ", "--gpus") == "cpu"
    with pytest.raises(GpuListError):
        parse_gpu_list("1,x", "--gpus")
    with pytest.raises(PlacementError) as err:
        Placement.from_flags(gpus="0,1", nproc=3)
    assert not isinstance(err.value, GpuListError)


def test_placement_is_frozen():
    with pytest.raises(AttributeError):
        Placement.from_flags().nproc_per_node = 2
