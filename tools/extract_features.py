#!/usr/bin/env python
"""Embed your own images with a trained backbone, resumably, into files numpy reads alone.

    python tools/extract_features.py --weights OUTPUT/last_checkpoint.pth --input DIR_OR_FILE_LIST \\
        --output OUT [--patch-tokens] [--layers N] [--image-size S] [--batch-size B] [--no-normalize]
        [--chunk-size C] [--keep-shards] [--checkpoint-key teacher] [--config FILE] [--num-gpus N]
        [KEY VALUE ...]

``--input`` is a folder (every image at any depth, sorted, hidden files skipped, links followed) or a
text file with one ``PATH [LABEL]`` per line (FileList). OUT receives ``features.npy`` (N, D) float32,
one embedding per image (the final-normed [CLS] token of a ViT, the pooled features of a convnet),
L2-normalized unless ``--no-normalize``; ``index.csv`` (row, path); ``meta.json`` (model, weights and
their SHA-256, dimensions, settings, unreadable rows); with ``--layers N`` also ``layers.npy``
(N, L, D), the [CLS] token of each of the last N blocks, and with ``--patch-tokens``
``patch_tokens.npy`` (N, h*w, D). Read them with ``numpy.load``; tools/find_neighbors.py searches them.

Images go through the evaluation transform: the shorter side resized to ``TEST.RESIZE_SIZE`` (256),
a ``TEST.CROP_SIZE`` (224) center crop, normalized with ``INPUT.MEAN/STD``. ``--image-size S`` sets the
crop to S and the resize to S * RESIZE_SIZE / CROP_SIZE (the same 87.5% of the shorter side).

Resumable: the images are encoded in chunks of ``--chunk-size`` (1024), each written atomically to
``OUT/shards/`` as it finishes. Run the same command again after a kill or a pre-emption and it
continues with the first unfinished chunk; finished chunks are never encoded again. A command with
other settings (weights, image size, what is extracted, ...) on the same OUT is refused. At the end
the shards are merged into the arrays above and removed (``--keep-shards`` keeps them).
"""

import logging
import os

from dino_research.data import build_eval_transform
from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device
from dino_research.engine.slurm import main_or_submit
from dino_research.evaluation.embeddings import extract_embeddings, file_sha256
from dino_research.evaluation.weights import load_backbone
from dino_research.utils import comm

logger = logging.getLogger("dino_research")


def build_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--input", required=True, metavar="DIR_OR_FILE_LIST",
                        help="a folder of images (any layout) or a text file of 'PATH [LABEL]' lines")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="folder of the embeddings (also OUTPUT_DIR: the log and config go there)")
    parser.add_argument("--patch-tokens", action="store_true", help="also write patch_tokens.npy (ViTs)")
    parser.add_argument("--layers", type=int, default=0, metavar="N",
                        help="also write layers.npy: the [CLS] token of each of the last N blocks (ViTs)")
    parser.add_argument("--image-size", type=int, default=0, metavar="S",
                        help="center-crop side in pixels (default TEST.CROP_SIZE); a multiple of the patch size")
    parser.add_argument("--batch-size", type=int, default=0, metavar="B",
                        help="images per process per forward pass (default TEST.BATCH_SIZE)")
    parser.add_argument("--no-normalize", action="store_true", help="keep the raw features (no L2 normalization)")
    parser.add_argument("--chunk-size", type=int, default=1024, metavar="C",
                        help="images per shard file: a kill loses at most one chunk of work")
    parser.add_argument("--keep-shards", action="store_true", help="keep OUT/shards/ after merging")
    return parser


def setup_config(args):
    """The config with OUTPUT_DIR = --output and, for --image-size S, the evaluation crop S and the
    resize keeping the config's RESIZE_SIZE / CROP_SIZE ratio."""
    opts = list(args.opts) + ["OUTPUT_DIR", args.output]
    cfg = load_config(args.config_file, opts)
    if args.image_size:
        resize = round(args.image_size * cfg.TEST.RESIZE_SIZE / cfg.TEST.CROP_SIZE)
        cfg = load_config(args.config_file, opts + ["TEST.CROP_SIZE", str(args.image_size),
                                                    "TEST.RESIZE_SIZE", str(resize)])
    return cfg


def describe_model(backbone) -> dict:
    """What meta.json says about the backbone that made the embeddings."""
    return {"class": type(backbone).__name__, "embed_dim": int(backbone.embed_dim),
            "patch_size": getattr(backbone, "patch_size", None), "num_blocks": len(getattr(backbone, "blocks", []))}


def main(args) -> None:
    cfg = setup_config(args)
    default_setup(cfg, args, config_file=None)  # written below, once OUT accepted these settings
    weights = args.weights or cfg.MODEL.WEIGHTS
    backbone = load_backbone(cfg, weights, args.checkpoint_key)
    device = resolve_device(cfg)
    backbone.to(device)
    # Settings a restart must repeat. The weights' hash (main process: it alone compares settings)
    # catches a checkpoint rewritten under the same name, e.g. last_checkpoint.pth of a running job.
    settings = {
        "weights": os.path.abspath(weights) if weights else "",
        "weights_sha256": file_sha256(weights) if weights and comm.is_main_process() else "",
        "checkpoint_key": args.checkpoint_key,
        "model": describe_model(backbone),
        "resize_size": cfg.TEST.RESIZE_SIZE,
        "mean": list(cfg.INPUT.MEAN),
        "std": list(cfg.INPUT.STD),
    }
    result = extract_embeddings(
        backbone, args.input, args.output, transform=build_eval_transform(cfg), image_size=cfg.TEST.CROP_SIZE,
        settings=settings, batch_size=args.batch_size or cfg.TEST.BATCH_SIZE, device=device,
        chunk_size=args.chunk_size, layers=args.layers, patch_tokens=args.patch_tokens,
        normalize=not args.no_normalize, exif_transpose=cfg.INPUT.EXIF_TRANSPOSE,
        num_workers=cfg.DATALOADER.NUM_WORKERS, keep_shards=args.keep_shards)
    if comm.is_main_process():
        with open(os.path.join(args.output, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        logger.info("%s: %d chunks encoded now, %d found finished; embeddings in %s", result["status"],
                    len(result["encoded"]), len(result["skipped"]), args.output)


if __name__ == "__main__":
    main_or_submit(main, build_parser().parse_args())  # --slurm submits through submitit; otherwise runs here
