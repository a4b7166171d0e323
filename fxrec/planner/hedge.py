"""Hedge a packing against the least certain numbers of the cost model.

A multi-node plan prices each all-to-all byte by the link it crosses: NVLink-class
``intra_node_bandwidth`` to the node's peers, the NIC to the rest. The intra-node figure is
the least certain one (a node without NVLink, links shared with other jobs, a collective
library that routes through the NIC anyway, a default never calibrated), and a plan
balanced to the last microsecond under it can be well off balance when it is wrong: the
heuristic leaves every rank within a hair of the busiest, so many placements are as good
under the model, and nothing picks among them.

`hedge` picks: after the search, it moves and swaps single shards (table_wise and
column_wise) to lower the busiest rank's time under the *pessimistic* model, in which
every remote byte crosses the NIC (`Option.alt_times`), while no rank's time under the
nominal model grows past ``(1 + slack)`` times the nominal busiest rank's. So the plan
stays within ``slack`` of what the search found and becomes balanced under both models.

Each accepted step lowers the pessimistic load of the rank it leaves below that rank's
old load without raising the receiving rank to it, so the sum of squared pessimistic
loads strictly falls and the loop ends (a step budget and a budget of counted work,
`fxrec.planner.packing.Work`, bound it as well: never the clock, so plans are reproducible).
"""
from __future__ import annotations

import dataclasses

from fxrec.planner.packing import Packing

FANOUT = 16  # swap partners: the ranks least busy under the pessimistic model


def pessimistic(topology):
    """The topology with every remote byte over the NIC, or None on one node (where the
    NIC carries nothing and the two models agree)."""
    if topology.num_nodes <= 1:
        return None
    return dataclasses.replace(topology, intra_node_bandwidth=topology.inter_node_bandwidth)


def alt_loads(pk: Packing) -> tuple[list[float], list[float]]:
    """(per-rank pessimistic load, per-item pessimistic time) of the packing's choices."""
    load = [0.0] * pk.W
    item_alt = [0.0] * len(pk.item_time)
    for table, opt in pk.chosen.items():
        alt = opt.alt_times
        if opt.placement in ("all", "node"):
            fixed = pk.all_shards(opt, alt) if opt.placement == "all" else pk.node_shards(opt, pk.where[table], alt)
            for r, t, _ in fixed:
                load[r] += t
        else:
            for i in pk.items[table]:
                item_alt[i] = alt[0]
                load[pk.item_rank[i]] += alt[0]
    return load, item_alt


def hedge(pk: Packing, slack: float, until: float = float("inf"), max_steps: int = 20_000) -> int:
    """Rebalance ``pk`` under the pessimistic model within ``slack`` of its nominal
    makespan (see the module doc) until no step helps or ``pk.work.units`` reaches
    ``until``; returns the number of steps taken. ``pk.log`` must be None (nothing to
    undo)."""
    if slack < 0:
        raise ValueError(f"hedge: slack must be >= 0, got {slack}")
    if not pk.chosen or any(o.alt_times is None for o in pk.chosen.values()):
        return 0
    cap_time = pk.makespan() * (1 + slack)
    alt, item_alt = alt_loads(pk)
    steps = 0
    while steps < max_steps and pk.work.units < until:
        pk.work.units += pk.W
        r = max(range(pk.W), key=alt.__getitem__)
        step = _best_move(pk, alt, item_alt, r, cap_time) or _best_swap(pk, alt, item_alt, r, cap_time)
        if step is None:
            break
        for i, q in step:
            alt[pk.item_rank[i]] -= item_alt[i]
            alt[q] += item_alt[i]
            pk._move(i, q)
        steps += 1
    return steps


def _best_move(pk: Packing, alt, item_alt, r: int, cap_time: float):
    """Move one item off r: the move leaving the lower of the two ranks' new maxima."""
    top = alt[r]
    best, best_peak = None, top * (1 - 1e-12)
    pk.work.units += len(pk.rank_items[r]) * pk.W
    for i in pk.rank_items[r]:
        a, t = item_alt[i], pk.item_time[i]
        if a <= 0:
            continue
        for q in range(pk.W):
            if q == r:
                continue
            peak = max(top - a, alt[q] + a)
            if peak < best_peak and pk.load[q] + t <= cap_time and pk._can_host(q, i):
                best, best_peak = [(i, q)], peak
    return best


def _best_swap(pk: Packing, alt, item_alt, r: int, cap_time: float):
    """Swap an item of r with a lighter (pessimistically) item of another rank."""
    top = alt[r]
    best, best_peak = None, top * (1 - 1e-12)
    mine = list(pk.rank_items[r])
    pk.work.units += pk.W
    for q in sorted(range(pk.W), key=alt.__getitem__)[:FANOUT]:
        if q == r or not pk.rank_items[q]:
            continue
        pk.work.units += len(pk.rank_items[q]) * len(mine)
        for j in pk.rank_items[q]:
            aj, tj = item_alt[j], pk.item_time[j]
            for i in mine:
                d = item_alt[i] - aj
                if d <= 0:
                    continue
                peak = max(top - d, alt[q] + d)
                if (peak < best_peak and pk.load[r] - pk.item_time[i] + tj <= cap_time
                        and pk.load[q] - tj + pk.item_time[i] <= cap_time
                        and pk._can_host(q, i, leaving=j) and pk._can_host(r, j, leaving=i)):
                    best, best_peak = [(i, q), (j, r)], peak
    return best
