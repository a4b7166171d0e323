"""fxrec.capture: the graph computes what the model computes, with shapes and provenance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrec
from dist_harness import run_workers
from fxrec.capture import CaptureError, SourceLoc
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.passes import lookup as L
from fxrec.passes.shapes import SparseSpec, TensorSpec, _written_parameters
from fxrec.sparse import KeyedJaggedTensor, KeyedTensor

try:
    from tests import models_zoo as zoo
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import models_zoo as zoo

# (case, how it is captured)
CAPTURABLE = [
    ("dlrm_lists", "fx"),
    ("dlrm_ebc", "fx"),
    ("two_tower", "fx"),
    ("seq_attention", "fx"),
    ("no_tables", "fx"),
    ("weighted_bag", "fx"),
    ("bag_2d", "fx"),
    ("functional_bag", "fx"),
    ("functional_embedding", "fx"),
    ("table_dict", "fx"),
    ("sequence_ec", "fx"),
    ("shape_branch", "export"),  # control flow on a tensor's rank: fx fails, export captures
]


@pytest.mark.parametrize("name,captured_by", CAPTURABLE)
def test_graph_computes_what_the_model_computes(name, captured_by):
    case = zoo.CASES[name]
    model, example = case.make()
    gm = fxrec.capture(model, example)
    assert gm.meta[L.CAPTURED_BY] == captured_by
    for seed in (11, 12):  # fresh batches: other ids, other bag lengths
        fresh = case.inputs(seed)
        torch.testing.assert_close(gm(*fresh), model(*fresh))


@pytest.mark.parametrize("name", [n for n, _ in CAPTURABLE])
def test_every_node_has_provenance_and_shape(name):
    model, example = zoo.CASES[name].make()
    gm = fxrec.capture(model, example)
    for node in gm.graph.nodes:
        assert node.meta[L.PASS] == "capture"
        assert L.SHAPE in node.meta
        if isinstance(node.meta[L.SHAPE], TensorSpec):
            assert tuple(node.meta["tensor_meta"].shape) == node.meta[L.SHAPE].shape


def test_lookup_node_points_at_the_users_module_and_line():
    model, example = zoo.CASES["dlrm_lists"].make()
    gm = fxrec.capture(model, example)
    bags = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("emb_l.")]
    assert [n.target for n in bags] == ["emb_l.0", "emb_l.1", "emb_l.2"]
    for node in bags:
        assert node.meta[L.MODULE] == node.target
        src = node.meta[L.SOURCE]
        assert isinstance(src, SourceLoc) and src.file.endswith("models_zoo.py")
        assert src.code == "V = E(sparse_index_group_batch, sparse_offset_group_batch)"
        assert node.meta[L.SHAPE] == TensorSpec((zoo.BATCH, 8), torch.float32)


def test_nested_module_path_and_sparse_shapes():
    model, (dense, kjt) = zoo.CASES["dlrm_ebc"].make()
    gm = fxrec.capture(model, (dense, kjt))
    by_name = {n.name: n for n in gm.graph.nodes}
    spec = by_name["kjt"].meta[L.SHAPE]
    assert isinstance(spec, SparseSpec) and spec.type == "KeyedJaggedTensor"
    assert spec.keys == ("user", "item", "last_item", "cat")
    assert dict(spec.tensors)["lengths"] == TensorSpec((4 * zoo.BATCH,), torch.int64)
    ebc = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "sparse_arch.ebc"]
    assert len(ebc) == 1 and ebc[0].meta[L.MODULE] == "sparse_arch.ebc"
    assert ebc[0].meta[L.SHAPE].type == "KeyedTensor"


def test_export_fallback_records_why_and_provenance():
    model, example = zoo.CASES["shape_branch"].make()
    gm = fxrec.capture(model, example)
    assert "TraceError" in gm.meta[L.CAPTURE_NOTE]
    bag = [n for n in gm.graph.nodes if n.op == "call_function" and "embedding_bag" in str(n.target)]
    assert len(bag) == 1 and bag[0].meta[L.MODULE] == "bag"


class _KJTInside(nn.Module):
    """Builds its KeyedJaggedTensor inside forward from plain tensors."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 10, 4, ["a", "b"])])

    def forward(self, values, lengths):
        return self.ebc(KeyedJaggedTensor(["a", "b"], values, lengths=lengths)).values()


