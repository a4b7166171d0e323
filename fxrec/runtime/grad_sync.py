"""Average dense gradients across ranks during backward, as DDP does.

`DenseGradSync` packs gradients into flat buckets (reverse registration order, which is
roughly the order backward produces them), starts an async all-reduce as soon as a bucket is
complete, and at the end of backward waits, divides by the world size and writes the averages
back into ``param.grad``. The result equals the gradient of the loss averaged over the global
batch when each rank's loss is the mean over its local batch.

Guarantees:
- Buckets are launched strictly in bucket order, so every rank issues the same collectives in
  the same order even when a parameter got no gradient on some rank; such a parameter
  contributes its current ``.grad`` (zeros when None).
- Each bucket also reduces one flag per parameter, "had a gradient on this rank", so a
  parameter that no rank touched keeps ``grad=None`` exactly as in the unsharded step (an
  optimizer then skips it), and one touched by any rank gets the average on every rank.
- Gradients accumulated over several backwards without zero_grad stay correct: the old part
  is already identical on every rank, so averaging it again leaves it unchanged.
- A parameter frozen (``requires_grad_(False)``) is left out, its ``.grad`` as it was; one
  unfrozen later is averaged from the first forward `arm` sees it train in (`refresh` rebuilds
  the buckets and hooks when the set that requires grad changed; without `arm`, call it after
  freezing or unfreezing).
- ``group=None`` creates a dedicated group over all ranks (collective: every rank constructs
  DenseGradSync at the same point), so bucket all-reduces, launched at data-dependent moments
  of backward, never interleave with the sharded program's own collectives on the default
  group. Pass a group to use that one instead.

When finish runs (``auto_finish``):
- True (default): the first gradient hook of a backward queues `finish` on the autograd engine
  (``Variable._execution_engine.queue_callback``), so it runs when that backward completes and
  the user need not call it; an explicit `finish()` afterwards is a no-op. Every rank's backward
  must then reach at least one of the parameters (the usual SPMD case).
- False: call `finish()` on every rank after each backward; this also works when a rank's
  backward produced no dense gradient at all.

Which backwards it acts in (``gated``):
- False (default): every backward that accumulates a gradient into one of the parameters.
- True: only a backward that goes through the outputs of a forward passed to `arm` (fxrec.shard:
  each forward of the sharded program). The parameters are the user's own model's, so a
  backward of that plain model (a local reference, one rank alone) keeps its local gradients
  and starts no collective. `arm` puts a pre-hook on the outputs' autograd nodes, which runs
  before any gradient reaches a parameter through them and marks that backward (its graph
  task): several forwards before one backward mark it once, a forward under no_grad marks
  nothing, and one whose backward never runs leaves nothing behind.

The hooks hold this object, which holds the parameters: a cycle through autograd's hook table
that Python's gc does not see. `remove()` breaks it; whoever owns the DenseGradSync calls it
when done (fxrec.shard: when the ShardedModel is collected), or the parameters, their
gradients and the buckets stay alive as long as the process.
"""
from __future__ import annotations

import copy
import functools
import weakref
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor, nn

from fxrec.runtime import comm

__all__ = ["DenseGradSync"]


# Buckets of these dtypes are reduced in fp32: a W-fold sum of in-range fp16 gradients can
# overflow (and bf16 rounds it once more) before the division by W. DDP avoids the overflow by
# dividing first; summing in fp32 avoids it too, rounds once at the end, and leaves fp32 and
# fp64 buckets reduced exactly as before (sum, then divide).
_REDUCE_IN_FP32 = (torch.float16, torch.bfloat16)


