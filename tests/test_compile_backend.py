"""torch.compile(model, backend="fxrec"): fused lookups inside dynamo's graphs, against eager.

- Inference (no_grad): the compiled model computes what the model computes, on fresh
  inputs, for every test model dynamo captures; each graph's lookups are one fused call;
  the tables live in the fused buffer (the parameters view it), so in-place updates reach
  the compiled model; recompiles stay bounded.
- Training: without a sparse optimizer the lookups stay unfused and training equals eager;
  with one, the tables are trained inside backward and three SGD steps equal eager SGD.
- Quantized inference through options: what fxrec.lower_for_inference computes, refreshed
  after the model's tables change.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import fxrec
from fxrec.lowering import backend as B
from fxrec.lowering import FusedEmbeddingBags, QuantizedEmbeddingBags
from models_zoo import CASES
from test_inference import _flat, _to_cuda

MODELS = ["dlrm_lists", "dlrm_ebc", "two_tower", "seq_attention", "functional_bag", "weighted_bag", "table_dict",
          "bag_2d", "functional_embedding", "sequence_ec"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    B.compiled.clear()
    yield
    torch._dynamo.reset()


def _fused_modules(kind=FusedEmbeddingBags):
    return [m for g in B.compiled for m in g.modules() if isinstance(m, kind)]


def test_backend_is_found_by_name():
    assert "fxrec" in torch._dynamo.list_backends()


@pytest.mark.parametrize("name", MODELS)
def test_inference_equals_eager_and_fuses(name, one_thread):
    case = CASES[name]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec")
    with torch.no_grad():
        for seed in (1, 2, 3):
            x = case.inputs(seed)
            for a, b in zip(_flat(compiled(*x)), _flat(reference(*x))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("serves groups" in line for line in logs), logs
    # every table the model reads is a view of a fused buffer now
    buffers = {m.weights.untyped_storage().data_ptr() for m in _fused_modules()}
    tables = [t.name for t in fxrec.find_tables(reference, case.inputs(0))]
    params = dict(model.named_parameters())
    for table in tables:
        weight = params.get(f"{table}.weight", params.get(table))
        assert weight.untyped_storage().data_ptr() in buffers, table


def test_one_graph_fuses_all_its_lookups_and_recompiles_share_the_buffer(one_thread):
    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    compiled = torch.compile(model, backend="fxrec")
    with torch.no_grad():
        for seed in (1, 2, 3, 4):  # batches of other sizes: dynamo recompiles (dynamic shapes)
            compiled(*case.inputs(seed))
    assert 1 <= len(B.compiled) <= 3
    # a recompile finds the tables in the fused buffer and reuses it: one buffer in all
    fused = {id(m): m for m in _fused_modules()}
    assert len(fused) == 1 and list(fused.values())[0].layout.names == ("emb_l.0", "emb_l.1", "emb_l.2")
    if len(B.compiled) > 1:
        assert any("reuses the fused module" in line for line in B.compiled[-1].meta["fxrec_log"])


def test_in_place_updates_reach_the_compiled_model():
    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    compiled = torch.compile(model, backend="fxrec")
    x = case.inputs(1)
    with torch.no_grad():
        compiled(*x)
        model.emb_l[1].weight.add_(0.5)  # an optimizer step, load_state_dict, ...
        model.load_state_dict({**model.state_dict(), "emb_l.0.weight": torch.randn(20, 8)})
        torch.testing.assert_close(compiled(*x), copy.deepcopy(model)(*x), rtol=1e-5, atol=1e-6)


def _train(model, case, steps, lr, compiled_model=None):
    run = compiled_model if compiled_model is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x = case.inputs(10 + step)
        out = run(*x)
        loss = sum(o.float().pow(2).mean() for o in _flat(out))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", ["dlrm_lists", "two_tower", "weighted_bag"])
def test_training_without_sparse_optimizer_keeps_the_lookups(name):
    """Nothing fused: the graph goes to inductor whole, as under torch.compile(model)."""
    case = CASES[name]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    _train(model, case, 3, 0.1, torch.compile(model, backend="fxrec"))
    _train(reference, case, 3, 0.1)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("left unfused: the tables want gradients and no sparse_optimizer" in line for line in logs)
    assert "backend: the whole graph compiled with inductor" in logs, logs


class _Unfusable(torch.nn.Module):
    """A bag, an unpooled table and an EmbeddingCollection, trained without a sparse optimizer:
    every lookup stays in the graph inductor compiles."""

    def __init__(self):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(10, 4, mode="sum")
        self.rows = torch.nn.Embedding(6, 4)
        self.ec = fxrec.EmbeddingCollection([fxrec.EmbeddingConfig("t_h", 7, 4, ["h"])])

    def forward(self, ids, offsets, tokens, kjt):
        return self.bag(ids, offsets).sum() + self.rows(tokens).sum() + self.ec(kjt)["h"].values().sum()


def _unfusable_batch(bad: str = ""):
    return (torch.tensor([1, 12 if bad == "bag" else 2, 3]), torch.tensor([0, 1]),
            torch.tensor([[0, 6 if bad == "rows" else 5]]),
            fxrec.KeyedJaggedTensor(["h"], torch.tensor([1, -1 if bad == "ec" else 6]), lengths=torch.tensor([1, 1])))


@pytest.mark.parametrize("grad", [True, False])
def test_an_unfused_lookup_with_a_bad_id_raises_naming_its_table(grad):
    """Training without a sparse optimizer leaves the lookups to inductor, whose own kernels
    asserted inside their parallel loop: an nn.Embedding's bad id ended the process ("terminate
    called ... index out of bounds"). Under no_grad the fused kernels raise the same error."""
    torch.manual_seed(0)
    model = _Unfusable()
    compiled = torch.compile(model, backend="fxrec")
    with torch.set_grad_enabled(grad):
        want = model(*_unfusable_batch())
        torch.testing.assert_close(compiled(*_unfusable_batch()), want)
        for bad, match in (("bag", r"table 'bag' \(lookup %\w+\): id 12 outside \[0, 10\)"),
                           ("rows", r"table 'rows' \(lookup %\w+\): id 6 outside \[0, 6\)"),
                           ("ec", r"table '(ec\.)?embeddings\.t_h' \(lookup %\w+\): id -1 outside \[0, 7\)")):
            with pytest.raises(ValueError, match=match):
                compiled(*_unfusable_batch(bad))
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("unfused lookups' ids are checked against their tables" in line for line in logs) == grad, logs


