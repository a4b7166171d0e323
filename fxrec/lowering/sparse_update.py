"""Pieces of the fused backward + optimizer update shared by the kernels.

The backward never builds a table-sized gradient. Instead every occurrence of an id
gets a global row (``hash_size_cumsum[t] + id``); a stable sort groups the occurrences
of each row, in input order, so a kernel can reduce each unique row's gradients in a
fixed order (bit-identical run to run) and update that row and its optimizer state once.

Optimizer state (`init_state`), always on the weights' device:
- SGD: none;
- RowWiseAdagrad: ``momentum`` fp32 [total_rows] (global row order);
- Adam: ``exp_avg``, ``exp_avg_sq`` fp32 laid out exactly like the weights, and
  ``step`` int32 [total_rows], the per-row step count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxrec.optim import SGD, Adam, RowWiseAdagrad

from .layout import TBELayout

# state tensors with one entry per row (global row order); the others are laid out like the weights
ROW_STATE = ("momentum", "step")


def init_state(optimizer, layout: TBELayout, device=None) -> dict[str, Tensor]:
    """Zeroed optimizer state for `optimizer` (None or SGD: empty)."""
    kw = dict(device=device if device is not None else layout.device)
    if optimizer is None or isinstance(optimizer, SGD):
        return {}
    if isinstance(optimizer, RowWiseAdagrad):
        return {"momentum": torch.zeros(layout.total_rows, dtype=torch.float32, **kw)}
    if isinstance(optimizer, Adam):
        return {"exp_avg": torch.zeros(layout.numel, dtype=torch.float32, **kw),
                "exp_avg_sq": torch.zeros(layout.numel, dtype=torch.float32, **kw),
                "step": torch.zeros(layout.total_rows, dtype=torch.int32, **kw)}
    raise ValueError(f"unsupported sparse optimizer {optimizer!r}; use fxrec.optim.SGD, "
                     "RowWiseAdagrad or Adam")


def adam_row_scalars(optimizer: Adam, step: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Per-row ``lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` in `dtype` (fp32; fp64
    for an fp64 table's update).

    Computed in float64 as torch.optim.Adam does in Python (where 1 - beta2 near 1e-3
    would lose ~1e-4 relative precision in fp32), then rounded once to `dtype`.
    """
    beta1, beta2 = optimizer.betas
    s = step.to(torch.float64)
    step_size = optimizer.lr / (1.0 - torch.pow(beta1, s))
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, s))
    return step_size.to(dtype), bc2_sqrt.to(dtype)


@dataclass
class SortedGrads:
    """Occurrences grouped by global row. U unique rows, N occurrences."""

    uniq_global: Tensor  # int64 [U], ascending
    uniq_table: Tensor  # int64 [U]
    uniq_row: Tensor  # int64 [U], id within its table
    seg: Tensor  # int64 [U+1], row u's occurrences are sorted positions seg[u]:seg[u+1]
    src_off: Tensor  # int64 [N], element offset of each sorted occurrence's grad row
    scale: Tensor  # fp32 [N], per-sample weight and 1/len for mean pooling

    @property
    def num_unique(self) -> int:
        return self.uniq_global.numel()


def _occurrence_scale(layout: TBELayout, table: Tensor, bag: Tensor, lengths: Tensor,
                      per_sample_weights: Optional[Tensor]) -> Optional[Tensor]:
    """fp32 per occurrence of a pooled layout: its per-sample weight, divided by its bag's
    length where the table pools by mean; None when every factor is 1."""
    scale = per_sample_weights.float() if per_sample_weights is not None else None
    if any(p == "mean" for p in layout.poolings):
        mean = layout.is_mean.to(table.device)[table].bool()
        length = lengths[bag].clamp(min=1).float()
        scale = torch.where(mean, 1.0 / length, 1.0) if scale is None else torch.where(mean, scale / length, scale)
    return scale


