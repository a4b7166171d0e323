"""The planner under a batch per feature (VBE) and a narrow wire dtype (comm_dtype).

VBE: a feature with fewer bags than samples is looked up, sent and pooled once per bag, so a
table's measured `bags_per_sample` scales its lookup, ids all-to-all and output exchange.
comm_dtype: the output exchange carries 16-bit values, the lookup still writes its outputs in
the compute dtype."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxrec
from fxrec import Plan, TableInfo, Topology
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.planner import cost
from fxrec.sparse import KeyedJaggedTensor

SAMPLES, BAG = 8, 3  # every bag holds BAG ids, so VBE and per-sample batches share a pooling factor
ROWS, DIM = 1000, 16
TOPO = Topology(4, device="cuda")
PER_SAMPLE_TERMS = ("lookup", "input_dist", "output_dist")


class OneTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", ROWS, DIM, ["user"])])

    def forward(self, kjt):
        return self.ebc(kjt).values()


def _kjt(bags: int) -> KeyedJaggedTensor:
    """`bags` bags of BAG ids for SAMPLES samples: a batch per key (VBE) when bags < SAMPLES."""
    values = torch.arange(bags * BAG) % ROWS
    lengths = torch.full((bags,), BAG)
    if bags == SAMPLES:
        return KeyedJaggedTensor(["user"], values, lengths=lengths)
    inverse = torch.arange(SAMPLES) % bags
    return KeyedJaggedTensor(["user"], values, lengths=lengths, stride_per_key_per_rank=[[bags]],
                             inverse_indices=(["user"], inverse[None]))


def _measured(bags: int) -> TableInfo:
    plan = fxrec.plan(OneTable(), TOPO, (_kjt(bags),))
    return plan["ebc.embedding_bags.t"].table


def _costs(info: TableInfo, sharding: str, n=ROWS, c=DIM, wire=None) -> dict:
    params = cost.shard_params(info, n, c, info.pooling_factor, 0.8, wire=wire)
    return {k: float(v[0]) for k, v in cost.shard_costs(sharding, params, TOPO, 512, "sgd").items()}


# ------------------------------------------------------------------ VBE
@pytest.mark.parametrize("bags,expected", [
    (SAMPLES, None),  # one bag per sample: the meaning `uses` always had
    (2, 0.25),  # 2 bags serve 8 samples
    (4, 0.5),
])
def test_a_vbe_batch_is_measured_in_bags_per_sample(bags, expected):
    info = _measured(bags)
    assert info.uses == 1 and info.pooling_factor == BAG
    assert info.bags_per_sample == expected
    assert cost.bags_per_sample(info) == (1 if expected is None else expected)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise", "column_wise"])
def test_shard_terms_scale_with_bags(sharding):
    per_sample, vbe = _measured(SAMPLES), _measured(2)
    n, c = (ROWS // 4, DIM) if "row" in sharding else (ROWS, DIM // 2)
    full, quarter = _costs(per_sample, sharding, n=n, c=c), _costs(vbe, sharding, n=n, c=c)
    for term in PER_SAMPLE_TERMS:
        assert full[term] > 0
        assert quarter[term] == pytest.approx(full[term] / 4, rel=1e-12), term
    # the table itself is as big either way; only the batch's buffers shrink
    assert quarter["memory"] < full["memory"]
    assert quarter["memory"] > n * c * 4


def test_data_parallel_keeps_its_fixed_costs_under_vbe():
    per_sample, vbe = _costs(_measured(SAMPLES), "data_parallel"), _costs(_measured(2), "data_parallel")
    assert vbe["allreduce"] == per_sample["allreduce"] > 0  # the whole table's gradient, whatever the bags
    assert vbe["lookup"] < per_sample["lookup"]


def test_few_bags_flip_a_small_table_from_data_parallel_to_table_wise():
    """Per sample, sharding the small table sends more than its all-reduce; at 1 bag in 64
    samples the ids and sums are cheap and the all-reduce is not."""
    topo = Topology(2, device="cuda")
    chosen = {}
    for bags in (None, 1 / 64):
        t = TableInfo("t", 1000, 64, pooling_factor=20.0, bags_per_sample=bags)
        p = fxrec.plan([t], topo, constraints={"t": ["data_parallel", "table_wise"]}, search="exact")
        chosen[bags] = p["t"].sharding
    assert chosen == {None: "data_parallel", 1 / 64: "table_wise"}


def test_bags_per_sample_survives_the_plan_json():
    plan = fxrec.plan(OneTable(), TOPO, (_kjt(2),))
    again = Plan.from_json(plan.to_json())
    assert again["ebc.embedding_bags.t"].table.bags_per_sample == 0.25
    assert again.per_rank() == plan.per_rank()
    # a per-sample table's JSON does not name it
    assert "bags_per_sample" not in fxrec.plan(OneTable(), TOPO, (_kjt(SAMPLES),)).to_json()


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "half", True])
def test_a_bad_bags_per_sample_is_named(bad):
    with pytest.raises(ValueError, match=r"table 't': bags_per_sample must be a finite number >= 0"):
        TableInfo("t", 10, 4, bags_per_sample=bad)


# ------------------------------------------------------------------ comm_dtype
@pytest.mark.parametrize("pooling", ["sum", "none"])
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise", "column_wise"])
def test_a_16_bit_wire_halves_a_fp32_tables_output_exchange_only(sharding, pooling):
    info = TableInfo("t", ROWS, DIM, 4.0, pooling=pooling)
    n, c = (ROWS // 4, DIM) if "row" in sharding else (ROWS, DIM // 2)
    fp32, bf16 = _costs(info, sharding, n, c), _costs(info, sharding, n, c, wire=cost.wire_bytes("bf16"))
    assert bf16["output_dist"] == pytest.approx(fp32["output_dist"] / 2, rel=1e-12) and fp32["output_dist"] > 0
    # the lookup writes and reads its outputs in fp32 whatever the wire carries; ids are ids
    for same in ("lookup", "input_dist", "memory"):
        assert bf16[same] == fp32[same], same


@pytest.mark.parametrize("dtype,comm_dtype", [
    (torch.float16, "bf16"),  # a 16-bit table already sends 2 bytes
    (torch.float32, "fp32"),  # the tables' own width: nothing narrows
    (torch.float32, None),
])
def test_a_wire_no_narrower_than_the_outputs_changes_nothing(dtype, comm_dtype):
    info = TableInfo("t", ROWS, DIM, 4.0, dtype=dtype)
    assert _costs(info, "table_wise", wire=cost.wire_bytes(comm_dtype)) == _costs(info, "table_wise")


def test_a_16_bit_wire_flips_a_table_from_data_parallel_to_table_wise():
    """Sharded, the wide table's pooled outputs cost more than its all-reduce in fp32 and
    less in bf16; the all-reduce of a data_parallel table's gradient is not narrowed."""
    table = TableInfo("t", 4000, 128, 1.0)
    topo = Topology(16, device="cuda")
    chosen = {w: fxrec.plan([table], topo, constraints={"t": ["data_parallel", "table_wise"]}, search="exact",
                            comm_dtype=w)["t"].sharding for w in (None, "bf16")}
    assert chosen == {None: "data_parallel", "bf16": "table_wise"}


