"""Self-attention videos: the last block's [CLS] attention of every frame of a clip (the DINO blog
post's videos; the reference is facebookresearch/dino ``video_generation.py``).

Each frame is prepared like an image of ``tools/visualize_attention.py`` (optional resize, the
longer side capped, cropped to a patch multiple) and gets its attention maps
(:func:`~dino_research.evaluation.attention.last_self_attention_maps`, upsampled to the frame) and the
masks keeping ``threshold`` of the mass (:func:`~dino_research.evaluation.attention.threshold_masks`).
Two pictures per frame are written: ``attention/NAME.png`` (the mean over heads, or every head side
by side, viridis colours scaled per frame as the reference's ``plt.imsave``) and, unless the
threshold is 0, ``masks/NAME.png`` (the frame darkened outside the mask). Then each folder becomes a
video: MP4 through PyAV when it is installed, else an animated GIF through Pillow; the frame folders
always remain.

A clip is a folder of frames (any image type, sorted by name: always works) or a video file, which
needs PyAV (``pip install av``) to be decoded; torchvision >= 0.22 no longer reads or writes videos.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..data.folders import is_image_name
from ..data.images import load_image
from ..utils.errors import UserError
from .attention import colorize, last_self_attention_maps, mask_overlay, prepare_image, threshold_masks, upsample

__all__ = ["DEFAULT_FPS", "VIDEO_FORMATS", "attention_frame", "read_clip", "write_attention_video", "write_video"]

logger = logging.getLogger("dino_research")

# Frame rate of a video assembled from a folder of frames (the reference's default).
DEFAULT_FPS = 30.0
# write_video's formats: "auto" = mp4 when PyAV works, else gif; "frames" = the folders only.
VIDEO_FORMATS = ("auto", "mp4", "gif", "frames")


def _pyav():
    """The ``av`` module, or None when PyAV is not installed."""
    try:
        import av
    except ImportError:
        return None
    return av


def read_clip(source: str) -> tuple[Iterator[tuple[str, Image.Image]], float | None]:
    """``(frames, fps)``: an iterator of (name, RGB image) in order, and the file's frame rate (None
    for a folder). A folder gives its image files sorted by name (hidden ones skipped), each named by
    its stem; a video file gives ``frame-00000``, ``frame-00001``, ... decoded with PyAV.

    Raises :class:`UserError` for a missing path, a folder without images, a single image (use
    ``--image``) or a video file without PyAV.
    """
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if is_image_name(n) and not n.startswith("."))
        if not names:
            raise UserError(f"--video {source}: no image files in this folder")
        return ((os.path.splitext(n)[0], load_image(os.path.join(source, n))) for n in names), None
    if not os.path.isfile(source):
        raise UserError(f"--video {source}: no such file or folder")
    if is_image_name(source):
        raise UserError(f"--video {source} is one image: pass it with --image, or give a folder of frames")
    av = _pyav()
    if av is None:
        raise UserError(f"--video {source}: decoding a video file needs PyAV (pip install av); or extract its "
                        f"frames first (ffmpeg -i {source} FRAMES/%05d.png) and pass --video FRAMES")
    try:
        container = av.open(source)
        stream = container.streams.video[0]
    except Exception as e:  # PyAV's errors (not a video, no video stream) have many types
        raise UserError(f"--video {source}: PyAV cannot read a video stream from it ({type(e).__name__}: {e})") from e
    fps = float(stream.average_rate) if stream.average_rate else None

    def frames():
        with container:
            for i, frame in enumerate(container.decode(stream)):
                yield f"frame-{i:05d}", frame.to_image().convert("RGB")

    return frames(), fps


@torch.no_grad()
def attention_frame(backbone: nn.Module, image: Image.Image, mean: Sequence[float], std: Sequence[float], *,
                    device, threshold: float = 0.6, per_head: bool = False, size=None,
                    max_size: int | None = None) -> dict:
    """One frame's pictures: ``{"image": the prepared RGB frame (W, H), "attention": RGB picture,
    "mask": RGB picture or None when threshold is 0}``.

    ``per_head`` False: the mean of the heads' (h, w) maps, and the mask keeping ``threshold`` of that
    mean's mass, both (W, H). True: every head's map (and mask) side by side, (heads * W, H).
    ``size``/``max_size``: as :func:`~dino_research.evaluation.attention.prepare_image`.
    """
    p = backbone.patch_size
    picture, tensor = prepare_image(image, p, mean, std, size=size, max_size=max_size)
    grid = last_self_attention_maps(backbone, tensor.to(device))[0].float().cpu()  # (heads, h, w)
    if not per_head:
        grid = grid.mean(0, keepdim=True)
    maps = upsample(grid, p)  # (panels, H, W)
    attention = _side_by_side([colorize(m) for m in maps])
    mask = None
    if threshold > 0:
        masks = upsample(threshold_masks(grid, threshold), p).numpy()
        mask = _side_by_side([mask_overlay(picture, m) for m in masks])
    return {"image": picture, "attention": attention, "mask": mask}


def _side_by_side(panels: list) -> Image.Image:
    if len(panels) == 1:
        return panels[0]
    return Image.fromarray(np.concatenate([np.asarray(p) for p in panels], axis=1))


def write_video(frame_paths: Sequence[str], path: str, fps: float, video_format: str = "auto") -> str | None:
    """Assemble the images ``frame_paths`` (all one size) into ``path`` + ".mp4" or ".gif"; returns the
    file written, or None for ``video_format`` "frames" or when no writer works (logged).

    "auto": MP4 (H.264, else MPEG-4 part 2) through PyAV when it is installed, else a looping GIF
    through Pillow. "mp4" without PyAV is a :class:`UserError`.
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    if video_format == "frames" or not frame_paths:
        return None
    av = _pyav()
    if video_format == "mp4" and av is None:
        raise UserError("an MP4 needs PyAV (pip install av); use --video-format gif, or assemble the frames with "
                        "ffmpeg")
    if video_format in ("auto", "mp4") and av is not None:
        try:
            return _write_mp4(av, frame_paths, path + ".mp4", fps)
        except Exception as e:  # a PyAV build without either encoder, a full disk...
            if video_format == "mp4":
                raise
            logger.warning("PyAV could not write %s.mp4 (%s: %s): writing a GIF instead", path, type(e).__name__, e)
    try:
        frames = [Image.open(p).convert("RGB") for p in frame_paths]
        # GIF delays are in hundredths of a second: 30 fps plays at ~33 fps (Pillow rounds to 30 ms).
        frames[0].save(path + ".gif", save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)),
                       loop=0)
        return path + ".gif"
    except Exception as e:
        logger.warning("could not write %s.gif (%s: %s); the frames stay in %s (ffmpeg -framerate %g -i ... "
                       "assembles them)", path, type(e).__name__, e, os.path.dirname(frame_paths[0]), fps)
        return None


