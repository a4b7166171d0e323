"""Batch and the synthetic Criteo-like generator."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxrec.datasets import Batch, SyntheticCriteo, TableSpec, make_batch
from fxrec.datasets.synthetic import zipf_probabilities, zipf_ranks
from fxrec.sparse import KeyedJaggedTensor


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC (scores are continuous here, so ties do not matter)."""
    ranks = torch.empty(scores.numel(), dtype=torch.float64)
    ranks[scores.argsort()] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def random_batch(batch: int, keys: list[str], rows: int, gen: torch.Generator) -> Batch:
    lengths = [torch.randint(0, 4, (batch,), generator=gen) for _ in keys]
    ids = [torch.randint(0, rows, (int(l.sum()),), generator=gen) for l in lengths]
    dense = torch.randn(batch, 5, generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen).float()
    return make_batch(keys, dense, ids, lengths, labels)


# ---------------------------------------------------------------- Batch

def test_to_plain_feeds_embedding_bags_exactly():
    gen = torch.Generator().manual_seed(1)
    keys = ["cat_0", "cat_1", "cat_2"]
    batch = random_batch(7, keys, 11, gen)
    dense, offsets, indices = batch.to_plain()
    assert dense is batch.dense_features
    assert len(offsets) == len(indices) == 3
    bag = nn.EmbeddingBag(11, 4, mode="sum")
    for k, key in enumerate(keys):
        jt = batch.sparse_features[key]
        assert offsets[k].dtype == torch.int64 and offsets[k].shape == (7,)
        torch.testing.assert_close(offsets[k], jt.offsets()[:-1].to(torch.int64))
        torch.testing.assert_close(indices[k], jt.values())
        want = torch.stack([bag.weight[ids].sum(0) for ids in jt.to_dense()])
        torch.testing.assert_close(bag(indices[k], offsets[k]), want)


def test_batch_to_and_pin_memory_keep_values():
    batch = random_batch(5, ["a", "b"], 9, torch.Generator().manual_seed(2))
    assert batch.batch_size == 5
    for moved in (batch.to("cpu"), batch.pin_memory()):
        torch.testing.assert_close(moved.dense_features, batch.dense_features)
        torch.testing.assert_close(moved.labels, batch.labels)
        torch.testing.assert_close(moved.sparse_features.values(), batch.sparse_features.values())
        torch.testing.assert_close(moved.sparse_features.lengths(), batch.sparse_features.lengths())
        assert moved.sparse_features.keys() == ["a", "b"]


@pytest.mark.parametrize("start, stop", [(0, 9), (0, 3), (3, 6), (6, 9), (4, 4), (9, 9), (8, 9)])
def test_batch_slice_takes_those_samples(start, stop):
    batch = random_batch(9, ["a", "b", "c"], 13, torch.Generator().manual_seed(3))
    part = batch.slice(start, stop)
    assert part.batch_size == stop - start and part.sparse_features.stride() == stop - start
    torch.testing.assert_close(part.dense_features, batch.dense_features[start:stop])
    torch.testing.assert_close(part.labels, batch.labels[start:stop])
    for key in ["a", "b", "c"]:
        got = [t.tolist() for t in part.sparse_features[key].to_dense()]
        assert got == [t.tolist() for t in batch.sparse_features[key].to_dense()[start:stop]]
    with pytest.raises(ValueError, match=r"need 0 <= start <= stop <= batch_size=9, got \[5, 10\)"):
        batch.slice(5, 10)


def test_make_batch_needs_a_key():
    with pytest.raises(ValueError, match="at least one sparse key"):
        make_batch([], torch.zeros(2, 3), [], [], torch.zeros(2))


# ---------------------------------------------------------------- SyntheticCriteo

def small(**kw) -> SyntheticCriteo:
    args = dict(num_embeddings=[50, 200, 1000], num_tables=3, num_dense=4, batch_size=64, num_batches=4)
    args.update(kw)
    return SyntheticCriteo(**args)


