"""``torch.compile(model, backend="fxrec")``: fxrec's fused lookups inside the compiler users already call.

Dynamo hands this backend each graph it captured, the model's parameters among its inputs.
The backend finds the embedding lookups (`F.embedding_bag` / `F.embedding` whose weight is a
parameter: what nn.EmbeddingBag / nn.Embedding / fxrec's collections inline to), runs
fxrec's passes on the graph (detect_embeddings, group_tables, fuse_lookups, and
quantize_tables when asked): one fused table-batched lookup per group (Triton, FBGEMM or
torch, as the registry chooses). The rest of the graph (dense MLPs, interaction, loss) goes
to inductor, as under ``torch.compile(model)``: `dense_compile.compile_dense` cuts it into
segments around fxrec's modules and compiles each dense one. ``options={"dense": "eager"}``
runs the rest as captured instead (no compile time; eager numerics), ``"aot_eager"`` or any
other torch.compile backend name compiles it with that. A graph with nothing fused goes to
that backend whole. Tables are named by their module's path (``emb_l.0``,
``sparse_arch.ebc.embedding_bags.t_user``), as `fxrec.find_tables` names module tables.

What is fused, and how the tables stay the model's:

- No gradient wanted for the tables (``torch.no_grad()`` / eval, or frozen tables): each
  group's tables move into one fused buffer and the model's parameters become views of it
  (``param.data``), so the compiled lookups always read the current values: an optimizer
  step, ``load_state_dict`` or any in-place write reaches them. Dynamo recompiles once
  (the parameters' storage moved); that compile finds them in place and reuses the buffer.
- Training with ``options={"sparse_optimizer": fxrec.optim.RowWiseAdagrad(lr=...)}`` (SGD,
  Adam, PerTable): the same buffer, trained inside backward by the fused optimizer, as in
  `fxrec.shard`. The tables then get no ``.grad``, so a torch optimizer given all of the
  model's parameters updates only the dense ones.
- Training without a sparse optimizer: the lookups stay as they are (the user's optimizer
  owns the tables and needs their gradients); the graph's log says so.
- Inference where every group would be served by torch's per-table kernel (a CPU with
  several threads, where fbgemm's forward runs on one): the lookups stay as they are too,
  and go to inductor with the rest; a fused call would only add packing around the same
  embedding_bag calls. ``options={"kernel": ...}`` fuses anyway.
- ``options={"weight_dtype": "int8"}`` (int4, int2, fp16, fp32, or a mapping per table;
  also "output_dtype"): inference on quantized tables, as `fxrec.lower_for_inference`. The
  quantized copy is refreshed from the model's parameters before a call whenever one of
  them changed since: written in place (its version counter, or that of the fused buffer it
  views, moved), or replaced (``load_state_dict(assign=True)``, ``.data = ...``). Not with
  gradients.
- Each model instance keeps its own fused buffers and optimizer state. Dynamo serves every
  instance of a model class the graph it compiled for the first (the parameters are graph
  inputs, so its guards pass), so a fused module belongs to a set of parameters, not to a
  graph: each fused module's place in the graph (`_Slot`) is served with the module of the
  parameters dynamo passes, found by them (`_bind`). On every call `_Rebinding` checks that
  each table's parameter still starts where its view in the slot's buffer does (one
  data_ptr comparison per table); where one does not, the slot takes the fused module those
  parameters belong to (the other instance's, kept with its state), or, where none of them
  belongs to one (a new instance), a new module with a buffer the tables move into and
  fresh optimizer state, as a new model's. A table the user replaced
  (``load_state_dict(assign=True)``, ``mod.weight = nn.Parameter(...)``, ``.data = ...``)
  is copied into the buffer its model's other tables are in, state kept; when every table
  of a fused module is replaced at once the new parameters are as a new instance's and
  their optimizer state starts afresh. A module the graph no longer serves is kept while
  its parameters live. A graph left unfused reads the tables dynamo passes.
- ``options={"kernel": "triton" | "fbgemm" | "torch"}`` forces the kernel.
- ``mode`` (torch.compile's) goes to inductor, for the dense segments.

Every graph compiled here is appended to `compiled` (the last 32), with its decisions in
``meta["fxrec_log"]``.
"""
from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .dense_compile import check_dense, compile_dense, compile_whole
from .id_guard import guard_ids

__all__ = ["fxrec_backend", "register", "compiled", "OPTIONS"]

