"""Topology: disjoint GPU sets, DP×TP, servers started or expected, job-derived ports, taken ports named
(the flags' own parsing: tests/config/test_placement.py)."""

from __future__ import annotations

import socket

import pytest

from launchers.ports import Port, ephemeral_start, job_port
from launchers.topology import ProfileServers, build_topology, check_ports, servers_rewritten, visible_to_physical
from toolkit.config.placement import CPU, Placement, PlacementError

HF = ProfileServers(server_mode=False)
ONE = ProfileServers(True, (("http://127.0.0.1:8000", 51216),), 1)
TWO = ProfileServers(True, (("http://127.0.0.1:8000", 51216), ("http://127.0.0.1:8001", 51217)), 1)
REMOTE = ProfileServers(True, (("http://rollout01:8000", 51216),), 1)


def topo(profile=HF, env=None, **flags):
    return build_topology(Placement.from_flags(**flags), profile, env or {}, probe=lambda: 45678)


def test_dp_times_tp_must_equal_the_server_gpus():
    t = topo(ONE, gpus="0,1", server_gpus="2,3,4,5")
    assert (t.servers[0].dp, t.servers[0].tp, t.servers[0].gpus) == (4, 1, (2, 3, 4, 5))
    assert topo(ProfileServers(True, ONE.servers, 2), gpus="0", server_gpus="2,3,4,5").servers[0].dp == 2
    with pytest.raises(PlacementError, match=r"--server-dp 3 × --server-tp 1 = 3 must equal the GPUs per server \(4"):
        topo(ONE, gpus="0,1", server_gpus="2,3,4,5", server_dp=3)
    with pytest.raises(PlacementError, match="differs from the profile's rollout_matching.vllm.tensor_parallel_size=1"):
        topo(ONE, gpus="0,1", server_gpus="2,3", server_tp=2)


def test_server_gpus_split_over_the_profile_servers():
    t = topo(TWO, gpus="0,1", server_gpus="2,3,4,5")
    assert [s.gpus for s in t.servers] == [(2, 3), (4, 5)]
    assert [s.base_url for s in t.servers] == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    with pytest.raises(PlacementError, match="does not split evenly over the profile's 2 server"):
        topo(TWO, gpus="0", server_gpus="2,3,4")


def test_server_flags_need_a_server_mode_profile():
    with pytest.raises(PlacementError, match="--server-gpus needs a server-mode profile"):
        topo(HF, gpus="0", server_gpus="1")


def test_which_servers_are_started():
    assert [s.gpus for s in topo(ONE, gpus="cpu").servers] == [CPU]  # cpu + loopback: start them
    gpu_external = topo(ONE, gpus="0,1")  # GPUs without --server-gpus: they must be running already
    assert gpu_external.servers == () and gpu_external.external_servers == ("http://127.0.0.1:8000",)
    assert topo(REMOTE, gpus="cpu").external_servers == ("http://rollout01:8000",)
    assert topo(ONE, gpus="0,1", server_dp=4).external_world_size == 4  # checked against /get_world_size/
    assert gpu_external.external_world_size is None
    with pytest.raises(PlacementError, match="listen on this machine"):
        topo(REMOTE, gpus="0", server_gpus="1")
    with pytest.raises(PlacementError, match="--server-gpus with --nnodes > 1"):
        topo(ONE, gpus="0", server_gpus="1", nnodes=2, rdzv_endpoint="h:29500")


def test_gpu_ids_index_into_an_inherited_cuda_visible_devices():
    assert visible_to_physical((0, 1), "4,5,6,7", "--gpus") == (4, 5)
    t = topo(ONE, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, gpus="0,1", server_gpus="2,3")
    assert t.learner_gpus == (4, 5) and t.servers[0].gpus == (6, 7)
    with pytest.raises(PlacementError, match="exposes only 2 GPU"):
        topo(HF, env={"CUDA_VISIBLE_DEVICES": "4,5"}, gpus="1,2")


