"""Resumable embedding extraction (tools/extract_features.py): equal to a direct forward pass, resumed
after a kill without re-encoding finished chunks, refusing other settings, unreadable images as NaN."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tool_utils import load_tool
from torchvision import transforms as T

from dino_research.checkpoint import Checkpointer
from dino_research.data.images import load_image
from dino_research.evaluation.embeddings import (
    EmbeddingsError,
    extract_embeddings,
    load_embeddings,
    read_index,
)
from dino_research.modeling import build_backbone, build_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRANSFORM = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.fixture(scope="module")
def vit():
    from conftest import tiny_cfg

    return build_backbone(tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2}), drop_path_rate=0.0).eval()


@pytest.fixture
def photos(tmp_path):
    """Five images of several sizes in a nested folder, an upper-case extension among them."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for i, name in enumerate(["a/1.png", "a/2.JPG", "b/c/3.png", "4.png", "5.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name, "JPEG" if name.endswith("JPG") else "PNG")
    return root


def run(backbone, photos, out, **kwargs):
    args = dict(transform=TRANSFORM, image_size=32, settings={"weights": "w.pth"}, batch_size=2, device="cpu",
                chunk_size=2, progress=False)
    args.update(kwargs)
    return extract_embeddings(backbone, str(photos), str(out), **args)


def direct(backbone, paths):
    images = torch.stack([TRANSFORM(load_image(p)) for p in paths])
    with torch.no_grad():
        blocks = backbone.get_intermediate_layers(images, 2)
    return images, blocks


