"""detect_embeddings and group_tables on every model style of the zoo."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrec
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.passes import PassContext, lint, run_passes
from fxrec.passes import lookup as L
from fxrec.passes.lookup import ArgRef

try:
    from tests import models_zoo as zoo
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import models_zoo as zoo

B = zoo.BATCH


def _kjt_pf(kjt, *features):
    return sum(kjt[f].values().numel() for f in features) / (B * len(features))


# case -> (lookup kinds in graph order, tables: (name, rows, dim, pooling, uses, pooling factor from inputs))
EXPECTED = {
    "dlrm_lists": (["module_bag"] * 3, [
        (f"emb_l.{k}", rows, 8, "sum", 1, (lambda k: lambda x: x[2][k].numel() / B)(k))
        for k, rows in enumerate((20, 30, 40))]),
    "dlrm_ebc": (["ebc"], [
        ("sparse_arch.ebc.embedding_bags.t_user", 20, 8, "sum", 1, lambda x: _kjt_pf(x[1], "user")),
        ("sparse_arch.ebc.embedding_bags.t_item", 50, 8, "sum", 2, lambda x: _kjt_pf(x[1], "item", "last_item")),
        ("sparse_arch.ebc.embedding_bags.t_cat", 10, 8, "mean", 1, lambda x: _kjt_pf(x[1], "cat"))]),
    # the item table: mean over a 5-long history (5 ids/bag) and the candidate (1 id)
    "two_tower": (["module_embedding"] * 3, [
        ("user_tower.user", 20, 8, "none", 1, lambda x: 1.0),
        ("user_tower.item", 50, 8, "none", 2, lambda x: (5 + 1) / 2)]),
    # unpooled: a sample's sequence is its bag, so the factor is its length; 1-D ids (the
    # positions, shared by the batch) have no samples to count: each id is its own bag
    "seq_attention": (["module_embedding"] * 2, [
        ("tok", 30, 8, "none", 1, lambda x: x[0].shape[1]), ("pos", 6, 8, "none", 1, lambda x: 1.0)]),
    "no_tables": ([], []),
    "weighted_bag": (["module_bag"], [("bag", 40, 8, "sum", 1, lambda x: x[0].numel() / B)]),
    "bag_2d": (["module_bag"], [("bag", 40, 8, "mean", 1, lambda x: 3.0)]),
    "functional_bag": (["functional_bag"], [("sparse.weight", 40, 8, "sum", 1, lambda x: x[0].numel() / B)]),
    "functional_embedding": (["functional_embedding"], [("table", 40, 8, "sum", 1, lambda x: 5.0)]),
    "table_dict": (["module_embedding", "module_bag"], [
        ("tables.user", 20, 8, "none", 1, lambda x: 1.0), ("tables.genre", 10, 8, "mean", 1, lambda x: 3.0)]),
    "sequence_ec": (["ec"], [
        ("ec.embeddings.t_item", 30, 8, "none", 2, lambda x: _kjt_pf(x[0], "hist", "clicks")),
        ("ec.embeddings.t_query", 15, 8, "none", 1, lambda x: _kjt_pf(x[0], "query"))]),
    "shape_branch": (["aten_bag", "aten_embedding"], [
        ("bag", 30, 8, "sum", 1, lambda x: x[1].numel() / B), ("table", 30, 8, "sum", 1, lambda x: 3.0)]),
}


def _run(model, example):
    gm = fxrec.capture(model, example)
    ctx = PassContext(example_inputs=example)
    return run_passes(gm, ctx), ctx


def _lookups(gm):
    return [(n, n.meta[L.LOOKUP]) for n in gm.graph.nodes if L.LOOKUP in n.meta]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tables_and_lookups(name):
    kinds, tables = EXPECTED[name]
    case = zoo.CASES[name]
    model, example = case.make()
    gm, ctx = _run(model, example)
    lint(gm)
    assert [lk.kind for _, lk in _lookups(gm)] == kinds
    got = [(t.name, t.num_embeddings, t.embedding_dim, t.pooling, t.uses) for t in ctx.tables.values()]
    assert got == [row[:5] for row in tables]
    for info, row in zip(ctx.tables.values(), tables):
        assert info.pooling_factor == pytest.approx(row[5](example)), info.name
        assert info.dtype == torch.float32
    assert fxrec.find_tables(model, example) == list(ctx.tables.values())
    # the annotations change nothing the graph computes
    fresh = case.inputs(5)
    torch.testing.assert_close(gm(*fresh), model(*fresh))


def test_node_tables_are_the_graph_tables():
    gm, ctx = _run(*zoo.CASES["dlrm_ebc"].make())
    (node, lk), = _lookups(gm)
    assert node.meta[L.NODE_TABLES] == tuple(ctx.tables[t] for t in lk.tables)
    assert gm.meta[L.TABLES] is ctx.tables
    assert [r.features for r in lk.reads] == [("user",), ("item", "last_item"), ("cat",)]
    assert [r.weight_path for r in lk.reads] == [f"sparse_arch.ebc.embedding_bags.{t}.weight"
                                                 for t in ("t_user", "t_item", "t_cat")]
    assert lk.ids == ArgRef(pos=0) and lk.ids.of(node).name == "kjt"


def test_argument_positions():
    gm, _ = _run(*zoo.CASES["dlrm_lists"].make())
    for k, (node, lk) in enumerate(_lookups(gm)):
        assert (lk.ids, lk.offsets, lk.per_sample_weights) == (ArgRef(pos=0), ArgRef(pos=1), None)
        assert lk.ids.of(node).target == f"lS_i_{k + 1}" and lk.offsets.of(node).target == f"lS_o_{k + 1}"
    gm, _ = _run(*zoo.CASES["weighted_bag"].make())
    (node, lk), = _lookups(gm)
    assert lk.per_sample_weights == ArgRef(kw="per_sample_weights") and lk.weighted
    assert lk.per_sample_weights.of(node).name == "weights"
    gm, _ = _run(*zoo.CASES["functional_bag"].make())
    (node, lk), = _lookups(gm)
    # fx records F.embedding_bag's optional arguments as keywords
    assert (lk.ids, lk.weight, lk.offsets) == (ArgRef(pos=0), ArgRef(pos=1), ArgRef(kw="offsets"))
    assert lk.weight.of(node).target == "sparse.weight" and lk.offsets.of(node).name == "offsets"
    assert not lk.weighted


def test_export_graph_lookups_map_back_to_modules():
    gm, _ = _run(*zoo.CASES["shape_branch"].make())
    (bag, bag_lk), (emb, emb_lk) = _lookups(gm)
    assert bag_lk.weight == ArgRef(pos=0) and bag_lk.ids == ArgRef(pos=1) and bag_lk.output_index == 0
    assert bag_lk.reads[0].weight_path == "bag.weight"
    assert emb_lk.pool_node is not None and emb_lk.pool_dim == 1 and emb_lk.reads[0].pooling == "sum"


def test_embedding_folds_into_the_following_mean():
    gm, _ = _run(*zoo.CASES["two_tower"].make())
    nodes = {n.name: n for n in gm.graph.nodes}
    (_, user), (hist_node, hist), (_, cand) = _lookups(gm)
    assert (user.pool_node, cand.pool_node) == (None, None)
    assert hist.reads[0].pooling == "mean" and hist.pool_dim == 1
    pool = nodes[hist.pool_node]
    assert pool.op == "call_method" and pool.target == "mean" and pool.args[0] is hist_node


class _Shared(nn.Module):
    """One weight read four ways: tied modules and one parameter read twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(10, 4)
        self.b = nn.Embedding(10, 4)
        self.b.weight = self.a.weight  # tied
        self.w = nn.Parameter(torch.randn(12, 4))

    def forward(self, x, y):
        unpooled = self.a(x[:, 0]) + self.b(x[:, 1])
        return unpooled + F.embedding_bag(y, self.w, mode="sum") + F.embedding_bag(x, self.w, mode="mean")


