"""Attention videos of a generated 4-frame clip: frames written, then a GIF (or an MP4 with PyAV)."""

import numpy as np
import pytest
from PIL import Image
from tool_utils import load_tool

from dino_research.evaluation import attention_video
from dino_research.evaluation.attention_video import read_clip, write_attention_video, write_video
from dino_research.modeling import build_model
from dino_research.utils.errors import UserError

H, W = 32, 48  # a 4 x 6 grid at patch 8
TINY = {"MODEL.BACKBONE.DEPTH": 2, "MODEL.BACKBONE.PATCH_SIZE": 8}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def clip(tmp_path):
    """4 frames of a bright square moving over a gradient, as a folder of PNGs."""
    folder = tmp_path / "clip"
    folder.mkdir()
    y, x = np.mgrid[0:H, 0:W]
    for t in range(4):
        pixels = np.stack([x * 5, y * 7, np.full_like(x, 60)], axis=-1).astype(np.uint8)
        pixels[8:24, 8 * t:8 * t + 16] = 255
        Image.fromarray(pixels).save(folder / f"{t:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    return folder


@pytest.fixture
def backbone(make_tiny_cfg):
    return build_model(make_tiny_cfg(**TINY)).backbone_for_eval().eval()  # 3 heads


def test_frames_then_a_video(tmp_path, clip, backbone):
    out = tmp_path / "out"
    result = write_attention_video(backbone, str(clip), str(out), mean=MEAN, std=STD, device="cpu", fps=5)
    assert result["frames"] == 4 and result["size"] == (W, H) and result["fps"] == 5
    for folder in ("attention", "masks"):
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == ["000.png", "001.png", "002.png", "003.png"]
        assert all(Image.open(out / folder / n).size == (W, H) for n in names)
    for kind, video in result["videos"].items():
        assert video in (str(out / ("masks" if kind == "mask" else kind)) + ext for ext in (".mp4", ".gif"))
        if video.endswith(".gif"):  # without PyAV
            with Image.open(video) as gif:
                assert gif.n_frames == 4 and gif.size == (W, H) and gif.info["duration"] == 200


def test_per_head_frames_no_masks_no_video(tmp_path, clip, backbone):
    out = tmp_path / "out"
    result = write_attention_video(backbone, str(clip), str(out), mean=MEAN, std=STD, device="cpu", per_head=True,
                                   threshold=0, video_format="frames")
    assert result["videos"] == {"attention": None} and not (out / "masks").exists()
    assert result["fps"] == attention_video.DEFAULT_FPS  # a folder has no frame rate
    assert Image.open(out / "attention" / "000.png").size == (3 * W, H)  # the three heads side by side


def test_gif_when_pyav_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(attention_video, "_pyav", lambda: None)
    paths = []
    for t in range(3):
        paths.append(str(tmp_path / f"{t}.png"))
        Image.new("RGB", (10, 6), (80 * t, 0, 0)).save(paths[-1])
    assert write_video(paths, str(tmp_path / "v"), fps=10) == str(tmp_path / "v.gif")
    assert Image.open(tmp_path / "v.gif").n_frames == 3
    with pytest.raises(UserError, match="needs PyAV"):
        write_video(paths, str(tmp_path / "v"), fps=10, video_format="mp4")
    (tmp_path / "movie.mp4").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="needs PyAV .*ffmpeg -i"):
        read_clip(str(tmp_path / "movie.mp4"))
    with pytest.raises(UserError, match="no such file or folder"):
        read_clip(str(tmp_path / "missing"))


def test_mp4_through_pyav(tmp_path, clip, backbone):
    pytest.importorskip("av")
    out = tmp_path / "out"
    result = write_attention_video(backbone, str(clip), str(out), mean=MEAN, std=STD, device="cpu", video_format="mp4")
    assert result["videos"]["attention"] == str(out / "attention.mp4")
    frames, fps = read_clip(result["videos"]["attention"])  # and the file decodes back to 4 frames
    assert len(list(frames)) == 4 and fps == pytest.approx(30)


def test_tool_draws_a_clip(tmp_path, clip, monkeypatch):
    tool = load_tool("visualize_attention")
    monkeypatch.setattr(tool, "default_setup", lambda cfg, args: None)  # no log handlers left behind
    tiny = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", "2", "MODEL.BACKBONE.PATCH_SIZE", "8",
            "MODEL.HEAD.OUT_DIM", "64", "MODEL.DEVICE", "cpu"]
    args = tool.parse_args(["--random-init", "--video", str(clip), "--output", str(tmp_path / "out"), *tiny])
    tool.main(args)
    assert len(list((tmp_path / "out" / "clip" / "attention").glob("*.png"))) == 4
    assert len(list((tmp_path / "out" / "clip" / "masks").glob("*.png"))) == 4
    assert list((tmp_path / "out" / "clip").glob("attention.*"))
    with pytest.raises(SystemExit):
        tool.parse_args(["--video", str(clip), "--image", str(clip)])
