"""Golden argv and env of every child: torchrun and the deepspeed launcher, CPU and GPU, one and two nodes."""

from __future__ import annotations

import pytest

from launchers.commands import (
    build_deepspeed_argv,
    build_learner_env,
    build_server_argv,
    build_server_env,
    build_torchrun_argv,
    build_train_args,
    env_delta,
    servers_override,
)
from launchers.topology import ProfileServers, build_topology
from toolkit.config.placement import Placement, PlacementError

TRAIN = build_train_args("/r/configs/stage2_ab/prod/ab_mixed.yaml", ["training.max_steps=2"], "auto")
ENTRY = [
    "-m",
    "toolkit.train",
    "--profile",
    "/r/configs/stage2_ab/prod/ab_mixed.yaml",
    "--set",
    "training.max_steps=2",
    "--resume",
    "auto",
]
SIGNALS = ["--max_restarts", "0", "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
MASTER = ["--master_addr", "127.0.0.1", "--master_port", "29511"]  # one node: MASTER_PORT of topo()
SERVER = ProfileServers(True, (("http://127.0.0.1:8000", 51216),), 1)
BASE = {
    "PATH": "/usr/bin",
    "http_proxy": "http://proxy:3128",
    "HTTPS_PROXY": "http://proxy:3128",
    "NO_PROXY": "corp.example",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
}


NO_SERVERS = ProfileServers(False)


def topo(profile=NO_SERVERS, env=None, **flags):
    return build_topology(
        Placement.from_flags(**flags), profile, env if env is not None else {"MASTER_PORT": "29511"}, probe=lambda: 1
    )


def test_torchrun_single_node_gpu():
    t = topo(gpus="0,1")
    assert build_torchrun_argv(t, TRAIN) == [
        "python",
        "-m",
        "toolkit.torchrun",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        *MASTER,
        *SIGNALS,
        *ENTRY,
    ]
    env = build_learner_env({"PATH": "/usr/bin"}, t, "torchrun")
    assert env == {
        "PATH": "/usr/bin",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600",
    }


def test_torchrun_single_node_cpu():
    t = topo(gpus="cpu", nproc=2)
    assert build_torchrun_argv(t, TRAIN, python="/venv/bin/python") == [
        "/venv/bin/python",
        "-m",
        "toolkit.torchrun",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        *MASTER,
        *SIGNALS,
        *ENTRY,
    ]
    env = build_learner_env({"PATH": "/usr/bin", "OMP_NUM_THREADS": "4"}, t, "torchrun", stop_timeout=90)
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"  # not a flag: torchrun < 2.13 rejects --shutdown_timeout
    assert env["OMP_NUM_THREADS"] == "4"  # the user's choice wins over the default of 1
    assert (env["DS_ACCELERATOR"], env["CUDA_VISIBLE_DEVICES"]) == ("cpu", "")


def test_torchrun_multi_node_uses_c10d_rendezvous():
    env = {"SLURM_JOB_ID": "777"}
    t = topo(gpus="0,1,2,3", nnodes=2, node_rank=1, rdzv_endpoint="node001:29400", env=env)
    assert build_torchrun_argv(t, TRAIN) == [
        "python",
        "-m",
        "toolkit.torchrun",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "node001:29400",
        "--rdzv_id",
        "777",
        *SIGNALS,
        *ENTRY,
    ]
    assert build_learner_env({}, t, "torchrun")["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    cpu = topo(gpus="cpu", nproc=1, nnodes=2, node_rank=0, rdzv_endpoint="127.0.0.1:29400", env={})
    assert build_torchrun_argv(cpu, TRAIN)[3:13] == [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "127.0.0.1:29400",
        "--rdzv_id",
        "stage2-29400",
    ]
    assert "--node_rank" not in build_torchrun_argv(
        t, TRAIN
    )  # c10d ignores it (with a warning) and ranks by join order


def test_socket_interface_variables_reach_the_learner():
    """NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (set by the sbatch scripts from STAGE2_SOCKET_IFNAME) pass through."""
    t = topo(gpus="0,1", nnodes=2, node_rank=0, rdzv_endpoint="node001:29400", env={})
    env = build_learner_env({"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}, t, "torchrun")
    assert (env["NCCL_SOCKET_IFNAME"], env["GLOO_SOCKET_IFNAME"]) == ("ib0", "ib0")


def test_deepspeed_gpu_uses_include_and_never_cuda_visible_devices():
    t = topo(gpus="0,1")
    assert build_deepspeed_argv(t, TRAIN) == [
        "python",
        "-m",
        "deepspeed.launcher.runner",
        "--include",
        "localhost:0,1",
        "--no_local_rank",
        *MASTER,
        "--module",
        *ENTRY[1:],  # the runner takes the module without -m
    ]
    env = build_learner_env(BASE, t, "deepspeed")
    assert "CUDA_VISIBLE_DEVICES" not in env  # the runner would ignore --include next to it (DeepSpeed#5818)
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env


def test_deepspeed_gpu_ids_are_mapped_through_an_inherited_device_list():
    t = topo(gpus="0,1", env={"MASTER_PORT": "29511", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert build_deepspeed_argv(t, TRAIN)[3:5] == ["--include", "localhost:4,5"]
    assert build_learner_env({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, t, "torchrun")["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_deepspeed_cpu_uses_num_gpus_and_no_local_rank():
    t = topo(gpus="cpu", nproc=2)
    assert build_deepspeed_argv(t, TRAIN)[:11] == [
        "python",
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--no_local_rank",
        *MASTER,
        "--module",
    ]
    env = build_learner_env({"CUDA_VISIBLE_DEVICES": ""}, t, "deepspeed")
    assert env["DS_ACCELERATOR"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in env


def test_deepspeed_is_single_node():
    with pytest.raises(PlacementError, match="use --launcher torchrun"):
        build_deepspeed_argv(topo(gpus="0", nnodes=2, rdzv_endpoint="h:1"), TRAIN)


def test_loopback_servers_unset_proxies_and_extend_no_proxy():
    t = topo(SERVER, gpus="0,1", server_gpus="2,3")
    env = build_learner_env(BASE, t, "torchrun")
    assert not {"http_proxy", "HTTPS_PROXY"} & set(env)
    assert env["NO_PROXY"] == env["no_proxy"] == "corp.example,127.0.0.1,localhost"
    remote = topo(ProfileServers(True, (("http://rollout01:8000", 51216),), 1), gpus="0,1")
    env = build_learner_env(BASE, remote, "torchrun")
    assert env["http_proxy"] == "http://proxy:3128"  # remote servers: proxies stay, the host is exempted
    assert env["NO_PROXY"] == "corp.example,127.0.0.1,localhost,rollout01"


def test_server_command_and_env():
    t = topo(SERVER, gpus="0,1", server_gpus="2,3")
    (srv,) = t.servers
    assert build_server_argv(srv, "/r/p.yaml", ["a.b=1"]) == [
        "python",
        "-m",
        "toolkit.rollout.server",
        "--profile",
        "/r/p.yaml",
        "--gpus",
        "2,3",
        "--dp",
        "2",
        "--tp",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--set",
        "a.b=1",
    ]
    assert build_server_env(BASE, t, srv)["CUDA_VISIBLE_DEVICES"] == "2,3"
    cpu = topo(SERVER, gpus="cpu")
    assert build_server_argv(cpu.servers[0], "/r/p.yaml", [])[5:9] == ["--gpus", "cpu", "--dp", "1"]
    assert build_server_env({}, cpu, cpu.servers[0])["CUDA_VISIBLE_DEVICES"] == ""


def test_job_derived_server_ports_reach_learner_and_server_through_one_override():
    t = topo(SERVER, gpus="cpu", env={"SLURM_JOB_ID": "99"})
    s = t.servers[0]
    assert servers_override(t) == (
        f"rollout_matching.vllm.server.servers=[{{base_url: '{s.base_url}', group_port: {s.group.port}}}]"
    )


def test_env_delta_lists_what_changes():
    assert env_delta({"A": "1", "B": "2"}, {"A": "1", "C": "3"}) == {"B": None, "C": "3"}
    base = {"OMP_NUM_THREADS": "1", "http_proxy": "p"}
    assert env_delta(base, {"OMP_NUM_THREADS": "1"}) == {"OMP_NUM_THREADS": "1", "http_proxy": None}
