"""Managed collisions, as TorchRec's MCH modules: raw ids from an unbounded space (hashes of
user or item ids) mapped onto a table's rows, the ids seen most (by an eviction policy) each
holding a row of their own.

- `MCHManagedCollisionModule(zch_size, device, eviction_policy, eviction_interval, ...)`: one
  table's map. ``zch_size`` is the table's rows; the last row serves every id without a row of
  its own (a miss). In training mode each call profiles the ids it is given; every
  ``eviction_interval`` calls the ids seen since the last eviction compete with the ids holding
  rows, by the policy's score, and the best ``zch_size - 1`` keep or take a row. The rows handed
  to new ids are reported by `evict()`. In eval mode ids are only remapped.
- Policies: `LFU_EvictionPolicy` (counts), `LRU_EvictionPolicy` (last batch seen) and
  `DistanceLFU_EvictionPolicy` (counts over distance, TorchRec's usual choice).
- `ManagedCollisionCollection(managed_collision_modules, embedding_configs)`: a map per table;
  remaps the KJT's features of each table (others pass as they are).
- `ManagedCollisionEmbeddingBagCollection(ebc, mcc)` / `ManagedCollisionEmbeddingCollection(ec,
  mcc)`: remap, reset the rows evictions handed to new ids, look up. forward returns
  ``(embeddings, remapped KJT or None)``, as TorchRec's.

An evicted row restarts from fresh values (`fresh_rows`: the table's init, drawn from a
generator seeded by the table's name and the module's iteration, so that a sharded model's
ranks draw the same), before the batch that brought its new id looks it up: a new id never
trains on the row of the id it displaced. (TorchRec's eager module leaves evicted rows as they
are; its sharded one resets them after the lookup.) Where a fused sparse optimizer trains the
table (`fxrec.shard`, torch.compile's ``sparse_optimizer`` option), its state of those rows is
zeroed too.

Sharded (`fxrec.runtime.managed_collision`): every rank keeps the whole map (32 bytes a row
under DistanceLFU); each table's map is profiled on the global batch's ids by one rank, whose
evictions (`MCHManagedCollisionModule.delta`) every rank applies, so that every rank's map, and
the evictions, equal the unsharded model's on the global batch; each rank remaps its own batch.

Under torch.fx the collection is a leaf (one ``call_module`` node): its state lives in Python
as well as in buffers, and per-key code cannot be traced on a Proxy. Under torch.compile it runs
outside the graphs (``torch._dynamo.disable``). While fxrec captures a model (the example run),
nothing is profiled: capture does not change the model.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import hashlib
import math
import sys
import warnings
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fxrec.modules import EmbeddingBagCollection, EmbeddingCollection
from fxrec.sparse import JaggedTensor, KeyedJaggedTensor
from fxrec.sparse_checks import validation_enabled

__all__ = ["DistanceLFU_EvictionPolicy", "LFU_EvictionPolicy", "LRU_EvictionPolicy", "MCHEvictionPolicy",
           "MCHManagedCollisionModule", "ManagedCollisionCollection", "ManagedCollisionEmbeddingBagCollection",
           "ManagedCollisionEmbeddingCollection", "ManagedCollisionModule", "fresh_rows", "no_profiling"]

_EMPTY = torch.iinfo(torch.int64).max  # the raw id of a row no id holds (sorts last)
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("fxrec_mc_quiet", default=False)


@contextlib.contextmanager
def no_profiling():
    """Within it, managed-collision modules remap without profiling (capture's example run)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


# ------------------------------------------------------------------ eviction policies
class MCHEvictionPolicy:
    """Scores candidates for the rows: higher keeps (or takes) a row. ``metadata`` names the
    per-row state the policy reads (``"counts"``: ids seen since the row was taken;
    ``"last_access_iter"``: the last iteration the id was seen).

    threshold_filtering_func: as TorchRec's (experimental there too): ``f(counts) -> (mask,
    threshold)`` over the unique new ids' counts; only ids where ``mask`` holds compete."""

    metadata: tuple[str, ...] = ()

    def __init__(self, threshold_filtering_func: Optional[Callable] = None):
        self._threshold_filtering_func = threshold_filtering_func

    def scores(self, counts: Tensor, last_access: Tensor, iteration: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _distance(last_access: Tensor, iteration: int, exponent: float) -> Tensor:
    return (iteration - last_access + 1).double().pow(exponent)


class LFU_EvictionPolicy(MCHEvictionPolicy):
    """Least frequently used: the score is how often the id was seen while holding its row."""

    metadata = ("counts",)

    def scores(self, counts, last_access, iteration):
        return counts.double()


class LRU_EvictionPolicy(MCHEvictionPolicy):
    """Least recently used: ``-(iteration - last seen + 1) ** decay_exponent``."""

    metadata = ("last_access_iter",)

    def __init__(self, decay_exponent: float = 1.0, threshold_filtering_func: Optional[Callable] = None):
        super().__init__(threshold_filtering_func)
        self._decay_exponent = float(decay_exponent)

    def scores(self, counts, last_access, iteration):
        return -_distance(last_access, iteration, self._decay_exponent)


class DistanceLFU_EvictionPolicy(MCHEvictionPolicy):
    """Counts over distance: ``count / (iteration - last seen + 1) ** decay_exponent``."""

    metadata = ("counts", "last_access_iter")

    def __init__(self, decay_exponent: float = 1.0, threshold_filtering_func: Optional[Callable] = None):
        super().__init__(threshold_filtering_func)
        self._decay_exponent = float(decay_exponent)

    def scores(self, counts, last_access, iteration):
        return counts.double() / _distance(last_access, iteration, self._decay_exponent)


# ------------------------------------------------------------------ one table's map
class ManagedCollisionModule(nn.Module):
    """A table's map from raw ids to rows (TorchRec's base class): ``forward({name: jt})``
    returns the same bags with remapped ids; `evict()` the rows handed to new ids since the
    last call (or None); `output_size()` the table's rows."""


class MCHManagedCollisionModule(ManagedCollisionModule):
    """TorchRec's MCH module (module doc). ``input_hash_size``: raw ids lie in ``[0,
    input_hash_size)`` (another id raises ValueError naming it); ``input_hash_func(ids,
    input_hash_size)``, where given, maps the raw ids first. ``name`` names the table in errors.

    State (buffers, TorchRec's names, in the state_dict): ``_mch_sorted_raw_ids`` (the ids
    holding rows, ascending; empty rows hold int64's max), ``_mch_remapped_ids_mapping`` (each
    one's row), the policy's ``_mch_counts`` / ``_mch_last_access_iter``, and
    ``_current_iter_tensor`` (calls profiled; evictions come every ``eviction_interval``-th, so a
    loaded map keeps the schedule). The ids seen since the last eviction are not (fewer than
    ``eviction_interval`` calls' worth: none under the default interval of 1); saving them
    warns, as the map then resumes without them."""

    def __init__(self, zch_size: int, device=None, eviction_policy: Optional[MCHEvictionPolicy] = None,
                 eviction_interval: int = 1, input_hash_size: int = (2 ** 63) - 1,
                 input_hash_func: Optional[Callable[[Tensor, int], Tensor]] = None, name: Optional[str] = None):
        super().__init__()
        owner = f"MCHManagedCollisionModule{f' {name!r}' if name else ''}"
        for what, value, least in (("zch_size", zch_size, 1), ("eviction_interval", eviction_interval, 1),
                                   ("input_hash_size", input_hash_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{owner}: {what} must be an int >= {least}, got {value!r}")
        if input_hash_size > _EMPTY:
            raise ValueError(f"{owner}: input_hash_size must be at most 2**63 - 1, got {input_hash_size}")
        policy = DistanceLFU_EvictionPolicy() if eviction_policy is None else eviction_policy
        if not isinstance(policy, MCHEvictionPolicy):
            raise TypeError(f"{owner}: eviction_policy must be an MCHEvictionPolicy, got {type(policy).__name__}")
        self._zch_size, self._eviction_interval, self._eviction_policy = zch_size, eviction_interval, policy
        self._input_hash_size, self._input_hash_func, self._name = input_hash_size, input_hash_func, name
        long = dict(dtype=torch.int64, device=device)
        self.register_buffer("_mch_sorted_raw_ids", torch.full((zch_size,), _EMPTY, **long))
        self.register_buffer("_mch_remapped_ids_mapping", torch.arange(zch_size, **long))
        for meta in policy.metadata:
            self.register_buffer(f"_mch_{meta}", torch.zeros(zch_size, **long))
        self.register_buffer("_current_iter_tensor", torch.zeros(1, **long))
        self._history: list[tuple[Tensor, int]] = []  # (ids, iteration) since the last eviction
        self._evicted: Optional[Tensor] = None
        self._register_load_state_dict_pre_hook(self._forget_history)

    def _forget_history(self, *args, **kwargs) -> None:
        # ids profiled before belong to another state
        self._history, self._evicted = [], None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._history:
            warnings.warn(f"{self._owner()}: saved {len(self._history)} call(s) into an eviction interval of "
                          f"{self._eviction_interval}; the ids seen since the last eviction are not saved, so a map "
                          f"loaded from this state evicts without them (save every eviction_interval calls to resume "
                          f"exactly)", stacklevel=2)

    # TorchRec's accessors
    def output_size(self) -> int:
        return self._zch_size

    def input_size(self) -> int:
        return self._input_hash_size

    def buckets(self) -> int:
        return 1

    def open_slots(self) -> Tensor:
        """Rows no id holds yet (the miss row aside)."""
        return (self._mch_sorted_raw_ids[:-1] == _EMPTY).sum()

    def current_iter(self) -> int:
        return int(self._current_iter_tensor[0])

    def _owner(self, feature: str = "") -> str:
        table = f"table {self._name!r}" if self._name else "managed collision module"
        return f"{table}{f', feature {feature!r}' if feature else ''}"

    def preprocess(self, features: Mapping[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        if self._input_hash_func is None:
            return dict(features)
        return {name: JaggedTensor(self._input_hash_func(jt.values(), self._input_hash_size), lengths=jt.lengths(),
                                   weights=jt.weights_or_none(), validate=False)
                for name, jt in features.items()}

    def first_bad_id(self, ids: Tensor, feature: str = "") -> Optional[tuple[str, int, str]]:
        """``(feature, id, message)`` for the first id outside ``[0, input_hash_size)``, else
        None (one host sync; none under fxrec.sparse.validation(False))."""
        if not ids.numel() or not validation_enabled():
            return None
        wide = ids.long()  # an int32 tensor compared with input_hash_size (2**63 - 1) overflowed it
        bad = (wide < 0) | (wide >= self._input_hash_size)
        if not bool(bad.any()):
            return None
        value = int(wide[bad][0])
        return feature, value, self.bad_id_message(feature, value)

    def bad_id_message(self, feature: str, value: int) -> str:
        return f"{self._owner(feature)}: id {value} is outside [0, {self._input_hash_size}) (input_hash_size)"

    def advance(self) -> Optional[int]:
        """Count one profiled call: the new iteration, or None where nothing is profiled (eval
        mode, capture's example run)."""
        if not self.training or _QUIET.get():
            return None
        iteration = self.current_iter() + 1
        self._current_iter_tensor.fill_(iteration)
        return iteration

    def record(self, ids: Sequence[Tensor], iteration: int) -> None:
        """Keep one call's ids for the next eviction."""
        device = self._mch_sorted_raw_ids.device
        self._history.append((torch.cat([i.reshape(-1).to(device=device, dtype=torch.int64) for i in ids])
                              if ids else torch.empty(0, dtype=torch.int64, device=device), iteration))

    def evicts_at(self, iteration: int) -> bool:
        """Every eviction_interval-th call since the map was new, counted by the saved iteration:
        a map loaded from a checkpoint evicts when the uninterrupted one would."""
        return iteration % self._eviction_interval == 0

    @torch.no_grad()
    def profile_ids(self, ids: Sequence[Tensor]) -> None:
        """Count one call's ids (training mode, outside capture), evicting every
        ``eviction_interval`` calls."""
        iteration = self.advance()
        if iteration is None:
            return
        self.record(ids, iteration)
        if self.evicts_at(iteration):
            self.apply_delta(self.delta(iteration))

    def profile(self, features: Mapping[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        """TorchRec's profile: count the features' ids; returns them as they are."""
        self.profile_ids([jt.values() for jt in features.values()])
        return dict(features)

    @torch.no_grad()
    def delta(self, iteration: int) -> dict[str, Tensor]:
        """What the eviction at `iteration` changes (module doc), the map left as it is: ``hit``
        (positions of held ids seen since the last eviction) with their new metadata
        (``hit_<name>``), ``freed`` (positions whose id loses its row) paired with ``new`` (the
        ids that take them) and theirs (``new_<name>``). `apply_delta` makes the change; a
        sharded program computes it on one rank and applies it on every rank."""
        seen = torch.cat([ids for ids, _ in self._history])
        when = torch.cat([torch.full_like(ids, it) for ids, it in self._history])
        self._history = []
        ids, inverse, counts = torch.unique(seen, return_inverse=True, return_counts=True)
        last = torch.zeros_like(ids).scatter_reduce_(0, inverse, when, reduce="amax", include_self=False)
        held = self._mch_sorted_raw_ids
        pos = torch.searchsorted(held[:-1], ids)
        hit = held[pos] == ids
        names = self._eviction_policy.metadata
        meta = {m: getattr(self, f"_mch_{m}") for m in names}
        out = {"hit": pos[hit]}
        if "counts" in meta:
            out["hit_counts"] = meta["counts"][pos[hit]] + counts[hit]
        if "last_access_iter" in meta:
            out["hit_last_access_iter"] = last[hit]
        seen_meta = {"counts": counts, "last_access_iter": last}
        new, new_counts = ids[~hit], counts[~hit]
        new_meta = {m: seen_meta[m][~hit] for m in names}
        empty = torch.empty(0, dtype=torch.int64, device=held.device)
        out.update(freed=empty, new=empty, **{f"new_{m}": empty for m in names})
        if self._eviction_policy._threshold_filtering_func is not None:
            keep, _ = self._eviction_policy._threshold_filtering_func(new_counts)
            new, new_counts, new_meta = new[keep], new_counts[keep], {m: v[keep] for m, v in new_meta.items()}
        if not new.numel():
            return out
        # new ids in order of their counts (ties: the smaller id first)
        order = torch.argsort(new_counts, descending=True, stable=True)
        new, new_meta = new[order], {m: v[order] for m, v in new_meta.items()}
        n = self._zch_size
        after = {m: v.clone() for m, v in meta.items()}  # the held ids' metadata with this interval's hits
        for m in names:
            after[m][out["hit"]] = out[f"hit_{m}"]
        zeros = torch.zeros(n, dtype=torch.int64, device=held.device)
        old = self._eviction_policy.scores(after.get("counts", zeros), after.get("last_access_iter", zeros), iteration)
        old[-1] = math.inf  # the miss row is never handed to an id
        mine = torch.zeros(new.numel(), dtype=torch.int64, device=held.device)
        score = torch.cat([old, self._eviction_policy.scores(new_meta.get("counts", mine),
                                                             new_meta.get("last_access_iter", mine), iteration)])
        ranked = torch.argsort(score, descending=True, stable=True)
        taken = ranked[:n][ranked[:n] >= n] - n   # new ids that win a row
        out["freed"] = ranked[n:][ranked[n:] < n]  # rows whose id loses it, paired with `taken`
        out["new"] = new[taken]
        for m in names:
            out[f"new_{m}"] = new_meta[m][taken]
        return out

    @torch.no_grad()
    def apply_delta(self, delta: Mapping[str, Tensor]) -> None:
        """Make the change `delta` computed (`delta`); the evicted rows go to `evict()`."""
        held = self._mch_sorted_raw_ids
        meta = {m: getattr(self, f"_mch_{m}") for m in self._eviction_policy.metadata}
        for m, buf in meta.items():
            buf[delta["hit"]] = delta[f"hit_{m}"]
        freed = delta["freed"]
        if not freed.numel():
            return
        held[freed] = delta["new"]
        for m, buf in meta.items():
            buf[freed] = delta[f"new_{m}"]
        rows = self._mch_remapped_ids_mapping[freed]
        self._evicted = rows if self._evicted is None else torch.cat([self._evicted, rows])
        resort = torch.argsort(held, stable=True)  # empty rows (int64 max) stay last, the miss row at the end
        for buf in (held, self._mch_remapped_ids_mapping, *meta.values()):
            buf.copy_(buf[resort])

    def remap_ids(self, ids: Tensor) -> Tensor:
        """Each id's row; the miss row for an id holding none."""
        held = self._mch_sorted_raw_ids
        pos = torch.searchsorted(held[:-1], ids.to(torch.int64))
        hit = held[pos] == ids
        mapping = self._mch_remapped_ids_mapping
        return torch.where(hit, mapping[pos], mapping[-1]).to(ids.dtype)

    def remap(self, features: Mapping[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        return {name: JaggedTensor(self.remap_ids(jt.values()), lengths=jt.lengths(), weights=jt.weights_or_none(),
                                   validate=False)
                for name, jt in features.items()}

    def forward(self, features: Mapping[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        features = self.preprocess(features)
        for name, jt in features.items():
            fault = self.first_bad_id(jt.values(), name)
            if fault is not None:
                raise ValueError(fault[2])
        return self.remap(self.profile(features))

    @torch.no_grad()
    def evict(self) -> Optional[Tensor]:
        """The rows handed to new ids since the last call, ascending, or None."""
        rows, self._evicted = self._evicted, None
        return None if rows is None else torch.unique(rows)


# ------------------------------------------------------------------ the collection
class ManagedCollisionCollection(nn.Module):
    """A map per table (``managed_collision_modules``: table name -> module) for the features of
    ``embedding_configs``; forward(kjt) returns the KJT with those features' ids remapped (its
    other keys as they are). Each module's ``output_size()`` must be its table's rows.

    A leaf under fxrec's tracer, run outside torch.compile's graphs (module doc). forward is
    `prepare` (split, hash, check), `profile_tables`, the reset of the evicted rows of the
    collection it `guard`s, and `assemble` (remap): the sharded program
    (`fxrec.runtime.managed_collision`) runs the first and the last itself, profiling each table
    on one rank and resetting the rows in its shards."""

    fxrec_leaf = True              # one node under fxrec's tracer (module doc)
    fxrec_replicated_state = True  # sharded: every rank computes the same map (no buffer broadcast)
    fxrec_main_stage = True        # TrainPipeline: it evicts rows, so it runs in step, on the main thread

    def __init__(self, managed_collision_modules: Mapping[str, ManagedCollisionModule], embedding_configs: Sequence,
                 need_preprocess: bool = True):
        super().__init__()
        owner = "ManagedCollisionCollection"
        modules = dict(managed_collision_modules)
        configs = list(embedding_configs)
        for cfg in configs:
            if cfg.name not in modules:
                raise ValueError(f"{owner}: table {cfg.name!r} has no managed collision module "
                                 f"(modules given for {sorted(modules)})")
            mc = modules[cfg.name]
            if not isinstance(mc, MCHManagedCollisionModule):
                raise TypeError(f"{owner}: the module of table {cfg.name!r} is a {type(mc).__name__}; fxrec takes "
                                f"MCHManagedCollisionModule")
            if mc.output_size() != cfg.num_embeddings:
                raise ValueError(f"{owner}: table {cfg.name!r} has {cfg.num_embeddings} rows but its managed "
                                 f"collision module maps to {mc.output_size()} (zch_size must equal num_embeddings)")
            if mc._name is None:
                mc._name = cfg.name
        extra = sorted(set(modules) - {cfg.name for cfg in configs})
        if extra:
            raise ValueError(f"{owner}: managed collision modules for {extra}, which are not among the tables "
                             f"{[cfg.name for cfg in configs]}")
        self._managed_collision_modules = nn.ModuleDict(modules)
        self._embedding_configs = configs
        self.need_preprocess = need_preprocess

    def embedding_configs(self) -> list:
        return list(self._embedding_configs)

    @torch._dynamo.disable
    def forward(self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True) -> KeyedJaggedTensor:
        pieces, fault = self.prepare(features)
        if fault is not None:
            raise ValueError(fault[2])
        self.profile_tables(self.table_ids(pieces))
        target = self.__dict__.get("_reset_target")
        if target is not None:
            reset_rows(target, self)
        return self.assemble(features, pieces)

    def guard(self, embedding_module: nn.Module) -> None:
        """Reset the rows evictions hand to new ids in `embedding_module`'s tables, in forward
        (the managed-collision collections call it): so does every program that runs this
        collection as it is (eager, torch.compile, fxrec.capture's GraphModule). A sharded
        program resets its shards instead (fxrec.runtime.managed_collision). The reference is
        kept outside the module tree (the tables' state keeps its keys)."""
        self.__dict__["_reset_target"] = embedding_module

    def __deepcopy__(self, memo: dict) -> "ManagedCollisionCollection":
        """A copy that resets the copy of its collection where that is copied with it (a deepcopy of
        the whole model, which copies the collection first), else none (never the original's)."""
        target = self.__dict__.pop("_reset_target", None)
        try:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            if target is not None:
                self.__dict__["_reset_target"] = target
        if target is not None and id(target) in memo:
            new.__dict__["_reset_target"] = memo[id(target)]
        return new

    def prepare(self, features: KeyedJaggedTensor) -> tuple[dict[str, Tensor], Optional[tuple]]:
        """(feature -> its ids, hashed where its table's module hashes; the first id outside its
        module's input range as ``(feature, id, message)``, or None). One host sync for the
        split, one per feature for the check (none under validation(False))."""
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"ManagedCollisionCollection: expects an fxrec KeyedJaggedTensor, "
                            f"got {type(features).__name__}")
        keys = features.keys()
        pieces = dict(zip(keys, torch.split(features.values(), features.length_per_key()))) if keys else {}
        fault = None
        for cfg in self._embedding_configs:
            mc = self._managed_collision_modules[cfg.name]
            for f in cfg.feature_names:
                if f not in pieces:
                    continue
                if self.need_preprocess and mc._input_hash_func is not None:
                    pieces[f] = mc._input_hash_func(pieces[f], mc._input_hash_size)
                if fault is None:
                    fault = mc.first_bad_id(pieces[f], f)
        return pieces, fault

    def table_ids(self, pieces: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Table -> its features' ids (of `prepare`) in one tensor."""
        out = {}
        for cfg in self._embedding_configs:
            mc = self._managed_collision_modules[cfg.name]
            ids = [pieces[f] for f in cfg.feature_names if f in pieces]
            out[cfg.name] = torch.cat(ids) if ids else mc._mch_sorted_raw_ids[:0]
        return out

    def profile_tables(self, ids: Mapping[str, Tensor]) -> None:
        """Each table's module profiles its ids (training mode; the sharded program passes the
        global batch's)."""
        for name, mc in self._managed_collision_modules.items():
            mc.profile_ids([ids[name]])

    def assemble(self, features: KeyedJaggedTensor, pieces: Mapping[str, Tensor]) -> KeyedJaggedTensor:
        """`features` with each managed feature's ids (of `prepare`) remapped."""
        keys = features.keys()
        if not keys:
            return features
        remapped = dict(pieces)
        for cfg in self._embedding_configs:
            mc = self._managed_collision_modules[cfg.name]
            for f in cfg.feature_names:
                if f in remapped:
                    remapped[f] = mc.remap_ids(remapped[f])
        return KeyedJaggedTensor(keys, torch.cat([remapped[k] for k in keys]), weights=features.weights_or_none(),
                                 lengths=features.lengths(), offsets=features.offsets(), stride=features.stride(),
                                 stride_per_key_per_rank=features.stride_per_key_per_rank()
                                 if features.variable_stride_per_key() else None,
                                 inverse_indices=features.inverse_indices_or_none(), validate=False)

    def evict(self) -> dict[str, Optional[Tensor]]:
        """Table -> the rows handed to new ids since the last call (or None)."""
        return {name: mc.evict() for name, mc in self._managed_collision_modules.items()}

    def open_slots(self) -> dict[str, Tensor]:
        return {name: mc.open_slots() for name, mc in self._managed_collision_modules.items()}


# ------------------------------------------------------------------ evicted rows
def _seed(table: str, iteration: int) -> int:
    key = f"fxrec.managed_collision\x1f{table}\x1f{int(iteration)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2 ** 63 - 1)


def fresh_rows(cfg, count: int, iteration: int) -> Tensor:
    """``count x dim`` float32 CPU rows for the rows of table `cfg` evicted at `iteration`: its
    ``weight_init`` (run on these rows, under a forked RNG), else fxrec's uniform default, drawn
    from a generator seeded by (table name, iteration): equal in every process."""
    seed = _seed(cfg.name, iteration)
    out = torch.empty(count, cfg.embedding_dim)
    if cfg.weight_init is None:
        bound = math.sqrt(1.0 / cfg.num_embeddings)
        return out.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        cfg.weight_init(out)
    return out


@torch.no_grad()
def reset_rows(embedding_module: nn.Module, mcc: ManagedCollisionCollection) -> None:
    """Fresh values (`fresh_rows`) for the rows `mcc`'s evictions handed to new ids, in the
    tables of `embedding_module` (an fxrec collection), before the batch looks them up; where
    torch.compile trains a table by a fused sparse optimizer, those rows' state is zeroed too."""
    weights = _tables_of(embedding_module)
    configs = {c.name: c for c in mcc.embedding_configs()}
    modules = mcc._managed_collision_modules
    compiled = sys.modules.get("fxrec.lowering.backend")  # loaded where torch.compile(backend="fxrec") ran
    for table, rows in mcc.evict().items():
        if rows is None or not rows.numel() or table not in weights:
            continue
        w = weights[table]
        new = fresh_rows(configs[table], rows.numel(), modules[table].current_iter())
        w.data[rows.to(w.device)] = new.to(device=w.device, dtype=w.dtype)
        for state in (compiled.table_optimizer_state(w) if compiled is not None else {}).values():
            state[rows.to(state.device)] = 0


def _tables_of(module: nn.Module) -> dict:
    """Table name -> the weight of an fxrec collection."""
    if isinstance(module, EmbeddingBagCollection):
        return {name: bag.weight for name, bag in module.embedding_bags.items()}
    return {name: emb.weight for name, emb in module.embeddings.items()}


def _config_difference(ours: list, theirs: list) -> str:
    """The first difference between two lists of table configs, in words."""
    names, other = [c.name for c in ours], [c.name for c in theirs]
    if names != other:
        return f"tables {names} here, {other} in the managed collision collection"
    for a, b in zip(ours, theirs):
        for f in dataclasses.fields(a):
            if getattr(a, f.name) != getattr(b, f.name, None):
                return (f"table {a.name!r}: {f.name} {getattr(a, f.name)!r} here, {getattr(b, f.name, None)!r} in "
                        f"the managed collision collection")
    return f"table configs {ours} here, {theirs} in the managed collision collection"


class _ManagedCollisionBase(nn.Module):
    def __init__(self, embedding_module, managed_collision_collection: ManagedCollisionCollection,
                 return_remapped_features: bool, owner: str, kind: type, configs: Callable):
        super().__init__()
        if not isinstance(embedding_module, kind):
            raise TypeError(f"{owner}: expects an fxrec {kind.__name__}, got {type(embedding_module).__name__}")
        if not isinstance(managed_collision_collection, ManagedCollisionCollection):
            raise TypeError(f"{owner}: expects a ManagedCollisionCollection, got "
                            f"{type(managed_collision_collection).__name__}")
        ours, theirs = configs(embedding_module), managed_collision_collection.embedding_configs()
        if ours != theirs:  # every field: the evicted rows restart from the map's configs' init
            raise ValueError(f"{owner}: {_config_difference(ours, theirs)}; the collection and its managed "
                             f"collision collection must be built from the same configs")
        # the collection first: a deepcopy then copies it before the map that resets its rows
        self._embedding_module = embedding_module
        self._managed_collision_collection = managed_collision_collection
        self._return_remapped_features = bool(return_remapped_features)
        managed_collision_collection.guard(embedding_module)

    def forward(self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True):
        remapped = self._managed_collision_collection(features)
        out = self._embedding_module(remapped)
        return out, (remapped if self._return_remapped_features else None)


class ManagedCollisionEmbeddingBagCollection(_ManagedCollisionBase):
    """TorchRec's module of the same name: remap, reset evicted rows, pool (module doc).
    forward returns ``(KeyedTensor, remapped KJT if return_remapped_features else None)``."""

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection,
                 managed_collision_collection: ManagedCollisionCollection, return_remapped_features: bool = False):
        super().__init__(embedding_bag_collection, managed_collision_collection, return_remapped_features,
                         "ManagedCollisionEmbeddingBagCollection", EmbeddingBagCollection,
                         lambda m: m.embedding_bag_configs())

    @property
    def _embedding_bag_collection(self) -> EmbeddingBagCollection:
        return self._embedding_module


class ManagedCollisionEmbeddingCollection(_ManagedCollisionBase):
    """TorchRec's module of the same name: remap, reset evicted rows, look up each id.
    forward returns ``({feature: JaggedTensor}, remapped KJT if return_remapped_features else None)``."""

    def __init__(self, embedding_collection: EmbeddingCollection,
                 managed_collision_collection: ManagedCollisionCollection, return_remapped_features: bool = False):
        super().__init__(embedding_collection, managed_collision_collection, return_remapped_features,
                         "ManagedCollisionEmbeddingCollection", EmbeddingCollection, lambda m: m.embedding_configs())

    @property
    def _embedding_collection(self) -> EmbeddingCollection:
        return self._embedding_module
