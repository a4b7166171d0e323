"""Fused embedding kernels against the memory-bandwidth floor and against plain torch.

    python bench/kernels.py           # full shapes (meant for a GPU)
    python bench/kernels.py --cpu     # small shapes, runs on a CPU in about a minute

Per shape: the bytes a pooled lookup must move (rows read + ids + offsets + output
written), the measured copy bandwidth (a large tensor copy: read + write), the floor
time = bytes / bandwidth, then each implementation's time and floor/time in percent.
Zipf ids repeat hot rows, which caches serve, so their "% of floor" can exceed 100.

Training step (forward + backward + optimizer): fxrec's fused module against
nn.EmbeddingBag(sparse=True) + torch.optim.SGD / Adagrad: fxrec's SGD, its Adagrad (the same
math as torch's: a state per element) and its RowWiseAdagrad (one state per row, FBGEMM's usual
choice; against torch's Adagrad too) and, in --cpu mode, against
the dense-gradient nn.EmbeddingBag + SGD step. Its floor: the forward's bytes, plus
reading the output gradient and reading and writing each touched row and its optimizer
state (`update_bytes`); "% floor" is given for every row of that table.

    python bench/kernels.py --sweep   # (GPU) Triton launch configurations side by side

--sweep times fxrec's Triton kernels under several launch configurations (ids per step
and warps for the forward; unique rows per program and warps for the fused update) on a
few shapes, so that one short GPU session shows which configuration the defaults should be.
"""
from __future__ import annotations

import argparse
import copy
import warnings
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxrec.lowering import FusedEmbeddingBags, NoKernelError, TBELayout, check_inputs, select
from fxrec.lowering.sparse_update import sort_occurrences
from fxrec.optim import SGD, Adagrad, RowWiseAdagrad
from fxrec.types import TableInfo


ROUNDS = 3  # forward timings: best of this many interleaved rounds


@dataclass
class Shape:
    name: str
    T: int
    rows: int
    B: int
    L: int  # ids per bag (fixed pooling factor)
    D: int
    dtype: torch.dtype = torch.float32
    dist: str = "uniform"  # or "zipf"

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.name} T={self.T} rows={self.rows} B={self.B} L={self.L} D={self.D} {dt} {self.dist}"


def full_shapes() -> list[Shape]:
    out = [Shape("criteo", 26, 500_000, 16384, 20, d, dt, dist)
           for d in (128, 64) for dt in (torch.float32, torch.float16) for dist in ("uniform", "zipf")]
    return out + [Shape("fbgemm-default", 32, 100_000, 512, 20, 128)]


def cpu_shapes() -> list[Shape]:
    return [Shape("criteo-small", 26, 20_000, 1024, 20, 64),
            Shape("criteo-small", 26, 20_000, 1024, 20, 64, dist="zipf"),
            Shape("criteo-small", 26, 20_000, 1024, 20, 64, torch.float16),
            Shape("fbgemm-default-small", 32, 10_000, 256, 20, 128)]


