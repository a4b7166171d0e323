"""Train DLRM and report validation AUC and NE, in one process or sharded.

Default: the synthetic Criteo-like log (26 tables, 13 dense features), which finishes
in well under 3 minutes on 2 CPU cores and reaches AUC >= 0.70. Real data:
`--criteo-tsv day_0.gz [...]` (Kaggle/Terabyte TSV, hashed into --num-embeddings rows)
or `--criteo-npy DIR` (TorchRec's preprocessed layout); the first --val-batches batches
of the stream are held out for validation and training reads the --steps batches after
them. Data that holds fewer batches than that is refused before training.

Sharded: `torchrun --nproc-per-node 2 examples/dlrm_train.py --shard` hands the same
model to `fxrec.shard` (gloo on CPU, NCCL on GPUs); --batch-size is then per rank, each
rank trains on its slice of every global batch, tables are trained by a fused row-wise
Adagrad and dense layers by torch's Adagrad, and AUC/NE are computed over the predictions
of all ranks (fxrec.metrics' compute() is collective on several ranks). Rank 0 prints.

Checkpoints: `--save DIR` writes the model (every rank its shards), both optimizers' state
and the step reached, with `fxrec.checkpoint`, after training (and with `--save-every N`
every N steps too, written in the background while training goes on); `--resume DIR` reads
one back, whatever plan or number of ranks wrote it, and trains --steps more steps on the
batches that follow.

`--shard --pipeline` trains through `fxrec.runtime.pipeline.TrainPipeline`: each next batch's
ids are sent to their shards while the current batch trains (the same results).

Inference: `--quantize int8` (or int4, int2, fp16, fp32; repeatable) lowers the trained model with
`fxrec.lower_for_inference` (tables quantized row-wise, one fused lookup per group) and
reports its validation AUC and NE beside the float model's. A sharded model is gathered
first (`full_state_dict`) and lowered on rank 0.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fxrec
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
    # 0.05 made the first Adagrad steps overshoot (the loss spiked to ~2.9 at step 3) and
    # ended 0.01 AUC lower on the synthetic stream; DCN's cross layers overshoot likewise.
    p.add_argument("--lr", type=float, default=0.02, help="Adagrad learning rate, dense and sparse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", action="store_true",
                   help="shard with fxrec over the torchrun job's ranks (one process: world size 1)")
    p.add_argument("--save", metavar="DIR", help="write a checkpoint (fxrec.checkpoint) after training")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="with --save: also every N steps, in the background while training goes on")
    p.add_argument("--resume", metavar="DIR", help="start from this checkpoint, at the step it reached")
    p.add_argument("--pipeline", action="store_true",
                   help="with --shard: train through fxrec's TrainPipeline (the next batch's ids travel early)")
    p.add_argument("--quantize", action="append", default=[], metavar="TYPE",
                   choices=["int8", "int4", "int2", "fp16", "fp32"],
                   help="after training, also evaluate the model lowered for inference with tables of TYPE "
                        "(int8, int4, int2, fp16 or fp32; repeatable)")
    return p.parse_args(argv)


def _usage_error(flag: str, value, rule: str) -> SystemExit:
    """One line on stderr naming the flag and its value (None: a switch), exit status 2 as
    argparse's own errors: raise what this returns."""
    print(f"dlrm_train: {flag}{'' if value is None else f' {value}'}: {rule}", file=sys.stderr)
    return SystemExit(2)


def check_flags(args) -> None:
    """Refuse flag values that would fail later, after data loading or training, with a
    traceback from deep inside torch or fxrec."""
    counts = [("--batch-size", args.batch_size, 1), ("--steps", args.steps, 0), ("--val-batches", args.val_batches, 1),
              ("--num-embeddings", args.num_embeddings, 1), ("--embedding-dim", args.embedding_dim, 1),
              ("--save-every", args.save_every, 0)]
    for flag, value, least in counts:
        if value < least:
            raise _usage_error(flag, value, f"must be >= {least}")
    if not (math.isfinite(args.lr) and args.lr > 0):  # nan passes every comparison's negation
        raise _usage_error("--lr", args.lr, "must be a finite number > 0")
    if args.save_every and not args.save:
        raise _usage_error("--save-every", args.save_every, "needs --save DIR")
    if args.pipeline and not args.shard:
        raise _usage_error("--pipeline", None, "trains a sharded model: add --shard")
    problem = args.save and _unwritable(args.save)
    if problem:
        raise _usage_error("--save", args.save, problem)


