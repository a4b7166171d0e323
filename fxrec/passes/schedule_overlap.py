"""schedule_overlap: mark the nodes that distribute a batch's ids, so that the next batch's can run early.

A sharded program's lookups first route every rank's ids to the ranks holding their shards
(apply_plan's input_dist: gather, the ids' counts and all-to-alls, unpack). Those nodes read
only the batch: not a parameter, not a lookup's output, nothing that carries a gradient.
So batch i+1's input distribution can run while batch i computes, on a process group of
its own (`fxrec.runtime.pipeline.TrainPipeline`), as TorchRec's sparse-dist pipeline does.

This pass changes no node. It sets ``node.meta[STAGE]`` on every node: INPUT for the nodes
of the input stage, MAIN for the rest, BOTH for placeholders; the pipeline splits the
program along these marks and hands over the values `handed_over` lists. A node
is INPUT when it is an ancestor of a local lookup (a `LocalLookup` or `ReplicatedLookup`
node) and none of its own inputs is MAIN-only, where MAIN-only are: get_attr nodes
(parameters and buffers), modules holding parameters, the lookups themselves, and `RowSync`
(its token starts each step's autograd). Placeholders belong to both stages.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from fxrec.passes.apply_plan import LOCAL_LOOKUP

NAME = "schedule_overlap"
STAGE = "fxrec_stage"
INPUT, MAIN, BOTH = "input_dist", "main", "input"  # BOTH: placeholders, read by either stage


def _main_only(gm: GraphModule, node: Node) -> bool:
    from fxrec.runtime.row_sync import RowSync

    if node.op == "get_attr" or LOCAL_LOOKUP in node.meta:
        return True
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        # buffers are allowed: input_dist's modules keep constant routing tables in them
        # fxrec_main_stage: a module that writes the tables (managed collisions' evictions)
        if isinstance(mod, RowSync) or getattr(mod, "fxrec_main_stage", False) or any(True for _ in mod.parameters()):
            return True
    return False


def input_stage(gm: GraphModule) -> set[Node]:
    """The nodes of the input stage (module doc)."""
    lookups = [n for n in gm.graph.nodes if LOCAL_LOOKUP in n.meta and n.op == "call_module"]
    feeding: set[Node] = set()  # ancestors of the lookups
    stack = [a for n in lookups for a in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node not in feeding:
            feeding.add(node)
            stack.extend(node.all_input_nodes)
    tainted: set[Node] = set()  # MAIN-only nodes and everything downstream of them
    stage: set[Node] = set()
    for node in gm.graph.nodes:  # topological order
        if node.op in ("placeholder", "output"):
            continue
        if _main_only(gm, node) or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
        elif node in feeding:
            stage.add(node)
    return stage


def handed_over(gm: GraphModule, stage: set[Node]) -> list[Node]:
    """Input-stage nodes a main-stage node (or the output) reads, in graph order."""
    return [n for n in gm.graph.nodes if n in stage and any(u not in stage for u in n.users)]


def schedule_overlap_pass(gm: GraphModule, ctx) -> GraphModule:
    """Annotate each node's stage (module doc); the graph is left as it is."""
    stage = input_stage(gm)
    for node in gm.graph.nodes:
        node.meta[STAGE] = BOTH if node.op == "placeholder" else (INPUT if node in stage else MAIN)
    frontier = handed_over(gm, stage)
    if stage:
        ctx.log.append(f"{NAME}: {len(stage)} node(s) distribute the batch's ids before any lookup; "
                       f"{len(frontier)} value(s) pass to the main stage")
    return gm
