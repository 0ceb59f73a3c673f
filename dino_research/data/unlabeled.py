"""``UnlabeledFolder``: every image under a folder, any layout, with its listing cached.

Self-supervised pretraining needs no classes, so the images of one's own collection can lie in any
tree: flat, nested by date or camera, mixed. The walk is :func:`~dino_research.data.folders.list_images`
(sorted at every level, hidden entries such as ``.DS_Store`` and ``._x.jpg`` skipped, extensions
compared in any case, links followed with each real folder read once, so a link loop ends).

Walking millions of files takes minutes on a network file system, and a restarted run must see
the same images in the same order (the sampler's position means nothing otherwise). So the listing
is written once to ``OUTPUT_DIR/file_list_<hash>.txt`` and read back by every later build:

* **The cache is used** when it exists, records the same root (absolute path) and the same
  ``DATASETS.REFRESH_FILE_LIST`` value, and holds the number of paths its header announces.
* **It is rebuilt** (the root walked again and the file rewritten) otherwise: no cache, another root
  (the hash in the name is of the root; a second root gets its own file), a changed
  ``DATASETS.REFRESH_FILE_LIST`` (raise it to pick up added or removed images), or a damaged file.
* Files added under the root after the listing are *not* seen until a rebuild; a listed file that
  was removed is read like any unreadable image (skipped and counted by the pretraining loader, or
  an error with ``DATALOADER.STRICT``).

The cache is a text file: four ``# key: value`` header lines, then one path per line relative to the
root. It is written atomically (temporary file, then rename), so processes building the dataset at
once never read half a file. A listing that cannot be written (read-only ``OUTPUT_DIR``) is only
logged: the dataset still works, walking again next time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from typing import Callable

from iopath.common.file_io import g_pathmgr

from ..config import configurable
from .build import DATASET_REGISTRY, DatasetError
from .datasets import ImageFiles
from .folders import IMAGE_EXTENSIONS, join, list_images

__all__ = ["UnlabeledFolder", "file_list_path", "list_folder_images"]

logger = logging.getLogger("dino_research")

# First line of a cached listing: names the format, so another file of that name is never read as one.
_CACHE_MAGIC = "# dino_research UnlabeledFolder file list v1"


def _root_key(root: str) -> str:
    """The root as the cache records it: the absolute path of a local folder, an iopath URI as given."""
    return root if "://" in root else os.path.abspath(root)


def file_list_path(cache_dir: str, root: str) -> str:
    """``cache_dir/file_list_<first 16 hex digits of sha1(absolute root)>.txt``."""
    digest = hashlib.sha1(_root_key(root).encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"file_list_{digest}.txt")


def list_folder_images(root: str, what: str = "UnlabeledFolder") -> list[str]:
    """Every image under ``root`` (:func:`~dino_research.data.folders.list_images`), in sorted order.

    Raises :class:`DatasetError` naming ``root`` when it is missing, not a folder, or holds no image;
    ``what`` names the caller in the message."""
    expected = f"expected a folder with images ({', '.join(IMAGE_EXTENSIONS)}, any case) at any depth"
    if not g_pathmgr.exists(root):
        raise DatasetError(f"{what}: root {root!r} does not exist; {expected}")
    if not g_pathmgr.isdir(root):
        raise DatasetError(f"{what}: root {root!r} is not a folder; {expected}")
    paths = list_images(root)
    if not paths:
        raise DatasetError(f"{what}: root {root!r} holds no image file; {expected} (names starting with "
                           f"'.' are skipped)")
    return paths


def _read_cache(path: str, root: str, refresh: int) -> list[str] | None:
    """The paths of a valid cache at ``path`` for ``root`` and ``refresh``, else None (with the reason
    logged when a file was there)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("UnlabeledFolder: cannot read the cached file list %s (%s); walking %s again", path, e, root)
        return None
    header = dict(line[2:].split(": ", 1) for line in lines[1:4] if line.startswith("# ") and ": " in line)
    body = [line for line in lines[4:] if line]
    if lines[0] != _CACHE_MAGIC or header.get("root") != _root_key(root):
        reason = "another format" if lines[0] != _CACHE_MAGIC else f"root {header.get('root')!r}"
        logger.info("UnlabeledFolder: %s lists %s; walking %s again", path, reason, root)
        return None
    if header.get("refresh") != str(refresh):
        logger.info("UnlabeledFolder: DATASETS.REFRESH_FILE_LIST is %s, the cached list %s was made with %s: "
                    "walking %s again", refresh, path, header.get("refresh"), root)
        return None
    if header.get("count") != str(len(body)):
        logger.warning("UnlabeledFolder: %s announces %s paths but holds %d (damaged); walking %s again",
                       path, header.get("count"), len(body), root)
        return None
    return [join(root, rel) for rel in body]


