"""`fxrec.planner.hedge`: after the search, re-balance under the pessimistic model (every
remote byte over the NIC) without letting the nominal busiest rank grow past the slack."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fxrec
from fxrec import TableInfo, Topology
from fxrec.planner import hedge
from fxrec.planner.enumerate import Option
from fxrec.planner.packing import Packing

TWO_NODES = Topology(4, ranks_per_node=2, device="cuda")


def one(table: int, time: float, alt: float) -> Option:
    return Option(table, "table_wise", "triton", "one", (time,), (1.0,), (1,), alt_times=(alt,))


def packed(opts_and_ranks) -> Packing:
    pk = Packing(TWO_NODES, cap=1e9)
    for opt, r in opts_and_ranks:
        pk._set_choice(opt.table, opt, [r])
        pk._add_item(opt.table, r, opt.times[0], opt.mems[0])
    return pk


def test_hedge_balances_the_pessimistic_loads_within_the_nominal_makespan():
    # Nominal loads all 2.0; pessimistic 4.0 on ranks 0 and 1 (their tables are all-to-all
    # heavy), 2.0 on ranks 2 and 3. Swapping a heavy table with a light one of equal nominal
    # time levels the pessimistic loads at 3.0 and leaves every nominal load at 2.0.
    pk = packed([(one(0, 1.0, 2.0), 0), (one(1, 1.0, 2.0), 0), (one(2, 1.0, 2.0), 1), (one(3, 1.0, 2.0), 1),
                 (one(4, 1.0, 1.0), 2), (one(5, 1.0, 1.0), 2), (one(6, 1.0, 1.0), 3), (one(7, 1.0, 1.0), 3)])
    steps = hedge.hedge(pk, slack=0.0)
    assert steps == 2
    assert pk.load == [2.0] * 4
    assert hedge.alt_loads(pk)[0] == [3.0] * 4
    assert sorted(pk.where[t][0] for t in range(8)) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("slack,nominal_max,alt_max", [
    (0.0, 3.0, 6.0),  # a move would push rank 1 to 4.0 > 3.0: nothing happens
    (0.5, 4.0, 4.0),  # 4.0 <= 3.0 * 1.5: the heavy table moves over
])
def test_slack_bounds_the_nominal_makespan(slack, nominal_max, alt_max):
    pk = Packing(Topology(2, ranks_per_node=1, device="cuda"), cap=1e9)
    for opt, r in [(one(0, 1.0, 4.0), 0), (one(1, 2.0, 2.0), 0), (one(2, 3.0, 0.0), 1)]:
        pk._set_choice(opt.table, opt, [r])
        pk._add_item(opt.table, r, opt.times[0], opt.mems[0])
    hedge.hedge(pk, slack)
    assert pk.makespan() == nominal_max
    assert max(hedge.alt_loads(pk)[0]) == alt_max


def random_tables(seed: int, count: int) -> list[TableInfo]:
    rng = np.random.default_rng(seed)
    return [TableInfo(f"t{i}", int(rng.lognormal(11, 1.5)) + 100, int(rng.choice([32, 64, 128, 256])),
                      float(rng.lognormal(2, 1))) for i in range(count)]


def pessimistic_max(plan: fxrec.Plan) -> float:
    worse = dataclasses.replace(plan, topology=hedge.pessimistic(plan.topology))
    return max(r["time"] for r in worse.per_rank())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_hedges_within_its_slack_and_balances_the_pessimistic_model(seed):
    topo = Topology(16, ranks_per_node=4, device="cuda")
    tables = random_tables(seed, 60)
    plain = fxrec.plan(tables, topo, hedge=0.0)
    hedged = fxrec.plan(tables, topo, hedge=0.01)
    assert hedged.max_rank_time() <= plain.max_rank_time() * 1.01 * (1 + 1e-9)
    assert hedged.stats["hedge_steps"] > 0
    assert pessimistic_max(hedged) < pessimistic_max(plain)
    assert fxrec.Plan.from_json(hedged.to_json()).max_rank_time() == pytest.approx(hedged.max_rank_time())


def test_one_node_and_exact_search_are_not_hedged(monkeypatch):
    # The hedge is replaced by one that fails: a plan equal to the unhedged one could still
    # come from a hedge that ran and found no step.
    def no_hedge(*args, **kwargs):
        raise AssertionError("the hedge ran")
    monkeypatch.setattr(hedge, "hedge", no_hedge)
    tables = random_tables(3, 40)
    one_node = Topology(8, ranks_per_node=8, device="cuda")
    assert hedge.pessimistic(one_node) is None
    assert "hedge_steps" not in fxrec.plan(tables, one_node, hedge=0.2).stats
    small = fxrec.plan(tables[:6], Topology(4, ranks_per_node=2, device="cuda"), hedge=0.2)
    assert small.stats["method"].startswith(("exact", "heuristic (proved")) and "hedge_steps" not in small.stats


@pytest.mark.parametrize("bad", [-0.1, 1.0, "0.1", True])
def test_bad_hedge_is_rejected(bad):
    with pytest.raises(ValueError, match=r"fxrec.plan: hedge must be a fraction in \[0, 1\), got"):
        fxrec.plan(random_tables(0, 3), TWO_NODES, hedge=bad)
