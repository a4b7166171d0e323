"""guard_inplace: a lookup reads its ids, and gives its result, as at its place in the model.

A forward may write a tensor in place (``x.add_(1)``, ``x.clamp_(max=n)``, ``x[mask] = 0``,
``x += 1``, ``nn.ReLU(inplace=True)``). The passes after this one move lookups: apply_plan
and fuse_lookups put each unit of lookups right after its inputs exist, which can be before
an in-place write the model made to those ids (the unit would read them unwritten) or after
one it made later (the unit would read them written). And a sharded or fused lookup returns
views of a buffer it split, which autograd does not let the model write in place.

So where the graph writes anything in place, this pass finds, by following aliases (views,
reshapes, indexing, ``.to()``/``.long()`` that may return their input, a container's item):

- each lookup input some write may reach: the lookup reads a `snapshot` of it taken at the
  lookup's own place (``clone`` of its tensors), which no later move can separate from it;
- each lookup result (or folded .sum/.mean) some write may reach: the model's code gets a
  `snapshot` of it, a tensor of its own that it may write.

A graph with no in-place write is returned as it is (most models: nothing is added).
Writes to parameters and buffers (``get_attr`` nodes) are not the lookups' concern.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L

__all__ = ["guard_inplace_pass", "snapshot", "writes"]

NAME = "guard_inplace"

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}
# trailing-underscore methods that write no tensor data
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad_", "record_stream_"}
# methods and functions whose result may share storage with their first argument
_ALIAS_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "narrow", "select", "split", "chunk", "unbind", "tensor_split", "expand", "expand_as",
    "as_strided", "contiguous", "detach", "to", "type", "type_as", "long", "int", "float", "double", "half",
    "bfloat16", "short", "byte", "bool", "cpu", "cuda", "movedim", "moveaxis", "swapaxes", "swapdims",
    "diagonal", "unfold", "values", "lengths", "offsets", "weights", "weights_or_none", "to_dict", "__getitem__",
}
_ALIAS_FUNCTIONS = {operator.getitem, getattr, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                    torch.transpose, torch.permute, torch.t, torch.narrow, torch.select, torch.split, torch.chunk,
                    torch.unbind, torch.tensor_split, torch.movedim, torch.swapaxes, torch.detach, torch.diagonal}


def writes(gm: GraphModule, node: Node) -> list[Node]:
    """The nodes whose values `node` writes in place (empty for a node that writes nothing)."""
    first = [node.args[0]] if node.args and isinstance(node.args[0], Node) else []
    out = node.kwargs.get("out")
    if isinstance(out, Node):
        return [out]
    if node.kwargs.get("inplace") is True:
        return first
    if node.op == "call_method":
        name = str(node.target)
        if (name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES) or name == "__setitem__":
            return first
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return first
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
            return first
    elif node.op == "call_module":
        if getattr(gm.get_submodule(str(node.target)), "inplace", False) is True:
            return first
    return []


# torch.nn modules whose result may be their input or a view of it (dropout: in eval mode)
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout, nn.FeatureAlphaDropout)


def _aliases(gm: GraphModule, node: Node) -> bool:
    """Whether `node`'s result may share storage with its first argument. Of submodule calls:
    the torch.nn modules that return their input or a view of it, and any module fx kept
    whole that is not torch.nn's (what it returns is unknown); not a lookup."""
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return L.LOOKUP not in node.meta and (isinstance(mod, _ALIAS_MODULES)
                                              or not type(mod).__module__.startswith("torch.nn"))
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


def snapshot(value):
    """`value` with every tensor in it cloned (a tensor; a KeyedJaggedTensor, KeyedTensor or
    any object, shallow-copied with its tensor attributes cloned; lists, tuples, dicts)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        items = [snapshot(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a NamedTuple
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if hasattr(value, "__dict__") and not isinstance(value, nn.Module):
        out = copy.copy(value)
        for k, v in vars(value).items():
            if isinstance(v, (Tensor, list, tuple, dict)):
                setattr(out, k, snapshot(v))
        return out
    return value


torch.fx.wrap("snapshot")


def _alias_of_first(gm: GraphModule, node: Node) -> list[Node]:
    """The input `node`'s result may share storage with, by the alias lists: its first
    argument, for the ops that may return it or a view of it."""
    first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    return [first] if first is not None and _aliases(gm, node) else []


class _Families:
    """Union-find over nodes that may share storage (a node joins the inputs `shares(gm,
    node)` names, by default an alias op's first argument; an in-place op's result is its
    target)."""

    def __init__(self, gm: GraphModule, written: dict[Node, list[Node]], shares=_alias_of_first):
        self.parent: dict[Node, Node] = {}
        for node in gm.graph.nodes:
            for target in written[node]:  # x.add_(1) is x; torch.add(a, b, out=c) is c
                self.join(node, target)
            for other in shares(gm, node):
                self.join(node, other)

    def find(self, node: Node) -> Node:
        root = node
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while node is not root:
            self.parent[node], node = root, self.parent.get(node, node)
        return root

    def join(self, a: Node, b: Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb


def _output(gm: GraphModule, node: Node) -> Node:
    """The node whose value a lookup gives its users: its folded .sum/.mean, if any."""
    pool = node.meta[L.LOOKUP].pool_node
    if pool is None:
        return node
    return next(n for n in gm.graph.nodes if n.name == pool)


def guard_inplace_pass(gm: GraphModule, ctx) -> GraphModule:
    """Snapshot the lookups' inputs and results that an in-place write may reach (module doc)."""
    by_node = {n: writes(gm, n) for n in gm.graph.nodes}
    written = [t for targets in by_node.values() for t in targets if t.op != "get_attr"]
    if not written:
        return gm
    fam = _Families(gm, by_node)
    hit = {fam.find(t) for t in written}
    lookups = [n for n in gm.graph.nodes if L.LOOKUP in n.meta]
    changed = 0
    for node in lookups:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" and fam.find(arg) in hit:
                with gm.graph.inserting_before(node):
                    snap = gm.graph.call_function(snapshot, (arg,))
                node.replace_input_with(arg, snap)
                changed += 1
                ctx.log.append(f"{NAME}: %{node.name} reads a snapshot of %{arg.name}, which the model writes "
                               f"in place")
        out = _output(gm, node)
        if fam.find(out) in hit:
            users = list(out.users)
            with gm.graph.inserting_after(out):
                snap = gm.graph.call_function(snapshot, (out,))
            for user in users:
                user.replace_input_with(out, snap)
            changed += 1
            ctx.log.append(f"{NAME}: the model writes the result of %{node.name} in place: it gets a copy")
    if changed:
        gm.recompile()
    return gm
