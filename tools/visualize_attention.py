#!/usr/bin/env python
"""Write the last block's self-attention maps of a ViT for an image or a folder of images.

    python tools/visualize_attention.py --weights FILE --image PATH_OR_FOLDER [--output DIR]
        [--image-size H [W]] [--max-size 1024] [--threshold 0.6] [--figure-scale K] [--config FILE]
        [--checkpoint-key teacher]
        [KEY VALUE ...]

For every image (a file, or each image directly inside a folder, sorted by name) the tool writes to
``OUTPUT/<image stem>/``: ``img.png`` (the resized, cropped image the maps belong to),
``attn-head{i}.png`` (head i's [CLS]-to-patch attention, upsampled to the image, viridis colours),
``mask-head{i}.png`` unless ``--threshold`` is 0 (white: the fewest patches holding that fraction of
the head's attention; the default is the paper's 0.6) and ``figure.png`` (image, mean over heads, every head,
and the masks; ``--figure-scale K`` draws its panels K times larger). OUTPUT (default OUTPUT_DIR) also
gets the config and the log.

``--image-size`` takes H W, or one int for the shorter side; by default images keep their size.
Then ``--max-size`` (default 1024) caps the longer side, aspect ratio kept, and the log says so: the
attention costs heads x (1 + H*W/p^2)^2 floats, so a 12-megapixel photo would ask for tens of GB
(raise the cap to keep more detail, 0 removes it). Either way images are cropped to a multiple of the
patch size, and turned upright by their EXIF orientation unless ``INPUT.EXIF_TRANSPOSE False``. The
architecture (and so the patch size) comes from the checkpoint when it stores a config, else from
--config and KEY VALUE options.

An image that cannot be drawn (unreadable, smaller than a patch) is reported by name and skipped;
the summary counts them. The exit status is non-zero only when no image at all could be drawn.

    python tools/visualize_attention.py --config FILE --weights FILE --jaccard N [--random-init]

measures DINO's segmentation property instead (``dino_research.evaluation.segmentation``): the
Jaccard index between each head's mask keeping ``--threshold`` (0.6) of its attention and the
foreground of N images spread over TEST.DATASET at TEST.VAL_ROOT (evaluation crop), for objects on a
black background such as Fashion-MNIST (foreground: pixels above ``--foreground-threshold``). Logs
the per-head table, the best head and the mean over heads, and writes OUTPUT/attention_jaccard.json.
``--random-init`` scores the config's backbone at the initialization a run with this SEED starts from.

    python tools/visualize_attention.py --weights FILE --video FILE_OR_FRAME_DIR [--per-head] [--fps 30]
        [--video-format auto|mp4|gif|frames] [--threshold 0.6] [--image-size H [W]] [--max-size 1024]

draws a clip instead (``dino_research.evaluation.attention_video``): for every frame (a folder's images
sorted by name, or a video file decoded with PyAV) OUTPUT/<clip name>/attention/NAME.png (mean over
heads, or every head side by side with ``--per-head``) and masks/NAME.png (the frame darkened outside
the mask keeping ``--threshold`` of the attention), then attention.mp4 and masks.mp4 (PyAV), or .gif
(Pillow) when PyAV is missing; ``--video-format frames`` keeps only the frame folders.
"""

import logging
import os

from PIL import Image

from dino_research.data.datasets import IMAGE_EXTENSIONS, UnreadableImageError, load_image
from dino_research.engine import (
    default_setup,
    eval_argument_parser,
    load_config,
    resolve_device,
    seed_all,
    write_results,
)
from dino_research.evaluation import load_backbone
from dino_research.evaluation.attention import (
    check_attention_backbone,
    colorize,
    limit_size,
    render_attention,
    resize_image,
)
from dino_research.evaluation.attention_video import VIDEO_FORMATS, write_attention_video
from dino_research.evaluation.segmentation import attention_jaccard_of_images
from dino_research.modeling import build_model
from dino_research.utils.errors import report_user_errors

logger = logging.getLogger("dino_research")

# Default cap of the longer image side, in pixels (--max-size): ViT-S/16 attention over 1024x768 pixels
# holds ~0.23 GB per block, what a laptop or a small GPU affords; ViT-S/8 needs 16x that.
DEFAULT_MAX_SIZE = 1024


