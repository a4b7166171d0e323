"""torch.compile(backend="fxrec"): the graph around the fused lookups goes to another backend.

By default inductor compiles the dense segments (test_compile_backend runs every model that
way); here: how the graph is cut (segments and their backends in the graph's meta),
``options={"dense": ...}`` (eager, aot_eager, a bad name), an inference graph left
unfused on several threads, a KeyedTensor crossing from fxrec's segment into a compiled one, and a
new batch size recompiling a segment, each against the eager model on fresh inputs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fxrec
from fxrec.lowering import backend as B
from fxrec.lowering.dense_compile import SEGMENTS, compile_dense
from models_zoo import CASES
from test_compile_backend import _train
from test_inference import _flat


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    B.compiled.clear()
    yield
    torch._dynamo.reset()


def _segments() -> list[tuple[str, str, int]]:
    return [s for g in B.compiled for s in g.meta.get(SEGMENTS, [])]


def _same_as_eager(case, compiled, reference, seeds=(1, 2)) -> None:
    with torch.no_grad():
        for seed in seeds:
            x = case.inputs(seed)
            for a, b in zip(_flat(compiled(*x)), _flat(reference(*x))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _inductor_graphs() -> int:
    return counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]


@pytest.mark.parametrize("name", ["dlrm_lists", "dlrm_ebc"])
def test_dense_segments_go_to_inductor_by_default(name, one_thread):
    """dlrm_ebc's fused segment hands the dense one a KeyedTensor."""
    case = CASES[name]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    _same_as_eager(case, torch.compile(model, backend="fxrec"), reference)
    kinds = {kind for _, kind, _ in _segments()}
    assert kinds == {"fxrec", "inductor"}, _segments()
    assert _inductor_graphs() >= 1
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("compiled with inductor" in line for line in logs), logs


def test_dense_eager_keeps_the_rewritten_graph():
    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    _same_as_eager(case, torch.compile(model, backend="fxrec", options={"dense": "eager"}), reference)
    assert {kind for _, kind, _ in _segments()} == {"fxrec"}
    assert _inductor_graphs() == 0
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for g in B.compiled for m in g.modules())


def test_training_with_aot_eager_dense_equals_eager_sgd():
    case = CASES["two_tower"]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec",
                             options={"sparse_optimizer": fxrec.optim.SGD(lr=0.1), "dense": "aot_eager"})
    _train(model, case, 3, 0.1, compiled)
    _train(reference, case, 3, 0.1)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert "aot_eager" in {kind for _, kind, _ in _segments()}


def test_new_batch_sizes_recompile_the_dense_segment():
    """Batches of 8, 5 and 1 samples: dynamo recompiles (1 is always specialised),
    each time the dense segment is compiled again, and every answer is the eager one."""
    from models_zoo import _dlrm_lists_inputs

    model, _ = CASES["dlrm_lists"].make(0)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec", options={"dense": "aot_eager"})
    with torch.no_grad():
        for seed, batch in enumerate((8, 5, 1)):
            x = _dlrm_lists_inputs(torch.Generator().manual_seed(seed), batch=batch)
            torch.testing.assert_close(compiled(*x), reference(*x), rtol=1e-5, atol=1e-6)
    assert sum(kind == "aot_eager" for _, kind, _ in _segments()) >= 2


@pytest.mark.parametrize("dense", ["inductr", 3, "fxrec"])
def test_a_bad_dense_backend_is_named(dense):
    case = CASES["bag_2d"]
    model, _ = case.make(0)
    with pytest.raises(Exception, match=f"options\\['dense'\\] = {dense!r} is not a torch.compile backend"):
        torch.compile(model, backend="fxrec", options={"dense": dense})(*case.inputs(1))


def test_segments_follow_graph_order():
    """A graph whose dense work comes before and after fxrec's nodes: three segments, the
    two dense ones compiled, each node in exactly one."""
    from torch.fx import symbolic_trace

    from fxrec.passes import lookup as L

    class M(torch.nn.Module):
        def forward(self, x):
            a = x * 2
            b = torch.relu(a)
            return b + 1

    gm = symbolic_trace(M())
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for n in gm.graph.nodes:
        n.meta[L.PASS] = "fuse_lookups" if n is nodes[1] else "input"  # pretend relu is fxrec's
    log: list[str] = []
    split = compile_dense(gm, "aot_eager", None, log)
    assert [(k, c) for _, k, c in split.meta[SEGMENTS]] == [("aot_eager", 1), ("fxrec", 1), ("aot_eager", 1)]
    x = torch.randn(5)
    torch.testing.assert_close(split(x), torch.relu(x * 2) + 1)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_inference_keeps_lookups_only_torch_would_serve(two_threads):
    """On 2 CPU threads every pooled forward is torch's per-table embedding_bag (fbgemm's runs
    on one thread): an inference graph keeps its lookups and goes to inductor as it is. A
    kernel asked for fuses anyway; training (the fused optimizer) always fuses."""
    from fxrec.lowering import FusedEmbeddingBags

    case = CASES["dlrm_lists"]
    model, _ = case.make(0)
    reference = copy.deepcopy(model)
    _same_as_eager(case, torch.compile(model, backend="fxrec"), reference)
    logs = [line for g in B.compiled for line in g.meta["fxrec_log"]]
    assert any("lookups left unfused: on this device each would be served by torch's per-table embedding_bag"
               in line for line in logs), logs
    assert not [m for g in B.compiled for m in g.modules() if isinstance(m, FusedEmbeddingBags)]
    assert {kind for _, kind, _ in _segments()} == {"inductor"}
    torch._dynamo.reset()
    B.compiled.clear()
    _same_as_eager(case, torch.compile(model, backend="fxrec", options={"kernel": "torch", "dense": "eager"}),
                   reference)
    assert [m.kernel for g in B.compiled for m in g.modules() if isinstance(m, FusedEmbeddingBags)]