def test_shared_and_tied_tables_count_every_use():
    model = _Shared()
    x, y = torch.randint(0, 10, (B, 2)), torch.randint(0, 12, (B, 3))
    tables = {t.name: t for t in fxrec.find_tables(model, (x, y))}
    assert list(tables) == ["a", "w"]
    assert (tables["a"].uses, tables["a"].pooling, tables["a"].features) == (2, "none", ["a", "b"])
    assert (tables["w"].uses, tables["w"].pooling, tables["w"].pooling_factor) == (2, "sum", (3 + 2) / 2)


class _NotTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="max")
        self.w = nn.Parameter(torch.randn(10, 4))

    def forward(self, x):
        return self.bag(x) + F.embedding(x, self.w * 2).sum(1)


def test_unsupported_lookups_stay_dense_with_a_note():
    model = _NotTables()
    x = torch.randint(0, 10, (B, 3))
    gm = fxrec.capture(model, (x,))
    ctx = PassContext(example_inputs=(x,))
    run_passes(gm, ctx)
    assert ctx.tables == {} and _lookups(gm) == []
    notes = "\n".join(ctx.log)
    assert "%bag" in notes and "mode='max' pooling is not supported" in notes
    assert "weight is computed in the graph" in notes


class _ReadOutside(nn.Module):
    """Each table's weight read one way besides (or instead of) its lookups."""

    def __init__(self):
        super().__init__()
        self.plain = nn.EmbeddingBag(10, 4, mode="sum")   # only looked up: a table
        self.tied = nn.EmbeddingBag(12, 4, mode="sum")    # also the output layer's weight
        self.reg = nn.Embedding(14, 4)                    # also in an L2 penalty
        self.hashed = nn.EmbeddingBag(16, 4, mode="sum")  # ids modulo its rows: metadata only, folded
        self.placed = nn.EmbeddingBag(18, 4, mode="sum")  # its .device read: a use
        self.shared = nn.Parameter(torch.randn(20, 4))    # a max bag and a sum bag on one parameter
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 8, 4, ["a"]),
                                           EmbeddingBagConfig("t_b", 9, 4, ["b"])])

    def forward(self, x, kjt):
        out = self.plain(x) + F.linear(self.tied(x), self.tied.weight)[:, :4] + self.reg(x).sum(1)
        out = out + self.hashed(x % self.hashed.weight.shape[0]) * self.hashed.weight.size(1)
        out = out + self.placed(x).to(self.placed.weight.device)
        out = out + F.embedding_bag(x, self.shared, mode="max") + F.embedding_bag(x, self.shared, mode="sum")
        kt = self.ebc(kjt)
        out = out + kt["a"] + kt["b"] + self.ebc.embedding_bags.t_b.weight.sum()  # t_a falls with t_b
        return out + 1e-3 * self.reg.weight.pow(2).sum()


