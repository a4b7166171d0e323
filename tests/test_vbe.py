"""A batch per feature (TorchRec's variable batch embeddings, VBE): a KeyedJaggedTensor whose keys
hold bags for their own number of samples (``stride_per_key_per_rank``) and ``inverse_indices``
giving each sample of the batch its bag. The EmbeddingBagCollection's output equals that of the
expanded batch (every sample with its own bags) on every path: eager, torch.compile,
lower_for_inference, and shard on 1 and 2 gloo ranks, trained 3 steps."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fxrec
from dist_harness import merge_failures, run_jobs, run_workers
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from fxrec.optim import SGD
from fxrec.sparse import KeyedJaggedTensor
from fxrec.topology import Topology
from shard_models import Mismatches, _cat_kjt

B, STEPS, LR = 6, 3, 0.1
ROWS = {"user": 20, "item": 30, "ctx": 12}
UNIQUE = {"user": 2, "item": B, "ctx": 3}  # bags per key: a few users' features serve the whole batch
SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"]
TABLES = ["ebc.embedding_bags.t_user", "ebc.embedding_bags.t_item", "ebc.embedding_bags.t_ctx"]


class Ranker(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_user", 20, 8, ["user"]),
                                           EmbeddingBagConfig("t_item", 30, 8, ["item"], pooling="mean"),
                                           EmbeddingBagConfig("t_ctx", 12, 8, ["ctx"])])
        self.lin = nn.Linear(24, 1)

    def forward(self, kjt):
        pooled = self.ebc(kjt)
        return self.lin(pooled.values()), pooled.values()


def _batch(g, weighted: bool = False) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """(the VBE batch, the same batch expanded: each sample with its own copy of its bags)."""
    keys = list(ROWS)
    bags = {k: [torch.randint(0, ROWS[k], (int(n),), generator=g)
                for n in torch.randint(0, 4, (UNIQUE[k],), generator=g)] for k in keys}
    inverse = torch.stack([torch.randint(0, UNIQUE[k], (B,), generator=g) if UNIQUE[k] < B else torch.arange(B)
                           for k in keys])
    values = torch.cat([t for k in keys for t in bags[k]])
    w = torch.rand(values.numel(), generator=g) if weighted else None
    vbe = KeyedJaggedTensor(keys, values, weights=w, lengths=torch.tensor([t.numel() for k in keys for t in bags[k]]),
                            stride_per_key_per_rank=[[UNIQUE[k]] for k in keys], inverse_indices=(keys, inverse))
    ev, el, ew, start = [], [], [], 0
    for j, k in enumerate(keys):
        starts = [start]
        for t in bags[k]:
            starts.append(starts[-1] + t.numel())
        start = starts[-1]
        for b in inverse[j].tolist():
            ev.append(bags[k][b])
            el.append(bags[k][b].numel())
            if w is not None:
                ew.append(w[starts[b]:starts[b + 1]])
    expanded = KeyedJaggedTensor(keys, torch.cat(ev), weights=torch.cat(ew) if w is not None else None,
                                 lengths=torch.tensor(el))
    return vbe, expanded


def _batches(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [_batch(g) for _ in range(world)]


# ------------------------------------------------------------------ the sparse type and the module
def test_vbe_kjt_reads_each_keys_own_bags():
    vbe, _ = _batch(torch.Generator().manual_seed(0))
    assert vbe.variable_stride_per_key() and vbe.stride() == B
    assert vbe.stride_per_key() == [2, B, 3] and vbe.stride_per_key_per_rank() == [[2], [B], [3]]
    assert [vbe[k].lengths().numel() for k in ROWS] == [2, B, 3]
    assert sum(vbe.length_per_key()) == vbe.values().numel()
    permuted = vbe.permute([2, 0])
    assert permuted.keys() == ["ctx", "user"] and permuted.stride_per_key() == [3, 2]
    assert torch.equal(permuted["user"].values(), vbe["user"].values())
    first, rest = vbe.split([1, 2])
    assert rest.stride_per_key() == [B, 3] and torch.equal(rest["ctx"].lengths(), vbe["ctx"].lengths())
    both = KeyedJaggedTensor.concat([first, rest])
    assert both.stride_per_key() == vbe.stride_per_key() and torch.equal(both.lengths(), vbe.lengths())
    import torch.utils._pytree as pytree
    back = pytree.tree_unflatten(*pytree.tree_flatten(vbe))
    assert back.stride_per_key() == vbe.stride_per_key() and torch.equal(back.inverse_indices()[1],
                                                                         vbe.inverse_indices()[1])


@pytest.mark.parametrize("weighted", [False, True])
def test_collection_output_equals_the_expanded_batchs(weighted):
    torch.manual_seed(0)
    model = Ranker()
    vbe, expanded = _batch(torch.Generator().manual_seed(1), weighted=weighted)
    for got, want in zip(model(vbe), model(expanded)):
        assert_close(got, want)
    ec = EmbeddingCollection([EmbeddingConfig("t", 30, 4, ["user", "item"])])
    rows = ec(vbe)  # unpooled: each key's rows with its own bags, as TorchRec's
    assert torch.equal(rows["user"].lengths(), vbe["user"].lengths())


BAD = [
    (lambda: KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 1, 1]),
                               stride_per_key_per_rank=[[2], [2]]),
     r"stride_per_key_per_rank gives 4 bags \({'a': 2, 'b': 2}\) but lengths holds 3"),
    (lambda: KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 1, 2]),
                               stride_per_key_per_rank=[[1], [2]]),
     r"lengths sum to 4 but values has 3 entries; key 'b''s bags cover values\[1:4\], past the end"),
    (lambda: KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 1, 1]),
                               stride_per_key_per_rank=[[1]]), r"one list of ints per key \(2 keys\)"),
    (lambda: KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 1, 1]),
                               stride_per_key_per_rank=[[1], [2]],
                               inverse_indices=(["a", "b"], torch.tensor([[0, 1], [0, 1]]))),
     r"inverse_indices of key 'a' holds 1, outside its 1 bags"),
    (lambda: KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 1, 1]),
                               stride_per_key_per_rank=[[1], [2]], inverse_indices=(["a"], torch.tensor([[0, 0]]))),
     r"inverse_indices has no row for key 'b'"),
    (lambda: Ranker()(KeyedJaggedTensor(list(ROWS), torch.arange(4), lengths=torch.tensor([1, 1, 1, 1]),
                                         stride_per_key_per_rank=[[1], [2], [1]])),
     r"has a batch per key .* but no inverse_indices"),
]


@pytest.mark.parametrize("call, match", BAD, ids=range(len(BAD)))
def test_bad_batches_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_sharded_read_expands_only_keys_whose_inverse_row_is_not_the_identity():
    from fxrec.passes.shard_ops import NodeSpec, SlotSpec, _kjt_slot
    vbe = _batch(torch.Generator().manual_seed(7))[0]
    node = NodeSpec("ebc", "ebc", (0,))
    read = {k: _kjt_slot(node, SlotSpec("ebc", f"t_{k}", k, "sum", True, n, 8, False), vbe) for k, n in ROWS.items()}
    assert read["item"].inverse is None  # each sample its own bag: no expansion (nor its backward)
    assert torch.equal(read["user"].inverse, vbe.inverse_row("user"))
    assert torch.equal(read["ctx"].inverse, vbe.inverse_row("ctx"))


def test_torch_export_takes_a_vbe_batch():
    torch.manual_seed(0)
    ebc = Ranker().ebc
    vbe = _batch(torch.Generator().manual_seed(6))[0]
    exported = torch.export.export(ebc, (vbe,))
    assert_close(exported.module()(vbe).values(), ebc(vbe).values())


def test_compile_and_lower_give_the_eager_values():
    torch.manual_seed(0)
    model = Ranker().eval()
    example, batch = _batch(torch.Generator().manual_seed(2))[0], _batch(torch.Generator().manual_seed(3))[0]
    with torch.no_grad():
        want = model(batch)
        compiled = torch.compile(copy.deepcopy(model), backend="fxrec")(batch)
        lowered = fxrec.lower_for_inference(copy.deepcopy(model), (example,), weight_dtype="fp32")(batch)
    for got in (compiled, lowered):
        for g, w in zip(got, want):
            assert_close(g, w, rtol=1e-5, atol=1e-6)


class BuildsItsBatch(nn.Module):
    """Builds the VBE KJT inside forward from plain tensors (the strides are constants)."""

    def __init__(self):
        super().__init__()
        self.ranker = Ranker()

    def forward(self, values, lengths, inverse):
        kjt = KeyedJaggedTensor(list(ROWS), values, lengths=lengths,
                                stride_per_key_per_rank=[[UNIQUE[k]] for k in ROWS], inverse_indices=(list(ROWS), inverse))
        return self.ranker(kjt)


def test_a_vbe_batch_built_in_forward_is_captured_and_sharded():
    torch.manual_seed(0)
    model = BuildsItsBatch()
    vbe = _batch(torch.Generator().manual_seed(4))[0]
    args = (vbe.values(), vbe.lengths(), vbe.inverse_indices()[1])
    gm = fxrec.capture(model, args)
    assert any(n.op == "call_module" and "ebc" in str(n.target) for n in gm.graph.nodes)  # fx, not export
    sm = fxrec.shard(copy.deepcopy(model), Topology(1), args, sparse_optimizer=SGD(LR))
    other = _batch(torch.Generator().manual_seed(5))[0]
    args = (other.values(), other.lengths(), other.inverse_indices()[1])
    with torch.no_grad():
        for g, w in zip(sm(*args), model(*args)):
            assert_close(g, w)


def test_compiled_training_with_a_sparse_optimizer_equals_the_expanded_batchs():
    torch.manual_seed(0)
    model = Ranker()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrec", options={"sparse_optimizer": SGD(LR)})
    opt, ref_opt = torch.optim.SGD(model.lin.parameters(), lr=LR), torch.optim.SGD(ref.parameters(), lr=LR)
    for step in range(STEPS):
        vbe, expanded = _batch(torch.Generator().manual_seed(10 + step))
        opt.zero_grad()
        sum(o.square().mean() for o in compiled(vbe)).backward()
        opt.step()
        ref_opt.zero_grad()
        sum(o.square().mean() for o in ref(expanded)).backward()
        ref_opt.step()
    for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values()):
        assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------ sharded
def _run(rank: int, world: int, sharding: str) -> list[str]:
    """Each rank feeds its VBE batch; the unsharded model takes every rank's expanded batch."""
    bad = Mismatches(sharding)
    check = bad.check

    torch.manual_seed(0)
    model = Ranker()
    ref = copy.deepcopy(model)
    tables = [p for n, p in ref.named_parameters() if ".embedding_bags." in n]
    batches = _batches(world, seed=1)
    sm = fxrec.shard(model, Topology(world), (batches[rank][0],), constraints={t: sharding for t in TABLES},
                     sparse_optimizer=SGD(LR))
    mine = slice(rank * B, (rank + 1) * B)
    with torch.no_grad():
        for i, (got, want) in enumerate(zip(sm(batches[rank][0]), ref(_cat_kjt([e for _, e in batches])))):
            check(f"output {i}", got, want[mine])
    opt = torch.optim.SGD(sm.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.lin.parameters(), lr=LR)
    for step in range(STEPS):
        batches = _batches(world, seed=10 + step)
        opt.zero_grad()
        sum(o.square().mean() for o in sm(batches[rank][0])).backward()
        opt.step()
        ref.zero_grad()
        sum(o.square().mean() for o in ref(_cat_kjt([e for _, e in batches]))).backward()
        ref_opt.step()
        with torch.no_grad():
            for p in tables:
                if p.grad is not None:
                    p -= LR * p.grad
    full = sm.full_state_dict()
    for key, want in ref.state_dict().items():
        check(f"after {STEPS} steps, {key}", full[key], want)
    return bad


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_one_rank_shard_trains_like_the_expanded_batch(sharding):
    assert _run(0, 1, sharding) == []


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return merge_failures(run_workers(run_jobs, 2, _run, [(s,) for s in SHARDINGS], timeout=300))


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_gloo_ranks_train_like_the_expanded_batch(two_ranks, sharding):
    job = (sharding,)
    assert job in two_ranks, f"job not run (an earlier job on some rank failed): {sorted(two_ranks)[-1:]}"
    assert two_ranks[job] == [], "\n".join(two_ranks[job])


