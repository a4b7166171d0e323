"""`fxrec.plan`: where every embedding table goes, and the `Plan` it returns.

    plan = fxrec.plan(tables_or_model, fxrec.Topology(8, device="cuda"))
    plan["user"].sharding, plan["user"].shards, plan.per_rank(), print(plan.explain())
"""
from __future__ import annotations

from collections.abc import Mapping

import dataclasses
import json

import torch

from fxrec.optim import PerTable, RowWiseAdagrad
from fxrec.planner import bounds, cost, enumerate as enum_, exact, partition
from fxrec.planner import hedge as hedge_
from fxrec.planner import evaluate as ev
from fxrec.planner import report
from fxrec.planner.feasibility import check_tables_fit, check_total_fits, packing_failed
from fxrec.planner.spec import Constraint, PlanError, Shard, TablePlan
from fxrec.planner.validate import validate_plan
from fxrec.topology import Topology
from fxrec.types import TableInfo

__all__ = ["plan", "Plan", "TablePlan", "Shard", "Constraint", "PlanError"]

DEFAULT_BATCH_SIZE = 512
HEDGE_SLACK = 0.005  # the busiest rank may give up 0.5% to stay balanced if intra-node links are slow
# the hedge's work floor (`fxrec.planner.packing.Work` units, ~0.2 s on the benchmarks' machine);
# it also gets half the search's work
HEDGE_FLOOR = 900_000
EXACT_LIMITS = (12, 4)  # the exact search runs by itself up to 12 tables on 4 ranks


@dataclasses.dataclass
class Plan:
    """Plain data: one `TablePlan` per table, the topology and per-rank batch size it
    was made for, the sparse optimizer whose state it counts (its kind, or a dict of kinds by
    table name when the tables' differ: `fxrec.optim.PerTable`), and search statistics
    (``stats``: method, max rank time at planning time, and three lower bounds on it:
    ``lower_bound`` the tightest (`bounds.cover_bound`), ``split_lower_bound`` and
    ``simple_lower_bound`` (max of total / ranks and the largest indivisible shard)), and
    the wire dtype of the sharded tables' outputs it was costed for (``comm_dtype``: "bf16",
    "fp16", "fp32", or None for the tables' own)."""

    tables: dict[str, TablePlan]
    topology: Topology
    batch_size: int = DEFAULT_BATCH_SIZE
    sparse_optimizer: str | dict = "sgd"
    kernel_efficiency: dict | None = None
    stats: dict = dataclasses.field(default_factory=dict)
    comm_dtype: str | None = None

    def __getitem__(self, name: str) -> TablePlan:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"plan has no table {name!r}; tables: {sorted(self.tables)[:10]}") from None

    def __contains__(self, name) -> bool:
        return name in self.tables

    def __iter__(self):
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    def _batch(self, batch_size) -> int:
        """The per-rank batch size to cost at: the plan's own for None; else checked as
        `plan` checks it (``batch_size or`` took 0 as the plan's own, and a negative or
        fractional batch gave negative or odd times)."""
        if batch_size is None:
            return self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Plan: batch_size must be a positive integer (or None for the plan's own, "
                             f"{self.batch_size}), got {batch_size!r}")
        return batch_size

    def per_rank(self, batch_size: int | None = None) -> list[dict]:
        """Per rank: ``time`` (estimated seconds per step), its terms (``lookup``,
        ``input_dist``, ``output_dist``, ``allreduce``, ``row_sync``), ``memory_bytes``,
        ``memory_fraction`` and ``num_shards``; at the plan's batch size unless another
        per-rank ``batch_size`` is given (no re-planning)."""
        return ev.per_rank(self, self._batch(batch_size))

    def table_costs(self, batch_size: int | None = None) -> dict:
        """Per table: its busiest shard's terms, ``time`` and ``rank``, and memory."""
        return ev.table_summary(self, self._batch(batch_size))

    def max_rank_time(self, batch_size: int | None = None) -> float:
        return max(r["time"] for r in self.per_rank(batch_size))

    def imbalance(self, batch_size: int | None = None) -> float:
        """Max over mean rank time (1.0 is perfect balance)."""
        times = [r["time"] for r in self.per_rank(batch_size)]
        mean = sum(times) / len(times)
        return max(times) / mean if mean > 0 else 1.0

    def cost_expr(self, name: str, symbolic_bandwidths: bool = False) -> dict:
        """The table's busiest shard as sympy expressions (``lookup``, ``input_dist``,
        ``output_dist``, ``allreduce``, ``row_sync``, their sum ``time``, and ``memory``) in the
        per-rank batch size ``B`` (`fxrec.planner.cost.B`); the topology's numbers are
        substituted unless ``symbolic_bandwidths`` keeps ``bw_mem``, ``bw_intra``,
        ``bw_inter``, ``bw_ring`` free."""
        return report.cost_expressions(self, name, symbolic_bandwidths)

    def explain(self, batch_size: int | None = None) -> str:
        """Per table (``t17: row_wise over 8 ranks [fbgemm], 0.41 ms = lookup 0.12 +
        ids all-to-all 0.09 + reduce-scatter 0.20``), per rank, and the imbalance."""
        return report.explain(self, self._batch(batch_size))

    def check(self, topology: Topology) -> None:
        """Raise PlanError unless this plan was made for ``topology``'s world."""
        mine = self.topology
        if (mine.world_size, mine.ranks_per_node) != (topology.world_size, topology.ranks_per_node):
            raise PlanError(f"plan was made for {mine.world_size} ranks ({mine.ranks_per_node} per node), "
                            f"not {topology.world_size} ({topology.ranks_per_node} per node); re-plan")

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(report.to_dict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Inverse of `to_json`; raises ValueError naming what is malformed."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"Plan.from_json: text must be the JSON string Plan.to_json() gives, got "
                            f"{type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Plan.from_json: not valid JSON ({e}): {text[:60]!r}") from None
        plan = report.from_dict(data, cls)
        validate_plan(plan)
        return plan