class _BufferTables(torch.nn.Module):
    """Tables the graph reads as a buffer or computes: no parameter, so never fused."""

    def __init__(self):
        super().__init__()
        self.register_buffer("codes", torch.randn(10, 4))
        self.table = torch.nn.Parameter(torch.randn(12, 4))

    def forward(self, ids):
        return (F.embedding(ids, self.codes) + F.embedding(ids, self.table * 2.0)).sum()


def test_a_buffer_or_computed_table_checks_its_ids_too():
    # their bad ids reached inductor's kernel: an error naming no table, or on a large batch
    # a process abort
    torch.manual_seed(0)
    model = _BufferTables()
    compiled = torch.compile(model, backend="fxrec")
    ids = torch.randint(0, 10, (64, 3))
    torch.testing.assert_close(compiled(ids), model(ids))
    ids[5, 1] = 11
    with pytest.raises(ValueError, match=r"table 'codes' \(lookup %\w+\): id 11 outside \[0, 10\)"):
        compiled(ids)


class _InCollection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = fxrec.EmbeddingBagCollection([fxrec.EmbeddingBagConfig("t", 10, 4, ["f"]),
                                               fxrec.EmbeddingBagConfig("u", 12, 4, ["g"])])

    def forward(self, kjt):
        return self.c(kjt).values().sum(1)


