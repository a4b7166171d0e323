"""The fused update runs once per backward, with every lookup of the module it went through.

A model called twice before one backward (or a compiled graph that dynamo broke around each
feature of a shared table) must update a row the two calls touched once, with its summed
gradient, as an optimizer step after backward does: RowWiseAdagrad and Adam applied per call
would differ. Checked on FusedEmbeddingBags against one call on the two batches joined
(`merge_calls`), on fxrec.shard (1 and 2 ranks, each sharding type's update path), and on
torch.compile with an EmbeddingBagCollection table shared by two features.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import run_workers
from fxrec.lowering import FusedEmbeddingBags
from fxrec.lowering.sparse_update import merge_calls
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.optim import SGD, Adam, RowWiseAdagrad
from fxrec.shard import shard
from fxrec.sparse import KeyedJaggedTensor
from fxrec.topology import Topology
from fxrec.types import TableInfo

LR, EPS = 0.1, 1e-8
MIXED = [TableInfo("a", 20, 4, pooling="sum"), TableInfo("b", 30, 6, pooling="mean"), TableInfo("c", 10, 4)]
SUMS = [TableInfo("a", 20, 4, pooling="sum"), TableInfo("b", 30, 6, pooling="sum")]  # fbgemm: one pooling
UNPOOLED = [TableInfo("u", 20, 4, pooling="none"), TableInfo("v", 30, 4, pooling="none")]


def _call(g, tables, b: int, weighted: bool):
    lengths = torch.randint(0, 4, (len(tables) * b,), generator=g)
    ids = torch.cat([torch.randint(0, t.num_embeddings, (int(n),), generator=g)
                     for t, ls in zip(tables, lengths.view(len(tables), b)) for n in [ls.sum()]])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    psw = torch.rand(ids.numel(), generator=g) if weighted else None
    return ids, offsets, psw


@pytest.mark.parametrize("tables, optimizer, kernel", [
    (tables, opt, "torch") for tables in (MIXED, UNPOOLED) for opt in (SGD(LR), RowWiseAdagrad(LR), Adam(LR))
] + [(tables, opt, "fbgemm") for tables in (SUMS, UNPOOLED) for opt in (SGD(LR), RowWiseAdagrad(LR))])  # no fbgemm Adam
def test_two_calls_update_as_one_call_on_both_batches(tables, optimizer, kernel):
    g = torch.Generator().manual_seed(0)
    pooled = tables is not UNPOOLED
    calls = [_call(g, tables, b, weighted=pooled and k == 0) for k, b in enumerate((3, 2))]
    twice = FusedEmbeddingBags(tables, optimizer, kernel=kernel)
    once = copy.deepcopy(twice)
    outs = [twice(ids, off, psw) for ids, off, psw in calls]
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    sum((o * gr).sum() for o, gr in zip(outs, grads)).backward()
    grad, ids, offsets, psw = merge_calls(once.layout, [(gr, *c) for gr, c in zip(grads, calls)])
    once.update(grad, ids, offsets, psw)
    assert_close(twice.weights, once.weights, rtol=1e-6, atol=1e-7)
    for key, value in twice.optimizer_state().items():
        assert_close(value, once.optimizer_state()[key], rtol=1e-6, atol=1e-7, msg=key)
    # the join is the batches laid end to end: its lookup is the two calls' outputs
    joined = once(ids, offsets, psw) if pooled else None
    if joined is not None:
        with torch.no_grad():
            assert_close(joined, torch.cat([once(i, o, w) for i, o, w in calls]))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.lin = nn.EmbeddingBag(10, 8, mode="sum"), nn.Linear(8, 1)  # 8: two column blocks

    def forward(self, x):
        return self.lin(self.e(x)).squeeze(1)


def _rwa_reference(model: _Twice, batches: list, scale: float) -> None:
    """One SGD step of the dense layer and one RowWiseAdagrad step of the table (from zero
    state), on the loss of the two calls."""
    model.zero_grad()
    (sum(model(x).square().sum() for x in batches) * scale).backward()
    with torch.no_grad():
        g = model.e.weight.grad
        acc = g.square().mean(1)
        model.e.weight -= LR * g / (acc.sqrt() + EPS).unsqueeze(1)
        for p in model.lin.parameters():
            p -= LR * p.grad


def _two_calls(rank: int, world: int, sharding: str) -> dict:
    torch.manual_seed(0)
    model = _Twice()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    # every rank's two local batches; ids 1 and 2 in both calls of every rank
    local = [[torch.cat([torch.tensor([[1, 2]]), torch.randint(0, 10, (2, 2), generator=g)]) for _ in range(2)]
             for _ in range(world)]
    sm = shard(model, Topology(world), (local[rank][0],), constraints={"e": sharding},
               sparse_optimizer=RowWiseAdagrad(LR, eps=EPS))
    (sm(local[rank][0]).square().sum() + sm(local[rank][1]).square().sum()).backward()
    torch.optim.SGD(sm.parameters(), lr=LR).step()
    # unsharded: the global batch of each call, the loss averaged over ranks (as the gradients are)
    _rwa_reference(reference, [torch.cat([local[r][k] for r in range(world)]) for k in range(2)], 1 / world)
    full = sm.full_state_dict()
    return {k: (full[k], v) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "data_parallel"])
def test_a_sharded_model_called_twice_updates_once(sharding):
    for got, want in _two_calls(0, 1, sharding).values():
        assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_sharded_model_called_twice_updates_once_on_two_ranks():
    def check(results):
        for res in results:
            for key, (got, want) in res.items():
                assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    # data_parallel: ReplicatedLookup's path; column_wise: exact RowWiseAdagrad's (row_sync.py),
    # each row's accumulator summed over both ranks' column shards
    for sharding in ("table_wise", "row_wise", "data_parallel", "column_wise"):
        check(run_workers(_two_calls, 2, sharding, timeout=120))


class _SharedFeatures(nn.Module):
    """One EBC table read by two features: dynamo breaks the graph at each feature's
    KeyedJaggedTensor lookup, so one compiled graph serves both, called twice."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a", "b"])])
        self.top = nn.Linear(8, 1)

    def forward(self, kjt):
        return self.top(self.ebc(kjt).values()).squeeze(1)


