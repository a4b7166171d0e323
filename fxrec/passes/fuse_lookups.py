"""fuse_lookups: one fused table-batched lookup call per group, and the kernel serving it.

Three kinds of graph reach this pass:

1. **Unsharded** (no topology, apply_plan left the lookups alone). The lookups of each
   group (`group_tables`) become one `call_module` of a `LocalLookup` (two
   `FusedEmbeddingBags`: tables served pooled, tables served as rows) at
   ``gm.fxrec_fused.f<i>``, between glue nodes (fxrec/runtime/fused_group.py):

       gather (GatherInputs) -> pack (PackInputs) -> lookup (LocalLookup) ->
       split (SplitOutputs) -> finish (FinishOutputs) -> one getitem per replaced lookup

   Groups that share a table (a pooled and an unpooled read of one table, e.g. a tower's
   history mean and its candidate item) or a lookup node (an EBC whose tables differ in
   dtype) are fused into *one* call: a table's weights live in one place, and its sparse
   update must see its whole gradient at once (tables of several dtypes get a fused module
   per dtype inside that call, each table stored and trained in its own dtype). A table
   read both ways is served as rows and pooled in the glue, as apply_plan does. The tables
   leave the GraphModule's parameters (they are the fused module's buffers, copied from the
   user's weights; meta stays meta).
   With ``ctx.options["weight_dtype"]`` (inference, quantize_tables runs next) the fused
   modules hold no copy (they are built on meta) and the unit keeps the user's weights in
   its `source_weights` for quantize_tables, which quantizes them and drops that reference.
   Training: the tables are trained inside backward by ``ctx.options["sparse_optimizer"]``
   (an `fxrec.optim` config). Without one, fusing would silently freeze the tables, so the
   pass leaves the lookups unfused (a line in ``ctx.log``) unless
   ``ctx.options["inference"]`` is true.
   A group is left unfused, with a line in ``ctx.log``, when its lookups are aten-level
   (a torch.export capture) or when one of its tables is also read by a lookup at another
   stage. (A table whose weight is also read outside lookups, tied to a dense layer, is no
   table to begin with: detect_embeddings leaves it dense.)
2. **Sharded** (apply_plan ran): each unit already has one `LocalLookup` node per rank;
   its kernels are recorded. A data_parallel unit on a one-rank job, served by apply_plan
   through `ReplicatedLookup` (plain torch), is rewritten to pack -> `LocalLookup` ->
   split, keyed ``<table>@<shard>`` like the other shards. With several ranks replicas stay
   on `ReplicatedLookup` (their gradients must be all-reduced first); recorded as torch.
3. Nothing to fuse: only the kernels are recorded.

Every local lookup node gets ``meta["fxrec_local_lookup"]`` (``{"unit", "shards"}``, as
apply_plan writes it) and ``meta["fxrec_kernel"]``: ``{"pooled": {op: kernel},
"unpooled": {op: kernel}}`` for the fused modules it holds (ops: ``pooled_forward`` /
``unpooled_forward``, ``backward_update`` when it trains), or ``{"replicated": ...}``.
``ctx.options["kernel"]`` ("triton" | "fbgemm" | "torch") forces a kernel through the
registry, over FXREC_KERNEL; a forced kernel that cannot serve fails the pass.
``ctx.options["kernel_device"]``: record the kernels that device would run (default: the
tables'; `fxrec dump` keeps its shards on meta and records for the topology's device).
The fused node of case 1 also carries ``meta["fxrec_fused"]``: the replaced lookups'
records (``{"groups", "tables", "lookups": {node name: Lookup}}``).
"""
from __future__ import annotations

import heapq
import operator
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxrec.passes import lookup as L
from fxrec.passes.grad_mode import GRAD_MODE, INHERIT, settle
from fxrec.passes.apply_plan import LOCAL_LOOKUP, SUPPORTED, node_specs, replace_lookups
from fxrec.passes.shard_ops import FinishOutputs, GatherInputs
from fxrec.runtime.dist_lookup import LocalShard, Unpack
from fxrec.runtime.fused_group import PackInputs, SplitOutputs, kernel_record, with_kernel
from fxrec.runtime.local_lookup import LocalLookup, ReplicatedLookup

NAME = "fuse_lookups"
ROOT = "fxrec_fused"
KERNEL = "fxrec_kernel"  # node.meta: {"pooled" | "unpooled" | "replicated": {op: kernel name}}
FUSED = "fxrec_fused"    # node.meta: {"groups", "tables", "lookups"} of the lookups a fused node replaced


