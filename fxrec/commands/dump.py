"""`fxrec dump FILE.py:FUNC [--after PASS] [--format text|dot|html] [-o PATH]`.

FUNC() returns (model, example_inputs). The model is captured, the passes run up to
PASS (default: the last one; "capture" shows the graph before any pass), and the graph
at that point is written node by node with each node's provenance, followed by the
detected tables and groups. Given a topology (--world-size, or --topology PROFILE), the
tables are also planned on it, the plan is explained, and apply_plan rewrites the graph
into the sharded program of rank --rank (default 0), collectives included. With
--weight-dtype TYPE (int8, int4, int2, fp16, fp32), the graph is the one
`fxrec.lower_for_inference` builds: fused lookups over quantized tables, with the kernel
serving each. Errors (bad FILE.py:FUNC, import error, capture failure,
unknown pass) exit with status 2 and one line on stderr starting ``fxrec dump: ``.
"""
from __future__ import annotations

import torch

import os
import shutil
import subprocess
import sys

from fxrec.commands._load import LoadError, load_target
from fxrec.commands._topology import add_topology_arguments, given_topology, topology_from_args

HELP = "show a model's graph after a pass, with each node's provenance and the detected tables"
FORMATS = ("text", "dot", "html")


def add_arguments(parser) -> None:
    parser.add_argument("target", metavar="FILE.py:FUNC", help="FUNC() returns (model, example_inputs)")
    parser.add_argument("--after", metavar="PASS", default=None,
                        help="show the graph after this pass ('capture' for none; default: the last pass)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="text (default), dot or html")
    parser.add_argument("-o", "--output", metavar="PATH", default=None, help="write here instead of stdout")
    parser.add_argument("--weight-dtype", metavar="TYPE", default=None,
                        help="show the inference graph with tables quantized to TYPE (int8, int4, int2, fp16, "
                             "fp32), as fxrec.lower_for_inference builds it; not with a topology")
    topo = parser.add_argument_group("plan (optional): show where each table would go on this topology")
    add_topology_arguments(topo)
    # default None, read as 0: a --rank given without a topology is refused, not ignored
    topo.add_argument("--rank", type=int, default=None, help="whose sharded program to show (default 0)")


class DumpError(Exception):
    """A one-line reason for the user."""


def _pass_names() -> list[str]:
    from fxrec.passes.runner import PASSES
    return [name for name, _ in PASSES]


def build_dump(model, example_inputs: tuple, *, after: str | None = None, fmt: str = "text",
               title: str = "", topology=None, batch_size: int = 512, rank: int = 0,
               constraints: dict | None = None, weight_dtype: str | None = None) -> str:
    """The dump of `model` as a string in format `fmt` (see the module docstring); with a
    `topology`, the detected tables' plan on it is explained as well; with `weight_dtype`,
    the inference graph with quantized tables."""
    from fxrec.capture import capture
    from fxrec.passes import render
    from fxrec.passes.runner import PassContext, PassError, run_passes
    from fxrec.planner.plan import PlanError
    from fxrec.shard import meta_shard

    names = _pass_names()
    title = title or type(model).__name__
    if weight_dtype is not None and topology is not None:
        raise DumpError("--weight-dtype shows the one-process inference graph: give no topology with it")
    # Without a topology, apply_plan and the passes after it change nothing: stop before.
    unsharded = topology is None and weight_dtype is None and "apply_plan" in names
    shown = names[:names.index("apply_plan")] if unsharded else names
    if weight_dtype is None:  # quantize_tables runs for inference only
        shown = [n for n in shown if n != "quantize_tables"]
    after = after or (shown[-1] if shown else "capture")
    if after != "capture" and after not in names:
        raise DumpError(f"unknown pass {after!r} for --after; choose from: capture, {', '.join(names)}")
    if fmt not in FORMATS:
        raise DumpError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    gm = capture(model, example_inputs)
    ctx = PassContext(example_inputs=tuple(example_inputs), topology=topology)
    if topology is not None:
        if not 0 <= rank < topology.world_size:
            raise DumpError(f"--rank {rank} is outside the topology's {topology.world_size} ranks")
        # one process renders any rank's program: apply_plan only builds it
        ctx.options.update(rank=rank, world_size=topology.world_size, batch_size=batch_size,
                           constraints=constraints, device=torch.device("meta"), init=meta_shard,
                           kernel_device=torch.device(topology.device))
    if weight_dtype is not None:  # what fxrec.lower_for_inference runs
        ctx.options.update(inference=True, weight_dtype=weight_dtype)
    snapshot: dict = {}

    def observe(name, graph_module, _ctx):
        if name == after:
            snapshot["graph"] = _render_graph(render, fmt, graph_module, title, name)

    if after == "capture":
        observe("capture", gm, ctx)
    # Tables are always shown, so detection runs even when the graph is shown before it.
    needed = max(names.index(after) if after in names else 0, names.index("detect_embeddings"))
    try:
        run_passes(gm, ctx, until=names[needed], observer=observe)
    except PassError as e:
        if isinstance(e.__cause__, PlanError):
            raise DumpError(f"no plan fits: {e.__cause__}") from None
        if weight_dtype is not None and isinstance(e.__cause__, ValueError):  # a bad type or dim
            raise DumpError(f"--weight-dtype {weight_dtype}: {e.__cause__}") from None
        if e.pass_name == "apply_plan" and isinstance(e.__cause__, ValueError):  # no tables, a bad batch size
            raise DumpError(f"cannot shard: {e.__cause__}") from None
        raise
    if topology is not None and ctx.plan is None:  # shown before apply_plan: plan anyway
        ctx.plan = _plan(ctx, topology, batch_size, constraints, gm)
    return snapshot["graph"](ctx)


def _plan(ctx, topology, batch_size: int, constraints, gm):
    import fxrec
    from fxrec.passes.lookup import DENSE_TABLES
    from fxrec.planner.plan import refuse_dense_constraints

    if not ctx.tables:
        return None
    try:
        refuse_dense_constraints(constraints or {}, gm.meta.get(DENSE_TABLES, {}))
    except ValueError as e:
        raise DumpError(f"cannot shard: {e}") from None
    try:
        return fxrec.plan(list(ctx.tables.values()), topology, constraints=constraints, batch_size=batch_size)
    except fxrec.PlanError as e:
        raise DumpError(f"no plan fits: {e}") from None


def _render_graph(render, fmt, gm, title, after):
    """Render the graph now (later passes change it); the returned function adds the
    tables and groups, known once the passes have run."""
    from fxrec.passes.lookup import CAPTURED_BY
    heading = f"fxrec dump: {title} after {after} (captured by {gm.meta.get(CAPTURED_BY, '?')})"
    if fmt == "dot":
        text = render.render_dot(gm, heading)
        return lambda ctx: text
    if fmt == "html":
        graph_html = render.html_graph(gm)
        return lambda ctx: render.html_page(heading, graph_html, ctx.tables, ctx.groups, _notes(ctx),
                                            plan_text=_plan_text(ctx))
    graph_text = render.render_graph_text(gm, heading)

    def text(ctx):
        out = graph_text + "\n" + render.render_tables_text(ctx.tables, ctx.groups, _notes(ctx))
        plan = _plan_text(ctx)
        return out + ("\nplan:\n" + plan + "\n" if plan else "")
    return text


def _plan_text(ctx):
    return ctx.plan.explain() if ctx.plan is not None else None


def _notes(ctx) -> list[str]:
    return [line for line in ctx.log if not line.startswith("ran ")]


def _fail(message: str) -> int:
    print("fxrec dump: " + " ".join(message.split()), file=sys.stderr)
    return 2


def _topology(args):
    """The topology the options describe, or None when none is given."""
    given = given_topology(args)
    if not args.topology and args.world_size is None:
        if any(v is not None for v in given.values()):
            raise DumpError("--ranks-per-node/--device/--memory need --world-size (or --topology)")
        return None
    try:
        return topology_from_args(args, given)
    except (OSError, ValueError) as e:
        raise DumpError(f"bad topology: {e}") from None


def run(args) -> int:
    from fxrec.capture import CaptureError
    from fxrec.commands.plan import UsageError, _first_part, constraints_from_specs
    from fxrec.passes.runner import PassError
    from fxrec.passes.shapes import ExampleIdError
    try:
        topology = _topology(args)
        constraints = constraints_from_specs(args.constraint) or None
        if constraints and topology is None:
            raise DumpError("--constraint needs a topology (--world-size or --topology)")
        if args.rank is not None and topology is None:
            raise DumpError(f"--rank {args.rank} needs a topology (--world-size or --topology)")
        model, example_inputs = load_target(args.target)
        out = build_dump(model, example_inputs, after=args.after, fmt=args.format, title=args.target,
                         topology=topology, batch_size=args.batch_size, rank=args.rank or 0, constraints=constraints,
                         weight_dtype=args.weight_dtype)
    except (LoadError, CaptureError, DumpError, UsageError, ExampleIdError) as e:
        return _fail(_first_part(e))
    except PassError as e:
        _fail(str(e))
        return 1
    if args.output is None:
        sys.stdout.write(out)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    except OSError as e:
        return _fail(f"cannot write {args.output!r}: {e.strerror}")
    if args.format == "dot" and shutil.which("dot"):
        svg = os.path.splitext(args.output)[0] + ".svg"
        done = subprocess.run(["dot", "-Tsvg", args.output, "-o", svg], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"fxrec dump: graphviz could not render {svg}: {done.stderr.strip()}", file=sys.stderr)
    return 0
