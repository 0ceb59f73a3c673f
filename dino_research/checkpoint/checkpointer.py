"""Checkpoints: atomic writes, exact resume, and the official DINO weight formats.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint holds tensors and plain
containers only, so loading one can never execute code. Writes go to a temporary file in the same
folder, are flushed to disk, then renamed over the target: a kill during a save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pickle
import random
import re
import socket
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..utils.errors import UserError
from .diagnose import (
    describe_file,
    fit_problem,
    is_safetensors,
    key_list,
    loader_reason,
    output_problem,
    payload_bytes,
    write_failure,
)
from .integrity import integrity_problem, with_integrity

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint.pth"
TEACHER_BACKBONE = "teacher_backbone.pth"
# Numbered snapshots written every SOLVER.SNAPSHOT_EPOCHS: checkpoint_EEEE.pth (EEEE = epochs done).
SNAPSHOT_PATTERN = re.compile(r"checkpoint_(\d+)\.pth$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file that cannot be used (or written); the message names the file and
    the fix. A :class:`UserError`: the tools report it in one line, without a traceback."""


_TMP_INFIX = ".tmp."


def temporary_name(path: str) -> str:
    """``PATH.tmp.HOST.PID``: the temporary a write of ``path`` goes through, named by its writer so
    that only a dead writer's temporaries are ever removed (see ``remove_stale_temporaries``)."""
    return f"{path}{_TMP_INFIX}{socket.gethostname()}.{os.getpid()}"


def _writer_is_dead(tmp: str, stale_after_s: float) -> bool:
    """Whether the process that wrote temporary ``tmp`` is gone: this host's PID not running (older
    files named ``.tmp.PID`` count as this host's); another host's file untouched for ``stale_after_s``
    (its writer cannot be asked, but a live write keeps the file's time moving)."""
    from ..utils.run_lock import process_alive

    tag = tmp.rsplit(_TMP_INFIX, 1)[1]
    host, _, pid = tag.rpartition(".")
    if not pid.isdigit():
        return False  # not one of ours
    if host in ("", socket.gethostname()):
        return not process_alive(int(pid))
    try:
        return time.time() - os.stat(tmp).st_mtime > stale_after_s
    except FileNotFoundError:
        return False


