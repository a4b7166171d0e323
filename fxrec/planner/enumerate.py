"""Every way each table may be sharded, with its shards' cost.

An `Option` is one sharding type with one kernel and fixed shard sizes; where its
shards go is left to the partitioner. Shards of an option come in at most two size
groups (an even split of R rows over k parts gives R mod k parts of one more row), so
an option stays O(1) in size even when it covers 1,024 ranks.

Kernels differ only in lookup efficiency in the cost model (memory does not depend on
the kernel), so per sharding type only the table's fastest allowed kernel is kept: the
others are dominated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fxrec.planner import cost, hedge
from fxrec.planner.spec import Constraint

# Where the partitioner may put an option's shards.
PLACEMENT = {"table_wise": "one", "column_wise": "distinct", "table_row_wise": "node",
             "row_wise": "all", "data_parallel": "all"}


@dataclass(eq=False)
class Option:
    """One candidate plan of one table. ``times``/``mems``/``counts`` describe the shard
    size groups: the first ``counts[0]`` shards (in rank order for "all", in position
    order within the node for "node") cost ``times[0]`` seconds and ``mems[0]`` bytes,
    the rest ``times[1]`` / ``mems[1]``."""

    table: int
    sharding: str
    kernel: str
    placement: str
    times: tuple
    mems: tuple
    counts: tuple
    allowed: frozenset | None = None  # ranks the shards may use (None: any)
    nodes: tuple | None = None  # for "node": the nodes it may use
    alt_times: tuple | None = None  # ``times`` under the pessimistic topology (`fxrec.planner.hedge`)

    def __post_init__(self):
        self.num_shards = sum(self.counts)
        self.total_time = float(sum(t * k for t, k in zip(self.times, self.counts)))
        self.total_mem = float(sum(m * k for m, k in zip(self.mems, self.counts)))
        self.max_time = float(max(t for t, k in zip(self.times, self.counts) if k))
        self.max_mem = float(max(m for m, k in zip(self.mems, self.counts) if k))


def split_even(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous half-open ranges tiling [0, total): the first total % parts
    ranges are one longer."""
    q, r = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append((start, end))
        start = end
    return out


def column_splits(dim: int, world_size: int) -> list[int]:
    """Numbers of equal column shards: k > 1 dividing dim/4 (each shard a multiple of 4
    columns) or, when dim is not a multiple of 4, k dividing dim; at most one shard per
    rank."""
    unit = dim // 4 if dim % 4 == 0 else dim
    return [k for k in range(2, min(unit, world_size) + 1) if unit % k == 0]


@dataclass
class TableSpec:
    """What the enumerator needs of one table, after constraints."""

    info: object  # TableInfo
    types: tuple
    kernel: str
    eff: float
    pooling_factor: float
    constraint: Constraint


def default_types(topology) -> tuple:
    """table_row_wise only where a node is a strict, non-trivial part of the world."""
    multi = topology.num_nodes > 1 and topology.ranks_per_node > 1
    return tuple(t for t in cost.SHARDING_TYPES if t != "table_row_wise" or multi)


def table_specs(tables, constraints: dict, topology, kernel_efficiency=None) -> list[TableSpec]:
    specs = []
    for info in tables:
        con = constraints.get(info.name) or Constraint()
        types = con.sharding_types or default_types(topology)
        kernels = con.kernels or cost.DEFAULT_KERNELS[topology.device]
        effs = [cost.kernel_efficiency(topology.device, k, kernel_efficiency) for k in kernels]
        best = int(np.argmax(effs))
        pf = info.pooling_factor if con.pooling_factor is None else float(con.pooling_factor)
        specs.append(TableSpec(info, tuple(types), kernels[best], effs[best], pf, con))
    return specs


def _shapes(spec: TableSpec, sharding: str, topology) -> list[tuple[int, int, int]]:
    """(rows, cols, count) of each shard-size group, or [] if the type cannot apply."""
    N, d = spec.info.num_embeddings, spec.info.embedding_dim
    W, Pn = topology.world_size, topology.ranks_per_node
    con = spec.constraint
    allowed = set(con.ranks) if con.ranks is not None else None
    if sharding == "table_wise":
        return [(N, d, 1)]
    if sharding == "data_parallel" or sharding == "row_wise":
        if allowed is not None and len(allowed) < W:
            return []
        if sharding == "data_parallel":
            return [(N, d, W)]
        if N < W:  # a rank would hold no rows: the rewrite serves every rank a real range
            return []
        q, r = divmod(N, W)
        return [g for g in ((q + 1, d, r), (q, d, W - r)) if g[2]]
    if sharding == "table_row_wise":
        if N < Pn:
            return []
        q, r = divmod(N, Pn)
        return [g for g in ((q + 1, d, r), (q, d, Pn - r)) if g[2]]
    raise AssertionError(sharding)


