"""Unsharded reference embedding modules, TorchRec-compatible.

`EmbeddingBagCollection` pools each feature's bags with its table and returns a
`KeyedTensor` keyed by feature name (``feature@table`` for a feature that several tables
read, as in TorchRec); `EmbeddingCollection` returns each feature's
looked-up rows as a `JaggedTensor`. State-dict keys are ``embedding_bags.<table>.weight``
and ``embeddings.<table>.weight``, as in TorchRec, so checkpoints move between the two.

These modules are what users write and what fxrec's capture recognises; they are also
the numerical reference the sharded and fused paths are tested against.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor, should_validate
from fxrec.sparse_checks import _names, out_of_range_id
from fxrec.types import whole

WeightInit = Callable[[Tensor], None]
BAG_POOLINGS = ("sum", "mean")


# TorchRec's configs open with (num_embeddings, embedding_dim, name, data_type, feature_names,
# weight_init_max, weight_init_min); fxrec's with (name, num_embeddings, embedding_dim, ...).
_TORCHREC_ORDER = ("num_embeddings", "embedding_dim", "name", "data_type", "feature_names",
                   "weight_init_max", "weight_init_min")


def _takes_torchrec_order(cls):
    """Let a config also be called in TorchRec's positional order. A call whose first argument
    is an integer (fxrec's first field is the table's name, a string) is TorchRec's:
    ``EmbeddingBagConfig(1000, 64, "t_user", feature_names=["user"])`` reads as TorchRec's
    does, where fxrec's order would take 1000 for the name."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if args and not isinstance(args[0], str) and whole(args[0]) is not None:
            if len(args) > len(_TORCHREC_ORDER):
                raise TypeError(f"{cls.__name__}: in TorchRec's order (num_embeddings first) only "
                                f"{', '.join(_TORCHREC_ORDER)} are taken by position; pass the rest by keyword")
            for field_name, value in zip(_TORCHREC_ORDER, args):
                if field_name in kwargs:
                    raise TypeError(f"{cls.__name__}: {field_name!r} given by position (TorchRec's order, "
                                    f"num_embeddings first) and by keyword")
                kwargs[field_name] = value
            args = ()
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_takes_torchrec_order
@dataclass
class EmbeddingConfig:
    """One table read without pooling. ``weight_init(weight)`` runs under no_grad;
    None means uniform(-sqrt(1/num_embeddings), +sqrt(1/num_embeddings)).

    TorchRec's spellings are taken too (`_torchrec_fields`), and its positional order, which
    opens with num_embeddings (`_takes_torchrec_order`): ``data_type`` (its
    DataType FP32 / FP16 / BF16, or that name as a string) for ``dtype``; ``init_fn`` for
    ``weight_init``; ``weight_init_min`` / ``weight_init_max``, the bounds of the uniform
    default. They are folded into ``dtype`` / ``weight_init`` and read None after."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str] = field(default_factory=list)
    weight_init: Optional[WeightInit] = None
    dtype: torch.dtype = torch.float32
    data_type: Any = None
    init_fn: Optional[WeightInit] = None
    weight_init_min: Optional[float] = None
    weight_init_max: Optional[float] = None

    def __post_init__(self):
        _torchrec_fields(self)
        _check_config(self)


@_takes_torchrec_order
@dataclass
class EmbeddingBagConfig:
    """One pooled table: every feature in ``feature_names`` is pooled with it, giving
    one output per feature. ``pooling`` is "sum" or "mean" (or TorchRec's PoolingType).
    TorchRec's ``data_type``, ``init_fn``, ``weight_init_min`` / ``weight_init_max`` as in
    `EmbeddingConfig`."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: list[str] = field(default_factory=list)
    pooling: str = "sum"
    weight_init: Optional[WeightInit] = None
    dtype: torch.dtype = torch.float32
    data_type: Any = None
    init_fn: Optional[WeightInit] = None
    weight_init_min: Optional[float] = None
    weight_init_max: Optional[float] = None

    def __post_init__(self):
        _torchrec_fields(self)
        self.pooling = str(getattr(self.pooling, "name", self.pooling)).lower()  # PoolingType.SUM too
        if self.pooling not in BAG_POOLINGS:
            raise ValueError(f"table {self.name!r}: pooling must be one of {BAG_POOLINGS}, "
                             f"got {self.pooling!r}")
        _check_config(self)


_DATA_TYPES = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}