def test_tables_read_outside_lookups_stay_dense_with_the_reason():
    model = _ReadOutside()
    x = torch.randint(0, 8, (B, 3))
    kjt = fxrec.KeyedJaggedTensor(["a", "b"], torch.randint(0, 8, (2 * B,)), lengths=torch.ones(2 * B, dtype=torch.long))
    gm = fxrec.capture(model, (x, kjt))
    ctx = PassContext(example_inputs=(x, kjt))
    gm = run_passes(gm, ctx, until="detect_embeddings")
    lint(gm)
    assert list(ctx.tables) == ["plain", "hashed"]
    dense = gm.meta[L.DENSE_TABLES]
    assert sorted(dense) == sorted(["tied", "reg", "placed", "shared", "ebc.embedding_bags.t_a",
                                    "ebc.embedding_bags.t_b"])
    assert "also read outside embedding lookups, by %linear" in dense["tied"]
    assert "mode='max' pooling is not supported" in dense["shared"]
    assert "together with ['ebc.embedding_bags.t_b']" in dense["ebc.embedding_bags.t_a"]
    assert [n.name for n in gm.graph.nodes if L.LOOKUP in n.meta] == ["plain", "hashed"]
    # the metadata reads of `hashed` became constants; the weight is read by nothing else
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "hashed.weight"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, kjt), model(x, kjt))


def test_detect_needs_example_inputs():
    model, example = zoo.CASES["bag_2d"].make()
    with pytest.raises(fxrec.passes.PassError, match="detect_embeddings needs ctx.example_inputs"):
        run_passes(fxrec.capture(model, example), PassContext())


