"""Train a two-tower retrieval model with in-batch softmax; report recall@10 and NDCG@10.

Data: `--movielens DIR` (ml-100k u.data, ml-1m ratings.dat or ml-20m/25m ratings.csv)
or, by default, synthetic interactions with latent structure. Each user's last
interaction is held out; its query (user id + history from training) is scored
against every item, and the held-out item is the one relevant candidate. Items the
user saw in training are not masked out of the ranking.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from fxrec import metrics
from fxrec.datasets import TwoTowerBatches, leave_last_out, load_movielens, synthetic_interactions
from fxrec.models import TwoTower, in_batch_softmax_loss
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.sparse import KeyedJaggedTensor

QUERY, CANDIDATE = ["user_id", "user_history"], ["item_id"]


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


def build_model(num_users: int, num_items: int, dim: int) -> TwoTower:
    # The item table is shared: the candidate id and the user's history both read it.
    ebc = EmbeddingBagCollection([
        EmbeddingBagConfig("user", num_users, dim, ["user_id"]),
        EmbeddingBagConfig("item", num_items, dim, ["user_history", "item_id"], pooling="mean"),
    ])
    return TwoTower(ebc, QUERY, CANDIDATE, [64, dim])


def _features(query: KeyedJaggedTensor, candidate: KeyedJaggedTensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.concat([query, candidate])


def evaluate(model: TwoTower, test: TwoTowerBatches, num_items: int, k: int = 10) -> dict[str, float]:
    recall, ndcg = metrics.RecallAtK(k), metrics.NDCGAtK(k)
    model.eval()
    with torch.no_grad():
        # Every item's candidate embedding, once: the candidate tower over all item ids.
        items = KeyedJaggedTensor(["item_id"], torch.arange(num_items), torch.ones(num_items, dtype=torch.int32))
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
    return KeyedJaggedTensor(QUERY, torch.zeros(0, dtype=torch.long), torch.zeros(2 * n, dtype=torch.int32))


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    if args.history_length < 1:
        raise SystemExit(f"two_tower_train: --history-length must be >= 1 (the query tower reads it), "
                         f"got {args.history_length}")
    torch.manual_seed(args.seed)
    try:  # a missing or damaged file: one line naming it, not a traceback
        inter = (load_movielens(args.movielens) if args.movielens
                 else synthetic_interactions(num_users=args.num_users, num_items=args.num_items,
                                             num_interactions=args.num_interactions, seed=args.seed))
    except (OSError, ValueError) as e:
        raise SystemExit(f"two_tower_train: {e}") from None
    train, test = leave_last_out(inter)
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
    result = evaluate(model, test_batches, inter.num_items)
    print(f"test: recall@10 {result['recall@10']:.4f}  NDCG@10 {result['ndcg@10']:.4f}  "
          f"({len(test)} held-out interactions, {inter.num_items} items; {time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
