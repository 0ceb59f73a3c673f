"""Image retrieval on the revisited Oxford and Paris benchmarks, the DINO paper's protocol (Sec. 4.2).

A frozen backbone embeds every database and query image; the database is ranked by cosine
similarity to each query and scored with the revisited protocols of Radenović et al. (CVPR 2018):
Medium (positives: easy + hard) and Hard (positives: hard; easy images become junk). The metric
code reproduces revisitop's ``python/evaluate.py`` (``compute_ap``, ``compute_map``); the images are
prepared as DINO's ``eval_image_retrieval.py`` prepares them. ``tools/eval_retrieval.py`` runs it.

Dataset layout (revisitop's ``configdataset``), ``DATASET`` in :data:`REVISITOP_DATASETS`::

    ROOT/DATASET/gnd_DATASET.pkl      {"imlist": [name], "qimlist": [name], "gnd": [per query dict]}
    ROOT/DATASET/jpg/NAME.jpg         every name of imlist and qimlist

Shapes: ``N`` database images, ``Q`` queries, ``D`` feature width; ``ranks`` (N, Q) holds database
indices, best first, one column per query (revisitop's convention).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import pickle
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from ..data import DatasetError
from ..data.datasets import load_image
from .attention import crop_to_patch_multiple
from .features import extract

__all__ = ["MULTISCALE_SCALES", "REVISITOP_DATASETS", "MultiScaleFeatures", "RestrictedUnpickler",
           "RevisitOPGroundTruth", "RevisitOPImages", "compute_ap", "compute_map", "evaluate_revisitop",
           "extract_retrieval_features", "load_revisitop_ground_truth", "multi_scale_features", "rank_database",
           "revisitop_protocols"]

REVISITOP_DATASETS = ("roxford5k", "rparis6k")
# DINO's utils.multi_scale: the image at full size, 1/sqrt(2) and 1/2 of it.
MULTISCALE_SCALES = (1.0, 1 / math.sqrt(2), 0.5)


def _layout(dataset: str) -> str:
    return (f"expected revisitop's layout (github.com/filipradenovic/revisitop): ROOT/{dataset}/gnd_{dataset}.pkl, "
            f"a dict with 'imlist' and 'qimlist' (image names) and 'gnd' (one dict per query with 'easy', 'hard' "
            f"and 'junk' database indices, optionally 'bbx'), and the images at ROOT/{dataset}/jpg/NAME.jpg")


# ------------------------------------------------------------------------------------ ground truth
def _numpy_core(submodule: str):
    # numpy 2 writes numpy._core.*, numpy 1 numpy.core.*: both names resolve to this numpy's module
    # (importing numpy.core under numpy 2 would warn).
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Protocol 0-2 pickles written by Python 3 carry bytes (a numpy array's data) as
    # _codecs.encode(text, "latin1"): admitted for that codec only.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} (only latin1 is admitted)")
    return text.encode("latin1")


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # arrays, protocols 0-4
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars (np.float64 in a list)
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # arrays, protocol 5
    for module in ("builtins", "__builtin__"):  # containers without an opcode of their own in old protocols
        for name, value in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("complex", complex)):
            allowed[(module, name)] = value
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds plain data only: Python containers and scalars, numpy arrays, numpy
    scalars and dtypes. Every other global (a class, ``os.system``...) raises
    :class:`pickle.UnpicklingError` naming it, so a ground-truth file cannot run code when read.
    """

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only plain containers and numpy arrays are admitted")
        return allowed[(module, name)]


@dataclass
class RevisitOPGroundTruth:
    """The parsed ``gnd_DATASET.pkl``: image names and, per query, database indices.

    Attributes:
        dataset: ``roxford5k`` or ``rparis6k``.
        path: the ground-truth file.
        image_dir: ``ROOT/DATASET/jpg``.
        imlist: the N database image names (no extension); ``qimlist``: the Q query image names.
        gnd: one dict per query: ``easy``, ``hard``, ``junk`` int64 arrays of database indices and
            ``bbx``, the query's region ``(x1, y1, x2, y2)`` in pixels, or ``None``.
    """

    dataset: str
    path: str
    image_dir: str
    imlist: list
    qimlist: list
    gnd: list

    def image_path(self, name: str) -> str:
        return os.path.join(self.image_dir, name + ".jpg")


