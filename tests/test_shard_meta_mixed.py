"""Models whose embedding tables are on `meta` while their dense layers are on the CPU
(TorchRec's usual setup): capture, find_tables, plan, dump and shard work without ever
materialising a table; the sharded tables are `deterministic_init`'s (as for a fully-meta
model) and the dense layers keep the user's values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import fxrec
from fxrec.commands.dump import build_dump
from fxrec.models import DLRM, DLRMPlain
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from fxrec.optim import SGD
from fxrec.passes import lookup as L
from fxrec.runtime.tables import deterministic_init
from fxrec.shard import shard
from fxrec.sparse import KeyedJaggedTensor
from fxrec.topology import Topology
from fxrec.types import TableInfo
from dist_harness import run_workers
from shard_models import _cat_bags, _cat_kjt, _kjt

B, SEED, LR = 3, 7, 0.1
CPU, META = torch.device("cpu"), torch.device("meta")
EBC_ROWS = {"f0": 40, "f1": 24, "f1b": 24, "f2": 12}  # f1 and f1b share table t1
PLAIN_ROWS = (40, 24, 12)


def _ebc_configs() -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig("t0", 40, 8, ["f0"]), EmbeddingBagConfig("t1", 24, 8, ["f1", "f1b"]),
            EmbeddingBagConfig("t2", 12, 8, ["f2"], pooling="mean")]


def _dlrm_ebc(tables: torch.device) -> nn.Module:
    return DLRM(EmbeddingBagCollection(_ebc_configs(), device=tables), 4, [8], [8, 1], dense_device=CPU)


def _bags(g, rows: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(0, 4, (b,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return torch.randint(0, rows, (int(lengths.sum()),), generator=g), offsets


class MixedKinds(nn.Module):
    """nn.Embedding folded into .sum, F.embedding_bag on a bare parameter, an
    EmbeddingCollection: every table on `tables`, the head on the CPU."""

    def __init__(self, tables: torch.device):
        super().__init__()
        self.emb = nn.Embedding(30, 4, device=tables)
        self.table = nn.Parameter(torch.empty(20, 4, device=tables))
        self.ec = EmbeddingCollection([EmbeddingConfig("e", 16, 4, ["s"])], device=tables)
        self.head = nn.Linear(12, 1, device=CPU)

    def forward(self, tokens, ids, offsets, kjt):
        a = self.emb(tokens).sum(1)
        b = F.embedding_bag(ids, self.table, offsets, mode="mean")
        c = self.ec(kjt)["s"].to_padded_dense(3).sum(1)
        return self.head(torch.cat([a, b, c], dim=1))


def _mixed_draw(g, b):
    ids, offsets = _bags(g, 20, b)
    return torch.randint(0, 30, (b, 2), generator=g), ids, offsets, _kjt(g, {"s": 16}, b)


def _mixed_concat(batches):
    ids, offsets = _cat_bags([(i, o) for _, i, o, _ in batches])
    return torch.cat([t for t, *_ in batches]), ids, offsets, _cat_kjt([k for *_, k in batches])


def _plain_draw(g, b):
    bags = [_bags(g, n, b) for n in PLAIN_ROWS]  # DLRMPlain takes (dense, offsets list, ids list)
    return torch.randn(b, 4, generator=g), [o for _, o in bags], [i for i, _ in bags]


def _plain_concat(batches):
    bags = [_cat_bags([(ids[k], offs[k]) for _, offs, ids in batches]) for k in range(len(PLAIN_ROWS))]
    return torch.cat([x for x, _, _ in batches]), [o for _, o in bags], [i for i, _ in bags]


@dataclass
class Case:
    build: Callable[[torch.device], nn.Module]  # tables on the given device, dense on the CPU
    draw: Callable  # (generator, b) -> one local batch
    concat: Callable  # local batches -> the global batch

    def batches(self, world: int, seed: int) -> list[tuple]:
        g = torch.Generator().manual_seed(seed)
        return [self.draw(g, B) for _ in range(world)]


CASES = {
    "dlrm_ebc": Case(_dlrm_ebc, lambda g, b: (torch.randn(b, 4, generator=g), _kjt(g, EBC_ROWS, b)),
                     lambda bs: (torch.cat([x for x, _ in bs]), _cat_kjt([k for _, k in bs]))),
    "dlrm_plain": Case(lambda t: DLRMPlain(list(PLAIN_ROWS), 8, 4, [8], [8, 1], device=t), _plain_draw,
                       _plain_concat),
    "mixed_kinds": Case(MixedKinds, _mixed_draw, _mixed_concat),
}


def _mixed(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name].build(META)


def _reference(name: str, model: nn.Module, seed: int = SEED) -> nn.Module:
    """`model` on the CPU: its dense values, and each meta table as deterministic_init
    draws it (what fxrec.shard gives a meta table)."""
    ref = CASES[name].build(CPU)
    names = L.table_names_by_param(model)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_meta:
            n, d = value.shape
            state[key] = deterministic_init(names[key], n, d, (0, n), (0, d), seed=seed, dtype=value.dtype)
        else:
            state[key] = value.detach().clone()
    ref.load_state_dict(state)
    return ref


def _dense_values(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}


# ------------------------------------------------------------------ the issue's repro
def test_issue_repro_shards_and_runs():
    cfgs = [EmbeddingBagConfig(f"t{i}", 1000, 8, [f"f{i}"]) for i in range(3)]
    m = DLRM(EmbeddingBagCollection(cfgs, device="meta"), 4, [8], [8, 1], dense_device=torch.device("cpu"))
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(3)], torch.randint(0, 1000, (12,)),
                                              torch.ones(12, dtype=torch.long))
    x = torch.randn(4, 4)
    sm = fxrec.shard(m, fxrec.Topology(1), (x, kjt), sparse_optimizer=fxrec.optim.SGD(0.1))
    assert sm(x, kjt).shape == (4, 1)


# ------------------------------------------------------------------ shard: numbers and placement
@pytest.mark.parametrize("name, sharding", [
    ("dlrm_ebc", "table_wise"),
    ("dlrm_ebc", "row_wise"),
    ("dlrm_ebc", "table_row_wise"),
    ("dlrm_ebc", "data_parallel"),
    ("dlrm_plain", "table_wise"),
    ("dlrm_plain", "row_wise"),
    ("mixed_kinds", "table_wise"),
    ("mixed_kinds", "row_wise"),
    ("mixed_kinds", "data_parallel"),
])
def test_forward_equals_reference_with_deterministic_tables(name, sharding):
    model = _mixed(name)
    dense = _dense_values(model)
    ref = _reference(name, model)
    (batch,) = CASES[name].batches(1, seed=1)
    tables = [t.name for t in fxrec.find_tables(model, batch)]
    sm = shard(model, Topology(1), batch, constraints={t: sharding for t in tables}, seed=SEED)
    assert all(sm.plan[t].sharding == sharding for t in tables)
    (fresh,) = CASES[name].batches(1, seed=2)
    assert_close(sm(*fresh), ref(*fresh))
    # dense layers: on the CPU, with the user's values (not re-initialised)
    got = {n.removeprefix("module."): p for n, p in sm.named_parameters()}
    assert set(got) == set(dense)
    for key, value in dense.items():
        assert got[key].device == CPU
        assert_close(got[key], value, rtol=0, atol=0)
    # tables: deterministic_init's, as for the fully-meta model; the user's stay on meta
    full, want = sm.full_state_dict(), ref.state_dict()
    assert list(full) == list(model.state_dict())
    for key in want:
        assert_close(full[key], want[key], rtol=0, atol=0)
    assert all(p.is_meta for n, p in model.named_parameters() if n not in dense)


def test_tables_equal_the_fully_meta_models():
    model = _mixed("dlrm_ebc")
    with torch.device("meta"):
        all_meta = _dlrm_ebc(META)
    (batch,) = CASES["dlrm_ebc"].batches(1, seed=1)
    cons = {t.name: "row_wise" for t in fxrec.find_tables(model, batch)}
    mixed_full = shard(model, Topology(1), batch, constraints=cons, seed=SEED).full_state_dict()
    meta_full = shard(all_meta, Topology(1), batch, constraints=cons, seed=SEED).full_state_dict()
    keys = [k for k in mixed_full if L.table_names_by_param(model)[k] in cons]
    assert len(keys) == 3
    for key in keys:
        assert_close(mixed_full[key], meta_full[key], rtol=0, atol=0)


@pytest.mark.parametrize("name, sharding", [
    ("dlrm_ebc", "row_wise"),
    ("dlrm_ebc", "table_wise"),
    ("dlrm_plain", "data_parallel"),
    ("mixed_kinds", "table_wise"),
])
def test_one_sgd_step_matches_reference(name, sharding):
    model = _mixed(name)
    ref = _reference(name, model)
    (batch,) = CASES[name].batches(1, seed=1)
    tables = {t.name for t in fxrec.find_tables(model, batch)}
    sm = shard(model, Topology(1), batch, constraints={t: sharding for t in tables}, sparse_optimizer=SGD(LR),
               seed=SEED)
    (step,) = CASES[name].batches(1, seed=3)
    opt = torch.optim.SGD(sm.parameters(), lr=LR)
    sm(*step).square().mean().backward()
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)  # dense grads on tables: plain SGD on touched rows
    ref(*step).square().mean().backward()
    ref_opt.step()
    full = sm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ find_tables, plan, dump, capture
def test_find_tables_measures_the_real_ids():
    model = _mixed("dlrm_ebc")
    (batch,) = CASES["dlrm_ebc"].batches(1, seed=4)
    kjt = batch[1]

    def factor(*features):
        ids = sum(kjt[f].values().numel() for f in features)
        return ids / (B * len(features))

    prefix = "sparse_arch.embedding_bag_collection.embedding_bags."
    want = [TableInfo(prefix + "t0", 40, 8, factor("f0"), pooling="sum", uses=1, features=["f0"]),
            TableInfo(prefix + "t1", 24, 8, factor("f1", "f1b"), pooling="sum", uses=2, features=["f1", "f1b"]),
            TableInfo(prefix + "t2", 12, 8, factor("f2"), pooling="mean", uses=1, features=["f2"])]
    assert fxrec.find_tables(model, batch) == want
    assert fxrec.find_tables(_reference("dlrm_ebc", model), batch) == want


@pytest.mark.parametrize("name", ["dlrm_plain", "mixed_kinds"])
def test_find_tables_matches_the_cpu_model(name):
    model = _mixed(name)
    (batch,) = CASES[name].batches(1, seed=4)
    assert fxrec.find_tables(model, batch) == fxrec.find_tables(_reference(name, model), batch)


class _Huge(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.EmbeddingBag(10**9, 128, mode="sum", device="meta")  # 512 GB in fp32
        self.lin = nn.Linear(128, 1)

    def forward(self, ids, offsets):
        return self.lin(self.big(ids, offsets))


def test_a_huge_meta_table_with_cpu_dense_is_found_and_planned():
    ids, offsets = torch.randint(0, 10**9, (6,)), torch.tensor([0, 2, 2, 5])
    (info,) = fxrec.find_tables(_Huge(), (ids, offsets))
    assert (info.name, info.num_embeddings, info.embedding_dim, info.pooling_factor) == ("big", 10**9, 128, 1.5)
    plan = fxrec.plan(_Huge(), Topology(8, memory_per_rank=2**37), (ids, offsets))
    assert plan["big"].sharding in ("row_wise", "table_row_wise", "column_wise")


def test_plan_and_dump():
    model = _mixed("dlrm_ebc")
    (batch,) = CASES["dlrm_ebc"].batches(1, seed=1)
    plan = fxrec.plan(model, Topology(2), batch)
    assert sorted(t for t in plan.tables) == sorted(t.name for t in fxrec.find_tables(model, batch))
    text = build_dump(model, batch)
    assert "sparse_arch.embedding_bag_collection.embedding_bags.t1" in text
    assert f"f32[{B}, 1]" in text  # shapes propagated through the CPU top MLP


def test_capture_leaves_the_model_alone_and_shares_its_dense_layers():
    model = _mixed("mixed_kinds")
    (batch,) = CASES["mixed_kinds"].batches(1, seed=1)
    gm = fxrec.capture(model, batch)
    assert gm.meta[L.CAPTURED_BY] == "fx"
    assert model.emb.weight.is_meta and model.table.is_meta and not model.head.weight.is_meta
    assert gm.get_parameter("head.weight") is model.head.weight
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out.meta["tensor_meta"].shape == (B, 1)


class _NeedsExport(nn.Module):
    """Iterates over a tensor, which fx cannot trace: captured through torch.export."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 4, mode="sum", device="meta")
        self.lin = nn.Linear(4, 1)
        self.register_buffer("scale", torch.full((1,), 2.0))

    def forward(self, ids):
        return self.lin(torch.cat([self.bag(row.unsqueeze(0)) for row in ids])) * self.scale