@pytest.mark.parametrize("value", ["int8", torch.int8, 16, "half-ish"])
def test_a_bad_comm_dtype_is_named_by_plan(value):
    with pytest.raises(ValueError, match=r"fxrec\.plan: comm_dtype must be one of .* got " +
                       repr(value).replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        fxrec.plan([TableInfo("t", ROWS, DIM)], TOPO, comm_dtype=value)


@pytest.mark.parametrize("given,kept", [("bf16", "bf16"), (torch.bfloat16, "bf16"), ("float16", "fp16"), (None, None)])
def test_the_plan_keeps_its_wire_dtype_through_json(given, kept):
    plan = fxrec.plan([TableInfo("t", ROWS, DIM, 4.0)], TOPO, constraints={"t": "row_wise"}, comm_dtype=given)
    again = Plan.from_json(plan.to_json())
    assert plan.comm_dtype == again.comm_dtype == kept
    assert again.per_rank() == plan.per_rank()
    assert (f"outputs sent in {kept}" in plan.explain()) == (kept is not None)


def test_a_plan_json_with_a_bad_wire_dtype_is_refused():
    plan = fxrec.plan([TableInfo("t", ROWS, DIM)], TOPO)
    text = plan.to_json().replace('"comm_dtype": null', '"comm_dtype": "int4"')
    with pytest.raises(ValueError, match="plan JSON: comm_dtype must be one of .* got 'int4'"):
        Plan.from_json(text)


def _ratio(a, b) -> float:
    """Two terms' ratio (sympy expressions in the batch ``B``) at a batch of 512."""
    return float((a / b).subs(cost.B, 512))


def test_shard_plans_for_its_comm_dtype():
    """One process: the plan shard makes records bf16, and its busiest shard's output
    exchange, costed on a wider world, is half the tables' own dtype's."""
    model = OneTable()
    batch = _kjt(SAMPLES)
    plan = fxrec.shard(copy.deepcopy(model), Topology(1), (batch,), comm_dtype="bf16").plan
    assert plan.comm_dtype == "bf16" and "outputs sent in bf16" in plan.explain()
    own = fxrec.shard(copy.deepcopy(model), Topology(1), (batch,)).plan
    assert own.comm_dtype is None and "outputs sent in" not in own.explain()
    # one rank exchanges nothing: cost the same shards as if three more ranks were there
    wide, wide_own = (dataclasses.replace(p, topology=TOPO) for p in (plan, own))
    name = "ebc.embedding_bags.t"
    narrow, full = wide.cost_expr(name), wide_own.cost_expr(name)
    assert float(full["output_dist"].subs(cost.B, 512)) > 0
    assert _ratio(narrow["output_dist"], full["output_dist"]) == pytest.approx(0.5)
    assert _ratio(narrow["lookup"], full["lookup"]) == 1

