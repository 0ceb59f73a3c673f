"""Fast linear probe (DINOv2-style): extract frozen features once, train a grid of classifiers together.

Differences from the paper's protocol (``linear.py``), on purpose:

* no augmentation: train and val features are of center crops (``build_eval_transform``), computed
  once and cached in memory (optionally on disk, :func:`save_block_features` / :func:`load_block_features`);
* a grid of independent linear classifiers, one per (feature variant, learning rate), sees the *same*
  minibatches in a single pass over the cached features per epoch. Each variant's classifiers are one
  matmul ``(B, dim) x (dim, L*C)``; each learning rate is a separate SGD parameter group, so every
  classifier trains exactly as it would alone (the loss is the *sum* of the per-classifier means);
* the best (variant, lr) is chosen on the val split after the last epoch, as DINOv2's default
  (optimistic by the selection; report it as such).

Feature variants (:func:`probe_variants`), with ``N = TEST.LINEAR.N_LAST_BLOCKS``:

* ViTs: ``{1, N} blocks x {no avgpool, avgpool}``, i.e. (1, F), (1, T), (N, F), (N, T); 2 when N = 1.
  One forward per image serves all of them (:func:`~dino_research.evaluation.linear.block_features`
  caches the last N CLS tokens and the last block's patch mean: ``(N + 1) * D`` floats per image;
  ImageNet-1k with ViT-S/16 and N=4: ~10 GB of host memory, split over ranks).
* other backbones: one variant, their pooled output (``n_last_blocks`` None).

Learning rates: ``TEST.LINEAR.LR_GRID``, each per 256 images, scaled by ``total_batch / 256``; all
follow the same per-iteration cosine to 0 over ``TEST.LINEAR.EPOCHS``. No checkpoint: a run is short
once features are cached; ``--dump-features`` spares the extraction of a rerun.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..checkpoint import atomic_save
from ..data import build_eval_transform
from ..data.eval_transforms import build_eval_datasets
from ..data.samplers import derive_seed
from ..utils import comm
from .features import extract, load_feature_file, save_feature_file
from .linear import (
    LinearClassifier,
    block_features,
    check_labels,
    cosine_lr,
    has_blocks,
    scaled_linear_lr,
    select_features,
)

logger = logging.getLogger("dino_research")

FAST_CLASSIFIER = "linear_fast_classifier.pth"
_ORDER_STREAM = 0x46415354  # "FAST": per-epoch, per-rank order of the cached training features


@dataclass(frozen=True)
class ProbeVariant:
    """Which features a classifier reads: the last ``n_last_blocks`` CLS tokens (None: a non-ViT's
    pooled output), plus the last block's average patch token when ``avgpool``."""

    n_last_blocks: Optional[int]
    avgpool: bool

    def dim(self, embed_dim: int) -> int:
        return embed_dim if self.n_last_blocks is None else (self.n_last_blocks + int(self.avgpool)) * embed_dim

    def __str__(self) -> str:
        if self.n_last_blocks is None:
            return "pooled"
        return f"last {self.n_last_blocks} CLS" + (" + avgpool" if self.avgpool else "")


def probe_variants(n_last_blocks: Optional[int]) -> list[ProbeVariant]:
    """The variant set: ``{1, n} x {False, True}`` in that order for a ViT, ``[pooled]`` for None."""
    if n_last_blocks is None:
        return [ProbeVariant(None, False)]
    return [ProbeVariant(n, pool) for n in sorted({1, n_last_blocks}) for pool in (False, True)]


@dataclass
class CachedFeatures:
    """One split's features on this rank: ``features (N_rank, R, D)`` float32 (rows as
    ``block_features``), ``labels (N_rank,)`` int64; ``dataset_size`` counts the whole split."""

    features: torch.Tensor
    labels: torch.Tensor
    dataset_size: int


