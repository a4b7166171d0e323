"""The lookups a rank runs on its own tables: its shards, and replicated (data_parallel) tables.

`LocalLookup` serves this rank's shards of a unit with `fxrec.lowering.FusedEmbeddingBags`
(one pooled, one unpooled), whose backward applies the sparse optimizer to the touched rows.
The gradient those kernels see is the sum over every rank's samples; the unsharded model,
trained on the global batch with the loss averaged over it, sees 1/W of that (dense
gradients are averaged across ranks the same way), so the kernels' input is scaled by 1/W
in backward (here, or with ``scale_outputs=False`` by the caller: apply_plan folds it into
the backward of `OutputPrep`, which writes every gradient element once anyway), and the
per-sample-weight gradient, which belongs to the sample's own rank, is scaled back by W.

`ReplicatedLookup` serves data_parallel tables: each rank looks up its own batch in its full
replica; in backward the replicas' dense gradients (and a touched-row count) are summed
over ranks with one all-reduce, divided by W, and the optimizer updates the touched rows,
so replicas stay equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.lowering.layout import TBELayout
from fxrec.lowering.sparse_update import init_state
from fxrec.lowering.tbe import AfterBackward, FusedEmbeddingBags, trains_now
from fxrec.lowering.torch_ref import apply_update, compute_dtype
from fxrec.optim import for_table
from fxrec.passes.shard_ops import SlotInput, SlotSpec
from fxrec.runtime import comm

__all__ = ["LocalLookup", "ReplicatedLookup", "FusedGroups", "scale_grad", "shard_pieces", "state_pieces"]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: Optional[Tensor], scale: float) -> Optional[Tensor]:
    """Identity forward; multiplies the gradient by `scale` in backward."""
    if x is None or scale == 1.0 or not torch.is_grad_enabled():
        return x
    return _ScaleGrad.apply(x, scale)


@dataclass(frozen=True)
class _Table:  # what FusedEmbeddingBags reads from a table spec
    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: str
    dtype: torch.dtype


def _table_slices(indices: Tensor, offsets: Tensor, psw: Optional[Tensor], tables: list[int], B: int,
                  bounds: list[int]):
    """The TBE inputs (indices, offsets, weights) of `tables` (positions among the tables of
    table-major `offsets`, B bags each; table t's ids are ``bounds[t]:bounds[t + 1]``), in
    that order."""
    if B == 0:
        return indices[:0], offsets[:1], None if psw is None else psw[:0]
    a, b = tables[0], tables[-1] + 1
    if tables == list(range(a, b)):  # contiguous (the usual case: shards are ordered by group)
        idx = indices[bounds[a]:bounds[b]]
        return idx, offsets[a * B:b * B + 1] - bounds[a], None if psw is None else psw[bounds[a]:bounds[b]]
    idx = torch.cat([indices[bounds[t]:bounds[t + 1]] for t in tables])
    offs, run = [], 0
    for t in tables:
        offs.append(offsets[t * B:(t + 1) * B] - (bounds[t] - run))
        run += bounds[t + 1] - bounds[t]
    offs.append(offsets.new_full((1,), run))
    w = None if psw is None else torch.cat([psw[bounds[t]:bounds[t + 1]] for t in tables])
    return idx, torch.cat(offs), w


class FusedGroups(nn.Module):
    """Tables of several sparse optimizer configurations (`fxrec.optim.PerTable`) or dtypes
    served as one `FusedEmbeddingBags` over all of them would be: one fused module per
    (configuration, dtype) (`parts`, holding the tables at positions ``members[i]``), the
    same inputs and output layout (pooled ``B x sum(dims)``, or the flat unpooled one) in the
    tables' order. Parts of different dtypes give an output in the dtype they promote to
    (as torch.cat does; exact, a widening); each table's values are its own dtype's."""

    def __init__(self, parts: list[FusedEmbeddingBags], members: list[list[int]], dims: list[int], pooled: bool):
        super().__init__()
        self.parts, self.members, self.pooled = nn.ModuleList(parts), [list(m) for m in members], pooled
        self.dims, self.num_tables = list(dims), len(dims)
        order = [t for m in self.members for t in m]  # table positions, part after part
        self._in_order = order == list(range(self.num_tables))
        if pooled and not self._in_order:  # output column c of the concatenation -> its place
            starts = [sum(self.dims[:t]) for t in range(self.num_tables)]
            cols = [c for t in order for c in range(starts[t], starts[t] + self.dims[t])]
            self.register_buffer("_cols", torch.argsort(torch.tensor(cols)), persistent=False)

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor] = None, **hang):
        outs = []
        B = (offsets.numel() - 1) // self.num_tables
        bounds = offsets[::B].tolist() if B > 0 else []  # one host sync for every part
        for part, members in zip(self.parts, self.members):
            idx, off, w = _table_slices(indices, offsets, per_sample_weights, members, B, bounds)
            outs.append(part(idx, off, w, **hang) if self.pooled else part(idx, off, **hang))
        if self.pooled:
            out = torch.cat(outs, dim=1)
            return out if self._in_order else out.index_select(1, self._cols.to(out.device))
        if self._in_order:
            return torch.cat(outs)
        # unpooled: each part's flat output holds its tables one after another; put them in order
        counts = (offsets[1:] - offsets[:-1]).view(self.num_tables, -1).sum(1).tolist()
        blocks: dict = {}
        for out, members in zip(outs, self.members):
            for t, block in zip(members, out.split([counts[t] * self.dims[t] for t in members])):
                blocks[t] = block
        return torch.cat([blocks[t] for t in range(self.num_tables)])

    def fused_modules(self) -> list[FusedEmbeddingBags]:
        return list(self.parts)


@eager_under_dynamo
class LocalLookup(nn.Module):
    """forward(pooled indices, offsets, weights, unpooled indices, offsets) -> (pooled
    ``B x sum(shard widths)`` or None, list of unpooled ``rows x width`` per shard).

    shards: this rank's `LocalShard`s (pooled first); `init(key)` its initial values, called
    once per shard while the fused tables are filled, so that at most one shard's values
    exist beside the fused storage (not a second copy of every table on the rank).
    dtype: the tables' dtype, or table name -> its dtype; each table is stored and trained
    in its own (tables of different dtypes get fused modules of their own: `FusedGroups`,
    whose outputs are in the dtype they promote to).
    scale_outputs: scale the outputs' gradients by 1/world_size here; False when the
    consumer of the outputs scales their gradients itself (module doc)."""

    def __init__(self, shards, optimizer, world_size: int, dtype: Union[torch.dtype, Mapping[str, torch.dtype]],
                 device, init: Callable[[str], Tensor], scale_outputs: bool = True):
        super().__init__()
        self.world_size, self.scale_outputs = world_size, scale_outputs
        of = dtype.__getitem__ if isinstance(dtype, Mapping) else lambda table: dtype
        pooled = [(s, _Table(s.key, s.num_rows, s.num_cols, "sum", of(s.table))) for s in shards if s.pooled]
        unpooled = [(s, _Table(s.key, s.num_rows, s.num_cols, "none", of(s.table))) for s in shards if not s.pooled]
        self.pooled = self._fused(pooled, optimizer, device, init, True)
        self.unpooled = self._fused(unpooled, optimizer, device, init, False)

    @staticmethod
    def _fused(tables, optimizer, device, init, pooled: bool):
        """One FusedEmbeddingBags, or a FusedGroups of one per (optimizer configuration,
        dtype): each table is stored, trained and served in its own dtype."""
        if not tables:
            return None
        configs: dict = {}  # (configuration, dtype) -> positions of its tables
        for pos, (shard, spec) in enumerate(tables):
            configs.setdefault((for_table(optimizer, shard.table), spec.dtype), []).append(pos)
        parts = []
        for (config, _), members in configs.items():
            specs = [tables[p][1] for p in members]
            # Uninitialised storage, filled shard by shard: the user's RNG stream is left alone
            # (each rank builds different shards) and no shard is drawn twice.
            fused = FusedEmbeddingBags(specs, optimizer=config, device=device, bounds_check=False, initialize=False)
            for t in specs:
                fused.load_table(t.name, init(t.name))
            parts.append(fused)
        if len(parts) == 1:
            return parts[0]
        return FusedGroups(parts, list(configs.values()), [t.embedding_dim for _, t in tables], pooled)

    def forward(self, p_idx, p_off, p_psw, u_idx, u_off, sync=None):
        """sync: a `fxrec.runtime.row_sync.RowSyncState` that takes over the split tables'
        updates (None: the fused modules update their tables themselves)."""
        inv = 1.0 / self.world_size if self.scale_outputs else 1.0
        hang = {} if sync is None else dict(anchor=sync.token, update_hook=sync.hook)
        p_out = None
        if self.pooled is not None:
            p_psw = scale_grad(p_psw, float(self.world_size)) if p_psw is not None else None
            p_out = scale_grad(self.pooled(p_idx, p_off, p_psw, **hang), inv)
        u_out = []
        if self.unpooled is not None:
            flat = scale_grad(self.unpooled(u_idx, u_off, **hang), inv)
            counts = (u_off[1:] - u_off[:-1]).tolist()
            widths = self.unpooled.dims if isinstance(self.unpooled, FusedGroups) else self.unpooled.layout.dims
            u_out = [b.view(n, w) for b, n, w in zip(flat.split([n * w for n, w in zip(counts, widths)]),
                                                     counts, widths)]
        return p_out, u_out

    def fused_modules(self) -> list[FusedEmbeddingBags]:
        out = []
        for m in (self.pooled, self.unpooled):
            if m is not None:
                out += m.fused_modules() if isinstance(m, FusedGroups) else [m]
        return out

    def shard_weights(self) -> dict[str, Tensor]:
        """Shard key -> ``rows x width`` view of its live weights."""
        out = {}
        for m in self.fused_modules():
            out.update(m.table_weights())
        return out

    def shard_state(self) -> dict[str, dict[str, Tensor]]:
        """Shard key -> its optimizer state (live views, `FusedEmbeddingBags.table_state`)."""
        out = {}
        for m in self.fused_modules():
            out.update(m.table_state())
        return out


class _Replicated(torch.autograd.Function):
    """Forward: every data-parallel slot's lookup. Backward: all-reduce the replicas' grads,
    then update the touched rows (see module doc)."""

    @staticmethod
    def forward(ctx, anchor, owner, inputs, *weights):
        ctx.owner, ctx.inputs, ctx.anchor_node = owner, inputs, anchor.grad_fn
        ctx.save_for_backward(*[w if w is not None else anchor for w in weights])
        return tuple(owner._lookup(inputs, weights))

    @staticmethod
    def backward(ctx, *grads):
        owner, inputs = ctx.owner, ctx.inputs
        weights = [w if w.numel() else None for w in ctx.saved_tensors]
        psw_grads = owner._psw_grads(inputs, grads, weights, ctx.needs_input_grad[3:])
        if trains_now(ctx.anchor_node):  # (every rank asks the same backward: the all-reduce stays matched)
            owner._update_after_backward(inputs, grads, weights)
        return (None, None, None) + tuple(psw_grads)


@eager_under_dynamo
class ReplicatedLookup(nn.Module):
    """forward(inputs of the unit's data-parallel slots) -> their outputs: pooled sums
    ``bags x dim`` for tables served pooled, else rows ``ids x dim``.

    slots: the SlotSpecs, aligned with forward's inputs; `init[table]` the full table.
    dtype: the tables' dtype, or table name -> its dtype (each table keeps its own)."""

    def __init__(self, slots: list[SlotSpec], optimizer, world_size: int,
                 dtype: Union[torch.dtype, Mapping[str, torch.dtype]], device, init: dict, group=None):
        super().__init__()
        self.slots, self.optimizer, self.world_size, self.group = list(slots), optimizer, world_size, group
        self.tables = list(dict.fromkeys(s.table for s in self.slots))
        self._anchor = torch.empty(0, requires_grad=True)
        self._after_backward = AfterBackward()  # this backward's gradient sums: _update_after_backward
        self._state: list[dict] = []
        for i, name in enumerate(self.tables):
            full, dt = init[name], dtype[name] if isinstance(dtype, Mapping) else dtype
            self.register_buffer(f"table{i}", full.detach().to(device=device, dtype=dt).clone())
            spec = _Table(name, full.shape[0], full.shape[1], "none", dt)
            state = init_state(for_table(optimizer, name), TBELayout([spec], device))
            for key, value in state.items():
                if value.numel() == full.numel() and full.shape[0] != full.numel():
                    value = value.view(full.shape[0], full.shape[1])
                self.register_buffer(f"table{i}_{key}", value)
            self._state.append(list(state))

    def table(self, name: str) -> Tensor:
        return getattr(self, f"table{self.tables.index(name)}")

    def _table_state(self, i: int) -> dict:
        return {key: getattr(self, f"table{i}_{key}") for key in self._state[i]}

    def table_state(self) -> dict[str, dict[str, Tensor]]:
        """Table name -> its optimizer state (live buffers), as `FusedEmbeddingBags.table_state`."""
        return {name: self._table_state(i) for i, name in enumerate(self.tables)}

    def _lookup(self, inputs: list[SlotInput], weights) -> list[Tensor]:
        outs = []
        for slot, inp, w in zip(self.slots, inputs, weights):
            table = self.table(slot.table)
            if slot.served_pooled:
                offsets = inp.lengths.cumsum(0) - inp.lengths  # one per bag: none for an empty batch
                outs.append(F.embedding_bag(inp.values, table, offsets, mode="sum", per_sample_weights=w))
            else:
                outs.append(table[inp.values])
        return outs

    def _occurrence_grads(self, slot: SlotSpec, inp: SlotInput, grad: Tensor, w) -> Tensor:
        if not slot.served_pooled:
            return grad
        bag = torch.repeat_interleave(torch.arange(inp.lengths.numel(), device=grad.device), inp.lengths,
                                      output_size=inp.values.numel())
        g = grad[bag]
        return g * w.unsqueeze(1).to(g.dtype) if w is not None else g

    def _psw_grads(self, inputs, grads, weights, needs) -> list[Optional[Tensor]]:
        out = []
        for slot, inp, g, w, need in zip(self.slots, inputs, grads, weights, needs):
            if not need:
                out.append(None)
                continue
            occ = self._occurrence_grads(slot, inp, g, None)
            out.append((occ * self.table(slot.table)[inp.values].to(occ.dtype)).sum(1))
        return out

    @torch.no_grad()
    def _update_after_backward(self, inputs, grads, weights) -> None:
        """Add this call's gradients to the running backward's sums; `_update` runs once that
        backward is done, with every call of this module it went through (a model called
        twice before one backward updates each row once, with its summed gradient, as
        FusedEmbeddingBags.update_after_backward does). Every rank queues it at the same
        point of the same backward, so the all-reduce in it meets the others'."""
        acc = self._after_backward.gather(self._zero_sums, self._update)
        for slot, inp, g, w in zip(self.slots, inputs, grads, weights):
            if g is None:
                continue
            i = self.tables.index(slot.table)
            occ = self._occurrence_grads(slot, inp, g, w).to(acc[i].dtype)
            occ = torch.cat([occ, occ.new_ones(occ.shape[0], 1)], dim=1)
            acc[i].index_add_(0, inp.values, occ)

    def _zero_sums(self) -> list[Tensor]:
        """Per table, its dense gradient sum with a touched-count column, zero, in the dtype its
        update computes in (fp32; fp64 for an fp64 table: torch_ref.compute_dtype)."""
        return [torch.zeros(self.table(n).shape[0], self.table(n).shape[1] + 1,
                            dtype=compute_dtype(self.table(n).dtype), device=self.table(n).device)
                for n in self.tables]

    @torch.no_grad()
    def _update(self, acc: list[Tensor]) -> None:
        # One all-reduce: each table's dense grad with a touched-count column (in fp64 when
        # any table is fp64: the others' sums widen exactly and come back to their dtype).
        flat = comm.all_reduce(torch.cat([a.reshape(-1) for a in acc]), "sum", group=self.group)
        for i, (name, a, mine) in enumerate(zip(self.tables, flat.split([a.numel() for a in acc]), acc)):
            a = a.view(-1, self.table(name).shape[1] + 1).to(mine.dtype)
            rows = (a[:, -1] > 0).nonzero().squeeze(1)
            opt = for_table(self.optimizer, name)
            if rows.numel() and opt is not None:
                apply_update(opt, self.table(name), self._table_state(i), rows,
                             a[rows, :-1] / self.world_size)

    def forward(self, inputs: list[SlotInput]) -> list[Tensor]:
        weights = [inp.weights for inp in inputs]
        if torch.is_grad_enabled() and (self.optimizer is not None or any(
                w is not None and w.requires_grad for w in weights)):
            return list(_Replicated.apply(self._anchor.view_as(self._anchor), self, inputs, *weights))
        return self._lookup(inputs, weights)


# ------------------------------------------------------------------ a rank's pieces of its tables
def _pieces(lookups, plan, of_shards, of_replicas) -> dict[str, list[tuple]]:
    """Table -> this rank's ``(rows, cols, value)`` pieces, where `of_shards(LocalLookup)`
    gives ``{shard key: value}`` and `of_replicas(ReplicatedLookup)` ``{table: value}``."""
    out: dict[str, list] = {}
    for m in lookups:
        if isinstance(m, LocalLookup):
            for key, value in of_shards(m).items():
                table, _, idx = key.rpartition("@")
                s = plan[table].shards[int(idx)]
                out.setdefault(table, []).append((tuple(s.rows), tuple(s.cols), value))
        else:
            for name, value in of_replicas(m).items():
                w = m.table(name)
                out.setdefault(name, []).append(((0, w.shape[0]), (0, w.shape[1]), value))
    return out


def shard_pieces(lookups, plan) -> dict[str, list[tuple]]:
    """Table -> this rank's ``(rows, cols, live weight view)`` pieces, over `lookups` (the
    program's LocalLookup / ReplicatedLookup modules) sharded by `plan`."""
    return _pieces(lookups, plan, lambda m: m.shard_weights(), lambda m: {name: m.table(name) for name in m.tables})


def state_pieces(lookups, plan) -> dict[str, list[tuple]]:
    """As `shard_pieces`, each piece's fused optimizer state ``{name: live view}``."""
    return _pieces(lookups, plan, lambda m: m.shard_state(), lambda m: m.table_state())
