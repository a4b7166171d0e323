"""Render a graph and its tables as text, Graphviz DOT or a self-contained HTML page.

This is `fxrec dump`'s view of the records the passes leave (fxrec/passes/lookup.py):
each node with its provenance (the pass that made it, the user's module and line), its
shape, and for lookups the tables they read; then the detected tables and groups.
Nodes have one of four kinds, which DOT and HTML colour: "lookup" (an embedding lookup
or the reduction folded into one), "comm" (a torch.distributed / functional-collective
call or a node marked ``meta[COMM]``), "io" (placeholders, output) and "dense".
"""
from __future__ import annotations

import html
import operator
import re
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from fxrec.passes import lookup as L
from fxrec.passes.shapes import format_spec

KIND_COLOURS = {"lookup": "#ffb347", "comm": "#ff6b6b", "dense": "#cfe8ff", "io": "#dddddd"}
KIND_LABELS = {"lookup": "embedding lookup", "comm": "communication", "dense": "dense", "io": "input / output"}
_COMM_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
_MAX_ARG = 60


def _is_comm(node: Node) -> bool:
    if node.meta.get(L.COMM):
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _COMM_NAMESPACES
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0] in _COMM_NAMESPACES
    return node.op == "call_function" and (getattr(target, "__module__", None) or "").startswith("torch.distributed")


def node_kinds(gm: GraphModule) -> dict[Node, str]:
    """The kind of every node (module docstring)."""
    pools = {lk.pool_node for n in gm.graph.nodes if (lk := n.meta.get(L.LOOKUP)) and lk.pool_node}
    kinds = {}
    for node in gm.graph.nodes:
        if L.LOOKUP in node.meta or node.name in pools:
            kinds[node] = "lookup"
        elif _is_comm(node):
            kinds[node] = "comm"
        elif node.op in ("placeholder", "output"):
            kinds[node] = "io"
        else:
            kinds[node] = "dense"
    return kinds


def _target(node: Node) -> str:
    t = node.target
    if node.op in ("call_module", "get_attr", "call_method", "placeholder"):
        return str(t)
    if node.op == "output":
        return "output"
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}" if t.namespace == "aten" else str(t)
    if t is operator.getitem:
        return "getitem"
    module = getattr(t, "__module__", "") or ""
    module = "F" if module == "torch.nn.functional" else module.replace("torch._C._VariableFunctions", "torch")
    return f"{module}.{getattr(t, '__name__', str(t))}".lstrip(".")


def _arg(a: Any) -> str:
    if isinstance(a, Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(v)}" for k, v in a.items()) + "}"
    text = repr(a)
    return text if len(text) <= _MAX_ARG else text[:_MAX_ARG - 3] + "..."


def _args(node: Node) -> str:
    parts = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def _lookup_note(node: Node) -> str:
    lk = node.meta.get(L.LOOKUP)
    if lk is None:
        return ""
    groups = node.meta.get(L.NODE_GROUPS, ())
    reads = ", ".join(f"{r.table} {r.pooling}" + (f" {list(r.features)}" if r.features else "")
                      + (f" {groups[i]}" if i < len(groups) else "") for i, r in enumerate(lk.reads))
    fold = f" folds %{lk.pool_node}" if lk.pool_node else ""
    return f"{{{lk.kind}: {reads}{fold}}}"


def _kernel_note(node: Node) -> str:
    """``{kernel pooled: pooled_forward=fbgemm backward_update=fbgemm}`` from fuse_lookups."""
    record = node.meta.get("fxrec_kernel")
    if not record:
        return ""
    parts = [f"{kind}: " + " ".join(f"{op}={k}" for op, k in ops.items()) for kind, ops in record.items()]
    return "{kernel " + "; ".join(parts) + "}"


def _stage_note(node: Node) -> str:
    """``{stage input_dist}`` on the nodes schedule_overlap put in the input stage (the rest is
    the main stage, not marked)."""
    return "{stage input_dist}" if node.meta.get("fxrec_stage") == "input_dist" else ""


def node_line(node: Node) -> str:
    """``%name = op target(args)  [pass] shape  {lookup} {kernel} {stage}  # source (in module)``."""
    shape = format_spec(node.meta[L.SHAPE]) if L.SHAPE in node.meta else "?"
    line = f"%{node.name} = {node.op} {_target(node)}({_args(node)})  [{node.meta.get(L.PASS, '?')}] {shape}"
    for note in (_lookup_note(node), _kernel_note(node), _stage_note(node)):
        if note:
            line += f"  {note}"
    source, module = node.meta.get(L.SOURCE), node.meta.get(L.MODULE)
    if source is not None or module:
        line += "  #"
        line += f" {source}" if source is not None else ""
        line += f" (in {module})" if module else ""
    return line


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


TABLE_COLUMNS = ("name", "rows", "dim", "dtype", "pooling", "uses", "pooling_factor", "bytes")


def table_rows(tables: dict) -> list[tuple[str, ...]]:
    return [(t.name, str(t.num_embeddings), str(t.embedding_dim), str(t.dtype).replace("torch.", ""), t.pooling,
             str(t.uses), f"{t.pooling_factor:.2f}", str(t.weight_bytes)) for t in tables.values()]


