"""Measure this machine for the cost model: memory bandwidth and the collective
bandwidth of the process group in use (gloo or NCCL), written as a Topology profile.

Launched under torchrun (WORLD_SIZE > 1) it measures the job's own group; otherwise it
spawns ``world_size`` local processes with torch.multiprocessing. Bandwidths are per
rank and per direction: an all-to-all of S bytes per rank moves (W-1)/W S per rank,
an all-reduce 2(W-1)/W S ("bus bandwidth", as nccl-tests reports it).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from fxrec.topology import Topology


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, iters: int) -> float:
    fn()  # warm-up: first calls allocate and connect
    _sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(device: str | torch.device = "cpu", size_bytes: int = 64 << 20, iters: int = 5) -> float:
    """Bytes/s of a device-to-device copy (read + write), the best of ``iters``."""
    device = torch.device(device)
    n = max(1, size_bytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device, iters)
    return 2 * n * 4 / t


def collective_bandwidth(size_bytes: int, iters: int, device: torch.device, group=None) -> dict:
    """Per-rank bus bandwidth of all-to-all and all-reduce on ``group``."""
    w = dist.get_world_size(group)
    n = max(w, (size_bytes // 4) // w * w)
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    t_a2a = _best_time(lambda: dist.all_to_all_single(y, x, group=group), device, iters)
    t_ar = _best_time(lambda: dist.all_reduce(x, group=group), device, iters)
    moved = n * 4 * (w - 1) / w
    return {"all_to_all": moved / t_a2a if w > 1 else float("inf"),
            "all_reduce": 2 * moved / t_ar if w > 1 else float("inf")}


def _measure(rank: int, world_size: int, ranks_per_node: int, device: torch.device, size_bytes: int,
             iters: int, backend: str) -> dict:
    """Run on every rank of an initialised group; returns the profile on rank 0."""
    result = {"backend": backend, "size_bytes": size_bytes, "iters": iters}
    nodes = world_size // ranks_per_node
    node_groups = [dist.new_group(list(range(n * ranks_per_node, (n + 1) * ranks_per_node)))
                   for n in range(nodes)] if nodes > 1 else [None]
    mine = node_groups[rank // ranks_per_node] if nodes > 1 else None
    result["intra_node"] = collective_bandwidth(size_bytes, iters, device, mine)
    if nodes > 1:
        result["inter_node"] = collective_bandwidth(size_bytes, iters, device, None)
    # at least 64 MiB so that the copy streams from memory, not from cache
    result["memory_bandwidth"] = memory_bandwidth(device, max(size_bytes, 64 << 20), iters)
    dist.barrier()
    return result


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _worker(rank: int, world_size: int, backend: str, init_file: str, size_bytes: int, iters: int,
            out_path: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = _measure(rank, world_size, world_size, _device_for(backend, rank), size_bytes, iters, backend)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _profile(result: dict, world_size: int, ranks_per_node: int, device_kind: str) -> Topology:
    kwargs = dict(world_size=world_size, ranks_per_node=ranks_per_node, device=device_kind,
                  hbm_bandwidth=result["memory_bandwidth"])
    result["measured"] = ["hbm_bandwidth"]
    if world_size > 1:
        kwargs["intra_node_bandwidth"] = result["intra_node"]["all_to_all"]
        result["measured"].append("intra_node_bandwidth")
    if "inter_node" in result:
        kwargs["inter_node_bandwidth"] = result["inter_node"]["all_to_all"]
        result["measured"].append("inter_node_bandwidth")
    # memory of this device, or the host's split among its ranks; the spawn path has no
    # WORLD_SIZE in its environment, so the sizes are passed
    env = Topology.from_env(device=device_kind, world_size=world_size, ranks_per_node=ranks_per_node)
    return Topology(memory_per_rank=env.memory_per_rank, host_memory_per_rank=env.host_memory_per_rank, **kwargs)


def calibrate(world_size: int = 2, backend: str | None = None, size_bytes: int = 16 << 20,
              iters: int = 5) -> tuple[Topology, dict]:
    """Measure and return (topology profile, raw measurements).

    Under torchrun (an initialised group or WORLD_SIZE > 1 in the environment) the
    job's group is measured and ``world_size`` is ignored; every rank must call this.
    Otherwise ``world_size`` local processes are spawned (gloo on CPU, NCCL on GPUs).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"calibrate: backend must be 'gloo' or 'nccl', got {backend!r}")
    device_kind = "cuda" if backend == "nccl" else "cpu"
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise ValueError("calibrate: backend 'nccl' needs CUDA GPUs and a torch built with NCCL; this one has "
                         + ("no GPU" if dist.is_nccl_available() else "no NCCL") + " (use --backend gloo)")
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _calibrate_in_job(backend, device_kind, size_bytes, iters)
    if world_size < 1:
        raise ValueError(f"calibrate: world_size must be positive, got {world_size}")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        if world_size == 1:
            result = {"backend": backend, "size_bytes": size_bytes, "iters": iters,
                      "memory_bandwidth": memory_bandwidth(_device_for(backend, 0), max(size_bytes, 64 << 20),
                                                           iters)}
        else:
            import torch.multiprocessing as mp

            try:
                mp.spawn(_worker, args=(world_size, backend, os.path.join(tmp, "init"), size_bytes, iters,
                                        out_path), nprocs=world_size, join=True)
            except mp.ProcessRaisedException as e:  # the worker's traceback: its last line says why
                raise RuntimeError(f"calibrate: a worker failed: {str(e).strip().splitlines()[-1]}") from e
            with open(out_path) as f:
                result = json.load(f)
    return _profile(result, world_size, world_size, device_kind), result


def _calibrate_in_job(backend: str, device_kind: str, size_bytes: int, iters: int):
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        rpn = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        device = _device_for(dist.get_backend(), int(os.environ.get("LOCAL_RANK", "0")))
        result = _measure(rank, world_size, rpn, device, size_bytes, iters, dist.get_backend())
    finally:
        if created:
            dist.destroy_process_group()
    return _profile(result, world_size, rpn, device_kind), result
