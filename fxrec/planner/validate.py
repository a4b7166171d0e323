"""Structural checks of a plan: what the rewrite pass relies on.

- every shard is on a rank of the topology and inside its table;
- a sharded table's shards tile it exactly (each element on exactly one shard);
- data_parallel: one whole-table shard on every rank; table_wise: one whole shard;
  row_wise: one row range per rank, in rank order; table_row_wise: one row range per
  rank of one node; column_wise: whole-row column ranges on distinct ranks.
"""
from __future__ import annotations

import numpy as np

from fxrec.planner.cost import KERNELS, SHARDING_TYPES


def _fail(name: str, msg: str):
    raise ValueError(f"plan: table {name!r}: {msg}")


def _tiles(name: str, shards, N: int, d: int) -> None:
    rows = sorted({0, N, *(v for s in shards for v in s.rows)})
    cols = sorted({0, d, *(v for s in shards for v in s.cols)})
    cover = np.zeros((len(rows) - 1, len(cols) - 1), dtype=np.int64)
    for s in shards:
        if s.num_rows == 0 or s.num_cols == 0:
            continue
        r0, r1 = rows.index(s.rows[0]), rows.index(s.rows[1])
        c0, c1 = cols.index(s.cols[0]), cols.index(s.cols[1])
        cover[r0:r1, c0:c1] += 1
    if (cover != 1).any():
        r, c = np.argwhere(cover != 1)[0]
        _fail(name, f"shards cover rows [{rows[r]}, {rows[r + 1]}) x cols [{cols[c]}, {cols[c + 1]}) "
                    f"{cover[r, c]} times, not exactly once")


def validate_table(tp, topology) -> None:
    name, info = tp.name, tp.table
    if tp.sharding not in SHARDING_TYPES:
        _fail(name, f"unknown sharding type {tp.sharding!r}")
    if tp.kernel not in KERNELS:
        _fail(name, f"unknown kernel {tp.kernel!r}")
    N, d, W = info.num_embeddings, info.embedding_dim, topology.world_size
    if not tp.shards:
        _fail(name, "has no shards")
    for s in tp.shards:
        if not 0 <= s.rank < W:
            _fail(name, f"shard on rank {s.rank}, outside the {W}-rank world")
        if not (0 <= s.rows[0] <= s.rows[1] <= N and 0 <= s.cols[0] < s.cols[1] <= d):
            _fail(name, f"shard rows {s.rows} cols {s.cols} outside the {N} x {d} table")
    ranks = [s.rank for s in tp.shards]
    whole = all(s.rows == (0, N) and s.cols == (0, d) for s in tp.shards)
    if tp.sharding == "data_parallel":
        if sorted(ranks) != list(range(W)) or not whole:
            _fail(name, "data_parallel needs one whole-table shard on every rank")
        return
    _tiles(name, tp.shards, N, d)
    if tp.sharding == "table_wise" and len(tp.shards) != 1:
        _fail(name, f"table_wise needs one shard, got {len(tp.shards)}")
    if tp.sharding == "row_wise" and (ranks != list(range(W)) or any(s.cols != (0, d) for s in tp.shards)):
        _fail(name, "row_wise needs one full-width row range per rank, in rank order")
    if tp.sharding == "table_row_wise":
        P = topology.ranks_per_node
        node = ranks[0] // P
        if ranks != list(range(node * P, (node + 1) * P)):
            _fail(name, f"table_row_wise needs one row range per rank of one node, got ranks {ranks}")
    if tp.sharding == "column_wise":
        if any(s.rows != (0, N) for s in tp.shards) or len(set(ranks)) != len(ranks):
            _fail(name, "column_wise needs whole-row column ranges on distinct ranks")


def validate_plan(plan) -> None:
    """Raise ValueError naming the first table whose shards break the rules above."""
    for tp in plan.tables.values():
        validate_table(tp, plan.topology)
