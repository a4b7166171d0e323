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
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fxrec.modules import EmbeddingBagCollection
from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from fxrec.sparse_checks import validation_enabled

__all__ = ["FeatureProcessedEmbeddingBagCollection", "FeatureProcessor", "FeatureProcessorsCollection",
           "PositionWeightedModule", "PositionWeightedModuleCollection", "position_weighted"]


def _max_length(owner: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: max feature length of {key!r} must be a positive int, got {value!r}")
    return value


_ANY_LENGTH = 2 ** 62


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
        self.position_weight = nn.Parameter(torch.ones(max_feature_length, device=device))

    def forward(self, features: JaggedTensor) -> JaggedTensor:
        values = features.values()
        offsets = features.offsets()
        pos = torch.ops.fxrec.checked_positions(_positions(offsets, features.lengths(), values.numel()),
                                                torch.zeros_like(values, dtype=torch.long), offsets,
                                                [self.max_feature_length], "this feature", max(1, offsets.numel() - 1))
        return JaggedTensor(values, weights=self.position_weight[pos], lengths=features.lengths(),
                            validate=False)


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
            {k: nn.Parameter(torch.ones(n, device=device)) for k, n in self.max_feature_lengths.items()})

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = tuple(self.max_feature_lengths)
        return _call(position_weighted, features, keys, *[self.position_weights[k] for k in keys])


def _call(fn, features, *args):
    """`fn(features, *args)`, or under torch.fx its call recorded as one node (module doc)."""
    if isinstance(features, torch.fx.Proxy):
        return features.tracer.create_proxy("call_function", fn, (features, *args), {})
    return fn(features, *args)


def position_weighted(features: KeyedJaggedTensor, keys: Sequence[str], *weights: Tensor) -> KeyedJaggedTensor:
    """`features` with per-sample weights ``weights[j][position]`` for the values of ``keys[j]``
    and 1 for every other key's. Keys of `keys` the KJT lacks are skipped."""
    kjt_keys = features.keys()
    values, lengths, offsets = features.values(), features.lengths(), features.offsets()
    n, stride = values.numel(), features.stride()
    given = dict(zip(keys, weights))
    present = [k for k in kjt_keys if k in given]
    dtype = given[present[0]].dtype if present else torch.float32
    device = values.device
    # One flat table: each present key's weights, then a single 1 for the keys without any.
    table = torch.cat([given[k] for k in present] + [torch.ones(1, dtype=dtype, device=device)])
    base, limit, start = [], [], 0
    for k in kjt_keys:
        size = given[k].numel() if k in given else 0
        base.append(start if size else table.numel() - 1)
        limit.append(size)
        start += size
    per_bag = torch.arange(len(kjt_keys), device=device).repeat_interleave(stride)
    key_of = torch.repeat_interleave(per_bag, lengths.long(), output_size=n)
    # a key without weights takes bags of any length
    limits = [size or _ANY_LENGTH for size in limit]
    pos = torch.ops.fxrec.checked_positions(_positions(offsets, lengths, n), key_of, offsets.long(), limits,
                                            "\n".join(kjt_keys), max(1, stride))
    weighted = torch.tensor(limit, device=device)[key_of] > 0
    index = torch.tensor(base, device=device)[key_of] + torch.where(weighted, pos, 0)
    # Unchecked (validation off), a position past its key's weights would read the next key's
    # weight: point it past the table instead, so that the gather fails rather than answers.
    index = torch.where(pos < torch.tensor(limits, device=device)[key_of], index, table.numel())
    return KeyedJaggedTensor(kjt_keys, values, weights=table[index], lengths=lengths, offsets=features.offsets(),
                             stride=stride, validate=False)


@torch.library.custom_op("fxrec::checked_positions", mutates_args=())
def checked_positions(pos: Tensor, key_of: Tensor, offsets: Tensor, limits: list[int], keys: str,
                      stride: int) -> Tensor:
    """`pos` (a copy: an op may not return its input), or ValueError naming the key, bag and
    length of the first bag longer than its key's limit (`keys` joined by newlines). An opaque op so that torch.compile runs the check as it is, on
    the real batch; one host sync, none under validation(False)."""
    if pos.numel() and validation_enabled():
        over = ((pos >= torch.tensor(limits, device=pos.device)[key_of])).nonzero()
        if over.numel():
            i = int(over[0, 0])
            bag = int(torch.searchsorted(offsets, torch.tensor(i, dtype=offsets.dtype, device=offsets.device),
                                         right=True)) - 1
            key = int(key_of[i])
            raise ValueError(f"position weights of feature {keys.split(chr(10))[key]!r}: bag {bag % stride} holds "
                             f"{int(offsets[bag + 1] - offsets[bag])} ids, more than its max feature length "
                             f"{limits[key]}")
    return pos.clone()


@checked_positions.register_fake
def _(pos, key_of, offsets, limits, keys, stride):
    return torch.empty_like(pos)


class _ProcessorDict(FeatureProcessorsCollection):
    """A dict of per-feature `PositionWeightedModule`s as one collection (a KJT's other keys
    get weight 1)."""

    def __init__(self, processors: Mapping[str, nn.Module]):
        super().__init__()
        self.processors = nn.ModuleDict(dict(processors))

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = tuple(self.processors)
        return _call(position_weighted, features, keys, *[self.processors[k].position_weight for k in keys])


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
            processors = _ProcessorDict(feature_processors)
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
