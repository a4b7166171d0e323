"""The equivalence of test_shard_equivalence.py under NCCL, on as many GPUs as the machine
has (2 to 4; skipped with fewer): the sharded model on ``cuda:rank`` (its kernels, its NCCL
collectives) against the unsharded model trained on the global batch on the CPU.

Tolerances are looser than gloo's fp32-exact 1e-5: the GPU's pooled sums and the CPU's add in
different orders. bench/gpu_session.sh runs this file when it finds two or more GPUs.
"""
from __future__ import annotations

import copy
import os
import tempfile
import traceback

import pytest
import torch
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.optim import RowWiseAdagrad
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES
from test_shard_equivalence import EPS, SPARSE_LR, STEPS, _reference_step, reference_training  # the gloo test's

B = 4
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD = min(GPUS, 4)
# (sharding, model): every sharding type, pooled (KJT) and unpooled lookups
JOBS = [("table_wise", "dlrm_ebc"), ("row_wise", "dlrm_ebc"), ("column_wise", "dlrm_ebc"),
        ("table_row_wise", "dlrm_ebc"), ("data_parallel", "dlrm_ebc"), ("row_wise", "sequence_ec"),
        ("column_wise", "two_tower")]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA devices (NCCL)")]


def _to(batch: tuple, device) -> tuple:
    return tuple(x.to(device) for x in batch)


def _close(what: str, got, want, out: list) -> None:
    try:
        assert_close(got.detach().cpu(), want.detach().cpu(), rtol=1e-4, atol=1e-5)
    except AssertionError as e:
        lines = str(e).strip().splitlines()
        out.append(f"{what}: {lines[0]} {lines[-1]}")


def _run_job(rank: int, world: int, sharding: str, name: str, device_type: str = "cuda") -> list[str]:
    """One job on this rank; `device_type` "cpu" runs the same code under gloo (a dry run of
    this file where no GPU is present: `_worker(rank, world, "cpu")` via run_workers)."""
    case, bad = CASES[name], []
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = case.build()
    ref = copy.deepcopy(model)  # stays on the CPU
    batches = case.local_batches(world, B, seed=1)
    tables = fxrec.find_tables(model, batches[0])
    # table_row_wise over 2 nodes, so that its two hops are real; the others on one node
    ranks_per_node = max(1, world // 2) if sharding == "table_row_wise" else world
    topology = Topology(world, ranks_per_node=ranks_per_node, device=device_type)
    sm = shard(model, topology, _to(batches[rank], device), constraints={t.name: sharding for t in tables},
               sparse_optimizer=RowWiseAdagrad(SPARSE_LR, eps=EPS))
    with torch.no_grad():
        _close("forward", sm(*_to(batches[rank], device)), ref(*case.concat(batches))[rank * B:(rank + 1) * B], bad)
    t_params, opt, ref_opt = reference_training(sm, ref)
    state: dict = {}
    for step in range(STEPS):
        batches = case.local_batches(world, B, seed=10 + step)
        opt.zero_grad()
        sm(*_to(batches[rank], device)).square().mean().backward()
        opt.step()
        ref.zero_grad()
        ref(*case.concat(batches)).square().mean().backward()
        ref_opt.step()
        _reference_step(sm, t_params, state, "rowwise_adagrad")  # exact: the whole row's mean
    full, want = sm.full_state_dict(), ref.state_dict()
    if list(full) != list(want):
        bad.append(f"full_state_dict keys {list(full)} != {list(want)}")
    for key in want:
        if key in full:
            _close(f"after {STEPS} steps, {key}", full[key], want[key], bad)
    _checkpoint_round_trip(sm, full, case, topology, tables, batches[rank], device, sharding, name, bad)
    return bad


def _checkpoint_round_trip(sm, full, case, topology, tables, batch, device, sharding, name, bad) -> None:
    """fxrec.checkpoint from the GPU shards: saved under this plan, loaded under another
    (row_wise or table_wise) on the same ranks, the tables come back (the optimizer state's
    resharding is checked on gloo, tests/test_checkpoint.py)."""
    path = os.path.join(tempfile.gettempdir(), f"fxrec_nccl_ckpt_{os.getppid()}_{sharding}_{name}")
    fxrec.checkpoint.save(sm, path)
    other_kind = "row_wise" if sharding == "table_wise" else "table_wise"
    other = shard(case.build(), topology, _to(batch, device), constraints={t.name: other_kind for t in tables},
                  sparse_optimizer=RowWiseAdagrad(SPARSE_LR, eps=EPS))
    fxrec.checkpoint.load(other, path)
    for key, value in other.full_state_dict().items():
        if not torch.equal(value.cpu(), full[key].cpu()):
            bad.append(f"checkpoint {sharding} -> {other_kind}: {key} differs after load")


def _worker(rank: int, world: int, device_type: str = "cuda") -> dict:
    results = {}
    for job in JOBS:
        try:
            results[job] = _run_job(rank, world, *job, device_type)
        except Exception:  # noqa: BLE001 - reported per job; the other ranks are stuck in a collective
            results[job] = [traceback.format_exc(limit=6)]
            break
    return results


_RESULTS: dict = {}


@pytest.mark.parametrize("sharding, name", JOBS)
def test_nccl_sharded_equals_unsharded(sharding, name):
    if not _RESULTS:
        for rank, res in enumerate(run_workers(_worker, WORLD, timeout=300, backend="nccl")):
            for job, fails in res.items():
                _RESULTS.setdefault(job, []).extend(f"rank {rank}: {f}" for f in fails)
    job = (sharding, name)
    assert job in _RESULTS, "job not run (an earlier job on some rank failed)"
    assert _RESULTS[job] == [], "\n".join(_RESULTS[job])
