"""Sparse inputs and pooled outputs, in TorchRec's layouts.

* `JaggedTensor`: one feature's bags: ``values`` of all bags concatenated, with
  ``lengths`` (ids per bag) or ``offsets`` (bag starts, plus the end).
* `KeyedJaggedTensor` (KJT): several features. Values are key-major: all of key 0's
  bags, then key 1's; ``lengths`` holds ``len(keys) * stride`` entries in that order. With
  ``stride_per_key_per_rank`` (TorchRec's variable batch per feature, VBE) key k holds its own
  number of bags, and ``inverse_indices`` (keys, ``keys x stride`` tensor) give each sample of
  the batch its bag of each key.
* `KeyedTensor`: pooled outputs, ``batch x sum(length_per_key)`` for ``key_dim=1``.

Construction checks the data (sums, monotone offsets, sizes, unique keys) and names the
offending key and value. Checks are skipped for ``validate=False``, inside
``validation(False)``, and whenever the tensors are being traced (torch.fx Proxy,
torch.compile / export, fake or meta tensors) because they read tensor data.

All three types are pytree nodes, so torch.export and torch.compile accept them as
inputs and outputs; under ``torch.fx.symbolic_trace`` a KJT argument is a Proxy, and
one built from Proxies lowers itself to a constructor call in the graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# The validation switch and checks live in sparse_checks.py; re-exported here because
# users and modules reach them as fxrec.sparse.*.
from fxrec.sparse_checks import (_check_index_tensor, _check_jagged, _check_keys, _check_sums,  # noqa: F401
                                 _check_tensors, _indices, _names, _size, is_tracing, out_of_range_id,
                                 set_validation, should_validate, validation, validation_enabled)


# ------------------------------------------------------------------ helpers
def _offsets_from_lengths(lengths: Tensor) -> Tensor:
    zero = lengths.new_zeros(1)
    return torch.cat([zero, lengths.cumsum(0, dtype=lengths.dtype)])


def _to(t: Optional[Tensor], device, non_blocking: bool) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=non_blocking)


def _pinning_available() -> bool:
    # Page-locked host memory needs an accelerator runtime; CPU-only torch raises
    # "Cannot access accelerator device" from pin_memory(), so pinning is skipped there.
    return torch.accelerator.is_available()


def _unknown_key(key, keys) -> KeyError:
    return KeyError(f"unknown key {key!r}; known keys: {list(keys)}")


# ------------------------------------------------------------------ JaggedTensor
# A positional call in another order (lengths third) reaches the constructor as weights only
_ORDER_HINT = "; the third positional argument is weights, as in TorchRec: {call}, or pass lengths=..."


class JaggedTensor:
    """One feature's bags. ``values[offsets[i]:offsets[i+1]]`` is bag i; ``lengths`` and
    ``offsets`` are derived from each other on first use and cached."""

    def __init__(self, values: Tensor, weights: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                 offsets: Optional[Tensor] = None, validate: bool = True):
        # TorchRec's argument order (values, weights, lengths, offsets), so that its positional
        # calls mean the same here
        if lengths is None and offsets is None:
            raise ValueError("JaggedTensor: give lengths or offsets" + _ORDER_HINT.format(
                call="JaggedTensor(values, weights, lengths, offsets)") * (weights is not None))
        self._values, self._lengths, self._offsets, self._weights = values, lengths, offsets, weights
        if validate and should_validate(values, lengths, offsets, weights):
            _check_tensors("JaggedTensor", values=values, lengths=lengths, offsets=offsets, weights=weights)
            _check_jagged("JaggedTensor", values, lengths, offsets, weights, lambda i: f"bag {i}")
            if lengths is not None and int(lengths.sum()) != values.size(0):
                raise ValueError(f"JaggedTensor: lengths sum to {int(lengths.sum())} but values has "
                                 f"{values.size(0)} entries")

    @staticmethod
    def from_dense(values: list[Tensor], weights: Optional[list[Tensor]] = None) -> JaggedTensor:
        """One bag per list entry (each a tensor whose first dim is the bag's ids)."""
        if not values:  # torch.cat([]) would say only "expected a non-empty list"
            raise ValueError("JaggedTensor.from_dense: values is empty; give at least one bag (it may be "
                             "an empty tensor)")
        flat = torch.cat(values)
        # int32 lengths on the values' device, as TorchRec's (they were int64 on the CPU whatever
        # the values' device)
        lengths = torch.tensor([v.size(0) for v in values], dtype=torch.int32, device=flat.device)
        w = torch.cat(weights) if weights is not None else None
        return JaggedTensor(flat, lengths=lengths, weights=w)

    def values(self) -> Tensor:
        return self._values

    def lengths(self) -> Tensor:
        if self._lengths is None:
            self._lengths = self._offsets.diff()
        return self._lengths

    def offsets(self) -> Tensor:
        if self._offsets is None:
            self._offsets = _offsets_from_lengths(self._lengths)
        return self._offsets

    def lengths_or_none(self) -> Optional[Tensor]:
        return self._lengths

    def offsets_or_none(self) -> Optional[Tensor]:
        return self._offsets

    def weights(self) -> Tensor:
        if self._weights is None:
            raise ValueError("JaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> Optional[Tensor]:
        return self._weights

    def to_dense(self) -> list[Tensor]:
        """The bags as a list of tensors (views of values)."""
        return list(torch.split(self._values, self.lengths().tolist()))

    def to_dense_weights(self) -> Optional[list[Tensor]]:
        return None if self._weights is None else list(torch.split(self._weights, self.lengths().tolist()))

    def to_padded_dense(self, desired_length: Optional[int] = None, padding_value=0) -> Tensor:
        """``[num_bags, L, *values.shape[1:]]``: each bag's first L values, padded with
        ``padding_value``; L is ``desired_length`` or the longest bag."""
        if desired_length is not None:
            desired_length = _size("JaggedTensor.to_padded_dense", "desired_length", desired_length)
        return _pad(self._values, self.lengths(), self.offsets(), desired_length, padding_value)

    def to(self, device, non_blocking: bool = False) -> JaggedTensor:
        return JaggedTensor(self._values.to(device, non_blocking=non_blocking), _to(self._weights, device, non_blocking),
                            _to(self._lengths, device, non_blocking), _to(self._offsets, device, non_blocking),
                            validate=False)

    def device(self) -> torch.device:
        return self._values.device

    def __fx_create_arg__(self, tracer):
        # A JT built from Proxies inside a traced forward becomes a constructor call.
        return tracer.create_node("call_function", JaggedTensor, tracer.create_arg(
            (self._values, self._weights, self._lengths, self._offsets)), {"validate": False})

    def __repr__(self) -> str:
        return f"JaggedTensor(values={self._values}, lengths={self.lengths()}, weights={self._weights})"


def _pad(values, lengths, offsets, desired_length, padding_value) -> Tensor:
    num_bags = lengths.numel()
    width = int(lengths.max()) if desired_length is None and num_bags else int(desired_length or 0)
    out = values.new_full((num_bags, width, *values.shape[1:]), padding_value)
    bag = torch.repeat_interleave(torch.arange(num_bags, device=values.device), lengths)
    pos = torch.arange(values.size(0), device=values.device) - offsets[:-1].repeat_interleave(lengths)
    keep = pos < width
    out[bag[keep], pos[keep]] = values[keep]
    return out


# ------------------------------------------------------------------ KeyedJaggedTensor
class KeyedJaggedTensor:
    """Several features' bags, key-major (TorchRec layout). ``stride()`` is the batch size.

    Guarantees after construction with validation on: keys are unique strings; lengths
    (or offsets) has ``len(keys) * stride`` bags, non-negative, summing to ``len(values)``;
    offsets start at 0, never decrease and end at ``len(values)``; weights, when given,
    has one entry per value.
    """

    def __init__(self, keys: Sequence[str], values: Tensor, weights: Optional[Tensor] = None,
                 lengths: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
                 stride: Optional[int] = None, stride_per_key_per_rank: Optional[Sequence[Sequence[int]]] = None,
                 *, inverse_indices: Optional[tuple] = None, validate: bool = True):
        # TorchRec's argument order (keys, values, weights, lengths, offsets, stride), so that its
        # positional calls mean the same here
        if lengths is None and offsets is None:
            raise ValueError("KeyedJaggedTensor: give lengths or offsets" + _ORDER_HINT.format(
                call="KeyedJaggedTensor(keys, values, weights, lengths, offsets, stride)") * (weights is not None))
        self._keys = _names("KeyedJaggedTensor", "keys", keys)
        self._values, self._lengths, self._offsets, self._weights = values, lengths, offsets, weights
        self._stride = None if stride is None else _size("KeyedJaggedTensor", "stride", stride)
        # variable batch per feature (VBE): key k holds sum(stride_per_key_per_rank[k]) bags
        self._spk = _strides_per_key(self._keys, stride_per_key_per_rank)
        self._bag_starts = None if self._spk is None else _bag_starts(self._spk)  # key k: [k]:[k + 1]
        self._sprk = None if self._spk is None else [list(r) for r in stride_per_key_per_rank]
        self._inverse = _inverse_indices(inverse_indices)
        self._length_per_key: Optional[list[int]] = None
        self._offset_per_key: Optional[list[int]] = None
        self._index_per_key: Optional[dict[str, int]] = None
        if validate and should_validate(values, lengths, offsets, weights):
            self._validate()

    def _validate(self) -> None:
        owner, keys = "KeyedJaggedTensor", self._keys
        _check_tensors(owner, values=self._values, lengths=self._lengths, offsets=self._offsets, weights=self._weights)
        _check_keys(owner, keys)
        num_bags = self._lengths.numel() if self._lengths is not None else self._offsets.numel() - 1
        if self._spk is not None:
            self._validate_variable(num_bags)
            return
        if not keys:
            # No bags: the checks below still hold values (and weights) to zero entries.
            if num_bags > 0:
                raise ValueError(f"{owner}: no keys but {num_bags} bags")
            stride = 0
        else:
            if num_bags % len(keys):
                raise ValueError(f"{owner}: {num_bags} lengths is not a multiple of the {len(keys)} "
                                 f"keys {keys}; lengths needs batch_size entries per key")
            stride = num_bags // len(keys)
            if self._stride is not None and self._stride != stride:
                raise ValueError(f"{owner}: stride={self._stride} but lengths holds {stride} bags per key")
        _check_jagged(owner, self._values, self._lengths, self._offsets, self._weights,
                      lambda i: f"key {keys[i // stride]!r} bag {i % stride}")
        if self._lengths is not None:
            _check_sums(owner, keys, self._lengths, stride, self._values.size(0))

    def _validate_variable(self, num_bags: int) -> None:
        """The checks of a KJT whose keys have batch sizes of their own (`stride_per_key`)."""
        owner, keys, spk = "KeyedJaggedTensor", self._keys, self._spk
        if num_bags != sum(spk):
            raise ValueError(f"{owner}: stride_per_key_per_rank gives {sum(spk)} bags "
                             f"({dict(zip(keys, spk))}) but lengths holds {num_bags}")
        starts = self._bag_starts
        key_of = lambda i: max(j for j in range(len(keys)) if starts[j] <= i)  # noqa: E731
        _check_jagged(owner, self._values, self._lengths, self._offsets, self._weights,
                      lambda i: f"key {keys[key_of(i)]!r} bag {i - starts[key_of(i)]}")
        if self._lengths is not None:  # (offsets end at len(values): _check_jagged)
            _check_sums(owner, keys, self._lengths, spk, self._values.size(0))
        if self._inverse is not None:
            inv_keys, inv = self._inverse
            if self._stride is not None and self._stride != inv.shape[1]:
                raise ValueError(f"{owner}: stride={self._stride} but inverse_indices map {inv.shape[1]} samples")
            rows = {k: i for i, k in enumerate(inv_keys)}
            for k, n in zip(keys, spk):
                if k not in rows:
                    raise ValueError(f"{owner}: inverse_indices has no row for key {k!r} (it has {list(inv_keys)})")
                bad = out_of_range_id(inv[rows[k]], n)
                if bad is not None:
                    raise ValueError(f"{owner}: inverse_indices of key {k!r} holds {bad}, outside its {n} bags")

    # -- constructors
    @staticmethod
    def from_lengths_sync(keys, values, lengths, weights=None, stride=None, stride_per_key_per_rank=None,
                          inverse_indices=None) -> KeyedJaggedTensor:
        """Build and compute the per-key sizes now (one host sync)."""
        return KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=stride,
                                 stride_per_key_per_rank=stride_per_key_per_rank,
                                 inverse_indices=inverse_indices).sync()

    @staticmethod
    def from_offsets_sync(keys, values, offsets, weights=None, stride=None, stride_per_key_per_rank=None,
                          inverse_indices=None) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys, values, offsets=offsets, weights=weights, stride=stride,
                                 stride_per_key_per_rank=stride_per_key_per_rank,
                                 inverse_indices=inverse_indices).sync()

    @staticmethod
    def from_jt_dict(jt_dict: dict[str, JaggedTensor]) -> KeyedJaggedTensor:
        """Keys in dict order; every JaggedTensor must have the same number of bags."""
        keys = list(jt_dict)
        if not keys:
            raise ValueError("KeyedJaggedTensor.from_jt_dict: empty dict (stride unknown); "
                             "use KeyedJaggedTensor.empty(stride=...)")
        jts = list(jt_dict.values())
        for k, jt in jt_dict.items():
            if not isinstance(jt, JaggedTensor):
                raise TypeError(f"KeyedJaggedTensor.from_jt_dict: key {k!r} maps to a {type(jt).__name__}, "
                                f"not a JaggedTensor")
        stride = jts[0].lengths().numel()
        for k, jt in jt_dict.items():
            if jt.lengths().numel() != stride:
                raise ValueError(f"KeyedJaggedTensor.from_jt_dict: key {k!r} has "
                                 f"{jt.lengths().numel()} bags, key {keys[0]!r} has {stride}")
        weights = _all_or_none("from_jt_dict", keys, [jt.weights_or_none() for jt in jts])
        return KeyedJaggedTensor(keys, torch.cat([jt.values() for jt in jts]),
                                 lengths=torch.cat([jt.lengths() for jt in jts]),
                                 weights=weights, stride=stride)

    @staticmethod
    def empty(is_weighted: bool = False, device=None, values_dtype=torch.int64, weights_dtype=None,
              lengths_dtype=torch.int64, stride: int = 0) -> KeyedJaggedTensor:
        """No keys (TorchRec's argument order; weights_dtype None: torch's default float)."""
        w = torch.empty(0, dtype=weights_dtype, device=device) if is_weighted else None
        return KeyedJaggedTensor([], torch.empty(0, dtype=values_dtype, device=device),
                                 lengths=torch.empty(0, dtype=lengths_dtype, device=device),
                                 weights=w, stride=stride)

    @staticmethod
    def empty_like(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        w = kjt.weights_or_none()
        return KeyedJaggedTensor.empty(w is not None, kjt.device(), values_dtype=kjt.values().dtype,
                                       weights_dtype=None if w is None else w.dtype,
                                       lengths_dtype=kjt.lengths().dtype, stride=kjt.stride())

    # -- accessors
    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> Tensor:
        return self._values

    def weights(self) -> Tensor:
        if self._weights is None:
            raise ValueError("KeyedJaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> Optional[Tensor]:
        return self._weights

    def lengths(self) -> Tensor:
        if self._lengths is None:
            self._lengths = self._offsets.diff()
        return self._lengths

    def offsets(self) -> Tensor:
        if self._offsets is None:
            self._offsets = _offsets_from_lengths(self._lengths)
        return self._offsets

    def lengths_or_none(self) -> Optional[Tensor]:
        return self._lengths

    def offsets_or_none(self) -> Optional[Tensor]:
        return self._offsets

    def stride(self) -> int:
        """Batch size: the explicit stride, else bags / keys (0 with no keys); with a batch per
        key, the samples inverse_indices maps (else the largest key's bags)."""
        if self._stride is None:
            if self._spk is not None:
                self._stride = int(self._inverse[1].shape[1]) if self._inverse is not None else max(self._spk,
                                                                                                     default=0)
            elif not self._keys:
                self._stride = 0
            else:
                bags = self._lengths.numel() if self._lengths is not None else self._offsets.numel() - 1
                self._stride = bags // len(self._keys)
        return self._stride

    def variable_stride_per_key(self) -> bool:
        """Whether the keys have batch sizes of their own (TorchRec's VBE)."""
        return self._spk is not None

    def stride_per_key(self) -> list[int]:
        """Bags per key: ``stride()`` for each, or each key's own (variable batch per key)."""
        return list(self._spk) if self._spk is not None else [self.stride()] * len(self._keys)

    def stride_per_key_per_rank(self) -> list[list[int]]:
        return [list(r) for r in self._sprk] if self._sprk is not None else [[self.stride()] for _ in self._keys]

    def inverse_indices(self) -> tuple[list[str], Tensor]:
        """(keys, ``len(keys) x stride()`` tensor): sample b of a key reads that key's bag
        ``inverse[row of the key, b]`` (variable batch per key)."""
        if self._inverse is None:
            raise ValueError("KeyedJaggedTensor has no inverse_indices; use inverse_indices_or_none()")
        return self._inverse

    def inverse_indices_or_none(self) -> Optional[tuple[list[str], Tensor]]:
        return self._inverse

    def inverse_row(self, key: str) -> Optional[Tensor]:
        """`key`'s row of inverse_indices (each sample's bag of that key), or None where there
        is none."""
        if self._inverse is None or key not in self._inverse[0]:
            return None
        return self._inverse[1][self._inverse[0].index(key)]

    def _bag_range(self, i: int) -> tuple[int, int]:
        """Key i's bags: ``lengths()[start:end]``."""
        if self._spk is not None:
            return self._bag_starts[i], self._bag_starts[i + 1]
        b = self.stride()
        return i * b, (i + 1) * b

    def _key_lengths(self) -> list[Tensor]:
        """Each key's lengths."""
        lengths = self.lengths()
        if self._spk is not None:
            return list(lengths.split(self._spk))
        return list(lengths.reshape(len(self._keys), self.stride())) if self._keys else []

    def _like(self, keys, values, lengths, weights, spk_rows) -> KeyedJaggedTensor:
        """A KJT of `keys` with this one's batch: its stride, or per key `spk_rows` (rows of
        stride_per_key_per_rank) and its inverse_indices."""
        if self._spk is None:
            return KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=self.stride(),
                                     validate=False)
        return KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=self._stride,
                                 stride_per_key_per_rank=spk_rows, inverse_indices=self._inverse, validate=False)

    def device(self) -> torch.device:
        return self._values.device

    def length_per_key(self) -> list[int]:
        """Number of values per key (host ints; computing it syncs once, then cached)."""
        if self._length_per_key is None:
            if not self._keys:
                self._length_per_key = []
            elif self._spk is not None:
                # (no int(): under export the sums are unbacked symbols, as in the branch below)
                self._length_per_key = torch.stack([t.sum() for t in self._key_lengths()]).tolist()
            else:
                self._length_per_key = self.lengths().reshape(len(self._keys), self.stride()).sum(1).tolist()
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        if self._offset_per_key is None:
            out = [0]
            for n in self.length_per_key():
                out.append(out[-1] + n)
            self._offset_per_key = out
        return self._offset_per_key

    def index_per_key(self) -> dict[str, int]:
        if self._index_per_key is None:
            self._index_per_key = {k: i for i, k in enumerate(self._keys)}
        return self._index_per_key

    def sync(self) -> KeyedJaggedTensor:
        self.offset_per_key()
        return self

    # -- per-key views
    def __getitem__(self, key: str) -> JaggedTensor:
        i = self.index_per_key().get(key)
        if i is None:
            raise _unknown_key(key, self._keys)
        opk, (b0, b1) = self.offset_per_key(), self._bag_range(i)
        values, weights = self._values[opk[i]:opk[i + 1]], self._weights
        if weights is not None:
            weights = weights[opk[i]:opk[i + 1]]
            # Under export the slice sizes are unbacked symbols; tell the tracer they match.
            torch._check(weights.size(0) == values.size(0))
        return JaggedTensor(values, lengths=self.lengths()[b0:b1], weights=weights, validate=False)

    def to_dict(self, compute_offsets: bool = True) -> dict[str, JaggedTensor]:
        """Key -> its JaggedTensor. (compute_offsets: TorchRec's hint to build offsets now;
        here each JaggedTensor derives them on first use either way.)"""
        return {k: self[k] for k in self._keys}

    def split(self, segments: Sequence[int]) -> list[KeyedJaggedTensor]:
        """Consecutive groups of ``segments[j]`` keys each; weights and stride kept."""
        segments = _indices("KeyedJaggedTensor.split", "segments", segments)
        if sum(segments) != len(self._keys) or any(s < 0 for s in segments):
            raise ValueError(f"KeyedJaggedTensor.split: segments {list(segments)} must be "
                             f"non-negative and sum to the {len(self._keys)} keys")
        opk, out, start = self.offset_per_key(), [], 0
        for seg in segments:
            end = start + seg
            lo, hi = opk[start], opk[end]
            b0, b1 = (self._bag_range(start)[0], self._bag_range(end - 1)[1]) if seg else (0, 0)
            kjt = self._like(self._keys[start:end], self._values[lo:hi], self.lengths()[b0:b1],
                             None if self._weights is None else self._weights[lo:hi],
                             self._sprk[start:end] if self._sprk is not None else None)
            kjt._length_per_key = self.length_per_key()[start:end]
            out.append(kjt)
            start = end
        return out

    def permute(self, indices: Sequence[int]) -> KeyedJaggedTensor:
        """New KJT whose j-th key is ``keys[indices[j]]`` (indices may drop keys)."""
        indices = _indices("KeyedJaggedTensor.permute", "indices", indices)
        k = len(self._keys)
        bad = [i for i in indices if not 0 <= i < k]
        if bad:
            raise ValueError(f"KeyedJaggedTensor.permute: indices {bad} out of range for {k} keys")
        if len(set(indices)) != len(indices):
            raise ValueError(f"KeyedJaggedTensor.permute: indices {list(indices)} repeat a key")
        opk = self.offset_per_key()
        pick = lambda t: torch.cat([t[opk[i]:opk[i + 1]] for i in indices]) if indices else t[:0]  # noqa: E731
        per_key = self._key_lengths()
        lengths = torch.cat([per_key[i] for i in indices]) if indices else self.lengths()[:0]
        kjt = self._like([self._keys[i] for i in indices], pick(self._values), lengths,
                         None if self._weights is None else pick(self._weights),
                         [self._sprk[i] for i in indices] if self._sprk is not None else None)
        kjt._length_per_key = [self.length_per_key()[i] for i in indices]
        return kjt

    @staticmethod
    def concat(kjts: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
        """Keys of all inputs in order; all must share the stride and weightedness."""
        if isinstance(kjts, KeyedJaggedTensor):
            raise TypeError("KeyedJaggedTensor.concat takes a list of KeyedJaggedTensors, got one")
        if not kjts:
            raise ValueError("KeyedJaggedTensor.concat: empty list")
        strides = [k.stride() for k in kjts]
        if len(set(strides)) != 1:
            raise ValueError(f"KeyedJaggedTensor.concat: strides differ: {strides}")
        keys = [key for k in kjts for key in k.keys()]
        _check_keys("KeyedJaggedTensor.concat", keys)
        weights = _all_or_none("concat", keys, [k.weights_or_none() for k in kjts])
        values, lengths = torch.cat([k.values() for k in kjts]), torch.cat([k.lengths() for k in kjts])
        if any(k.variable_stride_per_key() for k in kjts):
            out = KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=strides[0],
                                    stride_per_key_per_rank=[r for k in kjts for r in k.stride_per_key_per_rank()],
                                    inverse_indices=_concat_inverse(kjts), validate=False)
        else:
            out = KeyedJaggedTensor(keys, values, lengths=lengths, weights=weights, stride=strides[0], validate=False)
        if all(k._length_per_key is not None for k in kjts):
            out._length_per_key = [n for k in kjts for n in k._length_per_key]
        return out

    # -- devices and streams
    def to(self, device, non_blocking: bool = False, dtype: Optional[torch.dtype] = None) -> KeyedJaggedTensor:
        """A copy on `device`; `dtype`, as TorchRec's, is the weights' (ids and lengths keep theirs)."""
        weights = _to(self._weights, device, non_blocking)
        if weights is not None and dtype is not None:
            weights = weights.to(dtype)
        inverse = None if self._inverse is None else (self._inverse[0], _to(self._inverse[1], device, non_blocking))
        kjt = KeyedJaggedTensor(self._keys, self._values.to(device, non_blocking=non_blocking),
                                weights, _to(self._lengths, device, non_blocking),
                                _to(self._offsets, device, non_blocking), self._stride, self._sprk,
                                inverse_indices=inverse, validate=False)
        kjt._length_per_key, kjt._offset_per_key = self._length_per_key, self._offset_per_key
        return kjt

    def pin_memory(self) -> KeyedJaggedTensor:
        """A copy in page-locked memory, or ``self`` unchanged when torch has no
        accelerator runtime (CPU-only builds cannot pin; there is nothing to copy to)."""
        if not _pinning_available():
            return self
        pin = lambda t: None if t is None else t.pin_memory()
        inverse = None if self._inverse is None else (self._inverse[0], pin(self._inverse[1]))
        kjt = KeyedJaggedTensor(self._keys, self._values.pin_memory(), pin(self._weights), pin(self._lengths),
                                pin(self._offsets), self._stride, self._sprk, inverse_indices=inverse,
                                validate=False)
        kjt._length_per_key, kjt._offset_per_key = self._length_per_key, self._offset_per_key
        return kjt

    def record_stream(self, stream) -> None:
        """Mark the tensors as used on ``stream`` (CUDA tensors only; a no-op on CPU)."""
        for t in (self._values, self._lengths, self._offsets, self._weights,
                  None if self._inverse is None else self._inverse[1]):
            if t is not None and t.is_cuda:
                t.record_stream(stream)

    def __fx_create_arg__(self, tracer):
        kwargs = {"validate": False}
        if self._spk is not None:
            kwargs["inverse_indices"] = tracer.create_arg(self._inverse)
        return tracer.create_node("call_function", KeyedJaggedTensor, tracer.create_arg(
            (self._keys, self._values, self._weights, self._lengths, self._offsets, self._stride, self._sprk)),
            kwargs)

    def __repr__(self) -> str:
        if isinstance(self._values, torch.fx.Proxy):
            return f"KeyedJaggedTensor(keys={self._keys}, <traced>)"
        return (f"KeyedJaggedTensor(keys={self._keys}, stride={self.stride()}, values={self._values}, "
                f"lengths={self.lengths()}, weights={self._weights})")


