"""fxrec.PlanError messages (which tables, the memory they need, the memory there is, what
would make it fit) and clear errors for bad planner input."""
from __future__ import annotations

import re

import pytest
import torch

import fxrec
from fxrec import Constraint, PlanError, TableInfo, Topology

CPU2 = Topology(2, device="cpu", memory_per_rank="1GB")


def test_a_table_too_big_for_any_rank():
    tables = [TableInfo("small", 1000, 16), TableInfo("huge", 10_000_000, 128, 5.0)]  # 5.12 GB of weights
    with pytest.raises(PlanError) as e:
        fxrec.plan(tables, CPU2)
    msg = str(e.value)
    assert "'huge'" in msg and "'small'" not in msg
    assert "needs 2.4 GiB on one rank at best (" in msg  # half the weights, plus buffers
    assert "each rank has 953.7 MiB (2 ranks)" in msg
    assert "use at least 6 ranks (row_wise" in msg  # 4 do not fit (5 neither), 6 do
    fxrec.plan(tables, Topology(6, device="cpu", memory_per_rank="1GB"))  # as it says
    assert "float16" not in msg  # half the bytes (1.2 GiB per rank) would not fit either: no fix
    with pytest.raises(PlanError, match=r"store 'huge' in float16 \(row_wise: 1\.2 GiB per rank"):
        fxrec.plan(tables, Topology(2, device="cpu", memory_per_rank="1.5GB"))  # where it would


def test_suggests_row_wise_when_a_constraint_forbids_it():
    tables = [TableInfo("wide", 3_000_000, 64, 2.0)]  # 768 MB as one shard, 1 GB ranks... of 0.5 GB
    topo = Topology(4, device="cpu", memory_per_rank="0.5GB")
    with pytest.raises(PlanError, match=r"allow row_wise for 'wide' \(.* per rank over 4 ranks\)"):
        fxrec.plan(tables, topo, constraints={"wide": "table_wise"})
    plan = fxrec.plan(tables, topo)  # free, it fits by splitting
    assert plan["wide"].sharding in ("row_wise", "column_wise")


def test_float16_tables_are_not_told_to_shrink_their_dtype():
    tables = [TableInfo("h", 10_000_000, 128, 5.0, dtype=torch.float16)]
    with pytest.raises(PlanError) as e:
        fxrec.plan(tables, CPU2)
    assert "float16" in str(e.value) and "store 'h' in float16" not in str(e.value)


def test_total_memory_too_small():
    tables = [TableInfo(f"t{i}", 1_500_000, 64, 2.0) for i in range(8)]  # 384 MB each, 3.1 GB in all
    with pytest.raises(PlanError) as e:
        fxrec.plan(tables, Topology(2, device="cpu", memory_per_rank="1GB"))
    msg = str(e.value)
    assert "in total but 2 ranks hold 2 x 953.7 MiB" in msg
    assert "use at least 4 ranks" in msg and "float16" in msg


def test_no_packing_although_each_table_and_the_total_fit():
    # three 589 MB tables, each whole on one rank, on two 1 GB ranks: 1.8 GB of 2 GB
    tables = [TableInfo(f"t{i}", 2_300_000, 64, 2.0) for i in range(3)]
    with pytest.raises(PlanError, match=r"could not place table\(s\) 't2' \(562.0 MiB per shard\).*1.9 GiB"):
        fxrec.plan(tables, CPU2, constraints={t.name: "table_wise" for t in tables})
    plan = fxrec.plan(tables, CPU2)  # free to split, it fits
    assert all(r["memory_bytes"] <= CPU2.memory_per_rank for r in plan.per_rank())


@pytest.mark.parametrize("constraint,topology,why", [
    (Constraint("row_wise", ranks=(0, 1)), Topology(4), "row_wise needs all 4 ranks, the table is pinned to 2 "
                                                        "(ranks 0, 1)"),
    (Constraint("column_wise", min_shards=16), Topology(4), "column_wise makes 2 or 4 shard(s), outside "
                                                            "min_shards=16"),
    (Constraint(["data_parallel", "table_wise"], ranks=(0, 1, 2, 3), min_shards=2), Topology(8),
     "data_parallel needs all 8 ranks, the table is pinned to 4 (ranks 0, 1, 2, 3); table_wise makes 1 shard(s), "
     "outside min_shards=2"),
    (Constraint("table_row_wise", ranks=(0, 1, 2)), Topology(8, ranks_per_node=4),
     "table_row_wise needs a whole node (4 ranks) among the ranks it is pinned to (ranks 0, 1, 2)"),
    (Constraint("data_parallel", max_shards=2), Topology(4), "data_parallel makes 4 shard(s), outside max_shards=2"),
])
def test_constraint_leaving_no_option_says_why_per_type(constraint, topology, why):
    tables = [TableInfo("t", 1000, 16)]
    with pytest.raises(PlanError, match="'t': no sharding type is allowed by its constraint") as e:
        fxrec.plan(tables, topology, constraints={"t": constraint})
    assert str(e.value).endswith(f"on this topology; {why}")


