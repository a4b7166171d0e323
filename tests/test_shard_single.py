"""fxrec.shard in one process (world size 1, no process group): the rewrite's structure,
its numbers against the unsharded model, training, state dicts, meta-device models, errors."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from fxrec.passes.grad_mode import grad_states
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.optim import SGD, RowWiseAdagrad
from fxrec.passes import lookup as L
from fxrec.planner.plan import PlanError
from fxrec.runtime import comm
from fxrec.runtime.tables import deterministic_init
from fxrec.shard import ShardedModel, shard
from fxrec.topology import Topology
from fxrec.types import TableInfo
import models_zoo
import shard_models
from shard_models import CASES, assert_state_like, train_side_by_side

B = 3


def _make(name: str, seed: int = 0):
    case = CASES[name]
    torch.manual_seed(seed)
    model = case.build()
    return case, model, case.local_batches(1, B, seed=1)[0]


def _all(model, batch, sharding: str) -> dict:
    return {t.name: sharding for t in fxrec.find_tables(model, batch)}


def _comm_counts(sm: ShardedModel) -> dict:
    counts: dict = {}
    for node in sm.module.graph.nodes:
        kind = node.meta.get(L.COMM)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


# ------------------------------------------------------------------ structure + numbers
@pytest.mark.parametrize("name, constraints, expected", [
    # one unit for the three bags: ids all-to-all (counts + data), then the results back
    ("dlrm_lists", "table_wise", {"all_to_all_counts": 1, "all_to_all": 2}),
    ("dlrm_lists", "row_wise", {"all_to_all_counts": 1, "all_to_all": 1, "reduce_scatter": 1}),
    ("dlrm_lists", "table_row_wise", {"all_to_all_counts": 1, "all_to_all": 2, "reduce_scatter": 1}),
    ("dlrm_lists", "data_parallel", {}),
    ("dlrm_lists", {"emb_l.0": "table_wise", "emb_l.1": "row_wise", "emb_l.2": "table_row_wise"},
     {"all_to_all_counts": 1, "all_to_all": 3, "reduce_scatter": 2}),
    ("dlrm_ebc", "row_wise", {"all_to_all_counts": 1, "all_to_all": 1, "reduce_scatter": 1}),
    # per-sample weights travel in their own all-to-all
    ("weighted_mean", "table_wise", {"all_to_all_counts": 1, "all_to_all": 3}),
    # the shared item table serves a pooled and an unpooled read: rows come back by all-to-all
    ("two_tower", "row_wise", {"all_to_all_counts": 1, "all_to_all": 2}),
    ("sequence_ec", "table_wise", {"all_to_all_counts": 1, "all_to_all": 2}),
])
def test_structure_and_forward(name, constraints, expected):
    case, model, batch = _make(name)
    cons = _all(model, batch, constraints) if isinstance(constraints, str) else constraints
    sm = shard(model, Topology(1), batch, constraints=cons)
    sm.module.graph.lint()
    assert _comm_counts(sm) == expected
    assert not [n for n in sm.module.graph.nodes if L.LOOKUP in n.meta]  # every lookup rewritten
    assert all(n.meta.get(L.PASS) for n in sm.module.graph.nodes)
    assert all(sm.plan[t].sharding == s for t, s in cons.items())
    fresh = case.local_batches(1, B, seed=7)[0]
    assert_close(sm(*fresh), model(*fresh), rtol=1e-6, atol=1e-6)


def test_comm_nodes_are_comm_functions():
    _, model, batch = _make("dlrm_ebc")
    sm = shard(model, Topology(1), batch, constraints=_all(model, batch, "row_wise"))
    targets = {n.target for n in sm.module.graph.nodes if n.meta.get(L.COMM)}
    assert targets == {comm.all_to_all_counts, comm.all_to_all, comm.reduce_scatter}


def test_parameters_are_dense_only_and_state_dict_is_full():
    _, model, batch = _make("two_tower")
    sm = shard(model, Topology(1), batch)
    dense = {n for n, _ in model.named_parameters() if ".item." not in n and ".user." not in n}
    assert {n.removeprefix("module.") for n, _ in sm.named_parameters()} == dense
    full, ref = sm.full_state_dict(), model.state_dict()
    assert list(full) == list(ref)  # the shared item table appears under both of its keys
    for key in ref:
        assert_close(full[key], ref[key])


@pytest.mark.parametrize("name, sharding, optimizer", [
    ("dlrm_ebc", "row_wise", "sgd"),
    ("two_tower", "table_wise", "rowwise_adagrad"),
    ("weighted_mean", "data_parallel", "rowwise_adagrad"),
    ("sequence", "table_row_wise", "sgd"),
])
def test_training_matches_unsharded(name, sharding, optimizer):
    case, model, batch = _make(name)
    ref = copy.deepcopy(model)
    tables = {t.name for t in fxrec.find_tables(model, batch)}
    sparse = SGD(0.1) if optimizer == "sgd" else RowWiseAdagrad(0.1)
    sm = shard(model, Topology(1), batch, constraints={t: sharding for t in tables}, sparse_optimizer=sparse)
    names = L.table_names_by_param(ref)
    t_params = [p for n, p in ref.named_parameters() if names[n] in tables]
    d_params = [p for n, p in ref.named_parameters() if names[n] not in tables]
    opt, ref_opt = torch.optim.SGD(sm.parameters(), lr=0.1), torch.optim.SGD(d_params, lr=0.1)
    momentum = [torch.zeros(p.shape[0]) for p in t_params]
    for step in range(3):
        x = case.local_batches(1, B, seed=20 + step)[0]
        opt.zero_grad()
        sm(*x).square().mean().backward()
        opt.step()
        ref.zero_grad()
        ref(*x).square().mean().backward()
        ref_opt.step()
        with torch.no_grad():
            for p, m in zip(t_params, momentum):
                g = torch.zeros_like(p) if p.grad is None else p.grad
                if optimizer == "sgd":
                    p -= 0.1 * g
                else:
                    m += (g * g).mean(1)
                    p -= (0.1 / (m.sqrt() + 1e-8)).unsqueeze(1) * g
    full = sm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, rtol=1e-5, atol=1e-6)


def test_load_full_state_dict():
    _, model, batch = _make("dlrm_ebc")
    sm = shard(model, Topology(1), batch, constraints=_all(model, batch, "row_wise"))
    torch.manual_seed(3)
    other = CASES["dlrm_ebc"].build()
    sm.load_full_state_dict(other.state_dict())
    assert_close(sm(*batch), other(*batch))


@pytest.mark.parametrize("key, value, error, match", [
    # a 0-d tensor would broadcast over the weight (copy_), filling it silently
    ("top_l.0.weight", torch.tensor(7.0), ValueError, r"'top_l.0.weight' is \(\), the model's is \(8, 14\)"),
    ("top_l.0.bias", torch.zeros(3), ValueError, r"'top_l.0.bias' is \(3,\), the model's is \(8,\)"),
    ("top_l.0.bias", [0.0] * 8, TypeError, r"'top_l.0.bias' must be a tensor, got list"),
    ("emb_l.1.weight", [[0.0]], TypeError, r"'emb_l.1.weight' \(table 'emb_l.1'\) must be a tensor, got list"),
])
def test_load_state_dict_refuses_a_value_of_another_shape_or_type(key, value, error, match):
    _, model, batch = _make("dlrm_lists")
    sm = shard(model, Topology(1), batch)
    before = sm.full_state_dict()
    for load in (sm.load_state_dict, sm.load_full_state_dict):
        with pytest.raises(error, match=match):
            load({**model.state_dict(), key: value})
    for k, v in sm.full_state_dict().items():  # refused before anything was copied
        assert torch.equal(v, before[k]), k


class MetaTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 24, 4, ["a"]),
                                           EmbeddingBagConfig("t_b", 8, 4, ["b"], pooling="mean")])
        self.lin = nn.Linear(8, 1)

    def forward(self, kjt):
        return self.lin(self.ebc(kjt).values())


def test_meta_model_initialises_deterministically():
    with torch.device("meta"):
        model = MetaTables()
    kjt = CASES["weighted_mean"].local_batches(1, B, seed=1)[0][4]
    cons = {"ebc.embedding_bags.t_a": "row_wise", "ebc.embedding_bags.t_b": "table_wise"}
    sm = shard(model, Topology(1), (kjt,), constraints=cons, seed=5)
    full = sm.full_state_dict()
    for name, rows in (("t_a", 24), ("t_b", 8)):
        expected = deterministic_init(f"ebc.embedding_bags.{name}", rows, 4, (0, rows), (0, 4), seed=5)
        assert_close(full[f"ebc.embedding_bags.{name}.weight"], expected)
    assert model.ebc.embedding_bags["t_a"].weight.is_meta  # the user's tables stay unmaterialised
    assert not any(p.is_meta for p in sm.parameters())  # dense layers got storage and reset_parameters()
    ref = MetaTables()
    ref.load_state_dict(full)
    assert_close(sm(kjt), ref(kjt))


# ------------------------------------------------------------------ errors
class _LastItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.item = nn.Embedding(40, 8)
        self.lin = nn.Linear(8, 1)

    def forward(self, seq):
        return self.lin(self.item(seq[:, -1]))  # a non-contiguous column of ids


@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise"])
def test_non_contiguous_ids_raise_no_warning_from_inside_fxrec(sharding):
    torch.manual_seed(0)
    x = torch.randint(0, 40, (3, 6))
    sm = shard(_LastItem(), Topology(1), (x,), constraints={"item": sharding}, sparse_optimizer=SGD(0.1))
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch's bucketize warning is once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sm(x).sum().backward()
    finally:
        torch.set_warn_always(was)


def test_world_size_mismatch():
    _, model, batch = _make("dlrm_lists")
    with pytest.raises(ValueError, match=r"topology has world_size 2 but this job has 1 rank"):
        shard(model, Topology(2), batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host has CUDA")
def test_a_cuda_topology_without_cuda_is_refused():
    _, model, batch = _make("dlrm_lists")
    with pytest.raises(ValueError, match=r"topology.device='cuda' but torch.cuda.is_available\(\) is False"):
        shard(model, Topology(1, device="cuda"), batch)


@pytest.mark.parametrize("seed", ["a", None, 1.5, True, float("inf"), 2 ** 64])
def test_a_seed_that_is_not_a_whole_number_is_refused(seed):
    # refused also where no table is on meta (the seed then goes unused)
    _, model, batch = _make("dlrm_lists")
    with pytest.raises(ValueError, match=rf"fxrec.shard: seed must be a whole number .*, got {re.escape(repr(seed))} "):
        shard(model, Topology(1), batch, seed=seed)


def test_plan_missing_a_table():
    _, model, batch = _make("dlrm_lists")
    tables = fxrec.find_tables(model, batch)
    plan = fxrec.plan(tables[:2], Topology(1))
    with pytest.raises(ValueError, match=r"plan has no entry for table 'emb_l.2'"):
        shard(model, Topology(1), batch, plan=plan)


def test_plan_for_another_topology():
    _, model, batch = _make("dlrm_lists")
    plan = fxrec.plan(fxrec.find_tables(model, batch), Topology(2))
    with pytest.raises(PlanError, match=r"plan was made for 2 ranks .* not 1"):
        shard(model, Topology(1), batch, plan=plan)


def test_plan_for_other_table_sizes():
    _, model, batch = _make("dlrm_lists")
    tables = [t if t.name != "emb_l.1" else TableInfo("emb_l.1", 99, 8) for t in fxrec.find_tables(model, batch)]
    with pytest.raises(ValueError, match=r"table 'emb_l.1' was planned as 99 x 8 but the model's is 24 x 8"):
        shard(model, Topology(1), batch, plan=fxrec.plan(tables, Topology(1)))


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "data_parallel"])
def test_id_out_of_range(sharding):
    _, model, batch = _make("dlrm_lists")
    sm = shard(model, Topology(1), batch, constraints=_all(model, batch, sharding))
    dense, offsets, ids = batch
    bad = [i.clone() for i in ids]
    bad[1][0] = 24
    with pytest.raises(ValueError, match=r"table 'emb_l.1' \(lookup %emb_l_1\): id 24 outside \[0, 24\)"):
        sm(dense, offsets, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int16])
def test_ids_of_another_dtype_are_refused(dtype):
    """F.embedding_bag refuses them; fxrec's lookup would have truncated a float id to a row."""
    _, model, batch = _make("dlrm_lists")
    sm = shard(model, Topology(1), batch)
    dense, offsets, ids = batch
    bad = [i if k != 2 else i.to(dtype) for k, i in enumerate(ids)]
    with pytest.raises(TypeError, match=rf"table 'emb_l.2' \(lookup %emb_l_2\): ids must be int64 or int32, got {dtype}"):
        sm(dense, offsets, bad)


