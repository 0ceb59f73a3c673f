"""DAVIS-2017 semi-supervised video object segmentation scores: region similarity J, contour accuracy F.

The protocol is the one of the official evaluation package (davisvideochallenge/davis2017-evaluation,
``davis2017/metrics.py`` and ``evaluation.py``), which the DINO paper uses for its Table 5:

* **J** of one object in one frame: the IoU of the predicted and annotated masks; 1 when both are
  empty (``db_eval_iou``).
* **F**: the F-measure of boundary precision and recall (``f_measure``). Boundaries are 1-pixel maps
  (:func:`boundary_map`, the same pixels as the package's ``_seg2bmap``); a predicted boundary pixel
  is correct when an annotated one lies within a disk of radius ``ceil(bound_th * image diagonal)``
  pixels (``bound_th`` 0.008: 8 pixels on 480x854 DAVIS frames), and vice versa for recall.
* Semi-supervised frames: the **first** frame (its annotation is the input) and the **last** frame
  are not scored (``all_gt_masks[:, 1:-1]`` in ``DAVISEvaluation.evaluate``). Void pixels (255) are
  background for scoring: the semi-supervised path passes no void mask.
* Objects are the labels 1..N of the **first** annotation; a predicted label above N is an error.
* Aggregation: per object, the mean over its scored frames (J-Mean of that object; recall = fraction
  of frames above 0.5; decay = first quarter minus last quarter), then the mean over **all objects
  of all sequences** (not over sequences); J&F-Mean = (J-Mean + F-Mean) / 2.

Masks are numpy arrays: bool (H, W) for one object, int label maps (T, H, W) for a sequence (the
values of DAVIS indexed PNGs). No OpenCV/scikit-image: the disk dilation is done with cumulative sums.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = [
    "BOUND_TH",
    "VOID_LABEL",
    "boundary_map",
    "contour_accuracy",
    "dilate_disk",
    "evaluate_sequence",
    "frame_statistics",
    "region_similarity",
    "summarize",
]

# DAVIS's boundary tolerance, as a fraction of the image diagonal (f_measure's bound_th default).
BOUND_TH = 0.008
# Label of "void" pixels in DAVIS annotations (object borders hard to annotate).
VOID_LABEL = 255


def region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """J: IoU of bool masks ``pred`` and ``gt`` (H, W); 1.0 when both are empty (DAVIS's convention)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and annotation {gt.shape} differ in shape")
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W) map of the pixels of ``mask`` (H, W) whose right, lower or lower-right neighbour
    has the other value: 1-pixel boundaries, offset half a pixel towards the origin.

    Outside the image the mask is taken to continue its last row and column (edge replication), so
    the image border itself is never a boundary. These are exactly the pixels of the DAVIS
    package's ``_seg2bmap`` (which special-cases the last row and column to the same effect).
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"expected a mask (H, W), got shape {m.shape}")
    padded = np.pad(m, ((0, 1), (0, 1)), mode="edge")
    right, below, diagonal = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    return (m != right) | (m != below) | (m != diagonal)


