"""Weighted k-nearest-neighbour classification of frozen features (the DINO paper's k-NN protocol).

Each test feature looks up its k most cosine-similar training features; neighbour j votes for its
label with weight ``exp(s_j / T)`` (Wu et al. 2018, used by DINO with T = 0.07), and the classes are
ranked by total vote. Top-1 and top-5 accuracies are reported in percent.

All requested k are answered from one similarity pass: the ``max(k)`` nearest neighbours are found
once per test chunk, sorted by similarity, and the votes of a larger k are those of the smaller k
plus the votes of the extra neighbours.

A k larger than the memory bank of N images cannot be honoured: every training image votes, which is
k = N. Results stay keyed by the requested k, so whoever reports them says what was computed:
:func:`effective_k` gives the k used, :func:`k_note` the sentence for a results table
("k=200 > 50 training images: all 50 used").
"""

from __future__ import annotations

import logging
import numbers
from typing import Sequence

import torch

__all__ = ["effective_k", "k_note", "knn_classifier", "knn_classifier_multi_k"]

logger = logging.getLogger("dino_research")


def effective_k(k: int, num_train: int) -> int:
    """The number of neighbours that vote when ``k`` are asked of a bank of ``num_train`` images."""
    return min(int(k), int(num_train))


def k_note(k: int, num_train: int) -> str:
    """"" when ``k`` neighbours exist among ``num_train``; otherwise what was computed instead, for the
    row of a results table: ``"k=200 > 50 training images: all 50 used"``."""
    if k <= num_train:
        return ""
    return f"k={k} > {num_train} training images: all {num_train} used"


def knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    T: float,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> tuple[float, float]:
    """``(top1, top5)`` accuracy in percent of the weighted ``k``-NN classifier.

    Same arguments and rules as :func:`knn_classifier_multi_k` with ``ks=[k]``; use that function to
    evaluate several k at the cost of one.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}; use knn_classifier_multi_k for several values")
    k = int(k)
    return knn_classifier_multi_k(train_features, train_labels, test_features, test_labels, [k], T,
                                  num_classes=num_classes, chunk_size=chunk_size)[k]


@torch.no_grad()
def knn_classifier_multi_k(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    T: float,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN accuracies for every k in ``ks``, from one similarity pass.

    Args:
        train_features: (N, D) the memory bank, rows L2-normalized (similarity = dot product =
            cosine similarity). Computation happens on its device and in its dtype.
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        test_features: (M, D) queries, rows L2-normalized; moved chunk by chunk to the bank's device.
        test_labels: (M,) integer labels (>= 0; a class absent from the training set is allowed and
            simply never predicted).
        ks: numbers of neighbours (ints >= 1). A k larger than N is clamped to N (with a warning):
            every training sample then votes. The result is still keyed by the requested k; report
            :func:`effective_k` / :func:`k_note` next to it.
        T: temperature of the vote weights ``exp(similarity / T)``; > 0.
        num_classes: number of classes C; default ``max(train_labels, test_labels) + 1``.
        chunk_size: test features per similarity block: memory is about ``chunk_size * N`` floats.

    Returns:
        ``{k: (top1, top5)}`` in the order of ``ks`` (duplicates collapsed), accuracies in percent as
        Python floats. Top-5 counts a hit when the label is among the ``min(5, C)`` best classes.

    Ranking and ties: classes are ranked by total vote with a stable sort of the votes in descending
    order, so classes with equal votes (in particular classes that got no vote) are ranked by
    increasing class index: a tie for first place goes to the lower class index. Weights are
    computed as ``exp((s_j - s_1) / T)`` with ``s_1`` the best similarity of the query, which is
    ``exp(s_j / T)`` times a positive per-query constant: the ranking is the same, and a small T
    cannot overflow. (On CUDA, ``scatter_add_`` sums in a nondeterministic order, so votes that are
    equal in exact arithmetic may differ in their last bit there.)
    """
    n_train, n_test, num_classes = _validate(train_features, train_labels, test_features, test_labels,
                                             ks, T, num_classes, chunk_size)
    requested = list(dict.fromkeys(int(k) for k in ks))
    clamped = {k: min(k, n_train) for k in requested}
    for k in requested:
        if k > n_train:
            logger.warning("k-NN: %s (the result of k=%d is that of k=%d)", k_note(k, n_train), k, n_train)
    steps = sorted(set(clamped.values()))  # the votes of steps[i] extend those of steps[i-1]
    k_max, top = steps[-1], min(5, num_classes)

    device = train_features.device
    bank = train_features
    bank_labels = train_labels.to(device=device, dtype=torch.int64)
    correct = {k: torch.zeros(2, dtype=torch.int64, device=device) for k in steps}  # (top-1, top-5) hits
    for start in range(0, n_test, chunk_size):
        queries = test_features[start:start + chunk_size].to(device=device, dtype=bank.dtype)
        targets = test_labels[start:start + chunk_size].to(device=device, dtype=torch.int64)
        sim = queries @ bank.T  # (c, N)
        nn_sim, nn_idx = sim.topk(k_max, dim=1, largest=True, sorted=True)  # (c, k_max), best first
        del sim
        nn_sim = nn_sim.float()
        weights = ((nn_sim - nn_sim[:, :1]) / T).exp_()  # (c, k_max), <= 1: no overflow
        nn_labels = bank_labels[nn_idx]  # (c, k_max)
        votes = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=device)
        done = 0
        for k in steps:
            # Neighbours done..k-1 add their weights to the running votes of the first `done` ones.
            votes.scatter_add_(1, nn_labels[:, done:k], weights[:, done:k])
            done = k
            ranking = votes.sort(dim=1, descending=True, stable=True).indices[:, :top]  # (c, top)
            hits = ranking == targets[:, None]
            correct[k][0] += hits[:, 0].sum()
            correct[k][1] += hits.any(dim=1).sum()
    results = {}
    for k in requested:
        top1, top5 = (correct[clamped[k]].double() * 100.0 / n_test).tolist()
        results[k] = (top1, top5)
    return results