@pytest.mark.parametrize("which", ["ids", "offsets"])
def test_ids_or_offsets_that_are_not_tensors_are_refused(which):
    """A list (ids.tolist()) failed with AttributeError: 'list' object has no attribute 'dim'."""
    _, model, batch = _make("dlrm_lists")
    sm = shard(model, Topology(1), batch)
    dense, offsets, ids = batch
    ids = [i.tolist() if k == 1 and which == "ids" else i for k, i in enumerate(ids)]
    offsets = [o.tolist() if k == 1 and which == "offsets" else o for k, o in enumerate(offsets)]
    with pytest.raises(TypeError, match=rf"table 'emb_l.1' \(lookup %emb_l_1\): {which} must be a tensor"):
        sm(dense, offsets, ids)


class _PaddedBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.bags = nn.EmbeddingBag(10, 4, mode="mean", padding_idx=0)

    def forward(self, ids, offsets):
        return self.bags(ids, offsets)


@pytest.mark.parametrize("offsets, error", [
    ([0, 2], None),
    ([0, 0, 5], None),  # an empty bag, and a bag at the very end holding no id
    ([0, 3, 2], r"table 'bags' \(lookup %bags\): bag length -1 is negative \(offsets must not decrease, nor pass "
                r"the number of ids, \d+\)"),
    ([1, 2], r"table 'bags' \(lookup %bags\): bag lengths sum to 4 but there are 5 ids"),
    ([0, 9], r"bag length -4 is negative"),
])
def test_offsets_with_padding_ids(offsets, error):
    """Dropping padding ids from bags must not fail on bad offsets before the check names them."""
    torch.manual_seed(0)
    model = _PaddedBags()
    ids = torch.tensor([1, 0, 2, 0, 4])
    sm = shard(model, Topology(1), (ids, torch.tensor([0, 2])))
    if error is None:
        assert_close(sm(ids, torch.tensor(offsets)), model(ids, torch.tensor(offsets)))
    else:
        with pytest.raises(ValueError, match=error):
            sm(ids, torch.tensor(offsets))


