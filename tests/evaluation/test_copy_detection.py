"""Copydays copy detection: the metric on hand-made searches, PCA whitening, the [CLS] + GeM
features, the folder layout, and tools/eval_copy_detection.py end to end on a tiny fixture."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tool_utils import load_tool

from dino_research.data import DatasetError
from dino_research.evaluation.copy_detection import (
    ClsGeMFeatures,
    apply_whitening,
    cls_gem_features,
    copy_detection_map,
    learn_whitening,
    load_copydays_strong,
    search,
)
from dino_research.utils.errors import UserError


# ------------------------------------------------------------------------------------ metric and search
def test_map_on_hand_made_searches():
    # Query 0: originals 0 and 1 retrieved at ranks 1 and 2 (a distractor first). Trapezoids:
    #   (0/1 + 1/2) / 2 / 2 + (1/2 + 2/3) / 2 / 2 = 3/24 + 7/24 = 5/12
    # Query 1: its original 2 is not among the retrieved: AP 0. Query 2: found first: AP 1.
    indices = torch.tensor([[3, 0, 1], [0, 1, 4], [2, 0, 1]])
    mean_ap, aps = copy_detection_map(indices, [[0, 1], [2], [2]])
    assert aps == pytest.approx([5 / 12, 0.0, 1.0])
    assert mean_ap == pytest.approx((5 / 12 + 1) / 3)
    with pytest.raises(ValueError, match="at least one positive"):
        copy_detection_map(indices[:1], [[]])


def test_search_ranks_by_cosine_and_clips_k():
    database = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # not normalized: search does it
    queries = torch.tensor([[0.1, 1.0]])
    assert search(queries, database, k=20).tolist() == [[1, 2, 0]]
    assert search(queries, database, k=2).tolist() == [[1, 2]]


# ------------------------------------------------------------------------------------ whitening
def test_whitened_training_features_have_identity_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1, 3.0])
    features = torch.randn(3000, 6, generator=generator) @ mixing + torch.arange(6.0)
    mean, projection = learn_whitening(features)
    assert mean.shape == (6,) and projection.shape == (6, 6)
    whitened = apply_whitening(features, mean, projection).double()
    covariance = (whitened - whitened.mean(0)).T @ (whitened - whitened.mean(0)) / whitened.shape[0]
    torch.testing.assert_close(covariance, torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)
    assert whitened.mean(0).abs().max() < 1e-4
    # components by decreasing variance: the first row of the projection is the top eigenvector
    top = torch.linalg.eigh(torch.cov(features.double().T, correction=0))[1][:, -1]
    cosine = torch.nn.functional.cosine_similarity(projection[0].double(), top, dim=0)
    assert abs(cosine) == pytest.approx(1.0, abs=1e-4)


def test_uncentered_whitening_is_dino_scripts_second_moment():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2000, 4, generator=generator) @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 2.0])) + 4.0
    mean, projection = learn_whitening(features, centered=False)
    # P is (F^T F / M)^-1/2 up to a rotation, so the centered features get P (S - m m^T) P^T = I - (Pm)(Pm)^T.
    whitened = apply_whitening(features, mean, projection).double()
    pm = projection.double() @ mean.double()
    expected = torch.eye(4, dtype=torch.float64) - torch.outer(pm, pm)
    torch.testing.assert_close(whitened.T @ whitened / whitened.shape[0], expected, atol=1e-4, rtol=0)


def test_whitening_with_fewer_images_than_dimensions():
    features = torch.randn(5, 8)
    mean, projection = learn_whitening(features)
    whitened = apply_whitening(features, mean, projection).double()
    # 5 centered points span 4 dimensions: there the covariance is the identity, elsewhere zero
    eigenvalues = torch.linalg.eigvalsh(whitened.T @ whitened / 5)
    assert eigenvalues[-4:].tolist() == pytest.approx([1.0] * 4, abs=1e-3)
    assert eigenvalues[:4].abs().max() < 1e-3


# ------------------------------------------------------------------------------------ features
def test_cls_and_gem_pooled_patch_tokens(tiny_vit):
    images = torch.randn(2, 3, 40, 36)  # 2x2 patches of 16 once cropped to 32x32
    features = cls_gem_features(tiny_vit, images)
    tokens = tiny_vit.get_intermediate_layers(images[..., :32, :32], n=1)[0]  # (2, 1 + 4, D)
    gem = (tokens[:, 1:].clamp(min=1e-6) ** 4).mean(dim=1) ** 0.25
    torch.testing.assert_close(features, torch.cat([tokens[:, 0], gem], dim=1))
    assert features.shape == (2, 2 * tiny_vit.embed_dim)
    with pytest.raises(UserError, match="pools a ViT's patch tokens"):
        ClsGeMFeatures(torch.nn.Linear(3, 3))


# ------------------------------------------------------------------------------------ layout
def write_image(path, seed, size=(48, 40)):
    """A JPEG of ``size`` (W, H): noise on a seed-dependent colour, so images differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, size=3) + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def build_copydays(root):
    """Three originals (blocks 2000, 2001, 2002); each strong copy is a byte copy of its block's original
    under another name of the block, so only the 4-character rule pairs them."""
    (root / "original").mkdir(parents=True)
    (root / "strong").mkdir()
    for i, block in enumerate(("2000", "2001", "2002")):
        write_image(root / "original" / f"{block}00.jpg", i)
        shutil.copy(root / "original" / f"{block}00.jpg", root / "strong" / f"{block}0{i + 1}.jpg")
    (root / "strong" / "notes.txt").write_text("not an image")
    return root


