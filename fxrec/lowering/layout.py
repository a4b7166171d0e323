"""The table-batched (TBE) layout shared by every fused lookup kernel.

T tables live in one flat 1-D weight buffer. Table t holds ``rows[t] x dims[t]``
elements, row-major, starting at element ``weights_offsets[t]``; ``D_offsets`` (T+1,
int32) is the cumulative sum of dims and ``hash_size_cumsum`` (T+1, int64) the
cumulative sum of rows, so a (table, id) pair has the global row
``hash_size_cumsum[t] + id``. These are FBGEMM's TBE tensors, so its ops read our buffer
as is.

Inputs, as in FBGEMM and TorchRec's KeyedJaggedTensor:
- ``indices``: int32 or int64, every table's ids concatenated table-major;
- ``offsets``: T*B+1 bag boundaries into ``indices``, table-major (table 0's B bags,
  then table 1's ...), starting at 0 and ending at ``len(indices)``;
- ``per_sample_weights``: optional float, one per id (pooled lookups only).

Outputs:
- pooled (tables with pooling "sum"/"mean"): ``B x sum(dims)``, batch-major, table t in
  columns ``D_offsets[t]:D_offsets[t+1]`` (the KeyedTensor layout). An empty bag gives
  zeros; "mean" divides the (weighted) sum by the bag's number of ids.
- unpooled (tables with pooling "none"): one flat 1-D tensor; table t's ``N_t`` looked-up
  rows form a contiguous row-major ``N_t x dims[t]`` block, blocks in table order
  (`TBELayout.split_unpooled` gives the per-table views). With equal dims this is
  exactly ``N x D`` flattened.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

POOLED = ("sum", "mean")


class TBELayout:
    """Where each table lives in the flat buffer; immutable. Device tensors on `device`."""

    def __init__(self, tables: Sequence, device=None):
        if len(tables) == 0:
            raise ValueError("TBELayout: needs at least one table")
        self.names = tuple(str(t.name) for t in tables)
        self.rows = tuple(int(t.num_embeddings) for t in tables)
        self.dims = tuple(int(t.embedding_dim) for t in tables)
        # EmbeddingConfig has no pooling attribute: it is an unpooled (sequence) table.
        self.poolings = tuple(str(getattr(t, "pooling", "none")) for t in tables)
        self._check_tables()
        self.pooled = self.poolings[0] in POOLED
        self.device = torch.device(device if device is not None else "cpu")
        w_off, d_off, h_off = [0], [0], [0]
        for r, d in zip(self.rows, self.dims):
            w_off.append(w_off[-1] + r * d)
            d_off.append(d_off[-1] + d)
            h_off.append(h_off[-1] + r)
        self.weights_offsets_list = tuple(w_off[:-1])
        self.D_offsets_list = tuple(d_off)
        self.hash_size_cumsum_list = tuple(h_off)
        self.numel = w_off[-1]
        kw = dict(device=self.device)
        self.weights_offsets = torch.tensor(w_off[:-1], dtype=torch.int64, **kw)
        self.D_offsets = torch.tensor(d_off, dtype=torch.int32, **kw)
        self.hash_size_cumsum = torch.tensor(h_off, dtype=torch.int64, **kw)
        self.dims_t = torch.tensor(self.dims, dtype=torch.int64, **kw)
        self.rows_t = torch.tensor(self.rows, dtype=torch.int64, **kw)
        self.is_mean = torch.tensor([p == "mean" for p in self.poolings], dtype=torch.int32, **kw)

    def _check_tables(self) -> None:
        for name, r, d, p in zip(self.names, self.rows, self.dims, self.poolings):
            if r <= 0 or d <= 0:
                raise ValueError(f"table {name!r}: rows and dim must be positive, got {r} x {d}")
            if p not in POOLED + ("none",):
                raise ValueError(f"table {name!r}: pooling must be sum, mean or none, got {p!r}")
        kinds = {p in POOLED for p in self.poolings}
        if len(kinds) > 1:
            odd = next(n for n, p in zip(self.names, self.poolings) if (p in POOLED) != (self.poolings[0] in POOLED))
            raise ValueError(f"table {odd!r}: pooled and unpooled tables cannot share one TBELayout "
                             f"(table {self.names[0]!r} is {self.poolings[0]!r})")

    @property
    def num_tables(self) -> int:
        return len(self.rows)

    @property
    def total_D(self) -> int:
        return self.D_offsets_list[-1]

    @property
    def max_D(self) -> int:
        return max(self.dims)

    @property
    def total_rows(self) -> int:
        return self.hash_size_cumsum_list[-1]

    @functools.cached_property
    def equal_row_runs(self) -> tuple[tuple[int, int], ...]:
        """Maximal runs [t0, t1) of consecutive tables with the same number of rows.

        A run's ids are contiguous in ``indices``, so one min/max over the run checks all
        of its tables against their common bound (`check_inputs`' CPU path)."""
        runs, start = [], 0
        for t in range(1, self.num_tables + 1):
            if t == self.num_tables or self.rows[t] != self.rows[start]:
                runs.append((start, t))
                start = t
        return tuple(runs)

    def to(self, device) -> "TBELayout":
        return TBELayout(self._specs(), device)

    def _specs(self):
        return [_Spec(n, r, d, p) for n, r, d, p in zip(self.names, self.rows, self.dims, self.poolings)]

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-table ``rows x dim`` views of a flat buffer laid out like the weights."""
        return [flat[o:o + r * d].view(r, d)
                for o, r, d in zip(self.weights_offsets_list, self.rows, self.dims)]

    def batch_size(self, offsets: Tensor) -> int:
        n = offsets.numel() - 1
        if offsets.dim() != 1 or n < 0 or n % self.num_tables:
            raise ValueError(f"offsets must be 1-D with T*B+1 entries for T={self.num_tables} tables, "
                             f"got shape {tuple(offsets.shape)}")
        return n // self.num_tables

    def unpooled_offsets(self, offsets: Tensor) -> Tensor:
        """Element offset (int64, T+1, on offsets' device) of each table's block in the unpooled output."""
        B = self.batch_size(offsets)
        bounds = offsets[:: B].long() if B > 0 else torch.zeros(self.num_tables + 1, dtype=torch.long,
                                                                   device=offsets.device)
        per_table = (bounds[1:] - bounds[:-1]) * self.dims_t.to(offsets.device)
        return torch.cat([per_table.new_zeros(1), per_table.cumsum(0)])

    def split_unpooled(self, out: Tensor, offsets: Tensor) -> list[Tensor]:
        """Per-table ``N_t x dim`` views of an unpooled output (one host sync)."""
        bounds = self.unpooled_offsets(offsets).tolist()
        return [out[s:e].view(-1, d) for s, e, d in zip(bounds[:-1], bounds[1:], self.dims)]


@dataclass(frozen=True)
class _Spec:
    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: str


def in_table_order(names: Sequence[str], values, what: str) -> list:
    """`values` as a list in the order of the tables `names`: a mapping table name -> value
    must name every table and no other, a sequence must hold one value per table; otherwise
    ValueError saying which tables are unknown or missing, or how many values came."""
    names = list(names)
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - set(names))
        missing = [n for n in names if n not in values]
        if unknown or missing:
            wrong = ([f"unknown table(s) {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
            raise ValueError(f"{what} must name every table: {', '.join(wrong)}; the tables are {names}")
        return [values[n] for n in names]
    values: list[Any] = list(values)
    if len(values) != len(names):
        raise ValueError(f"expected {what} for {len(names)} tables, got {len(values)}")
    return values


def table_position(names: Sequence[str], name: str) -> int:
    """Table `name`'s position among `names`; ValueError naming the tables when it is none."""
    if name not in names:
        raise ValueError(f"unknown table {name!r}; tables are {list(names)}")
    return list(names).index(name)


def packed(*tensors: Optional[Tensor]) -> tuple:
    """Ids, offsets, per-sample weights (and weights) as packed arrays, as FBGEMM's ops and
    fxrec's Triton kernels read them: a strided view (``batch[:, 0]``, ``ids[::2]``) is copied
    packed (read raw, its ids were the view's base's, silently wrong or a fault); packed tensors
    pass as they are (a copy keeps autograd to the view). None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def check_devices(device: torch.device, **tensors: Optional[Tensor]) -> None:
    """Each given tensor (None: absent) is on `device`, where the tables are."""
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} are on {x.device}, the tables on {device}")


def check_inputs(layout: TBELayout, indices: Tensor, offsets: Tensor,
                 per_sample_weights: Optional[Tensor] = None, bounds_check: bool = True) -> int:
    """Validate a batch against the layout; return the batch size B.

    Shapes and dtypes are always checked (no host sync). With `bounds_check`, one
    vectorised pass (on a device a segment min/max per table and one host sync; on the
    CPU one min/max per run of equal-row tables) also checks that
    offsets start at 0, never decrease and end at len(indices), and that every id of
    table t lies in [0, rows[t]); a violation raises ValueError naming the table and id.
    """
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be a 1-D int32/int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32/int64, got {offsets.dtype}")
    B = layout.batch_size(offsets)
    if per_sample_weights is not None:
        if not layout.pooled:
            raise ValueError("per_sample_weights apply to pooled tables only; "
                             f"table {layout.names[0]!r} is unpooled")
        if per_sample_weights.shape != indices.shape or not per_sample_weights.is_floating_point():
            raise ValueError(f"per_sample_weights must be float with the shape of indices {tuple(indices.shape)}, "
                             f"got {per_sample_weights.dtype} {tuple(per_sample_weights.shape)}")
    if bounds_check and indices.device.type != "meta":
        _check_values(layout, indices, offsets, B)
    return B


def _check_values(layout: TBELayout, indices: Tensor, offsets: Tensor, B: int) -> None:
    T = layout.num_tables
    off = offsets.long()
    n = indices.numel()
    stats = [off[0], off[-1], (off[1:] < off[:-1]).sum()]
    on_host = indices.device.type == "cpu"
    if not on_host and B > 0 and n > 0:  # one host sync for everything on a device
        stats.append(table_minmax(indices, off, B, T).reshape(-1))
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in stats]).tolist()
    first, last, decreasing = int(flat[0]), int(flat[1]), int(flat[2])
    if first != 0 or last != n or decreasing:
        raise ValueError(f"offsets must start at 0, never decrease and end at len(indices)={n}; "
                         f"got first={first}, last={last}, {decreasing} decreasing step(s)")
    if B == 0 or n == 0:
        return
    if not on_host:
        lo, hi = flat[3:3 + T], flat[3 + T:3 + 2 * T]
    elif _runs_in_range(layout, indices, off, B):
        return
    else:  # a bad id somewhere: per-table min/max names its table
        lo, hi = table_minmax(indices, off, B, T).tolist()
    for t in range(T):
        bad = lo[t] if lo[t] < 0 else (hi[t] if hi[t] >= layout.rows[t] else None)
        if bad is not None:
            raise ValueError(f"table {layout.names[t]!r}: id {int(bad)} out of range "
                             f"[0, {layout.rows[t]})")


# An in-kernel check's fault record (kernels.py's CHECK): int64 [2], the smallest position of
# a bad id and the smallest bag with unsound offsets, each left at NO_FAULT when none.
NO_FAULT = 1 << 62


def fault_record(device) -> Tensor:
    """A fresh record for a kernel that checks its ids as it loads them."""
    return torch.full((2,), NO_FAULT, dtype=torch.int64, device=device)


def raise_if_flagged(record: Tensor, layout: TBELayout, indices: Tensor, offsets: Tensor) -> None:
    """Read a kernel's fault record (one host sync); if it flagged anything, raise the error
    `check_inputs` raises for this batch, naming the table and id (the full check runs only
    then, so its message is the one every kernel gives)."""
    bad_id, bad_bag = record.tolist()
    if bad_id == NO_FAULT and bad_bag == NO_FAULT:
        return
    check_on_host(layout, indices, offsets)
    raise RuntimeError(f"fxrec: a kernel flagged id position {bad_id} / bag {bad_bag} of this batch, which "
                       "the host check passes; please report this with the batch")


def check_on_host(layout: TBELayout, indices: Tensor, offsets: Tensor) -> None:
    """check_inputs' value checks, on the host: for a checking kernel's wrapper that launches
    nothing (a batch without bags or ids), whose offsets no kernel then sees, and for the
    message of a batch a kernel's record or the offsets' values flagged."""
    _check_values(layout, indices, offsets, layout.batch_size(offsets))


def check_offsets(layout: TBELayout, indices: Tensor, offsets: Tensor, stats: list) -> None:
    """Raise check_inputs' error when ``stats`` (the host values of ``offsets[::B]`` then the
    count of decreasing steps, read by the caller in a sync it makes anyway) show unsound
    offsets; the ids are left to the kernel."""
    first, last, decreasing = stats[0], stats[-2], stats[-1]
    if first != 0 or last != indices.numel() or decreasing:
        check_on_host(layout, indices, offsets)


def _runs_in_range(layout: TBELayout, indices: Tensor, offsets: Tensor, B: int) -> bool:
    """True when every id lies in its table's range, by one aminmax per run of equal-row
    tables (`TBELayout.equal_row_runs`). The offsets are already known to be sound, so
    the run boundaries are host numbers without another pass; a Criteo-like batch of 26
    equal tables costs one read of its ids instead of 26 small calls."""
    runs = layout.equal_row_runs
    cut = offsets[[t0 * B for t0, _ in runs] + [runs[-1][1] * B]].tolist()
    found = []
    for (t0, _), s, e in zip(runs, cut[:-1], cut[1:]):
        if e > s:
            lo, hi = torch.aminmax(indices[s:e])
            found.append(torch.stack([lo, hi - layout.rows[t0]]))
    if not found:
        return True
    lo_hi = torch.stack(found)
    return bool((lo_hi[:, 0] >= 0).all() & (lo_hi[:, 1] < 0).all())


def table_minmax(indices: Tensor, offsets: Tensor, B: int, T: int) -> Tensor:
    """float64 [2, T]: each table's smallest and largest id (+inf / -inf when it has none).

    Ids are widened to float64, exact up to 2**53. On the CPU a per-table aminmax (host
    bounds are free there) is ~10x faster than segment_reduce; elsewhere one
    segment_reduce per statistic avoids a host sync.
    """
    n = indices.numel()
    if indices.device.type == "cpu":
        bounds = offsets[::B].clamp(0, n).tolist()
        out = torch.empty(2, T, dtype=torch.float64)
        out[0], out[1] = math.inf, -math.inf
        for t, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            if e > s:
                lo, hi = torch.aminmax(indices[s:e])
                out[0, t], out[1, t] = float(lo), float(hi)
        return out
    return _segment_minmax(indices, offsets, B, n)


def _segment_minmax(indices: Tensor, offsets: Tensor, B: int, n: int) -> Tensor:
    # Sanitised so that the segments tile indices exactly even when offsets are bad
    # (bad offsets are reported before the min/max are looked at).
    inner = offsets[B:-1:B].clamp(0, n)
    bounds = torch.cummax(torch.cat([offsets.new_zeros(1), inner, offsets.new_full((1,), n)]), 0).values
    lengths = bounds[1:] - bounds[:-1]
    ids = indices.to(torch.float64)  # segment_reduce has no integer kernels
    return torch.stack([torch.segment_reduce(ids, "min", lengths=lengths, unsafe=True),
                        torch.segment_reduce(ids, "max", lengths=lengths, unsafe=True)])
