"""fxrec's Triton kernels: the GPU fast path. Registers nothing if triton cannot be imported.

Served problems: CUDA tensors; or CPU tensors when this package was imported with
TRITON_INTERPRET=1 in the environment *and* the kernel was requested explicitly
(``kernel="triton"`` or FXREC_KERNEL=triton) -- the interpreter is for testing, far too
slow to be picked on its own. Weights fp32/fp16/bf16, ids int32/int64, sum/mean/none
pooling, per-sample weights, SGD/RowWiseAdagrad/Adagrad/Adam, dims up to `ops.MAX_DIM`.
Quantized tables (quant_pooled_forward / quant_unpooled_forward, `quant_ops`): uint8 buffers
of fp32/fp16/int8/int4/int2 tables in FBGEMM's format (qparams "front"), mixed in one
launch, output fp32/fp16/bf16.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..registry import Problem, mark_unavailable, register_kernel

try:
    from . import ops as _ops
    from . import quant_ops as _quant_ops
    from .kernels import pooled_forward_kernel as _probe

    # triton.jit chose interpreter or compiler when kernels.py was imported.
    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
    AVAILABLE = True
except Exception as e:  # ImportError, or a triton that fails to initialise
    AVAILABLE = False
    INTERPRETED = False
    mark_unavailable("triton", f"triton import failed: {type(e).__name__}: {e}")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPTIMIZERS = ("sgd", "rowwise_adagrad", "adagrad", "adam")
_QUANT_TYPES = ("fp32", "fp16", "int8", "int4", "int2")


def _check(p: Problem) -> Optional[str]:
    if p.device == "cpu":
        if not INTERPRETED:
            return "CPU tensors need TRITON_INTERPRET=1 set before fxrec's Triton kernels are imported"
        if not p.explicit:
            return "the Triton interpreter serves CPU problems only when requested explicitly"
    elif p.device != "cuda":
        return f"device {p.device} unsupported (Triton: cuda)"
    if p.weight_dtype not in _DTYPES:
        return f"weights {p.weight_dtype} unsupported (Triton: float32, float16, bfloat16)"
    if p.index_dtype not in (torch.int32, torch.int64):
        return f"ids {p.index_dtype} unsupported (int32, int64)"
    return None


def _check_backward(p: Problem) -> Optional[str]:
    if p.optimizer not in _OPTIMIZERS:
        return f"optimizer {p.optimizer!r} unsupported (Triton: {', '.join(_OPTIMIZERS)})"
    if p.dims and max(p.dims) > _ops.MAX_DIM:
        return f"dim {max(p.dims)} > {_ops.MAX_DIM} (the update keeps a whole row in one program)"
    return _check(p)


def _check_quant(p: Problem) -> Optional[str]:
    # device and ids as for float tables; the weight dtype is checked below
    reason = _check(dataclasses.replace(p, weight_dtype=torch.float32))
    if reason is not None:
        return reason
    if p.weight_dtype != torch.uint8:
        return f"quantized weights must be a uint8 buffer, got {p.weight_dtype}"
    odd = sorted(set(p.weight_types) - set(_QUANT_TYPES))
    if odd:
        return f"table types {odd} unsupported (Triton: {', '.join(_QUANT_TYPES)})"
    if p.output_dtype not in _DTYPES:
        return f"output {p.output_dtype} unsupported (Triton: float32, float16, bfloat16)"
    if p.qparams != "front":
        return f"qparams {p.qparams!r} unsupported (Triton reads FBGEMM's 'front' format)"
    return None


if AVAILABLE:
    register_kernel("pooled_forward", "triton", _ops.pooled_forward, _check)
    register_kernel("unpooled_forward", "triton", _ops.unpooled_forward, _check)
    register_kernel("backward_update", "triton", _ops.backward_update, _check_backward)
    register_kernel("quant_pooled_forward", "triton", _quant_ops.quant_pooled_forward, _check_quant)
    register_kernel("quant_unpooled_forward", "triton", _quant_ops.quant_unpooled_forward, _check_quant)