def _index_array(value, key: str, query: int, num_images: int, where: str, dataset: str) -> np.ndarray:
    try:
        indices = np.asarray(value).reshape(-1)
        ok = indices.size == 0 or (np.issubdtype(indices.dtype, np.number) and np.all(indices == np.round(indices)))
    except (TypeError, ValueError):
        ok = False
    if not ok or (indices.size and (indices.min() < 0 or indices.max() >= num_images)):
        raise DatasetError(f"{where}: gnd[{query}][{key!r}] must hold integer indices in [0, {num_images}) of "
                           f"imlist; {_layout(dataset)}")
    return indices.astype(np.int64)


def load_revisitop_ground_truth(root: str, dataset: str) -> RevisitOPGroundTruth:
    """Read and check ``ROOT/DATASET/gnd_DATASET.pkl`` (revisitop's ``configdataset``).

    The pickle is read with :class:`RestrictedUnpickler`, which admits only numpy array (and scalar,
    dtype) reconstruction and plain containers: a file that names any other global is refused
    rather than executed. Index lists are returned as int64 arrays and ``bbx`` as a float tuple.

    Raises:
        DatasetError: unknown dataset, missing or unreadable file, or a layout that does not fit,
            naming the file and the expected layout.
    """
    if dataset not in REVISITOP_DATASETS:
        raise DatasetError(f"unknown revisitop dataset {dataset!r}; expected one of {', '.join(REVISITOP_DATASETS)}")
    path = os.path.join(root, dataset, f"gnd_{dataset}.pkl")
    if not os.path.isfile(path):
        raise DatasetError(f"{path} does not exist; {_layout(dataset)}")
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f).load()
    except Exception as e:  # a refused global, a truncated file, not a pickle at all: all one user error
        raise DatasetError(f"{path} is not a readable ground-truth pickle ({type(e).__name__}: {e}); "
                           f"{_layout(dataset)}") from e
    if not isinstance(data, dict) or not all(k in data for k in ("imlist", "qimlist", "gnd")):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{path}: found {found}; {_layout(dataset)}")
    imlist, qimlist, raw_gnd = data["imlist"], data["qimlist"], data["gnd"]
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{path}: {key!r} must be a non-empty list of image names; {_layout(dataset)}")
    if not isinstance(raw_gnd, (list, tuple)) or len(raw_gnd) != len(qimlist):
        raise DatasetError(f"{path}: 'gnd' must be a list with one dict per query ({len(qimlist)}); {_layout(dataset)}")
    gnd = []
    for i, entry in enumerate(raw_gnd):
        if not isinstance(entry, dict) or not all(k in entry for k in ("easy", "hard", "junk")):
            raise DatasetError(f"{path}: gnd[{i}] must be a dict with 'easy', 'hard' and 'junk'; {_layout(dataset)}")
        parsed = {k: _index_array(entry[k], k, i, len(imlist), path, dataset) for k in ("easy", "hard", "junk")}
        bbx = entry.get("bbx")
        if bbx is not None:
            bbx = tuple(float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1))
            if len(bbx) != 4:
                raise DatasetError(f"{path}: gnd[{i}]['bbx'] must be (x1, y1, x2, y2); {_layout(dataset)}")
        gnd.append({**parsed, "bbx": bbx})
    return RevisitOPGroundTruth(dataset=dataset, path=path, image_dir=os.path.join(root, dataset, "jpg"),
                                imlist=list(imlist), qimlist=list(qimlist), gnd=gnd)


