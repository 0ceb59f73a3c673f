"""Linear probe on frozen features: the paper's protocol (DINO, Sec. 4.1 and Appendix).

A single ``nn.Linear`` is trained on top of a frozen backbone with SGD (momentum 0.9, no weight decay),
a learning rate ``BASE_LR * total_batch / 256`` that follows a half cosine to 0, and
RandomResizedCrop + horizontal flip augmentation; it is evaluated on center crops (top-1 / top-5).

Features (:func:`multiblock_features`):

* ViTs (anything with ``get_intermediate_layers``): the CLS tokens of the last ``n`` blocks, each
  already through the final norm, concatenated oldest block first -> ``(B, n*D)``; with
  ``avgpool_patchtokens`` the mean of the last block's patch tokens is appended -> ``(B, (n+1)*D)``
  (paper: n=4 for ViT-S, n=1 + avgpool for ViT-B). Plain concatenation, as DINOv2: DINO's reference
  *interleaves* CLS and average for n=1 (``cat(dim=-1).reshape``), so its released linear weights
  would need their input columns permuted to be used here.
* other backbones: their output, the pooled features ``(B, D)``; ``n`` and avgpool are ignored.

:func:`train_linear` only sees an ``embed`` callable and two datasets, so the loop is tested on
precomputed features with ``embed = identity``. It checkpoints every epoch and resumes exactly.
The fast grid over cached features lives in ``linear_fast.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from ..checkpoint import atomic_save, load_file
from ..data import build_eval_transform
from ..data.datasets import SYNTHETIC_NUM_CLASSES, Synthetic, to_rgb
from ..data.eval_transforms import build_eval_datasets
from ..data.loader import SeededSampleDataset, collate_samples
from ..data.samplers import ResumableDistributedSampler, derive_seed
from ..solver.build import LR_REFERENCE_BATCH
from ..solver.schedules import StepSchedule, cosine
from ..utils import comm

logger = logging.getLogger("dino_research")

LINEAR_CHECKPOINT = "linear_checkpoint.pth"
LINEAR_RESULTS = "linear.json"
_LOADER_STREAM = 0x4C494E45  # "LINE": the train loader's private generator seed


# ------------------------------------------------------------------------------------------ features
def has_blocks(backbone: nn.Module) -> bool:
    """True for ViT-like backbones exposing DINO's ``get_intermediate_layers(x, n)``."""
    return callable(getattr(backbone, "get_intermediate_layers", None))