@pytest.mark.parametrize("sharding,topology,need", [
    ("row_wise", Topology(4), 4),
    ("table_row_wise", Topology(8, ranks_per_node=4), 4),
])
def test_row_sharding_needs_a_row_per_rank(sharding, topology, need):
    """The rewrite gives every rank of a row-wise table a real row range."""
    tables = [TableInfo("tiny", 3, 8), TableInfo("big", 100, 8)]
    with pytest.raises(PlanError, match=rf"'tiny': .* {sharding} needs at least {need} rows \(one per rank\), "
                                        r"the table has 3"):
        fxrec.plan(tables, topology, constraints={"tiny": sharding})
    plan = fxrec.plan(tables, topology)  # unconstrained: tiny goes elsewhere, big may be split
    assert all(s.rows[1] > s.rows[0] for t in plan for s in plan[t].shards)


@pytest.mark.parametrize("dim, why", [
    (12, r"dim 12 \(3 blocks of 4 columns\) has no such split over 2 ranks"),
    (17, r"dim 17 \(17 columns\) has no such split over 2 ranks"),
])
def test_column_wise_without_a_split_says_why(dim, why):
    """Not "do not fit": memory is no part of it."""
    with pytest.raises(PlanError, match=r"^1 table\(s\) cannot be placed on 2 ranks\n.*column_wise needs 2 or more "
                                        r"equal shards of whole .*" + why):
        fxrec.plan([TableInfo("t", 100, dim)], Topology(2), constraints={"t": "column_wise"})
    assert len(fxrec.plan([TableInfo("t", 100, 16)], Topology(2), constraints={"t": "column_wise"})["t"].shards) == 2


