"""A seeded, resumable distributed sampler, and the seed mixing every data stream derives from.

The order of epoch ``e`` is a pure function of ``(seed, e, dataset_len)``: every rank computes the same
permutation and takes its own strided share, so no communication is needed, and a run resumed in the
middle of an epoch (``set_epoch(e, start=k)``) sees exactly the samples the interrupted run had left.
The sampler yields ``(epoch, index)`` pairs rather than bare indices, so the dataset wrapper
(:class:`~dino_research.data.loader.SeededSampleDataset`) can seed each sample's augmentation from
them, whichever worker or process produces it.
"""

from __future__ import annotations

import math
import operator
from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..utils.seeding import derive_seed

__all__ = ["ResumableDistributedSampler", "derive_seed"]

# Stream tag mixed into the epoch-order seed, so it never equals a per-sample or per-worker seed.
_ORDER_STREAM = 0x5A4D504C  # "ZMPL"


class ResumableDistributedSampler(Sampler):
    """Seeded epoch orders split over ranks, resumable at any sample; yields ``(epoch, index)``.

    Epoch ``e``'s order is ``torch.randperm(dataset_len)`` drawn from a ``torch.Generator`` seeded with
    ``derive_seed(seed, e)`` (``range(dataset_len)`` without shuffle): the same on every rank, since
    ``seed`` must be. With ``drop_last`` the last ``dataset_len % world_size`` samples of the order are
    dropped; otherwise the order is padded by wrapping around to a multiple of ``world_size``. Rank
    ``r`` takes ``order[r::world_size]``, so the ranks' shares are disjoint (with ``drop_last``) and
    together hold the whole (truncated) order.

    Call :meth:`set_epoch` before iterating: ``set_epoch(e, start=k)`` skips the first ``k`` samples of
    this rank's share, which is how a run killed mid-epoch resumes exactly; ``stop`` ends the share
    early (a loader that uses a fixed number of batches per epoch then asks for no sample it drops).
    ``__iter__`` takes a snapshot: a later ``set_epoch`` does not change an iteration in progress.

    Args:
        dataset_len: number of samples of the dataset.
        world_size, rank: number of processes sharing each epoch, and this one's rank.
        seed: base seed, identical on every rank.
        shuffle: permute each epoch (``False``: ``0, 1, 2, ...`` every epoch).
        drop_last: drop the tail that does not split evenly over ranks (``False``: pad by wrapping).
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        dataset_len, world_size, rank = (operator.index(v) for v in (dataset_len, world_size, rank))
        if dataset_len < 0:
            raise ValueError(f"ResumableDistributedSampler: dataset_len must be >= 0; got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"ResumableDistributedSampler: need world_size >= 1 and 0 <= rank < world_size; "
                f"got world_size={world_size}, rank={rank}"
            )
        self.dataset_len = dataset_len
        self.world_size = world_size
        self.rank = rank
        self.seed = operator.index(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if drop_last:
            self._num_samples = dataset_len // world_size
        else:
            self._num_samples = math.ceil(dataset_len / world_size) if dataset_len else 0
        self._epoch = 0
        self._start = 0
        self._stop = self._num_samples
        self._share: list[int] | None = None  # this rank's share of self._epoch, computed lazily

    # ------------------------------------------------------------------------------------ state
    @property
    def num_samples_per_rank(self) -> int:
        """Samples of this rank in a full epoch (the same on every rank)."""
        return self._num_samples

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start(self) -> int:
        return self._start

    @property
    def stop(self) -> int:
        return self._stop

    def set_epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> None:
        """Iterate epoch ``epoch`` from position ``start`` of this rank's share up to ``stop``
        (exclusive; default the end of the share). Positions count samples of this rank, not batches."""
        epoch, start = operator.index(epoch), operator.index(start)
        stop = self._num_samples if stop is None else operator.index(stop)
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch must be >= 0; got {epoch}")
        if not 0 <= start <= stop <= self._num_samples:
            raise ValueError(
                f"set_epoch: need 0 <= start <= stop <= num_samples_per_rank ({self._num_samples}); "
                f"got start={start}, stop={stop}"
            )
        if epoch != self._epoch:
            self._share = None
        self._epoch, self._start, self._stop = epoch, start, stop

    # ------------------------------------------------------------------------------------ order
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The full order of ``epoch`` shared by all ranks, before truncation or padding: int64 ``(N,)``."""
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        generator = torch.Generator()
        generator.manual_seed(derive_seed(_ORDER_STREAM, self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=generator)

    def rank_share(self, epoch: int) -> list[int]:
        """This rank's ``num_samples_per_rank`` dataset indices of ``epoch``, in order."""
        order = self.epoch_order(epoch)
        total = self._num_samples * self.world_size
        if total > len(order):  # pad by wrapping (no drop_last); may wrap more than once if N < world
            order = order.repeat(math.ceil(total / len(order)))
        return order[:total][self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Not a generator function: the share is snapshotted now, not at the first next().
        if self._share is None:
            self._share = self.rank_share(self._epoch)
        epoch = self._epoch
        return iter([(epoch, index) for index in self._share[self._start : self._stop]])

    def __len__(self) -> int:
        """Samples left to yield in the current epoch: ``stop - start``."""
        return self._stop - self._start

    def __repr__(self) -> str:
        return (
            f"ResumableDistributedSampler(dataset_len={self.dataset_len}, world_size={self.world_size}, "
            f"rank={self.rank}, seed={self.seed}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
            f"epoch={self._epoch}, start={self._start}, stop={self._stop})"
        )
