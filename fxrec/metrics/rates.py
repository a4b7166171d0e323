"""Rates of binary predictions, as TorchRec's RecMetrics report them: ``ctr``,
``calibration``, ``precision``, ``recall`` and their streaming twins ``CTR``,
``Calibration``, ``Precision``, ``Recall``.

Inputs as the other binary metrics' (`fxrec.metrics.binary`): probabilities (or logits with
``from_logits=True``), 0/1 labels of the same shape, optional non-negative weights. Each is a
ratio of weighted sums, so the streaming twins keep two sums and a distributed ``compute()``
all-reduces them.
"""
from __future__ import annotations

from typing import Any

import torch

from fxrec.metrics.base import Metric, _acc_dtype, _one_shot, _weighted_mean
from fxrec.metrics.binary import _binary_inputs

__all__ = ["ctr", "calibration", "precision", "recall", "CTR", "Calibration", "Precision", "Recall"]


class _Ratio(Metric):
    """``sum(numerator) / sum(denominator)`` over every example seen; subclasses give the two
    per-example terms. ValueError when the denominator's sum is 0 (the rate is undefined)."""

    _width = 2
    _undefined = ""  # what a zero denominator means, for the error

    def __init__(self, from_logits: bool = False, *, sync: bool = True, process_group=None) -> None:
        super().__init__(sync=sync, process_group=process_group)
        self.from_logits = bool(from_logits)

    def update(self, predictions: Any, labels: Any, weights: Any = None) -> None:
        p, y, w = _binary_inputs(predictions, labels, weights, self.from_logits)
        p = p.to(_acc_dtype(p.device))
        prob = torch.sigmoid(p) if self.from_logits else p
        w = torch.ones_like(prob) if w is None else w
        num, den = self._terms(prob, y.to(prob.dtype))
        self._add(torch.stack([(w * num).sum(), (w * den).sum()]))

    def _terms(self, prob: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def compute(self) -> float:
        num, den = self._sums()
        if den <= 0:
            raise ValueError(f"{type(self).__name__} is undefined: {self._undefined}")
        return _weighted_mean(num, den, type(self).__name__)


class CTR(_Ratio):
    """Weighted fraction of positive labels, ``sum(w * y) / sum(w)`` (the predictions are
    checked, not used)."""

    _undefined = "weights sum to 0"

    def _terms(self, prob, y):
        return y, torch.ones_like(y)


class Calibration(_Ratio):
    """Predicted over observed positives, ``sum(w * p) / sum(w * y)``: 1 for a calibrated
    model, above 1 where it over-predicts."""

    _undefined = "no positive label (weighted label sum 0)"

    def _terms(self, prob, y):
        return prob, y


class _Thresholded(_Ratio):
    def __init__(self, threshold: float = 0.5, from_logits: bool = False, *, sync: bool = True,
                 process_group=None) -> None:
        super().__init__(from_logits, sync=sync, process_group=process_group)
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)


class Precision(_Thresholded):
    """Weighted true positives over predicted positives (probability >= threshold)."""

    _undefined = "no example predicted positive (weighted)"

    def _terms(self, prob, y):
        predicted = (prob >= self.threshold).to(prob.dtype)
        return predicted * y, predicted


class Recall(_Thresholded):
    """Weighted true positives over positive labels (predicted: probability >= threshold)."""

    _undefined = "no positive label (weighted label sum 0)"

    def _terms(self, prob, y):
        return (prob >= self.threshold).to(prob.dtype) * y, y



def ctr(predictions: Any, labels: Any, weights: Any = None, *, from_logits: bool = False) -> float:
    """Weighted fraction of positive labels (see ``CTR``)."""
    return _one_shot(CTR(from_logits, sync=False), predictions, labels, weights)


def calibration(predictions: Any, labels: Any, weights: Any = None, *, from_logits: bool = False) -> float:
    """``sum(w * p) / sum(w * y)`` (see ``Calibration``)."""
    return _one_shot(Calibration(from_logits, sync=False), predictions, labels, weights)


def precision(predictions: Any, labels: Any, threshold: float = 0.5, *, weights: Any = None,
              from_logits: bool = False) -> float:
    """Weighted TP / (TP + FP) at ``threshold`` (see ``Precision``)."""
    return _one_shot(Precision(threshold, from_logits, sync=False), predictions, labels, weights)


def recall(predictions: Any, labels: Any, threshold: float = 0.5, *, weights: Any = None,
           from_logits: bool = False) -> float:
    """Weighted TP / (TP + FN) at ``threshold`` (see ``Recall``)."""
    return _one_shot(Recall(threshold, from_logits, sync=False), predictions, labels, weights)
