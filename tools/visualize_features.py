#!/usr/bin/env python
"""Pictures of a ViT's patch features.

    python tools/visualize_features.py --pca --weights FILE --image PATH_OR_FOLDER [--output DIR]
        [--image-size S] [--max-size 1024] [--threshold 0.0] [--checkpoint-key teacher] [--config FILE]
        [KEY VALUE ...]

``--pca``: a PCA of the last block's patch tokens (``dino_research.evaluation.feature_pca``), fitted
jointly over every image given (a file, or every image under a folder, sorted), so one colour means
the same feature direction in all of them. The first component, thresholded at ``--threshold``
standard deviations above its mean, separates the foreground from the background; the next three
components are drawn as red, green and blue over the foreground. Written to OUTPUT (default
OUTPUT_DIR): ``pca_<name>.png`` per image (image, first component, foreground, RGB) and, for
several images, ``pca.png`` with one row each.

Images keep their size unless ``--image-size`` resizes the shorter side to S; ``--max-size`` then
caps the longer side (the attention inside the ViT grows with the square of the patch count), and
they are cropped to a multiple of the patch size. Unreadable images are reported and skipped.
"""

import logging
import os

from dino_research.data.folders import list_images
from dino_research.data.images import UnreadableImageError, load_image
from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device
from dino_research.evaluation.attention import prepare_image
from dino_research.evaluation.feature_pca import feature_pca, patch_features, pca_figure
from dino_research.evaluation.weights import load_backbone
from dino_research.utils.errors import report_user_errors

logger = logging.getLogger("dino_research")


def build_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--pca", action="store_true", help="PCA of the patch features (the one view so far)")
    parser.add_argument("--image", required=True, metavar="PATH_OR_FOLDER", help="an image, or a folder of images")
    parser.add_argument("--output", default="", metavar="DIR", help="output folder (default: OUTPUT_DIR)")
    parser.add_argument("--image-size", type=int, default=None, metavar="S",
                        help="resize the shorter side to S pixels (default: keep the size)")
    parser.add_argument("--max-size", type=int, default=1024, metavar="PIXELS",
                        help="shrink images whose longer side exceeds PIXELS (0: never)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="foreground: first component above this many standard deviations over its mean")
    return parser


def image_paths(path: str) -> list:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"--image {path}: no such file or folder")
    paths = list_images(path)
    if not paths:
        raise SystemExit(f"--image {path}: no image files in this folder")
    return paths


def figure_name(path: str, root: str) -> str:
    """``pca_<path below root, '/' -> '_', no extension>.png``: unique for the images of one folder."""
    relative = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    return "pca_" + os.path.splitext(relative)[0].replace(os.sep, "_") + ".png"


def main(args) -> None:
    if not args.pca:
        raise SystemExit("choose what to draw: --pca (a PCA of the patch features)")
    cfg = load_config(args.config_file, list(args.opts) + (["OUTPUT_DIR", args.output] if args.output else []))
    default_setup(cfg, args)
    backbone = load_backbone(cfg, args.weights, args.checkpoint_key)
    if not isinstance(getattr(backbone, "patch_size", None), int):
        raise SystemExit(f"feature PCA needs a ViT backbone (patch tokens); {cfg.MODEL.BACKBONE.NAME} has none")
    device = resolve_device(cfg)
    backbone.to(device)
    pictures, tensors, kept = [], [], []
    for path in image_paths(args.image):
        try:
            image = load_image(path, cfg.INPUT.EXIF_TRANSPOSE)
            picture, tensor = prepare_image(image, backbone.patch_size, cfg.INPUT.MEAN, cfg.INPUT.STD,
                                            size=args.image_size, max_size=args.max_size)
        except (UnreadableImageError, ValueError) as e:  # unreadable; smaller than a patch
            logger.warning("%s: skipped, %s", path, e)
            continue
        pictures.append(picture)
        tensors.append(tensor.to(device))
        kept.append(path)
    if not kept:
        raise SystemExit(f"--image {args.image}: no image could be read")
    results = feature_pca(patch_features(backbone, tensors), args.threshold)
    for path, picture, result in zip(kept, pictures, results):
        out = pca_figure([picture], [result], [os.path.basename(path)],
                         os.path.join(cfg.OUTPUT_DIR, figure_name(path, args.image)))
        logger.info("%s: %dx%d, %d of %d patches foreground -> %s", path, *picture.size,
                    int(result["foreground"].sum()), result["foreground"].numel(), out)
    if len(kept) > 1:
        titles = [os.path.basename(p) for p in kept]
        out = pca_figure(pictures, results, titles, os.path.join(cfg.OUTPUT_DIR, "pca.png"))
        logger.info("PCA fitted jointly over %d images: %s", len(kept), out)


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    with report_user_errors():
        main(parsed)
