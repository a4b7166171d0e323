"""Launch wrappers for the Triton kernels, with the registry's op signatures.

Forward: a program pools one bag (or copies a block of one table's rows, unpooled) and
gathers `block_n` ids per step of its loop. Pooled: 8 ids per step in 2 warps
(`_POOLED_BLOCK_N`, `_POOLED_NUM_WARPS`): on an H200 (bench/kernels.py --sweep,
bench/results/gpu_kernels_sweep.txt) that was the fastest of 9 configurations in all four
shapes swept, 1.3-2.1x faster than 32 ids per step in 4 warps at a pooling factor of 20,
where many small programs keep more loads in flight than few that load a bag at once.
Unpooled: `block_n` is the mean ids per table rounded up to a power of two within [8, 32],
in 4 warps (not swept).

Backward: index preparation (global rows, stable sort, unique) runs in torch
(`sparse_update.sort_occurrences`); one kernel launch then reduces and updates every unique
row of every table. Rows narrower than 128 (`_BWD_ONE_ROW_MIN_D`) are updated by
`backward_update_rows_kernel`, ROWS unique rows per program in a [ROWS, BLOCK_D] tile of about
`_BWD_TILE` elements; wider ones by the one-row kernel in 2 warps, which an H200 sweep found
faster there (see the constants). Why several rows: most unique rows of a
real batch occur once or twice, so one row per program (`backward_update_kernel`) leaves most
of its [8, BLOCK_D] occurrence tile masked and waits on one row's chain of dependent loads;
ROWS rows keep ROWS times as many loads in flight (FBGEMM's CUDA backward runs a warp per row,
several rows per block). A rows program loops as often as its busiest row has occurrences, so
rows with more than `_BWD_ROWS_CHUNK` occurrences (hot ids) are set apart: a first launch sums
their occurrences in chunks, in order, and a second rows launch reduces those chunks, while the
cold rows are updated straight from their occurrences: still deterministic, one hot row does
not keep its neighbours waiting, and skewed (Zipf) ids pay the chunk pass only for their few
hot rows. The one-row kernel (config rows=0) chunks every row once any row has more than
`_BWD_CHUNK` occurrences.

`config` (keyword-only, for benchmarks such as bench/kernels.py; registry calls pass none,
so the defaults apply) overrides launch choices: `block_n` (ids per step: forward loops,
the backward's chunk sums and the one-row kernel), `num_warps` (every launch of the op), for
the pooled forward `bags` (bags per program), and for the backward `rows` (unique rows per
program; 0 selects the one-row kernel). Values are powers of two (or rows=0); an unknown key
raises ValueError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from fxrec.optim import decay_mode

from ..layout import TBELayout, check_offsets, check_on_host, fault_record, packed, raise_if_flagged
from ..sparse_update import adam_row_scalars, sort_occurrences
from . import kernels

_OPT_CODE = {"sgd": 0, "rowwise_adagrad": 1, "adam": 2, "adagrad": 3}
_FWD_BLOCK_N = (8, 32)  # ids per step of the unpooled forward: the mean per table, clamped to this range
_POOLED_BLOCK_N = 8  # ids per step of the pooled forward, and its warps (module doc)
_POOLED_NUM_WARPS = 2
# Bags per program: 1 is `pooled_forward_kernel`; more, `pooled_forward_bags_kernel`, which loads
# several bags' ids and rows together (config bags=; not yet timed on a GPU, so not the default).
_POOLED_BAGS = 1
_BWD_BLOCK_N = 8  # occurrences reduced per step of a chunk sum / of the one-row kernel's loop
_NUM_WARPS = 4  # triton's default
_FWD_MAX_BLOCK_D = 128
MAX_DIM = 8192  # the backward keeps a whole row in one program
# The update's default launch, from an H200 sweep of the fused SGD / RowWiseAdagrad update
# (bench/kernels.py --sweep, bench/results/gpu_kernels_sweep.txt; 26 tables, 16384 x 20 ids):
# rows of dim 128 or more go one per program in 2 warps (`_BWD_ONE_ROW_MIN_D`; 1.3-1.8x faster
# than 8 rows per program in 4 warps); narrower rows share a rows-kernel tile of about
# `_BWD_TILE` elements (`_bwd_rows`: 8 rows of dim 64, 1.2-1.7x faster than 16), 4 elements
# per thread (`_bwd_warps`: 4 warps there). Registers bound the tile: at 16 elements per
# thread ptxas (sm_90) needed ~250 registers and spilled.
_BWD_ONE_ROW_MIN_D = 128
_BWD_ONE_ROW_WARPS = 2
_BWD_TILE = 512
_BWD_ELEMS_PER_THREAD = 4
_BWD_ROWS_MAX = 16
# Occurrences one backward program reduces at most: a hotter row (Zipf ids) is first summed in
# chunks by many programs, so one row cannot serialise the launch. A rows program waits for its
# busiest row, one occurrence per step, hence the small chunk there.
_BWD_ROWS_CHUNK = 32
_BWD_CHUNK = 2048  # the one-row kernel (config rows=0) reduces 8 occurrences per step


def _block_d(max_d: int, cap: Optional[int] = None) -> int:
    block = triton.next_power_of_2(max_d)
    return min(block, cap) if cap else block


def _fwd_block_n(ids: int, groups: int) -> int:
    """Mean ids per group (an unpooled table) rounded up to a power of two, in
    `_FWD_BLOCK_N`. Host integers only: no device sync."""
    lo, hi = _FWD_BLOCK_N
    mean = -(-ids // max(groups, 1))
    return min(hi, max(lo, triton.next_power_of_2(mean)))


def _bwd_rows(block_d: int) -> int:
    """Unique rows per program: 0 (the one-row kernel) from `_BWD_ONE_ROW_MIN_D`, else a
    rows-kernel tile of about `_BWD_TILE` elements."""
    if block_d >= _BWD_ONE_ROW_MIN_D:
        return 0
    return max(1, min(_BWD_ROWS_MAX, _BWD_TILE // block_d))


def _bwd_warps(rows: int, block_d: int) -> int:
    """Warps of an update program: `_BWD_ONE_ROW_WARPS` for the one-row kernel (rows 0), else
    `_BWD_ELEMS_PER_THREAD` tile elements per thread, 1 to 8."""
    if rows == 0:
        return _BWD_ONE_ROW_WARPS
    return max(1, min(8, rows * block_d // (32 * _BWD_ELEMS_PER_THREAD)))


def _launch_config(op: str, config: Optional[dict], **defaults) -> dict:
    """`defaults` overridden by `config`. Raises ValueError on a key not in `defaults`, or on a
    value that is not a power of two (rows may also be 0: the one-row kernel)."""
    for key, value in (config or {}).items():
        if key not in defaults:
            raise ValueError(f"{op}: unknown config key {key!r} (known: {', '.join(defaults)})")
        pow2 = isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0
        if not (pow2 or (key == "rows" and value == 0)):
            extra = " or 0 (the one-row kernel)" if key == "rows" else ""
            raise ValueError(f"{op}: config {key}={value!r} must be a power of two{extra}")
    return {**defaults, **(config or {})}


def pooled_forward(weights: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor,
                   per_sample_weights: Optional[Tensor] = None, *, config: Optional[dict] = None,
                   check_ids: bool = False) -> Tensor:
    """check_ids: check the ids and offsets in the kernel (kernels.py) and raise check_inputs'
    error after it; one host sync."""
    weights, indices, offsets, per_sample_weights = packed(weights, indices, offsets, per_sample_weights)
    B = layout.batch_size(offsets)
    cfg = _launch_config("pooled_forward", config, block_n=_POOLED_BLOCK_N, num_warps=_POOLED_NUM_WARPS,
                         bags=_POOLED_BAGS)
    out = torch.empty(B, layout.total_D, dtype=weights.dtype, device=weights.device)
    if B == 0:
        if check_ids:
            check_on_host(layout, indices, offsets)
        return out
    dev = weights.device
    block_d = _block_d(layout.max_D, _FWD_MAX_BLOCK_D)
    psw = per_sample_weights if per_sample_weights is not None else weights  # unread when absent
    record = fault_record(dev) if check_ids else out  # unread unless checking
    head = (weights, layout.weights_offsets.to(dev), layout.D_offsets.to(dev), layout.is_mean.to(dev),
            indices, offsets, psw, out, B, layout.total_D)
    tail = (layout.rows_t.to(dev), indices.numel(), record)
    common = dict(HAS_PSW=per_sample_weights is not None, CHECK=check_ids, BLOCK_N=cfg["block_n"], BLOCK_D=block_d,
                  num_warps=cfg["num_warps"])
    bags, num_bags = cfg["bags"], layout.num_tables * B
    if bags == 1:
        kernels.pooled_forward_kernel[(num_bags, triton.cdiv(layout.max_D, block_d))](*head, *tail, **common)
    else:
        kernels.pooled_forward_bags_kernel[(triton.cdiv(num_bags, bags), triton.cdiv(layout.max_D, block_d))](
            *head, num_bags, *tail, BAGS=bags, **common)
    if check_ids:
        raise_if_flagged(record, layout, indices, offsets)
    return out


pooled_forward.checks_ids = True  # FusedEmbeddingBags passes check_ids instead of checking first


def table_counts(layout: TBELayout, indices: Tensor, offsets: Tensor, check_ids: bool) -> list[int]:
    """Each table's number of ids (one host sync, which an unpooled launch needs for its grid
    and output); with check_ids also check_inputs' offset checks, read in the same sync."""
    B = layout.batch_size(offsets)
    T = layout.num_tables
    if B == 0:
        if check_ids:
            check_on_host(layout, indices, offsets)
        return [0] * T
    bounds = offsets[::B]
    if check_ids:
        stats = torch.cat([bounds.long(), (offsets[1:] < offsets[:-1]).sum().view(1)]).tolist()
        check_offsets(layout, indices, offsets, stats)
        bounds = stats[:-1]
    else:
        bounds = bounds.tolist()
    return [e - s for s, e in zip(bounds[:-1], bounds[1:])]