OPTIONS = ("sparse_optimizer", "weight_dtype", "output_dtype", "kernel", "bounds_check", "dense")
LOG = "fxrec_log"
_LOOKUPS = (F.embedding_bag, F.embedding)
compiled: list[GraphModule] = []
_KEEP = 32
# id(parameter) -> (the parameter, table name, {optimizer type: a fused module whose buffer
# it views}), all weak: a recompile reuses the module of its optimizer's kind, state and all;
# graphs of other kinds (an eval graph beside a training one) share its buffer. The graphs
# hold the modules (`_Rebinding.held`). Not a WeakKeyDictionary: it compares keys with ==,
# which a tensor answers elementwise.
_ALIASED: dict[int, tuple[weakref.ref, str, dict[type, weakref.ref]]] = {}
_FUSED: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every fused module a parameter was aliased to


def _aliased(param: nn.Parameter) -> Optional[tuple[Any, str]]:
    """(a fused module whose buffer `param` views, its table name), or None."""
    entry = _ALIASED.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    for ref in entry[2].values():
        if ref() is not None:
            return ref(), entry[1]
    return None


def table_optimizer_state(param: nn.Parameter) -> dict[str, Tensor]:
    """The fused sparse optimizer's state (live views: ``{name: rows or rows x dim}``) of the
    table whose fused buffer `param` views under ``options={"sparse_optimizer": ...}``, or {}
    where it views none (the managed collisions' reset zeroes evicted rows' state with it)."""
    entry = _ALIASED.get(id(param))
    if entry is None or entry[0]() is not param:
        return {}
    for ref in entry[2].values():
        module = ref()
        if module is not None and module.table_weights()[entry[1]].data_ptr() == param.data_ptr():
            return module.table_state().get(entry[1], {})
    return {}


def _alias(param: nn.Parameter, name: str, module) -> None:
    """Record that `param` views `module`'s buffer (as table `name`)."""
    entry = _ALIASED.get(id(param))
    if entry is None or entry[0]() is not param:
        entry = _ALIASED[id(param)] = (weakref.ref(param), name, {})
    entry[2][type(module.optimizer)] = weakref.ref(module)
    _FUSED.add(module)
    for key in [k for k, e in _ALIASED.items() if e[0]() is None]:  # dead parameters
        del _ALIASED[key]


def register() -> None:
    """Make ``backend="fxrec"`` known to torch.compile where fxrec is not installed (a
    checkout on PYTHONPATH); an installed fxrec registers it through its entry point."""
    from torch._dynamo.backends import registry

    if "fxrec" not in registry._COMPILER_FNS:
        registry.register_backend(fxrec_backend, name="fxrec")


_OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_options(options: Optional[dict]) -> dict:
    """The options, each checked for its type and value here, before any graph compiles: a
    bad one was otherwise ignored (a sparse_optimizer under no_grad, an output_dtype without
    weight_dtype), read as truthy (bounds_check="no") or met deep inside a pass, wrapped in
    BackendCompilerFailed, and only once a graph with lookups compiled."""
    from fxrec.lowering.registry import KERNELS
    from fxrec.optim import NAMES, OPTIMIZERS, PerTable

    where = "torch.compile(backend='fxrec')"
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"{where}: options must be a dict of option name -> value, got {options!r} "
                        f"({type(options).__name__}); the options are {list(OPTIONS)}")
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; "
                         f"the options are {list(OPTIONS)}")
    opts["dense"] = check_dense(opts.get("dense", "inductor"))
    optimizer = opts.get("sparse_optimizer")
    if optimizer is not None and not isinstance(optimizer, OPTIMIZERS + (PerTable,)):
        raise ValueError(f"{where}: sparse_optimizer must be {NAMES} or a "
                         f"fxrec.optim.PerTable, got {optimizer!r}")
    kernel = opts.get("kernel")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"{where}: kernel must be one of {list(KERNELS)} (or None: the registry's choice), got "
                         f"{kernel!r}")
    output_dtype = opts.get("output_dtype")
    if output_dtype is not None and output_dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"{where}: output_dtype must be one of {list(_OUTPUT_DTYPES)}, got {output_dtype!r}")
    if output_dtype is not None and opts.get("weight_dtype") is None:
        raise ValueError(f"{where}: output_dtype={output_dtype} is what quantized lookups return, and no "
                         f"weight_dtype was given to quantize with; give weight_dtype too, or leave output_dtype out")
    if not isinstance(opts.get("bounds_check", True), bool):
        raise TypeError(f"{where}: bounds_check must be True or False, got {opts['bounds_check']!r}")
    return opts


