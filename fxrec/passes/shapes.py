"""Running a graph on its example batch: shapes, dtypes and evaluated arguments.

`run_example` interprets a GraphModule on the example inputs without side effects on the
model and leaves in every node's meta torch's ``tensor_meta`` (tensor values) and
fxrec's SHAPE: a `TensorSpec`, a `SparseSpec` for KeyedJaggedTensor / JaggedTensor /
KeyedTensor values, a tuple or dict of these for containers, else the value's type
name. Passes use its hook to see the concrete inputs of chosen nodes (detect_embeddings
measures pooling factors this way).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxrec.passes import lookup as L
from fxrec.sparse_checks import out_of_range_id

_DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                torch.uint8: "u8", torch.bool: "b8"}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        short = _DTYPE_SHORT.get(self.dtype, str(self.dtype).replace("torch.", ""))
        return f"{short}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class SparseSpec:
    """A KeyedJaggedTensor / JaggedTensor / KeyedTensor value: its type, keys, tensors."""

    type: str
    keys: tuple[str, ...]
    tensors: tuple[tuple[str, TensorSpec], ...]

    def __str__(self) -> str:
        parts = [f"keys={list(self.keys)}"] if self.keys else []
        parts += [f"{name}={spec}" for name, spec in self.tensors]
        return f"{self.type}({', '.join(parts)})"


def describe(value: Any) -> Any:
    """The plain-data description stored in ``node.meta[SHAPE]``."""
    from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
    if isinstance(value, Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, KeyedTensor):
        return SparseSpec("KeyedTensor", tuple(value.keys()), (("values", describe(value.values())),))
    if isinstance(value, (KeyedJaggedTensor, JaggedTensor)):
        keys = tuple(value.keys()) if isinstance(value, KeyedJaggedTensor) else ()
        tensors = {"values": value.values(), "lengths": value.lengths(), "weights": value.weights_or_none()}
        return SparseSpec(type(value).__name__, keys,
                          tuple((n, describe(t)) for n, t in tensors.items() if t is not None))
    if isinstance(value, (list, tuple)):
        return tuple(describe(v) for v in value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return type(value).__name__


def format_spec(spec: Any) -> str:
    if isinstance(spec, tuple):
        return "(" + ", ".join(format_spec(s) for s in spec) + ")"
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {format_spec(v)}" for k, v in spec.items()) + "}"
    return str(spec)


# ------------------------------------------------------------------ running on the example
@contextlib.contextmanager
def _no_side_effects(module: nn.Module):
    """Run without autograd, without advancing the RNG, and with every buffer (batch-norm
    statistics, counters) and every parameter the run may write (`_written_parameters`)
    restored afterwards: capturing must not change the model."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    params = _written_parameters(module) if isinstance(module, torch.fx.GraphModule) else []
    saved_params = [(p, p.detach().clone()) for p in params]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    from fxrec.managed_collision import no_profiling  # their Python state is not a buffer
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), no_profiling():
            yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved and b.shape == saved[name].shape:
                    b.copy_(saved[name])
            for p, old in saved_params:
                p.copy_(old)


