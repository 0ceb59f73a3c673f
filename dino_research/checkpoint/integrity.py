"""Checksums that let a resumed run notice a checkpoint whose bytes changed on disk.

``torch.load`` notices a truncated file but loads flipped bits inside tensor data as wrong weights
without complaint. Our checkpoints therefore carry a CRC-32 of their whole content, written by
:func:`with_integrity` and checked by :func:`integrity_problem` whenever a file is loaded.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import torch

# Key of the integrity record stored in our checkpoints.
INTEGRITY_KEY = "integrity"
_CHECKSUM_ALGORITHM = "crc32-v1"


def tensor_checksum(obj: Any) -> int:
    """CRC-32 of everything in a nested checkpoint structure: tensor bytes, scalars, keys, in a fixed order.

    Dict entries are visited sorted by ``repr(key)``; lists and tuples in order (``weights_only``
    loading may turn one into the other, so they hash alike); tensors by dtype, shape and raw bytes;
    any other leaf by ``repr``. Tensors must be on the CPU. About 0.3 s per GB (zlib, one core).
    """
    crc = 0

    def visit(node: Any) -> None:
        nonlocal crc
        if isinstance(node, torch.Tensor):
            flat = node.detach().contiguous().reshape(-1)
            crc = zlib.crc32(f"T{node.dtype}{tuple(node.shape)}".encode(), crc)
            if flat.numel():
                crc = zlib.crc32(flat.view(torch.uint8).numpy(), crc)
        elif isinstance(node, dict):
            crc = zlib.crc32(f"{{{len(node)}".encode(), crc)
            for key, value in sorted(node.items(), key=lambda kv: repr(kv[0])):
                crc = zlib.crc32(repr(key).encode(), crc)
                visit(value)
        elif isinstance(node, (list, tuple)):
            crc = zlib.crc32(f"[{len(node)}".encode(), crc)
            for value in node:
                visit(value)
        else:
            crc = zlib.crc32(repr(node).encode(), crc)

    visit(obj)
    return crc


def with_integrity(state: dict) -> dict:
    """A copy of ``state`` with every tensor on the CPU, plus its checksum under ``INTEGRITY_KEY``."""
    state = _to_cpu({k: v for k, v in state.items() if k != INTEGRITY_KEY})
    state[INTEGRITY_KEY] = {"algorithm": _CHECKSUM_ALGORITHM, "crc32": tensor_checksum(state)}
    return state


def integrity_problem(data: Any) -> Optional[str]:
    """Why ``data`` (a loaded file) fails its integrity record, or None when it matches.

    Files without a record (official weights, checkpoints of earlier versions) pass unchecked.
    """
    if not isinstance(data, dict) or not isinstance(data.get(INTEGRITY_KEY), dict):
        return None
    record = data[INTEGRITY_KEY]
    if record.get("algorithm") != _CHECKSUM_ALGORITHM:
        return (f"unknown checksum algorithm {record.get('algorithm')!r}, expected {_CHECKSUM_ALGORITHM!r} "
                f"(written by a newer dino_research?)")
    found = tensor_checksum({k: v for k, v in data.items() if k != INTEGRITY_KEY})
    if found != record.get("crc32"):
        return (f"its content does not match the checksum written with it (crc32 {found:#010x}, stored "
                f"{record.get('crc32')!r}): the bytes changed after the write")
    return None


def _to_cpu(node: Any) -> Any:
    if isinstance(node, torch.Tensor):
        return node.detach().cpu()
    if isinstance(node, dict):
        return {k: _to_cpu(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_cpu(v) for v in node]
    if isinstance(node, tuple):
        return tuple(_to_cpu(v) for v in node)
    return node
