"""FBGEMM's table-batched embedding ops (fbgemm_gpu), on our TBE layout as is.

Registers nothing when fbgemm_gpu cannot be imported. Only the CPU ops are wrapped (the
build installed here is fbgemm-gpu-cpu 1.8.0):

- pooled_forward: ``fbgemm::split_embedding_codegen_forward_cpu``;
- unpooled_forward: ``fbgemm::split_embedding_nobag_codegen_forward_cpu`` (one dim for
  all tables, so only layouts with equal dims);
- backward_update: ``fbgemm::split_embedding_backward_codegen_{sgd,rowwise_adagrad,adagrad}_cpu``
  (the update is applied in place, duplicates aggregated per row first), unpooled tables
  too, each id as a bag of one (`_as_bags_of_one`: fbgemm's nobag backward is ~17x slower
  on the same ids). The op runs on one thread; with torch on N intra-op threads it is called
  on N runs of tables at once.

What the checker declines, and why (found by testing 1.8.0 against torch_ref):
- bf16 weights: the CPU kernels are not instantiated for BFloat16;
- weight decay: 1.8.0's CPU rowwise_adagrad takes weight_decay and its mode and applies
  neither (the row and its accumulator come out as without), and its sgd and adagrad take none;
- Adam: fbgemm 1.8.0 says "Optimizer adam is not supported in CPU mode" (no CPU backward;
  on GPU its Adam also bias-corrects with one global iteration count, not our per-row
  step). Its CPU backwards exist for sgd, adagrad, rowwise_adagrad (+ with_counter) and
  rowwise_rmsprop_ar; fxrec's optimizers map to sgd, rowwise_adagrad and adagrad;
- (served, not declined: fbgemm takes one pooling mode per call, and its "mean" with
  per-sample weights disagrees with ours, weighted sum / bag length, in the fp16 forward
  and the backward; sum and mean tables in one call, or a weighted mean, are pooled by sum
  and the mean tables' columns scaled by 1 / bag length, forward and gradient alike:
  `_mean_scale`)
- fp16 *forward* unless requested explicitly: it is correct but ~10x slower than torch's
  F.embedding_bag on this CPU (bench/kernels.py --cpu: 76 ms vs 5.7 ms), while the fp16
  backward is as fast as torch's, so fp16 modules get a torch forward and an fbgemm update;
- the pooled forward when torch runs on 2 or more intra-op threads, unless requested: fbgemm's
  CPU forward uses one thread whatever torch.get_num_threads() says, and torch's per-table
  embedding_bag overtakes it from 2 threads (bench/kernels.py --cpu --threads 2). The
  unpooled forward (2-6x ahead on one thread) and the backward (5-10x) stay fbgemm's.
The CPU backward is deterministic (per-row reductions in a fixed order), so it also
serves the deterministic mode.

Quantized tables (inference, fxrec/lowering/quant.py's "front" format, which is fbgemm's
IntNBit layout): quant_pooled_forward and quant_unpooled_forward call
``fbgemm::int_nbit_split_embedding_codegen_lookup_function`` on our uint8 buffer, tables of
mixed types (fp32, fp16, int8, int4, int2) in one call; unpooled needs one dim for all tables.
When every table is int8 or fp32, served only on request: torch's own ops (kernel "torch",
the "back" format) are then faster on this CPU (bench/inference.py: 1.1-1.6x for int8, 1.2-1.3x
for fp32); fbgemm's op stays ahead for fp16, int4 and int2 tables and mixes of types.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor

from .registry import Problem, mark_unavailable, register_kernel

try:
    import fbgemm_gpu  # noqa: F401  (loads the torch.ops.fbgemm kernels)
    _ops = torch.ops.fbgemm
    _ops.split_embedding_codegen_forward_cpu  # noqa: B018  (fails early if the op is missing)
    AVAILABLE = True
except Exception as e:  # ImportError, or an fbgemm built against another torch (OSError, RuntimeError)
    AVAILABLE = False
    mark_unavailable("fbgemm", f"fbgemm_gpu import failed: {type(e).__name__}: {e}")

_HOST = 3  # fbgemm's EmbeddingLocation.HOST
_POOLING_MODE = {"sum": 0, "mean": 1}
_SPARSE_TYPE = {torch.float32: 0, torch.float16: 1}  # fbgemm's SparseType.as_int()
_OPTIMIZERS = ("sgd", "rowwise_adagrad", "adagrad")


def _placements(layout) -> Tensor:
    return torch.full((layout.num_tables,), _HOST, dtype=torch.int32)


def _hash_bits(layout) -> int:
    return int(math.log2(max(layout.total_rows, 1))) + 1


def _native_mode(layout, weighted: bool) -> Optional[int]:
    """fbgemm's own pooling mode where it computes ours: one pooling for all tables, and not
    mean with per-sample weights (fbgemm 1.8.0's fp16 forward and backward disagree with
    ``sum(w * row) / length``). None: pool by sum and scale the mean tables (`_mean_scale`)."""
    modes = set(layout.poolings)
    if len(modes) == 1 and not (weighted and "mean" in modes):
        return _POOLING_MODE[layout.poolings[0]]
    return None


def _mean_scale(layout, offsets: Tensor) -> Tensor:
    """``B x total_D``: 1 / bag length (1 for an empty bag) in the mean tables' columns, 1 in
    the sum tables'. Times the summed output it is the mean; times the gradient, the mean's
    gradient for a sum-pooled backward."""
    B = layout.batch_size(offsets)
    off = offsets.long()
    lengths = (off[1:] - off[:-1]).view(layout.num_tables, B)
    mean = torch.tensor([p == "mean" for p in layout.poolings], device=offsets.device)
    per_table = torch.where(mean.unsqueeze(1), 1.0 / lengths.clamp(min=1).float(), 1.0)
    column_table = torch.repeat_interleave(torch.arange(layout.num_tables, device=offsets.device),
                                           torch.tensor(layout.dims, device=offsets.device))
    return per_table.index_select(0, column_table).t()


def pooled_forward(weights: Tensor, layout, indices: Tensor, offsets: Tensor,
                   per_sample_weights: Optional[Tensor] = None) -> Tensor:
    psw = None if per_sample_weights is None else per_sample_weights.float()
    mode = _native_mode(layout, psw is not None)
    out = _ops.split_embedding_codegen_forward_cpu(
        weights, layout.weights_offsets, layout.D_offsets, layout.total_D, layout.hash_size_cumsum,
        indices, offsets.to(indices.dtype), _POOLING_MODE["sum"] if mode is None else mode, psw,
        _SPARSE_TYPE[weights.dtype])
    if mode is None:  # sum and mean tables in one call, or a weighted mean
        out = out * _mean_scale(layout, offsets).to(out.dtype)
    return out


def unpooled_forward(weights: Tensor, layout, indices: Tensor, offsets: Tensor) -> Tensor:
    out = _ops.split_embedding_nobag_codegen_forward_cpu(
        weights, layout.weights_offsets, layout.dims[0], layout.hash_size_cumsum,
        indices, offsets.to(indices.dtype), _SPARSE_TYPE[weights.dtype])
    return out.reshape(-1)


def bag_sums(G: Tensor, rows: Tensor, scale: Optional[Tensor], bag_offsets: Tensor, lists: int) -> Tensor:
    """fp32 ``B x (lists * d)``: bag b of list i (``bag_offsets``, lists-major, B bags each)
    summed over the rows of the fp32 ``m x d`` matrix G it names, each times its `scale`
    (None: 1); list i fills columns ``i*d:(i+1)*d``. The pooled forward with G as every
    list's table: a gather-sum that on this CPU takes half the time of torch's embedding_bag
    over the same rows (sparse_update's bags of one)."""
    m, d = G.shape
    dev = G.device
    return _ops.split_embedding_codegen_forward_cpu(
        G.contiguous().view(-1), torch.zeros(lists, dtype=torch.int64, device=dev),
        torch.arange(lists + 1, dtype=torch.int32, device=dev) * d, lists * d,
        torch.arange(lists + 1, dtype=torch.int64, device=dev) * m, rows, bag_offsets.to(rows.dtype),
        _POOLING_MODE["sum"], None if scale is None else scale.float(), _SPARSE_TYPE[torch.float32])


def _table_runs(layout, offsets: Tensor, parts: int) -> list[tuple[int, int]]:
    """Up to `parts` runs ``[t0, t1)`` of consecutive tables, cut where their work (ids, plus
    one per table) reaches equal shares (one host sync: each table's first id)."""
    T = layout.num_tables
    B = layout.batch_size(offsets)
    if parts <= 1 or T <= 1 or B == 0:
        return [(0, T)]
    starts = offsets[::B].tolist()  # T + 1 values: table t's ids are starts[t]:starts[t + 1]
    work = [s - starts[0] + t for t, s in enumerate(starts)]  # cumulative, before table t
    runs, t0 = [], 0
    for k in range(1, parts):
        target = work[-1] * k / parts
        t1 = next(t for t in range(T + 1) if t == T or work[t] >= target)
        if t1 > 0 and target - work[t1 - 1] < work[t1] - target:  # the cut before is nearer
            t1 -= 1
        t1 = max(t0 + 1, min(T - (parts - k), t1))
        if t1 > t0 and t1 < T:
            runs.append((t0, t1))
            t0 = t1
    return runs + [(t0, T)]


_POOL: tuple = (None, 0, 0)  # (ThreadPoolExecutor, its workers, the pid that made it)


def _in_parallel(calls: list) -> None:
    """Run the zero-argument `calls` on threads of a shared pool (fbgemm's CPU ops release
    the GIL), one per call; the first exception propagates."""
    global _POOL
    if len(calls) == 1:
        calls[0]()
        return
    pool, workers, pid = _POOL
    if pool is None or workers < len(calls) or pid != os.getpid():  # a forked child has no threads
        pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="fxrec-fbgemm")
        _POOL = (pool, len(calls), os.getpid())
    for future in [pool.submit(c) for c in calls]:
        future.result()