def test_extraction_equals_a_direct_forward_pass(vit, photos, tmp_path):
    out = tmp_path / "out"
    result = run(vit, photos, out, layers=2, patch_tokens=True)
    assert result["status"] == "complete" and result["encoded"] == [0, 1, 2]
    paths = read_index(str(out))
    assert [os.path.relpath(p, photos) for p in paths] == ["4.png", "5.png", "a/1.png", "a/2.JPG", "b/c/3.png"]
    with open(out / "index.csv", newline="") as f:
        assert next(csv.reader(f)) == ["row", "path"]
    images, blocks = direct(vit, paths)
    with torch.no_grad():
        want = F.normalize(vit(images), dim=-1)
    features = np.load(out / "features.npy")
    assert features.dtype == np.float32 and features.shape == (5, 192)
    np.testing.assert_allclose(features, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    layers = np.load(out / "layers.npy")
    assert layers.shape == (5, 2, 192)
    for i in range(2):
        np.testing.assert_allclose(layers[:, i], F.normalize(blocks[i][:, 0], dim=-1).numpy(), atol=1e-5)
    patches = np.load(out / "patch_tokens.npy")
    assert patches.shape == (5, 4, 192)  # a 2x2 grid of 16-pixel patches
    np.testing.assert_allclose(patches, F.normalize(blocks[1][:, 1:], dim=-1).numpy(), atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["num_images"] == 5 and meta["embed_dim"] == 192
    assert meta["patch_grid"] == [2, 2] and meta["unreadable_rows"] == []
    assert meta["arrays"] == {"features": [5, 192], "layers": [5, 2, 192], "patch_tokens": [5, 4, 192]}
    assert meta["settings"]["normalize"] is True and meta["settings"]["weights"] == "w.pth"
    assert not (out / "shards").exists()  # merged, then removed
    loaded, loaded_paths, _ = load_embeddings(str(out))
    assert loaded_paths == paths and np.array_equal(loaded, features)


def test_resumed_after_a_kill_without_re_encoding_finished_chunks(vit, photos, tmp_path):
    out = tmp_path / "out"
    first = run(vit, photos, out, stop_after_chunks=1, layers=1)
    assert first["status"] == "stopped" and first["encoded"] == [0]
    shard0 = out / "shards" / "shard_000000.npy"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert set(before) == {"shard_000000.npy", "shard_000000.layers.npy"}
    with pytest.raises(EmbeddingsError, match="not finished"):
        load_embeddings(str(out))
    second = run(vit, photos, out, stop_after_chunks=1, layers=1, keep_shards=True)
    assert second["encoded"] == [1] and second["skipped"] == [0]
    third = run(vit, photos, out, layers=1, keep_shards=True)
    assert third["status"] == "complete" and third["encoded"] == [2] and third["skipped"] == [0, 1]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert all(after[name] == mtime for name, mtime in before.items())  # chunk 0 written once
    assert shard0.exists()  # --keep-shards
    whole = tmp_path / "whole"
    run(vit, photos, whole, layers=1)
    for name in ("features.npy", "layers.npy"):
        assert np.array_equal(np.load(out / name), np.load(whole / name))
    again = run(vit, photos, out, layers=1)
    assert again["status"] == "complete" and again["encoded"] == []


def test_restart_with_other_settings_is_refused(vit, photos, tmp_path):
    out = tmp_path / "out"
    run(vit, photos, out, stop_after_chunks=1)
    with pytest.raises(EmbeddingsError, match=r"normalize: True there, False now"):
        run(vit, photos, out, normalize=False)
    with pytest.raises(EmbeddingsError, match=r"weights: 'w.pth' there, 'other.pth' now"):
        run(vit, photos, out, settings={"weights": "other.pth"})
    with pytest.raises(EmbeddingsError, match=r"image_size: 32 there, 48 now"):
        run(vit, photos, out, image_size=48)
    # A folder holding only other files (a tool's log) is an empty output: extraction starts.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.txt").write_text("")
    assert run(vit, photos, fresh)["status"] == "complete"


def test_unreadable_image_rows_are_nan_and_listed(vit, photos, tmp_path):
    (photos / "a" / "2.JPG").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    run(vit, photos, out)
    features, paths, meta = load_embeddings(str(out))
    bad = paths.index(str(photos / "a" / "2.JPG"))
    assert meta["unreadable_rows"] == [bad]
    assert np.isnan(features[bad]).all() and np.isfinite(np.delete(features, bad, axis=0)).all()


def test_file_list_input_and_non_vit_backbones(photos, tmp_path):
    (tmp_path / "list.txt").write_text("photos/5.png\n# a comment\nphotos/a/1.png 3\n")
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    convnet.embed_dim = 8
    out = tmp_path / "out"
    result = run(convnet, tmp_path / "list.txt", out, normalize=False)
    assert read_index(str(out)) == [str(photos / "5.png"), str(photos / "a" / "1.png")]
    images = torch.stack([TRANSFORM(load_image(p)) for p in read_index(str(out))])
    with torch.no_grad():
        np.testing.assert_allclose(np.load(out / "features.npy"), convnet(images).numpy(), atol=1e-6)
    assert result["meta"]["patch_grid"] is None
    with pytest.raises(EmbeddingsError, match="need a ViT"):
        run(convnet, photos, tmp_path / "other", patch_tokens=True)


def test_tool_end_to_end(photos, tmp_path):
    """tools/extract_features.py in-process: a training checkpoint in, arrays out; a rerun is a no-op
    and another --image-size on the same output is refused."""
    from conftest import tiny_cfg

    cfg = tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 1})
    checkpoint = Checkpointer(str(tmp_path / "run"), build_model(cfg)).save("model.pth", iteration=1,
                                                                            config=cfg.dump())
    tool = load_tool("extract_features")
    out = tmp_path / "emb"
    argv = ["--weights", checkpoint, "--input", str(photos), "--output", str(out), "--image-size", "32",
            "--batch-size", "4", "--chunk-size", "3", "--patch-tokens", "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", "0"]
    tool.main(tool.build_parser().parse_args(argv))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["arrays"]["patch_tokens"] == [5, 4, 192]
    assert meta["settings"]["model"] == {"class": "DINOVisionTransformer", "embed_dim": 192, "patch_size": 16,
                                         "num_blocks": 1}
    assert meta["settings"]["resize_size"] == round(32 * 256 / 224) and len(meta["settings"]["weights_sha256"]) == 64
    assert Path(out / "log.txt").is_file() and "CROP_SIZE: 32" in (out / "config.yaml").read_text()
    tool.main(tool.build_parser().parse_args(argv))  # complete already: nothing encoded
    with pytest.raises(EmbeddingsError, match="image_size: 32 there, 48 now"):
        tool.main(tool.build_parser().parse_args(argv[:6] + ["--image-size", "48"] + argv[8:]))
    assert "CROP_SIZE: 32" in (out / "config.yaml").read_text()  # a refused command leaves it alone


def test_two_workers_write_what_one_process_writes(photos, tmp_path):
    """--num-gpus 2 (gloo on the CPU): each chunk shared by both processes, written once, same arrays."""
    import subprocess
    import sys

    from conftest import tiny_cfg

    cfg = tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 1})
    checkpoint = Checkpointer(str(tmp_path / "run"), build_model(cfg)).save("model.pth", iteration=1,
                                                                            config=cfg.dump())
    def argv(out, *extra):
        return ["--weights", checkpoint, "--input", str(photos), "--output", str(out), "--image-size", "32",
                "--chunk-size", "2", "--batch-size", "2", *extra, "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]

    tool = Path(__file__).resolve().parents[2] / "tools" / "extract_features.py"
    proc = subprocess.run([sys.executable, str(tool), *argv(tmp_path / "two", "--num-gpus", "2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = load_tool("extract_features")
    single.main(single.build_parser().parse_args(argv(tmp_path / "one")))
    assert read_index(str(tmp_path / "two")) == read_index(str(tmp_path / "one"))
    np.testing.assert_allclose(np.load(tmp_path / "two" / "features.npy"), np.load(tmp_path / "one" / "features.npy"),
                               atol=1e-5)