def test_per_table_optimizers_keyed_as_find_tables_names_them():
    """The collection's graph names its tables from the collection's frame ('embedding_bags.t');
    a PerTable keyed by the model's paths ('c.embedding_bags.t') still reaches them: the
    compiled training equals fxrec.shard's on one rank."""
    from fxrec.optim import SGD, Adagrad, PerTable
    kjt = fxrec.KeyedJaggedTensor(["f", "g"], torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 1, 0, 1]))
    per_table = PerTable({"c.embedding_bags.t": SGD(0.5), "c.embedding_bags.u": Adagrad(0.5)})
    assert sorted(t.name for t in fxrec.find_tables(_InCollection(), (kjt,))) == sorted(per_table.tables)
    torch.manual_seed(0)
    model = _InCollection()
    sharded = fxrec.shard(copy.deepcopy(model), fxrec.Topology(1), (kjt,), sparse_optimizer=per_table)
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": per_table})
    for run in (compiled, sharded):
        for _ in range(2):
            run(kjt).square().sum().backward()
    for key, value in sharded.full_state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_a_bad_batch_that_reaches_a_new_graph_raises_the_value_error_and_a_good_one_compiles_it():
    # dynamo compiles on the batch that reached the graph; fxrec's passes read it, failed on
    # its bad id, and dynamo reported BackendCompilerFailed on every such call
    torch.manual_seed(0)
    model = _Unfusable().eval()
    compiled = torch.compile(model, backend="fxrec")
    with torch.no_grad():
        for _ in range(2):
            with pytest.raises(ValueError, match=r"table 'rows' \(lookup %\w+\): id 6 outside \[0, 6\)$"):
                compiled(*_unfusable_batch("rows"))
        torch.testing.assert_close(compiled(*_unfusable_batch()), model(*_unfusable_batch()))
        with pytest.raises(ValueError, match=r"table 'bag' \(lookup %\w+\): id 12 outside \[0, 10\)"):
            compiled(*_unfusable_batch("bag"))
    assert _fused_modules(), "the good batch compiled the graph, fused"


def test_bounds_check_false_leaves_unfused_lookups_unguarded():
    torch.manual_seed(0)
    model = _Unfusable()
    compiled = torch.compile(model, backend="fxrec", options={"bounds_check": False})
    torch.testing.assert_close(compiled(*_unfusable_batch()), model(*_unfusable_batch()))
    graphs = [g for g in B.compiled]
    assert graphs and not any(n.target is torch.ops.fxrec.checked_ids.default for g in graphs for n in g.graph.nodes)


@pytest.mark.parametrize("name", ["dlrm_lists", "two_tower", "weighted_bag", "table_dict"])
def test_training_with_a_sparse_optimizer_equals_eager_sgd(name):
    case = CASES[name]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    lr = 0.1
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=lr)})
    _train(model, case, 3, lr, compiled)
    _train(reference, case, 3, lr)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    tables = {t.name for t in fxrec.find_tables(reference, case.inputs(0))}
    for k, p in model.named_parameters():
        if k in tables or k.rpartition(".")[0] in tables:
            assert p.grad is None, k  # trained inside backward: the user's optimizer skips them
    assert _fused_modules() and all(m.optimizer is not None for m in _fused_modules())


def test_a_frozen_table_is_read_not_trained():
    """One table of dlrm_lists frozen (requires_grad=False): the sparse optimizer trains the
    others inside backward and leaves it as it was, as eager training does."""
    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    model.emb_l[1].weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    frozen = model.emb_l[1].weight.detach().clone()
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=0.1)})
    _train(model, case, 2, 0.1, compiled)
    _train(reference, case, 2, 0.1)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(model.emb_l[1].weight, frozen)
    optimizers = {name: m.optimizer for m in _fused_modules() for name in m.layout.names}
    assert optimizers == {"emb_l.0": fxrec.optim.SGD(lr=0.1), "emb_l.1": None, "emb_l.2": fxrec.optim.SGD(lr=0.1)}


def test_quantized_inference_through_options_and_refresh():
    case = CASES["dlrm_lists"]
    model, ex = case.make(0)
    compiled = torch.compile(model, backend="fxrec", options={"weight_dtype": "int4"})
    x = case.inputs(1)
    with torch.no_grad():
        got = compiled(*x)
        torch.testing.assert_close(got, fxrec.lower_for_inference(model, ex, "int4")(*x), rtol=1e-5, atol=1e-6)
        assert _fused_modules(QuantizedEmbeddingBags)
        model.emb_l[2].weight.mul_(2.0)  # the quantized copy follows the table
        torch.testing.assert_close(compiled(*x), fxrec.lower_for_inference(model, ex, "int4")(*x),
                                   rtol=1e-5, atol=1e-6)