def test_copydays_layout_and_block_rule(tmp_path):
    data = load_copydays_strong(str(build_copydays(tmp_path / "copydays")))
    assert [p.split("/")[-1] for p in data.queries] == ["200001.jpg", "200102.jpg", "200203.jpg"]
    assert data.positives == [[0], [1], [2]]
    with pytest.raises(DatasetError, match=r"nowhere/original is not a folder.*ROOT/strong/\*\.jpg"):
        load_copydays_strong(str(tmp_path / "nowhere"))
    write_image(tmp_path / "copydays" / "strong" / "209901.jpg", 9)
    with pytest.raises(DatasetError, match=r"1 copies .* no original with the same first 4 characters, e\.g\. 209901"):
        load_copydays_strong(str(tmp_path / "copydays"))


# ------------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A training checkpoint of a 2-block ViT-tiny/16 (config stored inside, as the trainer writes it)."""
    from conftest import tiny_cfg

    from dino_research.checkpoint import Checkpointer
    from dino_research.modeling import build_model

    cfg = tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2})
    return Checkpointer(str(tmp_path_factory.mktemp("ckpt")), build_model(cfg)).save("model.pth", iteration=1,
                                                                                       config=cfg.dump())


@pytest.fixture
def tiny_vit():
    from conftest import tiny_cfg

    from dino_research.modeling import build_backbone

    return build_backbone(tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2}), drop_path_rate=0.0).eval()


def test_tool_end_to_end(tmp_path, tiny_checkpoint):
    root = build_copydays(tmp_path / "copydays")
    distractors, whitening = tmp_path / "distractors", tmp_path / "whitening"
    distractors.mkdir()
    whitening.mkdir()
    for i in range(4):
        write_image(distractors / f"d{i}.png", 100 + i, size=(40 + 8 * i, 40))
        write_image(whitening / f"w{i}.jpg", 200 + i)
    tool = load_tool("eval_copy_detection")
    args = ["--weights", tiny_checkpoint, "--data-root", str(root), "--distractors", str(distractors),
            "--whitening-dir", str(whitening), "--imsize", "32", "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
            "TEST.BATCH_SIZE", "2", "OUTPUT_DIR", str(tmp_path / "run")]
    tool.main(tool.build_parser().parse_args(args))
    summary = json.loads((tmp_path / "run" / "copy_detection.json").read_text())
    assert (summary["num_queries"], summary["num_originals"], summary["num_distractors"], summary["num_whitening"]) \
        == (3, 3, 4, 4)
    # Each copy is pixel-identical to its original: whitened or not, it is its own nearest neighbour.
    assert summary["mAP"] == pytest.approx(100.0)
    assert summary["AP"] == pytest.approx({"200001.jpg": 100.0, "200102.jpg": 100.0, "200203.jpg": 100.0})
    assert summary["top_k"] == 20 and summary["imsize"] == 32 and not summary["uncentered_whitening"]

    args[args.index("--distractors") + 1] = str(tmp_path / "missing")
    with pytest.raises(DatasetError, match=r"--distractors .*missing is not a folder"):
        tool.main(tool.build_parser().parse_args(args))
