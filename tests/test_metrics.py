"""fxrec.metrics against independent references: a pairwise O(n^2) AUC, torch's binary
cross entropy, and retrieval metrics averaged over every tie-breaking order."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fxrec import metrics as M


def _close(actual: float, expected: float, tol: float = 1e-9) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(float(expected), dtype=torch.float64),
                               rtol=tol, atol=tol)


def _binary_data(n: int, seed: int, decimals: int | None = 1, weighted: bool = False):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g)
    if decimals is not None:  # rounding makes many ties
        p = torch.round(p * 10**decimals) / 10**decimals
    y = (torch.rand(n, generator=g) < 0.4).float()
    y[0], y[1] = 0.0, 1.0  # both classes always present
    w = torch.rand(n, generator=g) * 3 if weighted else None
    return p, y, w


# ----------------------------------------------------------------------------- AUC

def _pairwise_auc(p, y, w=None) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 if tied."""
    p, y = p.double().flatten(), y.flatten().bool()
    w = torch.ones_like(p) if w is None else w.double().flatten()
    diff = p[y][:, None] - p[~y][None, :]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    pair_w = w[y][:, None] * w[~y][None, :]
    return float((wins * pair_w).sum() / pair_w.sum())


@pytest.mark.parametrize("preds, labels, weights, expected", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], None, 0.75),
    ([0.5, 0.5], [0, 1], None, 0.5),                       # a tie counts one half
    ([0.2, 0.9], [0, 1], None, 1.0),
    ([0.9, 0.2], [0, 1], None, 0.0),
    ([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1], None, 0.875),     # (1 + .5 + 1 + 1) / 4
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], [1, 3, 1, 1], 0.625),  # (1*1 + 0*3 + 1 + 3) / 8
])
def test_auc_hand_examples(preds, labels, weights, expected):
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    _close(M.auc(torch.tensor(preds), torch.tensor(labels), w), expected)


@pytest.mark.parametrize("n, decimals, weighted, seed", [
    (300, 1, False, 0),
    (300, 1, True, 1),
    (257, 2, False, 2),
    (257, 2, True, 3),
    (400, None, False, 4),
    (400, None, True, 5),
    (50, 0, True, 6),  # scores only 0 or 1: almost all ties
])
def test_auc_matches_pairwise_reference(n, decimals, weighted, seed):
    p, y, w = _binary_data(n, seed, decimals, weighted)
    _close(M.auc(p, y, w), _pairwise_auc(p, y, w))


def test_auc_from_logits_ranks_logits():
    logits = torch.tensor([-40.0, -35.0, 0.0, 30.0, 35.0])
    y = torch.tensor([0, 1, 0, 0, 1])
    # sigmoid rounds 30 and 35 to 1.0 in float32, a tie; the logits keep them apart
    _close(M.auc(logits, y, from_logits=True), _pairwise_auc(logits, y))
    p, y, _ = _binary_data(200, 7, decimals=None)
    _close(M.auc(torch.logit(p), y, from_logits=True), M.auc(p, y))


def test_auc_accepts_2d_lists_and_grad_tensors():
    p, y, w = _binary_data(60, 8, weighted=True)
    p2 = p.view(6, 10).clone().requires_grad_(True)
    _close(M.auc(p2, y.view(6, 10), w.view(6, 10)), _pairwise_auc(p, y, w))
    _close(M.auc(p.tolist(), y.tolist()), _pairwise_auc(p, y))


# ---------------------------------------------------------------- log loss, NE, accuracy

@pytest.mark.parametrize("weighted, seed", [(False, 10), (True, 11)])
def test_log_loss_matches_torch_bce(weighted, seed):
    p, y, w = _binary_data(500, seed, decimals=None, weighted=weighted)
    p = p.clamp(1e-4, 1 - 1e-4)
    per_example = F.binary_cross_entropy(p.double(), y.double(), reduction="none")
    wd = torch.ones_like(per_example) if w is None else w.double()
    _close(M.log_loss(p, y, w), (wd * per_example).sum() / wd.sum())
    logits = torch.logit(p.double())
    per_logit = F.binary_cross_entropy_with_logits(logits, y.double(), reduction="none")
    _close(M.log_loss(logits, y, w, from_logits=True), (wd * per_logit).sum() / wd.sum())


