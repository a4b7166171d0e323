"""`sparse_update.row_sq_sums` (the per-row sum of squared gradients that exact column_wise
RowWiseAdagrad exchanges) against the plain per-table reference `torch_ref.table_grads`, on
fresh random inputs: pooled (sum, mean, per-sample weights) and unpooled layouts, mixed
widths, a subset of the tables, duplicate ids, empty tables and an empty batch."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from fxrec.lowering.layout import TBELayout
from fxrec.lowering.sparse_update import row_sq_sums
from fxrec.lowering.torch_ref import table_grads


@dataclass
class _Table:
    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: str


def _problem(g, pooled: bool, dims: list[int], rows: int, batch: int, weighted: bool):
    poolings = [("mean" if t % 2 else "sum") if pooled else "none" for t in range(len(dims))]
    layout = TBELayout([_Table(f"t{t}", rows, d, p) for t, (d, p) in enumerate(zip(dims, poolings))], "cpu")
    if pooled:
        lengths = torch.randint(0, 5, (len(dims) * batch,), generator=g)
        lengths[:batch] = 0  # table 0: no id at all
    else:  # one "bag" per table holding all its ids (the TBE layout of row lookups)
        lengths = torch.zeros(len(dims) * batch, dtype=torch.int64)
        lengths[::batch] = torch.randint(0, 30, (len(dims),), generator=g)
        lengths[0] = 0  # table 0: no id at all
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(0, rows, (int(offsets[-1]),), generator=g)  # few rows: many duplicates
    if pooled:
        grad = torch.randn(batch, sum(dims), generator=g)
    else:
        grad = torch.randn(sum(int(lengths[t * batch:(t + 1) * batch].sum()) * d for t, d in enumerate(dims)),
                           generator=g)
    psw = torch.rand(ids.numel(), generator=g) if weighted else None
    return layout, grad, ids, offsets, psw


@pytest.mark.parametrize("pooled, dims, tables, weighted", [
    (True, [4, 8, 4, 6], None, False),
    (True, [4, 8, 4, 6], None, True),
    (True, [8, 8, 8], None, False),  # one width: the gradient seen as rows without a copy
    (True, [4, 8, 4, 6], [1, 2], True),  # a subset of the tables
    (False, [4, 8, 4, 6], None, False),
    (False, [8, 8], None, False),
    (False, [4, 8, 4, 6], [0, 3], False),
])
@pytest.mark.parametrize("deterministic", [False, True])
def test_row_sq_sums_matches_per_table_reference(pooled, dims, tables, weighted, deterministic):
    g = torch.Generator().manual_seed(hash((pooled, tuple(dims), weighted)) % 2 ** 31)
    for batch in (0, 1, 5) if pooled else (1,):  # row lookups: one bag per table
        layout, grad, ids, offsets, psw = _problem(g, pooled, dims, rows=7, batch=batch, weighted=weighted)
        wanted = list(range(len(dims))) if tables is None else tables
        ref = table_grads(layout, grad, ids, offsets, psw, deterministic, wanted)
        got = row_sq_sums(layout, grad, ids, offsets, psw, wanted)
        assert sorted(got) == sorted(wanted)
        for t in wanted:
            rows, g_sum = ref[t]
            assert torch.equal(got[t][0], rows), f"table {t}: unique rows"
            assert_close(got[t][1], (g_sum * g_sum).sum(1), rtol=1e-5, atol=1e-6)
