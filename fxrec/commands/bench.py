"""`fxrec bench ACTION`: measurements of this machine and of fxrec itself.

Each action is a (help, add_arguments, run) entry in `ACTIONS`; a new action adds
one entry and touches nothing else.
"""
from __future__ import annotations

import argparse
import os
import sys

HELP = "Measure this machine or fxrec (fxrec bench ACTION; see fxrec bench -h)."


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=2,
                   help="local processes to spawn (ignored under torchrun, which sets the group)")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend (default: nccl with a GPU, else gloo)")
    p.add_argument("--size", default="16MB", help="bytes per rank per measurement, e.g. 16MB (default)")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions; the best is kept (default 5)")
    p.add_argument("-o", "--output", default="topology.json", help="profile to write (default topology.json)")


_MIN_SIZE = 64 * 1024


def _calibrate(args) -> int:
    from fxrec.planner.calibrate import calibrate
    from fxrec.topology import parse_bytes

    try:
        size = parse_bytes(args.size, "--size")
        if size < _MIN_SIZE:  # smaller, a collective's latency is all it would time
            raise ValueError(f"--size {args.size!r} is too small to measure a bandwidth: give at least 64KiB")
        if args.iters < 1:
            raise ValueError(f"--iters must be positive, got {args.iters}")
        topology, result = calibrate(args.world_size, args.backend, size, args.iters)
    except (ValueError, RuntimeError) as e:  # RuntimeError: the backend cannot start (nccl without GPUs)
        print(f"fxrec bench calibrate: error: {str(e).strip().splitlines()[-1] if str(e).strip() else e}",
              file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 writes
    try:
        topology.save(args.output, calibration=result)
    except OSError as e:
        print(f"fxrec bench calibrate: error: cannot write {args.output!r}: {e.strerror}", file=sys.stderr)
        return 2
    if topology.world_size > 1:
        links = (f"{result['backend']} all-to-all {topology.intra_node_bandwidth / 1e9:.3f} GB/s per rank "
                 f"over {topology.world_size} ranks")
    else:  # nothing to exchange with: the profile keeps the device's default link speed
        links = (f"links not measured on 1 rank (the profile keeps the default "
                 f"{topology.intra_node_bandwidth / 1e9:.3f} GB/s; give --world-size 2 or more)")
    print(f"memory bandwidth {topology.hbm_bandwidth / 1e9:.2f} GB/s; {links}")
    print(f"wrote {args.output} (read it with fxrec.Topology.load or fxrec plan --topology)")
    return 0


ACTIONS = {
    "calibrate": ("measure memory and collective bandwidth; write a Topology profile (JSON)",
                  _calibrate_args, _calibrate),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    for name, (help_, add, _) in ACTIONS.items():
        add(sub.add_parser(name, help=help_, description=help_))


def run(args) -> int:
    if not getattr(args, "action", None):
        print("fxrec bench: choose an action: " + ", ".join(ACTIONS), file=sys.stderr)
        return 2
    return ACTIONS[args.action][2](args)
