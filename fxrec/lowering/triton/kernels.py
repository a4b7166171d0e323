"""Triton kernels for the table-batched layout (see ../layout.py).

Each kernel serves every table in one launch: a program reads its table's dim, weight
offset and pooling from the small per-table tensors. Loads widen to fp32 and results
are rounded once to the output/weight dtype. Ids are widened to int64 before address
arithmetic, so int32 ids index tables of any size.

The fused backward has two update kernels with the same formulas: `backward_update_rows_kernel`
(the default: several unique rows per program, see its docstring for why) and
`backward_update_kernel` (one unique row per program; ops' config rows=0, kept so benchmarks
can compare the two).

Bounds check (CHECK, a constexpr: off, the kernels are unchanged): the lookup kernels check
the ids they load against their table's rows (`rows_ptr`) and never load a row for a bad
one; the pooled kernels also check each bag's offsets and clamp its range into the ids, so
unsound offsets cannot send a load outside them. Faults go to a two-entry int64 record,
by atomic_min, so each entry ends as the smallest: ``err[0]`` the position of a bad id,
``err[1]`` a bag with unsound offsets. The wrapper reads the record once after the launch
(`layout.raise_if_flagged`): the check costs no pass over the ids of its own, where a
separate check read them again (on an H200, 0.5 ms of a 0.6-1.1 ms lookup).

This module must be imported after TRITON_INTERPRET is set if the kernels are to run
on the CPU: `triton.jit` decides at decoration time whether to interpret.
"""
import triton
import triton.language as tl


@triton.jit
def bag_of_program(d_offsets_ptr, offsets_ptr, B, BLOCK_D: tl.constexpr):
    """A pooled kernel's program (bag, dblk) of grid (T*B, cdiv(max_D, BLOCK_D)), bag = t*B + b:
    (t, b, d0 = its table's first output column, D = its dim, its ids' range start:end, the
    column block cols and its mask)."""
    bag = tl.program_id(0)
    t = bag // B
    b = bag - t * B
    d0 = tl.load(d_offsets_ptr + t)
    D = tl.load(d_offsets_ptr + t + 1) - d0
    start = tl.load(offsets_ptr + bag).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return t, b, d0, D, start, end, cols, cols < D


@triton.jit
def check_bag(err_ptr, bag, start, end, n):
    """A bag's id range (start, end), clamped to 0 <= start <= end <= n (n ids in all); a bag
    whose offsets are unsound (bag 0 does not start at 0, the last bag does not end at n, or
    it ends before it starts) is recorded in err[1]."""
    last = bag == tl.num_programs(0) - 1
    bad = (start > end) | (start < 0) | (end > n) | ((bag == 0) & (start != 0)) | (last & (end != n))
    if bad:
        tl.atomic_min(err_ptr + 1, bag.to(tl.int64))
    start = tl.minimum(tl.maximum(start, 0), n)
    end = tl.minimum(tl.maximum(end, start), n)
    return start, end


@triton.jit
def check_ids(ids, pos, nmask, n_rows, first_bad):
    """(the mask of the ids that may be loaded, first_bad lowered to the positions of the ids
    outside [0, n_rows))."""
    bad = nmask & ((ids < 0) | (ids >= n_rows))
    return nmask & ~bad, tl.minimum(first_bad, tl.where(bad, pos, first_bad))


@triton.jit
def record_first_bad(err_ptr, first_bad, n):
    """err[0] lowered to the smallest position in first_bad (n: none there)."""
    lo = tl.min(first_bad, axis=0)
    if lo < n:
        tl.atomic_min(err_ptr, lo)


