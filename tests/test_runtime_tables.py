"""fxrec.runtime.tables: deterministic shard init, slicing, allocation and gather_full."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.runtime import tables as T

N, D = 9000, 130  # crosses the 4096-row and 64-column block edges


def _tile(rows_cuts, cols_cuts):
    return [((r0, r1), (c0, c1)) for r0, r1 in zip(rows_cuts, rows_cuts[1:]) for c0, c1 in zip(cols_cuts, cols_cuts[1:])]


@pytest.mark.parametrize("tiling", [
    _tile([0, N], [0, D]),                          # one shard
    _tile([0, 3000, 4096, 4097, 8192, N], [0, D]),  # row-wise, edges on and off the blocks
    _tile([0, N], [0, 1, 64, 65, 100, D]),          # column-wise
    _tile([0, 17, 5000, N], [0, 70, D]),            # grid (table_row_wise x column)
    _tile([0, 0, 5, N], [0, D]),                    # an empty shard
])
def test_shards_tile_the_full_table(tiling):
    full = T.deterministic_init("emb_l.0", N, D, (0, N), (0, D), seed=3)
    assert full.shape == (N, D) and full.dtype == torch.float32 and full.is_contiguous()
    rebuilt = torch.empty(N, D)
    for rows, cols in tiling:
        shard = T.deterministic_init("emb_l.0", N, D, rows, cols, seed=3)
        assert shard.shape == (rows[1] - rows[0], cols[1] - cols[0]) and shard.is_contiguous()
        rebuilt[rows[0]:rows[1], cols[0]:cols[1]] = shard
        assert_close(shard, T.shard_from_full(full, rows, cols), rtol=0, atol=0)
    assert_close(rebuilt, full, rtol=0, atol=0)


def test_init_distribution_seed_name_and_dtype():
    full = T.deterministic_init("t", N, D, (0, N), (0, D))
    bound = math.sqrt(1 / N)
    assert full.abs().max() <= bound and full.abs().max() > 0.99 * bound
    assert abs(full.mean().item()) < 0.01 * bound
    assert not torch.equal(full, T.deterministic_init("t", N, D, (0, N), (0, D), seed=1))
    assert not torch.equal(full[:5], T.deterministic_init("u", N, D, (0, 5), (0, D)))
    half = T.deterministic_init("t", N, D, (10, 20), (3, 9), dtype=torch.float16)
    assert_close(half, full[10:20, 3:9].half(), rtol=0, atol=0)


def test_init_and_slice_errors():
    with pytest.raises(ValueError, match=r"table 'user': rows range \(0, 11\) is not within \[0, 10\]"):
        T.deterministic_init("user", 10, 4, (0, 11), (0, 4))
    with pytest.raises(ValueError, match=r"table 'user': cols range \(3, 2\) is not within \[0, 4\]"):
        T.deterministic_init("user", 10, 4, (0, 10), (3, 2))
    with pytest.raises(ValueError, match="expected a 2-D table"):
        T.shard_from_full(torch.zeros(3), (0, 1), (0, 1))


def test_shard_from_full_is_a_copy():
    full = torch.randn(6, 4)
    shard = T.shard_from_full(full, (2, 6), (0, 4))
    shard.zero_()
    assert full.abs().sum() > 0 and shard.is_contiguous()


class _Huge(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(10 ** 9, 16, mode="sum")
        self.top = nn.Linear(16, 1)

    def forward(self, ids, offsets):
        return self.top(self.emb(ids, offsets))


def test_meta_model_shard_allocates_only_the_shard():
    with torch.device("meta"):
        model = _Huge()
    (info,) = fxrec.find_tables(model, (torch.tensor([1, 2, 3]), torch.tensor([0, 2])))
    assert info.num_embeddings == 10 ** 9  # 64 GB if materialised
    rows = (info.num_embeddings - 3000, info.num_embeddings)
    shard = T.allocate_shard(rows[1] - rows[0], info.embedding_dim, info.dtype, "cpu")
    assert shard.untyped_storage().nbytes() == 3000 * 16 * 4
    # Initialising the last 3000 rows of a 10^9-row table touches only their blocks.
    shard.copy_(T.deterministic_init(info.name, info.num_embeddings, info.embedding_dim, rows, (0, 16)))
    assert shard.abs().max() <= math.sqrt(1 / info.num_embeddings)
    with pytest.raises(ValueError, match="non-negative"):
        T.allocate_shard(-1, 4)


def test_block_seed_is_stable_text_hash():
    assert T.block_seed(0, "t", 0, 0) == T.block_seed(0, "t", 0, 0) != T.block_seed(0, "t", 1, 0)
    assert 0 <= T.block_seed(7, "emb_l.3", 5, 2) < 2 ** 63


# ------------------------------------------------------------------ gather_full on 2 ranks
def _pieces(full, keys):
    return [(rows, cols, T.shard_from_full(full, rows, cols)) for rows, cols in keys]


def _gather_worker(rank, w):
    n, d = 10, 6
    full = T.deterministic_init("g", n, d, (0, n), (0, d))
    layouts = {  # per case, the (rows, cols) pieces each rank holds
        "row_wise": [[((0, 3), (0, d))], [((3, n), (0, d))]],
        "column_wise": [[((0, n), (0, 2)), ((0, n), (4, 6))], [((0, n), (2, 4))]],
        "data_parallel": [[((0, n), (0, d))], [((0, n), (0, d))]],
        "table_wise_on_rank_1": [[], [((0, n), (0, d))]],
    }
    for name, per_rank in layouts.items():
        got = T.gather_full(_pieces(full, per_rank[rank]), n, d, torch.float32)
        assert_close(got, full, rtol=0, atol=0, msg=name)
    half = T.gather_full(_pieces(full.half(), layouts["row_wise"][rank]), n, d, torch.float16, dst=1)
    if rank == 1:
        assert_close(half, full.half(), rtol=0, atol=0)
    else:
        assert half is None
    with pytest.raises(ValueError, match="cover 32 of the table's 60 elements"):
        T.gather_full(_pieces(full, [((0, 3), (0, d))] if rank == 0 else [((3, n), (0, 2))]), n, d, torch.float32)
    with pytest.raises(ValueError, match=r"rows=\(0, 5\) cols=\(0, 6\) and rows=\(4, 10\) cols=\(0, 6\) overlap"):
        T.gather_full(_pieces(full, [((0, 5), (0, d))] if rank == 0 else [((4, n), (0, d))]), n, d, torch.float32)
    # Returned to the parent: the same shard computed in a fresh process (a different str-hash salt).
    return T.deterministic_init("emb_l.0", N, D, (4000, 4200), (60, 70), seed=3)


def test_gather_full_and_cross_process_init():
    expected = T.deterministic_init("emb_l.0", N, D, (4000, 4200), (60, 70), seed=3)
    for shard in run_workers(_gather_worker, 2):
        assert_close(shard, expected, rtol=0, atol=0)


def test_gather_full_single_process():
    full = torch.randn(7, 5)
    got = T.gather_full(_pieces(full, [((0, 7), (0, 3)), ((0, 7), (3, 5)), ((0, 7), (3, 5))]), 7, 5, torch.float32)
    assert_close(got, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"piece rows=\(0, 7\) cols=\(0, 5\) has shape \(7, 4\)"):
        T.gather_full([((0, 7), (0, 5), torch.zeros(7, 4))], 7, 5, torch.float32)
