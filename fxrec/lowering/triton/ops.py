"""Launch wrappers for the Triton kernels, with the registry's op signatures.

Index preparation for the backward (global rows, stable sort, unique) runs in torch
(`sparse_update.sort_occurrences`); one kernel launch then reduces and updates every
unique row of every table. When a row has more than `_BWD_CHUNK` occurrences (hot ids),
a first launch sums every row's occurrences in chunks, in order, and the update reduces
the chunks instead: still deterministic, and no row's program loops over a hot row alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..layout import TBELayout
from ..sparse_update import adam_row_scalars, sort_occurrences
from . import kernels

_OPT_CODE = {"sgd": 0, "rowwise_adagrad": 1, "adam": 2}
_FWD_BLOCK_N = 8  # ids gathered per step of a bag's loop
_BWD_BLOCK_N = 8  # occurrences reduced per step of a row's loop
_FWD_MAX_BLOCK_D = 128
MAX_DIM = 8192  # the backward keeps a whole row in one program
# Occurrences one backward program reduces at most: a hotter row (Zipf ids) is first summed in
# chunks by many programs, so one row cannot serialise the whole launch.
_BWD_CHUNK = 2048


def _block_d(max_d: int, cap: Optional[int] = None) -> int:
    block = triton.next_power_of_2(max_d)
    return min(block, cap) if cap else block


def pooled_forward(weights: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor,
                   per_sample_weights: Optional[Tensor] = None) -> Tensor:
    B = layout.batch_size(offsets)
    out = torch.empty(B, layout.total_D, dtype=weights.dtype, device=weights.device)
    if B == 0:
        return out
    dev = weights.device
    block_d = _block_d(layout.max_D, _FWD_MAX_BLOCK_D)
    psw = per_sample_weights if per_sample_weights is not None else weights  # unread when absent
    grid = (layout.num_tables * B, triton.cdiv(layout.max_D, block_d))
    kernels.pooled_forward_kernel[grid](
        weights, layout.weights_offsets.to(dev), layout.D_offsets.to(dev), layout.is_mean.to(dev),
        indices, offsets, psw, out, B, layout.total_D,
        HAS_PSW=per_sample_weights is not None, BLOCK_N=_FWD_BLOCK_N, BLOCK_D=block_d)
    return out


def unpooled_forward(weights: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor) -> Tensor:
    B = layout.batch_size(offsets)
    T = layout.num_tables
    bounds = offsets[::B].tolist() if B > 0 else [0] * (T + 1)  # one sync: the output's size
    counts = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    out_off = [0]
    for n, d in zip(counts, layout.dims):
        out_off.append(out_off[-1] + n * d)
    out = torch.empty(out_off[-1], dtype=weights.dtype, device=weights.device)
    if out_off[-1] == 0:
        return out
    dev = weights.device
    block_d = _block_d(layout.max_D, _FWD_MAX_BLOCK_D)
    grid = (T, triton.cdiv(max(counts), _FWD_BLOCK_N), triton.cdiv(layout.max_D, block_d))
    kernels.unpooled_forward_kernel[grid](
        weights, layout.weights_offsets.to(dev), layout.D_offsets.to(dev), indices, offsets,
        torch.tensor(out_off, dtype=torch.int64, device=dev), out, B,
        BLOCK_N=_FWD_BLOCK_N, BLOCK_D=block_d)
    return out


def backward_update(weights: Tensor, state: dict[str, Tensor], layout: TBELayout, optimizer,
                    grad_output: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor] = None, deterministic: bool = False) -> None:
    # Always deterministic: a stable sort and a fixed-order per-row reduction, no atomics.
    sg = sort_occurrences(layout, indices, offsets, per_sample_weights)
    if sg.num_unique == 0:
        return
    dev = weights.device
    step_size = bc2_sqrt = weights  # unread unless Adam
    beta1 = beta2 = 0.0
    if optimizer.name == "adam":
        step = state["step"][sg.uniq_global] + 1  # unique rows: no conflicting writes
        state["step"][sg.uniq_global] = step
        step_size, bc2_sqrt = adam_row_scalars(optimizer, step)
        beta1, beta2 = optimizer.betas
    block_d = _block_d(layout.max_D)
    grad_output = grad_output.contiguous()
    seg, src_off, scale, grad = sg.seg, sg.src_off, sg.scale, grad_output
    chunks = _hot_chunks(sg.seg, _BWD_CHUNK)
    if chunks is not None:  # rows reduce their chunks' partial sums, not their occurrences
        chunk_row, first, last, seg = chunks
        grad = torch.empty(chunk_row.numel(), block_d, dtype=torch.float32, device=dev)
        kernels.segment_sum_kernel[(chunk_row.numel(),)](
            layout.D_offsets.to(dev), sg.uniq_table, chunk_row, first, last, src_off, scale, grad_output,
            grad, BLOCK_N=_BWD_BLOCK_N, BLOCK_D=block_d)
        src_off = torch.arange(chunk_row.numel(), device=dev) * block_d
        scale = torch.ones(chunk_row.numel(), dtype=torch.float32, device=dev)
    kernels.backward_update_kernel[(sg.num_unique,)](
        weights, state.get("momentum", weights), state.get("exp_avg", weights),
        state.get("exp_avg_sq", weights), step_size, bc2_sqrt,
        layout.weights_offsets.to(dev), layout.D_offsets.to(dev), layout.hash_size_cumsum.to(dev),
        sg.uniq_table, sg.uniq_row, seg, src_off, scale, grad,
        float(optimizer.lr), float(getattr(optimizer, "eps", 0.0)), 1.0 - beta1, beta2, 1.0 - beta2,
        OPT=_OPT_CODE[optimizer.name], BLOCK_N=_BWD_BLOCK_N, BLOCK_D=block_d)


def _hot_chunks(seg: Tensor, chunk: int):
    """None when no unique row has more than `chunk` occurrences; else every row's
    occurrences cut in chunks of at most `chunk`, in order: (row of each chunk, its first and
    end occurrence, and per row the range of its chunks as a [U+1] segment array)."""
    counts = seg[1:] - seg[:-1]
    if counts.numel() == 0 or int(counts.max()) <= chunk:  # one host sync
        return None
    per_row = (counts + chunk - 1) // chunk
    chunk_seg = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
    total = int(chunk_seg[-1])
    row = torch.repeat_interleave(torch.arange(counts.numel(), device=seg.device), per_row, output_size=total)
    first = seg[row] + (torch.arange(total, device=seg.device) - chunk_seg[row]) * chunk
    last = torch.minimum(first + chunk, seg[row + 1])
    return row, first, last, chunk_seg