def _written_parameters(gm: torch.fx.GraphModule) -> list[Tensor]:
    """The parameters a run of `gm` may write in place, found without copying the others
    (tables are large): the weights of nn.Embedding / nn.EmbeddingBag modules with max_norm
    (their forward renormalises the rows it reads), the weights F.embedding / F.embedding_bag
    read with a max_norm, and every parameter a tensor the graph writes in place may share
    storage with (``self.w.data.ravel().clamp_(...)``)."""
    from fxrec.passes.guard_inplace import _Families, writes
    from fxrec.passes.hoist_inputs import _may_share
    found = {id(m.weight): m.weight for m in gm.modules()
             if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None}
    by_node = {n: writes(gm, n) for n in gm.graph.nodes}
    targets = [t for written in by_node.values() for t in written]
    for node in gm.graph.nodes:
        weight = L.functional_arg(node, "weight") if L.renormalising_call(node) else None
        if isinstance(weight, torch.fx.Node):
            targets.append(weight)
    if not targets:
        return list(found.values())
    # guard_inplace's alias lists name the views they know (not .ravel(), split_with_sizes,
    # torch.unflatten ...): a write through a view they miss would change the user's model. So
    # hoist_inputs' conservative rule: only a lookup or arithmetic known to return a new tensor
    # keeps a write away from what it read; a parameter joins the writes' families otherwise
    family = _Families(gm, by_node, shares=_may_share)
    hit = {family.find(t) for t in targets}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and family.find(node) in hit:
            value = L.fetch_attr(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                found[id(value)] = value
    return list(found.values())


def _record(n: torch.fx.Node, result: Any) -> None:
    found = False

    def tensor_meta(obj):
        nonlocal found
        if isinstance(obj, Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = map_aggregate(result, tensor_meta)
    if found:
        n.meta["tensor_meta"] = meta
    n.meta["type"] = type(result)
    n.meta[L.SHAPE] = describe(result)


def _any_meta(tree: Any) -> bool:
    return any(isinstance(t, Tensor) and t.is_meta for t in pytree.tree_leaves(tree))


def _to_meta(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, Tensor) else t, tree)


def _meta_collection(mod: nn.Module, kjt) -> Any:
    """What an EBC / EC with meta tables returns, built from the (real) KJT's sizes on the
    KJT's device (`_lookup_device`): its lookups would need the table data, but only
    shapes are wanted."""
    from fxrec.modules import EmbeddingBagCollection, embedding_names, output_dtype
    from fxrec.sparse import JaggedTensor, KeyedTensor
    device = _lookup_device(kjt.values())
    if isinstance(mod, EmbeddingBagCollection):
        configs = mod.embedding_bag_configs()
        keys = [k for names in embedding_names(configs) for k in names]
        dims = [c.embedding_dim for c in configs for _ in c.feature_names]
        # the dtype the collection returns (half-precision tables give float32), promoted over tables
        dtype = functools.reduce(torch.promote_types, [output_dtype(c.dtype) for c in configs], torch.float32)
        return KeyedTensor(keys, dims, torch.zeros(kjt.stride(), sum(dims), dtype=dtype, device=device))
    configs = mod.embedding_configs()
    return {k: JaggedTensor(torch.zeros(kjt[f].values().numel(), c.embedding_dim, dtype=output_dtype(c.dtype),
                                        device=device), lengths=kjt[f].lengths(), validate=False)
            for c, keys in zip(configs, embedding_names(configs)) for f, k in zip(c.feature_names, keys)}


# ------------------------------------------------------------------ lookups on meta tables
# Functional / aten lookups: where their ids and their table sit, as (position, keyword).
_aten = torch.ops.aten
_AT_INPUT_WEIGHT = ((0, "input"), (1, "weight"))      # F.embedding*(input, weight, ...)
_AT_INDICES_WEIGHT = ((1, "indices"), (0, "weight"))  # aten.*embedding*(weight, indices, ...)
_FUNCTIONAL_LOOKUPS = {
    F.embedding: _AT_INPUT_WEIGHT, F.embedding_bag: _AT_INPUT_WEIGHT,
    _aten.embedding.default: _AT_INDICES_WEIGHT, _aten.embedding_bag.default: _AT_INDICES_WEIGHT,
    _aten.embedding_bag.padding_idx: _AT_INDICES_WEIGHT, _aten._embedding_bag.default: _AT_INDICES_WEIGHT,
    _aten._embedding_bag_forward_only.default: _AT_INDICES_WEIGHT,
}


def _pick(args: tuple, kwargs: dict, where: tuple[int, str]) -> Any:
    pos, name = where
    return args[pos] if pos < len(args) else kwargs.get(name)


def _lookup_device(ids: Any) -> torch.device:
    # A lookup's result belongs on the device of its ids: once sharded, each rank's shards
    # live on that rank's device, where its batch (ids and dense features alike) arrives and
    # where the dense layers run. Ids on meta (a fully abstract example) keep it on meta.
    return ids.device if isinstance(ids, Tensor) else torch.device("meta")


def _rehome(result: Any, device: torch.device) -> Any:
    """`result` (computed on meta) as zeros of the same shapes and dtypes on `device`:
    batch-sized, never table-sized. Zeros, not empty memory, so that dense code reading
    them sees finite, repeatable values (only shapes and dtypes are meaningful)."""
    if device.type == "meta":
        return result
    return pytree.tree_map(
        lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device) if isinstance(t, Tensor) and t.is_meta else t,
        result)