# ------------------------------------------------------------------ group_tables
class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.EmbeddingBag(10, 4, mode="sum")
        self.b = nn.EmbeddingBag(10, 4, mode="sum")  # weighted
        self.c = nn.EmbeddingBag(10, 4, mode="sum", dtype=torch.float64)
        self.d = nn.EmbeddingBag(4, 4, mode="sum")  # ids computed from a's output
        self.e = nn.EmbeddingBag(12, 6, mode="mean")  # other dim and pooling, same kernel family as a

    def forward(self, x, w):
        a = self.a(x)
        d = self.d(a.argmax(dim=1, keepdim=True))
        e = self.e(x)[:, :4]
        return a + self.b(x, per_sample_weights=w) + self.c(x).float() + d + e


def test_groups_split_by_family_dtype_weights_and_stage():
    model = _Mixed()
    x, w = torch.randint(0, 10, (B, 3)), torch.rand(B, 3)
    gm, ctx = _run(model, (x, w))
    got = [(g.family, g.dtype, g.weighted, g.stage, g.tables) for g in ctx.groups]
    assert got == [("pooled", torch.float32, False, 0, ["a", "e"]),
                   ("pooled", torch.float32, False, 1, ["d"]),
                   ("pooled", torch.float32, True, 0, ["b"]),
                   ("pooled", torch.float64, False, 0, ["c"])]
    assert gm.meta[L.GROUPS] == ctx.groups
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["e"].meta[L.NODE_GROUPS] == (ctx.groups[0].name,)
    torch.testing.assert_close(gm(x, w), model(x, w))


def test_two_tower_groups_pooled_and_sequence_reads_apart():
    gm, ctx = _run(*zoo.CASES["two_tower"].make())
    assert [(g.family, g.members) for g in ctx.groups] == [
        ("sequence", [("user_tower_user", "user_tower.user"), ("user_tower_item_1", "user_tower.item")]),
        ("pooled", [("user_tower_item", "user_tower.item")])]


@pytest.mark.parametrize("name", ["dlrm_lists", "dlrm_ebc", "two_tower", "table_dict", "sequence_ec"])
def test_every_read_is_in_exactly_one_group(name):
    gm, ctx = _run(*zoo.CASES[name].make())
    reads = [(n.name, r.table) for n, lk in _lookups(gm) for r in lk.reads]
    members = [m for g in ctx.groups for m in g.members]
    assert sorted(members) == sorted(reads) and len(set(members)) == len(members)


class _WeightedEBC(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 20, 4, ["f"])])

    def forward(self, kjt):
        return self.ebc(kjt).values()


def test_weighted_ebc_is_grouped_as_weighted():
    kjt = zoo._kjt(torch.Generator().manual_seed(0), {"f": 20}, weighted=True)
    gm, ctx = _run(_WeightedEBC(), (kjt,))
    (node, lk), = _lookups(gm)
    assert lk.weighted and [g.weighted for g in ctx.groups] == [True]


@pytest.mark.parametrize("name", ["dlrm_lists", "dlrm_ebc", "two_tower", "functional_bag", "seq_attention"])
def test_meta_device_model_gives_the_same_tables(name):
    case = zoo.CASES[name]
    model, example = case.make()
    with torch.device("meta"):
        on_meta = case.build()
    assert fxrec.find_tables(on_meta, example) == fxrec.find_tables(model, example)


class _Huge(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.EmbeddingBag(10**9, 128, mode="sum")  # 512 GB in fp32
        self.lin = nn.Linear(128, 1)

    def forward(self, ids, offsets):
        return self.lin(self.big(ids, offsets))


def test_a_table_too_big_for_memory_is_found_on_meta():
    with torch.device("meta"):
        model = _Huge()
    ids, offsets = torch.randint(0, 10**9, (6,)), torch.tensor([0, 2, 2, 5])
    (info,) = fxrec.find_tables(model, (ids, offsets))
    assert (info.name, info.num_embeddings, info.embedding_dim, info.pooling_factor) == ("big", 10**9, 128, 1.5)
    assert info.weight_bytes == 512 * 10**9