def _as_bags_of_one(layout, grad: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """An unpooled update as a pooled one: each id its own bag of one (sum pooling), so that
    fbgemm's pooled backward serves it, ~17x faster on this CPU than its nobag backward on
    the same ids (26 tables x 4096 ids, dim 64: 148 ms against 8.7 ms, bench/overheads.py
    before and after, bench/results/overheads_cpu.txt), for the same update.
    Returns the gradient as ``B' x sum(dims)`` rows (B' = the most ids of a table; a table's
    bags past its own ids are empty, their rows zero) and the T*B'+1 offsets."""
    T = layout.num_tables
    B = layout.batch_size(offsets)
    bounds = offsets[::B].long() if B else torch.zeros(T + 1, dtype=torch.long, device=offsets.device)
    counts = bounds[1:] - bounds[:-1]
    n = counts.tolist()
    width = max(n, default=0)
    if len(set(n)) == 1 and len(set(layout.dims)) == 1:  # equal tables: a transpose of the blocks
        rows = grad.view(T, width, layout.dims[0]).transpose(0, 1).reshape(width, T * layout.dims[0])
    else:
        rows = grad.new_zeros(width, layout.D_offsets_list[-1])
        start = 0  # table t's block of the flat gradient: its n[t] rows of dims[t]
        for t, (c, d) in enumerate(zip(n, layout.dims)):
            rows[:c, layout.D_offsets_list[t]:layout.D_offsets_list[t + 1]] = grad[start:start + c * d].view(c, d)
            start += c * d
    lengths = (torch.arange(width, device=offsets.device) < counts.unsqueeze(1)).reshape(-1)
    bags = torch.cat([lengths.new_zeros(1, dtype=torch.long), lengths.long().cumsum(0)]).to(offsets.dtype)
    return rows.contiguous(), bags


def backward_update(weights: Tensor, state: dict[str, Tensor], layout, optimizer,
                    grad_output: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor] = None, deterministic: bool = False) -> None:
    """The fused update, on torch's intra-op threads: fbgemm's CPU backward runs on one
    thread, so with N threads it is called on N runs of tables at once (tables are updated
    independently: the result is the same bits as one call)."""
    lr = torch.tensor(float(optimizer.lr), dtype=torch.float32)
    offsets = offsets.to(indices.dtype)
    grad = grad_output.to(weights.dtype).contiguous()
    psw = None if per_sample_weights is None else per_sample_weights.float()
    mode = _POOLING_MODE["sum"]
    if not layout.pooled:
        grad, offsets = _as_bags_of_one(layout, grad, offsets)
    else:
        mode = _native_mode(layout, psw is not None)
        if mode is None:  # the mean tables' gradient, for a sum-pooled backward (`_mean_scale`)
            mode = _POOLING_MODE["sum"]
            grad = (grad * _mean_scale(layout, offsets).to(grad.dtype)).contiguous()
    B = layout.batch_size(offsets)

    def run(t0: int, t1: int) -> None:
        # Every table argument is cut to the run; weights, grad, indices and per-sample weights
        # stay whole, as the cut offsets and D/weights offsets index them absolutely.
        plc = torch.full((t1 - t0,), _HOST, dtype=torch.int32)
        opt_args: tuple = (lr,)
        if optimizer.name == "rowwise_adagrad":
            # momentum is in global-row order: table t's slice starts at hash_size_cumsum[t]
            opt_args = (state["momentum"], plc, layout.hash_size_cumsum[t0:t1].contiguous(), lr,
                        float(optimizer.eps), 0.0, 0, 0.0)
        elif optimizer.name == "adagrad":
            # the accumulator is laid out like the weights: the same offsets index it
            opt_args = (state["sum"], plc, layout.weights_offsets[t0:t1].contiguous(), lr, float(optimizer.eps))
        w_off, hsc = layout.weights_offsets[t0:t1].contiguous(), layout.hash_size_cumsum[t0:t1 + 1].contiguous()
        off = offsets[t0 * B:t1 * B + 1]
        op = getattr(_ops, f"split_embedding_backward_codegen_{optimizer.name}_cpu")
        head = (grad, weights, plc, w_off, layout.D_offsets[t0:t1 + 1].contiguous(), layout.max_D, hsc,
                _hash_bits(layout), indices, off, mode, psw, False)
        op(*head, *opt_args)

    runs = _table_runs(layout, offsets, min(torch.get_num_threads(), layout.num_tables))
    _in_parallel([lambda r=r: run(*r) for r in runs])