# ---------------------------------------------------------------- inputs and timing
def make_ids(s: Shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Table-major ids (int64) and offsets, L ids per bag. Zipf: density ~ 1/(id+1),
    hot ids scattered over the table by a multiplicative hash."""
    n = s.T * s.B * s.L
    if s.dist == "zipf":
        u = torch.rand(n, device=device, dtype=torch.float64)
        ids = (torch.exp(u * math.log(s.rows + 1)) - 1).long().clamp_(0, s.rows - 1)
        ids = (ids * 1_000_003) % s.rows
    else:
        ids = torch.randint(0, s.rows, (n,), device=device)
    offsets = torch.arange(0, n + 1, s.L, device=device)
    return ids, offsets


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, min_iters=3, min_time=0.25, max_iters=50) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up (compilation, allocator)
    sync(device)
    if time.perf_counter() - t0 > 2.0:  # a slow baseline: one timed run is enough
        min_iters = 1
    n, t0 = 0, time.perf_counter()
    while n < min_iters or (time.perf_counter() - t0 < min_time and n < max_iters):
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n


def queued_gpu_time(fn, iters: int = 20) -> float:
    """Seconds per call of `fn` on the GPU alone: a long `torch.cuda._sleep` goes first, so
    the host queues every call while the GPU sleeps, then CUDA events time the calls back to
    back, without the host's launch overhead in between (which `timeit`'s wall time includes:
    at FBGEMM's default shape the lookup moves ~180 MB, tens of microseconds on an H100/H200).
    A `fn` that synchronises ends
    the sleep early and then counts its host time too: an upper bound either way."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s at ~2 GHz: longer than queuing `iters` calls
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(device) -> float:
    """Bytes/s of a large copy, counting the read and the write."""
    numel = (64 if torch.device(device).type == "cuda" else 16) * 2**20
    src = torch.empty(numel, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timeit(lambda: dst.copy_(src), device, min_iters=5)


def lookup_bytes(s: Shape) -> int:
    eb = torch.empty((), dtype=s.dtype).element_size()
    n = s.T * s.B * s.L
    return n * s.D * eb + n * 8 + (s.T * s.B + 1) * 8 + s.B * s.T * s.D * eb


def touched_rows(s: Shape, ids: torch.Tensor) -> int:
    """Distinct (table, id) pairs of the batch: the rows a sparse update reads and writes."""
    return int(torch.unique(ids.view(s.T, -1) + torch.arange(s.T, device=ids.device).unsqueeze(1) * s.rows).numel())


def update_bytes(s: Shape, unique_rows: int, optimizer) -> int:
    """The fused update's floor bytes: the output gradient read once and every touched row
    and its optimizer state read and written. A training step's floor adds the forward's
    (`lookup_bytes`)."""
    eb = torch.empty((), dtype=s.dtype).element_size()
    return s.B * s.T * s.D * eb + unique_rows * 2 * (s.D * eb + optimizer.state_bytes_per_row(s.D))


def fxrec_optimizer(which: str):
    """fxrec's sparse optimizer for a training comparison ("sgd", "adagrad": the exact one, whose
    math is torch.optim.Adagrad's, or "rowwise_adagrad")."""
    return {"sgd": SGD(0.01), "adagrad": Adagrad(0.01), "rowwise_adagrad": RowWiseAdagrad(0.01)}[which]


# ---------------------------------------------------------------- implementations
def shape_tables(s: Shape) -> list[TableInfo]:
    return [TableInfo(f"t{t}", s.rows, s.D, dtype=s.dtype) for t in range(s.T)]


def fused(s: Shape, device, optimizer=None, kernel=None, bounds_check=False) -> FusedEmbeddingBags:
    return FusedEmbeddingBags(shape_tables(s), optimizer=optimizer, kernel=kernel, device=device,
                              bounds_check=bounds_check)


def forward_impls(s: Shape, device, ids, offsets):
    """name -> zero-argument callable computing the B x (T*D) pooled output."""
    impls = {}
    model = fused(s, device)
    tables = model.split_weights()  # the torch baselines read the same weights
    per_ids = ids.view(s.T, -1)
    per_off = torch.arange(0, s.B * s.L, s.L, device=device)
    impls["torch per-table"] = lambda: torch.cat(
        [F.embedding_bag(per_ids[t], tables[t], per_off, mode="sum") for t in range(s.T)], dim=1)
    big = model.weights.view(s.T * s.rows, s.D)  # the tables stacked: one concatenated table
    shifted = (ids.view(s.T, -1) + torch.arange(s.T, device=device).unsqueeze(1) * s.rows).view(-1)
    impls["torch concat-table"] = lambda: F.embedding_bag(shifted, big, offsets[:-1], mode="sum") \
        .view(s.T, s.B, s.D).transpose(0, 1).reshape(s.B, s.T * s.D)
    impls[f"fxrec:{model.kernel}"] = lambda: model(ids, offsets)
    # the default module: the same tables, ids and offsets validated on every call (by its kernel
    # where that checks the ids as it loads them, else by check_inputs first)
    checked = copy.copy(model)  # a new __dict__ over the same buffers: the same tables, no copy
    checked.bounds_check = True
    impls[f"fxrec:{model.kernel} +bounds"] = lambda: checked(ids, offsets)
    for other in ("fbgemm", "torch"):  # the kernels the registry did not pick, forced
        try:
            name, impl = select("pooled_forward", kernel=other, device=device, weight_dtype=s.dtype,
                                dims=model.layout.dims, poolings=model.layout.poolings)
        except NoKernelError:
            continue
        if name != model.kernel:
            impls[f"fxrec:{name} (forced)"] = lambda impl=impl: impl(model.weights, model.layout, ids, offsets)
    if torch.device(device).type == "cuda":
        fb = fbgemm_cuda(s, None)
        if fb is not None:
            impls["fbgemm (cuda TBE)"] = lambda: fb(ids, offsets)
    return impls


def fbgemm_cuda(s: Shape, optimizer):
    """fbgemm_gpu's own CUDA TBE module for comparison, or None where unavailable."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
        opt = (EmbOptimType.EXACT_ROWWISE_ADAGRAD if isinstance(optimizer, RowWiseAdagrad) else
               EmbOptimType.EXACT_ADAGRAD if isinstance(optimizer, Adagrad) else EmbOptimType.EXACT_SGD)
        prec = SparseType.FP16 if s.dtype == torch.float16 else SparseType.FP32
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(s.rows, s.D, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)] * s.T, optimizer=opt,
            learning_rate=optimizer.lr if optimizer else 0.01, weights_precision=prec, output_dtype=prec)
    except Exception as e:  # the CPU-only build, or no GPU
        print(f"  (fbgemm cuda TBE unavailable: {type(e).__name__}: {str(e)[:80]})")
        return None


def print_row(cols, widths=(30, 11, 9, 9)) -> None:
    widths = tuple(widths) + (11,) * (len(cols) - len(widths))  # extra columns: 11 wide
    print("  " + "".join(str(c).ljust(w) for c, w in zip(cols, widths)))


def bench_forward(shapes, device, bw) -> None:
    print(f"\n== pooled forward on {device} ({torch.get_num_threads()} CPU threads); "
          f"copy bandwidth {bw / 1e9:.1f} GB/s ==")
    for s in shapes:
        ids, offsets = make_ids(s, device)
        nbytes = lookup_bytes(s)
        floor = nbytes / bw
        print(f"\n{s.label()}\n  bytes moved {nbytes / 1e6:.1f} MB, floor {floor * 1e3:.3f} ms")
        cuda = torch.device(device).type == "cuda"
        # on a GPU also the kernels' own time, without the host's launch overhead
        print_row(("impl", "time ms", "% floor", "x torch") + (("gpu ms", "% floor") if cuda else ()))
        base = None
        with torch.no_grad():
            impls = forward_impls(s, device, ids, offsets)
        # best of ROUNDS interleaved rounds: timed one after another, the first implementation
        # alone paid for a cold start (page faults, clocks) and the ratios leaned its way
        times = {name: float("inf") for name in impls}
        for _ in range(ROUNDS):
            for name, fn in impls.items():
                with torch.no_grad():
                    times[name] = min(times[name], timeit(fn, device))
        for name, fn in impls.items():
            t = times[name]
            with torch.no_grad():
                g = queued_gpu_time(fn) if cuda else None
            base = base or t
            print_row((name, f"{t * 1e3:.3f}", f"{100 * floor / t:.1f}", f"{base / t:.2f}")
                      + ((f"{g * 1e3:.3f}", f"{100 * floor / g:.1f}") if cuda else ()))
        print_bounds_cost(s, device, ids, offsets, times)


def print_bounds_cost(s: Shape, device, ids, offsets, times) -> None:
    """The bounds check's cost. Timed alone where it runs before the lookup (check_inputs): the
    +bounds row minus the plain one is a difference of two noisy times, this is not. A kernel
    that checks the ids as it loads them has no check to time alone; there the difference it is."""
    picked = next(n for n in times if n.startswith("fxrec:") and "(forced)" not in n and "+bounds" not in n)
    _, impl = select("pooled_forward", device=device, weight_dtype=s.dtype, index_dtype=ids.dtype,
                     dims=(s.D,) * s.T, poolings=("sum",) * s.T, threads=torch.get_num_threads())
    if getattr(impl, "checks_ids", False):
        extra = times[f"{picked} +bounds"] - times[picked]
        print(f"  bounds check in the kernel: +bounds - plain = {extra * 1e3:.3f} ms = "
              f"{100 * extra / times[picked]:.1f}% of {picked}")
        return
    layout = TBELayout(shape_tables(s), device)
    check = timeit(lambda: check_inputs(layout, ids, offsets), device)
    print(f"  bounds check alone {check * 1e3:.3f} ms = {100 * check / times[picked]:.1f}% of {picked}")


# ---------------------------------------------------------------- training step
def torch_bags(s: Shape, device, sparse: bool) -> nn.ModuleList:
    return nn.ModuleList(nn.EmbeddingBag(s.rows, s.D, mode="sum", sparse=sparse, device=device)
                         for _ in range(s.T))


def torch_step(bags, opt, per_ids, per_off, grad):
    out = torch.cat([bag(per_ids[t], per_off) for t, bag in enumerate(bags)], dim=1)
    out.backward(grad)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_impls(s: Shape, device, ids, offsets, grad, which: str, dense: bool):
    """name -> (build() -> step callable). Built one at a time to bound memory."""
    per_ids, per_off = ids.view(s.T, -1), torch.arange(0, s.B * s.L, s.L, device=device)
    fxrec_opt = fxrec_optimizer(which)
    torch_opt = (lambda p: torch.optim.SGD(p, lr=0.01)) if which == "sgd" else \
        (lambda p: torch.optim.Adagrad(p, lr=0.01))

    def build_fused(kernel=None):
        m = fused(s, device, fxrec_opt, kernel=kernel, bounds_check=True)  # the default module
        return lambda: m(ids, offsets).backward(grad), "/".join(m.kernels.values())

    def build_torch(sparse):
        bags = torch_bags(s, device, sparse)
        opt = torch_opt(bags.parameters())
        return lambda: torch_step(bags, opt, per_ids, per_off, grad), None

    def build_fbgemm():
        emb = fbgemm_cuda(s, fxrec_opt)
        return (lambda: emb(ids, offsets).backward(grad)), "fbgemm" if emb is not None else None

    impls = {f"fxrec fused {fxrec_opt.name}": build_fused,
             f"torch EmbeddingBag(sparse) + {'sgd' if which == 'sgd' else 'adagrad'}": lambda: build_torch(True)}
    if torch.device(device).type == "cpu":
        impls["fxrec fused (torch kernel)"] = lambda: build_fused("torch")
    else:
        impls["fbgemm (cuda TBE)"] = build_fbgemm
    if dense and which == "sgd":
        impls[f"torch EmbeddingBag(dense) + {which}"] = lambda: build_torch(False)
    return impls


def bench_training(s: Shape, device, dense: bool, bw: float) -> None:
    print(f"\n== training step (fwd + bwd + optimizer) on {device}: {s.label()} ==")
    ids, offsets = make_ids(s, device)
    grad = torch.randn(s.B, s.T * s.D, device=device, dtype=s.dtype)
    unique = touched_rows(s, ids)
    widths = (46, 11, 15, 14, 9)
    for which in ("sgd", "adagrad", "rowwise_adagrad"):
        floor = (lookup_bytes(s) + update_bytes(s, unique, fxrec_optimizer(which))) / bw
        print(f"  {which}: {unique:,} touched rows; floor {floor * 1e3:.3f} ms (forward + read the output "
              f"gradient + read/write touched rows{'' if which == 'sgd' else ' and their fp32 state'})")
        print_row(("impl", "time ms", "fwd/bwd", "time / fused", "% floor"), widths)
        fused_t = None
        for name, build in train_impls(s, device, ids, offsets, grad, which, dense).items():
            step, kernel = build()
            if kernel is None and name.startswith("fbgemm"):
                continue
            t = timeit(step, device, min_iters=2, min_time=0.5)
            fused_t = fused_t or t
            print_row((name, f"{t * 1e3:.2f}", kernel or "-", f"{t / fused_t:.2f}", f"{100 * floor / t:.1f}"),
                      widths)
            del step
    print("  (torch.optim.Adagrad keeps element-wise state, as fxrec's Adagrad does; its RowWiseAdagrad one value "
          "per row)")


# ---------------------------------------------------------------- Triton launch sweep
# one warp too: an fp16 row of 128 is 256 bytes, 8 per thread of one warp (2 warps: 4 bytes each)
FWD_CONFIGS = [None] + [{"block_n": n, "num_warps": w} for n in (8, 16, 32) for w in (1, 2, 4, 8)] + [
    {"bags": b, "block_n": n, "num_warps": w} for b, n, w in  # several bags per program (triton/ops.py)
    ((2, 8, 2), (4, 8, 2), (4, 8, 4), (8, 8, 4), (4, 4, 2), (8, 4, 4), (4, 8, 1))]
# rows=0: the one-row kernel; rows=16 at dim 128 needs 8 warps not to spill (see triton/ops.py)
BWD_CONFIGS = [None] + [{"rows": r, "num_warps": w} for r in (0, 8, 16) for w in (2, 4, 8)]


def sweep_shapes(small: bool) -> list[Shape]:
    if small:  # the interpreter on a CPU: only that the sweep runs
        return [Shape("tiny", 3, 1000, 16, 4, 16)]
    return [Shape("criteo", 26, 500_000, 16384, 20, 128), Shape("criteo", 26, 500_000, 16384, 20, 64, torch.float16),
            Shape("criteo", 26, 500_000, 16384, 20, 128, dist="zipf"), Shape("fbgemm-default", 32, 100_000, 512, 20, 128)]


def _config_label(config) -> str:
    return "default" if config is None else " ".join(f"{k}={v}" for k, v in config.items())


def sweep(device, bw: float, small: bool = False) -> None:
    """Time fxrec's Triton forward and fused SGD / RowWiseAdagrad update per launch config."""
    from fxrec.lowering.triton import ops
    for s in sweep_shapes(small):
        ids, offsets = make_ids(s, device)
        fwd_floor = lookup_bytes(s) / bw
        print(f"\n== Triton sweep on {device}: {s.label()} ==")
        block_d = ops._block_d(s.D)
        rows = ops._bwd_rows(block_d)
        print(f"  forward floor {fwd_floor * 1e3:.3f} ms; defaults: forward block_n="
              f"{ops._POOLED_BLOCK_N} num_warps={ops._POOLED_NUM_WARPS}, update rows={rows} "
              f"num_warps={ops._bwd_warps(rows, block_d)}")
        print_row(("forward config", "time ms", "% floor"), (30, 11, 9))
        m = fused(s, device)
        cuda = torch.device(device).type == "cuda"
        for config in FWD_CONFIGS:
            def call():
                return ops.pooled_forward(m.weights, m.layout, ids, offsets, config=config)
            t = timeit(call, device)
            extra = ()
            if cuda:
                g = queued_gpu_time(call)
                extra = (f"gpu {g * 1e3:.3f} ms", f"{100 * fwd_floor / g:.1f}%")
            print_row((_config_label(config), f"{t * 1e3:.3f}", f"{100 * fwd_floor / t:.1f}") + extra,
                      (30, 11, 9, 16, 9))
        if not (small or s.name == "criteo"):  # the update: the criteo shapes (compile time)
            continue
        grad = torch.randn(s.B, s.T * s.D, device=device, dtype=s.dtype)
        unique = touched_rows(s, ids)
        # the update's first part, in torch: where the time goes that the kernel configs cannot win
        t_sort = timeit(lambda: sort_occurrences(m.layout, ids, offsets), device)
        print(f"  of every update below: the occurrence sort (sparse_update.sort_occurrences, torch) {t_sort * 1e3:.3f} ms")
        for opt in (fxrec_optimizer("sgd"), fxrec_optimizer("rowwise_adagrad")):
            floor = update_bytes(s, unique, opt) / bw
            print(f"  fused {opt.name} update alone: {unique:,} touched rows, floor {floor * 1e3:.3f} ms")
            print_row((f"{opt.name} config", "time ms", "% floor"), (30, 11, 9))
            m = fused(s, device, opt)
            state = m.optimizer_state()
            for config in BWD_CONFIGS:
                t = timeit(lambda: ops.backward_update(m.weights, state, m.layout, opt, grad, ids, offsets,
                                                       config=config), device)
                print_row((_config_label(config), f"{t * 1e3:.3f}", f"{100 * floor / t:.1f}"), (30, 11, 9))
            del m, state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", "--small", dest="cpu", action="store_true", help="small shapes on the CPU")
    ap.add_argument("--sweep", action="store_true", help="Triton launch configurations side by side (GPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default with --cpu: 1, which a shared machine times reproducibly)")
    args = ap.parse_args(argv)
    threads = args.threads or (1 if args.cpu else None)
    if threads:
        torch.set_num_threads(threads)
    device = args.device or ("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # from torch.optim.Adagrad
    bw = copy_bandwidth(device)
    if args.sweep:
        sweep(device, bw, small=args.cpu)
        return 0
    bench_forward(cpu_shapes() if args.cpu else full_shapes(), device, bw)
    if args.cpu:
        bench_training(Shape("dlrm-26", 26, 200_000, 2048, 20, 64), device, dense=True, bw=bw)
    else:
        bench_training(Shape("criteo", 26, 500_000, 16384, 20, 128), device, dense=False, bw=bw)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except NoKernelError as e:
        raise SystemExit(f"bench/kernels.py: {e}")
