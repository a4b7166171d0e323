"""Feature processors, as TorchRec's: per-sample weights learned for each position in a bag.

- `PositionWeightedModule(max_feature_length)`: a JaggedTensor's bags, weighted by one learned
  weight per position (the first id of every bag takes ``position_weight[0]``, and so on).
- `PositionWeightedModuleCollection(max_feature_lengths)`: the same for the named keys of a
  KeyedJaggedTensor; keys it does not name get weight 1.
- `FeatureProcessedEmbeddingBagCollection(ebc, feature_processors)`: the processors, then a
  weighted `EmbeddingBagCollection`.

The weights start at 1 and are dense parameters of the model: `fxrec.shard` keeps them on
every rank and averages their gradients like any other (the gradient reaches them through the
weighted lookups, wherever a table is sharded). As in TorchRec the processed KJT's weights
replace any it carried.

Why one graph node: under torch.fx the KJT is a Proxy whose keys and per-key sizes are not
known while tracing, so per-key Python (split by key, loop over keys) cannot be recorded.
`PositionWeightedModuleCollection` therefore records a single call of `position_weighted`,
whose arguments are the KJT and the weight parameters (get_attr nodes, so fx keeps them as the
model's parameters); it runs on each rank's real batch. The computation needs no host sync
(every ``repeat_interleave`` is told its output size); only the check that no bag is longer than
its key's weights syncs once, and it is skipped under ``fxrec.sparse.validation(False)``, where
a longer bag fails in torch's indexing instead (IndexError on the CPU, a device assert on a GPU).
In a sharded program the node defers a too-long bag to the lookups' input check, which raises
it on every rank; bags no lookup reads are checked with one exchange (`defer_position_faults`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fxrec.modules import EmbeddingBagCollection
from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from fxrec.sparse_checks import validation_enabled

__all__ = ["FeatureProcessedEmbeddingBagCollection", "FeatureProcessor", "FeatureProcessorsCollection",
           "PositionWeightedModule", "PositionWeightedModuleCollection", "defer_position_faults",
           "position_weighted", "position_weighted_jt"]


def _max_length(owner: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: max feature length of {key!r} must be a positive int, got {value!r}")
    return value


_ANY_LENGTH = 2 ** 62


def _real(device):
    """`device`, or the CPU where it (or the default device) is meta. The weights are a few
    floats per feature: on a model built on meta they stay real, since the sharded program reads
    them as attributes, where no module's reset_parameters() could give them values."""
    return torch.device("cpu") if torch.empty(0, device=device).is_meta else device


def _positions(offsets: Tensor, lengths: Tensor, n: int) -> Tensor:
    """Each value's position in its bag: 0, 1, ... from every bag's start."""
    starts = torch.repeat_interleave(offsets[:-1].long(), lengths.long(), output_size=n)
    return torch.arange(n, device=offsets.device) - starts


class FeatureProcessor(nn.Module):
    """A module that maps one feature's JaggedTensor to the same bags with new weights."""

    def forward(self, features: JaggedTensor) -> JaggedTensor:  # pragma: no cover - abstract
        raise NotImplementedError


class FeatureProcessorsCollection(nn.Module):
    """A module that maps a KeyedJaggedTensor to the same bags with new weights."""

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PositionWeightedModule(FeatureProcessor):
    """One feature's bags weighted by position: ``weights[i] = position_weight[position of id i
    in its bag]``. ``max_feature_length`` (TorchRec's truncation size) is the longest bag it
    takes; a longer one raises ValueError naming its length."""

    def __init__(self, max_feature_length: int, device=None):
        super().__init__()
        self.max_feature_length = _max_length("PositionWeightedModule", "max_feature_length", max_feature_length)
        self.position_weight = nn.Parameter(torch.ones(max_feature_length, device=_real(device)))

    def reset_parameters(self) -> None:
        """Every position weighs 1 (how it starts; a model built on meta is materialised so)."""
        with torch.no_grad():
            self.position_weight.fill_(1.0)

    def forward(self, features: JaggedTensor) -> JaggedTensor:
        return _call(position_weighted_jt, features, self.position_weight)


