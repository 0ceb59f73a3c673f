"""Label propagation on features whose answer is known, the DAVIS layout reader, and
tools/eval_video_segmentation.py end to end on a 2-video, 3-frame DAVIS-layout fixture."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tool_utils import load_tool

from dino_research.checkpoint import Checkpointer
from dino_research.data import DatasetError
from dino_research.engine import load_config
from dino_research.evaluation.davis_metrics import evaluate_sequence, summarize
from dino_research.evaluation.video_segmentation import (
    davis_palette,
    davis_video_names,
    neighborhood_mask,
    propagate_labels,
    read_annotation,
    read_davis_video,
    segment_video,
    write_indexed_png,
)
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
H, W, P = 32, 48, 8  # frames: a 4 x 6 patch grid


def test_neighborhood_mask_by_hand():
    mask = neighborhood_mask(3, 3, 1)
    assert mask.shape == (9, 9) and mask.dtype == torch.bool
    # patch 4 is the centre of the 3x3 grid: every patch is within one row and one column
    assert mask[4].all()
    # patch 0 (top-left corner) reaches patches 0, 1 (right), 3 (below), 4 (diagonal)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 3, 4]
    assert torch.nonzero(mask[5]).flatten().tolist() == [1, 2, 4, 5, 7, 8]  # (1, 2): middle row, right column
    assert torch.equal(mask, mask.T)
    assert torch.equal(neighborhood_mask(2, 3, 0), torch.eye(6, dtype=torch.bool))
    # a 1 x 5 strip, size 2: |i - j| <= 2
    strip = neighborhood_mask(1, 5, 2)
    assert torch.equal(strip, torch.tensor([[abs(i - j) <= 2 for j in range(5)] for i in range(5)]))


def test_propagation_weights_are_a_softmax_over_the_top_k():
    # one target patch along x; sources at cosines 1, 0.8, 0.6 (frame 0) and 0.9, 0 (frame 1)
    def unit(c):
        return [c, math.sqrt(1 - c * c)]

    target = torch.tensor([[1.0, 0.0]])
    sources = torch.tensor([[unit(1.0), unit(0.8), unit(0.6)], [unit(0.9), unit(0.0), unit(0.0)]])
    labels = torch.zeros(2, 3, 3)  # (S, C, M): source patch m of frame s has class ...
    labels[0, 0, 0] = labels[0, 1, 1] = labels[0, 2, 2] = 1  # frame 0: classes 0, 1, 2
    labels[1, 2, 0] = labels[1, 0, 1] = labels[1, 0, 2] = 1  # frame 1: 2, 0, 0
    out = propagate_labels(target, sources, labels, topk=3, temperature=0.1)
    # top 3 over both frames: cos 1 (class 0), 0.9 (class 2), 0.8 (class 1)
    e = torch.tensor([math.exp(10), math.exp(9), math.exp(8)])
    w = e / e.sum()
    torch.testing.assert_close(out, torch.tensor([[w[0]], [w[2]], [w[1]]]))
    # top 1: the label of the most similar patch, exactly
    torch.testing.assert_close(propagate_labels(target, sources, labels, topk=1), torch.tensor([[1.0], [0.0], [0.0]]))
    # features need not be normalized (they are, inside)
    torch.testing.assert_close(propagate_labels(3 * target, 2 * sources, labels, topk=3), out)


def test_propagation_follows_the_neighborhood():
    # a 1 x 4 strip of identical target patches; source patch m at cosine 0.6, 0.7, 0.8, 1.0 to them, class m
    target = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    sources = torch.tensor([[[c, math.sqrt(1 - c * c)] for c in (0.6, 0.7, 0.8, 1.0)]])  # (1, 4, 2)
    labels = torch.eye(4).unsqueeze(0)
    assert propagate_labels(target, sources, labels, topk=1).argmax(0).tolist() == [3, 3, 3, 3]
    # within one patch: target 0 sees sources 0-1, target 1 sees 0-2, target 2 sees 1-3, target 3 sees 2-3
    out = propagate_labels(target, sources, labels, topk=1, neighborhood_mask=neighborhood_mask(1, 4, 1))
    assert out.argmax(0).tolist() == [1, 2, 3, 3]
    # top 5 of at most 2 or 3 allowed sources: the masked ones weigh nothing
    out = propagate_labels(target, sources, labels, topk=5, neighborhood_mask=neighborhood_mask(1, 4, 1))
    e6, e7 = math.exp(6), math.exp(7)
    torch.testing.assert_close(out[:, 0], torch.tensor([e6 / (e6 + e7), e7 / (e6 + e7), 0.0, 0.0]))
    torch.testing.assert_close(out.sum(0), torch.ones(4))


class PatchColours(nn.Module):
    """A stand-in ViT whose patch feature is the patch's mean colour: objects of distinct colours
    have orthogonal features, so the right propagation is known."""

    patch_size = P

    def get_intermediate_layers(self, x, n=1):
        patches = F.avg_pool2d(x, P).flatten(2).transpose(1, 2)  # (1, h*w, 3)
        return [torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)]


def moving_squares(T):
    """T frames (H, W) of a red and a green 8x8 square on blue, moving one patch per frame, and the labels."""
    frames, labels = [], []
    for t in range(T):
        image = np.zeros((H, W, 3), np.uint8)
        image[..., 2] = 255
        label = np.zeros((H, W), np.uint8)
        for k, (y, x) in enumerate([(8, 8 * t), (16, 40 - 8 * t)], start=1):
            image[y:y + 8, x:x + 8] = (255, 0, 0) if k == 1 else (0, 255, 0)
            label[y:y + 8, x:x + 8] = k
        frames.append(Image.fromarray(image))
        labels.append(label)
    return frames, labels


def test_segment_video_tracks_objects_of_known_features():
    frames, labels = moving_squares(5)
    predictions = segment_video(PatchColours(), frames, labels[0], short_side=0, mean=(0, 0, 0), std=(1, 1, 1),
                                size_mask_neighborhood=2, n_last_frames=2)
    assert len(predictions) == 5 and all(p.dtype == np.uint8 and p.shape == (H, W) for p in predictions)
    for t, (got, want) in enumerate(zip(predictions, labels)):
        # At every patch centre the right object. (Bilinear upsampling of patch scores rounds the
        # squares' corners, as in the reference: near a corner 3 of the 4 nearest patches are background.)
        assert np.array_equal(got[P // 2::P, P // 2::P], want[P // 2::P, P // 2::P]), t
        assert np.array_equal(got[want == 0], want[want == 0]), t  # and never outside the squares
    # frame size: shorter side 16, longer 16 * 48 / 32 = 24 rounded down to a multiple of 8 -> 2 x 3 patches;
    # predictions still come back at the frames' size
    small = segment_video(PatchColours(), frames, labels[0], short_side=16, multiple=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert all(p.shape == (H, W) for p in small)


# ------------------------------------------------------------------------------------ DAVIS layout
def write_davis(root, videos):
    """DAVIS layout under ``root``: videos {name: (frames, labels, annotated frame count)}."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{name}\n" for name in videos))
    for name, (frames, labels, annotated) in videos.items():
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for t, frame in enumerate(frames):
            frame.save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
        for t in range(annotated):
            write_indexed_png(str(root / "Annotations" / "480p" / name / f"{t:05d}.png"), labels[t], davis_palette())


