"""Silent wrong results of evaluation and data, made for real: a validation folder missing a class, a
k larger than the memory bank, a symlink loop in the data root, EXIF-rotated photos."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
from PIL import Image, ImageOps

from dino_research.config import ConfigError
from dino_research.data import build_dataset
from dino_research.data.datasets import FileList, ImageFolder, load_image
from dino_research.data.eval_transforms import build_eval_datasets
from dino_research.engine import load_config
from dino_research.engine.hooks import build_knn_datasets

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "engine"))
from test_training import make_cfg, train  # noqa: E402

EVAL = ["TEST.DATASET", "ImageFolder", "TEST.RESIZE_SIZE", "16", "TEST.CROP_SIZE", "16", "TEST.BATCH_SIZE", "4",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"]


@contextlib.contextmanager
def warnings_of_dino_research():
    """The warning messages the library logs meanwhile (its logger may not propagate to pytest's)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("dino_research")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def noise_image(path, seed, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_splits(tmp_path, val_classes=("b", "c"), extra_val=()):
    """train/{a,b,c}/ with 3 distinct noise images each; val/ holding exact copies of the training
    images of ``val_classes``, plus one noise image per class of ``extra_val`` (absent from train)."""
    train, val = tmp_path / "train", tmp_path / "val"
    for c, name in enumerate("abc"):
        for i in range(3):
            noise_image(train / name / f"{name}{i}.png", seed=10 * c + i)
    for name in val_classes:
        shutil.copytree(train / name, val / name)
    for j, name in enumerate(extra_val):
        noise_image(val / name / f"{name}0.png", seed=100 + j)
    return train, val


def roots(train, val):
    return ["TEST.TRAIN_ROOT", str(train), "TEST.VAL_ROOT", str(val)]


def run_eval_knn(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "eval_knn.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------- one class index
def test_knn_tool_scores_copies_of_training_images_100_percent_when_val_lacks_a_class(tmp_path):
    train, val = make_splits(tmp_path)
    # The fault: numbered alone, val's 'b' is label 0, which is 'a' in the training split.
    assert ImageFolder(root=str(val)).targets[:3] == [0, 0, 0]
    out = tmp_path / "out"
    proc = run_eval_knn("--pixels", *EVAL, *roots(train, val), "TEST.KNN.K", "(1, 200)", "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "knn.json").read_text())
    assert summary["num_train"] == 9 and summary["num_test"] == 6
    # Each query is an exact copy of a training image: its nearest neighbour (cosine 1) has its class.
    assert summary["results"]["1"]["top1"] == 100.0
    # k = 200 asked of 9 images: the table row and knn.json say what was computed.
    assert summary["effective_k"] == {"1": 1, "200": 9}
    assert summary["notes"] == {"200": "k=200 > 9 training images: all 9 used"}
    log = proc.stdout + proc.stderr
    assert "|     k |   top-1 |   top-5 | note" in log
    assert "|   200 |" in log and "| k=200 > 9 training images: all 9 used" in log
    assert "holds images of 2 of the 3 classes" in log


def test_a_validation_class_unknown_to_training_stops_the_knn_tool_naming_it_and_both_roots(tmp_path):
    train, val = make_splits(tmp_path, extra_val=("zebra",))
    proc = run_eval_knn("--pixels", *EVAL, *roots(train, val), "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode != 0
    assert (f"ImageFolder: root '{val}' has 1 class folder(s) that the training split '{train}' (TEST.TRAIN_ROOT) "
            f"does not have: 'zebra' (1 images)") in proc.stderr
    assert "TEST.UNKNOWN_VAL_CLASSES ignore" in proc.stderr
    assert not (tmp_path / "out" / "knn.json").exists()


def test_every_evaluation_builds_its_splits_with_the_training_index(tmp_path):
    """The training-time k-NN hook and the full linear probe refuse the unknown class too; with
    TEST.UNKNOWN_VAL_CLASSES ignore its images are dropped with a warning and the rest stay aligned."""
    from dino_research.evaluation.linear import run_linear_eval

    train, val = make_splits(tmp_path, extra_val=("zebra",))
    cfg = load_config("", [*EVAL, *roots(train, val), "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"class folder\(s\) that the training split .* does not have: 'zebra'"):
        build_knn_datasets(cfg)
    with pytest.raises(ValueError, match="'zebra'"):
        run_linear_eval(cfg, nn.Flatten(1), "cpu")

    cfg = load_config("", [*EVAL, *roots(train, val), "TEST.UNKNOWN_VAL_CLASSES", "ignore"])
    with warnings_of_dino_research() as warnings:
        bank, queries = build_knn_datasets(cfg)
    assert any("1 images of 1 class folder(s) that the training split" in w and "'zebra'" in w for w in warnings)
    assert bank.classes == queries.classes == ["a", "b", "c"]
    assert [os.path.basename(p) for p, _ in queries.samples] == ["b0.png", "b1.png", "b2.png", "c0.png", "c1.png",
                                                                 "c2.png"]
    assert queries.targets == [1, 1, 1, 2, 2, 2]


def test_unknown_val_classes_takes_error_or_ignore_only():
    with pytest.raises(ConfigError, match=r"TEST.UNKNOWN_VAL_CLASSES = 'skip': not one of: error, ignore"):
        load_config("", ["TEST.UNKNOWN_VAL_CLASSES", "skip"])


def test_fast_linear_probe_on_copies_of_training_images_is_100_percent(tmp_path):
    from dino_research.evaluation.linear_fast import run_fast_linear_eval

    train, val = make_splits(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config("", [*EVAL, *roots(train, val), "TEST.LINEAR.EPOCHS", "30", "TEST.LINEAR.BATCH_SIZE", "3",
                           "TEST.LINEAR.LR_GRID", "(100.0,)", "OUTPUT_DIR", str(out)])
    result = run_fast_linear_eval(cfg, nn.Flatten(1), "cpu")
    # Raw pixels of 9 images in 768 dimensions are linearly separable; the val images are copies, so
    # with aligned labels every one is right (misaligned, val 'b' = 0 would be predicted 1: 0%).
    assert result["best"]["top1"] == 100.0


def test_knn_hook_during_training_uses_the_training_index_and_flags_k_over_the_bank(tmp_path):
    train_root, val = make_splits(tmp_path)
    cfg = make_cfg(tmp_path / "run", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0",
                   "SOLVER.FREEZE_LAST_LAYER_EPOCHS", "0", "TEST.EVAL_PERIOD", "1", *EVAL[:6],
                   *roots(train_root, val), "TEST.KNN.K", "(1, 200)")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    scores = [r for r in rows if "knn/top1_k1" in r]
    assert len(scores) == 1 and scores[0]["knn/top1_k1"] == 100.0  # copies: the teacher's features coincide
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "k=200 " in log and "(k=200 > 9 training images: all 9 used)" in log


def test_file_list_labels_are_kept_as_written(tmp_path):
    """Datasets with their own labels are not renumbered: a FileList's val split keeps label 2."""
    a, c = noise_image(tmp_path / "a.png", 1), noise_image(tmp_path / "c.png", 2)
    (tmp_path / "train.txt").write_text(f"{a} 0\n{c} 2\n")
    (tmp_path / "val.txt").write_text(f"{c} 2\n")
    cfg = load_config("", ["TEST.DATASET", "FileList", "TEST.TRAIN_ROOT", str(tmp_path / "train.txt"),
                           "TEST.VAL_ROOT", str(tmp_path / "val.txt")])
    train, val = build_eval_datasets(cfg, None, None)
    assert isinstance(val, FileList) and train.targets == [0, 2] and val.targets == [2]


# ------------------------------------------------------------------------- symlinks
def test_a_symlink_loop_and_a_doubly_linked_folder_do_not_multiply_the_dataset(tmp_path):
    root, shared = tmp_path / "root", tmp_path / "shared"
    for i in range(5):
        noise_image(root / "cat" / f"c{i}.png", i)
        noise_image(root / "cat" / "sub" / f"s{i}.png", 10 + i)
    for i in range(3):
        noise_image(shared / f"x{i}.png", 20 + i)
    noise_image(root / "dog" / "d0.png", 30)
    os.symlink("..", root / "cat" / "sub" / "up")  # cat/sub/up -> cat: a loop
    os.symlink("..", root / "cat" / "root")  # cat/root -> the root: into the other class folders
    os.symlink(shared, root / "dog" / "link1")  # two links to one real folder outside the root
    os.symlink(shared, root / "dog" / "link2")
    os.symlink(root / "cat" / "c0.png", root / "dog" / "cat0.png")  # a linked file is a sample
    with warnings_of_dino_research() as warnings:
        ds = ImageFolder(root=str(root))
    relative = [(os.path.relpath(p, root), label) for p, label in ds.samples]
    assert relative == ([("cat/c%d.png" % i, 0) for i in range(5)] + [("cat/sub/s%d.png" % i, 0) for i in range(5)]
                        + [("dog/cat0.png", 1), ("dog/d0.png", 1)] + [("dog/link1/x%d.png" % i, 1) for i in range(3)])
    assert any("skipped 2 link(s) to folders already walked" in w and "cat/sub/up" in w for w in warnings)
    assert any("skipped 1 link(s)" in w and "dog/link2" in w for w in warnings)
    assert ds[len(ds) - 1][0].size == (16, 16)  # the linked folder's images are read


# ------------------------------------------------------------------------- EXIF orientation
def jpeg_with_orientation(path, orientation, exif_bytes=None):
    """A 48x32 (W x H) JPEG whose stored top-left 16x16 block is red, the rest blue, tagged ``orientation``."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[..., 2] = 255
    pixels[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, exif=exif_bytes if exif_bytes is not None else exif.tobytes())
    return path


def is_red(rgb):
    r, g, b = (int(v) for v in rgb)
    return r > 200 and g < 60 and b < 60


def test_an_exif_rotated_photo_is_read_upright_unless_the_key_says_no(tmp_path):
    root = tmp_path / "photos"
    jpeg_with_orientation(root / "phone" / "portrait.jpg", 6)  # 6: the viewer rotates 90 degrees clockwise
    image, _ = build_dataset(load_config("", []), "ImageFolder", str(root), True, None)[0]
    assert image.size == (32, 48)  # W x H swapped
    pixels = np.asarray(image)
    assert is_red(pixels[4, 28]) and not is_red(pixels[4, 4])  # stored top-left is now top-right
    stored, _ = build_dataset(load_config("", ["INPUT.EXIF_TRANSPOSE", "False"]), "ImageFolder", str(root), True,
                              None)[0]
    assert stored.size == (48, 32) and is_red(np.asarray(stored)[4, 4])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'phone' / 'portrait.jpg'} 3\n")
    for value, size in (("True", (32, 48)), ("False", (48, 32))):
        cfg = load_config("", ["INPUT.EXIF_TRANSPOSE", value])
        assert build_dataset(cfg, "FileList", str(listing), False, None)[0][0].size == size


def test_every_orientation_matches_pillows_exif_transpose(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"  # PNG: lossless, so pixels compare exactly
        Image.fromarray(pixels).save(path, exif=exif.tobytes())
        with Image.open(path) as stored:
            want = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
        assert np.array_equal(np.asarray(load_image(str(path))), want), orientation
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "o8.png"), exif_transpose=False)), pixels)


def test_a_broken_exif_block_neither_kills_the_loader_nor_skips_the_rotation(tmp_path):
    # A real damaged block: the Make tag's number overwritten by 0x011B (YResolution, a RATIONAL tag)
    # while its value stays the ASCII "Canon". Pillow reads the orientation but its exif_transpose,
    # which rewrites the block, raises TypeError.
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0112] = 6
    raw = exif.tobytes()
    damaged = raw.replace(b"\x01\x0f\x00\x02", b"\x01\x1b\x00\x02")
    assert damaged != raw
    path = jpeg_with_orientation(tmp_path / "broken.jpg", 6, exif_bytes=damaged)
    with Image.open(path) as stored, pytest.raises(TypeError):
        ImageOps.exif_transpose(stored)
    image = load_image(str(path))
    assert image.size == (32, 48) and is_red(np.asarray(image)[4, 28])


def test_an_unparsable_exif_block_leaves_the_pixels_as_stored_with_a_warning(tmp_path, monkeypatch):
    # Pillow 13 parses every damaged block we could make (test above); older ones raised from
    # getexif itself. That failure is injected here.
    path = jpeg_with_orientation(tmp_path / "p.jpg", 6)

    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    with warnings_of_dino_research() as warnings:
        image = load_image(str(path))
    assert image.size == (48, 32)
    assert any(str(path) in w and "orientation not applied" in w and "SyntaxError" in w for w in warnings)
