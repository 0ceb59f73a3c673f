"""The pretraining data loader: exact resume at any batch, with any number of workers and ranks.

Two things make a run killed at batch ``k`` and resumed there bitwise identical to an uninterrupted one:

1. *Which* samples a batch holds depends only on ``(seed, epoch, position)``:
   :class:`~dino_research.data.samplers.ResumableDistributedSampler` computes each epoch's order from a
   seed and can start anywhere in it.
2. *How* a sample is augmented depends only on ``(seed, epoch, index)``: :class:`SeededSampleDataset`
   seeds ``random``, ``numpy.random`` and torch's CPU generator from them right before the transform,
   so it does not matter which worker draws the sample, or what that worker drew before.

Unreadable image files (:class:`~dino_research.data.datasets.UnreadableImageError`) do not kill a worker.
By default (``DATALOADER.STRICT False``) item ``(epoch, index)`` whose file is unreadable is replaced by
the next readable index, read under the same per-sample seed, so batches stay a pure function of
``(seed, epoch, index)``. The skipped files travel with the batch from the worker to the main process,
which logs each one and hands them to the trainer through :meth:`PretrainLoader.take_skipped`. With
``DATALOADER.STRICT True`` the first unreadable file stops iteration with an error naming it.

Nothing here draws from the trainer's global generators (stochastic depth draws from torch's), so a
resumed run that restores them continues their stream exactly: the per-sample seeding restores the
states it changes, and the ``DataLoader`` draws its worker base seed from a private generator.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import random
import signal
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from ..config import configurable
from .datasets import UnreadableImageError
from .samplers import ResumableDistributedSampler, derive_seed

__all__ = ["PretrainLoader", "SeededSampleDataset", "build_pretrain_loader", "collate_crops", "collate_samples"]

# Stream tags: the per-sample, per-worker and DataLoader seeds never coincide with each other or
# with the sampler's epoch-order seed, even for equal (seed, epoch, index) numbers.
_SAMPLE_STREAM = 0x53414D50  # "SAMP"
_WORKER_STREAM = 0x574F524B  # "WORK"
_LOADER_STREAM = 0x4C4F4144  # "LOAD"
_MASK32 = 0xFFFFFFFF

# Consecutive unreadable candidates (the requested index included) after which a read gives up: a few
# bad files are noise, a run this long means a wrong root, unmounted storage or files of another format.
MAX_CONSECUTIVE_UNREADABLE = 32

_STRICT_HINT = (
    "DATALOADER.STRICT is True, which stops at the first unreadable image; set DATALOADER.STRICT False "
    "to skip such files (each is replaced by another sample, logged and counted)"
)

logger = logging.getLogger("dino_research")


def seed_global_generators(seed: int) -> None:
    """Seed Python's ``random``, the legacy ``numpy.random`` and torch's CPU generator from a 64-bit
    ``seed``. Only the CPU generator: ``torch.manual_seed`` would also reseed every CUDA device."""
    random.seed(seed)
    # Legacy numpy takes 32-bit seeds; an int seeds 5x faster than a sequence of words.
    np.random.seed((seed ^ (seed >> 32)) & _MASK32)
    torch.default_generator.manual_seed(seed)


class SeededSampleDataset(Dataset):
    """``dataset`` whose item ``(epoch, index)`` is ``(sample, label, skipped)``: ``dataset[index]``
    computed under a fixed seed, and the ``(path, reason)`` pairs of the unreadable files it replaced.

    Before reading item ``index`` of epoch ``epoch`` the global generators that augmentations draw from
    (Python ``random``, ``numpy.random``, torch's CPU generator) are seeded with
    ``derive_seed(seed, epoch, index)``; afterwards their previous states are put back. The crops of a
    sample are then a pure function of ``(seed, epoch, index)``: the same in any worker, any process,
    after any history, and different in every epoch.

    Restoring the states keeps the trainer's own random streams intact when items are read in the
    main process (``num_workers=0``). In a loader worker nothing else draws between samples, so only
    the cheap part is done there: ``random`` and torch are restored (~15 us), numpy, whose state takes
    ~85 us to save and restore, is not. Seeding and restoring cost ~30 us per sample in a worker and
    ~120-170 us in the main process, against ~20 ms for the paper's multi-crop augmentation.

    Unreadable files: when ``dataset[index]`` raises :class:`UnreadableImageError` and ``strict`` is
    False, ``index + 1``, ``index + 2``, ... (mod ``len``) are read instead, each under the seed of
    ``(epoch, index)``, until one succeeds: the replacement is still a pure function of ``(seed, epoch,
    index)``, and its crops differ from those of the replacing index's own item. ``skipped`` is then
    ``((path, reason),)`` of the file of ``index``, else ``()``; a file passed over while looking for a
    replacement is reported when its own index is read, so over an epoch reading every index each
    unreadable file is reported once. After ``MAX_CONSECUTIVE_UNREADABLE`` unreadable candidates (or the
    whole dataset, if smaller) a ``RuntimeError`` says the dataset looks broken. With ``strict`` the
    first ``UnreadableImageError`` propagates, its message saying how to skip instead.

    A plain integer ``index`` means ``(0, index)``. ``dataset[i]`` must be a ``(sample, label)`` pair.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, *, strict: bool = False):
        self.dataset = dataset
        self.seed = operator.index(seed)
        self.strict = bool(strict)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, epoch: int, index: int) -> int:
        """The 64-bit seed under which item ``index`` of ``epoch`` is read."""
        return derive_seed(_SAMPLE_STREAM, self.seed, epoch, index)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
        else:
            epoch, index = 0, key
        epoch, index = operator.index(epoch), operator.index(index)
        python_state, torch_state = random.getstate(), torch.default_generator.get_state()
        numpy_state = np.random.get_state() if get_worker_info() is None else None
        try:
            return self._read(epoch, index)
        finally:
            random.setstate(python_state)
            torch.default_generator.set_state(torch_state)
            if numpy_state is not None:
                np.random.set_state(numpy_state)

    def _read(self, epoch: int, index: int) -> tuple:
        """``(sample, label, skipped)`` of ``(epoch, index)``; the caller saves and restores the states."""
        seed = self.sample_seed(epoch, index)
        if self.strict:
            seed_global_generators(seed)
            try:
                sample, label = self.dataset[index]
            except UnreadableImageError as e:
                raise UnreadableImageError(e.path, e.reason, _STRICT_HINT) from e
            return sample, label, ()
        size = len(self.dataset)
        failures = []
        for offset in range(min(MAX_CONSECUTIVE_UNREADABLE, size)):
            # Reseed before every candidate: a failed read may have drawn (a transform that fails
            # midway), and the result must not depend on how many candidates failed before.
            seed_global_generators(seed)
            try:
                sample, label = self.dataset[(index + offset) % size]
            except UnreadableImageError as e:
                failures.append((e.path, e.reason))
                continue
            return sample, label, tuple(failures[:1])
        named = "; ".join(f"{path} ({reason})" for path, reason in failures[:3])
        raise RuntimeError(
            f"SeededSampleDataset: the {len(failures)} consecutive images from index {index} on are all "
            f"unreadable, e.g. {named}; the dataset looks broken (wrong root, unmounted or partly copied "
            f"storage, files of another format?). Fix the data; skipping is meant for rare bad files."
        )

    def __repr__(self) -> str:
        return f"SeededSampleDataset({self.dataset!r}, seed={self.seed}, strict={self.strict})"


