"""Variable batch per feature (VBE) against the expanded batch, trained sharded side by side.

A ranking batch holds several candidate items per user: the user's features (long histories)
are the same for each of that user's samples. The expanded batch repeats them per sample; the
VBE batch (`KeyedJaggedTensor(stride_per_key_per_rank=..., inverse_indices=...)`) carries each
user's bags once, and the EmbeddingBagCollection gives every sample its user's sums. Both train
the same model with fxrec.shard (table_wise, gloo, 1 thread per rank), alternating in fresh
processes; the table reports ms/step, samples/s, the bytes the lookups' all-to-alls carry per
step and rank, and the largest loss difference between the two (summation order only).

    .venv/bin/python bench/vbe.py [--world 2] [--items-per-user 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from side_by_side import alternate, fastest  # noqa: E402 - bench/, beside this file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch-per-rank", type=int, default=2048)
    p.add_argument("--items-per-user", type=int, default=16)
    p.add_argument("--user-features", type=int, default=8)
    p.add_argument("--user-history", type=int, default=20, help="ids per user bag")
    p.add_argument("--item-features", type=int, default=8)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def keys(args) -> tuple[list[str], list[str]]:
    return [f"user_{i}" for i in range(args.user_features)], [f"item_{i}" for i in range(args.item_features)]


def model(args):
    from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
    users, items = keys(args)
    cfgs = [EmbeddingBagConfig(f"t_{k}", args.rows, args.dim, [k]) for k in users + items]

    class Ranker(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(cfgs)
            self.top = torch.nn.Sequential(torch.nn.Linear(len(cfgs) * args.dim, 256), torch.nn.ReLU(),
                                           torch.nn.Linear(256, 1))

        def forward(self, kjt):
            return self.top(self.ebc(kjt).values()).squeeze(1)
    torch.manual_seed(0)
    return Ranker()


def batch(args, rank: int, step: int, vbe: bool):
    """(KJT, labels): this rank's batch, with each user's bags once (vbe) or per sample."""
    from fxrec.sparse import KeyedJaggedTensor
    g = torch.Generator().manual_seed(1000 * step + rank)
    users, items = keys(args)
    B, per = args.batch_per_rank, args.items_per_user
    n_users = (B + per - 1) // per
    inverse = torch.arange(B) // per  # sample b belongs to user b // per
    values, lengths, spk = [], [], []
    for _ in users:
        hist = torch.randint(1, args.user_history + 1, (n_users,), generator=g)
        ids = torch.randint(0, args.rows, (int(hist.sum()),), generator=g)
        if vbe:
            values.append(ids)
            lengths.append(hist)
            spk.append([n_users])
        else:
            bags = ids.split(hist.tolist())
            values.append(torch.cat([bags[u] for u in inverse.tolist()]))
            lengths.append(hist[inverse])
    for _ in items:
        n = torch.randint(1, 4, (B,), generator=g)
        values.append(torch.randint(0, args.rows, (int(n.sum()),), generator=g))
        lengths.append(n)
        spk.append([B])
    labels = torch.randint(0, 2, (B,), generator=g).float()
    names = users + items
    if vbe:
        inv = torch.stack([inverse] * len(users) + [torch.arange(B)] * len(items))
        return KeyedJaggedTensor(names, torch.cat(values), lengths=torch.cat(lengths), stride_per_key_per_rank=spk,
                                 inverse_indices=(names, inv)), labels
    return KeyedJaggedTensor(names, torch.cat(values), lengths=torch.cat(lengths)), labels


def worker(rank: int, args, mode: str, port: int, out_dir: str) -> None:
    import fxrec
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    vbe = mode == "vbe"
    m = model(args)
    users, items = keys(args)
    cons = {f"ebc.embedding_bags.t_{k}": "table_wise" for k in users + items}
    batches = [batch(args, rank, s, vbe) for s in range(args.warmup + args.steps)]
    sm = fxrec.shard(m, fxrec.Topology(args.world), (batches[0][0],), constraints=cons,
                     sparse_optimizer=fxrec.optim.SGD(0.05))
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)
    sent = [0]
    real = dist.all_to_all_single

    def counting(out, inp, *a, **kw):
        sent[0] += inp.numel() * inp.element_size()
        return real(out, inp, *a, **kw)
    dist.all_to_all_single = counting
    losses = []
    dist.barrier()
    for i, (kjt, labels) in enumerate(batches):
        if i == args.warmup:
            dist.barrier()
            sent[0], start = 0, time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sm(kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        torch.save({"elapsed": elapsed, "bytes": sent[0] / args.steps, "losses": losses},
                   os.path.join(out_dir, f"{mode}.pt"))
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"# .venv/bin/python bench/vbe.py {' '.join(argv or sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} cores)")
    print(f"# torch {torch.__version__}; {args.world} ranks x batch {args.batch_per_rank}, {args.items_per_user} items "
          f"per user; {args.user_features} user features of 1..{args.user_history} ids, {args.item_features} item "
          f"features of 1..3 ids; tables {args.rows:,} x {args.dim}, table_wise; {args.warmup} warm-up + "
          f"{args.steps} timed steps, best of {args.repeats} alternating runs", flush=True)
    runs = alternate(worker, args, ("expanded", "vbe"))
    best = {mode: (1000 * fastest(r)["elapsed"] / args.steps, fastest(r)["bytes"]) for mode, r in runs.items()}
    losses = {mode: r[-1]["losses"] for mode, r in runs.items()}
    samples = args.world * args.batch_per_rank
    print(f"{'':34}{'expanded batch':>16}{'VBE batch':>16}")
    print(f"{'ms/step (best run)':34}{best['expanded'][0]:>16.1f}{best['vbe'][0]:>16.1f}")
    print(f"{'samples/s (global)':34}{samples * 1000 / best['expanded'][0]:>16,.0f}"
          f"{samples * 1000 / best['vbe'][0]:>16,.0f}")
    print(f"{'all-to-all MB per step, rank 0':34}{best['expanded'][1] / 2**20:>16.2f}{best['vbe'][1] / 2**20:>16.2f}")
    diff = max(abs(a - b) for a, b in zip(losses["expanded"], losses["vbe"]))
    print(f"VBE / expanded samples/s: {best['expanded'][0] / best['vbe'][0]:.2f}; all-to-all bytes: "
          f"{best['vbe'][1] / best['expanded'][1]:.2f}; max |loss difference| over "
          f"{len(losses['vbe'])} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
