#!/usr/bin/env python
"""Write the last block's self-attention maps of a ViT for an image or a folder of images.

    python tools/visualize_attention.py --weights FILE --image PATH_OR_FOLDER [--output DIR]
        [--image-size H [W]] [--threshold 0.6] [--figure-scale K] [--config FILE] [--checkpoint-key teacher]
        [KEY VALUE ...]

For every image (a file, or each image directly inside a folder, sorted by name) the tool writes to
``OUTPUT/<image stem>/``: ``img.png`` (the resized, cropped image the maps belong to),
``attn-head{i}.png`` (head i's [CLS]-to-patch attention, upsampled to the image, viridis colours),
``mask-head{i}.png`` unless ``--threshold`` is 0 (white: the fewest patches holding that fraction of
the head's attention; the default is the paper's 0.6) and ``figure.png`` (image, mean over heads, every head,
and the masks; ``--figure-scale K`` draws its panels K times larger). OUTPUT (default OUTPUT_DIR) also
gets the config and the log.

``--image-size`` takes H W, or one int for the shorter side; by default images keep their size.
Either way they are cropped to a multiple of the patch size. The architecture (and so the patch
size) comes from the checkpoint when it stores a config, else from --config and KEY VALUE options.
"""

import logging
import os

from PIL import Image

from dino_research.data.datasets import IMAGE_EXTENSIONS, load_image
from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device
from dino_research.evaluation import load_backbone
from dino_research.evaluation.attention import (
    attention_figure,
    check_attention_backbone,
    colorize,
    last_self_attention_maps,
    prepare_image,
    threshold_masks,
    upsample,
)

logger = logging.getLogger("dino_research")


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
    paths = image_paths(args.image)
    backbone = load_backbone(cfg, args.weights, args.checkpoint_key)
    name = cfg.MODEL.BACKBONE.NAME
    try:
        check_attention_backbone(backbone, f"{name} ({cfg.MODEL.BACKBONE.TIMM_MODEL})" if name == "timm" else name)
    except TypeError as e:
        raise SystemExit(str(e))
    device = resolve_device(cfg)
    backbone.to(device)
    p = backbone.patch_size
    for path in paths:
        image, tensor = prepare_image(load_image(path), p, cfg.INPUT.MEAN, cfg.INPUT.STD, args.image_size)
        grid = last_self_attention_maps(backbone, tensor.to(device))[0].cpu()  # (heads, H/p, W/p)
        maps = upsample(grid, p)  # (heads, H, W)
        masks = upsample(threshold_masks(grid, args.threshold), p) if args.threshold > 0 else None
        out = os.path.join(cfg.OUTPUT_DIR, os.path.splitext(os.path.basename(path))[0])
        os.makedirs(out, exist_ok=True)
        image.save(os.path.join(out, "img.png"))
        for i in range(maps.shape[0]):
            colorize(maps[i]).save(os.path.join(out, f"attn-head{i}.png"))
            if masks is not None:
                Image.fromarray(masks[i].numpy().astype("uint8") * 255).save(os.path.join(out, f"mask-head{i}.png"))
        k = args.figure_scale  # enlarges the figure only; the per-head PNGs stay at the image's size
        big = image.resize((image.width * k, image.height * k), Image.NEAREST) if k > 1 else image
        attention_figure(big, upsample(maps, k), None if masks is None else upsample(masks, k)).save(
            os.path.join(out, "figure.png"))
        logger.info("%s: %dx%d, %d heads -> %s", path, *image.size, maps.shape[0], out)


def argument_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--image", required=True, metavar="PATH_OR_FOLDER", help="an image, or a folder of images")
    parser.add_argument("--output", default="", metavar="DIR", help="output folder (default: OUTPUT_DIR)")
    parser.add_argument("--image-size", nargs="+", default=None, metavar="H [W]",
                        help="resize to H x W, or the shorter side to H (default: keep the size)")
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
    if args.figure_scale < 1:
        parser.error(f"--figure-scale must be a positive integer, got {args.figure_scale}")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1] (0: no masks), got {args.threshold}")
    return args


if __name__ == "__main__":
    main(parse_args())
