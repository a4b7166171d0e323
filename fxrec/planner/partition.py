"""Choose one option per table and place its shards: minimise the busiest rank's time
under every rank's memory.

The heuristic tries several split thresholds theta: each table takes its cheapest
option (least total time) among those whose largest shard costs at most theta, then
shards are placed largest first on the least-loaded rank with room, and local search
moves and swaps shards off the busiest rank. The best packings over the thresholds are
refined (re-choosing the option of a table on the busiest rank, one or two at a time)
and perturbed (seeded iterated local search), within a budget of counted work
(`fxrec.planner.packing.Work`) that grows with the construction's work, never with the
clock: the same input gives the same plan on a fast or a loaded machine. The bounds
(`fxrec.planner.bounds`, re-exported here) set the thresholds and say when to stop.
"""
from __future__ import annotations

import math
import random

from fxrec.planner.bounds import cover_bound, lower_bound, split_bound  # noqa: F401 (the last two re-exported)
from fxrec.planner.packing import Packing, Work

# Work floors of the refinement and the perturbation (they also get half the construction's
# work). One unit is about one Python-level step, 3-5 million a second on the 2-core
# machine the planner benchmarks ran on: the floors are ~1 s there for small instances
# (pairs of changes are tried) and 0.2-0.3 s for large ones, what the time budgets were.
REFINE_FLOOR = {True: 4_500_000, False: 1_400_000}
PERTURB_FLOOR = {True: 4_500_000, False: 900_000}


def choose(options: list[list], theta: float) -> list:
    """Per table, the least-total option whose largest shard is at most theta (else the
    one with the smallest largest shard); ties go to less memory."""
    out = []
    for opts in options:
        fit = [o for o in opts if o.max_time <= theta]
        if fit:
            out.append(min(fit, key=lambda o: (o.total_time, o.total_mem)))
        else:
            out.append(min(opts, key=lambda o: (o.max_time, o.total_time)))
    return out


def pack(chosen: list, topology, cap: float, by: str = "time",
         work: Work | None = None) -> tuple[Packing | None, int | None]:
    """Place the chosen options; returns (packing, None) or (None, table that did not
    fit). ``by="memory"`` orders shards by bytes instead of seconds, for tight memory.
    ``work``: the counter the packing adds to (a new one if None)."""
    pk = Packing(topology, cap, work)
    spread = [o for o in chosen if o.placement == "all"]
    for opt in sorted(spread, key=lambda o: -o.max_mem):
        if not pk.place(opt):  # replicas or row shards alone overflow a rank
            return None, opt.table
    movable = [o for o in chosen if o.placement != "all"]
    key = (lambda o: (o.max_mem, o.max_time)) if by == "memory" else (lambda o: (o.max_time, o.max_mem))
    # pinned tables first: they have the fewest choices; then largest first
    movable.sort(key=lambda o: (o.allowed is None, tuple(-v for v in key(o))))
    pk.start_heap()
    for opt in movable:
        if not pk.place(opt):
            return None, opt.table
    pk.stop_heap()
    return pk, None


def _thetas(lb: float) -> list[float]:
    """Split thresholds: none, and fractions of the lower bound ``lb`` (shards well
    under the makespan pack tightly)."""
    return [math.inf] + [lb * f for f in (2.0, 1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.25, 0.125)]


