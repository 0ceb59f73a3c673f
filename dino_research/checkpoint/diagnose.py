"""The diagnoses behind checkpoint errors: what a file is, why a write failed, where weights do not fit.

A file that does not load is described by what it *is*, read from its first bytes and never executed
(a truncated torch archive, a git-lfs pointer, an HTML login page saved by a download...); a failed
write by its cause (a full disk, a file-size limit), whatever exception ``torch.save`` turned the
``OSError`` into. These functions return descriptions; ``checkpointer.py`` raises the errors.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickletools
import re
import resource
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

# Names of files this library writes; a folder holding them is a run's OUTPUT_DIR.
_OWN_NAMES = ("last_checkpoint.pth", "teacher_backbone.pth")
# Endings of files that usually hold weights (torch, Lightning, Hugging Face, safetensors).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin", ".safetensors")
_HEAD_BYTES = 4096
# The legacy (before torch 1.6) torch.save format starts with a protocol-2 pickle of this number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# Globals that weights_only loading accepts: they are not "objects" worth naming to the user.
_PLAIN_GLOBALS = ("collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                  "builtins.bytearray", "builtins.slice", "builtins.complex")
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
               "STRING")
# A file system with less than this left is full for a checkpoint, whatever the estimate of its size.
_FULL_MARGIN = 2**20


@dataclass(frozen=True)
class FileKind:
    """What :func:`describe_file` found: ``name`` ("torch-zip-truncated", "git-lfs-pointer", "html", ...),
    ``description`` (completes "PATH is ...", with the fix), ``pickle_objects`` (a torch file whose pickle
    parses to its end) and then ``objects``, the globals it imports beyond tensors and containers."""

    name: str
    description: str
    pickle_objects: bool = False
    objects: tuple = ()


def checkpoint_like_files(folder: str) -> list[str]:
    """Paths of the files of ``folder`` that look like weights (:data:`CHECKPOINT_SUFFIXES`).

    Ordered as a user most likely meant them: ``last_checkpoint.pth``, ``teacher_backbone.pth``,
    the numbered snapshots newest first, then the others by name. Temporaries of a write are left out.
    """
    try:
        names = [n for n in os.listdir(folder) if n.endswith(CHECKPOINT_SUFFIXES) and ".tmp." not in n
                 and os.path.isfile(os.path.join(folder, n))]
    except OSError:
        return []

    def rank(name: str) -> tuple:
        snapshot = re.fullmatch(r"checkpoint_(\d+)\.pth", name)
        if name in _OWN_NAMES:
            return (0, _OWN_NAMES.index(name), name)
        return (1, -int(snapshot.group(1)), name) if snapshot else (2, 0, name)

    return [os.path.join(folder, n) for n in sorted(names, key=rank)]


def _one_of(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else ", ".join(paths[:-1]) + " or " + paths[-1]


def describe_directory(path: str) -> str:
    """"a directory; did you mean DIR/last_checkpoint.pth or DIR/teacher_backbone.pth?" (or that it holds none)."""
    found = checkpoint_like_files(path)
    if not found:
        return (f"a directory, not a weights file, and it holds no file ending in {', '.join(CHECKPOINT_SUFFIXES)}: "
                f"give the path of the weights file itself")
    more = f" (it holds {len(found)} such files)" if len(found) > 4 else ""
    return f"a directory, not a weights file; did you mean {_one_of(found[:4])}?{more}"


def describe_file(path: str) -> FileKind:
    """Say what ``path`` holds, from its type and first bytes; nothing in it is executed.

    Recognised: missing (and broken symbolic links), directory, empty, torch zip archive (complete,
    truncated, or damaged inside), other zip archives (NumPy ``.npz``, TorchScript), legacy torch
    file, plain Python pickle, safetensors, NumPy ``.npy``, gzip, tar, git-lfs pointer, HTML, XML,
    JSON, plain text; anything else is "binary data of no known format".
    """
    if not os.path.exists(path):
        if os.path.islink(path):
            return FileKind("missing", f"a broken symbolic link to {os.readlink(path)}")
        return FileKind("missing", "not there: no such file or directory")
    if os.path.isdir(path):
        return FileKind("directory", describe_directory(path))
    size = os.path.getsize(path)
    if size == 0:
        return FileKind("empty", "an empty file (0 bytes): a write, copy or download that never got going")
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith(b"PK\x03\x04"):
        return _describe_zip(path, size)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return _describe_legacy_torch(path, size)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return FileKind("pickle", f"a Python pickle (protocol {head[1]}) written by pickle.dump or similar, not by "
                                  f"torch.save: load it with pickle, only if you trust it, and torch.save its tensors")
    if head.startswith(b"\x93NUMPY"):
        return FileKind("npy", "a NumPy .npy array, not a torch file: read it with numpy.load and torch.save the "
                               "tensors you need")
    if head.startswith(b"\x1f\x8b"):
        return FileKind("gzip", "a gzip-compressed file: decompress it (gunzip, or tar xzf for a .tar.gz) and give "
                                "the file inside")
    if len(head) > 262 and head[257:262] == b"ustar":
        return FileKind("tar", "a tar archive: extract it (tar xf) and give the file inside")
    length = _safetensors_header_length(head)
    if length is not None:
        return _describe_safetensors(path, length, size)
    return _describe_text(path, head, size)


def _describe_zip(path: str, size: int) -> FileKind:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if not pickles:
                names = [i.filename for i in infos]
                if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
                    return FileKind("torchscript", "a TorchScript archive (torch.jit.save), not a state dict: "
                                                   "torch.jit.load it and torch.save its state_dict()")
                if names and all(n.endswith(".npy") for n in names):
                    return FileKind("npz", f"a NumPy .npz archive ({', '.join(names[:5])}), not a torch file: "
                                           f"read it with numpy.load and torch.save the tensors you need")
                return FileKind("zip", f"a zip archive that is not a torch file (members: {', '.join(names[:5])}): "
                                       f"extract the weights file from it")
            if pickles[0].file_size > 256 * 2**20:
                return FileKind("torch-zip", "a torch.save archive", pickle_objects=True)
            stream = archive.read(pickles[0])
    except zipfile.BadZipFile:
        return FileKind("torch-zip-truncated",
                        f"a zip archive (torch's format) cut short after {size} bytes, truncated or corrupt: an "
                        f"interrupted write, copy or download; use another copy")
    except (zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError) as e:  # e.g. a member's CRC
        return FileKind("torch-zip-damaged", f"a torch.save archive whose content is damaged ({e}): use another copy")
    found = _pickle_globals(stream)
    if found is None:
        return FileKind("torch-zip-damaged", "a torch.save archive whose pickle is damaged: use another copy")
    return FileKind("torch-zip", "a torch.save archive", pickle_objects=True, objects=_objects(found))


def _describe_legacy_torch(path: str, size: int) -> FileKind:
    # Four pickles in a row (magic number, protocol, system info, the object), then raw tensor bytes.
    with open(path, "rb") as f:
        found = []
        for _ in range(4):
            names = _pickle_globals(f)
            if names is None:
                return FileKind("torch-legacy-truncated",
                                f"a torch.save file of the legacy format (before torch 1.6) cut short after {size} "
                                f"bytes, truncated or corrupt: use another copy")
            found += names
    return FileKind("torch-legacy", "a torch.save file of the legacy format (before torch 1.6)",
                    pickle_objects=True, objects=_objects(found))


def _pickle_globals(stream) -> Optional[list[str]]:
    """Dotted names of the globals a pickle imports, or None when it does not parse to its STOP.

    ``stream``: bytes or a binary file. Only parsed (``pickletools.genops``), never run; STACK_GLOBAL
    names are found by following the strings pushed and memoized before it.
    """
    names, pushed, memo = [], [], {}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(f"{pushed[-2] if len(pushed) > 1 else '?'}.{pushed[-1] if pushed else '?'}")
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.stack_after:
                pushed.append(arg if op.name in _STRING_OPS else None)
    except Exception:  # noqa: BLE001 - any parse failure means "not a valid pickle"
        return None
    return names


def _objects(names: list[str]) -> tuple:
    return tuple(dict.fromkeys(n for n in names if not n.startswith("torch") and n not in _PLAIN_GLOBALS))


def is_safetensors(path: str) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte header length, then a JSON object)."""
    with open(path, "rb") as f:
        return _safetensors_header_length(f.read(9)) is not None


