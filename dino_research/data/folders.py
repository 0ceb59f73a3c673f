"""Walking image folders: which names are images, and the recursive listing ImageFolder labels.

Paths are local paths or iopath URIs, read through ``g_pathmgr``. Listings are sorted by name at every
level and skip hidden entries (names starting with "."), so they are the same on every machine.

Symbolic links are followed, but on local disks each real directory is walked at most once (see
:func:`list_images`): a link loop such as ``cat/up -> ..`` or two links to one folder cannot multiply
the dataset.
"""

from __future__ import annotations

import logging
import os

from iopath.common.file_io import g_pathmgr

__all__ = ["IMAGE_EXTENSIONS", "is_image_name", "join", "list_images", "real_dir_key"]

logger = logging.getLogger("dino_research")

# File extensions taken as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Links skipped by one list_images call that are named in its warning (the count is always given).
_SKIPPED_SHOWN = 3


def is_image_name(name: str) -> bool:
    """Whether ``name`` ends with one of :data:`IMAGE_EXTENSIONS`, in any case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def join(folder: str, name: str) -> str:
    """``folder/name``: ``os.path.join`` for local paths, a plain "/" join for URIs."""
    return folder.rstrip("/") + "/" + name if "://" in folder else os.path.join(folder, name)


def real_dir_key(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the real directory ``path`` leads to (links followed), the identity a
    walk compares; None for an iopath URI (not a local file) or a path that cannot be stat-ed."""
    if "://" in path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def list_images(folder: str, visited: set | None = None) -> list[str]:
    """Image files under ``folder``, recursively, sorted by name at every level; hidden entries skipped.

    A name with an image extension is taken as a file without a stat call (listing ImageNet costs
    one ``ls`` per folder, not 1.28M stats); only other names are checked for being folders.

    Links: a symbolic link to a folder or to a file is listed like a real one, but **each real local
    directory is walked once**. A sub-folder whose real directory (:func:`real_dir_key`) was already
    walked or is in ``visited`` is skipped, with one warning per call naming the skipped links: a loop
    (``a -> ..``) ends there, and of two links to the same folder only the first in sorted order is
    walked. Files are not deduplicated: two names (links or copies) of one file are two samples.
    Folders of iopath URIs that are not local are walked as they come (no identity to compare).

    Args:
        folder: the folder to walk; walked even when its own key is already in ``visited``.
        visited: keys of real directories not to walk again, shared between calls (ImageFolder puts its
            root and every class folder in it first, so a link from one class into another class's
            folder is not followed); updated in place. None: a fresh set.
    """
    visited = set() if visited is None else visited
    key = real_dir_key(folder)
    if key is not None:
        visited.add(key)
    found, skipped = [], []
    _walk(folder, visited, found, skipped)
    if skipped:
        shown = ", ".join(f"{link!r} -> {os.path.realpath(link)!r}" for link in skipped[:_SKIPPED_SHOWN])
        logger.warning(
            "%s: skipped %d link(s) to folders already walked (a link loop, or a second link to the same "
            "folder; each real folder is read once): %s%s", folder, len(skipped), shown,
            " ..." if len(skipped) > _SKIPPED_SHOWN else "")
    return found


def _walk(folder: str, visited: set, found: list, skipped: list) -> None:
    for name in sorted(g_pathmgr.ls(folder)):
        if name.startswith("."):
            continue
        path = join(folder, name)
        if is_image_name(name):
            found.append(path)
        elif g_pathmgr.isdir(path):
            key = real_dir_key(path)
            if key is not None:
                if key in visited:
                    skipped.append(path)
                    continue
                visited.add(key)
            _walk(path, visited, found, skipped)