def _dilate_rows(mask: np.ndarray, half_width: int) -> np.ndarray:
    """Horizontal dilation: out[y, x] = any(mask[y, x - half_width : x + half_width + 1]), zero outside."""
    if half_width == 0:
        return mask.copy()
    # A window sum from a running sum: O(H W) whatever the width.
    padded = np.pad(mask.astype(np.int32), ((0, 0), (half_width + 1, half_width)))
    running = padded.cumsum(axis=1)
    return (running[:, 2 * half_width + 1:] - running[:, :-(2 * half_width + 1)]) > 0


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Bool (H, W): pixels within Euclidean distance ``radius`` of a True pixel of ``mask`` (H, W).

    The structuring element is the disk {(dy, dx): dy^2 + dx^2 <= radius^2} (scikit-image's
    ``disk(radius)``, which the DAVIS package passes to ``cv2.dilate``); pixels outside the image
    count as False. The disk is cut into rows: row dy is a horizontal segment of half-width
    floor(sqrt(r^2 - dy^2)), so the dilation is an OR of shifted row dilations.
    """
    m = np.asarray(mask, bool)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    H = m.shape[0]
    out = np.zeros_like(m)
    rows = {}  # half-width -> row-dilated mask, shared by +dy and -dy
    for dy in range(-radius, radius + 1):
        if abs(dy) >= H:  # a shift past the whole image reaches no row
            continue
        half = math.isqrt(radius * radius - dy * dy)
        if half not in rows:
            rows[half] = _dilate_rows(m, half)
        # out[y] |= rows[half][y + dy] for the rows y + dy inside the image
        src = rows[half][max(dy, 0):H + min(dy, 0)]
        out[max(-dy, 0):H - max(dy, 0)] |= src
    return out


def contour_accuracy(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F: boundary F-measure of bool masks ``pred`` and ``gt`` (H, W), as DAVIS's ``f_measure``.

    Tolerance: ``bound_th`` pixels when >= 1, else ``ceil(bound_th * sqrt(H^2 + W^2))`` pixels.
    Precision: fraction of ``pred``'s boundary pixels within the tolerance disk of ``gt``'s boundary;
    recall the other way round. Both boundaries empty: 1.0; exactly one empty: 0.0.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and annotation {gt.shape} differ in shape")
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape)))
    pred_boundary, gt_boundary = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pred_boundary), np.count_nonzero(gt_boundary)
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0  # DAVIS: (P, R) = (1, 1), (1, 0) or (0, 1)
    # Both boundaries lie in their joint bounding box, so dilating inside it is exact (the dilation
    # is only read at boundary pixels, and nothing outside the box can be dilated into it).
    rows, cols = np.nonzero(pred_boundary | gt_boundary)
    box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    pred_boundary, gt_boundary = pred_boundary[box], gt_boundary[box]
    precision = np.count_nonzero(pred_boundary & dilate_disk(gt_boundary, radius)) / n_pred
    recall = np.count_nonzero(gt_boundary & dilate_disk(pred_boundary, radius)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def evaluate_sequence(pred_masks: np.ndarray, gt_masks: np.ndarray, bound_th: float = BOUND_TH) -> dict:
    """Per-object, per-frame J and F of one sequence, on the frames DAVIS scores.

    ``pred_masks``, ``gt_masks``: int label maps (T, H, W) (0 background, k object k; 255 in the
    annotation is void and counts as background). Objects are 1..N, N the largest label of the first
    annotation. Frames 1 .. T-2 are scored (not the first, given as input, nor the last).

    Returns ``{"J": (N, T-2), "F": (N, T-2) float arrays, "frames": [1, ..., T-2], "num_objects": N}``.
    Raises ``ValueError`` for shapes that differ, fewer than 3 frames, or a predicted label above N
    (the DAVIS package stops there too).
    """
    pred, gt = np.asarray(pred_masks), np.asarray(gt_masks)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected predictions and annotations of one shape (T, H, W), got {pred.shape} "
                         f"and {gt.shape}")
    if pred.shape[0] < 3:
        raise ValueError(f"DAVIS scores frames 1..T-2 (not the first and last): {pred.shape[0]} frames leave none")
    gt = np.where(gt == VOID_LABEL, 0, gt)
    num_objects = int(gt[0].max())
    frames = list(range(1, pred.shape[0] - 1))
    # Only the scored frames are read, as the package does (the first may be the annotation, void included).
    if int(pred[frames].max()) > num_objects:
        raise ValueError(f"the prediction holds label {int(pred[frames].max())} but the first annotation has "
                         f"{num_objects} object(s)")
    J = np.zeros((num_objects, len(frames)))
    F = np.zeros((num_objects, len(frames)))
    for i in range(num_objects):
        for j, t in enumerate(frames):
            p, g = pred[t] == i + 1, gt[t] == i + 1
            J[i, j] = region_similarity(p, g)
            F[i, j] = contour_accuracy(p, g, bound_th)
    return {"J": J, "F": F, "frames": frames, "num_objects": num_objects}


def frame_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame scores (n,), as DAVIS's ``db_statistics``.

    Recall: fraction of frames scoring above 0.5. Decay: the mean of the first quarter minus that of
    the last, the quarters cut at ``round(linspace(1, n, 5)) - 1`` (inclusive ends, so neighbouring
    quarters share a frame). NaN entries are skipped.
    """
    v = np.asarray(values, float)
    if v.size == 0:
        raise ValueError("no scored frame")
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    # The package casts these indices to uint8, wrapping above 256 frames; plain ints here.
    cuts = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    first, last = v[cuts[0]:cuts[1] + 1], v[cuts[3]:cuts[4] + 1]
    decay = float(np.nanmean(first) - np.nanmean(last))
    return mean, recall, decay


def summarize(sequences: Mapping[str, dict]) -> dict:
    """The DAVIS-2017 table from :func:`evaluate_sequence` results ``{video: result}``.

    Returns ``{"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay": floats in
    [0, 1] (decays in [-1, 1]), each the mean over every object of every video; "per_object":
    {"VIDEO_k": {"J-Mean", "F-Mean"}} (the package's per-sequence table, k from 1); "per_video":
    {video: {"J-Mean", "F-Mean", "J&F-Mean", "objects", "scored_frames"}}}``: a video's line averages its
    objects (a readable summary; the global numbers weight objects, not videos).
    """
    stats = {"J": [], "F": []}
    per_object, per_video = {}, {}
    for video, result in sequences.items():
        means = {"J": [], "F": []}
        for k in range(result["num_objects"]):
            for metric in ("J", "F"):
                m, r, d = frame_statistics(result[metric][k])
                stats[metric].append((m, r, d))
                means[metric].append(m)
            per_object[f"{video}_{k + 1}"] = {"J-Mean": means["J"][-1], "F-Mean": means["F"][-1]}
        if result["num_objects"]:
            j, f = float(np.mean(means["J"])), float(np.mean(means["F"]))
            per_video[video] = {"J-Mean": j, "F-Mean": f, "J&F-Mean": (j + f) / 2,
                                "objects": result["num_objects"], "scored_frames": len(result["frames"])}
    if not stats["J"]:
        raise ValueError("no object to summarize: every sequence's first annotation is empty")
    out = {}
    for metric in ("J", "F"):
        table = np.asarray(stats[metric])  # (objects, 3): mean, recall, decay
        out.update({f"{metric}-Mean": float(table[:, 0].mean()), f"{metric}-Recall": float(table[:, 1].mean()),
                    f"{metric}-Decay": float(table[:, 2].mean())})
    summary = {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}
    summary.update(per_object=per_object, per_video=per_video)
    return summary
