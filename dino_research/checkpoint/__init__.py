"""Checkpoints: atomic save, exact resume, official DINO weight formats, backbone export."""

from .checkpointer import (
    LAST_CHECKPOINT,
    TEACHER_BACKBONE,
    CheckpointError,
    Checkpointer,
    atomic_save,
    capture_rng_state,
    export_backbone,
    load_backbone_state,
    load_file,
    load_pretrained,
    restore_rng_state,
    strip_prefixes,
)

__all__ = [
    "LAST_CHECKPOINT",
    "TEACHER_BACKBONE",
    "CheckpointError",
    "Checkpointer",
    "atomic_save",
    "capture_rng_state",
    "export_backbone",
    "load_backbone_state",
    "load_file",
    "load_pretrained",
    "restore_rng_state",
    "strip_prefixes",
]
