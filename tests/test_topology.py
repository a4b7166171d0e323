"""fxrec.Topology: defaults per device kind, from_env, load/save, bad input; and the
`fxrec bench calibrate` profile it reads."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import fxrec
from fxrec.cli import main
from fxrec.topology import DEFAULTS, GiB, Topology, parse_bytes


@pytest.mark.parametrize("device,world,rpn,nodes", [
    ("cuda", 128, 8, 16),
    ("cuda", 4, 4, 1),  # fewer ranks than a node: one partial node
    ("cpu", 6, 6, 1),
])
def test_defaults(device, world, rpn, nodes):
    t = Topology(world, device=device)
    assert (t.ranks_per_node, t.num_nodes) == (rpn, nodes)
    for key in ("memory_per_rank", "host_memory_per_rank", "hbm_bandwidth", "intra_node_bandwidth",
                "inter_node_bandwidth"):
        assert getattr(t, key) == DEFAULTS[device][key]
    assert fxrec.Topology is Topology


def test_cuda_defaults_are_h100_class():
    t = Topology(16, device="cuda")
    assert t.memory_per_rank == 80 * GiB
    assert t.inter_node_bandwidth == 400e9 / 8  # one 400 Gb/s NIC per GPU
    assert t.ring_bandwidth == t.inter_node_bandwidth  # two nodes: the ring crosses the NIC
    assert Topology(8, device="cuda").ring_bandwidth == t.intra_node_bandwidth
    assert [t.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert list(t.node_ranks(1)) == list(range(8, 16))


@pytest.mark.parametrize("text,value", [("80GB", 80 * 10**9), ("64GiB", 64 * GiB), ("512MiB", 512 << 20),
                                        ("1e9", 10**9), (123, 123), ("1.5 kb", 1500)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value
    assert Topology(2, memory_per_rank=text).memory_per_rank == value


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=0), "world_size must be a positive integer"),
    (dict(world_size=12, ranks_per_node=8), "not a multiple of ranks_per_node 8"),
    (dict(world_size=2, device="tpu"), "device must be one of"),
    (dict(world_size=2, memory_per_rank="lots"), "cannot read 'lots'"),
    (dict(world_size=2, hbm_bandwidth=-1), "hbm_bandwidth must be a positive finite number (bytes/s), got -1"),
    (dict(world_size=None), "world_size must be a positive integer, got None"),
    (dict(world_size="4"), "world_size must be a positive integer, got '4'"),
    (dict(world_size=2.5), "world_size must be a positive integer, got 2.5"),
    (dict(world_size=2, ranks_per_node=[2]), "ranks_per_node must be a positive integer, got [2]"),
    (dict(world_size=2, hbm_bandwidth="fast"), "hbm_bandwidth must be a positive finite number (bytes/s), "
                                               "got 'fast'"),
    (dict(world_size=2, intra_node_bandwidth=float("inf")), "intra_node_bandwidth must be a positive finite"),
    (dict(world_size=2, inter_node_bandwidth=float("nan")), "inter_node_bandwidth must be a positive finite"),
    (dict(world_size=2, hbm_bandwidth=True), "hbm_bandwidth must be a positive finite number (bytes/s), got True"),
])
def test_bad_topology(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        Topology(**kwargs)


def test_from_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    t = Topology.from_env(device="cpu")
    assert (t.world_size, t.ranks_per_node, t.num_nodes, t.device) == (16, 4, 4, "cpu")
    assert 0 < t.memory_per_rank  # the host's memory shared by the node's 4 ranks
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    t = Topology.from_env(device="cpu", memory_per_rank="1GB")
    assert (t.world_size, t.ranks_per_node, t.memory_per_rank) == (1, 1, 10**9)


@pytest.mark.parametrize("env,overrides,world,rpn", [
    ({}, dict(world_size=8), 8, 8),  # one CPU host with 8 ranks, not 8 hosts of one
    ({"WORLD_SIZE": "4"}, dict(ranks_per_node=2), 4, 2),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, dict(world_size=8, ranks_per_node=2), 8, 2),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "4"}, dict(world_size=32), 32, 4),
])
def test_from_env_overrides_set_the_derived_fields(monkeypatch, env, overrides, world, rpn):
    """The ranks per node and the host memory split follow the overrides, not the launcher's
    variables they replace."""
    from fxrec.topology import _host_memory

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    t = Topology.from_env(device="cpu", **overrides)
    assert (t.world_size, t.ranks_per_node) == (world, rpn)
    assert t.memory_per_rank == t.host_memory_per_rank == _host_memory() // rpn


@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a positive integer"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' is not a positive integer"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a positive integer"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not a positive integer"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2' is not a positive integer"),
])
def test_from_env_names_a_bad_launcher_variable(monkeypatch, env, match):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        Topology.from_env(device="cpu")


def test_calibrate_profile_splits_host_memory_among_spawned_ranks(monkeypatch):
    """The spawn path has no WORLD_SIZE: the profile still gives each of its ranks a share."""
    from fxrec.planner.calibrate import _profile
    from fxrec.topology import _host_memory

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = {"memory_bandwidth": 1e10, "intra_node": {"all_to_all": 1e9, "all_reduce": 1e9}}
    t = _profile(result, 2, 2, "cpu")
    assert t.memory_per_rank == t.host_memory_per_rank == _host_memory() // 2


def test_save_load_roundtrip_and_overrides(tmp_path):
    t = Topology(16, ranks_per_node=4, device="cuda", memory_per_rank="40GB", hbm_bandwidth=2e12)
    path = tmp_path / "t.json"
    t.save(str(path), calibration={"note": "extra keys are kept in the file, ignored by load"})
    assert Topology.load(str(path)) == t
    big = Topology.load(str(path), world_size=64)
    assert (big.world_size, big.ranks_per_node, big.hbm_bandwidth) == (64, 4, 2e12)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        Topology.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Topology.load(str(bad))
    bad.write_text(json.dumps({"device": "cpu"}))
    with pytest.raises(ValueError, match="no world_size"):
        Topology.load(str(bad))


@pytest.mark.slow
def test_bench_calibrate_gloo_two_processes(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = main(["bench", "calibrate", "--world-size", "2", "--backend", "gloo", "--size", "256KiB",
               "--iters", "1", "-o", str(out)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    t = Topology.load(str(out))
    assert (t.world_size, t.device) == (2, "cpu")
    data = json.loads(out.read_text())
    assert data["calibration"]["backend"] == "gloo"
    assert set(data["calibration"]["measured"]) == {"hbm_bandwidth", "intra_node_bandwidth"}
    assert t.intra_node_bandwidth == data["calibration"]["intra_node"]["all_to_all"] > 0
    assert t.hbm_bandwidth == data["calibration"]["memory_bandwidth"] > 0
    # the profile plans a larger job with the measured bandwidths
    assert Topology.load(str(out), world_size=8).intra_node_bandwidth == t.intra_node_bandwidth


def test_bench_needs_action_and_checks_size(capsys):
    assert main(["bench"]) == 2
    assert "calibrate" in capsys.readouterr().err
    assert main(["bench", "calibrate", "--size", "huge"]) == 2
    assert "cannot read 'huge'" in capsys.readouterr().err
    assert main(["bench", "calibrate", "--size", "1"]) == 2  # a byte times latency, not bandwidth
    assert "--size '1' is too small to measure a bandwidth" in capsys.readouterr().err
    assert main(["bench", "calibrate", "--size", "1e400"]) == 2
    assert "'1e400' is not a finite size" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without GPUs")
def test_bench_calibrate_nccl_without_gpus_is_a_one_line_error(capsys):
    assert main(["bench", "calibrate", "--backend", "nccl", "--world-size", "2", "--size", "64KiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxrec bench calibrate: error: calibrate: backend 'nccl' needs CUDA GPUs") and \
        err.count("\n") == 1


def test_bench_calibrate_one_rank_says_links_are_not_measured(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["bench", "calibrate", "--world-size", "1", "--size", "64KiB", "--iters", "1", "-o", str(out)]) == 0
    assert "links not measured on 1 rank (the profile keeps the default" in capsys.readouterr().out
    assert json.loads(out.read_text())["calibration"]["measured"] == ["hbm_bandwidth"]


@pytest.mark.parametrize("count", [4, 4.0, np.int64(4), torch.tensor(4)])
def test_counts_of_numpy_and_torch_integers_are_taken(count):
    t = Topology(count, ranks_per_node=count // 2, device="cpu")
    assert (t.world_size, t.ranks_per_node) == (4, 2) and type(t.world_size) is int
    split = Topology.from_env("cpu", world_size=count, ranks_per_node=count // 2)
    assert split.memory_per_rank == Topology.from_env("cpu", world_size=4, ranks_per_node=2).memory_per_rank
    for bad in (2.5, torch.tensor(2.5), "4", True):
        with pytest.raises(ValueError, match=r"world_size must be a positive integer"):
            Topology(bad)


@pytest.mark.parametrize("data", ["x", None, [("world_size", 2)]])
def test_from_dict_refuses_what_is_not_a_dict(data):
    with pytest.raises(TypeError, match=rf"Topology.from_dict: data must be a dict \(a profile\), got {type(data).__name__}"):
        Topology.from_dict(data)