def test_log_loss_clamps_certain_mistakes():
    # p = 0 for a positive costs -log(eps), not inf or nan
    _close(M.log_loss(torch.tensor([0.0, 1.0]), torch.tensor([1, 0]), eps=1e-6),
           -math.log(1e-6), tol=1e-6)
    _close(M.log_loss(torch.tensor([1.0, 0.0]), torch.tensor([1, 0])), 0.0)
    inf = float("inf")
    logits = torch.tensor([inf, -inf, 50.0, inf])
    got = M.log_loss(logits, torch.tensor([1, 0, 0, 0]), from_logits=True, eps=1e-6)
    _close(got, (0 + 0 - math.log(1e-6) - math.log(1e-6)) / 4, tol=1e-6)


@pytest.mark.parametrize("weighted, seed", [(False, 20), (True, 21)])
def test_ne_of_base_rate_predictor_is_one(weighted, seed):
    _, y, w = _binary_data(400, seed, weighted=weighted)
    wd = torch.ones_like(y, dtype=torch.float64) if w is None else w.double()
    rate = float((wd * y.double()).sum() / wd.sum())
    _close(M.normalized_entropy(torch.full(y.shape, rate, dtype=torch.float64), y, w), 1.0)


def test_ne_is_log_loss_over_base_rate_entropy():
    p, y, w = _binary_data(300, 22, decimals=None, weighted=True)
    rate = float((w.double() * y.double()).sum() / w.double().sum())
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    _close(M.normalized_entropy(p, y, w), M.log_loss(p, y, w) / entropy)
    logits = torch.logit(p)
    _close(M.normalized_entropy(logits, y, w, from_logits=True),
           M.log_loss(logits, y, w, from_logits=True) / entropy)


@pytest.mark.parametrize("preds, labels, threshold, weights, from_logits, expected", [
    ([0.2, 0.5, 0.7, 0.4], [0, 1, 1, 1], 0.5, None, False, 0.75),  # 0.5 >= 0.5 is a 1
    ([0.2, 0.5, 0.7, 0.4], [0, 1, 1, 1], 0.3, None, False, 1.0),
    ([0.2, 0.5, 0.7, 0.4], [0, 1, 1, 1], 0.5, [1, 1, 1, 5], False, 3 / 8),
    ([-1.0, 0.0, 2.0, -0.5], [0, 1, 1, 1], 0.5, None, True, 0.75),
])
def test_accuracy_hand_examples(preds, labels, threshold, weights, from_logits, expected):
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    got = M.accuracy(torch.tensor(preds), torch.tensor(labels), threshold,
                     weights=w, from_logits=from_logits)
    _close(got, expected)


# -------------------------------------------------------------------------- retrieval

def _ranked_metrics(order, rel, k):
    """Standard recall@k and NDCG@k (linear gains) of one ranking."""
    rel = [float(r) for r in rel]
    recall = sum(rel[c] for c in order[:k]) / sum(rel)
    dcg = sum(rel[c] / math.log2(r + 2) for r, c in enumerate(order[:k]))
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(rel, reverse=True)[:k]))
    return recall, dcg / idcg


def _tie_averaged_reference(scores, rel, k):
    """Mean over queries of the metrics averaged over every order of tied candidates:
    each permutation of the candidates breaks ties one way."""
    recalls, ndcgs = [], []
    for s, r in zip(scores.tolist(), rel.tolist()):
        if sum(r) == 0:
            continue
        runs = []
        for perm in itertools.permutations(range(len(s))):
            order = sorted(range(len(s)), key=lambda c: (-s[c], perm[c]))
            runs.append(_ranked_metrics(order, r, k))
        recalls.append(sum(x for x, _ in runs) / len(runs))
        ndcgs.append(sum(x for _, x in runs) / len(runs))
    return sum(recalls) / len(recalls), sum(ndcgs) / len(ndcgs)


L2, L3, L4, L5 = (math.log2(i) for i in (2, 3, 4, 5))
S = [[0.1, 0.9, 0.5, 0.3]]  # ranking: candidate 1, 2, 3, 0


