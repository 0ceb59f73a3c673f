"""One event store for metrics, read by three writers: console (with ETA), JSON lines, TensorBoard.

The trainer opens ``with EventStorage(start_iter) as storage:``, sets ``storage.iter = it`` at the start
of every iteration and puts scalars; hooks call the writers' ``write()`` every few iterations. Iterations
are 0-based: ``storage.iter`` is the index of the iteration being run (then just completed when the
writers run), and all three writers report that same number.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time

import numpy as np
import torch
from fvcore.common.history_buffer import HistoryBuffer

__all__ = [
    "EventStorage",
    "get_event_storage",
    "EventWriter",
    "JSONWriter",
    "TensorboardWriter",
    "CommonMetricPrinter",
]

_STORAGE_STACK: list[EventStorage] = []


def get_event_storage() -> EventStorage:
    """The innermost ``EventStorage`` entered with ``with``; raises RuntimeError outside any."""
    if not _STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() was called outside an EventStorage context; "
            "wrap the training loop in `with EventStorage(start_iter) as storage:`."
        )
    return _STORAGE_STACK[-1]


class EventStorage:
    """Scalar metrics of a run: per name a bounded history of ``(value, iteration)``.

    ``max_length`` bounds each history (so a days-long run does not grow memory); ``global_avg()``
    still covers every value ever put. ``smoothing_hint`` tells writers whether to show the median of
    the last ``window`` values (noisy per-iteration values: loss, time) or the latest (lr, schedules).
    """

    def __init__(self, start_iter: int = 0, max_length: int = 1000):
        self.iter = start_iter
        self._max_length = max_length
        self._history: dict[str, HistoryBuffer] = {}
        self._latest: dict[str, tuple[float, int]] = {}
        self._smoothing_hints: dict[str, bool] = {}
        self._images: list[tuple[str, "np.ndarray", int]] = []

    def put_scalar(self, name: str, value: float | torch.Tensor, smoothing_hint: bool = True) -> None:
        """Record ``value`` (a number or a one-element tensor; a CUDA tensor syncs) at ``self.iter``."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"put_scalar({name!r}) needs one element, got shape {tuple(value.shape)}")
            value = value.item()
        value = float(value)
        hint = self._smoothing_hints.setdefault(name, smoothing_hint)
        if hint != smoothing_hint:
            raise ValueError(f"Scalar {name!r} was put with smoothing_hint={hint}, now {smoothing_hint}")
        if name not in self._history:
            self._history[name] = HistoryBuffer(max_length=self._max_length)
        self._history[name].update(value, self.iter)
        self._latest[name] = (value, self.iter)

    def put_scalars(self, *, smoothing_hint: bool = True, **kwargs: float | torch.Tensor) -> None:
        """``put_scalar(name, value, smoothing_hint)`` for every keyword."""
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint)

    def put_image(self, name: str, image: np.ndarray) -> None:
        """Record an RGB picture, uint8 array (H, W, 3), at ``self.iter``, for the TensorBoard writer.

        Kept until a writer takes it (:meth:`take_images`); only the process that runs the writers
        (the main one) should put images.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"put_image({name!r}) needs a uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        self._images.append((name, image, self.iter))

    def take_images(self) -> list[tuple[str, np.ndarray, int]]:
        """``[(name, image (H, W, 3) uint8, iteration), ...]`` put since the previous call, then forgotten."""
        images, self._images = self._images, []
        return images

    def history(self, name: str) -> HistoryBuffer:
        """History of ``name``: ``latest()``, ``median(w)``, ``avg(w)``, ``global_avg()``, ``values()``."""
        if name not in self._history:
            raise KeyError(f"No scalar named {name!r}; recorded: {sorted(self._history)}")
        return self._history[name]

    def latest(self) -> dict[str, tuple[float, int]]:
        """``{name: (latest value, its iteration)}``, a copy."""
        return dict(self._latest)

    def latest_with_smoothing_hint(self, window: int = 20) -> dict[str, tuple[float, int]]:
        """Like ``latest()``, but the median of the last ``window`` values for names put with the hint."""
        out = {}
        for name, (value, it) in self._latest.items():
            if self._smoothing_hints[name]:
                value = float(self._history[name].median(window))
            out[name] = (value, it)
        return out

    def smoothing_hints(self) -> dict[str, bool]:
        return dict(self._smoothing_hints)

    def __enter__(self) -> EventStorage:
        _STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc) -> None:
        assert _STORAGE_STACK and _STORAGE_STACK[-1] is self, "EventStorage contexts exited out of order"
        _STORAGE_STACK.pop()


class EventWriter:
    """Base writer: ``write()`` emits the scalars put since this writer's previous ``write()``."""

    def __init__(self, window: int = 20):
        self._window = window
        self._last_written: dict[str, int] = {}  # name -> iteration of the last value written

    def _new_scalars(self, storage: EventStorage) -> dict[str, tuple[float, int]]:
        new = {}
        for name, (value, it) in storage.latest_with_smoothing_hint(self._window).items():
            if it > self._last_written.get(name, -math.inf):
                new[name] = (value, it)
                self._last_written[name] = it
        return new

    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JSONWriter(EventWriter):
    """Appends ``{"iteration": it, "loss": ..., ...}`` lines to ``path`` (JSON lines), flushed each write.

    Values are smoothed by their hint; one line per distinct iteration among the new scalars (normally
    exactly one per write). Non-finite values are written as ``NaN``/``Infinity``, which Python's ``json``
    reads back. The file is opened in append mode so a resumed run continues it: lines from the
    interrupted run with iteration >= the resume point are left in place, so a reader should keep the
    *last* line for each iteration.
    """

    def __init__(self, path: str, window: int = 20):
        super().__init__(window)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self) -> None:
        by_iter: dict[int, dict[str, float]] = {}
        for name, (value, it) in self._new_scalars(get_event_storage()).items():
            by_iter.setdefault(it, {})[name] = value
        if by_iter and self._file.closed:  # written again after close(): a trainer trained twice
            self._file = open(self._path, "a", encoding="utf-8")
        for it in sorted(by_iter):
            self._file.write(json.dumps({"iteration": it, **by_iter[it]}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorboardWriter(EventWriter):
    """``add_scalar(name, value, iteration)`` for each new scalar and ``add_image`` for each image put
    (:meth:`EventStorage.put_image`); the SummaryWriter opens on first use."""

    def __init__(self, log_dir: str, window: int = 20, **summary_writer_kwargs):
        super().__init__(window)
        self._log_dir = log_dir
        self._kwargs = summary_writer_kwargs
        self._writer = None
        self._closed = False

    def write(self) -> None:
        storage = get_event_storage()
        new, images = self._new_scalars(storage), storage.take_images()
        if (new or images) and (self._writer is None or self._closed):
            self._closed = False
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

            self._writer = SummaryWriter(self._log_dir, **self._kwargs)
        for name, (value, it) in new.items():
            self._writer.add_scalar(name, value, it)
        for name, image, it in images:
            self._writer.add_image(name, image, it, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._closed = True


def _fmt(v: float) -> str:
    """Compact: 4 significant digits, scientific below 1e-3, integers for large values."""
    if not math.isfinite(v):
        return str(v)  # "nan", "inf", "-inf"
    if v == 0:
        return "0"
    if abs(v) < 1e-3:
        return f"{v:.1e}"
    if 1e4 <= abs(v) < 1e7:
        return f"{v:.0f}"
    return f"{v:.4g}"


class CommonMetricPrinter(EventWriter):
    """Logs one line per write to ``logging.getLogger("dino_research")``, e.g.

    ``eta: 1:02:03  iter: 120/1000  loss: 9.123  lr: 5.0e-04  ...  data_time: 0.012  time: 0.345  max_mem: 1234M``

    The ETA is the median of the last ``window`` "time" values (seconds per iteration) times the
    iterations left, ``max_iter - iter - 1``; without a "time" scalar it falls back to the wall-clock
    rate between two writes. Every new scalar is shown (smoothed by its hint), "data_time" and "time"
    last; ``max_mem`` (peak CUDA memory allocated, MiB) when CUDA is available. Nothing new: no line.
    """

    _LAST = ("data_time", "time")

    def __init__(self, max_iter: int, window: int = 20, logger_name: str = "dino_research"):
        super().__init__(window)
        self._max_iter = max_iter
        self._logger = logging.getLogger(logger_name)
        self._last_wall: tuple[int, float] | None = None  # (iteration, time.perf_counter()) of last write

    def _eta_seconds(self, storage: EventStorage) -> float | None:
        remaining = self._max_iter - storage.iter - 1
        if "time" in storage.smoothing_hints():
            return float(storage.history("time").median(self._window)) * remaining
        now, last = time.perf_counter(), self._last_wall
        self._last_wall = (storage.iter, now)
        if last is None or storage.iter <= last[0]:
            return None
        return (now - last[1]) / (storage.iter - last[0]) * remaining

    def write(self) -> None:
        storage = get_event_storage()
        new = self._new_scalars(storage)
        if not new:
            return
        parts = []
        eta = self._eta_seconds(storage)
        if eta is not None and math.isfinite(eta):
            parts.append(f"eta: {datetime.timedelta(seconds=int(max(eta, 0)))}")
        parts.append(f"iter: {storage.iter}/{self._max_iter}")
        names = [n for n in new if n not in self._LAST] + [n for n in self._LAST if n in new]
        parts += [f"{n}: {_fmt(new[n][0])}" for n in names]
        if torch.cuda.is_available():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 1024**2:.0f}M")
        self._logger.info("  ".join(parts))