def extract_block_features(backbone: nn.Module, dataset: Dataset, *, n_blocks: int, batch_size: int, device,
                           num_workers: int = 0, log_period: int = 0) -> CachedFeatures:
    """``block_features`` of this rank's share (``shard_indices(pad=False)``) of ``dataset``, on the CPU,
    through the evaluations' one extraction loop (``features.extract``)."""
    backbone = backbone.to(device).eval()
    (features,), labels = extract([lambda images: block_features(backbone, images, n_blocks)], dataset,
                                  batch_size=batch_size, device=device, num_workers=num_workers,
                                  progress=log_period > 0, gather=False)
    check_labels(labels)
    return CachedFeatures(features, labels, len(dataset))


def rank_path(path: str) -> str:
    """``path`` on one process, ``path.rank{r}-of-{w}`` per rank otherwise (each rank caches its share)."""
    world = comm.get_world_size()
    return path if world == 1 else f"{path}.rank{comm.get_rank()}-of-{world}"


def save_block_features(path: str, train: CachedFeatures, val: CachedFeatures, n_blocks: Optional[int]) -> None:
    """Write this rank's cached features to :func:`rank_path` ``(path)`` (the evaluations' one features
    file layout, ``features.save_feature_file``)."""
    save_feature_file(rank_path(path), {"train": vars(train), "val": vars(val)}, n_blocks=n_blocks,
                      world_size=comm.get_world_size())


def load_block_features(path: str) -> tuple[CachedFeatures, CachedFeatures, Optional[int]]:
    """Inverse of :func:`save_block_features`: ``(train, val, n_blocks)``; the world size must be the same."""
    if not os.path.isfile(rank_path(path)):
        written = sorted(glob.glob(glob.escape(path) + ".rank0-of-*")) + ([path] if os.path.isfile(path) else [])
        hint = f"; found {', '.join(written)}: run with as many processes as wrote them" if written else ""
        raise FileNotFoundError(f"no features file {rank_path(path)}{hint}")
    splits, meta = load_feature_file(rank_path(path))
    if meta.get("world_size") != comm.get_world_size() or "n_blocks" not in meta:
        raise ValueError(f"{rank_path(path)} holds the share of one of {meta.get('world_size')} processes; "
                         f"run with the same number of processes ({comm.get_world_size()} now)")
    return CachedFeatures(**splits["train"]), CachedFeatures(**splits["val"]), meta["n_blocks"]


class LinearGrid(nn.Module):
    """``len(variants) x num_lrs`` independent :class:`LinearClassifier` (same initialization rule).

    ``forward(cached (B, R, D)) -> logits (B, V, L, C)``: for each variant, its features are selected
    once and multiplied by the stacked weights of its L classifiers in one matmul.
    """

    def __init__(self, variants: list[ProbeVariant], embed_dim: int, num_lrs: int, num_classes: int):
        super().__init__()
        self.variants, self.num_lrs, self.num_classes = list(variants), num_lrs, num_classes
        self.classifiers = nn.ModuleList(LinearClassifier(v.dim(embed_dim), num_classes)
                                         for v in self.variants for _ in range(num_lrs))

    def classifier(self, v: int, l: int) -> LinearClassifier:
        return self.classifiers[v * self.num_lrs + l]

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        logits = []
        for v, variant in enumerate(self.variants):
            x = select_features(cached, variant.n_last_blocks, variant.avgpool)  # (B, dim_v)
            layers = [self.classifier(v, l).linear for l in range(self.num_lrs)]
            weight = torch.cat([layer.weight for layer in layers])  # (L*C, dim_v)
            bias = torch.cat([layer.bias for layer in layers])
            logits.append(torch.addmm(bias, x, weight.t()).view(len(x), self.num_lrs, self.num_classes))
        return torch.stack(logits, dim=1)


@torch.no_grad()
def evaluate_grid(grid: LinearGrid, val: CachedFeatures, batch_size: int, device) -> torch.Tensor:
    """Top-1 and top-5 accuracy (percent) of every classifier over all ranks' shares: ``(V, L, 2)``."""
    counts = torch.zeros(len(grid.variants), grid.num_lrs, 3, dtype=torch.float64, device=device)
    k = min(5, grid.num_classes)
    for start in range(0, len(val.labels), batch_size):
        labels = val.labels[start:start + batch_size].to(device)
        top = grid(val.features[start:start + batch_size].to(device)).topk(k, dim=-1).indices  # (B, V, L, k)
        hit = top == labels[:, None, None, None]
        counts[..., 0] += hit[..., 0].sum(0)
        counts[..., 1] += hit.any(-1).sum(0)
        counts[..., 2] += len(labels)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(counts)
    return 100.0 * counts[..., :2] / counts[..., 2:].clamp(min=1)


