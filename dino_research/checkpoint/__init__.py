"""Checkpoints: atomic save, exact resume, official DINO weight formats, backbone export, file diagnoses."""

from .checkpointer import (
    LAST_CHECKPOINT,
    SNAPSHOT_PATTERN,
    TEACHER_BACKBONE,
    Checkpointer,
    CheckpointError,
    atomic_save,
    backbone_state,
    capture_rng_state,
    export_backbone,
    load_backbone_state,
    load_file,
    load_pretrained,
    output_path,
    restore_rng_state,
    strip_prefixes,
    weights_format,
)
from .diagnose import FileKind, checkpoint_like_files, describe_file
from .integrity import INTEGRITY_KEY, integrity_problem, tensor_checksum, with_integrity

__all__ = [
    "INTEGRITY_KEY",
    "LAST_CHECKPOINT",
    "SNAPSHOT_PATTERN",
    "TEACHER_BACKBONE",
    "CheckpointError",
    "Checkpointer",
    "FileKind",
    "atomic_save",
    "backbone_state",
    "capture_rng_state",
    "checkpoint_like_files",
    "describe_file",
    "export_backbone",
    "load_backbone_state",
    "load_file",
    "load_pretrained",
    "output_path",
    "restore_rng_state",
    "integrity_problem",
    "strip_prefixes",
    "weights_format",
    "tensor_checksum",
    "with_integrity",
]
