"""Hooks: bookkeeping around the training step (checkpoints, metric writers, export).

Hooks never touch the model's training logic (the step, the teacher, the loss): they observe the
trainer and write things down.
"""

from __future__ import annotations

import logging
import os

from ..checkpoint import LAST_CHECKPOINT, TEACHER_BACKBONE, export_backbone
from ..utils import comm

logger = logging.getLogger("dino_research")


class HookBase:
    """``before_train()``, ``after_step()`` (``trainer.iter`` is the iteration just done) and
    ``after_train()``; ``self.trainer`` is set when the hook is registered."""

    trainer = None

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class PeriodicCheckpointer(HookBase):
    """``last_checkpoint.pth`` every ``period`` iterations and at every epoch end, numbered snapshots
    ``checkpoint_EEEE.pth`` every ``snapshot_epochs`` epochs, and a final one at the end.

    The stored ``iteration`` is the next one to run, so a resumed run starts exactly there.
    """

    def __init__(self, period: int, snapshot_epochs: int):
        self.period, self.snapshot_epochs = period, snapshot_epochs

    def after_step(self) -> None:
        t = self.trainer
        done = t.iter + 1
        epoch_end = done % t.iters_per_epoch == 0
        if epoch_end or (self.period > 0 and done % self.period == 0) or done == t.max_iter:
            t.save_checkpoint(LAST_CHECKPOINT, next_iter=done)
        if epoch_end and self.snapshot_epochs > 0 and (done // t.iters_per_epoch) % self.snapshot_epochs == 0:
            t.save_checkpoint(f"checkpoint_{done // t.iters_per_epoch:04d}.pth", next_iter=done)


class TeacherExporter(HookBase):
    """At the end of training, write the teacher backbone in the official DINO backbone format."""

    def after_train(self) -> None:
        t = self.trainer
        if t.iter + 1 >= t.max_iter and comm.is_main_process():
            path = os.path.join(t.cfg.OUTPUT_DIR, TEACHER_BACKBONE)
            export_backbone(t.model.teacher.backbone, path)
            logger.info("teacher backbone exported (official DINO format) to %s", path)


class PeriodicWriter(HookBase):
    """Run the metric writers every ``period`` iterations and at the end of training."""

    def __init__(self, writers: list, period: int):
        self.writers, self.period = writers, period

    def after_step(self) -> None:
        t = self.trainer
        if (t.iter + 1) % self.period == 0 or t.iter + 1 == t.max_iter:
            for writer in self.writers:
                writer.write()

    def after_train(self) -> None:
        for writer in self.writers:
            writer.write()
            writer.close()
