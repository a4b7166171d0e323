"""Exact column_wise RowWiseAdagrad's backward work on one rank, the two ways it is made.

One column shard of each of 26 tables (100k rows, 32 columns: a dim-64 table split over 2
ranks, bench/vs_torchrec.py's column_wise case) sees every sample's ids of the global batch
(4096 samples, ~4 ids per bag, Poisson). Per step the rank computes each unique row's sum of
squared gradients over its columns (`sparse_update.row_sq_sums`) and runs the fused update
(fbgemm's CPU backward); the exchange between ranks is left out. Timed side by side, one
thread, alternating, the median of the repeats:

- own ids: the repeated rows' gradients summed for the row sums, then the update over the
  lookup's own ids (``bags_of_one=0``: the only way before);
- bags of one: every unique row's summed gradient from the same sort, which is then the
  update's gradient, each row a bag of one (``bags_of_one=1``);
- default: what fxrec picks (bags of one where unique rows are at most
  `BAGS_OF_ONE_UNIQUE_FRACTION` of the ids).

Ids are Zipf-distributed per table (`SyntheticCriteo`'s default alpha 1.05 and flatter
ones) or uniform ("none"): the fewer the repeats, the less bags of one save.

    .venv/bin/python bench/row_sums.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fxrec.datasets import SyntheticCriteo  # noqa: E402
from fxrec.lowering.sparse_update import BAGS_OF_ONE_UNIQUE_FRACTION, row_sq_sums  # noqa: E402
from fxrec.lowering.tbe import FusedEmbeddingBags  # noqa: E402
from fxrec.optim import RowWiseAdagrad  # noqa: E402
from fxrec.types import TableInfo  # noqa: E402

WAYS = {"own ids": 0.0, "bags of one": 1.0, "default": None}


def step(module: FusedEmbeddingBags, grad, ids, offsets, fraction) -> None:
    found = row_sq_sums(module.layout, grad, ids, offsets, None, range(module.layout.num_tables), fraction)
    for call in found.calls:
        module.update(*call)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=32, help="the column shard's width")
    p.add_argument("--batch", type=int, default=4096, help="global batch: a column shard sees all of it")
    p.add_argument("--pooling", type=float, default=4.0)
    p.add_argument("--zipf", nargs="+", default=["1.05", "0.9", "0.8", "0.6", "none"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    tables = [TableInfo(f"t{i}", args.rows, args.dim) for i in range(args.tables)]
    print(f"# {args.tables} tables x {args.rows:,} rows x {args.dim} columns, batch {args.batch}, "
          f"~{args.pooling} ids per bag; fbgemm update, RowWiseAdagrad; one thread; "
          f"median of {args.repeats}; BAGS_OF_ONE_UNIQUE_FRACTION = {BAGS_OF_ONE_UNIQUE_FRACTION}")
    print(f"{'ids':>10} {'unique/ids':>11} " + " ".join(f"{w + ' ms':>15}" for w in WAYS)
          + f" {'own / default':>14}")
    for zipf in args.zipf:
        alpha = None if zipf == "none" else float(zipf)
        data = SyntheticCriteo(num_embeddings=args.rows, num_tables=args.tables, pooling_factors=args.pooling,
                               batch_size=args.batch, seed=0, zipf_alpha=alpha)
        kjt = data.batch(0).sparse_features
        ids, lengths = kjt.values(), kjt.lengths()
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        grad = torch.randn(args.batch, args.tables * args.dim, generator=torch.Generator().manual_seed(0))
        module = FusedEmbeddingBags(tables, optimizer=RowWiseAdagrad(0.01), kernel="fbgemm")
        unique = sum(rows.numel() for rows, _ in row_sq_sums(module.layout, grad, ids, offsets, None,
                                                            range(args.tables), 0.0).sums.values())
        times: dict[str, list[float]] = {w: [] for w in WAYS}
        for rep in range(args.repeats + 1):  # the first round warms up
            order = list(WAYS) if rep % 2 else list(reversed(WAYS))
            for way in order:
                t0 = time.perf_counter()
                step(module, grad, ids, offsets, WAYS[way])
                if rep:
                    times[way].append((time.perf_counter() - t0) * 1e3)
        med = {w: statistics.median(v) for w, v in times.items()}
        label = f"zipf {zipf}" if alpha is not None else "uniform"
        print(f"{label:>10} {unique / ids.numel():>11.2f} " + " ".join(f"{med[w]:>15.2f}" for w in WAYS)
              + f" {med['own ids'] / med['default']:>14.2f}")


if __name__ == "__main__":
    main()
