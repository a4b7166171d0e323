"""Cost of a finished plan, per shard, per table and per rank, at any batch size.

The plan's shards are grouped by (table, shard size) so that a data-parallel table on
1,024 ranks costs one evaluation, not 1,024; all groups of one sharding type go through
the compiled cost model in a single numpy call.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from fxrec.planner import cost

TIME_KEYS = cost.TERMS + ("time",)


def table_costs(plan, batch_size: int) -> dict:
    """name -> {"shards": [(rank, {term: seconds, "time", "memory"})], ...}."""
    topo = plan.topology
    groups = defaultdict(list)  # sharding -> [(table name, (n, c), [ranks])]
    for name, tp in plan.tables.items():
        by_size = defaultdict(list)
        for s in tp.shards:
            by_size[(s.num_rows, s.num_cols)].append(s.rank)
        for size, ranks in by_size.items():
            groups[tp.sharding].append((name, size, ranks))
    out = {name: {"shards": []} for name in plan.tables}
    wire = cost.wire_bytes(plan.comm_dtype)
    for sharding, items in groups.items():
        cols = defaultdict(list)
        for name, (n, c), _ in items:
            tp = plan.tables[name]
            eff = cost.kernel_efficiency(topo.device, tp.kernel, plan.kernel_efficiency)
            for k, v in cost.shard_params(tp.table, n, c, tp.table.pooling_factor, eff, wire=wire).items():
                cols[k].append(v)
        kinds = [cost.kind_for(plan.sparse_optimizer, name) for name, _, _ in items]
        res = cost.shard_costs(sharding, cols, topo, batch_size, kinds)
        for j, (name, _, ranks) in enumerate(items):
            entry = {k: float(res[k][j]) for k in TIME_KEYS + ("memory",)}
            out[name]["shards"].extend((r, entry) for r in ranks)
    return out


def per_rank(plan, batch_size: int) -> list[dict]:
    W = plan.topology.world_size
    acc = {k: np.zeros(W) for k in TIME_KEYS + ("memory",)}
    shards = np.zeros(W, dtype=np.int64)
    for entry in table_costs(plan, batch_size).values():
        for r, c in entry["shards"]:
            for k in acc:
                acc[k][r] += c[k]
            shards[r] += 1
    cap = plan.topology.memory_per_rank
    return [dict(rank=r, node=plan.topology.node_of(r), time=float(acc["time"][r]),
                 memory_bytes=int(round(acc["memory"][r])), memory_fraction=float(acc["memory"][r] / cap),
                 num_shards=int(shards[r]), **{t: float(acc[t][r]) for t in cost.TERMS})
            for r in range(W)]


def table_summary(plan, batch_size: int) -> dict:
    """name -> the busiest shard's terms and time, total and per-shard memory."""
    out = {}
    for name, entry in table_costs(plan, batch_size).items():
        rank, worst = max(entry["shards"], key=lambda rc: rc[1]["time"])
        out[name] = dict(worst, rank=rank, total_memory=sum(c["memory"] for _, c in entry["shards"]),
                         max_memory=max(c["memory"] for _, c in entry["shards"]),
                         total_time=sum(c["time"] for _, c in entry["shards"]))
    return out
