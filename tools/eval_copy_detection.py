#!/usr/bin/env python
"""Copy detection on Copydays "strong" with a frozen ViT (the DINO paper's protocol).

    python tools/eval_copy_detection.py --config configs/dino_vitb8.yaml --weights FILE --data-root DIR \\
        [--distractors DIR] [--whitening-dir DIR] [--uncentered-whitening] [--imsize 320]
        [--checkpoint-key teacher] [--num-gpus N] [KEY VALUE ...]

--data-root holds DIR/original/*.jpg (the database) and DIR/strong/*.jpg (the queries); a copy's
originals share the first 4 characters of its name, Copydays' block numbering. --distractors adds
the images of a folder to the database (the paper: 10k random YFCC100M images); --whitening-dir
learns a PCA whitening on the images of another folder (the paper: 20k other YFCC100M images), applied
to queries and database. Every image is resized to --imsize x --imsize (default 320, DINO's) and
described by the ViT's [CLS] token concatenated with its GeM-pooled (p=4) patch tokens; features are
L2-normalized and each query's AP is computed over its 20 nearest database images. Images are
RGB-normalized with INPUT.MEAN / INPUT.STD; TEST.BATCH_SIZE images per forward pass.

Logs the mAP (percent) and writes OUTPUT_DIR/copy_detection.json (with per-query APs).
"""

import logging
import os

from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device, write_results
from dino_research.engine.slurm import main_or_submit
from dino_research.evaluation.copy_detection import (
    TOP_K,
    ClsGeMFeatures,
    apply_whitening,
    copy_detection_map,
    extract_copy_features,
    learn_whitening,
    list_image_files,
    load_copydays_strong,
    search,
)
from dino_research.evaluation.weights import load_backbone
from dino_research.utils import comm

logger = logging.getLogger("dino_research")


def build_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--data-root", required=True, metavar="DIR", help="Copydays: DIR/original and DIR/strong")
    parser.add_argument("--distractors", default="", metavar="DIR", help="images added to the database")
    parser.add_argument("--whitening-dir", default="", metavar="DIR", help="images to learn the whitening from")
    parser.add_argument("--uncentered-whitening", action="store_true",
                        help="learn the whitening from the uncentered second moment, exactly as DINO's script")
    parser.add_argument("--imsize", type=int, default=320, help="square image side in pixels (DINO: 320)")
    return parser


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    device = resolve_device(cfg)
    copydays = load_copydays_strong(args.data_root)
    distractors = list_image_files(args.distractors, "--distractors") if args.distractors else []
    whitening = list_image_files(args.whitening_dir, "--whitening-dir") if args.whitening_dir else []
    logger.info("Copydays strong: %d queries, %d originals, %d distractors, %d whitening images",
                len(copydays.queries), len(copydays.originals), len(distractors), len(whitening))
    backbone = load_backbone(cfg, args.weights, args.checkpoint_key).to(device)
    ClsGeMFeatures(backbone)  # fail now, before any image is read, if this is no ViT

    def features_of(paths):
        return extract_copy_features(backbone, paths, imsize=args.imsize, mean=cfg.INPUT.MEAN, std=cfg.INPUT.STD,
                                     batch_size=cfg.TEST.BATCH_SIZE, device=device,
                                     num_workers=cfg.DATALOADER.NUM_WORKERS)

    queries = features_of(copydays.queries)
    database = features_of(copydays.originals + distractors)  # originals first: their indices are the positives
    whitening_features = features_of(whitening) if whitening else None
    if not comm.is_main_process():
        return
    if whitening_features is not None:
        mean, projection = learn_whitening(whitening_features, centered=not args.uncentered_whitening)
        queries, database = (apply_whitening(x, mean, projection) for x in (queries, database))
    indices = search(queries, database, TOP_K)  # L2-normalizes both, after the whitening
    mean_ap, aps = copy_detection_map(indices, copydays.positives)
    whitened = "no whitening" if not whitening else (
        f"whitening from {len(whitening)} images" + (" (uncentered)" if args.uncentered_whitening else ""))
    logger.info("| %-6s | %7s | %7s | %10s | %s", "subset", "queries", "mAP", "database", "features")
    logger.info("| %-6s | %7d | %7.2f | %10d | %s", "strong", len(aps), 100.0 * mean_ap, database.shape[0], whitened)
    summary = {
        "weights": args.weights or cfg.MODEL.WEIGHTS,
        "checkpoint_key": args.checkpoint_key,
        "imsize": args.imsize,
        "top_k": TOP_K,
        "num_queries": len(copydays.queries),
        "num_originals": len(copydays.originals),
        "num_distractors": len(distractors),
        "num_whitening": len(whitening),
        "uncentered_whitening": bool(whitening) and args.uncentered_whitening,
        "mAP": 100.0 * mean_ap,  # percent
        "AP": {os.path.basename(q): 100.0 * ap for q, ap in zip(copydays.queries, aps)},
    }
    write_results(cfg, "copy_detection.json", summary)


if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args()
    if args.imsize < 1:
        parser.error("--imsize must be positive")
    main_or_submit(main, args)  # --slurm submits through submitit; otherwise runs here
