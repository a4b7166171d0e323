"""`fxrec dump FILE.py:FUNC [--after PASS] [--format text|dot|html] [-o PATH]`.

FUNC() returns (model, example_inputs). The model is captured, the passes run up to
PASS (default: the last one; "capture" shows the graph before any pass), and the graph
at that point is written node by node with each node's provenance, followed by the
detected tables and groups. Errors (bad FILE.py:FUNC, import error, capture failure,
unknown pass) exit with status 2 and one line on stderr starting ``fxrec dump: ``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from fxrec.commands._load import LoadError, load_target

HELP = "show a model's graph after a pass, with each node's provenance and the detected tables"
FORMATS = ("text", "dot", "html")


def add_arguments(parser) -> None:
    parser.add_argument("target", metavar="FILE.py:FUNC", help="FUNC() returns (model, example_inputs)")
    parser.add_argument("--after", metavar="PASS", default=None,
                        help="show the graph after this pass ('capture' for none; default: the last pass)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="text (default), dot or html")
    parser.add_argument("-o", "--output", metavar="PATH", default=None, help="write here instead of stdout")


class DumpError(Exception):
    """A one-line reason for the user."""


def _pass_names() -> list[str]:
    from fxrec.passes.runner import PASSES
    return [name for name, _ in PASSES]


def build_dump(model, example_inputs: tuple, *, after: str | None = None, fmt: str = "text",
               title: str = "") -> str:
    """The dump of `model` as a string in format `fmt` (see the module docstring)."""
    from fxrec.capture import capture
    from fxrec.passes import render
    from fxrec.passes.runner import PassContext, run_passes

    names = _pass_names()
    title = title or type(model).__name__
    after = after or (names[-1] if names else "capture")
    if after != "capture" and after not in names:
        raise DumpError(f"unknown pass {after!r} for --after; choose from: capture, {', '.join(names)}")
    if fmt not in FORMATS:
        raise DumpError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    gm = capture(model, example_inputs)
    ctx = PassContext(example_inputs=tuple(example_inputs))
    snapshot: dict = {}

    def observe(name, graph_module, _ctx):
        if name == after:
            snapshot["graph"] = _render_graph(render, fmt, graph_module, title, name)

    if after == "capture":
        observe("capture", gm, ctx)
    # Tables are always shown, so detection runs even when the graph is shown before it.
    needed = max(names.index(after) if after in names else 0, names.index("detect_embeddings"))
    run_passes(gm, ctx, until=names[needed], observer=observe)
    return snapshot["graph"](ctx)


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
        return lambda ctx: render.html_page(heading, graph_html, ctx.tables, ctx.groups, _notes(ctx))
    graph_text = render.render_graph_text(gm, heading)
    return lambda ctx: graph_text + "\n" + render.render_tables_text(ctx.tables, ctx.groups, _notes(ctx))


def _notes(ctx) -> list[str]:
    return [line for line in ctx.log if not line.startswith("ran ")]


def _fail(message: str) -> int:
    print("fxrec dump: " + " ".join(message.split()), file=sys.stderr)
    return 2


def run(args) -> int:
    from fxrec.capture import CaptureError
    from fxrec.passes.runner import PassError
    try:
        model, example_inputs = load_target(args.target)
        out = build_dump(model, example_inputs, after=args.after, fmt=args.format, title=args.target)
    except (LoadError, CaptureError, DumpError) as e:
        return _fail(str(e))
    except PassError as e:
        _fail(str(e))
        return 1
    if args.output is None:
        sys.stdout.write(out)
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(out)
    if args.format == "dot" and shutil.which("dot"):
        svg = os.path.splitext(args.output)[0] + ".svg"
        done = subprocess.run(["dot", "-Tsvg", args.output, "-o", svg], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"fxrec dump: graphviz could not render {svg}: {done.stderr.strip()}", file=sys.stderr)
    return 0
