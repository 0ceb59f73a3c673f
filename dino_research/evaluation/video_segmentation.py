"""Semi-supervised video object segmentation by label propagation (the DINO paper's Table 5).

The first frame's annotation is carried through the video with nearest neighbours between frozen
patch features, nothing trained (the reference: facebookresearch/dino ``eval_video_segmentation.py``,
itself after UVC). For every frame t > 0:

1. its patch features (last block, final norm, [CLS] dropped, L2-normalized) are compared with those
   of a *context*: the first frame (with its annotation) and the ``n_last_frames`` (7) previous
   frames (with their propagated, still soft, labels);
2. each target patch keeps, among the context patches within ``size_mask_neighborhood`` (12) patches
   of its position (a (2*12+1)^2 window, in every context frame), the ``topk`` (5) most similar ones,
   and takes the average of their labels weighted by softmax(cosine / 0.1) (:func:`propagate_labels`);
3. the soft labels, bilinearly upsampled to the frame, are min-max normalized per class (background too) and the
   argmax is the prediction, resized (nearest) to the original frame size.

Frames are resized like the reference's: the shorter side to ``short_side`` (480), the longer to the
proportional length rounded *down* to a multiple of ``multiple`` (64): 480x854 DAVIS frames become
480x832, a 30x52 grid at patch 16. The first annotation is downsampled to the grid with nearest
neighbours. Frames are normalized with the config's ``INPUT.MEAN``/``INPUT.STD`` (the reference
writes 0.228 for the red std, a typo of ImageNet's 0.229).

The DAVIS-2017 layout (:data:`DAVIS_LAYOUT`) is read by :func:`davis_video_names` and
:func:`read_davis_video`; predictions are written as indexed PNGs with the first annotation's palette
(the DAVIS one), which is what the official evaluation reads.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from ..data.build import DatasetError
from ..data.images import UnreadableImageError, load_image, to_rgb
from .attention import crop_to_patch_multiple
from .davis_metrics import VOID_LABEL, evaluate_sequence

__all__ = [
    "DAVIS_LAYOUT",
    "DavisVideo",
    "check_propagation_backbone",
    "davis_palette",
    "davis_video_names",
    "frame_size",
    "labels_from_scores",
    "neighborhood_mask",
    "patch_features",
    "prepare_frame",
    "propagate_labels",
    "read_annotation",
    "read_davis_video",
    "segment_davis_video",
    "segment_video",
    "write_indexed_png",
]

logger = logging.getLogger("dino_research")

DAVIS_LAYOUT = ("ROOT/ImageSets/2017/SPLIT.txt (one video name a line), ROOT/JPEGImages/480p/VIDEO/00000.jpg, "
                "00001.jpg, ... and ROOT/Annotations/480p/VIDEO/00000.png, ... (indexed PNGs of object ids; at "
                "least the first frame's, all of them to be scored), as unpacked from DAVIS-2017-trainval-480p.zip")


# ------------------------------------------------------------------------------------ DAVIS files
def davis_palette() -> list:
    """The DAVIS (PASCAL VOC) palette, 256 RGB colours flattened (768 ints): colour k spreads the bits
    of k over the three channels, most significant first (1 red, 2 green, 3 olive, 4 blue, ...).
    Used when the first annotation carries no palette."""
    k = np.arange(256)
    rgb = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):  # bits 3b, 3b+1, 3b+2 of k go to bit 7-b of red, green, blue
        for channel in range(3):
            rgb[:, channel] |= ((k >> (3 * bit + channel)) & 1) << (7 - bit)
    return rgb.flatten().tolist()


def read_annotation(path: str) -> tuple[np.ndarray, list | None]:
    """An indexed PNG of object ids -> (labels (H, W) uint8, its palette as 768 ints or None)."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:
        raise DatasetError(f"{path}: unreadable annotation ({type(e).__name__}: {e})") from e
    if image.mode not in ("P", "L"):
        raise DatasetError(f"{path}: a {image.mode} image; annotations are indexed (P) PNGs whose pixel values "
                           f"are object ids (0 background, 1..N objects, {VOID_LABEL} void)")
    palette = image.getpalette() if image.mode == "P" else None
    if palette is not None:
        palette = (palette + [0] * 768)[:768]
    return np.array(image, dtype=np.uint8), palette