# ------------------------------------------------------------------ the lookups' tables
_SOURCE_PATH = "fxrec_source_path"


def _source_path(node: Node) -> Optional[list[str]]:
    """``L['self']._modules['emb_l']._modules['0']._parameters['weight']`` -> [emb_l, 0, weight]."""
    if _SOURCE_PATH in node.meta:  # kept by `_OnValidIds`: dynamo drops its grapharg after the compile
        return node.meta[_SOURCE_PATH]
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    keys = re.findall(r"\['([^']+)'\]", source.name)
    if not keys:
        return None
    # the first key is the frame's local: the model ('self') is no part of a name, another
    # local (a module a helper function was handed: 'bag') is
    return keys[1:] if keys[0] == "self" and len(keys) > 1 else keys


def _lookup_tables(gm: GraphModule, example_inputs) -> dict[Node, tuple[str, nn.Parameter]]:
    """Placeholder -> (table name, parameter) for every parameter a lookup reads as its weight."""
    value = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    out: dict[Node, tuple[str, nn.Parameter]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LOOKUPS:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        param = value.get(weight) if isinstance(weight, Node) else None
        if not isinstance(param, nn.Parameter) or param.dim() != 2 or weight in out:
            continue
        path = _source_path(weight) or [weight.name]
        if len(path) > 1 and path[-1] == "weight":  # a module's table: named by the module's path
            path = path[:-1]
        out[weight] = (".".join(path), param)
    return out


def _as_attributes(gm: GraphModule, tables: dict) -> tuple[dict[str, nn.Parameter], dict[str, int]]:
    """Read each table from an attribute of `gm` at its name's path (get_attr), not from its
    placeholder (which stays, unused: dynamo still passes it), so that detect_embeddings
    sees a parameter lookup, named by that path. Returns the tables by that name, and the
    position among the graph's inputs where dynamo passes each (the model's parameter as it
    is at each call: `_Rebinding`)."""
    inputs = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    by_name, made, where = {}, set(), {}
    for node, (name, param) in tables.items():
        parts = name.split(".")
        if hasattr(gm, parts[0]) and parts[0] not in made:  # dynamo's own attribute: keep clear of it
            parts = ["fxrec_tables"] + parts
            name = ".".join(parts)
        owner = gm
        for part in parts[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
                if owner is gm:
                    made.add(part)
            owner = getattr(owner, part)
        owner.register_parameter(parts[-1], param)
        gm.meta.setdefault("fxrec_made", set()).update(made)
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(name)
        node.replace_all_uses_with(attr)
        by_name[name], where[name] = param, inputs[node]
    gm.recompile()
    return by_name, where


def _for_graph(optimizer, names: list[str]):
    """`optimizer` for a graph whose tables are `names`. A `PerTable` is keyed as
    `fxrec.find_tables` names tables, by their path in the model, but dynamo names a graph's
    tables from the frame it traced: a collection's own graph (after the graph break in its
    forward) starts at the collection, ``embedding_bags.t`` for ``sparse_arch.ebc.embedding_bags.t``.
    Such a table takes the one entry whose name ends with its own; several that differ raise."""
    from fxrec.optim import PerTable
    if not isinstance(optimizer, PerTable):
        return optimizer
    extra = {}
    for name in names:
        short = name.removeprefix("fxrec_tables.")  # `_as_attributes`' prefix
        if name in optimizer.tables:
            continue
        hits = [k for k in optimizer.tables if k == short or k.endswith("." + short)]
        if len({optimizer.tables[k] for k in hits}) > 1:  # the configs are frozen dataclasses: hashable
            raise ValueError(f"torch.compile(backend='fxrec'): this graph's table {short!r} (named from the frame "
                             f"dynamo traced) may be any of {hits} of sparse_optimizer's PerTable, which differ: "
                             f"give them one optimizer, or train with fxrec.shard, which names every table by "
                             f"its path in the model")
        if hits:
            extra[name] = optimizer.tables[hits[0]]
    return PerTable({**optimizer.tables, **extra}, default=optimizer.default) if extra else optimizer


def _as_inputs(gm: GraphModule, where: dict[str, int]) -> None:
    """Undo `_as_attributes` for a graph left unfused: its lookups read the tables dynamo
    passes again, so a parameter the user replaces (``load_state_dict(assign=True)``) is read."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in where:
            node.replace_all_uses_with(inputs[where[node.target]])
            gm.graph.erase_node(node)
    gm.recompile()


def _concrete(gm: GraphModule, example_inputs) -> tuple:
    """The inputs with symbolic sizes replaced by the values they stood for in this call. An
    unbacked size (a KJT key's number of ids, `fxrec.modules._split_by_key`) has no hint:
    its value is the size of the input tensor it was read from."""
    seen = {}
    for node, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        fake = node.meta.get("example_value")
        if isinstance(x, torch.Tensor) and isinstance(fake, torch.Tensor):
            for size, value in zip(fake.shape, x.shape):
                if isinstance(size, torch.SymInt):
                    seen.setdefault(size.node.expr, value)
    out = []
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            x = x.node.hint if x.node.hint is not None else seen[x.node.expr]
        out.append(x)
    return tuple(out)


# ------------------------------------------------------------------ float tables: shared storage
def _same_layout(a, b) -> bool:
    la, lb = a.layout, b.layout
    return (la.names, la.rows, la.dims, la.poolings) == (lb.names, lb.rows, lb.dims, lb.poolings) \
        and a.weights.dtype == b.weights.dtype and a.weights.device == b.weights.device


class _Slot:
    """A place in a lowered graph that holds a fused module (a LocalLookup's pooled or
    unpooled module, or one part of its FusedGroups), and what `_bind` needs to fill it
    for another set of parameters: the graph inputs carrying its tables, the optimizer
    configuration and kernel the graph was compiled with."""

    def __init__(self, path: str, lookup, role: str, index: Optional[int], part, inputs: dict[str, int]):
        self.path, self.lookup, self.role, self.index = path, lookup, role, index
        self.inputs, self.config, self.kernel = inputs, part.optimizer, part.kernel_request
        self.module, self.starts = part, []

    def install(self, module) -> None:
        """Serve this slot with `module`; remember where its tables' views start (the check
        `_Rebinding` makes on every call)."""
        if self.index is None:
            setattr(self.lookup, self.role, module)
        else:
            getattr(self.lookup, self.role).parts[self.index] = module
        views = module.table_weights()
        self.module, self.starts = module, [(i, views[n].data_ptr()) for n, i in self.inputs.items()]


def _slots(gm: GraphModule, where: dict[str, int]) -> list[_Slot]:
    """Every fused module of `gm` whose tables are all graph inputs, as a `_Slot`."""
    from fxrec.runtime.local_lookup import LocalLookup

    out = []
    for path, lookup in gm.named_modules():
        if not isinstance(lookup, LocalLookup):
            continue
        for role in ("pooled", "unpooled"):
            fused = getattr(lookup, role)
            parts = [] if fused is None else fused.parts if hasattr(fused, "parts") else [fused]
            for i, part in enumerate(parts):
                if all(n in where for n in part.layout.names):
                    index = i if hasattr(fused, "parts") else None
                    out.append(_Slot(path, lookup, role, index, part, {n: where[n] for n in part.layout.names}))
    return out


def _home(part, params: dict[str, nn.Parameter], kind: type) -> Optional[Any]:
    """The fused module, laid out as `part`, that some of these parameters view or were
    moved into (their model's: `_bind`), preferring one trained by an optimizer of type
    `kind`, then the one most of them belong to; None when none belongs to one. A new
    parameter over a table's view counts (``load_state_dict(state_dict(), assign=True)``
    wraps the views it was given in new parameters)."""
    votes: dict[int, list] = {}
    for module in [m for m in _FUSED if _same_layout(m, part)]:
        views = module.table_weights()
        mine = [n for n, p in params.items() if p.data_ptr() == views[n].data_ptr() or _aliased_to(p, n, module)]
        if mine:
            votes[id(module)] = [type(module.optimizer) is not kind, -len(mine), module]
    return min(votes.values(), key=lambda v: v[:2])[2] if votes else None


def _aliased_to(param: nn.Parameter, name: str, module) -> bool:
    """Whether `param` was made a view of `module`'s table `name` (it may view another
    buffer since: ``.data = ...``)."""
    entry = _ALIASED.get(id(param))
    return entry is not None and entry[0]() is param and entry[1] == name and \
        any(ref() is module for ref in entry[2].values())


def _move_into(module, params: dict[str, nn.Parameter], copy: bool = True) -> None:
    """Make each parameter a view of its table in `module`'s buffer (``param.data``),
    copying its values in first (`copy`) where it is not one already."""
    for name, view in module.table_weights().items():
        param = params[name]
        if param.data_ptr() == view.data_ptr():
            continue
        if param.shape != view.shape or param.dtype != view.dtype:
            raise ValueError(f"torch.compile(backend='fxrec'): table {name!r} was replaced by a "
                             f"{tuple(param.shape)} {param.dtype} tensor, and its fused buffer holds "
                             f"{tuple(view.shape)} {view.dtype}; recompile (torch._dynamo.reset()) for a new shape")
        with torch.no_grad():
            if copy:
                view.copy_(param.detach())
            param.data = view


def _bind(part, params: dict[str, nn.Parameter], config, kernel: Optional[str], built=None) -> tuple[Any, str]:
    """The fused module that serves `part`'s tables for these parameters (module doc), and
    how it was found: "reuses" the module of their model trained by an optimizer of
    `config`'s type (its state kept; `config` replaces its settings), "shares" the buffer
    of their model's module of another kind (an eval graph's), with state of its own, or
    "new": none of them belongs to a fused module, so they are another model's (or all of
    this model's tables were replaced) and move into a buffer of their own. Tables the
    user replaced are copied into their model's buffer. `built` (a compile's own module,
    holding the tables' values) serves as the new module; else one is made."""
    from fxrec.runtime.fused_group import empty_like

    home = _home(part, params, type(config))
    if home is None or type(home.optimizer) is not type(config):
        module = built if built is not None else empty_like(part, config, kernel)
        if home is None:
            _move_into(module, params, copy=built is None)
        else:
            _move_into(home, params)
            module.weights = home.weights
        how = "new" if home is None else "shares"
    else:
        _move_into(home, params)
        module, how = home, "reuses"
        module.optimizer = config  # a new lr takes effect, the state stays
    for name, param in params.items():
        _alias(param, name, module)
    return module, how


