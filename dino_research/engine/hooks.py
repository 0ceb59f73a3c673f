"""Hooks: bookkeeping around the training step (checkpoints, metric writers, export).

Hooks never touch the model's training logic (the step, the teacher, the loss): they observe the
trainer and write things down.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch.nn as nn

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
    """At the end of a completed training run, write the teacher backbone in the official DINO backbone
    format (not after a failure or a stop)."""

    def after_train(self) -> None:
        t = self.trainer
        # Only a run that finished: after a failure at the last iteration nothing is exported as done.
        if getattr(t, "completed", False) and comm.is_main_process():
            path = os.path.join(t.cfg.OUTPUT_DIR, TEACHER_BACKBONE)
            export_backbone(t.model.backbone_for_eval(), path)
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


def build_knn_datasets(cfg) -> tuple:
    """``(memory bank, queries)``: ``TEST.DATASET`` at ``TEST.TRAIN_ROOT`` and ``TEST.VAL_ROOT`` with the
    eval transform, labelled with the training split's class index
    (:func:`~dino_research.data.eval_transforms.build_eval_datasets`). Raises ``ValueError`` naming
    the root when one is missing or empty, and the class when the queries hold one the bank lacks
    (unless ``TEST.UNKNOWN_VAL_CLASSES`` is "ignore")."""
    from ..data import build_eval_transform
    from ..data.eval_transforms import build_eval_datasets

    transform = build_eval_transform(cfg)
    return build_eval_datasets(cfg, transform, transform)


def _every_epochs_and_at_end(trainer, period_epochs: int) -> bool:
    """Whether the iteration just done ends an epoch that is a multiple of ``period_epochs``, or the run."""
    done = trainer.iter + 1
    epoch_end = done % trainer.iters_per_epoch == 0
    return done == trainer.max_iter or (epoch_end and (done // trainer.iters_per_epoch) % period_epochs == 0)


class KNNEvalHook(HookBase):
    """Weighted k-NN of the teacher backbone every ``TEST.EVAL_PERIOD`` epochs and at the end.

    Features of ``TEST.DATASET`` (train split as memory bank, val split as queries) with the eval
    transform; scores go to the event store (``knn/top1_k20``, ...), hence to metrics.json and
    TensorBoard, and to the log as a table. With ``TEST.KNN.PIXEL_BASELINE`` the raw-pixel k-NN is
    computed once and logged alongside (``knn_pixels/top1_k20``, ...). A k larger than the bank is
    scored with every bank image; its log row says so ("k=200 > 50 training images: all 50 used").
    """

    def __init__(self, period_epochs: int, datasets: tuple | None = None, init_baseline: bool = False):
        self.period = period_epochs
        self._datasets = datasets  # (memory bank, queries); built from the config when None
        self._pixel_results = None
        self.init_baseline = init_baseline

    def before_train(self) -> None:
        # The network a fresh run starts from (random, or MODEL.WEIGHTS): what training must improve on.
        if self.init_baseline and self.trainer.start_iter == 0:
            self.evaluate(prefix="knn_init", what="teacher at initialization")

    def after_step(self) -> None:
        if _every_epochs_and_at_end(self.trainer, self.period):
            self.evaluate()

    def evaluate(self, prefix: str = "knn", what: str = "teacher") -> dict:
        """k-NN of the teacher now; scalars ``{prefix}/top1_k{k}`` and ``{prefix}/top5_k{k}``."""
        from ..evaluation.knn import k_note, run_knn

        t, cfg = self.trainer, self.trainer.cfg
        if self._datasets is None:
            self._datasets = build_knn_datasets(cfg)

        # The raw-pixel baseline, computed once, shares the teacher's pass over the images.
        backbones = [t.model.backbone_for_eval()]
        if cfg.TEST.KNN.PIXEL_BASELINE and self._pixel_results is None:
            backbones.append(nn.Flatten(1))
        outcomes = run_knn(backbones, *self._datasets, ks=cfg.TEST.KNN.K, temperature=cfg.TEST.KNN.TEMPERATURE,
                           batch_size=cfg.TEST.BATCH_SIZE, device=t.device, num_workers=cfg.DATALOADER.NUM_WORKERS,
                           chunk_size=cfg.TEST.KNN.CHUNK_SIZE, progress=False)
        results, bank_size = outcomes[0], len(self._datasets[0])
        new_pixel_results = {}
        if len(backbones) == 2:
            self._pixel_results = new_pixel_results = outcomes[1]
        if comm.is_main_process():
            for name, res in ((prefix, results), ("knn_pixels", new_pixel_results)):
                for k, (top1, top5) in res.items():
                    t.storage.put_scalars(**{f"{name}/top1_k{k}": top1, f"{name}/top5_k{k}": top5},
                                          smoothing_hint=False)
            notes = {k: k_note(k, bank_size) for k in results}
            rows = [f"  k={k:<4d} {what} top-1 {r[0]:6.2f}  top-5 {r[1]:6.2f}"
                    + (f"   | raw pixels top-1 {self._pixel_results[k][0]:6.2f}" if self._pixel_results else "")
                    + (f"   ({notes[k]})" if notes[k] else "")
                    for k, r in results.items()]
            done = t.iter + 1 if prefix == "knn" else t.start_iter
            logger.info("k-NN after %d iterations (epoch %d) on %s:\n%s", done, done // t.iters_per_epoch,
                        cfg.TEST.DATASET, "\n".join(rows))
        comm.synchronize()
        return results


class CurvesHook(HookBase):
    """``OUTPUT_DIR/curves.png`` (:func:`~dino_research.utils.plots.plot_training_curves`) after every
    k-NN evaluation and at the end of training (main process). ``json_writer`` is flushed first, so
    the figure includes the metrics of the iteration just done."""

    def __init__(self, period_epochs: int, json_writer):
        self.period, self.json_writer = period_epochs, json_writer

    def after_step(self) -> None:
        if self.period > 0 and _every_epochs_and_at_end(self.trainer, self.period):
            self.draw()

    def after_train(self) -> None:
        self.draw(flush=False)  # the PeriodicWriter (registered before) wrote and closed the file

    def draw(self, flush: bool = True) -> None:
        from ..utils.plots import plot_training_curves

        if flush:
            self.json_writer.write()
        try:
            path = plot_training_curves(self.trainer.cfg.OUTPUT_DIR)
        except (ValueError, FileNotFoundError) as e:  # nothing to draw yet: not worth stopping a run
            logger.debug("curves not drawn: %s", e)
            return
        logger.info("training curves: %s", path)


class AttentionMapHook(HookBase):
    """The teacher's last-block [CLS]-to-patch attention on a few fixed images, every ``period`` epochs
    and at the end (main process; ViT backbones only).

    One figure per image (:func:`~dino_research.evaluation.attention.attention_figure`: the image, the
    mean over heads and every head; below, the masks keeping ``threshold`` of the mass) goes to
    TensorBoard as ``attention/image_K`` and to ``OUTPUT_DIR/attention/iter_IIIIIII_image_K.png``.
    Images are shown at least ``min_side`` pixels wide (small crops are enlarged, pixels repeated).

    Args:
        period_epochs: ``TEST.ATTENTION.PERIOD``.
        images: RGB ``PIL.Image`` crops of the size the model evaluates (see
            :func:`attention_images`); the same ones at every call, so figures compare over training.
    """

    def __init__(self, period_epochs: int, images: list, threshold: float = 0.6, min_side: int = 112):
        self.period, self.images, self.threshold, self.min_side = period_epochs, images, threshold, min_side

    def after_step(self) -> None:
        if comm.is_main_process() and _every_epochs_and_at_end(self.trainer, self.period):
            self.log_maps()

    def log_maps(self) -> list[str]:
        """Compute, log and save the figures now; returns the PNG paths."""
        from ..evaluation.attention import render_attention

        t, cfg = self.trainer, self.trainer.cfg
        backbone = t.model.backbone_for_eval()
        folder = os.path.join(cfg.OUTPUT_DIR, "attention")
        os.makedirs(folder, exist_ok=True)
        was_training, paths = backbone.training, []
        backbone.eval()
        try:
            for k, picture in enumerate(self.images):
                figure = render_attention(backbone, picture, cfg.INPUT.MEAN, cfg.INPUT.STD, device=t.device,
                                          threshold=self.threshold, min_side=self.min_side)["figure"]
                t.storage.put_image(f"attention/image_{k}", np.asarray(figure))
                paths.append(os.path.join(folder, f"iter_{t.iter + 1:07d}_image_{k}.png"))
                figure.save(paths[-1])
        finally:
            backbone.train(was_training)
        logger.info("attention maps of %d images after iteration %d: %s", len(paths), t.iter + 1, folder)
        return paths


def attention_images(cfg, num_images: int | None = None) -> list:
    """``num_images`` (default ``TEST.ATTENTION.NUM_IMAGES``) images spread evenly over ``TEST.DATASET``
    at ``TEST.VAL_ROOT``, each resized (shorter side ``TEST.RESIZE_SIZE``, bicubic) and center-cropped
    (``TEST.CROP_SIZE``) as the evaluation transform does: RGB ``PIL.Image`` crops, not normalized."""
    from torchvision import transforms as T

    from ..data import build_dataset

    crop = T.Compose([T.Resize(cfg.TEST.RESIZE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(cfg.TEST.CROP_SIZE)])
    dataset = build_dataset(cfg, cfg.TEST.DATASET, cfg.TEST.VAL_ROOT, train=False, transform=crop, key="TEST.DATASET")
    n = min(cfg.TEST.ATTENTION.NUM_IMAGES if num_images is None else num_images, len(dataset))
    return [dataset[i * len(dataset) // n][0] for i in range(n)]