def test_weights_must_stay_present():
    case, model, batch = _make("weighted_mean")
    sm = shard(model, Topology(1), batch)
    ids, offsets, _, fixed, kjt = batch
    with pytest.raises(ValueError, match=r"table 'bag' .*per-sample weights were present .* absent now"):
        sm(ids, offsets, None, fixed, kjt)


def test_missing_feature_named_with_its_table():
    _, model, (dense, kjt) = _make("dlrm_ebc")
    sm = shard(model, Topology(1), (dense, kjt))
    keys, b = kjt.keys()[:-1], dense.shape[0]  # every feature but the last
    lengths = kjt.lengths()[:len(keys) * b]
    short = fxrec.KeyedJaggedTensor.from_lengths_sync(keys=keys, values=kjt.values()[:int(lengths.sum())],
                                                      lengths=lengths)
    tail = f", feature {kjt.keys()[-1]!r}): the feature is missing from the input"
    with pytest.raises(KeyError, match=r"table '\S+' \(lookup %\w+" + re.escape(tail)):
        sm(dense, short)


def test_weights_must_match_the_ids():
    case, model, batch = _make("weighted_mean")
    sm = shard(model, Topology(1), batch)
    ids, offsets, w, fixed, kjt = batch
    with pytest.raises(ValueError, match=rf"table 'bag' \(lookup %bag\): {w.numel() - 1} per-sample weights "
                                         rf"for {ids.numel()} ids"):
        sm(ids, offsets, w[:-1], fixed, kjt)


