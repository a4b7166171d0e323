"""Plain-torch kernels: always correct, always registered, the last resort.

Forward: F.embedding_bag per table (it accumulates fp16/bf16 in fp32; with per-sample
weights, low-precision tables gather the touched rows to pool them in fp32). Backward + update: per table, the occurrences' gradients are summed per
unique id (index_add_, or in deterministic mode a stable sort + segment_reduce, which
adds in a fixed order on every device), then the optimizer updates only those rows.
Arithmetic runs in fp32, or in fp64 for fp64 tables (`compute_dtype`): a user who chose
fp64 gets fp64 sums and updates (the other kernels refuse fp64, so it always comes here);
the optimizer state stays fp32 (fxrec/optim.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad, decay_mode

from .layout import TBELayout
from .quant import QuantLayout, dequantize_rows
from .registry import Problem, register_kernel
from .sparse_update import ROW_STATE, adam_row_scalars


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a table's weighted sums, gradients and updates are computed in: fp32, or the
    table's own where it is wider (fp64), never rounding a user's fp64 table to fp32."""
    return torch.promote_types(dtype, torch.float32)


def _bounds(offsets: Tensor, B: int, T: int) -> list[int]:
    # One host sync: where each table's ids start in `indices`.
    return offsets[::B].tolist() if B > 0 else [0] * (T + 1)


def pooled_forward(weights: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor,
                   per_sample_weights: Optional[Tensor] = None) -> Tensor:
    B = layout.batch_size(offsets)
    bounds = _bounds(offsets, B, layout.num_tables)
    outs = []
    for t, table in enumerate(layout.split(weights)):
        s, e = bounds[t], bounds[t + 1]
        ids = indices[s:e]
        bag_off = (offsets[t * B:(t + 1) * B] - s).to(ids.dtype)
        mean = layout.poolings[t] == "mean"
        if per_sample_weights is None:
            # embedding_bag accumulates fp16/bf16 in fp32 on its own and rounds once to the
            # table's dtype, the output's: no round trip through fp32 (two more passes)
            outs.append(F.embedding_bag(ids, table, bag_off, mode="mean" if mean else "sum"))
            continue
        acc = compute_dtype(table.dtype)
        if table.dtype != acc:  # fp32 weights for fp32 per-sample weights, without copying the table
            table, ids = table[ids].to(acc), torch.arange(e - s, device=ids.device, dtype=ids.dtype)
        out = F.embedding_bag(ids, table, bag_off, mode="sum", per_sample_weights=per_sample_weights[s:e].to(acc))
        if mean:
            lengths = offsets[t * B + 1:(t + 1) * B + 1] - offsets[t * B:(t + 1) * B]
            out = out / lengths.clamp(min=1).unsqueeze(1).to(acc)
        outs.append(out)
    if B == 0:
        return weights.new_zeros(0, layout.total_D)
    return torch.cat([o.to(weights.dtype) for o in outs], dim=1)  # fp32 only where weighted


def unpooled_forward(weights: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor) -> Tensor:
    B = layout.batch_size(offsets)
    bounds = _bounds(offsets, B, layout.num_tables)
    outs = [table[indices[s:e]].reshape(-1)
            for table, s, e in zip(layout.split(weights), bounds[:-1], bounds[1:])]
    return torch.cat(outs)


def per_sample_weights_grad(weights: Tensor, layout: TBELayout, grad_output: Tensor,
                            indices: Tensor, offsets: Tensor) -> Tensor:
    """[N] in `compute_dtype` (fp32; fp64 for fp64 weights): d loss / d per_sample_weight[i] =
    <grad of i's bag, i's row> (/ bag length for mean). Reads only the looked-up rows; call
    it before the weights are updated."""
    B = layout.batch_size(offsets)
    bounds = _bounds(offsets, B, layout.num_tables)
    acc = compute_dtype(weights.dtype)
    out = torch.zeros(indices.numel(), dtype=acc, device=indices.device)
    for t, table in enumerate(layout.split(weights)):
        s, e = bounds[t], bounds[t + 1]
        if e > s:
            # the occurrence gradient with unit weights, dotted with the row it looked up
            g = _occurrence_grads(layout, t, grad_output, offsets, B, s, e, 0, None, acc)
            out[s:e] = (g * table[indices[s:e]].to(acc)).sum(dim=1)
    return out