def test_quantizing_a_training_graph_is_refused_in_the_log():
    case = CASES["bag_2d"]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    x = case.inputs(1)
    out = torch.compile(model, backend="fxrec", options={"weight_dtype": "int8"})(*x)
    torch.testing.assert_close(out, reference(*x))  # float lookups, unfused
    assert "weight_dtype quantizes for inference" in B.compiled[-1].meta["fxrec_log"][0]


def test_unknown_option_is_named():
    model, _ = CASES["bag_2d"].make(0)
    with pytest.raises(Exception, match=r"unknown option\(s\) \['sparse_optimiser'\]"):
        torch.compile(model, backend="fxrec", options={"sparse_optimiser": None})(*CASES["bag_2d"].inputs(1))


@pytest.mark.parametrize("options, match", [
    # accepted and ignored under no_grad, or failed deep in fuse_lookups when training
    ({"sparse_optimizer": "garbage"}, r"sparse_optimizer must be fxrec.optim.SGD/RowWiseAdagrad/Adagrad/Adam or a "
                                      r"fxrec.optim.PerTable, got 'garbage'"),
    ({"kernel": "cuda"}, r"kernel must be one of \['triton', 'fbgemm', 'torch'\].*, got 'cuda'"),
    ({"output_dtype": torch.int8, "weight_dtype": "int8"}, r"output_dtype must be one of .*, got torch.int8"),
    ({"output_dtype": torch.float16}, r"output_dtype=torch.float16 is what quantized lookups return, and no "
                                      r"weight_dtype was given"),
    ({"bounds_check": "no"}, r"bounds_check must be True or False, got 'no'"),
    (["dense"], r"options must be a dict of option name -> value, got \['dense'\] \(list\)"),
])
def test_bad_option_values_are_named(options, match):
    model, _ = CASES["bag_2d"].make(0)
    with torch.no_grad(), pytest.raises(Exception, match=match):
        torch.compile(model, backend="fxrec", options=options)(*CASES["bag_2d"].inputs(1))


def test_training_and_eval_graphs_share_one_buffer(one_thread):
    """A training graph (fused optimizer) and an eval graph (no_grad) of one model read and
    write the same tables: evaluating between steps sees every step."""
    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    lr = 0.1
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=lr)})
    x = case.inputs(99)
    for steps in (2, 1):
        _train(model, case, steps, lr, compiled)
        _train(reference, case, steps, lr)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*x), reference(*x), rtol=1e-5, atol=1e-6)
    assert len({m.weights.data_ptr() for m in _fused_modules()}) == 1
    assert any("shares the fused buffer" in line for g in B.compiled for line in g.meta["fxrec_log"])