def unpooled_forward(weights: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor, *,
                     config: Optional[dict] = None, check_ids: bool = False) -> Tensor:
    """check_ids: as pooled_forward's (the offsets are checked before the launch)."""
    weights, indices, offsets = packed(weights, indices, offsets)
    B = layout.batch_size(offsets)
    T = layout.num_tables
    cfg = _launch_config("unpooled_forward", config, block_n=_fwd_block_n(indices.numel(), T),
                         num_warps=_NUM_WARPS)
    counts = table_counts(layout, indices, offsets, check_ids)
    out_off = [0]
    for n, d in zip(counts, layout.dims):
        out_off.append(out_off[-1] + n * d)
    out = torch.empty(out_off[-1], dtype=weights.dtype, device=weights.device)
    if out_off[-1] == 0:
        return out
    dev = weights.device
    block_d = _block_d(layout.max_D, _FWD_MAX_BLOCK_D)
    record = fault_record(dev) if check_ids else out  # unread unless checking
    grid = (T, triton.cdiv(max(counts), cfg["block_n"]), triton.cdiv(layout.max_D, block_d))
    kernels.unpooled_forward_kernel[grid](
        weights, layout.weights_offsets.to(dev), layout.D_offsets.to(dev), indices, offsets,
        torch.tensor(out_off, dtype=torch.int64, device=dev), out, B, layout.rows_t.to(dev), indices.numel(),
        record, CHECK=check_ids, BLOCK_N=cfg["block_n"], BLOCK_D=block_d, num_warps=cfg["num_warps"])
    if check_ids:
        raise_if_flagged(record, layout, indices, offsets)
    return out


