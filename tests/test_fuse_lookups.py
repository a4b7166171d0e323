"""fuse_lookups: one fused LocalLookup call per group (groups sharing a table: one call),
numbers against the unfused model (forward and one training step), the kernel recorded on
each local lookup, FXREC_KERNEL / options["kernel"], the sharded (one-rank) program, and
the cases left unfused."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import fxrec
from fxrec.capture import capture
from fxrec.lowering import NoKernelError
from fxrec.lowering import fbgemm as fbgemm_backend
from fxrec.optim import SGD, Adam, RowWiseAdagrad
from fxrec.passes import PASSES, PassContext, PassError, lint, run_passes
from fxrec.passes import lookup as L
from fxrec.passes import runner
from fxrec.passes.apply_plan import LOCAL_LOOKUP
from fxrec.passes.fuse_lookups import FUSED, KERNEL, fuse_lookups_pass
from fxrec.runtime.local_lookup import LocalLookup
from fxrec.topology import Topology

try:
    from tests import models_zoo as zoo
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import models_zoo as zoo

FUSE = PASSES + [("fuse_lookups", fuse_lookups_pass)]
FB = "fbgemm" if fbgemm_backend.AVAILABLE else "torch"  # what the registry picks where fbgemm serves
LR = 0.1


def _fuse(model, example, **options):
    options.setdefault("sparse_optimizer", SGD(LR))
    ctx = PassContext(example_inputs=example, options=options)
    gm = run_passes(capture(model, example), ctx, passes=FUSE)
    lint(gm)
    return gm, ctx


def _fused_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if LOCAL_LOOKUP in n.meta]


def _module(gm, node) -> LocalLookup:
    return gm.get_submodule(node.target)


# ------------------------------------------------------------------ structure + forward
@pytest.mark.parametrize("name, units", [
    ("dlrm_lists", [("group0",)]),
    ("dlrm_ebc", [("group0",)]),
    # the item table is read pooled (history mean) and unpooled (candidate): one call for both groups
    ("two_tower", [("group0", "group1")]),
    ("seq_attention", [("group0",)]),
    ("weighted_bag", [("group0",)]),
    ("bag_2d", [("group0",)]),
    ("functional_bag", [("group0",)]),
    ("functional_embedding", [("group0",)]),
    ("table_dict", [("group0",), ("group1",)]),
    ("sequence_ec", [("group0",)]),
    ("no_tables", []),
])
def test_one_fused_call_per_group(name, units):
    case = zoo.CASES[name]
    model, example = case.make()
    reference = copy.deepcopy(model)
    gm, ctx = _fuse(model, example)
    fused = _fused_nodes(gm)
    assert sorted(n.meta[FUSED]["groups"] for n in fused) == sorted(units)
    assert sorted(g for unit in units for g in unit) == sorted(g.name for g in ctx.groups)
    assert not [n for n in gm.graph.nodes if L.LOOKUP in n.meta]  # no original lookup left
    assert all(type(_module(gm, n)) is LocalLookup for n in fused)
    replaced = {name for n in fused for name in n.meta[FUSED]["lookups"]}
    assert replaced == {m for g in ctx.groups for m in g.nodes}
    assert not set(replaced) & {n.name for n in gm.graph.nodes}
    # the tables left the parameters: those are the dense ones
    table_paths = {p for p, t in gm.meta[L.PARAM_TABLES].items() if t in ctx.tables}
    assert not {p for p, _ in gm.named_parameters()} & table_paths
    for seed in (11, 12):
        fresh = case.inputs(seed)
        assert_close(gm(*fresh), reference(*fresh), rtol=1e-6, atol=1e-6)


def test_provenance_of_new_nodes():
    model, example = zoo.CASES["dlrm_lists"].make()
    before = {n.name: n.meta for n in capture(model, example).graph.nodes}
    gm, _ = _fuse(model, example)
    new = [n for n in gm.graph.nodes if n.name not in before]
    assert new and all(n.meta[L.PASS] == "fuse_lookups" for n in new)
    # each lookup's result keeps the user's module and line
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    for arg, old, path in zip(cat.args[0][1:], ("emb_l_0", "emb_l_1", "emb_l_2"), ("emb_l.0", "emb_l.1", "emb_l.2")):
        assert arg.meta[L.MODULE] == before[old][L.MODULE] == path
        assert arg.meta[L.SOURCE] == before[old][L.SOURCE]
    assert set(gm.meta[L.TABLES]) == {"emb_l.0", "emb_l.1", "emb_l.2"}


# ------------------------------------------------------------------ training
def _tables_and_dense(model, tables: dict):
    """({table: its parameter}, {name: dense parameter}) of the unfused model."""
    names = L.table_names_by_param(model)
    found, dense = {}, {}
    for path, p in model.named_parameters():
        if names[path] in tables:
            found.setdefault(names[path], p)
        else:
            dense[path] = p
    return found, dense


@torch.no_grad()
def _reference_update(table: torch.Tensor, state: dict, optimizer) -> None:
    g = table.grad
    if isinstance(optimizer, SGD):
        table -= optimizer.lr * g
    else:  # RowWiseAdagrad (fxrec/optim.py); a row without gradient does not move
        state["m"] = state.get("m", torch.zeros(table.shape[0])) + (g * g).mean(dim=1)
        table -= (optimizer.lr / (state["m"].sqrt() + optimizer.eps)).unsqueeze(1) * g


def _train_step(net, dense: list, batch) -> None:
    """Loss = mean square of the output; dense parameters by torch.optim.SGD."""
    net(*batch).pow(2).mean().backward()
    if dense:  # some models are all tables
        torch.optim.SGD(dense, lr=LR).step()


def _fused_tables(gm) -> dict:
    out = {}
    for m in gm.modules():
        if isinstance(m, LocalLookup):
            out.update({k.rpartition("@")[0] or k: w for k, w in m.shard_weights().items()})
    return out


@pytest.mark.parametrize("name", ["dlrm_lists", "dlrm_ebc", "two_tower", "seq_attention", "weighted_bag",
                                  "functional_embedding", "table_dict", "sequence_ec"])
@pytest.mark.parametrize("optimizer", [SGD(LR), RowWiseAdagrad(LR)], ids=["sgd", "rowwise_adagrad"])
def test_training_step_matches_reference(name, optimizer):
    case = zoo.CASES[name]
    model, example = case.make()
    reference = copy.deepcopy(model)
    gm, ctx = _fuse(model, example, sparse_optimizer=optimizer)
    tables, dense = _tables_and_dense(reference, ctx.tables)
    initial = {t: w.clone() for t, w in _fused_tables(gm).items()}
    batch = case.inputs(21)
    _train_step(gm, list(gm.parameters()), batch)
    _train_step(reference, list(dense.values()), batch)
    state: dict = {}
    for table in tables.values():
        _reference_update(table, state.setdefault(id(table), {}), optimizer)
    fused = _fused_tables(gm)
    assert set(fused) == set(tables)
    assert any(not torch.equal(fused[t], initial[t]) for t in tables)  # the step did train the tables
    for t, w in tables.items():
        assert_close(fused[t], w.detach(), rtol=1e-5, atol=1e-6, msg=f"table {t}")
    assert {p for p, _ in gm.named_parameters()} == set(dense)
    for p, w in gm.named_parameters():
        assert_close(w, dense[p].detach(), rtol=1e-5, atol=1e-6, msg=f"dense {p}")


# ------------------------------------------------------------------ kernels
class MixedDims(nn.Module):
    """Two unpooled tables of different dims: fbgemm's unpooled kernels need one dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Embedding(20, 8), nn.Embedding(30, 4)

    def forward(self, x, y):
        return torch.cat([self.a(x), self.b(y)], dim=-1)


