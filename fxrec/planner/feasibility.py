"""Why a plan does not fit, said so that the user knows what to change.

Each check raises `PlanError` naming the tables, the memory they need, the memory there
is, and what would make it fit: row-wise sharding, more ranks, a 16-bit dtype.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fxrec.planner import cost
from fxrec.planner.spec import PlanError


def fmt_bytes(b: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def _row_wise_shard_bytes(spec, topology, world_size: int, batch_size: int, optimizer,
                          element_bytes: int | None = None) -> float:
    """Largest row-wise shard of a table on ``world_size`` ranks (same device, node size)."""
    topo = dataclasses.replace(topology, world_size=world_size,
                               ranks_per_node=math.gcd(world_size, topology.ranks_per_node))
    info = spec.info
    shard = cost.shard_params(info, math.ceil(info.num_embeddings / world_size), info.embedding_dim,
                              spec.pooling_factor, spec.eff, element_bytes)
    kind = cost.kind_for(optimizer, info.name)
    return float(cost.shard_costs("row_wise", shard, topo, batch_size, kind)["memory"][0])


def _ranks_needed(spec, topology, batch_size: int, optimizer) -> int | None:
    """The smallest multiple of the node size on which row-wise fits: doubling the world
    size until it does, then bisecting between the last two sizes (the largest shard only
    shrinks as ranks are added)."""
    def fits(w: int) -> bool:
        return _row_wise_shard_bytes(spec, topology, w, batch_size, optimizer) <= topology.memory_per_rank

    w = topology.world_size
    for _ in range(24):
        if fits(2 * w):
            break
        w *= 2
    else:
        return None
    step = topology.ranks_per_node
    lo, hi = w // step, 2 * w // step  # in nodes: lo does not fit, hi does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid * step) else (mid, hi)
    return hi * step


def _fixes(spec, topology, batch_size: int, optimizer) -> list[str]:
    cap, W = topology.memory_per_rank, topology.world_size
    name = spec.info.name
    out = []
    rw = _row_wise_shard_bytes(spec, topology, W, batch_size, optimizer)
    if "row_wise" not in spec.types and rw <= cap:
        out.append(f"allow row_wise for {name!r} ({fmt_bytes(rw)} per rank over {W} ranks)")
    more = _ranks_needed(spec, topology, batch_size, optimizer)
    if more is not None:
        out.append(f"use at least {more} ranks (row_wise: "
                   f"{fmt_bytes(_row_wise_shard_bytes(spec, topology, more, batch_size, optimizer))} per rank)")
    half = _row_wise_shard_bytes(spec, topology, W, batch_size, optimizer, element_bytes=2)
    if spec.info.element_bytes > 2 and half <= cap:  # a fix only where it fits by itself
        out.append(f"store {name!r} in float16 (row_wise: {fmt_bytes(half)} per rank, weights "
                   f"{fmt_bytes(spec.info.num_embeddings * spec.info.embedding_dim * 2)})")
    return out


def _excluded(spec, topology) -> str:
    """Why each sharding type the constraint allows has no option, memory aside ("; "
    before each reason, "" if none is known)."""
    reasons = [_why_not(spec, sharding, topology) for sharding in spec.types]
    return "".join(f"; {r}" for r in reasons if r)


def _why_not(spec, sharding: str, topology) -> str | None:
    """Every row shard needs a row; row_wise / data_parallel use every rank, table_row_wise
    a whole node, so pins to fewer rule them out; column shards are equal, of whole blocks
    of 4 columns (when the dim has them), at most one per (pinned) rank; and the number of
    shards must lie within min_shards / max_shards."""
    from fxrec.planner.enumerate import column_splits

    n, d = spec.info.num_embeddings, spec.info.embedding_dim
    W, Pn = topology.world_size, topology.ranks_per_node
    con = spec.constraint
    pins = sorted(con.ranks) if con.ranks is not None else None
    room = len(pins) if pins is not None else W
    if sharding in ("data_parallel", "row_wise") and room < W:
        return f"{sharding} needs all {W} ranks, the table is pinned to {room} ({_some(pins)})"
    if sharding in ("row_wise", "table_row_wise") and n < (W if sharding == "row_wise" else Pn):
        return f"{sharding} needs at least {W if sharding == 'row_wise' else Pn} rows (one per rank), the table has {n}"
    if sharding == "table_row_wise" and pins is not None and \
            not any(set(topology.node_ranks(nd)) <= set(pins) for nd in range(topology.num_nodes)):
        return f"table_row_wise needs a whole node ({Pn} ranks) among the ranks it is pinned to ({_some(pins)})"
    counts = {"table_wise": [1], "data_parallel": [W], "row_wise": [W], "table_row_wise": [Pn],
              "column_wise": column_splits(d, room)}[sharding]
    if not counts:
        unit = "blocks of 4 columns" if d % 4 == 0 else "columns"
        return (f"column_wise needs 2 or more equal shards of whole {unit}, at most one per rank: dim {d} "
                f"({d // 4 if d % 4 == 0 else d} {unit}) has no such split over {room} ranks")
    if not any((not con.min_shards or k >= con.min_shards) and (not con.max_shards or k <= con.max_shards)
               for k in counts):
        bounds = ", ".join(f"{key}={getattr(con, key)}" for key in ("min_shards", "max_shards") if getattr(con, key))
        return f"{sharding} makes {' or '.join(map(str, counts))} shard(s), outside {bounds}"
    return None


def _some(ranks: list) -> str:
    return "ranks " + ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")


def check_tables_fit(specs, options, rejected, topology, batch_size: int, optimizer) -> None:
    """Raise if some table has no allowed option whose every shard fits one rank."""
    bad = [i for i, opts in enumerate(options) if not opts]
    if not bad:
        return
    cap, W = topology.memory_per_rank, topology.world_size
    if not any(rejected[i] for i in bad):  # no option at all: the constraint, not memory
        lines = [f"{len(bad)} table(s) cannot be placed on {W} ranks"]
    else:
        lines = [f"{len(bad)} table(s) do not fit: each rank has {fmt_bytes(cap)} ({W} ranks)"]
    for i in bad:
        spec = specs[i]
        if not rejected[i]:
            lines.append(f"  {spec.info.name!r}: no sharding type is allowed by its constraint "
                         f"{spec.constraint} on this topology{_excluded(spec, topology)}")
            continue
        sharding, need, _ = min(rejected[i], key=lambda r: r[1])
        lines.append(f"  {spec.info.name!r}: needs {fmt_bytes(need)} on one rank at best ({sharding}; weights "
                     f"{fmt_bytes(spec.info.weight_bytes)} {str(spec.info.dtype).replace('torch.', '')})")
        fixes = _fixes(spec, topology, batch_size, optimizer)
        if fixes:
            lines.append("    to fit: " + "; or ".join(fixes))
    raise PlanError("\n".join(lines))


def check_total_fits(specs, options, topology, batch_size: int, optimizer) -> None:
    """Raise if the cheapest-memory option of every table together exceeds all ranks."""
    need = [min(o.total_mem for o in opts) for opts in options]
    have = topology.memory_per_rank * topology.world_size
    if sum(need) <= have:
        return
    order = sorted(range(len(specs)), key=lambda i: -need[i])[:5]
    names = ", ".join(f"{specs[i].info.name!r} ({fmt_bytes(need[i])})" for i in order)
    ranks = topology.ranks_per_node * math.ceil(sum(need) / topology.memory_per_rank / topology.ranks_per_node)
    lines = [f"the tables need {fmt_bytes(sum(need))} in total but {topology.world_size} ranks hold "
             f"{topology.world_size} x {fmt_bytes(topology.memory_per_rank)} = {fmt_bytes(have)}; "
             f"largest: {names}",
             f"  to fit: use at least {ranks} ranks"]
    if any(s.info.element_bytes > 2 for s in specs):
        lines[-1] += "; or store the largest tables in float16 (halves their weights)"
    raise PlanError("\n".join(lines))


def packing_failed(specs, options, failed, topology) -> PlanError:
    """The heuristic found no packing although each table fits alone and the total fits."""
    names = sorted({specs[i].info.name for i in failed if i is not None}) or [s.info.name for s in specs]
    need = sum(min(o.total_mem for o in opts) for opts in options)
    have = topology.memory_per_rank * topology.world_size
    biggest = {specs[i].info.name: min(o.max_mem for o in options[i]) for i in failed if i is not None}
    detail = ", ".join(f"{k!r} ({fmt_bytes(v)} per shard)" for k, v in sorted(biggest.items()))
    return PlanError(
        f"could not place table(s) {detail or ', '.join(map(repr, names))}: the tables need "
        f"{fmt_bytes(need)} of {fmt_bytes(have)} ({topology.world_size} x {fmt_bytes(topology.memory_per_rank)}) "
        "and no packing was found with every rank under its memory\n"
        "  to fit: allow row_wise for the largest tables, use more ranks, or store tables in float16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
