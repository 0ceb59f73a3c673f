"""Feature extraction: normalized rows in dataset order, on one process and sharded over two gloo
ranks; the features file round trip."""

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dino_research.checkpoint import CheckpointError
from dino_research.evaluation.features import (
    extract_features,
    extract_features_multi,
    load_features,
    save_features,
    shard_indices,
)


class TinyImages(Dataset):
    """``n`` fixed random images (3, 4, 4); label ``(3 * i) % 5`` so order mistakes change labels."""

    def __init__(self, n):
        self.images = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], (3 * i) % 5


def toy_backbone():
    """(B, 3, 4, 4) -> (B, 6); the Dropout shows whether eval mode is used."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.Dropout(0.5))


def expected(dataset, backbone):
    with torch.no_grad():
        return F.normalize(backbone.eval()(dataset.images), dim=1), torch.tensor([(3 * i) % 5 for i in range(len(dataset))])


def test_shard_indices_cover_the_dataset_in_order():
    assert shard_indices(7, 0, 2) == [0, 2, 4, 6] and shard_indices(7, 1, 2) == [1, 3, 5, 0]
    assert [shard_indices(2, r, 3) for r in range(3)] == [[0], [1], [0]]
    with pytest.raises(ValueError):
        shard_indices(0, 0, 1)


def test_single_process_features_are_normalized_and_in_dataset_order():
    dataset, backbone = TinyImages(7), toy_backbone()
    backbone.train()
    feats, labels = extract_features(backbone, dataset, batch_size=3, device="cpu", progress=False)
    assert backbone.training  # mode restored
    want_feats, want_labels = expected(dataset, backbone)
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64 and feats.shape == (7, 6)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(feats, want_feats)  # dropout inactive: eval mode during extraction
    assert torch.equal(labels, want_labels)


def test_several_backbones_share_one_pass_over_the_data():
    class CountingImages(TinyImages):
        reads = 0

        def __getitem__(self, i):
            CountingImages.reads += 1
            return super().__getitem__(i)

    dataset, backbone = CountingImages(7), toy_backbone()
    (feats, pixels), labels = extract_features_multi([backbone, nn.Flatten(1)], dataset, batch_size=3,
                                                     device="cpu", progress=False)
    assert CountingImages.reads == 7  # each image read once for both
    want_feats, want_labels = expected(dataset, backbone)
    torch.testing.assert_close(feats, want_feats)
    torch.testing.assert_close(pixels, F.normalize(dataset.images.flatten(1), dim=1))
    assert torch.equal(labels, want_labels)


def test_autocast_gives_float32_normalized_features():
    dataset, backbone = TinyImages(5), toy_backbone()
    feats, _ = extract_features(backbone, dataset, batch_size=2, device="cpu", amp_dtype=torch.bfloat16,
                                progress=False)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(feats, expected(dataset, backbone)[0], atol=3e-2, rtol=0)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_progress_logs_every_tenth_without_a_terminal():
    # The package logger does not propagate once set up (so caplog cannot see it): listen directly.
    logger, handler = logging.getLogger("dino_research"), _Collect()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        extract_features(toy_backbone(), TinyImages(20), batch_size=1, device="cpu", progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [m for m in handler.messages if "extracting features" in m]
    assert len(lines) == 10 and lines[-1].startswith("extracting features: 20/20 batches (100%)")


def test_backbone_must_return_a_matrix():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        extract_features(nn.Identity(), TinyImages(2), batch_size=2, device="cpu", progress=False)


def _extract_worker(rank, world_size, out):
    feats, labels = extract_features(toy_backbone(), TinyImages(7), batch_size=2, device="cpu", progress=False)
    torch.save({"features": feats, "labels": labels}, f"{out}.{rank}")


def test_two_gloo_ranks_give_the_single_process_features_in_order(tmp_path):
    from dist_utils import run_on_gloo

    run_on_gloo(_extract_worker, 2, str(tmp_path / "feats"))  # 7 items: rank 1 pads with item 0
    single = extract_features(toy_backbone(), TinyImages(7), batch_size=2, device="cpu", progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"feats.{rank}", weights_only=True)
        assert got["features"].shape == (7, 6)
        torch.testing.assert_close(got["features"], single[0])
        assert torch.equal(got["labels"], single[1])


def test_features_file_round_trip(tmp_path):
    path = str(tmp_path / "features.pth")
    tensors = (F.normalize(torch.randn(5, 3), dim=1), torch.arange(5), torch.randn(2, 3), torch.tensor([1, 0]))
    save_features(path, *tensors)
    loaded = load_features(path)
    assert len(loaded) == 4 and all(torch.equal(a, b) for a, b in zip(loaded, tensors))
    with pytest.raises(ValueError, match="dimension"):
        save_features(path, tensors[0], tensors[1], torch.randn(2, 4), tensors[3])
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a features file"):
        load_features(str(tmp_path / "other.pth"))
    with pytest.raises(CheckpointError):
        load_features(str(tmp_path / "missing.pth"))


def test_one_features_file_layout_and_earlier_knn_dumps_still_load(tmp_path):
    from dino_research.checkpoint import atomic_save, load_file
    from dino_research.evaluation.features import load_feature_file, load_features, save_features

    f, l = torch.randn(5, 3), torch.arange(5)
    save_features(str(tmp_path / "new.pth"), f, l, f[:2], l[:2])
    data = load_file(str(tmp_path / "new.pth"))
    assert data["format"] == "dino_research.features/1" and sorted(data["splits"]) == ["train", "val"]
    splits, _ = load_feature_file(str(tmp_path / "new.pth"))
    assert splits["train"]["dataset_size"] == 5
    atomic_save({"train_features": f, "train_labels": l, "test_features": f[:2], "test_labels": l[:2]},
                str(tmp_path / "old.pth"))  # the layout written before the format key
    for name in ("new.pth", "old.pth"):
        got = load_features(str(tmp_path / name))
        assert torch.equal(got[0], f) and torch.equal(got[3], l[:2])
    atomic_save({"something": f}, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="is not a features file"):
        load_features(str(tmp_path / "other.pth"))