def _write_cache(path: str, root: str, refresh: int, paths: list[str]) -> None:
    """Write the listing atomically; a failure (read-only folder, a name with a newline) is logged."""
    prefix = join(root, "")
    rels = [p[len(prefix):] for p in paths]
    if any("\n" in rel or "\r" in rel for rel in rels):
        logger.warning("UnlabeledFolder: a file name under %s contains a line break; the listing is not cached "
                       "(the folder is walked at every start)", root)
        return
    text = "\n".join([_CACHE_MAGIC, f"# root: {_root_key(root)}", f"# refresh: {refresh}", f"# count: {len(rels)}",
                      *rels]) + "\n"
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # one per writer: ranks may write at once
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("UnlabeledFolder: cannot cache the file list of %s at %s (%s); it will be walked again "
                       "at the next start", root, path, e)
        if os.path.exists(tmp):
            os.remove(tmp)
        return
    logger.info("UnlabeledFolder: %d images of %s listed in %s", len(paths), root, path)


@DATASET_REGISTRY.register()
class UnlabeledFolder(ImageFiles):
    """Every image file under ``root``, recursively, in any layout; label -1.

    Order: sorted by name at every level (the same on every machine). Hidden entries are skipped,
    extensions match in any case, links are followed and each real folder is read once (see the
    module docstring for the walk and the cache). A file that cannot be read, or that was listed
    and has since vanished, raises :class:`~dino_research.data.images.UnreadableImageError` when
    read, as in :class:`~dino_research.data.datasets.ImageFolder`: the pretraining loader skips it.

    Args:
        root: the folder, local path or iopath URI.
        transform: applied to each RGB ``PIL.Image``; None returns the image.
        exif_transpose: turn images upright by their EXIF orientation (``INPUT.EXIF_TRANSPOSE``).
        cache_dir: where the listing is cached (``OUTPUT_DIR``); "" or None: never cached.
        refresh: ``DATASETS.REFRESH_FILE_LIST``; a cache made with another value is rebuilt.

    Attributes:
        samples (list[tuple[str, int]]): ``(path, -1)`` of every image.
        cache_file (str | None): the listing file used or written.
    """

    @configurable
    def __init__(self, *, root: str, transform: Callable | None = None, exif_transpose: bool = True,
                 cache_dir: str | None = None, refresh: int = 0):
        cache_file = file_list_path(cache_dir, root) if cache_dir else None
        paths = _read_cache(cache_file, root, refresh) if cache_file else None
        if paths is None:
            paths = list_folder_images(root)
            if cache_file:
                _write_cache(cache_file, root, refresh, paths)
        else:
            logger.info("UnlabeledFolder: %d images of %s read from the cached list %s (raise "
                        "DATASETS.REFRESH_FILE_LIST to walk the folder again)", len(paths), root, cache_file)
        self.root = root
        self.transform = transform
        self.exif_transpose = exif_transpose
        self.cache_file = cache_file
        self.samples = [(path, -1) for path in paths]
        self.targets = [-1] * len(paths)

    @classmethod
    def from_config(cls, cfg, root: str, train: bool = True, transform: Callable | None = None) -> dict:
        return {"root": root, "transform": transform, "exif_transpose": cfg.INPUT.EXIF_TRANSPOSE,
                "cache_dir": cfg.OUTPUT_DIR, "refresh": cfg.DATASETS.REFRESH_FILE_LIST}

    def __repr__(self) -> str:
        return f"UnlabeledFolder(root={self.root!r}, images={len(self)})"
