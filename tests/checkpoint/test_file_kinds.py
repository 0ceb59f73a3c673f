"""Files that are not checkpoints: each is described by what it is, and only a real pickle of objects
is advised to be converted with --trust-pickle."""

import argparse
import gzip
import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from dino_research.checkpoint import CheckpointError, describe_file, load_file, load_pretrained
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import build_model


def _torch_bytes(obj, legacy=False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((2, 3), dtype=np.float32))
    return buffer.getvalue()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, weight=np.ones(3))
    return buffer.getvalue()


def _safetensors(truncate=False) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 256
    return data[:100] if truncate else data


def _plain_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("weights/README.txt", "the weights are in the other archive")
    return buffer.getvalue()


_TORCH = _torch_bytes({"w": torch.ones(1000)})
# (id, bytes written for real to a .pth file, FileKind.name, words the load_file error must contain)
KINDS = [
    ("empty", b"", "empty", "an empty file (0 bytes)"),
    ("text", b"weights are on the shared drive\n", "text", "plain text, not weights (32 bytes, first line "
                                                           "'weights are on the shared drive')"),
    ("html", b"<!DOCTYPE html>\n<html><head><title>Sign in - Drive</title></head><body>...</body></html>", "html",
     "an HTML page, not weights: the download saved an error or login page"),
    ("xml", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>', "xml",
     "an XML document, not weights: the download saved an error reply"),
    ("json", json.dumps({"detail": "Not Found"}).encode(), "json", "a JSON document (keys ['detail']), not weights"),
    ("git-lfs-pointer", b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 88766233\n",
     "git-lfs-pointer", "a git-lfs pointer, not the file (133 bytes standing for 88766233 bytes): run `git lfs pull`"),
    ("truncated-zip", _TORCH[: len(_TORCH) // 2], "torch-zip-truncated",
     "a zip archive (torch's format) cut short after 2"),
    ("truncated-legacy", _torch_bytes({"w": torch.ones(3)}, legacy=True)[:40], "torch-legacy-truncated",
     "a torch.save file of the legacy format (before torch 1.6) cut short after 40 bytes"),
    ("plain-pickle", pickle.dumps({"w": np.ones(2)}, protocol=4), "pickle",
     "a Python pickle (protocol 4) written by pickle.dump or similar, not by torch.save"),
    ("npy", _npy(), "npy", "a NumPy .npy array, not a torch file"),
    ("npz", _npz(), "npz", "a NumPy .npz archive (weight.npy), not a torch file"),
    ("zip", _plain_zip(), "zip", "a zip archive that is not a torch file (members: weights/README.txt)"),
    ("truncated-safetensors", _safetensors(truncate=True), "safetensors", "a safetensors file that does not load "
                                                                         "(cut short: 100 of its 328 bytes)"),
    ("gzip", gzip.compress(_TORCH), "gzip", "a gzip-compressed file: decompress it"),
    ("binary", bytes(range(7, 200)), "unknown", "binary data of no known format (193 bytes, first bytes 07 08 09"),
]


@pytest.mark.parametrize("data, name, words", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_an_unreadable_file_is_described_by_what_it_is(tmp_path, data, name, words):
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    assert describe_file(str(path)).name == name
    with pytest.raises(CheckpointError) as error:
        load_file(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} is not a readable checkpoint: it is ") and words in message, message
    assert "--trust-pickle" not in message and "pickled Python objects" not in message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_only_a_real_pickle_of_objects_is_advised_to_be_converted(tmp_path, legacy):
    path = tmp_path / "official.pth"
    path.write_bytes(_torch_bytes({"args": argparse.Namespace(arch="vit_small"), "w": torch.ones(2)}, legacy=legacy))
    kind = describe_file(str(path))
    assert kind.pickle_objects and kind.objects == ("argparse.Namespace",)
    with pytest.raises(CheckpointError, match=r"official.pth contains pickled Python objects \(argparse.Namespace\), "
                                              r"which are refused.*convert_checkpoint.py --trust-pickle"):
        load_file(str(path))
    path.write_bytes(_torch_bytes({"w": torch.ones(2)}, legacy=legacy))  # the same without objects simply loads
    assert describe_file(str(path)).objects == () and torch.equal(load_file(str(path))["w"], torch.ones(2))


def test_a_directory_is_named_with_the_checkpoints_inside(tmp_path, make_tiny_cfg):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint_0002.pth", "checkpoint_0010.pth", "teacher_backbone.pth", "last_checkpoint.pth",
                 "last_checkpoint.pth.tmp.77", "notes.txt"):
        (run / name).write_bytes(b"x")
    expected = (f"{run} is a directory, not a weights file; did you mean {run}/last_checkpoint.pth, "
                f"{run}/teacher_backbone.pth, {run}/checkpoint_0010.pth or {run}/checkpoint_0002.pth?")
    with pytest.raises(CheckpointError) as error:
        load_file(str(run))
    assert str(error.value) == expected
    # Every consumer of MODEL.WEIGHTS says the same: pretraining and evaluation.
    with pytest.raises(CheckpointError) as error:
        load_pretrained(build_model(make_tiny_cfg()), str(run))
    assert str(error.value) == expected
    with pytest.raises(CheckpointError) as error:
        load_backbone(make_tiny_cfg(), str(run))
    assert str(error.value) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a directory, not a weights file, and it holds no file ending "
                                              r"in \.pth, \.pt"):
        load_file(str(empty))


def test_missing_files_and_broken_links_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"weights file not found: .*missing.pth$"):
        load_file(str(tmp_path / "missing.pth"))
    (tmp_path / "link.pth").symlink_to(tmp_path / "gone.pth")
    with pytest.raises(CheckpointError, match=r"not found: .*link.pth \(a broken symbolic link to .*gone.pth\)"):
        load_file(str(tmp_path / "link.pth"))


def test_a_safetensors_backbone_loads_as_weights(tmp_path, make_tiny_cfg):
    from safetensors.torch import save_file

    cfg = make_tiny_cfg()
    state = {k: v + 1.0 for k, v in build_model(cfg).teacher.backbone.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    assert load_pretrained(model := build_model(cfg), str(tmp_path / "model.safetensors")) == "official_backbone"
    for key, value in state.items():
        assert torch.equal(model.student.backbone.state_dict()[key], value), key