def _strides_per_key(keys: list, sprk) -> Optional[list[int]]:
    """Each key's bags from TorchRec's ``stride_per_key_per_rank`` (one list per key, summed
    over ranks), or None where it is not given."""
    if sprk is None:
        return None
    if isinstance(sprk, (str, bytes)) or not isinstance(sprk, Sequence) or len(sprk) != len(keys):
        raise ValueError(f"KeyedJaggedTensor: stride_per_key_per_rank must hold one list of ints per key "
                         f"({len(keys)} keys), got {sprk!r}")
    out = []
    for k, row in zip(keys, sprk):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row:
            raise ValueError(f"KeyedJaggedTensor: stride_per_key_per_rank of key {k!r} must be a non-empty "
                             f"list of ints, got {row!r}")
        out.append(sum(_size("KeyedJaggedTensor", f"stride_per_key_per_rank of key {k!r}", n) for n in row))
    return out


def _inverse_indices(value) -> Optional[tuple[list[str], Tensor]]:
    if value is None:
        return None
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ValueError(f"KeyedJaggedTensor: inverse_indices must be (keys, tensor), got {type(value).__name__}")
    keys, inv = value
    if isinstance(inv, Tensor) and not isinstance(inv, torch.fx.Proxy) and (inv.dim() != 2 or len(keys) != inv.shape[0]
                                                                            or inv.is_floating_point()):
        raise ValueError(f"KeyedJaggedTensor: inverse_indices must hold an integer tensor of one row per key "
                         f"({len(keys)} keys), got shape {tuple(inv.shape)} dtype {inv.dtype}")
    return _names("KeyedJaggedTensor", "inverse_indices keys", keys), inv