def _unwritable(path: str):
    """Why a checkpoint directory cannot be made at `path`, or None; checked before training
    so that the run does not end in a failed save. Permissive where it cannot know (a
    read-only mount): the save itself still reports its error in one line."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "a file, not a checkpoint directory"
        return None if os.access(path, os.W_OK | os.X_OK) else "a directory this process cannot write into"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot make a directory under {parent}, a file"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot make a directory in {parent} (not writable)"


def data_streams(args, world: int = 1, start: int = 0):
    """(train iterable, validation list of batches, number of tables, number of dense
    features); batches are global: world x the per-rank --batch-size. Training reads
    --steps batches from batch `start` on (a resumed run); validation is the same batches
    whatever `start` and --steps are (a resumed run scores what a straight one does)."""
    batch_size = args.batch_size * world
    if args.criteo_tsv or args.criteo_npy:
        return _criteo_streams(args, batch_size, start)
    train = SyntheticCriteo(num_embeddings=args.num_embeddings, batch_size=batch_size,
                            num_batches=start + args.steps, seed=args.seed)
    val = list(train.with_split("val", num_batches=args.val_batches))
    return itertools.islice(train, start, None), val, 26, 13


def _criteo_streams(args, batch_size: int, start: int):
    """data_streams for Criteo files: validation is the first --val-batches batches, a place
    that neither --steps nor a resume moves and that needs no pass over the whole file to
    find (the end of a TSV stream is known only once it is all read); training reads the
    batches after them. Too little data is refused here, before any training, instead of
    training fewer steps than asked."""
    reader = (CriteoTsvReader(args.criteo_tsv, batch_size=batch_size,
                              num_embeddings_per_feature=args.num_embeddings, drop_last=True)
              if args.criteo_tsv else
              CriteoNpyReader(args.criteo_npy, batch_size=batch_size,
                              num_embeddings_per_feature=args.num_embeddings, drop_last=True))
    need = args.val_batches + start + args.steps
    batches = list(itertools.islice(iter(reader), need))
    if len(batches) < need:
        resumed = f" + {start} (resumed at)" if start else ""
        raise SystemExit(f"dlrm_train: the data holds {len(batches)} batches of {batch_size}; need {need}: "
                         f"--val-batches {args.val_batches}{resumed} + --steps {args.steps}")
    val, first = batches[:args.val_batches], batches[0]
    return batches[args.val_batches + start:], val, len(first.sparse_features.keys()), first.dense_features.shape[1]


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


def evaluate(model, batches, plain: bool, rank: int = 0, world: int = 1,
             device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """AUC and NE over every rank's predictions: each rank scores its slice, and the metrics'
    compute() (collective on several ranks) takes every rank's. One rank alone (world 1, as
    for the quantized models rank 0 scores by itself) computes over its own."""
    sync = world > 1
    auc, ne = metrics.AUC(from_logits=True, sync=sync), metrics.NE(from_logits=True, sync=sync)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            local = _local(batch, rank, world, device)
            logits = forward(model, local, plain)
            auc.update(logits, local.labels)
            ne.update(logits, local.labels)
    model.train()
    return {"auc": auc.compute(), "ne": ne.compute()}


def _device(args) -> torch.device:
    """Where a sharded run computes: this rank's GPU under torchrun when there is one."""
    if args.shard and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _local(batch, rank: int, world: int, device: torch.device = torch.device("cpu")):
    n = batch.batch_size // world
    local = batch if world == 1 else batch.slice(rank * n, (rank + 1) * n)
    return local if device.type == "cpu" else local.to(device)


def _init_distributed(args) -> tuple[int, int]:
    """(rank, world) of the torchrun job; initialises the process group when world > 1."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not args.shard:
        if world > 1:
            raise SystemExit("dlrm_train: launched on several ranks: add --shard to shard the model")
        return 0, 1
    if _device(args).type == "cuda":
        torch.cuda.set_device(_device(args))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def make_trainable(args, model, example_batch, rank: int, world: int):
    """(model to train, dense optimizer): the model itself, or fxrec's sharded version of it."""
    if not args.shard:
        return model, torch.optim.Adagrad(model.parameters(), lr=args.lr)
    example = example_batch.to_plain() if args.plain else (example_batch.dense_features,
                                                           example_batch.sparse_features)
    sharded = fxrec.shard(model, fxrec.Topology.from_env(device="cuda" if torch.cuda.is_available() else "cpu"),
                          example, sparse_optimizer=fxrec.optim.RowWiseAdagrad(lr=args.lr))
    if rank == 0:
        counts: dict[str, int] = {}
        for t in sharded.plan:
            counts[sharded.plan[t].sharding] = counts.get(sharded.plan[t].sharding, 0) + 1
        print(f"fxrec.shard: {len(sharded.plan)} tables over {world} rank(s): {counts}")
    return sharded, torch.optim.Adagrad(sharded.parameters(), lr=args.lr)


def _loss(logits, batch) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, batch.labels)