def _write_mp4(av, frame_paths: Sequence[str], path: str, fps: float) -> str:
    with Image.open(frame_paths[0]) as first:
        W, H = first.size
    # yuv420p stores colour per 2x2 block: odd sides are padded by one black row/column.
    width, height = W + W % 2, H + H % 2
    with av.open(path, mode="w") as container:
        for codec in ("libx264", "mpeg4"):
            try:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                break
            except Exception:  # this PyAV build lacks the encoder: try the next
                stream = None
        if stream is None:
            raise RuntimeError("PyAV has neither the libx264 nor the mpeg4 encoder")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame_path in frame_paths:
            canvas = Image.new("RGB", (width, height))
            with Image.open(frame_path) as image:
                canvas.paste(image.convert("RGB"), (0, 0))
            for packet in stream.encode(av.VideoFrame.from_image(canvas)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def write_attention_video(backbone: nn.Module, source: str, output_dir: str, *, mean: Sequence[float],
                          std: Sequence[float], device, threshold: float = 0.6, per_head: bool = False, size=None,
                          max_size: int | None = None, fps: float | None = None,
                          video_format: str = "auto") -> dict:
    """Write the attention (and mask) frames of the clip ``source`` (:func:`read_clip`) to
    ``output_dir/attention/`` (and ``output_dir/masks/``), then ``output_dir/attention.mp4|gif`` (and
    ``masks.mp4|gif``) at ``fps`` (default: the file's rate, else :data:`DEFAULT_FPS`).

    Returns ``{"frames": count, "size": (W, H) of a frame, "fps", "folders": {kind: folder},
    "videos": {kind: file or None}}``. Raises :class:`UserError` when frames prepare to different
    sizes (a video needs one size).
    """
    frames, file_fps = read_clip(source)
    fps = fps or file_fps or DEFAULT_FPS
    kinds = ("attention", "mask") if threshold > 0 else ("attention",)
    folders = {kind: os.path.join(output_dir, "attention" if kind == "attention" else "masks") for kind in kinds}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    written = {kind: [] for kind in kinds}
    frame_size = None
    for name, image in frames:
        drawn = attention_frame(backbone, image, mean, std, device=device, threshold=threshold, per_head=per_head,
                                size=size, max_size=max_size)
        if frame_size is None:
            frame_size = drawn["image"].size
        elif drawn["image"].size != frame_size:
            raise UserError(f"--video {source}: frame {name} prepares to {drawn['image'].size[0]}x"
                            f"{drawn['image'].size[1]}, the first to {frame_size[0]}x{frame_size[1]}: a video "
                            f"needs frames of one size (resize them, or pass --image-size H W)")
        for kind in kinds:
            path = os.path.join(folders[kind], f"{name}.png")
            drawn[kind].save(path)
            written[kind].append(path)
    videos = {kind: write_video(written[kind], folders[kind], fps, video_format) for kind in kinds}
    return {"frames": len(written["attention"]), "size": frame_size, "fps": fps, "folders": folders, "videos": videos}
