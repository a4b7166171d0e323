"""Running a benchmark's modes side by side: each mode in fresh processes (one per rank, gloo on a
free port), alternating, so that a noisy host slows every mode alike.

`alternate(worker, args, modes)` spawns ``worker(rank, args, mode, port, out_dir)`` on
``args.world`` ranks for each mode in turn, ``args.repeats`` times, and returns each mode's
results: the dicts its rank 0 saved (``torch.save``) as ``out_dir/<mode>.pt``, which hold at
least ``elapsed`` (seconds over ``args.steps`` timed steps), printed as ms/step as they come.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alternate(worker, args, modes: tuple[str, ...]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.repeats):
            for mode in modes:
                mp.spawn(worker, args=(args, mode, _free_port(), out_dir), nprocs=args.world)
                got = torch.load(os.path.join(out_dir, f"{mode}.pt"))
                print(f"# {mode}: {1000 * got['elapsed'] / args.steps:.1f} ms/step", flush=True)
                results[mode].append(got)
    return results


def fastest(runs: list[dict]) -> dict:
    """The run with the least elapsed time."""
    return min(runs, key=lambda r: r["elapsed"])
