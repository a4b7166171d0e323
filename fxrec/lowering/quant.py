"""Row-wise quantized tables for inference: the storage format, quantization, dequantization.

All tables live in one flat uint8 buffer; table t starts at byte ``weights_offsets[t]`` (a
multiple of `TABLE_ALIGN`) and each of its rows takes ``row_bytes[t]`` bytes. "fp32" /
"fp16" rows hold the dim values as they are (little-endian). "int8" / "int4" / "int2" rows
hold the codes, element j in bits ``(j % k) * bits`` of byte ``j // k`` (k = 8 // bits codes
per byte, low bits first), and the row's scale and bias: a value is ``scale * code + bias``.
Where the scale and bias sit is the layout's `qparams`, one of two formats that kernels
read as they are, without a copy:

- "front": FBGEMM's IntNBit table-batched layout (`fbgemm::int_nbit_split_embedding_codegen_
  lookup_function`, fxrec's Triton kernels): 4 bytes, an fp16 scale then an fp16 bias, before
  the codes; rows padded up to the layout's `row_alignment` (FBGEMM uses 1 on the CPU, 16
  on a GPU).
- "back": the layout of torch's own rowwise quantized ops (`quantized::embedding_bag_byte /
  4bit / 2bit_rowwise_offsets`, which take one table at a time and run ~2x faster on the
  CPU than FBGEMM's table-batched op, bench/inference.py): after the codes, an fp32 scale and
  bias for int8 (8 bytes), an fp16 scale and bias for int4 / int2 (4 bytes); no padding.

Quantization (`quantize_rows`) is row-wise asymmetric. With fp16 qparams it rounds as
FBGEMM's own quantizer (FloatToFusedNBitRowwiseQuantizedSBHalf) does: bias = fp16(row min),
scale = fp16((row max - bias) / (2**bits - 1)), code = round((x - bias) / scale) clamped to
[0, 2**bits - 1], with the rounded scale and bias (the codes are the nearest ones for the
values that will be decoded); with fp32 qparams the same without the fp16 rounding. Each
element is then off by at most about half a scale step (`max_error`). A constant row stores
scale 1 and code 0: it decodes to its bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import TBELayout

__all__ = ["QPARAMS", "QUANT_TYPES", "QuantLayout", "QuantType", "dequantize_rows", "max_error", "quant_type",
           "quantize_rows"]

TABLE_ALIGN = 16  # a table's first byte: 16-byte loads stay aligned for every row_alignment


@dataclass(frozen=True)
class QuantType:
    name: str  # "fp32", "fp16", "int8", "int4", "int2"
    bits: int
    sparse_type: int  # fbgemm's SparseType.as_int()

    @property
    def integer(self) -> bool:
        return self.name.startswith("int")

    @property
    def per_byte(self) -> int:
        """Codes per byte (integer types)."""
        return 8 // self.bits

    def qparam_bytes(self, qparams: str) -> int:
        """Bytes of scale + bias per row: fp32 pairs for int8 in the "back" format, else fp16."""
        if not self.integer:
            return 0
        return 8 if (qparams == "back" and self.bits == 8) else 4

    def unpadded_row_bytes(self, dim: int, qparams: str = "front") -> int:
        if self.integer:
            return dim // self.per_byte + self.qparam_bytes(qparams)
        return dim * self.bits // 8


QUANT_TYPES = {t.name: t for t in (QuantType("fp32", 32, 0), QuantType("fp16", 16, 1), QuantType("int8", 8, 2),
                                   QuantType("int4", 4, 3), QuantType("int2", 2, 4))}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
            torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8", torch.uint8: "int8"}


def quant_type(value, table: Optional[str] = None) -> QuantType:
    """The `QuantType` named by `value` ("int8", "int4", "int2", "fp16", "fp32" or the torch
    dtypes float32 / float16 / int8); a clear error otherwise."""
    if isinstance(value, QuantType):
        return value
    key = _ALIASES.get(value, value) if isinstance(value, (str, torch.dtype)) else value
    if isinstance(key, str) and key.lower() in QUANT_TYPES:
        return QUANT_TYPES[key.lower()]
    if isinstance(key, str) and key.lower() in _ALIASES:
        return QUANT_TYPES[_ALIASES[key.lower()]]
    where = f"table {table!r}: " if table is not None else ""
    raise ValueError(f"{where}weight_dtype {value!r} is not a quantized table type; choose one of "
                     f"{sorted(QUANT_TYPES)}")


def check_dim(table: str, dim: int, qtype: QuantType) -> None:
    """intN codes pack whole bytes per row (FBGEMM's rule): the dim must be a multiple of 8 / bits."""
    if qtype.integer and dim % qtype.per_byte:
        raise ValueError(f"table {table!r}: dim {dim} cannot be stored as {qtype.name} (its codes pack "
                         f"{qtype.per_byte} per byte, so the dim must be a multiple of {qtype.per_byte}); "
                         f"choose int8 or fp16 for this table")


QPARAMS = ("front", "back")


class QuantLayout(TBELayout):
    """A `TBELayout` whose flat buffer is uint8 in the module doc's format: table t's rows
    are ``row_bytes[t]`` bytes each, from byte ``weights_offsets[t]``; `types` names each
    table's `QuantType` and `weights_tys` holds fbgemm's SparseType codes (uint8, T);
    `qparams` is "front" (FBGEMM's layout) or "back" (torch's rowwise ops' layout)."""

    def __init__(self, tables: Sequence, types: Sequence, device=None, row_alignment: Optional[int] = None,
                 qparams: str = "front"):
        super().__init__(tables, device)
        if qparams not in QPARAMS:
            raise ValueError(f"qparams must be one of {QPARAMS}, got {qparams!r}")
        self.qparams = qparams
        if len(types) != self.num_tables:
            raise ValueError(f"QuantLayout: {self.num_tables} tables but {len(types)} types")
        self.types = tuple(t if isinstance(t, QuantType) else quant_type(t, n) for t, n in zip(types, self.names))
        for name, dim, qtype in zip(self.names, self.dims, self.types):
            check_dim(name, dim, qtype)
        if row_alignment is None:
            row_alignment = 16 if self.device.type == "cuda" and qparams == "front" else 1
        if row_alignment < 1 or row_alignment & (row_alignment - 1):
            raise ValueError(f"row_alignment must be a power of two, got {row_alignment}")
        if qparams == "back" and row_alignment != 1:  # torch's ops infer the dim from the row's bytes
            raise ValueError(f"the 'back' format has unpadded rows; row_alignment must be 1, got {row_alignment}")
        self.row_alignment = row_alignment
        self.row_bytes = tuple(-(-q.unpadded_row_bytes(d, qparams) // row_alignment) * row_alignment
                               for q, d in zip(self.types, self.dims))
        offsets, pos = [], 0
        for r, b in zip(self.rows, self.row_bytes):
            offsets.append(pos)
            pos += -(-(r * b) // TABLE_ALIGN) * TABLE_ALIGN
        self.weights_offsets_list = tuple(offsets)
        self.numel = pos
        self.weights_offsets = torch.tensor(offsets, dtype=torch.int64, device=self.device)
        self.weights_tys = torch.tensor([q.sparse_type for q in self.types], dtype=torch.uint8, device=self.device)

    def max_dim(self, name: str) -> int:
        """The largest dim of the tables stored as `name` (0 if none), as fbgemm's op takes them."""
        return max([d for d, q in zip(self.dims, self.types) if q.name == name], default=0)

    def to(self, device) -> "QuantLayout":
        return QuantLayout(self._specs(), self.types, device, self.row_alignment, self.qparams)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-table ``rows x row_bytes`` uint8 views of the buffer."""
        return [flat[o:o + r * b].view(r, b) for o, r, b in zip(self.weights_offsets_list, self.rows, self.row_bytes)]


# ------------------------------------------------------------------ quantize / dequantize
_FP16_MAX = 65504.0


_CHUNK_ROWS = 1 << 16  # rows quantized at a time: the fp32 temporaries stay a few MB, whatever the table


@torch.no_grad()
def quantize_rows(weight: Tensor, qtype: QuantType, row_bytes: Optional[int] = None,
                  table: str = "?", qparams: str = "front", out: Optional[Tensor] = None) -> Tensor:
    """``rows x dim`` float -> ``rows x row_bytes`` uint8 rows in `qtype`'s format with the
    scale and bias at `qparams` (module doc), written into `out` when given (e.g. a view of a
    module's buffer); padding bytes are zero. Works `_CHUNK_ROWS` rows at a time, so a large
    table never needs a float copy of itself. Raises ValueError naming `table` for values the
    format cannot hold (non-finite, or beyond fp16's range where fp16 numbers are stored)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"table {table!r}: expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(f"table {table!r} is on the meta device: there are no values to quantize "
                         f"(load the trained weights first)")
    rows, dim = weight.shape
    check_dim(table, dim, qtype)
    row_bytes = qtype.unpadded_row_bytes(dim, qparams) if row_bytes is None else row_bytes
    if out is None:
        out = torch.empty(rows, row_bytes, dtype=torch.uint8, device=weight.device)
    elif tuple(out.shape) != (rows, row_bytes) or out.dtype != torch.uint8:
        raise ValueError(f"table {table!r}: out must be uint8 {(rows, row_bytes)}, got {out.dtype} {tuple(out.shape)}")
    for start in range(0, rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, rows)
        _quantize_chunk(weight[start:stop].float(), qtype, qparams, out[start:stop], table, start)
    return out


def _quantize_chunk(w: Tensor, qtype: QuantType, qparams: str, out: Tensor, table: str, first: int) -> None:
    """`quantize_rows` for rows ``first:first + len(w)`` (fp32 `w`) into `out`."""
    rows, dim = w.shape
    out.zero_()  # padding bytes
    finite = torch.isfinite(w).all(1)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(f"table {table!r}: row {first + bad} holds a non-finite value "
                         f"({w[bad][~torch.isfinite(w[bad])][0].item()})")
    if qtype.name == "fp32":
        out[:, :dim * 4] = w.contiguous().view(torch.uint8).view(rows, dim * 4)
        return
    half_qparams = qtype.qparam_bytes(qparams) == 4
    if qtype.name == "fp16" or half_qparams:
        big = w.abs().amax(1) > _FP16_MAX
        if big.any():
            row = int(torch.nonzero(big)[0, 0])
            raise ValueError(f"table {table!r}: row {first + row} holds {w[row].abs().max().item():.4g}, beyond "
                             f"fp16's range (65504), which {qtype.name} stores its values or scale in; use fp32")
    if qtype.name == "fp16":
        out[:, :dim * 2] = w.half().contiguous().view(torch.uint8).view(rows, dim * 2)
        return
    levels = (1 << qtype.bits) - 1
    lo, hi = torch.aminmax(w, dim=1)
    # FBGEMM's rounding (FloatToFusedNBitRowwiseQuantizedSBHalf): the bias is rounded to fp16
    # first and the range taken from it; a constant row, or a scale that underflows fp16,
    # stores scale 1 (every code is then 0 or near it). fp32 qparams skip the rounding.
    qdtype = torch.float16 if half_qparams else torch.float32
    bias = lo.to(qdtype)
    b = bias.float()
    span = hi - b
    wide = ~torch.isfinite(span)
    if wide.any():  # the scale would be inf, and every value decode to nan
        row = int(torch.nonzero(wide)[0, 0])
        raise ValueError(f"table {table!r}: row {first + row} spans {lo[row].item():.4g} to {hi[row].item():.4g}, "
                         f"a range beyond float32, which {qtype.name} stores its scale in; use fp32")
    scale = torch.where(span > 0, span / levels, torch.ones_like(span)).to(qdtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = 1.0 / scale.float()
    codes = torch.round((w - b[:, None]) * inv[:, None]).clamp_(0, levels).to(torch.uint8)
    k = qtype.per_byte
    if k > 1:  # element j at bits (j % k) * bits of byte j // k
        shifts = (torch.arange(k, device=w.device, dtype=torch.uint8) * qtype.bits)
        codes = (codes.view(rows, dim // k, k) << shifts).sum(dim=2, dtype=torch.int32).to(torch.uint8)
    qp = torch.stack([scale, bias], dim=1).view(torch.uint8)
    nq, nc = qp.shape[1], dim // k
    if qparams == "front":
        out[:, 0:nq], out[:, nq:nq + nc] = qp, codes
    else:
        out[:, 0:nc], out[:, nc:nc + nq] = codes, qp


def _fresh(x: Tensor) -> Tensor:
    """A packed copy: `contiguous()` keeps a one-row slice's odd row stride, which a dtype
    view rejects."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def dequantize_rows(rows: Tensor, qtype: QuantType, dim: int, qparams: str = "front") -> Tensor:
    """``N x row_bytes`` uint8 rows -> ``N x dim`` float32 values (the module doc's decoding)."""
    n = rows.shape[0]
    if n == 0:  # an empty slice keeps its row stride, which a dtype view would reject
        return torch.zeros(0, dim, dtype=torch.float32, device=rows.device)
    if qtype.name == "fp32":
        return _fresh(rows[:, :dim * 4]).view(torch.float32).view(n, dim)
    if qtype.name == "fp16":
        return _fresh(rows[:, :dim * 2]).view(torch.float16).view(n, dim).float()
    k, nq = qtype.per_byte, qtype.qparam_bytes(qparams)
    qdtype = torch.float16 if nq == 4 else torch.float32
    q0, c0 = (0, nq) if qparams == "front" else (dim // k, 0)
    qp = _fresh(rows[:, q0:q0 + nq]).view(qdtype).float()  # n x 2: scale, bias
    packed = rows[:, c0:c0 + dim // k]
    if k == 1:
        codes = packed.float()
    else:
        shifts = torch.arange(k, device=rows.device, dtype=torch.uint8) * qtype.bits
        mask = (1 << qtype.bits) - 1
        codes = ((packed.unsqueeze(2) >> shifts) & mask).reshape(n, dim).float()
    return codes * qp[:, 0:1] + qp[:, 1:2]


def max_error(weight: Tensor, qtype: QuantType) -> Tensor:
    """Per row, a bound on the error `quantize_rows` leaves (fp32 [rows]): half a scale step,
    plus fp16's rounding of the values (fp16) or of the bias and scale (intN; the scale's
    error grows with the code, up to 2**bits of them). fp32 qparams round less: the bound
    holds for both formats."""
    w = weight.float()
    lo, hi = torch.aminmax(w, dim=1)
    mag = torch.maximum(lo.abs(), hi.abs())
    if qtype.name == "fp32":
        return torch.zeros_like(lo)
    fp16_ulp = mag * 2.0 ** -11
    if qtype.name == "fp16":
        return fp16_ulp
    step = (hi - lo) / ((1 << qtype.bits) - 1)
    levels = (1 << qtype.bits) - 1
    # fp16 subnormal scales (tiny row ranges) keep only absolute precision 2**-24 per code step
    return step * (0.5 + 2.0 ** -10 * (1 << qtype.bits)) + fp16_ulp + levels * 2.0 ** -24