def _key_dtype(layout: TBELayout) -> torch.dtype:
    """The dtype of global-row sort keys: int32 where the rows fit, which sorts 2-3x faster
    (half a radix sort's passes on a GPU, half the bytes on a CPU)."""
    return torch.int32 if layout.total_rows < 2 ** 31 else torch.int64


def sort_occurrences(layout: TBELayout, indices: Tensor, offsets: Tensor,
                     per_sample_weights: Optional[Tensor] = None) -> SortedGrads:
    """Group the batch's occurrences by global row (stable, so deterministic).

    For pooled layouts the grad row of an occurrence in bag (t, b) starts at
    ``b * total_D + D_offsets[t]`` of the B x total_D grad_output; for unpooled ones at
    its own row of table t's block in the flat unpooled grad_output. One host sync
    (the number of unique rows).
    """
    dev = indices.device
    n = indices.numel()
    B = layout.batch_size(offsets)
    off = offsets.long()
    lengths = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=n)
    table = bag // max(B, 1)
    hsc, d_off = layout.hash_size_cumsum.to(dev), layout.D_offsets.to(dev).long()
    dims = layout.dims_t.to(dev)
    global_row = (hsc.index_select(0, table) + indices.long()).to(_key_dtype(layout))
    if layout.pooled:
        src_off = (bag - table * B) * layout.total_D + d_off.index_select(0, table)
        scale = _occurrence_scale(layout, table, bag, lengths, per_sample_weights)
        if scale is None:
            scale = torch.ones(n, dtype=torch.float32, device=dev)
    else:
        first = off[::B][:-1] if B > 0 else off.new_zeros(layout.num_tables)
        src_off = layout.unpooled_offsets(offsets).index_select(0, table) + \
            (torch.arange(n, device=dev) - first.index_select(0, table)) * dims.index_select(0, table)
        scale = torch.ones(n, dtype=torch.float32, device=dev)
    sorted_rows, perm = torch.sort(global_row, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    uniq = uniq.long()
    seg = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    uniq_table = table.index_select(0, perm.index_select(0, seg[:-1]))
    return SortedGrads(uniq, uniq_table, uniq - hsc.index_select(0, uniq_table), seg,
                       src_off.index_select(0, perm), scale.index_select(0, perm))


def _group_occurrences(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                       per_sample_weights: Optional[Tensor], group: list[int], bounds: list[int]):
    """The occurrences of `group`'s tables (all of one width d), in input order, as
    ``(G, rows, keys, scale, bases)``:

    - G: their gradients as the rows of one ``m x d`` matrix, a view when the group is the
      whole layout (pooled: a bag's row; unpooled: an occurrence's own);
    - rows: per occurrence, the row of G its gradient is;
    - keys: per occurrence, ``bases[i] + id`` for the group's i-th table, with ``bases`` the
      cumulative rows of the group's tables (`_key_dtype`), so they sort table-major;
    - scale: per occurrence, its per-sample weight divided by its bag's length where the
      table pools by mean; None when every factor is 1.

    Indices are table-major, so table t's occurrences are ``bounds[t]:bounds[t + 1]`` and
    each per-occurrence tensor is built by one `repeat_interleave` of a per-table or per-bag
    one, not by gathers over a per-occurrence bag index."""
    T, dev = layout.num_tables, grad_output.device
    d = layout.dims[group[0]]
    B = layout.batch_size(offsets)
    whole = len(group) == T
    counts = [bounds[t + 1] - bounds[t] for t in group]
    n = sum(counts)

    def take(x: Tensor, per: int) -> Tensor:  # the group's part of a table-major tensor
        if whole:
            return x
        return torch.cat([x[bounds[t]:bounds[t + 1]] if per == 0 else x[t * per:(t + 1) * per] for t in group])

    bases = [0]
    for t in group:
        bases.append(bases[-1] + layout.rows[t])
    kdt = _key_dtype(layout)
    keys = take(indices, 0).to(kdt) + torch.repeat_interleave(
        torch.tensor(bases[:-1], dtype=kdt, device=dev), torch.tensor(counts, device=dev), output_size=n)
    if not layout.pooled:  # one row of G per occurrence: table t's block of the flat gradient
        starts = layout.unpooled_offsets(offsets).tolist()
        blocks = [grad_output[starts[t]:starts[t] + c * d].view(c, d) for t, c in zip(group, counts)]
        G = grad_output[:n * d].view(n, d) if whole else (blocks[0] if len(blocks) == 1 else torch.cat(blocks))
        return G, torch.arange(n, device=dev), keys, None, bases
    Tg = len(group)
    if whole:  # bag t*B + b is row b*T + t of the B x (T*d) gradient seen as (B*T) x d
        G = grad_output.reshape(-1, d)
    else:
        G = torch.cat([grad_output[:, layout.D_offsets_list[t]:layout.D_offsets_list[t + 1]] for t in group],
                      dim=1).reshape(-1, d)
    off = offsets.long()
    lengths = take(off[1:] - off[:-1], B)
    bag_rows = (torch.arange(B, device=dev) * Tg + torch.arange(Tg, device=dev)[:, None]).reshape(-1)
    rows = torch.repeat_interleave(bag_rows, lengths, output_size=n)
    mean = [i for i, t in enumerate(group) if layout.poolings[t] == "mean"]
    scale = take(per_sample_weights, 0).float() if per_sample_weights is not None else None
    if mean:
        bag_scale = torch.ones(Tg, B, dtype=torch.float32, device=dev)
        bag_scale[mean] = 1.0 / lengths.view(Tg, B)[mean].clamp(min=1).float()
        per_occ = torch.repeat_interleave(bag_scale.reshape(-1), lengths, output_size=n)
        scale = per_occ if scale is None else scale * per_occ
    return G, rows, keys, scale, bases


def _sq_norms(x: Tensor) -> Tensor:
    """fp32 squared norm of each row (`vector_norm` reduces without an x-sized temporary;
    `vecdot` multiplies first and was 5x slower here)."""
    return torch.linalg.vector_norm(x.float(), dim=1).square()


def _segment_sq_sums(G: Tensor, rows: Tensor, scale: Optional[Tensor], keys: Tensor, counts: Tensor) -> Tensor:
    """fp32 [S]: for the S runs of equal sorted `keys` (lengths `counts`), ``|sum_o scale_o G[rows_o]|^2``.

    A run of one occurrence is ``scale^2 |G[row]|^2`` (from G's row norms, no gather of
    its gradient); only runs of several sum their rows, by `embedding_bag`. Gathers use
    index_select / masked_select: on the CPU they are 2-4x faster than advanced indexing
    (``x[idx]``, ``x[mask]``)."""
    first = counts.cumsum(0) - counts
    sums = _sq_norms(G).index_select(0, rows.index_select(0, first))
    if scale is not None:
        sums = sums * scale.index_select(0, first).square()
    n = rows.numel()
    if counts.numel() < n:  # some row occurs more than once
        # an occurrence belongs to a run of several iff it equals a neighbour
        same = keys[1:] == keys[:-1]
        occ = torch.zeros(n, dtype=torch.bool, device=rows.device)
        occ[1:] = same
        occ[:-1] |= same
        multi = counts > 1
        m_counts = counts.masked_select(multi)
        psw = None if scale is None else scale.masked_select(occ).to(G.dtype)
        g = F.embedding_bag(rows.masked_select(occ), G, m_counts.cumsum(0) - m_counts, mode="sum",
                            per_sample_weights=psw)
        sums.masked_scatter_(multi, _sq_norms(g))  # no U x d temporary
    return sums


def row_sq_sums(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor], tables) -> dict[int, tuple[Tensor, Tensor]]:
    """Per table t in `tables`: its unique ids (ascending, int64) and, per id, the sum over
    the table's columns of the squared gradient summed over the id's occurrences (fp32) —
    RowWiseAdagrad's ``sum(g**2)`` before the mean. Per distinct width, one sort of the
    occurrences by row and one `embedding_bag` over the gradient rows of the rows that occur
    more than once, whatever the number of tables; tables no id touched get empty tensors.
    Occurrences are summed in input order within a row, so the result is the same run to run."""
    dev = grad_output.device
    tables = sorted(set(tables))
    out = {t: (torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.float32, device=dev))
           for t in tables}
    if indices.numel() == 0:
        return out
    B = layout.batch_size(offsets)
    bounds = offsets[::B].tolist()  # table t's occurrences: bounds[t]:bounds[t + 1]
    for d in sorted({layout.dims[t] for t in tables}):
        group = [t for t in tables if layout.dims[t] == d]
        G, rows, keys, scale, bases = _group_occurrences(layout, grad_output, indices, offsets,
                                                         per_sample_weights, group, bounds)
        if keys.numel() == 0:
            continue
        keys, perm = torch.sort(keys, stable=True)
        uniq, counts = torch.unique_consecutive(keys, return_counts=True)
        sums = _segment_sq_sums(G, rows.index_select(0, perm),
                                None if scale is None else scale.index_select(0, perm), keys, counts)
        uniq = uniq.long()
        # unique keys ascend, so the group's i-th table's are those in [bases[i], bases[i+1])
        cut = torch.searchsorted(uniq, torch.tensor(bases, dtype=torch.int64, device=dev)).tolist()
        for i, t in enumerate(group):
            out[t] = (uniq[cut[i]:cut[i + 1]] - bases[i], sums[cut[i]:cut[i + 1]])
    return out


