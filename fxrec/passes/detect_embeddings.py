"""detect_embeddings: find every embedding lookup and the tables behind them.

Recognised, however the user wrote the lookup (kinds of `Lookup`):
  module_bag            nn.EmbeddingBag call (1-D ids + offsets or 2-D ids; sum/mean;
                        per-sample weights)
  module_embedding      nn.Embedding call, unpooled or folded into a following
                        ``.sum(dim)`` / ``.mean(dim)`` over the ids' last dimension
  functional_bag        F.embedding_bag(ids, <parameter or buffer>, ...)
  functional_embedding  F.embedding(ids, <parameter or buffer>), folded like nn.Embedding
  aten_bag / aten_embedding  the same after a torch.export capture (aten ops on a
                        parameter); names map back to the owning module
  ebc / ec              fxrec EmbeddingBagCollection / EmbeddingCollection calls
Not recognised (left as ordinary dense nodes, with the reason in ctx.log and, per table,
in ``gm.meta[DENSE_TABLES]``): max-pooling bags, lookups with max_norm or
scale_grad_by_freq, a weight computed in the graph, nn.Embedding subclasses that override
forward, every lookup of a table whose weight is also read outside lookups (a tied
output layer, a regulariser: table_reads.py) or that one lookup reads with gradients off
(inside ``torch.no_grad()``: grad_mode.py) and another with gradients on. A table every
lookup of which runs with gradients off is a table, frozen (``gm.meta[FROZEN_TABLES]``).

Table names follow DESIGN.md: the path of the nn.Embedding / nn.EmbeddingBag owning
the weight (an EBC table ``t0`` at ``sparse.ebc`` is ``sparse.ebc.embedding_bags.t0``),
else the parameter's path; tied weights share one name. Pooling factors are measured by
running the graph on ``ctx.example_inputs`` (README.md gives the exact rules).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L
from fxrec.passes.grad_mode import stamp
from fxrec.passes.lookup import ArgRef, Lookup, TableRead
from fxrec.passes.shapes import run_example
from fxrec.passes.table_reads import fold_weight_metadata, reads_outside
from fxrec.types import TableInfo

aten = torch.ops.aten
_F_BAG_ARGS = list(L.F_ARGS[F.embedding_bag])
_F_EMB_ARGS = list(L.F_ARGS[F.embedding])
_ATEN_BAGS = (aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default,
              aten._embedding_bag_forward_only.default)
_ATEN_MODES = {0: "sum", 1: "mean", 2: "max"}
_REDUCE_METHODS = {"sum": "sum", "mean": "mean"}
_REDUCE_FUNCTIONS = {torch.sum: "sum", torch.mean: "mean", aten.sum.dim_IntList: "sum", aten.mean.dim: "mean"}


class _Skip(Exception):
    """A node that looks like a lookup but that fxrec must leave alone (reason given)."""


@dataclass
class _Candidate:
    node: Node
    lookup: Lookup
    weights: list[Tensor]
    sample: Optional[dict] = None  # measured on the example batch
    counts: list[tuple[int, int]] = field(default_factory=list)  # per read: (ids, bags)
    # per read: bags per sample where its features have a batch of their own (VBE), else None
    per_sample: list[Optional[float]] = field(default_factory=list)


def _arg_refs(node: Node, names: list[str]) -> dict[str, ArgRef]:
    refs = {}
    for i, name in enumerate(names):
        if i < len(node.args):
            refs[name] = ArgRef(pos=i)
        elif name in node.kwargs:
            refs[name] = ArgRef(kw=name)
    return refs


def _const(node: Node, refs: dict, name: str, default: Any = None) -> Any:
    if name not in refs:
        return default
    value = refs[name].of(node)
    if isinstance(value, Node):
        raise _Skip(f"its {name} is computed in the graph")
    return value


def _check_bag(mode: str, max_norm, scale_grad_by_freq) -> None:
    if mode not in ("sum", "mean"):
        raise _Skip(f"mode={mode!r} pooling is not supported (only sum and mean)")
    _check_plain(max_norm, scale_grad_by_freq)


def _check_plain(max_norm, scale_grad_by_freq) -> None:
    if max_norm is not None:
        raise _Skip("max_norm renormalises rows in place, which a sharded table cannot reproduce")
    if scale_grad_by_freq:
        raise _Skip("scale_grad_by_freq is not supported")


def _padding(padding_idx: Optional[int], rows: int) -> Optional[int]:
    if padding_idx is None:
        return None
    return padding_idx + rows if padding_idx < 0 else padding_idx


def _check_hooks(mod: nn.Module, path: str) -> None:
    """A lookup module (or one of its tables) with hooks: the sharded lookup that would replace
    its call would not run them, so it stays a module call, dense."""
    for sub_path, sub in mod.named_modules(prefix=path):
        found = L.hooks_of(sub)
        if found:
            raise _Skip(f"module {sub_path!r} has a {' and a '.join(found)}, which fxrec's fused lookup would not run "
                        f"(remove it to let fxrec take the table)")


# ------------------------------------------------------------------ structural matching
def _match_module(gm: GraphModule, node: Node, names: dict) -> Optional[_Candidate]:
    from fxrec.modules import EmbeddingBagCollection, EmbeddingCollection, embedding_names
    mod = gm.get_submodule(node.target)
    path = str(node.target)
    _check_hooks(mod, path)
    if isinstance(mod, (EmbeddingBagCollection, EmbeddingCollection)):
        bags = isinstance(mod, EmbeddingBagCollection)
        configs = mod.embedding_bag_configs() if bags else mod.embedding_configs()
        sub = "embedding_bags" if bags else "embeddings"
        owners = [f"{path}.{sub}.{c.name}" for c in configs]
        reads = tuple(TableRead(names.get(f"{o}.weight", o), c.pooling if bags else "none", f"{o}.weight",
                                tuple(c.feature_names), tuple(keys))
                      for o, c, keys in zip(owners, configs, embedding_names(configs)))
        weights = [gm.get_submodule(o).weight for o in owners]
        refs = _arg_refs(node, ["features"])
        lookup = Lookup("ebc" if bags else "ec", reads, ids=refs.get("features"),
                        ignores_weights=bags and mod.ignores_weights())
        return _Candidate(node, lookup, weights)
    is_bag = type(mod).forward is nn.EmbeddingBag.forward and isinstance(mod, nn.EmbeddingBag)
    is_emb = type(mod).forward is nn.Embedding.forward and isinstance(mod, nn.Embedding)
    if not (is_bag or is_emb):
        return None
    table = names.get(f"{path}.weight", path)
    if is_bag:
        _check_bag(mod.mode, mod.max_norm, mod.scale_grad_by_freq)
        refs = _arg_refs(node, ["input", "offsets", "per_sample_weights"])
        lk = Lookup("module_bag", (TableRead(table, mod.mode, f"{path}.weight"),), ids=refs.get("input"),
                    offsets=refs.get("offsets"),
                    per_sample_weights=refs.get("per_sample_weights"), padding_idx=mod.padding_idx,
                    include_last_offset=mod.include_last_offset)
    else:
        _check_plain(mod.max_norm, mod.scale_grad_by_freq)
        refs = _arg_refs(node, ["input"])
        lk = Lookup("module_embedding", (TableRead(table, "none", f"{path}.weight"),), ids=refs.get("input"),
                    padding_idx=mod.padding_idx)
    return _Candidate(node, lk, [mod.weight])


def _table_weight(gm: GraphModule, node: Node, ref: ArgRef, names: dict) -> tuple[str, str, Tensor]:
    weight = ref.of(node)
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        raise _Skip("its weight is computed in the graph, not a parameter or buffer")
    tensor = L.fetch_attr(gm, str(weight.target))
    if not (isinstance(tensor, Tensor) and tensor.dim() == 2):
        raise _Skip(f"its weight {weight.target!r} is not a 2-D tensor")
    path = str(weight.target)
    return names.get(path, path), path, tensor


def _match_function(gm: GraphModule, node: Node, names: dict) -> Optional[_Candidate]:
    target = node.target
    if target is F.embedding_bag or target in _ATEN_BAGS:
        arg_names = _F_BAG_ARGS if target is F.embedding_bag else [a.name for a in target._schema.arguments]
        refs = _arg_refs(node, arg_names)
        ids_name = "input" if target is F.embedding_bag else "indices"
        table, path, weight = _table_weight(gm, node, refs["weight"], names)
        mode = _const(node, refs, "mode", "mean" if target is F.embedding_bag else 0)
        mode = _ATEN_MODES.get(mode, mode)
        _check_bag(mode, _const(node, refs, "max_norm"), _const(node, refs, "scale_grad_by_freq", False))
        kind = "functional_bag" if target is F.embedding_bag else "aten_bag"
        lk = Lookup(kind, (TableRead(table, mode, path),), ids=refs.get(ids_name), offsets=refs.get("offsets"),
                    per_sample_weights=refs.get("per_sample_weights"), weight=refs["weight"],
                    padding_idx=_padding(_const(node, refs, "padding_idx"), weight.shape[0]),
                    include_last_offset=bool(_const(node, refs, "include_last_offset", False)),
                    output_index=0 if kind == "aten_bag" else None)
        return _Candidate(node, lk, [weight])
    if target is F.embedding or target is aten.embedding.default:
        functional = target is F.embedding
        refs = _arg_refs(node, _F_EMB_ARGS if functional else [a.name for a in target._schema.arguments])
        table, path, weight = _table_weight(gm, node, refs["weight"], names)
        _check_plain(_const(node, refs, "max_norm"), _const(node, refs, "scale_grad_by_freq", False))
        pad = _const(node, refs, "padding_idx", None if functional else -1)
        pad = None if (not functional and pad == -1) else _padding(pad, weight.shape[0])
        lk = Lookup("functional_embedding" if functional else "aten_embedding", (TableRead(table, "none", path),),
                    ids=refs.get("input" if functional else "indices"), weight=refs["weight"], padding_idx=pad)
        return _Candidate(node, lk, [weight])
    return None


def _match(gm: GraphModule, node: Node, names: dict, log: list, dense: dict) -> Optional[_Candidate]:
    try:
        if node.op == "call_module":
            return _match_module(gm, node, names)
        if node.op == "call_function":
            return _match_function(gm, node, names)
    except _Skip as why:
        target = getattr(node.target, "__name__", node.target)
        log.append(f"detect_embeddings: left %{node.name} ({node.op} {target}) dense: {why}")
        table = _skipped_table(node, names)
        if table is not None:
            dense.setdefault(table, f"%{node.name}: {why}")
    return None


def _skipped_table(node: Node, names: dict) -> Optional[str]:
    """The table a lookup left dense reads, where it is a module's weight or a parameter."""
    if node.op == "call_module":
        return names.get(f"{node.target}.weight")
    weights = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, Node) and a.op == "get_attr"]
    return names.get(str(weights[0].target)) if weights else None


