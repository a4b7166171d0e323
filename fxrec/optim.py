"""Sparse optimizer configurations for embedding tables.

These are plain data: the fused kernels (fxrec.lowering) apply them inside the backward
pass, only to the rows a batch touched, and the planner reads `state_bytes_per_row` to
size each shard. State lives beside the table, sharded with it, always in fp32 (Adam's
per-row step count in int32), whatever the weight dtype. Gradients are summed and the
update computed in fp32 (rounded once to an fp16 / bf16 table's dtype), or in fp64 for an
fp64 table, which the torch kernel serves (it reads the fp32 state widened).

Definitions (g = the row's gradient summed over every occurrence of its id in the batch):

- `SGD(lr)`: ``w -= lr * g``.
- `RowWiseAdagrad(lr, eps, exact_column_wise=True)`: FBGEMM's EXACT_ROWWISE_ADAGRAD: one
  fp32 accumulator per row, ``m += mean(g**2)`` over the row's dim,
  then ``w -= lr / (sqrt(m) + eps) * g``. The accumulator starts at 0. eps defaults to
  1e-8, FBGEMM's default for SplitTableBatchedEmbeddingBagsCodegen (TorchRec passes it
  through). A column_wise table's row is split over shards: with `exact_column_wise` the
  shards exchange their per-row sums of g**2 in backward so the accumulator sees the whole
  row, as unsharded (fxrec/runtime/row_sync.py; it costs a sort of the ids by row, which,
  where rows repeat often, also gives the update its per-row gradients); ``False`` gives
  each shard an accumulator over its own columns, as TorchRec/FBGEMM do.
- `Adagrad(lr, eps=1e-10)`: FBGEMM's EXACT_ADAGRAD, `torch.optim.Adagrad` (lr_decay=0,
  initial_accumulator_value=0) on the touched rows: one fp32 accumulator per element,
  ``s += g**2``, then ``w -= lr * g / (sqrt(s) + eps)``. A row no batch touched has g = 0, for
  which torch's dense Adagrad changes nothing either: without weight decay, training with it
  equals `torch.optim.Adagrad` over the whole table. eps defaults to torch's 1e-10. Its state
  is per element, so a column_wise table's shards need no exchange.
- `Adam(lr, betas, eps)`: "lazy" Adam. Each touched row is updated exactly as
  `torch.optim.Adam` (amsgrad=False) updates a parameter holding only
  that row, with a *per-row* step count: a row's step counts the batches that touched it,
  and bias correction uses that count (1 - beta**step_row). Rows a batch does not touch
  are left alone, moments included (unlike dense Adam, whose moments decay every step,
  and unlike torch.optim.SparseAdam, whose bias correction uses one global step).

Weight decay (``weight_decay=``, 0 by default), on the touched rows only, as FBGEMM and TorchRec
apply it (a dense torch optimizer also decays the rows a batch did not touch):

- "l2" (every optimizer; torch.optim's weight_decay, FBGEMM's WeightDecayMode.L2): the row's
  gradient becomes ``g + weight_decay * w`` before the update above reads it, accumulators
  included;
- "decoupled" (`RowWiseAdagrad(weight_decay_mode="decoupled")`, FBGEMM's DECOUPLE): the
  accumulator reads g, and the row is also shrunk: ``w -= lr * weight_decay * w``.

`PerTable({table: optimizer, ...}, default=...)` gives tables their own optimizer (as
TorchRec's per-table fused parameters do): tables with equal configurations share one fused
kernel, and the planner sizes each table for its own optimizer's state. A table mapped to
None is not trained (no state, no update): `freeze` maps the tables whose weight is frozen
(``requires_grad=False``, ``nn.Embedding.from_pretrained``) or a buffer that way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Iterable, Mapping, Optional, Union

_FP32 = 4
_INT32 = 4


# The fused kernels update in float32: an lr or eps beyond its largest value is inf there, which
# turned the touched rows into inf (lr) or froze every table (eps: the update g / inf is 0).
_FP32_MAX = 3.4028234663852886e38


def _number(kind: str, name: str, value, rule: str) -> float:
    """`value` as a float, else TypeError naming `kind`'s argument `name`. A bool is refused
    (SGD(lr=True) trained with lr 1.0), as is anything float() does not take as one number (a
    string, a tensor of several values), which failed inside the comparison with a bare error."""
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ in ("bool", "bool_") or value is None:
        raise TypeError(f"{kind}: {name} must be a number {rule}, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{kind}: {name} must be a number {rule}, got {value!r} ({type(value).__name__})") from e


def _finite(kind: str, name: str, value: float) -> None:
    if not value <= _FP32_MAX:  # inf; nan is refused before this by the caller's range check
        raise ValueError(f"{kind}: {name} must be finite in float32 (at most {_FP32_MAX:.4g}, where the fused "
                         f"update runs), got {value!r}")


def _check_lr(kind: str, lr) -> float:
    value = _number(kind, "lr", lr, ">= 0")
    if not value >= 0:
        raise ValueError(f"{kind}: lr must be >= 0, got {lr}")
    _finite(kind, "lr", value)
    return value


def _check_eps(kind: str, eps) -> float:
    value = _number(kind, "eps", eps, "> 0")
    if not value > 0:
        raise ValueError(f"{kind}: eps must be > 0, got {eps}")
    _finite(kind, "eps", value)
    return value


def _set(config, name: str, value) -> None:
    object.__setattr__(config, name, value)  # the dataclasses are frozen; this normalises a field


# How the update reads weight_decay (the kernels' WD_MODE): none; "l2" adds weight_decay * w to
# the row's gradient before the optimizer sees it (torch.optim's weight_decay, FBGEMM's L2);
# "decoupled" leaves the gradient and shrinks the row by lr * weight_decay * w (FBGEMM's DECOUPLE).
DECAY_MODES = {"none": 0, "l2": 1, "decoupled": 2}


def _check_decay(config, kind: str, modes: tuple[str, ...] = ("l2",)) -> None:
    """Normalise `config.weight_decay` (a number >= 0) and its mode (one of `modes`)."""
    value = _number(kind, "weight_decay", config.weight_decay, ">= 0")
    if not value >= 0:
        raise ValueError(f"{kind}: weight_decay must be >= 0, got {config.weight_decay}")
    _finite(kind, "weight_decay", value)
    _set(config, "weight_decay", value)
    mode = getattr(config, "weight_decay_mode", "l2")
    name = str(getattr(mode, "name", mode)).lower()  # FBGEMM's WeightDecayMode.L2 / DECOUPLE too
    name = {"decouple": "decoupled"}.get(name, name)
    if name not in modes:
        raise ValueError(f"{kind}: weight_decay_mode must be one of {list(modes)}, got {mode!r}")
    if hasattr(config, "weight_decay_mode"):
        _set(config, "weight_decay_mode", name)


def _repr(config) -> str:
    """The config's fields, without weight decay where it has none: SGD(lr=0.1), as before there was any."""
    skip = () if config.weight_decay else ("weight_decay", "weight_decay_mode")
    return f"{type(config).__name__}(" + ", ".join(
        f"{f.name}={getattr(config, f.name)!r}" for f in fields(config) if f.name not in skip) + ")"


