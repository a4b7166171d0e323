"""What every metric shares: input checks, the streaming `Metric` base, `MetricCollection`.

Sums are accumulated in float64 (float32 on MPS, which has no float64) on the device of
the inputs and read back to the host only in ``compute()``; bad input raises ValueError
naming the argument and the offending value or shape.
"""
from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["Metric", "MetricCollection"]


def _acc_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps sums over many millions of examples exact enough; MPS lacks it.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}") from err
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    return x.detach()


def _reject(flat: torch.Tensor, bad: torch.Tensor, name: str, rule: str) -> None:
    """Raise naming the first flat index where the 1-D mask ``bad`` is set."""
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} {rule}, got {flat[i].item()} at flat index {i}")


def _paired_inputs(predictions: Any, labels: Any, weights: Any):
    """``(p, y, w)`` flattened on the predictions' device, after the checks every per-example
    metric shares: labels (and weights) of exactly the predictions' shape, not empty, weights
    finite and >= 0 in the accumulation dtype (None where not given). p and y keep their dtypes."""
    p = _as_tensor(predictions, "predictions")
    y = _as_tensor(labels, "labels").to(p.device)
    if y.shape != p.shape:
        raise ValueError(f"labels shape {tuple(y.shape)} does not match predictions shape {tuple(p.shape)}")
    w = None if weights is None else _as_tensor(weights, "weights").to(p.device)
    if w is not None and w.shape != p.shape:
        raise ValueError(f"weights shape {tuple(w.shape)} does not match predictions shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"predictions is empty (shape {tuple(p.shape)})")
    if w is not None:
        w = w.reshape(-1).to(_acc_dtype(p.device))
        _reject(w, ~(torch.isfinite(w) & (w >= 0)), "weights", "must be finite and >= 0")
    return p.reshape(-1), y.reshape(-1), w


def _group_device(group) -> torch.device:
    """Where `group`'s collectives take tensors: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Metric(abc.ABC):
    """A streaming metric: ``update(...)`` adds a batch, ``compute()`` returns the value
    over every batch since construction or ``reset()``, ``reset()`` forgets them.

    Running sums live in one tensor on the first batch's device; later batches are moved
    there. ``compute()`` before any ``update()`` raises ValueError.

    In a distributed job (torch.distributed initialised, more than one rank) ``compute()``
    is collective, as torchmetrics' and TorchRec's are: every rank of ``process_group``
    (default: the whole job) calls it, and each gets the metric over every rank's batches,
    the number one process would give on all of them. A rank that saw no batch takes part
    with none. ``sync=False`` computes over this rank's batches alone.
    """

    _width = 0  # how many running sums update() adds (the sums-based metrics)

    def __init__(self, *, sync: bool = True, process_group: Optional[Any] = None) -> None:
        if not isinstance(sync, bool):
            raise ValueError(f"{type(self).__name__}: sync must be True or False, got {sync!r}")
        self.sync, self.process_group = sync, process_group
        self._totals: torch.Tensor | None = None

    def reset(self) -> None:
        self._totals = None

    def _group(self):
        """The process group compute() reduces over, or None (one process, or sync=False)."""
        if not self.sync or not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _add(self, sums: torch.Tensor) -> None:
        if self._totals is None:
            self._totals = sums
        else:
            self._totals = self._totals + sums.to(self._totals.device)

    def _sums(self) -> list[float]:
        group, totals = self._group(), self._totals
        if group is not None:  # every rank's sums, and how many ranks had any (a rank may have none)
            sums = torch.zeros(self._width, dtype=torch.float64) if totals is None else totals.to("cpu", torch.float64)
            local = torch.cat([sums, torch.tensor([float(totals is not None)], dtype=torch.float64)])
            local = local.to(_group_device(group))
            dist.all_reduce(local, group=group)
            totals = None if local[-1].item() == 0 else local[:-1]
        if totals is None:
            where = " on any rank" if group is not None else ""
            raise ValueError(f"{type(self).__name__}.compute() called with no data{where}: "
                             "call update() first")
        return totals.tolist()

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one batch (validated; ValueError on bad input, state unchanged)."""

    @abc.abstractmethod
    def compute(self) -> float:
        """The metric over every batch since construction or reset()."""


def _one_shot(metric: "Metric", *batch) -> float:
    """`metric` (made with sync=False: these tensors alone) over one batch: what the one-shot
    functions are, so that each gives the number its streaming twin gives."""
    metric.update(*batch)
    return metric.compute()


def _weighted_mean(total: float, weight: float, name: str) -> float:
    if weight <= 0:
        raise ValueError(f"{name} is undefined: weights sum to {weight:g}")
    return total / weight


class MetricCollection:
    """Several metrics fed the same batches: ``update(*args, **kwargs)`` passes its
    arguments to each metric (so they must share an update signature, e.g. all binary
    or all retrieval), ``compute()`` returns ``{name: value}``, ``reset()`` resets all.

    If one metric rejects a batch, metrics before it in the collection may already have
    taken it; ``reset()`` before reusing the collection.
    """

    def __init__(self, metrics: Mapping[str, Metric]) -> None:
        if not metrics:
            raise ValueError("metrics must name at least one metric")
        for name, metric in metrics.items():
            if not isinstance(metric, Metric):
                raise ValueError(f"metrics[{name!r}] must be an fxrec.metrics.Metric, "
                                 f"got {type(metric).__name__}")
        self._metrics = dict(metrics)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for metric in self._metrics.values():
            metric.update(*args, **kwargs)

    def compute(self) -> dict[str, float]:
        return {name: metric.compute() for name, metric in self._metrics.items()}

    def reset(self) -> None:
        for metric in self._metrics.values():
            metric.reset()

    def __getitem__(self, name: str) -> Metric:
        return self._metrics[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)