def _torchrec_fields(cfg) -> None:
    """TorchRec's config fields, folded into fxrec's: data_type into dtype, init_fn into
    weight_init, weight_init_min / max into a uniform weight_init. Each clash (both spellings,
    different values) raises, naming the table."""
    if cfg.data_type is not None:
        name = str(getattr(cfg.data_type, "value", cfg.data_type)).upper()
        if name not in _DATA_TYPES:
            raise ValueError(f"table {cfg.name!r}: data_type {cfg.data_type!r} is not a float type fxrec trains "
                             f"({', '.join(_DATA_TYPES)}); quantized types are served by "
                             f"fxrec.lower_for_inference(weight_dtype=...)")
        if cfg.dtype not in (torch.float32, _DATA_TYPES[name]):
            raise ValueError(f"table {cfg.name!r}: data_type {name} and dtype {cfg.dtype} disagree; give one")
        cfg.dtype, cfg.data_type = _DATA_TYPES[name], None
    bounds = (cfg.weight_init_min, cfg.weight_init_max)
    given = [n for n, v in (("weight_init", cfg.weight_init), ("init_fn", cfg.init_fn),
                            ("weight_init_min/max", None if bounds == (None, None) else bounds)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"table {cfg.name!r}: {' and '.join(given)} both set the initial weights; give one")
    if cfg.init_fn is not None:
        cfg.weight_init, cfg.init_fn = cfg.init_fn, None
    elif bounds != (None, None):
        n = whole(cfg.num_embeddings)
        default = math.sqrt(1.0 / n) if n else 1.0
        lo = -default if cfg.weight_init_min is None else float(cfg.weight_init_min)
        hi = default if cfg.weight_init_max is None else float(cfg.weight_init_max)
        if not lo <= hi:
            raise ValueError(f"table {cfg.name!r}: weight_init_min {lo} is above weight_init_max {hi}")
        cfg.weight_init = functools.partial(nn.init.uniform_, a=lo, b=hi)
        cfg.weight_init_min = cfg.weight_init_max = None


# A table's name is its key in the collection's nn.ModuleDict, which refuses a name with a
# dot or one of its own attributes ('to', 'train') with torch's KeyError; the config checks first.
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


def _check_config(cfg) -> None:
    if not isinstance(cfg.name, str) or not cfg.name:
        raise ValueError(f"embedding table name must be a non-empty string, got {cfg.name!r}")
    if "." in cfg.name or cfg.name in _RESERVED_NAMES:
        raise ValueError(f"table {cfg.name!r}: a table name may not contain '.' nor be an attribute of "
                         f"nn.Module ({cfg.name!r} is the collection's own); rename the table")
    for attr in ("num_embeddings", "embedding_dim"):
        value = whole(getattr(cfg, attr))  # a numpy or torch integer too, as TableInfo takes
        if value is None or value <= 0:
            raise ValueError(f"table {cfg.name!r}: {attr} must be a positive int, got {getattr(cfg, attr)!r}")
        setattr(cfg, attr, value)
    # A str or a set is refused (a set's order differs between processes and decides the
    # output columns); ValueError, as for every other bad config field.
    cfg.feature_names = _names(f"table {cfg.name!r}", "feature_names", cfg.feature_names, error=ValueError)
    if not cfg.feature_names:  # as TorchRec's configs: a table without feature names reads its own name
        cfg.feature_names = [cfg.name]
    if any(not isinstance(f, str) or not f for f in cfg.feature_names):
        raise ValueError(f"table {cfg.name!r}: feature names must be non-empty strings, got {cfg.feature_names}")
    if len(set(cfg.feature_names)) != len(cfg.feature_names):
        raise ValueError(f"table {cfg.name!r}: feature_names repeat a name: {cfg.feature_names}")
    if isinstance(cfg.dtype, str):
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"table {cfg.name!r}: unknown dtype {cfg.dtype!r} (e.g. 'float32', 'float16')")
        cfg.dtype = dtype
    if not (isinstance(cfg.dtype, torch.dtype) and cfg.dtype.is_floating_point):
        raise ValueError(f"table {cfg.name!r}: dtype must be a floating torch.dtype, got {cfg.dtype!r}")
    if cfg.weight_init is not None and not callable(cfg.weight_init):
        raise ValueError(f"table {cfg.name!r}: weight_init must be callable(weight) or None")


