"""Resume only into a config that gives the checkpoint on disk the same meaning.

A checkpoint stores the iteration to run next, the weights, the optimizer state and the config it
was written under. Resumed under another config, the same numbers can mean something else: another
total batch or dataset size moves the stored iteration to another epoch (epochs silently skipped or
repeated), another head or depth does not fit the weights. :func:`check_resume` compares the two
configs key by key before anything is restored, in three classes:

* **state** keys (:data:`STATE_KEYS`, plus the derived iterations per epoch and total batch): the
  saved state means something else under a new value. Always refused.
* **run** keys (:data:`RUN_KEYS`): bookkeeping and length (``SOLVER.EPOCHS`` to extend a run,
  logging, evaluation, checkpoint periods, workers, paths). Allowed and logged; a change of
  ``SOLVER.EPOCHS`` says how the schedules are recomputed and what they give at the resumed iteration.
* every other key is the **recipe** (learning rate, temperatures, augmentation...): the state stays
  valid but the run would no longer be one experiment. Refused unless ``allow_recipe_change``
  (``tools/train_net.py --allow-config-change``), then logged as a warning.
"""

from __future__ import annotations

import logging
import os

import yaml

from ..config import flatten_config
from ..utils.errors import UserError

logger = logging.getLogger("dino_research")

# Keys (exact, or prefixes ending in ".") whose change makes the saved state mean something else.
STATE_KEYS = (
    "MODEL.META_ARCHITECTURE", "MODEL.BACKBONE.NAME", "MODEL.BACKBONE.PATCH_SIZE", "MODEL.BACKBONE.DEPTH",
    "MODEL.BACKBONE.TIMM_MODEL", "MODEL.HEAD.", "MODEL.LOSS.NAME", "MODEL.TEACHER.EMA", "SOLVER.OPTIMIZER",
    "DATASETS.TRAIN", "DATASETS.TRAIN_SUBSET", "DATASETS.SYNTHETIC_SIZE", "SEED",
)
# Keys that may change on resume (logged). The per-process batch and accumulation may change as long
# as the total batch does (checked as a derived value): the sampler then serves the same images.
RUN_KEYS = (
    "SOLVER.EPOCHS", "LOG_PERIOD", "TEST.", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.SNAPSHOT_EPOCHS",
    "SOLVER.SKIP_NONFINITE", "SOLVER.BATCH_SIZE_PER_GPU", "SOLVER.ACCUMULATE_STEPS", "DATALOADER.",
    "MODEL.DEVICE", "MODEL.WEIGHTS", "MODEL.WEIGHTS_PARTIAL", "OUTPUT_DIR", "IMPORTS", "DATASETS.TRAIN_ROOT",
    "DATASETS.DOWNLOAD", "VERSION",
)


class ResumeConfigError(UserError):
    """The config differs from the checkpoint's in a way that would change what the state means."""


def _matches(key: str, patterns: tuple) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def key_class(key: str) -> str:
    """``"state"``, ``"run"`` or ``"recipe"`` (see the module docstring)."""
    if _matches(key, STATE_KEYS):
        return "state"
    return "run" if _matches(key, RUN_KEYS) else "recipe"


