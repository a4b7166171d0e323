"""What managed collisions cost in training: the same ranker fed raw ids, hashed onto its rows
(``id % rows``, what a model without them does) or remapped by `fxrec.managed_collision`
(each of the ids seen most holds a row of its own, DistanceLFU eviction every step).

Both train with fxrec.shard (table_wise, gloo, 1 thread per rank), alternating in fresh
processes, on skewed raw ids from a vocabulary `--vocab-factor` times the rows. The managed
model also all_gathers every rank's ids of its tables and profiles them each step (what keeps
its map equal to the unsharded model's). The table reports ms/step and samples/s (best run),
and, after training, the share of an unseen batch's ids (rank 0's, every occurrence) that hold
a row of their own: under hashing, ids whose row no other id seen hashes to; under managed
collisions, ids not sent to the miss row (the rest share it).

Where TorchRec is importable (its bench environment, README), a second table times the map
alone in one process, fxrec's MCHManagedCollisionModule against TorchRec's on the same ids
(one table, training mode: profile, evict, remap), and says whether they give the same rows.

    .venv/bin/python bench/managed_collision.py [--world 2] [--repeats 3]
    /work/torchrec-venv/bin/python bench/managed_collision.py   # with the map against TorchRec's
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
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--ids-per-bag", type=int, default=4)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--vocab-factor", type=int, default=10, help="raw ids drawn from rows x this")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def model(args, managed: bool):
    from fxrec.managed_collision import (ManagedCollisionCollection, ManagedCollisionEmbeddingBagCollection,
                                         MCHManagedCollisionModule)
    from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
    names = [f"f{i}" for i in range(args.features)]
    cfgs = [EmbeddingBagConfig(f"t_{k}", args.rows, args.dim, [k]) for k in names]

    class Ranker(torch.nn.Module):
        def __init__(self):
            super().__init__()
            ebc = EmbeddingBagCollection(cfgs)
            if managed:
                mcc = ManagedCollisionCollection({c.name: MCHManagedCollisionModule(args.rows) for c in cfgs}, cfgs)
                self.ebc = ManagedCollisionEmbeddingBagCollection(ebc, mcc)
            else:
                self.ebc = ebc
            self.top = torch.nn.Sequential(torch.nn.Linear(len(cfgs) * args.dim, 256), torch.nn.ReLU(),
                                           torch.nn.Linear(256, 1))

        def forward(self, kjt):
            pooled = self.ebc(kjt)[0] if managed else self.ebc(kjt)
            return self.top(pooled.values()).squeeze(1)
    torch.manual_seed(0)
    return Ranker()


def batch(args, rank: int, step: int, managed: bool):
    """(KJT, labels): raw ids, skewed (u**3 favours small ids) and scattered over 2**40;
    hashed onto the rows without managed collisions."""
    from fxrec.sparse import KeyedJaggedTensor
    g = torch.Generator().manual_seed(1000 * step + rank)
    B, n = args.batch_per_rank, args.ids_per_bag
    vocab = args.rows * args.vocab_factor
    count = args.features * B * n
    raw = (torch.rand(count, generator=g).pow(3) * vocab).long() * 2_654_435_761 % (2 ** 40)
    values = raw if managed else raw % args.rows
    lengths = torch.full((args.features * B,), n, dtype=torch.long)
    labels = torch.randint(0, 2, (B,), generator=g).float()
    return KeyedJaggedTensor([f"f{i}" for i in range(args.features)], values, lengths=lengths), labels, raw


def own_rows(args, raw, managed_rows=None) -> float:
    """The share of an unseen batch's ids (`raw`, every occurrence) that hold a row of their own:
    under managed collisions, every id not sent to the miss row (`managed_rows`, the trained
    map's rows); under hashing, every id whose row no other id seen in training (on any rank) or
    in this batch hashes to."""
    per = args.batch_per_rank * args.ids_per_bag
    table = torch.repeat_interleave(torch.arange(args.features), per)
    if managed_rows is not None:
        return float((managed_rows != args.rows - 1).float().mean())
    seen = [batch(args, r, s, True)[2] for r in range(args.world) for s in range(args.warmup + args.steps)]
    ids = torch.cat(seen + [raw])
    tables = torch.cat([table] * (len(seen) + 1))
    pairs = torch.unique(torch.stack([tables * args.rows + ids % args.rows, ids]), dim=1)  # (global row, id)
    owners = torch.bincount(pairs[0], minlength=args.features * args.rows)
    return float((owners[table * args.rows + raw % args.rows] == 1).float().mean())


def worker(rank: int, args, mode: str, port: int, out_dir: str) -> None:
    import fxrec
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    managed = mode == "managed"
    m = model(args, managed)
    prefix = "ebc._embedding_module." if managed else "ebc."
    cons = {f"{prefix}embedding_bags.t_f{i}": "table_wise" for i in range(args.features)}
    batches = [batch(args, rank, s, managed) for s in range(args.warmup + args.steps + 1)]
    unseen = batches.pop()  # for the share of ids sharing a row, after training
    sm = fxrec.shard(m, fxrec.Topology(args.world), (batches[0][0],), constraints=cons,
                     sparse_optimizer=fxrec.optim.SGD(0.05))
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)
    dist.barrier()
    for i, (kjt, labels, _) in enumerate(batches):
        if i == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sm(kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    kjt, _, raw = unseen
    if rank == 0:
        rows = None
        if managed:  # the rows the trained map gives a batch it has not seen (eval: no profiling)
            mcc = sm.module.get_submodule("ebc._managed_collision_collection")
            mcc.eval()
            rows = mcc(kjt).values()
        torch.save({"elapsed": elapsed, "own": own_rows(args, raw, rows)}, os.path.join(out_dir, f"{mode}.pt"))
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"# {sys.executable} bench/managed_collision.py {' '.join(argv or sys.argv[1:])}  "
          f"({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores)")
    print(f"# torch {torch.__version__}; {args.world} ranks x batch {args.batch_per_rank}; {args.features} features "
          f"of {args.ids_per_bag} ids, raw ids from {args.rows * args.vocab_factor:,} (skewed); tables "
          f"{args.rows:,} x {args.dim}, table_wise; {args.warmup} warm-up + {args.steps} timed steps, best of "
          f"{args.repeats} alternating runs", flush=True)
    runs = alternate(worker, args, ("hashed", "managed"))
    best = {mode: 1000 * fastest(r)["elapsed"] / args.steps for mode, r in runs.items()}
    own = {mode: r[-1]["own"] for mode, r in runs.items()}
    samples = args.world * args.batch_per_rank
    print(f"{'':40}{'id % rows':>14}{'managed':>14}")
    print(f"{'ms/step (best run)':40}{best['hashed']:>14.1f}{best['managed']:>14.1f}")
    rate = {mode: samples * 1000 / ms for mode, ms in best.items()}
    print(f"{'samples/s (global)':40}{rate['hashed']:>14,.0f}{rate['managed']:>14,.0f}")
    print(f"{'unseen batch: ids with a row of their own':40}{own['hashed']:>14.1%}{own['managed']:>14.1%}")
    print(f"managed / hashed samples/s: {best['hashed'] / best['managed']:.2f}")
    map_alone(args)


def map_alone(args) -> None:
    """fxrec's map against TorchRec's, one table, one process, the same ids (module doc)."""
    try:
        from torchrec.modules.mc_modules import DistanceLFU_EvictionPolicy, MCHManagedCollisionModule as Theirs
        from torchrec.sparse.jagged_tensor import JaggedTensor as TheirJT
    except ImportError:
        print("(TorchRec not importable: the map alone is not compared)")
        return
    from fxrec.managed_collision import MCHManagedCollisionModule as Ours
    from fxrec.sparse import JaggedTensor as OurJT
    torch.set_num_threads(1)
    n = args.world * args.batch_per_rank * args.ids_per_bag  # one table's ids of a global batch
    g = torch.Generator().manual_seed(0)
    vocab = args.rows * args.vocab_factor
    stream = [(torch.rand(n, generator=g).pow(3) * vocab).long() * 2_654_435_761 % (2 ** 40)
              for _ in range(args.warmup + args.steps)]

    def run(mc, jt_type):
        times, rows = [], None
        for ids in stream:
            features = {"f": jt_type(values=ids, lengths=torch.tensor([n]))}
            start = time.perf_counter()
            rows = mc(features)["f"].values()
            times.append(time.perf_counter() - start)
        return 1000 * min(times[args.warmup:]), rows
    theirs, their_rows = run(Theirs(zch_size=args.rows, device=torch.device("cpu"),
                                    eviction_policy=DistanceLFU_EvictionPolicy(), eviction_interval=1), TheirJT)
    ours, our_rows = run(Ours(args.rows), OurJT)
    print(f"\nthe map alone, {n:,} ids a call into {args.rows:,} rows, DistanceLFU, 1 thread (best call):")
    print(f"{'':40}{'TorchRec':>14}{'fxrec':>14}")
    print(f"{'ms per call':40}{theirs:>14.2f}{ours:>14.2f}")
    print(f"fxrec / TorchRec calls/s: {theirs / ours:.2f}; the same rows for the last call: "
          f"{torch.equal(their_rows, our_rows)}")


if __name__ == "__main__":
    main()
