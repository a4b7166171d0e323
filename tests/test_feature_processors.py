"""Position-weighted features, as TorchRec's feature processors: the weights against a loop
over the bags, their gradients, the errors, and every path (torch.compile, lower_for_inference,
shard on 1 and 2 gloo ranks, trained 3 steps) against the unsharded model."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.feature_processors import (FeatureProcessedEmbeddingBagCollection, PositionWeightedModule,
                                      PositionWeightedModuleCollection)
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.optim import SGD
from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, validation
from fxrec.topology import Topology
from shard_models import Mismatches, _cat_kjt, _kjt, pipeline_like_steps, train_checked

B, STEPS, LR = 3, 3, 0.1
ROWS = {"a": 20, "b": 12, "c": 16}  # "a" and "c" position-weighted (dict form), "b" not
USER = {"u": 10}                    # position-weighted by a PositionWeightedModuleCollection
MAX_LEN = 3                         # _kjt's longest bag
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"]


class PositionWeighted(nn.Module):
    def __init__(self):
        super().__init__()
        ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_ab", 20, 8, ["a", "b"]),
                                      EmbeddingBagConfig("t_c", 16, 8, ["c"], pooling="mean")], is_weighted=True)
        self.fp_ebc = FeatureProcessedEmbeddingBagCollection(
            ebc, {"a": PositionWeightedModule(MAX_LEN), "c": PositionWeightedModule(MAX_LEN + 1)})
        self.pw = PositionWeightedModuleCollection({"u": MAX_LEN})
        self.user = EmbeddingBagCollection([EmbeddingBagConfig("t_u", 10, 8, ["u"])], is_weighted=True)
        self.lin = nn.Linear(32, 1)
        with torch.no_grad():  # not all ones, so that a weight at the wrong position shows
            for p in self.parameters():
                if p.dim() == 1 and p.numel() <= MAX_LEN + 1 and p is not self.lin.bias:
                    p.copy_(torch.rand(p.shape, device=p.device) + 0.5)

    def forward(self, kjt, user):
        pooled = self.fp_ebc(kjt).values()
        return self.lin(torch.cat([pooled, self.user(self.pw(user)).values()], dim=1)), pooled


def _batches(world: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(_kjt(g, ROWS, B, max_len=MAX_LEN), _kjt(g, USER, B, max_len=MAX_LEN)) for _ in range(world)]


def _concat(batches):
    return _cat_kjt([k for k, _ in batches]), _cat_kjt([u for _, u in batches])


def _loss(outputs):
    return sum(o.square().mean() for o in outputs)


def _loop_weights(kjt: KeyedJaggedTensor, weights: dict) -> torch.Tensor:
    """The reference: walk every bag, weight i of a bag is weights[key][i], else 1."""
    out = []
    for key in kjt.keys():
        for n in kjt[key].lengths().tolist():
            out += [weights[key][i] if key in weights else torch.tensor(1.0) for i in range(n)]
    return torch.stack(out) if out else torch.zeros(0)


# ------------------------------------------------------------------ the modules
def test_collection_weights_each_position_and_leaves_other_keys_at_one():
    g = torch.Generator().manual_seed(3)
    kjt = _kjt(g, {"a": 5, "b": 5, "c": 5}, 6, weighted=True)  # its own weights are replaced
    pw = PositionWeightedModuleCollection({"a": 3, "c": 4, "absent": 2})
    with torch.no_grad():
        for p in pw.position_weights.values():
            p.copy_(torch.randn(p.shape))
    out = pw(kjt)
    assert out.keys() == kjt.keys() and torch.equal(out.values(), kjt.values())
    assert torch.equal(out.lengths(), kjt.lengths())
    assert_close(out.weights(), _loop_weights(kjt, dict(pw.position_weights)))


def test_a_batch_per_key_is_weighted_by_each_keys_own_bags():
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(9), lengths=torch.tensor([3, 1, 2, 0, 1, 2]),
                            stride_per_key_per_rank=[[2], [4]],
                            inverse_indices=(["a", "b"], torch.tensor([[0, 1, 1, 0], [0, 1, 2, 3]])))
    pw = PositionWeightedModuleCollection({"a": 3, "b": 2})
    with torch.no_grad():
        for p in pw.position_weights.values():
            p.copy_(torch.randn(p.shape))
    out = pw(kjt)
    assert out.stride_per_key() == [2, 4] and out.inverse_indices_or_none() is not None
    assert_close(out.weights(), _loop_weights(kjt, dict(pw.position_weights)))


def test_position_weights_get_the_gradient_of_the_weighted_pooling():
    torch.manual_seed(0)
    model = PositionWeighted()
    kjt, user = _batches(1, seed=2)[0]
    model(kjt, user)[0].sum().backward()
    # reference: the same pooling from the loop's weights, differentiated by autograd
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ebc = ref.fp_ebc._embedding_bag_collection
    weights = {k: m.position_weight for k, m in ref.fp_ebc._feature_processors.items()}
    w = _loop_weights(kjt, weights)
    pooled = ebc(KeyedJaggedTensor(kjt.keys(), kjt.values(), weights=w, lengths=kjt.lengths())).values()
    wu = _loop_weights(user, dict(ref.pw.position_weights))
    u = ref.user(KeyedJaggedTensor(user.keys(), user.values(), weights=wu, lengths=user.lengths())).values()
    ref.lin(torch.cat([pooled, u], dim=1)).sum().backward()
    for (name, got), (_, want) in zip(model.named_parameters(), ref.named_parameters()):
        assert_close(got.grad, want.grad, msg=name)
    assert model.pw.position_weights["u"].grad.abs().sum() > 0


def test_one_feature_module_weights_a_jagged_tensor():
    pw = PositionWeightedModule(3)
    with torch.no_grad():
        pw.position_weight.copy_(torch.tensor([2.0, 3.0, 5.0]))
    jt = pw(JaggedTensor(torch.arange(6), lengths=torch.tensor([3, 0, 1, 2])))
    assert_close(jt.weights(), torch.tensor([2.0, 3.0, 5.0, 2.0, 2.0, 3.0]))
    assert torch.equal(jt.lengths(), torch.tensor([3, 0, 1, 2]))


BAD = [
    (lambda: PositionWeightedModuleCollection({"a": 0}), ValueError, r"'a' must be a positive int, got 0"),
    (lambda: PositionWeightedModuleCollection({"a": 2.5}), ValueError, r"'a' must be a positive int, got 2.5"),
    (lambda: PositionWeightedModuleCollection({}), ValueError, r"non-empty dict"),
    (lambda: PositionWeightedModule(-1), ValueError, r"positive int, got -1"),
    (lambda: FeatureProcessedEmbeddingBagCollection(
        EmbeddingBagCollection([EmbeddingBagConfig("t", 5, 2, ["a"])]), {"a": PositionWeightedModule(2)}),
     ValueError, r"is_weighted=True"),
    (lambda: FeatureProcessedEmbeddingBagCollection(
        EmbeddingBagCollection([EmbeddingBagConfig("t", 5, 2, ["a"])], is_weighted=True),
        {"z": PositionWeightedModule(2)}), ValueError, r"\['z'\], which no table reads"),
    (lambda: FeatureProcessedEmbeddingBagCollection(
        EmbeddingBagCollection([EmbeddingBagConfig("t", 5, 2, ["a"])], is_weighted=True), {"a": nn.Identity()}),
     TypeError, r"feature 'a' is a Identity"),
]


@pytest.mark.parametrize("build, error, match", BAD, ids=range(len(BAD)))
def test_bad_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_bag_longer_than_its_weights_is_named():
    pw = PositionWeightedModuleCollection({"a": 2, "c": 3})
    kjt = KeyedJaggedTensor(["a", "b", "c"], torch.arange(15), lengths=torch.tensor([1, 1, 0, 0, 9, 0, 0, 4, 0]))
    with pytest.raises(ValueError, match=r"feature 'c': bag 1 holds 4 ids, more than its max feature length 3"):
        pw(kjt)  # "b" (9 ids in a bag) has no weights and takes any length
    with pytest.raises(ValueError, match=r"bag 0 holds 3 ids, more than its max feature length 2"):
        PositionWeightedModule(2)(JaggedTensor(torch.arange(3), lengths=torch.tensor([3])))
    with validation(False), pytest.raises(IndexError):  # unchecked: torch's gather refuses it
        pw(kjt)


def test_state_dict_keys_are_torchrecs_and_a_kjt_without_keys_passes():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 5, 2, ["a"])], is_weighted=True)
    fp = FeatureProcessedEmbeddingBagCollection(ebc, {"a": PositionWeightedModule(2)})
    assert list(fp.state_dict()) == ["_embedding_bag_collection.embedding_bags.t.weight",
                                     "_feature_processors.a.position_weight"]
    out = PositionWeightedModuleCollection({"a": 3})(KeyedJaggedTensor.empty())
    assert out.keys() == [] and out.weights().numel() == 0


class BuildsItsBatch(nn.Module):
    """Builds its KJT in forward, and weights one feature with a single PositionWeightedModule."""

    def __init__(self):
        super().__init__()
        self.pw = PositionWeightedModuleCollection({"a": MAX_LEN})
        self.one = PositionWeightedModule(MAX_LEN)
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 20, 4, ["a", "b"])], is_weighted=True)
        self.lin = nn.Linear(12, 1)

    def forward(self, values, lengths, b_values, b_lengths):
        kjt = KeyedJaggedTensor(["a", "b"], values, lengths=lengths)
        b = self.one(JaggedTensor(b_values, lengths=b_lengths))  # a JaggedTensor built in forward too
        b_sum = torch.zeros(b_lengths.numel()).index_add(
            0, torch.repeat_interleave(torch.arange(b_lengths.numel()), b_lengths), b.weights())
        return self.lin(torch.cat([self.ebc(self.pw(kjt)).values(), b_sum.unsqueeze(1).expand(-1, 4)], dim=1))


def test_a_kjt_built_in_forward_is_captured_by_fx_and_sharded():
    torch.manual_seed(0)
    model = BuildsItsBatch()
    with torch.no_grad():
        model.one.position_weight.copy_(torch.tensor([2.0, 3.0, 5.0]))
    def args(seed, b):
        kjt = _kjt(torch.Generator().manual_seed(seed), {"a": 20, "b": 20}, b, max_len=MAX_LEN)
        return kjt.values(), kjt.lengths(), kjt["b"].values(), kjt["b"].lengths()
    gm = fxrec.capture(model, args(0, B), fallback=False)
    assert sum(n.op == "call_function" and n.target.__name__.startswith("position_weighted")
               for n in gm.graph.nodes) == 2
    sm = fxrec.shard(copy.deepcopy(model), Topology(1), args(0, B), sparse_optimizer=SGD(LR))
    with torch.no_grad():
        assert_close(sm(*args(1, B + 2)), model(*args(1, B + 2)))


def test_a_model_built_on_meta_keeps_real_position_weights_and_shards():
    with torch.device("meta"):
        model = PositionWeighted()
    mine = {n: p for n, p in model.named_parameters() if "position_weight" in n}
    assert len(mine) == 3 and not any(p.is_meta for p in mine.values())  # a few floats: kept real
    batch = _batches(1, seed=0)[0]
    sm = fxrec.shard(model, Topology(1), batch, sparse_optimizer=SGD(LR))
    full = sm.full_state_dict()
    for name, p in mine.items():
        assert torch.equal(full[name], p)
    assert sm(*batch)[0].shape == (B, 1)
    PositionWeightedModuleCollection({"a": 2}).reset_parameters()  # ones, as built
    # moved to meta after construction, the weights have no values to shard: said by name
    # (capture runs the processors beside meta weights on the real batch, fxrec/passes/shapes.py)
    with pytest.raises(ValueError, match=r"'fp_ebc._feature_processors.a.position_weight' .* is on the meta device"):
        fxrec.shard(PositionWeighted().to("meta"), Topology(1), batch, sparse_optimizer=SGD(LR))


# ------------------------------------------------------------------ compile and inference
def test_compile_and_lower_give_the_eager_values_and_compile_checks_lengths():
    torch.manual_seed(0)
    model = PositionWeighted().eval()
    example, batch = _batches(1, seed=0)[0], _batches(1, seed=5)[0]
    with torch.no_grad():
        want = model(*batch)
        compiled = torch.compile(copy.deepcopy(model), backend="fxrec")
        lowered = fxrec.lower_for_inference(copy.deepcopy(model), example, weight_dtype="fp32")
        for got in (compiled(*batch), lowered(*batch)):
            for g, w in zip(got, want):
                assert_close(g, w, rtol=1e-5, atol=1e-6)
        long_bag = KeyedJaggedTensor(["u"], torch.arange(5), lengths=torch.tensor([0, 5, 0]))
        for run in (compiled, lowered):
            with pytest.raises(ValueError, match=r"feature 'u': bag 1 holds 5 ids"):
                run(batch[0], long_bag)


# ------------------------------------------------------------------ sharded
def _tables(model) -> list[str]:
    return [t.name for t in fxrec.find_tables(model, _batches(1, seed=0)[0])]


def _run(rank: int, world: int, sharding: str) -> list[str]:
    """Shard every table `sharding`, compare the forward, train 3 steps (tables by fused SGD,
    the position weights and the linear layer by torch's SGD) and compare every parameter."""
    bad = Mismatches(sharding)
    torch.manual_seed(0)
    model = PositionWeighted()
    ref = copy.deepcopy(model)
    initial = copy.deepcopy(ref.state_dict())
    ref_tables = {n: p for n, p in ref.named_parameters() if ".embedding_bags." in n}
    batches = _batches(world, seed=1)
    sm = fxrec.shard(model, Topology(world), batches[rank], constraints={t: sharding for t in _tables(model)},
                     sparse_optimizer=SGD(LR))

    def sgd(tables):
        for p in tables.values():
            if p.grad is not None:
                p -= LR * p.grad
    full = train_checked(bad.check, sm, ref, ref_tables, batches,
                         [_batches(world, seed=10 + s) for s in range(STEPS)], _concat, _loss, rank, B, LR, sgd)
    for key in ref.state_dict():
        if "position_weight" in key and torch.equal(full[key], initial[key]):
            bad.append(f"{sharding}: {key} did not train")
    return bad


def _run_pipeline(rank: int, world: int, sharding: str) -> list[str]:
    """TrainPipeline against step-by-step training of the same sharded model: its input stage
    carries trained weights, so it runs on the main thread, and must train the same."""
    torch.manual_seed(0)
    model = PositionWeighted()
    cons = {t: sharding for t in _tables(model)}
    shard = lambda: fxrec.shard(copy.deepcopy(model), Topology(world), _batches(world, seed=1)[rank],  # noqa: E731
                                constraints=cons, sparse_optimizer=SGD(LR))
    piped, plain = shard(), shard()
    batches = [_batches(world, seed=10 + s)[rank] for s in range(STEPS)]
    return pipeline_like_steps(piped, plain, batches, _loss, LR)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_one_rank_shard_trains_like_the_unsharded_model(sharding):
    assert _run(0, 1, sharding) == []


def _too_long_on_one_rank(rank: int, world: int, sharding: str) -> list[str]:
    """Rank 1's batch has a bag longer than "u"'s position weights: every rank must raise it (it
    used to raise on rank 1 alone, before the exchange, and rank 0 waited in it)."""
    torch.manual_seed(0)
    model = PositionWeighted()
    batches = _batches(world, seed=1)
    sm = fxrec.shard(model, Topology(world), batches[rank], constraints={t: sharding for t in _tables(model)},
                     sparse_optimizer=SGD(LR))
    kjt, user = batches[rank]
    if rank == 1:
        user = KeyedJaggedTensor(["u"], torch.arange(MAX_LEN + 1), lengths=torch.tensor([0, MAX_LEN + 1, 0]))
    try:
        sm(kjt, user)
    except ValueError as e:
        want = (r"rank 1's batch: .*feature 'u'.*position weights \(fxrec.feature_processors\) take bags of up to "
                rf"{MAX_LEN} ids, and a bag holds {MAX_LEN + 1}")
        return [] if re.search(want, str(e)) else [f"{sharding}: rank {rank} raised {e}"]
    return [f"{sharding}: rank {rank} raised nothing"]


class OwnUse(nn.Module):
    """Position weights the model's own code reads: a standalone PositionWeightedModule's
    JaggedTensor, and a weighted key ("v") no table reads."""

    def __init__(self):
        super().__init__()
        self.pw = PositionWeightedModuleCollection({"u": MAX_LEN, "v": MAX_LEN})
        self.one = PositionWeightedModule(MAX_LEN)
        self.user = EmbeddingBagCollection([EmbeddingBagConfig("t_u", 10, 8, ["u"])], is_weighted=True)
        self.lin = nn.Linear(8, 1)

    def forward(self, kjt, values, lengths):
        weighted = self.pw(kjt)
        jt = self.one(JaggedTensor(values, lengths=lengths))
        return self.lin(self.user(weighted).values()) + weighted["v"].weights().sum() + jt.weights().sum()


def _own_use_batch(g, too_long: str = "") -> tuple:
    kjt = _kjt(g, {"u": 10, "v": 10}, B, max_len=MAX_LEN)
    lengths = torch.randint(0, MAX_LEN + 1, (B,), generator=g)
    if too_long == "v":
        kjt = KeyedJaggedTensor(["u", "v"], torch.arange(MAX_LEN + 1), lengths=torch.tensor(
            [0] * B + [0, MAX_LEN + 1] + [0] * (B - 2)))
    if too_long == "jt":
        lengths[2] = MAX_LEN + 1
    return kjt, torch.arange(int(lengths.sum())), lengths


def _too_long_read_by_the_model(rank: int, world: int, sharding: str) -> list[str]:
    """A too-long bag on rank 1 that no lookup reads (a standalone module's JaggedTensor, a
    weighted key no table reads) raises on every rank; it used to raise on rank 1 alone, or
    nowhere, and the next good batch trains."""
    torch.manual_seed(0)
    sm = fxrec.shard(OwnUse(), Topology(world), _own_use_batch(torch.Generator().manual_seed(0)),
                     constraints={"user.embedding_bags.t_u": sharding}, sparse_optimizer=SGD(LR))
    bad = []
    for where, want in (("jt", rf"rank 1's batch: position weights: bag 2 holds {MAX_LEN + 1} ids"),
                        ("v", rf"rank 1's batch: position weights of feature 'v': bag 1 holds {MAX_LEN + 1} ids")):
        batch = _own_use_batch(torch.Generator().manual_seed(rank), where if rank == 1 else "")
        try:
            sm(*batch)
            bad.append(f"{sharding} {where}: rank {rank} raised nothing")
        except ValueError as e:
            if not re.search(want, str(e)):
                bad.append(f"{sharding} {where}: rank {rank} raised {e}")
    sm(*_own_use_batch(torch.Generator().manual_seed(9 + rank))).sum().backward()
    return bad


def _job(rank: int, world: int, what: str, sharding: str) -> list[str]:
    run = {"train": _run, "pipeline": _run_pipeline, "too_long": _too_long_on_one_rank,
           "own_use": _too_long_read_by_the_model}[what]
    return run(rank, world, sharding)


_JOBS = [("train", s) for s in SHARDINGS] + [("pipeline", "row_wise"), ("too_long", "table_wise"),
                                             ("too_long", "data_parallel"), ("own_use", "table_wise"),
                                             ("own_use", "row_wise")]


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return merge_failures(run_workers(run_jobs, 2, _job, _JOBS, timeout=300))


@pytest.mark.parametrize("job", _JOBS, ids=[f"{w}-{s}" for w, s in _JOBS])
def test_two_gloo_ranks_train_like_the_unsharded_model(two_ranks, job):
    assert job in two_ranks, f"job not run (an earlier job on some rank failed): {sorted(two_ranks)[-1:]}"
    assert two_ranks[job] == [], "\n".join(two_ranks[job])
