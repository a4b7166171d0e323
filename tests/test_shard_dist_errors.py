"""fxrec.shard on 2 gloo processes: bad input fails on every rank with a clear error (no rank is
left waiting in a collective), and ranks may feed different batch sizes where the plan allows."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.planner.plan import PlanError
from fxrec.shard import shard
from fxrec.topology import Topology
from shard_models import CASES


def _expect(fn, exc_type) -> str:
    try:
        fn()
    except exc_type as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, world: int) -> dict:
    case = CASES["dlrm_lists"]
    torch.manual_seed(0)
    model = case.build()
    g = torch.Generator().manual_seed(1)
    sizes = [2, 3]  # rank 1 feeds one more sample than rank 0
    batches = [case.draw(g, b) for b in sizes]
    tables = fxrec.find_tables(model, batches[0])
    out = {}
    out["world"] = _expect(lambda: shard(model, Topology(4), batches[rank]), ValueError)
    out["infeasible"] = _expect(lambda: shard(model, Topology(2, memory_per_rank="1KB"), batches[rank]), PlanError)
    rw = shard(model, Topology(2), batches[rank], constraints={t.name: "row_wise" for t in tables})
    out["unequal_row_wise"] = _expect(lambda: rw(*batches[rank]), ValueError)
    # table_wise and data_parallel exchange bag counts: uneven local batches are fine
    mixed = {"emb_l.0": "table_wise", "emb_l.1": "data_parallel", "emb_l.2": "column_wise"}
    sm = shard(model, Topology(2), batches[rank], constraints=mixed)
    with torch.no_grad():
        got, want = sm(*batches[rank]), model(*case.concat(batches))
    start = sum(sizes[:rank])
    assert_close(got, want[start:start + sizes[rank]])
    out["uneven_ok"] = True
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, 2, timeout=180)


def test_world_size_mismatch_on_every_rank(results):
    for r in results:
        assert "topology has world_size 4 but this job has 2 rank(s)" in r["world"]


def test_planning_error_raised_on_every_rank(results):
    for r in results:
        assert r["infeasible"].startswith("PlanError") and "emb_l" in r["infeasible"]


def test_row_wise_needs_equal_batches(results):
    for r in results:
        assert "table 'emb_l.0'" in r["unequal_row_wise"]
        assert "every rank must feed the same number of bags per step; ranks fed [2, 3]" in r["unequal_row_wise"]


def test_uneven_batches_where_the_plan_allows(results):
    assert all(r["uneven_ok"] for r in results)
