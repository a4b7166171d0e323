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
    # a variable batch per key (VBE) adds its strides to the context, its inverse indices to the children
    inverse = kjt.inverse_indices_or_none()
    sprk = tuple(tuple(r) for r in kjt.stride_per_key_per_rank()) if kjt.variable_stride_per_key() else None
    ctx = (tuple(kjt.keys()), kjt.stride(), sprk, None if inverse is None else tuple(inverse[0]))
    children = [kjt.values(), kjt.lengths(), kjt.weights_or_none()]
    return children + [inverse[1]] if inverse is not None else children, ctx


def _kjt_unflatten(children, ctx):
    values, lengths, weights, *rest = children
    keys, stride, sprk, inverse_keys = ctx
    inverse = rest[0] if rest else None
    return KeyedJaggedTensor(list(keys), values, lengths=lengths, weights=weights, stride=stride,
                             stride_per_key_per_rank=None if sprk is None else [list(r) for r in sprk],
                             inverse_indices=None if inverse_keys is None else (list(inverse_keys), inverse),
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
_register(KeyedJaggedTensor, _kjt_flatten, _kjt_unflatten, ("_values", "_lengths", "_weights", "_inverse"),
          lambda ctx: json.dumps([list(ctx[0]), ctx[1], ctx[2], ctx[3]]),
          lambda s: (lambda d: (tuple(d[0]), d[1], None if d[2] is None else tuple(tuple(r) for r in d[2]),
                                None if d[3] is None else tuple(d[3])))(json.loads(s)))
_register(KeyedTensor, _kt_flatten, _kt_unflatten, ("_values",),
          lambda ctx: json.dumps([list(ctx[0]), list(ctx[1]), ctx[2]]),
          lambda s: (lambda d: (tuple(d[0]), tuple(d[1]), d[2]))(json.loads(s)))
