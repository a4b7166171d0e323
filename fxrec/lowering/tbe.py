"""`FusedEmbeddingBags`: T tables in one table-batched buffer, looked up by one fused op
and trained by a fused backward + sparse optimizer update.

The layout (flat weights, weights_offsets, D_offsets, input and output formats) is
described in `layout.py`; `TBELayout` is re-exported here. Kernels come from the
registry (`registry.select`): Triton, FBGEMM or torch.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.optim import NAMES, OPTIMIZERS, decay_mode

from . import registry
from .layout import TBELayout, check_devices, check_inputs, in_table_order, packed, table_position
from .sparse_update import ROW_STATE, init_state, merge_calls
from .torch_ref import per_sample_weights_grad

__all__ = ["FusedEmbeddingBags", "TBELayout"]


def trains_now(anchor_node) -> bool:
    """Whether the running backward reaches the tables, whose stand-in in the autograd graph
    is the lookup's anchor (`anchor_node`: its grad_fn, never a leaf's). ``loss.backward()``
    does, and ``backward(inputs=...)`` naming the anchor; ``torch.autograd.grad(loss, [w])``
    asks for other gradients only (a gradient penalty, per-sample weights' gradient) and
    must not step the sparse optimizer, as it steps no torch optimizer."""
    try:
        return torch._C._will_engine_execute_node(anchor_node)
    except (AttributeError, RuntimeError):  # a torch without it: every backward trains
        return True


class AfterBackward:
    """What a module gathers during one backward, to use once that backward is done.
    ``gather(fresh, done)`` returns this backward's collection: the first call in a backward
    makes it (``fresh()``) and queues ``done(collection)`` to run when the backward
    completes; later calls in the same backward return it. ``collection(fresh)`` returns it
    without queueing anything, for a module whose ``done`` runs collectives and so must be
    queued at a point of the backward that every rank reaches in the same order. A
    collection left by a backward that raised before completing is dropped by the next
    backward's first call."""

    def __init__(self):
        self._pending: Optional[list] = None  # [the backward's graph task, its collection, queued]

    def collection(self, fresh: Callable[[], Any]) -> Any:
        task = torch._C._current_graph_task_id()
        if self._pending is None or self._pending[0] != task:
            self._pending = [task, fresh(), False]
        return self._pending[1]

    def gather(self, fresh: Callable[[], Any], done: Callable[[Any], None]) -> Any:
        collected = self.collection(fresh)
        if not self._pending[2]:
            self._pending[2] = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._run(done))
        return collected

    def _run(self, done: Callable[[Any], None]) -> None:
        _, collected, _ = self._pending
        self._pending = None
        done(collected)


