"""Pieces of the fused backward + optimizer update shared by the kernels.

The backward never builds a table-sized gradient. Instead every occurrence of an id
gets a global row (``hash_size_cumsum[t] + id``); a stable sort groups the occurrences
of each row, in input order, so a kernel can reduce each unique row's gradients in a
fixed order (bit-identical run to run) and update that row and its optimizer state once.

Optimizer state (`init_state`), always on the weights' device:
- SGD: none;
- RowWiseAdagrad: ``momentum`` fp32 [total_rows] (global row order);
- Adagrad: ``sum`` fp32 laid out exactly like the weights (torch.optim.Adagrad's name);
- Adam: ``exp_avg``, ``exp_avg_sq`` fp32 laid out exactly like the weights, and
  ``step`` int32 [total_rows], the per-row step count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxrec.optim import SGD, Adagrad, Adam, RowWiseAdagrad

from .layout import TBELayout

# state tensors with one entry per row (global row order); the others are laid out like the weights
ROW_STATE = ("momentum", "step")


def init_state(optimizer, layout: TBELayout, device=None) -> dict[str, Tensor]:
    """Zeroed optimizer state for `optimizer` (None or SGD: empty)."""
    kw = dict(device=device if device is not None else layout.device)
    if optimizer is None or isinstance(optimizer, SGD):
        return {}
    if isinstance(optimizer, RowWiseAdagrad):
        return {"momentum": torch.zeros(layout.total_rows, dtype=torch.float32, **kw)}
    if isinstance(optimizer, Adagrad):
        return {"sum": torch.zeros(layout.numel, dtype=torch.float32, **kw)}
    if isinstance(optimizer, Adam):
        return {"exp_avg": torch.zeros(layout.numel, dtype=torch.float32, **kw),
                "exp_avg_sq": torch.zeros(layout.numel, dtype=torch.float32, **kw),
                "step": torch.zeros(layout.total_rows, dtype=torch.int32, **kw)}
    raise ValueError(f"unsupported sparse optimizer {optimizer!r}; use fxrec.optim.SGD, "
                     "RowWiseAdagrad, Adagrad or Adam")


def adam_row_scalars(optimizer: Adam, step: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Per-row ``lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` in `dtype` (fp32; fp64
    for an fp64 table's update).

    Computed in float64 as torch.optim.Adam does in Python (where 1 - beta2 near 1e-3
    would lose ~1e-4 relative precision in fp32), then rounded once to `dtype`.
    """
    beta1, beta2 = optimizer.betas
    s = step.to(torch.float64)
    step_size = optimizer.lr / (1.0 - torch.pow(beta1, s))
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, s))
    return step_size.to(dtype), bc2_sqrt.to(dtype)


@dataclass
class SortedGrads:
    """Occurrences grouped by global row. U unique rows, N occurrences."""

    uniq_global: Tensor  # int64 [U], ascending
    uniq_table: Tensor  # int64 [U]
    uniq_row: Tensor  # int64 [U], id within its table
    seg: Tensor  # int64 [U+1], row u's occurrences are sorted positions seg[u]:seg[u+1]
    src_off: Tensor  # int64 [N], element offset of each sorted occurrence's grad row
    scale: Tensor  # fp32 [N], per-sample weight and 1/len for mean pooling

    @property
    def num_unique(self) -> int:
        return self.uniq_global.numel()


def _occurrence_scale(layout: TBELayout, table: Tensor, bag: Tensor, lengths: Tensor,
                      per_sample_weights: Optional[Tensor]) -> Optional[Tensor]:
    """fp32 per occurrence of a pooled layout: its per-sample weight, divided by its bag's
    length where the table pools by mean; None when every factor is 1."""
    scale = per_sample_weights.float() if per_sample_weights is not None else None
    if any(p == "mean" for p in layout.poolings):
        mean = layout.is_mean.to(table.device)[table].bool()
        length = lengths[bag].clamp(min=1).float()
        scale = torch.where(mean, 1.0 / length, 1.0) if scale is None else torch.where(mean, scale / length, scale)
    return scale


def _key_dtype(layout: TBELayout) -> torch.dtype:
    """The dtype of global-row sort keys: int32 where the rows fit, which sorts 2-3x faster
    (half a radix sort's passes on a GPU, half the bytes on a CPU)."""
    return torch.int32 if layout.total_rows < 2 ** 31 else torch.int64


