"""Keep the dense part's buffers equal across ranks, as DDP's ``broadcast_buffers=True`` does.

BatchNorm in training mode normalises with its local batch's statistics and updates its running
statistics from them (so does any module whose forward writes a buffer): on W ranks, each rank's
running_mean followed its own batches, so the ranks' eval outputs and `full_state_dict()`
differed. DDP broadcasts rank 0's buffers to every rank as each forward starts; `BufferSync`
broadcasts them as each forward that may write them (a module owning one in training mode)
ends. The next forward reads the same values either way (rank 0's, after rank 0's updates),
and here the ranks also agree between forwards: an eval forward, `full_state_dict` and a
checkpoint see rank 0's buffers on every rank.

Guarantees:
- Only the dense modules' floating-point and integer buffers (never the tables' shards or
  their optimizer state, nor bool masks, nor those of a module marked
  ``fxrec_replicated_state``, which every rank computes alike from the global batch), in one
  broadcast of their bytes, over the group it is given (every rank calls it at the same point:
  the sharded program's forward is collective).
- The copy into a buffer does not bump its version counter: a forward's autograd graph keeps
  buffers it read (BatchNorm keeps its running statistics), and two forwards before one
  backward (or this broadcast after the first) must not make that backward fail as "modified
  by an inplace operation" (DDP's broadcast does). Rank 0's buffers are never written.
- Buffers are looked up by (module, name) at each call, so a buffer a device move or the user
  replaced is the one broadcast.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxrec.runtime import comm

__all__ = ["BufferSync"]


def _synced(t: Optional[Tensor]) -> bool:
    """A floating-point or integer buffer."""
    return t is not None and not t.is_complex() and not t.is_quantized and t.dtype != torch.bool


class BufferSync:
    """Broadcast rank 0's buffers of `owners` (``(module, buffer name)`` pairs) over `group`
    after each forward in which one of those modules trains (module doc)."""

    def __init__(self, owners: list[tuple[nn.Module, str]], group):
        self.owners, self.group = list(owners), group
        self._owning = list({id(m): m for m, _ in self.owners}.values())

    @classmethod
    def of(cls, module: nn.Module, skip: str, group) -> Optional["BufferSync"]:
        """A BufferSync over the buffers of `module`'s submodules outside the one at path
        `skip` (the shards), or None where there are none to keep equal."""
        owners, seen = [], set()
        # modules whose every rank computes the same buffers from the same data say so
        # (`fxrec_replicated_state`: managed collisions' maps, profiled on the global batch)
        skips = [skip] + [p for p, m in module.named_modules() if getattr(m, "fxrec_replicated_state", False)]
        for path, m in module.named_modules():
            if any(path == s or path.startswith(s + ".") for s in skips):
                continue
            for name, t in m._buffers.items():
                if _synced(t) and id(t) not in seen:
                    seen.add(id(t))
                    owners.append((m, name))
        return cls(owners, group) if owners else None

    def __deepcopy__(self, memo: dict) -> "BufferSync":
        """Over the copied modules (those `memo` maps them to); the group is shared."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.owners = copy.deepcopy(self.owners, memo)
        new._owning = copy.deepcopy(self._owning, memo)
        return new

    def after_forward(self) -> None:
        """The broadcast, where a module owning one of the buffers is in training mode."""
        if any(m.training for m in self._owning):
            self.broadcast()

    @torch.no_grad()
    def broadcast(self) -> None:
        """Every rank's buffers := rank 0's (collective over the group)."""
        tensors = list({id(t): t for t in (m._buffers.get(name) for m, name in self.owners) if _synced(t)}.values())
        if not tensors:
            return
        # by element size, largest first: each buffer's bytes then start at a multiple of its size
        tensors.sort(key=lambda t: -t.element_size())
        device = comm.collective_device(self.group)
        flat = torch.cat([t.detach().reshape(-1).view(torch.uint8).to(device) for t in tensors])
        dist.broadcast(flat, src=0, group=self.group)
        if dist.get_rank() == 0:
            return
        offset = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            t.data.copy_(flat[offset:offset + n].view(t.dtype).view(t.shape))  # .data: no version bump
            offset += n