def _bag_starts(spk: list[int]) -> list[int]:
    out = [0]
    for n in spk:
        out.append(out[-1] + n)
    return out


def _concat_inverse(kjts) -> Optional[tuple[list[str], Tensor]]:
    """The inverse indices of every key of `kjts` (a key of a fixed-batch KJT maps sample b to bag b)."""
    keys, rows = [], []
    for k in kjts:
        inv = k.inverse_indices_or_none()
        for j, key in enumerate(k.keys()):
            keys.append(key)
            if inv is not None and key in inv[0]:
                rows.append(inv[1][inv[0].index(key)])
            elif not k.variable_stride_per_key():
                rows.append(torch.arange(k.stride(), device=k.device()))
            else:
                return None
    return keys, torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.int64)


def _all_or_none(op: str, keys, weights: list) -> Optional[Tensor]:
    present = [w is not None for w in weights]
    if all(present):
        return torch.cat(weights)
    if any(present):
        raise ValueError(f"KeyedJaggedTensor.{op}: some inputs carry weights and some do not "
                         f"(keys {keys}); weight all of them or none")
    return None


# ------------------------------------------------------------------ KeyedTensor
class KeyedTensor:
    """Pooled outputs: ``values`` holds each key's columns side by side along ``key_dim``
    (``length_per_key[i]`` columns for key i, in key order)."""

    def __init__(self, keys: Sequence[str], length_per_key: Sequence[int], values: Tensor,
                 key_dim: int = 1, validate: bool = True):
        self._keys, self._length_per_key = _names("KeyedTensor", "keys", keys), [int(n) for n in length_per_key]
        self._values, self._key_dim = values, key_dim
        self._offset_per_key: Optional[list[int]] = None
        self._index_per_key: Optional[dict[str, int]] = None
        if validate and should_validate(values):
            self._validate()

    def _validate(self) -> None:
        _check_keys("KeyedTensor", self._keys)
        _check_tensors("KeyedTensor", values=self._values)
        if not -self._values.dim() <= self._key_dim < self._values.dim():
            raise ValueError(f"KeyedTensor: key_dim={self._key_dim} is not a dimension of values of shape "
                             f"{tuple(self._values.shape)}")
        if len(self._keys) != len(self._length_per_key):
            raise ValueError(f"KeyedTensor: {len(self._keys)} keys but {len(self._length_per_key)} lengths")
        if any(n < 0 for n in self._length_per_key):
            raise ValueError(f"KeyedTensor: negative length_per_key {self._length_per_key}")
        width = self._values.size(self._key_dim)
        if width != sum(self._length_per_key):
            raise ValueError(f"KeyedTensor: values has {width} entries along key_dim={self._key_dim} "
                             f"but length_per_key {dict(zip(self._keys, self._length_per_key))} "
                             f"sums to {sum(self._length_per_key)}")

    @staticmethod
    def from_tensor_list(keys: Sequence[str], tensors: Sequence[Tensor], key_dim: int = 1,
                         cat_dim: int = 1) -> KeyedTensor:
        if not tensors:
            raise ValueError("KeyedTensor.from_tensor_list: tensors is empty; give one tensor per key")
        return KeyedTensor(keys, [t.size(key_dim) for t in tensors], torch.cat(list(tensors), dim=cat_dim),
                           key_dim=key_dim)

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> Tensor:
        return self._values

    def key_dim(self) -> int:
        return self._key_dim

    def length_per_key(self) -> list[int]:
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        if self._offset_per_key is None:
            out = [0]
            for n in self._length_per_key:
                out.append(out[-1] + n)
            self._offset_per_key = out
        return self._offset_per_key

    def __getitem__(self, key: str) -> Tensor:
        if self._index_per_key is None:
            self._index_per_key = {k: i for i, k in enumerate(self._keys)}
        i = self._index_per_key.get(key)
        if i is None:
            raise _unknown_key(key, self._keys)
        return self._values.narrow(self._key_dim, self.offset_per_key()[i], self._length_per_key[i])

    def to_dict(self) -> dict[str, Tensor]:
        return {k: self[k] for k in self._keys}

    @staticmethod
    def regroup(keyed_tensors: Sequence[KeyedTensor], groups: Sequence[Sequence[str]]) -> list[Tensor]:
        """One tensor per group: the named keys' columns (from any input) concatenated.

        Under torch.fx (a collection's output is a Proxy) the call is one graph node, so that a
        model reading its embeddings this way is captured (``a, b = KeyedTensor.regroup(...)``
        unpacks the node's output)."""
        traced = _traced_call(KeyedTensor.regroup, keyed_tensors, groups)
        if traced is not None:
            return traced
        lookup: dict[str, KeyedTensor] = {}
        for kt in keyed_tensors:
            lookup.update({k: kt for k in kt.keys()})
        out = []
        for i, group in enumerate(_names("KeyedTensor.regroup", "groups", groups)):
            group = _names("KeyedTensor.regroup", f"groups[{i}]", group)
            missing = [k for k in group if k not in lookup]
            if missing:
                raise _unknown_key(missing[0], list(lookup))
            if not group:  # no columns, as TorchRec's regroup gives (batch x 0)
                if not keyed_tensors:
                    raise ValueError(f"KeyedTensor.regroup: groups[{i}] is empty and there is no KeyedTensor "
                                     f"to take its batch from")
                first = keyed_tensors[0]
                out.append(first.values().narrow(first.key_dim(), 0, 0))
                continue
            out.append(torch.cat([lookup[k][k] for k in group], dim=keyed_tensors[0].key_dim()))
        return out

    @staticmethod
    def regroup_as_dict(keyed_tensors: Sequence[KeyedTensor], groups: Sequence[Sequence[str]],
                        keys: Sequence[str]) -> dict[str, Tensor]:
        """`regroup`'s tensors keyed by `keys`, one name per group (as TorchRec's)."""
        keys = _names("KeyedTensor.regroup_as_dict", "keys", keys)
        if len(keys) != len(groups):
            raise ValueError(f"KeyedTensor.regroup_as_dict: {len(keys)} keys {keys} for {len(groups)} groups")
        if len(set(keys)) != len(keys):  # a dict would keep one of them
            raise ValueError(f"KeyedTensor.regroup_as_dict: keys {keys} repeat a name")
        traced = _traced_call(KeyedTensor.regroup_as_dict, keyed_tensors, groups, keys)
        if traced is not None:
            return traced
        return dict(zip(keys, KeyedTensor.regroup(keyed_tensors, groups)))

    def to(self, device, non_blocking: bool = False) -> KeyedTensor:
        return KeyedTensor(self._keys, self._length_per_key, self._values.to(device, non_blocking=non_blocking),
                           self._key_dim, validate=False)

    def record_stream(self, stream) -> None:
        if self._values.is_cuda:
            self._values.record_stream(stream)

    def __fx_create_arg__(self, tracer):
        return tracer.create_node("call_function", KeyedTensor, tracer.create_arg(
            (self._keys, self._length_per_key, self._values, self._key_dim)), {"validate": False})

    def __repr__(self) -> str:
        return f"KeyedTensor(keys={self._keys}, length_per_key={self._length_per_key}, values={self._values})"


def _traced_call(fn, keyed_tensors, *args):
    """`fn`'s call as a node of the graph torch.fx is tracing, when one of `keyed_tensors` is
    a Proxy; else None (run it)."""
    proxies = [kt for kt in keyed_tensors if isinstance(kt, torch.fx.Proxy)] \
        if isinstance(keyed_tensors, (list, tuple)) else []
    if not proxies:
        return None
    return proxies[0].tracer.create_proxy("call_function", fn, (list(keyed_tensors), *args), {})


# Last: registering needs the classes above.
from fxrec import sparse_pytree  # noqa: E402,F401
