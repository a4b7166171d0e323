"""fxrec.lowering: fused embedding kernels and the registry that picks one.

Ops (strings): "pooled_forward", "unpooled_forward", "backward_update" (and, for quantized
tables, "quant_pooled_forward", "quant_unpooled_forward"). Kernels, in
priority order: "triton" (fxrec's own; CUDA, or the CPU interpreter on explicit
request), "fbgemm" (fbgemm_gpu's table-batched ops, where importable), "torch" (always).
`select(op, **problem)` returns the chosen `(name, impl)`; `kernel_choices(op,
**problem)` says, for every registered kernel, whether it would serve and if not why;
FXREC_KERNEL=triton|fbgemm|torch forces one.

`FusedEmbeddingBags` is the user-facing module; `TBELayout` the shared data layout.
Inference: `QuantizedEmbeddingBags` over `QuantLayout` (row-wise int8/int4/int2, fp16, fp32
tables; ops "quant_pooled_forward", "quant_unpooled_forward"), and `lower_for_inference`.
"""
from __future__ import annotations

from .layout import TBELayout, check_inputs
from .registry import (ENV_VAR, KERNELS, OPS, NoKernelError, Problem, kernel_choices,
                       register_kernel, registered, select)
from .quant import QUANT_TYPES, QuantLayout
from .quant_tbe import QuantizedEmbeddingBags
from .tbe import FusedEmbeddingBags

__all__ = ["ENV_VAR", "KERNELS", "OPS", "FusedEmbeddingBags", "NoKernelError", "Problem", "QUANT_TYPES",
           "QuantLayout", "QuantizedEmbeddingBags", "TBELayout",
           "check_inputs", "kernel_choices", "register_kernel", "registered", "select"]
