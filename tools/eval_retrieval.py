#!/usr/bin/env python
"""Image retrieval on revisited Oxford / Paris with a frozen backbone (the DINO paper's protocol).

    python tools/eval_retrieval.py --config configs/dino_vits16.yaml --weights FILE \\
        --data-root DIR --dataset roxford5k|rparis6k [--imsize 224] [--multiscale] [--crop-queries]
        [--checkpoint-key teacher] [--num-gpus N] [KEY VALUE ...]

DIR holds revisitop's layout: DIR/DATASET/gnd_DATASET.pkl and DIR/DATASET/jpg/*.jpg (read with a
restricted unpickler: the file cannot run code). Every image is shrunk so its longer side is at most
--imsize (default 224, DINO's script's; DINO's README runs roxford5k at 224 and rparis6k at 512 with
--multiscale), embedded by the backbone (its [CLS] token for a ViT; with --multiscale the mean over
scales 1, 1/sqrt(2), 1/2) and L2-normalized; the database is ranked by cosine similarity to each
query. DINO embeds whole query images; --crop-queries crops them to their bounding box first, as
revisitop's instructions ask. Images are RGB-normalized with INPUT.MEAN / INPUT.STD.

Logs mAP and mP@1/5/10 for the Medium and Hard protocols (percent) and writes
OUTPUT_DIR/retrieval_DATASET.json (also the per-query APs; null for a query without positives).
"""

import logging

from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device, write_results
from dino_research.engine.slurm import main_or_submit
from dino_research.evaluation.retrieval import (
    REVISITOP_DATASETS,
    RevisitOPImages,
    evaluate_revisitop,
    extract_retrieval_features,
    load_revisitop_ground_truth,
    rank_database,
)
from dino_research.evaluation.weights import load_backbone
from dino_research.utils import comm

logger = logging.getLogger("dino_research")

KAPPAS = (1, 5, 10)  # the k of mP@k, as DINO's script and revisitop's example


def build_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--data-root", required=True, metavar="DIR", help="folder holding DATASET/gnd_DATASET.pkl")
    parser.add_argument("--dataset", required=True, choices=REVISITOP_DATASETS)
    parser.add_argument("--imsize", type=int, default=224,
                        help="longest image side in pixels (DINO: 224; the paper's other setting: 512)")
    parser.add_argument("--multiscale", action="store_true", help="average features over scales 1, 1/sqrt(2), 1/2")
    parser.add_argument("--crop-queries", action="store_true",
                        help="crop queries to their bounding box (revisitop's rule; DINO uses whole images)")
    return parser


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    device = resolve_device(cfg)
    ground_truth = load_revisitop_ground_truth(args.data_root, args.dataset)
    splits = {split: RevisitOPImages(ground_truth, split, imsize=args.imsize, mean=cfg.INPUT.MEAN, std=cfg.INPUT.STD,
                                     crop_queries=args.crop_queries) for split in ("database", "query")}
    for dataset in splits.values():
        logger.info("%s", dataset)
    backbone = load_backbone(cfg, args.weights, args.checkpoint_key).to(device)
    features = {split: extract_retrieval_features(backbone, dataset, device=device, multiscale=args.multiscale,
                                                  num_workers=cfg.DATALOADER.NUM_WORKERS)
                for split, dataset in splits.items()}
    if not comm.is_main_process():
        return
    ranks = rank_database(features["database"], features["query"])
    results = evaluate_revisitop(ranks, ground_truth.gnd, KAPPAS)
    logger.info("%s retrieval, %d queries / %d database images, imsize %d%s:", args.dataset, ranks.shape[1],
                ranks.shape[0], args.imsize, ", multi-scale" if args.multiscale else "")
    columns = ["mAP", *(f"mP@{k}" for k in KAPPAS)]
    logger.info("| %-8s | %s |", "protocol", " | ".join(f"{c:>6}" for c in columns))
    for protocol, metrics in results.items():
        logger.info("| %-8s | %s |", protocol, " | ".join(f"{metrics[c]:6.2f}" for c in columns))
    summary = {
        "dataset": args.dataset,
        "weights": args.weights or cfg.MODEL.WEIGHTS,
        "checkpoint_key": args.checkpoint_key,
        "imsize": args.imsize,
        "multiscale": args.multiscale,
        "crop_queries": args.crop_queries,
        "num_database": int(ranks.shape[0]),
        "num_queries": int(ranks.shape[1]),
        "results": results,  # percent
    }
    write_results(cfg, f"retrieval_{args.dataset}.json", summary)


if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args()
    if args.imsize < 1:
        parser.error("--imsize must be positive")
    main_or_submit(main, args)  # --slurm submits through submitit; otherwise runs here
