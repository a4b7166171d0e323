"""fxrec.shard against TorchRec's DistributedModelParallel: the same DLRM, the same
sharding, the same data, trained on 2 gloo ranks on CPU; samples/s and peak memory per
rank side by side.

Both frameworks train DLRM (26 tables, bottom and top MLPs, dot interaction) with a
fused row-wise Adagrad on the tables (FBGEMM's EXACT_ROWWISE_ADAGRAD, eps 1e-8) and
torch's Adagrad on the dense parameters, the loss averaged over each rank's local batch.

- fxrec: `fxrec.models.DLRM` over fxrec's `EmbeddingBagCollection` (tables on the meta
  device), sharded by `fxrec.shard(model, Topology(2), example_inputs, plan=...)`.
- TorchRec: `torchrec.models.dlrm.DLRM` over torchrec's `EmbeddingBagCollection` (meta),
  `apply_optimizer_in_backward(RowWiseAdagrad)` and `DistributedModelParallel` with a
  hand-built `ShardingPlan` (fused kernel), dense parameters under DDP.

Every configuration places each table identically in both frameworks (table_wise:
table i on rank i % 2; column_wise: columns [0, D/2) on rank 0 and [D/2, D) on rank 1).
Both models start from the same weights (every table drawn from its own seeded
generator, every Linear from another) and see the same batches (SyntheticCriteo,
global batch sliced per rank; the fxrec KJT converted to torchrec's for TorchRec), so
under table_wise their losses must agree step by step: row-wise Adagrad is invariant to
the 1/W scaling of table gradients fxrec applies and TorchRec does not (up to eps). Under
column_wise they differ by design: TorchRec gives each column shard its own row-wise
accumulator (the mean of g^2 over its columns), fxrec keeps the unsharded update (one
accumulator over the whole row, exchanged between the shards in backward), so the loss
curves agree only roughly (they move apart fastest where training is unstable).

fxrec also runs through its TrainPipeline (the next batch's id all-to-all overlapping the
current step; TorchRec's DMP here runs without its pipeline, as fxrec's first column).

Each framework runs in its own freshly spawned pair of processes (one thread each), so
the RSS high-water marks (``ru_maxrss``) do not mix; the fxrec processes never import
torchrec (checked). Needs TorchRec, which fxrec never depends on: run it from the
bench environment (see bench/planner_vs_torchrec.py for how it is built),

    /work/torchrec-venv/bin/python bench/vs_torchrec.py [--steps 20] [--profile]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

SHARDINGS = ("table_wise", "column_wise")
# fxrec_per_shard: RowWiseAdagrad(exact_column_wise=False), TorchRec's per-column-shard
# accumulators, so that column_wise compares the same computation too. fxrec_pipeline: the
# same steps as fxrec through fxrec.runtime.pipeline.TrainPipeline (the next batch's ids
# all-to-all overlaps the current step): its losses must equal fxrec's exactly.
FRAMEWORKS = {"table_wise": ("fxrec", "fxrec_pipeline", "torchrec"),
              "column_wise": ("fxrec", "fxrec_pipeline", "fxrec_per_shard", "torchrec")}
LABELS = {"fxrec": "fxrec", "fxrec_pipeline": "fxrec + TrainPipeline", "fxrec_per_shard": "fxrec per-shard acc.",
          "torchrec": "TorchRec DMP"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pooling", type=float, default=4.0, help="mean ids per bag (Poisson)")
    p.add_argument("--batch-per-rank", type=int, default=2048)
    p.add_argument("--bottom", type=int, nargs="+", default=[256, 64], help="bottom MLP (ends in --dim)")
    p.add_argument("--top", type=int, nargs="+", default=[256, 128, 1])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--comm-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the dtype pooled embeddings and their gradients cross ranks in: fxrec.shard's "
                        "comm_dtype, TorchRec's QCommsConfig forward and backward precision")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--repeats", type=int, default=2, help="runs per framework (alternating); the best is reported")
    p.add_argument("--shardings", nargs="+", choices=SHARDINGS, default=list(SHARDINGS))
    p.add_argument("--profile", action="store_true",
                   help="also profile each framework's step on rank 0 (torch.profiler) and print top ops")
    return p.parse_args(argv)


# ------------------------------------------------------------------ shared pieces
def table_names(args) -> list[str]:
    return [f"t_cat_{i}" for i in range(args.tables)]


def placement(args, sharding: str) -> dict[str, list[tuple[int, tuple[int, int]]]]:
    """Table -> [(rank, (col start, col end))], the same for both frameworks."""
    out = {}
    for i, name in enumerate(table_names(args)):
        if sharding == "table_wise":
            out[name] = [(i % args.world, (0, args.dim))]
        else:
            step = args.dim // args.world
            out[name] = [(r, (r * step, (r + 1) * step)) for r in range(args.world)]
    return out


def full_table(i: int, rows: int, dim: int) -> torch.Tensor:
    """Table i's initial weights (uniform +-sqrt(1/rows), both frameworks' default law)."""
    gen = torch.Generator().manual_seed(1000 + i)
    bound = (1.0 / rows) ** 0.5
    return torch.rand(rows, dim, generator=gen) * (2 * bound) - bound


@torch.no_grad()
def init_dense(model: torch.nn.Module, target: torch.nn.Module | None = None) -> int:
    """Every nn.Linear of `model`, in module order (bottom MLP, then top MLP in both
    DLRMs), gets weights from its own seeded generator; written into `target`'s module
    of the same path when given (a sharded copy). Returns how many were set."""
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for k, (path, lin) in enumerate(linears):
        dst = target.get_submodule(path) if target is not None else lin
        gen = torch.Generator().manual_seed(k)
        bound = (1.0 / lin.in_features) ** 0.5
        dst.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * (2 * bound) - bound)
        dst.bias.copy_(torch.rand(lin.bias.shape, generator=gen) * (2 * bound) - bound)
    return len(linears)


def local_batches(args, rank: int) -> list:
    from fxrec.datasets import SyntheticCriteo

    data = SyntheticCriteo(num_embeddings=args.rows, num_tables=args.tables, pooling_factors=args.pooling,
                           batch_size=args.batch_per_rank * args.world, seed=0)
    n = args.batch_per_rank
    return [data.batch(i).slice(rank * n, (rank + 1) * n) for i in range(args.warmup + args.steps)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------ fxrec
FXREC_TABLE_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags."


def build_fxrec(args, sharding: str, batches, exact_column_wise: bool = True, pipeline: bool = False):
    import fxrec
    from fxrec.models import DLRM
    from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
    from fxrec.planner.spec import Shard, TablePlan
    from fxrec.types import TableInfo

    names = table_names(args)
    # Tables on meta, dense layers on the CPU: the same model TorchRec's side builds.
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(n, args.rows, args.dim, [f"cat_{i}"])
                                  for i, n in enumerate(names)], device=torch.device("meta"))
    model = DLRM(ebc, 13, args.bottom, args.top, dense_device=torch.device("cpu"))
    topo = fxrec.Topology(args.world)
    tables = {}
    for short, shards in placement(args, sharding).items():
        n = FXREC_TABLE_PREFIX + short  # fxrec names a table by its module path
        info = TableInfo(n, args.rows, args.dim, pooling_factor=args.pooling)
        tables[n] = TablePlan(n, sharding, "fbgemm", [Shard(r, (0, args.rows), c) for r, c in shards], info)
    plan = fxrec.Plan(tables, topo, args.batch_per_rank)
    example = (batches[0].dense_features, batches[0].sparse_features)
    sparse = fxrec.optim.RowWiseAdagrad(lr=args.lr, exact_column_wise=exact_column_wise)
    sharded = fxrec.shard(model, topo, example, plan=plan, sparse_optimizer=sparse,
                          comm_dtype=None if args.comm_dtype == "fp32" else args.comm_dtype)
    for name, pieces in sharded.local_shards().items():
        full = full_table(names.index(name[len(FXREC_TABLE_PREFIX):]), args.rows, args.dim)
        for (r0, r1), (c0, c1), w in pieces:
            w.copy_(full[r0:r1, c0:c1])
    init_dense(model, sharded.module)
    opt = torch.optim.Adagrad(sharded.parameters(), lr=args.lr)

    def loss_fn(out, batch):
        return F.binary_cross_entropy_with_logits(out.squeeze(1), batch.labels)

    if pipeline:  # the same steps through fxrec's TrainPipeline: the next batch's ids travel early
        from fxrec.runtime.pipeline import TrainPipeline

        pipe = TrainPipeline(sharded, opt, loss_fn, inputs=lambda b: (b.dense_features, b.sparse_features))
        stream = itertools.cycle(batches)  # the timed loop (and the profiled steps) walk `batches` in order

        def step(batch):
            return pipe.progress(stream)[0]

        return step, batches, lambda: fxrec_table_bytes(sharded)

    def step(batch):
        loss = loss_fn(sharded(batch.dense_features, batch.sparse_features), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step, batches, lambda: fxrec_table_bytes(sharded)


def fxrec_table_bytes(sharded) -> tuple[int, int]:
    from fxrec.lowering.tbe import FusedEmbeddingBags

    weights = state = 0
    for m in sharded.modules():
        if isinstance(m, FusedEmbeddingBags):
            weights += m.weights.nbytes
            state += sum(t.nbytes for t in m.optimizer_state().values())
    return weights, state


# ------------------------------------------------------------------ TorchRec
def to_torchrec_kjt(kjt):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=list(kjt.keys()), values=kjt.values(), lengths=kjt.lengths(), stride=kjt.stride())


def build_torchrec(args, sharding: str, batches):
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingEnv
    from torchrec.models.dlrm import DLRM
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    names = table_names(args)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name=n, embedding_dim=args.dim, num_embeddings=args.rows,
                                                     feature_names=[f"cat_{i}"]) for i, n in enumerate(names)],
                                 device=torch.device("meta"))
    model = DLRM(ebc, 13, args.bottom, args.top, dense_device=torch.device("cpu"))
    init_dense(model)
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": args.lr, "eps": 1e-8})
    sharder = EmbeddingBagCollectionSharder(qcomm_codecs_registry=torchrec_qcomms(args.comm_dtype))
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=torchrec_plan(args, sharding, ebc, sharder),
                                   sharders=[sharder])
    torchrec_load_tables(dmp, names, args)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    opt = KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adagrad(params, lr=args.lr))
    tr_batches = [(b.dense_features, to_torchrec_kjt(b.sparse_features), b.labels) for b in batches]

    def step(batch):
        dense_x, kjt, labels = batch
        loss = F.binary_cross_entropy_with_logits(dmp(dense_x, kjt).squeeze(1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step, tr_batches, lambda: torchrec_table_bytes(dmp)


def torchrec_qcomms(comm_dtype: str):
    """TorchRec's codecs for --comm-dtype (None for fp32: no quantized comms)."""
    if comm_dtype == "fp32":
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
    precision = {"bf16": CommType.BF16, "fp16": CommType.FP16}[comm_dtype]
    return get_qcomm_codecs_registry(QCommsConfig(forward_precision=precision, backward_precision=precision))