def decay_mode(optimizer) -> int:
    """`DECAY_MODES`' code of `optimizer`'s weight decay: 0 where it has none (or it is 0)."""
    if optimizer is None or not getattr(optimizer, "weight_decay", 0.0):
        return 0
    return DECAY_MODES[getattr(optimizer, "weight_decay_mode", "l2")]


@dataclass(frozen=True, repr=False)
class SGD:
    """Plain SGD on the touched rows; no optimizer state. weight_decay: torch.optim.SGD's (L2)."""

    lr: float
    weight_decay: float = 0.0
    name: ClassVar[str] = "sgd"
    __repr__ = _repr

    def __post_init__(self):
        _set(self, "lr", _check_lr("SGD", self.lr))
        _check_decay(self, "SGD")

    def state_bytes_per_row(self, dim: int) -> int:
        return 0


@dataclass(frozen=True, repr=False)
class RowWiseAdagrad:
    """FBGEMM's EXACT_ROWWISE_ADAGRAD: one fp32 accumulator per row (see module doc), with its
    weight_decay and weight_decay_mode ("l2" or "decoupled"; FBGEMM's WeightDecayMode too)."""

    lr: float
    eps: float = 1e-8
    exact_column_wise: bool = True
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"
    name: ClassVar[str] = "rowwise_adagrad"
    __repr__ = _repr

    def __post_init__(self):
        _set(self, "lr", _check_lr("RowWiseAdagrad", self.lr))
        _set(self, "eps", _check_eps("RowWiseAdagrad", self.eps))
        if not isinstance(self.exact_column_wise, bool):  # "no" is truthy: it trained exactly
            raise TypeError(f"RowWiseAdagrad: exact_column_wise must be True or False, got "
                            f"{self.exact_column_wise!r} ({type(self.exact_column_wise).__name__})")
        _check_decay(self, "RowWiseAdagrad", ("l2", "decoupled"))

    def state_bytes_per_row(self, dim: int) -> int:
        return _FP32


@dataclass(frozen=True, repr=False)
class Adagrad:
    """torch.optim.Adagrad / FBGEMM's EXACT_ADAGRAD: one fp32 accumulator per element (see module
    doc). weight_decay: torch.optim.Adagrad's (L2)."""

    lr: float
    eps: float = 1e-10
    weight_decay: float = 0.0
    name: ClassVar[str] = "adagrad"
    __repr__ = _repr

    def __post_init__(self):
        _set(self, "lr", _check_lr("Adagrad", self.lr))
        _set(self, "eps", _check_eps("Adagrad", self.eps))
        _check_decay(self, "Adagrad")

    def state_bytes_per_row(self, dim: int) -> int:
        return dim * _FP32