def _mixed_dims():
    torch.manual_seed(0)
    return MixedDims(), (torch.randint(0, 20, (4,)), torch.randint(0, 30, (4,)))


@pytest.mark.parametrize("name, options, expected", [
    ("dlrm_lists", {}, {"pooled": {"pooled_forward": FB, "backward_update": FB}}),
    ("weighted_bag", {"sparse_optimizer": RowWiseAdagrad(LR)},
     {"pooled": {"pooled_forward": FB, "backward_update": FB}}),
    ("seq_attention", {}, {"unpooled": {"unpooled_forward": FB, "backward_update": FB}}),
    # fbgemm has no CPU Adam: its update falls back to torch, the forward stays fbgemm
    ("dlrm_lists", {"sparse_optimizer": Adam(LR)}, {"pooled": {"pooled_forward": FB, "backward_update": "torch"}}),
    # fbgemm's nobag forward needs one dim; its update takes any (ids as bags of one)
    ("mixed_dims", {}, {"unpooled": {"unpooled_forward": "torch", "backward_update": FB}}),
    ("dlrm_lists", {"sparse_optimizer": None, "inference": True}, {"pooled": {"pooled_forward": FB}}),
    ("dlrm_lists", {"kernel": "torch"}, {"pooled": {"pooled_forward": "torch", "backward_update": "torch"}}),
])
@pytest.mark.usefixtures("one_thread")
def test_recorded_kernel_is_the_one_that_runs(name, options, expected):
    model, example = _mixed_dims() if name == "mixed_dims" else zoo.CASES[name].make()
    gm, _ = _fuse(model, example, **options)
    (node,) = _fused_nodes(gm)
    assert node.meta[KERNEL] == expected
    gm(*example).float().pow(2).mean().backward()  # run forward and (where it trains) the update
    lookup = _module(gm, node)
    for role, ops in expected.items():
        assert getattr(lookup, role).kernels == ops  # what served the ops is what was recorded


