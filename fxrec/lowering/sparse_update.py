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


def adam_row_scalars(optimizer: Adam, step: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` as fp32.

    Computed in float64 as torch.optim.Adam does in Python (where 1 - beta2 near 1e-3
    would lose ~1e-4 relative precision in fp32), then rounded once to fp32.
    """
    beta1, beta2 = optimizer.betas
    s = step.to(torch.float64)
    step_size = optimizer.lr / (1.0 - torch.pow(beta1, s))
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, s))
    return step_size.to(torch.float32), bc2_sqrt.to(torch.float32)


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


def _group_rows(layout: TBELayout, grad_output: Tensor, offsets: Tensor, bag: Tensor, table: Tensor,
                group: list[int], d: int):
    """(G, row of G per occurrence): the gradients of `group`'s tables (all of width d) as the
    rows of one ``n x d`` matrix G (a view when they are the whole layout), and, for every
    occurrence (in bag `bag` of table `table`), the row of G its gradient is (pooled: its
    bag's; unpooled: its own)."""
    T, dev = layout.num_tables, grad_output.device
    B = layout.batch_size(offsets)
    if layout.pooled:
        b = bag - table * B
        if len(group) == T:  # bag t*B + b is row b*T + t of the B x (T*d) gradient seen as (B*T) x d
            return grad_output.reshape(-1, d), b * T + table
        pos = torch.full((T,), -1, dtype=torch.int64, device=dev)
        pos[torch.tensor(group, device=dev)] = torch.arange(len(group), device=dev)
        G = torch.cat([grad_output[:, layout.D_offsets_list[t]:layout.D_offsets_list[t + 1]] for t in group],
                      dim=1).reshape(-1, d)
        return G, b * len(group) + pos[table]
    # unpooled: table t's rows are one block of the flat gradient, its occurrences in order
    ids_start = offsets[::B].tolist() if B > 0 else [0] * (T + 1)
    n = [e - s for s, e in zip(ids_start[:-1], ids_start[1:])]
    starts = layout.unpooled_offsets(offsets).tolist()
    blocks = [grad_output[starts[t]:starts[t] + n[t] * d].view(n[t], d) for t in group]
    G = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    first_row = [0] * T  # occurrence i of table t is row first_row[t] + i of G
    acc = 0
    for t in group:
        first_row[t] = acc - ids_start[t]
        acc += n[t]
    return G, torch.arange(bag.numel(), device=dev) + torch.tensor(first_row, device=dev)[table]


def _segment_sq_sums(G: Tensor, rows: Tensor, scale: Optional[Tensor], counts: Tensor) -> Tensor:
    """fp32 [S]: for consecutive segments of `counts` occurrences, ``|sum_o scale_o G[rows_o]|^2``.

    A segment of one occurrence is ``scale^2 |G[row]|^2`` (from G's row norms, no gather of
    its gradient); only segments of several occurrences sum their rows, by `embedding_bag`.
    Gathers use index_select / masked_select: on the CPU they are 2-4x faster than
    advanced indexing (``x[idx]``, ``x[mask]``), which dominated this function's time."""
    norms = torch.linalg.vector_norm(G.float(), dim=1).square()
    first = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    sums = norms.index_select(0, rows.index_select(0, first))
    if scale is not None:
        sums = sums * scale.index_select(0, first).square()
    multi = counts > 1
    if bool(multi.any()):
        occ = torch.repeat_interleave(multi, counts, output_size=rows.numel())
        m_counts = counts.masked_select(multi)
        bags = torch.cat([m_counts.new_zeros(1), m_counts.cumsum(0)[:-1]])
        psw = None if scale is None else scale.masked_select(occ).to(G.dtype)
        g = F.embedding_bag(rows.masked_select(occ), G, bags, mode="sum", per_sample_weights=psw).float()
        sums.masked_scatter_(multi, torch.linalg.vector_norm(g, dim=1).square())  # no U x d temporary
    return sums


def row_sq_sums(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor], tables) -> dict[int, tuple[Tensor, Tensor]]:
    """Per table t in `tables`: its unique ids (ascending, int64) and, per id, the sum over
    the table's columns of the squared gradient summed over the id's occurrences (fp32) —
    RowWiseAdagrad's ``sum(g**2)`` before the mean. Per distinct width, one sort of the
    occurrences by row and one `embedding_bag` over the gradient rows (bags = unique rows),
    whatever the number of tables; tables no id touched get empty tensors. Occurrences are
    summed in input order within a row, so the result is the same run to run."""
    dev = grad_output.device
    tables = sorted(set(tables))
    out = {t: (torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.float32, device=dev))
           for t in tables}
    n = indices.numel()
    if n == 0:
        return out
    B = layout.batch_size(offsets)
    off = offsets.long()
    lengths = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=n)
    table = bag // max(B, 1)
    scale = _occurrence_scale(layout, table, bag, lengths, per_sample_weights) if layout.pooled else None
    hsc = layout.hash_size_cumsum.to(dev)
    for d in sorted({layout.dims[t] for t in tables}):
        group = [t for t in tables if layout.dims[t] == d]
        G, grow = _group_rows(layout, grad_output, offsets, bag, table, group, d)
        keep = torch.isin(table, torch.tensor(group, device=dev)) if len(group) < layout.num_tables else None
        g_table, g_ids, g_rows, g_scale = (table, indices.long(), grow, scale) if keep is None else \
            (table.masked_select(keep), indices.long().masked_select(keep), grow.masked_select(keep),
             None if scale is None else scale.masked_select(keep))
        if g_ids.numel() == 0:
            continue
        rows_sorted, perm = torch.sort((hsc.index_select(0, g_table) + g_ids).to(_key_dtype(layout)), stable=True)
        uniq, counts = torch.unique_consecutive(rows_sorted, return_counts=True)
        sums = _segment_sq_sums(G, g_rows.index_select(0, perm),
                                None if g_scale is None else g_scale.index_select(0, perm), counts)
        uniq = uniq.long()
        # unique keys ascend, so table t's are those in [hsc[t], hsc[t+1]): T+1 searches, not U
        bounds = torch.searchsorted(uniq, hsc).tolist()
        hsc_list = layout.hash_size_cumsum_list
        for t in group:
            out[t] = (uniq[bounds[t]:bounds[t + 1]] - hsc_list[t], sums[bounds[t]:bounds[t + 1]])
    return out
