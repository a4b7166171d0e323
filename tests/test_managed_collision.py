"""Managed collisions, as TorchRec's MCH modules: the map against a plain-Python reference under
each eviction policy, the reset of evicted rows, the errors, and every path (fx capture,
torch.compile, lower_for_inference, shard on 1 and 2 gloo ranks under five shardings, trained
against the unsharded model on the global batch, TrainPipeline, bad ids on one rank)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.managed_collision import (DistanceLFU_EvictionPolicy, LFU_EvictionPolicy, LRU_EvictionPolicy,
                                     MCHManagedCollisionModule, ManagedCollisionCollection,
                                     ManagedCollisionEmbeddingBagCollection, ManagedCollisionEmbeddingCollection,
                                     fresh_rows)
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from fxrec.optim import SGD, RowWiseAdagrad
from fxrec.sparse import JaggedTensor, KeyedJaggedTensor, validation
from fxrec.topology import Topology
from shard_models import Mismatches, _cat_kjt, pipeline_like_steps

B, STEPS, LR = 4, 4, 0.1
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"]
SPREAD = 1_000_003  # raw ids are multiples of it: far outside the tables' rows


# ------------------------------------------------------------------ a plain-Python reference
class ReferenceMap:
    """The map as the module doc states it, on Python dicts: rows held by ids; every
    `interval` calls the ids seen compete (held rows first in id order, then new ids by count,
    ties by id; a stable sort by score, the miss row always kept)."""

    def __init__(self, n: int, policy: str, interval: int = 1, decay: float = 1.0):
        self.n, self.policy, self.interval, self.decay = n, policy, interval, decay
        self.rows = {}            # id -> [row, count, last]
        self.free = list(range(n - 1))  # rows never taken, in the order empty rows are handed out
        self.it, self.seen, self.evicted = 0, [], []

    def score(self, count, last):
        distance = (self.it - last + 1) ** self.decay
        return {"lfu": count, "lru": -distance, "distance_lfu": count / distance}[self.policy]

    def profile(self, ids: list[int]) -> None:
        self.it += 1
        self.seen += [(i, self.it) for i in ids]
        if self.it % self.interval:
            return
        counts, last = {}, {}
        for i, it in self.seen:
            counts[i] = counts.get(i, 0) + 1
            last[i] = max(last.get(i, 0), it)
        self.seen = []
        for i in counts:
            if i in self.rows:
                self.rows[i][1] += counts[i]
                self.rows[i][2] = last[i]
        new = sorted((i for i in counts if i not in self.rows), key=lambda i: (-counts[i], i))
        # held rows in id order, empty rows (id = int64 max) after them, in the order they sort
        held = sorted(self.rows.items())
        cands = [(self.score(c, la), ("old", i)) for i, (_, c, la) in held]
        cands += [(self.score(0, 0), ("empty", r)) for r in self.free]
        cands.append((float("inf"), ("miss", None)))
        cands += [(self.score(counts[i], last[i]), ("new", i)) for i in new]
        ranked = sorted(range(len(cands)), key=lambda k: -cands[k][0])  # stable
        kept = set(ranked[:self.n])
        losers = [cands[k][1] for k in ranked[self.n:] if cands[k][1][0] != "new"]
        winners = [cands[k][1][1] for k in ranked[:self.n] if cands[k][1][0] == "new"]
        assert len(losers) == len(winners) and kept
        for (kind, who), i in zip(losers, winners):
            row = self.rows.pop(who)[0] if kind == "old" else who
            if kind == "empty":
                self.free.remove(who)
            self.rows[i] = [row, counts[i], last[i]]
            self.evicted.append(row)

    def remap(self, ids: list[int]) -> list[int]:
        return [self.rows[i][0] if i in self.rows else self.n - 1 for i in ids]


POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy, "distance_lfu": DistanceLFU_EvictionPolicy}


def _jt(ids) -> dict:
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return {"f": JaggedTensor(ids, lengths=torch.tensor([ids.numel()]))}


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_map_follows_the_reference_under_each_policy(policy, interval):
    g = torch.Generator().manual_seed(7)
    n = 6
    mc = MCHManagedCollisionModule(n, eviction_policy=POLICIES[policy](), eviction_interval=interval, name="t")
    ref = ReferenceMap(n, policy, interval)
    evicted = []
    for step in range(12):
        # a few ids seen now and then, and each step a hot id of its own, seen more than the last:
        # under every policy rows change hands
        ids = torch.cat([torch.randint(0, 12, (6,), generator=g), torch.full((step + 2,), 100 + step)]) * SPREAD
        got = mc(_jt(ids))["f"].values()
        ref.profile(ids.tolist())
        assert got.tolist() == ref.remap(ids.tolist()), f"step {step}"
        rows = mc.evict()
        evicted += [] if rows is None else rows.tolist()
    assert sorted(evicted) == sorted(ref.evicted) and len(ref.evicted) > n  # rows did change hands
    assert mc.current_iter() == 12


def test_eval_mode_remaps_without_profiling_and_misses_take_the_last_row():
    mc = MCHManagedCollisionModule(4, name="t")
    first = mc(_jt([5, 6, 5]))["f"].values().tolist()
    assert first[0] == first[2] != first[1] and max(first) < 3
    state = copy.deepcopy(mc.state_dict())
    mc.eval()
    assert mc(_jt([5, 6, 7, 8]))["f"].values().tolist() == first[:2] + [3, 3]  # 7, 8 miss: row 3
    for k, v in mc.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert mc.evict() is not None and mc.evict() is None  # the training call's, once
    assert int(mc.open_slots()) == 1


def test_threshold_filter_and_hash_func_and_state_dict_round_trip():
    mc = MCHManagedCollisionModule(8, eviction_policy=LFU_EvictionPolicy(
        threshold_filtering_func=lambda counts: (counts > 1, 1)), input_hash_size=100,
        input_hash_func=lambda ids, size: ids % size, name="t")
    out = mc(_jt([105, 5, 7, 9, 9]))["f"].values()  # 105 hashes to 5: seen twice, as 9; 7 once
    assert out.tolist()[2] == 7 and out[0] == out[1] and out[3] == out[4] and out[0] != out[3]
    assert sorted(mc._mch_sorted_raw_ids[:2].tolist()) == [5, 9]
    assert {k for k in mc.state_dict()} == {"_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts",
                                            "_current_iter_tensor"}
    other = MCHManagedCollisionModule(8, eviction_policy=LFU_EvictionPolicy(), input_hash_size=100,
                                      input_hash_func=lambda ids, size: ids % size).eval()
    other.load_state_dict(mc.state_dict())
    assert other(_jt([9, 5, 3]))["f"].values().tolist() == mc.eval()(_jt([9, 5, 3]))["f"].values().tolist()


def test_bad_arguments_and_ids_raise_naming_them():
    with pytest.raises(ValueError, match="zch_size must be an int >= 1, got 0"):
        MCHManagedCollisionModule(0)
    with pytest.raises(ValueError, match="eviction_interval must be an int >= 1"):
        MCHManagedCollisionModule(4, eviction_interval=0)
    with pytest.raises(TypeError, match="eviction_policy must be an MCHEvictionPolicy"):
        MCHManagedCollisionModule(4, eviction_policy="lfu")
    mc = MCHManagedCollisionModule(4, input_hash_size=10, name="t_user")
    with pytest.raises(ValueError, match=r"table 't_user', feature 'f': id 10 is outside \[0, 10\)"):
        mc(_jt([3, 10]))
    with pytest.raises(ValueError, match=r"id -1 is outside"):
        mc(_jt([-1]))
    assert mc.current_iter() == 0  # nothing profiled
    with validation(False):  # unchecked, as the lookups' own checks: an id held by no row misses
        assert mc.eval()(_jt([10 ** 6]))["f"].values().tolist() == [3]
    cfgs = [EmbeddingBagConfig("t", 5, 4, ["a"])]
    with pytest.raises(ValueError, match="table 't' has no managed collision module"):
        ManagedCollisionCollection({}, cfgs)
    with pytest.raises(ValueError, match=r"table 't' has 5 rows but its managed collision module maps to 4"):
        ManagedCollisionCollection({"t": MCHManagedCollisionModule(4)}, cfgs)
    with pytest.raises(ValueError, match=r"managed collision modules for \['u'\], which are not among the tables"):
        ManagedCollisionCollection({"t": MCHManagedCollisionModule(5), "u": MCHManagedCollisionModule(5)}, cfgs)
    mcc = ManagedCollisionCollection({"t": MCHManagedCollisionModule(5)}, cfgs)
    with pytest.raises(ValueError, match=r"table 't': feature_names \['b'\] here, \['a'\] in the managed"):
        ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection([EmbeddingBagConfig("t", 5, 4, ["b"])]), mcc)
    init = EmbeddingBagConfig("t", 5, 4, ["a"], weight_init=torch.nn.init.zeros_)
    with pytest.raises(ValueError, match="table 't': weight_init <function zeros_"):  # the fresh rows' init
        ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection([init]), mcc)
    with pytest.raises(TypeError, match="expects an fxrec EmbeddingBagCollection"):
        ManagedCollisionEmbeddingBagCollection(EmbeddingCollection([EmbeddingConfig("t", 5, 4, ["a"])]), mcc)


def test_int32_ids_are_checked_and_remapped_as_int64():
    wide, narrow = MCHManagedCollisionModule(4, name="t"), MCHManagedCollisionModule(4, name="t")
    ids = [3, 2 ** 31 - 1, 3]
    def int32(values):
        values = torch.tensor(values, dtype=torch.int32)
        return {"f": JaggedTensor(values, lengths=torch.tensor([values.numel()]))}
    got = narrow(int32(ids))["f"].values()
    assert got.dtype == torch.int32 and got.tolist() == wide(_jt(ids))["f"].values().tolist()
    with pytest.raises(ValueError, match="id -2 is outside"):
        narrow(int32([-2]))


def test_a_loaded_map_keeps_the_eviction_schedule_and_saving_mid_interval_warns():
    g = torch.Generator().manual_seed(3)
    stream = [torch.randint(0, 9, (6,), generator=g) * SPREAD for _ in range(6)]
    whole = MCHManagedCollisionModule(5, eviction_interval=2, name="t")
    for ids in stream[:4]:
        whole(_jt(ids))
    state = copy.deepcopy(whole.state_dict())  # after 4 calls: on an eviction boundary, no warning
    resumed = MCHManagedCollisionModule(5, eviction_interval=2, name="t")
    resumed.load_state_dict(state)
    for ids in stream[4:]:
        assert torch.equal(resumed(_jt(ids))["f"].values(), whole(_jt(ids))["f"].values())
    whole(_jt(stream[0]))
    with pytest.warns(UserWarning, match=r"table 't': saved 1 call\(s\) into an eviction interval of 2"):
        whole.state_dict()


# ------------------------------------------------------------------ the collections
CONFIGS = [EmbeddingBagConfig("t_user", 6, 8, ["user"]),
           EmbeddingBagConfig("t_item", 8, 8, ["item", "item2"], pooling="mean")]


def _mc_ebc(return_remapped: bool = False) -> ManagedCollisionEmbeddingBagCollection:
    mcc = ManagedCollisionCollection({"t_user": MCHManagedCollisionModule(6, eviction_policy=LFU_EvictionPolicy()),
                                      "t_item": MCHManagedCollisionModule(8)}, CONFIGS)
    return ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection(CONFIGS), mcc, return_remapped)


def _batch(g, b: int, keys=("user", "item", "item2"), distinct: int = 30) -> KeyedJaggedTensor:
    lengths = torch.randint(0, 4, (len(keys) * b,), generator=g)
    values = torch.randint(0, distinct, (int(lengths.sum()),), generator=g) * SPREAD
    return KeyedJaggedTensor(list(keys), values, lengths=lengths)


def test_the_collection_pools_the_remapped_ids_and_resets_evicted_rows():
    torch.manual_seed(0)
    m = _mc_ebc(return_remapped=True)
    ebc, mcc = m._embedding_module, m._managed_collision_collection
    g = torch.Generator().manual_seed(1)
    resets = 0
    for step in range(6):
        kjt = _batch(g, B)
        before = ebc.embedding_bags["t_item"].weight.detach().clone()
        shadow = copy.deepcopy(mcc)  # the map as it was, to learn which rows this call evicts
        remapped_want = shadow(kjt)
        rows = shadow.evict()["t_item"]
        out, remapped = m(kjt)
        assert torch.equal(remapped.values(), remapped_want.values())
        assert remapped.keys() == kjt.keys() and torch.equal(remapped.lengths(), kjt.lengths())
        assert_close(out.values(), ebc(remapped).values())  # the reset came before the lookup
        after = ebc.embedding_bags["t_item"].weight.detach()
        if rows is not None:
            resets += rows.numel()
            want = fresh_rows(CONFIGS[1], rows.numel(), step + 1)
            assert torch.equal(after[rows], want)
            assert not torch.equal(before[rows], want)
        kept = torch.ones(8, dtype=torch.bool)
        if rows is not None:
            kept[rows] = False
        assert torch.equal(after[kept], before[kept])
    assert resets > 0
    assert m(_batch(g, B))[1] is not None and _mc_ebc()(_batch(g, B))[1] is None


def test_the_sequence_collection_and_a_kjt_with_other_keys():
    torch.manual_seed(0)
    cfgs = [EmbeddingConfig("t", 5, 4, ["a"])]
    mcc = ManagedCollisionCollection({"t": MCHManagedCollisionModule(5)}, cfgs)
    m = ManagedCollisionEmbeddingCollection(EmbeddingCollection(cfgs), mcc, return_remapped_features=True)
    kjt = KeyedJaggedTensor(["z", "a"], torch.tensor([10**15, 7, 8, 7]), lengths=torch.tensor([1, 0, 3, 0]))
    out, remapped = m(kjt)
    assert remapped["z"].values().tolist() == [10**15]  # a key no table reads passes as it is
    a = remapped["a"].values()
    assert a[0] == a[2] and a[0] != a[1] and int(a.max()) < 4
    assert_close(out["a"].values(), m._embedding_module.embeddings["t"].weight[a])


def test_weight_init_serves_the_fresh_rows():
    cfg = EmbeddingBagConfig("t", 4, 3, ["a"], weight_init=lambda w: w.fill_(0.5))
    assert torch.equal(fresh_rows(cfg, 2, 1), torch.full((2, 3), 0.5))
    default = EmbeddingBagConfig("t", 4, 3, ["a"])
    assert torch.equal(fresh_rows(default, 2, 3), fresh_rows(default, 2, 3))
    assert not torch.equal(fresh_rows(default, 2, 3), fresh_rows(default, 2, 4))
    assert float(fresh_rows(default, 50, 1).abs().max()) <= 0.5


# ------------------------------------------------------------------ a model
class Ranker(nn.Module):
    def __init__(self):
        super().__init__()
        self.mc = _mc_ebc()
        self.other = EmbeddingBagCollection([EmbeddingBagConfig("t_x", 5, 8, ["x"])])
        self.top = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, kjt, x):
        pooled, _ = self.mc(kjt)
        return self.top(torch.cat([pooled.values(), self.other(x).values()], dim=1))


def _batches(world: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world):
        x = KeyedJaggedTensor(["x"], torch.randint(0, 5, (B,), generator=g), lengths=torch.ones(B, dtype=torch.long))
        out.append((_batch(g, B), x))
    return out


def _concat(batches):
    return _cat_kjt([k for k, _ in batches]), _cat_kjt([x for _, x in batches])


def _train(run, params, batches_per_step):
    """One torch SGD step on `params` per step's global batch, on the mean square of `run`'s output."""
    opt = torch.optim.SGD(params, lr=LR)
    for batches in batches_per_step:
        opt.zero_grad()
        run(*_concat(batches)).square().mean().backward()
        opt.step()


def _train_reference(ref, batches_per_step):
    _train(ref, ref.parameters(), batches_per_step)


def _mc_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if "_managed_collision_collection" in k}


def test_capture_keeps_the_collection_whole_and_changes_nothing():
    torch.manual_seed(0)
    model = Ranker()
    before = copy.deepcopy(_mc_state(model))
    gm = fxrec.capture(model, _batches(1, 0)[0], fallback=False)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "mc._managed_collision_collection"]
    assert len(calls) == 1
    for k, v in _mc_state(model).items():
        assert torch.equal(v, before[k]), k
    assert model.mc._managed_collision_collection._managed_collision_modules["t_item"]._history == []


def test_the_captured_graph_module_trains_like_eager():
    torch.manual_seed(0)
    model = Ranker()
    ref = copy.deepcopy(model)
    gm = fxrec.capture(model, _batches(1, 0)[0], fallback=False)
    steps = [_batches(1, 10 + s) for s in range(STEPS)] + [_evicting_batch(1, 30)]
    _train_reference(ref, steps)
    _train_reference(gm, steps)  # the GraphModule holds the model's own modules
    for k, v in ref.state_dict().items():
        assert_close(model.state_dict()[k], v, msg=k)


def test_compile_trains_like_eager_and_lower_serves_the_map():
    torch.manual_seed(0)
    model = Ranker()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec")
    steps = [_batches(1, 10 + s) for s in range(STEPS)]
    _train_reference(ref, steps)
    _train(compiled, model.parameters(), steps)
    for k, v in ref.state_dict().items():
        assert_close(model.state_dict()[k], v, msg=k)
    ref.eval()
    lowered = fxrec.lower_for_inference(ref, _batches(1, 0)[0], weight_dtype="fp32")
    with torch.no_grad():
        batch = _batches(1, 99)[0]
        assert_close(lowered(*batch), ref(*batch), rtol=1e-5, atol=1e-6)


def test_compile_with_a_fused_sparse_optimizer_resets_evicted_rows():
    torch.manual_seed(0)
    model = Ranker()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": SGD(LR)})
    steps = [_batches(1, 10 + s) for s in range(STEPS)] + [_evicting_batch(1, 30)]
    _train_reference(ref, steps)
    _train(compiled, [p for n, p in model.named_parameters() if "embedding_bags" not in n], steps)
    for k, v in ref.state_dict().items():
        assert_close(model.state_dict()[k], v, msg=k)


def test_compile_with_rowwise_adagrad_zeroes_the_evicted_rows_state_as_shard_does():
    torch.manual_seed(0)
    model = Ranker()
    sm = _shard(copy.deepcopy(model), 1, 0, "table_wise", RowWiseAdagrad(lr=LR))
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": RowWiseAdagrad(lr=LR)})
    steps = [_batches(1, 10 + s) for s in range(STEPS)] + [_evicting_batch(1, 30), _batches(1, 40)]
    _train(compiled, [p for n, p in model.named_parameters() if "embedding_bags" not in n], steps)
    _train(sm, sm.parameters(), steps)
    full = sm.full_state_dict()
    for k, v in model.state_dict().items():
        assert_close(v, full[k], msg=k)


# ------------------------------------------------------------------ sharded
TABLES = ["mc._embedding_module.embedding_bags.t_user", "mc._embedding_module.embedding_bags.t_item",
          "other.embedding_bags.t_x"]


def _shard(model, world, rank, sharding, optimizer=None):
    return fxrec.shard(model, Topology(world), _batches(world, 0)[rank], constraints={t: sharding for t in TABLES},
                       sparse_optimizer=optimizer or SGD(LR))


def _run(rank: int, world: int, sharding: str) -> list[str]:
    """Train the sharded model and the unsharded one (on the global batch) side by side; compare
    every output, then every table, dense parameter and map; evictions must have happened."""
    bad = Mismatches(sharding)
    torch.manual_seed(0)
    model = Ranker()
    ref = copy.deepcopy(model)
    sm = _shard(model, world, rank, sharding)
    ref_opt, opt = torch.optim.SGD(ref.parameters(), lr=LR), torch.optim.SGD(sm.parameters(), lr=LR)
    mine = slice(rank * B, (rank + 1) * B)
    evicted = 0
    mcs = ref.mc._managed_collision_collection._managed_collision_modules
    for step in range(STEPS):
        batches = _batches(world, 10 + step)
        ref_opt.zero_grad()
        held = _held(mcs)
        want = ref(*_concat(batches))
        evicted += sum(len(_held(mcs)[t] - held[t]) for t in held)  # ids that took a row this step
        want.square().mean().backward()
        ref_opt.step()
        opt.zero_grad()
        got = sm(*batches[rank])
        got.square().mean().backward()
        opt.step()
        bad.check(f"step {step} output", got, want[mine].detach())
    full = sm.full_state_dict()
    for key, value in ref.state_dict().items():
        bad.check(f"after {STEPS} steps, {key}", full[key], value)
    if evicted < 4:
        bad.append(f"{sharding}: only {evicted} ids took rows: the test does not exercise evictions")
    return list(bad)


def _held(mcs) -> dict[str, set]:
    return {t: set(mc._mch_sorted_raw_ids.tolist()) for t, mc in mcs.items()}


def _evicting_batch(world: int, seed: int) -> list[tuple]:
    """Batches whose ids are all new to a map that has seen `_batches(world, 10..)`: each evicts."""
    out = []
    for k, x in _batches(world, seed):
        out.append((KeyedJaggedTensor(k.keys(), k.values() + 7, lengths=k.lengths()), x))
    return out


def _run_state(rank: int, world: int, sharding: str) -> list[str]:
    """RowWiseAdagrad: after a forward that evicts, the evicted rows this rank holds are the fresh
    rows and their optimizer state is zero; the MC buffers are not broadcast by BufferSync."""
    bad = []
    torch.manual_seed(0)
    sm = _shard(Ranker(), world, rank, sharding, RowWiseAdagrad(lr=LR))
    for step in range(2):
        batches = _batches(world, 10 + step)
        sm(*batches[rank]).square().mean().backward()
    mcc = sm.module.get_submodule("mc._managed_collision_collection")
    shadow = copy.deepcopy(mcc)
    batches = _evicting_batch(world, 50)
    shadow.profile_tables(shadow.table_ids(shadow.prepare(_concat(batches)[0])[0]))
    rows = shadow.evict()["t_item"]
    if rows is None or not rows.numel():
        return [f"{sharding}: the evicting batch evicted nothing"]
    out = sm(*batches[rank])  # no backward: the state is as the eviction left it
    fresh = fresh_rows(CONFIGS[1], rows.numel(), shadow._managed_collision_modules["t_item"].current_iter())
    table = "mc._embedding_module.embedding_bags.t_item"
    pieces = zip(sm.local_shards().get(table, []), sm.local_optimizer_state().get(table, []))
    for (r, c, view), (_, _, state) in pieces:
        for k, row in enumerate(rows.tolist()):
            if r[0] <= row < r[1]:
                if not torch.equal(view[row - r[0]], fresh[k, c[0]:c[1]]):
                    bad.append(f"{sharding}: row {row} is not the fresh row")
                for name, value in state.items():
                    if bool(value[row - r[0]].ne(0).any()):
                        bad.append(f"{sharding}: {name} of row {row} is not zero after its eviction")
        if not state:
            bad.append(f"{sharding}: RowWiseAdagrad has no state")
    if sm.buffer_sync is not None and any("managed" in type(m).__module__ for m, _ in sm.buffer_sync.owners):
        bad.append(f"{sharding}: BufferSync broadcasts the maps")
    del out
    return bad


def _bad_id_on_one_rank(rank: int, world: int, sharding: str) -> list[str]:
    """Rank 1's batch holds an id outside t_user's input range: every rank raises it, no map
    profiles the batch, and the next batch trains. ``sharding="dense"``: t_user stays a dense
    parameter (no lookup input check of its own)."""
    torch.manual_seed(0)
    if sharding == "dense":
        sm = fxrec.shard(Penalised(), Topology(world), _batches(world, 0)[rank], sparse_optimizer=SGD(LR))
    else:
        sm = _shard(Ranker(), world, rank, sharding)
    mcc = sm.module.get_submodule("mc._managed_collision_collection")
    mcc._managed_collision_modules["t_user"]._input_hash_size = 10 ** 9
    state = copy.deepcopy(mcc.state_dict())
    kjt, x = _batches(world, 10)[rank]
    if rank == 1:
        kjt = KeyedJaggedTensor(["user", "item", "item2"], torch.tensor([5, 10 ** 9 + 1, 3]),
                                lengths=torch.tensor([0] * (B - 1) + [2] + [1] + [0] * (2 * B - 1)))
    bad = []
    for mode in ("train", "eval"):
        getattr(sm, mode)()
        try:
            sm(kjt, x)
            bad.append(f"{sharding} {mode}: rank {rank} raised nothing")
        except ValueError as e:
            want = (rf"rank 1's batch: table 't_user', feature 'user': id {10 ** 9 + 1} is outside "
                    rf"\[0, {10 ** 9}\) \(input_hash_size\)")
            if not re.search(want, str(e)):
                bad.append(f"{sharding} {mode}: rank {rank} raised {e}")
    for k, v in mcc.state_dict().items():
        if not torch.equal(v, state[k]):
            bad.append(f"{sharding}: the faulty batch changed {k}")
    sm.train()
    sm(*_batches(world, 11)[rank]).sum().backward()
    return bad


def _run_pipeline(rank: int, world: int, sharding: str) -> list[str]:
    """TrainPipeline against step-by-step training: the map runs in step on the main stage."""
    torch.manual_seed(0)
    model = Ranker()
    piped, plain = _shard(copy.deepcopy(model), world, rank, sharding), _shard(copy.deepcopy(model), world, rank,
                                                                              sharding)
    batches = [_batches(world, 10 + s)[rank] for s in range(STEPS)]
    return pipeline_like_steps(piped, plain, batches, lambda out: out.square().mean(), LR)


def _job(rank: int, world: int, what: str, sharding: str) -> list[str]:
    run = {"train": _run, "state": _run_state, "bad_id": _bad_id_on_one_rank, "pipeline": _run_pipeline}[what]
    return run(rank, world, sharding)


_JOBS = ([("train", s) for s in SHARDINGS] + [("state", "row_wise"), ("state", "column_wise"),
                                               ("state", "data_parallel"), ("bad_id", "table_wise"),
                                               ("bad_id", "data_parallel"), ("bad_id", "dense"),
                                               ("pipeline", "row_wise")])


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_one_rank_shard_trains_like_the_unsharded_model(sharding):
    assert _run(0, 1, sharding) == []


class Penalised(Ranker):
    """Reads t_user's weight outside its lookups: the table stays a dense parameter."""

    def forward(self, kjt, x):
        return super().forward(kjt, x) + self.mc._embedding_module.embedding_bags["t_user"].weight.square().sum()


