"""A feature read by several tables of a collection, as TorchRec allows: each table's values
keep a key of their own, ``feature@table`` (the names TorchRec gives them), and every path
(shard on 1 and 2 gloo ranks, torch.compile, lower_for_inference, training) gives the
unsharded collection's values under those keys."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.modules import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig,
                           embedding_names)
from fxrec.optim import SGD, RowWiseAdagrad
from fxrec.sparse import KeyedJaggedTensor
from fxrec.topology import Topology
from shard_models import Mismatches, _cat_kjt, _kjt, train_checked

B, STEPS, LR, EPS = 3, 3, 0.1, 1e-8
POOLED = {"q": 20, "u": 20, "v": 12}  # "q" feeds t_a (20 rows) and t_b (30 rows)
SEQ = {"h": 15, "s": 15}              # "h" feeds s_a (15 rows) and s_b (25 rows)
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"]
EBC_KEYS = ["q@t_a", "u", "q@t_b", "v"]
EC_KEYS = ["h@s_a", "s", "h@s_b"]


class SharedFeatures(nn.Module):
    """"q" pooled by a sum table of dim 16 and a mean table of dim 8, with per-sample weights;
    "h" looked up unpooled in two tables."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 20, 16, ["q", "u"]),
                                           EmbeddingBagConfig("t_b", 30, 8, ["q"], pooling="mean"),
                                           EmbeddingBagConfig("t_c", 12, 8, ["v"])])
        self.ec = EmbeddingCollection([EmbeddingConfig("s_a", 15, 8, ["h", "s"]),
                                       EmbeddingConfig("s_b", 25, 8, ["h"])])
        self.lin = nn.Linear(48, 1)

    def forward(self, kjt, seq):
        pooled = self.ebc(kjt)
        rows = self.ec(seq)
        d = pooled.to_dict()
        # the keys read out of order: a wrong key or width would misplace the columns
        x = torch.cat([d["q@t_b"], d["v"], d["u"], d["q@t_a"]], dim=1)
        return (self.lin(x), pooled.values(),
                *[rows[k].to_padded_dense(desired_length=3) for k in EC_KEYS])


def _batches(world: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(_kjt(g, POOLED, B, weighted=True), _kjt(g, SEQ, B)) for _ in range(world)]


def _concat(batches: list[tuple]) -> tuple:
    return _cat_kjt([k for k, _ in batches]), _cat_kjt([s for _, s in batches])


def _loss(outputs) -> torch.Tensor:
    return sum(o.square().mean() for o in outputs)


# ------------------------------------------------------------------ the unsharded collections
def test_shared_features_are_keyed_feature_at_table_as_in_torchrec():
    torch.manual_seed(0)
    model = SharedFeatures()
    kjt, seq = _batches(1, seed=0)[0]
    pooled, rows = model.ebc(kjt), model.ec(seq)
    assert pooled.keys() == EBC_KEYS and pooled.length_per_key() == [16, 16, 8, 8]
    assert list(rows) == EC_KEYS
    bags = model.ebc.embedding_bags
    q = kjt["q"]
    want_a = bags["t_a"](q.values(), q.offsets(), per_sample_weights=q.weights())
    want_b = torch.nn.functional.embedding_bag(q.values(), bags["t_b"].weight, q.offsets(), mode="sum",
                                               per_sample_weights=q.weights(), include_last_offset=True)
    want_b = want_b / q.lengths().clamp(min=1).unsqueeze(1)
    d = pooled.to_dict()
    assert_close(d["q@t_a"], want_a)
    assert_close(d["q@t_b"], want_b)
    h = seq["h"].values()
    assert_close(rows["h@s_a"].values(), model.ec.embeddings["s_a"](h))
    assert_close(rows["h@s_b"].values(), model.ec.embeddings["s_b"](h))
    assert torch.equal(rows["h@s_b"].lengths(), seq["h"].lengths())


def test_embedding_names_are_torchrecs():
    cfgs = [EmbeddingBagConfig("t1", 5, 2, ["a", "b"]), EmbeddingBagConfig("t2", 5, 2, ["c", "a"]),
            EmbeddingBagConfig("t3", 5, 2, ["a"])]
    assert embedding_names(cfgs) == [["a@t1", "b"], ["c", "a@t2"], ["a@t3"]]
    assert embedding_names(cfgs[:1]) == [["a", "b"]]


def test_a_key_that_collides_with_a_shared_features_name_is_refused():
    # "a" is shared, so t2 keys it "a@t2", which is also the literal name of t1's second feature
    cfgs = [EmbeddingBagConfig("t1", 5, 2, ["a", "a@t2"]), EmbeddingBagConfig("t2", 5, 2, ["a"])]
    with pytest.raises(ValueError, match=r"tables 't1' and 't2' both give an output named 'a@t2'"):
        EmbeddingBagCollection(cfgs)
    with pytest.raises(ValueError, match=r"repeat a name"):  # one table reading a feature twice stays refused
        EmbeddingBagConfig("t", 5, 2, ["a", "a"])


