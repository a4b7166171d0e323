"""The partitioner: the heuristic against the exact search (and the exact search against
brute force) on small random instances with explicit seeds; memory limits; the bound."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fxrec
from fxrec import TableInfo, Topology
from fxrec.planner import enumerate as en
from fxrec.planner import exact, partition


def instance(seed: int, count: int, topo: Topology, max_dim: int = 128):
    rng = np.random.default_rng(seed)
    tables = [TableInfo(f"t{i}", int(rng.lognormal(10, 2)) + 10, int(rng.choice([16, 32, 64, max_dim])),
                        float(rng.lognormal(1.5, 1))) for i in range(count)]
    specs = en.table_specs(tables, {}, topo)
    options, _ = en.enumerate_options(specs, topo, 512, "sgd")
    return tables, options


def loads_of(assignment, topo: Topology) -> list[float]:
    """Per-rank time of an assignment, recomputed independently of the search."""
    load = [0.0] * topo.world_size
    P = topo.ranks_per_node
    for opt, where in assignment:
        k0 = opt.counts[0]
        if opt.placement == "all":
            ranks = [(r, opt.times[r >= k0]) for r in range(topo.world_size)]
        elif opt.placement == "node":
            ranks = [(where * P + i, opt.times[i >= k0]) for i in range(P)]
        else:
            assert len(set(where)) == len(where) == opt.num_shards
            ranks = [(r, opt.times[0]) for r in where]
        for r, t in ranks:
            load[r] += t
    return load


@pytest.mark.parametrize("seed,count,world,per_node,device", [
    (0, 6, 4, 2, "cuda"),
    (1, 6, 4, 2, "cuda"),
    (2, 7, 4, 4, "cuda"),
    (3, 8, 4, 2, "cuda"),
    (4, 8, 4, 4, "cpu"),
    (5, 7, 4, 2, "cpu"),
])
def test_heuristic_within_2_percent_of_exact(seed, count, world, per_node, device):
    topo = Topology(world, ranks_per_node=per_node, device=device)
    _, options = instance(seed, count, topo)
    pk, _ = partition.heuristic(options, topo, topo.memory_per_rank)
    heuristic = pk.makespan()
    assert max(loads_of(partition.assignment(pk), topo)) == pytest.approx(heuristic)
    res = exact.search(options, topo, topo.memory_per_rank, node_budget=3_000_000)
    assert res.optimal
    best = res.makespan if res.assignment is not None else heuristic
    if res.assignment is not None:
        assert max(loads_of(res.assignment, topo)) == pytest.approx(res.makespan)
    total, largest = partition.lower_bound(options)
    assert max(total / world, largest) <= partition.split_bound(options, world) <= best * (1 + 1e-9)
    assert best <= heuristic * (1 + 1e-9)
    assert heuristic <= best * 1.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_brute_force(seed):
    topo = Topology(2, device="cuda")
    _, options = instance(seed, 3, topo, max_dim=8)
    choices = []
    for opts in options:
        per = []
        for o in opts:
            if o.placement in ("all", "node"):
                per.append((o, None if o.placement == "all" else 0))
            else:
                per += [(o, list(c)) for c in itertools.combinations(range(2), o.num_shards)]
        choices.append(per)
    brute = min(max(loads_of(combo, topo)) for combo in itertools.product(*choices))
    res = exact.search(options, topo, topo.memory_per_rank)
    assert res.optimal and res.makespan == pytest.approx(brute, rel=1e-12)


def test_plan_uses_exact_search_on_small_instances():
    topo = Topology(4, ranks_per_node=2, device="cuda")
    tables, options = instance(0, 6, topo)
    plan = fxrec.plan(tables, topo)
    assert plan.stats["method"] in ("exact", "heuristic (proved optimal)")
    res = exact.search(options, topo, topo.memory_per_rank)
    assert plan.max_rank_time() == pytest.approx(res.makespan if res.assignment else plan.stats["max_rank_time"])
    assert fxrec.plan(tables, topo, search="heuristic").stats["method"] == "heuristic"


def test_an_exact_search_that_finds_nothing_better_says_so():
    """On 16 ranks the branch and bound runs out of its budget before it beats or proves the
    heuristic's plan: the plan is the heuristic's, and its stats say the exact search ran."""
    topo = Topology(16, ranks_per_node=8, device="cuda")
    tables, _ = instance(0, 10, topo)
    plan = fxrec.plan(tables, topo, search="exact")
    assert plan.stats["method"] == "heuristic (exact search: nothing better within its budget)"
    assert "search: heuristic (exact search: nothing better within its budget)" in plan.explain()


def test_medium_instance_is_close_to_the_lower_bound():
    topo = Topology(32, device="cuda")
    rng = np.random.default_rng(12)
    tables = [TableInfo(f"t{i}", int(rng.lognormal(12, 2)) + 10, int(rng.choice([32, 64, 128])),
                        float(rng.lognormal(2, 1))) for i in range(200)]
    plan = fxrec.plan(tables, topo)
    assert plan.max_rank_time() <= plan.stats["lower_bound"] * 1.05


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_tight_memory_is_respected_by_splitting(device):
    # each table needs 1.49 GB as one shard, 4.45 GB together: only splits fit in 4 x 1.2 GB
    tables = [TableInfo(f"t{i}", 5_800_000, 64, 4.0) for i in range(3)]
    topo = Topology(4, device=device, memory_per_rank="1.2GB")
    plan = fxrec.plan(tables, topo)
    for r in plan.per_rank():
        assert r["memory_bytes"] <= topo.memory_per_rank
    assert all(plan[t.name].sharding != "table_wise" for t in tables)


@pytest.mark.parametrize("search", ["auto", "heuristic"])
def test_one_rank_with_tight_memory_shrinks_tables_already_placed(search):
    """On one rank data_parallel (the fastest) takes twice table_wise's memory; memory 1%
    over every table's least-memory option fits only if the tables placed first give up
    data_parallel too, not just the one that failed."""
    tables = [TableInfo(f"t{i}", 285254, 4, pooling_factor=5.0, pooling="mean", uses=2) for i in range(13)]
    tables += [TableInfo(f"u{i}", 47050, 8, pooling_factor=50.0, dtype=torch.float16, pooling="mean")
               for i in range(3)]
    big = Topology(1, device="cuda", memory_per_rank=1 << 40)
    options, _ = en.enumerate_options(en.table_specs(tables, {}, big), big, 512, "sgd")
    cap = int(sum(min(o.total_mem for o in opts) for opts in options) * 1.01)
    plan = fxrec.plan(tables, Topology(1, device="cuda", memory_per_rank=cap), search=search)
    assert plan.per_rank()[0]["memory_bytes"] <= cap


@pytest.mark.parametrize("world,count,budget", [(8, 6, 100), (8, 6, 1000), (32, 12, 2000)])
def test_exact_search_stops_at_its_step_budget(world, count, budget):
    """The loops over options and rank combinations stop once the budget is spent (they
    used to keep calling into children that returned at once: minutes on 32 ranks); the
    budget counts steps, not seconds, so the result repeats."""
    tables = [TableInfo(f"t{i}", 1_000_000 + 1000 * i, 128, pooling_factor=20) for i in range(count)]
    topo = Topology(world, device="cuda")
    options, _ = en.enumerate_options(en.table_specs(tables, {}, topo), topo, 512, "sgd")
    runs = [exact.search(options, topo, topo.memory_per_rank, node_budget=budget) for _ in range(2)]
    assert runs[0].nodes <= budget + 1 and not runs[0].optimal
    assert runs[0].makespan == runs[1].makespan and runs[0].nodes == runs[1].nodes