def test_mode_reaches_inductor(monkeypatch):
    """torch.compile's `mode` goes to inductor: to each dense segment's torch.compile, and as
    inductor's config for a graph handed over whole."""
    import torch._inductor.compile_fx as inductor
    from torch.fx import symbolic_trace

    from fxrec.lowering.dense_compile import compile_whole
    from fxrec.passes import lookup as L

    seen = {}

    def fake_compile(module, **kw):
        seen["segment"] = kw
        return module

    def fake_compile_fx(gm, inputs, **kw):
        seen["whole"] = kw
        return gm

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(inductor, "compile_fx", fake_compile_fx)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x * 2) + 1

    gm = symbolic_trace(M())
    first = next(n for n in gm.graph.nodes if n.op == "call_function")
    for n in gm.graph.nodes:
        n.meta[L.PASS] = "fuse_lookups" if n is first else "input"
    compile_dense(gm, "inductor", "max-autotune-no-cudagraphs", [])
    assert seen["segment"] == {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}
    compile_whole(symbolic_trace(M()), [torch.randn(3)], "inductor", "max-autotune-no-cudagraphs")
    assert seen["whole"]["config_patches"] == torch._inductor.list_mode_options("max-autotune-no-cudagraphs")


def test_every_segment_is_compiled_past_dynamos_recompile_limit():
    """Dynamo counts compiled code against ``recompile_limit`` per code object. Segments
    split under dynamo are lazy modules, whose forward (one function inside torch until the
    first call) dynamo entered through one wrapper for all of them, so the 9th segment of a
    process (here: of 12 graphs) ran uncompiled. Each segment's code is generated first:
    every segment has compiled code of its own, and every answer is the eager one."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.fx import symbolic_trace
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    from fxrec.passes import lookup as L

    class M(torch.nn.Module):
        def __init__(self, k: float):
            super().__init__()
            self.k = k

        def forward(self, x):
            return torch.relu(x * self.k) + 1

    splits = []
    for k in range(12):
        gm = symbolic_trace(M(float(k)))
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        for n in gm.graph.nodes:
            n.meta[L.PASS] = "fuse_lookups" if n is first else "input"
        with _use_lazy_graph_module(True):  # as inside dynamo's call of the backend
            splits.append(compile_dense(gm, "aot_eager", None, []))
    x = torch.randn(5)
    for k, split in enumerate(splits):
        torch.testing.assert_close(split(x), torch.relu(x * k) + 1)
    assert counters["stats"]["unique_graphs"] == 12  # each segment compiled, none left to run eagerly
    entries = [getattr(split, name).compiled for split in splits
               for name, kind, _ in split.meta[SEGMENTS] if kind == "aot_eager"]
    assert len(entries) == 12
    assert len({id(e._torchdynamo_orig_callable.__code__) for e in entries}) == 12  # a code object each
    assert all(len(_debug_get_cache_entry_list(e._torchdynamo_orig_callable.__code__)) == 1 for e in entries)


def test_size_checks_run_in_fxrecs_segment():
    """Dynamo checks each unbacked size it takes as an input (``u0 >= 0``). Those checks run
    in fxrec's segment: the dense one then takes no size, which it would specialise on 0
    and 1 and recompile for."""
    import operator

    from torch.fx import Graph, GraphModule

    from fxrec.passes import lookup as L

    g = Graph()
    x, n = g.placeholder("x"), g.placeholder("n")
    x.meta["example_value"], n.meta["example_value"] = torch.randn(3), 3
    ge = g.call_function(operator.ge, (n, 0))
    g.call_function(torch.ops.aten._assert_scalar.default, (ge, "n >= 0"))
    fx_node = g.call_function(torch.mul, (x, 2.0))
    fx_node.meta[L.PASS] = "fuse_lookups"
    g.output(g.call_function(torch.relu, (fx_node,)))
    split = compile_dense(GraphModule(torch.nn.Module(), g), "aot_eager", None, [])
    assert [(k, c) for _, k, c in split.meta[SEGMENTS]] == [("fxrec", 3), ("aot_eager", 1)]
    dense = getattr(split, split.meta[SEGMENTS][1][0]).segment
    assert [p.name for p in dense.graph.nodes if p.op == "placeholder"] == ["mul"]
    x = torch.randn(3)
    torch.testing.assert_close(split(x, 0), torch.relu(x * 2))
