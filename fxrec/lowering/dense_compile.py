"""The rest of a graph the compile backend fused: compiled by another torch.compile backend.

`torch.compile(model, backend="fxrec")` replaces the embedding lookups by fxrec's fused
modules; what remains (the dense MLPs, the feature interaction, the loss) is what inductor
is good at and fxrec is not. `compile_dense` cuts the rewritten graph into segments, in
graph order: runs of nodes fxrec's passes made (their provenance, ``meta["fxrec_pass"]``,
names a pass) and runs of the nodes dynamo captured (provenance "input"). fxrec's segments
run as they are; each dense segment is handed to ``torch.compile(segment, backend=...)``.

Why nested torch.compile and not the backend function itself: a backend needs example
inputs, and a dense segment after the lookups reads the fused modules' outputs, which have
no fake value before the first call (the fused kernels sync with the host, and fake tensors
cannot run them). torch.compile compiles the segment on its first call, with its own guards:
a new batch size recompiles it (dynamic after the first change, as torch.compile always
does), exactly as when the user compiles a function that calls an uncompiled one. Each
segment is entered through a function with code of its own (`_entry`): dynamo keeps compiled
code, and counts it against ``recompile_limit``, per code object, and it entered every module
split under dynamo (whose lazy forward is one function inside torch) through one shared
wrapper, so past the 8th segment of a process (8 graphs, or one graph recompiled for new
sizes) segments ran uncompiled.

A graph with no fused lookup (nothing to fuse, or lookups left for the user's optimizer) is
handed to the backend whole, with dynamo's own example inputs: `compile_whole`.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.passes.split_module import split_module

from fxrec.passes import lookup as L

__all__ = ["DENSE_BACKENDS", "compile_dense", "compile_whole", "check_dense"]

# "eager" runs the rest of the graph as dynamo captured it; any other name is a torch.compile
# backend (torch._dynamo.list_backends()): "inductor" (the default), "aot_eager", ...
DENSE_BACKENDS = ("inductor", "aot_eager", "eager")
SEGMENTS = "fxrec_dense_segments"  # gm.meta: list of (submodule name, "fxrec" | backend, node count)


def check_dense(name) -> str:
    """The dense backend's name, or a ValueError naming the accepted ones."""
    import torch._dynamo

    known = set(DENSE_BACKENDS) | set(torch._dynamo.list_backends(exclude_tags=()))
    if not isinstance(name, str) or name not in known or name == "fxrec":
        raise ValueError(f"torch.compile(backend='fxrec'): options['dense'] = {name!r} is not a torch.compile "
                         f"backend; use one of {sorted(known - {'fxrec'})} ('eager' runs the rest unchanged)")
    return name


def _is_dense(node: Node) -> bool:
    return node.meta.get(L.PASS, "input") == "input"


def _size_checks(gm: GraphModule) -> set[Node]:
    """Dynamo's checks of the graph's symbolic sizes (``u0 >= 0`` and its ``_assert_scalar``):
    nodes computing on size inputs and each other only. They run in fxrec's segments, so a
    dense segment takes a size only where its own computation reads it: one given the sizes
    of an input as ints would specialise on 0 and 1 and recompile for each."""
    sizes = {n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("example_value"),
                                                                              (torch.SymInt, int))}
    checks: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or isinstance(node.meta.get("example_value"), torch.Tensor):
            continue
        inputs = node.all_input_nodes
        if inputs and all(n in sizes or n in checks for n in inputs):
            checks.add(node)
    return checks


def _drop_sign_checks(gm: GraphModule) -> int:
    """Erase dynamo's ``_assert_scalar(u0 >= 0)`` of each unbacked size input (a KJT key's
    number of ids, `fxrec.modules._split_by_key`): a tensor's size is never negative, and
    the checks, run eagerly in fxrec's segment, cost two Python calls per key per call.
    Returns how many were erased."""
    import operator

    erased = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten._assert_scalar.default:
            continue
        cond = node.args[0] if node.args else None
        if not (isinstance(cond, Node) and cond.target is operator.ge and len(cond.args) == 2 and cond.args[1] == 0):
            continue
        size = cond.args[0]
        if isinstance(size, Node) and size.op == "placeholder" and isinstance(size.meta.get("example_value"),
                                                                               torch.SymInt):
            gm.graph.erase_node(node)
            if not cond.users:
                gm.graph.erase_node(cond)
            erased += 1
    if erased:
        gm.recompile()
    return erased