def test_synthetic_structure_and_table_configs():
    ds = small()
    assert len(ds) == 4
    assert ds.table_configs() == [
        TableSpec("t_cat_0", 50, "cat_0"), TableSpec("t_cat_1", 200, "cat_1"), TableSpec("t_cat_2", 1000, "cat_2")
    ]
    batches = list(ds)
    assert len(batches) == 4
    for b in batches:
        assert isinstance(b.sparse_features, KeyedJaggedTensor)
        assert b.sparse_features.keys() == ["cat_0", "cat_1", "cat_2"]
        assert b.sparse_features.stride() == 64 and b.batch_size == 64
        assert b.dense_features.shape == (64, 4) and b.dense_features.dtype == torch.float32
        assert b.labels.dtype == torch.float32 and set(b.labels.unique().tolist()) <= {0.0, 1.0}
        assert b.sparse_features.values().dtype == torch.int64
        for key, n in zip(ds.keys, ds.num_embeddings):
            ids = b.sparse_features[key].values()
            assert int(ids.min()) >= 0 and int(ids.max()) < n


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = list(small(seed=3)), list(small(seed=3))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.dense_features, y.dense_features)
        torch.testing.assert_close(x.sparse_features.values(), y.sparse_features.values())
        torch.testing.assert_close(x.labels, y.labels)
    ds = small(seed=3)
    torch.testing.assert_close(ds.batch(2).sparse_features.values(), a[2].sparse_features.values())
    val = ds.with_split("val", num_batches=2)
    assert len(val) == 2
    assert len(ds.with_split("val")) == len(ds)  # as many batches as the one it splits from
    assert ds.with_split("val", num_batches=None).num_batches is None  # endless, when asked
    assert not torch.equal(val.batch(0).dense_features, a[0].dense_features)
    # same hidden model: the validation view scores a batch exactly as the training view
    torch.testing.assert_close(val.true_logits(a[0]), ds.true_logits(a[0]))
    assert not torch.equal(small(seed=4).batch(0).dense_features, a[0].dense_features)


@pytest.mark.parametrize(
    "bag_lengths, factors",
    [
        ("poisson", [1.0, 2.0, 5.0]),
        ("uniform", [1.0, 3.0, 4.5]),
        ("fixed", [1.0, 2.0, 3.0]),
    ],
)
def test_bag_lengths_follow_pooling_factors(bag_lengths, factors):
    ds = small(bag_lengths=bag_lengths, pooling_factors=factors, batch_size=2000, num_batches=1)
    lengths = ds.batch(0).sparse_features.lengths().view(3, 2000).double()
    for row, p in zip(lengths, factors):
        if bag_lengths == "fixed":
            assert bool((row == round(p)).all())
        elif bag_lengths == "uniform":
            hi = round(2 * p - 1)
            assert int(row.min()) == 1 and int(row.max()) == hi
            assert abs(float(row.mean()) - (1 + hi) / 2) < 0.1 * p + 0.05
        else:
            assert abs(float(row.mean()) - p) < 0.1 * p
    if bag_lengths == "poisson":
        assert int((lengths[0] == 0).sum()) > 0  # p = 1: about 37% of bags are empty


@pytest.mark.parametrize("n, alpha", [(20, 1.05), (20, 1.0), (100, 0.6), (7, 2.0)])
def test_zipf_ranks_match_their_distribution(n, alpha):
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ranks = zipf_ranks(u, torch.full((u.numel(),), float(n), dtype=torch.float64), alpha)
    assert int(ranks.min()) >= 0 and int(ranks.max()) < n
    freq = torch.bincount(ranks, minlength=n).double() / u.numel()
    torch.testing.assert_close(freq, zipf_probabilities(n, alpha), atol=4e-3, rtol=0.05)
    assert float(zipf_probabilities(n, alpha)[0]) > float(zipf_probabilities(n, alpha)[-1])


def test_zipf_ids_are_skewed_and_uniform_ids_are_flat():
    skewed = small(num_embeddings=100, batch_size=4000, num_batches=1, bag_lengths="fixed")
    ids = skewed.batch(0).sparse_features["cat_0"].values()
    freq = torch.bincount(ids, minlength=100).double() / ids.numel()
    # the permutation only relabels rows: sorted frequencies follow the Zipf law
    torch.testing.assert_close(freq.sort(descending=True).values[:5], zipf_probabilities(100, 1.05)[:5], atol=0.012, rtol=0.1)
    flat = small(num_embeddings=100, batch_size=4000, num_batches=1, bag_lengths="fixed", zipf_alpha=None)
    ids = flat.batch(0).sparse_features["cat_0"].values()
    assert int(torch.bincount(ids, minlength=100).max()) < 80  # uniform: about 40 each