# ------------------------------------------------------------------ which lookups fuse together
def fusion_units(groups: list) -> list[list]:
    """`LookupGroup`s joined when they share a table or a lookup node, in order of first group."""
    units: list[tuple[set, list]] = []
    for g in groups:
        keys, members = {("t", t) for t in g.tables} | {("n", n) for n in g.nodes}, [g]
        for unit in [u for u in units if u[0] & keys]:
            units.remove(unit)
            keys |= unit[0]
            members = unit[1] + members
        units.append((keys, members))
    order = {g.name: i for i, g in enumerate(groups)}
    return sorted((sorted(m, key=lambda g: order[g.name]) for _, m in units), key=lambda m: order[m[0].name])


def _why_not(gm: GraphModule, groups: list, nodes: list[Node]) -> Optional[str]:
    kinds = sorted({n.meta[L.LOOKUP].kind for n in nodes} - set(SUPPORTED))
    if kinds:
        return f"lookups of kind {kinds} (a torch.export capture) are not fused; capture with torch.fx"
    if len({g.stage for g in groups}) > 1:
        return "a table is read by lookups at different stages (one's ids depend on another's output)"
    return None


# ------------------------------------------------------------------ specs and modules
def served_pooled(nodes: list[Node]) -> dict[str, bool]:
    """Table -> whether one fused call over these lookups serves it pooled: when every read
    of it here is pooled (else as rows, pooled in the glue)."""
    pooled: dict[str, bool] = {}
    for n in nodes:
        for r in n.meta[L.LOOKUP].reads:
            pooled[r.table] = pooled.get(r.table, True) and r.pooling != "none"
    return pooled


def _lookup_module(pack: PackInputs, keys: dict, weights: dict, optimizer, kernel, device=None) -> LocalLookup:
    """A one-rank LocalLookup over pack's tables (shard `keys[table]`), holding copies of
    `weights` (on `device`, default theirs; "meta" holds no copy)."""
    shards = [LocalShard(keys[t], t, (0, weights[t].shape[0]), (0, weights[t].shape[1]), t in pack.pooled_tables, ())
              for t in pack.pooled_tables + pack.unpooled_tables]
    first = next(iter(weights.values()))
    init = {keys[t]: w.detach() for t, w in weights.items()}
    dtypes = {t: w.dtype for t, w in weights.items()}  # each table its own (one fused module per dtype)
    module = LocalLookup(shards, optimizer, 1, dtypes, device or first.device, init.__getitem__)
    if kernel is not None:
        module.pooled = with_kernel(module.pooled, kernel) if module.pooled is not None else None
        module.unpooled = with_kernel(module.unpooled, kernel) if module.unpooled is not None else None
    return module


# ------------------------------------------------------------------ graph
class _Emitter:
    """Inserts nodes before `before`, copying the provenance of `origin`."""

    def __init__(self, gm: GraphModule, before: Node, origin: Node):
        self.gm, self.before, self.origin = gm, before, origin

    def stamp(self, node: Node, origin: Optional[Node] = None) -> Node:
        origin = origin or self.origin
        for key in (L.MODULE, L.SOURCE, GRAD_MODE):  # the grad mode it must run in: lint checks it
            if key in origin.meta:
                node.meta[key] = origin.meta[key]
        node.meta[L.PASS] = NAME
        return node

    def module(self, target: str, *args) -> Node:
        with self.gm.graph.inserting_before(self.before):
            return self.stamp(self.gm.graph.call_module(target, tuple(args)))

    def items(self, node: Node, n: int, origins: Optional[list[Node]] = None) -> list[Node]:
        with self.gm.graph.inserting_before(self.before):
            return [self.stamp(self.gm.graph.call_function(operator.getitem, (node, i)), origins and origins[i])
                    for i in range(n)]

    def fused(self, prefix: str, source: Node, lookup: str = "lookup") -> Node:
        """pack -> lookup -> split nodes reading `source` (the gathered SlotInputs); returns
        the split node and leaves the lookup node in `self.looked`."""
        p_idx, p_off, p_psw, u_idx, u_off, places = self.items(self.module(f"{prefix}.pack", source), 6)
        looked = self.module(f"{prefix}.{lookup}", p_idx, p_off, p_psw, u_idx, u_off)
        p_out, u_out = self.items(looked, 2)
        self.looked = looked
        return self.module(f"{prefix}.split", places, p_out, u_out)


def _after_inputs(gm: GraphModule, args) -> Node:
    """The node before which nodes reading `args` can go: right after the last of them
    (or the last placeholder)."""
    used: list[Node] = []
    map_arg(args, used.append)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last = max([pos[n] for n in used] + [pos[n] for n in nodes if n.op == "placeholder"])
    return nodes[last].next


