"""Model registries and their builders.

Every extension point of the model is a registry; a new component is one decorated class in one
file (inside the package or in a project that is imported before building).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from fvcore.common.registry import Registry

from ..config.checks import declare_registry_key
from ..utils.registry import lookup

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = """
Backbones, selected by ``MODEL.BACKBONE.NAME``.

A registered object is called as ``obj(cfg, drop_path_rate: float) -> nn.Module`` and must return a
module with

* ``embed_dim: int``, the feature width D;
* ``forward(x (B, 3, H, W) float) -> (B, D)``, one embedding per image (for ViTs the final-normed CLS
  token), for every crop size the augmentation produces.

ViT backbones also provide ``patch_size: int``, ``num_heads: int``,
``get_intermediate_layers(x, n) -> list of n (B, N+1, D)`` and
``get_last_selfattention(x) -> (B, heads, N+1, N+1)``, used by the evaluation tools, and
``forward_features(x, token_mask=None, mask_token=None) -> (B, N+1, D)``: every final-normed token,
[CLS] first, the patches of ``token_mask`` (bool (B, H/p, W/p)) replaced by ``mask_token`` (D,)
before the positional embedding (masked image modeling, e.g. iBOT).
The backbone must not load weights: initialization from files is the checkpointer's job.
"""

HEAD_REGISTRY = Registry("HEAD")
HEAD_REGISTRY.__doc__ = """
Projection heads, selected by ``MODEL.HEAD.NAME``.

Called as ``obj(cfg, in_dim: int) -> nn.Module`` whose ``forward(x (N, in_dim)) -> (N, K)`` returns
the logits over the K prototypes, and which exposes ``last_layer: nn.Module | None``, the layer
frozen during ``SOLVER.FREEZE_LAST_LAYER_EPOCHS`` (``None``: nothing to freeze).
"""

LOSS_REGISTRY = Registry("LOSS")
LOSS_REGISTRY.__doc__ = """
Self-distillation losses, selected by ``MODEL.LOSS.NAME``.