def _meta_table_ids(mod_or_target: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """(is a lookup reading a table on meta, its ids) for a module or a call_function target."""
    from fxrec.modules import EmbeddingBagCollection, EmbeddingCollection
    if isinstance(mod_or_target, (EmbeddingBagCollection, EmbeddingCollection)):
        kjt = args[0] if args else next(iter(kwargs.values()), None)
        return any(p.is_meta for p in mod_or_target.parameters()), kjt
    if isinstance(mod_or_target, (nn.Embedding, nn.EmbeddingBag)):
        return mod_or_target.weight.is_meta, _pick(args, kwargs, (0, "input"))
    where = _FUNCTIONAL_LOOKUPS.get(mod_or_target) if not isinstance(mod_or_target, nn.Module) else None
    if where is None:
        return False, None
    weight = _pick(args, kwargs, where[1])
    return isinstance(weight, Tensor) and weight.is_meta, _pick(args, kwargs, where[0])


class ExampleIdError(ValueError):
    """An id of the example inputs outside its table: the example is wrong, not the model
    or its capture (raised before the lookup would fail with torch's index error)."""


def _check_example_ids(n: torch.fx.Node, mod_or_target: Any, args: tuple, kwargs: dict) -> None:
    if isinstance(mod_or_target, (nn.Embedding, nn.EmbeddingBag)):
        ids, rows, table = _pick(args, kwargs, (0, "input")), mod_or_target.num_embeddings, str(n.target)
    else:
        where = _FUNCTIONAL_LOOKUPS.get(mod_or_target) if not isinstance(mod_or_target, nn.Module) else None
        weight = _pick(args, kwargs, where[1]) if where is not None else None
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return
        ids, rows = _pick(args, kwargs, where[0]), weight.shape[0]
        node = _pick(n.args, n.kwargs, where[1])
        table = str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else f"%{n.name}"
    if not isinstance(ids, Tensor) or ids.is_meta or ids.is_floating_point():
        return
    bad = out_of_range_id(ids, rows)
    if bad is not None:
        raise ExampleIdError(f"table {table!r} (lookup %{n.name}): id {bad} outside [0, {rows}) in the example inputs")


class _Recorder(torch.fx.Interpreter):
    """Like torch's ShapeProp (same ``tensor_meta``), plus SHAPE and a hook, without
    ShapeProp's printing of tracebacks. A model whose tables (or all of whose weights) are
    on the meta device runs too, with no table ever materialised:
    - a lookup reading a meta table runs on meta and its result is re-homed to its ids'
      device (`_rehome`), so dense layers on a real device can consume it;
    - any other node with a meta input, or a module with meta weights, runs on meta copies
      of its arguments (a fully-meta model stays on meta after its lookups).
    Ids stay real up to the lookups, so the hook sees them; an id outside its table raises
    ExampleIdError naming the table, before torch's own index error."""

    def __init__(self, gm, on_node):
        super().__init__(gm)
        self._on_node = on_node

    def run_node(self, n):
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = self._run(n, args, kwargs)
        _record(n, result)
        if self._on_node is not None:
            self._on_node(n, args, kwargs, result)
        return result

    def _run(self, n, args, kwargs):
        if n.op in ("call_module", "call_function"):
            _check_example_ids(n, self.fetch_attr(n.target) if n.op == "call_module" else n.target, args, kwargs)
        if n.op == "call_module":
            mod = self.fetch_attr(n.target)
            on_meta, ids = _meta_table_ids(mod, args, kwargs)
            if on_meta:
                from fxrec.modules import EmbeddingBagCollection, EmbeddingCollection
                if isinstance(mod, (EmbeddingBagCollection, EmbeddingCollection)):
                    return _meta_collection(mod, ids)
                meta_args, meta_kwargs = _to_meta((args, kwargs))
                return _rehome(self.call_module(n.target, meta_args, meta_kwargs), _lookup_device(ids))
            if any(t.is_meta for t in itertools.chain(mod.parameters(), mod.buffers())):
                args, kwargs = _to_meta((args, kwargs))
        elif n.op == "call_function" and getattr(n.target, "takes_meta_weights", False):
            pass  # keeps the batch real: the ids it passes on are sampled by detect_embeddings
        elif n.op in ("call_function", "call_method") and _any_meta((args, kwargs)):
            on_meta, ids = _meta_table_ids(n.target, args, kwargs) if n.op == "call_function" else (False, None)
            args, kwargs = _to_meta((args, kwargs))
            if on_meta:
                return _rehome(self.call_function(n.target, args, kwargs), _lookup_device(ids))
        return getattr(self, n.op)(n.target, args, kwargs)


def run_example(gm: torch.fx.GraphModule, example_inputs: tuple,
                on_node: Optional[Callable[[torch.fx.Node, tuple, dict, Any], None]] = None) -> Any:
    """Interpret `gm` on `example_inputs` without side effects, refreshing each node's
    SHAPE and ``tensor_meta`` and calling ``on_node(node, args, kwargs, result)`` with
    the evaluated (real) arguments; returns the graph's output (meta tensors where the
    model's weights are on the meta device). The inputs are copies: a model that writes its
    inputs in place (``x.add_(1)``) leaves the caller's example as it was, however many
    passes run it."""
    from fxrec.passes.guard_inplace import snapshot

    with _no_side_effects(gm):
        return _Recorder(gm, on_node).run(*snapshot(tuple(example_inputs)))