def collate_crops(batch: Sequence[tuple]) -> tuple:
    """``[(crops, label), ...]`` of B samples, ``crops`` a list of ``(3, h_c, w_c)`` tensors
    -> ``([Tensor (B, 3, h_c, w_c) for each crop c], labels int64 (B,))``.

    A sample may instead be a dict ``{"crops": [...], NAME: value, ...}``: an augmentation that adds
    per-sample entries (iBOT's patch masks). The batch is then ``({"crops": [...], NAME: collated},
    labels)``: a tensor entry is stacked to ``(B, ...)``, a list of tensors (one per crop) becomes a
    list of ``(B, ...)`` tensors. Every sample must carry the same entries.

    Crop ``c`` of every sample must have the same shape (true for multi-crop: crop sizes are fixed).
    ``default_collate`` stacks, so inside a worker the batch is built directly in shared memory.
    """
    if not batch:
        raise ValueError("collate_crops: empty batch")
    if isinstance(batch[0][0], dict):
        return _collate_dict_samples(batch)
    num_crops = None
    for crops, _ in batch:
        if not isinstance(crops, (list, tuple)):
            raise TypeError(
                f"collate_crops: the transform must return a list of crop tensors (3, h, w) or a dict with "
                f"'crops'; got {type(crops).__name__}. Use a multi-crop augmentation (INPUT.AUGMENTATION)."
            )
        if num_crops is None:
            num_crops = len(crops)
        elif len(crops) != num_crops:
            raise ValueError(f"collate_crops: samples have different numbers of crops ({num_crops}, {len(crops)})")
    crops = [default_collate([sample[0][c] for sample in batch]) for c in range(num_crops)]
    labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.int64)
    return crops, labels