def _restore_order(gm: GraphModule) -> None:
    """Reorder the graph topologically if a rewrite left a user before its input, moving as
    little as possible (always the earliest ready node next; the output last). Lookups of
    one group never depend on each other, so an order exists."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    if all(pos[a] < pos[n] for n in nodes for a in n.all_input_nodes):
        return
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [pos[n] for n in nodes if not waiting[n]]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, pos[user])
    if len(order) != len(nodes):  # a cycle: cannot happen for lookups of one stage
        raise ValueError(f"{NAME}: the fused graph has a cycle through {[n.name for n in nodes if waiting[n]][:5]}")
    output = [n for n in order if n.op == "output"]
    order = [n for n in order if n.op != "output"] + output
    for prev, node in zip(order, order[1:]):
        prev.append(node)


def _fuse_unit(gm: GraphModule, groups: list, nodes: list[Node], name: str, opts: dict) -> None:
    specs, slots = node_specs(nodes, gm.meta[L.TABLES], served_pooled(nodes))
    unit = nn.Module()
    gm.get_submodule(ROOT).add_module(name, unit)
    unit.gather, unit.finish = GatherInputs(specs, slots), FinishOutputs(specs, slots)
    unit.pack = PackInputs(slots)
    weights = {r.table: L.fetch_attr(gm, r.weight_path) for n in nodes for r in n.meta[L.LOOKUP].reads}
    if opts.get("weight_dtype") is not None:
        # quantize_tables will quantize the user's tables themselves: no float copy meanwhile
        unit.lookup = _lookup_module(unit.pack, {t: t for t in weights}, weights, None, None, device="meta")
        unit.lookup.source_weights = dict(weights)  # a plain attribute (not state), dropped by quantize_tables
    else:
        unit.lookup = _lookup_module(unit.pack, {t: t for t in weights}, weights, opts.get("sparse_optimizer"),
                                     opts.get("kernel"))
    unit.split = SplitOutputs(unit.pack.pooled_dims)
    args = [L.gather_args(n) for n in nodes]
    e = _Emitter(gm, settle(gm, _after_inputs(gm, args), nodes[0].meta.get(GRAD_MODE, INHERIT)), nodes[0])
    prefix = f"{ROOT}.{name}"
    gathered = e.module(f"{prefix}.gather", args)
    split = e.fused(prefix, gathered)
    e.looked.meta[LOCAL_LOOKUP] = {"unit": name, "shards": list(weights)}
    e.looked.meta[FUSED] = {"groups": tuple(g.name for g in groups), "tables": tuple(weights),
                            "lookups": {n.name: n.meta[L.LOOKUP] for n in nodes}}
    results = e.items(e.module(f"{prefix}.finish", gathered, split), len(nodes), nodes)
    dead_attrs = {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"}
    replace_lookups(gm, nodes, results)
    for a in dead_attrs:
        if not a.users:
            gm.graph.erase_node(a)
    _restore_order(gm)


def _fuse_lookups(gm: GraphModule, ctx) -> bool:
    """Case 1 of the module doc; True when the graph changed."""
    groups = gm.meta.get(L.GROUPS, ctx.groups)
    if not any(L.LOOKUP in n.meta for n in gm.graph.nodes) or not groups:
        return False
    opts = ctx.options
    if opts.get("sparse_optimizer") is None and not opts.get("inference"):
        ctx.log.append(f"{NAME}: lookups left unfused: no ctx.options['sparse_optimizer'] to train the fused "
                       f"tables with (set options['inference']=True to fuse for inference)")
        return False
    by_name = {n.name: n for n in gm.graph.nodes}
    changed = False
    for unit in fusion_units(groups):
        nodes = [by_name[n] for n in dict.fromkeys(n for g in unit for n in g.nodes)]
        names = [g.name for g in unit]
        why = _why_not(gm, unit, nodes)
        if why is not None:
            ctx.log.append(f"{NAME}: groups {names} left unfused: {why}")
            continue
        if not hasattr(gm, ROOT):
            gm.add_module(ROOT, nn.Module())
        name = f"f{sum(1 for _ in gm.get_submodule(ROOT).children())}"
        _fuse_unit(gm, unit, nodes, name, opts)
        ctx.log.append(f"{NAME}: {ROOT}.{name} serves groups {names}: lookups {[n.name for n in nodes]}")
        changed = True
    return changed


# ------------------------------------------------------------------ replicas of a one-rank job
def _fuse_replicas(gm: GraphModule, node: Node, opts: dict) -> bool:
    """Case 2 of the module doc for one `replicated` node; False when left as it is."""
    picked = gm.get_submodule(node.target)
    inner: ReplicatedLookup = picked.inner
    if inner.world_size != 1:
        return False
    unit_path = node.target.rpartition(".")[0]
    unit = gm.get_submodule(unit_path)
    plan = gm.meta.get("fxrec_plan")
    keys = {t: f"{t}@{_own_shard(plan, t)}" for t in inner.tables}
    unit.pack = PackInputs(inner.slots, picked.slots)
    unit.lookup_replicas = _lookup_module(unit.pack, keys, {t: inner.table(t) for t in inner.tables},
                                          inner.optimizer, opts.get("kernel"))
    unit.split = SplitOutputs(unit.pack.pooled_dims)
    e = _Emitter(gm, node, node)
    split = e.fused(unit_path, node.args[0], lookup="lookup_replicas")
    e.looked.meta[LOCAL_LOOKUP] = {"unit": node.meta[LOCAL_LOOKUP]["unit"], "shards": list(keys.values())}
    node.replace_all_uses_with(split)
    gm.graph.erase_node(node)
    return True


def _own_shard(plan, table: str) -> int:
    """Index of rank 0's shard of `table` in the plan (0 without a plan)."""
    if plan is None:
        return 0
    return next((i for i, s in enumerate(plan[table].shards) if s.rank == 0), 0)


