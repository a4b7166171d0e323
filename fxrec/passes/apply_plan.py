"""apply_plan: rewrite every embedding lookup into explicit input_dist -> local lookup ->
output_dist nodes for this rank, following a `fxrec.Plan`.

Lookups are served in *units*: all lookups that read a table are in one unit (the fused
sparse optimizer must see each table's whole gradient at once), and lookups at the same
stage with the same table dtypes and grad mode share a unit when their inputs are all ready
before any of their outputs is used, so one set of collectives serves them all (TorchRec groups its
all-to-alls the same way). Each table is stored and trained in its own dtype: a unit whose
tables differ in dtype (an EmbeddingBagCollection of fp16 and fp32 tables) has a fused kernel
per dtype, sends its results in the dtype theirs promote to (`comm_dtype`, an exact widening),
and each slot gets its table's dtype back in FinishOutputs. Per unit the graph gets
(fxrec/runtime/dist_lookup.py):

    gather (SlotInputs) -> input_dist -> all_to_all_counts -> recv_splits -> all_to_all
    (ids and lengths) [-> all_to_all (per-sample weights)] -> unpack -> lookup
    (FusedEmbeddingBags over this rank's shards) -> output_prep ->
        all_to_all                          table_wise / column_wise sums, unpooled rows
        reduce_scatter                      row_wise partial sums
        reduce_scatter(intra_node) + all_to_all(cross_node)   table_row_wise
    [replicated (data_parallel tables; grads all-reduced in backward)] -> collect -> finish

and each original lookup's users read the unit's result instead. The unit's ids and bag
lengths are checked in input_dist, and a fault travels in the counts, so one rank's bad batch
raises the same error on every rank (a unit of replicated tables only, over several ranks,
gets ``fault_send -> all_to_all_counts -> fault_check`` after gather for that). A unit with
column_wise tables under RowWiseAdagrad also gets a ``row_sync`` node before its lookup,
whose backward all-to-alls the column shards' per-row sums of g^2
(fxrec/runtime/row_sync.py). Collectives are call_function nodes of `fxrec.runtime.comm`
with ``meta["fxrec_comm"]`` set to their kind; the per-rank modules live under
``gm.fxrec_shards.<unit>``. Tables leave the GraphModule: its parameters are the dense
ones only.

Context: ``ctx.topology`` (None: the pass leaves the graph alone), ``ctx.plan`` (None: plan
now with ``ctx.options["constraints"]``), ``ctx.options``: ``rank``, ``world_size``
(default: torch.distributed's, 1 without it), ``sparse_optimizer``, ``process_groups``
(`comm.ProcessGroups`, needed for table_row_wise), ``device``, ``init`` (``init(table, rows,
cols) -> Tensor``: a shard's initial values; default: sliced from the graph's own weight),
``comm_dtype`` (a narrower dtype the output collectives carry: `comm_dtype`).

Limits: aten-level lookups (a torch.export capture) are not rewritten (ValueError); a table
read by two lookups of which one's ids depend on the other's output cannot be sharded.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxrec.eager import eager_under_dynamo
from fxrec.optim import PerTable
from fxrec.passes import lookup as L
from fxrec.passes.grad_mode import GRAD_MODE, INHERIT, settle
from fxrec.passes.group_tables import lookup_stages
from fxrec.passes.shard_ops import FinishOutputs, GatherInputs, NodeSpec, SlotSpec
from fxrec.runtime import comm
from fxrec.runtime.dist_lookup import FaultCheck, FaultSend, InputDist, RecvSplits, RouteSpec, Unpack, UnitSpec
from fxrec.runtime.dist_output import CollectOutputs, GroupTable, OutputPrep, reaching
from fxrec.runtime.local_lookup import LocalLookup, ReplicatedLookup
from fxrec.runtime.row_sync import RowSync

ROOT = "fxrec_shards"
SUPPORTED = ("module_bag", "functional_bag", "module_embedding", "functional_embedding", "ebc", "ec")
LOCAL_LOOKUP = "fxrec_local_lookup"  # node.meta: {"unit", "shards"} on the local lookup nodes


# ------------------------------------------------------------------ units
def _output_node(node: Node) -> Node:
    """The node whose value the lookup produces for its users (the folded .sum/.mean, if any)."""
    lk = node.meta[L.LOOKUP]
    if lk.pool_node is None:
        return node
    return next(n for n in node.users if n.name == lk.pool_node)


def replace_lookups(gm: GraphModule, nodes: list[Node], results: list[Node]) -> None:
    """Point each lookup's users (or its folded pool node's) at its result; erase both.
    Shared by apply_plan and fuse_lookups."""
    for n, out in zip(nodes, results):
        target = _output_node(n)
        target.replace_all_uses_with(out)
        gm.graph.erase_node(target)
        if target is not n:
            gm.graph.erase_node(n)


def _id_inputs(n: Node) -> list[Node]:
    """The nodes a unit reads for lookup `n`: its ids, offsets and per-sample weights (an
    EBC's / EC's KeyedJaggedTensor), as `lookup.gather_args` gives them. Not its weight: the unit
    serves the table from its shards, so where the graph fetches the weight (fx puts the
    get_attr of ``F.embedding_bag(ids, self.e.weight)`` at that call, maybe after another
    lookup of the table was used) does not make the ids late."""
    found: list[Node] = []
    map_arg(L.gather_args(n), found.append)
    return found


def _span(gm: GraphModule, nodes: list[Node], pos: dict) -> tuple[int, int]:
    """(position after which the unit can run, position of the first use of its outputs)."""
    inputs = [a for n in nodes for a in _id_inputs(n)]
    last_ph = max((pos[n] for n in gm.graph.nodes if n.op == "placeholder"), default=-1)
    anchor = max([pos[a] for a in inputs] + [last_ph])
    first_use = min((pos[u] for n in nodes for u in _output_node(n).users), default=len(pos))
    return anchor, first_use


def build_units(gm: GraphModule) -> list[list[Node]]:
    """Lookup nodes grouped into units (see module doc), in graph order."""
    nodes = [n for n in gm.graph.nodes if L.LOOKUP in n.meta]
    for n in nodes:
        if n.meta[L.LOOKUP].kind not in SUPPORTED:
            why = gm.meta.get(L.CAPTURE_NOTE)  # torch.export's aten-level graph: why fx could not trace
            src = n.meta.get(L.SOURCE)
            raise ValueError(f"apply_plan: lookup %{n.name}" + (f" at {src}" if src else "") + f" of kind "
                             f"{n.meta[L.LOOKUP].kind!r} cannot be sharded yet (supported: {', '.join(SUPPORTED)}); "
                             f"capture the model with torch.fx" + (f", which failed on it: {why}" if why else "")
                             + " (fxrec.capture(model, inputs, fallback=False) says where)")
    comps: list[tuple[set, list[Node]]] = []  # lookups joined by the tables they share
    for n in nodes:
        tables, members = set(n.meta[L.LOOKUP].tables), [n]
        for comp in [c for c in comps if c[0] & tables]:
            comps.remove(comp)
            tables |= comp[0]
            members += comp[1]
        comps.append((tables, members))
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    comps = sorted((sorted(c, key=pos.get) for _, c in comps), key=lambda c: pos[c[0]])
    stage, units = lookup_stages(gm), []
    for comp in comps:
        anchor, first = _span(gm, comp, pos)
        if anchor >= first or len({stage[n] for n in comp}) > 1:
            raise ValueError(_late_ids(gm, comp, pos))
        for unit in units:
            # one set of table dtypes per unit: a mixed one sends in their promotion (comm_dtype)
            same = stage[unit[0]] == stage[comp[0]] and set(_dtypes(gm, unit).values()) == \
                set(_dtypes(gm, comp).values()) and \
                unit[0].meta.get(GRAD_MODE) == comp[0].meta.get(GRAD_MODE)  # a unit runs in one mode
            anchor, first = _span(gm, unit + comp, pos)
            if same and anchor < first:
                unit += comp
                unit.sort(key=pos.get)
                break
        else:
            units.append(list(comp))
    return units


def _late_ids(gm: GraphModule, comp: list[Node], pos: dict) -> str:
    """Why the lookups of a table cannot be one unit: the ids of one are ready only after
    another's result is used (computed from it, or by code hoist_inputs could not move)."""
    used = {n: min((pos[u] for u in _output_node(n).users), default=len(pos)) for n in comp}
    first = min(comp, key=used.get)
    late = max(comp, key=lambda n: max([pos[a] for a in _id_inputs(n)] + [-1]))
    return (f"apply_plan: lookups {[n.name for n in comp]} read the same table, which one unit must serve, but "
            f"the ids of %{late.name} are ready only after the result of %{first.name} is used (computed from "
            f"it, or from a tensor the model writes in place, or by code that cannot move earlier); compute "
            f"the table's ids before using any of its results")


