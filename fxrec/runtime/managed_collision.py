"""Managed collisions in a sharded program (`fxrec.managed_collision`).

`wire` replaces each call of a `ManagedCollisionCollection` in the sharded program by a call of
`ShardedCollisions`, which keeps the unsharded model's semantics on the global batch:

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

__all__ = ["ShardedCollisions", "wire"]


class ShardedCollisions(nn.Module):
    """forward(kjt) -> the remapped KJT, as ``mcc(kjt)`` on the global batch (module doc).

    `tables`: the collection's table name -> the program's table name, or the weight itself
    where the table stayed a dense parameter (``None`` where the rows it evicts are not the
    program's to reset); `lookups`: the program's LocalLookup /
    ReplicatedLookup modules, which hold this rank's pieces of the tables sharded by `plan`.
    They and the collection are referred to outside the module tree (a deepcopy of the
    ShardedModel maps them to its own copies)."""

    fxrec_main_stage = True

    def __init__(self, mcc: ManagedCollisionCollection, tables: dict, lookups: list, plan, group):
        super().__init__()
        self.__dict__["mcc"] = mcc  # not a child: its state keeps the model's keys
        self.__dict__["_lookups"] = list(lookups)
        self.__dict__["_plan"] = plan
        self.tables, self.group = dict(tables), group

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
                weights, state = shard_pieces(self._lookups, self._plan), state_pieces(self._lookups, self._plan)
            rows = rows.cpu()
            for (r, c, view), (_, _, opt) in zip(weights.get(target, []), state.get(target, [])):
                mine = (rows >= r[0]) & (rows < r[1])
                if not bool(mine.any()):
                    continue
                local = (rows[mine] - r[0]).to(view.device)
                view[local] = new[mine][:, c[0]:c[1]].to(device=view.device, dtype=view.dtype)
                for value in opt.values():
                    value[local.to(value.device)] = 0


def _table_names(model: nn.Module, names: dict) -> dict[str, dict]:
    """Path of each managed collision collection inside an fxrec managed-collision module of
    `model` -> {its table: (the program's table name, the weight's key)}. `names`: parameter key
    -> table name."""
    from fxrec.managed_collision import _ManagedCollisionBase
    from fxrec.modules import EmbeddingBagCollection

    out = {}
    for path, m in model.named_modules():
        if isinstance(m, _ManagedCollisionBase):
            prefix = f"{path}." if path else ""
            sub = "embedding_bags" if isinstance(m._embedding_module, EmbeddingBagCollection) else "embeddings"
            weights = {c.name: f"{prefix}_embedding_module.{sub}.{c.name}.weight"
                       for c in m._managed_collision_collection.embedding_configs()}
            out[f"{prefix}_managed_collision_collection"] = {t: (names.get(w), w) for t, w in weights.items()}
    return out


def _dense_weight(gm, path: str) -> Optional[Tensor]:
    """The program's own parameter at `path` (a table left dense), or None."""
    try:
        return gm.get_parameter(path)
    except AttributeError:
        return None


def wire(programs: list, model: nn.Module, names: dict, lookups: list, plan, group) -> int:
    """In each GraphModule of `programs`, route every call of a ManagedCollisionCollection
    through a `ShardedCollisions` (module doc). `names`: the model's parameter key -> table
    name; `lookups`, `plan`: as `ShardedCollisions` takes them. Returns how many calls it routed."""
    owners = _table_names(model, names)
    wrappers: dict[str, tuple[str, ShardedCollisions]] = {}
    routed = 0
    for gm in programs:
        if gm is None:
            continue
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ManagedCollisionCollection):
                continue
            path = str(node.target)
            if path not in wrappers:
                mapping = {t: (n if n in plan.tables else _dense_weight(gm, weight))
                           for t, (n, weight) in owners.get(path, {}).items()}
                wrappers[path] = (f"_fxrec_mc_{len(wrappers)}",
                                  ShardedCollisions(gm.get_submodule(path), mapping, lookups, plan, group))
            name, wrapper = wrappers[path]
            gm.add_submodule(name, wrapper)
            node.target = name
            routed += 1
        gm.recompile()
    return routed
