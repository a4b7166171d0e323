"""A plan as JSON and as text: what each table costs and why, per rank, imbalance."""
from __future__ import annotations

import sympy as sp
import torch

from fxrec.planner import cost
from fxrec.planner.feasibility import dtype_name, fmt_bytes
from fxrec.planner.spec import Shard, TablePlan
from fxrec.topology import Topology
from fxrec.types import TableInfo, wire_dtype

JSON_VERSION = 1


WIRE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def wire_name(comm_dtype, owner: str) -> str | None:
    """A comm_dtype (a name or torch dtype, `fxrec.types.WIRE_DTYPES`) by its short name, as a
    Plan keeps it (JSON has no torch dtypes); None stays None. A ValueError names ``owner``
    and the value otherwise."""
    dtype = wire_dtype(comm_dtype, owner)
    return None if dtype is None else WIRE_NAMES[dtype]


# -- JSON ---------------------------------------------------------------------------------
def to_dict(plan) -> dict:
    tables = []
    for tp in plan.tables.values():
        info = tp.table
        table = dict(num_embeddings=info.num_embeddings, embedding_dim=info.embedding_dim,
                     pooling_factor=info.pooling_factor, dtype=dtype_name(info.dtype), pooling=info.pooling,
                     uses=info.uses, features=list(info.features))
        if info.bags_per_sample is not None:  # only a VBE table carries it: other plans' JSON stays as it was
            table["bags_per_sample"] = info.bags_per_sample
        tables.append(dict(
            name=tp.name, sharding=tp.sharding, kernel=tp.kernel, table=table,
            shards=[[s.rank, s.rows[0], s.rows[1], s.cols[0], s.cols[1]] for s in tp.shards]))
    return dict(version=JSON_VERSION, topology=plan.topology.to_dict(), batch_size=plan.batch_size,
                sparse_optimizer=plan.sparse_optimizer, kernel_efficiency=plan.kernel_efficiency,
                comm_dtype=wire_name(plan.comm_dtype, "Plan"), stats=plan.stats, tables=tables)


def _whole(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"plan JSON: {where} fields must be whole numbers, got {value!r}")
    return value