@pytest.mark.parametrize("scores, targets, k, recall, ndcg", [
    (S, [2], 1, 0.0, 0.0),
    (S, [2], 2, 1.0, 1 / L3),
    (S, [0], 4, 1.0, 1 / L5),
    (S, [[1, 0, 1, 0]], 2, 0.5, (1 / L3) / (1 + 1 / L3)),
    (S, [[1, 0, 1, 0]], 4, 1.0, (1 / L3 + 1 / L5) / (1 + 1 / L3)),
    (S, [[3, 0, 1, 2]], 4, None, (1 / L3 + 2 / L4 + 3 / L5) / (3 + 2 / L3 + 1 / L4)),
    ([[1.0, 1.0, 1.0, 1.0]], [0], 1, 0.25, 0.25),  # constant scores: a random ranker
    ([[1.0, 1.0, 0.0, 0.0]], [1], 1, 0.5, 0.5),
    ([[1.0, 1.0, 0.0, 0.0]], [1], 2, 1.0, (1 + 1 / L3) / 2),
    # two queries: the mean of their values; a query without relevant items is skipped
    ([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]], [[0, 1, 0, 0], [0, 0, 0, 1]], 2,
     0.5, 0.5),
    ([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]], [[0, 1, 0, 0], [0, 0, 0, 0]], 2,
     1.0, 1.0),
])
def test_retrieval_hand_examples(scores, targets, k, recall, ndcg):
    s, t = torch.tensor(scores), torch.tensor(targets)
    if recall is not None:
        _close(M.recall_at_k(s, t, k), recall)
    _close(M.ndcg_at_k(s, t, k), ndcg)


@pytest.mark.parametrize("targets_kind, k, seed", [
    ("index", 1, 30), ("index", 3, 31), ("binary", 2, 32), ("binary", 5, 33),
    ("graded", 1, 34), ("graded", 4, 35),
])
def test_retrieval_matches_tie_averaged_reference(targets_kind, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, c = 5, 5
    scores = torch.randint(0, 3, (q, c), generator=g).float()  # many ties
    if targets_kind == "index":
        targets = torch.randint(0, c, (q,), generator=g)
        rel = F.one_hot(targets, c)
    else:
        high = 2 if targets_kind == "binary" else 4
        rel = targets = torch.randint(0, high, (q, c), generator=g)
        rel[0, 0] = 1  # at least one query with a relevant candidate
    ref_recall, ref_ndcg = _tie_averaged_reference(scores, rel, k)
    if targets_kind != "graded":
        _close(M.recall_at_k(scores, targets, k), ref_recall)
    _close(M.ndcg_at_k(scores, targets, k), ref_ndcg)


@pytest.mark.parametrize("k, seed", [(1, 40), (5, 41), (30, 42)])
def test_retrieval_untied_matches_argsort_reference(k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(20, 30, generator=g)
    rel = (torch.rand(20, 30, generator=g) < 0.2).float()
    rel[:, 0] = 1.0
    orders = torch.argsort(scores, dim=1, descending=True).tolist()
    per_query = [_ranked_metrics(o, r, k) for o, r in zip(orders, rel.tolist())]
    _close(M.recall_at_k(scores, rel, k), sum(x for x, _ in per_query) / 20)
    _close(M.ndcg_at_k(scores, rel, k), sum(x for _, x in per_query) / 20)


# -------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("make, one_shot, weighted", [
    (M.AUC, M.auc, False),
    (M.AUC, M.auc, True),
    (M.LogLoss, M.log_loss, True),
    (M.NE, M.normalized_entropy, False),
    (M.NE, M.normalized_entropy, True),
    (M.Accuracy, lambda p, y, w: M.accuracy(p, y, weights=w), True),
])
def test_streaming_equals_one_shot(make, one_shot, weighted):
    p, y, w = _binary_data(301, 50, decimals=1, weighted=weighted)
    metric = make()
    for chunk in torch.split(torch.arange(301), [100, 1, 150, 50]):
        metric.update(p[chunk], y[chunk], None if w is None else w[chunk])
    _close(metric.compute(), one_shot(p, y, w), tol=1e-12)
    metric.reset()
    metric.update(p[:40].view(4, 10), y[:40].view(4, 10),
                  None if w is None else w[:40].view(4, 10))
    _close(metric.compute(), one_shot(p[:40], y[:40], None if w is None else w[:40]))


def test_streaming_auc_mixes_weighted_and_unweighted_batches():
    p, y, w = _binary_data(100, 51, weighted=True)
    metric = M.AUC()
    metric.update(p[:50], y[:50])
    metric.update(p[50:], y[50:], w[50:])
    full_w = torch.cat([torch.ones(50), w[50:]])
    _close(metric.compute(), _pairwise_auc(p, y, full_w))