def test_palette_and_indexed_png_round_trip(tmp_path):
    palette = davis_palette()
    assert len(palette) == 768 and palette[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    write_indexed_png(str(tmp_path / "a.png"), labels, palette)
    got, got_palette = read_annotation(str(tmp_path / "a.png"))
    assert np.array_equal(got, labels) and got_palette == palette
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match="rgb.png: a RGB image"):
        read_annotation(str(tmp_path / "rgb.png"))


def test_bad_layout_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"DAVIS root '{tmp_path / 'nowhere'}' is not a folder.*JPEGImages/480p"):
        davis_video_names(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'ImageSets' / '2017' / 'val.txt'} not found"):
        davis_video_names(str(tmp_path))
    frames, labels = moving_squares(3)
    write_davis(tmp_path, {"cars": (frames, labels, 3)})
    with pytest.raises(DatasetError, match="--videos dogs: not in .*val.txt \\(which lists cars\\)"):
        davis_video_names(str(tmp_path), videos=["dogs"])
    with pytest.raises(DatasetError, match=f"no frame folder {tmp_path / 'JPEGImages' / '480p' / 'dogs'}"):
        read_davis_video(str(tmp_path), "dogs")
    (tmp_path / "Annotations" / "480p" / "cars" / "00000.png").unlink()
    with pytest.raises(DatasetError, match="first frame's annotation .*cars/00000.png is missing"):
        read_davis_video(str(tmp_path), "cars")


