"""The planner on unpooled (sequence) reads: a sample's sequence is its bag.

An EmbeddingCollection feature or an unpooled nn.Embedding returns one row per id, so a
sample carrying L ids costs L rows looked up, L ids sent and L rows sent back; the
measured pooling factor (ids per bag, a bag being a sample's sequence) carries that L into
the cost model, which already returns ``pf`` rows per unpooled bag (fxrec/planner/cost.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrec
from fxrec import TableInfo, Topology
from fxrec.modules import EmbeddingCollection, EmbeddingConfig
from fxrec.planner import cost
from fxrec.sparse import KeyedJaggedTensor

SAMPLES, ROWS, DIM = 8, 1000, 16
FEATURES = ("hist", "clicks")  # two features read one table: uses = 2
TOPO = Topology(4, device="cuda")
TABLE = "ec.embeddings.t"


class Sequences(nn.Module):
    def __init__(self, rows=ROWS, dim=DIM):
        super().__init__()
        self.ec = EmbeddingCollection([EmbeddingConfig("t", rows, dim, list(FEATURES))])

    def forward(self, kjt):
        out = self.ec(kjt)
        return sum(out[f].values().sum(0) for f in FEATURES)


def _kjt(length: int, bags: int = SAMPLES, rows: int = ROWS) -> KeyedJaggedTensor:
    """Every feature gives each of `bags` bags `length` ids; a batch per key (VBE) of SAMPLES
    samples when bags < SAMPLES."""
    keys = list(FEATURES)
    values = torch.arange(len(keys) * bags * length) % rows
    lengths = torch.full((len(keys) * bags,), length)
    if bags == SAMPLES:
        return KeyedJaggedTensor(keys, values, lengths=lengths)
    inverse = (torch.arange(SAMPLES) % bags).expand(len(keys), SAMPLES)
    return KeyedJaggedTensor(keys, values, lengths=lengths, stride_per_key_per_rank=[[bags]] * len(keys),
                             inverse_indices=(keys, inverse))


def _measured(length: int, bags: int = SAMPLES) -> TableInfo:
    (info,) = fxrec.find_tables(Sequences(), (_kjt(length, bags),))
    return info


def _costs(info: TableInfo, sharding: str, n: int, c: int, topo: Topology = TOPO) -> dict:
    params = cost.shard_params(info, n, c, info.pooling_factor, 0.8)
    return {k: float(v[0]) for k, v in cost.shard_costs(sharding, params, topo, 512, "sgd").items()}


# ------------------------------------------------------------------ measuring
@pytest.mark.parametrize("length", [1, 3, 10])
def test_an_ec_sequence_is_measured_as_its_length(length):
    info = _measured(length)
    assert (info.pooling, info.uses, info.bags_per_sample) == ("none", len(FEATURES), None)
    assert info.pooling_factor == length  # ids per sample per feature, each its own row


@pytest.mark.parametrize("bags,expected", [(2, 0.25), (4, 0.5)])
def test_an_ec_with_a_batch_per_key_counts_its_bags(bags, expected):
    """VBE: an EC looks up and returns each bag's sequence once, whatever samples share it."""
    info = _measured(10, bags)
    assert info.pooling_factor == 10
    assert info.bags_per_sample == pytest.approx(expected * len(FEATURES))


class _Module(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(ROWS, DIM, padding_idx=padding_idx)

    def forward(self, ids):
        return self.emb(ids).flatten(1)  # unpooled: no reduction over the ids' last dim


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(ROWS, DIM))

    def forward(self, ids):
        return F.embedding(ids, self.w).flatten(1)


@pytest.mark.parametrize("model,shape,expected", [
    (_Module, (SAMPLES, 7), 7.0),  # batch x seq: seq ids per sample
    (lambda: _Module(padding_idx=0), (SAMPLES, 7), 7.0),  # padded positions are looked up and returned too
    (_Functional, (SAMPLES, 7), 7.0),
    (_Module, (SAMPLES, 3, 4), 12.0),  # the first dim is the batch, the rest the sample's ids
    (_Module, (SAMPLES,), 1.0),  # 1-D: no batch structure, each id its own bag, as before
])
def test_an_unpooled_embedding_is_measured_per_sample(model, shape, expected):
    ids = torch.arange(torch.Size(shape).numel()).reshape(shape) % ROWS
    (info,) = fxrec.find_tables(model(), (ids,))
    assert (info.pooling, info.uses, info.bags_per_sample) == ("none", 1, None)
    assert info.pooling_factor == expected


# ------------------------------------------------------------------ costing
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise", "column_wise"])
def test_shard_terms_scale_with_the_sequence(sharding):
    length = 10
    one, seq = _measured(1), _measured(length)
    n, c = (ROWS // 4, DIM) if "row" in sharding else (ROWS, DIM // 2 if sharding == "column_wise" else DIM)
    base, long = _costs(one, sharding, n, c), _costs(seq, sharding, n, c)
    for term in ("lookup", "output_dist"):  # one row looked up and returned per id
        assert base[term] > 0
        assert long[term] == pytest.approx(length * base[term], rel=1e-12), term
    # the ids all-to-all carries L ids per sequence but still one length per sequence
    frac = n / ROWS
    ratio = (length * frac * cost.ID_BYTES + cost.LENGTH_BYTES) / (frac * cost.ID_BYTES + cost.LENGTH_BYTES)
    assert long["input_dist"] == pytest.approx(ratio * base["input_dist"], rel=1e-12)
    assert base["memory"] < long["memory"] < length * base["memory"]  # the table is as big either way


def test_data_parallel_keeps_its_all_reduce_under_long_sequences():
    one, seq = _measured(1), _measured(10)
    base, long = _costs(one, "data_parallel", ROWS, DIM), _costs(seq, "data_parallel", ROWS, DIM)
    assert long["allreduce"] == base["allreduce"] > 0  # the whole table's gradient, whatever the ids
    assert long["lookup"] > base["lookup"]


def test_long_sequences_flip_a_table_from_table_wise_to_data_parallel():
    """One id per sample per feature: sending the rows to and from the table's owner is
    cheaper than all-reducing the 10000 x 64 table's gradient. At 20 ids per feature the
    returned rows outweigh the all-reduce, and replicating the table wins."""
    topo, rows, dim = Topology(2, device="cuda"), 10_000, 64
    chosen, terms = {}, {}
    for length in (1, 20):
        kjt = _kjt(length, rows=rows)
        p = fxrec.plan(Sequences(rows, dim), topo, (kjt,), constraints={TABLE: ["data_parallel", "table_wise"]},
                       search="exact")
        chosen[length] = p[TABLE].sharding
        info = p[TABLE].table
        terms[length] = (_costs(info, "table_wise", rows, dim, topo)["output_dist"],
                         _costs(info, "data_parallel", rows, dim, topo)["allreduce"])
    assert chosen == {1: "table_wise", 20: "data_parallel"}
    assert terms[1][0] < terms[1][1] and terms[20][0] > terms[20][1]