def _leave_dense(dense: dict, table: str, why: str, log: list) -> None:
    """Record (once) that `table` stays a dense parameter, and why."""
    if table not in dense:
        dense[table] = why
        log.append(f"detect_embeddings: left table {table!r} dense: {why}")


def _without_outside_reads(gm: GraphModule, cands: list[_Candidate], names: dict, log: list,
                           dense: dict) -> list[_Candidate]:
    """`cands` less the lookups of tables whose weight is read elsewhere too (table_reads.py),
    to a fixed point: a dropped lookup of several tables is a read of each of them."""
    tables = {r.table for c in cands for r in c.lookup.reads}
    fold_weight_metadata(gm, tables, names)
    while True:
        outside = reads_outside(gm, {c.node for c in cands}, tables, names)
        outside.update({t: None for t in tables & set(dense)})  # a lookup of it was left dense
        drop = [c for c in cands if any(r.table in outside for r in c.lookup.reads)]
        if not drop:
            return cands
        for c in drop:
            hit = sorted({r.table for r in c.lookup.reads if r.table in outside})
            for r in c.lookup.reads:
                other = outside.get(r.table)
                _leave_dense(dense, r.table, f"its weight is also read outside embedding lookups, by %{other.name} "
                                             f"(a dense layer tied to it, a regulariser)" if other is not None else
                                             f"%{c.node.name} looks it up together with {hit}, left dense", log)
        cands = [c for c in cands if c not in drop]


