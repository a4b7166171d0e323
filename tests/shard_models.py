"""Small models for the sharding equivalence tests, each with local batches that concatenate
into the global batch the unsharded reference sees.

`CASES[name]`: ``build()`` (call under a fixed seed), ``draw(g, b)`` one rank's local batch of
b samples, ``concat(batches)`` the global batch (rank 0's samples first). Tables are tiny
(8-50 rows, dim 4-8) so that a spawn stays fast.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fxrec
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.sparse import KeyedJaggedTensor
from models_zoo import DLRMEBC, DLRMLists, SequenceEC, TwoTower, _bags, _mlp


def train_side_by_side(sharded, reference: nn.Module, batches, lr: float = 0.1) -> None:
    """One step per batch, on the mean square of each model's output: torch SGD on the
    sharded model's dense parameters (its tables train by its own sparse optimizer) and on
    every parameter of the unsharded `reference`."""
    optimizers = [torch.optim.SGD(sharded.parameters(), lr=lr), torch.optim.SGD(reference.parameters(), lr=lr)]
    for batch in batches:
        for run, opt in zip((sharded, reference), optimizers):
            opt.zero_grad()
            run(*batch).square().mean().backward()
            opt.step()


def train_checked(check, sm, ref, ref_tables: dict, first: list, steps: list[list], concat, loss, rank: int,
                  batch: int, lr: float, sparse_update) -> dict:
    """Compare the sharded model `sm` (fed rank `rank`'s batch of `batch` samples) with the
    unsharded `ref` (fed the global batch, `concat` of every rank's): the outputs on `first`,
    then, after one step per entry of `steps` (torch SGD at `lr` on the dense parameters of
    both, on ``loss(outputs)``; `sparse_update(ref_tables)` on the reference's tables, under
    no_grad, where `sm`'s fused optimizer trains its own), every entry of the state_dict.
    Mismatches go to ``check(what, got, want)`` (`Mismatches.check`). Returns `sm`'s
    full_state_dict."""
    mine = slice(rank * batch, (rank + 1) * batch)
    with torch.no_grad():
        for i, (got, want) in enumerate(zip(sm(*first[rank]), ref(*concat(first)))):
            check(f"output {i}", got, want[mine])
    dense_opt = torch.optim.SGD(sm.parameters(), lr=lr)
    ref_opt = torch.optim.SGD([p for n, p in ref.named_parameters() if n not in ref_tables], lr=lr)
    for batches in steps:
        dense_opt.zero_grad()
        loss(sm(*batches[rank])).backward()
        dense_opt.step()
        ref.zero_grad()
        loss(ref(*concat(batches))).backward()
        ref_opt.step()
        with torch.no_grad():
            sparse_update(ref_tables)
    full = sm.full_state_dict()
    for key, want in ref.state_dict().items():
        check(f"after {len(steps)} steps, {key}", full[key], want)
    return full


def pipeline_like_steps(piped, plain, batches: list, loss, lr: float) -> list[str]:
    """Train `piped` by TrainPipeline and `plain` (a ShardedModel built alike) step by step on
    `batches` (torch SGD at `lr` on the dense parameters, ``loss(output)``); the failures: losses
    or any state entry that differ."""
    from fxrec.runtime.pipeline import TrainPipeline

    pipe = TrainPipeline(piped, torch.optim.SGD(piped.parameters(), lr=lr), lambda out, _: loss(out))
    it = iter(batches)
    got = [pipe.progress(it)[0].item() for _ in batches]
    pipe.close()
    opt = torch.optim.SGD(plain.parameters(), lr=lr)
    want = []
    for batch in batches:
        opt.zero_grad()
        value = loss(plain(*batch))
        value.backward()
        opt.step()
        want.append(value.item())
    bad = [f"pipeline losses {got} != step by step {want}"] if got != want else []
    plain_state = plain.full_state_dict()
    for key, value in piped.full_state_dict().items():
        if not torch.equal(value, plain_state[key]):
            bad.append(f"pipeline: {key} differs from step-by-step training")
    return bad


def assert_state_like(sharded, reference: nn.Module) -> None:
    """Every entry of the unsharded `reference`'s state_dict equals the sharded model's."""
    full = sharded.full_state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, msg=key)


def _cat_bags(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, offsets) of several local batches of bags as one batch."""
    ids, offsets, base = [], [], 0
    for i, o in pairs:
        ids.append(i)
        offsets.append(o + base)
        base += i.numel()
    return torch.cat(ids), torch.cat(offsets)


class Mismatches(list):
    """assert_close failures, one line each, prefixed with `label`: what a job on several ranks
    returns instead of raising at the first, so that every mismatch of every rank is seen."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def check(self, what: str, got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as e:
            self.append(f"{self.label} {what}: {str(e).strip().splitlines()[-1]}")


def _kjt(g, rows: dict, b: int, weighted: bool = False, max_len: int = 3) -> KeyedJaggedTensor:
    lengths = torch.randint(0, max_len + 1, (len(rows) * b,), generator=g)
    per_key = lengths.view(len(rows), b).sum(1).tolist()
    values = torch.cat([torch.randint(0, n, (k,), generator=g) for n, k in zip(rows.values(), per_key)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(list(rows), values, lengths=lengths, weights=weights)


def _cat_kjt(kjts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    keys = kjts[0].keys()
    weighted = kjts[0].weights_or_none() is not None
    values, lengths, weights = [], [], []
    for key in keys:
        for kjt in kjts:
            jt = kjt[key]
            values.append(jt.values())
            lengths.append(jt.lengths())
            if weighted:
                weights.append(jt.weights())
    return KeyedJaggedTensor(keys, torch.cat(values), lengths=torch.cat(lengths),
                             weights=torch.cat(weights) if weighted else None)


# ------------------------------------------------------------------ models
def dlrm_lists() -> nn.Module:
    return DLRMLists(m_spa=8, ln_emb=(12, 24, 40), ln_bot=(4, 8, 8), ln_top=(14, 8, 1))


def _dlrm_lists_draw(g, b):
    pairs = [_bags(g, n, b) for n in (12, 24, 40)]
    return torch.randn(b, 4, generator=g), [o for _, o in pairs], [i for i, _ in pairs]


def _dlrm_lists_cat(batches):
    dense = torch.cat([x[0] for x in batches])
    cat = [_cat_bags([(x[2][t], x[1][t]) for x in batches]) for t in range(3)]
    return dense, [o for _, o in cat], [i for i, _ in cat]


def _dlrm_ebc_draw(g, b):
    return torch.randn(b, 4, generator=g), _kjt(g, {"user": 20, "item": 50, "last_item": 50, "cat": 10}, b)


def _cat_dense_kjt(batches):
    return torch.cat([x[0] for x in batches]), _cat_kjt([x[1] for x in batches])


def _two_tower_draw(g, b):
    return (torch.randint(0, 20, (b,), generator=g), torch.randint(0, 50, (b, 5), generator=g),
            torch.randint(0, 50, (b,), generator=g))


def _cat_tensors(batches):
    return tuple(torch.cat(parts) for parts in zip(*batches))


class Sequence(nn.Module):
    """Unpooled nn.Embedding: per-token vectors (padding_idx 0) plus position vectors, and a
    summed nn.Embedding over the tokens' tags (padding_idx 3). Both padded tables are
    re-initialised, so their padding rows are not zero: the padding positions must read
    them and leave them untrained."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(40, 8, padding_idx=0)
        self.pos = nn.Embedding(6, 8)
        self.tag = nn.Embedding(20, 8, padding_idx=3)
        nn.init.normal_(self.tok.weight, std=0.3)
        nn.init.normal_(self.tag.weight, std=0.3)
        self.out = nn.Linear(8, 1)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = torch.relu(self.tok(tokens) + self.pos(positions) + self.tag(tokens % 20).sum(1, keepdim=True))
        return self.out(h).squeeze(-1)


def _sequence_draw(g, b):
    return (torch.randint(0, 40, (b, 5), generator=g),)


class WeightedMean(nn.Module):
    """Per-sample weights on a sum bag, 2-D ids on a mean bag, and a mean EBC table."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 4, mode="sum")
        self.fixed = nn.EmbeddingBag(16, 4, mode="mean")
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig("t_a", 24, 4, ["a"], pooling="mean"),
                                           EmbeddingBagConfig("t_b", 8, 4, ["b"])])
        self.top = _mlp([16, 8, 1])

    def forward(self, ids, offsets, weights, fixed, kjt):
        x = torch.cat([self.bag(ids, offsets, per_sample_weights=weights), self.fixed(fixed),
                       self.ebc(kjt).values()], dim=1)
        return self.top(x)


def _weighted_draw(g, b):
    ids, offsets = _bags(g, 30, b)
    return (ids, offsets, torch.rand(ids.numel(), generator=g), torch.randint(0, 16, (b, 3), generator=g),
            _kjt(g, {"a": 24, "b": 8}, b))


def _weighted_cat(batches):
    ids, offsets = _cat_bags([(x[0], x[1]) for x in batches])
    return (ids, offsets, torch.cat([x[2] for x in batches]), torch.cat([x[3] for x in batches]),
            _cat_kjt([x[4] for x in batches]))


def _sequence_ec_draw(g, b):
    return (_kjt(g, {"hist": 30, "clicks": 30, "query": 15}, b),)


def _sequence_ec_cat(batches):
    return (_cat_kjt([x[0] for x in batches]),)


class UnevenBags(nn.Module):
    """Tables looked up with different bag counts per sample: one bag each of `one` and
    `one_b`, two of `two` and `two_b`, three of `three` (2-D ids of ``k * b`` rows, the
    pooled rows then viewed per sample). A rank holding several of them sends pooled routes
    of unequal bag counts, which dist_output.py lays out route by route instead of row-major."""

    def __init__(self):
        super().__init__()
        self.one = nn.EmbeddingBag(20, 8, mode="sum")
        self.one_b = nn.EmbeddingBag(16, 8, mode="mean")
        self.two = nn.EmbeddingBag(30, 8, mode="sum")
        self.two_b = nn.EmbeddingBag(24, 8, mode="sum")
        self.three = nn.EmbeddingBag(12, 8, mode="mean")
        # a sigmoid last: behind a final ReLU, a sample with a negative output sends no gradient,
        # and the reference's lazy Adam (rows with a nonzero gradient) would skip rows that
        # fxrec's (rows the batch touched, as FBGEMM and torch's SparseAdam) updates
        self.top = _mlp([8 * 9, 8, 1], last_sigmoid=True)

    def forward(self, x1, x1b, x2, x2b, x3):
        b = x1.shape[0]
        parts = [self.one(x1), self.one_b(x1b), self.two(x2).view(b, -1), self.two_b(x2b).view(b, -1),
                 self.three(x3).view(b, -1)]
        return self.top(torch.cat(parts, 1))


def _uneven_draw(g, b):
    return (torch.randint(0, 20, (b, 3), generator=g), torch.randint(0, 16, (b, 2), generator=g),
            torch.randint(0, 30, (2 * b, 3), generator=g), torch.randint(0, 24, (2 * b, 1), generator=g),
            torch.randint(0, 12, (3 * b, 2), generator=g))


class OddTables(nn.Module):
    """Tables that are not plain trained lookups, beside two that are (user, hist):
    - item: also scored against whole, so its weight is read outside lookups: it stays a
      dense parameter, trained like DDP's;
    - tags: max-pooled, which no kernel does: dense too;
    - pre: pretrained and frozen, and codes: a buffer read by F.embedding_bag: both sharded
      and never trained;
    - negs: looked up only inside torch.no_grad() (negatives), in a @torch.no_grad() method:
      sharded and frozen, as the model never trains it; `frozen`, a Linear applied in the
      same block, gets no gradient either."""

    def __init__(self):
        super().__init__()
        self.user = nn.Embedding(20, 8)
        self.negs = nn.Embedding(30, 8)
        self.frozen = nn.Linear(8, 8)
        self.hist = nn.EmbeddingBag(40, 8, mode="mean")
        self.item = nn.Embedding(30, 8)
        self.tags = nn.EmbeddingBag(25, 8, mode="max")
        self.pre = nn.EmbeddingBag.from_pretrained(torch.randn(35, 8), mode="sum")
        self.register_buffer("codes", torch.randn(45, 8))
        self.proj = nn.Linear(16, 8)

    def forward(self, user, hist, item, tags):
        u = self.proj(torch.cat([self.user(user), self.hist(hist)], 1)) + self.tags(tags)
        u = u * self.pre(tags).sigmoid() + torch.nn.functional.embedding_bag(hist, self.codes, mode="mean")
        scores = u @ self.item.weight.t()
        n, f = self._negatives(item, u)
        return torch.cat([scores, (u * self.item(item)).sum(1, keepdim=True), (u * (n + f)).sum(1, keepdim=True)], 1)

    @torch.no_grad()
    def _negatives(self, item, u):
        return self.negs((item + 1) % 30), self.frozen(u)


def _odd_tables_draw(g, b):
    return (torch.randint(0, 20, (b,), generator=g), torch.randint(0, 40, (b, 4), generator=g),
            torch.randint(0, 30, (b,), generator=g), torch.randint(0, 25, (b, 3), generator=g))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    draw: Callable[[torch.Generator, int], tuple]
    concat: Callable[[list], tuple]

    def local_batches(self, world: int, b: int, seed: int) -> list[tuple]:
        g = torch.Generator().manual_seed(seed)
        return [self.draw(g, b) for _ in range(world)]

    def setup(self, world: int, b: int, seed: int) -> tuple:
        """(the model built from seed 0, a copy of it to train unsharded, `world` local
        batches of b samples drawn from `seed`, the model's tables): what every rank of a
        sharded test builds alike."""
        torch.manual_seed(0)
        model = self.build()
        batches = self.local_batches(world, b, seed=seed)
        return model, copy.deepcopy(model), batches, fxrec.find_tables(model, batches[0])


CASES = {c.name: c for c in [
    Case("dlrm_lists", dlrm_lists, _dlrm_lists_draw, _dlrm_lists_cat),
    Case("dlrm_ebc", DLRMEBC, _dlrm_ebc_draw, _cat_dense_kjt),
    Case("two_tower", TwoTower, _two_tower_draw, _cat_tensors),
    Case("sequence", Sequence, _sequence_draw, _cat_tensors),
    Case("weighted_mean", WeightedMean, _weighted_draw, _weighted_cat),
    Case("sequence_ec", SequenceEC, _sequence_ec_draw, _sequence_ec_cat),
    Case("uneven_bags", UnevenBags, _uneven_draw, _cat_tensors),
    Case("odd_tables", OddTables, _odd_tables_draw, _cat_tensors),
]}