_OUTPUT_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 5}  # SparseType.as_int()


def _nbit(weights: Tensor, layout, indices: Tensor, offsets: Tensor, pooling_mode: int, total_D: int,
          per_sample_weights: Optional[Tensor], output_dtype: torch.dtype) -> Tensor:
    psw = None if per_sample_weights is None else per_sample_weights.float()
    return _ops.int_nbit_split_embedding_codegen_lookup_function(
        weights, torch.empty(0, dtype=torch.uint8), _placements(layout), layout.weights_offsets, layout.weights_tys,
        layout.D_offsets, total_D, layout.max_dim("int2"), layout.max_dim("int4"), layout.max_dim("int8"),
        layout.max_dim("fp16"), layout.max_dim("fp32"), indices, offsets.to(indices.dtype), pooling_mode, psw,
        _OUTPUT_TYPE[output_dtype], None, None, layout.row_alignment)


def quant_pooled_forward(weights: Tensor, layout, indices: Tensor, offsets: Tensor,
                         per_sample_weights: Optional[Tensor] = None,
                         output_dtype: torch.dtype = torch.float32) -> Tensor:
    return _nbit(weights, layout, indices, offsets, _POOLING_MODE[layout.poolings[0]], layout.total_D,
                 per_sample_weights, output_dtype)