# ------------------------------------------------------------------ measuring on the example
def _real_ids(ids: Tensor, padding_idx: Optional[int]) -> int:
    return ids.numel() - (int((ids == padding_idx).sum()) if padding_idx is not None else 0)


def _sample(c: _Candidate, args: tuple, kwargs: dict) -> dict:
    lk = c.lookup
    if lk.kind in ("ebc", "ec"):
        kjt = lk.ids.pick(args, kwargs)
        per_read = []
        for read in lk.reads:
            jts = [kjt[f] for f in read.features]
            per_read.append((sum(jt.values().numel() for jt in jts), sum(jt.lengths().numel() for jt in jts)))
        # with a batch per key (VBE) a key's bags are not the batch's samples: keep the samples
        samples = kjt.stride() if kjt.variable_stride_per_key() else None
        return {"per_read": per_read, "weighted": kjt.weights_or_none() is not None, "samples": samples}
    ids = lk.ids.pick(args, kwargs)
    offsets = lk.offsets.pick(args, kwargs) if lk.offsets else None
    psw = lk.per_sample_weights.pick(args, kwargs) if lk.per_sample_weights else None
    return {"shape": tuple(ids.shape), "real": _real_ids(ids, lk.padding_idx),
            "offsets": None if offsets is None else offsets.numel(), "weighted": isinstance(psw, Tensor)}