def write_indexed_png(path: str, labels: np.ndarray, palette: Sequence[int]) -> None:
    """Write labels (H, W) (values 0..255) as an indexed PNG with ``palette`` (768 ints)."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(list(palette))
    image.save(path, format="PNG")


@dataclass
class DavisVideo:
    """One DAVIS video: ``frames`` (sorted .jpg paths), ``annotations`` {frame stem: .png path}."""

    name: str
    frames: list
    annotations: dict = field(default_factory=dict)

    @property
    def stems(self) -> list:
        return [os.path.splitext(os.path.basename(p))[0] for p in self.frames]

    @property
    def fully_annotated(self) -> bool:
        """Whether every frame has an annotation (train/val); test-dev gives only the first."""
        return all(stem in self.annotations for stem in self.stems)


def davis_video_names(root: str, split: str = "val", videos: Sequence[str] | None = None) -> list:
    """The videos of ``ROOT/ImageSets/2017/SPLIT.txt``, in file order; only ``videos`` when given.
    Raises :class:`DatasetError` naming the path and :data:`DAVIS_LAYOUT`."""
    if not os.path.isdir(root):
        raise DatasetError(f"DAVIS root {root!r} is not a folder; expected {DAVIS_LAYOUT}")
    list_file = os.path.join(root, "ImageSets", "2017", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise DatasetError(f"DAVIS split list {list_file} not found; expected {DAVIS_LAYOUT}")
    with open(list_file) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DatasetError(f"DAVIS split list {list_file} names no video")
    if videos:
        unknown = [v for v in videos if v not in names]
        if unknown:
            raise DatasetError(f"--videos {', '.join(unknown)}: not in {list_file} (which lists "
                               f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        names = [n for n in names if n in set(videos)]
    return names


def read_davis_video(root: str, name: str) -> DavisVideo:
    """The frames and annotations of video ``name``; raises :class:`DatasetError` when its frame folder
    is missing or empty, or the first frame has no annotation."""
    frame_dir = os.path.join(root, "JPEGImages", "480p", name)
    if not os.path.isdir(frame_dir):
        raise DatasetError(f"DAVIS video {name!r}: no frame folder {frame_dir}; expected {DAVIS_LAYOUT}")
    frames = sorted(os.path.join(frame_dir, n) for n in os.listdir(frame_dir) if n.lower().endswith(".jpg"))
    if not frames:
        raise DatasetError(f"DAVIS video {name!r}: no .jpg frame in {frame_dir}; expected {DAVIS_LAYOUT}")
    annotation_dir = os.path.join(root, "Annotations", "480p", name)
    annotations = {}
    if os.path.isdir(annotation_dir):
        annotations = {os.path.splitext(n)[0]: os.path.join(annotation_dir, n)
                       for n in sorted(os.listdir(annotation_dir)) if n.lower().endswith(".png")}
    video = DavisVideo(name, frames, annotations)
    if video.stems[0] not in annotations:
        missing = os.path.join(annotation_dir, video.stems[0] + ".png")
        raise DatasetError(f"DAVIS video {name!r}: the first frame's annotation {missing} is missing; "
                           f"expected {DAVIS_LAYOUT}")
    return video


# ------------------------------------------------------------------------------------ features
def frame_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """(H', W') a frame is resized to: the shorter side ``short_side``, the other the proportional
    length rounded down to a multiple of ``multiple`` (the reference's rule); ``short_side`` 0 keeps
    (height, width). A square frame counts as wide."""
    if not short_side:
        return height, width
    if height <= width:
        size = (short_side, int(short_side * width / height // multiple * multiple))
    else:
        size = (int(short_side * height / width // multiple * multiple), short_side)
    if min(size) < 1:
        raise ValueError(f"a {height}x{width} frame at short side {short_side}, rounded to a multiple of "
                         f"{multiple}, has no pixel left: lower the multiple")
    return size


def prepare_frame(image: Image.Image, patch_size: int, mean: Sequence[float], std: Sequence[float], *,
                  short_side: int = 480, multiple: int = 64) -> torch.Tensor:
    """RGB image -> normalized (1, 3, H', W'): resized by :func:`frame_size` (bilinear, no antialias,
    as the reference's OpenCV resize), then cropped to a multiple of ``patch_size``."""
    tensor = TF.to_tensor(to_rgb(image)).unsqueeze(0)
    size = frame_size(*tensor.shape[-2:], short_side, multiple)
    if size != tuple(tensor.shape[-2:]):
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    tensor = crop_to_patch_multiple(tensor, patch_size)
    return TF.normalize(tensor, list(mean), list(std))


def check_propagation_backbone(backbone: nn.Module) -> None:
    """Raise ``TypeError`` unless ``backbone`` is a ViT with ``get_intermediate_layers(x, n)`` returning
    [CLS] + patch tokens and an int ``patch_size`` (dino_research's vit_tiny / vit_small / vit_base)."""
    if not callable(getattr(backbone, "get_intermediate_layers", None)) or not isinstance(
            getattr(backbone, "patch_size", None), int):
        raise TypeError(f"label propagation needs a ViT backbone with get_intermediate_layers(x, n) and an int "
                        f"patch_size (vit_tiny, vit_small, vit_base); got a {type(backbone).__name__}")


@torch.no_grad()
def patch_features(backbone: nn.Module, frame: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Frame (1, 3, H, W), H and W multiples of the patch size p -> (L2-normalized patch features
    (h*w, D) of the last block after the final norm, row-major; (h, w) = (H/p, W/p))."""
    check_propagation_backbone(backbone)
    p = backbone.patch_size
    h, w = frame.shape[-2] // p, frame.shape[-1] // p
    tokens = backbone.get_intermediate_layers(frame, n=1)[0][0]  # (1 + h*w, D), [CLS] first
    if tokens.shape[0] != 1 + h * w:
        raise ValueError(f"expected 1 + {h}x{w} tokens for a {tuple(frame.shape[-2:])} frame, got {tokens.shape[0]}")
    return F.normalize(tokens[1:].float(), dim=-1), (h, w)


def neighborhood_mask(h: int, w: int, size: int) -> torch.Tensor:
    """Bool (h*w, h*w): [t, s] is True when patches t and s (row-major in an h x w grid) are at most
    ``size`` rows and ``size`` columns apart: the (2*size+1)^2 window ("local attention") from which a
    target patch may take labels."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)  # (h*w,) each
    near_rows = (rows[:, None] - rows[None, :]).abs() <= size
    near_cols = (cols[:, None] - cols[None, :]).abs() <= size
    return near_rows & near_cols


def propagate_labels(target_features: torch.Tensor, source_features: torch.Tensor, source_labels: torch.Tensor, *,
                     topk: int = 5, temperature: float = 0.1,
                     neighborhood_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One frame of label propagation: soft labels (C, N) of the N target patches.

    ``target_features`` (N, D); ``source_features`` (S, M, D) of S context frames of M patches;
    ``source_labels`` (S, C, M) their soft labels over C classes (background first); rows of features
    are L2-normalized here. ``neighborhood_mask`` (N, M) bool, [t, s] True where source patch s may
    give its label to target patch t (in every context frame); None: no restriction.

    Target patch t takes the ``topk`` allowed context patches (over all S frames together) of highest
    cosine similarity c and averages their labels with weights softmax(c / ``temperature``): the
    reference's exp(c / 0.1) normalized over the kept neighbours. (The reference keeps every value
    tied with the k-th; ties of float similarities are vanishingly rare.)
    """
    if source_features.dim() != 3 or source_labels.dim() != 3 or source_labels.shape[0] != source_features.shape[0]:
        raise ValueError(f"expected source features (S, M, D) and labels (S, C, M), got "
                         f"{tuple(source_features.shape)} and {tuple(source_labels.shape)}")
    S, M, _ = source_features.shape
    C = source_labels.shape[1]
    target = F.normalize(target_features, dim=-1)
    sources = F.normalize(source_features, dim=-1)
    # The best k overall are among the best k of each frame: ranking frame by frame holds one (N, M)
    # similarity matrix at a time instead of (S, N, M) (1.2 GB for 8 frames at patch 8 on DAVIS).
    values, indices = [], []
    for s in range(S):
        similarity = target @ sources[s].T  # (N, M)
        if neighborhood_mask is not None:
            similarity = similarity.masked_fill(~neighborhood_mask, float("-inf"))
        v, i = similarity.topk(min(topk, M), dim=1)
        values.append(v)
        indices.append(i + s * M)  # index into the S*M context patches
    values, position = torch.cat(values, dim=1).topk(min(topk, S * M), dim=1)  # (N, k)
    indices = torch.cat(indices, dim=1).gather(1, position)
    weights = torch.softmax(values / temperature, dim=1)  # masked-out (-inf) neighbours weigh 0
    labels = source_labels.permute(1, 0, 2).reshape(C, S * M)  # (C, S*M), frame-major like indices
    return (labels[:, indices] * weights).sum(dim=-1)  # (C, N, k) -> (C, N)


def labels_from_scores(scores: torch.Tensor, patch_size: int, size: tuple[int, int]) -> np.ndarray:
    """Soft labels (C, h, w) -> label map (H, W) uint8, (H, W) = ``size``.

    As the reference: bilinear upsampling by ``patch_size``, each class's map min-max scaled to [0, 1]
    (when its maximum is positive; a constant map becomes 0 where the reference divides by zero),
    argmax over classes, then a nearest-neighbour resize to ``size`` (the original frame).
    """
    up = F.interpolate(scores[None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
    flat = up.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = torch.where(high - low > 0, high - low, torch.ones_like(high))
    scaled = torch.where(high > 0, (flat - low) / span, flat).reshape(up.shape)
    labels = scaled.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


# ------------------------------------------------------------------------------------ one video
def _load_frame(frame) -> Image.Image:
    # DAVIS annotations index the stored pixels: EXIF orientation is not applied.
    return load_image(frame, exif_transpose=False) if isinstance(frame, str) else to_rgb(frame)


@torch.no_grad()
def segment_video(backbone: nn.Module, frames: Sequence, first_labels: np.ndarray, *, n_last_frames: int = 7,
                  size_mask_neighborhood: int = 12, topk: int = 5, temperature: float = 0.1,
                  short_side: int = 480, multiple: int = 64, mean: Sequence[float] = (0.485, 0.456, 0.406),
                  std: Sequence[float] = (0.229, 0.224, 0.225), device="cpu") -> list:
    """Propagate ``first_labels`` (H, W) (object ids, 255 void = background) through ``frames`` (T
    paths or RGB images of size (W, H)); returns T label maps (H, W) uint8, the first being
    ``first_labels`` itself (as the reference writes it).

    ``backbone`` in eval mode on ``device``; see the module docstring for the protocol.
    ``size_mask_neighborhood`` 0 lifts the spatial restriction (as in the reference).
    """
    if n_last_frames < 0 or topk < 1:
        raise ValueError(f"n_last_frames must be >= 0 and topk >= 1, got {n_last_frames} and {topk}")
    p = backbone.patch_size
    first_labels = np.asarray(first_labels, dtype=np.uint8)
    first = _load_frame(frames[0])
    if first.size != first_labels.shape[::-1]:
        raise ValueError(f"the first annotation is {first_labels.shape[1]}x{first_labels.shape[0]} but the first "
                         f"frame {first.width}x{first.height} (WxH)")
    prepare = dict(mean=mean, std=std, short_side=short_side, multiple=multiple)
    first_features, (h, w) = patch_features(backbone, prepare_frame(first, p, **prepare).to(device))
    objects = np.where(first_labels == VOID_LABEL, 0, first_labels)  # void: background, as for scoring
    grid = np.array(Image.fromarray(objects).resize((w, h), Image.NEAREST))  # (h, w) object ids
    # Classes from the full-size annotation: the reference counts them on the grid, so its last object
    # disappears when it covers no patch centre; here that object keeps its (empty) channel.
    num_classes = int(objects.max()) + 1  # background + objects
    first_scores = F.one_hot(torch.from_numpy(grid).long().flatten(), num_classes).T.float().to(device)  # (C, h*w)
    mask = neighborhood_mask(h, w, size_mask_neighborhood).to(device) if size_mask_neighborhood > 0 else None
    previous = deque(maxlen=n_last_frames)  # (features, soft labels) of the n_last_frames frames before this one
    predictions = [first_labels]
    for t in range(1, len(frames)):
        image = _load_frame(frames[t])
        if image.size != first.size:
            raise ValueError(f"frame {t} is {image.width}x{image.height}, frame 0 {first.width}x{first.height}")
        features, _ = patch_features(backbone, prepare_frame(image, p, **prepare).to(device))
        context = [(first_features, first_scores), *previous]
        scores = propagate_labels(features, torch.stack([f for f, _ in context]), torch.stack([s for _, s in context]),
                                  topk=topk, temperature=temperature, neighborhood_mask=mask)
        previous.append((features, scores))  # soft labels, not the argmax: the reference's queue
        predictions.append(labels_from_scores(scores.reshape(num_classes, h, w), p, first_labels.shape))
    return predictions


def segment_davis_video(backbone: nn.Module, root: str, name: str, output_dir: str, **protocol) -> dict:
    """Segment DAVIS video ``name`` under ``root`` (:func:`segment_video` with ``protocol``), write
    ``output_dir/NAME/FRAME.png`` for every frame, and score it when every frame is annotated.

    Returns ``{"name", "frames": T, "objects": N, "scores": evaluate_sequence(...) or None}``.
    Raises :class:`DatasetError` for a layout problem or an unreadable frame.
    """
    video = read_davis_video(root, name)
    first_labels, palette = read_annotation(video.annotations[video.stems[0]])
    try:
        predictions = segment_video(backbone, video.frames, first_labels, **protocol)
    except (UnreadableImageError, ValueError) as e:  # a broken frame; frames or annotation of other sizes
        raise DatasetError(f"DAVIS video {name!r}: {e}") from e
    folder = os.path.join(output_dir, name)
    os.makedirs(folder, exist_ok=True)
    for stem, labels in zip(video.stems, predictions):
        write_indexed_png(os.path.join(folder, f"{stem}.png"), labels, palette or davis_palette())
    scores = None
    if video.fully_annotated and len(video.frames) >= 3:
        annotations = [read_annotation(video.annotations[stem])[0] for stem in video.stems]
        shapes = {a.shape for a in annotations}
        if shapes != {first_labels.shape}:
            raise DatasetError(f"DAVIS video {name!r}: annotations of sizes {sorted(shapes)} in one video")
        scores = evaluate_sequence(np.stack(predictions), np.stack(annotations))
    num_objects = int(np.where(first_labels == VOID_LABEL, 0, first_labels).max())
    return {"name": name, "frames": len(video.frames), "objects": num_objects, "scores": scores}
