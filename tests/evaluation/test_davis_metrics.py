"""DAVIS-2017 J and F against hand-made cases and direct restatements of the benchmark's definitions."""

import itertools
import math

import numpy as np
import pytest

from dino_research.evaluation.davis_metrics import (
    boundary_map,
    contour_accuracy,
    dilate_disk,
    evaluate_sequence,
    frame_statistics,
    region_similarity,
    summarize,
)


def square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_identical_and_disjoint_masks():
    a = square((100, 100), 20, 20, 30)
    assert region_similarity(a, a) == 1.0 and contour_accuracy(a, a) == 1.0
    b = square((100, 100), 70, 70, 20)  # far beyond the 2-pixel tolerance of a 100x100 image
    assert region_similarity(a, b) == 0.0 and contour_accuracy(a, b) == 0.0


def test_empty_masks_follow_the_davis_conventions():
    empty, a = np.zeros((40, 40), bool), square((40, 40), 5, 5, 10)
    assert region_similarity(empty, empty) == 1.0 and contour_accuracy(empty, empty) == 1.0
    assert region_similarity(empty, a) == 0.0
    assert contour_accuracy(empty, a) == 0.0 and contour_accuracy(a, empty) == 0.0


def test_hand_computed_iou():
    gt = np.zeros((6, 6), bool)
    gt[1:4, 1:4] = True  # 9 pixels
    pred = np.zeros((6, 6), bool)
    pred[2:4, 2:5] = True  # 6 pixels, 4 of them in gt
    assert region_similarity(pred, gt) == pytest.approx(4 / 11)
    # a one-column shift of a 10x10 square: 90 shared pixels of 110
    assert region_similarity(square((50, 50), 10, 10, 10), square((50, 50), 10, 11, 10)) == pytest.approx(9 / 11)


def test_one_pixel_shift_is_within_the_boundary_tolerance():
    a, b = square((100, 100), 30, 30, 25), square((100, 100), 30, 31, 25)
    # tolerance ceil(0.008 * hypot(100, 100)) = 2 pixels
    assert contour_accuracy(a, b) == 1.0 and region_similarity(a, b) < 1.0
    far = square((100, 100), 30, 34, 25)  # 4 pixels: the vertical edges are out of reach
    assert contour_accuracy(a, far) < 1.0
    # bound_th >= 1 is a number of pixels
    assert contour_accuracy(a, far, bound_th=4) == 1.0 and contour_accuracy(a, far, bound_th=3) < 1.0


def test_boundary_map_by_hand():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    expected = np.array([[1, 1, 1, 0],
                         [1, 0, 1, 0],
                         [1, 1, 1, 0],
                         [0, 0, 0, 0]], bool)
    assert np.array_equal(boundary_map(mask), expected)


def _boundary_by_definition(seg):
    """DAVIS's seg2bmap, pixel by pixel: a pixel differs from its east, south or south-east neighbour;
    in the last row only east counts, in the last column only south, the last pixel never."""
    H, W = seg.shape
    out = np.zeros_like(seg)
    for y, x in itertools.product(range(H), range(W)):
        e = seg[y, x + 1] if x + 1 < W else False
        s = seg[y + 1, x] if y + 1 < H else False
        se = seg[y + 1, x + 1] if x + 1 < W and y + 1 < H else False
        if y == H - 1 and x == W - 1:
            out[y, x] = False
        elif y == H - 1:
            out[y, x] = seg[y, x] != e
        elif x == W - 1:
            out[y, x] = seg[y, x] != s
        else:
            out[y, x] = seg[y, x] != e or seg[y, x] != s or seg[y, x] != se
    return out


def test_boundary_map_matches_the_definition_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(7, 9), (1, 5), (5, 1), (12, 12)]:
        seg = rng.random(shape) < 0.4
        assert np.array_equal(boundary_map(seg), _boundary_by_definition(seg)), shape


def test_disk_dilation_matches_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 17)) < 0.05
    ys, xs = np.nonzero(mask)
    for radius in range(0, 5):
        want = np.zeros_like(mask)
        for y, x in itertools.product(range(13), range(17)):
            want[y, x] = any((y - a) ** 2 + (x - b) ** 2 <= radius ** 2 for a, b in zip(ys, xs))
        assert np.array_equal(dilate_disk(mask, radius), want), radius
    assert np.array_equal(dilate_disk(mask, 40), np.ones_like(mask))  # radius beyond the image


