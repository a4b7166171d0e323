"""Validation of fxrec's sparse types: the global switch, tracing detection, and the
checks that name the offending key and value (see fxrec/sparse.py)."""
from __future__ import annotations

import collections.abc
import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from fxrec.types import whole

# ------------------------------------------------------------------ validation switch
_VALIDATE = True


def set_validation(enabled: bool) -> bool:
    """Switch construction-time checks on or off process-wide; returns the old setting."""
    global _VALIDATE
    previous, _VALIDATE = _VALIDATE, bool(enabled)
    return previous


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """``with validation(False):`` skips the data checks inside the block (hot paths)."""
    previous = set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def validation_enabled() -> bool:
    return _VALIDATE


def _fx_symbolic_tracing() -> bool:
    trace = torch.fx._symbolic_trace
    check = getattr(trace, "is_fx_symbolic_tracing", None) or trace.is_fx_tracing
    return check()


def is_tracing(*objs) -> bool:
    """True when data-dependent checks must not run: any Proxy / fake / meta tensor
    among ``objs``, or an active fx trace, dynamo compile, or make_fx proxy mode."""
    if torch.compiler.is_compiling() or _fx_symbolic_tracing():
        return True
    for t in objs:
        if isinstance(t, torch.fx.Proxy):
            return True
        if isinstance(t, Tensor) and (t.is_meta or type(t) not in (Tensor, torch.nn.Parameter)):
            return True  # FakeTensor, FunctionalTensor and other tracing subclasses
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    except AttributeError:  # pragma: no cover - older torch
        return False


def should_validate(*objs) -> bool:
    """The test every check uses: validation on globally and nothing is being traced."""
    return _VALIDATE and not is_tracing(*objs)


# ------------------------------------------------------------------ checks
def _names(owner: str, arg: str, names, error: type = TypeError) -> list:
    """``names`` (keys, feature names) as a list, refusing a str and an unordered set.

    A str iterates as its characters, so ``keys="f1"`` meant one key and became 'f', '1';
    a set iterates in hash order, which differs between processes (PYTHONHASHSEED), and
    the order of names decides the order of values, lengths and output columns. Both are
    refused instead of read silently. A dict (or its keys view) keeps its insertion order
    and is taken. ``error`` is the caller's type for bad arguments (the table configs
    raise ValueError)."""
    if type(names) is list or type(names) is tuple:  # the usual case, kept cheap: KJTs are built per batch
        return list(names)
    if isinstance(names, (str, bytes)):
        raise error(f"{owner}: {arg} must be a list of names, got the string {names!r}")
    if isinstance(names, collections.abc.Set) and not isinstance(names, collections.abc.MappingView):
        raise error(f"{owner}: {arg} must be a list or tuple, got {type(names).__name__} {names!r}: its "
                    f"order is arbitrary (it differs between processes) and decides the order of the "
                    f"outputs; give the names in the order you want")
    try:
        return list(names)
    except TypeError:
        raise error(f"{owner}: {arg} must be a list of names, got {type(names).__name__} {names!r}") from None


def out_of_range_id(ids: Tensor, rows: int) -> Optional[int]:
    """The smallest id of `ids` when it is negative, else the largest when it is `rows` or more
    (one min/max pass, one host sync), else None: the id an error about the table names."""
    if ids.numel() == 0:
        return None
    lo, hi = (int(v) for v in torch.aminmax(ids.detach()))
    return lo if lo < 0 else hi if hi >= rows else None


def _size(owner: str, arg: str, value) -> int:
    """``value`` (a stride, a padded length) as an int >= 0. A fraction or a string is
    refused rather than truncated or parsed by int(); a size traced by dynamo (SymInt)
    goes through int() as it always did, and one traced by torch.fx (a Proxy: a KJT built in
    forward with ``stride=ids.shape[0]``) is kept, to be the node that computes it."""
    if type(value) is int and value >= 0:  # the usual case, kept cheap: KJTs are built per batch
        return value
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, torch.fx.Proxy):  # a size traced by torch.fx: ``ids.shape[0]`` in a forward
        return value
    n = whole(value)
    if n is None or n < 0:
        raise ValueError(f"{owner}: {arg} must be a whole number >= 0, got {value!r}")
    return n


