"""The training step and loop, run from parts given to it (detectron2's SimpleTrainer pattern).

:class:`SimpleTrainer` knows nothing of configs, datasets or files: it takes a model that follows the
meta-architecture contract (``modeling.meta_arch.MetaArchitecture``), an optimizer, a data source and
the schedules, and runs optimizer steps with hooks around them. ``engine.trainer.DINOTrainer`` builds
those parts from a config (and adds checkpoints, resume and the default hooks); a benchmark or a
notebook can build them by hand.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..solver import apply_schedules, clip_grad_per_param_
from ..utils.events import EventStorage
from ..utils.profiling import phase
from .health import NonFiniteLossError, finite_on_all_ranks, gradient_fault
from .preemption import TrainingStopped

logger = logging.getLogger("dino_research")

# Schedules applied to the optimizer rather than passed to the model; their metric names.
OPTIMIZER_SCHEDULES = {"lr": "lr", "weight_decay": "wd"}


def to_device(batch, device: torch.device):
    """``batch`` (a tensor, or dicts/lists/tuples of them) with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def as_model_batch(item) -> dict:
    """A loader item as the model's batch dict: ``(crops, labels)`` with ``crops`` a list gives
    ``{"crops": crops}``; with ``crops`` a dict (an augmentation that adds entries, e.g. masks) that
    dict; a dict item is taken as it is. Labels are not given to the model (no supervision)."""
    if isinstance(item, dict):
        return item
    crops = item[0] if isinstance(item, tuple) else item
    return crops if isinstance(crops, dict) else {"crops": crops}


