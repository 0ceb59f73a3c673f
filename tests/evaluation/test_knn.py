"""Weighted k-NN: hand-computed votes, a direct formula, multi-k, chunking, ties and input checks."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dino_research.evaluation.knn import effective_k, k_note, knn_classifier, knn_classifier_multi_k


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Query (1, 0) of class 0. Similarities to the five training vectors: 1, 0.5, 0.5, 0, -1.
TRAIN = torch.tensor([unit(0), unit(60), unit(-60), unit(90), unit(180)])
TRAIN_LABELS = torch.tensor([0, 1, 1, 2, 2])
QUERY = torch.tensor([unit(0)])


def top1(k, T, label=0, **kw):
    return knn_classifier(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([label]), k, T, **kw)[0]


def test_hand_computed_votes():
    # k=1: only the identical vector votes -> class 0.
    assert top1(1, 0.1) == 100.0 and top1(1, 1.0) == 100.0
    # k=3, T=0.1: votes class 0 e^10 = 22026 vs class 1 2e^5 = 297: the weighted vote picks 0,
    # though a plain majority of the 3 neighbours (two of class 1) would pick 1.
    assert top1(3, 0.1, label=0) == 100.0 and top1(3, 0.1, label=1) == 0.0
    # k=3, T=1: class 0 e^1 = 2.718 vs class 1 2e^0.5 = 3.297: class 1 wins.
    assert top1(3, 1.0, label=0) == 0.0 and top1(3, 1.0, label=1) == 100.0
    # k=5, T=1: 0: e = 2.718, 1: 2e^0.5 = 3.297, 2: e^0 + e^-1 = 1.368 -> ranking 1, 0, 2.
    assert top1(5, 1.0, label=1) == 100.0
    # k=5, T=0.1: 0: e^10, 1: 2e^5, 2: 1 + e^-10 -> class 0.
    assert top1(5, 0.1, label=0) == 100.0


def test_top5_with_fewer_than_five_classes_counts_every_class():
    # 3 classes: "top-5" is top-3, which always holds the label.
    for label in (0, 1, 2):
        for k in (1, 3, 5):
            assert knn_classifier(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([label]), k, 0.1)[1] == 100.0


def test_tie_goes_to_the_lower_class_index():
    # Two neighbours with exactly the same similarity (0.5) and different classes: equal votes.
    train = torch.tensor([unit(60), unit(-60)])
    train[1, 0] = train[0, 0]  # identical x coordinate -> bit-identical similarity to (1, 0)
    labels = torch.tensor([2, 1])  # the higher class comes first in the bank
    assert knn_classifier(train, labels, QUERY, torch.tensor([1]), 2, 0.07)[0] == 100.0
    assert knn_classifier(train, labels, QUERY, torch.tensor([2]), 2, 0.07) == (0.0, 100.0)


def test_classes_without_votes_are_ranked_by_index():
    # One neighbour of class 7 among 10 classes: ranking 7, then the unvoted 0, 1, 2, 3.
    train, labels = QUERY.clone(), torch.tensor([7])
    queries, targets = QUERY.repeat(10, 1), torch.arange(10)
    top1_acc, top5_acc = knn_classifier(train, labels, queries, targets, 1, 0.07)
    assert top1_acc == 10.0  # only label 7
    assert top5_acc == 50.0  # labels 7, 0, 1, 2, 3


def direct_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Per query in float64: similarities, k best, sum exp(s / T) per class, rank by (-vote, class)."""
    k = min(k, train.shape[0])
    hits1 = hits5 = 0
    for q, y in zip(test.double(), test_labels.tolist()):
        sims = (train.double() @ q).tolist()
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(train_labels[j])] += math.exp(sims[j] / T)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        hits1 += ranking[0] == y
        hits5 += y in ranking[:min(5, num_classes)]
    return 100.0 * hits1 / len(test), 100.0 * hits5 / len(test)


@pytest.fixture
def random_problem():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(7, 8, generator=g)
    train_labels = torch.randint(0, 7, (60,), generator=g)
    test_labels = torch.randint(0, 7, (17,), generator=g)
    train = F.normalize(centers[train_labels] + 1.5 * torch.randn(60, 8, generator=g), dim=1)
    test = F.normalize(centers[test_labels] + 1.5 * torch.randn(17, 8, generator=g), dim=1)
    return train, train_labels, test, test_labels


KS = [1, 3, 7, 20, 60, 100]


def test_matches_the_direct_formula(random_problem):
    train, train_labels, test, test_labels = random_problem
    results = knn_classifier_multi_k(train, train_labels, test, test_labels, KS, 0.5)
    assert list(results) == KS
    for k in KS:
        expected = direct_knn(train, train_labels, test, test_labels, k, 0.5, 7)
        assert results[k] == pytest.approx(expected), k
    # The problem is informative and k matters, so the comparison is not vacuous.
    assert len({results[k][0] for k in KS}) > 1 and max(r[0] for r in results.values()) > 100 / 7


