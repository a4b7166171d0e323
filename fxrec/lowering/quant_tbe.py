"""`QuantizedEmbeddingBags`: T row-wise quantized tables in one buffer, looked up by one fused op.

The inference twin of `FusedEmbeddingBags` (tbe.py): the same inputs and outputs (pooled
``B x sum(dims)``, or the flat unpooled layout), so the modules that call one can call the
other (`LocalLookup`, the glue of fuse_lookups). The weights are a uint8 buffer in
quant.py's format; each table has its own type (fp32, fp16, int8, int4, int2). Kernels come
from the registry's ``quant_pooled_forward`` / ``quant_unpooled_forward``: Triton, FBGEMM's
IntNBit op, or torch (torch's rowwise quantized ops); the buffer's row format follows the
kernel chosen at construction ("back" for torch, "front" for the table-batched kernels).
There is no backward: the tables are constants.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo

from . import registry
from .layout import check_devices, check_inputs, in_table_order, packed, table_position
from .quant import QuantLayout, dequantize_rows, quant_type, quantize_rows

__all__ = ["QuantizedEmbeddingBags"]

_OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@eager_under_dynamo
class QuantizedEmbeddingBags(nn.Module):
    """tables: objects with ``name, num_embeddings, embedding_dim`` and ``pooling`` ("sum" /
    "mean"; "none" or absent = unpooled); all pooled or all unpooled.
    weight_types: one type for every table ("int8", "int4", "int2", "fp16", "fp32"), or a
    mapping table name -> type naming every table.
    output_dtype: the dtype of the looked-up values (float32, float16, bfloat16).
    kernel: force "triton", "fbgemm" or "torch" (else FXREC_KERNEL, else the registry's choice).
    bounds_check: validate ids and offsets on every call (ids out of range name their table).

    The buffer starts zeroed: fill it with `load_table(s)` (float weights, quantized here) or
    build the module with `from_float`."""

    def __init__(self, tables: Sequence, weight_types: Union[str, Mapping[str, str]] = "int8",
                 output_dtype: torch.dtype = torch.float32, kernel: Optional[str] = None, device=None,
                 bounds_check: bool = True, row_alignment: Optional[int] = None):
        super().__init__()
        names = [str(t.name) for t in tables]
        per_table = in_table_order(names, weight_types, "weight_types") if isinstance(weight_types, Mapping) \
            else [weight_types] * len(names)
        types = [quant_type(w, n) for w, n in zip(per_table, names)]
        if output_dtype not in _OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {_OUTPUT_DTYPES}, got {output_dtype}")
        self.output_dtype = output_dtype
        # FXREC_KERNEL is read here, once: the row format below follows the kernel, so a
        # kernel chosen per call could not read the rows
        self.kernel_request = kernel if kernel is not None else (os.environ.get(registry.ENV_VAR) or None)
        kernel = self.kernel_request
        # The row format follows the kernel: torch's rowwise ops read "back", FBGEMM's and
        # fxrec's Triton table-batched kernels "front" (quant.py). Ask which kernel would serve
        # the "front" format; torch then gets its own.
        front = QuantLayout(tables, types, device, row_alignment)
        probe = self._problem(front, torch.int64, False, None)
        name, _ = registry.select(self._op_for(front), kernel=kernel, **probe)
        self.layout = front if name != "torch" else QuantLayout(tables, types, device, 1, qparams="back")
        self.register_buffer("weights", torch.zeros(self.layout.numel, dtype=torch.uint8, device=self.layout.device))
        self.bounds_check = bounds_check
        self.optimizer = None  # read by code shared with FusedEmbeddingBags: these tables never train
        self.kernels: dict[str, str] = {}
        self._impls: dict[tuple, tuple[str, object]] = {}
        self._select(torch.int64, False)  # a forced kernel that cannot serve fails here

    @classmethod
    @torch.no_grad()
    def from_float(cls, tables: Sequence, weights: Union[Mapping[str, Tensor], Sequence[Tensor]],
                   weight_types: Union[str, Mapping[str, str]] = "int8", **kwargs) -> "QuantizedEmbeddingBags":
        """A module over `tables` holding `weights` (per table, ``rows x dim`` float) quantized."""
        device = kwargs.pop("device", None)
        if device is None:
            first = next(iter(weights.values())) if isinstance(weights, Mapping) else weights[0]
            device = first.device
        module = cls(tables, weight_types, device=device, **kwargs)
        module.load_tables(weights)
        return module

    @classmethod
    def from_fused(cls, fused, weight_types: Union[str, Mapping[str, str]] = "int8",
                   **kwargs) -> "QuantizedEmbeddingBags":
        """The tables of a `FusedEmbeddingBags` (same names, shapes, poolings, device), quantized."""
        return cls.from_float(fused.layout._specs(), fused.table_weights(), weight_types,
                              device=fused.weights.device, **kwargs)

    # -- kernels -----------------------------------------------------------------
    @staticmethod
    def _op_for(layout) -> str:
        return "quant_pooled_forward" if layout.pooled else "quant_unpooled_forward"

    @property
    def _op(self) -> str:
        return self._op_for(self.layout)

    @property
    def kernel(self) -> str:
        """Name of the kernel serving the lookup."""
        return self.kernels[self._op]

    def _problem(self, layout, index_dtype, weighted: bool, device) -> dict:
        return dict(device=torch.device(device) if device is not None else layout.device,
                    weight_dtype=torch.uint8, index_dtype=index_dtype, dims=layout.dims,
                    poolings=layout.poolings, weighted=bool(weighted and layout.pooled),
                    weight_types=tuple(q.name for q in layout.types), output_dtype=self.output_dtype,
                    qparams=layout.qparams)

    def problem(self, index_dtype: torch.dtype = torch.int64, weighted: bool = False, device=None) -> dict:
        """The registry `Problem` fields of this module's lookup."""
        return self._problem(self.layout, index_dtype, weighted, device if device is not None else self.weights.device)

    def _select(self, index_dtype: torch.dtype, weighted: bool):
        key = (index_dtype, weighted, self.weights.device.type)
        if key not in self._impls:
            self._impls[key] = registry.select(self._op, kernel=self.kernel_request,
                                               **self.problem(index_dtype, weighted))
        name, impl = self._impls[key]
        self.kernels[self._op] = name
        return impl

    def kernel_record(self, weighted: bool = False, device=None) -> dict[str, str]:
        """``{op: kernel}`` the lookup runs on int64 ids, as `fxrec dump` shows it."""
        name, _ = registry.select(self._op, kernel=self.kernel_request, **self.problem(torch.int64, weighted, device))
        return {self._op: name}

    # -- lookup ------------------------------------------------------------------------
    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor] = None,
                **_unused) -> Tensor:
        """Pooled: ``B x sum(dims)`` in `output_dtype`; unpooled: the flat layout (layout.py)."""
        check_devices(self.weights.device, indices=indices, offsets=offsets, per_sample_weights=per_sample_weights)
        indices, offsets, per_sample_weights = packed(indices, offsets, per_sample_weights)
        check_inputs(self.layout, indices, offsets, per_sample_weights, False)  # shapes and dtypes
        if self.layout.device != self.weights.device:  # the module was moved with .to()
            self.layout = self.layout.to(self.weights.device)
        impl = self._select(indices.dtype, per_sample_weights is not None)
        # a kernel that checks the ids as it loads them (Triton's) is asked to; others are checked first
        in_kernel = self.bounds_check and getattr(impl, "checks_ids", False)
        check_inputs(self.layout, indices, offsets, per_sample_weights, self.bounds_check and not in_kernel)
        kw = {"check_ids": True} if in_kernel else {}
        with torch.no_grad():
            if self.layout.pooled:
                return impl(self.weights, self.layout, indices, offsets, per_sample_weights, self.output_dtype, **kw)
            return impl(self.weights, self.layout, indices, offsets, self.output_dtype, **kw)

    # -- tables --------------------------------------------------------------------------
    def split_weights(self) -> list[Tensor]:
        """Per-table ``rows x row_bytes`` uint8 views into the buffer."""
        return self.layout.split(self.weights)

    def dequantized(self) -> dict[str, Tensor]:
        """Table name -> its ``rows x dim`` values as the kernels read them (fp32)."""
        return {n: dequantize_rows(w, q, d, self.layout.qparams) for n, w, q, d in
                zip(self.layout.names, self.split_weights(), self.layout.types, self.layout.dims)}

    @torch.no_grad()
    def load_tables(self, weights: Union[Mapping[str, Tensor], Sequence[Tensor]]) -> None:
        """Quantize per-table float weights in (by table name, or a sequence in table order)."""
        for name, w in zip(self.layout.names, in_table_order(self.layout.names, weights, "weights")):
            self.load_table(name, w)

    @torch.no_grad()
    def load_table(self, name: str, weight: Tensor) -> None:
        """Quantize one table's ``rows x dim`` float weights into the buffer."""
        t = table_position(self.layout.names, name)
        shape = (self.layout.rows[t], self.layout.dims[t])
        if tuple(weight.shape) != shape:
            raise ValueError(f"table {name!r}: expected weight {shape}, got {tuple(weight.shape)}")
        quantize_rows(weight.detach(), self.layout.types[t], self.layout.row_bytes[t], name, self.layout.qparams,
                      out=self.split_weights()[t])

    def extra_repr(self) -> str:
        tables = ", ".join(f"{n}:{r}x{d}:{q.name}:{p}" for n, r, d, q, p in
                           zip(self.layout.names, self.layout.rows, self.layout.dims, self.layout.types,
                               self.layout.poolings))
        return (f"tables=[{tables}], bytes={self.layout.numel}, qparams={self.layout.qparams}, "
                f"output_dtype={self.output_dtype}, "
                f"kernels={self.kernels}")