def test_compiled_training_with_a_table_shared_across_graph_breaks():
    from fxrec.lowering import backend as B

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = _SharedFeatures()
        reference = copy.deepcopy(model)
        kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([2, 5, 2, 7, 1, 2]), lengths=torch.tensor([2, 1, 0, 1, 1, 1]))
        compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": RowWiseAdagrad(LR, eps=EPS),
                                                                 "dense": "eager"})
        compiled(kjt).square().mean().backward()
        torch.optim.SGD(model.top.parameters(), lr=LR).step()
        reference(kjt).square().mean().backward()
        with torch.no_grad():
            table = reference.ebc.embedding_bags["t"].weight
            acc = table.grad.square().mean(1)
            table -= LR * table.grad / (acc.sqrt() + EPS).unsqueeze(1)
            for p in reference.top.parameters():
                p -= LR * p.grad
        for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
        assert any("serves groups" in line for g in B.compiled for line in g.meta["fxrec_log"])
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------ backwards that do not train
class _Weighted(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.other, self.lin = nn.EmbeddingBag(10, 4, mode="sum"), nn.EmbeddingBag(10, 4), nn.Linear(8, 1)

    def forward(self, ids, offsets, w):
        return self.lin(torch.cat([self.bag(ids, offsets, per_sample_weights=w), self.other(ids, offsets)], 1))


def _weighted_batch(g, b=3):
    ids = torch.randint(0, 10, (2 * b,), generator=g)
    return ids, torch.arange(0, 2 * b, 2), torch.rand(2 * b, generator=g, requires_grad=True)


class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("a backward that fails")


def _quiet_backwards(rank: int, world: int, sharding: str) -> dict:
    """torch.autograd.grad(loss, [per-sample weights]) asks one gradient: no table moves (in
    the unsharded model no optimizer steps either), and the gradient is the unsharded one.
    Then a backward that raises, and a good step after it: as the unsharded good step."""
    torch.manual_seed(0)
    model = _Weighted()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    local = [_weighted_batch(g) for _ in range(world)]
    sm = shard(model, Topology(world), local[rank][:2] + (local[rank][2].detach(),),
               constraints={"bag": sharding, "other": sharding}, sparse_optimizer=RowWiseAdagrad(LR, eps=EPS))
    before = sm.full_state_dict()
    (got,) = torch.autograd.grad(sm(*local[rank]).square().sum(), [local[rank][2]])
    after = sm.full_state_dict()
    out = {"moved": [k for k in before if not torch.equal(before[k], after[k])]}
    ids = torch.cat([b[0] for b in local])
    offsets = torch.arange(0, ids.numel(), 2)
    w = torch.cat([b[2].detach() for b in local]).requires_grad_(True)
    (want,) = torch.autograd.grad(reference(ids, offsets, w).square().sum(), [w])
    out["psw_grad"] = (got, want[6 * rank:6 * rank + 6])
    try:
        (_Raise.apply(sm(*local[rank])).sum()).backward()
    except RuntimeError:
        pass
    opt = torch.optim.SGD(sm.parameters(), lr=LR)
    opt.zero_grad()
    sm(*local[rank]).square().sum().backward()
    opt.step()
    reference(ids, offsets, w.detach()).square().sum().div(world).backward()
    with torch.no_grad():
        for name in ("bag", "other"):
            table = getattr(reference, name).weight
            acc = table.grad.square().mean(1)
            table -= LR * table.grad / (acc.sqrt() + EPS).unsqueeze(1)
        for p in reference.lin.parameters():
            p -= LR * p.grad
    full = sm.full_state_dict()
    out["after_good_step"] = {k: (full[k], v) for k, v in reference.state_dict().items()}
    return out


def _check_quiet(results):
    for res in results:
        assert res["moved"] == []
        assert_close(*res["psw_grad"], rtol=1e-5, atol=1e-6)
        for key, (got, want) in res["after_good_step"].items():
            assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)


def test_autograd_grad_does_not_train_and_a_failed_backward_is_forgotten():
    _check_quiet([_quiet_backwards(0, 1, "table_wise")])


def test_autograd_grad_does_not_train_and_a_failed_backward_is_forgotten_on_two_ranks():
    for sharding in ("table_wise", "data_parallel"):  # data_parallel: ReplicatedLookup, and dense grad sync
        _check_quiet(run_workers(_quiet_backwards, 2, sharding, timeout=120))
