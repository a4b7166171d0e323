"""Run a function on W real gloo processes and bring the results (or the failure) home.

``run_workers(fn, world_size, *args, timeout=120, backend="gloo")`` starts ``world_size``
processes (torch.multiprocessing's forkserver context, whose server has imported torch and
fxrec once), each with the parent's current environment, ``MASTER_ADDR=127.0.0.1``, a free
port, one intra-op thread and an initialised process group (gloo; or nccl, each rank on
``cuda:rank``, for the GPU-marked tests), runs ``fn(rank, world_size, *args)`` and
returns every rank's (picklable) result in rank order. ``fn`` must be a module-level function
the children can import (a test module's function is fine: the server has the parent's
sys.path as it was when the first run started it).

Failure handling, so a test never hangs:
- a child's exception is re-raised in the parent: the original exception object when it
  unpickles (so ``pytest.raises(ValueError, match=...)`` works), chained from a `WorkerError`
  that carries the child's formatted traceback; otherwise the `WorkerError` itself;
- a child that dies without reporting (segfault, os._exit) raises `WorkerError` with its exit code;
- past ``timeout`` seconds every child is killed and `WorkerTimeout` names the ranks that had
  not finished. After the first failure the other children are killed at once (they are
  usually stuck in a collective waiting for the failed rank).
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker process failed; ``rank`` and ``child_traceback`` say where and how."""

    def __init__(self, rank: int, message: str, child_traceback: str = ""):
        super().__init__(f"rank {rank}: {message}" + (f"\n--- child traceback ---\n{child_traceback}"
                                                       if child_traceback else ""))
        self.rank, self.child_traceback = rank, child_traceback


class WorkerTimeout(TimeoutError):
    """The workers did not all finish within the timeout; they were killed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """Children forked from a server that has imported torch and fxrec once: a spawned child
    imports them itself, which took 5.7 s for 2 ranks and 10.8 s for 4 on the 2-core machine,
    a third of the suite. (The server has run no torch op, so no thread pool is forked.)"""
    ctx = mp.get_context("forkserver")
    if not _PRELOADED:
        ctx.set_forkserver_preload(["torch", "fxrec", "fxrec.shard", "fxrec.runtime.comm", "dist_harness"])
        _PRELOADED.append(True)
    return ctx


_PRELOADED: list = []


def _child(rank: int, world_size: int, port: int, timeout: float, backend: str, env: dict, fn, args,
           results) -> None:
    # the parent's environment as it is now (the server's is as it was when it started)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=max(timeout, 1.0)))
        result = fn(rank, world_size, *args)
        results.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            blob = pickle.dumps(exc)
            pickle.loads(blob)  # some exceptions pickle but do not unpickle
        except Exception:  # noqa: BLE001
            blob = None
        results.put((rank, "error", (f"{type(exc).__name__}: {exc}", tb, blob)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _raise_child_error(rank: int, payload) -> None:
    message, tb, blob = payload
    cause = WorkerError(rank, message, tb)
    if blob is not None:
        exc = pickle.loads(blob)
        if isinstance(exc, Exception):
            raise exc from cause
    raise cause


def run_workers(fn, world_size: int, *args, timeout: float = 120, backend: str = "gloo"):
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]`` computed by W processes (gloo, or nccl)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"run_workers: backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_child, args=(r, world_size, port, timeout, backend, env, fn, args, results),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.05)
            except queue_mod.Empty:
                _check_alive(procs, done, results)
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in done]
                    raise WorkerTimeout(f"run_workers({getattr(fn, '__name__', fn)}): ranks {missing} "
                                        f"did not finish within {timeout} s; all workers killed") from None
                continue
            if status == "error":
                _raise_child_error(rank, payload)
            done[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=10)
    finally:
        _kill(procs)
        results.close()
    return [done[r] for r in range(world_size)]


def _check_alive(procs, done, results) -> None:
    """A child that exited without reporting (a crash) fails the run instead of waiting out
    the timeout. Its report may still be in flight: look once more before blaming it."""
    for rank, p in enumerate(procs):
        if rank not in done and not p.is_alive() and p.exitcode not in (None, 0):
            try:
                r, status, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                raise WorkerError(rank, f"process exited with code {p.exitcode} without a result") from None
            if status == "error":
                _raise_child_error(r, payload)
            done[r] = pickle.loads(payload)


def run_jobs(rank: int, world: int, run, jobs: list, traceback_limit: int = 8) -> dict:
    """A worker for `run_workers`: ``{job: run(rank, world, *job)}`` (each a list of failures)
    for each job in turn. A job that raises records its traceback and ends the run: the
    other ranks are left stuck in a collective, and fail theirs too."""
    results = {}
    for job in jobs:
        try:
            results[job] = run(rank, world, *job)
        except Exception:  # noqa: BLE001 - reported per job
            results[job] = [traceback.format_exc(limit=traceback_limit)]
            break
    return results


def merge_failures(per_rank: list[dict]) -> dict:
    """Per-rank ``{job: [failure, ...]}`` results as one ``{job: ["rank r: failure", ...]}``."""
    merged: dict = {}
    for rank, res in enumerate(per_rank):
        for job, fails in res.items():
            merged.setdefault(job, []).extend(f"rank {rank}: {f}" for f in fails)
    return merged