@triton.jit
def store_bag(acc, is_mean_ptr, out_ptr, t, b, d0, start, end, cols, cmask, total_D):
    """Store bag (t, b)'s fp32 sums `acc` (divided by its length where table t pools by
    mean) at its columns of the B x total_D output, rounded once to the output's dtype."""
    n = (end - start).to(tl.float32)
    is_mean = tl.load(is_mean_ptr + t)
    # mean of an empty bag stays 0, as in F.embedding_bag
    acc = tl.where((is_mean != 0) & (n > 0), acc / tl.maximum(n, 1.0), acc)
    out = out_ptr + b.to(tl.int64) * total_D + d0 + cols
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def pooled_forward_kernel(weights_ptr, w_offsets_ptr, d_offsets_ptr, is_mean_ptr,
                          indices_ptr, offsets_ptr, psw_ptr, out_ptr, B, total_D, rows_ptr, n, err_ptr,
                          HAS_PSW: tl.constexpr, CHECK: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Grid (T*B, cdiv(max_D, BLOCK_D)): program (bag, dblk) pools bag = t*B + b."""
    t, b, d0, D, start, end, cols, cmask = bag_of_program(d_offsets_ptr, offsets_ptr, B, BLOCK_D)
    first_bad = tl.zeros([BLOCK_N], dtype=tl.int64) + n
    if CHECK:
        start, end = check_bag(err_ptr, tl.program_id(0), start, end, n)
        n_rows = tl.load(rows_ptr + t)
    w_base = tl.load(w_offsets_ptr + t)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(start, end, BLOCK_N):
        pos = i + tl.arange(0, BLOCK_N)
        nmask = pos < end
        ids = tl.load(indices_ptr + pos, mask=nmask, other=0).to(tl.int64)
        if CHECK:
            nmask, first_bad = check_ids(ids, pos, nmask, n_rows, first_bad)
        ptrs = weights_ptr + w_base + ids[:, None] * D + cols[None, :]
        rows = tl.load(ptrs, mask=nmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_PSW:
            s = tl.load(psw_ptr + pos, mask=nmask, other=0.0).to(tl.float32)
            rows = rows * s[:, None]
        acc += tl.sum(rows, axis=0)
    if CHECK:
        record_first_bad(err_ptr, first_bad, n)
    store_bag(acc, is_mean_ptr, out_ptr, t, b, d0, start, end, cols, cmask, total_D)


@triton.jit
def pooled_forward_bags_kernel(weights_ptr, w_offsets_ptr, d_offsets_ptr, is_mean_ptr,
                               indices_ptr, offsets_ptr, psw_ptr, out_ptr, B, total_D, num_bags,
                               rows_ptr, n, err_ptr, HAS_PSW: tl.constexpr, CHECK: tl.constexpr,
                               BAGS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(T*B, BAGS), cdiv(max_D, BLOCK_D)): program p pools bags p*BAGS ... p*BAGS+BAGS-1
    (bag = t*B + b) at once: their offsets, then their ids, then their rows are loaded together,
    a [BAGS, BLOCK_N, BLOCK_D] tile per step, so one program has BAGS bags' loads in flight where
    `pooled_forward_kernel` waits on one bag's chain of dependent loads (offsets, ids, rows). The
    same sums, in the same order per bag. CHECK as `pooled_forward_kernel`'s."""
    bag = tl.program_id(0) * BAGS + tl.arange(0, BAGS)
    bmask = bag < num_bags
    t = tl.where(bmask, bag // B, 0)
    b = bag - t * B
    d0 = tl.load(d_offsets_ptr + t)
    D = tl.load(d_offsets_ptr + t + 1) - d0
    start = tl.load(offsets_ptr + bag, mask=bmask, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1, mask=bmask, other=0).to(tl.int64)
    if CHECK:
        last = bag == num_bags - 1
        bad = bmask & ((start > end) | (start < 0) | (end > n) | ((bag == 0) & (start != 0)) | (last & (end != n)))
        first = tl.min(tl.where(bad, bag, num_bags), axis=0)
        if first < num_bags:
            tl.atomic_min(err_ptr + 1, first.to(tl.int64))
        start = tl.minimum(tl.maximum(start, 0), n)
        end = tl.minimum(tl.maximum(end, start), n)
        n_rows = tl.load(rows_ptr + t)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = (cols[None, :] < D[:, None]) & bmask[:, None]  # [BAGS, BLOCK_D]
    w_base = tl.load(w_offsets_ptr + t)
    first_bad = tl.zeros([BAGS, BLOCK_N], dtype=tl.int64) + n
    acc = tl.zeros([BAGS, BLOCK_D], dtype=tl.float32)
    longest = tl.max(end - start, axis=0)
    for i in range(0, longest, BLOCK_N):
        pos = start[:, None] + i + tl.arange(0, BLOCK_N)[None, :]  # [BAGS, BLOCK_N]
        nmask = pos < end[:, None]
        ids = tl.load(indices_ptr + pos, mask=nmask, other=0).to(tl.int64)
        if CHECK:
            nmask, first_bad = check_ids(ids, pos, nmask, n_rows[:, None], first_bad)
        ptrs = weights_ptr + (w_base[:, None] + ids * D[:, None])[:, :, None] + cols[None, None, :]
        rows = tl.load(ptrs, mask=nmask[:, :, None] & cmask[:, None, :], other=0.0).to(tl.float32)
        if HAS_PSW:
            s = tl.load(psw_ptr + pos, mask=nmask, other=0.0).to(tl.float32)
            rows = rows * s[:, :, None]
        acc += tl.sum(rows, axis=1)
    if CHECK:
        record_first_bad(err_ptr, tl.reshape(first_bad, [BAGS * BLOCK_N]), n)
    length = (end - start).to(tl.float32)
    is_mean = tl.load(is_mean_ptr + t)
    # mean of an empty bag stays 0, as in F.embedding_bag
    acc = tl.where(((is_mean != 0) & (length > 0))[:, None], acc / tl.maximum(length, 1.0)[:, None], acc)
    out = out_ptr + (b.to(tl.int64) * total_D + d0)[:, None] + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def block_of_program(d_offsets_ptr, offsets_ptr, B, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """An unpooled kernel's program of grid (T, cdiv(max N_t, BLOCK_N), cdiv(max_D, BLOCK_D)):
    (t, D = its dim, local = its ids' positions within table t's, pos = their positions in
    indices, their mask, the column block cols and its mask)."""
    t = tl.program_id(0)
    D = tl.load(d_offsets_ptr + t + 1) - tl.load(d_offsets_ptr + t)
    first = tl.load(offsets_ptr + t * B).to(tl.int64)
    last = tl.load(offsets_ptr + (t + 1) * B).to(tl.int64)
    local = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = first + local
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    return t, D, local, pos, pos < last, cols, cols < D


@triton.jit
def unpooled_forward_kernel(weights_ptr, w_offsets_ptr, d_offsets_ptr, indices_ptr, offsets_ptr,
                            out_offsets_ptr, out_ptr, B, rows_ptr, n, err_ptr,
                            CHECK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T, cdiv(max N_t, BLOCK_N), cdiv(max_D, BLOCK_D)): copies table t's rows to its block.
    The wrapper checks the offsets before the launch; CHECK checks the ids."""
    t, D, local, pos, nmask, cols, cmask = block_of_program(d_offsets_ptr, offsets_ptr, B, BLOCK_N, BLOCK_D)
    w_base = tl.load(w_offsets_ptr + t)
    ids = tl.load(indices_ptr + pos, mask=nmask, other=0).to(tl.int64)
    if CHECK:
        first_bad = tl.zeros([BLOCK_N], dtype=tl.int64) + n
        nmask, first_bad = check_ids(ids, pos, nmask, tl.load(rows_ptr + t), first_bad)
        record_first_bad(err_ptr, first_bad, n)
    mask = nmask[:, None] & cmask[None, :]
    rows = tl.load(weights_ptr + w_base + ids[:, None] * D + cols[None, :], mask=mask, other=0.0)
    out_base = tl.load(out_offsets_ptr + t)
    tl.store(out_ptr + out_base + local[:, None] * D + cols[None, :], rows, mask=mask)


@triton.jit
def _sum_occurrences(src_off_ptr, scale_ptr, grad_ptr, s0, s1, cols, cmask,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_D]: the sum, in order, of sorted occurrences s0:s1's gradient rows (starting
    at element src_off[i] of grad, columns `cols` where `cmask`), each times scale[i]."""
    g = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(s0, s1, BLOCK_N):
        pos = j + tl.arange(0, BLOCK_N)
        nmask = pos < s1
        src = tl.load(src_off_ptr + pos, mask=nmask, other=0)
        sc = tl.load(scale_ptr + pos, mask=nmask, other=0.0)
        occ = tl.load(grad_ptr + src[:, None] + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
        g += tl.sum(occ.to(tl.float32) * sc[:, None], axis=0)
    return g


@triton.jit
def _adam_moments(exp_avg_ptr, exp_avg_sq_ptr, elem, mask, g, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's first and second moments of the elements `elem` (where `mask`), advanced by
    gradient g, stored and returned (both update kernels share them)."""
    m = tl.load(exp_avg_ptr + elem, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + elem, mask=mask, other=0.0)
    m = m + one_minus_beta1 * (g - m)  # torch.optim.Adam's lerp
    v = v * beta2 + one_minus_beta2 * (g * g)
    tl.store(exp_avg_ptr + elem, m, mask=mask)
    tl.store(exp_avg_sq_ptr + elem, v, mask=mask)
    return m, v


@triton.jit
def _adagrad_sum(sum_ptr, elem, mask, g):
    """Adagrad's accumulator of the elements `elem` (where `mask`), advanced by g*g, stored and
    returned (both update kernels share it)."""
    s = tl.load(sum_ptr + elem, mask=mask, other=0.0) + g * g
    tl.store(sum_ptr + elem, s, mask=mask)
    return s


@triton.jit
def backward_update_kernel(weights_ptr, momentum_ptr, exp_avg_ptr, exp_avg_sq_ptr, sum_ptr,
                           step_size_ptr, bc2_sqrt_ptr,
                           w_offsets_ptr, d_offsets_ptr, hash_cumsum_ptr,
                           uniq_table_ptr, uniq_row_ptr, seg_ptr, src_off_ptr, scale_ptr, grad_ptr,
                           lr, eps, one_minus_beta1, beta2, one_minus_beta2, wd,
                           OPT: tl.constexpr, WD_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """Grid (U,): program u sums unique row u's occurrence gradients in sorted order
    (no atomics: deterministic) and applies the optimizer to that row and its state.
    OPT: 0 SGD, 1 RowWiseAdagrad, 2 Adam, 3 Adagrad. WD_MODE (fxrec.optim.DECAY_MODES): 0 none,
    1 L2 (g += wd * w before the update), 2 decoupled (w -= lr * wd * w beside it). BLOCK_D >=
    the table's dim (whole row)."""
    u = tl.program_id(0)
    t = tl.load(uniq_table_ptr + u)
    row = tl.load(uniq_row_ptr + u)
    D = tl.load(d_offsets_ptr + t + 1) - tl.load(d_offsets_ptr + t)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    s0 = tl.load(seg_ptr + u)
    s1 = tl.load(seg_ptr + u + 1)
    # the row (and its accumulator) are read before the gradient loop: its loads do not depend
    # on the gradient, so they are in flight while it is summed (the row is this program's alone)
    elem = tl.load(w_offsets_ptr + t) + row * D + cols
    w = tl.load(weights_ptr + elem, mask=cmask, other=0.0).to(tl.float32)
    if OPT == 1:
        grow = tl.load(hash_cumsum_ptr + t) + row
        mom = tl.load(momentum_ptr + grow)
    g = _sum_occurrences(src_off_ptr, scale_ptr, grad_ptr, s0, s1, cols, cmask, BLOCK_N, BLOCK_D)
    w0 = w
    if WD_MODE == 1:
        g = g + wd * w  # masked columns: w is 0 there, so g stays 0
    if OPT == 0:
        w = w - lr * g
    elif OPT == 1:
        mom = mom + tl.sum(g * g, axis=0) / D.to(tl.float32)
        tl.store(momentum_ptr + grow, mom)
        w = w - (lr / (tl.sqrt_rn(mom) + eps)) * g
    elif OPT == 3:
        s = _adagrad_sum(sum_ptr, elem, cmask, g)
        w = w - lr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
    else:
        m, v = _adam_moments(exp_avg_ptr, exp_avg_sq_ptr, elem, cmask, g, one_minus_beta1, beta2, one_minus_beta2)
        denom = tl.sqrt_rn(v) / tl.load(bc2_sqrt_ptr + u) + eps
        w = w - tl.load(step_size_ptr + u) * tl.div_rn(m, denom)
    if WD_MODE == 2:
        w = w - (lr * wd) * w0
    tl.store(weights_ptr + elem, w.to(weights_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def segment_sum_kernel(d_offsets_ptr, uniq_table_ptr, chunk_row_ptr, chunk_first_ptr, chunk_last_ptr,
                       src_off_ptr, scale_ptr, grad_ptr, out_ptr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (C,): program c sums the (scaled) occurrence gradients ``chunk_first[c]:chunk_last[c]``
    of sorted occurrences, all of unique row ``chunk_row[c]``, in order, into fp32 row c of
    `out` (C x BLOCK_D). The first pass for rows too hot for one program
    (`backward_update_kernel` then reduces each row's chunks)."""
    c = tl.program_id(0)
    t = tl.load(uniq_table_ptr + tl.load(chunk_row_ptr + c))
    D = tl.load(d_offsets_ptr + t + 1) - tl.load(d_offsets_ptr + t)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    s0 = tl.load(chunk_first_ptr + c)
    s1 = tl.load(chunk_last_ptr + c)
    g = _sum_occurrences(src_off_ptr, scale_ptr, grad_ptr, s0, s1, cols, cmask, BLOCK_N, BLOCK_D)
    tl.store(out_ptr + c.to(tl.int64) * BLOCK_D + cols, g, mask=cmask)


@triton.jit
def backward_update_rows_kernel(weights_ptr, momentum_ptr, exp_avg_ptr, exp_avg_sq_ptr, sum_ptr,
                                step_size_ptr, bc2_sqrt_ptr,
                                w_offsets_ptr, d_offsets_ptr, hash_cumsum_ptr,
                                uniq_table_ptr, uniq_row_ptr, sel_ptr, start_ptr, end_ptr,
                                src_off_ptr, scale_ptr, grad_ptr,
                                lr, eps, one_minus_beta1, beta2, one_minus_beta2, wd, H,
                                OPT: tl.constexpr, WD_MODE: tl.constexpr, HAS_SEL: tl.constexpr,
                                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(H, ROWS),): program p updates the rows at positions p*ROWS .. p*ROWS+ROWS-1
    (of H) together in a [ROWS, BLOCK_D] tile, with `backward_update_kernel`'s formulas (OPT 0
    SGD, 1 RowWiseAdagrad, 2 Adam, 3 Adagrad). Position h is unique row ``sel[h]`` (HAS_SEL; else h itself)
    and sums the gradient rows of sorted entries ``start[h]:end[h]`` (occurrences, or chunk
    partial sums of a hot row). Why: most unique rows of a real batch have one or two
    occurrences, so a program per row leaves most of its tile masked and waits on one row's
    chain of dependent loads; here ROWS rows' loads are in flight at once (FBGEMM's CUDA
    backward runs a warp per row, several rows per block). Entries are summed in order, one per
    loop step, and the block loops as often as its busiest row has entries: deterministic
    (fixed order, no atomics). BLOCK_D >= every table's dim; each row masks to its own D."""
    h = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    hmask = h < H
    if HAS_SEL:
        u = tl.load(sel_ptr + h, mask=hmask, other=0)
    else:
        u = h
    t = tl.load(uniq_table_ptr + u, mask=hmask, other=0)
    row = tl.load(uniq_row_ptr + u, mask=hmask, other=0)
    d_first = tl.load(d_offsets_ptr + t, mask=hmask, other=0)
    D = tl.load(d_offsets_ptr + t + 1, mask=hmask, other=0) - d_first  # 0 past H: all masked
    cols = tl.arange(0, BLOCK_D)
    mask = cols[None, :] < D[:, None]
    s0 = tl.load(start_ptr + h, mask=hmask, other=0)
    count = tl.load(end_ptr + h, mask=hmask, other=0) - s0
    # the rows (and accumulators) are read before the gradient loop, as in backward_update_kernel
    elem = (tl.load(w_offsets_ptr + t, mask=hmask, other=0) + row * D)[:, None] + cols[None, :]
    w = tl.load(weights_ptr + elem, mask=mask, other=0.0).to(tl.float32)
    if OPT == 1:
        grow = tl.load(hash_cumsum_ptr + t, mask=hmask, other=0) + row
        mom = tl.load(momentum_ptr + grow, mask=hmask, other=0.0)
    g = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        has = count > j  # rows with a j-th entry
        src = tl.load(src_off_ptr + s0 + j, mask=has, other=0)
        sc = tl.load(scale_ptr + s0 + j, mask=has, other=0.0)
        occ = tl.load(grad_ptr + src[:, None] + cols[None, :], mask=has[:, None] & mask, other=0.0)
        g += occ.to(tl.float32) * sc[:, None]
    w0 = w
    if WD_MODE == 1:
        g = g + wd * w
    if OPT == 0:
        w = w - lr * g
    elif OPT == 1:
        # masked cols of g are 0: the mean is over the row's own D (max(D, 1): no 0/0 past H)
        mom = mom + tl.sum(g * g, axis=1) / tl.maximum(D, 1).to(tl.float32)
        tl.store(momentum_ptr + grow, mom, mask=hmask)
        w = w - (lr / (tl.sqrt_rn(mom) + eps))[:, None] * g
    elif OPT == 3:
        s = _adagrad_sum(sum_ptr, elem, mask, g)
        w = w - lr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
    else:
        m, v = _adam_moments(exp_avg_ptr, exp_avg_sq_ptr, elem, mask, g, one_minus_beta1, beta2, one_minus_beta2)
        denom = tl.sqrt_rn(v) / tl.load(bc2_sqrt_ptr + u, mask=hmask, other=1.0)[:, None] + eps
        w = w - tl.load(step_size_ptr + u, mask=hmask, other=0.0)[:, None] * tl.div_rn(m, denom)
    if WD_MODE == 2:
        w = w - (lr * wd) * w0
    tl.store(weights_ptr + elem, w.to(weights_ptr.dtype.element_ty), mask=mask)
