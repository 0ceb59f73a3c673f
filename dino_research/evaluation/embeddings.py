"""Embeddings of one's own images, extracted resumably into files numpy reads alone.

``tools/extract_features.py`` runs :func:`extract_embeddings` over a folder (every image, any depth,
as :class:`~dino_research.data.unlabeled.UnlabeledFolder` lists it) or a file list (FileList format:
one ``PATH [LABEL]`` per line). The output folder ``OUT`` holds:

* ``index.csv``: ``row,path``, one line per image, in extraction order; written first, and from then
  on the listing of the run (a restart reads it instead of walking the input again).
* ``meta.json``: the format, the settings (weights and their SHA-256, architecture, image size,
  normalization, what was extracted, chunk size...), the arrays' shapes, ``complete``, and the rows of
  images that could not be read.
* ``features.npy`` (N, D) float32: the backbone's embedding (final-normed [CLS] for the ViTs, pooled
  features for convnets), L2-normalized unless asked not to.
* ``layers.npy`` (N, L, D) with ``--layers L``: the [CLS] token of each of the last L blocks, each
  through the final norm, the last block last. ``patch_tokens.npy`` (N, h*w, D) with
  ``--patch-tokens``: the last block's patch tokens, row-major over the (h, w) grid of ``meta.json``.

The work is split into fixed chunks of ``chunk_size`` rows (chunk ``c`` is rows ``c*C`` to
``(c+1)*C - 1``, whatever the number of processes). Every process computes its share of a chunk
(:func:`~dino_research.evaluation.features.extract`), the main process writes it to
``OUT/shards/shard_CCCCCC[.layers|.patch_tokens].npy``, each file through a temporary and a rename,
the features file last: a chunk whose features file exists is finished. A killed run restarted with
the same command skips the finished chunks and never encodes them again. A restart with other
settings is refused (the message lists the differences) unless ``OUT`` holds no embeddings yet.
Once every chunk exists they are merged into the arrays above (through memory maps, so patch tokens
larger than memory are fine) and the shards are removed unless ``keep_shards``.

An image that cannot be read is logged, encoded as a blank image, and its rows are NaN in every
array; ``meta.json`` lists them under ``unreadable_rows`` (the neighbour search skips them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import socket
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.datasets import FileList
from ..data.images import UnreadableImageError, load_image
from ..data.unlabeled import list_folder_images
from ..utils import comm
from ..utils.errors import UserError
from .features import _Progress, extract

__all__ = ["EMBEDDINGS_FORMAT", "EmbeddingsError", "TokenEncoder", "extract_embeddings", "file_sha256",
           "list_input_images", "load_embeddings", "read_index"]

logger = logging.getLogger("dino_research")

EMBEDDINGS_FORMAT = "dino_research.embeddings/1"
META, INDEX, SHARDS = "meta.json", "index.csv", "shards"
# Arrays besides features.npy, in the order they are packed after the final [CLS] token.
EXTRA_ARRAYS = ("layers", "patch_tokens")


class EmbeddingsError(UserError):
    """An output folder or input that extraction cannot use; the message names it and the fix."""


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks: what ties an output to the exact weights used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def list_input_images(path: str) -> list[str]:
    """The images of ``--input``: every image under a folder (sorted, hidden names skipped), or the
    paths of a FileList text file in file order. Raises :class:`EmbeddingsError` otherwise."""
    if os.path.isdir(path):
        return list_folder_images(path, what="--input")
    if os.path.isfile(path):
        return [p for p, _ in FileList(list_file=path).samples]
    raise EmbeddingsError(f"--input {path!r}: no such folder or file list")


class TokenEncoder(nn.Module):
    """What one forward pass of ``backbone`` gives per image, in one tensor for ``extract``.

    Images (B, 3, H, W) -> ``backbone(images)`` (B, D) when neither ``layers`` nor ``patch_tokens``
    is asked for; else (B, 1 + L + P, D): the final [CLS], the [CLS] of the last L = ``layers`` blocks
    (the last block last), then the P = h*w patch tokens of the last block. :meth:`split` unpacks.
    ``layers`` and ``patch_tokens`` need a ViT of the BACKBONE contract (an int ``patch_size``,
    ``forward_features`` and ``get_intermediate_layers``).
    """

    def __init__(self, backbone: nn.Module, layers: int = 0, patch_tokens: bool = False):
        super().__init__()
        vit = isinstance(getattr(backbone, "patch_size", None), int) and all(
            callable(getattr(backbone, name, None)) for name in ("forward_features", "get_intermediate_layers"))
        if (layers or patch_tokens) and not vit:
            raise EmbeddingsError(f"--layers and --patch-tokens need a ViT backbone (tokens per block and per "
                                  f"patch); got a {type(backbone).__name__}")
        if layers and not 1 <= layers <= len(backbone.blocks):
            raise EmbeddingsError(f"--layers {layers}: the backbone has {len(backbone.blocks)} blocks")
        self.backbone, self.layers, self.patch_tokens = backbone, int(layers), bool(patch_tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.layers and not self.patch_tokens:
            return self.backbone(images)
        if self.layers:
            outputs = self.backbone.get_intermediate_layers(images, self.layers)
            last, classes = outputs[-1], torch.stack([o[:, 0] for o in outputs], dim=1)
        else:
            last = self.backbone.forward_features(images)
            classes = last[:, :0]
        return torch.cat([last[:, :1], classes, last[:, 1:] if self.patch_tokens else last[:, :0]], dim=1)

    def split(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"features": (B, D), "layers": (B, L, D), "patch_tokens": (B, P, D)}`` (those asked for)."""
        if packed.ndim == 2:
            return {"features": packed}
        out = {"features": packed[:, 0]}
        if self.layers:
            out["layers"] = packed[:, 1:1 + self.layers]
        if self.patch_tokens:
            out["patch_tokens"] = packed[:, 1 + self.layers:]
        return out