def _share_storage(gm: GraphModule, params: dict[str, nn.Parameter], where: dict[str, int],
                   log: list[str]) -> list[_Slot]:
    """Make each fused table the model's parameter's storage (module doc). Tables an earlier
    compile fused already keep their one buffer: a recompile (same optimizer kind) reuses
    that module, state and all; another graph (an eval graph beside a training one) gets
    its own module over the same buffer, so every graph reads and writes the same tables.
    Returns the graph's slots, each served by its module."""
    slots = _slots(gm, where)
    for slot in slots:
        part, names = slot.module, list(slot.module.layout.names)
        mine = {n: params[n] for n in names}
        if _home(part, mine, type(part.optimizer)) is None and any(_aliased(p) is not None for p in mine.values()):
            # `_grouping_conflict` let this graph through: cannot happen
            raise RuntimeError(f"backend: tables {names} were fused by an earlier compile in another "
                               f"layout; this graph cannot share their buffer")
        module, how = _bind(part, mine, part.optimizer, part.kernel_request, built=part)
        slot.install(module)
        at = f"{slot.path}.{slot.role}"
        log.append({"reuses": f"backend: {at} reuses the fused module of an earlier compile ({names})",
                    "shares": f"backend: {at} shares the fused buffer of an earlier compile ({names}), "
                              f"with its own optimizer state",
                    "new": f"backend: {at}: tables {names} now live in its fused buffer"}[how])
    return slots