def block_features(backbone: nn.Module, images: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Everything the linear variants of a ViT need, in one forward: ``(B, n_blocks + 1, D)``.

    Rows ``0 .. n_blocks-1``: CLS tokens of the last ``n_blocks`` blocks (final-normed), oldest first;
    row ``n_blocks``: mean of the last block's patch tokens. A non-ViT gives its output as ``(B, 1, D)``.
    """
    if not has_blocks(backbone):
        return backbone(images)[:, None]
    outputs = backbone.get_intermediate_layers(images, n_blocks)  # n_blocks x (B, 1 + N, D)
    cls_tokens = torch.stack([out[:, 0] for out in outputs], dim=1)
    patch_mean = outputs[-1][:, 1:].mean(dim=1)
    return torch.cat([cls_tokens, patch_mean[:, None]], dim=1)


def select_features(cached: torch.Tensor, n_last_blocks: Optional[int], avgpool: bool) -> torch.Tensor:
    """Classifier input ``(B, dim)`` from :func:`block_features` output ``(B, R, D)``.

    ``n_last_blocks=None`` means a non-ViT (``R == 1``): the pooled features themselves. Otherwise the
    last ``n_last_blocks`` CLS tokens (``<= R - 1``), concatenated oldest first, then the patch mean.
    """
    if n_last_blocks is None:
        return cached[:, 0]
    available = cached.shape[1] - 1
    if not 1 <= n_last_blocks <= available:
        raise ValueError(f"need 1 <= n_last_blocks <= {available} (the blocks cached), got {n_last_blocks}")
    parts = [cached[:, available - n_last_blocks:available].flatten(1)]
    if avgpool:
        parts.append(cached[:, available])
    return torch.cat(parts, dim=1)


def multiblock_features(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = 1,
                        avgpool_patchtokens: bool = False) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` -> linear-probe features: ``(B, (n_last_blocks + avgpool) * D)`` for a
    ViT, ``(B, D)`` (its output) for any other backbone. Not normalized. Call under ``no_grad``."""
    if not has_blocks(backbone):
        return backbone(images)
    return select_features(block_features(backbone, images, n_last_blocks), n_last_blocks, avgpool_patchtokens)


def linear_feature_dim(backbone: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool) -> int:
    """Width of :func:`multiblock_features` for ``backbone`` (reads its ``embed_dim``)."""
    if not has_blocks(backbone):
        return int(backbone.embed_dim)
    return (n_last_blocks + int(avgpool_patchtokens)) * int(backbone.embed_dim)


class LinearClassifier(nn.Module):
    """One ``nn.Linear(dim, num_classes)``, weights ~ N(0, 0.01^2), bias 0 (the reference's init);
    no BatchNorm. ``(B, dim) -> logits (B, num_classes)``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


# ------------------------------------------------------------------------------------------ recipe
def build_linear_train_transform(cfg) -> Callable:
    """``PIL.Image -> Tensor (3, TEST.CROP_SIZE, TEST.CROP_SIZE)``: RandomResizedCrop (torchvision
    defaults: scale 0.08-1, bilinear), horizontal flip, normalize with ``INPUT.MEAN/STD`` (reference)."""
    return T.Compose([
        T.Lambda(to_rgb),
        T.RandomResizedCrop(cfg.TEST.CROP_SIZE),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(cfg.INPUT.MEAN, cfg.INPUT.STD),
    ])


def scaled_linear_lr(base_lr: float, total_batch: int) -> float:
    """The linear scaling rule: ``base_lr * total_batch / 256``."""
    return base_lr * total_batch / LR_REFERENCE_BATCH


def cosine_lr(peak_lr: float, total_iters: int) -> StepSchedule:
    """Per-iteration half cosine ``lr(i) = peak * (1 + cos(pi * i / total_iters)) / 2``: ``peak`` at
    step 0, 0 one step after the last (the reference steps the same curve once per epoch)."""
    return cosine(peak_lr, 0.0, total_iters)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Counts of samples whose label is among the top ``k`` logits, per ``k``: float ``(len(ks),)``.
    ``logits (B, C)``; ``k`` is capped at C (top-5 of a 3-class problem is top-3)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # (B, kmax)
    hit = top == labels[:, None]
    return torch.stack([hit[:, :min(k, top.shape[1])].any(dim=1).sum() for k in ks]).float()


def num_classes_of(dataset: Dataset) -> int:
    """Number of classes of a labelled dataset (``classes``, else ``targets``, else Synthetic's 10)."""
    if getattr(dataset, "classes", None) is not None:
        return len(dataset.classes)
    if getattr(dataset, "targets", None):
        return int(max(dataset.targets)) + 1
    if isinstance(dataset, Synthetic):
        return SYNTHETIC_NUM_CLASSES
    raise ValueError(f"cannot tell the number of classes of {dataset!r}: it has no 'classes' or 'targets'")


def check_labels(labels: torch.Tensor) -> None:
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("the linear probe needs labelled data; got label -1 (unlabelled sample)")


def rank_share(dataset: Dataset) -> Dataset:
    """Items ``rank, rank + world, ...`` of ``dataset``: disjoint shares, no padding (exact counts);
    the evaluations' one splitting rule, ``features.shard_indices(pad=False)``."""
    from .features import shard_indices

    world = comm.get_world_size()
    return dataset if world == 1 else Subset(dataset, shard_indices(len(dataset), comm.get_rank(), world, pad=False))


def write_linear_results(path: str, results: dict) -> None:
    """Write ``results`` as JSON to ``path`` atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ loops
@torch.no_grad()
def evaluate_linear(embed: Callable, classifier: nn.Module, loader, device) -> dict:
    """Top-1 / top-5 (percent) and mean loss of ``classifier(embed(x))`` over ``loader``, summed over
    ranks (each rank passes a loader over its own share)."""
    classifier.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, count
    for images, labels in loader:
        labels = labels.to(device)
        logits = classifier(embed(images.to(device, non_blocking=True)))
        sums[:2] += topk_correct(logits, labels).double()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[3] += labels.numel()
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(sums)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n, "loss": sums[2].item() / n}


def _build_train_loader(train_set: Dataset, batch_size: int, seed: int, num_workers: int, device):
    """Seeded, resumable: epoch ``e`` holds the same samples and augmentations on any resume."""
    world, rank = comm.get_world_size(), comm.get_rank()
    sampler = ResumableDistributedSampler(len(train_set), world_size=world, rank=rank, seed=seed,
                                          shuffle=True, drop_last=True)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(_LOADER_STREAM, seed, rank))
    loader = DataLoader(SeededSampleDataset(train_set, seed), batch_size=batch_size, sampler=sampler,
                        num_workers=num_workers, drop_last=True, generator=generator, collate_fn=collate_samples,
                        pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0)
    return sampler, loader


def train_linear(embed: Callable[[torch.Tensor], torch.Tensor], classifier: LinearClassifier,
                 train_set: Dataset, val_set: Dataset, *, epochs: int, lr: float, batch_size: int,
                 momentum: float = 0.9, weight_decay: float = 0.0, device="cpu", output_dir: Optional[str] = None,
                 num_workers: int = 0, seed: int = 0, log_period: int = 20) -> dict:
    """Train ``classifier`` on ``embed(images)`` and evaluate it after every epoch.

    Args:
        embed: ``images (B, ...) on device -> features (B, dim)``, run under ``no_grad`` (the frozen
            backbone; the identity to train on precomputed features).
        classifier: on ``device``; wrapped in DDP when a process group exists (gradients averaged).
        train_set, val_set: items ``(input, label)``; ranks take disjoint shares of both.
        lr: the peak learning rate, already scaled (:func:`scaled_linear_lr`); per-iteration cosine
            to 0 over ``epochs`` (:func:`cosine_lr`).
        batch_size: per process; the total batch is ``batch_size * world_size``.
        output_dir: where ``linear_checkpoint.pth`` is written after every epoch and resumed from
            when present (None: no checkpoint). A resume continues at the next epoch with the same
            samples, augmentations, learning rates and momentum buffers as an uninterrupted run.

    Returns ``{"best", "last", "history", "lr"}``: ``history`` holds one ``{"epoch", "top1", "top5",
    "loss" (val), "train_loss"}`` per epoch (0-based, all epochs, resumed or not), ``last`` the final
    one, ``best`` the one of highest val top-1 (earliest on ties). Accuracies in percent.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs} (TEST.LINEAR.EPOCHS)")
    world = comm.get_world_size()
    sampler, loader = _build_train_loader(train_set, batch_size, seed, num_workers, device)
    iters_per_epoch = sampler.num_samples_per_rank // batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples over {world} processes give less than one batch "
                         f"of {batch_size} per process (TEST.LINEAR.BATCH_SIZE)")
    val_loader = DataLoader(rank_share(val_set), batch_size=batch_size, num_workers=num_workers)
    schedule = cosine_lr(lr, epochs * iters_per_epoch)
    model = classifier
    if world > 1:
        on_gpu = torch.device(device).type == "cuda"
        model = DistributedDataParallel(classifier, device_ids=[device] if on_gpu else None)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    path = os.path.join(output_dir, LINEAR_CHECKPOINT) if output_dir else None
    start_epoch, best, history = 0, None, []
    if path and os.path.isfile(path):
        state = load_file(path)
        run = {"epochs": epochs, "lr": lr, "dim": classifier.dim, "num_classes": classifier.num_classes}
        stored = {key: state[key] for key in run}
        if any(not math.isclose(stored[key], run[key], rel_tol=1e-9) for key in run):
            raise ValueError(f"{path} was written by another probe ({stored}) than this run ({run}): "
                             f"delete it or use another OUTPUT_DIR")
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        logger.info("linear probe: resumed from %s after epoch %d of %d", path, start_epoch, epochs)

    logger.info("linear probe: %d epochs x %d iterations, batch %d x %d processes, lr %.4g, dim %d, %d classes",
                epochs, iters_per_epoch, batch_size, world, lr, classifier.dim, classifier.num_classes)
    for epoch in range(start_epoch, epochs):
        model.train()
        sampler.set_epoch(epoch)
        loss_sum, start = torch.zeros((), device=device), time.perf_counter()
        for i, (images, labels) in enumerate(loader):
            it = epoch * iters_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = schedule(it)
            check_labels(labels)  # on the CPU batch: no device synchronization
            labels = labels.to(device, non_blocking=True)
            with torch.no_grad():
                features = embed(images.to(device, non_blocking=True))
            loss = F.cross_entropy(model(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            if log_period and (i + 1) % log_period == 0:
                logger.info("linear epoch %d/%d iter %d/%d: loss %.4f lr %.4g", epoch + 1, epochs, i + 1,
                            iters_per_epoch, loss.item(), schedule(it))
        train_loss = comm.all_reduce_mean_(loss_sum / iters_per_epoch).item()
        stats = {"epoch": epoch, **evaluate_linear(embed, classifier, val_loader, device), "train_loss": train_loss}
        history.append(stats)
        if best is None or stats["top1"] > best["top1"]:
            best = stats
        logger.info("linear epoch %d/%d (%.1fs): train loss %.4f, val top-1 %.2f top-5 %.2f (best %.2f at epoch %d)",
                    epoch + 1, epochs, time.perf_counter() - start, train_loss, stats["top1"], stats["top5"],
                    best["top1"], best["epoch"])
        if path and comm.is_main_process():
            atomic_save({"classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "epochs": epochs, "lr": lr, "dim": classifier.dim,
                         "num_classes": classifier.num_classes, "best": best, "history": history}, path)
        comm.synchronize()
    return {"best": best, "last": history[-1], "history": history, "lr": lr}


# ------------------------------------------------------------------------------------------ from config
def run_linear_eval(cfg, backbone: nn.Module, device) -> dict:
    """The paper's linear protocol from ``cfg.TEST`` / ``cfg.TEST.LINEAR`` on a frozen ``backbone``.

    Trains on ``TEST.TRAIN_ROOT`` with :func:`build_linear_train_transform`, evaluates on
    ``TEST.VAL_ROOT`` with ``build_eval_transform``, both labelled with the training split's class
    index (``build_eval_datasets``); checkpoints in ``OUTPUT_DIR``. Returns the
    :func:`train_linear` result with ``mode``, ``base_lr``, ``total_batch`` and the feature settings
    (``n_last_blocks``/``avgpool``: None/False for a non-ViT) added to ``best`` and ``last``.
    """
    lin = cfg.TEST.LINEAR
    backbone = backbone.to(device).eval().requires_grad_(False)
    vit = has_blocks(backbone)
    if not vit and (lin.N_LAST_BLOCKS != 1 or lin.AVGPOOL_PATCHTOKENS):
        logger.info("%s has no blocks to read: TEST.LINEAR.N_LAST_BLOCKS/AVGPOOL_PATCHTOKENS are ignored, the "
                    "linear layer sees its pooled output", type(backbone).__name__)
    # One class index for both splits (the training split's): see build_eval_datasets.
    train_set, val_set = build_eval_datasets(cfg, build_linear_train_transform(cfg), build_eval_transform(cfg))
    # Same initialization on every rank whatever its seed (DDP would broadcast rank 0's anyway).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.SEED)
        classifier = LinearClassifier(linear_feature_dim(backbone, lin.N_LAST_BLOCKS, lin.AVGPOOL_PATCHTOKENS),
                                      num_classes_of(train_set)).to(device)
    total_batch = lin.BATCH_SIZE * comm.get_world_size()
    lr = scaled_linear_lr(lin.BASE_LR, total_batch)
    logger.info("linear lr %.4g = TEST.LINEAR.BASE_LR %.4g x total batch %d / 256", lr, lin.BASE_LR, total_batch)
    embed = functools.partial(multiblock_features, backbone, n_last_blocks=lin.N_LAST_BLOCKS,
                              avgpool_patchtokens=lin.AVGPOOL_PATCHTOKENS)
    result = train_linear(embed, classifier, train_set, val_set, epochs=lin.EPOCHS, lr=lr, batch_size=lin.BATCH_SIZE,
                          momentum=lin.MOMENTUM, weight_decay=lin.WEIGHT_DECAY, device=device,
                          output_dir=cfg.OUTPUT_DIR, num_workers=cfg.DATALOADER.NUM_WORKERS, seed=cfg.SEED,
                          log_period=cfg.LOG_PERIOD)
    setting = {"lr": lr, "base_lr": lin.BASE_LR, "n_last_blocks": lin.N_LAST_BLOCKS if vit else None,
               "avgpool": bool(lin.AVGPOOL_PATCHTOKENS) and vit}
    return {"mode": "full", "best": {**result["best"], **setting}, "last": {**result["last"], **setting},
            "epochs": lin.EPOCHS, "total_batch": total_batch, "history": result["history"]}