@pytest.mark.parametrize("tables,kwargs,match", [
    ([], {}, "no tables to plan"),
    (["t"], {}, "item 0 is a str, not a fxrec.TableInfo"),
    ([TableInfo("a", 10, 4), TableInfo("a", 20, 4)], {}, "two tables are named 'a'"),
    ([TableInfo("a", 10, 4)], {"constraints": {"b": "table_wise"}}, "constraint for unknown table 'b'"),
    ([TableInfo("a", 10, 4)], {"constraints": {"a": "diagonal"}},
     "constraint for table 'a': .*unknown sharding_type 'diagonal'"),
    ([TableInfo("a", 10, 4)], {"constraints": {"a": Constraint(ranks=(9,))}}, "rank 9 is outside the 4-rank world"),
    ([TableInfo("a", 10, 4)], {"batch_size": 0}, "batch_size must be a positive integer"),
    ([TableInfo("a", 10, 4)], {"search": "magic"}, "search must be"),
    ([TableInfo("a", 10, 4)], {"sparse_optimizer": "momentum"}, "unknown sparse optimizer 'momentum'"),
    ([TableInfo("a", 10, 4)], {"sparse_optimizer": 3}, "sparse_optimizer must be a name"),
    # the costs divide by an efficiency: a negative one sent the partition search round forever
    ([TableInfo("a", 10, 4)], {"kernel_efficiency": {"fbgemm": -1.0}},
     r"kernel_efficiency\['fbgemm'\] must be a positive finite number, got -1.0"),
    ([TableInfo("a", 10, 4)], {"kernel_efficiency": {"torch": float("nan")}}, "must be a positive finite number"),
    ([TableInfo("a", 10, 4)], {"kernel_efficiency": {"nope": 0.5}}, "names unknown kernel 'nope'"),
    ([TableInfo("a", 10, 4)], {"constraints": {"a": 3}}, "constraint for table 'a': expected a sharding type"),
    ([TableInfo("a", 10, 4)], {"constraints": [("a", "row_wise")]}, "constraints must map table names .* got a list"),
    ([TableInfo("a", 10, 4)], {"constraints": {"a": Constraint()}}, None),
])
def test_bad_input(tables, kwargs, match):
    if match is None:  # the good neighbour of the cases above
        fxrec.plan(tables, Topology(4), **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        fxrec.plan(tables, Topology(4), **kwargs)


@pytest.mark.parametrize("method", ["per_rank", "table_costs", "max_rank_time", "imbalance", "explain"])
@pytest.mark.parametrize("batch_size", [0, -5, 2.5, True, "64"])
def test_plan_methods_check_their_batch_size(method, batch_size):
    """As fxrec.plan does; 0 used to mean the plan's own batch, and -5 gave negative times."""
    plan = fxrec.plan([TableInfo("a", 100_000, 64, 5.0), TableInfo("b", 1000, 16, 2.0)], Topology(2))
    with pytest.raises(ValueError, match=rf"Plan: batch_size must be a positive integer \(or None for the plan's "
                                         rf"own, 512\), got {re.escape(repr(batch_size))}"):
        getattr(plan, method)(batch_size)
    assert getattr(plan, method)(None) == getattr(plan, method)(512)


def test_a_model_without_tables():
    model = torch.nn.EmbeddingBag(10, 4, mode="max")  # left dense: no kernel pools by max
    with pytest.raises(ValueError, match=r"fxrec.plan: EmbeddingBag looks up no embedding table fxrec can place "
                                         r"\(`fxrec dump` lists the lookups it left dense"):
        fxrec.plan(model, Topology(4), (torch.randint(0, 10, (3, 2)),))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernels="cuda_magic"), "unknown kernel 'cuda_magic'"),
    (dict(min_shards=0), "min_shards must be a positive integer"),
    (dict(min_shards=4, max_shards=2), "min_shards 4 > max_shards 2"),
    (dict(ranks=(-1,)), "ranks must be non-negative integers"),
    (dict(pooling_factor=-2.0), "pooling_factor must be a finite number >= 0"),
])
def test_bad_constraint(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Constraint(**kwargs)


def test_model_needs_example_inputs():
    with pytest.raises(ValueError, match="needs example_inputs"):
        fxrec.plan(torch.nn.EmbeddingBag(10, 4), Topology(2))


@pytest.mark.parametrize("args, kwargs, match", [
    (("a", 1.5, 4), {}, r"num_embeddings must be a whole number, got 1.5"),
    (("a", 10, 2.9), {}, r"embedding_dim must be a whole number, got 2.9"),
    (("a", True, 4), {}, r"num_embeddings must be a whole number, got True"),
    (("a", 10, 4), {"uses": 1.5}, r"uses must be a whole number, got 1.5"),
    (("a", 10, 4), {"pooling_factor": float("inf")}, r"pooling_factor must be a finite number >= 0, got inf"),
    (("a", 10, 4), {"dtype": "bogus"}, r"unknown dtype 'bogus'"),
    (("a", 10, 4), {"dtype": 3}, r"dtype must be a torch.dtype or its name, got 3"),
])
def test_table_info_refuses_what_it_would_truncate(args, kwargs, match):
    with pytest.raises(ValueError, match=rf"table 'a': {match}"):
        TableInfo(*args, **kwargs)
    assert TableInfo("a", 10.0, 4).num_embeddings == 10  # a whole float is fine


def test_a_constraint_on_a_table_the_model_keeps_dense():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.user = torch.nn.EmbeddingBag(100, 8)
            self.item = torch.nn.EmbeddingBag(50, 8)

        def forward(self, u, i):
            return self.user(u) + self.item(i) + self.item.weight.sum()

    inputs = (torch.randint(0, 50, (4, 3)), torch.randint(0, 50, (4, 3)))
    with pytest.raises(ValueError, match=r"constraint for table 'item': the model keeps 'item' dense .*read outside "
                                         r"embedding lookups"):
        fxrec.plan(Tied(), Topology(2), inputs, constraints={"item": "row_wise"})
    assert fxrec.plan(Tied(), Topology(2), inputs, constraints={"user": "row_wise"})["user"].sharding == "row_wise"


# F27 of the API audit: each was a bare AttributeError/TypeError/JSONDecodeError, or accepted
@pytest.mark.parametrize("make,error,match", [
    (lambda: TableInfo(name=1, num_embeddings=10, embedding_dim=4), ValueError,
     "TableInfo: name must be a non-empty string, got 1"),
    (lambda: TableInfo(name="t", num_embeddings=10, embedding_dim=4, features="f"), ValueError,
     "table 't': features must be a list of names, got the string 'f'"),
    (lambda: Constraint(ranks=1.0), ValueError, "Constraint: ranks must be non-negative integers, got 1.0"),
    (lambda: Constraint(ranks=[0, 1.5]), ValueError, r"ranks must be non-negative integers, got \[0, 1.5\]"),
    (lambda: fxrec.Plan.from_json("x"), ValueError, "Plan.from_json: not valid JSON"),
    (lambda: fxrec.Plan.from_json(None), TypeError, "Plan.from_json: text must be the JSON string Plan.to_json"),
])
def test_hand_built_planner_inputs_name_the_bad_field(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_constraint_ranks_take_numpy_and_torch_integers():
    np = pytest.importorskip("numpy")
    assert Constraint(ranks=np.int64(1)).ranks == (1,)
    assert Constraint(ranks=[np.int64(2), 0]).ranks == (0, 2)
    assert Constraint(ranks=torch.tensor([1, 0])).ranks == (0, 1)