def test_env_var_forces_torch(monkeypatch):
    monkeypatch.setenv("FXREC_KERNEL", "torch")
    gm, _ = _fuse(*zoo.CASES["two_tower"].make())
    (node,) = _fused_nodes(gm)
    assert node.meta[KERNEL] == {"unpooled": {"unpooled_forward": "torch", "backward_update": "torch"}}


def test_recorded_kernel_follows_the_thread_count():
    """From 2 threads on, torch's embedding_bag serves the pooled forward on the CPU (fbgemm's
    runs on one thread): the record says so, as the module then runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, example = zoo.CASES["dlrm_lists"].make()
        gm, _ = _fuse(model, example)
        (node,) = _fused_nodes(gm)
        assert node.meta[KERNEL] == {"pooled": {"pooled_forward": "torch", "backward_update": FB}}
        gm(*example).float().pow(2).mean().backward()
        assert _module(gm, node).pooled.kernels == node.meta[KERNEL]["pooled"]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kernel", [FB, "torch"])
def test_env_var_reaches_quantized_inference_and_sharded_dumps(monkeypatch, capsys, kernel):
    """The float modules of these two are stand-ins on meta: a kernel forced by FXREC_KERNEL
    is checked, and recorded, for the device the lookups will run on."""
    from fxrec.cli import main

    monkeypatch.setenv("FXREC_KERNEL", kernel)
    model, example = zoo.CASES["dlrm_lists"].make()
    lowered = fxrec.lower_for_inference(model, example, weight_dtype="int8")
    kernels = [n.meta[KERNEL] for n in lowered.graph.nodes if KERNEL in n.meta]
    assert kernels == [{"pooled": {"quant_pooled_forward": kernel}}]
    lowered(*example)
    zoo_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models_zoo.py")
    assert main(["dump", f"{zoo_file}:dlrm_lists", "--world-size", "2", "--constraint", "emb_l.0=table_wise"]) == 0
    assert f"pooled_forward={kernel}" in capsys.readouterr().out


def test_forced_kernel_that_cannot_serve_fails_the_pass():
    with pytest.raises(PassError, match=r"pass 'fuse_lookups' failed: NoKernelError: kernel 'fbgemm' cannot "
                                        r"serve unpooled_forward: unpooled lookups need one dim") as info:
        _fuse(*_mixed_dims(), kernel="fbgemm")
    assert isinstance(info.value.__cause__, NoKernelError)


# ------------------------------------------------------------------ sharded, one rank
@pytest.fixture
def fuse_in_runner(monkeypatch):
    """The runner's list with fuse_lookups appended, as fxrec.shard will run it."""
    monkeypatch.setattr(runner, "PASSES", FUSE)