def train_linear_grid(train: CachedFeatures, val: CachedFeatures, *, variants: list[ProbeVariant],
                      lrs: list[float], num_classes: int, epochs: int, batch_size: int, momentum: float = 0.9,
                      weight_decay: float = 0.0, device="cpu", seed: int = 0,
                      log_period: int = 20) -> tuple[LinearGrid, list[dict]]:
    """Train a :class:`LinearGrid` on cached features; evaluate every classifier after the last epoch.

    Args:
        lrs: peak learning rates, already scaled; a per-iteration cosine to 0 over ``epochs``.
        batch_size: per process. Each epoch, every rank runs ``(dataset_size // world) // batch_size``
            steps over a seeded permutation of its share; gradients are averaged over ranks (DDP).

    Returns the grid and one ``{"n_last_blocks", "avgpool", "lr", "top1", "top5"}`` per classifier,
    variant-major, learning rates in the given order.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs} (TEST.LINEAR.EPOCHS)")
    world, rank = comm.get_world_size(), comm.get_rank()
    iters = (train.dataset_size // world) // batch_size
    if iters == 0:
        raise ValueError(f"{train.dataset_size} training samples over {world} processes give less than one batch "
                         f"of {batch_size} per process (TEST.LINEAR.BATCH_SIZE)")
    with torch.random.fork_rng(devices=[]):  # the same grid on every rank
        torch.manual_seed(seed)
        grid = LinearGrid(variants, train.features.shape[-1], len(lrs), num_classes).to(device)
    model = grid
    if world > 1:
        model = DistributedDataParallel(grid, device_ids=[device] if torch.device(device).type == "cuda" else None)
    groups = [{"params": [p for v in range(len(variants)) for p in grid.classifier(v, l).parameters()], "lr": lr}
              for l, lr in enumerate(lrs)]
    optimizer = torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    factor = cosine_lr(1.0, epochs * iters)
    n_classifiers = len(variants) * len(lrs)
    logger.info("fast linear probe: %d classifiers (%s) x lrs %s, %d epochs x %d iterations, batch %d x %d",
                n_classifiers, ", ".join(map(str, variants)), ", ".join(f"{lr:.3g}" for lr in lrs), epochs, iters,
                batch_size, world)
    for epoch in range(epochs):
        generator = torch.Generator()
        generator.manual_seed(derive_seed(_ORDER_STREAM, seed, epoch, rank))
        order = torch.randperm(len(train.labels), generator=generator)[:iters * batch_size]
        loss_sum, start = torch.zeros((), device=device), time.perf_counter()
        for i in range(iters):
            f = factor(epoch * iters + i)
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr * f
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = train.features[idx].to(device, non_blocking=True)
            y = train.labels[idx].to(device, non_blocking=True)
            logits = model(x)  # (B, V, L, C)
            # Sum over classifiers of each one's batch-mean loss: each gets exactly its own gradient.
            loss = F.cross_entropy(logits.flatten(0, 2), y.repeat_interleave(n_classifiers), reduction="sum") / len(y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() / n_classifiers
            if log_period and (i + 1) % log_period == 0:
                logger.info("fast linear epoch %d/%d iter %d/%d: mean loss %.4f", epoch + 1, epochs, i + 1, iters,
                            loss.item() / n_classifiers)
        logger.info("fast linear epoch %d/%d (%.1fs): mean train loss %.4f", epoch + 1, epochs,
                    time.perf_counter() - start, comm.all_reduce_mean_(loss_sum / iters).item())
    acc = evaluate_grid(grid, val, max(batch_size, 256), device).cpu()
    results = [{"n_last_blocks": variant.n_last_blocks, "avgpool": variant.avgpool, "lr": lr,
                "top1": acc[v, l, 0].item(), "top5": acc[v, l, 1].item()}
               for v, variant in enumerate(variants) for l, lr in enumerate(lrs)]
    return grid, results


def run_fast_linear_eval(cfg, backbone: Optional[nn.Module], device, dump_features: str = "",
                         load_features: str = "") -> dict:
    """Fast linear protocol from ``cfg.TEST`` / ``cfg.TEST.LINEAR``.

    Features come from ``load_features`` (``backbone`` may then be None) or are extracted from
    ``backbone`` with ``TEST.BATCH_SIZE`` (center crops of ``TEST.TRAIN_ROOT`` and ``TEST.VAL_ROOT``,
    labelled with the training split's class index: ``build_eval_datasets``)
    and optionally written to ``dump_features``. Writes the best classifier to
    ``OUTPUT_DIR/linear_fast_classifier.pth``. Returns ``{"mode": "fast", "best", "last",
    "classifiers", ...}``; every accuracy is measured after the last epoch, so ``last`` is ``best``.
    """
    lin = cfg.TEST.LINEAR
    if not lin.LR_GRID:
        raise ValueError("TEST.LINEAR.LR_GRID is empty: give at least one learning rate")
    if load_features:
        train, val, n_blocks = load_block_features(load_features)
        logger.info("features loaded from %s: train %s, val %s", rank_path(load_features),
                    tuple(train.features.shape), tuple(val.features.shape))
        if n_blocks is not None and n_blocks < lin.N_LAST_BLOCKS:
            raise ValueError(f"{load_features} caches {n_blocks} blocks, TEST.LINEAR.N_LAST_BLOCKS asks for "
                             f"{lin.N_LAST_BLOCKS}")
    else:
        if backbone is None:
            raise ValueError("run_fast_linear_eval needs a backbone or features to load")
        n_blocks = lin.N_LAST_BLOCKS if has_blocks(backbone) else None
        transform = build_eval_transform(cfg)
        splits = build_eval_datasets(cfg, transform, transform)  # one class index, the training split's
        train, val = (extract_block_features(backbone, ds, n_blocks=n_blocks or 1, batch_size=cfg.TEST.BATCH_SIZE,
                                             device=device, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                             log_period=cfg.LOG_PERIOD) for ds in splits)
        if dump_features:
            save_block_features(dump_features, train, val, n_blocks)
            logger.info("features written to %s", rank_path(dump_features))
    variants = probe_variants(None if n_blocks is None else lin.N_LAST_BLOCKS)
    label_max = torch.tensor([max(int(train.labels.max()), int(val.labels.max()))], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(label_max, op=torch.distributed.ReduceOp.MAX)
    total_batch = lin.BATCH_SIZE * comm.get_world_size()
    lrs = [scaled_linear_lr(base, total_batch) for base in lin.LR_GRID]
    grid, results = train_linear_grid(train, val, variants=variants, lrs=lrs, num_classes=int(label_max.item()) + 1,
                                      epochs=lin.EPOCHS, batch_size=lin.BATCH_SIZE, momentum=lin.MOMENTUM,
                                      weight_decay=lin.WEIGHT_DECAY, device=device, seed=cfg.SEED,
                                      log_period=cfg.LOG_PERIOD)
    for k, r in enumerate(results):
        r["base_lr"] = lin.LR_GRID[k % len(lrs)]
        logger.info("fast linear %-20s lr %.4g (base %.4g): top-1 %.2f top-5 %.2f",
                    str(ProbeVariant(r["n_last_blocks"], r["avgpool"])), r["lr"], r["base_lr"], r["top1"], r["top5"])
    best_index = max(range(len(results)), key=lambda i: (results[i]["top1"], -i))  # earliest on ties
    best = results[best_index]
    logger.info("fast linear best: %s, lr %.4g: top-1 %.2f top-5 %.2f",
                ProbeVariant(best["n_last_blocks"], best["avgpool"]), best["lr"], best["top1"], best["top5"])
    if comm.is_main_process():
        v, l = divmod(best_index, len(lrs))
        atomic_save({"classifier": grid.classifier(v, l).state_dict(), **best},
                    os.path.join(cfg.OUTPUT_DIR, FAST_CLASSIFIER))
    return {"mode": "fast", "best": best, "last": dict(best), "classifiers": results, "epochs": lin.EPOCHS,
            "total_batch": total_batch}