class SimpleTrainer:
    """Optimizer steps of a self-distillation model from injected parts.

    Args:
        model: a ``MetaArchitecture`` (``forward(batch, **schedule_values) -> {"loss", ...}``,
            ``after_step``, ``health_metrics``, ``last_layer_parameters``), on ``device``.
        optimizer: over ``model``'s trainable parameters.
        data_source: ``data_source(start_batch) -> iterator`` of micro-batches from micro-batch
            ``start_batch`` on (a loader item, see :func:`as_model_batch`), e.g.
            ``lambda start: itertools.repeat(batch)``.
        schedules: ``{name: schedule(iteration) -> float}`` with ``"lr"`` and ``"weight_decay"`` (set on
            the optimizer) and any others, passed to the model as keyword arguments (``momentum``,
            ``teacher_temp``, a project's own).
        iters_per_epoch, max_iter: iterations (optimizer steps) per epoch and in the run.
        device: where the steps run.
        ddp_model: ``model`` wrapped in DistributedDataParallel (default: ``model`` itself).
        scaler: a ``torch.amp.GradScaler`` (float16) or None.
        amp_dtype: autocast dtype, or None for float32.
        accumulate: micro-batches per optimizer step.
        clip_grad: per-parameter gradient-norm clip, 0 for none.
        freeze_last_layer_epochs: epochs during which ``model.last_layer_parameters()`` get no update.
        skip_nonfinite: non-finite steps skipped before :class:`NonFiniteLossError` is raised.
        log_period: iterations between health metrics (and fault-counter reductions).
        world_size: processes taking part (collectives when > 1).
        total_batch: images per optimizer step over all processes (for images/s).
        batch_transform: ``batch_transform(batch, device) -> batch``, run on each model batch as the
            loader gave it (on the host) before the rest of it goes to ``device``: the device stage of
            an augmentation that splits its work (``DINOMultiCrop.finish_batch``), None for none.

    After :meth:`train`, ``completed`` says whether the last iteration ran without an exception.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data_source: Callable[[int], Iterator], schedules: dict, *, iters_per_epoch: int, max_iter: int,
                 device: torch.device, ddp_model: Optional[nn.Module] = None, scaler=None,
                 amp_dtype: Optional[torch.dtype] = None, accumulate: int = 1, clip_grad: float = 0.0,
                 freeze_last_layer_epochs: int = 0, skip_nonfinite: int = 0, log_period: int = 20,
                 world_size: int = 1, total_batch: Optional[int] = None,
                 batch_transform: Optional[Callable[[dict, torch.device], dict]] = None):
        if accumulate < 1:
            raise ValueError(f"accumulate (SOLVER.ACCUMULATE_STEPS) must be >= 1, got {accumulate}")
        missing = [k for k in OPTIMIZER_SCHEDULES if k not in schedules]
        if missing:
            raise ValueError(f"schedules need {missing}; got {sorted(schedules)}")
        self.model, self.optimizer, self.data_source, self.schedules = model, optimizer, data_source, schedules
        self.ddp_model = model if ddp_model is None else ddp_model
        self.iters_per_epoch, self.max_iter, self.device = iters_per_epoch, max_iter, torch.device(device)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.amp_dtype, self.accumulate, self.clip_grad = amp_dtype, accumulate, clip_grad
        self.freeze_last_layer_epochs, self.skip_nonfinite = freeze_last_layer_epochs, skip_nonfinite
        self.log_period, self.world_size = log_period, world_size
        self.total_batch, self.batch_transform = total_batch, batch_transform
        self.trainable_params = [p for p in model.parameters() if p.requires_grad]
        self.last_layer_params = model.last_layer_parameters()
        self.start_iter = self.iter = 0
        self.completed = False
        self.hooks: list = []
        self.storage: Optional[EventStorage] = None
        self.last_saved: Optional[str] = None  # the newest checkpoint, named in failure messages
        # Fault counters, kept across resumes by a subclass that checkpoints them.
        self.nonfinite_skipped, self.skipped_images = 0, 0
        self._data = None

    # ------------------------------------------------------------------ hooks and loop
    def register_hooks(self, hooks: list) -> None:
        for hook in hooks:
            hook.trainer = self
        self.hooks.extend(hooks)

    def open_data(self, start_iter: Optional[int] = None) -> None:
        """Start the data stream at iteration ``start_iter`` (default ``self.start_iter``), i.e. at
        micro-batch ``start_iter * accumulate`` of ``data_source``. :meth:`train` calls it; a caller
        driving :meth:`run_step` itself (a benchmark) calls it first and sets ``iter`` and ``storage``."""
        self._close_data()
        start = self.start_iter if start_iter is None else start_iter
        self._data = iter(self.data_source(start * self.accumulate))

    def train(self) -> None:
        """Run iterations ``start_iter .. max_iter - 1``, calling the hooks."""
        self.open_data()
        with EventStorage(self.start_iter) as self.storage:
            for hook in self.hooks:
                hook.before_train()
            try:
                for it in range(self.start_iter, self.max_iter):
                    self.iter = self.storage.iter = it
                    self.run_step()
                    for hook in self.hooks:
                        hook.after_step()
                    self.after_iteration()
                self.completed = True
            except (TrainingStopped, NonFiniteLossError):
                raise  # explained where raised
            except Exception as e:
                self.on_failure(e)
                raise
            finally:
                self._close_data()  # release data-loader workers even when the step raised
                for hook in self.hooks:  # flush writers also when stopped or failed
                    hook.after_train()

    def after_iteration(self) -> None:
        """Called after the hooks of every iteration (``DINOTrainer``: stop requests)."""

    def on_failure(self, error: Exception) -> None:
        """Called with an exception that ends :meth:`train` (before it propagates)."""

    def count_skipped_images(self) -> int:
        """Unreadable images replaced by the data source since the last call (a subclass asks its loader)."""
        return 0

    def _close_data(self) -> None:
        close = getattr(self._data, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ the step
    def schedule_values(self, it: int) -> dict[str, float]:
        """Every schedule's value at iteration ``it``."""
        return {name: float(schedule(it)) for name, schedule in self.schedules.items()}

    def run_step(self) -> None:
        """One optimizer step at iteration ``self.iter``."""
        it = self.iter
        epoch = it // self.iters_per_epoch
        start = time.perf_counter()
        # 1. This iteration's schedules: lr and weight decay on the optimizer, the rest to the model.
        values = self.schedule_values(it)
        apply_schedules(self.optimizer, values["lr"], values["weight_decay"])
        model_values = {k: v for k, v in values.items() if k not in OPTIMIZER_SCHEDULES}
        scalars = {OPTIMIZER_SCHEDULES.get(k, k): v for k, v in values.items()}

        self.optimizer.zero_grad(set_to_none=True)
        outputs, loss_sum, data_time, fault = [], 0.0, 0.0, None
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        for micro in range(self.accumulate):
            data_start = time.perf_counter()
            item = next(self._data)
            self.skipped_images += self.count_skipped_images()  # each one is logged by the loader
            data_time += time.perf_counter() - data_start
            if fault is not None:  # read the step's remaining micro-batches: the data stream stays aligned
                continue
            batch = as_model_batch(item)
            if self.batch_transform is not None:
                with phase("step/augment"):
                    batch = self.batch_transform(batch, self.device)
            batch = to_device(batch, self.device)
            # Gradients are all-reduced on the last micro-batch only.
            sync = (self.ddp_model.no_sync() if self.world_size > 1 and micro < self.accumulate - 1
                    else contextlib.nullcontext())
            with sync:
                # 2. The model's forward: for DINO the teacher on the global crops, the student on all, the loss.
                with autocast, phase("step/forward"):
                    out = self.ddp_model(batch, **model_values)
                loss = out.pop("loss")
                # Every rank takes the same decision, before any collective of the backward pass.
                loss_value = loss.item()
                if not finite_on_all_ranks(loss_value, self.world_size, self.device):
                    fault = (f"loss is {loss_value}" if not math.isfinite(loss_value)
                             else "loss is non-finite on another rank")
                    continue
                # 3. Backward (scaled for float16; averaged over micro-batches).
                with phase("step/backward"):
                    self.scaler.scale(loss / self.accumulate).backward()
            outputs.append(out)
            loss_sum += loss_value
            del out, loss

        # 4. Per-parameter gradient clipping, on unscaled gradients.
        if fault is None:
            with phase("step/clip"):
                fault = self._clip_and_check_gradients()
        if fault is not None:
            self._skip_nonfinite_step(fault, it, epoch)  # raises past skip_nonfinite
            self.storage.put_scalars(**scalars, smoothing_hint=False)
            self.storage.put_scalars(data_time=data_time)
            self._put_fault_counters()
            return
        # 5. The prototype layer stays fixed during the first epochs (helps early training).
        if epoch < self.freeze_last_layer_epochs:
            for p in self.last_layer_params:
                p.grad = None
        # 6. Optimizer step.
        with phase("step/optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # 7. The model's updates after the step (DINO: teacher EMA, then center), once per optimizer
        # step; health metrics first, on the outputs and state the step used.
        loss_mean = loss_sum / self.accumulate
        if (it + 1) % self.log_period == 0 or it + 1 == self.max_iter:
            health = self.model.health_metrics(outputs, loss=loss_mean, **model_values)
            if health:
                self.storage.put_scalars(**health, smoothing_hint=False)
        with phase("step/after_step"):
            self.model.after_step(outputs, **model_values)

        step_time = time.perf_counter() - start
        # Schedules are logged as they are at this iteration (not smoothed); per-step timings and the
        # loss as the median of the writers' window.
        self.storage.put_scalars(**scalars, smoothing_hint=False)
        self.storage.put_scalars(loss=loss_mean, data_time=data_time, time=step_time)
        if self.total_batch:
            self.storage.put_scalar("images/s", self.total_batch / step_time)
        self._put_fault_counters()

    # ------------------------------------------------------------------ faults
    def _put_fault_counters(self) -> None:
        """Run totals: non-finite steps skipped, and unreadable images skipped by all ranks (summed at
        log periods only: a collective)."""
        self.storage.put_scalar("nonfinite_skipped", self.nonfinite_skipped, smoothing_hint=False)
        if (self.iter + 1) % self.log_period == 0 or self.iter + 1 == self.max_iter:
            total = self.skipped_images
            if self.world_size > 1:
                import torch.distributed as dist

                flag = torch.tensor([total], device=self.device)
                dist.all_reduce(flag)
                total = int(flag.item())
            self.storage.put_scalar("skipped_images", total, smoothing_hint=False)

    def _clip_and_check_gradients(self) -> Optional[str]:
        """Clip each gradient to ``clip_grad`` (after unscaling); a description if any is NaN/inf."""
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            norms = clip_grad_per_param_(self.trainable_params, self.clip_grad)
        else:
            norms = None
        # A float16 GradScaler handles overflows itself (skips the step, lowers its scale).
        return None if self.scaler.is_enabled() else gradient_fault(self.trainable_params, norms)

    def _skip_nonfinite_step(self, fault: str, it: int, epoch: int) -> None:
        """Count a non-finite step and skip it (no optimizer step, no model update), or raise
        :class:`NonFiniteLossError` once more than ``skip_nonfinite`` steps were bad."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        allowed = self.skip_nonfinite
        if self.nonfinite_skipped > allowed:
            raise NonFiniteLossError(
                f"{fault} at iteration {it} (epoch {epoch}); stopping before the optimizer step "
                f"({self.nonfinite_skipped} non-finite step(s), SOLVER.SKIP_NONFINITE {allowed}). Last good "
                f"checkpoint: {self.last_saved or 'none written yet'} (intact). Usual fixes: "
                f"SOLVER.AMP.ENABLED False, a lower SOLVER.BASE_LR, a higher MODEL.TEACHER.MOMENTUM, a lower "
                f"SOLVER.CLIP_GRAD; or SOLVER.SKIP_NONFINITE N to skip up to N such steps."
            )
        logger.warning("%s at iteration %d (epoch %d): step skipped, weights unchanged (%d of SOLVER.SKIP_NONFINITE "
                       "%d)", fault, it, epoch, self.nonfinite_skipped, allowed)
