"""hoist_inputs: compute each lookup's ids out of the inputs as early as they can be.

apply_plan serves lookups that are ready together by one unit (one set of collectives, one
fused call), and lookups are ready together when all their ids exist before any of their
results is used. A loop such as ``[e(tokens[:, k]).mean(1) for k, e in enumerate(embs)]``
indexes table k's ids only after table k-1's result was used (its ``.mean``), so in graph
order no two lookups are ready together: every table got a unit of its own (8 tables: 8
times the collectives and kernel calls). The ids themselves depend on nothing but the input.

The same holds for two lookups of one table, which must share a unit: a DIN-style model
looks up the behaviour sequence, uses the result, then looks up the target item by ids it
hashes or clamps (``self.item(target % n)``); in graph order the second lookup's ids came
after the first's result was used, and apply_plan refused the table.

This pass moves the computation that leads from the inputs to each lookup's ids to right
after what it reads, so such lookups are ready together: indexing (``x[:, k]``,
``x.select(1, k)``, ``.view``, ``.long()`` ...) and pure arithmetic (``%``, ``clamp``,
``where``, ``roll``, comparisons, ``cat`` ...). Nothing that draws random numbers, calls a
submodule or writes in place moves; nodes move only earlier; nothing moves in a graph with a
grad-mode switch (the nodes' stamped modes must stay: grad_mode.py); and in a graph that
writes in place, nothing moves that reads a tensor some write may reach, whose value depends
on where it is read. Which tensors a write may reach is judged conservatively
(`_may_share`): any node but a lookup, a snapshot or arithmetic known to return a new tensor
may return a view of its inputs (``.ravel()``, ``split_with_sizes`` and ops no list names).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L
from fxrec.passes.grad_mode import is_switch
from fxrec.passes.guard_inplace import _Families, snapshot, writes

__all__ = ["hoist_inputs_pass"]

NAME = "hoist_inputs"

_INDEX_METHODS = {"__getitem__", "select", "narrow", "view", "reshape", "squeeze", "unsqueeze", "flatten",
                  "contiguous", "long", "int", "t", "transpose", "permute", "unbind", "split", "chunk"}
_INDEX_FUNCTIONS = {operator.getitem, torch.select, torch.narrow, torch.reshape, torch.squeeze, torch.unsqueeze,
                    torch.flatten, torch.transpose, torch.permute, torch.unbind, torch.split, torch.chunk}


# pure computations on ids (deterministic, no state, no in-place write: `writes` is checked too)
_PURE_METHODS = {"remainder", "fmod", "clamp", "clip", "clamp_min", "clamp_max", "where", "masked_fill", "roll",
                 "flip", "gather", "index_select", "eq", "ne", "lt", "le", "gt", "ge", "abs", "add", "sub", "mul",
                 "div", "floor_divide", "neg", "to", "type", "type_as", "expand", "expand_as", "repeat",
                 "repeat_interleave", "size", "cumsum", "view_as", "reshape_as", "unflatten", "bool", "float",
                 "minimum", "maximum", "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or",
                 "bitwise_xor", "__and__", "__or__", "__xor__", "__invert__"}
_PURE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                   operator.neg, operator.pos, operator.abs, operator.and_, operator.or_, operator.xor,
                   operator.invert, operator.lshift, operator.rshift, operator.pow, operator.eq, operator.ne,
                   operator.lt, operator.le, operator.gt, operator.ge, getattr,
                   torch.remainder, torch.fmod, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
                   torch.where, torch.masked_fill, torch.roll, torch.flip, torch.gather, torch.index_select,
                   torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.abs, torch.add, torch.sub,
                   torch.mul, torch.div, torch.floor_divide, torch.neg, torch.cat, torch.concat, torch.stack,
                   torch.minimum, torch.maximum, torch.logical_and, torch.logical_or, torch.logical_not,
                   torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor, torch.cumsum, torch.repeat_interleave,
                   torch.arange, torch.zeros_like, torch.ones_like, torch.full_like}


# of the pure computations, those whose result is a new tensor, never a view of an input; and
# products and functional lookups, so that a table they read (``h @ self.items.weight.t()``,
# ``F.embedding(ids, self.table)``) is no kin of a write to their result or to the other input:
# the example run saves the parameters a write may reach (shapes._written_parameters)
_FRESH_METHODS = _PURE_METHODS - {"to", "type", "type_as", "expand", "expand_as", "view_as", "reshape_as",
                                  "unflatten", "bool", "float", "size"} | {"matmul", "mm", "bmm"}
_FRESH_FUNCTIONS = _PURE_FUNCTIONS - {getattr, operator.pos} | {
    operator.matmul, torch.matmul, torch.mm, torch.bmm, F.linear, *L.F_ARGS}


def _fresh(node: Node) -> bool:
    """Whether `node`'s result shares no storage with its inputs."""
    if L.LOOKUP in node.meta:
        return True
    if node.op == "call_method":
        return str(node.target) in _FRESH_METHODS
    return node.op == "call_function" and (node.target in _FRESH_FUNCTIONS or node.target is snapshot)


def _may_share(gm: GraphModule, node: Node) -> list[Node]:
    """The inputs `node`'s result may share storage with, judged conservatively: all of them,
    unless it is `_fresh` (guard_inplace's alias lists name the views they know; a view they
    miss must not let a read move past a write through it, nor the example run leave a
    parameter written through it unrestored: shapes._written_parameters)."""
    return [] if _fresh(node) else node.all_input_nodes


def _movable(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        ok = name in _INDEX_METHODS or name in _PURE_METHODS
    else:
        ok = node.op == "call_function" and (node.target in _INDEX_FUNCTIONS or node.target in _PURE_FUNCTIONS)
    return ok and not writes(gm, node) and node.kwargs.get("out") is None


def hoist_inputs_pass(gm: GraphModule, ctx) -> GraphModule:
    """Move the computation that makes the lookups' ids right after what it reads (module doc)."""
    nodes = list(gm.graph.nodes)
    if any(is_switch(n) for n in nodes):
        return gm
    by_node = {n: writes(gm, n) for n in nodes}
    written = [t for targets in by_node.values() for t in targets]
    family = _Families(gm, by_node, shares=_may_share) if written else None
    hit = {family.find(t) for t in written}
    pos = {n: i for i, n in enumerate(nodes)}
    last_input = max((n for n in nodes if n.op == "placeholder"), key=pos.__getitem__, default=None)
    moved = 0

    def hoist(node: Node) -> None:
        nonlocal moved, pos
        if not _movable(gm, node) or (hit and any(family.find(a) in hit for a in node.all_input_nodes)):
            return
        for arg in node.all_input_nodes:
            hoist(arg)
        latest = max(node.all_input_nodes, key=pos.__getitem__, default=None)
        if latest is not None and latest.op == "placeholder":
            latest = last_input  # the placeholders stay first
        if latest is None or pos[latest] + 1 >= pos[node]:
            return
        latest.append(node)  # right after the last thing it reads: still before every user
        pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        moved += 1

    for lookup in [n for n in nodes if L.LOOKUP in n.meta]:
        for arg in lookup.all_input_nodes:
            hoist(arg)
    if moved:
        gm.recompile()
        ctx.log.append(f"{NAME}: {moved} node(s) computing the lookups' ids moved next to what they read")
    return gm