def test_tool_end_to_end(tmp_path, make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2, "MODEL.BACKBONE.PATCH_SIZE": P})
    weights = Checkpointer(str(tmp_path), build_model(cfg)).save("ckpt.pth", iteration=0, config=cfg.dump())
    frames, labels = moving_squares(3)
    root = tmp_path / "DAVIS"
    # "cars" is fully annotated (scored); "dogs" has only its first annotation, as test-dev (not scored)
    write_davis(root, {"cars": (frames, labels, 3), "dogs": (frames[::-1], labels[::-1], 1)})
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "eval_video_segmentation.py"), "--weights", weights, "--data-path",
           str(root), "--frame-size", "0", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "video_segmentation.json").read_text())
    assert summary["videos"] == ["cars", "dogs"] and summary["scored"] == ["cars"]
    assert summary["protocol"]["n_last_frames"] == 7 and summary["protocol"]["topk"] == 5
    for name in ("cars", "dogs"):  # every frame's PNG, palette kept
        pngs = sorted((out / "davis" / name).iterdir())
        assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
        assert Image.open(pngs[1]).mode == "P" and Image.open(pngs[1]).getpalette()[:768] == davis_palette()

    # The scores are those of the written PNGs against the annotations, with this checkpoint's backbone.
    written = [read_annotation(str(out / "davis" / "cars" / f"{t:05d}.png"))[0] for t in range(3)]
    assert np.array_equal(written[0], labels[0])  # the first annotation, copied
    backbone = load_backbone(load_config("", []), weights)
    again = segment_video(backbone, [str(root / "JPEGImages" / "480p" / "cars" / f"{t:05d}.jpg") for t in range(3)],
                          labels[0], short_side=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, written))
    want = summarize({"cars": evaluate_sequence(np.stack(written), np.stack(labels))})
    for key in ("J&F-Mean", "J-Mean", "F-Mean", "J-Decay"):
        assert summary["results"][key] == pytest.approx(100 * want[key])
    assert set(summary["per_object"]) == {"cars_1", "cars_2"}
    assert "| cars" in proc.stdout and "J&F-Mean" in proc.stdout


def test_tool_checks_the_layout_before_the_weights(tmp_path, monkeypatch):
    tool = load_tool("eval_video_segmentation")
    monkeypatch.setattr(tool, "default_setup", lambda cfg, args: None)  # no log handlers left behind
    args = tool.build_parser().parse_args(["--weights", str(tmp_path / "missing.pth"), "--data-path",
                                           str(tmp_path / "DAVIS"), "--videos", "cars,dogs", "MODEL.DEVICE", "cpu"])
    assert args.videos == "cars,dogs" and args.opts == ["MODEL.DEVICE", "cpu"]
    with pytest.raises(DatasetError, match=f"DAVIS root '{tmp_path / 'DAVIS'}' is not a folder"):
        tool.main(args)