def embedding_names(tables: Sequence) -> list[list[str]]:
    """Each table's output keys, one per name of its ``feature_names``: the feature's name, or
    ``"feature@table"`` for a feature that several tables read (TorchRec's names for a shared
    feature, so that each table's values keep a key of their own)."""
    readers: dict[str, int] = {}
    for cfg in tables:
        for f in cfg.feature_names:
            readers[f] = readers.get(f, 0) + 1
    return [[f"{f}@{cfg.name}" if readers[f] > 1 else f for f in cfg.feature_names] for cfg in tables]


def _check_tables(owner: str, tables: Sequence, config_type: type) -> None:
    """Each table a `config_type`; table names unique; the output keys (`embedding_names`)
    unique. A feature may feed several tables, as in TorchRec."""
    names = set()
    for cfg in tables:
        # An EmbeddingBagConfig's pooling means nothing to an EmbeddingCollection, and an
        # EmbeddingConfig has none for an EmbeddingBagCollection.
        if not isinstance(cfg, config_type):
            raise TypeError(f"{owner}: tables must be fxrec.{config_type.__name__}s, got {_type_name(cfg)} "
                            f"{getattr(cfg, 'name', cfg)!r}{_other_library(cfg, 'fxrec.' + config_type.__name__)}")
        if cfg.name in names:
            raise ValueError(f"{owner}: two tables are named {cfg.name!r}")
        names.add(cfg.name)
    # Only a feature literally named "f@t" beside a feature "f" shared with table "t" collides.
    seen = {}
    for cfg, keys in zip(tables, embedding_names(tables)):
        for key in keys:
            if key in seen:
                raise ValueError(f"{owner}: tables {seen[key]!r} and {cfg.name!r} both give an output named "
                                 f"{key!r} (a shared feature is keyed 'feature@table'); rename the feature")
            seen[key] = cfg.name


def _init_weight(weight: Tensor, cfg) -> None:
    if weight.is_meta:
        return  # nothing to initialise; call reset_parameters() after to_empty()
    with torch.no_grad():
        if cfg.weight_init is not None:
            cfg.weight_init(weight)
        else:
            bound = math.sqrt(1.0 / cfg.num_embeddings)
            weight.uniform_(-bound, bound)


def _split_under_dynamo(features):
    """Under torch.compile, the KJT split by key before the collection's loop over features:
    ``{key: JaggedTensor}`` (`_split_by_key`); otherwise `features` as it came.

    The split syncs with the host (each key's number of ids), which dynamo cannot trace: it
    breaks the graph here, once, so every lookup of the collection lands in one graph (one
    fused call under the fxrec backend). Left to the loop, the break came at every feature,
    each lookup ran in a frame of its own, and past dynamo's recompile limit some ran
    eagerly, on the float tables of a quantized compile."""
    if torch.compiler.is_dynamo_compiling() and isinstance(features, KeyedJaggedTensor):
        return _split_by_key(features)
    return features


