"""Glue between per-lookup inputs and one fused, table-batched lookup call.

`fuse_lookups` (fxrec/passes/fuse_lookups.py) serves a group of lookups with one
`LocalLookup` (one `FusedEmbeddingBags` for tables served pooled, one for tables served as
rows). Around it:

    GatherInputs (shard_ops: one SlotInput per (lookup, table, feature) slot)
      -> PackInputs  (the slots in the TBE layout: ids table-major, bags padded per table)
      -> LocalLookup (the fused kernel; the sparse optimizer in its backward)
      -> SplitOutputs (one result per slot: pooled sums or looked-up rows)
      [-> FinishOutputs (shard_ops: each lookup's own output: tensor, KeyedTensor, dict of JT)]

Packing: a table served pooled gets the bags of all its slots, in slot order, then empty
bags up to the largest table's bag count (the TBE layout needs one batch size for all
tables; an empty bag sums to zeros and is never read back). A table served as rows gets
all its slots' ids as one "bag". Per-sample weights travel when any pooled slot has them;
the other pooled slots' ids then weigh 1.

`with_kernel` rebuilds a FusedEmbeddingBags forced to one kernel; `kernel_record` says
which kernel the registry picks for each op a FusedEmbeddingBags runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.lowering import registry
from fxrec.lowering.tbe import FusedEmbeddingBags
from fxrec.passes.shard_ops import SlotInput, SlotSpec

__all__ = ["Place", "PackInputs", "SplitOutputs", "with_kernel", "empty_like", "kernel_record"]


@dataclass(frozen=True)
class Place:
    """Where one slot's result lies in the fused output: the pooled output's bags
    ``start:start+count`` of pooled table `table`, or rows ``start:start+count`` of
    unpooled table `table` (positions among the pooled / unpooled tables)."""

    pooled: bool
    table: int
    start: int
    count: int


@eager_under_dynamo
class PackInputs(nn.Module):
    """forward(inputs: list[SlotInput]) -> (pooled indices, offsets, per-sample weights or
    None, unpooled indices, offsets, list[Place]); a pooled or unpooled triple/pair is None
    when no table is served that way.

    specs: the SlotSpecs of the slots to pack; `picks[i]` is the index of spec i's input in
    forward's list (default: all inputs, in order). Tables are ordered by first slot, pooled
    (``served_pooled``) and unpooled apart: `pooled_tables`, `unpooled_tables`."""

    def __init__(self, specs: Sequence[SlotSpec], picks: Optional[Sequence[int]] = None):
        super().__init__()
        self.specs = list(specs)
        self.picks = list(range(len(self.specs))) if picks is None else list(picks)
        if len(self.picks) != len(self.specs):
            raise ValueError(f"PackInputs: {len(self.specs)} slot specs but {len(self.picks)} picks")
        served: dict[str, bool] = {}
        for s in self.specs:
            if served.setdefault(s.table, s.served_pooled) != s.served_pooled:
                raise ValueError(f"table {s.table!r}: served pooled for one slot and as rows for another")
        self.pooled_tables = [t for t, p in served.items() if p]
        self.unpooled_tables = [t for t, p in served.items() if not p]
        # each spec's table position among the pooled or unpooled ones (forward's per-slot loop)
        position = {t: i for i, t in enumerate(self.pooled_tables)} | \
            {t: i for i, t in enumerate(self.unpooled_tables)}
        self._positions = [position[s.table] for s in self.specs]
        dims = {s.table: s.dim for s in self.specs}
        self.pooled_dims = [dims[t] for t in self.pooled_tables]
        self.unpooled_dims = [dims[t] for t in self.unpooled_tables]
        self.weighted = any(s.weighted and s.served_pooled for s in self.specs)

    def forward(self, inputs: list[SlotInput]):
        inputs = [inputs[k] for k in self.picks]
        device = inputs[0].values.device
        P, U = len(self.pooled_tables), len(self.unpooled_tables)
        p_ids: list[list[Tensor]] = [[] for _ in range(P)]
        p_len: list[list[Tensor]] = [[] for _ in range(P)]
        p_w: list[list[Tensor]] = [[] for _ in range(P)]
        u_ids: list[list[Tensor]] = [[] for _ in range(U)]
        p_bags, u_rows, places = [0] * P, [0] * U, []
        for spec, t, inp in zip(self.specs, self._positions, inputs):
            if spec.served_pooled:
                n = inp.lengths.numel()
                places.append(Place(True, t, p_bags[t], n))
                p_bags[t] += n
                p_ids[t].append(inp.values)
                p_len[t].append(inp.lengths)
                if self.weighted:
                    p_w[t].append(inp.weights if inp.weights is not None else
                                  torch.ones(inp.values.numel(), device=device))
            else:
                places.append(Place(False, t, u_rows[t], inp.values.numel()))
                u_rows[t] += inp.values.numel()
                u_ids[t].append(inp.values)
        pooled = self._pooled(p_ids, p_len, p_w, p_bags, device) if P else (None, None, None)
        unpooled = self._unpooled(u_ids, u_rows, device) if U else (None, None)
        return (*pooled, *unpooled, places)

    def _pooled(self, ids, lengths, weights, bags, device):
        batch = max(bags)
        for t, n in enumerate(bags):  # pad every table to one batch size (empty bags)
            if n < batch:
                lengths[t].append(torch.zeros(batch - n, dtype=torch.int64, device=device))
        flat = torch.cat([x.long() for per_table in lengths for x in per_table])
        offsets = torch.cat([flat.new_zeros(1), flat.cumsum(0)])
        indices = torch.cat([x for per_table in ids for x in per_table])
        psw = torch.cat([w for per_table in weights for w in per_table]) if self.weighted else None
        return indices, offsets, psw

    @staticmethod
    def _unpooled(ids, rows, device):
        counts = torch.tensor(rows, dtype=torch.int64, device=device)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return torch.cat([x for per_table in ids for x in per_table]), offsets

    def extra_repr(self) -> str:
        return f"pooled={self.pooled_tables}, unpooled={self.unpooled_tables}, weighted={self.weighted}"


@eager_under_dynamo
class SplitOutputs(nn.Module):
    """forward(places, pooled output ``B x sum(pooled_dims)`` or None, unpooled rows per
    table) -> one tensor per slot: its bags' sums (``count x dim``) or its rows."""

    def __init__(self, pooled_dims: Sequence[int]):
        super().__init__()
        cols = [0]
        for d in pooled_dims:
            cols.append(cols[-1] + int(d))
        self.cols = cols

    def forward(self, places: list[Place], pooled: Optional[Tensor], unpooled: list[Tensor]) -> list[Tensor]:
        # One split into the tables' column blocks, not a 2-D slice per slot: autograd gives a
        # slice's gradient the shape of the sliced tensor, so each slot's backward filled a whole
        # B x sum(dims) tensor with zeros (T tables: T^2 B D work); a split's backward is one cat.
        blocks = pooled.split([b - a for a, b in zip(self.cols, self.cols[1:])], dim=1) \
            if pooled is not None else ()
        out = []
        for p in places:
            if p.pooled:
                block = blocks[p.table]
                out.append(block if p.start == 0 and p.count == block.shape[0] else block[p.start:p.start + p.count])
            else:
                out.append(unpooled[p.table][p.start:p.start + p.count])
        return out