@pytest.mark.parametrize("make, one_shot, kind", [
    (M.RecallAtK, M.recall_at_k, "index"),
    (M.RecallAtK, M.recall_at_k, "binary"),
    (M.NDCGAtK, M.ndcg_at_k, "graded"),
])
def test_streaming_retrieval_equals_one_shot(make, one_shot, kind):
    g = torch.Generator().manual_seed(52)
    scores = torch.randint(0, 5, (37, 12), generator=g).float()
    if kind == "index":
        targets = torch.randint(0, 12, (37,), generator=g)
    else:
        targets = torch.randint(0, 2 if kind == "binary" else 4, (37, 12), generator=g)
    metric = make(3)
    for rows in torch.split(torch.arange(37), [10, 20, 7]):
        metric.update(scores[rows], targets[rows])
    _close(metric.compute(), one_shot(scores, targets, 3), tol=1e-12)


def test_metric_collection_updates_all():
    p, y, w = _binary_data(200, 53, weighted=True)
    coll = M.MetricCollection({"auc": M.AUC(), "ne": M.NE(), "ll": M.LogLoss(),
                               "acc": M.Accuracy(threshold=0.3)})
    coll.update(p[:120], y[:120], w[:120])
    coll.update(p[120:], y[120:], weights=w[120:])
    got = coll.compute()
    assert list(got) == ["auc", "ne", "ll", "acc"] and len(coll) == 4
    expected = {"auc": M.auc(p, y, w), "ne": M.normalized_entropy(p, y, w),
                "ll": M.log_loss(p, y, w), "acc": M.accuracy(p, y, 0.3, weights=w)}
    for name, value in expected.items():
        _close(got[name], value, tol=1e-12)
    assert isinstance(coll["auc"], M.AUC)
    coll.reset()
    with pytest.raises(ValueError, match=r"AUC.compute\(\) called with no data"):
        coll.compute()


# ------------------------------------------------------------------------- bad input

P4, Y4 = torch.tensor([0.1, 0.6, 0.3, 0.9]), torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("fn, args, kwargs, match", [
    (M.auc, (P4, Y4[:3]), {}, r"labels shape \(3,\) does not match predictions shape \(4,\)"),
    (M.log_loss, (P4.view(4, 1), Y4), {}, r"labels shape \(4,\) does not match .* \(4, 1\)"),
    (M.auc, (P4, Y4, torch.ones(5)), {}, r"weights shape \(5,\) does not match"),
    (M.auc, (torch.tensor([]), torch.tensor([])), {}, r"predictions is empty"),
    (M.normalized_entropy, (P4, torch.tensor([0, 2, 0, 1])), {},
     r"labels must be 0 or 1, got 2 at flat index 1"),
    (M.accuracy, (P4, torch.tensor([0.0, 0.5, 0.0, 1.0])), {}, r"labels must be 0 or 1, got 0.5"),
    (M.log_loss, (torch.tensor([0.1, 1.5, 0.3, 0.9]), Y4), {},
     r"predictions must be probabilities in \[0, 1\] .*from_logits=True.*got 1.5 at flat index 1"),
    (M.auc, (torch.tensor([0.1, float("nan"), 0.3, 0.9]), Y4), {},
     r"predictions must be probabilities .* got nan"),
    (M.auc, (torch.tensor([0.1, float("nan"), 0.3, 0.9]), Y4), {"from_logits": True},
     r"predictions must be logits, not NaN"),
    (M.log_loss, (P4, Y4, torch.tensor([1.0, -1.0, 1.0, 1.0])), {},
     r"weights must be finite and >= 0, got -1.0 at flat index 1"),
    (M.log_loss, (P4, Y4, torch.zeros(4)), {}, r"log loss is undefined: weights sum to 0"),
    (M.log_loss, (P4, Y4), {"eps": 0.0}, r"eps must be in \(0, 0.5\), got 0.0"),
    (M.accuracy, (P4, Y4, 1.5), {}, r"threshold must be in \[0, 1\], got 1.5"),
    (M.auc, ("abc", Y4), {}, r"predictions must be a tensor, got str"),
    (M.auc, (P4, torch.ones(4)), {},
     r"AUC is undefined when only one class is present: total positive weight 4, "
     r"total negative weight 0"),
    (M.auc, (P4, Y4, torch.tensor([1.0, 0.0, 1.0, 0.0])), {},
     r"only one class is present: total positive weight 0"),
    (M.normalized_entropy, (P4, torch.zeros(4)), {},
     r"normalized entropy is undefined when only one class is present: base rate .* = 0"),
])
def test_binary_bad_input(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


S3 = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])