def test_bad_sparse_optimizer():
    _, model, batch = _make("dlrm_lists")
    with pytest.raises(ValueError, match=r"sparse_optimizer must be fxrec.optim"):
        shard(model, Topology(1), batch, sparse_optimizer=torch.optim.SGD)



def test_tables_left_dense_are_named_in_a_warning():
    case = CASES["odd_tables"]
    model, _, batches, _ = case.setup(1, B, seed=0)
    with pytest.warns(UserWarning, match=r"table\(s\) \['item', 'tags'\] stay dense parameters .*'item': its "
                                         r"weight is also read outside embedding lookups, by %t .*"
                                         r"'tags': %tags\w*: mode='max' pooling is not supported"):
        sm = shard(model, Topology(1), batches[0])
    assert sorted(sm.plan) == ["codes", "hist", "negs", "pre", "user"]
    assert sm.frozen == ("pre", "codes", "negs")
    notes = fxrec.passes.PassContext(example_inputs=batches[0])
    fxrec.passes.run_passes(fxrec.capture(case.build(), batches[0]), notes, until="detect_embeddings")
    log = "\n".join(notes.log)
    assert "detect_embeddings: table(s) ['pre', 'codes'] are frozen (requires_grad=False, or a buffer)" in log
    assert "detect_embeddings: table(s) ['negs'] are frozen: every lookup of them runs with gradients off" in log
    assert {"module.item.weight", "module.tags.weight"} <= {n for n, _ in sm.named_parameters()}


class _NoTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="max")
        self.lin = nn.Linear(3, 4)

    def forward(self, ids, x):
        return self.bag(ids) + self.lin(x)


@pytest.mark.parametrize("max_bag, why", [
    (True, r"each of its lookups is left dense \('bag': %bag: mode='max' pooling is not supported"),
    (False, r"it calls no nn.EmbeddingBag, nn.Embedding")])
def test_a_model_without_a_table_to_shard_is_refused(max_bag, why):
    model = _NoTable()
    inputs = (torch.randint(0, 10, (B, 2)), torch.randn(B, 3))
    if not max_bag:
        model.bag, inputs = nn.Identity(), (torch.randn(B, 4), torch.randn(B, 3))
    with pytest.raises(ValueError, match=r"fxrec.shard: _NoTable has no embedding table to shard: " + why):
        shard(model, Topology(1), inputs)