def test_export_fallback_captures_a_mixed_model():
    model = _NeedsExport()
    ids = torch.randint(0, 50, (3, 5))
    gm = fxrec.capture(model, (ids,))
    assert gm.meta[L.CAPTURED_BY] == "export"
    assert gm.get_parameter("lin.weight") is model.lin.weight  # the user's tensors, not stand-ins
    assert gm.get_buffer("scale") is model.scale
    assert model.bag.weight.is_meta and not model.lin.weight.is_meta and not model.scale.is_meta
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert out.meta["tensor_meta"].shape == (3, 1)
    (info,) = fxrec.find_tables(model, (ids,))
    assert (info.name, info.num_embeddings, info.embedding_dim, info.uses, info.pooling_factor) == \
        ("bag", 50, 4, 3, 5.0)


class _DenseOnMeta(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 4, mode="sum")
        self.proj = nn.Parameter(torch.empty(4, 1, device="meta"))

    def forward(self, ids):
        return self.bag(ids) @ self.proj


def test_dense_parameter_on_meta_without_initialiser_is_a_clear_error():
    ids = torch.randint(0, 20, (3, 2))
    with pytest.raises(ValueError, match=r"'proj' of module '' \(_DenseOnMeta\) is on the meta device"):
        shard(_DenseOnMeta(), Topology(1), (ids,))