class _Subset(torch.nn.Module):
    """Reads tables a, b and (when `use_c`) c: an eval path may read fewer tables."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.EmbeddingBag(n, 4, mode="sum") for n in (10, 12, 14))
        self.use_c = True

    def forward(self, ids, offsets):
        out = self.a(ids, offsets) + self.b(ids, offsets)
        return out + self.c(ids, offsets) if self.use_c else out


def test_a_graph_reading_fewer_fused_tables_reads_them_unfused(one_thread):
    model = _Subset()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec")
    ids, offsets = torch.tensor([1, 2, 3, 9]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        compiled(ids, offsets)  # a, b, c fused together
        model.use_c = reference.use_c = False
        torch.testing.assert_close(compiled(ids, offsets), reference(ids, offsets))
        model.a.weight.add_(1.0)
        reference.a.weight.add_(1.0)
        torch.testing.assert_close(compiled(ids, offsets), reference(ids, offsets))
    assert any("were fused with other tables by an earlier compile" in line for line in B.compiled[-1].meta["fxrec_log"])


class _BrokenTowers(torch.nn.Module):
    """`item` read as pooled bags (history.mean) before a graph break and as rows after it:
    dynamo hands the backend two graphs, each fusing its own reads."""

    def __init__(self):
        super().__init__()
        self.user, self.item = torch.nn.Embedding(20, 8), torch.nn.Embedding(50, 8)

    def forward(self, user_id, history, item_id):
        u = self.user(user_id) + self.item(history).mean(dim=1)
        torch._dynamo.graph_break()
        return (u * self.item(item_id)).sum(-1)


def _towers_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 20, (4,), generator=g), torch.randint(0, 50, (4, 5), generator=g),
            torch.randint(0, 50, (4,), generator=g))


def test_a_table_read_pooled_and_as_rows_across_a_graph_break():
    """Inference: the second graph reads `item` unfused, from the first graph's pooled buffer.
    Training with a sparse optimizer: refused, naming the table (read unfused it would be
    trained by the user's optimizer too)."""
    model = _BrokenTowers().eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec")
    with torch.no_grad():
        for seed in (1, 2):
            torch.testing.assert_close(compiled(*_towers_batch(seed)), reference(*_towers_batch(seed)))
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("to serve pooled bags, and this graph reads them as rows" in line for line in logs), logs
    torch._dynamo.reset()
    trained = torch.compile(_BrokenTowers(), backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=0.1)})
    with pytest.raises(Exception, match=r"tables \['item'\] were fused by an earlier compile to serve pooled bags.*"
                                        r"remove the graph break"):
        trained(*_towers_batch(1)).sum().backward()