def _safetensors_header_length(head: bytes) -> Optional[int]:
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    return length if 2 <= length <= 100 * 2**20 else None


def _describe_safetensors(path: str, length: int, size: int) -> FileKind:
    try:  # the JSON header gives each tensor's byte range: the file's full size
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(length))
        needed = 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return FileKind("safetensors", f"a safetensors file whose header is damaged or cut short ({size} bytes): use "
                                       f"another copy")
    state = f"cut short: {size} of its {needed} bytes" if size < needed else "damaged data"
    return FileKind("safetensors", f"a safetensors file that does not load ({state}): use another copy")


def _describe_text(path: str, head: bytes, size: int) -> FileKind:
    if head.startswith(_LFS_POINTER):
        real = next((line.split()[1] for line in head.decode("ascii", "replace").splitlines()
                     if line.startswith("size ") and len(line.split()) == 2), "?")
        return FileKind("git-lfs-pointer",
                        f"a git-lfs pointer, not the file ({size} bytes standing for {real} bytes): run `git lfs pull` "
                        f"in the repository it came from (git lfs install first, if needed)")
    text = _as_text(head)
    if text is None:
        return FileKind("unknown", f"binary data of no known format ({size} bytes, first bytes "
                                   f"{head[:12].hex(' ')}): not a torch file")
    start = text.lstrip("\ufeff \t\r\n")
    lowered = start[:1024].lower()
    if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered or "<body" in lowered:
        return FileKind("html", "an HTML page, not weights: the download saved an error or login page (open it in a "
                                "browser to see which), fetch the file again with the right URL or credentials")
    if lowered.startswith("<?xml"):
        return FileKind("xml", "an XML document, not weights: the download saved an error reply (cloud storage says "
                               "e.g. AccessDenied or NoSuchKey this way); fetch the file again")
    if start[:1] in ("{", "[") and size <= 2**20:
        try:
            with open(path, "rb") as f:
                value = json.loads(f.read().decode("utf-8"))
            detail = f"keys {list(value)[:5]}" if isinstance(value, dict) else f"a list of {len(value)} items"
            return FileKind("json", f"a JSON document ({detail}), not weights: a config or an error reply saved "
                                    f"in place of the file")
        except (ValueError, TypeError):  # not JSON after all: plain text
            pass
    first = start.splitlines()[0] if start.splitlines() else ""
    return FileKind("text", f"plain text, not weights ({size} bytes, first line {first[:60]!r})")