def _collate_dict_samples(batch: Sequence[tuple]) -> tuple[dict, torch.Tensor]:
    keys = set(batch[0][0])
    if "crops" not in keys:
        raise ValueError(f"collate_crops: a dict sample needs a 'crops' entry; got {sorted(keys)}")
    for sample, _ in batch:
        if not isinstance(sample, dict) or set(sample) != keys:
            found = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
            raise ValueError(f"collate_crops: every sample must have the entries {sorted(keys)}; got {found}")
    crops, labels = collate_crops([(sample["crops"], label) for sample, label in batch])
    out = {"crops": crops}
    for key in sorted(keys - {"crops"}):
        values = [sample[key] for sample, _ in batch]
        if isinstance(values[0], (list, tuple)):  # one value per crop
            out[key] = [default_collate([v[i] for v in values]) for i in range(len(values[0]))]
        else:
            out[key] = default_collate(values)
    return out, labels


def _collate_with_skipped(batch: Sequence[tuple]) -> tuple[list[torch.Tensor], torch.Tensor, list[tuple[str, str]]]:
    """``[(crops, label, skipped), ...]`` (:class:`SeededSampleDataset` items) -> ``(crops, labels,
    skipped)``: :func:`collate_crops` of the samples, and all their ``(path, reason)`` pairs in order.
    Runs in the worker: the skipped files reach the main process inside the batch."""
    crops, labels = collate_crops([(sample, label) for sample, label, _ in batch])
    return crops, labels, [pair for *_, skipped in batch for pair in skipped]


def collate_samples(batch: Sequence[tuple]) -> tuple:
    """``[(sample, label, skipped), ...]`` (:class:`SeededSampleDataset` items) -> ``default_collate`` of the
    ``(sample, label)`` pairs, for loaders other than :class:`PretrainLoader` (e.g. the linear probe).
    Skipped unreadable files are logged where the batch is collated (a worker inherits the log set-up)."""
    for *_, skipped in batch:
        for path, reason in skipped:
            logger.warning("skipped unreadable image %s (%s); replaced by another sample", path, reason)
    return default_collate([(sample, label) for sample, label, _ in batch])


def _init_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """Seed a worker from ``(seed, rank, worker_id)``. A fallback only: every sample is read under its
    own seed by :class:`SeededSampleDataset`; this makes whatever draws outside it (e.g. a collate
    function) deterministic too."""
    seed_global_generators(derive_seed(_WORKER_STREAM, seed, rank, worker_id))
    # The stop signals are the main process's to handle (engine/preemption.py: finish the step,
    # checkpoint, exit). `scancel`, `timeout` and Ctrl-C signal the whole process group: a worker
    # that died of that SIGTERM would fail the main process's next batch ("DataLoader worker killed
    # by signal") before it could checkpoint. So a worker keeps serving batches for a grace period;
    # the main process shuts it down normally long before (PretrainLoader.close), and the grace only
    # bounds how long a worker nobody shut down outlives the signal.
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(stop, _exit_after_grace)


# Seconds a data-loader worker keeps working after a stop signal (see _init_worker): longer than a
# training step plus its data wait, so the step in flight when the signal came gets its batches.
WORKER_STOP_GRACE_S = 60.0


