"""tools/visualize_attention.py end to end on a tiny checkpoint: files, sizes, figure grid, failures."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tool_utils import load_tool

from dino_research.checkpoint import Checkpointer
from dino_research.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
TOOL = str(REPO / "tools" / "visualize_attention.py")
PAD, LABEL = 4, 14  # attention_figure's defaults: figure = PAD + cols * (W + PAD) by PAD + rows * (LABEL + H + PAD)


@pytest.fixture
def checkpoint(tmp_path, make_tiny_cfg):
    """A training checkpoint of a 2-block ViT-tiny/8 (3 heads) that stores its config. The tool is run
    without --config, so its defaults say vit_small/16 (6 heads): the outputs show which one was used."""
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2, "MODEL.BACKBONE.PATCH_SIZE": 8})
    return Checkpointer(str(tmp_path), build_model(cfg)).save("ckpt.pth", iteration=0, config=cfg.dump())


def _write_image(path, height, width):
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def _size(path):
    with Image.open(path) as image:
        return image.size, image.mode


def test_one_image_with_masks(tmp_path, checkpoint):
    pixels = _write_image(tmp_path / "scene.png", 45, 70)  # H 45, W 70 -> cropped to 40 x 64 (patch 8)
    out = tmp_path / "out"
    # No --threshold: the paper's 0.6 is the default.
    proc = _run("--weights", checkpoint, "--image", tmp_path / "scene.png", "--output", out, "MODEL.DEVICE", "cpu")
    assert proc.returncode == 0, proc.stderr
    folder = out / "scene"
    names = sorted(p.name for p in folder.iterdir())
    heads = 3  # ViT-tiny, as stored in the checkpoint
    assert names == sorted(["img.png", "figure.png"] + [f"attn-head{i}.png" for i in range(heads)]
                           + [f"mask-head{i}.png" for i in range(heads)])
    assert np.array_equal(np.asarray(Image.open(folder / "img.png")), pixels[:40, :64])  # top-left crop
    for i in range(heads):
        assert _size(folder / f"attn-head{i}.png") == ((64, 40), "RGB")
        assert _size(folder / f"mask-head{i}.png") == ((64, 40), "L")
        mask = np.asarray(Image.open(folder / f"mask-head{i}.png"))
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        patches = mask.reshape(5, 8, 8, 8)  # one value per 8 x 8 patch
        assert np.all(patches == patches[:, :1, :, :1])
    # two rows (maps, masks) of 2 + heads panels
    assert _size(folder / "figure.png") == ((PAD + (2 + heads) * (64 + PAD), PAD + 2 * (LABEL + 40 + PAD)), "RGB")
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()


def test_figure_scale_enlarges_only_the_figure(tmp_path, checkpoint):
    pixels = _write_image(tmp_path / "scene.png", 45, 70)  # cropped to 40 x 64
    out = tmp_path / "out"
    proc = _run("--weights", checkpoint, "--image", tmp_path / "scene.png", "--output", out, "--figure-scale", "3",
                "MODEL.DEVICE", "cpu")
    assert proc.returncode == 0, proc.stderr
    folder, heads, k = out / "scene", 3, 3
    assert _size(folder / "attn-head0.png") == ((64, 40), "RGB") and _size(folder / "mask-head0.png") == ((64, 40), "L")
    W, H = 64 * k, 40 * k
    assert _size(folder / "figure.png") == ((PAD + (2 + heads) * (W + PAD), PAD + 2 * (LABEL + H + PAD)), "RGB")
    # The "image" panel is the cropped image with every pixel repeated k x k times.
    panel = np.asarray(Image.open(folder / "figure.png"))[PAD + LABEL:PAD + LABEL + H, PAD:PAD + W]
    assert np.array_equal(panel, pixels[:40, :64].repeat(k, axis=0).repeat(k, axis=1))


def test_folder_of_images_resized_by_shorter_side(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "wide.png", 45, 70)
    _write_image(images / "tall.jpg", 60, 40)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    # KEY VALUE options right after --image-size must still reach the config.
    proc = _run("--weights", checkpoint, "--image", images, "--output", out, "--threshold", "0", "--image-size", "48",
                "MODEL.DEVICE", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["tall", "wide"]
    # shorter side -> 48, longer side int(48 * long / short), then cropped to multiples of 8
    for stem, (W, H) in {"wide": (72, 48), "tall": (48, 72)}.items():
        folder = out / stem
        assert not list(folder.glob("mask-*"))  # --threshold 0: no masks
        assert _size(folder / "img.png") == ((W, H), "RGB")
        assert [_size(folder / f"attn-head{i}.png")[0] for i in range(3)] == [(W, H)] * 3
        assert not (folder / "attn-head3.png").exists()
        assert _size(folder / "figure.png")[0] == (PAD + 5 * (W + PAD), PAD + LABEL + H + PAD)


def test_non_vit_backbone_fails_clearly(tmp_path, monkeypatch):
    # In process (a third interpreter start would double this file's run time); default_setup is
    # skipped so the test leaves no log handler behind.
    tool = load_tool("visualize_attention")
    monkeypatch.setattr(tool, "default_setup", lambda cfg, args: None)
    _write_image(tmp_path / "scene.png", 32, 32)
    args = tool.parse_args(["--image", str(tmp_path / "scene.png"), "--output", str(tmp_path / "out"),
                            "MODEL.BACKBONE.NAME", "timm", "MODEL.BACKBONE.TIMM_MODEL", "test_resnet"])
    with pytest.raises(SystemExit) as failure:
        tool.main(args)
    message = failure.value.code  # a message, so the process exits with status 1
    assert isinstance(message, str) and "attention maps need a ViT backbone" in message
    assert "MODEL.BACKBONE.NAME is 'timm (test_resnet)'" in message
    assert not (tmp_path / "out" / "scene").exists()


def test_bad_arguments_are_refused(tmp_path):
    tool = load_tool("visualize_attention")
    for argv in (["--image-size", "1", "2", "3"], ["--image-size", "0"], ["--threshold", "1.5"], ["--figure-scale", "0"]):
        with pytest.raises(SystemExit) as failure:
            tool.parse_args(["--image", "x.png", *argv])
        assert failure.value.code == 2
    args = tool.parse_args(["--image", "x.png", "--image-size", "64", "48", "SEED", "3"])
    assert args.image_size == [64, 48] and args.opts == ["SEED", "3"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files"):
        tool.image_paths(str(tmp_path / "empty"))


# ---------------------------------------------------------------------- size cap, bad images, EXIF
@pytest.fixture
def checkpoint16(tmp_path, make_tiny_cfg):
    """A 1-block ViT-tiny/16 (3 heads): attention over a 1024-pixel image stays cheap on a CPU."""
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 1})
    return Checkpointer(str(tmp_path), build_model(cfg)).save("ckpt16.pth", iteration=0, config=cfg.dump())


def test_a_large_photo_is_capped_by_default_and_the_cap_can_be_raised(tmp_path, checkpoint16):
    # 3000x2000 (W x H) at patch 16 would be 23437 patches: heads x 23437^2 floats of attention, 6.6 GB.
    _write_image(tmp_path / "big.png", 2000, 3000)
    for extra, (W, H), resized in (((), (1024, 672), "1024x683"), (("--max-size", 1280), (1280, 848), "1280x853")):
        out = tmp_path / f"out{len(extra)}"
        proc = _run("--weights", checkpoint16, "--image", tmp_path / "big.png", "--output", out, "--threshold", "0",
                    *extra, "MODEL.DEVICE", "cpu")
        assert proc.returncode == 0, proc.stderr
        # longer side capped, aspect ratio kept (2000 * 1024 / 3000 = 682.7), then cropped to patch multiples
        assert _size(out / "big" / "img.png") == ((W, H), "RGB")
        assert _size(out / "big" / "attn-head0.png") == ((W, H), "RGB")
        cap = extra[1] if extra else 1024
        assert (f"big.png is 3000x2000: resized to {resized} (--max-size {cap}; raise it to keep more detail)"
                in (out / "log.txt").read_text())


def test_bad_images_in_a_folder_are_named_and_skipped_the_rest_drawn(tmp_path, checkpoint, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "good.png", 45, 70)
    (images / "junk.jpg").write_text("this is not a JPEG")
    _write_image(images / "speck.png", 4, 4)  # smaller than one 8x8 patch
    # A phone photo stored 48x32 (W x H) with EXIF orientation 6: drawn upright, 32x48.
    pixels = np.zeros((32, 48, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(images / "phone.jpg", exif=exif.tobytes())
    out = tmp_path / "out"
    proc = _run("--weights", checkpoint, "--image", images, "--output", out, "--threshold", "0", "MODEL.DEVICE", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["good", "phone"]
    assert _size(out / "good" / "img.png") == ((64, 40), "RGB")
    assert _size(out / "phone" / "img.png") == ((32, 48), "RGB")
    log = (out / "log.txt").read_text()
    assert f"{images / 'junk.jpg'}: skipped, cannot read image" in log and "UnidentifiedImageError" in log
    assert f"{images / 'speck.png'}: skipped, image 4x4 is smaller than one 8x8 patch" in log
    assert "attention maps of 2 of 4 image(s) written to" in log and "2 skipped: junk.jpg, speck.png" in log

    # Only bad images: nothing drawn, a non-zero exit (SystemExit with a message: status 1) naming
    # them. In process, as test_non_vit_backbone_fails_clearly.
    (images / "good.png").unlink()
    (images / "phone.jpg").rename(tmp_path / "phone.jpg")
    tool = load_tool("visualize_attention")
    monkeypatch.setattr(tool, "default_setup", lambda cfg, args: None)
    with pytest.raises(SystemExit) as failure:
        tool.main(tool.parse_args(["--weights", str(checkpoint), "--image", str(images), "--output",
                                   str(tmp_path / "none"), "MODEL.DEVICE", "cpu"]))
    message = failure.value.code
    assert isinstance(message, str) and message.startswith("no image could be drawn (attention maps of 0 of 2 image(s)")
    assert f"{images / 'junk.jpg'}: cannot read image" in message and "speck.png" in message
    # EXIF off: the photo as stored.
    proc = _run("--weights", checkpoint, "--image", tmp_path / "phone.jpg", "--output", tmp_path / "stored",
                "--threshold", "0", "INPUT.EXIF_TRANSPOSE", "False", "MODEL.DEVICE", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert _size(tmp_path / "stored" / "phone" / "img.png") == ((48, 32), "RGB")


def test_max_size_is_refused_when_negative():
    tool = load_tool("visualize_attention")
    assert tool.parse_args(["--image", "x.png"]).max_size == 1024
    with pytest.raises(SystemExit) as failure:
        tool.parse_args(["--image", "x.png", "--max-size", "-1"])
    assert failure.value.code == 2


def test_jaccard_option_scores_heads_of_test_images_against_their_foreground(tmp_path, checkpoint):
    out = tmp_path / "jac"
    tool = load_tool("visualize_attention")
    args = tool.parse_args(["--weights", str(checkpoint), "--jaccard", "12", "--output", str(out), "MODEL.DEVICE", "cpu",
                            "TEST.DATASET", "Synthetic", "TEST.RESIZE_SIZE", "32", "TEST.CROP_SIZE", "32"])
    tool.main(args)
    import json

    result = json.loads((out / "attention_jaccard.json").read_text())
    assert result["num_images"] == 12 and len(result["per_head"]) == 3  # ViT-tiny's 3 heads
    assert result["best_head_jaccard"] == pytest.approx(max(result["per_head"]))
    assert result["per_head"][result["best_head"]] == pytest.approx(max(result["per_head"]))
    assert result["mean_over_heads"] == pytest.approx(sum(result["per_head"]) / 3)
    assert all(0 <= j <= 100 for j in result["per_head"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--random-init", "--weights", str(checkpoint), "--jaccard", "3"])
