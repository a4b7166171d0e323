"""Lower bounds on the busiest rank: ordered (simple <= split <= cover), never above the
exact optimum, and the cover bound exact on a hand-made instance where the split bound
is not."""
from __future__ import annotations

import numpy as np
import pytest

import fxrec
from fxrec import TableInfo, Topology
from fxrec.planner import bounds, exact
from fxrec.planner import enumerate as en
from fxrec.planner.enumerate import Option


def opt(table: int, sharding: str, time: float, shards: int = 1) -> Option:
    placement = "one" if shards == 1 else "distinct"
    return Option(table, sharding, "fbgemm", placement, (time,), (1.0,), (shards,))


def test_cover_bound_charges_the_room_a_covering_split_leaves():
    # table 0 fits no rank whole (2.0), so it is split over both ranks (0.6 each);
    # table 1 whole (0.8) then fits on neither, and its halves (0.45) make it 1.05
    topo = Topology(2, device="cpu")
    options = [[opt(0, "table_wise", 2.0), opt(0, "column_wise", 0.6, 2)],
               [opt(1, "table_wise", 0.8), opt(1, "column_wise", 0.45, 2)]]
    assert bounds.split_bound(options, 2) == pytest.approx(1.0)
    assert bounds.cover_bound(options, topo) == pytest.approx(1.05, rel=1e-8)
    assert bounds.cover_bound(options, topo) <= 1.05
    res = exact.search(options, topo, topo.memory_per_rank)
    assert res.optimal and res.makespan == pytest.approx(1.05)


def test_cover_bound_is_the_split_bound_when_nothing_must_cover():
    topo = Topology(4, device="cpu")
    options = [[opt(0, "table_wise", 0.5), opt(0, "column_wise", 0.3, 2)],
               [opt(1, "table_wise", 0.4)], [opt(2, "table_wise", 0.2)]]
    assert bounds.cover_bound(options, topo) == bounds.split_bound(options, 4)


@pytest.mark.parametrize("placement,shards,world,nodes,covers", [
    ("all", 4, 4, 1, True),
    ("distinct", 4, 4, 1, True),
    ("distinct", 2, 4, 1, False),
    ("one", 1, 1, 1, True),
    ("node", 4, 8, 2, False),
    ("node", 4, 4, 1, True),
])
def test_covers_every_rank(placement, shards, world, nodes, covers):
    topo = Topology(world, ranks_per_node=world // nodes, device="cuda")
    o = Option(0, "x", "triton", placement, (1.0,), (1.0,), (shards,))
    assert bounds.covers_every_rank(o, topo) is covers


def heavy_instance(seed: int, count: int, topo: Topology):
    """Random tables, the first with a pooling factor large enough that it must be
    split over every rank."""
    rng = np.random.default_rng(seed)
    tables = [TableInfo(f"t{i}", int(rng.lognormal(10, 1.5)) + 10, int(rng.choice([16, 32, 64])),
                        float(rng.lognormal(1.5, 1))) for i in range(count)]
    tables[0] = TableInfo("t0", 200_000, 64, float(rng.uniform(150, 400)))
    specs = en.table_specs(tables, {}, topo)
    options, _ = en.enumerate_options(specs, topo, 512, "sgd")
    return tables, options


@pytest.mark.parametrize("seed,count,world,per_node,device", [
    (0, 5, 4, 4, "cpu"),
    (1, 6, 4, 4, "cpu"),
    (2, 6, 4, 4, "cuda"),
    (3, 6, 4, 2, "cuda"),
    (4, 7, 4, 4, "cpu"),
    (5, 5, 2, 2, "cuda"),
])
def test_bounds_are_ordered_and_below_the_optimum(seed, count, world, per_node, device):
    topo = Topology(world, ranks_per_node=per_node, device=device)
    _, options = heavy_instance(seed, count, topo)
    total, largest = bounds.lower_bound(options)
    simple, split = max(total / world, largest), bounds.split_bound(options, world)
    cover = bounds.cover_bound(options, topo)
    res = exact.search(options, topo, topo.memory_per_rank, node_budget=3_000_000)
    assert res.optimal and res.assignment is not None
    assert simple <= split * (1 + 1e-12) and split <= cover <= res.makespan * (1 + 1e-12)


def test_plan_reports_all_three_bounds():
    topo = Topology(4, device="cpu")
    tables, _ = heavy_instance(1, 6, topo)
    plan = fxrec.plan(tables, topo, search="heuristic")
    s = plan.stats
    assert s["simple_lower_bound"] <= s["split_lower_bound"] <= s["lower_bound"] <= plan.max_rank_time() * (1 + 1e-12)