def test_multi_k_equals_single_k_calls_and_chunking_does_not_matter(random_problem):
    train, train_labels, test, test_labels = random_problem
    reference = knn_classifier_multi_k(train, train_labels, test, test_labels, KS, 0.07)
    for k in KS:
        assert knn_classifier(train, train_labels, test, test_labels, k, 0.07) == reference[k]
    for chunk_size in (1, 3, 16, 17, 1000):
        assert knn_classifier_multi_k(train, train_labels, test, test_labels, KS, 0.07,
                                      chunk_size=chunk_size) == reference
    # Unsorted and repeated ks: same values, requested order, duplicates collapsed.
    again = knn_classifier_multi_k(train, train_labels, test, test_labels, [20, 1, 20, 7], 0.07)
    assert list(again) == [20, 1, 7] and all(again[k] == reference[k] for k in again)


def test_k_larger_than_the_bank_is_clamped(random_problem):
    train, train_labels, test, test_labels = random_problem
    results = knn_classifier_multi_k(train, train_labels, test, test_labels, [60, 1000], 0.07)
    assert results[1000] == results[60]


def test_k_over_the_bank_is_all_five_votes_and_is_said_so():
    # k=200 on the 5-vector bank is k=5: class 2 gets e^0 + e^-10 against class 0's e^10 and class
    # 1's 2 e^5, so the query stays class 0 (top-1 100); the warning and the note say k=5 was used.
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("dino_research").addHandler(handler)  # it may not propagate to pytest's
    try:
        assert knn_classifier_multi_k(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([0]), [200, 5], 0.1) == {
            200: (100.0, 100.0), 5: (100.0, 100.0)}
    finally:
        logging.getLogger("dino_research").removeHandler(handler)
    assert messages == ["k-NN: k=200 > 5 training images: all 5 used (the result of k=200 is that of k=5)"]
    assert top1(200, 0.1, label=1) == top1(5, 0.1, label=1) == 0.0
    assert effective_k(200, 5) == 5 and effective_k(5, 5) == 5 and effective_k(3, 5) == 3
    assert k_note(200, 5) == "k=200 > 5 training images: all 5 used"
    assert k_note(5, 5) == "" and k_note(1, 5) == ""


def test_tiny_temperature_does_not_overflow(random_problem):
    # exp(1 / 0.001) overflows float32: with stabilized weights the nearest neighbour dominates.
    train, train_labels, test, test_labels = random_problem
    tiny = knn_classifier(train, train_labels, test, test_labels, 10, 1e-3)
    assert tiny[0] == knn_classifier(train, train_labels, test, test_labels, 1, 0.07)[0]


def test_num_classes_is_inferred_from_train_and_test_labels():
    # Test label 4 never occurs in the bank: inferred C = 5, so top-5 holds every class.
    test_labels = torch.tensor([4])
    assert knn_classifier(TRAIN, TRAIN_LABELS, QUERY, test_labels, 3, 0.1) == (0.0, 100.0)
    # With C = 10 the ranking is 0, 1 (voted), then 2, 3, 4 (unvoted, by index): 4 is still 5th.
    assert knn_classifier(TRAIN, TRAIN_LABELS, QUERY, test_labels, 3, 0.1, num_classes=10) == (0.0, 100.0)
    assert knn_classifier(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([5]), 3, 0.1, num_classes=10) == (0.0, 0.0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classifier(TRAIN, TRAIN_LABELS, QUERY, test_labels, 3, 0.1, num_classes=3)


@pytest.mark.parametrize("change, match", [
    (dict(train_features=TRAIN[:3]), "train_labels has"),
    (dict(test_features=torch.ones(1, 3)), "dimensions differ"),
    (dict(train_labels=TRAIN_LABELS.float()), "integer"),
    (dict(test_labels=torch.tensor([-1])), ">= 0"),
    (dict(train_features=TRAIN.long()), "floating"),
    (dict(ks=[]), "non-empty"),
    (dict(ks=[0]), ">= 1"),
    (dict(ks=[True]), ">= 1"),
    (dict(T=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(train_features=TRAIN[:0], train_labels=TRAIN_LABELS[:0]), "needs training"),
])
def test_invalid_inputs_are_rejected(change, match):
    args = dict(train_features=TRAIN, train_labels=TRAIN_LABELS, test_features=QUERY,
                test_labels=torch.tensor([0]), ks=[1], T=0.07)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        knn_classifier_multi_k(**args)


def test_knn_classifier_takes_one_int_k():
    with pytest.raises(TypeError, match="knn_classifier_multi_k"):
        knn_classifier(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([0]), [1, 3], 0.07)