def sort_occurrences(layout: TBELayout, indices: Tensor, offsets: Tensor,
                     per_sample_weights: Optional[Tensor] = None) -> SortedGrads:
    """Group the batch's occurrences by global row (stable, so deterministic).

    For pooled layouts the grad row of an occurrence in bag (t, b) starts at
    ``b * total_D + D_offsets[t]`` of the B x total_D grad_output; for unpooled ones at
    its own row of table t's block in the flat unpooled grad_output. One host sync
    (the number of unique rows).
    """
    dev = indices.device
    n = indices.numel()
    B = layout.batch_size(offsets)
    off = offsets.long()
    lengths = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=n)
    table = bag // max(B, 1)
    hsc, d_off = layout.hash_size_cumsum.to(dev), layout.D_offsets.to(dev).long()
    dims = layout.dims_t.to(dev)
    global_row = (hsc.index_select(0, table) + indices.long()).to(_key_dtype(layout))
    if layout.pooled:
        src_off = (bag - table * B) * layout.total_D + d_off.index_select(0, table)
        scale = _occurrence_scale(layout, table, bag, lengths, per_sample_weights)
        if scale is None:
            scale = torch.ones(n, dtype=torch.float32, device=dev)
    else:
        first = off[::B][:-1] if B > 0 else off.new_zeros(layout.num_tables)
        src_off = layout.unpooled_offsets(offsets).index_select(0, table) + \
            (torch.arange(n, device=dev) - first.index_select(0, table)) * dims.index_select(0, table)
        scale = torch.ones(n, dtype=torch.float32, device=dev)
    sorted_rows, perm = torch.sort(global_row, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    uniq = uniq.long()
    seg = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    uniq_table = table.index_select(0, perm.index_select(0, seg[:-1]))
    return SortedGrads(uniq, uniq_table, uniq - hsc.index_select(0, uniq_table), seg,
                       src_off.index_select(0, perm), scale.index_select(0, perm))


def _group_occurrences(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                       per_sample_weights: Optional[Tensor], group: list[int], bounds: list[int]):
    """The occurrences of `group`'s tables (all of one width d), in input order, as
    ``(G, rows, keys, scale, bases)``:

    - G: their gradients as the rows of one ``m x d`` matrix, a view when the group is the
      whole layout (pooled: a bag's row; unpooled: an occurrence's own);
    - rows: per occurrence, the row of G its gradient is;
    - keys: per occurrence, ``bases[i] + id`` for the group's i-th table, with ``bases`` the
      cumulative rows of the group's tables (`_key_dtype`), so they sort table-major;
    - scale: per occurrence, its per-sample weight divided by its bag's length where the
      table pools by mean; None when every factor is 1.

    Indices are table-major, so table t's occurrences are ``bounds[t]:bounds[t + 1]`` and
    each per-occurrence tensor is built by one `repeat_interleave` of a per-table or per-bag
    one, not by gathers over a per-occurrence bag index."""
    T, dev = layout.num_tables, grad_output.device
    d = layout.dims[group[0]]
    B = layout.batch_size(offsets)
    whole = len(group) == T
    counts = [bounds[t + 1] - bounds[t] for t in group]
    n = sum(counts)

    def take(x: Tensor, per: int) -> Tensor:  # the group's part of a table-major tensor
        if whole:
            return x
        return torch.cat([x[bounds[t]:bounds[t + 1]] if per == 0 else x[t * per:(t + 1) * per] for t in group])

    bases = [0]
    for t in group:
        bases.append(bases[-1] + layout.rows[t])
    kdt = _key_dtype(layout)
    keys = take(indices, 0).to(kdt) + torch.repeat_interleave(
        torch.tensor(bases[:-1], dtype=kdt, device=dev), torch.tensor(counts, device=dev), output_size=n)
    if not layout.pooled:  # one row of G per occurrence: table t's block of the flat gradient
        starts = layout.unpooled_offsets(offsets).tolist()
        blocks = [grad_output[starts[t]:starts[t] + c * d].view(c, d) for t, c in zip(group, counts)]
        G = grad_output[:n * d].view(n, d) if whole else (blocks[0] if len(blocks) == 1 else torch.cat(blocks))
        return G, torch.arange(n, device=dev), keys, None, bases
    Tg = len(group)
    if whole:  # bag t*B + b is row b*T + t of the B x (T*d) gradient seen as (B*T) x d
        G = grad_output.reshape(-1, d)
    else:
        G = torch.cat([grad_output[:, layout.D_offsets_list[t]:layout.D_offsets_list[t + 1]] for t in group],
                      dim=1).reshape(-1, d)
    off = offsets.long()
    lengths = take(off[1:] - off[:-1], B)
    bag_rows = (torch.arange(B, device=dev) * Tg + torch.arange(Tg, device=dev)[:, None]).reshape(-1)
    rows = torch.repeat_interleave(bag_rows, lengths, output_size=n)
    mean = [i for i, t in enumerate(group) if layout.poolings[t] == "mean"]
    scale = take(per_sample_weights, 0).float() if per_sample_weights is not None else None
    if mean:
        bag_scale = torch.ones(Tg, B, dtype=torch.float32, device=dev)
        bag_scale[mean] = 1.0 / lengths.view(Tg, B)[mean].clamp(min=1).float()
        per_occ = torch.repeat_interleave(bag_scale.reshape(-1), lengths, output_size=n)
        scale = per_occ if scale is None else scale * per_occ
    return G, rows, keys, scale, bases


def _sq_norms(x: Tensor) -> Tensor:
    """fp32 squared norm of each row (`vector_norm` reduces without an x-sized temporary;
    `vecdot` multiplies first and was 5x slower here)."""
    return torch.linalg.vector_norm(x.float(), dim=1).square()


def _segment_sq_sums(G: Tensor, rows: Tensor, scale: Optional[Tensor], keys: Tensor, counts: Tensor) -> Tensor:
    """fp32 [S]: for the S runs of equal sorted `keys` (lengths `counts`), ``|sum_o scale_o G[rows_o]|^2``.

    A run of one occurrence is ``scale^2 |G[row]|^2`` (from G's row norms, no gather of
    its gradient); only runs of several sum their rows, by `embedding_bag`. Gathers use
    index_select / masked_select: on the CPU they are 2-4x faster than advanced indexing
    (``x[idx]``, ``x[mask]``)."""
    first = counts.cumsum(0) - counts
    sums = _sq_norms(G).index_select(0, rows.index_select(0, first))
    if scale is not None:
        sums = sums * scale.index_select(0, first).square()
    n = rows.numel()
    if counts.numel() < n:  # some row occurs more than once
        # an occurrence belongs to a run of several iff it equals a neighbour
        same = keys[1:] == keys[:-1]
        occ = torch.zeros(n, dtype=torch.bool, device=rows.device)
        occ[1:] = same
        occ[:-1] |= same
        multi = counts > 1
        m_counts = counts.masked_select(multi)
        # summed in fp32 (fp64 for fp64), as the kernels sum: in fp16 / bf16 a row's column
        # shards ended with accumulators up to 7e-3 apart
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32
        psw = None if scale is None else scale.masked_select(occ).to(acc)
        g = F.embedding_bag(rows.masked_select(occ), G.to(acc), m_counts.cumsum(0) - m_counts, mode="sum",
                            per_sample_weights=psw)
        sums.masked_scatter_(multi, _sq_norms(g))  # no U x d temporary
    return sums


# Where a call's rows repeat often, the occurrences exact column_wise RowWiseAdagrad sorts
# by row for its row sums also make the update: each unique row a bag of one holding its
# summed gradient, which the fused kernel regroups in a fraction of the time it takes over
# every id (bench/vs_torchrec.py's column shards: 425k Zipf ids, 139k unique rows). With few
# repeats, gathering every row's gradient costs more than the kernel's own pass saves: bags
# of one are used up to this fraction of unique rows per id (bench/row_sums.py measures
# both ways; bench/results/row_sums_cpu.txt).
BAGS_OF_ONE_UNIQUE_FRACTION = 0.45


@dataclass
class RowSums:
    """`row_sq_sums`'s result: per table, its unique ids (ascending, int64) and their sums of
    the squared gradient over the table's columns (fp32); and the calls
    ``(grad_output, indices, offsets, per_sample_weights)`` whose fused updates, one after the
    other, are the update of the call the sums were computed from."""

    sums: dict[int, tuple[Tensor, Tensor]]
    calls: list[tuple]


@dataclass
class _Runs:
    """One width group's occurrences sorted by row (`_sorted_runs`): U runs of equal rows."""

    group: list[int]  # the layout's tables, ascending, all of width d
    G: Tensor  # m x d gradient rows (`_group_occurrences`)
    rows: Tensor  # per sorted occurrence, its row of G
    scale: Optional[Tensor]  # per sorted occurrence; None when every factor is 1
    keys: Tensor  # sorted keys
    counts: Tensor  # per run, its occurrences
    ids: Tensor  # int64 [U], each run's id within its table
    cut: list[int]  # the group's i-th table's runs are cut[i]:cut[i + 1]


def _sorted_runs(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                 per_sample_weights: Optional[Tensor], group: list[int], bounds: list[int]) -> Optional[_Runs]:
    """`group`'s occurrences stably sorted by row (so summed in input order within a row:
    the same result run to run); None when the group has none."""
    G, rows, keys, scale, bases = _group_occurrences(layout, grad_output, indices, offsets,
                                                     per_sample_weights, group, bounds)
    if keys.numel() == 0:
        return None
    keys, perm = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    uniq = uniq.long()
    # unique keys ascend, so the group's i-th table's are those in [bases[i], bases[i+1])
    dev = uniq.device
    cut = torch.searchsorted(uniq, torch.tensor(bases, dtype=torch.int64, device=dev)).tolist()
    per_table = torch.tensor([cut[i + 1] - cut[i] for i in range(len(group))], device=dev)
    ids = uniq - torch.repeat_interleave(torch.tensor(bases[:-1], dtype=torch.int64, device=dev), per_table,
                                         output_size=uniq.numel())
    return _Runs(group, G, rows.index_select(0, perm), None if scale is None else scale.index_select(0, perm),
                 keys, counts, ids, cut)


def _bag_sums(G: Tensor, rows: Tensor, scale: Optional[Tensor], bag_offsets: Tensor, lists: int,
              B: int) -> Tensor:
    """``B x (lists * d)``, fp32 (fp64 for an fp64 G): bag b of list i, the occurrences
    ``bag_offsets[i * B + b]:bag_offsets[i * B + b + 1]``, is the sum of their ``scale * G[row]``,
    in list i's columns (the pooled layout of `lists` tables of width d)."""
    from . import fbgemm  # its kernels register themselves; imported here, not at load

    if fbgemm.AVAILABLE and G.device.type == "cpu" and G.dtype == torch.float32:
        return fbgemm.bag_sums(G, rows, scale, bag_offsets, lists)
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    out = F.embedding_bag(rows, G.to(acc), bag_offsets, mode="sum", include_last_offset=True,
                          per_sample_weights=None if scale is None else scale.to(acc))
    # contiguous: with d = 1 reshape would return a strided view, and callers view it as rows
    return out.view(lists, B, -1).transpose(0, 1).contiguous().view(B, -1)


# Bags of one are summed and updated in calls of at most this many bytes of gradient: a
# larger buffer is a fresh mmap on every call on glibc (past its 32 MiB threshold), whose page
# faults cost more than the bags save (bench/row_sums.py --batch 8192, Zipf 0.9: 1.2x slower
# than the lookup's own ids in one call).
_CHUNK_BYTES = 16 << 20


def _bags_of_one(layout: TBELayout, runs: _Runs, call: tuple) -> tuple[list[tuple], list[Tensor]]:
    """The calls updating `runs.group`'s tables with each unique row as a bag of one holding
    its summed gradient (no per-sample weights: they are in the sums), and each row's sum of
    the squared gradient, per table of the group. Pooled, a call holds up to C bags of each
    table (B = C, a table's bags past its rows empty); unpooled, a run of up to C rows."""
    T, dev = layout.num_tables, runs.G.device
    d, Tg = layout.dims[runs.group[0]], len(runs.group)
    width = 8 if runs.G.dtype == torch.float64 else 4  # the bytes of a summed gradient element
    U = [runs.cut[i + 1] - runs.cut[i] for i in range(Tg)]
    starts = torch.cat([runs.counts.new_zeros(1), runs.counts.cumsum(0)])  # run j: starts[j]:starts[j + 1]
    ids, offset_dtype = runs.ids.to(call[1].dtype), call[2].dtype
    calls, sums = [], [[] for _ in range(Tg)]

    def taken(pieces: list[tuple[int, int]], x: Optional[Tensor]) -> Optional[Tensor]:
        """x's parts ``a:b``, in order (None stays None)."""
        if x is None:
            return None
        return torch.cat([x[a:b] for a, b in pieces]) if len(pieces) > 1 else x[pieces[0][0]:pieces[0][1]]

    if not layout.pooled:  # runs a:b are one block of rows, table-major
        C = max(1, _CHUNK_BYTES // (width * d))
        edges = list(range(0, len(starts) - 1, C)) + [len(starts) - 1]
        at = starts[edges].tolist()
        for (a, b), (sa, sb) in zip(zip(edges, edges[1:]), zip(at, at[1:])):
            g = _bag_sums(runs.G, runs.rows[sa:sb], taken([(sa, sb)], runs.scale), starts[a:b + 1] - sa, 1, b - a)
            sq = _sq_norms(g)
            lengths = torch.zeros(T, dtype=torch.int64, device=dev)
            for i, t in enumerate(runs.group):
                lo, hi = max(runs.cut[i], a), min(runs.cut[i + 1], b)
                sums[i].append(sq[max(lo - a, 0):max(hi - a, 0)])
                lengths[t] = max(hi - lo, 0)
            call_off = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(offset_dtype)
            calls.append((g.reshape(-1), ids[a:b], call_off, None))
    else:
        C = max(1, _CHUNK_BYTES // (width * layout.D_offsets_list[-1]))
        chunks = [[(runs.cut[i] + min(k, U[i]), runs.cut[i] + min(k + C, U[i])) for i in range(Tg)]
                  for k in range(0, max(U), C)]  # per chunk, table i's runs j0:j1
        ends = [j for chunk in chunks for pair in chunk for j in pair]
        at = iter(starts[torch.tensor(ends, device=dev)].tolist())
        for chunk in chunks:
            occ = [(next(at), next(at)) for _ in chunk]  # table i's occurrences of those runs
            n = [j1 - j0 for j0, j1 in chunk]
            c = max(n)
            real = torch.arange(c, device=dev) < torch.tensor(n, device=dev).unsqueeze(1)  # Tg x c
            lengths = torch.zeros(Tg, c, dtype=torch.int64, device=dev).masked_scatter_(
                real, taken(chunk, runs.counts).long())
            bag_off = torch.cat([lengths.new_zeros(1), lengths.reshape(-1).cumsum(0)])
            g = _bag_sums(runs.G, taken(occ, runs.rows), taken(occ, runs.scale), bag_off, Tg, c)  # c x (Tg*d)
            sq = _sq_norms(g.view(-1, d)).view(c, Tg)
            for i in range(Tg):
                sums[i].append(sq[:n[i], i])
            if runs.group != list(range(T)):  # the group's columns of the layout's c x total_D
                whole = g.new_zeros(c, layout.D_offsets_list[-1])
                for i, t in enumerate(runs.group):
                    whole[:, layout.D_offsets_list[t]:layout.D_offsets_list[t + 1]] = g[:, i * d:(i + 1) * d]
                g = whole
            call_len = torch.zeros(T, c, dtype=torch.int64, device=dev)
            call_len[runs.group] = real.long()
            call_off = torch.cat([call_len.new_zeros(1), call_len.reshape(-1).cumsum(0)]).to(offset_dtype)
            calls.append((g, taken(chunk, ids), call_off, None))
    return calls, [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in sums]


def _without(layout: TBELayout, call: tuple, drop: set) -> tuple:
    """`call` with the tables in `drop` given no ids (their update is made elsewhere)."""
    grad_output, indices, offsets, psw = call
    T = layout.num_tables
    B = layout.batch_size(offsets)
    bounds = offsets[::B].tolist() if B else [0] * (T + 1)
    keep = [t for t in range(T) if t not in drop]
    off = offsets.long()
    lengths = (off[1:] - off[:-1]).view(T, B).clone()
    lengths[sorted(drop)] = 0
    new_off = torch.cat([lengths.new_zeros(1), lengths.reshape(-1).cumsum(0)]).to(offsets.dtype)
    ids = torch.cat([indices[bounds[t]:bounds[t + 1]] for t in keep])
    weights = None if psw is None else torch.cat([psw[bounds[t]:bounds[t + 1]] for t in keep])
    if not layout.pooled:  # the dropped tables' blocks of per-id gradient rows go too
        start = layout.unpooled_offsets(offsets).tolist()
        grad_output = torch.cat([grad_output[start[t]:start[t + 1]] for t in keep])
    return grad_output, ids, new_off, weights


def row_sq_sums(layout: TBELayout, grad_output: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor], tables, bags_of_one: Optional[float] = None) -> RowSums:
    """Per table t in `tables`: its unique ids (ascending, int64) and, per id, the sum over
    the table's columns of the squared gradient summed over the id's occurrences (fp32) —
    RowWiseAdagrad's ``sum(g**2)`` before the mean — and the update's calls (`RowSums`).
    Per distinct width, one sort of the occurrences by row, whatever the number of tables;
    tables no id touched get empty tensors. Occurrences are summed in input order within a
    row, so the result is the same run to run.

    A width group whose unique rows are at most `bags_of_one` (default
    BAGS_OF_ONE_UNIQUE_FRACTION) of its ids is updated by a call of bags of one
    (`_bags_of_one`), its sums the squared norms of those bags' gradients;
    otherwise only the rows that occur more than once sum their gradients
    (`_segment_sq_sums`), and the group stays in the given call."""
    dev = grad_output.device
    tables = sorted(set(tables))
    out = {t: (torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.float32, device=dev))
           for t in tables}
    call = (grad_output, indices, offsets, per_sample_weights)
    if indices.numel() == 0:
        return RowSums(out, [call])
    B = layout.batch_size(offsets)
    bounds = offsets[::B].tolist()  # table t's occurrences: bounds[t]:bounds[t + 1]
    bags_of_one = BAGS_OF_ONE_UNIQUE_FRACTION if bags_of_one is None else bags_of_one
    calls, taken = [], set()
    for d in sorted({layout.dims[t] for t in tables}):
        runs = _sorted_runs(layout, grad_output, indices, offsets, per_sample_weights,
                            [t for t in tables if layout.dims[t] == d], bounds)
        if runs is None:
            continue
        if runs.ids.numel() <= bags_of_one * runs.keys.numel():
            bags, sums = _bags_of_one(layout, runs, call)
            calls += bags
            taken.update(runs.group)
        else:
            flat = _segment_sq_sums(runs.G, runs.rows, runs.scale, runs.keys, runs.counts)
            sums = [flat[runs.cut[i]:runs.cut[i + 1]] for i in range(len(runs.group))]
        for i, t in enumerate(runs.group):
            out[t] = (runs.ids[runs.cut[i]:runs.cut[i + 1]], sums[i])
    if len(taken) < layout.num_tables:  # the tables no bags of one update keep their ids
        calls.insert(0, _without(layout, call, taken) if taken else call)
    return RowSums(out, calls)


def merge_calls(layout: TBELayout, calls: list) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Several lookups' ``(grad_output, indices, offsets, per_sample_weights)`` on one layout as
    one call's: table t's bags (their ids, weights and gradient rows) of each call in turn,
    as if the calls' batches had been one batch. The fused update of the result is the
    update of each row's gradient summed over every call, as the unfused model's optimizer
    step sees it. A call without per-sample weights, beside one with, weighs its ids 1. One
    call is returned as it is."""
    if len(calls) == 1:
        return calls[0]
    T = layout.num_tables
    lengths, ids, weights, grads = [], [[] for _ in range(T)], [[] for _ in range(T)], [[] for _ in range(T)]
    weighted = any(c[3] is not None for c in calls)
    dtype = calls[0][1].dtype if all(c[1].dtype == calls[0][1].dtype for c in calls) else torch.int64
    for grad, indices, offsets, psw in calls:
        B = layout.batch_size(offsets)
        off = offsets.long()
        lengths.append((off[1:] - off[:-1]).view(T, B))
        bounds = off[::B].tolist() if B else [0] * (T + 1)
        w = psw if psw is not None or not weighted else torch.ones(indices.numel(), device=indices.device)
        start = 0  # unpooled: table t's block of the flat gradient, its ids' rows of dims[t]
        for t in range(T):
            ids[t].append(indices[bounds[t]:bounds[t + 1]].to(dtype))
            if weighted:
                weights[t].append(w[bounds[t]:bounds[t + 1]].float())
            if not layout.pooled:
                size = (bounds[t + 1] - bounds[t]) * layout.dims[t]
                grads[t].append(grad[start:start + size])
                start += size
    merged = torch.cat(lengths, dim=1).reshape(-1)
    offsets = torch.cat([merged.new_zeros(1), merged.cumsum(0)]).to(calls[0][2].dtype)
    indices = torch.cat([x for per in ids for x in per])
    psw = torch.cat([x for per in weights for x in per]) if weighted else None
    if layout.pooled:  # batch-major rows: one call's batch after another's
        grad = torch.cat([c[0] for c in calls], dim=0)
    else:  # table-major blocks of rows
        grad = torch.cat([x for per in grads for x in per])
    return grad, indices, offsets, psw