class _FusedLookup(torch.autograd.Function):
    """Forward: the fused lookup. Backward: the per-sample-weight gradient if needed (from
    the weights before the update), then, if the owner has an optimizer, the fused update
    of its weights in place (or the caller's `update_hook`, which takes it over); no weight
    gradient is returned. Backpropagating twice through one output updates twice; a backward
    that does not reach the tables (`trains_now`) does not update."""

    @staticmethod
    def forward(ctx, anchor, per_sample_weights, owner, indices, offsets, update_hook):
        ctx.owner, ctx.update_hook, ctx.anchor_node = owner, update_hook, anchor.grad_fn
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return owner._lookup(indices, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets, psw = ctx.saved_tensors
        owner = ctx.owner
        grad_output = grad_output.contiguous()
        psw_grad = None
        if ctx.needs_input_grad[1]:
            psw_grad = per_sample_weights_grad(owner.weights, owner.layout, grad_output, indices, offsets)
            psw_grad = psw_grad.to(psw.dtype)
        if trains_now(ctx.anchor_node):
            if ctx.update_hook is not None:
                ctx.update_hook(owner, grad_output, indices, offsets, psw)
            elif owner.optimizer is not None:
                owner.update_after_backward(grad_output, indices, offsets, psw)
        return None, psw_grad, None, None, None, None


@eager_under_dynamo
class FusedEmbeddingBags(nn.Module):
    """A batch of embedding tables with a fused lookup and fused sparse optimizer.

    tables: objects with ``name, num_embeddings, embedding_dim`` and optionally
    ``pooling`` ("sum"/"mean"; "none" or absent = unpooled) and ``dtype``
    (`fxrec.TableInfo`, `fxrec.EmbeddingBagConfig`, `fxrec.EmbeddingConfig`). All tables
    must be pooled, or all unpooled, and share one dtype (or pass `dtype`).
    optimizer: `fxrec.optim.SGD/RowWiseAdagrad/Adagrad/Adam`, applied inside backward; None
    means the weights are never updated (per-sample weights still get gradients).
    kernel: force "triton", "fbgemm" or "torch" (else FXREC_KERNEL, else the registry's
    first acceptable kernel); a forced kernel that cannot serve raises NoKernelError.
    bounds_check: validate ids and offsets on every call (one host sync; Triton's kernels check
    the ids as they load them).
    deterministic: bit-identical updates run to run (also on when
    torch.are_deterministic_algorithms_enabled()).

    Weights start uniform(-sqrt(1/rows), +sqrt(1/rows)) per table (not on "meta"), or
    uninitialised with ``initialize=False``, for a caller that loads every table right after
    (`load_table`): drawing values only to overwrite them costs a pass over every row.
    """

    def __init__(self, tables: Sequence, optimizer=None, kernel: Optional[str] = None, device=None,
                 dtype: Optional[torch.dtype] = None, bounds_check: bool = True,
                 deterministic: bool = False, initialize: bool = True):
        super().__init__()
        if optimizer is not None and not isinstance(optimizer, OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {NAMES}, got {optimizer!r}")
        self.layout = TBELayout(tables, device)
        dtype = dtype if dtype is not None else _common_dtype(tables)
        self.register_buffer("weights", torch.empty(self.layout.numel, dtype=dtype, device=self.layout.device))
        self._optimizer = optimizer
        self.state_keys = tuple(init_state(optimizer, self.layout, "meta"))
        for key, value in init_state(optimizer, self.layout).items():
            self.register_buffer(f"optimizer_{key}", value)
        self.kernel_request = kernel
        self.bounds_check = bounds_check
        self.deterministic = deterministic
        self.kernels: dict[str, str] = {}
        self._impls: dict[tuple, tuple[str, object]] = {}
        # Autograd needs an input that requires grad to call our backward; the weights
        # are a buffer (they get no gradient), so this empty tensor stands in.
        self._anchor = torch.empty(0, requires_grad=True)
        self._after_backward = AfterBackward()  # this backward's lookup calls: update_after_backward
        if initialize and self.weights.device.type != "meta":
            with torch.no_grad():
                for table in self.split_weights():
                    bound = math.sqrt(1.0 / table.shape[0])
                    table.uniform_(-bound, bound)
        # Select now so that a forced kernel that cannot serve fails at construction; not on
        # meta, where nothing runs (`fxrec dump`'s shards, inference's float stand-ins): their
        # kernels are recorded for the device they are meant for (fused_group.kernel_record).
        if self.weights.device.type != "meta":
            self._select(self._lookup_op, torch.int64, False)
            if optimizer is not None:
                self._select("backward_update", torch.int64, False)

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value) -> None:
        """Swap in a config of the same type (e.g. a new lr); the state is kept."""
        if type(value) is not type(self._optimizer):
            raise ValueError(f"optimizer must stay a {type(self._optimizer).__name__} (its state is "
                             f"allocated), got {value!r}; build a new FusedEmbeddingBags instead")
        self._optimizer = value

    # -- kernels -----------------------------------------------------------------
    @property
    def _lookup_op(self) -> str:
        return "pooled_forward" if self.layout.pooled else "unpooled_forward"

    @property
    def kernel(self) -> str:
        """Name of the kernel serving the lookup (see `.kernels` for every op)."""
        return self.kernels[self._lookup_op]

    def _is_deterministic(self) -> bool:
        return self.deterministic or torch.are_deterministic_algorithms_enabled()

    def _select(self, op: str, index_dtype: torch.dtype, weighted: bool):
        det = self._is_deterministic()
        threads = torch.get_num_threads()
        key = (op, index_dtype, weighted, det, self.weights.device.type, threads, os.environ.get(registry.ENV_VAR))
        if key not in self._impls:
            self._impls[key] = registry.select(
                op, kernel=self.kernel_request, device=self.weights.device, weight_dtype=self.weights.dtype,
                index_dtype=index_dtype, dims=self.layout.dims, poolings=self.layout.poolings,
                optimizer=self.optimizer.name if (op == "backward_update" and self.optimizer) else None,
                weight_decay=decay_mode(self.optimizer) if op == "backward_update" else 0,
                weighted=weighted, deterministic=det, threads=threads)
        name, impl = self._impls[key]
        self.kernels[op] = name
        return impl

    # -- forward / backward --------------------------------------------------------
    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor] = None,
                anchor: Optional[Tensor] = None, update_hook=None) -> Tensor:
        """Pooled: ``B x sum(dims)`` (KeyedTensor layout); unpooled: the flat layout
        (`layout.split_unpooled`). See layout.py for the input format.

        anchor: a tensor that requires grad for the backward to hang from (default: an empty
        one of this module); a caller passes its own to run code after this backward.
        update_hook: ``hook(self, grad_output, indices, offsets, per_sample_weights)`` called in
        backward instead of the fused update (it may call `update` itself)."""
        check_devices(self.weights.device, indices=indices, offsets=offsets, per_sample_weights=per_sample_weights)
        indices, offsets, per_sample_weights = packed(indices, offsets, per_sample_weights)
        if self.layout.device != self.weights.device:  # the module was moved with .to()
            self.layout = self.layout.to(self.weights.device)
        check_inputs(self.layout, indices, offsets, per_sample_weights,
                     self.bounds_check and not self._kernel_checks(indices, per_sample_weights))
        psw_grad = per_sample_weights is not None and per_sample_weights.requires_grad
        if torch.is_grad_enabled() and (self.optimizer is not None or psw_grad or update_hook is not None):
            anchor = self._anchor if anchor is None else anchor
            if anchor.grad_fn is None:  # a leaf: a node of its own, that backward can be asked about
                anchor = anchor.view_as(anchor)
            return _FusedLookup.apply(anchor, per_sample_weights, self, indices, offsets, update_hook)
        return self._lookup(indices, offsets, per_sample_weights)

    def _kernel_checks(self, indices: Tensor, psw: Optional[Tensor]) -> bool:
        """True when the lookup's kernel checks the ids as it loads them (its impl's
        `checks_ids`: Triton's), so that `check_inputs` leaves the values to it: on a GPU a
        separate check read every id again and cost about as much as the lookup."""
        if indices.dtype not in (torch.int32, torch.int64) or indices.device.type == "meta":
            return False  # check_inputs names the bad dtype; nothing runs on meta
        return getattr(self._select(self._lookup_op, indices.dtype, psw is not None), "checks_ids", False)

    def _lookup(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor]) -> Tensor:
        impl = self._select(self._lookup_op, indices.dtype, psw is not None)
        kw = {"check_ids": True} if self.bounds_check and getattr(impl, "checks_ids", False) else {}
        if self.layout.pooled:
            return impl(self.weights, self.layout, indices, offsets, psw, **kw)
        return impl(self.weights, self.layout, indices, offsets, **kw)

    def update_after_backward(self, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                              psw: Optional[Tensor]) -> None:
        """`update` once the running backward is done, with every lookup of this module it
        backpropagated through (`merge_calls`): a row two calls touched (a graph that dynamo
        broke around each feature of a shared table, a model called twice before one
        backward) is updated once, with its summed gradient, as an optimizer step after
        backward would; updating per call would apply RowWiseAdagrad and Adam twice."""
        self._after_backward.gather(list, self._update_calls).append((grad_output, indices, offsets, psw))

    def _update_calls(self, calls: list) -> None:
        self.update(*merge_calls(self.layout, calls))

    def update(self, grad_output: Tensor, indices: Tensor, offsets: Tensor, psw: Optional[Tensor]) -> None:
        """The fused backward + optimizer update of the rows `indices` touched, in place."""
        grad_output, indices, offsets, psw = packed(grad_output, indices, offsets, psw)
        impl = self._select("backward_update", indices.dtype, psw is not None)
        impl(self.weights, self.optimizer_state(), self.layout, self.optimizer, grad_output,
             indices, offsets, psw, self._is_deterministic())
        # fbgemm's ops write the buffer without bumping its version counter; whoever keeps
        # a copy of the tables (the compile backend's quantized serving copy) reads it to
        # know they changed
        torch.autograd.graph.increment_version(self.weights)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) cast the weights; optimizer state stays fp32/int32 (moved only).
        saved = self.optimizer_state()
        super()._apply(fn, recurse)
        for key, before in saved.items():
            after = getattr(self, f"optimizer_{key}")
            if after.dtype != before.dtype:
                setattr(self, f"optimizer_{key}", before.to(after.device))
        return self

    # -- weights and state ---------------------------------------------------------
    def optimizer_state(self) -> dict[str, Tensor]:
        """The flat state tensors (see sparse_update.init_state), by key; live buffers."""
        return {key: getattr(self, f"optimizer_{key}") for key in self.state_keys}

    def split_weights(self) -> list[Tensor]:
        """Per-table ``rows x dim`` views into the flat buffer (writes go through)."""
        return self.layout.split(self.weights)

    def table_weights(self) -> dict[str, Tensor]:
        """Table name -> ``rows x dim`` view (export)."""
        return dict(zip(self.layout.names, self.split_weights()))

    def table_state(self) -> dict[str, dict[str, Tensor]]:
        """Table name -> its slice of each optimizer state tensor (views)."""
        out = {}
        for t, name in enumerate(self.layout.names):
            h0, h1 = self.layout.hash_size_cumsum_list[t], self.layout.hash_size_cumsum_list[t + 1]
            out[name] = {k: v[h0:h1] if k in ROW_STATE else self.layout.split(v)[t]
                         for k, v in self.optimizer_state().items()}
        return out

    @torch.no_grad()
    def load_tables(self, weights: Union[Mapping[str, Tensor], Sequence[Tensor]]) -> None:
        """Copy per-table weights in (by table name, or a sequence in table order)."""
        for name, src in zip(self.layout.names, in_table_order(self.layout.names, weights, "weights")):
            self.load_table(name, src)

    @torch.no_grad()
    def load_table(self, name: str, weight: Tensor) -> None:
        """Copy one table's ``rows x dim`` weights in (by table name)."""
        dst = self.split_weights()[table_position(self.layout.names, name)]
        if tuple(weight.shape) != tuple(dst.shape):
            raise ValueError(f"table {name!r}: expected weight {tuple(dst.shape)}, got {tuple(weight.shape)}")
        dst.copy_(weight)

    def extra_repr(self) -> str:
        tables = ", ".join(f"{n}:{r}x{d}:{p}" for n, r, d, p in
                           zip(self.layout.names, self.layout.rows, self.layout.dims, self.layout.poolings))
        return f"tables=[{tables}], dtype={self.weights.dtype}, optimizer={self.optimizer}, kernels={self.kernels}"


def _common_dtype(tables: Sequence) -> torch.dtype:
    dtypes = [getattr(t, "dtype", torch.float32) for t in tables]
    for t, d in zip(tables, dtypes):
        if d != dtypes[0]:
            raise ValueError(f"table {t.name!r}: dtype {d} differs from table {tables[0].name!r}'s "
                             f"{dtypes[0]}; pass dtype= to store all tables in one dtype")
    return dtypes[0]
