"""Exact RowWiseAdagrad for column_wise tables: each row's accumulator sees its whole row.

RowWiseAdagrad grows a row's accumulator by the mean of g**2 over the row's *whole* dim.
A column_wise table splits each row over column shards, usually on different ranks, and a
shard's fused kernel sees only its own columns. FBGEMM and TorchRec let every shard keep an
accumulator over its own columns, which is not the unsharded update; fxrec keeps the
unsharded one (DESIGN.md's equivalence; ``RowWiseAdagrad(exact_column_wise=False)`` gives
TorchRec's), at the price of one small all-to-all and a second pass over the gradient:

- every column shard of a table receives the same ids (every sample's ids for the table), so
  its shards' unique rows are the same, in the same (ascending) order on every holder;
- in the local lookup's backward, `RowSyncState.hook` keeps the call's gradient and defers
  the fused update;
- `RowSync` makes a token before the lookup, which the lookup and the unit's output buffers
  hang from, so on *every* rank (also one without shards) autograd runs the token's backward
  after the lookup's backward and the unit's output collectives' backward. The token's
  backward queues `RowSync.finish` for the end of that backward (`AfterBackward`), once
  however many forward calls the backward went through, as `FusedEmbeddingBags` defers its
  update (tbe.py): a row two calls touched gets one update with its summed gradient;
- `finish` joins each fused module's calls (`merge_calls`), computes, per column shard, its
  unique rows and the sum over its columns of their squared gradient (`row_sq_sums`), sends
  each table's sums to the other ranks holding the table and adds all holders' sums in rank
  order; each shard's accumulator is then advanced by ``whole-row mean - own mean`` and the
  deferred fused update runs, adding the own mean back: the accumulator grows by the
  whole-row mean (up to one rounding of the own mean), and the step uses it. Where rows
  repeat often, that update is made from the rows' summed gradients the row sums were
  computed from, each row a bag of one (`row_sq_sums`'s calls): the kernel then regroups
  the unique rows, not every id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from fxrec.eager import eager_under_dynamo
from fxrec.lowering.sparse_update import merge_calls, row_sq_sums
from fxrec.lowering.tbe import AfterBackward
from fxrec.lowering.torch_ref import table_grads
from fxrec.optim import RowWiseAdagrad, decay_mode, for_table
from fxrec.runtime import comm
from fxrec.runtime.dist_lookup import UnitSpec

__all__ = ["RowSync", "RowSyncState", "split_tables"]


def split_tables(spec: UnitSpec) -> dict[str, tuple[int, ...]]:
    """The unit's tables whose rows are split over two or more column ranges (column_wise
    with several shards), each with the sorted ranks holding its shards."""
    cols: dict[str, set] = {}
    ranks: dict[str, set] = {}
    for r in spec.routes:
        if not r.bucketized:
            cols.setdefault(r.table, set()).add(r.cols)
            ranks.setdefault(r.table, set()).add(r.rank)
    return {t: tuple(sorted(ranks[t])) for t in cols if len(cols[t]) > 1}


def _exact_split_tables(spec: UnitSpec, optimizer) -> dict[str, tuple[int, ...]]:
    """`split_tables` whose optimizer (per table: `fxrec.optim.PerTable`) is exact RowWiseAdagrad."""
    out = {}
    for table, ranks in split_tables(spec).items():
        opt = for_table(optimizer, table)
        if isinstance(opt, RowWiseAdagrad) and opt.exact_column_wise:
            out[table] = ranks
    return out


def _decayed_sq_sums(owner, args: tuple, tables: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """Per table t of `tables`: its unique ids (ascending) and, per id, the sum over the shard's
    columns of ``(g + weight_decay * w) ** 2``: RowWiseAdagrad's L2 row sums, which read the rows
    (before their update) beside the summed gradients g. The plain sums (`row_sq_sums`) need only
    the gradient; these are taken apart, from each row's summed gradient."""
    wd = owner.optimizer.weight_decay
    per_table = owner.layout.split(owner.weights)
    out = {}
    for t, (ids, g) in table_grads(owner.layout, *args, tables=tables).items():
        w = per_table[t].index_select(0, ids).float()
        out[t] = (ids, (g.float() + wd * w).square().sum(1))
    return out


@dataclass
class _Entry:  # one column shard's share of a step (`RowSync._entries`)
    owner: nn.Module  # the FusedEmbeddingBags holding the shard
    table: str
    width: int  # the shard's columns
    first_row: int  # the shard's first row in the owner's flat optimizer state
    rows: Tensor  # unique ids, ascending
    partial: Tensor  # sum of g**2 over the shard's columns, per row


class _Token(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, sync):
        ctx.sync = sync
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx, grad):
        ctx.sync.deferred()
        return None, None


@dataclass
class RowSyncState:
    """One forward call's token (see module doc)."""

    token: Tensor
    sync: "RowSync"

    def hook(self, owner, grad_output: Tensor, indices: Tensor, offsets: Tensor,
             psw: Optional[Tensor]) -> None:
        """`FusedEmbeddingBags` update hook: the call's update, deferred to the end of backward."""
        if not any(key in self.sync.shard_tables for key in owner.layout.names):
            if owner.optimizer is not None:  # None: frozen tables, read but not trained
                owner.update_after_backward(grad_output, indices, offsets, psw)
            return
        self.sync.calls().setdefault(owner, []).append((grad_output, indices, offsets, psw))


