"""Graceful stops: a signal asks the trainer to checkpoint at the next iteration boundary and exit.

A signal handler cannot write a consistent checkpoint itself (it interrupts a step half-way, and
under DDP every rank must join the save), so the handlers here only record the request; the trainer
polls :func:`stop_requested` after each iteration, agrees with the other ranks, saves and raises
:class:`TrainingStopped`. At most the iteration in progress is redone after a restart.

SIGTERM (``kill``, SLURM cancellation), SIGINT (Ctrl-C; a second one stops at once) and SIGUSR1 /
SIGUSR2 (SLURM's preemption and time-limit warnings, submitit's ``--signal``) are handled.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Iterable, Optional

logger = logging.getLogger("dino_research")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# Signals that mean "the scheduler takes the machine back; come back later": the job requeues.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_requested: Optional[int] = None
_requested_at = 0.0
# A repeated signal within this many seconds is the same request delivered twice (to the process
# group and forwarded by a launcher), not a user insisting.
_DUPLICATE_WINDOW_S = 1.0


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a checkpoint; ``signum`` says which signal."""

    def __init__(self, signum: int, iteration: int, checkpoint: Optional[str]):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; "
                         f"checkpoint: {checkpoint}")

    @property
    def should_requeue(self) -> bool:
        return self.signum in REQUEUE_SIGNALS


def _handler(signum, frame) -> None:
    global _requested, _requested_at
    if _requested is not None:
        if signum == signal.SIGINT and time.monotonic() - _requested_at > _DUPLICATE_WINDOW_S:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        return
    _requested, _requested_at = signum, time.monotonic()
    logger.warning("received %s: will checkpoint and stop after the current iteration",
                   signal.Signals(signum).name)


def install_stop_handlers(signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Route ``signals`` to the stop request (call in the main thread of each process)."""
    for signum in signals:
        signal.signal(signum, _handler)


def stop_requested() -> Optional[int]:
    """The signal number of a pending stop request in this process, or None."""
    return _requested


def clear_stop_request() -> None:
    global _requested
    _requested = None