def plain_steps(args, model, optimizer, train, rank: int, world: int, device):
    """Train on each batch of `train`; yields (loss, samples in the global batch) per step."""
    for global_batch in train:
        batch = _local(global_batch, rank, world, device)
        loss = _loss(forward(model, batch, args.plain), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield loss, global_batch.batch_size


def pipelined_steps(args, model, optimizer, train, rank: int, world: int, device):
    """The same steps through fxrec's TrainPipeline: each next batch's ids are sent to their
    shards while the current batch trains."""
    from fxrec.runtime.pipeline import TrainPipeline

    pipe = TrainPipeline(model, optimizer, lambda out, b: _loss(out.squeeze(1), b),
                         inputs=(lambda b: b.to_plain()) if args.plain else
                         (lambda b: (b.dense_features, b.sparse_features)))
    stream = (_local(b, rank, world, device) for b in train)  # this rank's slice of each global batch
    try:
        while True:
            try:
                loss, _ = pipe.progress(stream)
            except StopIteration:
                return
            yield loss, args.batch_size * world
    finally:
        pipe.close()


def main(argv=None) -> dict[str, float]:
    import torch.distributed as dist
    owned = not (dist.is_available() and dist.is_initialized())
    try:
        result = _main(parse_args(argv))
        if owned and dist.is_available() and dist.is_initialized():
            dist.barrier()  # leave together: rank 0 alone evaluates the quantized model
        return result
    finally:
        # A rank that exits with its gloo group alive, or tears it down while its peer still
        # works, can abort in the group's destructor ("terminate called without an active
        # exception"); the barrier above keeps the ranks in step up to here.
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _main(args) -> dict[str, float]:
    check_flags(args)
    rank, world = _init_distributed(args)
    torch.manual_seed(args.seed)  # the same model on every rank
    try:  # a missing or damaged file: one line naming it, not a traceback
        first = fxrec.checkpoint.read_extra(args.resume)["step"] if args.resume else 0
        train, val, num_tables, num_dense = data_streams(args, world, start=first)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"dlrm_train: {e}") from None
    model = build_model(args, num_tables, num_dense)
    device = _device(args)
    model, optimizer = make_trainable(args, model.to(device), _local(val[0], rank, world, device), rank, world)
    if args.resume:
        try:
            fxrec.checkpoint.load(model, args.resume, optimizer=optimizer)
        except (OSError, ValueError) as e:
            raise SystemExit(f"dlrm_train: {e}") from None
        if rank == 0:
            print(f"resumed from {args.resume} at step {first}")
    start = time.perf_counter()
    steps = (pipelined_steps if args.pipeline else plain_steps)(args, model, optimizer, train, rank, world, device)
    bar = tqdm(steps, total=args.steps, unit="batch", desc="train", disable=rank != 0)
    trained = 0
    for step, (loss, samples) in enumerate(bar):
        trained = step + 1
        if step % 10 == 0:
            rate = (step + 1) * samples / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:,.0f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            # written while training goes on; the next save waits for it to finish
            _save(args, model, optimizer, first + step + 1, background=True)
    if args.save:  # the step reached, not the one asked for, should the stream ever run short
        _save(args, model, optimizer, first + trained)
    result = evaluate(model, val, args.plain, rank, world, device)
    if rank == 0:
        print(f"validation: AUC {result['auc']:.4f}  NE {result['ne']:.4f}  ({len(val)} batches of "
              f"{val[0].batch_size}; {world} rank(s); trained {time.perf_counter() - start:.1f} s)")
    if args.quantize:
        result.update(evaluate_quantized(args, model, val, num_tables, num_dense, rank, world))
    return result


def _save(args, model, optimizer, step: int, background: bool = False) -> None:
    """fxrec.checkpoint.save, its error (a full disk, a path that --save's check could not
    foresee) in one line; a background save's error surfaces at the next save."""
    try:
        fxrec.checkpoint.save(model, args.save, optimizer=optimizer, extra={"step": step}, background=background)
    except OSError as e:
        raise SystemExit(f"dlrm_train: --save {args.save}: {e}") from None


def evaluate_quantized(args, model, val, num_tables: int, num_dense: int, rank: int, world: int) -> dict:
    """Validation AUC / NE of the trained model lowered for inference with each --quantize
    type (rank 0; a sharded model is gathered first, a collective every rank joins)."""
    if args.shard:
        state = model.full_state_dict()  # collective
        if rank != 0:
            return {}
        model = build_model(args, num_tables, num_dense)
        model.load_state_dict(state)
    model = model.cpu()
    example = val[0].to_plain() if args.plain else (val[0].dense_features, val[0].sparse_features)
    out = {}
    for qtype in args.quantize:
        lowered = fxrec.lower_for_inference(model, example, qtype)
        scores = evaluate(lowered, val, args.plain)
        tables = sum(m.layout.numel for m in lowered.modules() if hasattr(m, "dequantized"))
        print(f"validation, tables {qtype} ({tables / 2**20:.1f} MiB): AUC {scores['auc']:.4f}  NE {scores['ne']:.4f}")
        out.update({f"auc_{qtype}": scores["auc"], f"ne_{qtype}": scores["ne"]})
    return out


if __name__ == "__main__":
    main()