class _ImageRows(Dataset):
    """``(transform(image), 0)`` per path, or ``(blank (3, S, S), 1)`` for a file that cannot be read:
    the second item flags it (extract carries it like a label)."""

    def __init__(self, paths: list[str], transform: Callable, image_size: int, exif_transpose: bool):
        self.paths, self.transform, self.size, self.exif = paths, transform, image_size, exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.paths[i], self.exif)), 0
        except UnreadableImageError as e:
            logger.warning("unreadable image, its rows are NaN: %s", e)
            return torch.zeros(3, self.size, self.size), 1


# ---------------------------------------------------------------------------------------- files
def _atomic_write(path: str, write: Callable) -> None:
    """``write(file)`` into a temporary beside ``path``, synced, then renamed over ``path``."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode("utf-8")))


def _write_index(path: str, paths: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quotes a path holding a comma or a quote
    writer.writerow(["row", "path"])
    writer.writerows(enumerate(paths))
    _atomic_write(path, lambda f: f.write(buffer.getvalue().encode("utf-8")))


def read_index(out_dir: str) -> list[str]:
    """The paths of ``out_dir/index.csv``, row ``i`` at position ``i``."""
    with open(os.path.join(out_dir, INDEX), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [path for _, path in rows[1:]]


def _shard_path(out_dir: str, chunk: int, name: str = "features") -> str:
    suffix = "" if name == "features" else f".{name}"
    return os.path.join(out_dir, SHARDS, f"shard_{chunk:06d}{suffix}.npy")


def _rows_of(path: str) -> int:
    """Leading dimension of a .npy file (its header only), -1 when it is missing or unreadable."""
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return -1


def _json_clean(data: dict) -> dict:
    return json.loads(json.dumps(data))  # tuples -> lists: what a meta.json read back compares equal to


def _differences(saved: dict, settings: dict) -> list[str]:
    return [f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now"
            for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]


def _prepare(out_dir: str, input_path: str, settings: dict, chunk_size: int) -> dict:
    """On the main process: check ``out_dir`` against ``settings`` and start or reuse its listing.
    Returns the meta of the run (written to ``meta.json``)."""
    meta_path = os.path.join(out_dir, META)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != EMBEDDINGS_FORMAT:
            raise EmbeddingsError(f"{meta_path} is not a meta file of {EMBEDDINGS_FORMAT}; use another --output")
        differences = _differences(meta.get("settings", {}), settings)
        if differences:
            raise EmbeddingsError(
                f"{out_dir} holds embeddings made with other settings:\n  " + "\n  ".join(differences)
                + f"\nA restart must use the same settings (its finished chunks would not fit the new ones). "
                f"Use another --output, or remove {out_dir} to start over with the new settings.")
        if not os.path.isfile(os.path.join(out_dir, INDEX)):  # its shards would not know their images
            raise EmbeddingsError(f"{out_dir} has a {META} but no {INDEX}; remove {out_dir} to start over")
        logger.info("resuming the extraction in %s (%d images listed in %s)", out_dir, meta["num_images"], INDEX)
        return meta
    if os.path.isdir(os.path.join(out_dir, SHARDS)) or os.path.isfile(os.path.join(out_dir, "features.npy")):
        raise EmbeddingsError(f"{out_dir} holds embeddings but no {META}, so their settings are unknown; use "
                              f"another --output or remove {out_dir}")
    paths = list_input_images(os.path.abspath(input_path))  # absolute: index.csv is read from anywhere
    os.makedirs(os.path.join(out_dir, SHARDS), exist_ok=True)
    _write_index(os.path.join(out_dir, INDEX), paths)
    meta = {"format": EMBEDDINGS_FORMAT, "complete": False, "num_images": len(paths), "chunk_size": chunk_size,
            "num_chunks": -(-len(paths) // chunk_size), "settings": settings}
    _write_json(meta_path, meta)
    logger.info("%d images of %s listed in %s", len(paths), input_path, os.path.join(out_dir, INDEX))
    return meta


def _finished(out_dir: str, chunk: int, rows: int, names: tuple) -> bool:
    return all(_rows_of(_shard_path(out_dir, chunk, name)) == rows for name in names)


def _broadcast(obj):
    """``obj`` of the main process, on every process."""
    if comm.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_embeddings(
    backbone: nn.Module,
    input_path: str,
    out_dir: str,
    *,
    transform: Callable,
    image_size: int,
    settings: dict,
    batch_size: int,
    device: torch.device | str,
    chunk_size: int = 1024,
    layers: int = 0,
    patch_tokens: bool = False,
    normalize: bool = True,
    exif_transpose: bool = True,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    keep_shards: bool = False,
    stop_after_chunks: int | None = None,
    progress: bool = True,
) -> dict:
    """Embed every image of ``input_path`` into ``out_dir`` (layout and resumption: module docstring).

    Every process must call it (each computes its share of every chunk).

    Args:
        backbone: in eval mode, on ``device``; images (B, 3, S, S) -> (B, D).
        input_path: a folder (every image at any depth) or a FileList text file.
        transform: ``PIL.Image -> Tensor (3, S, S)``, S = ``image_size`` (a multiple of the patch size
            for ViTs); normalized as the backbone expects.
        settings: what the result depends on besides the arguments below (weights, architecture,
            resize...), plain JSON values; a restart must pass equal settings.
        chunk_size: rows per shard file: a kill loses at most one chunk of work.
        layers, patch_tokens: also write ``layers.npy`` / ``patch_tokens.npy`` (ViTs only).
        normalize: L2-normalize every feature vector (each row, layer token and patch token).
        stop_after_chunks: return after encoding this many chunks (what a kill leaves; for tests).
        others: as :func:`~dino_research.evaluation.features.extract`.

    Returns ``{"status": "complete" | "stopped", "encoded": [chunks encoded by this call], "skipped":
    [chunks found finished], "meta": the meta.json content}`` on the main process; on the others
    the status and chunk lists only.
    """
    if chunk_size < 1 or batch_size < 1:
        raise EmbeddingsError(f"chunk size and batch size must be >= 1, got {chunk_size} and {batch_size}")
    patch = getattr(backbone, "patch_size", None)
    if isinstance(patch, int) and image_size % patch:
        raise EmbeddingsError(f"--image-size {image_size} is not a multiple of the patch size {patch}")
    encoder = TokenEncoder(backbone, layers, patch_tokens)
    settings = _json_clean({**settings, "input": os.path.abspath(input_path), "image_size": image_size,
                            "layers": layers, "patch_tokens": patch_tokens, "normalize": normalize,
                            "chunk_size": chunk_size, "exif_transpose": exif_transpose})
    error, meta = None, None
    if comm.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        try:
            meta = _prepare(out_dir, input_path, settings, chunk_size)
        except Exception as e:  # noqa: BLE001 - every process must reach the collective below, then all raise
            error = e
    error = _broadcast(error)
    if error is not None:
        raise error
    meta = _broadcast(meta)
    paths = read_index(out_dir)
    names = ("features",) + tuple(n for n, on in zip(EXTRA_ARRAYS, (layers, patch_tokens)) if on)
    chunks = range(meta["num_chunks"])

    def rows(c):
        return range(c * chunk_size, min(len(paths), (c + 1) * chunk_size))

    if meta.get("complete") and all(_rows_of(os.path.join(out_dir, f"{n}.npy")) == len(paths) for n in names):
        logger.info("%s is complete already: %d images", out_dir, len(paths))
        return {"status": "complete", "encoded": [], "skipped": list(chunks), "meta": meta}
    pending = _broadcast([c for c in chunks if not _finished(out_dir, c, len(rows(c)), names)]
                         if comm.is_main_process() else None)
    skipped = [c for c in chunks if c not in set(pending)]
    if skipped:
        logger.info("%d of %d chunks finished already: skipped", len(skipped), len(chunks))
    bar = _Progress(len(pending), f"embedding {len(paths)} images", progress and comm.is_main_process(),
                    unit="chunk", units="chunks")
    encoded = []
    try:
        for c in pending:
            if stop_after_chunks is not None and len(encoded) >= stop_after_chunks:
                return {"status": "stopped", "encoded": encoded, "skipped": skipped, "meta": meta}
            r = rows(c)
            dataset = _ImageRows(paths[r.start:r.stop], transform, image_size, exif_transpose)
            (packed,), unreadable = extract([encoder], dataset, batch_size=batch_size, device=device,
                                            num_workers=num_workers, amp_dtype=amp_dtype, progress=False)
            if comm.is_main_process():
                _write_chunk(out_dir, c, encoder.split(packed), unreadable.bool(), normalize)
            comm.synchronize()  # a chunk is finished for everyone once its files exist
            encoded.append(c)
            bar.update()
    finally:
        bar.close()
    if comm.is_main_process():
        meta = _merge(out_dir, meta, names, [rows(c) for c in chunks], encoder, image_size, keep_shards)
    comm.synchronize()
    return {"status": "complete", "encoded": encoded, "skipped": skipped, "meta": meta}


def _write_chunk(out_dir: str, chunk: int, arrays: dict, unreadable: torch.Tensor, normalize: bool) -> None:
    """Write one chunk's arrays, the features file last (its presence marks the chunk finished)."""
    for name in EXTRA_ARRAYS + ("features",):
        if name not in arrays:
            continue
        values = F.normalize(arrays[name], dim=-1) if normalize else arrays[name]
        values = values.float().clone()
        values[unreadable] = float("nan")
        array = values.numpy()
        _atomic_write(_shard_path(out_dir, chunk, name), lambda f, a=array: np.save(f, a))