unpooled_forward.checks_ids = True


def backward_update(weights: Tensor, state: dict[str, Tensor], layout: TBELayout, optimizer,
                    grad_output: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Optional[Tensor] = None, deterministic: bool = False, *,
                    config: Optional[dict] = None) -> None:
    # Always deterministic: a stable sort and a fixed-order per-row reduction, no atomics.
    block_d = _block_d(layout.max_D)
    # num_warps None: each launch's own default (the rows kernel's depends on its tile)
    cfg = _launch_config("backward_update", config, block_n=_BWD_BLOCK_N, num_warps=None,
                         rows=_bwd_rows(block_d))
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
    grad_output = grad_output.contiguous()
    rows, block_n = cfg["rows"], cfg["block_n"]
    num_warps = cfg["num_warps"] or _bwd_warps(0, block_d)  # the one-row kernel and the chunk sums
    rows_warps = cfg["num_warps"] or (_bwd_warps(rows, block_d) if rows else None)
    head = (weights, state.get("momentum", weights), state.get("exp_avg", weights),
            state.get("exp_avg_sq", weights), state.get("sum", weights), step_size, bc2_sqrt,
            layout.weights_offsets.to(dev), layout.D_offsets.to(dev), layout.hash_size_cumsum.to(dev),
            sg.uniq_table, sg.uniq_row)
    tail = (float(optimizer.lr), float(getattr(optimizer, "eps", 0.0)), 1.0 - beta1, beta2, 1.0 - beta2,
            float(optimizer.weight_decay))
    opt, wd_mode = _OPT_CODE[optimizer.name], decay_mode(optimizer)
    if rows == 0:  # the one-row kernel: every row through the chunk pass once any row is hot
        seg, src_off, scale, grad = sg.seg, sg.src_off, sg.scale, grad_output
        chunks = _hot_chunks(sg.seg, _BWD_CHUNK)
        if chunks is not None:  # rows reduce their chunks' partial sums, not their occurrences
            seg, src_off, scale, grad = _chunk_sums(layout, sg, chunks, grad_output, block_d, block_n, num_warps)
        kernels.backward_update_kernel[(sg.num_unique,)](
            *head, seg, src_off, scale, grad, *tail, OPT=opt, WD_MODE=wd_mode, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps)
        return

    def update(sel, start, end, src_off, scale, grad, n):  # the rows kernel over n positions
        kernels.backward_update_rows_kernel[(triton.cdiv(n, rows),)](
            *head, start if sel is None else sel, start, end, src_off, scale, grad, *tail, n,
            OPT=opt, WD_MODE=wd_mode, HAS_SEL=sel is not None, ROWS=rows, BLOCK_D=block_d, num_warps=rows_warps)

    seg = sg.seg
    hot = (seg[1:] - seg[:-1]) > _BWD_ROWS_CHUNK
    hot_rows = torch.nonzero(hot).flatten()  # one host sync
    if hot_rows.numel() == 0:  # the usual case (uniform ids): one launch over every unique row
        update(None, seg[:-1], seg[1:], sg.src_off, sg.scale, grad_output, sg.num_unique)
        return
    # Hot rows (Zipf ids) would keep a block looping while its other rows wait: only they are
    # summed in chunks first; the cold rows are updated from their occurrences directly.
    cold = torch.nonzero(~hot).flatten()
    if cold.numel():
        update(cold, seg.index_select(0, cold), seg.index_select(0, cold + 1), sg.src_off, sg.scale, grad_output,
               cold.numel())
    chunks = _row_chunks(seg, hot_rows, _BWD_ROWS_CHUNK)
    chunk_seg, src_off, scale, sums = _chunk_sums(layout, sg, chunks, grad_output, block_d, block_n, num_warps)
    update(chunks.rows, chunk_seg[:-1], chunk_seg[1:], src_off, scale, sums, hot_rows.numel())


