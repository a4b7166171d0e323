"""The kernel registry: which implementation serves a fused lookup op.

Each backend module registers, per op, an implementation and a *checker*. A checker
takes a `Problem` and returns None when the impl can serve it, or a short reason
why not. `select` walks the impls of an op in priority order (ties: registration
order) and returns the first whose checker accepts. Default priorities put triton
first, then fbgemm, then any other registered name, then torch, which accepts
everything and is the last resort; so the order does not depend on import order.

Forcing: `select(op, kernel="fbgemm", ...)` or the environment variable
``FXREC_KERNEL=triton|fbgemm|torch`` restricts the choice to one impl; if that impl is
not registered or its checker refuses, `NoKernelError` says why. The argument wins over
the environment variable. A forced choice sets `Problem.explicit`, which the Triton
checker needs before it serves a CPU problem through the interpreter.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# quant_*: lookups of row-wise quantized tables (fxrec/lowering/quant.py's format), for inference
OPS = ("pooled_forward", "unpooled_forward", "backward_update", "quant_pooled_forward", "quant_unpooled_forward")
KERNELS = ("triton", "fbgemm", "torch")
ENV_VAR = "FXREC_KERNEL"


class NoKernelError(ValueError):
    """No registered kernel can serve a problem (or the forced one cannot)."""


@dataclass(frozen=True)
class Problem:
    """What a checker may look at. `dims`/`poolings` have one entry per table."""

    device: str = "cpu"  # device type: "cpu", "cuda", "meta", ...
    weight_dtype: torch.dtype = torch.float32
    index_dtype: torch.dtype = torch.int64
    dims: tuple[int, ...] = ()
    poolings: tuple[str, ...] = ()  # "sum" / "mean" / "none"
    optimizer: Optional[str] = None  # SGD.name / RowWiseAdagrad.name / Adagrad.name / Adam.name
    weight_decay: int = 0  # the optimizer's weight-decay mode (fxrec.optim.DECAY_MODES): 0 none
    weighted: bool = False  # per-sample weights present
    deterministic: bool = False
    explicit: bool = False  # set by `select` when the kernel was forced
    weight_types: tuple[str, ...] = ()  # quant_* ops: each table's QuantType name ("int8", ...)
    output_dtype: torch.dtype = torch.float32  # quant_* ops: the dtype of the looked-up values
    qparams: str = "front"  # quant_* ops: where rows keep scale and bias (fxrec/lowering/quant.py)
    threads: int = 1  # torch's intra-op threads (torch.get_num_threads()), for CPU kernels that scale or not

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device).type)
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "poolings", tuple(self.poolings))
        object.__setattr__(self, "weight_types", tuple(self.weight_types))


Checker = Callable[[Problem], Optional[str]]


@dataclass(frozen=True)
class _Entry:
    name: str
    impl: Callable
    checker: Checker
    priority: int


_DEFAULT_PRIORITY = {"triton": 0, "fbgemm": 10, "torch": 100}
_OTHER_PRIORITY = 50


_REGISTRY: dict[str, list[_Entry]] = {op: [] for op in OPS}
# backend name -> why it registered nothing (an import failure), for error messages
_UNAVAILABLE: dict[str, str] = {}
_loaded = False


def register_kernel(op: str, name: str, impl: Callable, checker: Checker,
                    priority: Optional[int] = None) -> None:
    """Register `impl` as kernel `name` for `op`; lower `priority` is tried first
    (default: triton 0, fbgemm 10, other names 50, torch 100). Re-registering a name
    replaces it."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if priority is None:
        priority = _DEFAULT_PRIORITY.get(name, _OTHER_PRIORITY)
    entries = [e for e in _REGISTRY[op] if e.name != name]
    entries.append(_Entry(name, impl, checker, priority))
    entries.sort(key=lambda e: e.priority)  # stable: ties keep registration order
    _REGISTRY[op] = entries


def mark_unavailable(name: str, reason: str) -> None:
    """A backend module calls this when its import fails, so a forced choice can say why."""
    _UNAVAILABLE[name] = reason


def _load_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import triton as _triton  # noqa: F401  (registers nothing if triton is absent)
    from . import fbgemm as _fbgemm  # noqa: F401
    from . import torch_ref as _torch_ref  # noqa: F401


def registered(op: str) -> list[str]:
    """Names registered for `op`, in priority order."""
    _load_backends()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    return [e.name for e in _REGISTRY[op]]


def _forced(kernel: Optional[str]) -> Optional[str]:
    forced = kernel if kernel is not None else (os.environ.get(ENV_VAR) or None)
    known = set(KERNELS) | {e.name for entries in _REGISTRY.values() for e in entries}
    if forced is not None and forced not in known:
        source = "kernel=" if kernel is not None else f"{ENV_VAR}="
        raise NoKernelError(f"{source}{forced!r} is not a kernel; choose one of {sorted(known)}")
    return forced


def kernel_choices(op: str, **problem) -> list[tuple[str, Optional[str]]]:
    """Every registered impl of `op` with None (would accept) or the checker's reason."""
    _load_backends()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    prob = Problem(**problem)
    return [(e.name, e.checker(prob)) for e in _REGISTRY[op]]


def select(op: str, kernel: Optional[str] = None, **problem) -> tuple[str, Callable]:
    """Return `(name, impl)` of the kernel serving `op` for this problem.

    `problem` holds `Problem`'s fields. Raises NoKernelError when a forced kernel
    cannot serve (naming the reason) or, which cannot happen while torch is
    registered, when nothing accepts.
    """
    _load_backends()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    forced = _forced(kernel)
    prob = Problem(**problem)
    if forced is not None:
        prob = dataclasses.replace(prob, explicit=True)
        for entry in _REGISTRY[op]:
            if entry.name == forced:
                reason = entry.checker(prob)
                if reason is not None:
                    raise NoKernelError(f"kernel {forced!r} cannot serve {op}: {reason}")
                return entry.name, entry.impl
        why = _UNAVAILABLE.get(forced, "not registered for this op")
        raise NoKernelError(f"kernel {forced!r} is unavailable for {op}: {why}")
    reasons = []
    for entry in _REGISTRY[op]:
        reason = entry.checker(prob)
        if reason is None:
            return entry.name, entry.impl
        reasons.append(f"{entry.name}: {reason}")
    raise NoKernelError(f"no kernel can serve {op} ({'; '.join(reasons)})")