def test_rowwise_adagrad_inside_backward_equals_its_formula():
    """RowWiseAdagrad on the fused tables against the formula on eager dense gradients:
    m += mean(g^2) over the row, w -= lr g / (sqrt(m) + eps) (a row no id touched has g = 0
    and stays as it was either way)."""
    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    lr, eps = 0.05, 1e-8
    compiled = torch.compile(model, backend="fxrec",
                             options={"sparse_optimizer": fxrec.optim.RowWiseAdagrad(lr=lr, eps=eps)})
    tables = [f"emb_l.{i}.weight" for i in range(3)]
    dense_ref = [p for n, p in reference.named_parameters() if n not in tables]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(dense_ref, lr=lr)
    momentum = {n: torch.zeros(p.shape[0]) for n, p in reference.named_parameters() if n in tables}
    for step in range(3):
        x = case.inputs(20 + step)
        opt.zero_grad()
        compiled(*x).pow(2).mean().backward()
        opt.step()
        ref_opt.zero_grad()
        reference(*x).pow(2).mean().backward()
        ref_opt.step()
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if n in tables:
                    momentum[n] += p.grad.pow(2).mean(1)
                    p -= lr * p.grad / (momentum[n].sqrt() + eps).unsqueeze(1)
                    p.grad = None
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dlrm_lists", "two_tower", "table_dict"])
def test_gpu_inference_equals_eager_on_triton(name):
    B.register()  # the GPU runs a bare checkout (PYTHONPATH): no installed entry point names the backend
    case = CASES[name]
    model, _ = case.make(0)
    model = model.cuda()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec")
    with torch.no_grad():
        for seed in (1, 2):
            x = _to_cuda(case.inputs(seed))
            for a, b in zip(_flat(compiled(*x)), _flat(reference(*x))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert {m.kernel for m in _fused_modules()} == {"triton"}


def test_register_makes_the_name_known_without_the_entry_point(monkeypatch):
    """From a bare checkout (no installed entry point) register() is what makes
    backend="fxrec" resolve."""
    from torch._dynamo.backends import registry

    monkeypatch.setattr(registry, "_BACKENDS", {k: v for k, v in registry._BACKENDS.items() if k != "fxrec"})
    monkeypatch.setattr(registry, "_COMPILER_FNS", {k: v for k, v in registry._COMPILER_FNS.items() if k != "fxrec"})
    monkeypatch.setattr(registry, "_lazy_import", lambda: None)
    with pytest.raises(Exception, match="fxrec"):
        registry.lookup_backend("fxrec")
    B.register()
    assert registry.lookup_backend("fxrec") is B.fxrec_backend


class _Negatives(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.item, self.user, self.lin = torch.nn.Embedding(30, 8), torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8)

    def forward(self, u, pos, neg):
        uv, p = self.lin(self.user(u)), self.item(pos)
        with torch.no_grad():  # negatives: no gradient into the item table
            n = self.item(neg)
        return torch.stack([(uv * p).sum(1), (uv * n).sum(1)], 1)


def _three_sgd_steps_equal_eager(model, reference, compiled) -> None:
    """Three SGD steps of `compiled` (over `model`) and of the eager `reference` on negatives
    batches leave the same state."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = (torch.randint(0, 20, (4,), generator=g), torch.randint(0, 30, (4,), generator=g),
             torch.randint(0, 30, (4,), generator=g))
        for run, opt in zip((compiled, reference), optimizers):
            opt.zero_grad()
            run(*x).square().mean().backward()
            opt.step()
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_a_lookup_under_no_grad_is_left_to_the_users_optimizer():
    """dynamo records the no_grad block; its table is not fused (its fused optimizer could not
    tell that read from the others), so three steps equal eager SGD."""
    model = _Negatives()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=0.1)})
    _three_sgd_steps_equal_eager(model, reference, compiled)
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("left table 'item' dense: %n reads it with gradients off" in line for line in logs), logs
    assert [m.layout.names for m in _fused_modules()] == [("user",)]


class _OwnNegatives(_Negatives):
    """Negatives from a table of their own, read only under no_grad."""

    def __init__(self):
        super().__init__()
        self.negs = torch.nn.Embedding(30, 8)

    def forward(self, u, pos, neg):
        uv, p = self.lin(self.user(u)), self.item(pos)
        with torch.no_grad():
            n = self.negs(neg)
        return torch.stack([(uv * p).sum(1), (uv * n).sum(1)], 1)


def test_a_table_read_only_under_no_grad_is_fused_frozen():
    """Its own fused call, with no optimizer (frozen), inside the block; three steps equal eager SGD."""
    model = _OwnNegatives()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=0.1),
                                                             "dense": "eager"})
    _three_sgd_steps_equal_eager(model, reference, compiled)
    assert {m.layout.names: m.optimizer for m in _fused_modules()} == {("user", "item"): fxrec.optim.SGD(lr=0.1),
                                                                        ("negs",): None}
    logs = "\n".join(line for g in B.compiled for line in g.meta["fxrec_log"])
    assert "table(s) ['negs'] are frozen: every lookup of them runs with gradients off" in logs


def _mixed_ebc_batch(rows: dict, b: int, seed: int):
    from fxrec.sparse import KeyedJaggedTensor
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(0, 4, (b,), generator=g) for _ in rows]
    values = [torch.randint(0, n, (int(l.sum()),), generator=g) for n, l in zip(rows.values(), lengths)]
    return KeyedJaggedTensor(keys=list(rows), values=torch.cat(values), lengths=torch.cat(lengths))


def test_a_collection_is_one_graph_and_stays_quantized_across_batch_sizes(one_thread):
    """The KeyedJaggedTensor's split by key syncs with the host, which dynamo cannot trace:
    the collection takes it once, before its loop over features, so all its lookups land in
    one graph (one fused call). Broken at each feature instead, the per-feature frames
    recompiled past dynamo's limit and then ran eagerly, on the float tables."""
    from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 13, 8, ["fa"], "sum"),
                                               EmbeddingBagConfig("t_b", 7, 8, ["fb", "fb2"], "mean"),
                                               EmbeddingBagConfig("t_c", 7, 8, ["fc"], "sum")])

        def forward(self, kjt):
            return self.ebc(kjt).values()

    rows = {"fa": 13, "fb": 7, "fb2": 7, "fc": 7}
    torch.manual_seed(0)
    model = Model().eval()
    lowered = fxrec.lower_for_inference(model, (_mixed_ebc_batch(rows, 3, 0),), "int8")
    compiled = torch.compile(model, backend="fxrec", options={"weight_dtype": "int8", "dense": "eager"})
    with torch.no_grad():
        for seed, b in enumerate([3, 1, 5, 4, 3, 6, 7, 2, 9, 8]):
            x = _mixed_ebc_batch(rows, b, seed)
            torch.testing.assert_close(compiled(x), lowered(x), rtol=0, atol=0, msg=f"batch {b}")
    assert len(B.compiled) <= 6
    assert all("lookups ['embedding_bag', 'embedding_bag_1', 'embedding_bag_2', 'embedding_bag_3']" in
               " ".join(g.meta["fxrec_log"]) for g in B.compiled if g.meta["fxrec_log"])