def _as_text(head: bytes) -> Optional[str]:
    if b"\0" in head:
        return None
    for cut in range(4):  # the read may have split a multi-byte character
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def output_problem(output: str, inputs) -> Optional[str]:
    """Why a tool must not write ``output``, or None: it is one of ``inputs`` (the same path, or the
    same file through a symbolic or hard link), a directory, or below a file instead of a folder."""
    if os.path.isdir(output):
        return f"output {output} is a directory: give a file name, e.g. {os.path.join(output, 'OUT.pth')}"
    for source in inputs:
        same_path = os.path.realpath(source) == os.path.realpath(output)
        if same_path or (os.path.exists(source) and os.path.exists(output) and os.path.samefile(source, output)):
            how = (" through a symbolic link" if os.path.islink(output) or os.path.islink(source)
                   else "" if same_path else " through a hard link")
            return (f"output {output} is the input {source} (the same file{how}): writing it would destroy the "
                    f"input; give another output file")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):  # the nearest existing ancestor must be a folder
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"cannot write {output}: {parent} is a file, not a folder"


# ---------------------------------------------------------------------------------------------------
# Write failures
# ---------------------------------------------------------------------------------------------------
def payload_bytes(obj: Any) -> int:
    """Bytes of tensor data in a nested structure (each storage once): a lower bound of its file size."""
    storages = {}

    def visit(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            try:
                storages[node.untyped_storage().data_ptr()] = node.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
                storages[id(node)] = node.element_size() * node.numel()
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ():
            visit(child)

    visit(obj)
    return sum(storages.values())


def _error_codes(error: BaseException) -> set:
    """errno values of ``error`` and of the exceptions it was raised from or while handling.

    torch.save writing to a Python file turns the file's ``OSError`` into
    ``RuntimeError("... unexpected pos ...")``; the ``OSError`` survives as its ``__context__``.
    """
    codes, seen = set(), set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            codes.add(error.errno)
        error = error.__cause__ or error.__context__
    return codes


def write_failure(error: BaseException, written: int, needed: int, free: int) -> Optional[tuple[str, str]]:
    """``(reason, fix)`` when a write failed for lack of room, else None (another fault).

    ``error`` is what the write raised (any type), ``written`` the bytes the partial file reached,
    ``needed`` a lower bound of the file's size (:func:`payload_bytes`), ``free`` the bytes free in its
    folder while the partial file is still there. Recognised: the file-size limit (RLIMIT_FSIZE,
    ``ulimit -f``; a process ignoring SIGXFSZ, as Python does, gets EFBIG instead of being killed),
    EFBIG of a file system, a full disk or quota (ENOSPC, EDQUOT, or no room for the rest of the file).
    """
    codes = _error_codes(error)
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and (written >= soft or needed > soft):
        return (f"the file reached this process's file-size limit (RLIMIT_FSIZE, `ulimit -f`) of {_mb(soft)} MB",
                "Raise the limit (`ulimit -f unlimited` in the shell or job script that starts the run; a scheduler "
                "may set it) or move OUTPUT_DIR to where no such limit applies")
    if errno.EFBIG in codes:
        return (f"{os.strerror(errno.EFBIG)}: the file system takes no file this large (FAT32: 4 GB)",
                "Move OUTPUT_DIR to a file system that takes large files (ext4, xfs, NFS)")
    full = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT) if code in codes]
    if full or free < max(needed - written, 0) + _FULL_MARGIN:
        reason = full[0] if full else f"the file system is full ({loader_reason(error)})"
        return reason, ("Free space there (old checkpoint_*.pth snapshots can go; SOLVER.SNAPSHOT_EPOCHS writes "
                        "fewer) or move OUTPUT_DIR")
    return None


