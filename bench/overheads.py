"""fxrec against the plain model where its own overheads show: many small tables, small
batches, sequence tables, compiled inference. One thread, one process; every case is timed
side by side with its plain-torch baseline, interleaved, and the median of the repeats is
reported (the ratio is per repeat, then the median).

    .venv/bin/python bench/overheads.py [--repeats 5]

Cases:
- train T tables: `fxrec.shard` (world 1, RowWiseAdagrad inside backward, Adagrad on the
  dense layer) against the plain model with `sparse=True` bags and torch SGD, for a
  ModuleList of T nn.EmbeddingBag (1000 x 16) at batch 512;
- train sequence: 8 nn.Embedding(1000, 16, padding_idx=0) looked up as ``e(tokens[:, k])
  .mean(1)`` at batch 32 x 8 x 20, against the plain model with dense Adagrad;
- update unpooled: one fused RowWiseAdagrad update of 26 unpooled tables (100k x 64) for
  4096 ids each, fbgemm against fxrec's torch kernel;
- compile T tables: ``torch.compile(backend="fxrec")`` under no_grad at batch 32 against
  the plain eager model;
- compile EBC: the same for an EmbeddingBagCollection of 26 tables (every fourth pooled by
  mean) read through a KeyedJaggedTensor.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxrec  # noqa: E402
from fxrec.lowering import backend  # noqa: E402
from fxrec.lowering.tbe import FusedEmbeddingBags  # noqa: E402
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: E402
from fxrec.sparse import KeyedJaggedTensor  # noqa: E402
from fxrec.types import TableInfo  # noqa: E402


class Bags(nn.Module):
    def __init__(self, tables: int, sparse: bool = False):
        super().__init__()
        self.embs = nn.ModuleList([nn.EmbeddingBag(1000, 16, mode="sum", sparse=sparse) for _ in range(tables)])
        self.top = nn.Linear(16 * tables, 1)

    def forward(self, ids, offsets):
        return self.top(torch.cat([e(i, o) for e, i, o in zip(self.embs, ids, offsets)], dim=1))


class Sequence(nn.Module):
    def __init__(self, tables: int = 8):
        super().__init__()
        self.embs = nn.ModuleList([nn.Embedding(1000, 16, padding_idx=0) for _ in range(tables)])
        self.top = nn.Linear(16 * tables, 1)

    def forward(self, tokens):
        return self.top(torch.cat([e(tokens[:, k]).mean(dim=1) for k, e in enumerate(self.embs)], dim=1))


def bag_batch(g, tables: int, b: int):
    lengths = [torch.randint(0, 9, (b,), generator=g) for _ in range(tables)]
    ids = [torch.randint(0, 1000, (int(n.sum()),), generator=g) for n in lengths]
    return ids, [torch.cat([n.new_zeros(1), n.cumsum(0)[:-1]]) for n in lengths]


class Collection(nn.Module):
    def __init__(self, configs):
        super().__init__()
        self.ebc = EmbeddingBagCollection(configs)
        self.top = nn.Linear(sum(c.embedding_dim for c in configs), 1)

    def forward(self, kjt):
        return self.top(self.ebc(kjt).values())


def kjt_batch(g, features: int, b: int) -> KeyedJaggedTensor:
    lengths = torch.randint(0, 9, (features * b,), generator=g)
    return KeyedJaggedTensor([f"f{i}" for i in range(features)], torch.randint(0, 1000, (int(lengths.sum()),),
                             generator=g), lengths=lengths)


def no_grad(m):
    def call(b):
        with torch.no_grad():
            m(*b)
    return call


def stepper(model, opt):
    def step(batch):
        opt.zero_grad(set_to_none=True)
        model(*batch).square().mean().backward()
        opt.step()
    return step


def sharded_stepper(model, example):
    sm = fxrec.shard(model, fxrec.Topology(world_size=1), example,
                     sparse_optimizer=fxrec.optim.RowWiseAdagrad(lr=0.05))
    return stepper(sm, torch.optim.Adagrad(sm.parameters(), lr=0.05))


def compare(fns: dict, batches: list, steps: int, repeats: int) -> tuple[dict, float]:
    """Median ms per step of each (interleaved repeats) and the median per-repeat ratio of
    the second to the first."""
    for f in fns.values():
        for b in batches[:2]:
            f(b)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            for i in range(steps):
                f(batches[i % len(batches)])
            times[k].append((time.perf_counter() - start) / steps * 1e3)
    first, second = list(fns)
    ratio = statistics.median(b / a for a, b in zip(times[first], times[second]))
    return {k: statistics.median(v) for k, v in times.items()}, ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    backend.register()
    g = torch.Generator().manual_seed(0)
    rows = []

    for tables in (26, 300):
        batches = [bag_batch(g, tables, 512) for _ in range(4)]
        torch.manual_seed(0)
        plain = Bags(tables, sparse=True)
        fns = {"plain (sparse SGD)": stepper(plain, torch.optim.SGD(plain.parameters(), lr=0.05)),
               "fxrec.shard": sharded_stepper(Bags(tables), batches[0])}
        rows.append((f"train {tables} tables, batch 512", *compare(fns, batches, max(3, 600 // tables), args.repeats)))

    batches = [(torch.randint(0, 1000, (32, 8, 20), generator=g),) for _ in range(4)]
    plain = Sequence()
    fns = {"plain (dense Adagrad)": stepper(plain, torch.optim.Adagrad(plain.parameters(), lr=0.05)),
           "fxrec.shard": sharded_stepper(Sequence(), batches[0])}
    rows.append(("train sequence, padding_idx, 8 x 20 per sample, batch 32", *compare(fns, batches, 30, args.repeats)))

    specs = [TableInfo(f"t{i}", 100_000, 64, pooling="none") for i in range(26)]
    ids = torch.randint(0, 100_000, (26 * 4096,), generator=g)
    offsets = torch.arange(0, ids.numel() + 1)
    grad = torch.randn(ids.numel() * 64, generator=g)
    fns = {}
    for kernel in ("torch", "fbgemm"):
        fused = FusedEmbeddingBags(specs, fxrec.optim.RowWiseAdagrad(lr=0.05), kernel=kernel)
        fns[f"{kernel} kernel"] = lambda _b, f=fused: f.update(grad, ids, offsets, None)
    rows.append(("update unpooled, 26 tables x 4096 ids, dim 64", *compare(fns, [None], 3, args.repeats)))

    for tables in (26, 100):
        batches = [bag_batch(g, tables, 32) for _ in range(4)]
        torch._dynamo.reset()
        model = Bags(tables).eval()
        compiled = torch.compile(copy.deepcopy(model), backend="fxrec")

        fns = {"plain eager": no_grad(model), "compile fxrec": no_grad(compiled)}
        rows.append((f"compile {tables} tables, no_grad, batch 32", *compare(fns, batches, 30, args.repeats)))

    # an EmbeddingBagCollection read through a KeyedJaggedTensor, sum and mean tables: under the
    # compile backend its lookups are one graph (one fused call), or one frame per feature
    configs = [EmbeddingBagConfig(f"t{i}", 1000, 16, [f"f{i}"], "mean" if i % 4 == 0 else "sum") for i in range(26)]
    batches = [(kjt_batch(g, 26, 32),) for _ in range(4)]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Collection(configs).eval()
    compiled = torch.compile(copy.deepcopy(model), backend="fxrec")
    fns = {"plain eager": no_grad(model), "compile fxrec": no_grad(compiled)}
    rows.append(("compile EBC 26 features (sum, mean), no_grad, batch 32", *compare(fns, batches, 30, args.repeats)))

    print(f"# .venv/bin/python bench/overheads.py --repeats {args.repeats}  ({time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} cores, 1 thread; torch {torch.__version__})")
    print(f"{'case':58s} {'baseline':>24s} {'ms':>9s} {'fxrec':>14s} {'ms':>9s} {'ratio':>7s}")
    for name, times, ratio in rows:
        (a, ta), (b, tb) = times.items()
        print(f"{name:58s} {a:>24s} {ta:9.3f} {b:>14s} {tb:9.3f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