def _chunk_sums(layout: TBELayout, sg, chunks: "_Chunks", grad_output: Tensor, block_d: int, block_n: int,
                num_warps: int):
    """(chunk_seg, src_off, scale, grad) for an update over `chunks` instead of occurrences:
    grad holds each chunk's fp32 partial sum, a row of `block_d`, each taken once (scale 1)."""
    dev, C = grad_output.device, chunks.chunk_row.numel()
    sums = torch.empty(C, block_d, dtype=torch.float32, device=dev)
    kernels.segment_sum_kernel[(C,)](
        layout.D_offsets.to(dev), sg.uniq_table, chunks.chunk_row, chunks.first, chunks.last, sg.src_off, sg.scale,
        grad_output, sums, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return (chunks.chunk_seg, torch.arange(C, device=dev) * block_d, torch.ones(C, dtype=torch.float32, device=dev),
            sums)


@dataclass
class _Chunks:
    """The occurrences of unique rows `rows` (H of them) cut in chunks, in order: chunk c
    holds sorted occurrences ``first[c]:last[c]`` of unique row ``chunk_row[c]``; row rows[h]'s
    chunks are ``chunk_seg[h]:chunk_seg[h+1]``."""

    rows: Tensor
    chunk_row: Tensor
    first: Tensor
    last: Tensor
    chunk_seg: Tensor


def _row_chunks(seg: Tensor, rows: Tensor, chunk: int) -> _Chunks:
    """Chunks of at most `chunk` occurrences of the unique rows `rows` (see `_Chunks`)."""
    dev = seg.device
    start, end = seg.index_select(0, rows), seg.index_select(0, rows + 1)
    per_row = (end - start + chunk - 1) // chunk
    chunk_seg = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
    total = int(chunk_seg[-1])  # one host sync: the chunk pass's grid
    h = torch.repeat_interleave(torch.arange(rows.numel(), device=dev), per_row, output_size=total)
    first = start.index_select(0, h) + (torch.arange(total, device=dev) - chunk_seg.index_select(0, h)) * chunk
    last = torch.minimum(first + chunk, end.index_select(0, h))
    return _Chunks(rows, rows.index_select(0, h), first, last, chunk_seg)


def _hot_chunks(seg: Tensor, chunk: int) -> Optional[_Chunks]:
    """None when no unique row has more than `chunk` occurrences; else every row's
    occurrences cut in chunks of at most `chunk` (the one-row kernel's path)."""
    counts = seg[1:] - seg[:-1]
    if counts.numel() == 0 or int(counts.max()) <= chunk:  # one host sync
        return None
    return _row_chunks(seg, torch.arange(counts.numel(), device=seg.device), chunk)