@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "data_parallel"])
def test_per_sample_weight_gradients(sharding):
    _, model, batch = _make("weighted_mean")
    ref = copy.deepcopy(model)
    sm = shard(model, Topology(1), batch, constraints=_all(model, batch, sharding))
    ids, offsets, w, fixed, kjt = batch
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    sm(ids, offsets, w1, fixed, kjt).square().mean().backward()
    ref(ids, offsets, w2, fixed, kjt).square().mean().backward()
    assert_close(w1.grad, w2.grad)


def test_user_model_untouched_and_optimizer_swappable():
    _, model, batch = _make("dlrm_ebc")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sm = shard(model, Topology(1), batch, sparse_optimizer=RowWiseAdagrad(0.1))
    sm(*batch).sum().backward()
    for key, value in model.state_dict().items():  # tables train in the shards, not in the model
        if "embedding_bags" in key:
            assert_close(value, before[key])
    assert sm.sparse_optimizer == RowWiseAdagrad(0.1)
    sm.sparse_optimizer = RowWiseAdagrad(0.01)
    assert sm.sparse_optimizer == RowWiseAdagrad(0.01)
    with pytest.raises(ValueError, match="must stay a RowWiseAdagrad"):
        sm.sparse_optimizer = SGD(0.1)


def test_exact_column_wise_cannot_change_after_shard():
    """The row sync of exact_column_wise is built at shard time (and a checkpoint lays out the
    accumulators by it): a new optimizer that changes it is refused, not ignored."""
    _, model, batch = _make("dlrm_lists")
    sm = shard(model, Topology(1), batch, sparse_optimizer=RowWiseAdagrad(0.1))
    with pytest.raises(ValueError, match=r"table 'emb_l.0' was sharded with exact_column_wise=True, got "
                                         r"RowWiseAdagrad\(lr=0.5, eps=1e-08, exact_column_wise=False\); "
                                         r"exact_column_wise cannot change after shard"):
        sm.sparse_optimizer = RowWiseAdagrad(0.5, exact_column_wise=False)
    assert sm.sparse_optimizer == RowWiseAdagrad(0.1)
    sm.sparse_optimizer = RowWiseAdagrad(0.5)
    assert sm.sparse_optimizer == RowWiseAdagrad(0.5)


@pytest.mark.parametrize("name", ["functional_bag", "functional_embedding", "bag_2d", "table_dict", "seq_attention"])
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise", "data_parallel"])
def test_lookup_styles(name, sharding):
    """The other ways users write lookups (models_zoo): F.embedding_bag on a parameter, a
    folded F.embedding(...).sum(1), 2-D ids, a dict of tables, padded token ids."""
    case = models_zoo.CASES[name]
    model, batch = case.make(0)
    sm = shard(model, Topology(1), batch, constraints=_all(model, batch, sharding))
    assert not [n for n in sm.module.graph.nodes if L.LOOKUP in n.meta]
    fresh = case.inputs(3)
    assert_close(sm(*fresh), model(*fresh), rtol=1e-6, atol=1e-6)


def test_export_captured_lookups_are_refused():
    model, batch = models_zoo.CASES["shape_branch"].make(0)  # fx cannot trace it: torch.export's aten ops
    with pytest.raises(ValueError, match=r"lookup %embedding_bag at models_zoo.py:\d+ .* of kind 'aten_bag' cannot be "
                                         r"sharded yet .*capture the model with torch.fx, which failed on it: "
                                         r"TraceError: symbolically traced variables cannot be used as inputs to "
                                         r"control flow"):
        shard(model, Topology(1), batch)


def test_embedding_collection_ignores_weights():
    torch.manual_seed(0)
    model = CASES["sequence_ec"].build()
    g = torch.Generator().manual_seed(1)
    kjt = shard_models._kjt(g, {"hist": 30, "clicks": 30, "query": 15}, B, weighted=True)
    sm = shard(model, Topology(1), (kjt,), constraints={"ec.embeddings.t_item": "row_wise"})
    assert_close(sm(kjt), model(kjt))


def test_plan_and_constraints_exclusive():
    _, model, batch = _make("dlrm_lists")
    plan = fxrec.plan(fxrec.find_tables(model, batch), Topology(1))
    with pytest.raises(ValueError, match="give a plan or constraints to plan with, not both"):
        shard(model, Topology(1), batch, plan=plan, constraints={"emb_l.0": "row_wise"})


class _IdsUnderNoGrad(nn.Module):
    """Ids hashed inside a no_grad block, looked up after it: the fused unit goes after the
    block (inside it, it would train nothing)."""

    def __init__(self):
        super().__init__()
        self.bag, self.other = nn.EmbeddingBag(30, 4, mode="sum"), nn.EmbeddingBag(30, 4, mode="sum")
        self.lin = nn.Linear(4, 1)

    def forward(self, ids, raw):
        with torch.no_grad():
            hashed = (raw * 7) % 30
        return self.lin(self.bag(ids) + self.other(hashed))


