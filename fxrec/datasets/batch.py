"""The training batch every fxrec data source yields.

A `Batch` holds dense features, sparse ids as a `KeyedJaggedTensor` (TorchRec's layout:
all keys' values key-major), and labels. `to_plain()` turns it into the inputs of the
reference DLRM script (facebookresearch/dlrm ``dlrm_s_pytorch``), which feeds a list of
``nn.EmbeddingBag`` with one offsets and one indices tensor per table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fxrec.sparse import KeyedJaggedTensor


@dataclass
class Batch:
    """One batch: ``dense_features`` (B x num_dense float32), ``sparse_features``
    (KeyedJaggedTensor of int64 ids, stride B), ``labels`` (B float32)."""

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy of the batch on ``device`` (tensors already there are not copied)."""
        return Batch(
            dense_features=self.dense_features.to(device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """A copy in page-locked host memory (for asynchronous host-to-device copies), or
        ``self`` where torch has no accelerator runtime (CPU-only builds cannot pin)."""
        if not torch.accelerator.is_available():
            return self
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Samples ``[start, stop)`` as a Batch of their own (every key's bags, in order).

        ``[b.slice(r * n, (r + 1) * n) for r in range(W)]`` are the local batches of W
        ranks whose concatenation is this batch.
        """
        batch = self.batch_size
        if not 0 <= start <= stop <= batch:
            raise ValueError(f"Batch.slice: need 0 <= start <= stop <= batch_size={batch}, got [{start}, {stop})")
        kjt = self.sparse_features
        keys = kjt.keys()
        lengths = kjt.lengths().view(len(keys), batch)
        ends = torch.cumsum(lengths.to(torch.int64).flatten(), 0).view(len(keys), batch)
        begins = ends - lengths
        pieces = []
        for k in range(len(keys)):
            lo = int(begins[k, start]) if start < batch else int(ends[k, -1])
            hi = int(ends[k, stop - 1]) if stop > 0 else lo
            pieces.append((lo, max(lo, hi)))
        values = torch.cat([kjt.values()[lo:hi] for lo, hi in pieces])
        weights = kjt.weights_or_none()
        if weights is not None:
            weights = torch.cat([weights[lo:hi] for lo, hi in pieces])
        sub = KeyedJaggedTensor(keys, values, lengths=lengths[:, start:stop].flatten(), weights=weights, stride=stop - start)
        return Batch(self.dense_features[start:stop], sub, self.labels[start:stop])

    def to_plain(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(dense, offsets_list, indices_list)`` in the reference DLRM's form.

        For each key, in ``sparse_features.keys()`` order: ``offsets`` is a 1-D int64
        tensor of length B holding each bag's starting position (no trailing total), and
        ``indices`` is that key's 1-D int64 ids, so ``nn.EmbeddingBag(indices, offsets)``
        pools exactly the bags of the KeyedJaggedTensor.
        """
        kjt = self.sparse_features
        keys = kjt.keys()
        batch = self.batch_size
        lengths = kjt.lengths().to(torch.int64).view(len(keys), batch)
        values = kjt.values().to(torch.int64)
        per_key = values.split(lengths.sum(dim=1).tolist())
        offsets_list = [_starts(row) for row in lengths]
        return self.dense_features, offsets_list, list(per_key)


def _starts(lengths: torch.Tensor) -> torch.Tensor:
    # exclusive cumulative sum: the start of each bag
    out = torch.zeros_like(lengths)
    if lengths.numel() > 1:
        torch.cumsum(lengths[:-1], dim=0, out=out[1:])
    return out


def make_batch(
    keys: Sequence[str],
    dense: torch.Tensor,
    ids_per_key: Sequence[torch.Tensor],
    lengths_per_key: Sequence[torch.Tensor],
    labels: torch.Tensor,
) -> Batch:
    """Assemble a Batch from per-key ids and bag lengths (each length tensor has B entries)."""
    if not keys:
        raise ValueError("make_batch: at least one sparse key is needed")
    values = torch.cat([ids.to(torch.int64) for ids in ids_per_key])
    lengths = torch.cat([lens.to(torch.int32) for lens in lengths_per_key])
    kjt = KeyedJaggedTensor(list(keys), values, lengths=lengths, stride=int(labels.shape[0]))
    return Batch(dense.to(torch.float32), kjt, labels.to(torch.float32))