def free_bytes(folder: str) -> int:
    """Bytes an unprivileged process can still write to the file system holding ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _mb(n_bytes: int) -> int:
    return round(n_bytes / 2**20)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new complete file.

    Raises:
        CheckpointError: the write failed for lack of room (:func:`~.diagnose.write_failure`: full disk,
            quota, ``ulimit -f``), whatever ``torch.save`` raised; the message names the file, the free
            and written MB and the fix. Other failures propagate unchanged. No temporary is left.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except Exception as e:
        # Measured while the partial file still fills the disk: "not even room for the rest" is evidence.
        written, needed = os.path.getsize(tmp) if os.path.exists(tmp) else 0, payload_bytes(obj)
        try:
            found = write_failure(e, written, needed, free_bytes(folder))
        except OSError:  # the folder itself is gone: nothing to diagnose, the original error says it
            found = None
        if found is None:
            raise
        reason, fix = found
        if os.path.exists(tmp):
            os.remove(tmp)  # before measuring again: what the user has to free is counted without it
        raise CheckpointError(
            f"writing {path} failed: {reason} ({_mb(free_bytes(folder))} MB free in {folder}; the file needs about "
            f"{_mb(max(needed, written))} MB, {_mb(written)} MB were written). "
            + ("The previous file is intact. " if os.path.exists(path) else "")
            + fix + ", then run the same command to resume from the last checkpoint."
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
    """Read a checkpoint or weights file safely onto the CPU: ``torch.load(weights_only=True)``, or
    safetensors for a file in that format.

    Raises:
        CheckpointError: for every file that does not load, saying what it is (:func:`~.diagnose.describe_file`:
            missing, a directory, truncated, a git-lfs pointer, HTML, text...); for a checksum mismatch;
            for a torch file holding pickled objects, the only case advised to use ``--trust-pickle``.
    """
    if not os.path.isfile(path):
        kind = describe_file(path)
        if kind.name == "missing":
            raise CheckpointError(f"weights file not found: {path}" + (f" ({kind.description})" if os.path.islink(path)
                                                                        else ""))
        raise CheckpointError(f"{path} is {kind.description}")
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file as load_safetensors  # timm's dependency

            data = load_safetensors(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - junk makes the unpickler raise anything (KeyError for text)
        kind = describe_file(path)
        if isinstance(e, pickle.UnpicklingError) and kind.pickle_objects:  # a valid pickle that holds objects
            objects = f" ({', '.join(kind.objects)})" if kind.objects else ""
            raise CheckpointError(
                f"{path} contains pickled Python objects{objects}, which are refused because loading them could "
                f"run code ({loader_reason(e)}). If you trust the file (e.g. an official DINO checkpoint that "
                f"stores its argparse Namespace), convert it once with "
                f"`python tools/convert_checkpoint.py --trust-pickle {path} OUT.pth` and use OUT.pth."
            ) from None
        # The loader's own words add something only for files of a weights format.
        detail = f" ({loader_reason(e)})" if kind.name.startswith(("torch", "safetensors", "unknown")) else ""
        raise CheckpointError(f"{path} is not a readable checkpoint: it is {kind.description}{detail}") from None
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
        # The generator of this process's device only: a process trains on one GPU, and a resume
        # where fewer GPUs are visible (CUDA_VISIBLE_DEVICES per task) must still find its state.
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # checkpoints written before cuda_device: every visible device's generator
        device = torch.cuda.current_device()
        if device < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][device])


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


# Appended to a partial-load error by load_pretrained (MODEL.WEIGHTS); evaluation has no such opt-in.
_PARTIAL_FIX = ("or set MODEL.WEIGHTS_PARTIAL True to load what fits and keep the rest at its initialization "
                "(every missing and unexpected key is then logged)")


def _check_fit(*args) -> None:
    """Raise the :func:`~.diagnose.fit_problem` of ``args``, if any."""
    if problem := fit_problem(*args):
        raise CheckpointError(problem)


def load_backbone_state(backbone: nn.Module, state_dict: dict, source: str, strict: bool = True,
                        fix: str = "") -> None:
    """Load a backbone state dict (official DINO layout) into ``backbone``.

    Shapes must fit, and at least one key. With ``strict``, a missing or unexpected key is an error
    naming the keys, ending with ``fix``; otherwise every such key is logged.
    """
    _check_fit(backbone.state_dict(), state_dict, source, "backbone", not strict,
               "MODEL.BACKBONE.NAME, MODEL.BACKBONE.PATCH_SIZE and MODEL.BACKBONE.DEPTH", fix)
    backbone.load_state_dict(state_dict, strict=False)


def _load_network(net: nn.Module, state: dict, source: str, partial: bool) -> None:
    """Load a ``backbone.*`` + ``head.*`` state (``module.`` stripped) into a MultiCropNetwork. Without
    ``head.*`` weights the head keeps its initialization (logged); head weights must fit like the backbone's."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    load_backbone_state(net.backbone, backbone, source + " (backbone)", strict=not partial, fix=_PARTIAL_FIX)
    if not head:
        logger.info("%s holds no head weights: the projection head keeps its initialization", source)
        return
    _check_fit(net.head.state_dict(), head, source + " (head)", "head", partial,
               "MODEL.HEAD.OUT_DIM, HIDDEN_DIM, BOTTLENECK_DIM, NUM_LAYERS and USE_BN", _PARTIAL_FIX)
    net.head.load_state_dict(head, strict=False)


