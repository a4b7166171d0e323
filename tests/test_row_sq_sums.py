"""`sparse_update.row_sq_sums` (the per-row sum of squared gradients that exact column_wise
RowWiseAdagrad exchanges) against the plain per-table reference `torch_ref.table_grads`, on
fresh random inputs: pooled (sum, mean, per-sample weights) and unpooled layouts, mixed
widths, a subset of the tables, duplicate ids, empty tables and an empty batch; both ways of
computing them (bags of one, or sums of the repeated rows only). And the update calls it
returns make the same fused update as the call they come from, on every kernel here."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from fxrec.lowering import FusedEmbeddingBags, registered
from fxrec.lowering.layout import TBELayout
from fxrec.lowering import sparse_update
from fxrec.lowering.sparse_update import _bag_sums, row_sq_sums
from fxrec.lowering.torch_ref import table_grads
from fxrec.optim import SGD, RowWiseAdagrad


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
    (True, [1, 1, 4], None, True),  # width 1 (a dim-2 table's column shards)
    (True, [4, 8, 4, 6], [1, 2], True),  # a subset of the tables
    (False, [4, 8, 4, 6], None, False),
    (False, [8, 8], None, False),
    (False, [4, 8, 4, 6], [0, 3], False),
])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bags_of_one", [0.0, 1.0], ids=["repeated_rows", "bags_of_one"])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one_call", "a_call_per_bag"])
def test_row_sq_sums_matches_per_table_reference(pooled, dims, tables, weighted, deterministic, bags_of_one,
                                                 chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # bags of one in calls of one bag per table (pooled) or one row
        monkeypatch.setattr(sparse_update, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(hash((pooled, tuple(dims), weighted)) % 2 ** 31)
    for batch in (0, 1, 5) if pooled else (1,):  # row lookups: one bag per table
        layout, grad, ids, offsets, psw = _problem(g, pooled, dims, rows=7, batch=batch, weighted=weighted)
        wanted = list(range(len(dims))) if tables is None else tables
        ref = table_grads(layout, grad, ids, offsets, psw, deterministic, wanted)
        got = row_sq_sums(layout, grad, ids, offsets, psw, wanted, bags_of_one).sums
        assert sorted(got) == sorted(wanted)
        for t in wanted:
            rows, g_sum = ref[t]
            assert torch.equal(got[t][0], rows), f"table {t}: unique rows"
            assert_close(got[t][1], (g_sum * g_sum).sum(1), rtol=1e-5, atol=1e-6)


UPDATE_CASES = [  # (pooled, dims, tables, weighted)
    (True, [4, 8, 4, 6], None, True),  # sum and mean tables, weighted, three width groups
    (True, [8, 8, 8], None, False),  # the whole layout one group: the bag sums are the gradient as is
    (True, [1, 1, 4], None, False),  # width 1
    (True, [4, 8, 4, 6], [1, 2], True),  # the other tables keep their ids in a call of their own
    (False, [8, 8], None, False),
    (False, [4, 8, 4, 6], [0, 3], False),
]


def _update_cases():
    for kernel in ("fbgemm", "torch"):
        if kernel not in registered("backward_update"):
            continue
        for pooled, dims, tables, weighted in UPDATE_CASES:
            if kernel == "fbgemm" and not pooled and len(set(dims)) > 1:
                continue  # fbgemm's unpooled ops take one dim for all tables (its checker declines)
            yield pytest.param(kernel, pooled, dims, tables, weighted,
                               id=f"{kernel}-{'pooled' if pooled else 'unpooled'}-{dims}-{tables}-w{int(weighted)}")


@pytest.mark.parametrize("kernel, pooled, dims, tables, weighted", list(_update_cases()))
@pytest.mark.parametrize("optimizer", [SGD(0.1), RowWiseAdagrad(0.1)], ids=["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one_call", "a_call_per_bag"])
def test_update_calls_make_the_calls_update(kernel, pooled, dims, tables, weighted, optimizer, chunk_bytes,
                                            monkeypatch):
    """The calls `row_sq_sums` returns, run in turn, update a module as the call they come
    from updates its twin (weights and accumulators): with bags of one for every width group
    (fraction 1) and for none (0); the bags in one call per group, or in many."""
    if chunk_bytes is not None:
        monkeypatch.setattr(sparse_update, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(hash((pooled, tuple(dims), weighted, kernel)) % 2 ** 31)
    layout, grad, ids, offsets, psw = _problem(g, pooled, dims, rows=7, batch=5 if pooled else 1,
                                               weighted=weighted)
    wanted = list(range(len(dims))) if tables is None else tables
    specs = [_Table(n, r, d, p) for n, r, d, p in zip(layout.names, layout.rows, layout.dims, layout.poolings)]
    start = FusedEmbeddingBags(specs, optimizer=optimizer, kernel=kernel)
    for state in start.optimizer_state().values():
        state.uniform_(0, 1, generator=g)
    ref = FusedEmbeddingBags(specs, optimizer=optimizer, kernel=kernel)
    ref.load_state_dict(start.state_dict())
    ref.update(grad, ids, offsets, psw)
    B = layout.batch_size(offsets)
    has_ids = [int(offsets[(t + 1) * B] - offsets[t * B]) > 0 for t in range(len(dims))]
    # one call of bags of one per width with ids, and the other tables' ids in a call of their
    # own (the given call as it is where no table has an id)
    widths = {dims[t] for t in wanted if has_ids[t]}
    rest = len([t for t in wanted if dims[t] in widths]) < len(dims)
    n_bags = len(widths)
    for fraction, n_calls in ((0.0, 1), (1.0, n_bags + rest)):
        got = FusedEmbeddingBags(specs, optimizer=optimizer, kernel=kernel)
        got.load_state_dict(start.state_dict())
        calls = row_sq_sums(layout, grad, ids, offsets, psw, wanted, fraction).calls
        if chunk_bytes is None:
            assert len(calls) == n_calls
        elif fraction == 1.0:  # a call per bag of each table (pooled: B = 1) or per row (unpooled)
            bags = calls[1:] if rest else calls
            assert len(bags) >= n_bags
            assert all(c[2].numel() == len(dims) + 1 if pooled else c[1].numel() == 1 for c in bags)
        for call in calls:
            got.update(*call)
        assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
        for key, value in ref.optimizer_state().items():
            assert_close(got.optimizer_state()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])  # fbgemm's op; embedding_bag
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("d", [1, 4])
def test_bag_sums_against_a_loop(dtype, weighted, d):
    g = torch.Generator().manual_seed(7)
    G = torch.randn(9, d, generator=g).to(dtype)
    lists, B = 3, 4
    lengths = torch.randint(0, 4, (lists * B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    rows = torch.randint(0, 9, (int(offsets[-1]),), generator=g)
    scale = torch.rand(rows.numel(), generator=g) if weighted else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.zeros(B, lists * d, dtype=acc)
    for i in range(lists):
        for b in range(B):
            for o in range(int(offsets[i * B + b]), int(offsets[i * B + b + 1])):
                w = 1.0 if scale is None else float(scale[o])
                want[b, i * d:(i + 1) * d] += w * G[rows[o]].to(acc)
    got = _bag_sums(G, rows, scale, offsets, lists, B)
    assert got.dtype == acc and got.is_contiguous()
    assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bags_of_one", [0.0, 1.0], ids=["repeated_rows", "bags_of_one"])
def test_half_gradients_are_summed_in_fp32(dtype, bags_of_one):
    """A fp16 / bf16 table's repeated rows are summed in fp32, as the kernels sum them: the
    sums equal those of the same gradient values held in fp32 (summed in bf16, a row's column
    shards ended with accumulators up to 7e-3 apart)."""
    g = torch.Generator().manual_seed(3)
    layout, grad, ids, offsets, psw = _problem(g, True, [8, 8], rows=3, batch=64, weighted=True)
    half = grad.to(dtype)
    got = row_sq_sums(layout, half, ids, offsets, psw, [0, 1], bags_of_one).sums
    want = row_sq_sums(layout, half.float(), ids, offsets, psw, [0, 1], bags_of_one).sums
    for t in (0, 1):
        assert torch.equal(got[t][0], want[t][0])
        assert_close(got[t][1], want[t][1], rtol=1e-5, atol=1e-6)