@pytest.mark.parametrize("fn, args, match", [
    (M.recall_at_k, (S3, torch.tensor([0, 1]), 0), r"k must be >= 1, got k=0"),
    (M.ndcg_at_k, (S3, torch.tensor([0, 1]), 4),
     r"k=4 exceeds num_candidates=3 \(scores shape \(2, 3\)\)"),
    (M.recall_at_k, (S3, torch.tensor([0, 1]), 1.5), r"k must be an integer, got 1.5"),
    (M.recall_at_k, (S3[0], torch.tensor([0]), 1),
     r"scores must be 2-D \(num_queries, num_candidates\), got shape \(3,\)"),
    (M.ndcg_at_k, (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 1),
     r"scores is empty \(shape \(0, 3\)\)"),
    (M.recall_at_k, (S3, torch.tensor([0, 3]), 1),
     r"targets must be candidate indices in \[0, 3\), got 3 at flat index 1"),
    (M.recall_at_k, (S3, torch.tensor([0.0, 1.0]), 1), r"must be an integer tensor, got dtype"),
    (M.ndcg_at_k, (S3, torch.tensor([0, 1, 2]), 1),
     r"targets shape \(3,\) must be \(num_queries,\) = \(2,\) or .* = \(2, 3\)"),
    (M.recall_at_k, (S3, torch.tensor([[0, 2, 0], [1, 0, 0]]), 1),
     r"targets must be 0/1 relevance, got 2.0 at flat index 1"),
    (M.ndcg_at_k, (S3, torch.tensor([[0, -1, 0], [1, 0, 0]]), 1),
     r"targets must be finite relevance >= 0, got -1.0"),
    (M.ndcg_at_k, (torch.tensor([[0.1, float("nan")]]), torch.tensor([0]), 1),
     r"scores must not be NaN, got nan at flat index 1"),
    (M.recall_at_k, (S3, torch.zeros(2, 3), 1),
     r"recall@1 is undefined: no query has a relevant candidate"),
    (M.ndcg_at_k, (S3, torch.zeros(2, 3), 2),
     r"NDCG@2 is undefined: no query has a relevant candidate"),
])
def test_retrieval_bad_input(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("make", [M.AUC, M.NE, M.LogLoss, M.Accuracy,
                                  lambda: M.RecallAtK(1), lambda: M.NDCGAtK(2)])
def test_streaming_compute_before_update(make):
    with pytest.raises(ValueError, match=r"compute\(\) called with no data: call update"):
        make().compute()


def test_streaming_rejects_bad_batch_and_keeps_state():
    metric = M.AUC()
    metric.update(P4, Y4)
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, got 3"):
        metric.update(P4, torch.tensor([0, 3, 0, 1]))
    _close(metric.compute(), M.auc(P4, Y4))
    single = M.AUC()
    single.update(P4, torch.ones(4))
    with pytest.raises(ValueError, match=r"only one class is present"):
        single.compute()
    with pytest.raises(ValueError, match=r"k must be >= 1, got k=-2"):
        M.NDCGAtK(-2)
    with pytest.raises(ValueError, match=r"metrics\['x'\] must be an fxrec.metrics.Metric"):
        M.MetricCollection({"x": M.auc})
    with pytest.raises(ValueError, match=r"metrics must name at least one metric"):
        M.MetricCollection({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu():
    p, y, w = _binary_data(5000, 60, decimals=2, weighted=True)
    for fn in (M.auc, M.log_loss, M.normalized_entropy):
        _close(fn(p.cuda(), y.cuda(), w.cuda()), fn(p, y, w))
    scores = torch.randint(0, 4, (64, 50)).float()
    targets = torch.randint(0, 50, (64,))
    for fn in (M.recall_at_k, M.ndcg_at_k):
        _close(fn(scores.cuda(), targets.cuda(), 5), fn(scores, targets, 5))
    metric = M.NE()
    metric.update(p.cuda(), y.cuda())
    assert metric._totals.device.type == "cuda"