def _dtypes(gm: GraphModule, nodes: list[Node]) -> dict[str, torch.dtype]:
    """Table -> its weight's dtype, for the tables `nodes` read."""
    return {r.table: L.fetch_attr(gm, r.weight_path).dtype for n in nodes for r in n.meta[L.LOOKUP].reads}


def comm_dtype(dtypes, wire: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype a unit's output collectives carry: its tables' one, or the dtype theirs
    promote to (fp16 + fp32 -> fp32, fp16 + bf16 -> fp32), into which each table's values
    widen exactly; FinishOutputs gives each slot its table's dtype back.

    `wire` (fxrec.shard's comm_dtype, TorchRec's quantized comms): a narrower dtype the
    results and their gradients travel in instead, where it is narrower than that; a unit of
    16-bit tables keeps its own."""
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    if wire is not None and out is not None and wire.itemsize < out.itemsize:
        return wire
    return out


# ------------------------------------------------------------------ specs
def node_specs(nodes: list[Node], tables: dict, served_pooled: Optional[dict] = None
               ) -> tuple[list[NodeSpec], list[SlotSpec]]:
    """One NodeSpec per lookup and one SlotSpec per (lookup, table, feature) read. A table is
    served pooled where `served_pooled` says so (table -> bool; fuse_lookups' one fused call),
    else where it pools (a sharded unit's own shards)."""
    specs, slots = [], []
    for n in nodes:
        lk = n.meta[L.LOOKUP]
        ks = []
        for read in lk.reads:
            info = tables[read.table]
            pooled = info.pooling != "none" if served_pooled is None else served_pooled[read.table]
            for feature, key in zip(read.features or (None,), read.keys or read.features or (None,)):
                ks.append(len(slots))
                # EmbeddingCollection ignores per-sample weights
                slots.append(SlotSpec(n.name, read.table, feature, read.pooling, pooled,
                                      info.num_embeddings, info.embedding_dim, bool(lk.weighted) and lk.kind != "ec",
                                      info.dtype, key))
        specs.append(NodeSpec(n.name, lk.kind, tuple(ks), lk.include_last_offset, lk.padding_idx,
                              None if lk.pool_node is None else lk.pool_dim + 1, lk.ignores_weights))
    return specs, slots


def _routes(slots: list[SlotSpec], plan) -> list[RouteSpec]:
    routes = []
    for k, slot in enumerate(slots):
        tp = plan[slot.table]
        if tp.sharding == "data_parallel":
            continue
        by_row = tp.sharding in ("row_wise", "table_row_wise")
        shards = sorted(enumerate(tp.shards), key=lambda p: p[1].rows[0] if by_row else p[1].cols[0])
        output = "a2a" if not slot.served_pooled or not by_row else \
            ("rs" if tp.sharding == "row_wise" else "twrw")
        for j, s in shards:
            if s.num_rows == 0:
                raise ValueError(f"apply_plan: table {slot.table!r}: {tp.sharding} shard on rank {s.rank} has no "
                                 f"rows; use fewer shards for a {slot.num_embeddings}-row table")
            routes.append(RouteSpec(k, slot.table, j, s.rank, tuple(s.rows), tuple(s.cols), by_row,
                                    slot.served_pooled, slot.weighted and slot.served_pooled, output))
    return routes


# ------------------------------------------------------------------ graph
class _Emitter:
    """Inserts a unit's nodes in order, stamping provenance and comm kinds."""

    def __init__(self, gm: GraphModule, before: Node, origin: Node, prefix: str):
        self.gm, self.before, self.origin, self.prefix = gm, before, origin, prefix
        self.unpacked: list[Node] = []

    def _stamp(self, node: Node, comm_kind: Optional[str] = None) -> Node:
        for key in (L.MODULE, L.SOURCE, GRAD_MODE):  # the grad mode it must run in: lint checks it
            if key in self.origin.meta:
                node.meta[key] = self.origin.meta[key]
        if comm_kind:
            node.meta[L.COMM] = comm_kind
        return node

    def module(self, name: str, *args) -> Node:
        with self.gm.graph.inserting_before(self.before):
            return self._stamp(self.gm.graph.call_module(f"{self.prefix}.{name}", tuple(args)))

    def comm(self, fn, kind: str, *args, **kwargs) -> Node:
        with self.gm.graph.inserting_before(self.before):
            return self._stamp(self.gm.graph.call_function(fn, tuple(args), kwargs), kind)

    def items(self, node: Node, n: int) -> list[Node]:
        with self.gm.graph.inserting_before(self.before):
            items = [self._stamp(self.gm.graph.call_function(operator.getitem, (node, i))) for i in range(n)]
        self.unpacked += items
        return items

    def drop_unused(self) -> None:
        """Erase the tuple items nobody reads (e.g. the table_row_wise outputs of a unit without any)."""
        for node in self.unpacked:
            if not node.users:
                self.gm.graph.erase_node(node)


def _emit_dist(e: _Emitter, spec: UnitSpec, gathered: Node, root: str, has_sync: bool):
    """The input_dist / lookup / output_dist nodes; returns (send state, a2a, rs, twrw)."""
    counts, data, wbuf, send = e.items(e.module("input_dist", gathered), 4)
    recv_counts = e.comm(comm.all_to_all_counts, "all_to_all_counts", counts)
    out_d, in_d, out_w, in_w, recv = e.items(e.module("recv_splits", send, recv_counts), 5)
    data_r = e.comm(comm.all_to_all, "all_to_all", data, out_d, in_d)
    w_r = e.comm(comm.all_to_all, "all_to_all", wbuf, out_w, in_w) if any(r.weighted for r in spec.routes) else None
    unpacked = e.items(e.module("unpack", data_r, w_r, recv), 6)
    # exact RowWiseAdagrad on column_wise tables: its all-to-all runs in backward (row_sync.py)
    sync = [e._stamp(e.module("row_sync"), "all_to_all")] if has_sync else []
    looked = e.module("lookup", *unpacked[:5], *sync)
    looked.meta[LOCAL_LOOKUP] = {"unit": e.prefix.split(".")[-1], "shards": [s.key for s in spec.local_shards()]}
    p_out, u_out = e.items(looked, 2)
    a2a_buf, a2a_out, a2a_in, rs_buf, rs_splits, tw_buf, tw_splits, tw_out, tw_in = e.items(
        e.module("output_prep", p_out, u_out, unpacked[5], send, *sync), 9)
    outputs = {r.output for r in spec.routes}
    if w_r is not None:  # the weights' all-to-all backward runs on every rank (dist_output.reaching)
        first = "a2a" if "a2a" in outputs else "rs" if "rs" in outputs else "twrw"
        hung = e.comm(reaching, None, {"a2a": a2a_buf, "rs": rs_buf, "twrw": tw_buf}[first], w_r)
        a2a_buf, rs_buf, tw_buf = [hung if k == first else b for k, b in
                                   (("a2a", a2a_buf), ("rs", rs_buf), ("twrw", tw_buf))]
    a2a = e.comm(comm.all_to_all, "all_to_all", a2a_buf, a2a_out, a2a_in) if "a2a" in outputs else None
    rs = e.comm(comm.reduce_scatter, "reduce_scatter", rs_buf, split_sizes=rs_splits) if "rs" in outputs else None
    twrw = None
    if "twrw" in outputs:
        with e.gm.graph.inserting_before(e.before):
            intra = e._stamp(e.gm.graph.call_module(f"{root}.groups", ("intra_node",)))
            cross = e._stamp(e.gm.graph.call_module(f"{root}.groups", ("cross_node",)))
        summed = e.comm(comm.reduce_scatter, "reduce_scatter", tw_buf, group=intra, split_sizes=tw_splits)
        twrw = e.comm(comm.all_to_all, "all_to_all", summed, tw_out, tw_in, group=cross)
    return send, a2a, rs, twrw


def _insertion_point(gm: GraphModule, nodes: list[Node]) -> Node:
    """The node after which the unit's nodes go: its last input (or the last placeholder)."""
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max([pos[a] for n in nodes for a in _id_inputs(n)] +
               [pos[n] for n in gm.graph.nodes if n.op == "placeholder"])
    return list(gm.graph.nodes)[last]


def _unit_modules(gm: GraphModule, spec: UnitSpec, nodes: list[Node], dp_slots: list[int], env: dict) -> nn.Module:
    """The per-rank modules of one unit, registered at ``gm.fxrec_shards.<unit>``."""
    specs, slots = node_specs(nodes, gm.meta[L.TABLES])
    dtypes, device, values = _dtypes(gm, nodes), env["device"], env["values"]
    unit = nn.Module()
    gm.get_submodule(ROOT).add_module(spec.name, unit)
    # Over several ranks the inputs' check travels with the unit's first collective (InputDist,
    # or FaultSend where no table is sharded), so that one rank's bad batch raises on all.
    collective_check = bool(spec.routes) or spec.world_size > 1
    unit.gather = GatherInputs(specs, slots, check=not collective_check)
    if not spec.routes and spec.world_size > 1:
        unit.fault_send, unit.fault_check = FaultSend(slots, spec.world_size), FaultCheck(slots)
    # The 1/W of the shards' gradients (local_lookup.py) is applied in backward by CollectOutputs
    # (what all_to_all brought) and OutputPrep (what reduce_scatter brought).
    unit.collect = CollectOutputs(spec, dp_slots, grad_scale=1.0 / spec.world_size)
    unit.finish = FinishOutputs(specs, slots)
    if spec.routes:
        unit.input_dist, unit.recv_splits, unit.unpack = InputDist(spec), RecvSplits(spec), Unpack(spec)
        shards = {s.key: s for s in spec.local_shards()}

        def init(key: str) -> Tensor:  # drawn when LocalLookup fills that shard, not all at once
            return values(shards[key].table, shards[key].rows, shards[key].cols)
        unit.lookup = LocalLookup(spec.local_shards(), env["optimizer"], spec.world_size, dtypes, device, init,
                                  scale_outputs=False)
        unit.output_prep = OutputPrep(spec, comm_dtype(dtypes.values(), env.get("wire_dtype")), device,
                                      grad_scale=1.0 / spec.world_size)
        if RowSync.needed(spec, env["optimizer"]):
            unit.row_sync = RowSync(spec, env["optimizer"], device)
    if dp_slots:
        dp = [slots[k] for k in dp_slots]
        full = {s.table: values(s.table, (0, s.num_embeddings), (0, s.dim)) for s in dp}
        unit.replicated = _Picked(ReplicatedLookup(dp, env["optimizer"], spec.world_size, dtypes, device, full),
                                  dp_slots)
    return unit


def optimizer_groups(optimizer, tables: list[str]) -> dict:
    """Table -> the index of its optimizer configuration among the distinct ones (in table
    order, so the same on every rank); empty when every table has the same one."""
    if not isinstance(optimizer, PerTable):
        return {}
    configs = list(dict.fromkeys(optimizer.for_table(t) for t in tables))
    return {t: configs.index(optimizer.for_table(t)) for t in tables} if len(configs) > 1 else {}


def _rewrite_unit(gm: GraphModule, nodes: list[Node], name: str, env: dict) -> None:
    plan, P = env["plan"], env["ranks_per_node"]
    _, slots = node_specs(nodes, gm.meta[L.TABLES])
    routes = _routes(slots, plan)
    spec = UnitSpec(name, env["rank"], env["world_size"], P, tuple(slots), tuple(routes),
                    {r.table: r.rank // P for r in routes if r.output == "twrw"},
                    optimizer_groups(env["optimizer"], sorted({s.table for s in slots})))
    dp_slots = [k for k, s in enumerate(slots) if plan[s.table].sharding == "data_parallel"]
    unit = _unit_modules(gm, spec, nodes, dp_slots, env)
    before = settle(gm, _insertion_point(gm, nodes).next, nodes[0].meta.get(GRAD_MODE, INHERIT))
    e = _Emitter(gm, before, nodes[0], f"{ROOT}.{name}")
    gathered = e.module("gather", [L.gather_args(n) for n in nodes])
    if hasattr(unit, "fault_send"):
        faults = e.comm(comm.all_to_all_counts, "all_to_all_counts", e.module("fault_send", gathered))
        gathered = e.module("fault_check", faults, gathered)
    send = a2a = rs = twrw = replicated = None
    if routes:
        send, a2a, rs, twrw = _emit_dist(e, spec, gathered, ROOT, hasattr(unit, "row_sync"))
    if dp_slots:
        replicated = e.module("replicated", gathered)
        replicated.meta[LOCAL_LOOKUP] = {"unit": name, "shards": [f"{t}@replica" for t in unit.replicated.inner.tables]}
    collected = e.module("collect", gathered, send, a2a, rs, twrw, replicated)
    results = e.items(e.module("finish", gathered, collected), len(nodes))
    replace_lookups(gm, nodes, results)
    e.drop_unused()


@eager_under_dynamo
class _Picked(nn.Module):
    """Feeds a ReplicatedLookup the inputs of its slots only."""

    def __init__(self, inner: ReplicatedLookup, slots: list[int]):
        super().__init__()
        self.inner, self.slots = inner, list(slots)

    def forward(self, inputs):
        return self.inner([inputs[k] for k in self.slots])


# ------------------------------------------------------------------ checks and cleanup
def check_plan(plan, tables: dict, topology) -> None:
    """Raise ValueError / PlanError unless `plan` covers exactly these tables, with their
    sizes, on `topology`."""
    from fxrec.planner.validate import validate_plan

    plan.check(topology)
    missing = [t for t in tables if t not in plan]
    if missing:
        raise ValueError(f"plan has no entry for table {missing[0]!r}" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                         f"; the model's tables are {list(tables)}")
    extra = [t for t in plan if t not in tables]
    if extra:
        raise ValueError(f"plan names table {extra[0]!r}, which the model does not read; tables are {list(tables)}")
    for name, info in tables.items():
        tp = plan[name]
        if tp.table is not None and (tp.table.num_embeddings, tp.table.embedding_dim) != \
                (info.num_embeddings, info.embedding_dim):
            raise ValueError(f"plan: table {name!r} was planned as {tp.table.num_embeddings} x "
                             f"{tp.table.embedding_dim} but the model's is {info.num_embeddings} x {info.embedding_dim}")
    validate_plan(plan)


def _without_tables(gm: GraphModule) -> GraphModule:
    """The same graph in a GraphModule holding only what the graph references: the tables'
    weights (and the user's embedding modules) stay with the user's model, so
    ``parameters()`` are the dense ones. The user's modules are never modified."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    out = L.carry_hooks(gm, GraphModule(gm, gm.graph, type(gm).__name__))
    out.meta.update(gm.meta)
    return out


def _shard_values(gm: GraphModule, init) -> callable:
    """``values(table, rows, cols)``: a shard's initial values, from `init` when given,
    else sliced from the graph's own (unsharded) weight."""
    weights = {r.table: r.weight_path for n in gm.graph.nodes if L.LOOKUP in n.meta for r in n.meta[L.LOOKUP].reads}

    def values(table: str, rows: tuple, cols: tuple) -> torch.Tensor:
        if init is not None:
            return init(table, rows, cols)
        full = L.fetch_attr(gm, weights[table])
        if full.is_meta:
            raise ValueError(f"apply_plan: table {table!r} is on the meta device and no initialiser was given "
                             f"(ctx.options['init']; fxrec.shard passes one)")
        return full[rows[0]:rows[1], cols[0]:cols[1]]
    return values


def apply_plan_pass(gm: GraphModule, ctx) -> GraphModule:
    """Rewrite every lookup into this rank's sharded program (module doc). Without
    ``ctx.topology`` the graph is returned unchanged. Sets ``ctx.plan`` and
    ``gm.meta["fxrec_plan"]``; raises ValueError / PlanError for a plan that does not fit
    the model or topology."""
    if ctx.topology is None:
        ctx.log.append("apply_plan: no topology given; nothing sharded")
        return gm
    opts, tables = ctx.options, gm.meta[L.TABLES]
    plan = ctx.plan
    if plan is None:
        from fxrec.planner.plan import plan as make_plan, refuse_dense_constraints
        refuse_dense_constraints(opts.get("constraints") or {}, gm.meta.get(L.DENSE_TABLES, {}))
        plan = make_plan(list(tables.values()), ctx.topology, constraints=opts.get("constraints"),
                         sparse_optimizer=opts.get("sparse_optimizer"), batch_size=opts.get("batch_size", 512))
    check_plan(plan, tables, ctx.topology)
    world = opts.get("world_size", comm.world_size())
    if world != ctx.topology.world_size:
        raise ValueError(f"apply_plan: the topology has world_size {ctx.topology.world_size} but this job has "
                         f"{world} ranks")
    env = dict(plan=plan, rank=opts.get("rank", comm.rank()), world_size=world,
               ranks_per_node=ctx.topology.ranks_per_node, optimizer=opts.get("sparse_optimizer"),
               device=opts.get("device", torch.device("cpu")), values=_shard_values(gm, opts.get("init")),
               wire_dtype=opts.get("comm_dtype"))
    # a bag too long for its position weights is raised by the units' input check, on every rank
    from fxrec.feature_processors import defer_position_faults
    defer_position_faults(gm)
    units = build_units(gm)
    gm.add_module(ROOT, nn.Module())
    gm.get_submodule(ROOT).groups = GroupTable(opts.get("process_groups"))
    for i, nodes in enumerate(units):
        _rewrite_unit(gm, nodes, f"u{i}", env)
        ctx.log.append(f"apply_plan: unit u{i} serves {[n.name for n in nodes]}")
    gm = _without_tables(gm)
    gm.meta["fxrec_plan"] = ctx.plan = plan
    return gm
