"""`fxrec plan`: from a CSV of tables or a FILE.py:FUNC model, exit codes and output."""
from __future__ import annotations

import json

import pytest

import fxrec
from fxrec.cli import main

CSV = """name,num_embeddings,embedding_dim,pooling_factor
user,1000000,128,1
item,5000000,64,20
cat,100,16,3
"""


@pytest.fixture
def tables_csv(tmp_path):
    path = tmp_path / "tables.csv"
    path.write_text(CSV)
    return str(path)


def test_plan_from_csv_writes_json(tables_csv, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--tables", tables_csv, "--world-size", "16", "--ranks-per-node", "8", "--device", "cuda",
               "--memory", "80GB", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("plan for 16 ranks (2 node(s) x 8), cuda", "user:", "item:", "cat:", "imbalance", "rank  node"):
        assert needle in text
    plan = fxrec.Plan.from_json(out.read_text())
    assert set(plan) == {"user", "item", "cat"}
    assert plan.topology.world_size == 16 and plan.topology.memory_per_rank == 80 * 10**9
    assert f"{plan.imbalance():.3f} (max/mean)" in text


def test_hedge_flag_reaches_the_planner(tables_csv, tmp_path):
    paths = {h: tmp_path / f"plan{h}.json" for h in ("0", "0.2")}
    for h, path in paths.items():
        assert main(["plan", "--tables", tables_csv, "--world-size", "4", "--ranks-per-node", "2",
                     "--search", "heuristic", "--hedge", h, "-o", str(path)]) == 0
    stats = {h: fxrec.Plan.from_json(p.read_text()).stats for h, p in paths.items()}
    assert "hedge_steps" not in stats["0"] and "hedge_steps" in stats["0.2"]


def test_comm_dtype_flag_reaches_the_planner(tables_csv, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--tables", tables_csv, "--world-size", "4", "--comm-dtype", "bf16", "-o", str(out)]) == 0
    assert "outputs sent in bf16" in capsys.readouterr().out
    assert fxrec.Plan.from_json(out.read_text()).comm_dtype == "bf16"
    assert main(["plan", "--tables", tables_csv, "--world-size", "4", "--comm-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "fxrec.plan: comm_dtype must be one of" in err and "got 'int8'" in err


def test_topology_profile_and_overrides(tables_csv, tmp_path, capsys):
    profile = tmp_path / "topo.json"
    fxrec.Topology(2, device="cpu", hbm_bandwidth=1e10).save(str(profile))
    out = tmp_path / "plan.json"
    rc = main(["plan", "--tables", tables_csv, "--topology", str(profile), "--world-size", "4", "-o", str(out),
               "--batch-size", "64", "--optimizer", "adam", "--constraint", "item=row_wise"])
    assert rc == 0
    plan = fxrec.Plan.from_json(out.read_text())
    assert (plan.topology.world_size, plan.topology.hbm_bandwidth) == (4, 1e10)
    assert (plan.batch_size, plan.sparse_optimizer) == (64, "adam")
    assert plan["item"].sharding == "row_wise"
    assert "optimizer adam" in capsys.readouterr().out


@pytest.mark.parametrize("profile,match", [
    ('{"world_size": null}', "world_size must be a positive integer, got None"),
    ('{"world_size": 2, "ranks_per_node": [2]}', "ranks_per_node must be a positive integer, got [2]"),
    ('{"world_size": 2, "hbm_bandwidth": "fast"}', "hbm_bandwidth must be a positive finite number (bytes/s), "
                                                   "got 'fast'"),
    ('{"world_size": 2, "hbm_bandwidth": Infinity}', "hbm_bandwidth must be a positive finite number"),
])
def test_a_bad_profile_field_is_one_line_naming_it(tables_csv, tmp_path, capsys, profile, match):
    path = tmp_path / "topo.json"
    path.write_text(profile)
    assert main(["plan", "--tables", tables_csv, "--topology", str(path)]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_spaces_around_a_table_name_in_options_are_ignored(tables_csv, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--tables", tables_csv, "--world-size", "2", "--constraint", "item = row_wise",
                 "--table-optimizer", " cat = adam ", "-o", str(out)]) == 0
    plan = fxrec.Plan.from_json(out.read_text())
    assert plan["item"].sharding == "row_wise" and plan.sparse_optimizer["cat"] == "adam"


def test_an_optimizer_per_table(tables_csv, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--tables", tables_csv, "--world-size", "4", "--optimizer", "rowwise_adagrad",
                 "--table-optimizer", "cat=adam", "-o", str(out)]) == 0
    assert fxrec.Plan.from_json(out.read_text()).sparse_optimizer == {
        "user": "rowwise_adagrad", "item": "rowwise_adagrad", "cat": "adam"}
    assert "optimizer rowwise_adagrad: user, item; adam: cat" in capsys.readouterr().out
    assert main(["plan", "--tables", tables_csv, "--world-size", "4", "--table-optimizer", "dog=adam"]) == 2
    assert "PerTable: unknown table(s) ['dog']" in capsys.readouterr().err
    assert main(["plan", "--tables", tables_csv, "--world-size", "4", "--table-optimizer", "cat=lamb"]) == 2
    assert "--table-optimizer expects TABLE=OPTIMIZER" in capsys.readouterr().err


def test_infeasible_plan_exits_1_naming_the_table(tables_csv, capsys):
    rc = main(["plan", "--tables", tables_csv, "--world-size", "2", "--memory", "0.5GB"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no plan fits" in err and "'item'" in err and "to fit:" in err


@pytest.mark.parametrize("content,match", [
    ("name,num_embeddings\nt,10\n", "missing column(s) 'embedding_dim'"),
    ("name,num_embeddings,embedding_dim\nt,ten,4\n", "line 2: table 't': num_embeddings must be an integer, got 'ten'"),
    ("name,num_embeddings,embedding_dim\nt,10,0\n", "embedding_dim must be positive"),
    ("name,num_embeddings,embedding_dim,dtype\nt,10,4,float99\n", "unknown dtype 'float99'"),
    ("name,num_embeddings,embedding_dim\n", "no tables"),
    ("name,num_embeddings,embedding_dim,name\nt,10,4,u\n", "line 1: column(s) 'name' given twice"),
    ("name,num_embeddings,embedding_dim\nt,10,4,99\n", "line 2: 4 fields for the header's 3: ['99'] past the last"),
    ("name,num_embeddings,embedding_dim\nt,1e400,4\n", "num_embeddings must be an integer, got '1e400'"),
    ("name,num_embeddings,embedding_dim,pooling_factor\nt,10,4,inf\n", "pooling_factor must be a number, got 'inf'"),
    (b"name,num_embeddings,embedding_dim\nt\xff,10,4\n", "not UTF-8 text (byte 0xff"),
    ("name,num_embeddings,embedding_dim\nt,10,4\nu,10,4\nt,20,8\n",
     "bad.csv line 4: table 't' again (first on line 2)"),
    ("name,num_embeddings,embedding_dim\nt,10,4\n\n\nt,20,8\n", "line 5: table 't' again (first on line 2)"),
    ("name,num_embeddings,embedding_dim,,\nt,10,4,,x\n", "line 2: 'x' in column 5, which has no name in the header"),
    ("name,,num_embeddings,embedding_dim\nt,x,10,4\n", "line 2: 'x' in column 2, which has no name in the header"),
    ("\n\nname,num_embeddings,embedding_dim\nt,10,4\n", "line 1: empty; the header (name,num_embeddings,"),
    ("", "missing column(s) 'name', 'num_embeddings', 'embedding_dim'; have []"),
    # a misspelt optional column dropped its values silently
    ("name,num_embeddings,embedding_dim,pooling_factr\nt,10,4,3\n",
     "bad.csv line 1: unknown column(s) 'pooling_factr'; the columns are name, num_embeddings, embedding_dim, "
     "pooling_factor, dtype, pooling, uses"),
])
def test_bad_csv_exits_2(tmp_path, capsys, content, match):
    path = tmp_path / "bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["plan", "--tables", str(path), "--world-size", "2"]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["plan", "--world-size", "2"], "either FILE.py:FUNC or --tables"),
    (["plan", "--tables", "missing.csv", "--world-size", "2"], "cannot read 'missing.csv'"),
    (["plan", "--tables", "{csv}"], "--world-size is required"),
    (["plan", "--tables", "{csv}", "--world-size", "3", "--ranks-per-node", "2"], "not a multiple"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--constraint", "item"], "TABLE=TYPE"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--constraint", "item=spiral"], "unknown sharding_type"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--memory", "much"], "cannot read 'much'"),
    (["plan", "nofile.py:build", "--world-size", "2"], "no such file"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--hedge", "1.5"], "hedge must be a fraction in [0, 1), got 1.5"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--constraint", "item=row_wise", "--constraint",
      "item=table_wise"], "table 'item' is constrained twice"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--constraint", "item=row_wise", "--constraint",
      " item =table_wise"], "table 'item' is constrained twice"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "--table-optimizer", "cat=adam", "--table-optimizer",
      "cat=sgd"], "--table-optimizer 'cat=sgd': table 'cat' is given an optimizer twice"),
    (["plan", "--tables", "{csv}", "--world-size", "2", "-o", "/nonexistent/dir/p.json"],
     "cannot write '/nonexistent/dir/p.json'"),
])
def test_usage_errors_exit_2(tables_csv, capsys, argv, match):
    argv = [a.replace("{csv}", tables_csv) for a in argv]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_plan_a_model_file(tmp_path, capsys):
    src = tmp_path / "model.py"
    src.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.user = torch.nn.EmbeddingBag(5000, 32, mode='sum')\n"
        "    def forward(self, ids, offsets):\n"
        "        return self.user(ids, offsets)\n"
        "def build():\n"
        "    return M(), (torch.randint(0, 5000, (8,)), torch.tensor([0, 2, 4, 6]))\n")
    out = tmp_path / "plan.json"
    assert main(["plan", f"{src}:build", "--world-size", "2", "-o", str(out)]) == 0
    assert "user:" in capsys.readouterr().out
    assert json.loads(out.read_text())["tables"][0]["table"]["pooling_factor"] == 2.0