@torch.compiler.disable
def _split_by_key(features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
    """Each key's ids (and weights), with their sizes marked unbacked for dynamo: the graph
    after the break takes a key's number of ids as a size it never specialises. Dynamo
    would otherwise specialise the sizes 0 and 1, so small batches in which features are
    often empty recompiled the graph for each pattern of empty and single-id features, and
    past ``recompile_limit`` ran it eagerly. The ids and weights are copies (a few ids):
    views of one buffer would hand dynamo their storage offsets, which follow the data and
    which it specialises in the same way; the lengths stay views (their offsets follow the
    batch size only). One split for all keys: this runs on every call."""
    from torch._dynamo.decorators import mark_unbacked

    keys = features.keys()
    if not keys:
        return {}
    per_key = features.length_per_key()
    values, weights = features.values().split(per_key), features.weights_or_none()
    weights = weights.split(per_key) if weights is not None else None
    lengths = features.lengths().split(features.stride_per_key()) if features.variable_stride_per_key() else \
        features.lengths().view(len(keys), -1)
    out = {}
    for i, key in enumerate(keys):
        ids = values[i].clone()
        mark_unbacked(ids, 0)
        w = None
        if weights is not None:
            w = weights[i].clone()
            mark_unbacked(w, 0)
        out[key] = JaggedTensor(ids, lengths=lengths[i], weights=w, validate=False)
    return out


def output_dtype(table_dtype: torch.dtype) -> torch.dtype:
    """The dtype a collection returns a table's values in, as TorchRec's collections do: fp16
    and bf16 tables give float32 (their dense layers take float32); float32 and float64 stay."""
    return torch.float32 if table_dtype in (torch.float16, torch.bfloat16) else table_dtype


def as_output(x: Tensor, table_dtype: torch.dtype) -> Tensor:
    """A collection's looked-up values of a table of `table_dtype` (a traced forward's values
    have no dtype to read) in `output_dtype`."""
    return x.float() if output_dtype(table_dtype) != table_dtype else x


def _type_name(obj) -> str:
    """The type's module and name: "torchrec....KeyedJaggedTensor", where the bare name would
    read as the very type asked for."""
    t = type(obj)
    if t.__module__ == "builtins":
        return t.__name__
    return f"fxrec.{t.__qualname__}" if t.__module__.split(".")[0] == "fxrec" else f"{t.__module__}.{t.__qualname__}"


def _other_library(obj, ours: str) -> str:
    """A hint when `obj` is another library's type of the same name (TorchRec's)."""
    if type(obj).__module__.split(".")[0] in ("fxrec", "builtins") or type(obj).__name__ != ours.split(".")[-1]:
        return ""
    return f" (fxrec's modules take {ours}, with the same fields and layout)"


def _check_input(owner: str, features) -> None:
    # A Proxy is a KJT argument under torch.fx.symbolic_trace.
    if not isinstance(features, (KeyedJaggedTensor, torch.fx.Proxy)):
        raise TypeError(f"{owner}.forward takes a fxrec.KeyedJaggedTensor, got {_type_name(features)}"
                        f"{_other_library(features, 'fxrec.KeyedJaggedTensor')}")


def _inverse_rows(owner: str, features):
    """For a KJT with a batch per key (TorchRec's VBE): feature -> its row of inverse_indices,
    which gives each of the batch's samples its bag; None for one batch for every key."""
    if not isinstance(features, KeyedJaggedTensor) or not features.variable_stride_per_key():
        return None
    inverse = features.inverse_indices_or_none()
    if inverse is None:
        raise ValueError(f"{owner}: the KeyedJaggedTensor has a batch per key (stride_per_key_per_rank "
                         f"{features.stride_per_key_per_rank()}) but no inverse_indices to give each sample its bag")

    def row(feature: str) -> Tensor:
        found = features.inverse_row(feature)
        if found is None:
            raise ValueError(f"{owner}: inverse_indices has no row for feature {feature!r} (it has {inverse[0]})")
        return found
    return row


class _ExpandBags(torch.autograd.Function):
    """``sums.index_select(0, inverse)``, whose backward sums the samples' gradients into their
    bags with index_add_ on a contiguous gradient: the gradient arrives as a column block of
    the KeyedTensor's, and index_select's own backward then took a scatter_add over an
    expanded index, 3-4 times slower here."""

    @staticmethod
    def forward(ctx, sums: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.bags = sums.shape[0]
        return sums.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.bags,) + tuple(grad.shape[1:]))
        return out.index_add_(0, inverse, grad.contiguous()), None


def expand_bags(sums: Tensor, inverse: Tensor) -> Tensor:
    """A batch per key (VBE): row b of the result is bag ``inverse[b]``'s sums."""
    if not (torch.is_grad_enabled() and sums.requires_grad):
        return sums.index_select(0, inverse)
    return _ExpandBags.apply(sums, inverse)


def _expanded(pooled: Tensor, inverse, feature: str) -> Tensor:
    return pooled if inverse is None else expand_bags(pooled, inverse(feature))


