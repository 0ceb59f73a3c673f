"""The DINO trainer: builds a run's parts from a config, then trains them with :class:`SimpleTrainer`.

The whole step lives in :meth:`SimpleTrainer.run_step` (``engine/simple_trainer.py``), top to bottom;
this file adds what a run needs around it: data, model, optimizer and schedules from the config,
checkpoints, resume, stop signals and the default hooks (which only do bookkeeping).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    LAST_CHECKPOINT,
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    load_file,
    load_pretrained,
    restore_rng_state,
)
from ..config import ConfigError, check_amp, check_config, check_world_size
from ..config.checks import check_value, declare_choices
from ..data import build_augmentation, build_dataset, device_stage, fixed_subset
from ..data.loader import build_pretrain_loader
from ..modeling import build_model
from ..solver import build_optimizer, build_schedules, total_batch_size
from ..solver.build import scaled_lr
from ..utils import comm
from ..utils.events import CommonMetricPrinter, JSONWriter, TensorboardWriter
from ..utils.malloc import keep_freed_memory_mapped
from . import hooks as hooks_lib
from .defaults import resolve_device, seed_all
from .health import NonFiniteLossError, state_is_finite
from .preemption import TrainingStopped, stop_requested
from .resume_check import check_resume, check_state_shapes, write_run_config
from .simple_trainer import SimpleTrainer

logger = logging.getLogger("dino_research")

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
declare_choices("SOLVER.AMP.DTYPE", AMP_DTYPES)


def amp_settings(cfg, device: torch.device) -> tuple[bool, torch.dtype]:
    """Validated ``(enabled, dtype)`` of ``SOLVER.AMP`` for ``device``."""
    enabled, name = cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.DTYPE
    if name not in AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE = {name!r} is not one of: {', '.join(AMP_DTYPES)}")
    if enabled and name == "float16" and device.type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.DTYPE float16 needs a CUDA device, this run is on {device.type}: "
            f"set SOLVER.AMP.DTYPE bfloat16 or SOLVER.AMP.ENABLED False"
        )
    return enabled, AMP_DTYPES[name]


# MODEL.COMPILE values ("" is off).
COMPILE_MODES = ("", "static", "dynamic")
declare_choices("MODEL.COMPILE", COMPILE_MODES)


def compile_networks(model: nn.Module, dynamic: bool) -> int:
    """``torch.compile`` the backbone pass of every multi-crop network of ``model`` (DINO: student
    and teacher; a project's networks too); returns how many. Weights, keys and the modules that
    evaluations use are unchanged (:meth:`MultiCropNetwork.compile_backbone`)."""
    from ..modeling.meta_arch import MultiCropNetwork

    networks = [m for m in model.modules() if isinstance(m, MultiCropNetwork)]
    for network in networks:
        network.compile_backbone(dynamic=dynamic)
    logger.info("MODEL.COMPILE: %d backbone(s) compiled with torch.compile(dynamic=%s); the first step of each "
                "crop size compiles (slow), later steps reuse the graphs", len(networks), dynamic)
    return len(networks)


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class DINOTrainer(SimpleTrainer):
    """One run from a config: data, model (any ``MODEL.META_ARCHITECTURE``), optimizer, schedules,
    checkpoints, writers, around :class:`SimpleTrainer`'s step.

    Construct on every process after the process group exists (see ``engine.launch``), then call
    :meth:`resume_or_load` and :meth:`train`. An iteration is one optimizer step over
    ``SOLVER.BATCH_SIZE_PER_GPU * world_size * SOLVER.ACCUMULATE_STEPS`` images. ``default_hooks``
    False registers none (checkpoints, evaluation, writers): for timing bare steps.
    """

    def __init__(self, cfg, default_hooks: bool = True):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.world_size, self.rank = comm.get_world_size(), comm.get_rank()
        check_config(cfg)  # again: a config built by hand did not go through load_config
        check_amp(cfg, self.device.type)
        check_world_size(cfg, self.world_size, self.device.type)
        self.amp_enabled, self.amp_dtype = amp_settings(cfg, self.device)
        if self.device.type == "cpu" and keep_freed_memory_mapped():  # before loader workers fork
            logger.info("glibc malloc keeps freed memory mapped (steadier CPU steps; utils/malloc.py)")
        self.accumulate = check_value("SOLVER.ACCUMULATE_STEPS", cfg.SOLVER.ACCUMULATE_STEPS)

        augmentation = build_augmentation(cfg)
        dataset = fixed_subset(build_dataset(cfg, cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_ROOT, train=True,
                                             transform=augmentation), cfg.DATASETS.TRAIN_SUBSET, cfg.SEED)
        batch_transform = device_stage(cfg, augmentation)
        if batch_transform is not None:
            logger.info("INPUT.DEVICE_AUGMENTATION: loader workers crop, resize and flip; colour jitter, "
                        "grayscale, blur, solarization and normalization run batched on %s", self.device)
        batches_per_rank = len(dataset) // (cfg.SOLVER.BATCH_SIZE_PER_GPU * self.world_size)
        self.iters_per_epoch = batches_per_rank // self.accumulate
        if self.iters_per_epoch == 0:
            raise ConfigError(
                f"dataset {cfg.DATASETS.TRAIN} at {cfg.DATASETS.TRAIN_ROOT!r} has {len(dataset)} images, fewer "
                f"than one optimizer step needs ({total_batch_size(cfg, self.world_size)} = "
                f"SOLVER.BATCH_SIZE_PER_GPU {cfg.SOLVER.BATCH_SIZE_PER_GPU} x {self.world_size} process(es) x "
                f"SOLVER.ACCUMULATE_STEPS {self.accumulate}); lower SOLVER.BATCH_SIZE_PER_GPU to at most "
                f"{max(1, len(dataset) // (self.world_size * self.accumulate))} or use more images"
            )
        self.loader = build_pretrain_loader(cfg, dataset, rank=self.rank, world_size=self.world_size,
                                            batches_per_epoch=self.iters_per_epoch * self.accumulate)
        # Built (and so checked) now, not after the first epoch: a wrong TEST root fails at start.
        self.knn_datasets = hooks_lib.build_knn_datasets(cfg) if cfg.TEST.EVAL_PERIOD > 0 else None
        self.attention_images = (hooks_lib.attention_images(cfg) if cfg.TEST.ATTENTION.PERIOD > 0
                                 and comm.is_main_process() else [])
        self.max_iter = cfg.SOLVER.EPOCHS * self.iters_per_epoch

        # Every rank builds the same initial weights, whatever the world size; the per-rank seed
        # (drop path) is restored afterwards.
        seed_all(cfg.SEED)
        model = build_model(cfg)
        if self.world_size > 1 and _has_batchnorm(model):
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # PyTorch's SyncBatchNorm has no CPU kernel
                logger.warning("BatchNorm statistics stay per process: SyncBatchNorm needs CUDA devices")
        self.model = model.to(self.device)
        if cfg.MODEL.COMPILE:
            compile_networks(self.model, dynamic=cfg.MODEL.COMPILE == "dynamic")
        seed_all(cfg.SEED + self.rank)
        # Teacher and center are identical on every rank (same EMA, all-reduced center), so buffers
        # need no broadcast at each forward.
        self.ddp_model = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                                  else None, broadcast_buffers=False)
                          if self.world_size > 1 else self.model)
        optimizer = build_optimizer(cfg, self.model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_enabled and self.amp_dtype == torch.float16)
        super().__init__(
            self.model, optimizer, lambda start: self.loader.iterate(start_batch=start),
            build_schedules(cfg, self.iters_per_epoch, world_size=self.world_size),
            iters_per_epoch=self.iters_per_epoch, max_iter=self.max_iter, device=self.device,
            ddp_model=self.ddp_model, scaler=scaler, amp_dtype=self.amp_dtype if self.amp_enabled else None,
            accumulate=self.accumulate, clip_grad=cfg.SOLVER.CLIP_GRAD,
            freeze_last_layer_epochs=cfg.SOLVER.FREEZE_LAST_LAYER_EPOCHS, skip_nonfinite=cfg.SOLVER.SKIP_NONFINITE,
            log_period=cfg.LOG_PERIOD, world_size=self.world_size, total_batch=total_batch_size(cfg, self.world_size),
            batch_transform=batch_transform,
        )
        self.checkpointer = Checkpointer(cfg.OUTPUT_DIR, self.model, self.optimizer, self.scaler,
                                         is_main=comm.is_main_process())
        self._last_saved_iter = None
        if default_hooks:  # off for a benchmark that times bare steps
            self.register_hooks(self.default_hooks())
        logger.info(
            "DINO run: %d images, %d iterations/epoch, %d iterations; total batch %d "
            "(BATCH_SIZE_PER_GPU %d x %d processes x ACCUMULATE_STEPS %d); peak lr %.3g = BASE_LR %.3g x %d / 256; "
            "device %s; AMP %s",
            len(dataset), self.iters_per_epoch, self.max_iter, total_batch_size(cfg, self.world_size),
            cfg.SOLVER.BATCH_SIZE_PER_GPU, self.world_size, self.accumulate, scaled_lr(cfg, self.world_size),
            cfg.SOLVER.BASE_LR, total_batch_size(cfg, self.world_size), self.device,
            str(self.amp_dtype).replace("torch.", "") if self.amp_enabled else "off",
        )

    # ------------------------------------------------------------------ set-up
    def default_hooks(self) -> list[hooks_lib.HookBase]:
        cfg = self.cfg
        out = []
        if cfg.TEST.EVAL_PERIOD > 0:  # before the checkpointer: a resumed run never repeats an eval
            out.append(hooks_lib.KNNEvalHook(cfg.TEST.EVAL_PERIOD, self.knn_datasets,
                                             init_baseline=cfg.TEST.KNN.INIT_BASELINE))
        if self.attention_images:
            out.append(hooks_lib.AttentionMapHook(cfg.TEST.ATTENTION.PERIOD, self.attention_images,
                                                  cfg.TEST.ATTENTION.THRESHOLD))
        out += [hooks_lib.PeriodicCheckpointer(cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.SNAPSHOT_EPOCHS),
                hooks_lib.TeacherExporter()]
        if comm.is_main_process():
            json_writer = JSONWriter(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
            writers = [CommonMetricPrinter(self.max_iter), json_writer,
                       TensorboardWriter(os.path.join(cfg.OUTPUT_DIR, "tensorboard"))]
            out.append(hooks_lib.PeriodicWriter(writers, cfg.LOG_PERIOD))
            if cfg.TEST.CURVES:
                out.append(hooks_lib.CurvesHook(cfg.TEST.EVAL_PERIOD, json_writer))
        return out

    def resume_or_load(self, resume: bool = True, allow_config_change: bool = False) -> None:
        """Resume from the newest readable checkpoint of ``OUTPUT_DIR`` (``last_checkpoint.pth``, else the
        newest snapshot) when there is one and ``resume``; else initialize from ``MODEL.WEIGHTS`` if set.
        Then write ``OUTPUT_DIR/config.yaml`` (main process; see :func:`write_run_config`).

        The checkpoint's config is compared with this one first (``engine/resume_check.py``): keys that
        change what the saved state means are refused, recipe keys too unless ``allow_config_change``,
        and the allowed changes (more epochs, logging, evaluation) are logged.

        Raises:
            CheckpointError: ``OUTPUT_DIR`` holds checkpoints but none is readable (never silently
                restarts from scratch over existing work).
            ResumeConfigError: the config differs from the checkpoint's in a refused key.
        """
        found = self._find_resumable() if resume else None
        if found is not None:
            path, data = found
            for line in check_resume(self.cfg, data, path, iters_per_epoch=self.iters_per_epoch,
                                     total_batch=total_batch_size(self.cfg, self.world_size),
                                     world_size=self.world_size, allow_recipe_change=allow_config_change):
                logger.warning("resuming with a changed config: %s", line)
            check_state_shapes(self.model.state_dict(), data["model"], path)
            self.checkpointer.restore(data)
            self.start_iter = int(data["iteration"])
            rng = data.get("rng", [])
            if len(rng) == self.world_size:
                restore_rng_state(rng[self.rank])
            else:
                logger.warning("checkpoint has RNG states of %d processes, this run has %d: not restored",
                               len(rng), self.world_size)
            self.nonfinite_skipped = int(data.get("nonfinite_skipped", 0))
            skipped = data.get("skipped_images", [])
            self.skipped_images = int(skipped[self.rank]) if len(skipped) == self.world_size else 0
            self.last_saved, self._last_saved_iter = path, self.start_iter
            logger.info("resumed from %s at iteration %d (epoch %d)", path, self.start_iter,
                        self.start_iter // self.iters_per_epoch)
        elif self.cfg.MODEL.WEIGHTS:
            found = load_pretrained(self.model, self.cfg.MODEL.WEIGHTS, partial=self.cfg.MODEL.WEIGHTS_PARTIAL)
            logger.info("initialized from %s (%s format)", self.cfg.MODEL.WEIGHTS, found)
        self.iter = self.start_iter
        if self.start_iter >= self.max_iter:
            logger.info("the checkpoint is at iteration %d of %d: training is complete, nothing to do "
                        "(raise SOLVER.EPOCHS to train longer)", self.start_iter, self.max_iter)
        if comm.is_main_process():
            write_run_config(self.cfg, self.start_iter)

    def _find_resumable(self):
        """``(path, checkpoint)`` to resume from, or None; the main process decides for every rank."""
        choice, data = {"path": None}, None
        if comm.is_main_process():
            self.checkpointer.remove_stale_temporaries()
            try:
                found = self.checkpointer.find_resumable()
                if found is not None:
                    choice["path"], data = found
            except CheckpointError as e:
                choice = {"error": str(e)}
        if self.world_size > 1:  # one decision, so that no rank resumes elsewhere or waits forever
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        if "error" in choice:
            raise CheckpointError(choice["error"])
        if choice["path"] is None:
            return None
        return choice["path"], data if data is not None else load_file(choice["path"])

    def save_checkpoint(self, filename: str, next_iter: int) -> None:
        """Write the full training state; collective (every rank contributes its RNG state).

        Raises:
            NonFiniteLossError: a weight or buffer is NaN/inf; the previous checkpoint is kept.
        """
        if not state_is_finite(self.model):
            raise NonFiniteLossError(
                f"non-finite weights after iteration {next_iter - 1}: {filename} not written, so the last good "
                f"checkpoint stays {self.last_saved or 'none written yet'}"
            )
        rank_state = (capture_rng_state(), self.skipped_images)
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, rank_state)
        else:
            gathered = [rank_state]
        self.checkpointer.save(filename, iteration=next_iter, rng=[g[0] for g in gathered],
                               skipped_images=[g[1] for g in gathered],
                               nonfinite_skipped=self.nonfinite_skipped, config=self.cfg.dump(),
                               iters_per_epoch=self.iters_per_epoch, world_size=self.world_size,
                               total_batch=total_batch_size(self.cfg, self.world_size))
        if filename == LAST_CHECKPOINT:
            self.last_saved, self._last_saved_iter = self.checkpointer.last_path, next_iter
        comm.synchronize()

    # ------------------------------------------------------------------ loop
    def after_iteration(self) -> None:
        self._stop_if_requested()

    def count_skipped_images(self) -> int:
        return len(self.loader.take_skipped())

    def on_failure(self, error: Exception) -> None:
        if self.world_size > 1:  # a collective error names no culprit: say where to look
            logger.error("rank %d of %d failed at iteration %d: %s: %s. If another process of the job died "
                         "or hung (--dist-timeout), its own log says why. Last checkpoint: %s; run the same "
                         "command to resume from it.", self.rank, self.world_size, self.iter,
                         type(error).__name__, str(error).splitlines()[0] if str(error) else "", self.last_saved)

    def _stop_if_requested(self) -> None:
        """If any rank received a stop signal: all ranks checkpoint this iteration, then stop."""
        signum = stop_requested() or 0
        if self.world_size > 1:  # every rank must take the same decision at the same iteration
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if not signum:
            return
        if self._last_saved_iter != self.iter + 1:
            self.save_checkpoint(LAST_CHECKPOINT, next_iter=self.iter + 1)
        raise TrainingStopped(signum, self.iter, self.last_saved)
