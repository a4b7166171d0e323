"""Triton kernels for lookups of row-wise quantized tables (inference; ../quant.py's format).

Tables of every type share one launch: a program reads its table's type code from
``weights_tys`` and branches once into code specialised for that type (`_decode`'s KIND and
BITS are constexprs); the pooled kernel branches outside its id loop, so the loop never
tests the type. Rows are addressed in bytes: table t's row r starts at byte
``weights_offsets[t] + r * row_bytes[t]``, ids widened to int64 first.

Decoding, per type:
- fp32 / fp16: the uint8 row pointer is cast to a float pointer. Aligned: a table starts at
  a multiple of 16 bytes and its rows are 4*dim (2*dim) bytes rounded up to a power of two.
- int8 / int4 / int2: the fp16 scale and bias are assembled from single bytes, since an
  intN row may be any number of bytes (dim // k + 4) and so start at an odd address;
  element j is bits ``(j % k) * BITS`` of byte ``4 + j // k``.
Values are decoded and accumulated in fp32 and rounded once to the output's dtype.

The bounds check (CHECK) is the float kernels' (kernels.py): ids are checked as they are
loaded, bags' offsets by the pooled kernel, faults recorded in ``err``.

This module must be imported after TRITON_INTERPRET is set if the kernels are to run
on the CPU: `triton.jit` decides at decoration time whether to interpret.
"""
import triton
import triton.language as tl

from .kernels import bag_of_program, block_of_program, check_bag, check_ids, record_first_bad, store_bag


