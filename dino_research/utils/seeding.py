"""Seeding, in one place: every process's generators (:func:`seed_all`) and seeds derived from keys
(:func:`derive_seed`) for the streams that must not collide (epoch orders, per-sample augmentation,
data workers, subsets, evaluation loaders)."""

from __future__ import annotations

import operator
import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_all"]

_MASK64 = (1 << 64) - 1


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _splitmix64(x: int) -> int:
    """One splitmix64 step (Steele et al. 2014): a bijection of 64-bit ints with full avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed in ``[0, 2**64)`` that depends on every integer of ``keys`` and on their order.

    Each key is mixed in with a splitmix64 step, so neighbouring inputs (epoch 3 vs 4, sample 10 vs 11)
    give unrelated seeds, and ``(seed, epoch)`` never collides with ``(seed + 1, epoch - 1)`` as
    ``seed + epoch`` would. Negative keys are taken modulo ``2**64``.
    """
    h = _splitmix64(len(keys))
    for key in keys:
        h = _splitmix64(h ^ _splitmix64(operator.index(key) & _MASK64))
    return h