def _occurrence_grads(layout: TBELayout, t: int, grad_output: Tensor, offsets: Tensor, B: int,
                      s: int, e: int, unpooled_start: int, psw: Optional[Tensor],
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """[e - s, dim_t] in `dtype`: the gradient each occurrence of table t sends to its row."""
    d0, d1 = layout.D_offsets_list[t], layout.D_offsets_list[t + 1]
    if not layout.pooled:
        return grad_output[unpooled_start:unpooled_start + (e - s) * (d1 - d0)].view(e - s, d1 - d0).to(dtype)
    lengths = (offsets[t * B + 1:(t + 1) * B + 1] - offsets[t * B:(t + 1) * B]).long()
    bag = torch.repeat_interleave(torch.arange(B, device=grad_output.device), lengths, output_size=e - s)
    g = grad_output[bag, d0:d1].to(dtype)
    scale = psw[s:e].to(dtype) if psw is not None else None
    if layout.poolings[t] == "mean":
        inv = 1.0 / lengths.clamp(min=1)[bag].to(dtype)
        scale = inv if scale is None else scale * inv
    return g if scale is None else g * scale.unsqueeze(1)


def _aggregate(ids: Tensor, grads: Tensor, deterministic: bool) -> tuple[Tensor, Tensor]:
    """Unique ids (ascending) and the sum of their occurrences' gradients."""
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    if deterministic:
        order = torch.sort(inverse, stable=True).indices
        return uniq, torch.segment_reduce(grads[order], "sum", lengths=counts)
    return uniq, grads.new_zeros(uniq.numel(), grads.shape[1]).index_add_(0, inverse, grads)


def apply_update(optimizer, table: Tensor, state: dict[str, Tensor], rows: Tensor, g: Tensor) -> None:
    """Update `table[rows]` (unique rows) and its state slices with summed gradients g, computed
    in `compute_dtype` (fp32; fp64 for an fp64 table, whose fp32 state is read widened)."""
    acc = compute_dtype(table.dtype)
    w, g = table[rows].to(acc), g.to(acc)
    mode = decay_mode(optimizer)  # fxrec.optim.DECAY_MODES
    w0 = w
    if mode == 1:  # L2: the optimizer reads the decayed gradient
        g = g + optimizer.weight_decay * w
    if isinstance(optimizer, SGD):
        w = w - optimizer.lr * g
    elif isinstance(optimizer, RowWiseAdagrad):
        mom = state["momentum"][rows].to(acc) + (g * g).mean(dim=1)
        state["momentum"][rows] = mom.to(state["momentum"].dtype)
        w = w - (optimizer.lr / (mom.sqrt() + optimizer.eps)).unsqueeze(1) * g
    elif isinstance(optimizer, Adagrad):  # torch.optim.Adagrad's addcmul_ / sqrt().add_(eps) / addcdiv_
        s = state["sum"][rows].to(acc) + g * g
        state["sum"][rows] = s.to(state["sum"].dtype)
        w = w - optimizer.lr * (g / (s.sqrt() + optimizer.eps))
    elif isinstance(optimizer, Adam):
        beta1, beta2 = optimizer.betas
        step = state["step"][rows] + 1
        state["step"][rows] = step
        m = state["exp_avg"][rows].to(acc).lerp(g, 1 - beta1)
        v = state["exp_avg_sq"][rows].to(acc) * beta2 + (1 - beta2) * g * g
        state["exp_avg"][rows] = m.to(state["exp_avg"].dtype)
        state["exp_avg_sq"][rows] = v.to(state["exp_avg_sq"].dtype)
        step_size, bc2_sqrt = adam_row_scalars(optimizer, step, acc)
        denom = v.sqrt() / bc2_sqrt.unsqueeze(1) + optimizer.eps
        w = w - step_size.unsqueeze(1) * (m / denom)
    else:
        raise ValueError(f"unsupported sparse optimizer {optimizer!r}")
    if mode == 2:  # decoupled: the row shrinks beside the step
        w = w - (optimizer.lr * optimizer.weight_decay) * w0
    table[rows] = w.to(table.dtype)


def _table_state(layout: TBELayout, state: dict[str, Tensor], t: int) -> dict[str, Tensor]:
    """Table t's slice of each state tensor: per-row ones by row, per-element ones like the weights."""
    h0, h1 = layout.hash_size_cumsum_list[t], layout.hash_size_cumsum_list[t + 1]
    return {key: value[h0:h1] if key in ROW_STATE else layout.split(value)[t]
            for key, value in state.items()}


def table_grads(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor] = None, deterministic: bool = False,
                tables: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32
                ) -> dict[int, tuple[Tensor, Tensor]]:
    """Per table t (all, or those in `tables`): its unique ids (ascending, int64) and their
    summed gradients ``U x dim_t`` in `dtype` (`compute_dtype` of the weights: fp32, or fp64);
    a table no id touched gets empty tensors."""
    B = layout.batch_size(offsets)
    bounds = _bounds(offsets, B, layout.num_tables)
    wanted = set(range(layout.num_tables) if tables is None else tables)
    out, start = {}, 0  # start: running element offset of table t's block in an unpooled grad_output
    for t in range(layout.num_tables):
        s, e = bounds[t], bounds[t + 1]
        if t in wanted:
            if e > s:
                g = _occurrence_grads(layout, t, grad_output, offsets, B, s, e, start, per_sample_weights, dtype)
                out[t] = _aggregate(indices[s:e].long(), g, deterministic)
            else:
                out[t] = (indices.new_zeros(0, dtype=torch.int64),
                          grad_output.new_zeros(0, layout.dims[t], dtype=dtype))
        start += (e - s) * layout.dims[t]
    return out