class _Bucket:
    """Flat buffer: each parameter's gradient at its offset, then one flag per parameter.
    The buffer is fp32 for fp16/bf16 parameters (see _REDUCE_IN_FP32), else their dtype."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, device: torch.device):
        self.params = params
        if dtype in _REDUCE_IN_FP32:
            dtype = torch.float32
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.buffer = torch.zeros(total + len(params), dtype=dtype, device=device)
        self.ready = [False] * len(params)
        self.work = None

    def slot(self, i: int) -> Tensor:
        return self.buffer[self.offsets[i]:self.offsets[i] + self.params[i].numel()]

    def fill(self, i: int, grad: Optional[Tensor]) -> None:
        if grad is None:
            self.slot(i).zero_()
            self.buffer[self.numel + i] = 0
        else:
            self.slot(i).copy_(grad.detach().reshape(-1))
            self.buffer[self.numel + i] = 1
        self.ready[i] = True

    def complete(self) -> bool:
        return all(self.ready)


class DenseGradSync:
    """Bucketed, overlapped gradient averaging for ``params`` over ``group`` (see module doc).

    ``params``: the dense parameters (repeats are dropped); every rank passes the same
    parameters in the same order. Only those that require grad are hooked and bucketed;
    `refresh` (which `arm` calls) follows a parameter frozen or unfrozen later. ``bucket_bytes``: the
    size at which a bucket is closed (parameters are never split; one larger than the limit
    gets a bucket of its own). Without an initialised process group, or with one rank, it
    registers nothing and `finish` does nothing. ``gated``: act only in backwards that `arm`
    marked (module doc).
    """

    def __init__(self, params: Iterable[nn.Parameter], group=None, bucket_bytes: int = 25 * 2 ** 20,
                 auto_finish: bool = True, gated: bool = False):
        if bucket_bytes <= 0:
            raise ValueError(f"DenseGradSync: bucket_bytes must be positive, got {bucket_bytes}")
        seen: set[int] = set()
        self._all = [p for p in params if not (id(p) in seen or seen.add(id(p)))]
        self.auto_finish = auto_finish
        self.gated = gated
        self.bucket_bytes = bucket_bytes
        self.world_size = comm.world_size()
        self.group = group if group is not None or self.world_size == 1 else dist.new_group()
        if group is not None:
            self.world_size = comm.world_size(group)
        self._hook()

    def _hook(self) -> None:
        """`params`: those of all the parameters that require grad now, with fresh buckets and
        their hooks (none on one rank); no step under way."""
        self._trains = [p.requires_grad for p in self._all]
        self.params = [p for p, trains in zip(self._all, self._trains) if trains]
        self._armed = None  # the graph task of the latest backward `arm` marked
        self.buckets = _make_buckets(self.params, self.bucket_bytes)
        self._where = {id(p): (b, i) for b, bucket in enumerate(self.buckets) for i, p in enumerate(bucket.params)}
        self._next = 0  # first bucket not yet launched
        self._active = False  # a backward has started filling buckets since the last finish
        self._task = -1  # that backward's autograd graph task
        self._handles = []
        if self.world_size > 1:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def __deepcopy__(self, memo: dict) -> "DenseGradSync":
        """The sync of a deep copy of the parameters' owner (``copy.deepcopy(sharded)``,
        ``torch.optim.swa_utils.AveragedModel(sharded)``): it averages the gradients of the
        copies of the parameters (those `memo` maps them to, so the copied model's own), through
        hooks and buckets of its own, and leaves this one's as they are. The process group is
        shared, not copied: a ProcessGroup cannot be, and the copy talks to the same ranks.
        Not collective: each rank copies its own."""
        new = copy.copy(self)  # the settings, the group and world size
        memo[id(self)] = new
        new._all = copy.deepcopy(self._all, memo)
        new._hook()
        return new

    def refresh(self) -> None:
        """Follow the parameters that train: where one was frozen or unfrozen since the last
        look (``requires_grad_``), the buckets and hooks are rebuilt over those that require
        grad now (a step under way is dropped, as a failed backward's). Every rank must
        freeze the same parameters, as every rank passes the same ones. One pass over the flags
        otherwise: `arm` calls it at each forward."""
        if self.world_size == 1 or all(p.requires_grad is trains for p, trains in zip(self._all, self._trains)):
            return
        if self._active:
            self._drop_unfinished()
        self.remove()
        self._hook()

    def arm(self, outputs: Any) -> None:
        """With ``gated``: a backward that goes through `outputs` (a forward's result: a tensor
        or a pytree of them) averages the gradients. The pre-hooks hold this object weakly, so
        a kept output keeps nothing of it alive. Calls `refresh` first: the parameters that
        train in this forward's backward are those that require grad now."""
        self.refresh()
        if not self._handles:
            return
        mark = functools.partial(_mark_backward, weakref.ref(self))
        for t in pytree.tree_leaves(outputs):
            if isinstance(t, Tensor) and t.grad_fn is not None:
                t.grad_fn.register_prehook(mark)

    def _on_grad(self, p: nn.Parameter) -> None:
        task = torch._C._current_graph_task_id()
        if self.gated and task != self._armed:
            return  # a backward of the plain model, not through the sharded program's outputs
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"DenseGradSync: a parameter of shape {tuple(p.shape)} has a sparse gradient; "
                             "only dense parameters can be averaged here")
        if self._active and self.auto_finish and task != self._task:
            self._drop_unfinished()  # a backward that raised before its finish ran
        if not self._active:
            self._active, self._task = True, task
            if self.auto_finish:
                torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        b, i = self._where[id(p)]
        self.buckets[b].fill(i, p.grad)
        self._launch_ready()

    def _drop_unfinished(self) -> None:
        """Forget a step whose backward failed: its launched all-reduces are waited for (every
        rank launched them, in the same backward) and their sums dropped; the gradients it
        filled in stay as the failed backward left them, as in the unsharded model."""
        self._end_step(write_back=False)

    def _end_step(self, write_back: bool) -> None:
        """Wait for every launched bucket (writing its average back, or not) and empty them all."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                if write_back:
                    self._write_back(bucket)
                bucket.work = None
            bucket.ready = [False] * len(bucket.params)
        self._next, self._active = 0, False

    def _launch_ready(self) -> None:
        # In bucket order only: a bucket waiting for an unused parameter holds back later ones.
        while self._next < len(self.buckets) and self.buckets[self._next].complete():
            bucket = self.buckets[self._next]
            bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """Complete the step: launch the remaining buckets (parameters without a new
        gradient contribute their current ``.grad`` or zeros), wait, average, write back."""
        if self.world_size == 1 or (self.auto_finish and not self._active):
            return
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                if not bucket.ready[i]:
                    bucket.fill(i, p.grad)
        self._launch_ready()  # every bucket is complete now: all are launched
        self._end_step(write_back=True)

    def _write_back(self, bucket: _Bucket) -> None:
        flags = bucket.buffer[bucket.numel:].tolist()
        bucket.buffer[:bucket.numel].div_(self.world_size)
        for i, p in enumerate(bucket.params):
            if flags[i] == 0:  # no rank had a gradient: leave None, as the unsharded step would
                continue
            avg = bucket.slot(i).view_as(p)
            if p.grad is None:
                p.grad = avg.to(dtype=p.dtype, copy=True)
            else:
                p.grad.copy_(avg)  # casts an fp32 average back to an fp16/bf16 grad

    def remove(self) -> None:
        """Unregister the hooks (the parameters' grads are no longer synchronised)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _mark_backward(ref: "weakref.ref[DenseGradSync]", grad_outputs) -> None:
    """Pre-hook `DenseGradSync.arm` puts on an output's autograd node."""
    sync = ref()
    if sync is not None:
        sync._armed = torch._C._current_graph_task_id()


def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    """Reverse registration order, one open bucket per (dtype, device), closed at bucket_bytes."""
    done: list[tuple[list, tuple]] = []
    open_: dict[tuple, tuple[int, list]] = {}
    for p in reversed(params):
        key = (p.dtype, p.device)
        nbytes, members = open_.pop(key, (0, []))
        members.append(p)
        nbytes += p.numel() * p.element_size()
        if nbytes >= bucket_bytes:
            done.append((members, key))
        else:
            open_[key] = (nbytes, members)
    done.extend((members, key) for key, (_, members) in open_.items())
    return [_Bucket(members, *key) for members, key in done]
