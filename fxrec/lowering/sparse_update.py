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
    global_row = hsc[table] + indices.long()
    if layout.pooled:
        src_off = (bag - table * B) * layout.total_D + d_off[table]
        scale = (per_sample_weights.float() if per_sample_weights is not None
                 else torch.ones(n, dtype=torch.float32, device=dev))
        mean = layout.is_mean.to(dev)[table].bool()
        scale = torch.where(mean, scale / lengths[bag].clamp(min=1).float(), scale)
    else:
        first = off[::B][:-1] if B > 0 else off.new_zeros(layout.num_tables)
        src_off = layout.unpooled_offsets(offsets)[table] + (torch.arange(n, device=dev) - first[table]) * dims[table]
        scale = torch.ones(n, dtype=torch.float32, device=dev)
    sorted_rows, perm = torch.sort(global_row, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    seg = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    uniq_table = table[perm][seg[:-1]]
    return SortedGrads(uniq, uniq_table, uniq - hsc[uniq_table], seg,
                       src_off[perm].contiguous(), scale[perm].contiguous())