def _grouping_conflict(gm: GraphModule, ctx, params: dict[str, nn.Parameter]) -> Optional[str]:
    """Why this graph must not fuse: a table it would fuse lives, since an earlier compile,
    in a fused buffer holding another set of tables (an eval graph reading some of a
    training graph's tables). Such a graph reads the tables unfused, from that buffer."""
    from fxrec.passes.fuse_lookups import fusion_units, served_pooled

    by_name = {n.name: n for n in gm.graph.nodes}
    for unit in fusion_units(ctx.groups):
        pooled = served_pooled([by_name[n] for group in unit for n in group.nodes])
        for role in (True, False):
            names = {t for t, p in pooled.items() if p is role and t in params}
            entries = [_aliased(params[t]) for t in names]
            if not names or all(e is None for e in entries):
                continue
            # an earlier compile's modules: one, or one per sparse optimizer (a FusedGroups'
            # parts, frozen tables apart), holding exactly these tables
            owners = {id(e[0]): e[0] for e in entries if e is not None}.values()
            if any(e is None for e in entries) or {n for o in owners for n in o.layout.names} != names:
                return (f"tables {sorted(names)} were fused with other tables by an earlier compile; this graph "
                        f"reads them unfused, from that buffer")
            served = {o.layout.pooled for o in owners}
            if served != {role}:  # e.g. a graph break between a table's bag and row reads
                how = ("pooled bags", "rows")
                return (f"tables {sorted(names)} were fused by an earlier compile to serve "
                        f"{how[not next(iter(served))]}, and this graph reads them as {how[not role]}; it "
                        f"reads them unfused, from that buffer")
    return None


