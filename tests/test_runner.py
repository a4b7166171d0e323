"""The pass runner: order, disable/until, provenance, lint and error messages."""
from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule

import fxrec
from fxrec.passes import PASSES, PassContext, PassError, run_passes
from fxrec.passes import lookup as L
from fxrec.passes.lookup import Lookup, TableRead

try:
    from tests import models_zoo as zoo
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import models_zoo as zoo

DEFAULT = [name for name, _ in PASSES]


def _captured(name="dlrm_lists"):
    case = zoo.CASES[name]
    model, example = case.make()
    return case, model, example, fxrec.capture(model, example), PassContext(example_inputs=example)


def double_negate_output(gm: GraphModule, ctx) -> GraphModule:
    """Adds two nodes computing -(-y) before the output: same numbers, new nodes."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (y,) = out.args[0]
    with gm.graph.inserting_before(out):
        neg = gm.graph.call_function(torch.neg, (y,))
        back = gm.graph.call_function(torch.neg, (neg,))
    out.args = ([back],)
    return gm


def test_default_order():
    assert DEFAULT[:4] == ["detect_embeddings", "guard_inplace", "hoist_inputs", "group_tables"]


def test_new_nodes_are_stamped_with_their_pass():
    case, model, example, gm, ctx = _captured()
    passes = PASSES + [("double_negate", double_negate_output)]
    gm = run_passes(gm, ctx, passes=passes)
    stamps = {n.name: n.meta[L.PASS] for n in gm.graph.nodes}
    assert stamps["neg"] == stamps["neg_1"] == "double_negate"
    assert {v for k, v in stamps.items() if not k.startswith("neg")} == {"capture"}
    assert gm.meta[L.PASSES_RUN] == DEFAULT + ["double_negate"]
    assert len([n for n in gm.graph.nodes if n.target is torch.neg]) == 2
    fresh = case.inputs(3)
    torch.testing.assert_close(gm(*fresh), model(*fresh))  # recompiled by the runner


@pytest.mark.parametrize("disable,until,expected", [
    ((), None, DEFAULT),
    (tuple(DEFAULT[1:]), None, ["detect_embeddings"]),
    ((), "detect_embeddings", ["detect_embeddings"]),
    (tuple(DEFAULT), None, []),
])
def test_disable_and_until(disable, until, expected):
    _, _, _, gm, ctx = _captured()
    seen = []
    gm = run_passes(gm, ctx, disable=disable, until=until, observer=lambda name, g, c: seen.append(name))
    assert seen == expected
    assert gm.meta.get(L.PASSES_RUN, []) == expected
    assert bool(ctx.tables) == ("detect_embeddings" in expected)
    assert bool(ctx.groups) == ("group_tables" in expected)


@pytest.mark.parametrize("kwargs", [{"disable": ["nope"]}, {"until": "nope"}])
def test_unknown_pass_name(kwargs):
    _, _, _, gm, ctx = _captured()
    with pytest.raises(ValueError, match="unknown pass .nope.; the passes are: detect_embeddings, guard_inplace, hoist_inputs, "
                                         "group_tables, apply_plan, global_renorm, route_collisions, fuse_lookups"):
        run_passes(gm, ctx, **kwargs)


def boom(gm, ctx):
    raise RuntimeError("kaboom")


def returns_none(gm, ctx):
    return None


def breaks_the_graph(gm, ctx):
    # a node used before it is defined: graph.lint() must catch it
    first = next(iter(gm.graph.nodes))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        late = gm.graph.call_function(torch.neg, (first,))
    with gm.graph.inserting_after(first):
        gm.graph.call_function(torch.neg, (late,))
    return gm


def unregistered_table(gm, ctx):
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.meta[L.LOOKUP] = Lookup("module_bag", (TableRead("ghost", "sum", "ghost.weight"),))
    return gm


@pytest.mark.parametrize("fn,reason", [
    (boom, r"RuntimeError: kaboom"),
    (returns_none, r"returned NoneType, expected a GraphModule"),
    (breaks_the_graph, r"graph lint failed after it: RuntimeError: .*used before"),
    (unregistered_table, r"graph lint failed after it: ValueError: lookup %\w+ reads tables \['ghost'\] missing"),
])
def test_failures_name_the_pass_and_those_before(fn, reason):
    _, _, _, gm, ctx = _captured()
    passes = PASSES + [("bad", fn)]
    before = ", ".join(DEFAULT)
    with pytest.raises(PassError, match=rf"pass 'bad' failed: {reason}.*\(passes run before it: {before}\)") as info:
        run_passes(gm, ctx, passes=passes)
    assert info.value.pass_name == "bad" and info.value.ran_before == DEFAULT


def test_first_pass_failure_says_none_ran_before():
    _, _, _, gm, ctx = _captured()
    with pytest.raises(PassError, match=r"pass 'bad' failed: RuntimeError: kaboom \(passes run before it: none\)"):
        run_passes(gm, ctx, passes=[("bad", boom)] + PASSES)


def test_graph_not_from_capture_is_stamped_input():
    model, example = zoo.CASES["bag_2d"].make()
    gm = torch.fx.symbolic_trace(model)
    gm = run_passes(gm, PassContext(example_inputs=example))
    assert {n.meta[L.PASS] for n in gm.graph.nodes} == {"input"}
    assert [t.name for t in gm.meta[L.TABLES].values()] == ["bag"]