def _columns(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def render_graph_text(gm: GraphModule, title: str) -> str:
    return "\n".join([f"# {title}", ""] + [node_line(n) for n in gm.graph.nodes]) + "\n"


def render_tables_text(tables: dict, groups: list, notes: Optional[list] = None) -> str:
    lines = [f"tables ({len(tables)}):"]
    if tables:
        lines += _columns(TABLE_COLUMNS, table_rows(tables))
        lines.append(f"total: {_human(sum(t.weight_bytes for t in tables.values()))}")
    if groups:
        lines += ["", f"groups ({len(groups)}):"]
        lines += [f"{g.name}  {g.family}  {str(g.dtype).replace('torch.', '')}  {g.device}  "
                  f"{'weighted  ' if g.weighted else ''}stage {g.stage}: {', '.join(g.tables)}" for g in groups]
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_text(gm: GraphModule, tables: dict, groups: list, title: str, notes: Optional[list] = None) -> str:
    """The graph node by node (`node_line`), then the tables, groups and notes."""
    return render_graph_text(gm, title) + "\n" + render_tables_text(tables, groups, notes)


def _dot_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(gm: GraphModule, title: str) -> str:
    kinds = node_kinds(gm)
    out = ["digraph fxrec {", f"  label={_dot_quote(title)};", "  labelloc=t;",
           '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    for node in gm.graph.nodes:
        shape = format_spec(node.meta[L.SHAPE]) if L.SHAPE in node.meta else ""
        label = "\n".join(x for x in (node.name, f"{node.op} {_target(node)}", shape, _lookup_note(node)) if x)
        out.append(f"  {_dot_quote(node.name)} [label={_dot_quote(label)}, "
                   f"fillcolor={_dot_quote(KIND_COLOURS[kinds[node]])}, tooltip={_dot_quote(kinds[node])}];")
    for node in gm.graph.nodes:
        out += [f"  {_dot_quote(a.name)} -> {_dot_quote(node.name)};" for a in node.all_input_nodes]
    return "\n".join(out + ["}"]) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em;font-size:13px}
th,td{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top}
td.code,td.args{font-family:monospace}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;border:1px solid #999}
""" + "".join(f".kind-{k}{{background:{c}}}\n" for k, c in KIND_COLOURS.items())


def _html_args(node: Node) -> str:
    # Links to the argument nodes' rows (in-page anchors only: the page stays self-contained).
    names = {a.name for a in node.all_input_nodes}
    return re.sub(r"%(\w+)", lambda m: f'<a href="#node-{m.group(1)}">%{m.group(1)}</a>'
                  if m.group(1) in names else m.group(0), html.escape(_args(node)))


def html_graph(gm: GraphModule) -> str:
    """The graph as an HTML table, one row per node, coloured by kind."""
    e = html.escape
    kinds = node_kinds(gm)
    rows = []
    for node in gm.graph.nodes:
        shape = format_spec(node.meta[L.SHAPE]) if L.SHAPE in node.meta else ""
        source = node.meta.get(L.SOURCE)
        cells = [e(node.name), e(node.op), e(_target(node)), _html_args(node), e(str(node.meta.get(L.PASS, ""))),
                 e(shape), e(_lookup_note(node)), e(node.meta.get(L.MODULE) or ""), e(str(source or ""))]
        classes = ["", "", "code", "args", "", "code", "code", "", "code"]
        tds = "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for c, v in zip(classes, cells))
        rows.append(f'<tr id="node-{e(node.name)}" class="kind-{kinds[node]}" data-kind="{kinds[node]}">{tds}</tr>')
    head = "".join(f"<th>{h}</th>" for h in ("node", "op", "target", "args", "pass", "shape", "lookup",
                                              "module", "source"))
    return "\n".join([f'<table class="graph"><thead><tr>{head}</tr></thead><tbody>', *rows, "</tbody></table>"])


def html_page(title: str, graph_html: str, tables: dict, groups: list, notes: Optional[list] = None,
              plan_text: Optional[str] = None) -> str:
    """A self-contained page (inline CSS, no scripts, no external assets)."""
    e = html.escape
    legend = "".join(f'<span class="kind-{k}">{e(v)}</span>' for k, v in KIND_LABELS.items())
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f'<p class="legend">{legend}</p>',
             graph_html, f"<h2>Tables ({len(tables)})</h2>", _html_table(TABLE_COLUMNS, table_rows(tables), "tables")]
    if groups:
        group_rows = [(g.name, g.family, str(g.dtype).replace("torch.", ""), g.device, str(g.weighted), str(g.stage),
                       ", ".join(g.tables)) for g in groups]
        parts += [f"<h2>Groups ({len(groups)})</h2>", _html_table(
            ("group", "family", "dtype", "device", "weighted", "stage", "tables"), group_rows, "groups")]
    if plan_text:
        parts += ["<h2>Plan</h2>", f'<pre class="plan">{e(plan_text)}</pre>']
    if notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{e(n)}</li>" for n in notes], "</ul>"]
    return "\n".join(parts + ["</body></html>"]) + "\n"


def render_html(gm: GraphModule, tables: dict, groups: list, title: str, notes: Optional[list] = None) -> str:
    return html_page(title, html_graph(gm), tables, groups, notes)


def _html_table(header: tuple, rows: list[tuple], cls: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
