"""Bad data through the whole trainer: unreadable images are skipped, counted and named (or stop the run
with DATALOADER.STRICT), and a dataset that cannot work fails before any model is built."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dino_research.engine import DINOTrainer, default_setup

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "data"))
sys.path.insert(0, str(TESTS / "engine"))
from test_bad_images import BAD_FILES, write_bad, write_odd_modes  # noqa: E402
from test_training import TINY, make_cfg  # noqa: E402


@pytest.fixture(scope="module")
def dirty_folder(tmp_path_factory):
    """An ImageFolder of 16 files: 9 in odd modes (CMYK, palette, 16-bit, gray, ..., a 12 Mpx JPEG),
    6 unreadable (truncated, empty, text, bomb, broken PNGs) and one plain RGB image."""
    root = tmp_path_factory.mktemp("dirty")
    write_odd_modes(root / "odd")
    bad = write_bad(root / "bad")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "bad" / "rgb.png")
    return root, bad


def _image_folder_cfg(out, root, *extra):
    return make_cfg(out, "DATASETS.TRAIN", "ImageFolder", "DATASETS.TRAIN_ROOT", str(root), "LOG_PERIOD", "1", *extra)


def test_training_skips_counts_and_names_unreadable_images(tmp_path, dirty_folder):
    root, bad = dirty_folder
    cfg = _image_folder_cfg(tmp_path, root, "DATALOADER.NUM_WORKERS", "2")
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    trainer.train()
    assert trainer.iter + 1 == trainer.max_iter == 8  # 2 epochs of 16 images, batch 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == 2 * len(BAD_FILES)  # each bad file once per epoch
    log = (tmp_path / "log.txt").read_text()
    for path in bad:
        assert log.count(f"skipped unreadable image {path}") == 2, path
    assert "bomb.png (DecompressionBombError" in log and "truncated.jpg (OSError" in log


def test_strict_stops_at_the_first_unreadable_image_naming_it(tmp_path, dirty_folder):
    root, bad = dirty_folder
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), *TINY, "DATASETS.TRAIN", "ImageFolder",
           "DATASETS.TRAIN_ROOT", str(root), "DATALOADER.STRICT", "True", "DATALOADER.NUM_WORKERS", "1",
           "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert any(f"cannot read image {path!r}" in proc.stderr for path in bad), proc.stderr[-2000:]
    assert "DATALOADER.STRICT False" in proc.stderr


def _no_model(monkeypatch):
    def fail(cfg):
        raise AssertionError("the model was built before the data were checked")

    monkeypatch.setattr("dino_research.engine.trainer.build_model", fail)


def _loose_images(root):
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")


def _empty_class_folders(root):
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / "dogs" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("make_root,message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "has no class sub-folders"),
    (_loose_images, r"has no class sub-folders \(1 image files lie directly inside\)"),
    (_empty_class_folders, "2 of 2 class folders contain no images: cats, dogs"),
], ids=["missing", "empty", "no-class-folders", "empty-classes"])
def test_unusable_image_folder_fails_before_the_model_is_built(tmp_path, monkeypatch, make_root, message):
    root = tmp_path / "data"
    make_root(root)
    _no_model(monkeypatch)
    with pytest.raises(ValueError, match=f"ImageFolder: root '{root}'.*{message}"):
        DINOTrainer(_image_folder_cfg(tmp_path / "out", root))


def test_empty_file_list_and_missing_fashion_mnist_fail_before_the_model(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    listing = tmp_path / "list.txt"
    listing.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=f"list file '{listing}' lists no images"):
        DINOTrainer(make_cfg(tmp_path / "a", "DATASETS.TRAIN", "FileList", "DATASETS.TRAIN_ROOT", str(listing)))
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        DINOTrainer(make_cfg(tmp_path / "b", "DATASETS.TRAIN", "FashionMNIST",
                             "DATASETS.TRAIN_ROOT", str(tmp_path / "nowhere")))


def test_bad_evaluation_root_fails_at_start_not_after_an_epoch(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(ValueError, match=f"ImageFolder: root '{tmp_path / 'bank'}' does not exist"):
        DINOTrainer(make_cfg(tmp_path, "TEST.EVAL_PERIOD", "1", "TEST.DATASET", "ImageFolder",
                             "TEST.TRAIN_ROOT", str(tmp_path / "bank"), "TEST.VAL_ROOT", str(tmp_path / "val")))
