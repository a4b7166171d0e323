"""Who reads a table's weight besides its lookups (detect_embeddings' helpers).

A table that fxrec shards or fuses leaves the module: its rows move into shards or into a
fused buffer. Any other read of the weight would then see a stale copy (a tied output layer
scoring against the table, an L2 regulariser over it), or keep the whole table alive on
every rank. So detect_embeddings leaves such a table dense: an ordinary parameter, trained
by the dense optimizer, whose gradient sums what every use sends it.

Reads of the weight's *metadata* are not such uses: ``w.shape``, ``w.size()``, ``w.dim()``,
``w.ndim`` and ``w.dtype`` are folded into constants first (hashing ids modulo
``emb.weight.shape[0]`` is common). ``w.device`` is not folded: a table built on the meta
device would hand its device to the dense code, so it counts as a use.
"""
from __future__ import annotations

import itertools
import operator
import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L

__all__ = ["fold_weight_metadata", "reads_outside"]

_FOLDED_ATTRS = ("shape", "ndim", "dtype")
_FOLDED_METHODS = ("size", "dim")


def _metadata(node: Node, weight: Tensor):
    """The constant `node` computes from `weight`'s metadata, or raise LookupError."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _FOLDED_ATTRS:
        return getattr(weight, node.args[1])
    if node.op == "call_method" and node.target in _FOLDED_METHODS and not node.kwargs:
        if node.target == "dim" and len(node.args) == 1:
            return weight.dim()
        if node.target == "size" and len(node.args) in (1, 2) and all(isinstance(a, int) for a in node.args[1:]):
            return weight.size(*node.args[1:])
    raise LookupError


def _inline(node: Node, value) -> None:
    """Replace `node` by the constant `value` in its users' arguments; an indexing of a
    folded shape (``shape[0]``) folds too."""
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node \
                and isinstance(user.args[1], (int, slice)) and isinstance(value, tuple):
            _inline(user, value[user.args[1]])
        else:
            user.replace_input_with(node, value)
    if not node.users:
        node.graph.erase_node(node)


def fold_weight_metadata(gm: GraphModule, tables: set, names: dict) -> None:
    """Fold the metadata reads of the weights of `tables` into constants. Leaves other uses
    alone. `names` as for `reads_outside`."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or names.get(str(node.target)) not in tables:
            continue
        weight = L.fetch_attr(gm, str(node.target))
        if not isinstance(weight, Tensor):
            continue
        for user in list(node.users):
            try:
                value = _metadata(user, weight)
            except LookupError:
                continue
            if isinstance(value, torch.Size):
                value = tuple(value)  # a plain tuple is a graph constant on every torch version
            _inline(user, value)
        if not node.users:
            gm.graph.erase_node(node)


def reads_outside(gm: GraphModule, lookups: set, tables: set, names: dict) -> dict[str, Node]:
    """Table name (of `tables`) -> the first node that reads its weight other than as one of
    the `lookups` nodes: a get_attr of the weight used by another node, or a call of a
    module holding it that is not one of the lookups. `names` maps parameter and buffer
    paths to table names (`L.table_names_by_param`)."""
    out: dict[str, Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            table = names.get(str(node.target))
            if table in tables and table not in out:
                other = next((u for u in node.users if u not in lookups), None)
                if other is not None:
                    out[table] = other
        elif node.op == "call_module" and node not in lookups:
            mod = gm.get_submodule(str(node.target))
            held = itertools.chain(mod.named_parameters(remove_duplicate=False),
                                   mod.named_buffers(remove_duplicate=False))
            for path, _ in held:
                table = names.get(f"{node.target}.{path}" if node.target else path)
                if table in tables:
                    out.setdefault(table, node)
    return out