def _nothing_to_gain(gm: GraphModule, ctx, params: dict[str, nn.Parameter], opts: dict) -> Optional[str]:
    """Why fusing this inference graph would only slow it down, or None: every group's
    lookup would be served by torch's per-table kernel (a CPU with several threads, where
    fbgemm's forward runs on one), which is what the model calls already; the packing
    around a fused call would be all that changed. A kernel asked for fuses anyway."""
    import os

    from fxrec.lowering import registry
    from fxrec.passes import lookup as L
    from fxrec.passes.fuse_lookups import fusion_units, served_pooled

    if opts.get("kernel") is not None or os.environ.get("FXREC_KERNEL"):
        return None
    by_name = {n.name: n for n in gm.graph.nodes}
    for unit in fusion_units(ctx.groups):
        nodes = [by_name[n] for group in unit for n in group.nodes]
        pooled = served_pooled(nodes)
        weighted = any(n.meta[L.LOOKUP].weighted for n in nodes)
        for role in (True, False):
            names = [t for t, p in pooled.items() if p is role and t in params]
            if not names:
                continue
            first = params[names[0]]
            poolings = [(ctx.tables[t].pooling if ctx.tables[t].pooling in ("sum", "mean") else "sum") if role
                        else "none" for t in names]
            kernel, _ = registry.select("pooled_forward" if role else "unpooled_forward", device=first.device,
                                        weight_dtype=first.dtype, index_dtype=torch.int64,
                                        dims=[params[t].shape[1] for t in names], poolings=poolings,
                                        weighted=weighted and role, threads=torch.get_num_threads())
            if kernel != "torch":
                return None
    return ("on this device each would be served by torch's per-table embedding_bag, "
            "which the model calls already, so fusing would only add packing (options={'kernel': 'torch'} "
            "fuses anyway)")


# ------------------------------------------------------------------ quantized tables: refresh
def _written(param: nn.Parameter) -> tuple:
    """What changes whenever `param`'s values may have: the parameter itself (replaced by
    ``load_state_dict(assign=True)``), its storage (``.data = ...``), its version (in-place
    writes), and the version of the fused buffer it views, if any (a fused optimizer's
    update writes that buffer, not the parameter: `FusedEmbeddingBags.update` bumps it)."""
    owner = _aliased(param)
    return (id(param), param.data_ptr(), param._version,
            None if owner is None else (id(owner[0].weights), owner[0].weights._version))


class _Refreshing:
    """Calls the lowered graph, first re-quantizing any table whose parameter (as dynamo
    passes it, at its input position) changed since it was last quantized (`_written`)."""

    def __init__(self, gm: GraphModule, params: dict[str, nn.Parameter], where: dict[str, int], run):
        from fxrec.lowering.quant_tbe import QuantizedEmbeddingBags

        self.gm, self.run = gm, run
        self.slots = []  # [module, table name, input position, what was quantized]
        for module in gm.modules():
            if isinstance(module, QuantizedEmbeddingBags):
                for name in module.layout.names:
                    self.slots.append([module, name, where[name], _written(params[name])])

    def __call__(self, *args):
        for slot in self.slots:
            module, name, i, seen = slot
            now = _written(args[i])
            if now != seen:
                module.load_table(name, args[i].detach())
                slot[3] = now
        return self.run(*args)