def backward_update(weights: Tensor, state: dict[str, Tensor], layout: TBELayout, optimizer,
                    grad_output: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor] = None, deterministic: bool = False) -> None:
    tables = layout.split(weights)
    for t, (rows, g) in table_grads(layout, grad_output, indices, offsets, per_sample_weights,
                                    deterministic, dtype=compute_dtype(weights.dtype)).items():
        if rows.numel():
            apply_update(optimizer, tables[t], _table_state(layout, state, t), rows, g)


# ------------------------------------------------------------------ quantized tables (inference)
# torch's own rowwise quantized bag ops (CPU), by type; they read the "back" format (quant.py)
_ATEN_BAGS = {"int8": "embedding_bag_byte_rowwise_offsets", "int4": "embedding_bag_4bit_rowwise_offsets",
              "int2": "embedding_bag_2bit_rowwise_offsets"}


def _quant_bags(table: Tensor, qtype, dim: int, qparams: str, ids: Tensor, bag_off: Tensor, mean: bool,
                psw: Optional[Tensor]) -> Tensor:
    """fp32 pooled bags of one quantized table (``rows x row_bytes`` uint8): torch's rowwise
    op where the format is its own, else the touched rows decoded to fp32 and pooled in order.
    Mean: the (weighted) sum over the bag's length, 0 for an empty bag."""
    if qparams == "back" and qtype.name in _ATEN_BAGS and table.device.type == "cpu":  # they always sum
        op = getattr(torch.ops.quantized, _ATEN_BAGS[qtype.name])
        out = op(table, ids, bag_off.to(ids.dtype), False, 0, False, psw, None, False)
    elif qtype.name in ("fp32", "fp16"):  # raw values: a typed view of the table, nothing to decode
        values = table.view(torch.float32 if qtype.name == "fp32" else torch.float16)[:, :dim]
        if qtype.name == "fp32" and values.is_contiguous():  # unpadded rows: pool straight from the table
            out = F.embedding_bag(ids, values, bag_off, mode="sum", per_sample_weights=psw)
        else:  # gather the touched rows (fp16 pooled in fp32; padded rows would make a table-wide copy)
            rows = values.index_select(0, ids.long()).float()
            out = F.embedding_bag(torch.arange(ids.numel(), device=ids.device), rows, bag_off, mode="sum",
                                  per_sample_weights=psw)
    else:
        rows = dequantize_rows(table.index_select(0, ids.long()), qtype, dim, qparams)
        local = torch.arange(ids.numel(), device=ids.device)
        out = F.embedding_bag(local, rows, bag_off, mode="sum", per_sample_weights=psw)
    if mean:
        ends = torch.cat([bag_off[1:], bag_off.new_full((1,), ids.numel())])
        out = out / (ends - bag_off).clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def quant_pooled_forward(weights: Tensor, layout: QuantLayout, indices: Tensor, offsets: Tensor,
                         per_sample_weights: Optional[Tensor] = None,
                         output_dtype: torch.dtype = torch.float32) -> Tensor:
    """Per table: torch's rowwise quantized bag op (the "back" format), else the touched
    rows decoded to fp32 and pooled in order."""
    B = layout.batch_size(offsets)
    if B == 0:
        return torch.zeros(0, layout.total_D, dtype=output_dtype, device=weights.device)
    bounds = _bounds(offsets, B, layout.num_tables)
    outs = []
    for t, table in enumerate(layout.split(weights)):
        s, e = bounds[t], bounds[t + 1]
        mean = layout.poolings[t] == "mean"
        psw = None if per_sample_weights is None else per_sample_weights[s:e].float()
        outs.append(_quant_bags(table, layout.types[t], layout.dims[t], layout.qparams, indices[s:e],
                                offsets[t * B:(t + 1) * B] - s, mean, psw))
    return torch.cat(outs, dim=1).to(output_dtype)