def weights_format(data: Any, path: str) -> tuple[str, dict]:
    """Recognise a loaded weights file: ``(kind, state)``. The one parser of weight layouts, used by
    :func:`load_pretrained`, the evaluation loader and the export tool.

    * ``("ours", checkpoint)``: a checkpoint of this library (``{"model": meta-arch state, ...}``);
    * ``("official_full", data)``: the reference's training checkpoint (``student``/``teacher``
      entries with ``module.``/``backbone.``/``head.`` prefixes, optional ``dino_loss`` center);
    * ``("backbone", state)``: a plain backbone state dict (the released ``dino_vits16`` files, our
      ``teacher_backbone.pth``), unwrapped from a ``teacher``/``state_dict``/``model_state`` entry
      and with ``module.``/``backbone.`` prefixes stripped; ``head.*`` keys kept (callers drop them).

    Raises :class:`CheckpointError` when ``data`` is not a dict.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    if "model" in data and isinstance(data["model"], dict):
        return "ours", data
    if "student" in data and "teacher" in data and isinstance(data["student"], dict):
        return "official_full", data
    for key in ("teacher", "state_dict", "model_state"):  # common wrappers around a backbone
        if key in data and isinstance(data[key], dict):
            data = data[key]
            break
    return "backbone", strip_prefixes(data)  # before dropping heads: "module.head.x" is a head weight too


def backbone_state(data: Any, which: str, path: str) -> dict:
    """The ``which`` ("teacher" or "student") backbone's state dict inside any layout of
    :func:`weights_format` (a plain backbone file has only one), ``head.*`` keys dropped."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which backbone: 'teacher' or 'student', got {which!r}")
    kind, state = weights_format(data, path)
    if kind == "ours":
        prefix = f"{which}.backbone."
        out = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        if not out:
            raise CheckpointError(f"{path}: no '{prefix}*' weights in this checkpoint")
        return out
    if kind == "official_full":
        state = strip_prefixes(state[which])
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def load_official_full(student: nn.Module, teacher: nn.Module, loss: nn.Module, data: dict, source: str,
                       partial: bool) -> None:
    """The reference's full checkpoint into DINO's two MultiCropNetworks and, when it fits, the
    loss's ``center`` (see :func:`weights_format`)."""
    _load_network(student, data["student"], f"{source}[student]", partial)
    _load_network(teacher, data["teacher"], f"{source}[teacher]", partial)
    center = data.get("dino_loss", {}).get("center") if isinstance(data.get("dino_loss"), dict) else None
    own = getattr(loss, "center", None)
    if center is not None and isinstance(own, torch.Tensor) and center.shape == own.shape:
        own.copy_(center)


def load_backbone_into_networks(networks, state: dict, source: str, partial: bool) -> None:
    """A plain backbone state (``head.*`` keys ignored) into the ``backbone`` of each network; the
    heads keep their initialization (logged)."""
    heads = [k for k in state if k.startswith("head.")]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    for net in networks:
        load_backbone_state(net.backbone, state, source, strict=not partial, fix=_PARTIAL_FIX)
    logger.info("%s is a backbone file: the projection heads keep their initialization%s", source,
                f" (its {len(heads)} head.* weights are not used)" if heads else "")


def load_pretrained(model: nn.Module, path: str, partial: bool = False) -> str:
    """Initialize a meta-architecture from ``path`` (``MODEL.WEIGHTS``); returns the format found
    (:func:`weights_format`).

    ``"ours"`` loads the whole meta-architecture state (student, teacher, center; the training state,
    optimizer and iteration, is *not* restored: that is resume). The reference's formats go through
    the model's own ``load_weights(kind, state, source, partial)`` (the meta-architecture contract):
    for DINO an official full checkpoint continues pretraining with the heads, a backbone file is
    loaded into both backbones.

    A weight of another shape raises :class:`CheckpointError`; so does a file that fits only partly
    (another depth, missing blocks: missing or unexpected keys) unless ``partial``
    (``MODEL.WEIGHTS_PARTIAL``), which logs every such key instead.
    """
    kind, state = weights_format(load_file(path), path)
    if kind == "ours":
        _check_fit(model.state_dict(), state["model"], path, "model", partial,
                   "MODEL.BACKBONE and MODEL.HEAD against the config stored in the file", _PARTIAL_FIX)
        model.load_state_dict(state["model"], strict=False)
    else:
        model.load_weights(kind, state, path, partial)
    return {"backbone": "official_backbone"}.get(kind, kind)


