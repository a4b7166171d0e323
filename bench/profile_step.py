"""Where the fused training step's time goes: torch.profiler over the steps of
bench/kernels.py's training shape, each op's self time on the device, largest first.

The fused step (forward, backward, the sparse optimizer inside it) is at 30-33% of its floor
on an H200 (bench/results/gpu_kernels_new_defaults.txt); this says which of its parts (the
lookup kernel, the occurrence sort in torch, the update kernel, the chunk pass of hot rows)
to work on.

    python bench/profile_step.py            # a GPU: the Criteo-like shape of bench/kernels.py
    python bench/profile_step.py --cpu      # a small shape on the CPU (that the script runs)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as K  # noqa: E402  (bench/kernels.py: shapes, ids, the default module)


def profile_step(s: K.Shape, device: str, which: str, steps: int, rows: int) -> None:
    ids, offsets = K.make_ids(s, device)
    grad = torch.randn(s.B, s.T * s.D, device=device, dtype=s.dtype)
    m = K.fused(s, device, K.fxrec_optimizer(which), bounds_check=True)  # the default module

    def step():
        m(ids, offsets).backward(grad)

    for _ in range(3):  # compile and warm up
        step()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    print(f"\n== {which} step, {s.label()} on {device}, kernels {m.kernels}: "
          f"{total / steps / 1e3:.3f} ms of {'device' if cuda else 'CPU'} self time per step ==")
    print(f"  {'op / kernel':<60} {'ms/step':>9} {'share':>7} {'calls/step':>11}")
    for e in events[:rows]:
        t = getattr(e, key)
        if t <= 0:
            break
        print(f"  {e.key[:60]:<60} {t / steps / 1e3:>9.3f} {100 * t / total:>6.1f}% {e.count / steps:>11.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="a small shape on the CPU")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25, help="ops listed per profile")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    torch.manual_seed(0)
    shapes = [K.Shape("tiny", 3, 1000, 16, 4, 16)] if device == "cpu" else [
        K.Shape("criteo", 26, 500_000, 16384, 20, 128), K.Shape("criteo", 26, 500_000, 16384, 20, 128, dist="zipf")]
    for s in shapes:
        for which in ("sgd", "rowwise_adagrad"):
            profile_step(s, device, which, args.steps, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