def _candidates(spec: TableSpec, topology) -> list[tuple[str, list]]:
    """(sharding, shape groups) pairs allowed by the constraint (before memory)."""
    out = []
    con = spec.constraint
    room = len(con.ranks) if con.ranks is not None else topology.world_size
    for sharding in spec.types:
        if sharding == "column_wise":
            shapes = [[(spec.info.num_embeddings, spec.info.embedding_dim // k, k)]
                      for k in column_splits(spec.info.embedding_dim, room)]
        else:
            shapes = [_shapes(spec, sharding, topology)]
        for groups in shapes:
            if not groups:
                continue
            count = sum(g[2] for g in groups)
            if (con.min_shards and count < con.min_shards) or (con.max_shards and count > con.max_shards):
                continue
            out.append((sharding, groups))
    return out


def _allowed_nodes(spec: TableSpec, topology) -> tuple | None:
    if spec.constraint.ranks is None:
        return None
    pins = set(spec.constraint.ranks)
    return tuple(nd for nd in range(topology.num_nodes) if set(topology.node_ranks(nd)) <= pins)


def enumerate_options(specs: list[TableSpec], topology, batch_size: int, optimizer, wire: int | None = None):
    """Per table, the options whose every shard fits one rank's memory; ``wire``: the bytes
    per element of the plan's comm_dtype (`cost.wire_bytes`), None for none.

    Returns ``(options, rejected)``: ``options[i]`` lists table i's options;
    ``rejected[i]`` lists (sharding, largest shard bytes) of the options that were
    dropped because a shard exceeds ``topology.memory_per_rank``.
    """
    rows = {s: [] for s in cost.SHARDING_TYPES}  # sharding -> [(table, option slot, groups)]
    worse = hedge.pessimistic(topology)  # also cost every shard for `hedge`
    for i, spec in enumerate(specs):
        for slot, (sharding, groups) in enumerate(_candidates(spec, topology)):
            rows[sharding].append((i, slot, groups))
    built: list[dict] = [dict() for _ in specs]
    for sharding, items in rows.items():
        if not items:
            continue
        shards = _shard_arrays(specs, items, wire)
        kinds = optimizer if isinstance(optimizer, str) else \
            [cost.kind_for(optimizer, specs[i].info.name) for i, _, groups in items for _ in groups]
        res = cost.shard_costs(sharding, shards, topology, batch_size, kinds)
        alt = cost.shard_costs(sharding, shards, worse, batch_size, kinds)["time"] if worse else None
        pos = 0
        for i, slot, groups in items:
            k = len(groups)
            alt_t = tuple(float(t) for t in alt[pos:pos + k]) if worse else None
            built[i][slot] = (sharding, groups, res["time"][pos:pos + k], res["memory"][pos:pos + k], alt_t)
            pos += k
    cap = topology.memory_per_rank
    options, rejected = [], []
    for i, spec in enumerate(specs):
        keep, drop = [], []
        pins = frozenset(spec.constraint.ranks) if spec.constraint.ranks is not None else None
        for slot in sorted(built[i]):
            sharding, groups, times, mems, alt_t = built[i][slot]
            opt = Option(i, sharding, spec.kernel, PLACEMENT[sharding], tuple(float(t) for t in times),
                         tuple(float(m) for m in mems), tuple(g[2] for g in groups), pins, alt_times=alt_t)
            if sharding == "table_row_wise":
                opt.nodes = _allowed_nodes(spec, topology)
                if opt.nodes == ():
                    continue
            (keep if opt.max_mem <= cap else drop).append(opt)
        options.append(keep)
        rejected.append([(o.sharding, o.max_mem, o.num_shards) for o in drop])
    return options, rejected


def _shard_arrays(specs, items, wire: int | None) -> dict:
    """Column arrays of the cost model's shard parameters, one entry per size group."""
    cols = {s.name: [] for s in cost.GIVEN_ARGS}
    for i, _, groups in items:
        spec = specs[i]
        for rows_, c, _ in groups:
            for key, v in cost.shard_params(spec.info, rows_, c, spec.pooling_factor, spec.eff, wire=wire).items():
                cols[key].append(v)
    return cols
