"""The local ends of a sharded lookup: the user's lookup inputs in, the user's outputs out.

`apply_plan` replaces every lookup node by a unit of nodes (see apply_plan.py). Its first
node, `GatherInputs`, turns whatever the user passed (nn.EmbeddingBag's ids + offsets or
2-D ids, per-sample weights, nn.Embedding's ids of any shape, an EBC/EC's
KeyedJaggedTensor) into one `SlotInput` per (lookup, table, feature) *slot*: int64 ids
(a bag's padding removed), bag lengths for pooled reads, weights, and what it takes to give the
result back its shape. Its last node, `FinishOutputs`, turns per-slot results (pooled
``bags x dim`` sums, or ``ids x dim`` rows) into what each original lookup returned
(a tensor, a pooled ``.sum/.mean``, a KeyedTensor, a dict of JaggedTensors).

Semantics kept from the callee: nn.EmbeddingBag excludes ``padding_idx`` ids from a bag
(and from a mean's count); a folded ``nn.Embedding(...).mean(dim)`` divides by the full
dimension; an nn.Embedding ``padding_idx`` position yields the padding row, whatever it
holds (zeros as nn.Embedding builds it, anything after a re-initialisation or a load), and
passes no gradient to it. Such a read is never folded into a bag (detect_embeddings).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.modules import as_output, expand_bags
from fxrec.sparse import JaggedTensor, KeyedTensor
from fxrec.sparse_checks import out_of_range_id

__all__ = ["SlotSpec", "NodeSpec", "SlotInput", "InputFault", "find_fault", "check_inputs", "GatherInputs",
           "FinishOutputs", "pool_rows"]


@dataclass(frozen=True)
class SlotSpec:
    """One (lookup node, table, feature) read. `pooling` is the read's ("none" =
    unpooled); `served_pooled` says whether the table's shards return pooled sums (every
    read of the table is pooled) or rows (the pooling, if any, then happens here)."""

    node: str
    table: str
    feature: Optional[str]
    pooling: str
    served_pooled: bool
    num_embeddings: int
    dim: int
    weighted: bool
    dtype: Optional[torch.dtype] = None  # the table's: per-sample weights must have it, as in torch
    key: Optional[str] = None  # the collection's output key: the feature, or "feature@table" when shared

    @property
    def output_key(self) -> Optional[str]:
        return self.feature if self.key is None else self.key


@dataclass(frozen=True)
class NodeSpec:
    """One replaced lookup node: how to read its inputs and rebuild its output.
    `slots` index the unit's SlotSpecs, in the node's read/feature order."""

    name: str
    kind: str
    slots: tuple[int, ...]
    include_last_offset: bool = False
    padding_idx: Optional[int] = None
    folded: Optional[int] = None  # nn.Embedding folded into its .sum/.mean (pool_node): the ids' ndim
    ignores_weights: bool = False  # an EmbeddingBagCollection built with is_weighted=False


@dataclass
class SlotInput:
    """A slot's local input. `values` int64 ids (a bag's padding removed); `lengths` ids per bag
    (pooled reads); `weights` per id or None; `divisor` per bag for mean pooling; `shape`
    the output's leading shape; `keep` the non-padding mask of an unpooled read's ids (the
    padding positions get no gradient);
    `jt_lengths` the lengths an EmbeddingCollection output carries; `raw` the bag lengths,
    id count and per-sample weight count as given, before padding ids were dropped (what
    `find_fault` checks)."""

    values: Tensor
    lengths: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    divisor: Optional[Tensor] = None
    shape: tuple = ()
    keep: Optional[Tensor] = None
    jt_lengths: Optional[Tensor] = None
    inverse: Optional[Tensor] = None  # a batch per key (VBE): each sample's bag, for the pooled output
    raw: Optional[tuple[Tensor, int, Optional[int]]] = None
    bad: Optional[tuple[int, int]] = None  # (reason, detail) of an input that could not be read (`BadInput`)

    @property
    def num_bags(self) -> int:
        return int(self.lengths.numel()) if self.lengths is not None else int(self.values.numel())


# ------------------------------------------------------------------ inputs
_ID_DTYPES = (torch.int64, torch.int32)  # what F.embedding / F.embedding_bag take
# every dtype, in an order all ranks share: a bad input's dtype travels as its position
DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
# why a slot's input cannot be read at all (`BadInput`), and the exception it raises
IDS_DTYPE, NO_FEATURE, WEIGHTS_DTYPE, FOLDED_NDIM, BAG_IDS_NDIM, OFFSETS_WITH_2D, OFFSETS_NDIM, WEIGHTS_SHAPE, \
    NOT_TENSOR, NO_INVERSE, INVERSE_RANGE, POSITION_LENGTH, BAG_COUNT = range(1, 14)
_ARGUMENTS = ("ids", "offsets", "per-sample weights")  # NOT_TENSOR's detail: which one


class BadInput(Exception):
    """A slot's input that cannot be read (wrong dtype or rank, a missing feature): raised
    while reading it, as (reason, detail) small ints, so that a sharded unit can send them
    to the other ranks with its counts and every rank raise the same error
    (`InputFault.message` words it)."""

    def __init__(self, reason: int, detail: int = 0):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else -1


def _say_dtype(code: int) -> str:
    return str(DTYPES[code]) if 0 <= code < len(DTYPES) else "another dtype"


def bad_input_message(slot: "SlotSpec", reason: int, detail: int) -> tuple[type, str]:
    """(exception type, text) of a `BadInput`, as torch's lookup would word it."""
    if reason == IDS_DTYPE:
        return TypeError, f"ids must be int64 or int32, got {_say_dtype(detail)}"
    if reason == NO_FEATURE:
        return KeyError, "the feature is missing from the input"
    if reason == NOT_TENSOR:
        return TypeError, (f"{_ARGUMENTS[detail]} must be a tensor (torch.tensor / torch.as_tensor), "
                           f"as the lookup takes them")
    if reason == WEIGHTS_DTYPE:
        return TypeError, (f"per-sample weights must have the table's dtype, {slot.dtype}, got "
                           f"{_say_dtype(detail)}")
    if reason == FOLDED_NDIM:
        return ValueError, (f"ids were {detail // 100}-D when the model was captured (the .sum/.mean after the "
                            f"lookup pools their last dimension), got {detail % 100}-D ids")
    if reason == BAG_IDS_NDIM:
        return ValueError, f"expected 1-D ids with offsets or 2-D ids, got {detail}-D ids"
    if reason == OFFSETS_WITH_2D:
        return ValueError, "2-D ids take no offsets"
    if reason == OFFSETS_NDIM:
        return ValueError, f"offsets must be 1-D, got {detail}-D offsets"
    if reason == WEIGHTS_SHAPE:
        return ValueError, f"per-sample weights must have the ids' shape, got {detail}-D weights"
    if reason == NO_INVERSE:
        return ValueError, ("the KeyedJaggedTensor has a batch per key (stride_per_key_per_rank) but its "
                            "inverse_indices give the feature no row, so its samples have no bags")
    if reason == POSITION_LENGTH:  # detail: the bag's length << 32 | the weights' max length
        return ValueError, (f"its position weights (fxrec.feature_processors) take bags of up to {detail & 0xFFFFFFFF} "
                            f"ids, and a bag holds {detail >> 32}")
    if reason == BAG_COUNT:
        return ValueError, (f"its KeyedJaggedTensor holds {detail} bags, not the number its keys' batch sizes "
                            f"(stride, or stride_per_key_per_rank) make")
    if reason == INVERSE_RANGE:
        return ValueError, f"its inverse_indices give a sample bag {detail}, which the feature does not have"
    return ValueError, f"unreadable input (reason {reason})"


