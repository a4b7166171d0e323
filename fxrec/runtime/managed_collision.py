"""Managed collisions in a sharded program (`fxrec.managed_collision`).

The route_collisions pass replaces each call of a `ManagedCollisionCollection` in a sharded
program by a call of `ShardedCollisions`, which keeps the unsharded model's semantics on the
global batch:

- Every rank holds the whole map. In training mode one all_gather brings every rank's ids of
  the managed tables (after their hash); table i's owner (rank i % W) profiles them, so that it
  evicts exactly what the unsharded model would, and a second all_gather brings every owner's
  evictions to every rank, which applies them (`_profile`); each rank then remaps its own batch.
  The collectives sit inside this module rather than in the graph because they depend on the
  mode at run time (no exchange of ids in eval mode) and on the map's own eviction schedule.
- The rows evictions hand to new ids restart from `fresh_rows` (the same values on every rank,
  and in the unsharded model), written into this rank's pieces of the table, and their fused
  sparse optimizer state is zeroed.
- An id outside its module's input range on one rank: every rank learns it from the exchange
  (in eval mode, a small one of its own) and raises it, naming the rank, before any profiles
  the batch or any lookup starts; so also for a table left dense, which has no input check of
  its own.
- It runs on the main stage (`fxrec_main_stage`): TrainPipeline runs it in step with training,
  since an eviction writes rows the previous batch's backward updates.

The collection's state stays where the model had it (the wrapper refers to it outside the module
tree), so the ShardedModel's state_dict keys are the model's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fxrec.managed_collision import ManagedCollisionCollection, fresh_rows
from fxrec.runtime import comm
from fxrec.runtime.local_lookup import shard_pieces, state_pieces

__all__ = ["ShardedCollisions"]


class ShardedCollisions(nn.Module):
    """forward(kjt) -> the remapped KJT, as ``mcc(kjt)`` on the global batch (module doc).

    `tables`: the collection's table name -> the program's table name, or the weight itself
    where the table stayed a dense parameter (``None`` where the rows it evicts are not the
    program's to reset); `program`: the GraphModule whose LocalLookup / ReplicatedLookup
    modules hold this rank's pieces of the tables sharded by `plan`. The collection and the
    program are referred to outside the module tree (a deepcopy of the ShardedModel maps
    them to its own copies)."""

    fxrec_main_stage = True

    def __init__(self, mcc: ManagedCollisionCollection, tables: dict, program, plan, group=None):
        super().__init__()
        self.__dict__["mcc"] = mcc  # not a child: its state keeps the model's keys
        self.__dict__["_program"] = program
        self.__dict__["_plan"] = plan
        self.tables, self.group = dict(tables), group

    def _lookups(self) -> list:
        from fxrec.runtime.local_lookup import LocalLookup, ReplicatedLookup
        return [m for m in self._program.modules() if isinstance(m, (LocalLookup, ReplicatedLookup))]

    def forward(self, features):
        mcc = self.mcc
        pieces, fault = mcc.prepare(features)
        order = [f for cfg in mcc.embedding_configs() for f in cfg.feature_names]
        mine = (-1, 0) if fault is None else (order.index(fault[0]), fault[1])
        profiling = mcc.training and any(m.training for m in mcc._managed_collision_modules.values())
        if profiling:
            every, faults = self._gather(mcc.table_ids(pieces), mine, features.values().device)
        else:
            faults = self._exchange(torch.tensor(mine, dtype=torch.int64, device=features.values().device))
        self._raise(faults, order)
        if profiling:
            self._profile(every)
            self._reset(mcc.evict())
        return mcc.assemble(features, pieces)

    def _profile(self, ids: dict[str, Tensor]) -> None:
        """Each table's map counts the call; the table's owner (table i: rank i % W) alone keeps
        its global ids and computes its evictions (`MCHManagedCollisionModule.delta`), which one
        all_gather brings to every rank, and every rank applies them: equal maps on every rank,
        each rank profiling 1/W of the tables."""
        modules = list(self.mcc._managed_collision_modules.items())
        w, me = comm.world_size(self.group), comm.rank(self.group)
        deltas: dict[int, dict] = {}
        evicting = False
        for i, (name, mc) in enumerate(modules):
            iteration = mc.advance()
            if iteration is None:
                continue
            evicting |= mc.evicts_at(iteration)
            if i % w == me:
                mc.record([ids[name]], iteration)
                if mc.evicts_at(iteration):
                    deltas[i] = mc.delta(iteration)
        if w > 1 and evicting:  # the same on every rank: the same iterations, the same intervals
            deltas = self._share(deltas, modules)
        for i in sorted(deltas):
            modules[i][1].apply_delta(deltas[i])

    def _share(self, mine: dict[int, dict], modules: list) -> dict[int, dict]:
        """Every rank's deltas (one all_gather of a block per rank: its number of deltas, then
        each as ``table index, hits, new ids`` and its tensors in `_fields` order)."""
        device = modules[0][1]._mch_sorted_raw_ids.device
        parts = [torch.tensor([len(mine)], dtype=torch.int64, device=device)]
        for i, d in mine.items():
            parts.append(torch.tensor([i, d["hit"].numel(), d["new"].numel()], dtype=torch.int64, device=device))
            parts += [d[f] for f in _fields(modules[i][1])]
        every = comm.all_gather(torch.cat(parts), group=self.group)
        out, at = {}, 0
        while at < every.numel():
            count, at = int(every[at]), at + 1
            for _ in range(count):
                i, hits, new = every[at:at + 3].tolist()
                at += 3
                d = {}
                for f in _fields(modules[i][1]):
                    size = hits if f.startswith("hit") else new
                    d[f], at = every[at:at + size], at + size
                out[i] = d
        return out

    def _raise(self, faults: list[tuple[int, int]], order: list[str]) -> None:
        """The first faulty rank's bad id, raised on every rank (each got every rank's
        ``(feature index, id)``, feature index -1 for none), before any of them profiles."""
        w = len(faults)
        for rank, (feature, value) in enumerate(faults):
            if feature >= 0:
                name = order[feature]
                table = next(c.name for c in self.mcc.embedding_configs() if name in c.feature_names)
                message = self.mcc._managed_collision_modules[table].bad_id_message(name, value)
                raise ValueError(f"rank {rank}'s batch: {message}" if w > 1 else message)

    def _exchange(self, block: Tensor) -> list:
        """Every rank's fault ``(feature index, id)``: one all_gather of two int64 each."""
        if comm.world_size(self.group) == 1:
            return [tuple(block.tolist())]
        return [tuple(r) for r in comm.all_gather(block, group=self.group).view(-1, 2).tolist()]

    def _gather(self, ids: dict[str, Tensor], fault: tuple[int, int], device) -> tuple[dict[str, Tensor], list]:
        """Every rank's ids of each table and every rank's fault, in one all_gather of a block per
        rank: the fault ``(feature index, id)``, each table's count, then the ids."""
        names = list(ids)
        header = torch.tensor(list(fault) + [ids[n].numel() for n in names], dtype=torch.int64, device=device)
        mine = torch.cat([header] + [ids[n].to(torch.int64) for n in names])
        if comm.world_size(self.group) == 1:
            return ids, [fault]
        every = comm.all_gather(mine, group=self.group)
        head = 2 + len(names)
        out: dict[str, list] = {n: [] for n in names}
        faults, start = [], 0
        while start < every.numel():
            block = every[start:start + head].tolist()
            faults.append((block[0], block[1]))
            at = start + head
            for n, count in zip(names, block[2:]):
                out[n].append(every[at:at + count])
                at += count
            start = at
        return {n: torch.cat(parts) for n, parts in out.items()}, faults

    @torch.no_grad()
    def _reset(self, evictions: dict[str, Optional[Tensor]]) -> None:
        """Fresh rows, and zeroed optimizer state, for the evicted rows this rank holds."""
        configs = {c.name: c for c in self.mcc.embedding_configs()}
        modules = self.mcc._managed_collision_modules
        weights = state = None
        for table, rows in evictions.items():
            target = self.tables.get(table)
            if rows is None or not rows.numel() or target is None:
                continue
            if isinstance(target, Tensor):  # a table left dense: a parameter of the program, whole
                new = fresh_rows(configs[table], rows.numel(), modules[table].current_iter())
                target.data[rows.to(target.device)] = new.to(device=target.device, dtype=target.dtype)
                continue
            if weights is None:
                lookups = self._lookups()
                weights, state = shard_pieces(lookups, self._plan), state_pieces(lookups, self._plan)
            pieces = list(zip(weights.get(target, []), state.get(target, [])))
            if not pieces:  # another rank's table: nothing to draw here
                continue
            new = fresh_rows(configs[table], rows.numel(), modules[table].current_iter())
            rows = rows.cpu()
            for (r, c, view), (_, _, opt) in pieces:
                mine = (rows >= r[0]) & (rows < r[1])
                if not bool(mine.any()):
                    continue
                local = (rows[mine] - r[0]).to(view.device)
                view[local] = new[mine][:, c[0]:c[1]].to(device=view.device, dtype=view.dtype)
                for value in opt.values():
                    value[local.to(value.device)] = 0


def _fields(mc) -> list[str]:
    """The tensors of a map's delta, in the order `ShardedCollisions._share` packs them."""
    names = mc._eviction_policy.metadata
    return ["hit"] + [f"hit_{m}" for m in names] + ["freed", "new"] + [f"new_{m}" for m in names]