def loader_reason(error: BaseException) -> str:
    """``"Type: the informative sentence"`` of an exception (torch's weights_only text is paragraphs long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    first = text.splitlines()[0] if text else ""
    if len(first) > 160:  # cut at a sentence end when there is one
        first = first[: first.rfind(". ", 40, 160) + 1 or 160]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _mb(n_bytes: int) -> int:
    return round(n_bytes / 2**20)


# ---------------------------------------------------------------------------------------------------
# Weights that do not fit a module
# ---------------------------------------------------------------------------------------------------
def fit_problem(own: dict, state: dict, source: str, what: str, partial: bool, check: str,
                fix: str = "") -> Optional[str]:
    """Why ``state`` (a file's weights) does not fit ``own`` (a module's state dict), or None when it does.

    Shapes must always fit, and at least one key must be shared (the message says to ``check`` the
    config). Missing and unexpected keys are a problem naming them and a different block count, ending
    with ``fix``; with ``partial`` they are all logged instead and None is returned.
    """
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(getattr(v, "shape", ())) != tuple(own[k].shape)]
    if bad:
        return (f"{source}: {what} weights do not fit the model ({'; '.join(bad[:5])}"
                f"{f'; {len(bad) - 5} more' if len(bad) > 5 else ''}). Check {check}.")
    if not set(state) & set(own):
        return (f"{source}: none of its {len(state)} keys (e.g. {list(state)[:3]}) is a key of the {what} (e.g. "
                f"{list(own)[:3]}). Check {check}.")
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if not missing and not unexpected:
        return None
    if partial:
        logger.warning("%s: %s loaded partly (MODEL.WEIGHTS_PARTIAL True): %d missing keys keep their initialization: "
                       "%s; %d unexpected keys of the file are not used: %s", source, what, len(missing),
                       ", ".join(missing) or "none", len(unexpected), ", ".join(unexpected) or "none")
        return None
    keys = ([f"{len(missing)} missing keys (in the model, not in the file) {key_list(missing)}"] if missing else []) + (
        [f"{len(unexpected)} unexpected keys (in the file, not in the model) {key_list(unexpected)}"] if unexpected
        else [])
    return (f"{source}: {what} weights fit the model only partly: {', '.join(keys)}{_depth_hint(own, state)}. "
            f"Check {check}" + (f", {fix}" if fix else "") + ".")


def key_list(keys: list, shown: int = 8) -> str:
    """The first ``shown`` keys, and how many more."""
    return f"{keys[:shown]}" + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _depth_hint(own: dict, state: dict) -> str:
    """"; the file has 12 transformer blocks, the model 4 (...)" when they count ``blocks.N`` differently, else ""."""
    theirs, ours = ({m.group(1) for m in map(_BLOCK.search, keys) if m} for keys in (state, own))
    if theirs == ours or not theirs or not ours:
        return ""
    return (f"; the file has {len(theirs)} transformer blocks, the model {len(ours)} (MODEL.BACKBONE.DEPTH; 0 keeps "
            f"the architecture's 12)")