def test_ports_are_deterministic_per_slurm_job():
    a = topo(ONE, env={"SLURM_JOB_ID": "4242"}, gpus="cpu")
    b = topo(ONE, env={"SLURM_JOB_ID": "4242"}, gpus="cpu")
    c = topo(ONE, env={"SLURM_JOB_ID": "4243"}, gpus="cpu")
    ports = lambda t: (t.master_port.port, t.servers[0].http.port, t.servers[0].group.port)  # noqa: E731
    assert ports(a) == ports(b) != ports(c)
    assert a.master_port == Port(job_port("4242", "master"), "derived from SLURM_JOB_ID=4242")
    assert all(20000 <= p < ephemeral_start() for p in ports(a))
    assert len(set(ports(a))) == 3
    assert a.servers[0].base_url == f"http://127.0.0.1:{job_port('4242', 'server0.http')}"
    assert servers_rewritten(a, ONE) and not servers_rewritten(topo(ONE, gpus="cpu"), ONE)


def test_job_ports_stay_below_the_ephemeral_range():
    """An outgoing socket takes its port from ip_local_port_range: a derived port inside it may be held."""
    first = ephemeral_start()
    assert first == int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {job_port(str(job), salt) for job in range(2000) for salt in ("rdzv", "master", "server0.http")}
    assert min(ports) >= 20000 and max(ports) < first
    assert len(ports) > 2000  # spread over the range, not a handful of values
    assert all(20000 <= job_port(str(j), "rdzv", first_ephemeral=25000) < 25000 for j in range(500))
    assert all(1024 <= job_port(str(j), "rdzv", first_ephemeral=15000) < 15000 for j in range(500))
    with pytest.raises(PlacementError, match="ip_local_port_range starts at 1500"):
        job_port("1", "rdzv", first_ephemeral=1500)


def test_a_taken_job_derived_port_is_refused_at_preflight():
    """The port a SLURM job derives is checked free before anything starts, naming its source."""
    t = topo(env={"SLURM_JOB_ID": "4242"})
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", t.master_port.port))
        held.listen()
        with pytest.raises(
            PlacementError,
            match=f"port {t.master_port.port} on 127.0.0.1 is already in use "
            r"\(derived from SLURM_JOB_ID=4242\)",
        ):
            check_ports(t, host_is_local=lambda h: True)


def test_master_port_sources():
    assert topo(env={"MASTER_PORT": "29511"}).master_port == Port(29511, "MASTER_PORT environment variable")
    assert topo().master_port == Port(45678, "probed free (set MASTER_PORT to choose)")
    multi = topo(nnodes=2, node_rank=1, rdzv_endpoint="node001:29400", env={"SLURM_JOB_ID": "7"})
    assert (multi.master_port, multi.rdzv_id) == (Port(29400, "--rdzv-endpoint", bind_here=False), "7")


def test_a_taken_port_is_an_error_naming_the_port_and_who_configured_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        profile = ProfileServers(True, ((f"http://127.0.0.1:{port}", 51216),), 1)
        t = topo(profile, gpus="cpu")
        with pytest.raises(PlacementError) as err:
            check_ports(t, host_is_local=lambda h: True)
        assert f"port {port} on 127.0.0.1 is already in use (rollout_matching.vllm.server.servers[0].base_url=" in str(
            err.value
        )
        t = topo(env={"MASTER_PORT": str(port)})
        with pytest.raises(
            PlacementError, match=f"port {port} on 127.0.0.1 is already in use \\(MASTER_PORT environment"
        ):
            check_ports(t, host_is_local=lambda h: True)


def test_a_port_used_twice_is_an_error():
    profile = ProfileServers(True, (("http://127.0.0.1:8000", 8000),), 1)
    with pytest.raises(PlacementError, match=r"port 8000 \(.*group_port=8000\) is also .*base_url"):
        check_ports(topo(profile, gpus="cpu"), host_is_local=lambda h: True, is_free=lambda h, p: True)


def test_rendezvous_port_is_checked_only_where_it_is_bound():
    seen = []
    check_ports(
        topo(nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29400"),
        lambda h: True,
        is_free=lambda h, p: seen.append(p) or True,
    )
    check_ports(
        topo(nnodes=2, node_rank=0, rdzv_endpoint="node001:29400"),
        lambda h: h == "127.0.0.1",
        is_free=lambda h, p: seen.append(p) or True,
    )
    assert seen == []
    check_ports(
        topo(nnodes=2, node_rank=0, rdzv_endpoint="127.0.0.1:29400"),
        lambda h: True,
        is_free=lambda h, p: seen.append(p) or True,
    )
    assert seen == [29400]