@eager_under_dynamo
class RowSync(nn.Module):
    """forward() -> a `RowSyncState` (None when autograd is off): the token this unit's
    `LocalLookup` and `OutputPrep` take. Built only for units with split tables under
    RowWiseAdagrad (`needed`)."""

    def __init__(self, spec: UnitSpec, optimizer, device=None):
        super().__init__()
        self.rank, self.world_size, self.optimizer = spec.rank, spec.world_size, optimizer
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.holders = _exact_split_tables(spec, optimizer)
        self.dims = {s.table: s.dim for s in spec.slots}
        # shard key -> its table, for this rank's shards of split tables
        self.shard_tables = {s.key: s.table for s in spec.local_shards() if s.table in self.holders}
        self._anchor = torch.empty(0, requires_grad=True)
        self._after_backward = AfterBackward()

    @staticmethod
    def needed(spec: UnitSpec, optimizer) -> bool:
        return bool(_exact_split_tables(spec, optimizer))

    def forward(self) -> Optional[RowSyncState]:
        if not torch.is_grad_enabled():
            return None
        return RowSyncState(_Token.apply(self._anchor, self), self)

    def calls(self) -> dict:
        """The running backward's lookup calls, by fused module."""
        return self._after_backward.collection(dict)

    def deferred(self) -> None:
        """Queue `finish` for the end of the running backward (once). Only the token's backward
        asks, at the same point of the backward on every rank: `finish`'s all-to-all then
        meets the other ranks' in the same order among the other end-of-backward collectives
        (`DenseGradSync`, `ReplicatedLookup`), which a lookup's backward, on ranks with shards
        only, would not."""
        self._after_backward.gather(dict, self.finish)

    # -- backward ----------------------------------------------------------------------
    def _partials(self, entries: list[_Entry]) -> dict[str, Tensor]:
        """This rank's partial sum of g**2 per held split table (validate_plan puts a table's
        column shards on distinct ranks: one entry per table)."""
        mine = {e.table: e.partial for e in entries}
        missing = sorted(set(self.shard_tables.values()) - set(mine))
        if missing:
            raise RuntimeError(f"rank {self.rank}: no gradient reached the column shards of table(s) {missing} "
                               f"in this backward; their RowWiseAdagrad row sums cannot be exchanged")
        return mine

    def _exchange(self, mine: dict[str, Tensor]) -> dict[tuple[str, int], Tensor]:
        """(table, holder rank) -> that holder's partial sums, for every table this rank holds."""
        order = [t for t in self.holders if t in mine]  # unit order, the same on every rank
        send, splits = [], []
        for p in range(self.world_size):
            shared = [t for t in order if p != self.rank and p in self.holders[t]]
            send += [mine[t] for t in shared]
            splits.append(sum(mine[t].numel() for t in shared))
        out = {(t, self.rank): mine[t] for t in order}
        if self.world_size == 1:
            return out
        buf = torch.cat(send) if send else torch.zeros(0, device=self.device)
        with torch.no_grad():
            recv = comm.all_to_all(buf, splits, splits)  # symmetric: a shared table has U rows on both sides
        pos = 0
        for p in range(self.world_size):
            for t in order:
                if p != self.rank and p in self.holders[t]:
                    n = mine[t].numel()
                    out[(t, p)] = recv[pos:pos + n]
                    pos += n
        return out

    def _entries(self, calls: dict) -> tuple[list[_Entry], list]:
        """Each fused module's calls joined into one update (as `row_sq_sums`'s calls), and its
        split shards' row sums."""
        entries, updates = [], []
        for owner, owner_calls in calls.items():
            args = merge_calls(owner.layout, owner_calls)
            names = owner.layout.names
            split = [t for t, key in enumerate(names) if key in self.shard_tables]
            found = row_sq_sums(owner.layout, *args, split)
            if decay_mode(owner.optimizer) == 1:  # L2: the accumulator reads g + weight_decay * w
                found.sums.update(_decayed_sq_sums(owner, args, split))
            for t, (rows, sums) in found.sums.items():
                entries.append(_Entry(owner, self.shard_tables[names[t]], owner.layout.dims[t],
                                      owner.layout.hash_size_cumsum_list[t], rows, sums))
            updates.append((owner, found.calls))
        return entries, updates

    @torch.no_grad()
    def finish(self, calls: dict) -> None:
        """Exchange the row sums, advance the accumulators, run the deferred updates (module doc)."""
        entries, updates = self._entries(calls)
        mine = self._partials(entries)
        parts = self._exchange(mine)
        mean = {}
        for t in mine:
            holders = self.holders[t]
            acc = parts[(t, holders[0])].clone()
            for h in holders[1:]:
                acc += parts[(t, h)]
            mean[t] = acc / self.dims[t]
        # one index_add_ per fused module into its flat accumulators, not one per column shard
        rows, deltas = {}, {}
        for e in entries:
            if e.rows.numel():
                rows.setdefault(e.owner, []).append(e.rows + e.first_row)
                deltas.setdefault(e.owner, []).append(mean[e.table] - e.partial / e.width)
        for owner in rows:
            owner.optimizer_state()["momentum"].index_add_(0, torch.cat(rows[owner]), torch.cat(deltas[owner]))
        for owner, calls in updates:
            for call in calls:
                owner.update(*call)

    def extra_repr(self) -> str:
        return f"split_tables={dict(self.holders)}"
