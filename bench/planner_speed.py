"""Planner speed: 1,000 tables on 128 ranks (16 nodes x 8) and 10,000 tables on 1,024
ranks (128 x 8), cuda-kind topology, wall time of fxrec.plan (sympy compilation and the
enumeration included; the import of fxrec is not).

    .venv/bin/python bench/planner_speed.py [--seeds 3] [--only small|large]

Targets (issue 4): under 5 s and under 60 s on this machine.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import fxrec
from fxrec import Topology
from planner_quality import random_tables

CASES = {"small": (1000, 128), "large": (10_000, 1024)}
TARGETS = {"small": 5.0, "large": 60.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", choices=tuple(CASES))
    args = ap.parse_args()
    for case, (count, world) in CASES.items():
        if args.only and case != args.only:
            continue
        topo = Topology(world, ranks_per_node=8, device="cuda")
        for seed in range(args.seeds):
            tables = random_tables(seed, count)
            t0 = time.perf_counter()
            plan = fxrec.plan(tables, topo)
            dt = time.perf_counter() - t0
            kinds = dict(Counter(tp.sharding for tp in plan.tables.values()))
            ok = "ok" if dt < TARGETS[case] else "SLOW"
            print(f"{count} tables / {world} ranks, seed {seed}: {dt:.2f} s ({ok}, target {TARGETS[case]:.0f} s); "
                  f"max/LB {plan.max_rank_time() / plan.stats['simple_lower_bound']:.4f}, "
                  f"max/cover-LB {plan.max_rank_time() / plan.stats['lower_bound']:.4f}; {kinds}")


if __name__ == "__main__":
    main()