def _reduction(user: Node, node: Node) -> Optional[tuple[str, Any, Any]]:
    """(how, dim, keepdim) when `user` is a plain sum/mean of `node`, else None."""
    if user.op == "call_method" and user.target in _REDUCE_METHODS:
        how = _REDUCE_METHODS[user.target]
    elif user.op == "call_function" and user.target in _REDUCE_FUNCTIONS:
        how = _REDUCE_FUNCTIONS[user.target]
    else:
        return None
    args, kwargs = user.args, user.kwargs
    if not args or args[0] is not node or kwargs.get("dtype") is not None:
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return how, dim, keepdim


def _fold(node: Node, ids_ndim: int) -> Optional[tuple[Node, str, int]]:
    """The reduction an unpooled lookup folds into: the node's only user, a sum/mean
    over the ids' last dimension without keepdim (so it is exactly a bag lookup)."""
    if ids_ndim < 2 or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    found = _reduction(user, node)
    if found is None:
        return None
    how, dim, keepdim = found
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    if not isinstance(dim, int) or keepdim:
        return None
    dim = dim + ids_ndim + 1 if dim < 0 else dim
    return (user, how, dim) if dim == ids_ndim - 1 else None


def _finish(c: _Candidate) -> None:
    """Fold reductions and turn the sample into per-read (ids, bags) counts."""
    s, lk = c.sample, c.lookup
    lk.weighted = s["weighted"] and not lk.ignores_weights
    c.per_sample = [None] * len(lk.reads)
    if lk.kind in ("ebc", "ec"):
        # a feature's bags are its lengths entries, one per sample; an EC's bag is a sequence,
        # each of whose ids the planner charges as its own output row (cost.py)
        c.counts = s["per_read"]
        if s["samples"]:  # VBE: each bag is looked up and sent once (an EBC expands its sums at the end)
            c.per_sample = [bags / s["samples"] for _, bags in c.counts]
    elif lk.kind in L.BAG_KINDS:
        shape = s["shape"]
        bags = shape[0] if len(shape) == 2 else (s["offsets"] or 0) - int(lk.include_last_offset)
        c.counts = [(s["real"], bags)]
    else:
        shape, numel = s["shape"], int(torch.Size(s["shape"]).numel())
        # With a padding_idx the read stays unpooled: its padding positions must give the
        # padding row (zero only until the user re-initialises or loads the table) and carry
        # no gradient, which only a per-position mask on the rows can do.
        folded = _fold(c.node, len(shape)) if lk.padding_idx is None else None
        if folded is None:
            c.counts = [(numel, _unpooled_bags(shape))]
            return
        pool, how, dim = folded
        c.lookup = replace(lk, reads=(replace(lk.reads[0], pooling=how),), pool_node=pool.name, pool_dim=dim)
        c.counts = [(s["real"], numel // shape[-1] if shape[-1] else 0)]


def _unpooled_bags(shape: tuple) -> int:
    """The bags of an unpooled nn.Embedding / F.embedding read: one per sample, the ids'
    first dim (``batch x seq`` ids are one sequence of seq ids per sample), so its factor
    is the ids a sample carries. 1-D ids have no batch structure to tell samples from ids
    (one id per sample, or positions shared by the batch): each id stays its own bag,
    factor 1.0, as before."""
    numel = int(torch.Size(shape).numel())
    return shape[0] if len(shape) >= 2 else numel


# ------------------------------------------------------------------ tables
def _combine_pooling(poolings: list[str]) -> str:
    # Any unpooled read means the table must serve rows; sum and mean mixed is served by
    # a sum kernel (mean is the sum scaled per bag).
    if len(set(poolings)) == 1:
        return poolings[0]
    return "none" if "none" in poolings else "sum"


def _tables(cands: list[_Candidate]) -> dict[str, TableInfo]:
    acc: dict[str, dict] = {}
    for c in cands:
        for read, weight, (ids, bags), per_sample in zip(c.lookup.reads, c.weights, c.counts, c.per_sample):
            a = acc.setdefault(read.table, {"weight": weight, "poolings": [], "uses": 0, "ids": 0,
                                            "bags": 0, "features": [], "per_sample": 0.0, "vbe": False})
            uses = max(1, len(read.features))
            a["poolings"].append(read.pooling)
            a["uses"] += uses
            a["ids"] += ids
            a["bags"] += bags
            a["features"] += list(read.features) or [c.node.name]
            # a read without a batch per key gives each sample one bag per feature, as `uses` counts
            a["per_sample"] += uses if per_sample is None else per_sample
            a["vbe"] |= per_sample is not None
    return {name: TableInfo(name=name, num_embeddings=a["weight"].shape[0], embedding_dim=a["weight"].shape[1],
                            pooling_factor=a["ids"] / a["bags"] if a["bags"] else 0.0, dtype=a["weight"].dtype,
                            pooling=_combine_pooling(a["poolings"]), uses=a["uses"], features=a["features"],
                            bags_per_sample=a["per_sample"] if a["vbe"] else None)
            for name, a in acc.items()}


def detect_embeddings_pass(gm: GraphModule, ctx) -> GraphModule:
    """Annotate every lookup node with LOOKUP (a `Lookup`) and NODE_TABLES (its tables'
    TableInfo, aligned with `Lookup.reads`); set ``gm.meta[TABLES]`` and ``ctx.tables``
    to the TableInfo of every table, in graph order, ``gm.meta[DENSE_TABLES]`` to the
    tables left dense, with the reason, and ``gm.meta[FROZEN_TABLES]`` to those not trained;
    stamps every node's grad mode (grad_mode.py). Adds no nodes; folds reads of a table's
    shape or dtype into constants (table_reads.py)."""
    if ctx.example_inputs is None:
        raise ValueError("detect_embeddings needs ctx.example_inputs to measure pooling factors")
    names = gm.meta.get(L.PARAM_TABLES) or L.table_names_by_param(gm)
    for node in gm.graph.nodes:
        for key in (L.LOOKUP, L.NODE_TABLES, L.NODE_GROUPS):
            node.meta.pop(key, None)
    dense: dict[str, str] = {}
    cands = [c for c in (_match(gm, n, names, ctx.log, dense) for n in list(gm.graph.nodes)) if c is not None]
    states = stamp(gm)
    quiet = _read_only_quietly(cands, states)
    for c in cands:
        if states[c.node] is False:  # a lookup the model makes with gradients off: no trained lookup
            src = c.node.meta.get(L.SOURCE)
            why = (f"%{c.node.name} reads it with gradients off (torch.no_grad()" + (f" at {src}" if src else "")
                   + ") and another lookup with gradients on, reads one fused update cannot tell apart; look "
                     "it up outside the block and detach() the result to shard it")
            for r in c.lookup.reads:
                if r.table not in quiet:
                    _leave_dense(dense, r.table, why, ctx.log)
    cands = _without_outside_reads(gm, cands, names, ctx.log, dense)
    by_node = {c.node: c for c in cands}

    def on_node(node, args, kwargs, _result):
        if node in by_node:
            by_node[node].sample = _sample(by_node[node], args, kwargs)

    run_example(gm, tuple(ctx.example_inputs), on_node)
    for c in cands:
        _finish(c)
    tables = _tables(cands)
    for c in cands:
        c.node.meta[L.LOOKUP] = c.lookup
        c.node.meta[L.NODE_TABLES] = tuple(tables[t] for t in c.lookup.tables)
    gm.meta[L.TABLES] = tables
    gm.meta[L.DENSE_TABLES] = dense
    ctx.tables = tables
    frozen = gm.meta[L.FROZEN_TABLES] = L.frozen_tables(gm, tables, names)
    if frozen:  # fxrec.shard and the compile backend give them no sparse optimizer (fxrec.optim.freeze)
        ctx.log.append(f"detect_embeddings: table(s) {frozen} are frozen (requires_grad=False, or a buffer): "
                       f"looked up, never trained")
    untrained = [t for t in tables if t in quiet and t not in frozen]  # tables, in graph order
    if untrained:  # no gradient ever reaches them: the model does not train them either
        frozen.extend(untrained)
        ctx.log.append(f"detect_embeddings: table(s) {untrained} are frozen: every lookup of them runs with "
                       f"gradients off (torch.no_grad()), so the model never trains them")
    return gm


def _read_only_quietly(cands: list[_Candidate], states: dict) -> set[str]:
    """The tables every lookup of which runs with gradients off. Such a table is sharded
    and frozen: its units run inside the no_grad block (grad_mode.settle), reading only.
    A table also read with gradients on stays dense: its one fused update would see the
    quiet read's rows as touched with a zero gradient, which Adam's step does not ignore."""
    off, on = set(), set()
    for c in cands:
        (off if states[c.node] is False else on).update(r.table for r in c.lookup.reads)
    return off - on