def test_signal_strength_near_target():
    ds = SyntheticCriteo(num_embeddings=1000, batch_size=4096, num_batches=5)
    batches = list(ds)
    logits = torch.cat([ds.true_logits(b) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert 0.76 < auc(logits, labels) < 0.86
    assert abs(float(labels.mean()) - float(torch.sigmoid(logits).mean())) < 0.02


def test_signal_is_learnable_by_a_small_model():
    """Logistic regression on one-hot ids + dense features beats chance by a wide margin."""
    torch.manual_seed(0)
    ds = SyntheticCriteo(num_embeddings=500, num_tables=8, batch_size=256, num_batches=150, seed=1)
    weights = nn.ModuleList([nn.EmbeddingBag(n, 1, mode="mean") for n in ds.num_embeddings])
    for bag in weights:
        nn.init.zeros_(bag.weight)
    linear = nn.Linear(ds.num_dense, 1)
    opt = torch.optim.Adagrad(list(weights.parameters()) + list(linear.parameters()), lr=0.1)

    def score(b: Batch) -> torch.Tensor:
        dense, offsets, indices = b.to_plain()
        out = linear(dense).squeeze(1)
        for bag, o, i in zip(weights, offsets, indices):
            out = out + bag(i, o).squeeze(1)
        return out

    for b in ds:
        loss = nn.functional.binary_cross_entropy_with_logits(score(b), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = list(ds.with_split("val", num_batches=8))
    with torch.no_grad():
        got = auc(torch.cat([score(b) for b in val]), torch.cat([b.labels for b in val]))
    assert got > 0.70, got


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tables=0), "num_tables must be >= 1"),
        (dict(num_tables=2, num_embeddings=[5, 6, 7]), "num_embeddings has 3 entries, expected num_tables=2"),
        (dict(num_tables=2, num_embeddings=[5, 0]), "table t_cat_1: num_embeddings must be in"),
        (dict(num_tables=1, pooling_factors=-1.0), "table t_cat_0: pooling factor must be >= 0"),
        (dict(num_tables=1, pooling_factors=0.5, bag_lengths="uniform"), "needs pooling factor >= 1"),
        (dict(bag_lengths="zipf"), "bag_lengths must be one of"),
        (dict(zipf_alpha=0.0), "zipf_alpha must be > 0"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(split="dev"), "split must be one of"),
        (dict(split=-1), "seed and an int split must be >= 0"),
        (dict(split=1.5), r"split must be one of .* or a whole number, got 1.5"),  # not stream 1
        (dict(seed=-3), "seed and an int split must be >= 0"),
        (dict(signal_weights=(0.0, 0.0, 0.0)), "signal_weights must be 3 non-negative"),
        # neither truncated nor left to fail deep inside torch
        (dict(batch_size=2.5), "batch_size must be a whole number, got 2.5"),
        (dict(num_tables=1, num_embeddings=1.9), "num_embeddings must be a whole number, got 1.9"),
        (dict(num_tables=1, pooling_factors=float("inf")), "a pooling factor must be finite, got inf"),
        (dict(signal_scale=float("nan")), "signal_scale must be finite, got nan"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticCriteo(**kwargs)


@pytest.mark.parametrize(
    "split, num_batches, match",
    [
        ("val", 2.5, "num_batches must be a whole number, got 2.5"),
        ("val", -1, "num_batches must be >= 0 or None"),
        (2.5, 2, "split must be one of .* or a whole number, got 2.5"),
    ],
)
def test_with_split_rejects_what_the_constructor_rejects(split, num_batches, match):
    with pytest.raises(ValueError, match=match):
        small().with_split(split, num_batches=num_batches)


def test_endless_stream_has_no_len():
    ds = small(num_batches=None)
    with pytest.raises(TypeError, match="endless"):
        len(ds)
    it = iter(ds)
    assert [next(it).batch_size for _ in range(6)] == [64] * 6


def test_table_configs_build_a_matching_embedding_bag_collection():
    from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig

    ds = small(pooling_factors=[1.0, 2.0, 3.0], batch_size=16)
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection([
        EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=4, feature_names=[t.feature_name])
        for t in ds.table_configs()
    ])
    batch = ds.batch(0)
    pooled = ebc(batch.sparse_features)
    assert pooled.keys() == ds.keys
    _, offsets, indices = batch.to_plain()
    want = [
        nn.functional.embedding_bag(i, ebc.embedding_bags[t.name].weight, o, mode="sum")
        for t, o, i in zip(ds.table_configs(), offsets, indices)
    ]
    torch.testing.assert_close(pooled.values(), torch.cat(want, dim=1))