def _int_ids(ids: Tensor) -> Tensor:
    """`ids` flat as int64; other dtypes are refused as the lookup itself would refuse them
    (a float id would otherwise be truncated to a row without a word)."""
    if ids.dtype not in _ID_DTYPES:
        raise BadInput(IDS_DTYPE, _dtype_code(ids.dtype))
    return ids.reshape(-1).long()


def _check_weights(slot: "SlotSpec", ids: Tensor, psw: Optional[Tensor]) -> None:
    if psw is None:
        return
    if slot.dtype is not None and psw.dtype != slot.dtype:
        raise BadInput(WEIGHTS_DTYPE, _dtype_code(psw.dtype))
    if psw.numel() == ids.numel() and psw.shape != ids.shape:  # (a count that differs: find_fault's)
        raise BadInput(WEIGHTS_SHAPE, psw.dim())


def _bag_lengths(ids: Tensor, offsets: Tensor, include_last: bool) -> Tensor:
    if offsets.dim() != 1:
        raise BadInput(OFFSETS_NDIM, offsets.dim())
    offsets = offsets.long()
    if include_last:
        return offsets[1:] - offsets[:-1]
    return torch.diff(offsets, append=offsets.new_full((1,), ids.numel()))


def _drop_padding(values: Tensor, lengths: Tensor, weights: Optional[Tensor], pad: Optional[int]):
    if pad is None:
        return values, lengths, weights
    keep = values != pad
    # Kept ids per bag from a prefix sum over the ids, read at each bag's clamped ends: unlike
    # a repeat_interleave over the lengths it cannot fail on lengths that do not add up,
    # which the input check then reports with the table's name (from `SlotInput.raw`).
    n = values.numel()
    before = torch.zeros(n + 1, dtype=torch.int64, device=values.device)
    before[1:] = keep.cumsum(0)
    ends = lengths.cumsum(0)
    kept = before.index_select(0, ends.clamp(0, n)) - before.index_select(0, (ends - lengths).clamp(0, n))
    if weights is not None and weights.numel() == n:  # (else the check reports the count)
        weights = weights[keep]
    return values[keep], kept, weights


