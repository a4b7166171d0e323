"""The cost of checking a sharded program's inputs (`shard_ops.find_fault`: ids in range,
lengths summing to the ids) beside the forward it guards, on one CPU thread.

A model of one EmbeddingBagCollection (T features, each its own table of R rows x D, ~4 ids per
bag, Poisson) sharded at world size 1; per repeat, interleaved: the check alone on the
forward's own inputs, and the whole forward under no_grad. Median of the repeats.

    .venv/bin/python bench/input_check.py [--tables 26] [--shared-sizes] [--repeats 7]

--shared-sizes gives every table the same number of rows (the check then reads all ids in one
min/max); by default the tables' sizes differ, as Criteo's do.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxrec  # noqa: E402
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: E402
from fxrec.passes import shard_ops  # noqa: E402
from fxrec.runtime import dist_lookup  # noqa: E402
from fxrec.sparse import KeyedJaggedTensor  # noqa: E402


class Model(torch.nn.Module):
    def __init__(self, configs):
        super().__init__()
        self.ebc = EmbeddingBagCollection(configs)

    def forward(self, kjt):
        return self.ebc(kjt).values()


def timed(fn, n: int) -> float:
    """Median seconds of n calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--shared-sizes", action="store_true", help="every table the same number of rows")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    T, B = args.tables, args.batch
    rows = [args.rows if args.shared_sizes else args.rows + 17 * t for t in range(T)]
    configs = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=args.dim, num_embeddings=rows[t],
                                  feature_names=[f"f{t}"]) for t in range(T)]
    lengths = torch.poisson(torch.full((T * B,), 4.0)).long()
    per = lengths.view(T, B).sum(1).tolist()
    values = torch.cat([torch.randint(0, r, (n,)) for r, n in zip(rows, per)])
    kjt = KeyedJaggedTensor([f"f{t}" for t in range(T)], values, lengths=lengths)
    sharded = fxrec.shard(Model(configs), fxrec.Topology(world_size=1), (kjt,))
    seen = {}
    check = dist_lookup.find_fault

    def spy(slots, inputs):  # the forward's own check inputs, kept for timing it alone
        seen["args"] = (slots, inputs)
        return check(slots, inputs)

    dist_lookup.find_fault = spy
    with torch.no_grad():
        sharded(kjt)
    dist_lookup.find_fault = check
    if "args" not in seen:
        raise SystemExit("bench/input_check.py: the sharded forward made no input check to time")
    slots, inputs = seen["args"]

    def forward():
        with torch.no_grad():
            sharded(kjt)

    for _ in range(3):
        forward()
    checks, forwards = [], []
    for _ in range(args.repeats):
        checks.append(timed(lambda: shard_ops.find_fault(slots, inputs), 20))
        forwards.append(timed(forward, 10))
    c, f = statistics.median(checks), statistics.median(forwards)
    sizes = "one size" if args.shared_sizes else f"{len(set(rows))} sizes"
    print(f"# {T} features ({sizes}), batch {B}, {values.numel():,} ids; one thread; median of {args.repeats}")
    print(f"input check {c * 1e3:.3f} ms, forward {f * 1e3:.3f} ms: the check is {100 * c / f:.1f}% of the forward")


if __name__ == "__main__":
    main()
