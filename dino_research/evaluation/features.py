"""Frozen-backbone features of a labelled dataset, extracted on every rank and kept in dataset order.

The k-NN and fast linear evaluations only need ``(features, labels)`` of the train and test splits.
:func:`extract_features` computes them once, sharded over the ranks, and hands every rank the whole
set; :func:`save_features` / :func:`load_features` keep them on disk so a protocol can be rerun
(another k, another temperature) without touching the images again.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import atomic_save, load_file
from ..utils import comm

__all__ = ["FEATURES_FORMAT", "extract", "extract_features", "extract_features_multi", "load_feature_file",
           "load_features", "save_feature_file", "save_features", "shard_indices"]

logger = logging.getLogger("dino_research")

# Keys of a features file written by save_features.
FEATURE_KEYS = ("train_features", "train_labels", "test_features", "test_labels")


def shard_indices(num_items: int, rank: int, world_size: int, pad: bool = True) -> list[int]:
    """Dataset indices handled by ``rank``: ``rank, rank + W, rank + 2W, ...`` (``W = world_size``), the
    one rule by which every evaluation splits a dataset over ranks.

    With ``pad`` (features gathered on every rank) the share is padded by wrapping around so that
    every rank gets ``ceil(num_items / W)`` indices, and position ``p = i * W + rank`` of the padded
    sequence is index ``p % num_items``: gathering the ranks' ``i``-th items side by side and keeping
    the first ``num_items`` restores dataset order. Without it (features kept on their rank, e.g. the
    fast linear probe's cache) the shares are disjoint and exact: ``range(rank, num_items, W)``.
    """
    if num_items <= 0:
        raise ValueError(f"cannot shard an empty dataset (num_items={num_items})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if not pad:
        return list(range(rank, num_items, world_size))
    per_rank = math.ceil(num_items / world_size)
    return [(i * world_size + rank) % num_items for i in range(per_rank)]


class _Progress:
    """A tqdm bar on an interactive terminal; otherwise one log line per ~10% (no spam in log files).
    ``unit`` and ``units`` name what is counted (the resumable extraction counts chunks)."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "batch", units: str = "batches"):
        self.total, self.desc, self.done, self.units = total, desc, 0, units
        self.enabled = enabled and total > 0
        self.bar = None
        self.next_log = 0.1
        self.start = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # a plain log then
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            return
        fraction = self.done / self.total
        if fraction + 1e-9 >= self.next_log or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            logger.info("%s: %d/%d %s (%d%%), %.0fs elapsed, eta %.0fs", self.desc, self.done, self.total,
                        self.units, round(100 * fraction), elapsed, eta)
            while self.next_log <= fraction + 1e-9:
                self.next_log += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _all_gather_in_order(local: torch.Tensor, num_items: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's ``local`` (per_rank, *S) in the order of :func:`shard_indices`, padding
    removed: (num_items, *S), on the CPU."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return local[:num_items]
    # NCCL only moves CUDA tensors and gloo is the CPU backend: gather where the backend works.
    gather_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = local.to(gather_device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    # (W, per_rank, *S) -> (per_rank, W, *S): row i*W + r is rank r's i-th item, i.e. padded position p.
    stacked = torch.stack(parts, dim=1).flatten(0, 1)
    return stacked[:num_items].cpu()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized ``backbone`` features of every item of ``dataset``, on every rank.

    :func:`extract_features_multi` with one backbone; see it for the arguments and the contract.

    Returns:
        ``features`` (N, D) float32 with rows of unit L2 norm and ``labels`` (N,) int64, both on the
        CPU and in dataset order, identical on every rank (N = ``len(dataset)``).
    """
    (features,), labels = extract_features_multi([backbone], dataset, batch_size=batch_size, device=device,
                                                 num_workers=num_workers, amp_dtype=amp_dtype, progress=progress)
    return features, labels


@torch.no_grad()
def extract_features_multi(
    backbones: Sequence[nn.Module],
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """L2-normalized features of every item of ``dataset`` by each of ``backbones``, from one pass
    over the data (the images are read and transformed once), on every rank.

    Args:
        backbones: each maps images (B, 3, H, W) on ``device`` to features (B, D_i): for DINO's ViTs
            the final-normed CLS token, for convnets the pooled features, ``nn.Flatten(1)`` for raw
            pixels. They must already be on ``device``; each runs in eval mode (its previous mode is
            restored afterwards).
        dataset: items ``(image Tensor (3, H, W), label: int)``, e.g. with the eval transform.
        batch_size: images per process per forward pass.
        device: where the forward passes run.
        num_workers: data-loader worker processes per rank.
        amp_dtype: run the forward pass under ``torch.autocast`` with this dtype (``None``: float32).
        progress: report progress on the main process (tqdm on a terminal, else a log line per ~10%).

    Returns:
        ``[features (N, D_i) for each backbone]``, float32 rows of unit L2 norm, and ``labels`` (N,)
        int64, all on the CPU and in dataset order, identical on every rank (N = ``len(dataset)``).

    :func:`extract` with ``normalize=True, gather=True``: with W ranks, rank r computes the items of
    :func:`shard_indices` (padded so all ranks run the same number of batches) and the results are
    exchanged with ``all_gather``; every rank must call this function.
    """
    for backbone in backbones:
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbones must be modules, got {type(backbone).__name__}")
    return extract(backbones, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                   amp_dtype=amp_dtype, progress=progress, normalize=True, gather=True, rows=True)


@torch.no_grad()
def extract(
    functions: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    normalize: bool = False,
    gather: bool = True,
    rows: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The one feature-extraction loop of every evaluation: ``functions`` applied to the images of
    ``dataset`` in one pass (each image read and transformed once).

    Args:
        functions: each maps images (B, 3, H, W) on ``device`` to features (B, ...) of any shape (a
            backbone's CLS token, ``block_features`` (B, R, D), patch tokens); modules among them
            run in eval mode (their mode is restored afterwards).
        normalize: L2-normalize each row over its last dimension (float32).
        gather: every rank gets every item, in dataset order (:func:`shard_indices` padded, then
            ``all_gather``); else each rank keeps its exact, disjoint share (``pad=False``), in order.
        rows: each function must return one feature vector per image, (B, D).
        others: as :func:`extract_features_multi`.

    Returns ``([features (N, ...) float32 for each function], labels (N,) int64)`` on the CPU; ``N`` is
    ``len(dataset)`` with ``gather``, this rank's share otherwise.
    """
    device = torch.device(device)
    num_items = len(dataset)
    if num_items == 0:
        raise ValueError("extract_features: the dataset is empty")
    rank, world_size = comm.get_rank(), comm.get_world_size()
    indices = shard_indices(num_items, rank, world_size, pad=gather)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, drop_last=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False,
                        # A private generator: the loader's worker seed must not consume the global
                        # torch RNG, or an evaluation during training would shift the training's
                        # random stream (and break exact resume).
                        generator=torch.Generator())
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    modules = [f for f in functions if isinstance(f, nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    bar = _Progress(len(loader), "extracting features", progress and comm.is_main_process())
    features, labels = [None] * len(functions), torch.empty(len(indices), dtype=torch.int64)
    start = 0
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            stop = start + images.shape[0]
            for i, fn in enumerate(functions):
                with autocast:
                    out = fn(images)
                if out.ndim < 2 or out.shape[0] != images.shape[0] or (rows and out.ndim != 2):
                    raise ValueError(f"the backbone must return features {'(B, D)' if rows else '(B, ...)'}; got "
                                     f"{tuple(out.shape)} for a batch of {images.shape[0]} images")
                out = out.float()  # in float32: autocast outputs may be half precision
                if normalize:
                    out = F.normalize(out, dim=-1)
                if features[i] is None:  # preallocated: no second copy when concatenating
                    features[i] = torch.empty(len(indices), *out.shape[1:], dtype=torch.float32)
                features[i][start:stop] = out.cpu()
            labels[start:stop] = torch.as_tensor(targets, dtype=torch.int64)
            start = stop
            bar.update()
    finally:
        bar.close()
        for m, mode in zip(modules, was_training):
            m.train(mode)
    assert start == len(indices), f"loaded {start} items, expected {len(indices)}"
    if not gather:
        return features, labels
    return ([_all_gather_in_order(f, num_items, device) for f in features],
            _all_gather_in_order(labels, num_items, device))


# The one features-file layout of the evaluations (k-NN dumps, the fast linear probe's per-rank cache):
# {"format": FEATURES_FORMAT, "splits": {NAME: {"features", "labels", "dataset_size"}}, "meta": {...}}.
FEATURES_FORMAT = "dino_research.features/1"


def save_feature_file(path: str, splits: dict, **meta) -> None:
    """Write ``splits`` (``{name: {"features": Tensor (N, ...), "labels": Tensor (N,), "dataset_size":
    int}}``) and ``meta`` (plain values) to ``path`` atomically, readable with :func:`load_feature_file`."""
    clean = {name: {"features": split["features"].detach().cpu(), "labels": split["labels"].detach().cpu(),
                    "dataset_size": int(split.get("dataset_size", split["labels"].shape[0]))}
             for name, split in splits.items()}
    atomic_save({"format": FEATURES_FORMAT, "splits": clean, "meta": dict(meta)}, path)


def load_feature_file(path: str) -> tuple[dict, dict]:
    """``(splits, meta)`` of a file written by :func:`save_feature_file`, read safely (``weights_only``).
    A k-NN dump of an earlier version (keys ``train_features``, ...) is read as splits train and val.

    Raises:
        CheckpointError: the file is missing or unreadable.
        ValueError: it is not a features file.
    """
    data = load_file(path)
    if isinstance(data, dict) and data.get("format") == FEATURES_FORMAT:
        return data["splits"], data.get("meta", {})
    if isinstance(data, dict) and all(k in data for k in FEATURE_KEYS):  # the layout before the format key
        return ({"train": {"features": data["train_features"], "labels": data["train_labels"],
                           "dataset_size": len(data["train_labels"])},
                 "val": {"features": data["test_features"], "labels": data["test_labels"],
                         "dataset_size": len(data["test_labels"])}}, {})
    found = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise ValueError(f"{path} is not a features file (format {FEATURES_FORMAT}): found {found}")


def save_features(path: str, train_features: torch.Tensor, train_labels: torch.Tensor,
                  test_features: torch.Tensor, test_labels: torch.Tensor) -> None:
    """Write k-NN features (splits train and val) to ``path`` (:func:`save_feature_file`), readable
    with :func:`load_features`. Call it on one process."""
    tensors = dict(zip(FEATURE_KEYS, (train_features, train_labels, test_features, test_labels)))
    _check_features(tensors, path)
    save_feature_file(path, {"train": {"features": train_features, "labels": train_labels},
                             "val": {"features": test_features, "labels": test_labels}})


def load_features(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_features (N, D), train_labels (N,), test_features (M, D), test_labels (M,))`` from a
    file written by :func:`save_features`, read safely (``weights_only``) onto the CPU.

    Raises:
        CheckpointError: the file is missing or unreadable.
        ValueError: it is not a features file (keys, shapes or dtypes do not fit).
    """
    splits, _ = load_feature_file(path)
    if "train" not in splits or "val" not in splits:
        raise ValueError(f"{path} holds splits {sorted(splits)}; k-NN needs train and val")
    t = {"train_features": splits["train"]["features"], "train_labels": splits["train"]["labels"],
         "test_features": splits["val"]["features"], "test_labels": splits["val"]["labels"]}
    _check_features(t, path)
    return tuple(t[k] for k in FEATURE_KEYS)


def _check_features(t: dict, where: str) -> None:
    for split in ("train", "test"):
        feats, labels = t[f"{split}_features"], t[f"{split}_labels"]
        if not (isinstance(feats, torch.Tensor) and feats.ndim == 2 and feats.is_floating_point()):
            raise ValueError(f"{where}: {split}_features must be a floating tensor (N, D)")
        if not (isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.shape[0] == feats.shape[0]
                and not labels.is_floating_point()):
            raise ValueError(f"{where}: {split}_labels must be an integer tensor ({feats.shape[0]},)")
    if t["train_features"].shape[1] != t["test_features"].shape[1]:
        raise ValueError(f"{where}: train and test features differ in dimension "
                         f"({t['train_features'].shape[1]} vs {t['test_features'].shape[1]})")
