"""What fx's symbolic tracing cannot record by itself, and sequence models write every day.

- A tensor factory given a traced size: ``torch.ones(L, L)`` with ``L = seq.shape[1]`` (a
  causal mask). torch's argument parser does not know fx's Proxy, so the call fails
  (``ones() takes 1 positional argument but 2 were given``); `sizes_as_nodes` patches the
  factories while a tracer runs so that a call given a Proxy anywhere in its arguments becomes
  a graph node, and any other call runs as before.
- Item assignment: ``e[seq == 0] = 0`` (zeroing padded positions). fx's Proxy has no
  ``__setitem__``; `SetItemProxy` records ``operator.setitem``, which guard_inplace already
  knows as an in-place write.
"""
from __future__ import annotations

import contextlib
import functools
import operator

import torch
import torch.utils._pytree as pytree
from torch.fx import Proxy

__all__ = ["SetItemProxy", "sizes_as_nodes"]

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