def _feature(owner: str, kjt, feature: str, table: str) -> JaggedTensor:
    # A Proxy (symbolic trace) has no key list to check; the lookup becomes a graph node.
    if isinstance(kjt, dict):  # `_split_under_dynamo`'s
        if feature not in kjt:
            raise KeyError(f"{owner}: feature {feature!r} (table {table!r}) is missing from the input; "
                           f"it has keys {list(kjt)}")
        jt = kjt[feature]
        if jt.weights_or_none() is not None:  # both unbacked sizes: tell dynamo they are one
            torch._check(jt.weights_or_none().size(0) == jt.values().size(0))
        return jt
    if isinstance(kjt, KeyedJaggedTensor) and feature not in kjt.index_per_key():
        raise KeyError(f"{owner}: feature {feature!r} (table {table!r}) is missing from the input; "
                       f"it has keys {kjt.keys()}")
    return kjt[feature]


def _check_ids(owner: str, ids: Tensor, feature: str, cfg) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{owner}: feature {feature!r} (table {cfg.name!r}) has ids of dtype "
                         f"{ids.dtype}; ids must be integers")
    if ids.dim() != 1:
        raise ValueError(f"{owner}: feature {feature!r} (table {cfg.name!r}) has ids of shape "
                         f"{tuple(ids.shape)}; a KeyedJaggedTensor's values must be 1-D")
    bad = out_of_range_id(ids, cfg.num_embeddings)
    if bad is not None:
        raise ValueError(f"{owner}: feature {feature!r} (table {cfg.name!r}, num_embeddings="
                         f"{cfg.num_embeddings}) has id {bad}, outside [0, {cfg.num_embeddings})")


