"""`fxrec.plan` returns the same plan for the same input however busy the machine is.

The search's later phases (refinement, perturbation, the hedge) are bounded by counted
work, never by the clock, so a slow or loaded machine cannot cut them short at a
different point. The tests replace `time.perf_counter` (wherever the planner might read
it) with a clock that runs 50 ms per reading, a machine far slower than any real one, and
compare plans as JSON.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import fxrec
from fxrec import TableInfo, Topology
from fxrec.planner import partition


class CrawlingClock:
    """A perf_counter that advances 50 ms per reading."""

    def __init__(self):
        self.now = time.perf_counter()

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


def random_tables(seed: int, count: int) -> list[TableInfo]:
    rng = np.random.default_rng(seed)
    return [TableInfo(f"t{i}", int(rng.lognormal(11, 1.5)) + 100, int(rng.choice([16, 32, 64, 128, 256])),
                      float(rng.lognormal(1.5, 1))) for i in range(count)]


CASES = {  # (tables, seed, topology), reaching the phases each name says (checked below)
    "small: refinement by pairs, perturbation": (12, 0, Topology(8, ranks_per_node=8, device="cuda")),
    "one node: perturbation": (60, 1, Topology(16, ranks_per_node=16, device="cuda")),
    "two nodes: hedge": (200, 2, Topology(32, ranks_per_node=16, device="cuda")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_the_same_on_a_crawling_machine(case, monkeypatch):
    count, seed, topo = CASES[case]
    tables = random_tables(seed, count)
    perturbed = []
    real_perturb = partition.perturb
    monkeypatch.setattr(partition, "perturb", lambda *a, **k: perturbed.append(1) or real_perturb(*a, **k))
    reference = fxrec.plan(tables, topo, search="heuristic")
    assert bool(perturbed) == ("perturbation" in case)
    assert (reference.stats.get("hedge_steps", 0) > 0) == ("hedge" in case)
    monkeypatch.setattr(time, "perf_counter", CrawlingClock())
    slow = fxrec.plan(tables, topo, search="heuristic")
    assert slow.to_json() == reference.to_json()
    assert slow.stats.get("hedge_steps") == reference.stats.get("hedge_steps")