def _tables(model_or_tables, example_inputs, dense: dict) -> list[TableInfo]:
    """The tables to plan; for a model, ``dense`` receives those it leaves dense (and why)."""
    if isinstance(model_or_tables, torch.nn.Module):
        from fxrec.capture import find_tables  # the front end loads only when a model is given

        if example_inputs is None:
            raise ValueError("fxrec.plan: a model needs example_inputs to find its tables")
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        found = list(find_tables(model_or_tables, example_inputs, dense))
        if not found:
            raise ValueError(f"fxrec.plan: {type(model_or_tables).__name__} looks up no embedding table fxrec can "
                             f"place (`fxrec dump` lists the lookups it left dense, and why)")
        return found
    tables = list(model_or_tables)
    seen = set()
    for i, t in enumerate(tables):
        if not isinstance(t, TableInfo):
            raise ValueError(f"fxrec.plan: item {i} is a {type(t).__name__}, not a fxrec.TableInfo")
        if t.name in seen:
            raise ValueError(f"fxrec.plan: two tables are named {t.name!r}")
        seen.add(t.name)
    if not tables:
        raise ValueError("fxrec.plan: no tables to plan")
    return tables


def refuse_dense_constraints(constraints, dense: dict) -> None:
    """A constraint on a table the model keeps dense (detect_embeddings' ``DENSE_TABLES``:
    table -> why) is a ValueError saying so and why, rather than "unknown table": the
    user sees the table in the model, and the reason is what to change."""
    if not isinstance(constraints, Mapping):
        return  # `_constraints` names the wrong type
    for name in constraints:
        if name in dense:
            raise ValueError(f"constraint for table {name!r}: the model keeps {name!r} dense (a plain parameter on "
                             f"every rank, not sharded), so no sharding type applies: {dense[name]}")


def _constraints(constraints, tables, topology: Topology, dense: dict | None = None) -> dict:
    names = {t.name for t in tables}
    out = {}
    if constraints is not None and not isinstance(constraints, Mapping):
        raise ValueError(f"fxrec.plan: constraints must map table names to a sharding type (a string), a list "
                         f"of them, or a fxrec.Constraint; got a {type(constraints).__name__}")
    refuse_dense_constraints(constraints, dense or {})
    for name, con in (constraints or {}).items():
        if name not in names:
            raise ValueError(f"constraint for unknown table {name!r}; tables: {sorted(names)[:10]}")
        try:
            if not isinstance(con, (Constraint, str, list, tuple)):
                raise ValueError(f"expected a sharding type (a string), a list of them or a fxrec.Constraint, "
                                 f"got {con!r}")
            if not isinstance(con, Constraint):
                con = Constraint(sharding_types=con)
        except ValueError as e:
            raise ValueError(f"constraint for table {name!r}: {e}") from None
        bad = [r for r in con.ranks or () if r >= topology.world_size]
        if bad:
            raise ValueError(f"constraint for table {name!r}: rank {bad[0]} is outside the "
                             f"{topology.world_size}-rank world")
        out[name] = con
    return out