def test_kjt_built_inside_forward():
    model = _KJTInside()
    gm = fxrec.capture(model, (torch.randint(0, 10, (7,)), torch.tensor([1, 2, 3, 1])))
    assert gm.meta[L.CAPTURED_BY] == "fx"
    fresh = (torch.randint(0, 10, (3,)), torch.tensor([0, 2, 1, 0]))
    torch.testing.assert_close(gm(*fresh), model(*fresh))


class _KJTFromIdColumns(nn.Module):
    """Builds its KJT inside forward from a batch x features matrix of ids, one id per bag,
    with the stride read from the ids' shape (a traced size under torch.fx)."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 10, 4, ["a"]),
                                           EmbeddingBagConfig("t_b", 12, 4, ["b"])])
        self.lin = nn.Linear(8, 1)

    def forward(self, ids):
        b = ids.shape[0]
        kjt = KeyedJaggedTensor(["a", "b"], ids.t().reshape(-1), lengths=torch.ones(2 * b, dtype=torch.long),
                                stride=b)
        return self.lin(self.ebc(kjt).values())


def test_kjt_with_a_traced_stride_is_captured_by_fx_and_sharded():
    # the stride was refused as "must be a whole number", so capture fell back to torch.export,
    # whose aten lookups shard could not take
    torch.manual_seed(0)
    model = _KJTFromIdColumns()
    example, fresh = torch.randint(0, 10, (4, 2)), torch.randint(0, 10, (3, 2))
    assert fxrec.capture(model, (example,)).meta[L.CAPTURED_BY] == "fx"
    sm = fxrec.shard(model, fxrec.Topology(1), (example,), constraints={"ebc.embedding_bags.t_a": "row_wise"})
    with torch.no_grad():
        torch.testing.assert_close(sm(fresh), model(fresh))
    results = run_workers(_traced_stride_worker, 2, timeout=120)
    for got, want in results:
        torch.testing.assert_close(got, want)


def _traced_stride_worker(rank: int, world: int) -> tuple:
    torch.manual_seed(0)
    model = _KJTFromIdColumns()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 10, (3, 2), generator=g) for _ in range(world)]
    sm = fxrec.shard(model, fxrec.Topology(world), (batches[rank],),
                     constraints={"ebc.embedding_bags.t_a": "row_wise", "ebc.embedding_bags.t_b": "table_wise"})
    with torch.no_grad():
        return sm(batches[rank]), model(torch.cat(batches))[rank * 3:(rank + 1) * 3]


class _Regrouped(nn.Module):
    """Reads its pooled embeddings through KeyedTensor.regroup / regroup_as_dict, as TorchRec
    models (DLRM's interaction arch) do."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 10, 4, ["a", "b"]),
                                           EmbeddingBagConfig("t_c", 12, 4, ["c"])])
        self.lin = nn.Linear(12 + 4, 1)

    def forward(self, kjt):
        kt = self.ebc(kjt)
        first, second = KeyedTensor.regroup([kt], [["c", "a"], ["b"]])
        by_name = KeyedTensor.regroup_as_dict([kt], [["b"]], ["user"])
        return self.lin(torch.cat([first, second, by_name["user"] * 2], dim=1))


