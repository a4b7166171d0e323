"""Plain data of a plan: `Shard`, `TablePlan`, `Constraint`, `PlanError`.

`fxrec.planner.plan` re-exports these; they live here so that the search modules can
raise `PlanError` without importing the front door.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxrec.planner.cost import KERNELS, SHARDING_TYPES
from fxrec.ranges import span_property
from fxrec.types import TableInfo, whole


class PlanError(ValueError):
    """No plan exists (or none was found) for these tables on this topology; the
    message names the tables, the memory they need, the memory there is, and what
    would make it fit."""


@dataclass(frozen=True)
class Shard:
    """A block of a table on one rank: ``rows`` and ``cols`` are (start, end),
    half-open."""

    rank: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    num_rows = span_property("rows")
    num_cols = span_property("cols")


@dataclass
class TablePlan:
    """Where one table lives: its sharding type, kernel and shards.

    For a sharded table the shards tile the table exactly; a ``data_parallel`` table
    has one whole-table shard per rank. ``table`` is the `TableInfo` that was planned
    (sizes, dtype, pooling factor), which the cost model needs to re-evaluate.
    """

    name: str
    sharding: str
    kernel: str
    shards: list[Shard]
    table: TableInfo | None = None

    @property
    def ranks(self) -> list[int]:
        return [s.rank for s in self.shards]


def _as_tuple(value, what: str, allowed: tuple, owner: str) -> tuple | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, str) else tuple(value)
    if not values:
        raise ValueError(f"{owner}: {what} must not be empty")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{owner}: unknown {what[:-1]} {v!r}; expected one of {allowed}")
    return values


@dataclass
class Constraint:
    """What a table's plan may be.

    sharding_types: allowed type names (a string for one). kernels: allowed kernels.
    ranks: the only ranks its shards may occupy (row_wise and data_parallel then need
    every rank; table_row_wise a whole node inside the set). min_shards/max_shards:
    bounds on the number of shards (data_parallel counts one per rank).
    pooling_factor: overrides the measured ids per bag for the cost model.
    """

    sharding_types: tuple[str, ...] | str | None = None
    kernels: tuple[str, ...] | str | None = None
    ranks: tuple[int, ...] | None = None
    min_shards: int | None = None
    max_shards: int | None = None
    pooling_factor: float | None = None

    def __post_init__(self):
        self.sharding_types = _as_tuple(self.sharding_types, "sharding_types", SHARDING_TYPES, "Constraint")
        self.kernels = _as_tuple(self.kernels, "kernels", KERNELS, "Constraint")
        if self.ranks is not None:
            # one rank or several; numpy and torch integers too (fxrec.types.whole)
            one = whole(self.ranks)
            try:
                ranks = (self.ranks,) if one is not None else tuple(self.ranks)
            except TypeError:
                ranks = ()
            counts = [whole(r) if hasattr(r, "__index__") else None for r in ranks]  # 1.0 is no rank
            if not ranks or any(r is None or r < 0 for r in counts):
                raise ValueError(f"Constraint: ranks must be non-negative integers, got {self.ranks!r}")
            self.ranks = tuple(sorted(set(counts)))
        for name in ("min_shards", "max_shards"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Constraint: {name} must be a positive integer, got {v!r}")
        if self.min_shards and self.max_shards and self.min_shards > self.max_shards:
            raise ValueError(f"Constraint: min_shards {self.min_shards} > max_shards {self.max_shards}")
        pf = self.pooling_factor
        if pf is not None and (isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 <= pf < float("inf")):
            raise ValueError(f"Constraint: pooling_factor must be a finite number >= 0, got {pf!r}")
