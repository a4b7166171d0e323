"""group_tables: group the table reads that one fused kernel call can serve.

A fused embedding kernel (FBGEMM's table-batched embedding, our Triton kernels) looks up
many tables in one launch when they share a pooling family (pooled bags vs unpooled
rows), a weight dtype, a device and weightedness (per-sample weights are given for the
whole launch or not at all), and when all their ids are ready at once: a lookup whose
ids depend on another lookup's output cannot share its launch, so `stage` (the number
of lookups upstream) is part of the key, and so is the grad mode the lookup runs in (a
table read only inside ``torch.no_grad()`` is looked up there, by a call of its own).
Embedding dims may differ within a group.
"""
from __future__ import annotations

from torch.fx import GraphModule

from fxrec.passes import lookup as L
from fxrec.passes.lookup import LookupGroup


def lookup_stages(gm: GraphModule) -> dict:
    """For each lookup node, how many lookups lie upstream of it (one linear sweep)."""
    depth, stage = {}, {}
    for node in gm.graph.nodes:
        upstream = max((depth[a] for a in node.all_input_nodes), default=0)
        if L.LOOKUP in node.meta:
            stage[node] = upstream
            upstream += 1
        depth[node] = upstream
    return stage


def group_tables_pass(gm: GraphModule, ctx) -> GraphModule:
    """Record `LookupGroup`s in ``gm.meta[GROUPS]`` and ``ctx.groups`` (in order of first
    member) and, on each lookup node, NODE_GROUPS: the group of each of its reads.
    Every read of every lookup is in exactly one group. Adds no nodes."""
    stages = lookup_stages(gm)
    groups: dict[tuple, LookupGroup] = {}
    for node, stage in stages.items():
        lk = node.meta[L.LOOKUP]
        names = []
        for read in lk.reads:
            family = "sequence" if read.pooling == "none" else "pooled"
            weight = L.fetch_attr(gm, read.weight_path)
            key = (family, weight.dtype, str(weight.device), lk.weighted, stage, node.meta.get(L.GRAD_MODE, "inherit"))
            if key not in groups:
                groups[key] = LookupGroup(f"group{len(groups)}", *key[:5], grad_mode=key[5])
            groups[key].members.append((node.name, read.table))
            names.append(groups[key].name)
        node.meta[L.NODE_GROUPS] = tuple(names)
    gm.meta[L.GROUPS] = ctx.groups = list(groups.values())
    return gm