def heuristic(options: list[list], topology, cap: float):
    """The best packing over the split thresholds, refined; or (None, tables that
    failed). Refinement and perturbation each get work in proportion to the
    construction's (at least a floor), so they at most about double the planning time;
    the packing's ``work`` counts all of it."""
    work = Work()
    found, failed, seen = [], [], set()
    lb = cover_bound(options, topology)
    for theta in _thetas(lb):
        chosen = choose(options, theta)
        sig = tuple(id(o) for o in chosen)
        if sig in seen:
            continue
        seen.add(sig)
        pk, bad = _pack_any(chosen, options, topology, cap, work)
        if pk is None:
            failed.append(bad)
            continue
        pk.local_search()
        found.append(pk)
    if not found:
        return None, failed
    found.sort(key=lambda p: p.score())
    small = len(options) * topology.world_size <= 256  # pairs of changes are affordable
    built = work.units
    until = work.units + max(REFINE_FLOOR[small], built // 2)
    for pk in found[:2]:
        pk.log = []
        refine(pk, options, until, depth=2 if small else 1)
    best = min(found[:2], key=lambda p: p.score())
    if best.makespan() > lb * (1 + 1e-3):
        until = work.units + max(PERTURB_FLOOR[small], built // 2)
        perturb(best, options, until, rounds=300 if small else 30)
    best.log = None
    return best, []


def refine(pk: Packing, options: list[list], until: int, max_tables: int = 8, depth: int = 1) -> None:
    """Re-choose the option of a table on the busiest rank (re-placing it and running
    local search) while that lowers (busiest load, number of ranks that busy) and
    ``pk.work.units`` is below ``until``. ``pk.log`` must be a list (the changes stay
    undoable by the caller)."""
    while pk.work.units < until:
        base = pk.score()
        r = max(range(pk.W), key=pk.load.__getitem__)
        if not _improve_one(pk, options, pk.tables_on(r)[:max_tables], base, depth):
            break


def perturb(pk: Packing, options: list[list], until: int, rounds: int, seed: int = 0) -> None:
    """Iterated local search: re-choose two or three random tables' options at random
    (one of them on the busiest rank), refine, keep the result only if it is better.
    Seeded and bounded by work (``pk.work.units`` below ``until``), so a plan is reproducible."""
    rng = random.Random(seed)
    T = len(options)
    for _ in range(rounds):
        if pk.work.units >= until:
            return
        base = pk.score()
        mark = len(pk.log)
        r = max(range(pk.W), key=pk.load.__getitem__)
        picks = {rng.choice(pk.tables_on(r))} | {rng.randrange(T) for _ in range(rng.randint(1, 2))}
        ok = True
        for t in picks:
            alt = rng.choice(options[t])
            pk.remove(t)
            if not pk.place(alt):
                ok = False
                break
        if ok:
            pk.local_search(max_steps=500)
            refine(pk, options, until)
            if _better(pk.score(), base):
                pk.log.clear()
                continue
        pk.undo(mark)


def _improve_one(pk: Packing, options: list[list], tables: list[int], base, depth: int = 1) -> bool:
    """Try every other option of each table (and, with depth 2, a second change on the
    then busiest rank); keep the first change that beats ``base``."""
    total = sum(pk.load)
    for t in tables:
        cur = pk.chosen[t]
        for alt in sorted(options[t], key=lambda o: o.total_time):
            if alt is cur or (total - cur.total_time + alt.total_time) / pk.W >= base[0]:
                continue  # the same, or no better even if perfectly balanced
            mark = len(pk.log)
            pk.remove(t)
            if pk.place(alt):
                pk.local_search(max_steps=200)
                if _better(pk.score(), base):
                    return True
                if depth > 1:
                    r = max(range(pk.W), key=pk.load.__getitem__)
                    others = [u for u in pk.tables_on(r)[:4] if u != t]
                    if _improve_one(pk, options, others, base, depth - 1):
                        return True
            pk.undo(mark)
    return False


def _better(a, b) -> bool:
    if a[0] < b[0] * (1 - 1e-12):
        return True
    return a[0] <= b[0] * (1 + 1e-12) and a[1] < b[1]


def _pack_any(chosen: list, options: list[list], topology, cap: float, work: Work | None = None):
    """Pack by time, then by memory, then with the tables that failed split into
    options of smaller shards, until it fits or nothing smaller is left; then with the
    tables already placed shrunk too (`_pack_shrunk`)."""
    chosen = list(chosen)
    for _ in range(len(chosen) + 1):
        pk, bad = _pack_both(chosen, topology, cap, work)
        if pk is not None:
            return pk, None
        smaller = [o for o in options[bad] if o.max_mem < chosen[bad].max_mem]
        if not smaller:
            break
        chosen[bad] = min(smaller, key=lambda o: (o.total_time, o.max_mem))
    pk = _pack_shrunk(chosen, options, topology, cap, work)
    return (pk, None) if pk is not None else (None, bad)


def _pack_both(chosen: list, topology, cap: float, work: Work | None):
    for by in ("time", "memory"):
        pk, bad = pack(chosen, topology, cap, by, work)
        if pk is not None:
            return pk, None
    return None, bad


def _least_memory(opts: list):
    return min(opts, key=lambda o: (o.total_mem, o.max_mem, o.total_time))


def _pack_shrunk(chosen: list, options: list[list], topology, cap: float, work: Work | None):
    """When the failing table has nothing smaller, the room it lacks is held by tables
    placed before it, at options larger than they need (tight memory, e.g. one rank:
    data_parallel before table_wise). Move the 1, 2, 4, ... tables that save the most
    memory to their least-memory option, until every table is at its least; log2(T)
    packings, and none at all where the plain packing fits (plans there are unchanged)."""
    least = [_least_memory(opts) for opts in options]
    saving = sorted(range(len(chosen)), key=lambda t: (-(chosen[t].total_mem - least[t].total_mem), t))
    saving = [t for t in saving if least[t] is not chosen[t]]
    k = 1
    while saving:
        trial = list(chosen)
        for t in saving[:k]:
            trial[t] = least[t]
        pk, _ = _pack_both(trial, topology, cap, work)
        if pk is not None or k >= len(saving):
            return pk
        k *= 2
    return None


def assignment(pk: Packing) -> list[tuple]:
    """Per table, in order: (option, where) with where a list of ranks ("one",
    "distinct"), a node ("node") or None ("all")."""
    return [(pk.chosen[i], pk.where[i]) for i in range(len(pk.chosen))]
