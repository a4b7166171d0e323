"""Lower bounds on the busiest rank's time: what no plan in the enumerated option space
can beat (memory and pinned ranks are relaxed away, so every bound here holds for every
plan the enumerator allows, whatever the memory).

- `lower_bound`: the cheapest total spread evenly, or the largest indivisible shard.
- `split_bound`: the splits a makespan forces cost their extra total.
- `cover_bound`: a table that must be split over every rank leaves less room on every
  rank, which forces the other tables' shards smaller still.

Each is at least the one before it. The bounds compare plans with their busiest rank
in seconds, as the options' ``times`` do; tests and benchmarks report max rank time
over the tightest of them.
"""
from __future__ import annotations

import math

import numpy as np

# Relative slack on comparisons of sums of float times: a bound may come out lower by
# this much, never higher.
_SLACK = 1e-12


def lower_bound(options: list[list]) -> tuple[float, float]:
    """(sum of cheapest totals, largest indivisible shard), in seconds; the bound is
    ``max(total / world_size, largest)``."""
    total = sum(min(o.total_time for o in opts) for opts in options)
    largest = max(min(o.max_time for o in opts) for opts in options)
    return total, largest


def split_bound(options: list[list], world_size: int, placed: float = 0.0) -> float:
    """The least T such that choosing, per table, its cheapest option whose largest
    shard is at most T, costs at most W * T in total (with ``placed`` seconds of load
    already on the ranks).

    A plan with busiest rank T* uses options whose shards are all at most T*, so their
    total is at least that cheapest choice and at most W * T*: T* is never below this
    bound, which is at least ``lower_bound``'s and larger when big tables must split.
    """
    return bound_from_events(split_events(options), len(options), world_size, placed)


def split_events(options: list[list]) -> list[tuple]:
    return sorted((o.max_time, i, o.total_time) for i, opts in enumerate(options) for o in opts)


def bound_from_events(events: list[tuple], num_tables: int, world_size: int, placed: float = 0.0) -> float:
    if not num_tables:
        return placed / world_size
    best: dict[int, float] = {}
    total = placed
    for k, (t, i, tot) in enumerate(events):
        old = best.get(i)
        if old is None or tot < old:
            total += tot - (old or 0.0)
            best[i] = tot
        nxt = events[k + 1][0] if k + 1 < len(events) else math.inf
        if len(best) == num_tables and nxt > t:
            candidate = max(t, total / world_size)
            if candidate <= nxt:
                return candidate
    return math.inf


def covers_every_rank(opt, topology) -> bool:
    """Whether every placement of the option puts a shard on every rank."""
    if opt.placement == "all":
        return True
    if opt.placement == "node":
        return topology.num_nodes == 1
    return opt.num_shards == topology.world_size


class _Flat:
    """All options of all tables as numpy columns."""

    def __init__(self, options: list[list], topology):
        flat = [(i, o) for i, opts in enumerate(options) for o in opts]
        self.num_tables = len(options)
        self.table = np.array([i for i, _ in flat], dtype=np.int64)
        self.max = np.array([o.max_time for _, o in flat])
        self.total = np.array([o.total_time for _, o in flat])
        # the least time every rank receives from the option (0 unless it covers them all)
        self.floor = np.array([min(t for t, k in zip(o.times, o.counts) if k) if covers_every_rank(o, topology)
                               else 0.0 for _, o in flat])

    def per_table_min(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.full(self.num_tables, np.inf)
        np.minimum.at(out, self.table[mask], values[mask])
        return out


def admissible(flat: _Flat, T: float):
    """The options a plan with busiest rank at most T may use, and per table the least
    load its admissible options put on every rank; None if some table has none.

    Start from the options whose largest shard is at most T; then, while it changes,
    drop an option of table j whose largest shard exceeds T minus the loads that the
    other tables' admissible options put on every rank at least."""
    mask = flat.max <= T * (1 + _SLACK)
    while True:
        floors = flat.per_table_min(flat.floor, mask)
        if not np.isfinite(floors).all():
            return None
        room = T - (floors.sum() - floors[flat.table])  # what the others leave on every rank
        keep = mask & (flat.max <= room + T * _SLACK)
        if (keep == mask).all():
            return mask, floors
        mask = keep


def _passes(flat: _Flat, T: float, world_size: int) -> bool:
    found = admissible(flat, T)
    if found is None:
        return False
    cheapest = flat.per_table_min(flat.total, found[0])
    return cheapest.sum() <= world_size * T * (1 + _SLACK)


def cover_bound(options: list[list], topology, tolerance: float = 1e-9) -> float:
    """A lower bound on the busiest rank's time of every plan over these options, at
    least `split_bound`, larger when a table must be split over every rank.

    A T is refuted when no choice of admissible options (see `admissible`) totals at
    most W * T. Proof that the best plan's busiest rank T* is never refuted: let the
    plan choose option c_i for table i. Every c_i has its largest shard at most T*. If
    every admissible option of table i covers every rank (`covers_every_rank`), so does
    c_i, and it puts at least floor_i (the least such load over those options) on each
    rank; so each shard of c_j shares its rank with at least sum over i != j of
    floor_i, and is at most T* minus that: c_j survives every round of `admissible`,
    by induction. The ranks' loads sum to the total of the c_i, which is at least the
    sum of the cheapest admissible totals and at most W * T*. Hence T* passes.

    Admissible sets only grow with T (each round is monotone in T and in the sets), so
    the cheapest admissible total only falls while W * T rises: the T that pass form an
    interval [T0, inf). The bisection keeps its lower end at a refuted T (or at
    `split_bound`, where nothing covers) and returns it, within ``tolerance`` of T0.
    """
    lo = split_bound(options, topology.world_size)
    if not options or not math.isfinite(lo):
        return lo
    flat = _Flat(options, topology)
    if _passes(flat, lo, topology.world_size):
        return lo
    hi = 2 * lo
    while not _passes(flat, hi, topology.world_size):
        lo, hi = hi, 2 * hi
    while hi - lo > tolerance * hi:
        mid = 0.5 * (lo + hi)
        if _passes(flat, mid, topology.world_size):
            hi = mid
        else:
            lo = mid
    return lo
