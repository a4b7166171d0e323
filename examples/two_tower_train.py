"""Train a two-tower retrieval model with in-batch softmax; report recall@10 and NDCG@10.

Data: `--movielens DIR` (ml-100k u.data, ml-1m ratings.dat or ml-20m/25m ratings.csv)
or, by default, synthetic interactions with latent structure. Each user's last
interaction is held out; its query (user id + history from training) is scored
against every item, and the held-out item is the one relevant candidate. Items the
user saw in training are not masked out of the ranking.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from tqdm import tqdm

from fxrec import metrics
from fxrec.datasets import TwoTowerBatches, leave_last_out, load_movielens, synthetic_interactions
from fxrec.models import TwoTower, in_batch_softmax_loss
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.sparse import KeyedJaggedTensor

QUERY, CANDIDATE = ["user_id", "user_history"], ["item_id"]
K = 10  # recall@K and NDCG@K rank every item: there must be at least K


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--movielens", metavar="DIR", help="a MovieLens directory or ratings file")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-users", type=int, default=1000, help="synthetic data only")
    p.add_argument("--num-items", type=int, default=2000, help="synthetic data only")
    p.add_argument("--num-interactions", type=int, default=50_000, help="synthetic data only")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--history-length", type=int, default=10)
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _usage_error(flag: str, value, rule: str) -> SystemExit:
    """One line on stderr naming the flag and its value, exit status 2 as argparse's own
    errors: raise what this returns."""
    print(f"two_tower_train: {flag} {value}: {rule}", file=sys.stderr)
    return SystemExit(2)


def check_flags(args) -> None:
    """Refuse flag values that would fail later with a traceback (a batch of 0, a table of
    0 rows, k past the candidates) or train nonsense silently (--temperature 0: a NaN loss;
    --epochs -1: no training)."""
    counts = [("--epochs", args.epochs, 0), ("--batch-size", args.batch_size, 1),
              ("--history-length", args.history_length, 1), ("--embedding-dim", args.embedding_dim, 1)]
    if not args.movielens:  # these shape the synthetic data only; MovieLens is checked once read
        counts += [("--num-users", args.num_users, 1), ("--num-items", args.num_items, K),
                   ("--num-interactions", args.num_interactions, 1)]
    for flag, value, least in counts:
        if value < least:
            why = f" (recall@{K} ranks the items)" if flag == "--num-items" else ""
            raise _usage_error(flag, value, f"must be >= {least}{why}")
    for flag, value in (("--lr", args.lr), ("--temperature", args.temperature)):
        if not (math.isfinite(value) and value > 0):  # nan passes every comparison's negation
            raise _usage_error(flag, value, "must be a finite number > 0")


def check_data(inter, test, source: str) -> None:
    """Refuse interactions the run cannot score, in one line naming where they came from:
    a MovieLens file may be empty, list fewer than K items or no user twice."""
    if len(inter) == 0:
        raise SystemExit(f"two_tower_train: {source}: no interactions")
    if inter.num_items < K:
        raise SystemExit(f"two_tower_train: {source}: {inter.num_items} items; recall@{K} needs at least {K}")
    if len(test) == 0:
        raise SystemExit(f"two_tower_train: {source}: no user has 2 interactions, so none is held out to score")


def build_model(num_users: int, num_items: int, dim: int) -> TwoTower:
    # The item table is shared: the candidate id and the user's history both read it.
    ebc = EmbeddingBagCollection([
        EmbeddingBagConfig("user", num_users, dim, ["user_id"]),
        EmbeddingBagConfig("item", num_items, dim, ["user_history", "item_id"], pooling="mean"),
    ])
    return TwoTower(ebc, QUERY, CANDIDATE, [64, dim])


def _features(query: KeyedJaggedTensor, candidate: KeyedJaggedTensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.concat([query, candidate])


def evaluate(model: TwoTower, test: TwoTowerBatches, num_items: int, k: int = K) -> dict[str, float]:
    recall, ndcg = metrics.RecallAtK(k), metrics.NDCGAtK(k)
    model.eval()
    with torch.no_grad():
        # Every item's candidate embedding, once: the candidate tower over all item ids.
        items = KeyedJaggedTensor(["item_id"], torch.arange(num_items),
                                  lengths=torch.ones(num_items, dtype=torch.int32))
        _, item_emb = model(_features(_empty_queries(num_items), items))
        item_emb = torch.nn.functional.normalize(item_emb, dim=-1)
        for query, candidate in test:
            q, _ = model(_features(query, candidate))
            scores = torch.nn.functional.normalize(q, dim=-1) @ item_emb.T
            recall.update(scores, candidate.values())
            ndcg.update(scores, candidate.values())
    model.train()
    return {"recall@10": recall.compute(), "ndcg@10": ndcg.compute()}


def _empty_queries(n: int) -> KeyedJaggedTensor:
    """n query samples with no ids at all: the collection reads every feature in one
    call, and the candidate tower's output does not depend on them."""
    return KeyedJaggedTensor(QUERY, torch.zeros(0, dtype=torch.long), lengths=torch.zeros(2 * n, dtype=torch.int32))


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    check_flags(args)
    torch.manual_seed(args.seed)
    try:  # a missing or damaged file: one line naming it, not a traceback
        inter = (load_movielens(args.movielens) if args.movielens
                 else synthetic_interactions(num_users=args.num_users, num_items=args.num_items,
                                             num_interactions=args.num_interactions, seed=args.seed))
    except (OSError, ValueError) as e:
        raise SystemExit(f"two_tower_train: {e}") from None
    train, test = leave_last_out(inter)
    check_data(inter, test, args.movielens or f"the synthetic data (--num-interactions {args.num_interactions})")
    batches = TwoTowerBatches(train, args.batch_size, history_length=args.history_length, seed=args.seed)
    test_batches = TwoTowerBatches(test, 256, history_length=args.history_length, history_from=train, shuffle=False)
    model = build_model(inter.num_users, inter.num_items, args.embedding_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        batches.set_epoch(epoch)
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch")
        for step, (query, candidate) in enumerate(bar):
            q, c = model(_features(query, candidate))
            loss = in_batch_softmax_loss(q, c, args.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    result = evaluate(model, test_batches, inter.num_items, K)
    print(f"test: recall@10 {result['recall@10']:.4f}  NDCG@10 {result['ndcg@10']:.4f}  "
          f"({len(test)} held-out interactions, {inter.num_items} items; {time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