def _validate(train_features, train_labels, test_features, test_labels, ks, T, num_classes, chunk_size):
    """Check the arguments of :func:`knn_classifier_multi_k`; returns ``(N, M, num_classes)``."""
    for name, feats in (("train_features", train_features), ("test_features", test_features)):
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or not feats.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor (N, D), got "
                             f"{getattr(feats, 'dtype', type(feats).__name__)} {tuple(getattr(feats, 'shape', ()))}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    for name, labels, feats in (("train_labels", train_labels, train_features),
                                ("test_labels", test_labels, test_features)):
        if (not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point()
                or labels.is_complex() or labels.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer tensor (N,), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"{name} has {labels.shape[0]} entries for {feats.shape[0]} features")
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"k-NN needs training and test samples, got {n_train} and {n_test}")
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of ints, got {ks!r}")
    if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"every k must be an int >= 1, got {list(ks)}")
    if not T > 0:
        raise ValueError(f"the temperature T must be > 0, got {T}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    low = min(int(train_labels.min()), int(test_labels.min()))
    if low < 0:
        raise ValueError(f"labels must be >= 0 (an unlabelled dataset cannot be evaluated), found {low}")
    high = max(int(train_labels.max()), int(test_labels.max()))
    if num_classes is None:
        num_classes = high + 1
    elif num_classes <= high:
        raise ValueError(f"num_classes = {num_classes} but a label is {high}")
    return n_train, n_test, int(num_classes)


def knn_features(backbones, bank, queries, *, batch_size: int, device, num_workers: int = 0,
                 progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(bank_features, bank_labels, query_features, query_labels) for each backbone]``: the
    L2-normalized features of the two datasets, each read once for every backbone (collective; see
    ``features.extract_features_multi``)."""
    from .features import extract_features_multi

    (bank_feats, bank_labels), (query_feats, query_labels) = [
        extract_features_multi(backbones, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                               progress=progress)
        for dataset in (bank, queries)]
    return [(b, bank_labels, q, query_labels) for b, q in zip(bank_feats, query_feats)]


def run_knn(backbones, bank, queries, *, ks: Sequence[int], temperature: float, batch_size: int, device,
            num_workers: int = 0, chunk_size: int = 256, progress: bool = True) -> list[dict[int, tuple[float, float]]]:
    """The paper's weighted k-NN of every backbone on (memory bank, queries) datasets: one results dict
    per backbone, ``{k: (top1, top5)}`` on the main process (``{}`` on the others). The k-NN hook
    during training and ``tools/eval_knn.py`` both run it."""
    from ..utils import comm

    out = []
    for bank_f, bank_l, query_f, query_l in knn_features(backbones, bank, queries, batch_size=batch_size,
                                                         device=device, num_workers=num_workers, progress=progress):
        out.append(knn_classifier_multi_k(bank_f.to(device), bank_l, query_f, query_l, ks, temperature,
                                          chunk_size=chunk_size) if comm.is_main_process() else {})
    return out