def test_find_tables_lists_the_shared_feature_under_each_table():
    torch.manual_seed(0)
    model = SharedFeatures()
    tables = {t.name: t for t in fxrec.find_tables(model, _batches(1, seed=0)[0])}
    assert list(tables["ebc.embedding_bags.t_a"].features) == ["q", "u"]
    assert list(tables["ebc.embedding_bags.t_b"].features) == ["q"]
    assert list(tables["ec.embeddings.s_b"].features) == ["h"]


# ------------------------------------------------------------------ one process
def _tables(model) -> list[str]:
    return [t.name for t in fxrec.find_tables(model, _batches(1, seed=0)[0])]


@pytest.mark.parametrize("sharding", [s for s in SHARDINGS if s != "column_wise"])  # column_wise: 2 ranks
def test_one_rank_shard_trains_like_the_unsharded_model(sharding):
    assert _run(0, 1, sharding, "sgd") == []


def test_compile_and_lower_give_the_unsharded_values():
    torch.manual_seed(0)
    model = SharedFeatures().eval()
    example = _batches(1, seed=0)[0]
    batch = _batches(1, seed=5)[0]
    with torch.no_grad():
        want = model(*batch)
        compiled = torch.compile(copy.deepcopy(model), backend="fxrec")(*batch)
        lowered = fxrec.lower_for_inference(copy.deepcopy(model), example, weight_dtype="fp32")(*batch)
        int8 = fxrec.lower_for_inference(copy.deepcopy(model), example, weight_dtype="int8")(*batch)
    for got in (compiled, lowered):
        for g, w in zip(got, want):
            assert_close(g, w, rtol=1e-5, atol=1e-6)
    for g, w in zip(int8, want):  # int8 rows: rounding of the row's range / 255 per value
        assert_close(g, w, rtol=0, atol=0.05)


# ------------------------------------------------------------------ two gloo ranks
def _run(rank: int, world: int, sharding, optimizer: str) -> list[str]:
    """Shard (all tables `sharding`, or a dict of them), compare the forward, train 3 steps
    side by side and compare every table; the mismatches."""
    bad = Mismatches(f"{sharding} {optimizer}")
    torch.manual_seed(0)
    model = SharedFeatures()
    ref = copy.deepcopy(model)
    ref_tables = {n: p for n, p in ref.named_parameters() if ".embedding" in n}
    cons = sharding if isinstance(sharding, dict) else {t: sharding for t in _tables(model)}
    batches = _batches(world, seed=1)
    sparse = SGD(LR) if optimizer == "sgd" else RowWiseAdagrad(LR, eps=EPS)
    sm = fxrec.shard(model, Topology(world), batches[rank], constraints=cons, sparse_optimizer=sparse)
    state: dict = {}

    def sparse_update(tables):  # the sparse update on the unsharded tables' dense gradients
        for name, p in tables.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if optimizer == "sgd":
                p -= LR * g
            else:
                m = state.setdefault(name, torch.zeros(p.shape[0]))
                m += (g * g).mean(1)
                p -= (LR / (m.sqrt() + EPS)).unsqueeze(1) * g
    train_checked(bad.check, sm, ref, ref_tables, batches, [_batches(world, seed=10 + s) for s in range(STEPS)],
                  _concat, _loss, rank, B, LR, sparse_update)
    return bad


MIXED = {"ebc.embedding_bags.t_a": "row_wise", "ebc.embedding_bags.t_b": "table_wise",
         "ebc.embedding_bags.t_c": "column_wise", "ec.embeddings.s_a": "data_parallel",
         "ec.embeddings.s_b": "row_wise"}
_JOBS = [(s, "rowwise_adagrad") for s in SHARDINGS] + [("mixed", "sgd")]


def _run_job(rank: int, world: int, sharding: str, optimizer: str) -> list[str]:
    return _run(rank, world, MIXED if sharding == "mixed" else sharding, optimizer)


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return merge_failures(run_workers(run_jobs, 2, _run_job, _JOBS, timeout=300))


@pytest.mark.parametrize("job", _JOBS, ids=[s for s, _ in _JOBS])
def test_two_gloo_ranks_train_like_the_unsharded_model(two_ranks, job):
    assert job in two_ranks, f"job not run (an earlier job on some rank failed): {sorted(two_ranks)[-1:]}"
    assert two_ranks[job] == [], "\n".join(two_ranks[job])
