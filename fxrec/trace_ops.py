"""What fx's symbolic tracing cannot record by itself, and sequence models write every day.

- A tensor factory given a traced size: ``torch.ones(L, L)`` with ``L = seq.shape[1]`` (a
  causal mask). torch's argument parser does not know fx's Proxy, so the call fails
  (``ones() takes 1 positional argument but 2 were given``); `sizes_as_nodes` patches the
  factories while a tracer runs so that a call given a Proxy anywhere in its arguments becomes
  a graph node, and any other call runs as before.
- Item assignment: ``e[seq == 0] = 0`` (zeroing padded positions). fx's Proxy has no
  ``__setitem__``; `SetItemProxy` records ``operator.setitem``, which guard_inplace already
  knows as an in-place write.
- Reentrant activation checkpointing (``torch.utils.checkpoint.checkpoint(f, x,
  use_reentrant=True)``) runs `f` under ``torch.no_grad()`` in its forward, and the tracer
  records grad-mode blocks (capture.py): traced into, the block was kept in the program, and
  nothing inside or before it got a gradient. `checkpoints_traced_through` has the tracer
  record `f`'s computation itself, as the non-reentrant form is traced; the program keeps no
  recomputation (the activations are kept), which a warning says.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import warnings

import torch
import torch.utils._pytree as pytree
from torch.fx import Proxy

__all__ = ["SetItemProxy", "checkpoints_traced_through", "sizes_as_nodes"]

FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "randint", "arange", "eye", "linspace")


class SetItemProxy(Proxy):
    """fx's Proxy that also records ``proxy[key] = value`` (module doc)."""

    def __setitem__(self, key, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


@contextlib.contextmanager
def sizes_as_nodes(tracer):
    """While `tracer` traces: torch's tensor factories called with a Proxy record a node."""
    def recording(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if any(isinstance(a, Proxy) for a in pytree.tree_leaves((args, kwargs))):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return call

    saved = {name: getattr(torch, name) for name in FACTORIES}
    try:
        for name, fn in saved.items():
            setattr(torch, name, recording(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def checkpoints_traced_through():
    """While a tracer runs: reentrant activation checkpoints call their function directly
    (module doc), with one warning per capture."""
    from torch.utils.checkpoint import CheckpointFunction

    seen = []

    def through(function, preserve_rng_state, *args):
        if not seen:
            seen.append(function)
            warnings.warn(f"fxrec.capture: the reentrant activation checkpoint around {_name(function)} is "
                          f"captured as plain code (its activations are kept, not recomputed in backward); "
                          f"its gradients are the model's", stacklevel=4)
        return function(*args)

    own = CheckpointFunction.__dict__.get("apply")  # torch's is inherited from autograd.Function
    try:
        CheckpointFunction.apply = staticmethod(through)
        yield
    finally:
        if own is None:
            del CheckpointFunction.apply
        else:
            CheckpointFunction.apply = own


def _name(function) -> str:
    owner = getattr(function, "__self__", None)
    return type(owner).__name__ + "." + function.__name__ if owner is not None else getattr(function, "__name__",
                                                                                             repr(function))
