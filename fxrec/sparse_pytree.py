"""Pytree registration of fxrec's sparse types, so torch.export and torch.compile
flatten them (imported by fxrec/sparse.py once the classes exist)."""
from __future__ import annotations

import json

import torch.utils._pytree as pytree

from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

# ------------------------------------------------------------------ pytree registration
# Children are the tensors (None where absent); the context holds the non-tensor data,
# so a spec made from one batch matches any batch with the same keys and batch size.
# Offsets are not a child: lengths is always materialised, so the spec does not depend
# on which of the two happened to be cached.
def _jt_flatten(jt):
    return [jt.values(), jt.lengths(), jt.weights_or_none()], None


def _jt_unflatten(children, _ctx):
    values, lengths, weights = children
    return JaggedTensor(values, lengths=lengths, weights=weights, validate=False)


def _kjt_flatten(kjt):
    return [kjt.values(), kjt.lengths(), kjt.weights_or_none()], (tuple(kjt.keys()), kjt.stride())


def _kjt_unflatten(children, ctx):
    values, lengths, weights = children
    keys, stride = ctx
    return KeyedJaggedTensor(list(keys), values, lengths=lengths, weights=weights, stride=stride,
                             validate=False)


def _kt_flatten(kt):
    return [kt.values()], (tuple(kt.keys()), tuple(kt.length_per_key()), kt.key_dim())


def _kt_unflatten(children, ctx):
    keys, lpk, key_dim = ctx
    return KeyedTensor(list(keys), list(lpk), children[0], key_dim, validate=False)


def _with_keys(flatten, names):
    def flatten_with_keys(obj):
        children, ctx = flatten(obj)
        return [(pytree.GetAttrKey(n), c) for n, c in zip(names, children)], ctx
    return flatten_with_keys


def _register(cls, flatten, unflatten, names, to_json, from_json) -> None:
    pytree.register_pytree_node(
        cls, flatten, unflatten, serialized_type_name=f"fxrec.sparse.{cls.__name__}",
        to_dumpable_context=to_json, from_dumpable_context=from_json,
        flatten_with_keys_fn=_with_keys(flatten, names))


_register(JaggedTensor, _jt_flatten, _jt_unflatten, ("_values", "_lengths", "_weights"),
          lambda ctx: "null", lambda s: None)
_register(KeyedJaggedTensor, _kjt_flatten, _kjt_unflatten, ("_values", "_lengths", "_weights"),
          lambda ctx: json.dumps([list(ctx[0]), ctx[1]]),
          lambda s: (lambda d: (tuple(d[0]), d[1]))(json.loads(s)))
_register(KeyedTensor, _kt_flatten, _kt_unflatten, ("_values",),
          lambda ctx: json.dumps([list(ctx[0]), list(ctx[1]), ctx[2]]),
          lambda s: (lambda d: (tuple(d[0]), tuple(d[1]), d[2]))(json.loads(s)))