# ------------------------------------------------------------------ two gloo ranks
def _two_rank_job(rank: int, world: int, sharding: str) -> None:
    case = CASES["dlrm_ebc"]
    model = _mixed("dlrm_ebc")
    ref = _reference("dlrm_ebc", model)
    batches = case.batches(world, seed=1)
    tables = {t.name for t in fxrec.find_tables(model, batches[0])}
    sm = shard(model, Topology(world), batches[rank], constraints={t: sharding for t in tables},
               sparse_optimizer=SGD(LR), seed=SEED)
    with torch.no_grad():
        assert_close(sm(*batches[rank]), ref(*case.concat(batches))[rank * B:(rank + 1) * B])
    step = case.batches(world, seed=5)
    opt = torch.optim.SGD(sm.parameters(), lr=LR)
    sm(*step[rank]).square().mean().backward()  # averaged over the local batch, grads over ranks
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref(*case.concat(step)).square().mean().backward()
    ref_opt.step()
    full = sm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{sharding} {key}: {m}")


def _two_rank_worker(rank: int, world: int, sharding: str) -> str:
    _two_rank_job(rank, world, sharding)
    return "ok"


def test_two_gloo_ranks_match_the_unsharded_reference():
    # row_wise: ids all-to-all and a reduce-scatter of partial sums (one spawn: ~10 s of startup)
    assert run_workers(_two_rank_worker, 2, "row_wise", timeout=120) == ["ok", "ok"]