@pytest.mark.parametrize("name, sharding", [
    ("dlrm_lists", None),          # the planner's choice on one rank: data_parallel
    ("two_tower", None),
    ("sequence_ec", None),
    ("weighted_bag", None),
    ("dlrm_ebc", "table_wise"),    # apply_plan's own LocalLookup: only recorded
    ("dlrm_ebc", "row_wise"),
])
@pytest.mark.usefixtures("one_thread")  # the kernels asserted are one thread's (two: torch's pooled forward)
def test_sharded_one_rank(fuse_in_runner, name, sharding):
    case = zoo.CASES[name]
    model, example = case.make()
    reference = copy.deepcopy(model)
    cons = {t.name: sharding for t in fxrec.find_tables(model, example)} if sharding else None
    optimizer = RowWiseAdagrad(LR)
    sm = fxrec.shard(model, Topology(world_size=1), example, constraints=cons, sparse_optimizer=optimizer)
    gm = sm.module
    units = [u for u, _ in gm.get_submodule("fxrec_shards").named_children() if u != "groups"]
    nodes = _fused_nodes(gm)
    assert sorted(n.meta[LOCAL_LOOKUP]["unit"] for n in nodes) == sorted(units)  # one local lookup per unit
    for node in nodes:
        assert type(_module(gm, node)) is LocalLookup
        role = "pooled" if _module(gm, node).pooled is not None else "unpooled"
        assert node.meta[KERNEL] == {role: {f"{role}_forward": FB, "backward_update": FB}}
    batch = case.inputs(31)
    assert_close(sm(*batch), reference(*batch), rtol=1e-6, atol=1e-6)
    tables, dense = _tables_and_dense(reference, {t: None for t in sm.plan})
    _train_step(sm, list(sm.parameters()), batch)
    _train_step(reference, list(dense.values()), batch)
    for table in tables.values():
        _reference_update(table, {}, optimizer)
    assert_close(sm.full_state_dict(), reference.state_dict(), rtol=1e-5, atol=1e-6)


def test_kernel_option_retargets_apply_plans_lookup():
    case = zoo.CASES["dlrm_ebc"]
    model, example = case.make()
    reference = copy.deepcopy(model)
    tables = {t.name: "table_wise" for t in fxrec.find_tables(model, example)}
    ctx = PassContext(example_inputs=example, topology=Topology(world_size=1),
                      options=dict(rank=0, world_size=1, sparse_optimizer=SGD(LR), constraints=tables, kernel="torch"))
    gm = run_passes(capture(model, example), ctx, passes=FUSE)
    (node,) = _fused_nodes(gm)
    assert node.target == "fxrec_shards.u0.lookup"
    assert node.meta[KERNEL] == {"pooled": {"pooled_forward": "torch", "backward_update": "torch"}}
    assert _module(gm, node).pooled.kernel_request == "torch"
    batch = case.inputs(8)
    assert_close(gm(*batch), reference(*batch), rtol=1e-6, atol=1e-6)


def test_replicas_on_several_ranks_stay_and_say_torch():
    model, example = zoo.CASES["dlrm_lists"].make()
    tables = {t.name: "data_parallel" for t in fxrec.find_tables(model, example)}
    ctx = PassContext(example_inputs=example, topology=Topology(world_size=2),
                      options=dict(rank=0, world_size=2, sparse_optimizer=SGD(LR), constraints=tables))
    gm = run_passes(capture(model, example), ctx, passes=FUSE)
    (node,) = _fused_nodes(gm)
    assert node.target == "fxrec_shards.u0.replicated"
    assert node.meta[KERNEL] == {"replicated": {"pooled_forward": "torch", "backward_update": "torch"}}
    assert any("stays on ReplicatedLookup" in line for line in ctx.log)


