"""Quantized inference: table-batched lookups of int8/int4/fp16 tables, and a whole DLRM lowered.

    python bench/inference.py          # GPU shapes where a GPU is present, else CPU shapes
    python bench/inference.py --cpu    # small shapes, about a minute on a CPU

1. Lookups. Per shape and table type: the bytes a pooled lookup must move (each looked-up
   row's bytes in that type, ids, offsets, the fp32 output written), the measured copy
   bandwidth, the floor time = bytes / bandwidth, then each implementation's time and
   floor/time in percent, and its speed-up over what an unmodified model runs (torch's
   `F.embedding_bag` once per fp32 table). Implementations: fxrec's fused fp32 lookup
   (`FusedEmbeddingBags`) and fxrec's quantized lookup (`QuantizedEmbeddingBags`) through
   every kernel that serves it here (FBGEMM's IntNBit op on a CPU with fbgemm_gpu, Triton
   on a GPU, torch everywhere).
2. DLRM. `fxrec.models.DLRM` (26 tables, SyntheticCriteo batches) in eval mode, against
   `fxrec.lower_for_inference(model, example, t)` for t in fp32 / fp16 / int8 / int4:
   ms per batch, the tables' bytes, and how far the predictions move from the eager
   model's (max and mean |p - p_fp32| of the sigmoid over the batches).
3. torch.compile. The plain-torch DLRM (`DLRMPlain`) under no_grad: eager, plain inductor,
   ``backend="fxrec"`` with ``options={"dense": "eager"}`` and with its default (inductor
   compiles the rest): ms per batch, compile time, the largest difference from eager.
   ``--only compile`` runs this part alone.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import Shape, copy_bandwidth, make_ids, sync, timeit  # noqa: E402

import fxrec  # noqa: E402
from fxrec.lowering import FusedEmbeddingBags, NoKernelError, QuantizedEmbeddingBags  # noqa: E402
from fxrec.lowering.quant import QUANT_TYPES  # noqa: E402
from fxrec.models import DLRMPlain  # noqa: E402
from fxrec.types import TableInfo  # noqa: E402

TYPES = ("fp32", "fp16", "int8", "int4", "int2")
KERNELS = ("triton", "fbgemm", "torch")


def shapes(cpu: bool) -> list[Shape]:
    if cpu:
        return [Shape("criteo-small", 26, 20_000, 1024, 20, 64), Shape("criteo-small", 26, 20_000, 1024, 20, 128),
                Shape("fbgemm-default-small", 32, 10_000, 256, 20, 128)]
    return [Shape("criteo", 26, 500_000, 16384, 20, 128), Shape("criteo", 26, 500_000, 16384, 20, 64),
            Shape("fbgemm-default", 32, 100_000, 512, 20, 128)]


def lookup_bytes(s: Shape, row_bytes: int) -> int:
    n = s.T * s.B * s.L
    return n * row_bytes + n * 8 + (s.T * s.B + 1) * 8 + s.B * s.T * s.D * 4


def print_row(cols, widths=(34, 11, 9, 9, 9)) -> None:
    print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths))))


def bench_lookups(shape_list, device, bw: float, repeats: int = 3) -> None:
    print("\n== pooled lookups (forward): time, % of the bandwidth floor, speed-up over torch per fp32 table")
    for s in shape_list:
        tables = [TableInfo(name=f"t{i}", num_embeddings=s.rows, embedding_dim=s.D) for i in range(s.T)]
        ids, offsets = make_ids(s, device)
        fused = FusedEmbeddingBags(tables, device=device, bounds_check=False)
        weights = fused.split_weights()
        per_ids = ids.view(s.T, -1)
        per_off = torch.arange(0, s.B * s.L, s.L, device=device)

        def torch_per_table():
            return [F.embedding_bag(per_ids[t], weights[t], per_off) for t in range(s.T)]

        fp32_bytes = lookup_bytes(s, s.D * 4)
        impls = [("torch F.embedding_bag per table fp32", fp32_bytes, torch_per_table),
                 (f"fxrec fused fp32 ({fused.kernel})", fp32_bytes, lambda: fused(ids, offsets))]
        for qname in TYPES:
            for kernel in KERNELS:
                try:
                    q = QuantizedEmbeddingBags.from_fused(fused, qname, kernel=kernel, bounds_check=False)
                except NoKernelError:
                    continue
                impls.append((f"fxrec {qname} ({kernel}, {q.layout.qparams})", lookup_bytes(s, q.layout.row_bytes[0]),
                              lambda q=q: q(ids, offsets)))
        # side by side, best of `repeats` interleaved rounds: first-touch and load drift cancel
        best = [float("inf")] * len(impls)
        for _ in range(repeats):
            for i, (_, _, fn) in enumerate(impls):
                best[i] = min(best[i], timeit(fn, device))
        print(f"\n{s.label()}  (copy bandwidth {bw / 1e9:.1f} GB/s, best of {repeats} rounds)")
        print_row(("implementation", "MB moved", "ms", "% floor", "vs torch"))
        for (label, nbytes, _), t in zip(impls, best):
            print_row((label, f"{nbytes / 1e6:.1f}", f"{t * 1e3:.2f}", f"{100 * nbytes / bw / t:.0f}",
                       f"{best[0] / t:.2f}x"))
        del fused, impls


def bench_dlrm(device, rows: int, batch: int, batches: int, repeats: int = 3) -> None:
    from fxrec.datasets import SyntheticCriteo
    from fxrec.models import DLRM

    T, D = 26, 64
    print(f"\n== DLRM, {T} tables x {rows:,} rows x dim {D}, batch {batch}, eval: eager fp32 against "
          f"fxrec.lower_for_inference")
    torch.manual_seed(0)
    configs = [fxrec.EmbeddingBagConfig(name=f"t_{i}", num_embeddings=rows, embedding_dim=D,
                                        feature_names=[f"cat_{i}"]) for i in range(T)]
    model = DLRM(fxrec.EmbeddingBagCollection(configs, device=device), 13, [128, D], [256, 128, 1]).to(device).eval()
    data = list(SyntheticCriteo(num_embeddings=rows, num_tables=T, pooling_factors=8.0, batch_size=batch,
                                num_batches=batches, seed=0))
    data = [b.to(device) for b in data]
    example = (data[0].dense_features, data[0].sparse_features)
    with torch.no_grad():
        ref = torch.cat([torch.sigmoid(model(b.dense_features, b.sparse_features)).reshape(-1) for b in data])
    table_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embedding_bags" in n)
    rows_out = [("eager fp32 (nn.Module)", model, table_bytes, ref)]
    for qname in ("fp32", "fp16", "int8", "int4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low = fxrec.lower_for_inference(model, example, qname, bounds_check=False)
        quant = [m for m in low.modules() if isinstance(m, QuantizedEmbeddingBags)]
        with torch.no_grad():
            out = torch.cat([torch.sigmoid(low(b.dense_features, b.sparse_features)).reshape(-1) for b in data])
        kernel = "+".join(sorted({m.kernel for m in quant}))
        rows_out.append((f"lowered {qname} ({kernel})", low, sum(m.layout.numel for m in quant), out))
    # side by side, best of `repeats` rounds: the ratios stand even when the host's load drifts
    best = [float("inf")] * len(rows_out)
    for _ in range(repeats):
        for i, (_, m, _, _) in enumerate(rows_out):
            with torch.no_grad():
                t = timeit(lambda: [m(b.dense_features, b.sparse_features) for b in data], device) / batches
            best[i] = min(best[i], t)
    widths = (34, 9, 9, 10, 10, 10)
    print_row(("model", "ms/batch", "speed-up", "tables MB", "max |dp|", "mean |dp|"), widths=widths)
    for (label, _, nbytes, out), t in zip(rows_out, best):
        print_row((label, f"{t * 1e3:.2f}", f"{best[0] / t:.2f}x", f"{nbytes / 1e6:.1f}",
                   f"{(out - ref).abs().max().item():.2e}", f"{(out - ref).abs().mean().item():.2e}"), widths=widths)
    print(f"(best of {repeats} interleaved rounds, {batches} batches each; dp: the sigmoid's change from eager fp32)")


def bench_compile(device, rows: int, batch: int, batches: int, repeats: int = 3) -> None:
    """torch.compile on the plain-torch DLRM (a list of nn.EmbeddingBag: dynamo captures all
    its lookups in one graph), eval under no_grad, against eager: plain inductor, and
    backend="fxrec" with the dense rest run eagerly and compiled by inductor (its default)."""
    from fxrec.datasets import SyntheticCriteo
    from fxrec.lowering import backend

    T, D = 26, 64
    torch.manual_seed(0)
    model = DLRMPlain([rows] * T, D, 13, [128, D], [256, 128, 1]).to(device).eval()
    data = [b.to(device).to_plain() for b in SyntheticCriteo(num_embeddings=rows, num_tables=T, pooling_factors=8.0,
                                                              batch_size=batch, num_batches=batches, seed=1)]
    with torch.no_grad():
        ref = [model(*b) for b in data]
    backend.register()
    variants = {"eager": (model, "")}
    for name, kwargs in (("inductor", dict(backend="inductor")),
                         ("fxrec, dense eager", dict(backend="fxrec", options={"dense": "eager"})),
                         ("fxrec (dense: inductor)", dict(backend="fxrec"))):
        torch._dynamo.reset()
        backend.compiled.clear()
        m = torch.compile(copy.deepcopy(model), **kwargs)  # fxrec moves the tables: its own copy each
        start = time.perf_counter()
        with torch.no_grad():
            got = [m(*b) for b in data]  # compiles (fxrec: and recompiles once, the tables moved)
        compile_s = time.perf_counter() - start
        err = max((a - b).abs().max().item() for a, b in zip(got, ref))
        kernels = sorted({f.kernel for g in backend.compiled for f in g.modules() if isinstance(f, FusedEmbeddingBags)})
        note = f"compile+first pass {compile_s:.0f} s; max |diff| {err:.1e}"
        variants[name] = (m, note + (f"; lookups on {'+'.join(kernels)}" if kernels else ""))
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, (m, _) in variants.items():
            with torch.no_grad():
                best[name] = min(best[name], timeit(lambda: [m(*b) for b in data], device) / batches)
    print(f"\n== torch.compile(DLRMPlain), {T} tables x {rows:,} rows x dim {D}, batch {batch}, no_grad "
          f"(best of {repeats} interleaved rounds, {batches} batches each)")
    print_row(("variant", "ms/batch", "vs eager"), widths=(26, 9, 9))
    for name, (m, note) in variants.items():
        print_row((name, f"{best[name] * 1e3:.2f}", f"{best['eager'] / best[name]:.2f}x"), widths=(26, 9, 9))
        if note:
            print(f"    {note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="small shapes on the CPU")
    p.add_argument("--only", choices=("lookups", "dlrm", "compile"), help="run one part")
    args = p.parse_args(argv)
    run = (lambda part: args.only in (None, part))
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    flags = (" --cpu" if args.cpu else "") + (f" --only {args.only}" if args.only else "")
    print(f"# python bench/inference.py{flags}: torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, threads {torch.get_num_threads()}")
    print(f"# types: {', '.join(f'{n} ({q.bits} bits)' for n, q in QUANT_TYPES.items())}; intN rows carry an fp16 "
          f"scale and bias (4 bytes)")
    if run("lookups"):
        bench_lookups(shapes(device == "cpu"), device, bw)
    size = (dict(rows=100_000, batch=2048, batches=4) if device == "cpu" else
            dict(rows=1_000_000, batch=16384, batches=8))
    if run("dlrm"):
        bench_dlrm(device, **size)
    if run("compile"):
        bench_compile(device, **size)
    sync(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
