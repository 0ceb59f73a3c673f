"""Fashion-MNIST: idx parsing, root resolution (Debian, flat, torchvision), errors, opt-in download."""

import gzip
import os

import numpy as np
import pytest

from dino_research.config import get_cfg
from dino_research.data import build_dataset
from dino_research.data.fashion_mnist import DEBIAN_ROOT, FashionMNIST

debian = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEBIAN_ROOT, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)


def write_idx(path, array, magic=None, compress=None, truncate=0):
    """Write a uint8 idx file by the format's definition: magic, big-endian uint32 dims, then bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    data = data[: len(data) - truncate]
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = str(path).endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_split(folder, prefix, n=5, suffix=".gz"):
    rng = np.random.default_rng(len(prefix) + n)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def assert_item(dataset, index, images, labels):
    image, label = dataset[index]
    assert image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert (pixels == images[index][..., None]).all()  # gray value in all three channels
    assert label == int(labels[index]) and type(label) is int


@pytest.fixture(scope="module")
def debian_raw():
    """Pixels and labels read straight from the bytes: offset 16 (images) and 8 (labels)."""
    out = {}
    for prefix in ("train", "t10k"):
        with gzip.open(os.path.join(DEBIAN_ROOT, f"{prefix}-images-idx3-ubyte.gz")) as f:
            images = f.read()
        with gzip.open(os.path.join(DEBIAN_ROOT, f"{prefix}-labels-idx1-ubyte.gz")) as f:
            labels = f.read()
        out[prefix] = (
            np.frombuffer(images[16:], np.uint8).reshape(-1, 28, 28),
            np.frombuffer(labels[8:], np.uint8),
        )
    return out


@debian
def test_debian_train_and_test_splits(debian_raw):
    train, test = FashionMNIST(), FashionMNIST(train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert len(train.classes) == 10 and train.classes[9] == "Ankle boot"
    for dataset, prefix in ((train, "train"), (test, "t10k")):
        assert sorted(set(dataset.targets)) == list(range(10))
        for index in (0, 12345 % len(dataset), len(dataset) - 1):
            assert_item(dataset, index, *debian_raw[prefix])


@debian
def test_registry_build_applies_transform():
    cfg = get_cfg()
    dataset = build_dataset(cfg, "FashionMNIST", "", False, transform=lambda image: image.size)
    assert len(dataset) == 10000 and dataset[3][0] == (28, 28)


@pytest.mark.parametrize("layout", ["flat-gz", "flat-raw", "torchvision"])
def test_synthetic_roots(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    suffix = "" if layout == "flat-raw" else ".gz"
    train = write_split(folder, "train", n=7, suffix=suffix)
    test = write_split(folder, "t10k", n=3, suffix=suffix)
    for split, (images, labels) in ((True, train), (False, test)):
        dataset = FashionMNIST(root=str(tmp_path), train=split)
        assert len(dataset) == len(images) and dataset.targets == labels.tolist()
        for index in range(len(images)):
            assert_item(dataset, index, images, labels)


@pytest.mark.parametrize(
    "which, kwargs, message",
    [
        ("images", {"magic": 2049}, r"train-images-idx3-ubyte\.gz is not an idx images file: magic number 2049"),
        ("labels", {"magic": 2051}, r"train-labels-idx1-ubyte\.gz is not an idx labels file: magic number 2051"),
        ("images", {"truncate": 10}, r"train-images-idx3-ubyte\.gz is truncated"),
        ("labels", {"compress": False}, r"train-labels-idx1-ubyte\.gz is not a valid gzip file"),
    ],
    ids=["image-magic", "label-magic", "truncated", "not-gzip"],
)
def test_bad_files_name_the_file(tmp_path, which, kwargs, message):
    images, labels = write_split(tmp_path, "train")
    array = images if which == "images" else labels
    write_idx(tmp_path / f"train-{which}-idx{array.ndim}-ubyte.gz", array, **kwargs)
    with pytest.raises(ValueError, match=message):
        FashionMNIST(root=str(tmp_path))


def test_mismatched_counts_and_labels_out_of_range(tmp_path):
    images, _ = write_split(tmp_path, "train", n=4)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [0, 1, 2])
    with pytest.raises(ValueError, match="4 images but .* 3 labels"):
        FashionMNIST(root=str(tmp_path))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [0, 1, 2, 10])
    with pytest.raises(ValueError, match="label 10"):
        FashionMNIST(root=str(tmp_path))


def test_missing_root_names_paths_tried_and_never_downloads(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded without DATASETS.DOWNLOAD")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_download)
    root = tmp_path / "nowhere"
    with pytest.raises(ValueError) as info:
        build_dataset(get_cfg(), "FashionMNIST", str(root), True, None)
    message = str(info.value)
    assert os.path.join(str(root), "train-images-idx3-ubyte.gz") in message
    assert os.path.join(str(root), "FashionMNIST", "raw", "train-labels-idx1-ubyte") in message
    assert "apt-get install dataset-fashion-mnist" in message and "DATASETS.DOWNLOAD True" in message


def test_download_only_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    from dino_research.data import fashion_mnist

    calls = []

    def fake_download(root, train, download):  # what torchvision leaves behind, without a network
        calls.append((root, train, download))
        write_split(tmp_path / "FashionMNIST" / "raw", "t10k", n=4)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    cfg = get_cfg()
    cfg.DATASETS.DOWNLOAD = True  # the key DATASETS.DOWNLOAD, before defaults.py has it
    dataset = build_dataset(cfg, "FashionMNIST", str(tmp_path), False, None)
    assert calls == [(str(tmp_path), False, True)] and len(dataset) == 4
    FashionMNIST(root=str(tmp_path), train=False, download=True)  # files present: no second download
    assert len(calls) == 1
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", str(tmp_path / "no-debian-package"))
    with pytest.raises(ValueError, match="needs a writable root"):
        FashionMNIST(root="", train=True, download=True)