def quant_unpooled_forward(weights: Tensor, layout: QuantLayout, indices: Tensor, offsets: Tensor,
                           output_dtype: torch.dtype = torch.float32) -> Tensor:
    """Each id's row as a bag of one (the same per-table paths as the pooled op)."""
    B = layout.batch_size(offsets)
    bounds = _bounds(offsets, B, layout.num_tables)
    outs = []
    for table, q, d, s, e in zip(layout.split(weights), layout.types, layout.dims, bounds[:-1], bounds[1:]):
        ids = indices[s:e]
        if ids.numel() == 0:
            continue
        if q.name in ("fp32", "fp16"):  # raw values: gather from a typed view
            values = table.view(torch.float32 if q.name == "fp32" else torch.float16)[:, :d]
            outs.append(values.index_select(0, ids.long()).float().reshape(-1))
            continue
        one = torch.arange(ids.numel(), device=ids.device, dtype=ids.dtype)
        outs.append(_quant_bags(table, q, d, layout.qparams, ids, one, False, None).reshape(-1))
    if not outs:
        return torch.zeros(0, dtype=output_dtype, device=weights.device)
    return torch.cat(outs).to(output_dtype)


def _accept(problem: Problem) -> Optional[str]:
    return None


for _op, _impl in (("pooled_forward", pooled_forward), ("unpooled_forward", unpooled_forward),
                   ("backward_update", backward_update), ("quant_pooled_forward", quant_pooled_forward),
                   ("quant_unpooled_forward", quant_unpooled_forward)):
    register_kernel(_op, "torch", _impl, _accept)