class _UnitAcrossABlock(nn.Module):
    """`first` is read before the block and its result used inside it; `second`'s ids come
    from inside it."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.EmbeddingBag(30, 4, mode="sum"), nn.EmbeddingBag(30, 4, mode="sum")
        self.lin = nn.Linear(4, 1)

    def forward(self, ids, raw):
        a = self.first(ids)
        with torch.no_grad():
            scale = a.abs().mean()
            hashed = (raw * 7) % 30
        return self.lin(a * scale + self.second(hashed))


@pytest.mark.parametrize("build", [_IdsUnderNoGrad, _UnitAcrossABlock])
def test_lookups_around_a_no_grad_block_train_as_unsharded(build):
    """Every node of the sharded program runs in the grad mode it ran in the model (the
    runner's lint checks it), so three SGD steps equal unsharded training."""
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    batch = (torch.randint(0, 30, (B, 3)), torch.randint(0, 100, (B, 2)))
    sm = shard(model, Topology(1), batch, sparse_optimizer=fxrec.optim.SGD(lr=0.1))
    gens = [torch.Generator().manual_seed(step) for step in range(3)]
    train_side_by_side(sm, reference, [(torch.randint(0, 30, (B, 3), generator=g),
                                        torch.randint(0, 100, (B, 2), generator=g)) for g in gens])
    assert_state_like(sm, reference)


class _QuietNegatives(nn.Module):
    """Negatives from a table of their own, looked up only inside no_grad (`negs`), or from
    the item table that also serves the positives (`shared=True`)."""

    def __init__(self, shared: bool = False):
        super().__init__()
        self.shared = shared
        self.user, self.item, self.negs = nn.Embedding(20, 8), nn.Embedding(30, 8), nn.Embedding(30, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, u, pos, neg):
        uv, p = self.lin(self.user(u)), self.item(pos)
        with torch.no_grad():
            n = (self.item if self.shared else self.negs)((neg * 7) % 30)
        return torch.stack([(uv * p).sum(1), (uv * n).sum(1)], 1)


def _quiet_batch(g=None):
    return (torch.randint(0, 20, (B,), generator=g), torch.randint(0, 30, (B,), generator=g),
            torch.randint(0, 30, (B,), generator=g))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_a_table_read_only_under_no_grad_is_sharded_frozen(opt):
    """`negs` is a table (sharded, in the plan) that nothing trains: frozen, so it gets no
    sparse optimizer (Adam would step every row it is handed), and its unit runs inside the
    no_grad block; the other tables train as unsharded."""
    torch.manual_seed(0)
    model = _QuietNegatives()
    reference = copy.deepcopy(model)
    sparse = fxrec.optim.SGD(lr=0.1) if opt == "sgd" else fxrec.optim.Adam(lr=0.1)
    sm = shard(model, Topology(1), _quiet_batch(), sparse_optimizer=sparse)
    assert sorted(sm.plan) == ["item", "negs", "user"] and sm.frozen == ("negs",)
    states = grad_states(sm.module)
    lookups = {n.meta["fxrec_local_lookup"]["unit"]: states[n] for n in sm.module.graph.nodes
               if "fxrec_local_lookup" in n.meta}
    assert sorted(lookups.values(), key=str) == [False, "inherit"], lookups  # negs' unit inside the block
    train_side_by_side(sm, reference, [_quiet_batch(torch.Generator().manual_seed(step)) for step in range(3)])
    full = sm.full_state_dict()
    assert_close(full["negs.weight"], model.negs.weight, rtol=0, atol=0)  # never touched
    assert_close(full["negs.weight"], reference.negs.weight, rtol=0, atol=0)
    if opt == "adam":  # no plain-torch reference for fxrec's row-wise Adam: the trained tables did move
        assert not torch.equal(full["item.weight"], reference.item.weight)
        return
    assert_state_like(sm, reference)


def test_a_table_read_with_and_without_gradients_stays_dense():
    """The item table serves positives (trained) and negatives (under no_grad): one fused
    update could not tell the two reads apart, so it stays dense, named in the warning."""
    with pytest.warns(UserWarning, match=r"table\(s\) \['item'\] stay dense parameters .*'item': %item_1 reads it "
                                         r"with gradients off \(torch.no_grad\(\) at test_shard_single.py:\d+ .*\) "
                                         r"and another lookup with gradients on"):
        sm = shard(_QuietNegatives(shared=True), Topology(1), _quiet_batch())
    assert sorted(sm.plan) == ["user"] and sm.frozen == ()


def test_lint_refuses_a_node_moved_out_of_its_no_grad_block():
    from fxrec.passes.runner import lint

    gm = fxrec.capture(_UnitAcrossABlock(), (torch.randint(0, 30, (B, 3)), torch.randint(0, 100, (B, 2))))
    from fxrec.passes.grad_mode import stamp

    stamp(gm)
    mean = next(n for n in gm.graph.nodes if n.target == "mean")
    restore = [n for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled][-1]
    restore.append(mean)  # after the block's end
    gm.recompile()
    with pytest.raises(ValueError, match=r"changes the grad mode of 1 node\(s\): %mean ran with grad mode off and "
                                         r"would run with the caller's"):
        lint(gm)


def test_kjt_weights_of_another_dtype_are_cast_as_the_collection_casts_them():
    """fxrec's EmbeddingBagCollection casts a KeyedJaggedTensor's weights to the table's
    dtype (an nn.EmbeddingBag refuses them, and so does its sharded lookup)."""
    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a"])])

        def forward(self, kjt):
            return self.ebc(kjt).values()

    model = Weighted()
    kjt = fxrec.KeyedJaggedTensor(["a"], torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]),
                                  weights=torch.rand(3, dtype=torch.float64))
    sm = shard(model, Topology(1), (kjt,))
    with torch.no_grad():
        assert_close(sm(kjt), model(kjt))