def _exit_after_grace(signum, frame) -> None:
    timer = threading.Timer(WORKER_STOP_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


class PretrainLoader:
    """Infinite, resumable stream of multi-crop batches for one rank.

    Global batch ``k`` of a rank is batch ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``;
    ``iterate(k)`` starts there. It yields ``(crops, labels)``: ``crops`` a list with one float tensor
    ``(batch_size, 3, h_c, w_c)`` per crop (global crops first, as the augmentation returns them),
    ``labels`` int64 ``(batch_size,)`` (ignored by DINO). Every epoch holds exactly
    ``batches_per_epoch`` batches, ``min(batches_per_epoch argument, num_samples_per_rank // batch_size)``;
    the samples beyond are never read.

    Batch ``k``'s content is a pure function of ``(dataset, seed, batch_size, world_size, rank, k,
    batches_per_epoch)``: it does not depend on ``num_workers`` or on where iteration started, which is
    what makes resume exact. With ``num_workers > 0`` workers are persistent (started once, reused across
    epochs; the sampler runs in the main process, so ``set_epoch`` reaches them). One iteration at a
    time: calling :meth:`iterate` again invalidates earlier iterators (advancing one raises). Abandoning
    an iterator mid-epoch is safe; :meth:`close` stops the workers.

    Unreadable image files are skipped (each replaced by another sample, deterministically; see
    :class:`SeededSampleDataset`), logged as a warning and returned by :meth:`take_skipped`; with
    ``strict`` the first one stops iteration. Its error names the file: an ``UnreadableImageError``
    when read in this process, the ``RuntimeError`` the ``DataLoader`` re-raises (holding the worker's
    traceback and message) when read in a worker.

    Args:
        dataset: items ``(list of crop tensors (3, h, w), label)``; see ``DATASET_REGISTRY``.
        batch_size: samples per batch on this rank (``SOLVER.BATCH_SIZE_PER_GPU``).
        world_size, rank: data-parallel processes and this one's rank.
        seed: base seed (``SEED``), the same on every rank.
        num_workers: loader worker processes (``DATALOADER.NUM_WORKERS``); 0 reads in this process.
        batches_per_epoch: cap on batches per epoch (None: as many full batches as the share holds).
        pin_memory: pin batches in page-locked memory (for asynchronous copies to a GPU).
        persistent_workers: keep workers alive between epochs (ignored when ``num_workers == 0``).
        strict: stop at the first unreadable image instead of skipping it (``DATALOADER.STRICT``).
    """

    @configurable
    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        batches_per_epoch: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        strict: bool = False,
    ):
        batch_size, num_workers = operator.index(batch_size), operator.index(num_workers)
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"PretrainLoader: need batch_size >= 1 and num_workers >= 0; got {batch_size}, {num_workers}"
            )
        self.sampler = ResumableDistributedSampler(
            len(dataset), world_size=world_size, rank=rank, seed=seed, shuffle=True, drop_last=True
        )
        full = self.sampler.num_samples_per_rank // batch_size
        if batches_per_epoch is not None and operator.index(batches_per_epoch) < 1:
            raise ValueError(f"PretrainLoader: batches_per_epoch must be >= 1 or None; got {batches_per_epoch}")
        self.batches_per_epoch = full if batches_per_epoch is None else min(operator.index(batches_per_epoch), full)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"PretrainLoader: a dataset of {len(dataset)} images split over world size {world_size} gives "
                f"each rank {self.sampler.num_samples_per_rank} images per epoch, fewer than one batch of "
                f"{batch_size} (SOLVER.BATCH_SIZE_PER_GPU). Use a larger dataset, a smaller batch or fewer ranks."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = operator.index(seed)
        self.num_workers = num_workers
        self.strict = bool(strict)
        # The DataLoader draws a base seed for its workers from `generator` each time an iterator is
        # created; the default (torch's global generator) would shift the trainer's random stream by one
        # draw at every epoch start and at a resume, breaking bitwise equality of resumed runs.
        generator = torch.Generator()
        generator.manual_seed(derive_seed(_LOADER_STREAM, self.seed, rank))
        self.loader = DataLoader(
            SeededSampleDataset(dataset, self.seed, strict=self.strict),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate_with_skipped,
            pin_memory=pin_memory,
            drop_last=True,
            worker_init_fn=functools.partial(_init_worker, seed=self.seed, rank=rank),
            persistent_workers=persistent_workers and num_workers > 0,
            generator=generator,
        )
        self._generation = 0  # bumped by iterate() and close(); an iterator of an older one is stale
        self._skipped: list[tuple[str, str]] = []  # of yielded batches, until take_skipped()

    @classmethod
    def from_config(cls, cfg, dataset, *, rank: int, world_size: int, batches_per_epoch: int | None = None) -> dict:
        return {
            "dataset": dataset,
            "batch_size": cfg.SOLVER.BATCH_SIZE_PER_GPU,
            "world_size": world_size,
            "rank": rank,
            "seed": cfg.SEED,
            "num_workers": cfg.DATALOADER.NUM_WORKERS,
            "batches_per_epoch": batches_per_epoch,
            # Pinned memory only helps copies to a GPU: not for a CPU run on a machine that has one.
            "pin_memory": torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu",
            "strict": cfg.DATALOADER.STRICT,
        }

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Infinite iterator of ``(crops, labels)`` from global batch ``start_batch`` of this rank on.

        ``iterate(k)`` yields exactly what ``iterate(0)`` yields from its ``k``-th batch (0-based) on.
        """
        start_batch = operator.index(start_batch)
        if start_batch < 0:
            raise ValueError(f"PretrainLoader.iterate: start_batch must be >= 0; got {start_batch}")
        self._generation += 1
        return self._batches(start_batch, self._generation)

    def _batches(self, start_batch: int, generation: int):
        try:
            yield from self._batches_of_epochs(start_batch, generation)
        finally:
            # The current iterator closed (the trainer's end, a failure, open_data again): its
            # persistent workers go with it, not at interpreter exit. A superseded one leaves them.
            if generation == self._generation:
                self.close()

    def _batches_of_epochs(self, start_batch: int, generation: int):
        epoch, position = divmod(start_batch, self.batches_per_epoch)
        while True:
            # The sampler stops at the last used sample: workers never prefetch a batch that is dropped.
            self.sampler.set_epoch(
                epoch, start=position * self.batch_size, stop=self.batches_per_epoch * self.batch_size
            )
            expected, produced = self.batches_per_epoch - position, 0
            for crops, labels, skipped in self.loader:
                for path, reason in skipped:
                    logger.warning(
                        "skipped unreadable image %s (%s); replaced by another sample. "
                        "DATALOADER.STRICT True stops instead", path, reason,
                    )
                self._skipped.extend(skipped)  # before yielding: the caller may ask right after
                yield crops, labels
                if generation != self._generation:
                    raise RuntimeError(
                        "PretrainLoader: this iterator was superseded by a later iterate() or close(); "
                        "the loader serves one iteration at a time"
                    )
                produced += 1
            if produced != expected:  # an invariant of the sampler's stop; never silently shift batches
                raise RuntimeError(f"PretrainLoader: epoch {epoch} gave {produced} batches, expected {expected}")
            epoch, position = epoch + 1, 0

    def take_skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of the unreadable files replaced in the batches yielded since the previous
        call (in order; a file appears once per read), then forgets them. Call it once per batch: the
        list grows until taken. Always empty when ``strict``."""
        skipped, self._skipped = self._skipped, []
        return skipped

    def close(self) -> None:
        """Stop the persistent workers (if any) and invalidate open iterators. ``iterate`` still works
        afterwards; it starts new workers."""
        self._generation += 1
        iterator = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if iterator is not None:
            self.loader._iterator = None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            for worker in getattr(iterator, "_workers", []):  # one that did not stop in DataLoader's 5 s
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)

    def __repr__(self) -> str:
        return (
            f"PretrainLoader(images={len(self.dataset)}, batch_size={self.batch_size}, rank={self.rank}/"
            f"{self.world_size}, batches_per_epoch={self.batches_per_epoch}, num_workers={self.num_workers}, "
            f"seed={self.seed}, strict={self.strict})"
        )


def build_pretrain_loader(
    cfg, dataset: Dataset, *, rank: int, world_size: int, batches_per_epoch: int | None = None
) -> PretrainLoader:
    """The :class:`PretrainLoader` of ``dataset`` for ``rank`` of ``world_size``.

    Reads ``SOLVER.BATCH_SIZE_PER_GPU``, ``DATALOADER.NUM_WORKERS``, ``DATALOADER.STRICT`` and ``SEED``;
    pins memory when CUDA is available. Does not build the dataset or the augmentation (see ``build_dataset``).
    """
    loader = PretrainLoader(cfg, dataset, rank=rank, world_size=world_size, batches_per_epoch=batches_per_epoch)
    assert loader.batches_per_epoch >= 1
    return loader
