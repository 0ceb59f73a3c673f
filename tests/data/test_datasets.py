"""Datasets: ImageFolder, FileList and Synthetic, built by hand and through the registry."""

import hashlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dino_research.config import get_cfg
from dino_research.data import DATASET_REGISTRY, build_augmentation, build_dataset
from dino_research.data.datasets import FileList, ImageFolder, Synthetic


def save(path, color, size=(8, 6), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def pixel(image):
    return tuple(np.asarray(image)[0, 0])


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "train"
    save(root / "dog" / "b.png", (0, 0, 200))
    save(root / "dog" / "nested" / "c.BMP", (0, 0, 100))
    save(root / "cat" / "z.JPG", (250, 0, 0), fmt="JPEG")
    save(root / "cat" / "a.png", 77, mode="L")
    (root / "cat" / "notes.txt").write_text("not an image")
    save(root / "cat" / ".hidden.png", (1, 2, 3))
    save(root / ".ipynb_checkpoints" / "x.png", (1, 2, 3))
    return root


# ------------------------------------------------------------------------------ ImageFolder
def test_image_folder_labels_by_sorted_class_and_sorted_files(tree):
    ds = ImageFolder(root=str(tree))
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    relative = [os.path.relpath(p, tree) for p, _ in ds.samples]
    assert relative == ["cat/a.png", "cat/z.JPG", "dog/b.png", "dog/nested/c.BMP"]
    assert ds.targets == [0, 0, 1, 1] and len(ds) == 4
    image, label = ds[0]
    assert (image.mode, image.size, label) == ("RGB", (8, 6), 0)
    assert pixel(image) == (77, 77, 77)  # grayscale file converted to RGB
    assert pixel(ds[2][0]) == (0, 0, 200) and ds[2][1] == 1


def test_image_folder_through_registry_applies_transform(tree):
    cfg = get_cfg()
    cfg.INPUT.GLOBAL_CROP_SIZE = 16
    cfg.INPUT.LOCAL_CROP_SIZE = 8
    cfg.INPUT.LOCAL_CROPS_NUMBER = 2
    ds = build_dataset(cfg, "ImageFolder", str(tree), True, build_augmentation(cfg))
    assert DATASET_REGISTRY.get("ImageFolder") is ImageFolder and len(ds) == 4
    crops, label = ds[3]
    assert label == 1 and [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    marker, label = build_dataset(cfg, "ImageFolder", str(tree), False, lambda im: ("seen", im.size))[1]
    assert marker == ("seen", (8, 6)) and label == 0


def test_image_folder_reads_sixteen_bit_png_scaled(tmp_path):
    path = tmp_path / "root" / "a" / "deep.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(path)
    image, _ = ImageFolder(root=str(tmp_path / "root"))[0]
    assert image.mode == "RGB" and pixel(image) == (128, 128, 128)


def test_image_folder_missing_root_names_it(tmp_path):
    root = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"{root}.*does not exist.*sub-folder per class"):
        ImageFolder(root=root)


def test_image_folder_root_that_is_a_file(tmp_path):
    file = save(tmp_path / "a.png", (1, 1, 1))
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolder(root=str(file))


def test_image_folder_empty_root_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*no class sub-folders"):
        ImageFolder(root=str(tmp_path / "empty"))


def test_image_folder_images_without_class_folders(tmp_path):
    save(tmp_path / "flat" / "a.png", (1, 1, 1))
    save(tmp_path / "flat" / "b.jpg", (1, 1, 1), fmt="JPEG")
    with pytest.raises(ValueError, match="2 image files lie directly inside.*FileList"):
        ImageFolder(root=str(tmp_path / "flat"))


def test_image_folder_class_folder_without_images(tmp_path):
    save(tmp_path / "r" / "a" / "x.png", (1, 1, 1))
    (tmp_path / "r" / "b").mkdir()
    (tmp_path / "r" / "b" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=r"1 of 2 class folders contain no images: b"):
        ImageFolder(root=str(tmp_path / "r"))


# ------------------------------------------------------------------------------ FileList
def test_file_list_parses_paths_labels_and_comments(tmp_path):
    save(tmp_path / "images" / "a.png", (10, 0, 0))
    save(tmp_path / "images" / "b.png", (20, 0, 0))
    absolute = save(tmp_path / "elsewhere" / "c.png", (30, 0, 0))
    list_file = tmp_path / "lists" / "train.txt"
    list_file.parent.mkdir()
    list_file.write_text(
        "# header comment\n"
        "../images/a.png 3\n"
        "\n"
        "   ../images/b.png    # no label, trailing comment\n"
        f"{absolute} 0\n"
        "   # indented comment\n"
    )
    ds = FileList(list_file=str(list_file))
    assert [(os.path.normpath(p), y) for p, y in ds.samples] == [
        (str(tmp_path / "images" / "a.png"), 3),
        (str(tmp_path / "images" / "b.png"), -1),
        (str(absolute), 0),
    ]
    assert [(pixel(im)[0], y) for im, y in (ds[i] for i in range(len(ds)))] == [(10, 3), (20, -1), (30, 0)]
    built = build_dataset(get_cfg(), "FileList", str(list_file), True, lambda im: im.size)
    assert built[2] == ((8, 6), 0)


@pytest.mark.parametrize("bad", ["a.png cat", "a.png 1 2", "a.png -2", "a.png 1.5"])
def test_file_list_bad_line_names_file_and_line(tmp_path, bad):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"# ok\na.png 1\n\n{bad}\n")
    with pytest.raises(ValueError, match=rf"{list_file}:4: expected 'PATH \[LABEL\]'"):
        FileList(list_file=str(list_file))