def torchrec_plan(args, sharding: str, ebc, sharder):
    """The hand-built ShardingPlan: `placement`'s ranks, fused (FBGEMM TBE) kernel."""
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    per_table = {}
    for n, shards in placement(args, sharding).items():
        per_table[n] = (table_wise(rank=shards[0][0], compute_kernel="fused") if sharding == "table_wise" else
                        column_wise(ranks=[r for r, _ in shards], compute_kernel="fused"))
    module_plan = construct_module_sharding_plan(ebc, per_table, sharder=sharder, local_size=args.world,
                                                 world_size=args.world, device_type="cpu")
    return ShardingPlan({"sparse_arch.embedding_bag_collection": module_plan})


@torch.no_grad()
def torchrec_load_tables(dmp, names: list[str], args) -> None:
    """Copy the shared initial tables into this rank's local shards (live views of the
    fused kernel's weights)."""
    done = 0
    for key, value in dmp.state_dict().items():
        if not key.endswith(".weight") or ".embedding_bags." not in key:
            continue
        name = key.split(".embedding_bags.")[1][: -len(".weight")]
        full = full_table(names.index(name), args.rows, args.dim)
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[r0:r0 + nr, c0:c0 + nc])
            done += 1
    if done == 0:
        raise RuntimeError("TorchRec: found no local table shards in the DMP state_dict")