def _bag_slot(spec: NodeSpec, slot: SlotSpec, ids: Tensor, offsets, psw) -> SlotInput:
    if ids.dim() == 2:
        if offsets is not None:
            raise BadInput(OFFSETS_WITH_2D)
        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=ids.device)
    elif ids.dim() == 1 and offsets is not None:
        lengths = _bag_lengths(ids, offsets, spec.include_last_offset)
    else:
        raise BadInput(BAG_IDS_NDIM, ids.dim())
    values = _int_ids(ids)
    _check_weights(slot, ids, psw)
    weights = None if psw is None else psw.reshape(-1)
    raw = (lengths, ids.numel(), None if weights is None else weights.numel()) \
        if spec.padding_idx is not None else None
    values, kept, weights = _drop_padding(values, lengths, weights, spec.padding_idx)
    divisor = kept.clamp(min=1) if slot.pooling == "mean" else None
    return SlotInput(values, kept, weights, divisor, shape=(kept.numel(),), raw=raw)


def _embedding_slot(spec: NodeSpec, slot: SlotSpec, ids: Tensor) -> SlotInput:
    values = _int_ids(ids)
    if spec.folded is not None:  # pooled over the last dimension: one bag per leading index (no padding_idx)
        if ids.dim() != spec.folded:  # the .sum/.mean's dim was the ids' last at capture: not now
            raise BadInput(FOLDED_NDIM, 100 * spec.folded + min(ids.dim(), 99))
        L = ids.shape[-1]
        lengths = torch.full((values.numel() // max(L, 1),), L, dtype=torch.int64, device=ids.device)
        divisor = torch.full_like(lengths, max(L, 1)) if slot.pooling == "mean" else None
        return SlotInput(values, lengths, None, divisor, shape=tuple(ids.shape[:-1]))
    # padding ids are looked up like any other (F.embedding returns the padding row, zero
    # or not); `keep` masks their gradient in _finish_slot
    keep = values != spec.padding_idx if spec.padding_idx is not None else None
    return SlotInput(values, shape=tuple(ids.shape), keep=keep)


def _kjt_slot(spec: NodeSpec, slot: SlotSpec, kjt) -> SlotInput:
    # an unvalidated KJT (built in forward, validate=False) whose bags do not fit its batch
    # sizes fails in torch's split / reshape on its rank alone: a BadInput reaches every rank
    bags = kjt.lengths().numel()
    if bags != sum(kjt.stride_per_key()):
        raise BadInput(BAG_COUNT, bags)
    try:
        jt = kjt[slot.feature]
    except KeyError:  # as the unsharded collection says it, with the lookup
        raise BadInput(NO_FEATURE) from None
    fault = getattr(kjt, "_position_fault", None)  # feature_processors.position_weighted's, deferred
    if fault is not None and fault[0] == slot.feature:
        raise BadInput(POSITION_LENGTH, fault[1] << 32 | fault[2])
    values, lengths = _int_ids(jt.values()), jt.lengths().long()
    if spec.kind == "ec":
        return SlotInput(values, shape=(values.numel(),), jt_lengths=jt.lengths())
    weights = None if spec.ignores_weights else jt.weights_or_none()
    if weights is not None and slot.dtype is not None and weights.dtype != slot.dtype:
        weights = weights.to(slot.dtype)  # as the unsharded EmbeddingBagCollection casts them
    divisor = lengths.clamp(min=1) if slot.pooling == "mean" else None
    return SlotInput(values, lengths, weights, divisor, shape=(lengths.numel(),), inverse=_inverse_row(kjt, slot))


def _inverse_row(kjt, slot: SlotSpec) -> Optional[Tensor]:
    """A KJT with a batch per key (VBE): the feature's row of inverse_indices (its samples'
    bags), which FinishOutputs expands the pooled sums by."""
    if not kjt.variable_stride_per_key():
        return None
    row = kjt.inverse_row(slot.feature)
    if row is None:
        raise BadInput(NO_INVERSE)
    # checked here, on every read: a KJT built in forward (or with validate=False) was not, and an
    # index_select failing on one rank only, after the exchange, would leave the others waiting
    bags = kjt.stride_per_key()[kjt.index_per_key()[slot.feature]]
    bad = out_of_range_id(row, bags)
    if bad is not None:
        raise BadInput(INVERSE_RANGE, bad)
    # a key that carries the whole batch (an item beside deduplicated user features) maps each
    # sample to its own bag: its sums need no expansion (nor its gradient a sum into bags)
    if row.numel() == bags and bool((row == torch.arange(bags, device=row.device)).all()):
        return None
    return row


ID_RANGE, NEGATIVE_LENGTH, LENGTHS_SUM, WEIGHTS, WEIGHTS_COUNT, BAD_INPUT = 1, 2, 3, 4, 5, 6  # InputFault kinds


@dataclass(frozen=True)
class InputFault:
    """One slot's local input failing the check (`find_fault`), as `WIDTH` ints, so that a
    rank can tell the others inside the counts it exchanges anyway (dist_lookup.InputDist):
    then every rank raises the same error at the same collective, and no rank is left
    waiting in one for a rank that raised."""

    kind: int   # ID_RANGE, NEGATIVE_LENGTH, LENGTHS_SUM, WEIGHTS, WEIGHTS_COUNT or BAD_INPUT
    slot: int
    value: int  # the offending id, the most negative length, what the lengths sum to,
                # whether per-sample weights came (they did iff the model had none), how
                # many came, or (BAD_INPUT) the `BadInput` reason
    ids: int    # the slot's number of ids; (BAD_INPUT) the `BadInput` detail

    WIDTH: ClassVar[int] = 4

    def ints(self) -> list[int]:
        return [self.kind, self.slot, self.value, self.ids]

    @classmethod
    def from_ints(cls, row) -> Optional["InputFault"]:
        """The fault `ints` encoded, or None for the all-zero row of a clean input."""
        return cls(*map(int, row)) if row[0] else None

    def error(self, slots: Sequence[SlotSpec]) -> type:
        """The exception type to raise: a `BadInput`'s own (TypeError for a dtype, KeyError
        for a missing feature), else ValueError."""
        return bad_input_message(slots[self.slot], self.value, self.ids)[0] if self.kind == BAD_INPUT else ValueError

    def message(self, slots: Sequence[SlotSpec]) -> str:
        slot = slots[self.slot]
        feat = f", feature {slot.feature!r}" if slot.feature else ""
        where = f"table {slot.table!r} (lookup %{slot.node}{feat})"
        if self.kind == BAD_INPUT:
            return f"{where}: {bad_input_message(slot, self.value, self.ids)[1]}"
        if self.kind == ID_RANGE:
            return f"{where}: id {self.value} outside [0, {slot.num_embeddings})"
        if self.kind == WEIGHTS:
            was, now = ("absent", "present") if self.value else ("present", "absent")
            return (f"{where}: per-sample weights were {was} when the model was captured (shard's or "
                    f"lower_for_inference's example inputs, torch.compile's first call) but are {now} now")
        if self.kind == WEIGHTS_COUNT:
            return f"{where}: {self.value} per-sample weights for {self.ids} ids"
        if self.kind == NEGATIVE_LENGTH:
            return (f"{where}: bag length {self.value} is negative (offsets must not decrease, nor pass the "
                    f"number of ids, {self.ids})")
        return f"{where}: bag lengths sum to {self.value} but there are {self.ids} ids"


def _as_given(inp: SlotInput) -> tuple[Optional[Tensor], int, Optional[int]]:
    """(bag lengths, id count, per-sample weight count or None) as the user gave them."""
    if inp.raw is not None:
        return inp.raw
    return inp.lengths, inp.values.numel(), None if inp.weights is None else inp.weights.numel()


def find_fault(slots: Sequence[SlotSpec], inputs: list[SlotInput]) -> Optional[InputFault]:
    """The first slot whose per-sample weights come or go against the model's, or whose ids
    are out of range or bag lengths inconsistent; or None. One host sync for the whole unit."""
    for k, inp in enumerate(inputs):
        if inp.bad is not None:
            return InputFault(BAD_INPUT, k, *inp.bad)
    given = [_as_given(inp) for inp in inputs]
    for k, (slot, (_, n, n_w)) in enumerate(zip(slots, given)):
        if (n_w is not None) != slot.weighted:
            return InputFault(WEIGHTS, k, int(n_w is not None), n)
        if n_w is not None and n_w != n:
            return InputFault(WEIGHTS_COUNT, k, n_w, n)
    if _all_fine(slots, inputs, given):
        return None
    return _first_fault(slots, inputs, given)


def _all_fine(slots: Sequence[SlotSpec], inputs: list[SlotInput], given: list) -> bool:
    """Every slot's ids in range and bag lengths non-negative and summing to its ids, in a few
    ops over all slots at once and one host sync (per slot it was five small ops each).

    Ids: one min/max per group of slots sharing a table size (the slots' ids joined first when
    there are several), not a per-id bound tensor and two comparisons over it: a KeyedJaggedTensor
    of 26 features, 213k ids, took 0.57 ms per check that way on one CPU thread, 12% of a forward
    of its lookups. Lengths: their sums per slot from one cumulative sum, read at the slots'
    boundaries."""
    device = inputs[0].values.device
    stats = []  # int64 scalars: each group's min id, max id minus its bound; then the length checks
    by_limit: dict[int, list[Tensor]] = {}
    for slot, inp in zip(slots, inputs):
        if inp.values.numel():
            by_limit.setdefault(slot.num_embeddings, []).append(inp.values)
    for limit, parts in by_limit.items():
        lo, hi = torch.aminmax(parts[0] if len(parts) == 1 else torch.cat(parts))
        stats += [lo.long(), hi.long() - limit]
    groups = len(stats)
    with_lengths = [k for k, g in enumerate(given) if g[0] is not None]  # (ids without bags: nothing to sum)
    if with_lengths:
        parts = [given[k][0] for k in with_lengths]
        lengths = torch.cat(parts) if len(parts) > 1 else parts[0]
        if lengths.numel():
            cum = torch.cat([lengths.new_zeros(1, dtype=torch.int64), lengths.cumsum(0, dtype=torch.int64)])
            bounds = torch.tensor(list(itertools.accumulate((len(p) for p in parts), initial=0)), device=device)
            edges = cum.index_select(0, bounds)
            totals = edges[1:] - edges[:-1]
            want = torch.tensor([given[k][1] for k in with_lengths], device=device)
            stats += [(totals != want).any().long(), lengths.min().long()]
        elif any(given[k][1] for k in with_lengths):  # no bags, yet ids: sums of 0 against them
            return False
    if not stats:
        return True
    flat = torch.stack(stats).tolist()
    if any(flat[i] < 0 or flat[i + 1] >= 0 for i in range(0, groups, 2)):
        return False
    return len(flat) == groups or (not flat[groups] and flat[groups + 1] >= 0)


def _first_fault(slots: Sequence[SlotSpec], inputs: list[SlotInput], given: list) -> Optional[InputFault]:
    """`find_fault`'s answer slot by slot, once `_all_fine` found something wrong."""
    stats = []
    for inp, (lengths, n, _) in zip(inputs, given):
        v = inp.values
        zero = v.new_zeros(())
        lo, hi = torch.aminmax(v) if v.numel() else (zero, zero)
        total = lengths.sum() if lengths is not None else v.new_tensor(n)
        shortest = lengths.min() if lengths is not None and lengths.numel() else zero
        stats.append(torch.stack([lo, hi, total, shortest]))
    if not stats:
        return None
    for k, (slot, inp, (_, n, _), (lo, hi, total, shortest)) in enumerate(
            zip(slots, inputs, given, torch.stack(stats).tolist())):
        if inp.values.numel() and (lo < 0 or hi >= slot.num_embeddings):
            return InputFault(ID_RANGE, k, lo if lo < 0 else hi, n)
        if shortest < 0:
            return InputFault(NEGATIVE_LENGTH, k, shortest, n)
        if total != n:
            return InputFault(LENGTHS_SUM, k, total, n)
    return None


def check_inputs(slots: Sequence[SlotSpec], inputs: list[SlotInput]) -> None:
    """Raise ValueError (a `BadInput`'s TypeError / KeyError) naming the table, lookup,
    feature and value of `find_fault`'s fault."""
    fault = find_fault(slots, inputs)
    if fault is not None:
        raise fault.error(slots)(fault.message(slots))


def _device_of(args) -> Optional[torch.device]:
    """The device of a lookup's inputs (a KeyedJaggedTensor's values'), for a stand-in."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device
        values = getattr(a, "values", None)
        if callable(values):
            return values().device
    return None


def _check_tensors(spec: NodeSpec, args) -> None:
    """A lookup's ids, offsets and weights are tensors (or None where optional): a list or a
    numpy array failed with an AttributeError ('list' object has no attribute 'dim')."""
    if spec.kind in ("ebc", "ec"):
        return  # a KeyedJaggedTensor, checked by its own reader
    for i, arg in enumerate(args[:3]):
        if not isinstance(arg, Tensor) and (i == 0 or arg is not None):
            raise BadInput(NOT_TENSOR, i)


@eager_under_dynamo
class GatherInputs(nn.Module):
    """forward(per_node_args) -> list[SlotInput], one per slot. ``per_node_args[i]`` is
    (ids, offsets, per_sample_weights) of node i, or (kjt,) for ebc/ec. With `check`, the
    weights, ids and bag lengths are checked here (`check_inputs`); a sharded unit with
    collectives checks them in its InputDist instead, so that every rank raises together."""

    def __init__(self, nodes: list[NodeSpec], slots: list[SlotSpec], check: bool = True):
        super().__init__()
        self.nodes, self.slots, self.check = nodes, slots, check

    def forward(self, per_node_args) -> list[SlotInput]:
        out: list[Optional[SlotInput]] = [None] * len(self.slots)
        for spec, args in zip(self.nodes, per_node_args):
            for k in spec.slots:
                slot = self.slots[k]
                try:
                    _check_tensors(spec, args)
                    if spec.kind in ("ebc", "ec"):
                        out[k] = _kjt_slot(spec, slot, args[0])
                    elif spec.kind in ("module_bag", "functional_bag"):
                        out[k] = _bag_slot(spec, slot, *args)
                    else:
                        out[k] = _embedding_slot(spec, slot, args[0])
                except BadInput as e:  # an empty stand-in that carries why (find_fault reports it)
                    empty = torch.zeros(0, dtype=torch.int64, device=_device_of(args))
                    out[k] = SlotInput(empty, empty, shape=(0,), bad=(e.reason, e.detail))
        if self.check:
            check_inputs(self.slots, out)
        return out

    def extra_repr(self) -> str:
        return f"nodes={[n.name for n in self.nodes]}, slots={len(self.slots)}, check={self.check}"


# ------------------------------------------------------------------ outputs
def pool_rows(rows: Tensor, inp: SlotInput) -> Tensor:
    """Sum (weighted) rows of one slot into its bags: ``num_bags x dim``."""
    n_bags = inp.lengths.numel()
    bag = torch.repeat_interleave(torch.arange(n_bags, device=rows.device), inp.lengths, output_size=rows.shape[0])
    if inp.weights is not None:
        rows = rows * inp.weights.to(rows.dtype).unsqueeze(1)
    return rows.new_zeros(n_bags, rows.shape[1]).index_add(0, bag, rows)


class ColumnBlocks(tuple):
    """A slot's pooled result as its column blocks, in column order (a column_wise table's
    shards), not yet joined: a KeyedTensor output concatenates them with its other slots in
    one copy (joining them first would copy every element twice)."""

    def join(self) -> Tensor:
        return self[0] if len(self) == 1 else torch.cat(self, dim=1)


def _joined(out) -> Tensor:
    return out.join() if isinstance(out, ColumnBlocks) else out


def _in_dtype(out, dtype: Optional[torch.dtype]):
    """A slot's result (a tensor or its `ColumnBlocks`) in its table's dtype: a lookup serving
    tables of several dtypes gives each the dtype they promote to (apply_plan.comm_dtype)."""
    if dtype is None:
        return out
    if isinstance(out, ColumnBlocks):
        return out if all(b.dtype == dtype for b in out) else ColumnBlocks(b.to(dtype) for b in out)
    return out.to(dtype)


def _finish_slot(slot: SlotSpec, inp: SlotInput, out: Tensor) -> Tensor:
    """A slot's result in the callee's form (before the node-level container)."""
    if slot.pooling == "none":
        if inp.keep is not None and out.requires_grad:  # the padding row gets no gradient
            out = torch.where(inp.keep.unsqueeze(1), out, out.detach())
        return out.reshape(*inp.shape, slot.dim)
    if not slot.served_pooled:
        out = pool_rows(out, inp)
    if inp.divisor is not None:
        out = out / inp.divisor.to(out.dtype).unsqueeze(1)
    return out.reshape(*inp.shape, slot.dim)


def _as_output(x: Tensor) -> Tensor:
    """A collection's values as the unsharded collection returns them (`fxrec.modules.as_output`:
    half-precision tables give float32)."""
    return as_output(x, x.dtype)


def _cat_columns(parts: list[Tensor]) -> Tensor:
    """``torch.cat(parts, dim=1)``, or, when the parts are the consecutive column blocks of one
    2-D tensor in order (a one-rank fused lookup whose output already has the KeyedTensor's
    layout), that tensor itself: no copy of the whole output."""
    base = parts[0]._base if parts else None
    if base is not None and base.dim() == 2 and all(p._base is base and p.dim() == 2 for p in parts):
        col, rows = 0, base.shape[0]
        for p in parts:
            if (p.shape[0] != rows or p.stride() != base.stride()
                    or p.storage_offset() != base.storage_offset() + col * base.stride(1)):
                break
            col += p.shape[1]
        else:
            if col == base.shape[1]:
                return base
    return torch.cat(parts, dim=1)


@eager_under_dynamo
class FinishOutputs(nn.Module):
    """forward(inputs, slot_outputs) -> tuple with each replaced node's output, in node order."""

    def __init__(self, nodes: list[NodeSpec], slots: list[SlotSpec]):
        super().__init__()
        self.nodes, self.slots = nodes, slots

    def forward(self, inputs: list[SlotInput], slot_outputs: list) -> tuple[Any, ...]:
        """slot_outputs: per slot a tensor, or its `ColumnBlocks`."""
        slot_outputs = [_in_dtype(out, slot.dtype) for out, slot in zip(slot_outputs, self.slots)]
        results = []
        for spec in self.nodes:
            if spec.kind == "ebc":
                keys = [self.slots[k].output_key for k in spec.slots]
                parts = []
                for k in spec.slots:
                    out = slot_outputs[k]
                    if isinstance(out, ColumnBlocks) and self._as_is(k, inputs[k]):
                        parts.extend(out)
                    elif inputs[k].inverse is not None:  # a batch per key: each sample its bag's sums
                        parts.append(expand_bags(_finish_slot(self.slots[k], inputs[k], _joined(out)),
                                                 inputs[k].inverse))
                    else:
                        parts.append(_finish_slot(self.slots[k], inputs[k], _joined(out)))
                results.append(KeyedTensor(keys, [self.slots[k].dim for k in spec.slots],
                                           _as_output(_cat_columns(parts))))
                continue
            # contiguous: a pooled slot's result may be a strided view into the received buffer
            # (dist_output.py), which the user's code would not expect of an embedding's output
            outs = [_finish_slot(self.slots[k], inputs[k], _joined(slot_outputs[k])).contiguous() for k in spec.slots]
            if spec.kind == "ec":
                results.append({self.slots[k].output_key: JaggedTensor(_as_output(o), lengths=inputs[k].jt_lengths,
                                                                    validate=False)
                                for k, o in zip(spec.slots, outs)})
            else:
                results.append(outs[0])
        return tuple(results)

    def _as_is(self, k: int, inp: SlotInput) -> bool:
        """Whether slot k's pooled sums are its output unchanged (no mean division, no reshape)."""
        slot = self.slots[k]
        return slot.pooling != "none" and slot.served_pooled and inp.divisor is None and len(inp.shape) == 1 \
            and inp.inverse is None

    def extra_repr(self) -> str:
        return f"nodes={[n.name for n in self.nodes]}"