class EmbeddingBagCollection(nn.Module):
    """Pooled lookups for several tables.

    forward(kjt) returns a KeyedTensor of shape ``batch x sum(dims)`` keyed by feature, in
    table order then each table's ``feature_names`` order; a feature that several tables
    read is keyed ``feature@table`` (`embedding_names`), as in TorchRec. Features of the KJT that no
    table reads are ignored; a missing one raises KeyError. Mean pooling of an empty bag gives
    zeros; with weights, "mean" is ``sum(w_i * row_i) / number_of_ids`` (the bag's length, not
    the weights' sum). fp16 and bf16 tables give float32 values, as TorchRec's collection does
    (`as_output`); float32 and float64 tables their own.

    is_weighted: as TorchRec's (same position): True, the KJT must carry per-sample weights,
    which are applied; False, any weights it carries are ignored. None (the default): the
    weights are applied whenever the KJT carries them.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], is_weighted: Optional[bool] = None, device=None):
        super().__init__()
        _check_tables("EmbeddingBagCollection", tables, EmbeddingBagConfig)
        if is_weighted is not None and not isinstance(is_weighted, bool):
            raise TypeError(f"EmbeddingBagCollection: is_weighted must be True, False or None, got {is_weighted!r}")
        self._is_weighted = is_weighted
        self._configs = list(tables)
        self.embedding_bags = nn.ModuleDict()
        for cfg in self._configs:
            weight = torch.empty(cfg.num_embeddings, cfg.embedding_dim, device=device, dtype=cfg.dtype)
            # _weight skips nn.EmbeddingBag's own normal_() init, which we would overwrite.
            self.embedding_bags[cfg.name] = nn.EmbeddingBag(
                cfg.num_embeddings, cfg.embedding_dim, mode=cfg.pooling, include_last_offset=True,
                _weight=weight, device=device, dtype=cfg.dtype)
        self._embedding_names = [k for keys in embedding_names(self._configs) for k in keys]
        self._dims = [cfg.embedding_dim for cfg in self._configs for _ in cfg.feature_names]
        self.reset_parameters()

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        """True when built with is_weighted=True (as TorchRec's method)."""
        return bool(self._is_weighted)

    def ignores_weights(self) -> bool:
        """Built with is_weighted=False: the KJT's per-sample weights are not applied."""
        return self._is_weighted is False

    def reset_parameters(self) -> None:
        """Re-initialise every table with its weight_init (or the default uniform)."""
        for cfg in self._configs:
            _init_weight(self.embedding_bags[cfg.name].weight, cfg)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        _check_input("EmbeddingBagCollection", features)
        if self._is_weighted and features.weights_or_none() is None:
            raise ValueError("EmbeddingBagCollection: built with is_weighted=True, but the KeyedJaggedTensor "
                             "carries no per-sample weights")
        split = _split_under_dynamo(features)
        pooled, inverse = [], _inverse_rows("EmbeddingBagCollection", features)
        for cfg in self._configs:
            bag = self.embedding_bags[cfg.name]
            for feature in cfg.feature_names:
                jt = _feature("EmbeddingBagCollection", split, feature, cfg.name)
                # a batch per key (VBE): each sample reads its bag's sums. (No local name for the
                # lookup's result: dynamo names the graph's lookup nodes after it.)
                pooled.append(_expanded(as_output(self._pool(bag, cfg, feature, jt), cfg.dtype), inverse, feature))
        if not pooled:
            batch = features.stride()
            values = torch.empty(batch, 0, device=self._device(), dtype=torch.float32)
            return KeyedTensor([], [], values)
        return KeyedTensor(self._embedding_names, self._dims, torch.cat(pooled, dim=1))

    def _pool(self, bag: nn.EmbeddingBag, cfg: EmbeddingBagConfig, feature: str, jt) -> Tensor:
        ids, offsets = jt.values(), jt.offsets()
        weights = None if self._is_weighted is False else jt.weights_or_none()
        if should_validate(ids):
            _check_ids("EmbeddingBagCollection", ids, feature, cfg)
        if isinstance(weights, Tensor) and weights.dtype != cfg.dtype:
            weights = weights.to(cfg.dtype)  # embedding_bag wants weights in the table's dtype
        if cfg.pooling == "sum" or weights is None:
            return bag(ids, offsets, per_sample_weights=weights)
        # nn.EmbeddingBag takes per-sample weights only for mode="sum": weighted mean is the
        # weighted sum over the bag's id count. Under symbolic trace weights is a Proxy that
        # may be None at run time; then this is the plain mean, so the graph is right either way.
        total = F.embedding_bag(ids, bag.weight, offsets, mode="sum", per_sample_weights=weights,
                                include_last_offset=True)
        return total / jt.lengths().clamp(min=1).unsqueeze(1).to(total)

    def _device(self) -> torch.device:
        return next(iter(self.parameters())).device if self._configs else torch.device("cpu")


class EmbeddingCollection(nn.Module):
    """Unpooled lookups: forward(kjt) returns ``{feature: JaggedTensor}`` whose values are
    the rows ``table[ids]`` (``num_ids x dim``) with the input's lengths, in table order
    then each table's ``feature_names`` order (``feature@table`` for a feature that several
    tables read). Per-sample weights are not applied. fp16 and bf16 tables give float32 rows, as
    TorchRec's collection does (`as_output`)."""

    def __init__(self, tables: Sequence[EmbeddingConfig], device=None):
        super().__init__()
        _check_tables("EmbeddingCollection", tables, EmbeddingConfig)
        self._configs = list(tables)
        self.embeddings = nn.ModuleDict()
        for cfg in self._configs:
            weight = torch.empty(cfg.num_embeddings, cfg.embedding_dim, device=device, dtype=cfg.dtype)
            self.embeddings[cfg.name] = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim, _weight=weight,
                                                     device=device, dtype=cfg.dtype)
        self._embedding_names_by_table = embedding_names(self._configs)
        self.reset_parameters()

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return list(self._configs)

    def reset_parameters(self) -> None:
        for cfg in self._configs:
            _init_weight(self.embeddings[cfg.name].weight, cfg)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        _check_input("EmbeddingCollection", features)
        split = _split_under_dynamo(features)
        out = {}
        for cfg, keys in zip(self._configs, self._embedding_names_by_table):
            table = self.embeddings[cfg.name]
            for feature, key in zip(cfg.feature_names, keys):
                jt = _feature("EmbeddingCollection", split, feature, cfg.name)
                ids = jt.values()
                if should_validate(ids):
                    _check_ids("EmbeddingCollection", ids, feature, cfg)
                out[key] = JaggedTensor(as_output(table(ids), cfg.dtype), lengths=jt.lengths(), validate=False)
        return out