Called as ``obj(cfg) -> nn.Module`` with
``forward(student_out (n_crops*B, K), teacher_out (n_global*B, K), teacher_temp: float,
update_state: bool = True) -> scalar``, both inputs crop-major (all images of crop 0, then crop 1,
...). State the loss keeps across steps (DINO's center) lives in buffers, so it is checkpointed with
the model; ``forward`` updates it after computing the loss unless ``update_state=False``, and
``update_state(teacher_out)`` updates it alone (the trainer's way to update it once per optimizer
step under gradient accumulation). A stateless loss makes ``update_state`` a no-op.
"""

EMA_REGISTRY = Registry("EMA")
EMA_REGISTRY.__doc__ = """
Teacher update rules, selected by ``MODEL.TEACHER.EMA``. A rule says *how* a momentum is applied; the
momentum's value over training is a schedule (SCHEDULER_REGISTRY), not part of the rule.

Called as ``obj(cfg, student: nn.Module, teacher: nn.Module)`` and then, once per optimizer step,
``rule.update(momentum: float) -> None`` which moves the teacher towards the student in place, under
``torch.no_grad()``. ``student`` and ``teacher`` must have the same architecture.
"""

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """
Meta-architectures, selected by ``MODEL.META_ARCHITECTURE``: DINO, or a project's method.

Called as ``obj(cfg) -> nn.Module``; the module subclasses ``modeling.meta_arch.MetaArchitecture``.
The trainer, the hooks, the health metrics and the checkpoint loader call only these methods:

* ``forward(batch: dict, **schedule_values) -> dict``: ``batch["crops"]`` is the augmentation's list of
  crops ``(B, 3, h_i, w_i)``, global crops first, plus any entries the augmentation or collate step
  adds (e.g. masks); ``schedule_values`` are every schedule except lr and weight decay (``momentum``,
  ``teacher_temp``, and those a project registers in ``SCHEDULE_REGISTRY``). Returns at least
  ``"loss"``, a scalar to back-propagate; the other entries go to ``after_step``/``health_metrics``.
* ``after_step(outputs: list[dict], **schedule_values)``: once per optimizer step, after it, with the
  outputs of every micro-batch (``"loss"`` removed): the teacher EMA and any state (center) updates.
* ``health_metrics(outputs, loss: float, **schedule_values) -> dict[str, float]``: logged scalars.
* ``backbone_for_eval() -> nn.Module``: what k-NN, attention maps and the export use.
* ``last_layer_parameters() -> list[nn.Parameter]``: frozen during ``SOLVER.FREEZE_LAST_LAYER_EPOCHS``.
* ``load_weights(kind, state, source, partial)``: initialization from an official weights file
  (``checkpoint.weights_format``); our own checkpoints load with ``load_state_dict``.

Every rank must hold identical non-trained state after ``after_step`` (all-reduce what depends on
the local batch), so that checkpoints and evaluation agree across ranks.
"""


for _key, _registry in (("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY), ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
                        ("MODEL.HEAD.NAME", HEAD_REGISTRY), ("MODEL.LOSS.NAME", LOSS_REGISTRY),
                        ("MODEL.TEACHER.EMA", EMA_REGISTRY)):
    declare_registry_key(_key, _registry)


def build_backbone(cfg, drop_path_rate: Optional[float] = None) -> nn.Module:
    """Build ``MODEL.BACKBONE.NAME`` with ``drop_path_rate`` (default ``MODEL.BACKBONE.DROP_PATH_RATE``).

    Returns a randomly initialized backbone with an ``embed_dim`` attribute; does not load weights.
    """
    if drop_path_rate is None:
        drop_path_rate = cfg.MODEL.BACKBONE.DROP_PATH_RATE
    builder = lookup(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")
    backbone = builder(cfg, drop_path_rate=drop_path_rate)
    assert isinstance(backbone, nn.Module), f"{cfg.MODEL.BACKBONE.NAME} returned {type(backbone)}"
    assert isinstance(getattr(backbone, "embed_dim", None), int), (
        f"backbone {cfg.MODEL.BACKBONE.NAME} must expose an integer `embed_dim`"
    )
    if cfg.MODEL.BACKBONE.CHANNELS_LAST:
        use_channels_last(backbone)
    return backbone


def _input_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def use_channels_last(backbone: nn.Module) -> nn.Module:
    """Store ``backbone``'s 4-D weights channels-last (NHWC) and convert its 4-D inputs on entry, in
    place; returns it. Values are unchanged: only the memory layout differs, which oneDNN (CPU) and
    cuDNN (tensor cores) run convolutions faster on. A forward pre-hook rather than a wrapper, so
    the module keeps its type, attributes and state-dict keys."""
    backbone.to(memory_format=torch.channels_last)
    backbone.register_forward_pre_hook(_input_to_channels_last)
    return backbone


def build_head(cfg, in_dim: int) -> nn.Module:
    """Build ``MODEL.HEAD.NAME`` taking ``in_dim`` features; returns a module with ``last_layer``."""
    head = lookup(HEAD_REGISTRY, cfg.MODEL.HEAD.NAME, "MODEL.HEAD.NAME")(cfg, in_dim=in_dim)
    assert isinstance(head, nn.Module) and hasattr(head, "last_layer"), (
        f"head {cfg.MODEL.HEAD.NAME} must be an nn.Module with a `last_layer` attribute"
    )
    return head


def build_loss(cfg) -> nn.Module:
    """Build ``MODEL.LOSS.NAME``; its state (the center) starts at its initial value."""
    loss = lookup(LOSS_REGISTRY, cfg.MODEL.LOSS.NAME, "MODEL.LOSS.NAME")(cfg)
    assert isinstance(loss, nn.Module), f"loss {cfg.MODEL.LOSS.NAME} must be an nn.Module"
    return loss


def build_ema(cfg, student: nn.Module, teacher: nn.Module):
    """Build the teacher update rule ``MODEL.TEACHER.EMA`` pairing ``student`` and ``teacher``.

    The rule keeps references to the models' tensors for speed: build it after the model has been
    moved to its final device (``Module.to`` replaces buffers with new tensors).
    """
    return lookup(EMA_REGISTRY, cfg.MODEL.TEACHER.EMA, "MODEL.TEACHER.EMA")(cfg, student, teacher)


def build_model(cfg) -> nn.Module:
    """Build ``MODEL.META_ARCHITECTURE`` on the CPU, randomly initialized.

    Does not move the model to a device, wrap it in DDP or load ``MODEL.WEIGHTS``: the trainer and
    the checkpointer do that.
    """
    model = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")(cfg)
    assert isinstance(model, nn.Module), f"{cfg.MODEL.META_ARCHITECTURE} must be an nn.Module"
    return model