def test_file_list_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'none.txt'}.*does not exist"):
        FileList(list_file=str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        FileList(list_file=str(tmp_path / "empty.txt"))


def test_file_list_unreadable_image_names_line(tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("\nmissing.png 1\n")
    ds = FileList(list_file=str(list_file))
    with pytest.raises(OSError, match=r"missing.png.*list.txt:2"):
        ds[0]


# ------------------------------------------------------------------------------ Synthetic
def test_synthetic_length_labels_and_images():
    cfg = get_cfg()
    cfg.DATASETS.SYNTHETIC_SIZE = 23
    cfg.DATASETS.SYNTHETIC_IMAGE_SIZE = 20
    ds = build_dataset(cfg, "Synthetic", "ignored", True, None)
    assert len(ds) == 23 and [ds[i][1] for i in range(23)] == [i % 10 for i in range(23)]
    image = ds[5][0]
    assert image.mode == "RGB" and image.size == (20, 20)
    assert np.asarray(image).std() > 10  # not a flat image
    with pytest.raises(IndexError):
        ds[23]


def test_synthetic_is_deterministic_and_leaves_global_rngs_alone():
    a = Synthetic(num_images=12, image_size=16)
    b = Synthetic(get_cfg(), root="", train=True, transform=None)
    random.seed(0)
    torch.manual_seed(0)
    state = (random.getstate(), torch.get_rng_state())
    first = [np.asarray(a[i][0]) for i in range(12)]
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    assert all(np.array_equal(first[i], np.asarray(a[i][0])) for i in range(12))
    big = [np.asarray(im) for im, _ in (b[i] for i in range(3))]
    assert big[0].shape == (64, 64, 3)
    assert not np.array_equal(first[0], first[1])
    c = Synthetic(num_images=12, image_size=16)
    assert all(np.array_equal(first[i], np.asarray(c[i][0])) for i in range(12))
    test = Synthetic(num_images=12, image_size=16, train=False)
    assert not np.array_equal(first[0], np.asarray(test[0][0])) and test[0][1] == 0


def test_synthetic_identical_in_another_process():
    code = (
        "import hashlib, numpy as np\n"
        "from dino_research.data.datasets import Synthetic\n"
        "ds = Synthetic(num_images=4, image_size=24)\n"
        "print(hashlib.sha256(b''.join(np.asarray(ds[i][0]).tobytes() for i in range(4))).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    ds = Synthetic(num_images=4, image_size=24)
    assert out.stdout.strip() == hashlib.sha256(b"".join(np.asarray(ds[i][0]).tobytes() for i in range(4))).hexdigest()


def test_synthetic_with_multicrop_transform():
    cfg = get_cfg()
    cfg.INPUT.GLOBAL_CROP_SIZE = 32
    cfg.INPUT.LOCAL_CROP_SIZE = 16
    cfg.INPUT.LOCAL_CROPS_NUMBER = 3
    ds = build_dataset(cfg, "Synthetic", "", True, build_augmentation(cfg))
    crops, label = ds[13]
    assert label == 3 and [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
