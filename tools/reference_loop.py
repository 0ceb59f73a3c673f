"""Time the reference implementation's training loop (facebookresearch/dino ``main_dino.train_one_epoch``)
on the same crops as ``tools/bench_training.py``, from a checkout the user gives; nothing is vendored.

Used by ``tools/bench_training.py --reference PATH``. The checkout's own modules are imported
(``main_dino``, ``utils``, ``vision_transformer``) and its ``train_one_epoch`` is called unchanged
over a list of identical in-memory batches. What is adapted, and only so that it runs here:

- one process: the student is wrapped in a module with a ``.module`` attribute (the reference reads
  ``student.module`` of its DDP wrapper) instead of DDP, as our single-process trainer has no DDP;
  a one-process gloo group is initialized when none is, since ``DINOLoss.update_center`` all-reduces;
- on a CPU, ``Tensor.cuda`` returns the tensor itself and ``torch.cuda.synchronize`` does nothing
  while the loop runs (the reference moves every batch with ``.cuda()`` and synchronizes each step),
  and the epoch-end gathering of the logged averages (CUDA tensors) is skipped;
- the model is built from our config's sizes with the checkout's ``VisionTransformer``,
  ``DINOHead``, ``MultiCropWrapper``, ``get_params_groups`` and ``DINOLoss``, as ``main_dino.py``
  builds them (AdamW, per-parameter clipping ``SOLVER.CLIP_GRAD``, no last-layer freeze).

The reference has float16 autocast with a gradient scaler (CUDA) or float32, no bfloat16: ``fp16``
is timed in float16, anything else in float32.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

__all__ = ["import_reference", "time_reference_loop"]

_VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def import_reference(checkout: str) -> SimpleNamespace:
    """The checkout's ``main_dino``, ``utils`` and ``vision_transformer`` modules.

    Raises ``SystemExit`` naming the path when it does not hold them.
    """
    missing = [f for f in ("main_dino.py", "utils.py", "vision_transformer.py")
               if not os.path.isfile(os.path.join(checkout, f))]
    if missing:
        raise SystemExit(f"--reference {checkout!r}: not a facebookresearch/dino checkout (missing "
                         f"{', '.join(missing)}); clone https://github.com/facebookresearch/dino and pass its folder")
    sys.path.insert(0, os.path.abspath(checkout))
    try:
        # A module named `utils` imported earlier from elsewhere would shadow the checkout's.
        for name in ("utils", "vision_transformer", "main_dino"):
            sys.modules.pop(name, None)
        modules = {name: importlib.import_module(name) for name in ("utils", "vision_transformer", "main_dino")}
    finally:
        sys.path.pop(0)
    return SimpleNamespace(**modules)


class _SingleProcess(nn.Module):
    """What ``train_one_epoch`` needs of its DDP-wrapped student: ``forward`` and ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _build(ref: SimpleNamespace, cfg):
    name = cfg.MODEL.BACKBONE.NAME
    if name not in _VIT_SIZES:
        raise SystemExit(f"--reference times the reference's ViTs ({', '.join(_VIT_SIZES)}); "
                         f"MODEL.BACKBONE.NAME is {name!r}")
    dim, heads = _VIT_SIZES[name]
    heads = cfg.MODEL.BACKBONE.NUM_HEADS or heads
    h = cfg.MODEL.HEAD

    def network(drop_path_rate: float) -> nn.Module:
        vit = ref.vision_transformer.VisionTransformer(
            patch_size=cfg.MODEL.BACKBONE.PATCH_SIZE, embed_dim=dim, depth=cfg.MODEL.BACKBONE.DEPTH or 12,
            num_heads=heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            drop_path_rate=drop_path_rate)
        head = ref.vision_transformer.DINOHead(dim, h.OUT_DIM, use_bn=h.USE_BN, norm_last_layer=h.NORM_LAST_LAYER,
                                                nlayers=h.NUM_LAYERS, hidden_dim=h.HIDDEN_DIM,
                                                bottleneck_dim=h.BOTTLENECK_DIM)
        return ref.utils.MultiCropWrapper(vit, head)

    student, teacher = network(cfg.MODEL.BACKBONE.DROP_PATH_RATE), network(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


@contextlib.contextmanager
def _runnable_here(ref: SimpleNamespace, device: str):
    """One-process gloo group if none; on a CPU, ``.cuda()`` as identity, no CUDA synchronize and
    no gathering of the metric logger's averages."""
    import torch.distributed as dist

    made_group = False
    saved = (torch.Tensor.cuda, torch.cuda.synchronize, ref.utils.is_dist_avail_and_initialized)
    store = tempfile.NamedTemporaryFile(prefix="reference_loop_", delete=False)
    store.close()
    os.unlink(store.name)  # the file store must not exist yet
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
            made_group = True
        if device == "cpu":
            torch.Tensor.cuda = lambda self, *args, **kwargs: self
            torch.cuda.synchronize = lambda *args, **kwargs: None
            ref.utils.is_dist_avail_and_initialized = lambda: False  # read by MetricLogger alone
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize, ref.utils.is_dist_avail_and_initialized = saved
        if made_group:
            dist.destroy_process_group()
        if os.path.exists(store.name):
            os.unlink(store.name)


def time_reference_loop(checkout: str, cfg, crops: list, warmup: int, iters: int, precision: str = "fp32",
                        device: str = "cpu") -> dict:
    """Seconds per iteration of the reference ``train_one_epoch`` on ``crops`` (the fixed batch of
    ``bench_training``: list of (B, 3, h, w) tensors on ``device``, global first).

    ``warmup`` untimed iterations (one call), then one call over ``iters`` iterations timed as a
    whole (the reference logs and synchronizes inside). Returns ``{"images_per_s", "s_per_iter",
    "precision"}``.
    """
    ref = import_reference(checkout)
    torch.manual_seed(0)
    student, teacher = _build(ref, cfg)
    student, teacher = student.to(device), teacher.to(device)
    batch = crops[0].shape[0]
    ncrops = len(crops)
    loss = ref.main_dino.DINOLoss(cfg.MODEL.HEAD.OUT_DIM, ncrops, cfg.MODEL.LOSS.TEACHER_TEMP,
                                  cfg.MODEL.LOSS.TEACHER_TEMP, 0, 1).to(device)
    optimizer = torch.optim.AdamW(ref.utils.get_params_groups(student))
    fp16 = precision == "fp16"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    steps = warmup + iters + 1
    lr = np.full(steps, cfg.SOLVER.BASE_LR * batch / 256.0)
    wd = np.full(steps, cfg.SOLVER.WEIGHT_DECAY)
    momentum = np.full(steps, cfg.MODEL.TEACHER.MOMENTUM)
    args = SimpleNamespace(epochs=1, clip_grad=cfg.SOLVER.CLIP_GRAD, freeze_last_layer=0)
    labels = torch.zeros(batch, dtype=torch.long)
    wrapped = _SingleProcess(student)
    with _runnable_here(ref, device), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        def run(n: int) -> float:
            start = time.perf_counter()
            ref.main_dino.train_one_epoch(wrapped, teacher, teacher, loss, [(crops, labels)] * n, optimizer,
                                          lr, wd, momentum, 0, scaler, args)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        if warmup:
            run(warmup)
        seconds = run(iters) / iters
    return {"images_per_s": batch / seconds, "s_per_iter": seconds, "precision": "fp16" if fp16 else "fp32"}