def _bad_batch(rank: int, world: int, what: str) -> str:
    """Rank 1's batch, built unchecked, maps a sample to a bag its user feature does not have,
    or holds fewer bags than its strides say; every rank's error."""
    torch.manual_seed(0)
    batches = _batches(world, seed=1)
    sm = fxrec.shard(Ranker(), Topology(world), (batches[rank][0],), sparse_optimizer=SGD(LR))
    kjt = batches[rank][0]
    if rank == 1:
        keys, inv = kjt.inverse_indices()
        inv, lengths, sprk = inv.clone(), kjt.lengths(), kjt.stride_per_key_per_rank()
        if what == "inverse":
            inv[0, 3] = UNIQUE["user"]
        elif what == "bags":
            sprk[0] = [UNIQUE["user"] + 1]
        else:  # a fixed batch whose lengths are not keys x stride
            _, kjt = _batch(torch.Generator().manual_seed(9))
            kjt = KeyedJaggedTensor(kjt.keys(), kjt.values(),
                                    lengths=torch.cat([kjt.lengths(), torch.zeros(1, dtype=torch.long)]), validate=False)
        if what != "fixed":
            kjt = KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=lengths, stride_per_key_per_rank=sprk,
                                    inverse_indices=(keys, inv), validate=False)
    try:
        sm(kjt)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("what, message", [
    ("inverse", r"'user'.*inverse_indices give a sample bag 2, which the feature does not have"),
    ("bags", rf"holds {sum(UNIQUE.values())} bags, not the number its keys' batch sizes"),
    ("fixed", rf"holds {3 * B + 1} bags, not the number its keys' batch sizes")])
def test_one_ranks_unchecked_bad_batch_raises_on_every_rank(what, message):
    for got in run_workers(_bad_batch, 2, what, timeout=120):
        assert re.search("rank 1.*" + message, got), got
