"""route_collisions: in a sharded program, managed collisions profile the global batch.

A `ManagedCollisionCollection` (fxrec.managed_collision) is one ``call_module`` node that
remaps its KJT's ids before the lookups. Run as it is on each rank, each rank's map would
profile, and evict by, its local batch alone: the ranks' maps would drift apart, and none would
equal the unsharded model's on the global batch. After apply_plan (a sharded program: the
graph's ``fxrec_plan`` meta) this pass routes each such call through a
`fxrec.runtime.managed_collision.ShardedCollisions`, registered beside it, which profiles every
rank's ids and resets the evicted rows in this rank's shards (its module doc). The collection
keeps its place (and its state its keys); other programs (capture, compile, lower) call it as
it is.

Each table of the collection is matched with the program's table through the weight it
guards: ``<collection's parent>._embedding_module.embedding_bags.<table>.weight`` (or
``.embeddings.``) in ``gm.meta[PARAM_TABLES]``, as fxrec's managed-collision collections hold
them; a table left dense is reset in its parameter; a collection used on its own resets nothing,
as in eager.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.fx import GraphModule

from fxrec.passes import lookup as L

__all__ = ["route_collisions_pass"]

NAME = "route_collisions"


def _guarded(gm: GraphModule, path: str, mcc, plan) -> dict:
    """The collection at `path`: its table -> the program's table name, a dense weight, or None."""
    from fxrec.modules import EmbeddingBagConfig

    parent = path.rpartition(".")[0]
    prefix = f"{parent}._embedding_module" if parent else "_embedding_module"
    names = gm.meta.get(L.PARAM_TABLES, {})
    out = {}
    for cfg in mcc.embedding_configs():
        sub = "embedding_bags" if isinstance(cfg, EmbeddingBagConfig) else "embeddings"
        key = f"{prefix}.{sub}.{cfg.name}.weight"
        table = names.get(key)
        out[cfg.name] = table if table in plan.tables else _dense_weight(gm, key)
    return out


def _dense_weight(gm: GraphModule, path: str) -> Optional[Tensor]:
    """The program's own parameter at `path` (a table left dense), or None."""
    try:
        return gm.get_parameter(path)
    except AttributeError:
        return None


def route_collisions_pass(gm: GraphModule, ctx) -> GraphModule:
    """Route each managed-collision call of a sharded program (module doc)."""
    from fxrec.managed_collision import ManagedCollisionCollection
    from fxrec.runtime.managed_collision import ShardedCollisions

    plan = gm.meta.get("fxrec_plan")
    if plan is None:
        return gm
    routed: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ManagedCollisionCollection):
            continue
        path = str(node.target)
        if path not in routed:
            mcc = gm.get_submodule(path)
            routed[path] = name = f"fxrec_mc_{len(routed)}"
            gm.add_submodule(name, ShardedCollisions(mcc, _guarded(gm, path, mcc, plan), gm, plan))
            ctx.log.append(f"{NAME}: {path} profiles the global batch's ids ({name})")
        node.target = routed[path]
    if routed:
        gm.recompile()
    return gm
