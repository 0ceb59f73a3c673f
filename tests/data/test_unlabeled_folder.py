"""UnlabeledFolder: every layout and odd name, the cached listing (reused, rebuilt), vanished files,
the ImageFolder error that points to it, and a tiny training run on a folder of one's own images."""

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from dino_research.config import get_cfg
from dino_research.data import DatasetError, UnreadableImageError, build_dataset
from dino_research.data import unlabeled as unlabeled_module
from dino_research.data.datasets import ImageFolder
from dino_research.data.loader import SeededSampleDataset
from dino_research.data.unlabeled import UnlabeledFolder, file_list_path


def save(path: Path, color=(10, 20, 30), size=(8, 6), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def names(dataset, root):
    return [os.path.relpath(path, root) for path, _ in dataset.samples]


def test_flat_folder(tmp_path):
    for name in ("b.png", "a.png", "c.png"):
        save(tmp_path / name)
    ds = UnlabeledFolder(root=str(tmp_path))
    assert names(ds, tmp_path) == ["a.png", "b.png", "c.png"]
    assert ds.targets == [-1, -1, -1] and len(ds) == 3
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (8, 6) and label == -1


def test_nested_and_mixed_layouts_sorted_at_every_level(tmp_path):
    save(tmp_path / "z.png")
    save(tmp_path / "2021" / "06" / "x.png")
    save(tmp_path / "2021" / "a.png")
    save(tmp_path / "2020" / "deep" / "er" / "y.jpg", fmt="JPEG")
    (tmp_path / "2021" / "notes.txt").write_text("not an image")
    ds = UnlabeledFolder(root=str(tmp_path))
    assert names(ds, tmp_path) == ["2020/deep/er/y.jpg", "2021/06/x.png", "2021/a.png", "z.png"]


def test_hidden_files_skipped_and_upper_case_extensions_taken(tmp_path):
    save(tmp_path / "IMG_0001.JPG", fmt="JPEG")
    save(tmp_path / "scan.PnG")
    save(tmp_path / "._IMG_0001.JPG", fmt="JPEG")  # macOS resource fork
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save(tmp_path / ".thumbnails" / "t.png")  # a hidden folder is not walked
    ds = UnlabeledFolder(root=str(tmp_path))
    assert names(ds, tmp_path) == ["IMG_0001.JPG", "scan.PnG"]


def test_symlinked_files_and_folders_followed_loops_skipped(tmp_path, caplog):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    save(root / "a" / "x.png")
    save(elsewhere / "y.png")
    save(elsewhere / "sub" / "w.png")
    os.symlink(elsewhere / "y.png", root / "linked.png")  # a link to a file
    os.symlink(elsewhere / "sub", root / "sub_link")  # a link to a folder
    os.symlink("..", root / "a" / "up")  # a loop: a/up -> root
    with caplog.at_level(logging.WARNING, logger="dino_research"):
        ds = UnlabeledFolder(root=str(root))
    assert names(ds, root) == ["a/x.png", "linked.png", "sub_link/w.png"]
    assert "link loop" in caplog.text
    assert ds[1][0].size == (8, 6)  # read through the link


def test_missing_empty_and_file_roots_name_the_root(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'}.*does not exist"):
        UnlabeledFolder(root=str(tmp_path / "nope"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="holds no image file"):
        UnlabeledFolder(root=str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="not a folder"):
        UnlabeledFolder(root=str(save(tmp_path / "a.png")))


def test_image_folder_on_a_flat_folder_names_unlabeled_folder(tmp_path):
    save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="1 image files lie directly inside.*DATASETS.TRAIN UnlabeledFolder"):
        ImageFolder(root=str(tmp_path / "flat"))


def test_registered_and_built_from_the_config(tmp_path):
    save(tmp_path / "data" / "a.png")
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    ds = build_dataset(cfg, "UnlabeledFolder", str(tmp_path / "data"), True, lambda im: im.size)
    assert isinstance(ds, UnlabeledFolder) and ds[0] == ((8, 6), -1)
    assert ds.cache_file == file_list_path(cfg.OUTPUT_DIR, str(tmp_path / "data"))
    assert os.path.dirname(ds.cache_file) == cfg.OUTPUT_DIR and os.path.isfile(ds.cache_file)


# ------------------------------------------------------------------------------ the cached listing
def no_walk(*args, **kwargs):
    raise AssertionError("the folder was walked although a valid cache exists")


def test_cache_reused_without_walking(tmp_path, monkeypatch):
    root, out = tmp_path / "data", tmp_path / "out"
    for name in ("b/2.png", "a/1.png", "c.png"):
        save(root / name)
    first = UnlabeledFolder(root=str(root), cache_dir=str(out))
    lines = Path(first.cache_file).read_text().splitlines()
    assert lines[1:4] == [f"# root: {root}", "# refresh: 0", "# count: 3"]
    assert lines[4:] == ["a/1.png", "b/2.png", "c.png"]  # relative to the root
    save(root / "d.png")  # added after the listing: not seen until a rebuild
    monkeypatch.setattr(unlabeled_module, "list_images", no_walk)
    again = UnlabeledFolder(root=str(root), cache_dir=str(out))
    assert again.samples == first.samples
    # The same root spelled relative to the working directory is the same cache.
    monkeypatch.chdir(tmp_path)
    relative = UnlabeledFolder(root="data", cache_dir=str(out))
    assert names(relative, "data") == ["a/1.png", "b/2.png", "c.png"]


@pytest.mark.parametrize("change", ["refresh", "missing", "damaged", "other_format"])
def test_cache_rebuilt(tmp_path, change):
    root, out = tmp_path / "data", tmp_path / "out"
    save(root / "a.png")
    first = UnlabeledFolder(root=str(root), cache_dir=str(out))
    save(root / "b.png")
    refresh = 0
    if change == "refresh":
        refresh = 1
    elif change == "missing":
        os.remove(first.cache_file)
    elif change == "damaged":  # the header announces more paths than the file holds
        text = Path(first.cache_file).read_text().replace("# count: 1", "# count: 5")
        Path(first.cache_file).write_text(text)
    else:
        Path(first.cache_file).write_text("a.png\n")
    rebuilt = UnlabeledFolder(root=str(root), cache_dir=str(out), refresh=refresh)
    assert names(rebuilt, root) == ["a.png", "b.png"]
    assert f"# refresh: {refresh}" in Path(first.cache_file).read_text()
    again = UnlabeledFolder(root=str(root), cache_dir=str(out), refresh=refresh)
    assert again.samples == rebuilt.samples


def test_another_root_gets_its_own_cache(tmp_path):
    out = tmp_path / "out"
    save(tmp_path / "one" / "a.png")
    save(tmp_path / "two" / "b.png")
    one = UnlabeledFolder(root=str(tmp_path / "one"), cache_dir=str(out))
    two = UnlabeledFolder(root=str(tmp_path / "two"), cache_dir=str(out))
    assert one.cache_file != two.cache_file
    assert names(two, tmp_path / "two") == ["b.png"]
    assert names(UnlabeledFolder(root=str(tmp_path / "one"), cache_dir=str(out)), tmp_path / "one") == ["a.png"]


def test_unwritable_cache_dir_only_warns(tmp_path, caplog):
    save(tmp_path / "data" / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="dino_research"):
        ds = UnlabeledFolder(root=str(tmp_path / "data"), cache_dir=str(blocker / "sub"))
    assert len(ds) == 1 and "cannot cache the file list" in caplog.text


def test_vanished_file_is_an_unreadable_image_skipped_by_the_loader(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    for name in ("a.png", "b.png", "c.png"):
        save(root / name)
    UnlabeledFolder(root=str(root), cache_dir=str(out))
    os.remove(root / "b.png")
    ds = UnlabeledFolder(root=str(root), cache_dir=str(out))  # from the cache: b.png still listed
    assert len(ds) == 3
    with pytest.raises(UnreadableImageError, match="b.png"):
        ds[1]
    sample, label, skipped = SeededSampleDataset(ds, seed=0)[0, 1]
    assert label == -1 and skipped[0][0] == str(root / "b.png")  # replaced by c.png, reported


# ------------------------------------------------------------------------------ training on it
def test_tiny_training_run_on_an_unlabeled_folder(tmp_path, monkeypatch):
    """Pretraining with DATASETS.TRAIN UnlabeledFolder runs and caches the listing; a restart reads it."""
    from dino_research.engine import DINOTrainer, default_setup, load_config

    root = tmp_path / "photos"
    for i in range(8):  # nested, extensions of both cases, and a hidden file
        save(root / ("trip" if i % 2 else "home") / f"IMG_{i}.{'JPG' if i % 3 else 'png'}",
             color=(30 * i, 255 - 30 * i, 90), size=(40, 36), fmt="JPEG" if i % 3 else "PNG")
    save(root / "._IMG_0.png")
    opts = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", "1", "MODEL.HEAD.OUT_DIM", "32",
            "MODEL.HEAD.HIDDEN_DIM", "16", "MODEL.HEAD.BOTTLENECK_DIM", "8", "INPUT.GLOBAL_CROP_SIZE", "32",
            "INPUT.LOCAL_CROP_SIZE", "16", "INPUT.LOCAL_CROPS_NUMBER", "1", "DATASETS.TRAIN", "UnlabeledFolder",
            "DATASETS.TRAIN_ROOT", str(root), "SOLVER.BATCH_SIZE_PER_GPU", "4", "SOLVER.EPOCHS", "1",
            "SOLVER.WARMUP_EPOCHS", "0", "SOLVER.AMP.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0",
            "LOG_PERIOD", "1", "OUTPUT_DIR", str(tmp_path / "run"), "MODEL.DEVICE", "cpu"]
    cfg = load_config("", opts)
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    assert len(trainer.loader.dataset) == 8
    trainer.resume_or_load(resume=True)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    (cache,) = (tmp_path / "run").glob("file_list_*.txt")
    monkeypatch.setattr(unlabeled_module, "list_images", no_walk)  # a restart lists from the cache
    again = DINOTrainer(cfg)
    assert again.loader.dataset.samples == trainer.loader.dataset.samples