def test_regroup_is_one_node_and_the_model_shards():
    # regroup iterated over the collection's Proxy: torch.fx failed, and shard could not take
    # the torch.export fallback's aten lookups
    torch.manual_seed(0)
    model = _Regrouped()
    g = torch.Generator().manual_seed(0)
    batch = lambda: KeyedJaggedTensor(["a", "b", "c"], torch.randint(0, 10, (9,), generator=g),
                                      lengths=torch.tensor([1, 2, 0, 1, 1, 1, 2, 1, 0]))
    example = batch()
    gm = fxrec.capture(model, (example,))
    assert gm.meta[L.CAPTURED_BY] == "fx"
    assert sum(n.target in (KeyedTensor.regroup, KeyedTensor.regroup_as_dict) for n in gm.graph.nodes) == 2
    sm = fxrec.shard(model, fxrec.Topology(1), (example,), constraints={"ebc.embedding_bags.t_a": "row_wise"})
    fresh = batch()
    with torch.no_grad():
        torch.testing.assert_close(sm(fresh), model(fresh))


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(10, 4, mode="sum")
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids, offsets):
        return self.drop(self.bn(self.emb(ids, offsets)))


def test_capture_leaves_the_model_and_rng_unchanged():
    model = _WithBatchNorm().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, offsets = torch.randint(0, 10, (6,)), torch.tensor([0, 2, 3, 5])
    rng = torch.get_rng_state()
    fxrec.find_tables(model, (ids, offsets))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _WritesParameters(nn.Module):
    """Its forward writes parameters in place: max_norm renormalises the rows it reads (module
    and functional), and it clamps a parameter through a view."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4, max_norm=0.5)
        self.bag = nn.EmbeddingBag(20, 4, max_norm=0.5, mode="sum")
        self.w = nn.Parameter(torch.randn(20, 4))
        self.scale = nn.Parameter(torch.full((4,), 3.0))
        self.plain = nn.Embedding(20, 4)  # written by nothing: not copied
        self.lin = nn.Linear(4, 1)

    def forward(self, ids):
        self.scale.data.clamp_(max=1.0)
        h = self.emb(ids).sum(1) + self.bag(ids) + F.embedding(ids, self.w, max_norm=0.5).sum(1)
        return self.lin((h + self.plain(ids).sum(1)) * self.scale)


def test_running_the_example_restores_parameters_it_writes_and_copies_no_other():
    torch.manual_seed(0)
    model = _WritesParameters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 20, (3, 5))
    written = _written_parameters(fxrec.capture(model, (ids,)))
    assert {id(p) for p in written} == {id(model.emb.weight), id(model.bag.weight), id(model.w), id(model.scale)}
    fxrec.find_tables(model, (ids,))
    with pytest.warns(UserWarning, match="stay unquantized"):
        fxrec.lower_for_inference(model, (ids,), weight_dtype="fp32")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# views of a parameter the model writes through (``self.w.data.ravel().clamp_(...)``): the
# ones guard_inplace's alias lists did not name first, then some they name
_VIEWS = [
    pytest.param(lambda w: w.ravel(), id="ravel"),
    pytest.param(lambda w: torch.ravel(w), id="torch.ravel"),
    pytest.param(lambda w: w.split_with_sizes([2, 18])[1], id="split_with_sizes"),
    pytest.param(lambda w: torch.split_with_sizes(w, [2, 18])[0], id="torch.split_with_sizes"),
    pytest.param(lambda w: w.hsplit(2)[0], id="hsplit"),
    pytest.param(lambda w: torch.vsplit(w, 2)[1], id="torch.vsplit"),
    pytest.param(lambda w: w.unsafe_chunk(2)[0], id="unsafe_chunk"),
    pytest.param(lambda w: w.adjoint(), id="adjoint"),
    pytest.param(lambda w: torch.unflatten(w, 1, (2, 2)), id="torch.unflatten"),
    pytest.param(lambda w: torch.swapdims(w, 0, 1), id="torch.swapdims"),
    pytest.param(lambda w: torch.as_strided(w, (3,), (1,)), id="torch.as_strided"),
    pytest.param(lambda w: torch.atleast_2d(w), id="torch.atleast_2d"),
    pytest.param(lambda w: torch.view_as_real(torch.view_as_complex(w.view(20, 2, 2))), id="view_as_complex"),
    pytest.param(lambda w: torch.ops.aten.slice.Tensor(w, 0, 1, 5), id="aten.slice"),
    pytest.param(lambda w: w.view(-1), id="view"),
    pytest.param(lambda w: w.flatten(), id="flatten"),
    pytest.param(lambda w: w.unflatten(1, (2, 2)), id="unflatten"),
    pytest.param(lambda w: w.T, id="T"),
    pytest.param(lambda w: w.narrow(0, 2, 5), id="narrow"),
    pytest.param(lambda w: w[3], id="indexing"),
    pytest.param(lambda w: w.unbind()[0], id="unbind"),
    pytest.param(lambda w: torch.chunk(w, 2)[1], id="torch.chunk"),
    pytest.param(lambda w: w.as_strided((3,), (1,)), id="as_strided"),
    pytest.param(lambda w: w.detach(), id="detach"),
]


class _WritesThroughAView(nn.Module):
    """Clamps a parameter through a view; writes its ids, which two tables read, and a tensor
    it multiplies by a third table, in place."""

    def __init__(self, view):
        super().__init__()
        self.view = view
        self.w = nn.Parameter(torch.randn(20, 4))
        self.bag = nn.EmbeddingBag(20, 4, mode="sum")
        # the results of F.embedding and of a product are new tensors: neither table is copied
        self.table = nn.Parameter(torch.randn(20, 4))
        self.items = nn.Parameter(torch.randn(30, 4))

    def forward(self, ids):
        self.view(self.w.data).clamp_(-0.1, 0.1)
        ids.clamp_(max=19)
        h = self.bag(ids) + F.embedding(ids, self.table).sum(1)
        return (h.relu_() @ self.items.t()).sum(1) * self.w.sum()


@pytest.mark.parametrize("view", _VIEWS)
def test_a_parameter_written_through_any_view_is_restored_and_no_table_copied(view):
    torch.manual_seed(0)
    model = _WritesThroughAView(view)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 20, (3, 5))
    gm = fxrec.capture(model, (ids,))
    fxrec.find_tables(model, (ids,))
    fxrec.shard(model, fxrec.Topology(1), (ids,))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # what the example run saves: the written parameter, no table
    assert {id(p) for p in _written_parameters(gm)} == {id(model.w)}
    gm(ids)  # the captured program still writes the user's parameter when it runs
    assert not torch.equal(model.w, before["w"])


def test_uncapturable_model_names_module_line_and_advice():
    model, example = zoo.CASES["value_branch"].make()
    with pytest.raises(CaptureError) as info:
        fxrec.capture(model, example)
    msg = str(info.value)
    assert "\n" not in msg
    assert "in module 'gate' (Gate)" in msg
    assert "models_zoo.py:" in msg and "`if x.sum() > 0:" in msg
    assert "leaf_modules=['gate']" in msg and "torch.export fallback failed too" in msg


@pytest.mark.parametrize("leaf", ["gate", zoo.Gate])
def test_marking_the_offending_module_a_leaf_captures_it(leaf):
    model, example = zoo.CASES["value_branch"].make()
    gm = fxrec.capture(model, example, leaf_modules=[leaf])
    assert gm.meta[L.CAPTURED_BY] == "fx"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["bag", "gate"]
    ids, offsets = torch.randint(0, 30, (5,)), torch.tensor([0, 1, 3, 5])
    torch.testing.assert_close(gm(ids, offsets), model(ids, offsets))
    model.bag.weight.data.neg_()  # flip the sign: the other branch, same graph
    torch.testing.assert_close(gm(ids, offsets), model(ids, offsets))


def test_without_fallback_the_error_points_at_the_root_forward():
    model, example = zoo.CASES["shape_branch"].make()
    with pytest.raises(CaptureError, match=r"in the root module \(ShapeBranch\) at models_zoo.py:\d+ "
                                           r"`if dense.dim\(\) == 3:`.*Fix: move the data-dependent"):
        fxrec.capture(model, example, fallback=False)


class _WrongWidth(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(10, 4, mode="sum")
        self.top = torch.nn.Linear(11, 1)  # takes 7 dense features + 4, the example has 13

    def forward(self, dense, ids):
        return self.top(torch.cat([dense, self.bag(ids)], 1))


def test_an_example_that_does_not_fit_the_model_is_said_so():
    """fx traces forward; the example then fails in the graph (a matmul of the wrong width):
    the advice is about the example, not data-dependent control flow."""
    with pytest.raises(CaptureError, match=r"example_inputs do not run through the root module \(_WrongWidth\): "
                                           r"RuntimeError: mat1 and mat2.*Fix: check that the model runs on "
                                           r"example_inputs") as info:
        fxrec.capture(_WrongWidth(), (torch.randn(4, 13), torch.randint(0, 10, (4, 3))))
    assert "control flow" not in str(info.value)


def test_wrong_number_of_example_inputs():
    model, (x,) = zoo.CASES["no_tables"].make()
    with pytest.raises(CaptureError, match=r"example_inputs do not fit NoTables.forward\(x\): too many positional"):
        fxrec.capture(model, (x, x))


class _ModuleAndFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 4, mode="sum")
        self.table = nn.Parameter(torch.randn(20, 4))

    def forward(self, ids, offsets, u):
        return self.bag(ids, offsets) + torch.nn.functional.embedding(u, self.table)


@pytest.mark.parametrize("bad, error", [
    (0, r"table 'bag' \(lookup %bag\): id 30 outside \[0, 30\) in the example inputs"),
    (2, r"table 'table' \(lookup %embedding\): id -1 outside \[0, 20\) in the example inputs"),
])
def test_an_example_id_outside_its_table_is_named(bad, error):
    """The example is wrong, not the capture: no torch.export fallback, no advice about
    control flow; fxrec.shard and lower_for_inference say the same."""
    example = [torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 2, 3]), torch.tensor([1, 2, 3, 4])]
    example[bad] = torch.tensor([1, 30, 3, 4]) if bad == 0 else torch.tensor([1, -1, 3, 4])
    model = _ModuleAndFunctional()
    for call in (lambda: fxrec.capture(model, tuple(example)),
                 lambda: fxrec.lower_for_inference(model, tuple(example), "int8"),
                 lambda: fxrec.shard(model, fxrec.Topology(1), tuple(example))):
        with pytest.raises(ValueError, match=error):
            call()


def test_a_list_of_example_inputs_is_one_argument():
    model, example = zoo.CASES["weighted_bag"].make()
    with pytest.raises(CaptureError, match=r"do not fit WeightedBag.forward\(ids, offsets, weights\): missing a "
                                           r"required argument: 'offsets'; example_inputs is one list, taken as "
                                           r"forward's only argument: give a tuple of forward's arguments"):
        fxrec.capture(model, list(example))


class _Dropouts(nn.Module):
    """Reads self.training as a value, in the root and in a submodule."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 8, mode="sum")
        self.head = nn.Sequential(nn.Linear(8, 8), _FunctionalDropout())

    def forward(self, ids, offsets):
        return self.head(torch.nn.functional.dropout(self.bag(ids, offsets), 0.5, self.training))