@pytest.mark.parametrize("arguments, error", [
    ({"topology": 2}, r"fxrec.shard: topology must be a fxrec.Topology .*got int 2"),
    ({"model": None}, r"fxrec.shard: model must be a torch.nn.Module, got NoneType"),
    ({"plan": "{}"}, r"fxrec.shard: plan must be a fxrec.Plan \(Plan.from_json\(text\) reads a saved one\), got str"),
])
def test_arguments_of_the_wrong_type_are_named(arguments, error):
    _, model, batch = _make("dlrm_lists")
    given = {"model": model, "topology": Topology(1)} | arguments
    with pytest.raises(TypeError, match=error):
        shard(given.pop("model"), given.pop("topology"), batch, **given)


def test_plan_names_a_topology_of_the_wrong_type():
    _, model, batch = _make("dlrm_lists")
    with pytest.raises(TypeError, match=r"fxrec.plan: topology must be a fxrec.Topology .*got int 2"):
        fxrec.plan(model, 2, batch)


@pytest.mark.parametrize("cast", ["double", "half", "to_float64"])
def test_casting_a_sharded_model_is_refused(cast):
    """The fused shards and kernels keep the dtypes of shard time: a double model failed inside
    fbgemm's backward. A device move (.cpu()) goes through."""
    _, model, batch = _make("dlrm_lists")
    sm = shard(model, Topology(1), batch)
    into = "torch.float64" if cast != "half" else "torch.float16"
    with pytest.raises(TypeError, match=r"ShardedModel: its tables keep the dtypes they were sharded with "
                                        r"\(\['torch.float32'\]\); this cast would turn table 'emb_l.0' from "
                                        rf"torch.float32 into {into}, .*; cast the model before fxrec.shard"):
        sm.to(torch.float64) if cast == "to_float64" else getattr(sm, cast)()
    # a device move, and casts that leave fp32 tables as they are
    assert sm.cpu() is sm and sm.to("cpu") is sm and sm.float() is sm and sm.to(torch.float32) is sm
    with torch.no_grad():
        assert sm(*batch).dtype == torch.float32