@dataclass(frozen=True, repr=False)
class Adam:
    """Lazy Adam with per-row step counts: two fp32 moments per element + an int32 step per row.
    weight_decay: torch.optim.Adam's (L2)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: ClassVar[str] = "adam"
    __repr__ = _repr

    def __post_init__(self):
        _set(self, "lr", _check_lr("Adam", self.lr))
        _set(self, "eps", _check_eps("Adam", self.eps))
        _check_decay(self, "Adam")
        rule = "two values in [0, 1)"
        if isinstance(self.betas, (str, bytes)) or not hasattr(self.betas, "__iter__"):
            raise TypeError(f"Adam: betas must be {rule}, got {self.betas!r} ({type(self.betas).__name__})")
        betas = tuple(_number("Adam", "betas", b, f"(betas: {rule})") for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam: betas must be {rule}, got {self.betas}")
        _set(self, "betas", betas)

    def state_bytes_per_row(self, dim: int) -> int:
        return 2 * dim * _FP32 + _INT32


SparseOptimizer = Union[SGD, RowWiseAdagrad, Adagrad, Adam]
OPTIMIZERS = (SGD, RowWiseAdagrad, Adagrad, Adam)
NAMES = "fxrec.optim.SGD/RowWiseAdagrad/Adagrad/Adam"  # for messages


class PerTable:
    """A sparse optimizer per table: `tables` maps table names (`fxrec.TableInfo.name`, as
    `fxrec.find_tables` and plans spell them) to SGD / RowWiseAdagrad / Adagrad / Adam, or to None for
    a table that is not trained; `default` serves every other table (None: each table must
    be named)."""

    name: ClassVar[str] = "per_table"

    def __init__(self, tables: Mapping[str, Optional[SparseOptimizer]], default: Optional[SparseOptimizer] = None):
        try:
            tables = dict(tables)
        except (TypeError, ValueError) as e:
            raise TypeError(f"PerTable: tables must map table names to {NAMES}, got "
                            f"{tables!r} ({type(tables).__name__})") from e
        for key, opt in tables.items():
            if not isinstance(key, str) or not (opt is None or isinstance(opt, OPTIMIZERS)):
                raise ValueError(f"PerTable: tables must map table names to {NAMES} "
                                 f"(or None: not trained), got {key!r}: {opt!r}")
        if default is not None and not isinstance(default, OPTIMIZERS):
            raise ValueError(f"PerTable: default must be {NAMES} or None, got {default!r}")
        self.tables, self.default = dict(tables), default

    def for_table(self, name: str) -> Optional[SparseOptimizer]:
        if name in self.tables:
            return self.tables[name]
        if self.default is None:
            raise ValueError(f"PerTable: no optimizer for table {name!r} and no default (tables named: "
                             f"{sorted(self.tables)})")
        return self.default

    def check_tables(self, names: Iterable[str]) -> None:
        """Every named table exists and every table has an optimizer (ValueError otherwise)."""
        names = list(names)
        unknown = sorted(set(self.tables) - set(names))
        if unknown:
            raise ValueError(f"PerTable: unknown table(s) {unknown}; the model's tables are {sorted(names)}")
        for name in names:
            self.for_table(name)

    def __eq__(self, other) -> bool:
        return isinstance(other, PerTable) and (self.tables, self.default) == (other.tables, other.default)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.tables.items())), self.default))

    def __repr__(self) -> str:
        return f"PerTable({self.tables!r}, default={self.default!r})"


def for_table(optimizer, name: str):
    """The optimizer of table `name` under `optimizer` (a config, a PerTable, or None)."""
    return optimizer.for_table(name) if isinstance(optimizer, PerTable) else optimizer


def freeze(optimizer, tables: Iterable[str]):
    """`optimizer` (a config or a PerTable) with `tables` not trained: a PerTable mapping them
    to None (`optimizer` itself when `tables` is empty). A frozen table that `optimizer`, a
    PerTable, names with an optimizer is a contradiction: ValueError naming it."""
    tables = list(tables)
    if not tables:
        return optimizer
    if not isinstance(optimizer, PerTable):
        return PerTable({t: None for t in tables}, default=optimizer)
    named = sorted(t for t in tables if optimizer.tables.get(t) is not None)
    if named:
        raise ValueError(f"PerTable names an optimizer for table(s) {named}, whose weight is frozen "
                         f"(requires_grad=False, or a buffer), or which the model looks up only with gradients "
                         f"off (torch.no_grad()): unfreeze them, or leave them out of the PerTable")
    return PerTable({**optimizer.tables, **{t: None for t in tables}}, default=optimizer.default)


__all__ = ["SGD", "RowWiseAdagrad", "Adagrad", "Adam", "PerTable", "for_table", "freeze", "SparseOptimizer",
           "OPTIMIZERS", "DECAY_MODES", "decay_mode"]