class _FunctionalDropout(nn.Module):
    def forward(self, x):
        return torch.nn.functional.dropout(x, p=0.5, training=self.training)


class _ModeBranch(_Dropouts):
    def forward(self, ids, offsets):
        h = self.bag(ids, offsets)
        if self.training:
            h = h * 0.5
        return h


def test_training_read_as_a_value_follows_train_and_eval():
    model = _Dropouts()
    example = (torch.randint(0, 20, (6,)), torch.tensor([0, 2, 4]))
    gm = fxrec.capture(model, example)
    flags = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == L.TRAINING_FLAG]
    assert len(flags) == 1 and L.TRAINING_BAKED not in gm.meta
    assert not hasattr(model, L.TRAINING_FLAG) and all(m.training is True for m in model.modules())
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(*example), model(*example), rtol=0, atol=0)
    gm.train()
    torch.manual_seed(0)
    got = gm(*example)
    model.train()
    torch.manual_seed(0)
    torch.testing.assert_close(got, model(*example), rtol=0, atol=0)  # the same dropout masks
    again = fxrec.capture(gm, example)  # a captured module captures again with its flag kept a call
    assert [n for n in again.graph.nodes if n.target == L.TRAINING_FLAG] and L.TRAINING_BAKED not in again.meta
    again.eval()
    torch.testing.assert_close(again(*example), model.eval()(*example), rtol=0, atol=0)