@pytest.mark.parametrize("is_weighted", [None, False, True])
def test_is_weighted_decides_whether_the_sharded_lookup_applies_the_weights(is_weighted):
    """An EmbeddingBagCollection built with is_weighted=False ignores the per-sample weights a
    KeyedJaggedTensor carries, as TorchRec's does; sharded, lowered, compiled and trained it
    ignores them too (None and True apply them)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a"]),
                                               EmbeddingBagConfig("u", 7, 4, ["b"], pooling="mean")],
                                              is_weighted=is_weighted)

        def forward(self, kjt):
            return self.ebc(kjt).values()

    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([2, 1, 0, 3])
    kjt = fxrec.KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3, 4, 5, 6]), lengths=lengths,
                                  weights=torch.rand(6, generator=g) + 0.5)
    bare = fxrec.KeyedJaggedTensor(["a", "b"], kjt.values(), lengths=lengths)
    model = Model()
    if is_weighted is not True:  # (True refuses a batch without weights: the test below)
        with torch.no_grad():
            applied = not torch.equal(model(kjt), model(bare))
        assert applied == (is_weighted is None)
    reference = copy.deepcopy(model)
    lowered = fxrec.lower_for_inference(model, (kjt,), weight_dtype="fp32")
    from fxrec.lowering.backend import register
    register()
    compiled = torch.compile(copy.deepcopy(model), backend="fxrec", options={"dense": "eager"})
    with torch.no_grad():
        assert_close(lowered(kjt), reference(kjt))
        assert_close(compiled(kjt), reference(kjt))
    sm = shard(model, Topology(1), (kjt,), sparse_optimizer=SGD(0.5))
    with torch.no_grad():
        assert_close(sm(kjt), reference(kjt))
    sm(kjt).sum().backward()  # one step: the weights scale (or not) each id's gradient
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    reference(kjt).sum().backward()
    ref_opt.step()
    for name, want in reference.state_dict().items():
        assert_close(sm.full_state_dict()[name], want)


def test_is_weighted_true_needs_weights_and_is_told_apart():
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a"])], is_weighted=True)
    assert ebc.is_weighted() and not EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a"])]).is_weighted()
    with pytest.raises(ValueError, match="built with is_weighted=True, but the KeyedJaggedTensor carries no "
                                         "per-sample weights"):
        ebc(fxrec.KeyedJaggedTensor(["a"], torch.tensor([1]), lengths=torch.tensor([1])))
    with pytest.raises(TypeError, match="is_weighted must be True, False or None, got 'yes'"):
        EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a"])], is_weighted="yes")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tables_on_meta_feed_a_float32_layer(dtype):
    """A collection's half-precision tables give float32 (as TorchRec's), also as the stand-in
    capture builds for tables on the meta device: an fp32 Linear after them captures and
    shards (it failed with 'mat1 and mat2 must have the same dtype')."""
    class Model(nn.Module):
        def __init__(self, device):
            super().__init__()
            self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a"], dtype=dtype)], device=device)
            self.top = nn.Linear(4, 1)

        def forward(self, kjt):
            return self.top(self.ebc(kjt).values())

    kjt = fxrec.KeyedJaggedTensor(["a"], torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]))
    assert [t.dtype for t in fxrec.find_tables(Model("meta"), (kjt,))] == [dtype]
    sm = shard(Model("meta"), Topology(1), (kjt,))
    with torch.no_grad():
        assert sm(kjt).dtype == torch.float32 and sm(kjt).shape == (2, 1)


class _AdagradModel(nn.Module):
    """A mean bag, a sum bag with per-sample weights, and an unpooled nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.a = nn.EmbeddingBag(30, 8, mode="mean")
        self.b = nn.EmbeddingBag(20, 16, mode="sum")
        self.seq = nn.Embedding(25, 8)
        self.lin = nn.Linear(32, 1)

    def forward(self, ids, offsets, ids_b, offsets_b, psw, tokens):
        return self.lin(torch.cat([self.a(ids, offsets), self.b(ids_b, offsets_b, per_sample_weights=psw),
                                   self.seq(tokens).sum(1)], dim=1))


def _adagrad_batch(g):
    return (torch.randint(0, 30, (9,), generator=g), torch.tensor([0, 4, 4, 6]),
            torch.randint(0, 20, (7,), generator=g), torch.tensor([0, 2, 5, 7]),
            torch.rand(7, generator=g), torch.randint(0, 25, (4, 3), generator=g))


@pytest.mark.parametrize("kernel", ["torch", "fbgemm"])
def test_adagrad_trains_as_torch_optim_adagrad_over_the_whole_model(kernel, monkeypatch):
    """fxrec.optim.Adagrad on the tables + torch.optim.Adagrad on the dense layers equals
    torch.optim.Adagrad over every parameter of the unsharded model: a row no batch touched has
    a zero gradient, for which torch's dense Adagrad changes nothing either."""
    monkeypatch.setenv("FXREC_KERNEL", kernel)
    torch.manual_seed(0)
    model = _AdagradModel()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    sm = shard(model, Topology(1), _adagrad_batch(g), sparse_optimizer=fxrec.optim.Adagrad(0.1, eps=1e-10))
    opt = torch.optim.Adagrad(sm.parameters(), lr=0.1, eps=1e-10)
    ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.1, eps=1e-10)
    for _ in range(4):
        batch = _adagrad_batch(g)
        for run, o in ((sm, opt), (ref, ref_opt)):
            o.zero_grad()
            run(*batch).square().mean().backward()
            o.step()
    fused = [f for m in sm.modules() if type(m).__name__ == "LocalLookup" for f in m.fused_modules()]
    assert {f.kernels["backward_update"] for f in fused} == {kernel}
    assert_state_like(sm, ref)
    state = sm.local_optimizer_state()
    sums = {t: pieces[0][2]["sum"] for t, pieces in state.items()}
    for t in ("a", "b", "seq"):  # the accumulator is torch's "sum", element by element
        assert_close(sums[t].view(ref_opt.state[getattr(ref, t).weight]["sum"].shape),
                     ref_opt.state[getattr(ref, t).weight]["sum"])