def export_backbone(backbone: nn.Module, path: str) -> None:
    """Write ``backbone``'s weights in the official DINO backbone format: a plain state dict."""
    atomic_save({k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}, path)


def output_path(output: str, inputs: Sequence[str], default_name: Optional[str] = None) -> str:
    """The file a tool writes for ``output``: ``output/default_name`` when ``output`` is a directory.

    Raises :class:`CheckpointError` when that file would be one of ``inputs`` (also through a link),
    is a directory or lies below a file (:func:`~dino_research.checkpoint.diagnose.output_problem`).
    Missing parent folders are fine: :func:`atomic_save` creates them.
    """
    if os.path.isdir(output) and default_name is not None:
        output = os.path.join(output, default_name)
    if problem := output_problem(output, inputs):
        raise CheckpointError(problem)
    return output


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
        # lexists: a broken link or a directory in its place is reported (and skipped), not overlooked.
        last = [self.last_path] if os.path.lexists(self.last_path) else []
        return last + self.snapshot_paths()

    def has_checkpoint(self) -> bool:
        """True when ``output_dir`` holds work to resume (a last checkpoint or a snapshot)."""
        return bool(self.resume_candidates())

    def find_resumable(self) -> Optional[tuple[str, dict]]:
        """``(path, checkpoint dict)`` of the newest readable checkpoint of ``output_dir``, or None if it holds none.

        ``last_checkpoint.pth`` is tried first, then the snapshots from the newest. A file that does
        not load (truncated, corrupt, junk such as text, HTML or a git-lfs pointer: the error says which)
        or is not a training checkpoint is reported and skipped.

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
                    held = f"keys {key_list(list(data), 4)}" if isinstance(data, dict) else type(data).__name__
                    raise CheckpointError(f"{path} is not a training checkpoint (no 'model'/'iteration' entry; it "
                                          f"holds {held})")
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
                + "\nRefusing to start from scratch over existing work. Restore a good copy, or move these files "
                "away (or set another OUTPUT_DIR) to start a new run."
            )
        return None

    def remove_stale_temporaries(self, stale_after_s: float = 600.0) -> list[str]:
        """Delete the ``*.pth.tmp.HOST.PID`` files of killed writes whose writer is dead (main process;
        call before training): a live writer's temporary (an export tool writing into OUTPUT_DIR, a
        write on another node) is left alone, see :func:`_writer_is_dead`."""
        if not self.is_main:
            return []
        found = glob.glob(os.path.join(glob.escape(self.output_dir), f"*.pth{_TMP_INFIX}*"))
        stale = [path for path in found if _writer_is_dead(path, stale_after_s)]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if stale:
            logger.warning("removed %d temporary file(s) of an interrupted checkpoint write: %s", len(stale),
                           ", ".join(os.path.basename(p) for p in stale))
        live = sorted(set(found) - set(stale))
        if live:
            logger.info("left %d temporary file(s) of a write still in progress (its writer is alive): %s",
                        len(live), ", ".join(os.path.basename(p) for p in live))
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
        # An empty scaler state was saved by a disabled scaler (a float32 or bfloat16 run): a float16
        # run resumed from it (--allow-config-change) keeps its new scaler at the initial scale;
        # GradScaler.load_state_dict would refuse the empty dict.
        if self.scaler is not None and data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])

    def load(self, path: str) -> dict:
        """Restore model, optimizer and scaler from ``path``; returns the whole checkpoint dict."""
        data = load_file(path)
        self.restore(data)
        return data