class RevisitOPImages(Dataset):
    """The database or query images of a revisitop dataset, prepared as DINO's ``eval_image_retrieval.py``.

    Each image is read as stored (no EXIF rotation: the ``bbx`` coordinates refer to the stored
    pixels), shrunk with ``PIL.Image.thumbnail((imsize, imsize), LANCZOS)`` so its longer side is at
    most ``imsize`` (aspect ratio kept, never enlarged: DINO's ``thumbnail(..., ANTIALIAS)``), then
    turned into a tensor normalized with ``mean``/``std``. Sizes differ, so load with batch size 1.

    DINO embeds the *whole* query image; revisitop's instructions crop each query to its ``bbx``
    first. ``crop_queries=True`` follows revisitop (crop, then shrink); the default follows DINO,
    whose protocol the paper's numbers come from.

    Items: ``(image (3, h, w) float32, index)``, ``index`` into ``imlist`` or ``qimlist``.

    Raises:
        DatasetError: an image of the list is missing, naming it and the expected layout.
    """

    def __init__(self, ground_truth: RevisitOPGroundTruth, split: str, *, imsize: int,
                 mean: Sequence[float], std: Sequence[float], crop_queries: bool = False):
        if split not in ("database", "query"):
            raise ValueError(f"split must be 'database' or 'query', got {split!r}")
        if imsize < 1:
            raise ValueError(f"imsize must be positive, got {imsize}")
        self.ground_truth, self.split, self.imsize = ground_truth, split, imsize
        self.crop = crop_queries and split == "query"
        names = ground_truth.qimlist if split == "query" else ground_truth.imlist
        self.paths = [ground_truth.image_path(n) for n in names]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"{len(missing)} of the {len(self.paths)} {split} images listed in {ground_truth.path} "
                               f"are missing, e.g. {', '.join(missing[:3])}; {_layout(ground_truth.dataset)}")
        if self.crop and any(g["bbx"] is None for g in ground_truth.gnd):
            raise DatasetError(f"crop_queries needs a 'bbx' for every query of {ground_truth.path}")
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index], exif_transpose=False)
        if self.crop:
            image = image.crop(self.ground_truth.gnd[index]["bbx"])
        image.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        return self.to_tensor(image), index

    def __repr__(self) -> str:
        return f"RevisitOPImages({self.ground_truth.dataset}, {self.split}, {len(self)} images, imsize={self.imsize})"


# ------------------------------------------------------------------------------------ metrics
def compute_ap(ranks, nres: int) -> float:
    """Average precision of one query from the 0-based ``ranks`` (ascending) of its positives that
    were retrieved, ``nres`` positives in all (revisitop's ``compute_ap``).

    The precision-recall curve is integrated with trapezoids: the j-th positive found at rank r adds
    ``(j / r + (j + 1) / (r + 1)) / 2 / nres``, with ``j / r`` read as 1 at r = 0. Positives never
    retrieved add nothing.
    """
    if nres <= 0:
        raise ValueError(f"nres must be positive, got {nres}")
    ranks = np.asarray(ranks, dtype=np.float64).reshape(-1)
    found = np.arange(len(ranks), dtype=np.float64)
    precision_0 = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1))
    precision_1 = (found + 1) / (ranks + 1)
    return float(np.sum((precision_0 + precision_1) * (1.0 / nres) / 2.0))


def compute_map(ranks, gnd: Sequence[dict], kappas: Sequence[int] = ()):
    """Mean average precision and mean precision at ``kappas`` (revisitop's ``compute_map``).

    Args:
        ranks: (N, Q) database indices, best first, one column per query.
        gnd: Q dicts with ``ok`` (positive database indices) and optionally ``junk`` (indices ignored).
        kappas: the k of precision@k.

    Junk images are taken out of the ranking: every positive moves up by the number of junk images
    ranked before it. Precision@k of a query is measured at ``min(k, rank of its last positive)``
    (1-based), revisitop's definition. A query without positives is skipped: its AP and precisions
    are NaN and it is left out of the means. (Two cases revisitop fails on are defined here: no
    query with a positive raises ``ValueError``; a query none of whose positives is in ``ranks`` has
    precision 0.)

    Returns ``(map, aps, pr, prs)``: mAP (float, fraction), ``aps`` (Q,), ``pr`` (len(kappas),) mean
    precisions, ``prs`` (Q, len(kappas)).
    """
    ranks = np.asarray(ranks)
    num_queries = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != num_queries:
        raise ValueError(f"ranks must be (N, {num_queries}) for {num_queries} queries, got {ranks.shape}")
    aps = np.zeros(num_queries)
    prs = np.zeros((num_queries, len(kappas)))
    positions = np.arange(ranks.shape[0])
    for i, qgnd in enumerate(gnd):
        ok = np.asarray(qgnd["ok"]).reshape(-1)
        if ok.shape[0] == 0:
            aps[i], prs[i, :] = np.nan, np.nan
            continue
        junk = np.asarray(qgnd.get("junk", ())).reshape(-1)
        pos = positions[np.isin(ranks[:, i], ok)]
        junk_pos = positions[np.isin(ranks[:, i], junk)]
        # revisitop's loop, vectorized: each positive's position minus the junk images ranked above it
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        aps[i] = compute_ap(pos, ok.shape[0])
        pos = pos + 1  # 1-based for precision@k
        for j, k in enumerate(kappas):
            kq = min(pos.max(), k) if len(pos) else k
            prs[i, j] = (pos <= kq).sum() / kq
    evaluated = ~np.isnan(aps)
    if not evaluated.any():
        raise ValueError("no query has a positive image: mAP is undefined")
    return float(aps[evaluated].mean()), aps, prs[evaluated].mean(axis=0), prs


