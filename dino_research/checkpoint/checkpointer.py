"""Checkpoints: atomic writes, exact resume, and the official DINO weight formats.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint holds tensors and plain
containers only, so loading one can never execute code. Writes go to a temporary file in the same
folder, are flushed to disk, then renamed over the target: a kill during a save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import pickle
import random
import re
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from .integrity import integrity_problem, with_integrity

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint.pth"
TEACHER_BACKBONE = "teacher_backbone.pth"
# Numbered snapshots written every SOLVER.SNAPSHOT_EPOCHS: checkpoint_EEEE.pth (EEEE = epochs done).
SNAPSHOT_PATTERN = re.compile(r"checkpoint_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file and the fix."""


_TMP_INFIX = ".tmp."
# A full disk and an exhausted quota: the two write failures a user fixes by freeing space.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(folder: str) -> int:
    """Bytes an unprivileged process can still write to the file system holding ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _mb(n_bytes: int) -> int:
    return round(n_bytes / 2**20)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}{_TMP_INFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        # Measured before the partial temporary is removed, so "needs" is at least what was written.
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        raise CheckpointError(
            f"writing {path} failed: {os.strerror(e.errno)} ({_mb(free_bytes(folder))} MB free in {folder}; "
            f"the file needs more than {_mb(written)} MB). "
            + ("The previous file is intact. " if os.path.exists(path) else "")
            + "Free space there (old checkpoint_*.pth snapshots can go; SOLVER.SNAPSHOT_EPOCHS writes fewer) "
            "or move OUTPUT_DIR, then run the same command to resume from the last checkpoint."
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # persist the rename itself
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_file(path: str) -> Any:
    """Read a checkpoint or weights file safely (``weights_only=True``) onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or contains pickled objects
            (code) rather than tensors and containers.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} contains pickled Python objects, which are refused because loading them could run "
            f"code ({str(e).splitlines()[0]}). If you trust the file (e.g. an official DINO checkpoint "
            f"that stores its argparse Namespace), convert it once with "
            f"`python tools/convert_checkpoint.py --trust-pickle {path} OUT.pth` and use OUT.pth."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    problem = integrity_problem(data)
    if problem:
        raise CheckpointError(f"{path} is corrupt: {problem}")
    return data


# ------------------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ weight formats
def strip_prefixes(state_dict: dict, prefixes=("module.", "backbone.")) -> dict:
    """Remove leading ``module.`` (DDP) and ``backbone.`` prefixes, repeatedly, from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_backbone_state(backbone: nn.Module, state_dict: dict, source: str, strict: bool = True) -> None:
    """Load a backbone state dict (official DINO layout) into ``backbone``.

    Shapes must fit. With ``strict``, any missing or unexpected key is an error naming the keys;
    otherwise they are logged.
    """
    own = backbone.state_dict()
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if bad_shapes:
        raise CheckpointError(f"{source}: backbone weights do not fit the model ({'; '.join(bad_shapes[:5])}). "
                              f"Check MODEL.BACKBONE.NAME and MODEL.BACKBONE.PATCH_SIZE.")
    if not set(state_dict) & set(own):
        raise CheckpointError(f"{source}: none of its {len(state_dict)} keys (e.g. {list(state_dict)[:3]}) "
                              f"is a key of the backbone (e.g. {list(own)[:3]})")
    result = backbone.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        message = (f"{source}: missing keys {result.missing_keys[:10]}, unexpected keys "
                   f"{result.unexpected_keys[:10]}")
        if strict:
            raise CheckpointError(message + " (is this a backbone of the configured architecture?)")
        logger.warning(message)


def _load_network(net: nn.Module, state: dict, source: str) -> None:
    """Load a ``backbone.*`` + ``head.*`` state (``module.`` stripped) into a MultiCropNetwork."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    load_backbone_state(net.backbone, backbone, source + " (backbone)", strict=False)
    result = net.head.load_state_dict(head, strict=False)
    if result.missing_keys or result.unexpected_keys:
        logger.warning("%s (head): missing keys %s, unexpected keys %s", source,
                       result.missing_keys, result.unexpected_keys)


