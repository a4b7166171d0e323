"""Train DLRM in one process and report validation AUC and NE.

Default: the synthetic Criteo-like log (26 tables, 13 dense features), which finishes
in well under 3 minutes on 2 CPU cores and reaches AUC >= 0.70. Real data:
`--criteo-tsv day_0.gz [...]` (Kaggle/Terabyte TSV, hashed into --num-embeddings rows)
or `--criteo-npy DIR` (TorchRec's preprocessed layout); the last --val-batches batches
of the stream are held out for validation.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fxrec import metrics
from fxrec.datasets import CriteoNpyReader, CriteoTsvReader, SyntheticCriteo
from fxrec.models import DLRM, DLRM_DCN, DLRM_DCNPlain, DLRMPlain
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--criteo-tsv", nargs="+", metavar="FILE", help="Criteo TSV files (.gz allowed)")
    src.add_argument("--criteo-npy", metavar="DIR", help="directory of *_dense/_sparse/_labels.npy files")
    p.add_argument("--model", choices=["dlrm", "dcn"], default="dlrm")
    p.add_argument("--plain", action="store_true",
                   help="use the plain nn.EmbeddingBag spelling of the model (lists of offsets/indices)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--val-batches", type=int, default=40)
    p.add_argument("--num-embeddings", type=int, default=10_000, help="rows per table (hash size for Criteo)")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="Adagrad learning rate (default 0.05 for dlrm, 0.02 for dcn, whose cross layers overshoot)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def data_streams(args):
    """(train iterable, validation list of batches, number of tables, number of dense features)."""
    if args.criteo_tsv or args.criteo_npy:
        reader = (CriteoTsvReader(args.criteo_tsv, batch_size=args.batch_size,
                                  num_embeddings_per_feature=args.num_embeddings, drop_last=True)
                  if args.criteo_tsv else
                  CriteoNpyReader(args.criteo_npy, batch_size=args.batch_size,
                                  num_embeddings_per_feature=args.num_embeddings, drop_last=True))
        batches = list(itertools.islice(iter(reader), args.steps + args.val_batches))
        if len(batches) <= args.val_batches:
            raise SystemExit(f"dlrm_train: the data holds {len(batches)} batches of {args.batch_size}; "
                             f"need more than --val-batches={args.val_batches}")
        first = batches[0]
        return batches[:-args.val_batches], batches[-args.val_batches:], len(first.sparse_features.keys()), \
            first.dense_features.shape[1]
    train = SyntheticCriteo(num_embeddings=args.num_embeddings, batch_size=args.batch_size,
                            num_batches=args.steps, seed=args.seed)
    val = list(train.with_split("val", num_batches=args.val_batches))
    return train, val, 26, 13


def build_model(args, num_tables: int, num_dense: int) -> torch.nn.Module:
    dim, rows = args.embedding_dim, args.num_embeddings
    bottom, top = [64, dim], [128, 64, 1]
    if args.plain:
        cls = DLRMPlain if args.model == "dlrm" else DLRM_DCNPlain
        return cls([rows] * num_tables, dim, num_dense, bottom, top)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(f"t_cat_{i}", rows, dim, [f"cat_{i}"])
                                  for i in range(num_tables)])
    cls = DLRM if args.model == "dlrm" else DLRM_DCN
    return cls(ebc, num_dense, bottom, top)


def forward(model, batch, plain: bool) -> torch.Tensor:
    if plain:
        dense, offsets, indices = batch.to_plain()
        return model(dense, offsets, indices).squeeze(1)
    return model(batch.dense_features, batch.sparse_features).squeeze(1)


def evaluate(model, batches, plain: bool) -> dict[str, float]:
    auc, ne = metrics.AUC(from_logits=True), metrics.NE(from_logits=True)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = forward(model, batch, plain)
            auc.update(logits, batch.labels)
            ne.update(logits, batch.labels)
    model.train()
    return {"auc": auc.compute(), "ne": ne.compute()}


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    if args.lr is None:
        args.lr = 0.05 if args.model == "dlrm" else 0.02
    torch.manual_seed(args.seed)
    train, val, num_tables, num_dense = data_streams(args)
    model = build_model(args, num_tables, num_dense)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    bar = tqdm(train, total=args.steps, unit="batch", desc="train")
    for step, batch in enumerate(bar):
        loss = F.binary_cross_entropy_with_logits(forward(model, batch, args.plain), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            rate = (step + 1) * args.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:,.0f}")
    result = evaluate(model, val, args.plain)
    print(f"validation: AUC {result['auc']:.4f}  NE {result['ne']:.4f}  "
          f"({len(val)} batches of {args.batch_size}; trained {time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