@pytest.mark.parametrize("text", [
    "name,num_embeddings,embedding_dim,,\nt,10,4,,\n",  # a spreadsheet's trailing commas
    "name,num_embeddings,embedding_dim,\nt,10,4,\n",
    "name,,num_embeddings,embedding_dim\nt,,10,4\n",
])
def test_empty_header_cells_name_no_column(tmp_path, text):
    """Two empty header cells are not a column "given twice"; empty values under them are fine."""
    from fxrec.commands.plan import read_tables_csv

    path = tmp_path / "t.csv"
    path.write_text(text)
    (table,) = read_tables_csv(str(path))
    assert (table.name, table.num_embeddings, table.embedding_dim) == ("t", 10, 4)


def test_a_spreadsheets_csv_with_a_bom_and_exact_big_counts(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffname,num_embeddings,embedding_dim\nt,9007199254740993,4\n".encode())
    from fxrec.commands.plan import read_tables_csv

    (table,) = read_tables_csv(str(path))
    assert table.name == "t" and table.num_embeddings == 9007199254740993  # float() would round it


@pytest.mark.parametrize("body, match", [
    ("def build():\n    return 1, 2\n", "must return (model, example_inputs) with an nn.Module first, got int"),
    ("import sys\ndef build():\n    sys.exit(3)\n", "build() called sys.exit(3)"),
    ("import torch\n"
     "def build():\n"
     "    return torch.nn.EmbeddingBag(10, 4), (torch.tensor([[1, 12]]),)\n",
     "id 12 outside [0, 10) in the example inputs"),
])
def test_a_bad_model_file_is_one_line_for_plan_and_dump(tmp_path, capsys, body, match):
    src = tmp_path / "model.py"
    src.write_text(body)
    for argv in (["plan", f"{src}:build", "--world-size", "2"], ["dump", f"{src}:build"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and "While executing" not in err, err


TIED_MODEL = """\
import torch, torch.nn as nn
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.user = nn.EmbeddingBag(1000, 16, mode="sum")
        self.item = nn.EmbeddingBag(500, 16, mode="sum")
    def forward(self, u, uo, i, io):
        return (self.user(u, uo) * self.item(i, io)).sum(1) + self.item.weight.pow(2).sum()
def build():
    ids = torch.randint(0, 500, (24,)); offsets = torch.arange(0, 24, 3)
    return M(), (ids, offsets, ids, offsets)
"""


@pytest.mark.parametrize("argv", [
    ["plan", "{src}:build", "--world-size", "2"],
    ["dump", "{src}:build", "--world-size", "2"],
    ["dump", "{src}:build", "--world-size", "2", "--after", "detect_embeddings"],  # planned after the passes
])
def test_a_constraint_on_a_table_left_dense_says_so(tmp_path, capsys, argv):
    """Not "unknown table 'item'": the model has it, its weight read outside lookups keeps it dense."""
    src = tmp_path / "model.py"
    src.write_text(TIED_MODEL)
    argv = [a.replace("{src}", str(src)) for a in argv]
    assert main(argv + ["--constraint", "item=row_wise"]) == 2
    err = capsys.readouterr().err
    assert "constraint for table 'item': the model keeps 'item' dense" in err and "unknown table" not in err
    assert "its weight is also read outside embedding lookups, by %pow_1" in err
    assert len(err.strip().splitlines()) == 1
    assert main(argv + ["--constraint", "user=row_wise"]) == 0  # the sharded table takes one