def quant_unpooled_forward(weights: Tensor, layout, indices: Tensor, offsets: Tensor,
                           output_dtype: torch.dtype = torch.float32) -> Tensor:
    out = _nbit(weights, layout, indices, offsets, 2, layout.dims[0], None, output_dtype)  # 2: PoolingMode.NONE
    return out.reshape(-1)


def _check_quant(p: Problem) -> Optional[str]:
    if p.device != "cpu":
        return f"only fbgemm's CPU ops are wrapped, device is {p.device}"
    if p.qparams != "front":
        return f"reads the 'front' row format (scale and bias before the codes), not {p.qparams!r}"
    if not p.explicit and set(p.weight_types) <= {"int8", "fp32"}:
        return "torch's rowwise ops are faster for int8 and fp32 tables on the CPU; served only on request"
    if p.output_dtype not in _OUTPUT_TYPE:
        return f"output {p.output_dtype} unsupported (fbgemm: float32, float16, bfloat16)"
    return None


def _check_quant_pooled(p: Problem) -> Optional[str]:
    if len(set(p.poolings)) != 1 or p.poolings[0] not in _POOLING_MODE:
        return f"needs one pooling (sum or mean) for all tables, got {sorted(set(p.poolings))}"
    return _check_quant(p)


def _check_quant_unpooled(p: Problem) -> Optional[str]:
    if len(set(p.dims)) != 1:
        return f"unpooled lookups need one dim for all tables, got {sorted(set(p.dims))}"
    return _check_quant(p)


