"""Regression metrics (watch time, ratings, dwell): ``mse``, ``rmse``, ``mae`` and their
streaming twins ``MSE``, ``RMSE``, ``MAE``.

``predictions`` and ``labels`` are real tensors of one shape (no broadcasting), finite;
``weights`` optional, non-negative, of that shape. Each is a weighted mean, so the streaming
twins keep two sums and a distributed ``compute()`` all-reduces them.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from fxrec.metrics.base import Metric, _acc_dtype, _one_shot, _paired_inputs, _reject, _weighted_mean

__all__ = ["mse", "rmse", "mae", "MSE", "RMSE", "MAE"]


def _regression_inputs(predictions: Any, labels: Any, weights: Any):
    """Validated, flattened ``(p, y, w)`` in the accumulation dtype on the predictions' device."""
    p, y, w = _paired_inputs(predictions, labels, weights)
    dtype = _acc_dtype(p.device)
    p, y = p.to(dtype), y.to(dtype)
    _reject(p, ~torch.isfinite(p), "predictions", "must be finite")
    _reject(y, ~torch.isfinite(y), "labels", "must be finite")
    return p, y, torch.ones_like(p) if w is None else w


class MSE(Metric):
    """Weighted mean squared error, ``sum(w * (p - y)**2) / sum(w)``."""

    _width = 2

    def update(self, predictions: Any, labels: Any, weights: Any = None) -> None:
        p, y, w = _regression_inputs(predictions, labels, weights)
        self._add(torch.stack([(w * self._error(p - y)).sum(), w.sum()]))

    @staticmethod
    def _error(diff: torch.Tensor) -> torch.Tensor:
        return diff * diff

    def compute(self) -> float:
        total, weight = self._sums()
        return _weighted_mean(total, weight, type(self).__name__)


class RMSE(MSE):
    """The square root of `MSE` (of the weighted mean over every example, not a mean of
    per-batch roots)."""

    def compute(self) -> float:
        return math.sqrt(super().compute())


class MAE(MSE):
    """Weighted mean absolute error, ``sum(w * |p - y|) / sum(w)``."""

    @staticmethod
    def _error(diff: torch.Tensor) -> torch.Tensor:
        return diff.abs()



def mse(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Weighted mean squared error (see ``MSE``)."""
    return _one_shot(MSE(sync=False), predictions, labels, weights)


def rmse(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Root of the weighted mean squared error (see ``RMSE``)."""
    return _one_shot(RMSE(sync=False), predictions, labels, weights)


def mae(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Weighted mean absolute error (see ``MAE``)."""
    return _one_shot(MAE(sync=False), predictions, labels, weights)