def test_a_branch_on_training_is_captured_in_the_current_mode_and_named():
    model = _ModeBranch()
    example = (torch.randint(0, 20, (6,)), torch.tensor([0, 2, 4]))
    gm = fxrec.capture(model, example)
    mode, why = gm.meta[L.TRAINING_BAKED]
    assert mode is True and "_ModeBranch.forward branches on self.training at test_capture.py:" in why
    assert "`if self.training:`" in why
    assert not [n for n in gm.graph.nodes if n.target == L.TRAINING_FLAG]
    assert all(type(v) is bool for m in model.modules() for k, v in vars(m).items() if k == "training")


class _GradSwitches(nn.Module):
    """Every way a forward switches gradients: no_grad (imported by another name), a
    @torch.no_grad() method, enable_grad inside it, set_grad_enabled as a block."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        from torch import no_grad as quiet

        with quiet():
            y = self.a(x)
            with torch.enable_grad():
                y = y + self.b(x)
        with torch.set_grad_enabled(False):
            z = self.c(x)
        return self._frozen(x) + y + z + x.sum()

    @torch.no_grad()
    def _frozen(self, x):
        return self.d(x)


def test_grad_mode_switches_are_captured():
    """fx alone drops them (every Linear would be trained); captured, the graph trains b only
    and leaves the caller's mode as it found it, on or off."""
    from fxrec.passes.grad_mode import grad_states

    torch.manual_seed(0)
    model = _GradSwitches()
    x = torch.randn(3, 4, requires_grad=True)
    gm = fxrec.capture(model, (x,))
    switches = [n for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled]
    assert len(switches) == 8  # four blocks, each switching and restoring
    states = {n.name: s for n, s in grad_states(gm).items() if n.op == "call_module"}
    assert states == {"a": False, "b": True, "c": False, "d": False}
    gm(x).sum().backward()
    got = {k: p.grad for k, p in model.named_parameters()}
    model.zero_grad()
    grad_x = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    for k, p in model.named_parameters():
        assert (got[k] is None) == (p.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(got[k], p.grad)
    torch.testing.assert_close(grad_x, x.grad)
    assert sorted(k for k, g in got.items() if g is not None) == ["b.bias", "b.weight"]
    with torch.no_grad():  # the restores read the mode at run time: still off after the blocks
        assert not gm(x).requires_grad and not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


class _InferenceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        with torch.inference_mode():
            z = self.c(x)
        return z + self.d(x)


def test_an_inference_mode_block_is_captured_as_gradients_off():
    torch.manual_seed(0)
    model = _InferenceBlock()
    x = torch.randn(3, 4)
    gm = fxrec.capture(model, (x,))
    assert sum(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes) == 2
    gm(x).sum().backward()
    assert model.c.weight.grad is None and model.d.weight.grad is not None
    got = model.d.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    assert model.c.weight.grad is None
    torch.testing.assert_close(got, model.d.weight.grad)
