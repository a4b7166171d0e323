"""Planner quality: the busiest rank's time against the lower bound and the exact optimum.

Random table sets with log-normal sizes and pooling factors, planned on several
topologies. Reported per regime (several seeds): max rank time over three lower bounds
(fxrec.planner.bounds; each holds for every plan the enumerator allows, each at least
the one before):
- LB: max(cheapest total time / ranks, largest indivisible shard) (the issue's bound);
- split-LB: the splits that a makespan forces cost their extra communication;
- cover-LB: a table that must be split over every rank leaves less room on each, which
  forces the other tables' shards smaller (the tightest; the proof is in
  `bounds.cover_bound`).
On small instances also max rank time of the heuristic / the exact optimum (branch and
bound).

    .venv/bin/python bench/planner_quality.py            # all regimes
    .venv/bin/python bench/planner_quality.py --quick    # fewer seeds

Targets (issue 4): within 5% of the lower bound; within 2% of the exact optimum.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fxrec
from fxrec import TableInfo, Topology
from fxrec.planner import enumerate as en
from fxrec.planner import exact, partition


def random_tables(seed: int, count: int, rows_median: float = 2e5, rows_sigma: float = 1.5,
                  pf_median: float = 5.0, pf_sigma: float = 1.0) -> list[TableInfo]:
    """Log-normal rows and pooling factors; dims from {16, 32, 64, 128, 256}."""
    rng = np.random.default_rng(seed)
    rows = np.clip(rng.lognormal(np.log(rows_median), rows_sigma, count), 10, 2e9).astype(np.int64)
    pf = np.clip(rng.lognormal(np.log(pf_median), pf_sigma, count), 1.0, 1000.0)
    dims = rng.choice([16, 32, 64, 128, 256], count, p=[0.1, 0.2, 0.3, 0.3, 0.1])
    return [TableInfo(f"t{i}", int(rows[i]), int(dims[i]), float(pf[i])) for i in range(count)]


def options_for(tables, topo: Topology, batch_size: int = 512):
    specs = en.table_specs(tables, {}, topo)
    options, _ = en.enumerate_options(specs, topo, batch_size, "sgd")
    return options


# name -> (tables, world, ranks per node, device, memory per rank as a multiple of the
#          cheapest total memory / ranks (None: the device default))
REGIMES = {
    "1000 tables / 128 cuda (16x8)": (1000, 128, 8, "cuda", None),
    "256 tables / 64 cuda (8x8)": (256, 64, 8, "cuda", None),
    "64 tables / 32 cuda (4x8), 2 per rank": (64, 32, 8, "cuda", None),
    "128 tables / 16 cuda, memory 1.3x needed": (128, 16, 8, "cuda", 1.3),
    "100 tables / 8 cpu": (100, 8, 8, "cpu", None),
    "24 tables / 16 cpu, pooling sigma 2": (24, 16, 16, "cpu", None),
}


def run_regime(name: str, seeds: list[int]) -> list[float]:
    count, world, rpn, device, mem_factor = REGIMES[name]
    ratios = []
    for seed in seeds:
        sigma = 2.0 if "sigma 2" in name else 1.0
        tables = random_tables(seed, count, pf_sigma=sigma)
        topo = Topology(world, ranks_per_node=rpn, device=device)
        if mem_factor is not None:
            opts = options_for(tables, topo)
            need = sum(min(o.total_mem for o in oo) for oo in opts) / world
            topo = Topology(world, ranks_per_node=rpn, device=device, memory_per_rank=int(need * mem_factor))
        t0 = time.perf_counter()
        plan = fxrec.plan(tables, topo, search="heuristic")
        dt = time.perf_counter() - t0
        top = plan.max_rank_time()
        ratio, split, tight = (top / plan.stats[k] for k in ("simple_lower_bound", "split_lower_bound", "lower_bound"))
        ratios.append((ratio, split, tight))
        kinds = {}
        for tp in plan.tables.values():
            kinds[tp.sharding] = kinds.get(tp.sharding, 0) + 1
        print(f"  seed {seed}: max/LB {ratio:.4f}  max/split-LB {split:.4f}  max/cover-LB {tight:.4f}  "
              f"imbalance {plan.imbalance():.4f}  {dt:.2f}s  {kinds}")
    return ratios


def run_exact(seeds: list[int], count: int, world: int, rpn: int, device: str, budget: int) -> list[float]:
    gaps = []
    for seed in seeds:
        tables = random_tables(seed, count, rows_median=5e4, rows_sigma=2.0)
        topo = Topology(world, ranks_per_node=rpn, device=device)
        options = options_for(tables, topo)
        pk, _ = partition.heuristic(options, topo, topo.memory_per_rank)
        t0 = time.perf_counter()
        res = exact.search(options, topo, topo.memory_per_rank, node_budget=budget)
        dt = time.perf_counter() - t0
        best = res.makespan if res.assignment is not None else pk.makespan()
        gap = pk.makespan() / best
        tag = "optimal" if res.optimal else "budget hit (best found)"
        gaps.append(gap)
        print(f"  seed {seed}: heuristic/exact {gap:.4f}  ({tag}, {res.nodes} nodes, {dt:.1f}s)")
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds per regime, smaller exact instances")
    args = ap.parse_args()
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    summary = []
    for name in REGIMES:
        print(name)
        r = np.array(run_regime(name, seeds))
        summary.append((name, r[:, 0].max(), r[:, 0].mean()))
        summary.append(("  vs split-aware bound", r[:, 1].max(), r[:, 1].mean()))
        summary.append(("  vs cover-aware bound (tightest)", r[:, 2].max(), r[:, 2].mean()))
    exact_cases = [(8, 4, 2, "cuda"), (10, 4, 4, "cuda"), (8, 4, 4, "cpu")] if args.quick else \
        [(8, 4, 2, "cuda"), (10, 4, 4, "cuda"), (12, 4, 2, "cuda"), (10, 4, 4, "cpu")]
    for count, world, rpn, device in exact_cases:
        name = f"exact: {count} tables / {world} {device} ({world // rpn}x{rpn})"
        print(name)
        g = run_exact(seeds, count, world, rpn, device, budget=2_000_000 if args.quick else 6_000_000)
        summary.append((name, max(g), float(np.mean(g))))
    print("\nsummary (worst, mean) of max rank time / bound:")
    for name, worst, mean in summary:
        print(f"  {name:48s} worst {worst:.4f}  mean {mean:.4f}")


if __name__ == "__main__":
    main()