# ------------------------------------------------------------------ kernels
def _weighted(gm: GraphModule, node: Node) -> bool:
    """Whether the pooled kernel of this LocalLookup node is fed per-sample weights."""
    psw = node.args[2] if len(node.args) > 2 else None
    if not isinstance(psw, Node) or psw.target is not operator.getitem:
        return False
    src = psw.args[0]
    mod = gm.get_submodule(src.target) if src.op == "call_module" else None
    if isinstance(mod, PackInputs):
        return mod.weighted
    if isinstance(mod, Unpack):
        return any(r.weighted for r in mod.spec.routes)
    return False


def _record(gm: GraphModule, node: Node, kernel: Optional[str], device=None) -> None:
    mod = gm.get_submodule(node.target)
    if isinstance(mod, LocalLookup):
        if kernel is not None:
            for role in ("pooled", "unpooled"):
                fused = getattr(mod, role)
                if fused is not None and getattr(fused, "kernel_request", None) != kernel:
                    setattr(mod, role, with_kernel(fused, kernel))
        weighted = _weighted(gm, node)
        node.meta[KERNEL] = {role: kernel_record(getattr(mod, role), weighted, device)
                             for role in ("pooled", "unpooled") if getattr(mod, role) is not None}
    else:  # ReplicatedLookup (several ranks): F.embedding_bag / indexing and torch's update
        inner = getattr(mod, "inner", mod)
        ops = {"pooled_forward" if s.served_pooled else "unpooled_forward": "torch" for s in inner.slots}
        if inner.optimizer is not None:
            ops["backward_update"] = "torch"
        node.meta[KERNEL] = {"replicated": ops}


def fuse_lookups_pass(gm: GraphModule, ctx) -> GraphModule:
    """Fuse each group's lookups into one LocalLookup call and record, on every local
    lookup node, the kernel serving each op (module doc). Returns a GraphModule computing
    what `gm` did; its parameters are the dense ones wherever lookups were fused."""
    opts = ctx.options
    changed = _fuse_lookups(gm, ctx)
    for node in list(gm.graph.nodes):
        mod = gm.get_submodule(node.target) if LOCAL_LOOKUP in node.meta and node.op == "call_module" else None
        if mod is not None and isinstance(getattr(mod, "inner", None), ReplicatedLookup):
            if _fuse_replicas(gm, node, opts):
                changed = True
                ctx.log.append(f"{NAME}: {node.target} (one rank) now served by a fused lookup")
            else:
                ctx.log.append(f"{NAME}: {node.target} stays on ReplicatedLookup (torch): replicas on "
                               f"several ranks all-reduce their gradients before the update")
    for node in gm.graph.nodes:
        # With weight_dtype the float modules are stand-ins on meta: quantize_tables, next,
        # quantizes them, applies a forced kernel and records the kernels that serve.
        if LOCAL_LOOKUP in node.meta and opts.get("weight_dtype") is None:
            _record(gm, node, opts.get("kernel"), opts.get("kernel_device"))
            ctx.log.append(f"{NAME}: %{node.name} kernels {node.meta[KERNEL]}")
    if not changed:
        return gm
    # Only what the graph references stays: the user's tables (and their modules) leave.
    out = L.carry_hooks(gm, GraphModule(gm, gm.graph, type(gm).__name__))
    out.meta.update(gm.meta)
    return out