def _check_common(p: Problem) -> Optional[str]:
    if p.device != "cpu":
        return f"only fbgemm's CPU ops are wrapped, device is {p.device}"
    if p.weight_dtype not in _SPARSE_TYPE:
        return f"weights {p.weight_dtype} unsupported (fbgemm CPU: float32, float16)"
    return None


def _check_forward(p: Problem) -> Optional[str]:
    if p.weight_dtype == torch.float16 and not p.explicit:
        return "the fp16 CPU forward is ~10x slower than torch's embedding_bag; served only on request"
    return None


def _check_pooled_forward(p: Problem) -> Optional[str]:
    if p.threads > 1 and not p.explicit:
        return (f"the pooled CPU forward runs on one thread, while torch's embedding_bag uses all {p.threads}: "
                f"slower from 2 threads on; served only on request")
    return _check_forward(p) or _check_pooled(p)


def _check_pooled(p: Problem) -> Optional[str]:
    if not set(p.poolings) <= set(_POOLING_MODE):
        return f"pools by sum or mean only, got {sorted(set(p.poolings))}"
    return _check_common(p)


def _check_unpooled(p: Problem) -> Optional[str]:
    if len(set(p.dims)) != 1:
        return f"unpooled lookups need one dim for all tables, got {sorted(set(p.dims))}"
    return _check_common(p)


def _check_backward(p: Problem) -> Optional[str]:
    if p.optimizer not in _OPTIMIZERS:
        return f"optimizer {p.optimizer!r} unsupported (fbgemm CPU: {', '.join(_OPTIMIZERS)})"
    if p.weight_decay:
        return "weight_decay unsupported (fbgemm CPU 1.8.0's backward takes it and leaves it unapplied)"
    # unpooled: any dims, as bags of one id (`_as_bags_of_one`)
    return _check_pooled(p) if p.poolings and p.poolings[0] != "none" else _check_common(p)


if AVAILABLE:
    register_kernel("pooled_forward", "fbgemm", pooled_forward, _check_pooled_forward)
    register_kernel("unpooled_forward", "fbgemm", unpooled_forward,
                    lambda p: _check_forward(p) or _check_unpooled(p))
    register_kernel("backward_update", "fbgemm", backward_update, _check_backward)
    register_kernel("quant_pooled_forward", "fbgemm", quant_pooled_forward, _check_quant_pooled)
    register_kernel("quant_unpooled_forward", "fbgemm", quant_unpooled_forward, _check_quant_unpooled)