def test_contour_accuracy_matches_its_definition():
    """F = 2PR / (P + R); P: share of predicted boundary pixels within r of an annotated one, R the converse."""
    rng = np.random.default_rng(2)
    # (bound_th, tolerance in pixels): a fraction of the 15x19 diagonal (24.2), or pixels when >= 1
    for trial, (bound_th, radius) in enumerate([(0.008, 1), (0.05, 2), (2, 2), (3, 3)]):
        pred, gt = rng.random((15, 19)) < 0.3, rng.random((15, 19)) < 0.3
        pred[:, :3 * trial] = False  # boundaries of different extents: their joint bounding box varies
        bp, bg = np.argwhere(_boundary_by_definition(pred)), np.argwhere(_boundary_by_definition(gt))
        distances = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))  # (pred pixels, gt pixels)
        P, R = (distances.min(1) <= radius).mean(), (distances.min(0) <= radius).mean()
        want = 0.0 if P + R == 0 else 2 * P * R / (P + R)
        assert contour_accuracy(pred, gt, bound_th=bound_th) == pytest.approx(want), trial


def test_evaluate_sequence_skips_first_and_last_frame_and_void():
    shape = (20, 20)
    a, b = square(shape, 2, 2, 6), square(shape, 10, 10, 6)
    gt = np.zeros((4, *shape), np.uint8)
    gt[:, a], gt[:, b] = 1, 2
    gt[1, 0, :] = 255  # void: background for scoring
    pred = np.zeros_like(gt)
    pred[1][a] = 1  # frame 1: object 1 right, object 2 missed
    pred[2][a], pred[2][b] = 1, 2  # frame 2: both right
    # frames 0 and 3 are left empty: not scored, so they do not lower the means
    result = evaluate_sequence(pred, gt)
    assert result["frames"] == [1, 2] and result["num_objects"] == 2
    np.testing.assert_allclose(result["J"], [[1, 1], [0, 1]])
    np.testing.assert_allclose(result["F"], [[1, 1], [0, 1]])
    with pytest.raises(ValueError, match="label 3"):
        evaluate_sequence(np.full_like(gt, 3), gt)
    pred[0] = pred[3] = 255  # unscored frames are not read (the first is usually the annotation, void included)
    np.testing.assert_allclose(evaluate_sequence(pred, gt)["J"], result["J"])
    with pytest.raises(ValueError, match="2 frames"):
        evaluate_sequence(pred[:2], gt[:2])


def test_frame_statistics_recall_and_decay():
    mean, recall, decay = frame_statistics(np.array([1.0, 1.0, 0.2, 0.2, 0.2]))
    # quarters cut at round(linspace(1, 5, 5)) - 1 = 0..4: first [1, 1], last [0.2, 0.2]
    assert mean == pytest.approx(0.52) and recall == pytest.approx(0.4) and decay == pytest.approx(0.8)


def test_summary_averages_objects_not_videos():
    def result(J, F):
        J, F = np.array(J, float), np.array(F, float)
        return {"J": J, "F": F, "frames": list(range(1, J.shape[1] + 1)), "num_objects": J.shape[0]}

    sequences = {
        "two": result([[1.0, 0.5], [0.0, 0.0]], [[1.0, 1.0], [0.5, 0.5]]),  # object means J .75, 0; F 1, .5
        "one": result([[0.6, 0.6]], [[0.2, 0.4]]),  # J .6, F .3
    }
    summary = summarize(sequences)
    assert summary["J-Mean"] == pytest.approx((0.75 + 0.0 + 0.6) / 3)  # not ((.75 + 0) / 2 + .6) / 2
    assert summary["F-Mean"] == pytest.approx((1.0 + 0.5 + 0.3) / 3)
    assert summary["J&F-Mean"] == pytest.approx((summary["J-Mean"] + summary["F-Mean"]) / 2)
    assert summary["J-Recall"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # frames above 0.5
    assert set(summary["per_object"]) == {"two_1", "two_2", "one_1"}
    assert summary["per_object"]["two_2"] == {"J-Mean": 0.0, "F-Mean": 0.5}
    assert summary["per_video"]["two"]["J&F-Mean"] == pytest.approx(((0.75 + 0) / 2 + (1 + 0.5) / 2) / 2)
    assert summary["per_video"]["one"]["objects"] == 1 and summary["per_video"]["one"]["scored_frames"] == 2
    assert all(math.isfinite(v) for k, v in summary.items() if k.endswith(("Mean", "Recall", "Decay")))
