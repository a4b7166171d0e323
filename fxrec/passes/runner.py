"""The one ordered pass list and the runner that applies it.

A pass is a function ``(gm, ctx) -> GraphModule``. The runner checks each result is a
GraphModule, recompiles it, lints it (`lint`), stamps ``node.meta[PASS]`` on the nodes
the pass created, and turns any failure into a `PassError` that names the pass and the
passes that ran before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from torch.fx import GraphModule

from fxrec.passes import lookup as L
from fxrec.passes.apply_plan import apply_plan_pass
from fxrec.passes.detect_embeddings import detect_embeddings_pass
from fxrec.passes.fuse_lookups import fuse_lookups_pass
from fxrec.passes.global_renorm import global_renorm_pass
from fxrec.passes.route_collisions import route_collisions_pass
from fxrec.passes.grad_mode import changed_states
from fxrec.passes.group_tables import group_tables_pass
from fxrec.passes.guard_inplace import guard_inplace_pass
from fxrec.passes.hoist_inputs import hoist_inputs_pass
from fxrec.passes.quantize_tables import quantize_tables_pass
from fxrec.passes.schedule_overlap import schedule_overlap_pass
from fxrec.types import TableInfo

PassFn = Callable[[GraphModule, "PassContext"], GraphModule]
Observer = Callable[[str, GraphModule, "PassContext"], None]


@dataclass
class PassContext:
    """What passes share besides the graph. `tables` and `groups` are written by
    detect_embeddings and group_tables; `log` collects one line per notable decision."""

    example_inputs: Optional[tuple] = None
    topology: Any = None
    plan: Any = None
    options: dict = field(default_factory=dict)
    tables: dict[str, TableInfo] = field(default_factory=dict)
    groups: list = field(default_factory=list)
    log: list[str] = field(default_factory=list)


PASSES: list[tuple[str, PassFn]] = [
    ("detect_embeddings", detect_embeddings_pass),
    # Lookups about to move read their ids, and give their results, as where the model made them.
    ("guard_inplace", guard_inplace_pass),
    # The ids of lookups that only wait on graph order are indexed early, so they share a unit.
    ("hoist_inputs", hoist_inputs_pass),
    ("group_tables", group_tables_pass),
    # Needs ctx.topology; without one it leaves the graph as it is (plain capture, dump).
    ("apply_plan", apply_plan_pass),
    # Sharded over ranks: a max_norm table left dense renormalises the global batch's rows.
    ("global_renorm", global_renorm_pass),
    # Sharded: managed collisions profile every rank's ids and reset evicted rows in the shards.
    ("route_collisions", route_collisions_pass),
    # One fused table-batched call per group (unsharded) / records each local lookup's kernel.
    ("fuse_lookups", fuse_lookups_pass),
    # Inference only (ctx.options["weight_dtype"]): the fused tables become quantized constants.
    ("quantize_tables", quantize_tables_pass),
    # Annotates the input stage (the batch's id distribution) that a TrainPipeline runs early.
    ("schedule_overlap", schedule_overlap_pass),
]


class PassError(RuntimeError):
    """A pass raised, returned something other than a GraphModule, or broke an invariant.
    `pass_name` is the failing pass and `ran_before` the passes that ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], reason: str):
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(f"pass {pass_name!r} failed: {reason} (passes run before it: {before})")
        self.pass_name, self.ran_before = pass_name, list(ran_before)


def _reason(e: BaseException) -> str:
    # The first line only (lint errors append the whole graph); the full exception is
    # the PassError's __cause__.
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def lint(gm: GraphModule) -> None:
    """torch.fx's graph lint plus fxrec's invariants (fxrec/passes/README.md): every node
    has provenance, every lookup's tables are registered in ``gm.meta[TABLES]``, and every
    node stamped with a grad mode still runs in it (grad_mode.py)."""
    gm.graph.lint()
    tables = gm.meta.get(L.TABLES, {})
    for node in gm.graph.nodes:
        if L.PASS not in node.meta:
            raise ValueError(f"node %{node.name} has no provenance (meta[{L.PASS!r}])")
        lk = node.meta.get(L.LOOKUP)
        if lk is not None:
            missing = [t for t in lk.tables if t not in tables]
            if missing:
                raise ValueError(f"lookup %{node.name} reads tables {missing} missing from gm.meta[{L.TABLES!r}]")
    moved = changed_states(gm)
    if moved:  # e.g. a fused unit that had to go inside a torch.no_grad() block
        raise ValueError(f"the rewrite changes the grad mode of {len(moved)} node(s): {'; '.join(moved[:3])} "
                         f"(a torch.no_grad() block in forward that the lookups' rewrite cannot keep whole)")


def _select(passes, disable: Iterable[str], until: Optional[str]) -> list[tuple[str, PassFn]]:
    known = [name for name, _ in passes]
    disable = set(disable)
    for name in sorted(disable) + ([until] if until is not None else []):
        if name not in known:
            raise ValueError(f"unknown pass {name!r}; the passes are: {', '.join(known)}")
    chosen = passes[: known.index(until) + 1] if until is not None else list(passes)
    return [(name, fn) for name, fn in chosen if name not in disable]


def run_passes(gm: GraphModule, ctx: PassContext, *, passes: Optional[list] = None,
               disable: Iterable[str] = (), until: Optional[str] = None,
               observer: Optional[Observer] = None) -> GraphModule:
    """Apply `passes` (default `PASSES`) in order, skipping those named in `disable` and
    stopping after `until`; call ``observer(name, gm, ctx)`` after each pass that ran.
    Nodes whose names did not exist before a pass get ``meta[PASS] = <that pass>``;
    ``gm.meta[PASSES_RUN]`` lists the passes applied so far. Nodes that arrive without
    provenance (a graph not made by fxrec.capture) are stamped "input"."""
    ran: list[str] = list(gm.meta.get(L.PASSES_RUN, []))
    for node in gm.graph.nodes:
        node.meta.setdefault(L.PASS, "input")
    for name, fn in _select(PASSES if passes is None else passes, disable, until):
        before = {n.name for n in gm.graph.nodes}
        try:
            result = fn(gm, ctx)
        except Exception as e:
            raise PassError(name, ran, _reason(e)) from e
        if not isinstance(result, GraphModule):
            raise PassError(name, ran, f"returned {type(result).__name__}, expected a GraphModule")
        for node in result.graph.nodes:
            if node.name not in before:
                node.meta[L.PASS] = name
        try:
            result.recompile()
            lint(result)
        except Exception as e:
            raise PassError(name, ran, f"graph lint failed after it: {_reason(e)}") from e
        ran.append(name)
        gm = result
        gm.meta[L.PASSES_RUN] = list(ran)
        ctx.log.append(f"ran {name}: {len(gm.graph.nodes)} nodes")
        if observer is not None:
            observer(name, gm, ctx)
    return gm