class _Rebinding:
    """Calls the fused graph, first serving each slot with the fused module of the tables
    dynamo passes (`_bind`) where they are not the ones it serves: another instance of the
    model (dynamo serves it this graph: its guards pass), or a table the user replaced
    (``load_state_dict(assign=True)``, ``mod.weight = nn.Parameter(...)``,
    ``mod.weight.data = ...``), which is copied into its model's buffer. The check on every
    call: each table's parameter still starts where its view in the slot's buffer does."""

    def __init__(self, gm: GraphModule, slots: list[_Slot], params: dict[str, nn.Parameter], run):
        self.gm, self.slots, self.run = gm, slots, run
        # id(module) -> (module, its parameters): a module this graph served and no longer
        # does stays alive while its model does (the first instance's, while the graph
        # serves the second), with its optimizer state; `_aliased` finds it again
        self.held: dict[int, tuple[Any, list[weakref.ref]]] = {}
        for slot in slots:
            self._hold(slot.module, [params[n] for n in slot.inputs])

    def _hold(self, module, params: list) -> None:
        self.held[id(module)] = (module, [weakref.ref(p) for p in params])
        for key in [k for k, (m, refs) in self.held.items() if all(r() is None for r in refs)]:
            del self.held[key]  # its model is gone

    def _rebind(self, slot: _Slot, args) -> None:
        params = {n: args[i] for n, i in slot.inputs.items()}
        module, how = _bind(slot.module, params, slot.config, slot.kernel)
        slot.install(module)
        self._hold(module, list(params.values()))
        if how == "new":
            self.gm.meta[LOG].append(f"backend: {slot.path}.{slot.role}: tables {list(slot.inputs)} of another "
                                     f"parameter set (another instance of the model, or every table replaced) "
                                     f"now live in a fused buffer of their own")

    def __call__(self, *args):
        for slot in self.slots:
            if any(args[i].data_ptr() != start for i, start in slot.starts):
                self._rebind(slot, args)
        return self.run(*args)


# ------------------------------------------------------------------ the backend
def _done(gm: GraphModule, log: list[str], fn=None):
    gm.meta[LOG] = list(log)
    compiled.append(gm)
    del compiled[:-_KEEP]
    return fn if fn is not None else gm.forward


def _as_given(gm: GraphModule, where: dict[str, int]) -> None:
    """Undo `_as_attributes` whole (the tables' attributes too) and keep each placeholder's
    source path, which dynamo drops after the compile: the graph as dynamo gave it, to compile
    again (`_OnValidIds`)."""
    _as_inputs(gm, where)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[_SOURCE_PATH] = _source_path(node)
    for name in list(where) + sorted(gm.meta.pop("fxrec_made", ())):
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)


class _OnValidIds:
    """The graph's compile, put off to its first call whose ids are in range. Dynamo compiles
    on the batch that reached a new graph (or shape); when that batch has an id outside its
    table, fxrec's passes, which read the example, fail, and dynamo reports any backend failure
    as BackendCompilerFailed. Deferred, the bad batch raises the ValueError naming the table
    and the id that any later bad batch raises, and the first good one compiles the graph."""

    def __init__(self, gm: GraphModule, options: Optional[dict], mode: Optional[str]):
        self.gm, self.options, self.mode, self.run = gm, options, mode, None

    def __call__(self, *args):
        if self.run is None:
            from fxrec.passes.runner import PassError
            from fxrec.passes.shapes import ExampleIdError
            try:
                self.run = _backend(self.gm, list(args), self.options, self.mode, defer=False)
            except PassError as e:
                if not isinstance(e.__cause__, ExampleIdError):
                    raise
                # the batch's own error, as the compiled graph's check words it (the interpreter
                # that found it appends the node it was running)
                message = str(e.__cause__).split("\n\nWhile executing")[0]
                raise ValueError(message.replace(" in the example inputs", "")) from None
        return self.run(*args)


def fxrec_backend(gm: GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None):
    """The torch.compile backend (module doc). `mode` (torch.compile's) goes to inductor."""
    return _backend(gm, example_inputs, options, mode, defer=True)