def torchrec_table_bytes(dmp) -> tuple[int, int]:
    """(weights, optimizer state) bytes held by this rank's FBGEMM TBE modules, read from
    their split attributes (weights_host/_dev/_uvm, momentum*_...) whatever registered them."""
    weights = state = 0
    seen = set()
    # Sharded modules keep their lookups in a plain list (`_lookups`), out of modules().
    lookups = [lk for m in dmp.modules() for lk in getattr(m, "_lookups", None) or []]
    for m in (sub for lk in lookups for sub in lk.modules()):
        if type(m).__name__ != "SplitTableBatchedEmbeddingBagsCodegen":
            continue
        for prefix in ("weights", "momentum1", "momentum2"):
            for where in ("host", "dev", "uvm"):
                t = getattr(m, f"{prefix}_{where}", None)
                if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                if prefix == "weights":
                    weights += t.nbytes
                else:
                    state += t.nbytes
    return weights, state


# ------------------------------------------------------------------ one rank
def worker(rank: int, framework: str, sharding: str, args, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    rss_start = rss_mb()
    batches = local_batches(args, rank)
    rss_data = rss_mb()
    if framework == "torchrec":
        step, batches, table_bytes = build_torchrec(args, sharding, batches)
    else:
        step, batches, table_bytes = build_fxrec(args, sharding, batches, framework != "fxrec_per_shard",
                                                 pipeline=framework == "fxrec_pipeline")
    losses, times = [], []
    dist.barrier()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        t0 = time.perf_counter()
        losses.append(float(step(batch).detach()))
        times.append(time.perf_counter() - t0)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if framework != "torchrec" and "torchrec" in sys.modules:
        raise RuntimeError("the fxrec run imported torchrec")
    peak = peak_rss_mb()  # before the profiler's own allocations
    profiled = args.profile
    profile = extra_profiled_steps(step, batches, rank) if profiled else None  # after peak, elapsed
    w, s = table_bytes()
    result = dict(rank=rank, losses=losses, step_times=times[args.warmup:], elapsed=elapsed, peak_rss=peak,
                  rss_start=rss_start, rss_data=rss_data, table_bytes=w, state_bytes=s,
                  profile=profile)
    with open(os.path.join(out_dir, f"{framework}_{sharding}_{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def extra_profiled_steps(step, batches, rank: int):
    """Five more steps, profiled on rank 0 (the other ranks run them unprofiled: the
    steps are collective); rank 0 returns its top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    if rank != 0:
        for batch in batches[:5]:
            step(batch)
        return None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[:5]:
            step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(framework: str, sharding: str, args, out_dir: str) -> list[dict]:
    """Spawn a fresh group of ranks for one framework; their results, by rank."""
    mp.spawn(worker, args=(framework, sharding, args, _free_port(), out_dir), nprocs=args.world)
    out = []
    for r in range(args.world):
        with open(os.path.join(out_dir, f"{framework}_{sharding}_{r}.json")) as f:
            out.append(json.load(f))
    return out


# ------------------------------------------------------------------ report
def _versions() -> str:
    from importlib.metadata import version

    return (f"torch {torch.__version__}, torchrec {version('torchrec')}, fbgemm-gpu-cpu {version('fbgemm-gpu-cpu')}, "
            f"fxrec {version('fxrec')}")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{platform.node()}: {os.cpu_count()} cores ({model})"


def summary(results: list[dict], args) -> dict:
    world_batch = args.batch_per_rank * args.world
    elapsed = max(r["elapsed"] for r in results)
    ms = sorted(sum(r["step_times"][i] for r in results) / len(results) for i in range(args.steps))
    return dict(samples_s=world_batch * args.steps / elapsed, ms_step=1e3 * elapsed / args.steps,
                median_ms=1e3 * ms[len(ms) // 2],
                peak=[r["peak_rss"] for r in results], grown=[r["peak_rss"] - r["rss_data"] for r in results],
                start=[r["rss_start"] for r in results],
                tables=[(r["table_bytes"] + r["state_bytes"]) / 2**20 for r in results],
                losses=[sum(r["losses"][i] for r in results) / len(results) for i in range(len(results[0]["losses"]))])


def report(sharding: str, runs: dict[str, dict], args) -> list[str]:
    """The side-by-side table of one sharding; `runs`: framework -> its best run's summary."""
    def per_rank(values, fmt="{:.0f}"):
        return " / ".join(fmt.format(v) for v in values)

    names = list(runs)
    rows = [("samples/s (global)", lambda r: f"{r['samples_s']:,.0f}"),
            ("ms/step (mean; median)", lambda r: f"{r['ms_step']:.1f}; {r['median_ms']:.1f}"),
            ("peak RSS MiB, rank 0 / 1", lambda r: per_rank(r["peak"])),
            ("  growth after data (import+model+train)", lambda r: per_rank(r["grown"])),
            ("  RSS at start (torch + gloo) MiB", lambda r: per_rank(r["start"])),
            ("tables + optimizer state MiB", lambda r: per_rank(r["tables"], "{:.1f}")),
            ("loss, step 1 (mean of ranks)", lambda r: f"{r['losses'][0]:.6f}"),
            (f"loss, step {len(runs['fxrec']['losses'])}", lambda r: f"{r['losses'][-1]:.6f}")]
    lines = [f"== {sharding}: {args.tables} tables x {args.rows:,} rows x dim {args.dim}, "
             f"batch {args.batch_per_rank} per rank x {args.world} ranks",
             f"{'':38s}" + "".join(f"{LABELS[n]:>22s}" for n in names)]
    lines += [f"{label:38s}" + "".join(f"{cell(runs[n]):>22s}" for n in names) for label, cell in rows]
    tr = runs["torchrec"]
    for n in names[:-1]:
        diff = max(abs(a - b) for a, b in zip(runs[n]["losses"], tr["losses"]))
        lines.append(f"{LABELS[n]} / TorchRec samples/s: {runs[n]['samples_s'] / tr['samples_s']:.3f}   "
                     f"max |loss difference| over all {len(tr['losses'])} steps: {diff:.2e}")
    return lines


def spread_lines(got: dict[str, list[dict]]) -> list[str]:
    """Beside the best runs: each framework's median run against TorchRec's, and the ratio
    within each repeat (the two runs back to back, so a slow drift of the machine's load
    cancels), with its median."""
    tr = [r["samples_s"] for r in got["torchrec"]]
    lines = []
    for f, runs in got.items():
        if f == "torchrec":
            continue
        mine = [r["samples_s"] for r in runs]
        pairs = [a / b for a, b in zip(mine, tr)]
        lines.append(f"{LABELS[f]} / TorchRec: medians {statistics.median(mine):,.0f} / {statistics.median(tr):,.0f}"
                     f" = {statistics.median(mine) / statistics.median(tr):.3f}; per repeat "
                     + ", ".join(f"{p:.2f}" for p in pairs) + f" (median {statistics.median(pairs):.3f})")
    return lines


def _header() -> str:
    from datetime import datetime

    cmd = " ".join([sys.executable, *sys.argv])
    return f"# {cmd}  ({datetime.now():%Y-%m-%d %H:%M}, {_cpu()})\n# {_versions()}"


def run_both(sharding: str, args, out_dir: str) -> dict[str, list[dict]]:
    """Each framework `--repeats` times, alternating which goes first (the machine is
    shared, its load drifts); every run's summary, by framework."""
    frameworks = FRAMEWORKS[sharding]
    got: dict[str, list[dict]] = {f: [] for f in frameworks}
    for rep in range(args.repeats):
        for framework in frameworks if rep % 2 == 0 else frameworks[::-1]:
            run_args = argparse.Namespace(**{**vars(args), "profile": args.profile and rep == 0})
            load, t0 = os.getloadavg()[0], time.perf_counter()
            results = run(framework, sharding, run_args, out_dir)
            got[framework].append(summary(results, args) | {"profile": results[0]["profile"]})
            print(f"# {sharding} / {framework} run {rep + 1}: {got[framework][-1]['samples_s']:,.0f} samples/s; "
                  f"took {time.perf_counter() - t0:.0f} s; 1-min load average before {load:.2f}, "
                  f"after {os.getloadavg()[0]:.2f}", flush=True)
    return got


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.bottom[-1] != args.dim or args.dim % args.world:
        raise SystemExit(f"vs_torchrec: --bottom must end in --dim ({args.dim}) and --dim divide by --world")
    print(_header())
    print(f"# pooling ~{args.pooling} ids/bag (Poisson), bottom MLP {args.bottom}, top MLP {args.top}, "
          f"lr {args.lr}; pooled embeddings cross ranks in {args.comm_dtype}; {args.warmup} warm-up + "
          f"{args.steps} timed steps; 1 thread per rank, gloo; "
          f"each framework run {args.repeats}x in fresh processes, best run reported (medians below it); "
          f"the 2 cores are shared with other jobs (load averages below)", flush=True)
    with tempfile.TemporaryDirectory() as out_dir:
        for sharding in args.shardings:
            got = run_both(sharding, args, out_dir)
            best = {f: max(runs, key=lambda r: r["samples_s"]) for f, runs in got.items()}
            print("\n".join(report(sharding, best, args)))
            print("samples/s of every run: " + "; ".join(
                f"{LABELS[f]} " + ", ".join(f"{r['samples_s']:,.0f}" for r in runs) for f, runs in got.items()))
            print("\n".join(spread_lines(got)))
            for f, runs in got.items():
                if runs[0]["profile"]:
                    print(f"-- {LABELS[f]}, rank 0: ops over 5 more {sharding} steps under torch.profiler "
                          f"(sorted by self CPU time):\n{runs[0]['profile']}")
            print(flush=True)


if __name__ == "__main__":
    main()