def optimizer_kind(optimizer) -> str:
    """"sgd" / "rowwise_adagrad" / "rowwise_adagrad_per_shard" / "adagrad" / "adam" from a name or a
    fxrec.optim object. The kind is what the cost model tells apart: RowWiseAdagrad with
    ``exact_column_wise=False`` keeps the same state but skips the column_wise row sync."""
    if optimizer is None:
        return "sgd"
    if isinstance(optimizer, RowWiseAdagrad) and not optimizer.exact_column_wise:
        return "rowwise_adagrad_per_shard"
    if not isinstance(optimizer, str):
        name = getattr(optimizer, "name", None)
        if not isinstance(name, str):
            raise ValueError(f"fxrec.plan: sparse_optimizer must be a name or a fxrec.optim optimizer, "
                             f"got {optimizer!r}")
        optimizer = name
    cost.optimizer_state(optimizer)  # validates
    return optimizer


def optimizer_kinds(sparse_optimizer, names: list[str]):
    """`optimizer_kind` for every table: one kind, or (for a `fxrec.optim.PerTable` whose
    tables differ) a dict of kinds by table name, which the cost model takes per shard."""
    if not isinstance(sparse_optimizer, PerTable):
        return optimizer_kind(sparse_optimizer)
    sparse_optimizer.check_tables(names)
    kinds = {name: optimizer_kind(sparse_optimizer.for_table(name)) for name in names}
    return next(iter(kinds.values())) if len(set(kinds.values())) == 1 else kinds


def _check_kernel_efficiency(overrides) -> None:
    """Kernel name -> the fraction of the bandwidth floor it reaches: a known kernel, a
    positive finite number (the costs divide by it: 0, less or nan have no meaning)."""
    from fxrec.planner.cost import KERNELS

    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ValueError(f"fxrec.plan: kernel_efficiency must map kernel names to fractions, got {overrides!r}")
    for kernel, value in overrides.items():
        if kernel not in KERNELS:
            raise ValueError(f"fxrec.plan: kernel_efficiency names unknown kernel {kernel!r}; the kernels are "
                             f"{list(KERNELS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"fxrec.plan: kernel_efficiency[{kernel!r}] must be a positive finite number, "
                             f"got {value!r}")


