"""`fxrec dump`: text, DOT and HTML views of the graph; one-line errors."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from torch import fx

from fxrec.cli import main
from fxrec.passes import lookup as L
from fxrec.passes import render

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models_zoo.py")


def _dump(capsys, *argv):
    rc = main(["dump", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_text_shows_nodes_with_provenance_then_tables(capsys):
    rc, out, err = _dump(capsys, f"{ZOO}:dlrm_lists")
    assert rc == 0 and err == ""
    assert out.startswith(f"# fxrec dump: {ZOO}:dlrm_lists after group_tables (captured by fx)")
    line = next(x for x in out.splitlines() if x.startswith("%emb_l_1 = "))
    assert re.fullmatch(r"%emb_l_1 = call_module emb_l\.1\(%l_s_i_2, %l_s_o_2\)  \[capture\] f32\[4, 8\]  "
                        r"\{module_bag: emb_l\.1 sum group0\}  # models_zoo\.py:\d+ "
                        r"V = E\(sparse_index_group_batch, sparse_offset_group_batch\) \(in emb_l\.1\)", line)
    assert "tables (3):" in out
    assert re.search(r"^name\s+rows\s+dim\s+dtype\s+pooling\s+uses\s+pooling_factor\s+bytes$", out, re.M)
    assert re.search(r"^emb_l\.2\s+40\s+8\s+float32\s+sum\s+1\s+\d+\.\d\d\s+1280$", out, re.M)
    assert "groups (1):\ngroup0  pooled  float32  cpu  stage 0: emb_l.0, emb_l.1, emb_l.2" in out


@pytest.mark.parametrize("after,lookup_note", [
    ("capture", None),
    ("detect_embeddings", "{ebc: sparse_arch.ebc.embedding_bags.t_user sum ['user'],"),
    ("group_tables", "{ebc: sparse_arch.ebc.embedding_bags.t_user sum ['user'] group0,"),
])
def test_after_pass(capsys, after, lookup_note):
    rc, out, _ = _dump(capsys, f"{ZOO}:dlrm_ebc", "--after", after)
    assert rc == 0 and f"after {after} " in out.splitlines()[0]
    ebc_line = next(x for x in out.splitlines() if x.startswith("%sparse_arch_ebc = "))
    assert (lookup_note in ebc_line) if lookup_note else ("{" not in ebc_line)
    assert "sparse_arch.ebc.embedding_bags.t_item" in out.split("tables (3):")[1]  # tables always shown
    assert ("groups (1):" in out) == (after == "group_tables")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.tags, self.attrs, self.table_rows = [], [], [], {}
        self._table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attrs.append(attrs)
        if tag == "table":
            self._table = attrs.get("class")
        if tag == "tr":
            self.table_rows[self._table] = self.table_rows.get(self._table, 0) + 1
            if "data-kind" in attrs:
                self.rows.append((attrs["id"], attrs["data-kind"], attrs["class"]))


def test_html_is_self_contained_and_coloured_by_kind(capsys, tmp_path):
    path = tmp_path / "two_tower.html"
    rc, out, _ = _dump(capsys, f"{ZOO}:two_tower", "--format", "html", "-o", str(path))
    assert rc == 0 and out == ""
    text = path.read_text()
    page = _Page()
    page.feed(text)
    kinds = {row_id: kind for row_id, kind, _ in page.rows}
    assert all(cls == f"kind-{kind}" for _, kind, cls in page.rows)
    assert [k for k, v in kinds.items() if v == "lookup"] == [
        "node-user_tower_user", "node-user_tower_item", "node-mean", "node-user_tower_item_1"]
    assert kinds["node-user_id"] == "io" and kinds["node-output"] == "io"
    assert kinds["node-user_tower_mlp_0"] == "dense"
    assert page.table_rows["tables"] == 1 + 2 and page.table_rows["groups"] == 1 + 2
    assert "style" in page.tags and not {"script", "link", "img", "iframe"} & set(page.tags)
    hrefs = [a["href"] for a in page.attrs if "href" in a]
    assert hrefs and all(h.startswith("#node-") for h in hrefs) and "http" not in text
    assert all(f".kind-{k}{{background:" in text for k in render.KIND_COLOURS)


def test_dot_text(capsys, tmp_path):
    path = tmp_path / "g.dot"
    rc, _, _ = _dump(capsys, f"{ZOO}:seq_attention", "--format", "dot", "-o", str(path))
    text = path.read_text()
    assert rc == 0 and text.startswith("digraph fxrec {") and text.rstrip().endswith("}")
    assert re.search(r'"tok" \[label="tok\\ncall_module tok\\nf32\[4, 6, 8\]\\n\{module_embedding: tok none group0\}", '
                     r'fillcolor="#ffb347"', text)
    assert '"tokens" -> "tok";' in text and '"tok" -> "add";' in text
    assert (tmp_path / "g.svg").exists() == (shutil.which("dot") is not None)


def test_communication_nodes_are_their_own_kind():
    graph = fx.Graph()
    x = graph.placeholder("x")
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    marked = graph.call_function(torch.neg, (reduced,))
    marked.meta[L.COMM] = True
    graph.output(graph.call_function(torch.relu, (marked,)))
    kinds = render.node_kinds(fx.GraphModule(torch.nn.Module(), graph))
    assert [kinds[n] for n in graph.nodes] == ["io", "comm", "comm", "dense", "io"]


def _bad_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    return bad


@pytest.mark.parametrize("spec,message", [
    (lambda tmp: "no_colon_here", r"fxrec dump: expected FILE\.py:FUNC, got 'no_colon_here'"),
    (lambda tmp: f"{ZOO}:missing", r"fxrec dump: .*models_zoo\.py' has no function 'missing'"),
    (lambda tmp: f"{_bad_file(tmp)}:f", r"fxrec dump: importing .*broken\.py' failed: ModuleNotFoundError"),
    (lambda tmp: f"{ZOO}:value_branch", r"fxrec dump: cannot capture ValueBranch: in module 'gate' \(Gate\)"),
])
def test_errors_exit_2_with_one_line(capsys, tmp_path, spec, message):
    rc, out, err = _dump(capsys, spec(tmp_path))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and re.match(message, err)


@pytest.mark.parametrize("target, options, message", [
    ("no_tables", [], "fxrec dump: cannot shard: fxrec.plan: no tables to plan\n"),
    ("dlrm_lists", ["--batch-size", "0"],
     "fxrec dump: cannot shard: fxrec.plan: batch_size must be a positive integer, got 0\n"),
])
def test_what_cannot_be_sharded_exits_2_with_one_line(capsys, target, options, message):
    rc, out, err = _dump(capsys, f"{ZOO}:{target}", "--world-size", "2", *options)
    assert (rc, out, err) == (2, "", message)


def test_unknown_after_pass(capsys):
    rc, _, err = _dump(capsys, f"{ZOO}:no_tables", "--after", "nope")
    assert rc == 2 and err == ("fxrec dump: unknown pass 'nope' for --after; choose from: capture, "
                               "detect_embeddings, guard_inplace, hoist_inputs, group_tables, apply_plan, global_renorm, "
                               "route_collisions, fuse_lookups, "
                               "quantize_tables, "
                               "schedule_overlap\n")


def test_console_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fxrec.cli", "dump", f"{tmp_path}/none.py:f"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == f"fxrec dump: no such file: '{tmp_path}/none.py'\n"


def test_topology_adds_the_plan_to_text_and_html(capsys, tmp_path):
    rc, out, err = _dump(capsys, f"{ZOO}:dlrm_lists", "--world-size", "4", "--device", "cuda",
                         "--ranks-per-node", "2")
    assert rc == 0 and err == ""
    plan = out[out.index("\nplan:\n"):]
    assert "plan for 4 ranks (2 node(s) x 2), cuda" in plan
    for table in ("emb_l.0", "emb_l.1", "emb_l.2"):
        assert re.search(rf"^  {re.escape(table)}: \w+", plan, re.M), table
    assert re.search(r"^max rank time [\d.]+ ms", plan, re.M)
    assert f"{ZOO}:dlrm_lists after schedule_overlap " in out.splitlines()[0]
    path = tmp_path / "plan.html"
    rc, _, _ = _dump(capsys, f"{ZOO}:dlrm_lists", "--world-size", "2", "--format", "html", "-o", str(path))
    page = path.read_text()
    assert rc == 0 and "<h2>Plan</h2>" in page and "plan for 2 ranks" in page


def test_topology_shows_each_ranks_sharded_program(capsys):
    # tiny tables would be data_parallel: constrain them to be sharded
    outs = []
    for rank in (0, 3):
        rc, out, err = _dump(capsys, f"{ZOO}:dlrm_lists", "--world-size", "4", "--rank", str(rank),
                             "--constraint", "emb_l.0=table_wise", "--constraint", "emb_l.1=row_wise",
                             "--constraint", "emb_l.2=column_wise")
        assert rc == 0 and err == ""
        graph = out[:out.index("\ntables (")]
        assert re.search(r"= call_function fxrec\.runtime\.comm\.all_to_all\(.*\[apply_plan\]", graph)
        assert re.search(r"= call_function fxrec\.runtime\.comm\.reduce_scatter\(.*\[apply_plan\]", graph)
        assert "call_module emb_l." not in graph  # the tables left the graph
        assert "emb_l.1: row_wise" in out
        # fuse_lookups records the kernel serving each rank's local lookup
        assert re.search(r"call_module fxrec_shards\.u0\.lookup\(.*\{kernel pooled: pooled_forward=\w+", graph)
        outs.append(graph)
    assert outs[0] == outs[1]  # SPMD: one program; each rank's shards live in its modules
    rc, _, err = _dump(capsys, f"{ZOO}:dlrm_lists", "--world-size", "2", "--rank", "2")
    assert rc == 2 and err == "fxrec dump: --rank 2 is outside the topology's 2 ranks\n"


def test_topology_options_without_world_size_are_an_error(capsys):
    rc, out, err = _dump(capsys, f"{ZOO}:dlrm_lists", "--device", "cuda")
    assert rc == 2 and out == ""
    assert err == "fxrec dump: --ranks-per-node/--device/--memory need --world-size (or --topology)\n"
    rc, out, err = _dump(capsys, f"{ZOO}:dlrm_lists", "--rank", "1")  # it was ignored
    assert rc == 2 and out == ""
    assert err == "fxrec dump: --rank 1 needs a topology (--world-size or --topology)\n"


@pytest.mark.parametrize("dense_device", ["cpu", "meta"])
@pytest.mark.usefixtures("one_thread")  # fbgemm's forward: one thread's choice (two: torch's)
def test_topology_dump_of_meta_tables_materialises_nothing(dense_device):
    """A model whose billion-row tables are on meta (dense layers on cpu or meta too) dumps
    its sharded program: shards stay on meta, kernels are those the topology's device runs."""
    import fxrec
    from fxrec.commands.dump import build_dump
    from fxrec.models import DLRM

    cfgs = [fxrec.EmbeddingBagConfig(f"t{i}", 10 ** 9, 8, [f"f{i}"]) for i in range(3)]
    model = DLRM(fxrec.EmbeddingBagCollection(cfgs, device="meta"), 4, [8], [8, 1],
                 dense_device=torch.device(dense_device))
    kjt = fxrec.KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(3)], torch.randint(0, 1000, (12,)),
                                                    torch.ones(12, dtype=torch.long))
    out = build_dump(model, (torch.randn(4, 4), kjt), topology=fxrec.Topology(4), rank=1)
    graph = out[:out.index("\ntables (")]
    assert re.search(r"call_module fxrec_shards\.u0\.lookup\(.*\{kernel pooled: pooled_forward=fbgemm", graph)
    assert "all_to_all" in graph