@dataclass(frozen=True)
class _Spec:  # what FusedEmbeddingBags reads from a table
    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: str
    dtype: torch.dtype


@torch.no_grad()
def with_kernel(fused: FusedEmbeddingBags, kernel: str) -> FusedEmbeddingBags:
    """A FusedEmbeddingBags like `fused` (tables, weights, optimizer and its state, device,
    checks) whose kernels are forced to `kernel`; raises `NoKernelError` when that kernel
    cannot serve these tables. The user's RNG stream is left as it was (nothing is drawn).
    A `FusedGroups` gets each of its parts forced, in place."""
    if hasattr(fused, "parts"):
        for i, part in enumerate(fused.parts):
            if part.kernel_request != kernel:
                fused.parts[i] = with_kernel(part, kernel)
        return fused
    new = empty_like(fused, fused.optimizer, kernel)
    new.weights.copy_(fused.weights)
    for key, value in fused.optimizer_state().items():
        new.optimizer_state()[key].copy_(value)
    return new


def empty_like(fused: FusedEmbeddingBags, optimizer, kernel: Optional[str]) -> FusedEmbeddingBags:
    """A FusedEmbeddingBags with `fused`'s tables, dtype, device and checks, trained by
    `optimizer` (fresh state) and served by `kernel` (None: the registry's choice); its
    weights are uninitialised, for the caller to fill."""
    lay = fused.layout
    specs = [_Spec(n, r, d, p, fused.weights.dtype) for n, r, d, p in zip(lay.names, lay.rows, lay.dims, lay.poolings)]
    return FusedEmbeddingBags(specs, optimizer=optimizer, kernel=kernel, device=fused.weights.device,
                              dtype=fused.weights.dtype, bounds_check=fused.bounds_check,
                              deterministic=fused.deterministic, initialize=False)


def kernel_record(fused: FusedEmbeddingBags, weighted: bool = False, device=None) -> dict[str, str]:
    """``{op: kernel}`` for the ops `fused` runs on int64 ids (what PackInputs and apply_plan's
    Unpack feed it): its forward, and ``backward_update`` when it has an optimizer. Chosen
    by the registry as FusedEmbeddingBags chooses: its `kernel_request`, else FXREC_KERNEL
    (as set now), else the first kernel whose checker accepts. `device`: the device to choose
    for (default: the weights'; `fxrec dump` keeps its shards on meta but shows the kernels
    the topology's device would run). A `FusedGroups` (one kernel per sparse optimizer and dtype)
    gives each op's kernels joined by "+", in its parts' order, once each."""
    if hasattr(fused, "parts"):
        merged: dict[str, list[str]] = {}
        for part in fused.parts:
            for op, name in kernel_record(part, weighted, device).items():
                merged.setdefault(op, [])
                if name not in merged[op]:
                    merged[op].append(name)
        return {op: "+".join(names) for op, names in merged.items()}
    pooled = fused.layout.pooled
    problem = dict(device=torch.device(device) if device is not None else fused.weights.device, weight_dtype=fused.weights.dtype, index_dtype=torch.int64,
                   dims=fused.layout.dims, poolings=fused.layout.poolings, weighted=bool(weighted and pooled),
                   deterministic=fused.deterministic or torch.are_deterministic_algorithms_enabled(),
                   threads=torch.get_num_threads())  # as FusedEmbeddingBags._select chooses at run time
    op = "pooled_forward" if pooled else "unpooled_forward"
    out = {op: registry.select(op, kernel=fused.kernel_request, **problem)[0]}
    if fused.optimizer is not None:
        out["backward_update"] = registry.select("backward_update", kernel=fused.kernel_request,
                                                 optimizer=fused.optimizer.name, **problem)[0]
    return out