def load_pretrained(model: nn.Module, path: str) -> str:
    """Initialize a DINO meta-architecture from ``path`` (``MODEL.WEIGHTS``); returns the format found.

    Accepted formats:

    * ``"ours"``: a checkpoint of this library (``{"model": meta-arch state, ...}``): student,
      teacher and center; training state (optimizer, iteration) is *not* restored (that is resume).
    * ``"official_full"``: the reference's training checkpoint (``student``/``teacher`` entries with
      ``module.``/``backbone.``/``head.`` prefixes, weight-norm ``weight_g``/``weight_v``, optional
      ``dino_loss`` center): continues pretraining with the head.
    * ``"official_backbone"``: a plain backbone state dict (the released ``dino_vits16`` files, or
      our ``teacher_backbone.pth``): loaded into both student and teacher backbones; heads keep their
      initialization.

    A backbone weight whose shape does not fit raises :class:`CheckpointError`; missing and unexpected
    keys are logged.
    """
    data = load_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    if "model" in data and isinstance(data["model"], dict):
        result = model.load_state_dict(data["model"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            logger.warning("%s: missing keys %s, unexpected keys %s", path, result.missing_keys,
                           result.unexpected_keys)
        return "ours"
    if "student" in data and "teacher" in data:
        _load_network(model.student, data["student"], f"{path}[student]")
        _load_network(model.teacher, data["teacher"], f"{path}[teacher]")
        center = data.get("dino_loss", {}).get("center") if isinstance(data.get("dino_loss"), dict) else None
        if center is not None and hasattr(model.loss, "center") and center.shape == model.loss.center.shape:
            model.loss.center.copy_(center)
        return "official_full"
    for key in ("teacher", "state_dict", "model_state"):  # common wrappers around a backbone
        if key in data and isinstance(data[key], dict):
            data = data[key]
            break
    state = strip_prefixes({k: v for k, v in data.items() if not k.startswith("head.")})
    for net in (model.student, model.teacher):
        load_backbone_state(net.backbone, state, path, strict=False)
    return "official_backbone"


def export_backbone(backbone: nn.Module, path: str) -> None:
    """Write ``backbone``'s weights in the official DINO backbone format: a plain state dict."""
    atomic_save({k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}, path)


class Checkpointer:
    """Saves and restores the whole training state of a run in ``output_dir``.

    A checkpoint is ``{"model", "optimizer", "scaler", "iteration", "rng", "config", ...extra,
    "integrity"}``; ``model`` is the meta-architecture's state (student, teacher, loss center) and
    ``integrity`` a checksum of all the rest (see :func:`tensor_checksum`). Only the main process
    writes; every process reads.
    """

    def __init__(self, output_dir: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 scaler: Optional[Any] = None, is_main: bool = True):
        self.output_dir, self.model, self.optimizer, self.scaler = output_dir, model, optimizer, scaler
        self.is_main = is_main

    @property
    def last_path(self) -> str:
        return os.path.join(self.output_dir, LAST_CHECKPOINT)

    def snapshot_paths(self) -> list[str]:
        """``checkpoint_EEEE.pth`` files of ``output_dir``, newest (highest EEEE) first."""
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.output_dir), "checkpoint_*.pth")):
            match = SNAPSHOT_PATTERN.search(os.path.basename(path))
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found, reverse=True)]

    def resume_candidates(self) -> list[str]:
        """Files a run could resume from, in the order they are tried: last checkpoint, then snapshots."""
        last = [self.last_path] if os.path.isfile(self.last_path) else []
        return last + self.snapshot_paths()

    def has_checkpoint(self) -> bool:
        """True when ``output_dir`` holds work to resume (a last checkpoint or a snapshot)."""
        return bool(self.resume_candidates())

    def find_resumable(self) -> Optional[tuple[str, dict]]:
        """``(path, checkpoint dict)`` of the newest readable checkpoint of ``output_dir``, or None if it holds none.

        ``last_checkpoint.pth`` is tried first, then the snapshots from the newest. A file that is
        truncated, corrupt (checksum mismatch) or not a training checkpoint is reported and skipped.

        Raises:
            CheckpointError: checkpoints exist but none is readable. Never silently start from
                scratch over existing work: the message lists each file and why it failed.
        """
        candidates = self.resume_candidates()
        failures = []
        for path in candidates:
            try:
                data = load_file(path)
                if not isinstance(data, dict) or "model" not in data or "iteration" not in data:
                    raise CheckpointError(f"{path} is not a training checkpoint (no 'model'/'iteration' entry)")
            except CheckpointError as e:
                failures.append(str(e))
                logger.error("cannot resume from %s: %s", path, e)
                continue
            if failures:
                logger.warning("resuming from %s (iteration %d) instead of the unreadable newer checkpoint(s): %s",
                               path, int(data["iteration"]), "; ".join(failures))
            return path, data
        if failures:
            raise CheckpointError(
                f"{self.output_dir} holds checkpoints but none is readable:\n  " + "\n  ".join(failures)
                + f"\nRefusing to start from scratch over existing work. Restore a good copy, or move these files "
                f"away (or set another OUTPUT_DIR) to start a new run."
            )
        return None

    def remove_stale_temporaries(self) -> list[str]:
        """Delete ``*.pth.tmp.PID`` files left by a write that was killed (main process; call before training)."""
        if not self.is_main:
            return []
        stale = glob.glob(os.path.join(glob.escape(self.output_dir), f"*.pth{_TMP_INFIX}*"))
        for path in stale:
            os.remove(path)
        if stale:
            logger.warning("removed %d temporary file(s) of an interrupted checkpoint write: %s", len(stale),
                           ", ".join(os.path.basename(p) for p in stale))
        return stale

    def state(self, **extra) -> dict:
        state = {"model": self.model.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        state.update(extra)
        return state

    def save(self, filename: str, **extra) -> Optional[str]:
        """Atomically write the state plus ``extra`` and a checksum to ``output_dir/filename`` (main process only)."""
        if not self.is_main:
            return None
        path = os.path.join(self.output_dir, filename)
        atomic_save(with_integrity(self.state(**extra)), path)
        # Warn while there is still time to act: the next write needs room for its temporary copy
        # next to the current file, i.e. about one more checkpoint's size.
        size, free = os.path.getsize(path), free_bytes(self.output_dir)
        if free < 2 * size:
            logger.warning("only %d MB free in %s and each checkpoint takes %d MB: the next checkpoint write may "
                           "fail. Free space or move OUTPUT_DIR before it does.", _mb(free), self.output_dir, _mb(size))
        return path

    def restore(self, data: dict) -> None:
        """Load model, optimizer and scaler states from a checkpoint dict (see :meth:`find_resumable`)."""
        self.model.load_state_dict(data["model"])
        if self.optimizer is not None and "optimizer" in data:
            self.optimizer.load_state_dict(data["optimizer"])
        if self.scaler is not None and "scaler" in data:
            self.scaler.load_state_dict(data["scaler"])

    def load(self, path: str) -> dict:
        """Restore model, optimizer and scaler from ``path``; returns the whole checkpoint dict."""
        data = load_file(path)
        self.restore(data)
        return data