def _backend(gm: GraphModule, example_inputs, options: Optional[dict], mode: Optional[str], defer: bool):
    """`fxrec_backend`; with `defer`, a batch of ids out of range puts the compile off (`_OnValidIds`)."""
    from fxrec.optim import freeze
    from fxrec.passes import lookup as L
    from fxrec.passes.fuse_lookups import fuse_lookups_pass
    from fxrec.passes.quantize_tables import quantize_tables_pass
    from fxrec.passes.runner import PassContext, PassError, run_passes
    from fxrec.passes.shapes import ExampleIdError

    opts = _check_options(options)
    dense = opts["dense"]
    log: list[str] = []

    def guarded() -> list[str]:  # the unfused lookups check their ids, as eager and fused ones do
        name_of = lambda n: ".".join(_source_path(n) or [n.name])  # noqa: E731 - a buffer's path, or the node
        if not opts.get("bounds_check", True) or not guard_ids(gm, _LOOKUPS, tables, name_of):
            return []
        return ["backend: the unfused lookups' ids are checked against their tables (bounds_check)"]

    def whole(why: str):  # nothing fused: the graph goes to the dense backend as it came
        log = [why, f"backend: the whole graph compiled with {dense}"] + guarded()
        return _done(gm, log, compile_whole(gm, example_inputs, dense, mode))

    def unfused(why: str):  # after detect_embeddings: the lookups read their inputs again
        log = [line for line in ctx.log if not line.startswith("ran ")] + [f"backend: lookups left unfused: {why}"]
        _as_inputs(gm, where)
        log += guarded()
        return _done(gm, log, compile_dense(gm, dense, mode, log).forward)

    tables = _lookup_tables(gm, example_inputs)
    if not tables:
        return whole("backend: no embedding lookup reads a parameter in this graph (a lookup dynamo ran "
                     "outside its graphs, at a graph break, runs as the model wrote it: "
                     "torch._dynamo.explain(model)(*inputs) shows the breaks)")
    quantize = opts.get("weight_dtype") is not None
    wants_grad = torch.is_grad_enabled() and any(p.requires_grad for _, p in tables.values())
    if wants_grad and quantize:
        return whole("backend: lookups left unfused: weight_dtype quantizes for inference, and this graph "
                     "wants the tables' gradients (compile under torch.no_grad())")
    if wants_grad and opts.get("sparse_optimizer") is None:
        return whole("backend: lookups left unfused: the tables want gradients and no sparse_optimizer was "
                     "given (options={'sparse_optimizer': fxrec.optim...} trains them inside backward)")
    params, where = _as_attributes(gm, tables)
    sparse = _for_graph(opts.get("sparse_optimizer"), list(params)) if wants_grad else None
    ctx = PassContext(example_inputs=_concrete(gm, example_inputs), options={
        "inference": not wants_grad, "sparse_optimizer": sparse,
        "kernel": opts.get("kernel"), "weight_dtype": opts.get("weight_dtype"),
        "output_dtype": opts.get("output_dtype"), "bounds_check": opts.get("bounds_check", True)})
    try:
        gm = run_passes(gm, ctx, until="group_tables")  # the runner's passes, in its order, up to the groups
    except PassError as e:
        if not isinstance(e.__cause__, ExampleIdError):
            raise
        _as_given(gm, where)  # for the compile on a valid batch
        if not defer:
            raise
        return _OnValidIds(gm, options, mode)
    if wants_grad:  # frozen tables (requires_grad=False) are read, not trained
        ctx.options["sparse_optimizer"] = freeze(ctx.options["sparse_optimizer"], gm.meta[L.FROZEN_TABLES])
    idle = None if quantize or wants_grad else _nothing_to_gain(gm, ctx, params, opts)
    if idle is not None:
        return unfused(idle)
    conflict = None if quantize else _grouping_conflict(gm, ctx, params)
    if conflict is not None and wants_grad:
        # Read unfused, the tables would get .grad and the user's optimizer would train them
        # beside the sparse optimizer: not what eager training with one optimizer computes.
        raise ValueError(f"torch.compile(backend='fxrec'): {conflict.split('; ')[0]}. With a sparse_optimizer "
                         f"every read of a table must be fused in one graph: remove the graph break between its "
                         f"lookups (a print, .item(), data-dependent branch; see torch._dynamo.explain), or "
                         f"train with fxrec.shard, which captures the whole model, or without a sparse_optimizer")
    if conflict is not None:
        return unfused(conflict)
    if isinstance(opts.get("weight_dtype"), Mapping):  # each graph quantizes its own tables
        ctx.options["weight_dtype"] = {t: w for t, w in opts["weight_dtype"].items() if t in ctx.tables}
        others = sorted(set(opts["weight_dtype"]) - set(ctx.tables))
        if others:
            log.append(f"backend: weight_dtype names table(s) {others} this graph does not look up (another graph "
                       f"of the model may; the tables here are {list(ctx.tables)})")
    passes = [("fuse_lookups", fuse_lookups_pass)] + ([("quantize_tables", quantize_tables_pass)] if quantize else [])
    out = run_passes(gm, ctx, passes=passes)
    log += [line for line in ctx.log if not line.startswith("ran ")]
    if quantize:
        run = compile_dense(out, dense, mode, log)
        return _done(out, log, _Refreshing(out, params, where, run))
    slots = _share_storage(out, params, where, log)
    return _done(out, log, _Rebinding(out, slots, params, compile_dense(out, dense, mode, log).forward))