def test_a_managed_table_left_dense_is_reset_too():
    torch.manual_seed(0)
    model = Penalised()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="t_user"):
        sm = fxrec.shard(model, Topology(1), _batches(1, 0)[0], sparse_optimizer=SGD(LR))
    steps = [_batches(1, 10 + s) for s in range(STEPS)] + [_evicting_batch(1, 30)]
    _train_reference(ref, steps)
    _train(sm, sm.parameters(), steps)
    full = sm.full_state_dict()
    for key, value in ref.state_dict().items():
        assert_close(full[key], value, msg=key)


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return merge_failures(run_workers(run_jobs, 2, _job, _JOBS, timeout=300))


@pytest.mark.parametrize("job", _JOBS, ids=[f"{w}-{s}" for w, s in _JOBS])
def test_two_gloo_ranks_train_like_the_unsharded_model(two_ranks, job):
    assert job in two_ranks, f"job not run (an earlier job on some rank failed): {sorted(two_ranks)[-1:]}"
    assert two_ranks[job] == [], "\n".join(two_ranks[job])


def test_the_sharded_state_dict_holds_the_maps_and_loads_them():
    torch.manual_seed(0)
    sm = _shard(Ranker(), 1, 0, "table_wise")
    calls = [n.target for n in sm.module.graph.nodes if n.op == "call_module" and "mc" in str(n.target)]
    assert calls == ["fxrec_mc_0"]  # route_collisions: the collection's call goes through ShardedCollisions
    assert sm.module.fxrec_mc_0.mcc is sm.module.get_submodule("mc._managed_collision_collection")
    for step in range(2):
        sm(*_batches(1, 10 + step)[0]).sum().backward()
    state = sm.state_dict()
    key = "mc._managed_collision_collection._managed_collision_modules.t_item._mch_sorted_raw_ids"
    assert key in state and int((state[key] != torch.iinfo(torch.int64).max).sum()) > 0
    torch.manual_seed(0)
    other = _shard(Ranker(), 1, 0, "table_wise")
    other.load_state_dict(state)
    other.eval(), sm.eval()
    batch = _batches(1, 10)[0]
    with torch.no_grad():
        assert_close(other(*batch), sm(*batch))


def test_a_copy_of_the_sharded_model_evicts_into_its_own_tables():
    torch.manual_seed(0)
    sm = _shard(Ranker(), 1, 0, "row_wise")
    sm(*_batches(1, 10)[0]).sum().backward()
    twin = copy.deepcopy(sm)
    before = sm.full_state_dict()
    for step in range(3):
        twin(*_evicting_batch(1, 20 + step)[0]).sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in sm.full_state_dict().items())
    changed = {k for k, v in twin.full_state_dict().items() if not torch.equal(v, before[k])}
    assert "mc._embedding_module.embedding_bags.t_item.weight" in changed
    assert "mc._managed_collision_collection._managed_collision_modules.t_item._mch_sorted_raw_ids" in changed