@triton.jit
def _fp16_at(row_ptrs, byte: tl.constexpr, mask):
    """fp32 [BLOCK_N]: the fp16 stored at bytes byte, byte+1 of each row (any alignment)."""
    lo = tl.load(row_ptrs + byte, mask=mask, other=0).to(tl.int32)
    hi = tl.load(row_ptrs + (byte + 1), mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode(weights_ptr, row_start, nmask, cols, cmask, KIND: tl.constexpr, BITS: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_D]: columns `cols` of the rows starting at byte offsets
    `row_start` (int64 [BLOCK_N]); 0 outside ``nmask x cmask``. KIND: 0 fp32, 1 fp16,
    2 intN with BITS bits per code."""
    mask = nmask[:, None] & cmask[None, :]
    rows = weights_ptr + row_start  # uint8 pointers to each row's first byte
    if KIND == 0:
        vals = tl.load(rows.to(tl.pointer_type(tl.float32))[:, None] + cols[None, :], mask=mask, other=0.0)
    elif KIND == 1:
        vals = tl.load(rows.to(tl.pointer_type(tl.float16))[:, None] + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        scale = _fp16_at(rows, 0, nmask)
        bias = _fp16_at(rows, 2, nmask)
        code = tl.load(rows[:, None] + 4 + (cols // PER_BYTE)[None, :], mask=mask, other=0).to(tl.int32)
        if PER_BYTE > 1:
            code = (code >> ((cols % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
        # masked columns would decode to the bias: zero them so every caller may sum freely
        vals = tl.where(mask, code.to(tl.float32) * scale[:, None] + bias[:, None], 0.0)
    return vals


@triton.jit
def _pool_bag(weights_ptr, w_base, row_bytes, indices_ptr, psw_ptr, start, end, cols, cmask,
              n_rows, n, err_ptr, HAS_PSW: tl.constexpr, CHECK: tl.constexpr, KIND: tl.constexpr,
              BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_D]: the (weighted) sum of ids start:end's decoded rows, BLOCK_N per step
    (CHECK: ids outside [0, n_rows) are not read, the first recorded in err[0])."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first_bad = tl.zeros([BLOCK_N], dtype=tl.int64) + n
    for i in range(start, end, BLOCK_N):
        pos = i + tl.arange(0, BLOCK_N)
        nmask = pos < end
        ids = tl.load(indices_ptr + pos, mask=nmask, other=0).to(tl.int64)
        if CHECK:
            nmask, first_bad = check_ids(ids, pos, nmask, n_rows, first_bad)
        rows = _decode(weights_ptr, w_base + ids * row_bytes, nmask, cols, cmask, KIND, BITS)
        if HAS_PSW:
            s = tl.load(psw_ptr + pos, mask=nmask, other=0.0).to(tl.float32)
            rows = rows * s[:, None]
        acc += tl.sum(rows, axis=0)
    if CHECK:
        record_first_bad(err_ptr, first_bad, n)
    return acc


@triton.jit
def quant_pooled_forward_kernel(weights_ptr, w_offsets_ptr, row_bytes_ptr, tys_ptr, d_offsets_ptr, is_mean_ptr,
                                indices_ptr, offsets_ptr, psw_ptr, out_ptr, B, total_D, rows_ptr, n, err_ptr,
                                HAS_PSW: tl.constexpr, CHECK: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """Grid (T*B, cdiv(max_D, BLOCK_D)): program (bag, dblk) pools bag = t*B + b."""
    t, b, d0, D, start, end, cols, cmask = bag_of_program(d_offsets_ptr, offsets_ptr, B, BLOCK_D)
    n_rows = tl.load(rows_ptr + t)
    if CHECK:
        start, end = check_bag(err_ptr, tl.program_id(0), start, end, n)
    w_base = tl.load(w_offsets_ptr + t).to(tl.int64)
    row_bytes = tl.load(row_bytes_ptr + t).to(tl.int64)
    ty = tl.load(tys_ptr + t).to(tl.int32)
    if ty == 0:
        acc = _pool_bag(weights_ptr, w_base, row_bytes, indices_ptr, psw_ptr, start, end, cols, cmask,
                        n_rows, n, err_ptr, HAS_PSW, CHECK, 0, 32, BLOCK_N, BLOCK_D)
    elif ty == 1:
        acc = _pool_bag(weights_ptr, w_base, row_bytes, indices_ptr, psw_ptr, start, end, cols, cmask,
                        n_rows, n, err_ptr, HAS_PSW, CHECK, 1, 16, BLOCK_N, BLOCK_D)
    elif ty == 2:
        acc = _pool_bag(weights_ptr, w_base, row_bytes, indices_ptr, psw_ptr, start, end, cols, cmask,
                        n_rows, n, err_ptr, HAS_PSW, CHECK, 2, 8, BLOCK_N, BLOCK_D)
    elif ty == 3:
        acc = _pool_bag(weights_ptr, w_base, row_bytes, indices_ptr, psw_ptr, start, end, cols, cmask,
                        n_rows, n, err_ptr, HAS_PSW, CHECK, 2, 4, BLOCK_N, BLOCK_D)
    else:
        acc = _pool_bag(weights_ptr, w_base, row_bytes, indices_ptr, psw_ptr, start, end, cols, cmask,
                        n_rows, n, err_ptr, HAS_PSW, CHECK, 2, 2, BLOCK_N, BLOCK_D)
    store_bag(acc, is_mean_ptr, out_ptr, t, b, d0, start, end, cols, cmask, total_D)


@triton.jit
def quant_unpooled_forward_kernel(weights_ptr, w_offsets_ptr, row_bytes_ptr, tys_ptr, d_offsets_ptr,
                                  indices_ptr, offsets_ptr, out_offsets_ptr, out_ptr, B, rows_ptr, n, err_ptr,
                                  CHECK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T, cdiv(max N_t, BLOCK_N), cdiv(max_D, BLOCK_D)): decodes a block of table t's
    looked-up rows into its block of the flat output. The wrapper checks the offsets before the
    launch; CHECK checks the ids."""
    t, D, local, pos, nmask, cols, cmask = block_of_program(d_offsets_ptr, offsets_ptr, B, BLOCK_N, BLOCK_D)
    w_base = tl.load(w_offsets_ptr + t).to(tl.int64)
    row_bytes = tl.load(row_bytes_ptr + t).to(tl.int64)
    ty = tl.load(tys_ptr + t).to(tl.int32)
    ids = tl.load(indices_ptr + pos, mask=nmask, other=0).to(tl.int64)
    if CHECK:
        first_bad = tl.zeros([BLOCK_N], dtype=tl.int64) + n
        nmask, first_bad = check_ids(ids, pos, nmask, tl.load(rows_ptr + t), first_bad)
        record_first_bad(err_ptr, first_bad, n)
    row_start = w_base + ids * row_bytes
    if ty == 0:
        rows = _decode(weights_ptr, row_start, nmask, cols, cmask, 0, 32)
    elif ty == 1:
        rows = _decode(weights_ptr, row_start, nmask, cols, cmask, 1, 16)
    elif ty == 2:
        rows = _decode(weights_ptr, row_start, nmask, cols, cmask, 2, 8)
    elif ty == 3:
        rows = _decode(weights_ptr, row_start, nmask, cols, cmask, 2, 4)
    else:
        rows = _decode(weights_ptr, row_start, nmask, cols, cmask, 2, 2)
    out_base = tl.load(out_offsets_ptr + t)
    tl.store(out_ptr + out_base + local[:, None] * D + cols[None, :], rows.to(out_ptr.dtype.element_ty),
             mask=nmask[:, None] & cmask[None, :])