class _SparseFeatures(torch.nn.Module):
    """Six features, each with a table of its own; one feature also read unpooled."""

    def __init__(self):
        from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig(f"t{i}", 50, 8, [f"f{i}"], "mean" if i % 2 else "sum")
                                           for i in range(6)])
        self.ec = EmbeddingCollection([EmbeddingConfig("seq", 50, 8, ["f0"])])
        self.top = torch.nn.Linear(48, 1)

    def forward(self, kjt):
        return self.top(self.ebc(kjt).values()).sum() + self.ec(kjt)["f0"].values().sum()


def _often_empty_batch(b: int, seed: int, weighted: bool):
    """Each bag holds no id or one: at small batches many features are empty or single."""
    from fxrec.sparse import KeyedJaggedTensor
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 2, (6 * b,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(6)], values=torch.randint(0, 50, (n,), generator=g),
                             lengths=lengths, weights=torch.rand(n, generator=g) if weighted else None)


@pytest.mark.parametrize("backend", ["fxrec", "inductor"])
@pytest.mark.parametrize("weighted", [False, True])
def test_often_empty_features_train_compiled_without_hitting_the_recompile_limit(backend, weighted, one_thread):
    """A key's number of ids reaches the graph after the collection's split as a size
    dynamo never specialises: batches of 1-4 samples whose features are often empty or
    single-id compile a bounded number of graphs (the limit would raise here), and 24 SGD
    steps equal eager SGD. Before, every pattern of empty and single-id features
    recompiled; past dynamo's limit the lookups ran eagerly, where under fxrec's
    sparse_optimizer nothing trained the tables."""
    torch.manual_seed(0)
    model = _SparseFeatures()
    reference = copy.deepcopy(model)
    if backend == "fxrec":
        compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": fxrec.optim.SGD(lr=0.1)})
        opt = torch.optim.SGD(model.top.parameters(), lr=0.1)
    else:
        compiled, opt = torch.compile(model), torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in range(24):
            x = _often_empty_batch(1 + step % 4, step, weighted)
            out = compiled(x)
            out.backward()
            opt.step()
            opt.zero_grad()
            ref = reference(x)
            ref.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if backend == "fxrec":
        assert all(m.weight.grad is None for m in model.ebc.embedding_bags.values())  # trained inside backward


def test_often_empty_features_serve_quantized_without_hitting_the_recompile_limit(one_thread):
    torch.manual_seed(0)
    model = _SparseFeatures().eval()
    lowered = fxrec.lower_for_inference(model, (_often_empty_batch(3, 0, False),), "int8")
    compiled = torch.compile(model, backend="fxrec", options={"weight_dtype": "int8"})
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in range(24):
            x = _often_empty_batch(1 + step % 5, 100 + step, False)
            torch.testing.assert_close(compiled(x), lowered(x), rtol=1e-5, atol=1e-5, msg=f"step {step}")
    fused = [" ".join(g.meta["fxrec_log"]) for g in B.compiled if "serves groups" in " ".join(g.meta["fxrec_log"])]
    assert fused and all("quantize_tables" in log for log in fused)
    # dynamo's checks that each key's unbacked number of ids is >= 0 (a size always is) are
    # dropped, not run eagerly per key on every call
    assert not [n for g in B.compiled for n in g.graph.nodes if n.target is torch.ops.aten._assert_scalar.default]
