"""Grad mode in a graph: which nodes run with gradients off, and keeping it so.

A forward may switch gradients off for part of its work (``with torch.no_grad():`` around
negatives' lookups or a frozen projection; ``torch.enable_grad()``, ``set_grad_enabled``,
``inference_mode``). fxrec.capture records each switch as graph nodes, as dynamo does:

    prev = torch.is_grad_enabled(); torch._C._set_grad_enabled(False)   # entering
    ...                                                                 # the block
    torch._C._set_grad_enabled(prev)                                    # leaving

`grad_states` reads the mode every node runs in from that structure: INHERIT (the
caller's, before any switch or after the last one is undone), True or False (a constant
switch), DYNAMIC (a switch to a runtime value, e.g. ``set_grad_enabled(self.training)``).
detect_embeddings stamps each node's state in ``meta[GRAD_MODE]`` and leaves dense the
tables read by a lookup with gradients off (table_reads' machinery: such a read is not a
trained lookup); `changed_states`, checked by the runner's lint after every pass, lists
stamped nodes a rewrite moved into another mode (a fused unit placed inside a no_grad
block, a dense node moved out of one): such a program would train what the model does not.
"""
from __future__ import annotations

from typing import Union

import torch
from torch.fx import GraphModule, Node

from fxrec.passes.lookup import GRAD_MODE

__all__ = ["GRAD_MODE", "INHERIT", "DYNAMIC", "grad_states", "stamp", "settle", "changed_states", "is_switch"]

INHERIT, DYNAMIC = "inherit", "dynamic"
State = Union[bool, str]


def is_switch(node: Node) -> bool:
    return node.op == "call_function" and node.target in (torch._C._set_grad_enabled, torch.is_grad_enabled)


def grad_states(gm: GraphModule) -> dict[Node, State]:
    """Node -> the grad mode it runs in (module doc)."""
    state: State = INHERIT
    saved: dict[Node, State] = {}  # is_grad_enabled() node -> the state it reads
    out: dict[Node, State] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.is_grad_enabled:
            saved[node] = state
        elif node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            mode = node.args[0] if node.args else node.kwargs.get("mode")
            if isinstance(mode, bool):
                state = mode
            elif isinstance(mode, Node) and mode in saved:
                state = saved[mode]
            else:
                state = DYNAMIC
        out[node] = state
    return out


def stamp(gm: GraphModule) -> dict[Node, State]:
    states = grad_states(gm)
    for node, state in states.items():
        node.meta[GRAD_MODE] = state
    return states


def settle(gm: GraphModule, before: Node, want: State) -> Node:
    """`before`, or the first later insertion point whose grad mode is `want` (past the end
    of a no_grad block the point fell into); `before` itself when there is none."""
    states = grad_states(gm)
    node = before
    while node.op != "output":
        prev = node.prev
        if states.get(prev, INHERIT) == want:
            return node
        node = node.next
    return before


def changed_states(gm: GraphModule) -> list[str]:
    """One line per stamped node whose mode is no longer the stamped one."""
    out = []
    for node, state in grad_states(gm).items():
        was = node.meta.get(GRAD_MODE)
        if was is not None and was != state and not is_switch(node):
            out.append(f"%{node.name} ran with grad mode {_say(was)} and would run with {_say(state)}")
    return out


def _say(state: State) -> str:
    return {True: "on", False: "off", INHERIT: "the caller's", DYNAMIC: "set at run time"}[state]