def plan(model_or_tables, topology: Topology, example_inputs=None, constraints=None, *,
         batch_size: int = DEFAULT_BATCH_SIZE, sparse_optimizer=None, kernel_efficiency: dict | None = None,
         search: str = "auto", hedge: float = HEDGE_SLACK, comm_dtype=None) -> Plan:
    """Choose every table's sharding type, kernel and shard placement so that the
    busiest rank's estimated step time is as short as found and every rank's memory
    fits; raise PlanError (naming tables, needs and fixes) when it cannot fit.

    search: "heuristic", "exact" (branch and bound; small instances only), or "auto"
    (the heuristic, then the exact search where it is small enough to finish).
    hedge: on several nodes, how much (a fraction) the heuristic's busiest rank may give
    up so that the plan also stays balanced if every remote byte crossed the NIC
    (`fxrec.planner.hedge`); 0 turns it off. The exact search is never hedged.
    comm_dtype: the dtype ``fxrec.shard(..., comm_dtype=)`` will send the sharded tables'
    outputs and their gradients in ("bf16", "fp16", "fp32" or the torch dtype; None: the
    tables' own): the output exchange is costed at its bytes, the lookup is not.
    """
    if not isinstance(topology, Topology):  # else an AttributeError on it, deep in the enumeration
        raise TypeError(f"fxrec.plan: topology must be a fxrec.Topology (e.g. Topology(world_size=2)), got "
                        f"{type(topology).__name__} {topology!r}")
    if search not in ("auto", "heuristic", "exact"):
        raise ValueError(f"fxrec.plan: search must be 'auto', 'heuristic' or 'exact', got {search!r}")
    if isinstance(hedge, bool) or not isinstance(hedge, (int, float)) or not 0 <= hedge < 1:
        raise ValueError(f"fxrec.plan: hedge must be a fraction in [0, 1), got {hedge!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fxrec.plan: batch_size must be a positive integer, got {batch_size!r}")
    _check_kernel_efficiency(kernel_efficiency)
    wire = report.wire_name(comm_dtype, "fxrec.plan")
    dense: dict = {}
    tables = _tables(model_or_tables, example_inputs, dense)
    optimizer = optimizer_kinds(sparse_optimizer, [t.name for t in tables])
    cons = _constraints(constraints, tables, topology, dense)
    specs = enum_.table_specs(tables, cons, topology, kernel_efficiency)
    options, rejected = enum_.enumerate_options(specs, topology, batch_size, optimizer, cost.wire_bytes(wire))
    check_tables_fit(specs, options, rejected, topology, batch_size, optimizer)
    check_total_fits(specs, options, topology, batch_size, optimizer)
    assignment, stats = _search(options, topology, search, hedge)
    if assignment is None:
        raise packing_failed(specs, options, stats["failed"], topology)
    total, largest = bounds.lower_bound(options)
    stats.update(lower_bound=bounds.cover_bound(options, topology),
                 split_lower_bound=bounds.split_bound(options, topology.world_size),
                 simple_lower_bound=max(total / topology.world_size, largest))
    tables_out = {}
    for spec, (opt, where) in zip(specs, assignment):
        info = dataclasses.replace(spec.info, pooling_factor=spec.pooling_factor)
        tables_out[info.name] = TablePlan(info.name, opt.sharding, opt.kernel, _shards(opt, where, info, topology),
                                          info)
    return Plan(tables_out, topology, batch_size, optimizer, kernel_efficiency, stats, wire)


def _search(options, topology, search: str, slack: float):
    """The heuristic's assignment (hedged within ``slack``, `fxrec.planner.hedge`),
    replaced by the exact search's when that runs and beats it; (None, stats with the
    tables that failed) when nothing fits."""
    cap = topology.memory_per_rank
    small = len(options) <= EXACT_LIMITS[0] and topology.world_size <= EXACT_LIMITS[1]
    pk, failed = partition.heuristic(options, topology, cap)
    stats = dict(method="heuristic", failed=failed)
    run_exact = search == "exact" or (search == "auto" and small)
    if pk is not None and slack > 0 and not run_exact and topology.num_nodes > 1:
        # within `slack` of the search's result, balanced when every remote byte crosses the
        # NIC too; not where the exact search runs, whose optimum is the point of running it
        stats["hedge_steps"] = hedge_.hedge(pk, slack, pk.work.units + max(HEDGE_FLOOR, pk.work.units // 2))
    best = partition.assignment(pk) if pk is not None else None
    stats["max_rank_time"] = pk.makespan() if pk is not None else None
    if run_exact:
        result = exact.search(options, topology, cap, upper=stats["max_rank_time"])
        if result.assignment is not None:
            best = result.assignment
            stats.update(method="exact" if result.optimal else "exact (budget hit)",
                         max_rank_time=result.makespan)
        elif best is not None and result.optimal:
            stats["method"] = "heuristic (proved optimal)"
        elif best is not None:  # the exact search ran out of budget before beating or proving it
            stats["method"] = "heuristic (exact search: nothing better within its budget)"
    if best is None:
        return None, stats
    stats.pop("failed")
    return best, stats


def _shards(opt, where, info: TableInfo, topology: Topology) -> list[Shard]:
    N, d, W, Pn = info.num_embeddings, info.embedding_dim, topology.world_size, topology.ranks_per_node
    whole_rows, whole_cols = (0, N), (0, d)
    if opt.sharding == "table_wise":
        return [Shard(where[0], whole_rows, whole_cols)]
    if opt.sharding == "data_parallel":
        return [Shard(r, whole_rows, whole_cols) for r in range(W)]
    if opt.sharding == "row_wise":
        return [Shard(r, rows, whole_cols) for r, rows in enumerate(enum_.split_even(N, W))]
    if opt.sharding == "table_row_wise":
        return [Shard(where * Pn + i, rows, whole_cols) for i, rows in enumerate(enum_.split_even(N, Pn))]
    cols = enum_.split_even(d, opt.num_shards)
    return [Shard(r, whole_rows, c) for r, c in zip(where, cols)]