def revisitop_protocols(gnd: Sequence[dict]) -> dict:
    """The ``ok``/``junk`` lists of the Medium and Hard protocols from revisitop's easy/hard/junk.

    Medium: ok = easy + hard, junk = junk. Hard: ok = hard, junk = junk + easy (an easy match is
    neither rewarded nor penalized). Returns ``{"medium": [Q dicts], "hard": [Q dicts]}``.
    """
    medium = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.asarray(g["junk"])} for g in gnd]
    hard = [{"ok": np.asarray(g["hard"]), "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
    return {"medium": medium, "hard": hard}


def evaluate_revisitop(ranks, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP and mP@k of ``ranks`` (N, Q) under the Medium and Hard protocols, in percent.

    Returns ``{"medium": {"mAP": .., "mP@1": .., ..., "AP": [Q per-query APs, None where skipped]},
    "hard": {...}}`` (the values DINO's script prints, times 100).
    """
    results = {}
    for protocol, protocol_gnd in revisitop_protocols(gnd).items():
        mean_ap, aps, pr, _ = compute_map(ranks, protocol_gnd, list(kappas))
        results[protocol] = {"mAP": 100.0 * mean_ap, **{f"mP@{k}": 100.0 * float(p) for k, p in zip(kappas, pr)},
                             "AP": [None if np.isnan(a) else 100.0 * float(a) for a in aps]}
    return results


# ------------------------------------------------------------------------------------ features
def _backbone_input(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # DINO's strided patch embedding ignores the pixels past the last whole patch; our ViT refuses
    # such sizes, so drop them here (the top-left crop keeps exactly the pixels DINO uses).
    patch_size = getattr(backbone, "patch_size", None)
    return crop_to_patch_multiple(images, patch_size) if isinstance(patch_size, int) else images


def multi_scale_features(backbone: nn.Module, images: torch.Tensor,
                         scales: Sequence[float] = MULTISCALE_SCALES) -> torch.Tensor:
    """Images (B, 3, H, W) -> L2-normalized (B, D): the mean of ``backbone``'s features over ``scales``.

    As DINO's ``utils.multi_scale``: each scale other than 1 resizes the images with
    ``F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)``; the features are
    averaged (a plain mean, no GeM power) and L2-normalized. DINO divides the batch by one norm,
    the same as per row at its batch size of 1. ``scales=(1,)`` is single-scale extraction.
    """
    total = None
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        features = backbone(_backbone_input(backbone, x)).float()
        total = features if total is None else total + features
    return F.normalize(total / len(scales), dim=-1)


class MultiScaleFeatures(nn.Module):
    """:func:`multi_scale_features` of a wrapped backbone as a module (so extraction sets eval mode)."""

    def __init__(self, backbone: nn.Module, scales: Sequence[float] = MULTISCALE_SCALES):
        super().__init__()
        self.backbone, self.scales = backbone, tuple(scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), rows of unit norm."""
        return multi_scale_features(self.backbone, images, self.scales)


def extract_retrieval_features(backbone: nn.Module, dataset: RevisitOPImages, *, device, multiscale: bool = False,
                               num_workers: int = 0, progress: bool = True) -> torch.Tensor:
    """Features (len(dataset), D) of every image, L2-normalized, in dataset order, on every rank.

    Through :func:`~dino_research.evaluation.features.extract` (``normalize=True, gather=True``):
    sharded over the ranks, one image per batch (sizes differ). ``multiscale`` averages over
    :data:`MULTISCALE_SCALES`, else the image is seen at its size only.
    """
    scales = MULTISCALE_SCALES if multiscale else (1.0,)
    (features,), indices = extract([MultiScaleFeatures(backbone, scales)], dataset, batch_size=1, device=device,
                                   num_workers=num_workers, progress=progress, normalize=True, gather=True, rows=True)
    assert torch.equal(indices, torch.arange(len(dataset))), "features are not in dataset order"
    return features


def rank_database(database: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Database (N, D) and query (Q, D) features, L2-normalized -> ranks (N, Q): database indices by
    decreasing cosine similarity to each query (ties broken by index, a stable sort)."""
    similarity = database.float() @ queries.float().T  # (N, Q)
    return torch.argsort(-similarity, dim=0, stable=True).numpy()