def _check_tensors(owner: str, **named) -> None:
    """Each of ``named`` a tensor or None: a list or numpy array failed later with an
    AttributeError ('list' object has no attribute 'dim') that named no argument."""
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__} "
                            f"(wrap it in torch.tensor / torch.as_tensor)")


def _indices(owner: str, arg: str, values) -> list[int]:
    """A list of ints (one per key: a short loop), refusing floats and strings; a tensor is
    taken as its values."""
    if isinstance(values, Tensor):
        values = values.tolist()
    out = [whole(v) if not isinstance(v, float) else None for v in values]
    if any(v is None for v in out):
        raise TypeError(f"{owner}: {arg} must be integers, got {list(values)!r}")
    return out


def _check_keys(owner: str, keys: Sequence[str]) -> None:
    seen = set()
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"{owner}: keys must be strings, got {k!r} ({type(k).__name__})")
        if k in seen:
            raise ValueError(f"{owner}: key {k!r} appears more than once in keys {list(keys)}")
        seen.add(k)


def _check_index_tensor(owner: str, name: str, t: Tensor) -> None:
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{owner}: {name} must be a 1-D integer tensor, got shape "
                         f"{tuple(t.shape)} dtype {t.dtype}")


def _check_jagged(owner, values, lengths, offsets, weights, bag_name) -> None:
    """Shared checks for JT and KJT; ``bag_name(i)`` names flat bag i in messages."""
    if values.dim() < 1:
        raise ValueError(f"{owner}: values must have at least one dimension, got a scalar")
    n = values.size(0)
    if offsets is not None:
        _check_index_tensor(owner, "offsets", offsets)
        if offsets.numel() == 0 or int(offsets[0]) != 0:
            raise ValueError(f"{owner}: offsets must start at 0, got {offsets[:1].tolist()}")
        steps = offsets.diff()
        if bool((steps < 0).any()):
            i = int((steps < 0).nonzero()[0])
            raise ValueError(f"{owner}: offsets must be non-decreasing; {bag_name(i)} goes from "
                             f"offset {int(offsets[i])} down to {int(offsets[i + 1])}")
        if int(offsets[-1]) != n:
            raise ValueError(f"{owner}: offsets end at {int(offsets[-1])} but values has {n} entries")
    if lengths is not None:
        _check_index_tensor(owner, "lengths", lengths)
        if bool((lengths < 0).any()):
            i = int((lengths < 0).nonzero()[0])
            raise ValueError(f"{owner}: {bag_name(i)} has negative length {int(lengths[i])}")
        if offsets is not None and (offsets.numel() != lengths.numel() + 1
                                    or not torch.equal(offsets.diff(), lengths.to(offsets.dtype))):
            raise ValueError(f"{owner}: lengths and offsets were both given and disagree")
    if weights is not None and not weights.is_floating_point():
        raise TypeError(f"{owner}: weights must be floating point, got {weights.dtype} (the third positional "
                        f"argument is weights, as in TorchRec; pass lengths=... for bag lengths)")
    if weights is not None and (weights.dim() != 1 or weights.size(0) != n):
        raise ValueError(f"{owner}: weights must be 1-D with one weight per value ({n}), "
                         f"got shape {tuple(weights.shape)}")


def _check_sums(owner, keys, lengths, stride, n) -> None:
    """Names the key whose bags run past the end of values, or the values left over. `stride`:
    every key's bags, or a list of each key's (a batch per key)."""
    if not keys:
        sums = []
    elif isinstance(stride, int):
        sums = lengths.reshape(len(keys), stride).sum(1).tolist()
    else:
        sums = [int(t.sum()) for t in lengths.split(list(stride))]
    total = sum(sums)
    if total == n:
        return
    per_key = {k: s for k, s in zip(keys, sums)}
    if total > n:
        end = 0
        for k, s in zip(keys, sums):
            end += s
            if end > n:
                raise ValueError(f"{owner}: lengths sum to {total} but values has {n} entries; "
                                 f"key {k!r}'s bags cover values[{end - s}:{end}], past the end "
                                 f"(per-key length sums {per_key})")
    where = f"after key {keys[-1]!r}'s bags" if keys else "(there are no keys, so no bags)"
    raise ValueError(f"{owner}: lengths sum to {total} but values has {n} entries; the last "
                     f"{n - total} values {where} belong to no bag "
                     f"(per-key length sums {per_key})")