def _partitions(gm: GraphModule, checks: set[Node]) -> dict[Node, int]:
    """Node -> segment number: a new segment wherever graph order switches between fxrec's
    nodes and dynamo's (`_size_checks` count as fxrec's). Placeholders, get_attr and the
    output are placed by split_module."""
    part, seg, last = {}, -1, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        kind = _is_dense(node) and node not in checks
        if kind is not last:
            seg, last = seg + 1, kind
        part[node] = seg
    return part


def _entry(segment: GraphModule):
    """A function calling `segment`, whose code object is its own (module doc). The segment's
    code is generated first: dynamo does not trace a lazy module's forward, and would break
    the graph at it."""
    _LazyGraphModule.force_recompile(segment)

    def call(*args):
        return segment(*args)

    call.__code__ = call.__code__.replace(co_name=call.__code__.co_name)  # a new code object
    return call


class _Compiled(torch.nn.Module):
    """A dense segment (its parameters stay in the module tree) called through its compiled entry."""

    def __init__(self, segment: GraphModule, compiled):
        super().__init__()
        self.segment, self.compiled = segment, compiled

    def forward(self, *args):
        return self.compiled(*args)


def compile_dense(gm: GraphModule, backend: str, mode: Optional[str], log: list[str]) -> GraphModule:
    """`gm` split into segments (module doc), each dense one compiled with `backend`
    (``mode`` goes to inductor). Returns `gm` itself for backend "eager" or when the graph
    has no dense computation; ``meta[SEGMENTS]`` of the result lists the segments."""
    _drop_sign_checks(gm)
    checks = _size_checks(gm)
    part = _partitions(gm, checks)
    dense_nodes = [n for n in part if _is_dense(n) and n not in checks]
    if backend == "eager" or not dense_nodes:
        gm.meta[SEGMENTS] = [("", "fxrec", len(part))]
        log.append("backend: the rest of the graph runs eagerly"
                   + ("" if backend == "eager" else " (it has no dense computation)"))
        return gm
    kinds = {part[n]: ("eager" if not _is_dense(n) or n in checks else backend) for n in part}
    counts: dict[int, int] = {}
    for n, s in part.items():
        counts[s] = counts.get(s, 0) + 1
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    segments = []
    for name, sub in list(split.named_children()):
        match = re.fullmatch(r"submod_(\d+)", name)  # beside them: the tables' owners, for get_attr
        if match is None:
            continue
        s = int(match.group(1))
        if kinds[s] == "eager":
            segments.append((name, "fxrec", counts[s]))
            continue
        kwargs = {"mode": mode} if backend == "inductor" and mode is not None else {}
        setattr(split, name, _Compiled(sub, torch.compile(_entry(sub), backend=backend, **kwargs)))
        segments.append((name, backend, counts[s]))
    split.meta.update(gm.meta)
    gm.meta[SEGMENTS] = split.meta[SEGMENTS] = segments
    log.append("backend: dense segments " + ", ".join(f"{n} ({c} nodes)" for n, k, c in segments if k != "fxrec")
               + f" compiled with {backend}" + (f" (mode {mode})" if mode else "")
               + "; fxrec's " + ", ".join(n for n, k, _ in segments if k == "fxrec") + " run as they are")
    return split


def compile_whole(gm: GraphModule, example_inputs, backend: str, mode: Optional[str]):
    """The callable `backend` makes of the whole graph (no lookup was fused), or gm.forward
    for "eager"."""
    if backend == "eager":
        return gm.forward
    if backend == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
    from torch._dynamo import lookup_backend

    return lookup_backend(backend)(gm, example_inputs)