def _merge(out_dir: str, meta: dict, names: tuple, chunk_rows: list, encoder: TokenEncoder, image_size: int,
           keep_shards: bool) -> dict:
    """Concatenate the shards into ``OUT/<name>.npy`` through memory maps; mark ``meta.json`` complete."""
    num_images = meta["num_images"]
    shapes = {}
    for name in names:
        first = np.load(_shard_path(out_dir, 0, name), mmap_mode="r")
        shape = (num_images, *first.shape[1:])
        final = os.path.join(out_dir, f"{name}.npy")
        tmp = f"{final}.tmp.{socket.gethostname()}.{os.getpid()}"
        try:
            merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for c, r in enumerate(chunk_rows):
                merged[r.start:r.stop] = np.load(_shard_path(out_dir, c, name), mmap_mode="r")
            merged.flush()
            del merged
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        shapes[name] = list(shape)
    # An unreadable image's rows are all NaN: one column of the memory map finds them.
    features = np.load(os.path.join(out_dir, "features.npy"), mmap_mode="r")
    unreadable = np.flatnonzero(np.isnan(features[:, 0])).tolist()
    backbone = encoder.backbone
    patch = getattr(backbone, "patch_size", None)
    meta = {**meta, "complete": True, "arrays": shapes, "unreadable_rows": unreadable,
            "embed_dim": int(shapes["features"][1]),
            "patch_grid": [image_size // patch] * 2 if isinstance(patch, int) else None}
    _write_json(os.path.join(out_dir, META), meta)
    if unreadable:
        logger.warning("%d unreadable image(s); their rows are NaN (meta.json: unreadable_rows)", len(unreadable))
    if not keep_shards:
        for c in range(len(chunk_rows)):
            for name in names:
                os.remove(_shard_path(out_dir, c, name))
        try:
            os.rmdir(os.path.join(out_dir, SHARDS))
        except OSError:  # something else in there: leave it
            pass
    logger.info("embeddings of %d images written to %s: %s", num_images, out_dir,
                ", ".join(f"{n}.npy {tuple(s)}" for n, s in shapes.items()))
    return meta


def load_embeddings(out_dir: str) -> tuple[np.ndarray, list[str], dict]:
    """``(features (N, D) float32 memory map, paths (N,), meta)`` of a complete extraction in ``out_dir``.

    Raises :class:`EmbeddingsError` when the folder holds no complete extraction."""
    meta_path = os.path.join(out_dir, META)
    if not os.path.isfile(meta_path):
        raise EmbeddingsError(f"{out_dir} holds no embeddings (no meta.json): write them with "
                              f"tools/extract_features.py --output {out_dir}")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if not meta.get("complete") or not os.path.isfile(os.path.join(out_dir, "features.npy")):
        raise EmbeddingsError(f"the extraction in {out_dir} is not finished: run the same "
                              f"tools/extract_features.py command again to complete it")
    features = np.load(os.path.join(out_dir, "features.npy"), mmap_mode="r")
    paths = read_index(out_dir)
    if features.shape[0] != len(paths):
        raise EmbeddingsError(f"{out_dir}: features.npy has {features.shape[0]} rows, index.csv {len(paths)}")
    return features, paths, meta