# ------------------------------------------------------------------ left unfused, or fused for inference
def test_without_sparse_optimizer_lookups_stay():
    model, example = zoo.CASES["dlrm_lists"].make()
    gm, ctx = _fuse(model, example, sparse_optimizer=None)
    assert len([n for n in gm.graph.nodes if L.LOOKUP in n.meta]) == 3 and not _fused_nodes(gm)
    assert any("no ctx.options['sparse_optimizer']" in line for line in ctx.log)


def test_inference_fusion_leaves_tables_alone():
    case = zoo.CASES["dlrm_ebc"]
    model, example = case.make()
    reference = copy.deepcopy(model)
    gm, _ = _fuse(model, example, sparse_optimizer=None, inference=True)
    before = {t: w.clone() for t, w in _fused_tables(gm).items()}
    gm(*case.inputs(3)).pow(2).mean().backward()
    assert_close(_fused_tables(gm), before, rtol=0, atol=0)
    assert_close(gm(*case.inputs(4)), reference(*case.inputs(4)), rtol=1e-6, atol=1e-6)


class TiedOutput(nn.Module):
    """The table is also the output projection's weight: fusing it would untie them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(30, 8, mode="sum")

    def forward(self, ids, offsets):
        return F.linear(self.emb(ids, offsets), self.emb.weight)


def test_tied_table_stays():
    torch.manual_seed(0)
    model = TiedOutput()
    example = zoo._bags(torch.Generator().manual_seed(0), 30, 4)
    gm, ctx = _fuse(model, example)
    assert not _fused_nodes(gm) and not [n for n in gm.graph.nodes if L.LOOKUP in n.meta]
    assert any("left table 'emb' dense: its weight is also read outside embedding lookups, by %linear" in line
               for line in ctx.log)
    with torch.no_grad():
        assert_close(gm(*example), model(*example), rtol=0, atol=0)


class LateIds(nn.Module):
    """The second bag's ids are computed after the first bag's result is used: the fused
    call must move ahead of that use."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.EmbeddingBag(30, 8), nn.EmbeddingBag(30, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids, offsets, other):
        h = self.lin(self.a(ids, offsets))
        late = other.flip(0)
        return h + self.b(late, offsets)


def test_lookups_whose_inputs_come_late_are_reordered():
    torch.manual_seed(0)
    model = LateIds()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    ids, offsets = zoo._bags(g, 30, 4)
    example = (ids, offsets, torch.randint(0, 30, ids.shape, generator=g))
    gm, _ = _fuse(model, example)
    assert len(_fused_nodes(gm)) == 1
    g = torch.Generator().manual_seed(5)
    ids, offsets = zoo._bags(g, 30, 4)
    fresh = (ids, offsets, torch.randint(0, 30, ids.shape, generator=g))
    assert_close(gm(*fresh), reference(*fresh), rtol=1e-6, atol=1e-6)


def test_meta_model_stays_on_meta():
    with torch.device("meta"):
        model = zoo.DLRMLists()
    example = zoo.CASES["dlrm_lists"].inputs(0)
    gm, _ = _fuse(model, example)
    (node,) = _fused_nodes(gm)
    assert _module(gm, node).pooled.weights.is_meta
    assert node.meta[KERNEL] == {"pooled": {"pooled_forward": "torch", "backward_update": "torch"}}


def test_bad_ids_name_the_table():
    case = zoo.CASES["dlrm_lists"]
    gm, _ = _fuse(*case.make())
    dense, offsets, ids = case.inputs(2)
    ids = [ids[0], ids[1], torch.cat([ids[2], torch.tensor([99])])]
    with pytest.raises(ValueError, match=r"table 'emb_l.2' \(lookup %emb_l_2\): id 99 outside \[0, 40\)"):
        gm(dense, offsets, ids)