def position_weighted_jt(features: JaggedTensor, weight: Tensor, collective: bool = False) -> JaggedTensor:
    """One feature's bags with weights ``weight[position]`` (`PositionWeightedModule`). With
    `collective` (a sharded program, `defer_position_faults`) every rank learns of a too-long
    bag on any rank and raises it."""
    values, offsets = features.values(), features.offsets()
    pos = _positions(offsets, features.lengths(), values.numel())
    if collective:
        fits = pos < weight.numel()
        # checked whatever validation() says: the exchange is made anyway, and unchecked, a bag
        # too long failed in indexing on its own rank while the others waited
        _raise_everywhere(_first_too_long(fits, torch.zeros_like(pos), offsets.long()), ("",), [weight.numel()], [0])
        pos = torch.where(fits, pos, weight.numel())  # past the table, as unchecked: never a wrong weight
    else:
        pos = torch.ops.fxrec.checked_positions(pos, pos < weight.numel(), torch.zeros_like(pos), offsets.long(),
                                                [weight.numel()], "", [0])
    return JaggedTensor(values, weights=_gather(weight, pos, values), lengths=features.lengths(), validate=False)


def _gather(table: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``table[index]``; ones where the table is on meta and the batch is not: capture runs the
    model on its example batch with the weights of a model built on meta, and only the shape
    of these weights matters there (the sharded program runs on materialised weights)."""
    if table.is_meta and not values.is_meta:
        return torch.ones(index.shape, dtype=table.dtype, device=values.device)
    return table[index]


class PositionWeightedModuleCollection(FeatureProcessorsCollection):
    """Position weights for the keys of ``max_feature_lengths`` (key -> longest bag); a KJT's
    other keys get weight 1. Parameters ``position_weights[key]``, as TorchRec's."""

    def __init__(self, max_feature_lengths: Mapping[str, int], device=None):
        super().__init__()
        if not isinstance(max_feature_lengths, Mapping) or not max_feature_lengths:
            raise ValueError(f"PositionWeightedModuleCollection: max_feature_lengths must be a non-empty dict of "
                             f"feature -> longest bag, got {max_feature_lengths!r}")
        self.max_feature_lengths = {k: _max_length("PositionWeightedModuleCollection", k, v)
                                    for k, v in max_feature_lengths.items()}
        self.position_weights = nn.ParameterDict(
            {k: nn.Parameter(torch.ones(n, device=_real(device))) for k, n in self.max_feature_lengths.items()})

    def reset_parameters(self) -> None:
        """Every position weighs 1."""
        with torch.no_grad():
            for p in self.position_weights.values():
                p.fill_(1.0)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = tuple(self.max_feature_lengths)
        return _call(position_weighted, features, keys, *[self.position_weights[k] for k in keys])


def _call(fn, features, *args):
    """`fn(features, *args)`, or under torch.fx its call recorded as one node (module doc): the
    features are a Proxy, or a KJT / JaggedTensor built in forward from Proxies."""
    proxy = features if isinstance(features, torch.fx.Proxy) else getattr(features, "_values", None)
    if isinstance(proxy, torch.fx.Proxy):
        return proxy.tracer.create_proxy("call_function", fn, (features, *args), {})
    return fn(features, *args)


def position_weighted(features: KeyedJaggedTensor, keys: Sequence[str], *weights: Tensor,
                      defer: Optional[bool] = None, unread: Sequence[str] = ()) -> KeyedJaggedTensor:
    """`features` with per-sample weights ``weights[j][position]`` for the values of ``keys[j]``
    and 1 for every other key's. Keys of `keys` the KJT lacks are skipped. A bag longer than its
    key's weights raises ValueError; with `defer` (the sharded program, `defer_position_faults`)
    the KJT carries it instead, for the lookup's input check to raise on every rank, except
    for the keys in `unread`, which no lookup reads: every rank learns of those (one
    all_gather) and raises."""
    kjt_keys = features.keys()
    values, lengths, offsets = features.values(), features.lengths(), features.offsets()
    n, stride = values.numel(), features.stride()
    given = dict(zip(keys, weights))
    present = [k for k in kjt_keys if k in given]
    dtype = given[present[0]].dtype if present else torch.float32
    device = values.device
    # One flat table: each present key's weights, then a single 1 for the keys without any.
    table = torch.cat([given[k] for k in present] + [torch.ones(1, dtype=dtype, device=given[present[0]].device
                                                                if present else device)])
    base, limit, start = [], [], 0
    for k in kjt_keys:
        size = given[k].numel() if k in given else 0
        base.append(start)
        limit.append(size)
        start += size
    spk = features.stride_per_key()
    per_bag = torch.repeat_interleave(torch.arange(len(kjt_keys), device=device),
                                      torch.tensor(spk, dtype=torch.long, device=device), output_size=sum(spk))
    key_of = torch.repeat_interleave(per_bag, lengths.long(), output_size=n)
    # a key without weights takes bags of any length
    limits = [size or _ANY_LENGTH for size in limit]
    long = dict(dtype=torch.long, device=device)
    pos = _positions(offsets, lengths, n)
    limit_of = torch.tensor(limits, **long)[key_of]
    fits = pos < limit_of
    if defer is None:
        starts = [0]
        for b in spk[:-1]:
            starts.append(starts[-1] + b)
        pos = torch.ops.fxrec.checked_positions(pos, fits, key_of, offsets.long(), limits, "\n".join(kjt_keys),
                                                starts)
    # the keys without weights read the table's last entry, a 1
    index = torch.where(limit_of < _ANY_LENGTH, torch.tensor(base, **long)[key_of] + pos, table.numel() - 1)
    # Unchecked (validation off), a position past its key's weights would read the next key's
    # weight: point it past the table instead, so that the gather fails rather than answers.
    out_weights = _gather(table, torch.where(fits, index, table.numel() if defer is None else 0), values)
    out = KeyedJaggedTensor(kjt_keys, values, weights=out_weights, lengths=lengths, offsets=features.offsets(),
                            stride=stride, stride_per_key_per_rank=features.stride_per_key_per_rank()
                            if features.variable_stride_per_key() else None,
                            inverse_indices=features.inverse_indices_or_none(), validate=False)
    found = _first_too_long(fits, key_of, offsets.long()) if defer is not None else None
    if unread:
        starts = [0]
        for b in spk[:-1]:
            starts.append(starts[-1] + b)
        _raise_everywhere(found if found is not None and kjt_keys[found[0]] in unread else None, kjt_keys, limits,
                          starts)
    if found is not None:
        # sharded: the first too-long bag travels with the lookups' input check (shard_ops), so
        # that every rank raises it; raised here, the other ranks waited in the exchange
        key, _, length = found
        out._position_fault = (kjt_keys[key], length, limit[key])
    return out


def _first_too_long(fits: Tensor, key_of: Tensor, offsets: Tensor) -> Optional[tuple[int, int, int]]:
    """(key index, bag, the bag's length) of the first id past its key's weights (``fits``
    false), or None. One host sync."""
    over = (~fits).nonzero()
    if not over.numel():
        return None
    i = int(over[0, 0])
    bag = int(torch.searchsorted(offsets, torch.tensor(i, dtype=offsets.dtype, device=offsets.device),
                                 right=True)) - 1
    return int(key_of[i]), bag, int(offsets[bag + 1] - offsets[bag])


def _message(keys: Sequence[str], key: int, bag: int, length: int, limits: Sequence[int], starts) -> str:
    name = keys[key]
    return (f"position weights{f' of feature {name!r}' if name else ''}: bag {bag - starts[key]} holds "
            f"{length} ids, more than its max feature length {limits[key]}")


def _raise_everywhere(found: Optional[tuple[int, int, int]], keys: Sequence[str], limits: Sequence[int],
                      starts) -> None:
    """A sharded program's check of bags no lookup's input check sees: every rank's ``found``
    (`_first_too_long`) in one all_gather, and the first faulty rank's raised on every rank, so
    that none is left waiting in the next collective. Every rank calls it at the same point."""
    from fxrec.runtime import comm

    mine = torch.tensor([-1, 0, 0] if found is None else list(found), dtype=torch.int64)
    w = comm.world_size()
    every = comm.all_gather(mine.to(comm.collective_device())).cpu().view(w, 3) if w > 1 else mine.view(1, 3)
    for rank, (key, bag, length) in enumerate(every.tolist()):
        if key >= 0:
            raise ValueError((f"rank {rank}'s batch: " if w > 1 else "") + _message(keys, key, bag, length, limits,
                                                                                   starts))


@torch.library.custom_op("fxrec::checked_positions", mutates_args=())
def checked_positions(pos: Tensor, fits: Tensor, key_of: Tensor, offsets: Tensor, limits: list[int], keys: str,
                      starts: list[int]) -> Tensor:
    """`pos` (a copy: an op may not return its input), or ValueError naming the key, bag and
    length of the first bag longer than its key's limit (``fits`` false; `keys` joined by
    newlines, `starts` each key's first bag). An opaque op so that torch.compile runs the check
    as it is, on the real batch; one host sync, none under validation(False)."""
    found = _first_too_long(fits, key_of, offsets) if pos.numel() and validation_enabled() else None
    if found is not None:
        raise ValueError(_message(keys.split(chr(10)), *found, limits, starts))
    return pos.clone()


@checked_positions.register_fake
def _(pos, fits, key_of, offsets, limits, keys, starts):
    return torch.empty_like(pos)


# The example run of capture (fxrec/passes/shapes.py) calls them as they are when the weights are
# on meta (`_gather`): moved to meta, the batch's ids, which they pass on, could not be sampled.
position_weighted.takes_meta_weights = True
position_weighted_jt.takes_meta_weights = True


def defer_position_faults(gm: torch.fx.GraphModule) -> int:
    """In a sharded program a too-long bag must raise on every rank (one raising alone left the
    others waiting in a collective). Every `position_weighted` node carries it on its KJT
    (`position_weighted`'s `defer`), for the lookups' input check to raise on every rank, but for
    the weighted keys no lookup reads from that KJT (`unread`), and every `position_weighted_jt`
    node (its JaggedTensor feeds the model's own code), which exchange their faults themselves.
    Returns how many nodes it changed."""
    from fxrec.passes import lookup as L

    read: dict = {}  # node -> the features lookups read from it
    for node in gm.graph.nodes:
        lk = node.meta.get(L.LOOKUP)
        source = lk.ids.of(node) if lk is not None and lk.ids is not None else None
        if isinstance(source, torch.fx.Node):
            read.setdefault(source, set()).update(f for r in lk.reads for f in r.features)
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is position_weighted:
            keys = node.args[1] if len(node.args) > 1 else node.kwargs["keys"]
            unread = tuple(k for k in keys if k not in read.get(node, set()))
            node.kwargs = {**node.kwargs, "defer": True, "unread": unread}
            changed += 1
        elif node.op == "call_function" and node.target is position_weighted_jt:
            node.kwargs = {**node.kwargs, "collective": True}
            changed += 1
    if changed:
        gm.recompile()
    return changed


class _ProcessorDict(nn.ModuleDict):
    """A dict of per-feature `PositionWeightedModule`s as one collection (a KJT's other keys
    get weight 1). A ModuleDict, as TorchRec keeps them: the state_dict keys are its
    (``_feature_processors.<feature>.position_weight``)."""

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = tuple(self.keys())
        return _call(position_weighted, features, keys, *[self[k].position_weight for k in keys])


class FeatureProcessedEmbeddingBagCollection(nn.Module):
    """TorchRec's module of the same name: ``feature_processors`` (a dict feature ->
    `PositionWeightedModule`, or a `PositionWeightedModuleCollection`) turn the KJT's
    positions into per-sample weights, then ``embedding_bag_collection`` (built with
    ``is_weighted=True``) pools with them. Returns its KeyedTensor."""

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection,
                 feature_processors: Union[Mapping[str, PositionWeightedModule], FeatureProcessorsCollection]):
        super().__init__()
        owner = "FeatureProcessedEmbeddingBagCollection"
        if not isinstance(embedding_bag_collection, EmbeddingBagCollection):
            raise TypeError(f"{owner}: embedding_bag_collection must be an fxrec EmbeddingBagCollection, "
                            f"got {type(embedding_bag_collection).__name__}")
        if not embedding_bag_collection.is_weighted():
            raise ValueError(f"{owner}: the EmbeddingBagCollection must be built with is_weighted=True "
                             f"(the processors' weights are what it pools with)")
        features = {f for cfg in embedding_bag_collection.embedding_bag_configs() for f in cfg.feature_names}
        if isinstance(feature_processors, PositionWeightedModuleCollection):
            named = set(feature_processors.max_feature_lengths)
            processors: nn.Module = feature_processors
        elif isinstance(feature_processors, Mapping):
            for k, fp in feature_processors.items():
                if not isinstance(fp, PositionWeightedModule):
                    raise TypeError(f"{owner}: the processor of feature {k!r} is a {type(fp).__name__}; "
                                    f"fxrec takes PositionWeightedModule (or a PositionWeightedModuleCollection)")
            named = set(feature_processors)
            processors = _ProcessorDict(dict(feature_processors))
        else:
            raise TypeError(f"{owner}: feature_processors must be a dict of PositionWeightedModule or a "
                            f"PositionWeightedModuleCollection, got {type(feature_processors).__name__}")
        unknown = sorted(named - features)
        if unknown:
            raise ValueError(f"{owner}: feature processors for {unknown}, which no table reads "
                             f"(tables read {sorted(features)})")
        self._embedding_bag_collection = embedding_bag_collection
        self._feature_processors = processors

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self._embedding_bag_collection(self._feature_processors(features))

    def split(self) -> tuple:
        """(the processors as a collection, the EmbeddingBagCollection), as TorchRec's."""
        return self._feature_processors, self._embedding_bag_collection

    def embedding_bag_configs(self) -> list:
        return self._embedding_bag_collection.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return True