def from_dict(data: dict, cls):
    if not isinstance(data, dict) or data.get("version") != JSON_VERSION:
        raise ValueError(f"plan JSON: expected an object with version {JSON_VERSION}")
    try:
        topology = Topology(**data["topology"])
        tables = {}
        for t in data["tables"]:
            info = TableInfo(name=t["name"], **t["table"])  # it reads the dtype's name
            if t["name"] in tables:  # a second entry would silently replace the first
                raise ValueError(f"plan JSON: table {t['name']!r} is planned twice")
            where = f"table {t['name']!r}: shard"
            shards = [[_whole(v, where) for v in entry] for entry in t["shards"]]
            shards = [Shard(r, (r0, r1), (c0, c1)) for r, r0, r1, c0, c1 in shards]
            tables[t["name"]] = TablePlan(t["name"], t["sharding"], t["kernel"], shards, info)
        batch = data["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"plan JSON: batch_size must be a positive integer, got {batch!r}")
        # (a plan written before comm_dtype was planned for has none: outputs in their own dtype)
        wire = wire_name(data.get("comm_dtype"), "plan JSON")
        return cls(tables, topology, batch, data["sparse_optimizer"],
                   data.get("kernel_efficiency"), data.get("stats") or {}, wire)
    except (KeyError, TypeError) as e:
        raise ValueError(f"plan JSON: malformed ({type(e).__name__}: {e})") from None


# -- text ---------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    """Milliseconds to 4 significant digits (step times span microseconds to seconds)."""
    return f"{seconds * 1e3:.4g}"


def output_label(tp) -> str:
    if tp.table.pooling == "none" and tp.sharding in ("row_wise", "table_row_wise"):
        return "rows all-to-all"
    return {"row_wise": "reduce-scatter", "table_row_wise": "reduce-scatter+all-to-all"}.get(tp.sharding, "all-to-all")


def term_labels(tp) -> dict:
    return {"lookup": "lookup", "input_dist": "ids all-to-all", "output_dist": output_label(tp),
            "allreduce": "all-reduce", "row_sync": "row-sum all-to-all"}


def where(tp) -> str:
    k = len(tp.shards)
    if tp.sharding == "table_wise":
        return f"on rank {tp.shards[0].rank}"
    if tp.sharding == "table_row_wise":
        return f"over {k} ranks of node {tp.shards[0].rank // k}"
    if tp.sharding == "column_wise":
        return f"{k} column shards on ranks {','.join(str(s.rank) for s in tp.shards)}"
    return f"over {k} ranks"


def table_line(name: str, tp, c: dict) -> str:
    labels = term_labels(tp)
    parts = " + ".join(f"{labels[t]} {_ms(c[t])}" for t in cost.TERMS if c[t] > 0)
    return (f"{name}: {tp.sharding} {where(tp)} [{tp.kernel}], {_ms(c['time'])} ms = {parts}; "
            f"{fmt_bytes(c['max_memory'])} per shard")


def rank_rows(ranks: list[dict]) -> list[str]:
    head = f"{'rank':>5} {'node':>5} {'time ms':>9} {'lookup':>8} {'ids a2a':>8} {'output':>8} {'allred':>8} " \
           f"{'rowsync':>8} {'memory':>11} {'mem %':>6} {'shards':>6}"
    rows = [head]
    for r in ranks:
        rows.append(f"{r['rank']:>5} {r['node']:>5} {_ms(r['time']):>9} {_ms(r['lookup']):>8} "
                     f"{_ms(r['input_dist']):>8} {_ms(r['output_dist']):>8} {_ms(r['allreduce']):>8} "
                     f"{_ms(r['row_sync']):>8} {fmt_bytes(r['memory_bytes']):>11} {100 * r['memory_fraction']:>6.1f} "
                     f"{r['num_shards']:>6}")
    return rows


def summary(plan, ranks: list[dict], batch_size: int) -> str:
    """Max and mean rank time, imbalance, and (at the planning batch) the lower bound."""
    times = [r["time"] for r in ranks]
    mean = sum(times) / len(times)
    line = (f"max rank time {_ms(max(times))} ms, mean {_ms(mean)} ms, imbalance "
            f"{max(times) / mean if mean else 1.0:.3f} (max/mean)")
    lb = plan.stats.get("lower_bound")
    if lb and batch_size == plan.batch_size:
        line += f"; lower bound {_ms(lb)} ms; search: {plan.stats.get('method', '?')}"
    return line


def header(plan, batch_size: int) -> str:
    t = plan.topology
    wire = f"; outputs sent in {plan.comm_dtype}" if plan.comm_dtype else ""
    return (f"plan for {t.world_size} ranks ({t.num_nodes} node(s) x {t.ranks_per_node}), {t.device}, "
            f"{fmt_bytes(t.memory_per_rank)} per rank; batch {batch_size} per rank; "
            f"optimizer {_optimizers(plan.sparse_optimizer)}{wire}")


def _optimizers(optimizer) -> str:
    """One kind, or the kinds per table (`fxrec.optim.PerTable`) with their tables."""
    if isinstance(optimizer, str):
        return optimizer
    by_kind: dict = {}
    for table, kind in optimizer.items():
        by_kind.setdefault(kind, []).append(table)
    return "; ".join(f"{kind}: {', '.join(tables)}" for kind, tables in by_kind.items())


def explain(plan, batch_size: int) -> str:
    costs = plan.table_costs(batch_size)
    ranks = plan.per_rank(batch_size)
    lines = [header(plan, batch_size), "tables (time = the table's busiest shard, per step):"]
    order = sorted(plan.tables, key=lambda n: -costs[n]["time"])
    lines += ["  " + table_line(n, plan.tables[n], costs[n]) for n in order]
    lines.append("ranks:")
    lines += ["  " + row for row in rank_rows(ranks)]
    lines.append(summary(plan, ranks, batch_size))
    return "\n".join(lines)


def cost_expressions(plan, name: str, symbolic_bandwidths: bool = False) -> dict:
    """The busiest shard's terms (their sum ``time``, and ``memory``) as sympy
    expressions in the per-rank batch ``B`` (and the bandwidths, if asked)."""
    tp = plan[name]
    worst = plan.table_costs()[name]["rank"]
    shard = next(s for s in tp.shards if s.rank == worst)
    eff = cost.kernel_efficiency(plan.topology.device, tp.kernel, plan.kernel_efficiency)
    params = cost.shard_params(tp.table, shard.num_rows, shard.num_cols, tp.table.pooling_factor, eff,
                               wire=cost.wire_bytes(plan.comm_dtype))
    symbolic = (cost.B,) + ((cost.bw_mem, cost.bw_intra, cost.bw_inter, cost.bw_ring) if symbolic_bandwidths else ())
    exprs = cost.shard_expressions(tp.sharding, params, plan.topology, cost.kind_for(plan.sparse_optimizer, name),
                                   symbolic)
    exprs["time"] = sp.simplify(sum(exprs[t] for t in cost.TERMS))
    return exprs
