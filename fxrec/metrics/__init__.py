"""Evaluation metrics for recommendation models, on torch tensors (CPU or any device).

Binary classification (CTR-style): ``auc``, ``auprc``, ``log_loss``, ``normalized_entropy``,
``accuracy``, ``ctr``, ``calibration``, ``precision``, ``recall``. ``predictions`` are
probabilities in [0, 1]; pass ``from_logits=True`` for raw logits. ``labels`` are 0/1 (bool,
int or float) of exactly the predictions' shape (no broadcasting: a (B, 1) vs (B,) mix-up is an
error, not a silent outer product). ``weights`` are optional non-negative per-example weights of the same shape.
Labels, weights and targets are moved to the device of the predictions / scores.

Regression: ``mse``, ``rmse``, ``mae`` over real ``predictions`` and ``labels`` of one shape,
with the same optional ``weights``.

Retrieval: ``recall_at_k``, ``ndcg_at_k`` over ``scores`` (num_queries x
num_candidates) with ``targets`` either the (num_queries,) integer index of the one
relevant candidate per query, or a (num_queries x num_candidates) relevance matrix.

Each function has a streaming twin (``AUC``, ``AUPRC``, ``LogLoss``, ``NE``, ``Accuracy``,
``CTR``, ``Calibration``, ``Precision``, ``Recall``, ``MSE``, ``RMSE``, ``MAE``, ``RecallAtK``,
``NDCGAtK``) with ``update(...)``, ``compute() -> float`` and
``reset()``; the functions are one update plus compute, so both give the same
number. In a distributed job the streaming metrics' ``compute()`` is collective and gives
the metric over every rank's batches (``sync=False``: this rank's alone); the functions
compute over the tensors they are given. ``MetricCollection`` updates several at once.
Sums are accumulated in float64 (float32 on MPS, which has no float64) on the device of the
inputs, and read back to the host only in ``compute()``. Bad input raises ``ValueError``
naming the argument and the offending value or shape.

Layout: ``base.py`` (input checks, ``Metric``, ``MetricCollection``), ``binary.py``
(AUC, AUPRC, log loss, NE, accuracy), ``rates.py`` (CTR, calibration, precision, recall),
``regression.py`` (MSE, RMSE, MAE), ``retrieval.py`` (recall@k, NDCG@k); every public name
is re-exported here, so ``from fxrec.metrics import X`` is the way to import them.
"""
from __future__ import annotations

from fxrec.metrics.base import Metric, MetricCollection
from fxrec.metrics.binary import (
    AUC, AUPRC, DEFAULT_EPS, NE, Accuracy, LogLoss, accuracy, auc, auprc, log_loss, normalized_entropy)
from fxrec.metrics.rates import CTR, Calibration, Precision, Recall, calibration, ctr, precision, recall
from fxrec.metrics.regression import MAE, MSE, RMSE, mae, mse, rmse
from fxrec.metrics.retrieval import NDCGAtK, RecallAtK, ndcg_at_k, recall_at_k

__all__ = [
    "auc", "auprc", "log_loss", "normalized_entropy", "accuracy", "ctr", "calibration", "precision", "recall",
    "mse", "rmse", "mae", "recall_at_k", "ndcg_at_k",
    "Metric", "AUC", "AUPRC", "LogLoss", "NE", "Accuracy", "CTR", "Calibration", "Precision", "Recall",
    "MSE", "RMSE", "MAE", "RecallAtK", "NDCGAtK",
    "MetricCollection",
]