def _flatten_dump(dump: str) -> dict:
    """``{"A.B": value}`` of a stored ``cfg.dump()`` (plain YAML; values as yacs would decode them)."""
    from ..config import CfgNode

    data = yaml.safe_load(dump) or {}
    return flatten_config(CfgNode(data)) if isinstance(data, dict) else {}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_differences(stored_dump: str, cfg) -> list[tuple[str, object, object]]:
    """``(key, checkpoint value, current value)`` of every leaf key whose value differs, sorted.

    A key the checkpoint's config lacks (added by a newer library version after the checkpoint was
    written) is no difference when its current value is the default, which the old run implicitly
    used. Otherwise a key present on one side only is reported, with ``"(absent)"`` on the other.
    """
    from ..config import get_cfg

    old, new = _flatten_dump(stored_dump), flatten_config(cfg)
    defaults = flatten_config(get_cfg())
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing and key in defaults and _same(b, defaults[key]):
            continue
        if not _same(a, b):
            out.append((key, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
    return out


def _schedule_note(cfg, data: dict, stored_epochs: int, iters_per_epoch: int, world_size: int) -> str:
    """How the per-iteration schedules change at the resumed iteration when SOLVER.EPOCHS changed."""
    from ..solver import build_schedules

    it, names = int(data["iteration"]), ("lr", "weight_decay", "momentum")
    new = build_schedules(cfg, iters_per_epoch, world_size=world_size)
    head = (f"the lr, weight-decay and teacher-momentum schedules are recomputed over {cfg.SOLVER.EPOCHS} epochs "
            f"(warmup unchanged, then to their end values at the new last iteration)")
    if it >= cfg.SOLVER.EPOCHS * iters_per_epoch:
        return head
    if it >= stored_epochs * iters_per_epoch:  # the old run had finished: its schedules had ended
        return head + f"; at the resumed iteration {it}: " + ", ".join(f"{n} {new[n](it):.4g}" for n in names)
    old_cfg = cfg.clone()
    old_cfg.defrost()
    old_cfg.SOLVER.EPOCHS = stored_epochs
    try:
        old = build_schedules(old_cfg, iters_per_epoch, world_size=world_size)
    except ValueError:  # e.g. the old epochs were shorter than this config's warmup
        return head
    return head + f"; at the resumed iteration {it}: " + ", ".join(
        f"{n} {old[n](it):.4g} -> {new[n](it):.4g}" for n in names)


def _state_reason(key: str) -> str:
    if key.startswith("MODEL."):
        return "the saved weights belong to another model"
    if key == "SOLVER.OPTIMIZER":
        return "the saved optimizer state belongs to another optimizer"
    return "the stored iteration refers to another sequence of images"


def check_resume(cfg, data: dict, path: str, *, iters_per_epoch: int, total_batch: int, world_size: int,
                 allow_recipe_change: bool = False) -> list[str]:
    """Check that checkpoint ``data`` (read from ``path``) may be resumed under ``cfg``.

    Args:
        iters_per_epoch, total_batch, world_size: this run's derived values.
        allow_recipe_change: accept recipe keys that differ (``--allow-config-change``).

    Returns:
        the changes that were accepted, one line each (the caller logs them).

    Raises:
        ResumeConfigError: listing every refused difference and the fixes.
    """
    it = int(data["iteration"])
    stored_ipe = data.get("iters_per_epoch")
    where = f"{path} (iteration {it}" + (f", epoch {it // stored_ipe})" if stored_ipe else ")")
    refused, recipe, accepted = [], [], []
    if stored_ipe is not None and int(stored_ipe) != iters_per_epoch:
        refused.append(f"iterations per epoch: {stored_ipe} in the checkpoint, {iters_per_epoch} now (another "
                       f"dataset size, subset or total batch): the stored iteration would fall in another epoch")
    stored_total = data.get("total_batch")
    if stored_total is not None and int(stored_total) != total_batch:
        refused.append(f"total batch (BATCH_SIZE_PER_GPU x processes x ACCUMULATE_STEPS): {stored_total} in the "
                       f"checkpoint, {total_batch} now: the learning-rate scaling and the data position would change")
    stored_world = data.get("world_size")
    if stored_world is not None and int(stored_world) != world_size and not refused:
        accepted.append(f"{stored_world} processes in the checkpoint, {world_size} now (same total batch: the "
                        f"sampler serves the same images; per-process random streams start anew)")
    dump = data.get("config")
    if not isinstance(dump, str):
        logger.warning("%s stores no config: resuming without comparing configs", path)
        diffs = []
    else:
        diffs = config_differences(dump, cfg)
    for key, old, new in diffs:
        line = f"{key}: {old!r} in the checkpoint, {new!r} now"
        if new == "(absent)":  # a key of an older version, or of a project no longer imported
            accepted.append(line + " (no longer a config key here: ignored)")
            continue
        kind = key_class(key)
        if kind == "state":
            refused.append(f"{line} ({_state_reason(key)})")
        elif kind == "recipe":
            recipe.append(line)
        else:
            if key == "SOLVER.EPOCHS" and isinstance(old, int) and stored_ipe:
                if it > new * iters_per_epoch:
                    refused.append(f"SOLVER.EPOCHS: {old} in the checkpoint, {new} now, but the checkpoint is already "
                                   f"at epoch {it / iters_per_epoch:.2f}: there is nothing left to train")
                    continue
                note = _schedule_note(cfg, data, old, iters_per_epoch, world_size)
                line += f"; {note}" if note else ""
            if key == "DATASETS.TRAIN_ROOT":
                line += " (same number of images; it must hold the same images in the same order)"
            accepted.append(line)
    if recipe and allow_recipe_change:
        accepted += [f"{line} (recipe change allowed by --allow-config-change)" for line in recipe]
        recipe = []
    if refused or recipe:
        lines = [f"cannot resume from {where}: this config differs from the one it was written with:"]
        lines += [f"  {line}" for line in refused + recipe]
        lines.append("Fixes: set another OUTPUT_DIR to start a new run with this config; or start a new run from "
                     f"these weights: OUTPUT_DIR NEW_DIR MODEL.WEIGHTS {path}; or undo the changes to continue "
                     f"this run (its config is stored in the checkpoint and in config.yaml beside it).")
        if recipe and not refused:
            lines.append("The differences are recipe keys only: tools/train_net.py --allow-config-change resumes with "
                         "the new values (the run then mixes two recipes).")
        raise ResumeConfigError("\n".join(lines))
    return accepted


def check_state_shapes(model_state: dict, saved_state: dict, path: str) -> None:
    """Raise :class:`ResumeConfigError` listing the tensors of ``saved_state`` (a checkpoint's
    ``model``) that are missing, unexpected or of another shape for ``model_state``: the message
    torch's ``load_state_dict`` would bury in a traceback."""
    problems = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(model_state[k].shape)}"
                for k, v in saved_state.items() if k in model_state and hasattr(v, "shape")
                and tuple(v.shape) != tuple(model_state[k].shape)]
    missing = [k for k in model_state if k not in saved_state]
    unexpected = [k for k in saved_state if k not in model_state]
    if problems or missing or unexpected:
        detail = "; ".join(problems[:5] + ([f"missing {missing[:5]}"] if missing else [])
                           + ([f"unexpected {unexpected[:5]}"] if unexpected else []))
        raise ResumeConfigError(
            f"cannot resume from {path}: its weights do not fit the model this config builds ({detail}). Set "
            f"another OUTPUT_DIR to start a new run, or use the config the checkpoint was written with."
        )


def previous_config_name(iteration: int) -> str:
    """Name under which the config in force up to ``iteration`` is kept when a resume changes it."""
    return f"config_until_iter_{iteration:07d}.yaml"


def write_run_config(cfg, start_iter: int) -> str:
    """Write ``cfg`` to ``OUTPUT_DIR/config.yaml`` atomically (call on the main process, after
    :func:`check_resume`); returns the path. When a run resumed at ``start_iter`` > 0 changed the
    config, the previous file is kept beside it (:func:`previous_config_name`)."""
    path, text = os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump()
    if start_iter > 0 and os.path.isfile(path):
        with open(path) as f:
            changed = f.read() != text
        if changed:
            kept = os.path.join(cfg.OUTPUT_DIR, previous_config_name(start_iter))
            os.replace(path, kept)
            logger.info("the config in force until iteration %d is kept as %s", start_iter, kept)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    logger.info("full config written to %s", path)
    return path