def merge_calls(layout: TBELayout, calls: list) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Several lookups' ``(grad_output, indices, offsets, per_sample_weights)`` on one layout as
    one call's: table t's bags (their ids, weights and gradient rows) of each call in turn,
    as if the calls' batches had been one batch. The fused update of the result is the
    update of each row's gradient summed over every call, as the unfused model's optimizer
    step sees it. A call without per-sample weights, beside one with, weighs its ids 1. One
    call is returned as it is."""
    if len(calls) == 1:
        return calls[0]
    T = layout.num_tables
    lengths, ids, weights, grads = [], [[] for _ in range(T)], [[] for _ in range(T)], [[] for _ in range(T)]
    weighted = any(c[3] is not None for c in calls)
    dtype = calls[0][1].dtype if all(c[1].dtype == calls[0][1].dtype for c in calls) else torch.int64
    for grad, indices, offsets, psw in calls:
        B = layout.batch_size(offsets)
        off = offsets.long()
        lengths.append((off[1:] - off[:-1]).view(T, B))
        bounds = off[::B].tolist() if B else [0] * (T + 1)
        w = psw if psw is not None or not weighted else torch.ones(indices.numel(), device=indices.device)
        start = 0  # unpooled: table t's block of the flat gradient, its ids' rows of dims[t]
        for t in range(T):
            ids[t].append(indices[bounds[t]:bounds[t + 1]].to(dtype))
            if weighted:
                weights[t].append(w[bounds[t]:bounds[t + 1]].float())
            if not layout.pooled:
                size = (bounds[t + 1] - bounds[t]) * layout.dims[t]
                grads[t].append(grad[start:start + size])
                start += size
    merged = torch.cat(lengths, dim=1).reshape(-1)
    offsets = torch.cat([merged.new_zeros(1), merged.cumsum(0)]).to(calls[0][2].dtype)
    indices = torch.cat([x for per in ids for x in per])
    psw = torch.cat([x for per in weights for x in per]) if weighted else None
    if layout.pooled:  # batch-major rows: one call's batch after another's
        grad = torch.cat([c[0] for c in calls], dim=0)
    else:  # table-major blocks of rows
        grad = torch.cat([x for per in grads for x in per])
    return grad, indices, offsets, psw
