"""Managed collisions in a sharded program (`fxrec.managed_collision`).

The route_collisions pass replaces each call of a `ManagedCollisionCollection` in a sharded
program by a call of `ShardedCollisions`, which keeps the unsharded model's semantics on the
global batch:

- Every rank holds the whole map. In training mode one all_gather brings every rank's ids of
  the managed tables (after their hash), so that each rank's map profiles the global batch
  and evicts exactly what the unsharded model would; each rank then remaps its own batch.
  The collective sits inside this module rather than in the graph because it depends on the
  mode at run time (no exchange in eval mode) and on the map's own profiling state.
- The rows evictions hand to new ids restart from `fresh_rows` (the same values on every rank,
  and in the unsharded model), written into this rank's pieces of the table, and their fused
  sparse optimizer state is zeroed.
- An id outside its module's input range on one rank: every rank learns it from the exchange
  and none profiles the batch; the remapped KJT carries the fault to the lookups' input check,
  which raises it on every rank (as for other bad input). In eval mode the check alone carries it.
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
        profiling = mcc.training and any(m.training for m in mcc._managed_collision_modules.values())
        if profiling:
            ids = mcc.table_ids(pieces)
            every, faulty = self._gather(ids, fault is not None)
            if not faulty:
                mcc.profile_tables(every)
                self._reset(mcc.evict())
        out = mcc.assemble(features, pieces)
        if fault is not None:
            out._mc_fault = fault[:2]  # (feature, id): raised by the lookups' input check on every rank
        return out

    def _gather(self, ids: dict[str, Tensor], faulty: bool) -> tuple[dict[str, Tensor], bool]:
        """Every rank's ids of each table, and whether any rank's batch was faulty (one all_gather;
        a header per rank: the fault flag, then each table's count)."""
        names = list(ids)
        device = next(iter(ids.values())).device if ids else torch.device("cpu")
        header = torch.tensor([int(faulty)] + [ids[n].numel() for n in names], dtype=torch.int64, device=device)
        mine = torch.cat([header] + [ids[n].to(torch.int64) for n in names])
        w = comm.world_size(self.group)
        if w == 1:
            return ids, faulty
        sizes = comm.all_gather(torch.tensor([mine.numel()], device=device), group=self.group).tolist()
        every = comm.all_gather(mine, group=self.group)
        out: dict[str, list] = {n: [] for n in names}
        start, any_fault = 0, False
        for size in sizes:
            block = every[start:start + size]
            start += size
            counts = block[1:1 + len(names)].tolist()
            any_fault |= bool(block[0])
            at = 1 + len(names)
            for n, c in zip(names, counts):
                out[n].append(block[at:at + c])
                at += c
        return {n: torch.cat(parts) for n, parts in out.items()}, any_fault

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
            new = fresh_rows(configs[table], rows.numel(), modules[table].current_iter())
            if isinstance(target, Tensor):  # a table left dense: a parameter of the program, whole
                target.data[rows.to(target.device)] = new.to(device=target.device, dtype=target.dtype)
                continue
            if weights is None:
                lookups = self._lookups()
                weights, state = shard_pieces(lookups, self._plan), state_pieces(lookups, self._plan)
            rows = rows.cpu()
            for (r, c, view), (_, _, opt) in zip(weights.get(target, []), state.get(target, [])):
                mine = (rows >= r[0]) & (rows < r[1])
                if not bool(mine.any()):
                    continue
                local = (rows[mine] - r[0]).to(view.device)
                view[local] = new[mine][:, c[0]:c[1]].to(device=view.device, dtype=view.dtype)
                for value in opt.values():
                    value[local.to(value.device)] = 0
