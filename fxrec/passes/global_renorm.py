"""global_renorm: a max_norm table left dense renormalises the rows the *global* batch reads.

``nn.Embedding(max_norm=...)`` (and EmbeddingBag, F.embedding, F.embedding_bag with max_norm)
renormalises, in place and before its lookup, every row its ids read. detect_embeddings leaves
such a table dense: a replicated parameter on every rank. Run as it is, each rank would
renormalise only its local batch's rows, so the replicas drift apart from the first step, and
none equals the unsharded model on the global batch.

On more than one rank (``ctx.options["world_size"]``, set by `fxrec.shard`) this pass puts
before each such lookup an all_gather of its ids (a comm node, int64, any local batch size)
and a `renorm_rows` of the table for all of them, and makes the lookup itself one without
max_norm (a module call becomes the F.embedding / F.embedding_bag call it makes). A row's
renormalisation depends on that row alone and each row is renormalised once per lookup,
so every replica does exactly what the unsharded model does on the global batch. The
gradients are then averaged as for any dense parameter.

Left as they are: a module with hooks (the functional call would not run them: refused, naming
it) and nn.Embedding subclasses with a forward of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L
from fxrec.runtime import comm

__all__ = ["global_renorm_pass", "flat_ids", "renorm_rows"]

NAME = "global_renorm"


def flat_ids(ids: Tensor) -> Tensor:
    """The ids as one int64 vector (ranks may feed int32 and int64 ids)."""
    return ids.reshape(-1).long()


def renorm_rows(weight: Tensor, ids: Tensor, max_norm: float, norm_type: float) -> None:
    """What F.embedding does before its lookup, for `ids` (every rank's)."""
    with torch.no_grad():
        torch.embedding_renorm_(weight, ids, max_norm, norm_type)


torch.fx.wrap("flat_ids")
torch.fx.wrap("renorm_rows")


def _plain_module(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Embedding) and type(mod).forward is nn.Embedding.forward) or (
        isinstance(mod, nn.EmbeddingBag) and type(mod).forward is nn.EmbeddingBag.forward)


def _functional_call(gm: GraphModule, node: Node, mod: nn.Module) -> tuple:
    """(ids node, weight node, F call args, max_norm, norm_type) of a max_norm module's call."""
    path = str(node.target)
    if L.hooks_of(mod):
        raise ValueError(f"fxrec.shard: table {path!r} has max_norm and a {' and a '.join(L.hooks_of(mod))}: "
                         f"to keep its replicas equal, fxrec renormalises the rows of every rank's ids before "
                         f"an F.embedding call, which would not run the hooks; remove them, or shard on one rank")
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{path}.weight")
    ids = node.args[0] if node.args else node.kwargs.get("input")
    if isinstance(mod, nn.Embedding):
        args = (ids, weight, mod.padding_idx, None, mod.norm_type, mod.scale_grad_by_freq, mod.sparse)
        return F.embedding, ids, weight, args, mod.max_norm, mod.norm_type
    offsets = node.args[1] if len(node.args) > 1 else node.kwargs.get("offsets")
    psw = node.args[2] if len(node.args) > 2 else node.kwargs.get("per_sample_weights")
    args = (ids, weight, offsets, None, mod.norm_type, mod.scale_grad_by_freq, mod.mode, mod.sparse, psw,
            mod.include_last_offset, mod.padding_idx)
    return F.embedding_bag, ids, weight, args, mod.max_norm, mod.norm_type


def _copy_meta(origin: Node, node: Node, comm_kind=None) -> Node:
    for key in (L.MODULE, L.SOURCE, L.GRAD_MODE):  # the grad mode it must run in: lint checks it
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    if comm_kind:
        node.meta[L.COMM] = comm_kind
    return node


def _renorm_before(gm: GraphModule, node: Node, ids: Node, weight: Node, max_norm, norm_type) -> None:
    with gm.graph.inserting_before(node):
        flat = _copy_meta(node, gm.graph.call_function(flat_ids, (ids,)))
        every = _copy_meta(node, gm.graph.call_function(comm.all_gather, (flat,)), "all_gather")
        _copy_meta(node, gm.graph.call_function(renorm_rows, (weight, every, max_norm, norm_type)))


def global_renorm_pass(gm: GraphModule, ctx) -> GraphModule:
    """Renormalise the global batch's rows before each max_norm lookup (module doc)."""
    if ctx.options.get("world_size", 1) <= 1:
        return gm
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not (_plain_module(mod) and mod.max_norm is not None):
                continue
            fn, ids, weight, args, max_norm, norm_type = _functional_call(gm, node, mod)
            _renorm_before(gm, node, ids, weight, max_norm, norm_type)
            with gm.graph.inserting_before(node):
                call = _copy_meta(node, gm.graph.call_function(fn, args))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        elif L.renormalising_call(node):
            _renorm_before(gm, node, L.functional_arg(node, "input"), L.functional_arg(node, "weight"),
                           L.functional_arg(node, "max_norm"), L.functional_arg(node, "norm_type", 2.0))
            pos = L.F_ARGS[node.target].index("max_norm")
            if len(node.args) > pos:
                node.update_arg(pos, None)
            else:
                node.update_kwarg("max_norm", None)
        else:
            continue
        changed = True
        ctx.log.append(f"{NAME}: %{node.name} renormalises the rows of every rank's ids, then looks up its own")
    if changed:
        gm.recompile()
    return gm
