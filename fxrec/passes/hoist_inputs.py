"""hoist_inputs: index each lookup's ids out of the inputs as early as they can be.

apply_plan serves lookups that are ready together by one unit (one set of collectives, one
fused call), and lookups are ready together when all their ids exist before any of their
results is used. A loop such as ``[e(tokens[:, k]).mean(1) for k, e in enumerate(embs)]``
indexes table k's ids only after table k-1's result was used (its ``.mean``), so in graph
order no two lookups are ready together: every table got a unit of its own (8 tables: 8
times the collectives and kernel calls). The ids themselves depend on nothing but the input.

This pass moves the indexing that leads from the inputs to each lookup's ids (``x[:, k]``,
``x.select(1, k)``, ``.view``, ``.long()`` ...) to right after what it reads, so such lookups
are ready together. Only indexing moves, only earlier, and only in graphs with neither an
in-place write (whose order against a read matters: guard_inplace) nor a grad-mode switch
(the nodes' stamped modes must stay: grad_mode.py); such graphs are left as they are.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L
from fxrec.passes.grad_mode import is_switch
from fxrec.passes.guard_inplace import writes

__all__ = ["hoist_inputs_pass"]

NAME = "hoist_inputs"

_INDEX_METHODS = {"__getitem__", "select", "narrow", "view", "reshape", "squeeze", "unsqueeze", "flatten",
                  "contiguous", "long", "int", "t", "transpose", "permute", "unbind", "split", "chunk"}
_INDEX_FUNCTIONS = {operator.getitem, torch.select, torch.narrow, torch.reshape, torch.squeeze, torch.unsqueeze,
                    torch.flatten, torch.transpose, torch.permute, torch.unbind, torch.split, torch.chunk}


def _indexing(node: Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _INDEX_METHODS
    return node.op == "call_function" and node.target in _INDEX_FUNCTIONS


def hoist_inputs_pass(gm: GraphModule, ctx) -> GraphModule:
    """Move the indexing that makes the lookups' ids right after what it reads (module doc)."""
    nodes = list(gm.graph.nodes)
    if any(is_switch(n) or writes(gm, n) for n in nodes):
        return gm
    pos = {n: i for i, n in enumerate(nodes)}
    last_input = max((n for n in nodes if n.op == "placeholder"), key=pos.__getitem__, default=None)
    moved = 0

    def hoist(node: Node) -> None:
        nonlocal moved, pos
        if not _indexing(node):
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
        ctx.log.append(f"{NAME}: {moved} indexing node(s) of the lookups' ids moved next to what they read")
    return gm