def image_paths(path: str) -> list:
    """``path`` itself, or the image files directly inside the folder ``path``, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"--image {path}: no such file or folder")
    paths = [os.path.join(path, name) for name in sorted(os.listdir(path))
             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    if not paths:
        raise SystemExit(f"--image {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise SystemExit(f"--image {path}: several images share the name(s) {clashes}; outputs would overwrite")
    return paths


def main(args) -> None:
    opts = list(args.opts) + (["OUTPUT_DIR", args.output] if args.output else [])
    cfg = load_config(args.config_file, opts)
    default_setup(cfg, args)
    if args.random_init:
        seed_all(cfg.SEED)  # as the trainer does right before building the model
        backbone = build_model(cfg).backbone_for_eval().eval()
    else:
        backbone = load_backbone(cfg, args.weights, args.checkpoint_key)
    name = cfg.MODEL.BACKBONE.NAME
    try:
        check_attention_backbone(backbone, f"{name} ({cfg.MODEL.BACKBONE.TIMM_MODEL})" if name == "timm" else name)
    except TypeError as e:
        raise SystemExit(str(e)) from None
    device = resolve_device(cfg)
    backbone.to(device)
    if args.jaccard:
        jaccard_report(cfg, args, backbone, device)
        return
    if args.video:
        video_report(cfg, args, backbone, device)
        return
    paths = image_paths(args.image)
    skipped = []  # (path, reason)
    for path in paths:
        try:
            image = load_image(path, cfg.INPUT.EXIF_TRANSPOSE)
            drawable = sized_image(image, path, args)
            draw(backbone, drawable, path, cfg, args, device)
        except (UnreadableImageError, ValueError) as e:  # unreadable file; image smaller than a patch
            logger.warning("%s: skipped, %s", path, e)
            skipped.append((path, str(e)))
            continue
    drawn = len(paths) - len(skipped)
    summary = f"attention maps of {drawn} of {len(paths)} image(s) written to {cfg.OUTPUT_DIR}"
    if skipped:
        summary += f"; {len(skipped)} skipped: " + ", ".join(os.path.basename(p) for p, _ in skipped)
    if drawn == 0:
        raise SystemExit(f"no image could be drawn ({summary}): " + "; ".join(f"{p}: {r}" for p, r in skipped))
    (logger.warning if skipped else logger.info)("%s", summary)


def jaccard_report(cfg, args, backbone, device) -> dict:
    """The attention Jaccard of ``--jaccard`` N test images: logged as a table, written as JSON."""
    from dino_research.engine.hooks import attention_images

    images = attention_images(cfg, args.jaccard)
    result = attention_jaccard_of_images(backbone, images, None, cfg.INPUT.MEAN, cfg.INPUT.STD, device,
                                         threshold=args.threshold or 0.6, foreground=args.foreground_threshold)
    source = "random init" if args.random_init else f"{args.weights or cfg.MODEL.WEIGHTS} ({args.checkpoint_key})"
    rows = [f"| {i:4d} | {100 * j:7.2f} | {100 * a:9.1f} |"
            for i, (j, a) in enumerate(zip(result["per_head"].tolist(), result["mask_area"].tolist()))]
    logger.info("attention Jaccard (mask keeping %.0f%% of the mass vs foreground) of %d images of %s, %s:\n"
                "| head | Jaccard | mask area |\n%s\nbest head %d: %.2f; mean over heads: %.2f; the foreground "
                "covers %.1f%% of the image", 100 * (args.threshold or 0.6),
                len(images), cfg.TEST.DATASET, source, "\n".join(rows), result["best_head"],
                100 * result["best_head_jaccard"], 100 * result["mean_over_heads"], 100 * result["foreground_area"])
    summary = {"backbone": source, "num_images": len(images), "threshold": args.threshold or 0.6,
               "foreground_threshold": args.foreground_threshold,
               "per_head": [100 * j for j in result["per_head"].tolist()], "best_head": result["best_head"],
               "best_head_jaccard": 100 * result["best_head_jaccard"],
               "mean_over_heads": 100 * result["mean_over_heads"],
               "mask_area": [100 * a for a in result["mask_area"].tolist()],
               "foreground_area": 100 * result["foreground_area"]}
    write_results(cfg, "attention_jaccard.json", summary)
    return summary


def video_report(cfg, args, backbone, device) -> dict:
    """The attention frames and videos of the clip ``--video``, in OUTPUT/<clip name>/."""
    out = os.path.join(cfg.OUTPUT_DIR, os.path.splitext(os.path.basename(os.path.normpath(args.video)))[0])
    result = write_attention_video(backbone, args.video, out, mean=cfg.INPUT.MEAN, std=cfg.INPUT.STD, device=device,
                                   threshold=args.threshold, per_head=args.per_head, size=args.image_size,
                                   max_size=args.max_size, fps=args.fps, video_format=args.video_format)
    if not result["frames"]:
        raise SystemExit(f"--video {args.video}: no frame decoded")
    videos = [v for v in result["videos"].values() if v]
    logger.info("%s: %d frames of %dx%d -> %s; %s", args.video, result["frames"], *result["size"],
                ", ".join(result["folders"].values()),
                f"videos at {result['fps']:g} fps: {', '.join(videos)}" if videos
                else "no video assembled (see above; the frame folders are complete)")
    return result


def sized_image(image, path: str, args):
    """``image`` resized by ``--image-size``, then capped by ``--max-size``, logging the cap when it acts."""
    sized = resize_image(image, args.image_size)
    capped = limit_size(sized, args.max_size)
    if capped.size != sized.size:
        after = f" ({sized.width}x{sized.height} after --image-size)" if sized is not image else ""
        logger.info("%s is %dx%d%s: resized to %dx%d (--max-size %d; raise it to keep more detail)",
                    path, image.width, image.height, after, capped.width, capped.height, args.max_size)
    return capped


def draw(backbone, picture, path: str, cfg, args, device) -> str:
    """Write the maps, masks and figure of one image (already sized) to OUTPUT/<stem>/; returns that folder."""
    drawn = render_attention(backbone, picture, cfg.INPUT.MEAN, cfg.INPUT.STD, device=device, threshold=args.threshold,
                             scale=args.figure_scale)  # the scale enlarges the figure; per-head PNGs keep the size
    image, maps, masks = drawn["image"], drawn["maps"], drawn["masks"]
    out = os.path.join(cfg.OUTPUT_DIR, os.path.splitext(os.path.basename(path))[0])
    os.makedirs(out, exist_ok=True)
    image.save(os.path.join(out, "img.png"))
    for i in range(maps.shape[0]):
        colorize(maps[i]).save(os.path.join(out, f"attn-head{i}.png"))
        if masks is not None:
            Image.fromarray(masks[i].numpy().astype("uint8") * 255).save(os.path.join(out, f"mask-head{i}.png"))
    drawn["figure"].save(os.path.join(out, "figure.png"))
    logger.info("%s: %dx%d, %d heads -> %s", path, *image.size, maps.shape[0], out)
    return out


def argument_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--image", default="", metavar="PATH_OR_FOLDER", help="an image, or a folder of images")
    parser.add_argument("--video", default="", metavar="FILE_OR_FRAME_DIR",
                        help="a clip: a folder of frames, or a video file (needs PyAV)")
    parser.add_argument("--per-head", action="store_true", help="--video: every head side by side, not their mean")
    parser.add_argument("--fps", type=float, default=None,
                        help="--video: frame rate of the videos (default: the file's, else 30)")
    parser.add_argument("--video-format", default="auto", choices=VIDEO_FORMATS,
                        help="--video: auto (mp4 through PyAV, else gif), mp4, gif, or frames (folders only)")
    parser.add_argument("--jaccard", type=int, default=0, metavar="N",
                        help="instead of drawing, measure the attention Jaccard on N test images (see above)")
    parser.add_argument("--foreground-threshold", type=float, default=0.05,
                        help="--jaccard: a pixel whose brightest channel exceeds this (0-1 scale) is foreground")
    parser.add_argument("--random-init", action="store_true",
                        help="the config's backbone at its initialization (SEED) instead of --weights")
    parser.add_argument("--output", default="", metavar="DIR", help="output folder (default: OUTPUT_DIR)")
    parser.add_argument("--image-size", nargs="+", default=None, metavar="H [W]",
                        help="resize to H x W, or the shorter side to H (default: keep the size)")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, metavar="PIXELS",
                        help=f"shrink images whose longer side exceeds PIXELS (after --image-size; default "
                             f"{DEFAULT_MAX_SIZE}; 0: never). Attention memory grows with the square of the pixel "
                             f"count: 1024x768 at patch 16 needs ~0.23 GB for ViT-S, 4000x3000 ~53 GB")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="also write masks keeping this fraction of each head's attention (default: the "
                             "paper's 0.6; 0: no masks)")
    parser.add_argument("--figure-scale", type=int, default=1, metavar="K",
                        help="draw figure.png's panels K times larger, pixels repeated (e.g. 4 for 28-pixel images, "
                             "whose labels are cut otherwise)")
    return parser


def parse_args(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.image_size is not None:
        # nargs="+" also swallows the KEY VALUE options written right after --image-size: give them back.
        n = next((i for i, v in enumerate(args.image_size) if not v.isdigit()), len(args.image_size))
        args.image_size, args.opts = [int(v) for v in args.image_size[:n]], args.image_size[n:] + list(args.opts)
        if len(args.image_size) not in (1, 2) or min(args.image_size) < 1:
            parser.error("--image-size takes H W, or one int for the shorter side (positive integers)")
    if not args.image and not args.jaccard and not args.video:
        parser.error("give --image PATH_OR_FOLDER to draw maps, --video FILE_OR_FRAME_DIR to draw a clip, or "
                     "--jaccard N to measure them")
    if args.image and args.video:
        parser.error("--image and --video draw different things: give one")
    if args.fps is not None and args.fps <= 0:
        parser.error(f"--fps must be positive, got {args.fps}")
    if args.random_init and args.weights:
        parser.error("--random-init takes no --weights")
    if args.max_size < 0:
        parser.error(f"--max-size must be a number of pixels, or 0 for no limit, got {args.max_size}")
    if args.figure_scale < 1:
        parser.error(f"--figure-scale must be a positive integer, got {args.figure_scale}")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1] (0: no masks), got {args.threshold}")
    return args


if __name__ == "__main__":
    with report_user_errors():  # a bad config, file or folder: one message, no traceback
        main(parse_args())
