"""Launch wrappers for the quantized-table kernels (quant_kernels.py), with the signatures of
torch_ref.quant_pooled_forward / quant_unpooled_forward.

One launch serves every table, whatever its type. Grids and block sizes are the float
wrappers' (ops.py): a program pools one bag, or decodes a block of one table's looked-up
rows (unpooled), `_fwd_block_n` ids per loop step and up to `_FWD_MAX_BLOCK_D` columns.
The per-table row sizes in bytes go to the device once per layout and device (`_row_bytes`).
Layouts must keep the scale and bias before the codes (`QuantLayout.qparams` "front", FBGEMM's
format); another raises ValueError rather than decode the wrong bytes.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import triton
from torch import Tensor

from ..layout import check_on_host, fault_record, packed, raise_if_flagged
from ..quant import QuantLayout
from . import quant_kernels
from .ops import _FWD_MAX_BLOCK_D, _NUM_WARPS, _block_d, _fwd_block_n, table_counts

_ROW_BYTES: "weakref.WeakKeyDictionary[QuantLayout, dict]" = weakref.WeakKeyDictionary()


def _row_bytes(layout: QuantLayout, device: torch.device) -> Tensor:
    """int64 [T] row sizes in bytes on `device`, built once per layout (layouts are immutable)."""
    per_device = _ROW_BYTES.setdefault(layout, {})
    if device not in per_device:
        per_device[device] = torch.tensor(layout.row_bytes, dtype=torch.int64, device=device)
    return per_device[device]


def _check_format(layout: QuantLayout) -> None:
    """The kernels read the scale and bias before the codes (FBGEMM's "front" format)."""
    if layout.qparams != "front":
        raise ValueError(f"fxrec's Triton quantized kernels read the 'front' qparams format (FBGEMM's), "
                         f"this layout's is {layout.qparams!r}")


def quant_pooled_forward(weights: Tensor, layout: QuantLayout, indices: Tensor, offsets: Tensor,
                         per_sample_weights: Optional[Tensor] = None,
                         output_dtype: torch.dtype = torch.float32, *, check_ids: bool = False) -> Tensor:
    """check_ids: check the ids and offsets in the kernel and raise check_inputs' error after
    it (one host sync), as ops.pooled_forward."""
    _check_format(layout)
    weights, indices, offsets, per_sample_weights = packed(weights, indices, offsets, per_sample_weights)
    B = layout.batch_size(offsets)
    dev = weights.device
    if B == 0 or indices.numel() == 0:  # every bag empty: zeros, without a launch
        if check_ids:
            check_on_host(layout, indices, offsets)
        return torch.zeros(B, layout.total_D, dtype=output_dtype, device=dev)
    out = torch.empty(B, layout.total_D, dtype=output_dtype, device=dev)
    block_d = _block_d(layout.max_D, _FWD_MAX_BLOCK_D)
    psw = per_sample_weights if per_sample_weights is not None else weights  # unread when absent
    record = fault_record(dev) if check_ids else out  # unread unless checking
    grid = (layout.num_tables * B, triton.cdiv(layout.max_D, block_d))
    quant_kernels.quant_pooled_forward_kernel[grid](
        weights, layout.weights_offsets.to(dev), _row_bytes(layout, dev), layout.weights_tys.to(dev),
        layout.D_offsets.to(dev), layout.is_mean.to(dev), indices, offsets, psw, out, B, layout.total_D,
        layout.rows_t.to(dev), indices.numel(), record,
        HAS_PSW=per_sample_weights is not None, CHECK=check_ids,
        BLOCK_N=_fwd_block_n(indices.numel(), layout.num_tables * B), BLOCK_D=block_d, num_warps=_NUM_WARPS)
    if check_ids:
        raise_if_flagged(record, layout, indices, offsets)
    return out


quant_pooled_forward.checks_ids = True  # QuantFusedEmbeddingBags passes check_ids instead of checking first


def quant_unpooled_forward(weights: Tensor, layout: QuantLayout, indices: Tensor, offsets: Tensor,
                           output_dtype: torch.dtype = torch.float32, *, check_ids: bool = False) -> Tensor:
    """check_ids: as quant_pooled_forward's (the offsets are checked before the launch)."""
    _check_format(layout)
    weights, indices, offsets = packed(weights, indices, offsets)
    B = layout.batch_size(offsets)
    T = layout.num_tables
    dev = weights.device
    counts = table_counts(layout, indices, offsets, check_ids)
    out_off = [0]
    for n, d in zip(counts, layout.dims):
        out_off.append(out_off[-1] + n * d)
    out = torch.empty(out_off[-1], dtype=output_dtype, device=dev)
    if out_off[-1] == 0:
        return out
    block_n = _fwd_block_n(indices.numel(), T)
    block_d = _block_d(layout.max_D, _FWD_MAX_BLOCK_D)
    record = fault_record(dev) if check_ids else out  # unread unless checking
    grid = (T, triton.cdiv(max(counts), block_n), triton.cdiv(layout.max_D, block_d))
    quant_kernels.quant_unpooled_forward_kernel[grid](
        weights, layout.weights_offsets.to(dev), _row_bytes(layout, dev), layout.weights_tys.to(dev),
        layout.D_offsets.to(dev), indices, offsets, torch.tensor(out_off, dtype=torch.int64, device=dev), out, B,
        layout.rows_t.to(dev), indices.numel(), record,
        CHECK=check_ids, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=_NUM_WARPS)
    if check_ids:
        raise_if_flagged(record, layout, indices, offsets)
    return out


quant_unpooled_forward.checks_ids = True
