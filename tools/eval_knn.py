#!/usr/bin/env python
"""Weighted k-NN evaluation of a frozen backbone (the DINO paper's protocol).

    python tools/eval_knn.py --config configs/dino_vits16.yaml --weights OUTPUT/checkpoint.pth \\
        [--checkpoint-key teacher] [--num-gpus N] [--dump-features PATH] [KEY VALUE ...]
    python tools/eval_knn.py --config FILE --load-features PATH      # rerun on saved features
    python tools/eval_knn.py --config FILE --pixels                   # raw-pixel baseline, no weights
    python tools/eval_knn.py --config FILE --random-init              # the backbone before training

Features of TEST.TRAIN_ROOT and TEST.VAL_ROOT (dataset TEST.DATASET, eval transform TEST.RESIZE_SIZE /
TEST.CROP_SIZE) are extracted on every process, then the main process classifies the validation set
for every k of TEST.KNN.K with temperature TEST.KNN.TEMPERATURE, logs a table and writes
OUTPUT_DIR/knn.json. Both splits are labelled with the training split's class index (see
TEST.UNKNOWN_VAL_CLASSES). A k larger than the memory bank is scored with every bank image: its row
says so ("k=200 > 50 training images: all 50 used") and knn.json's "effective_k" maps each k to the
number of neighbours that voted.
"""

import logging

import torch.nn as nn

from dino_research.data import build_eval_transform
from dino_research.data.eval_transforms import build_eval_datasets
from dino_research.engine import (
    default_setup,
    eval_argument_parser,
    load_config,
    resolve_device,
    seed_all,
    write_results,
)
from dino_research.engine.slurm import main_or_submit
from dino_research.evaluation.features import load_features, save_features
from dino_research.evaluation.knn import effective_k, k_note, knn_classifier_multi_k, knn_features
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import build_model
from dino_research.utils import comm

logger = logging.getLogger("dino_research")


def build_parser():
    parser = eval_argument_parser(__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--load-features", default="", metavar="PATH",
                        help="features written by --dump-features: skip the images and the backbone")
    source.add_argument("--pixels", action="store_true",
                        help="raw-pixel baseline: the eval-transformed image, flattened, is the feature")
    source.add_argument("--random-init", action="store_true",
                        help="the config's backbone at the initialization a run with this SEED starts from: "
                             "what training has to improve on")
    parser.add_argument("--dump-features", default="", metavar="PATH",
                        help="also save the extracted train/test features and labels to PATH")
    return parser


def compute_features(cfg, args):
    """(train_features, train_labels, test_features, test_labels) on every rank."""
    if args.load_features:
        logger.info("loading features from %s", args.load_features)
        return load_features(args.load_features)
    device = resolve_device(cfg)
    if args.pixels:
        backbone = nn.Flatten(1)  # (B, 3, H, W) -> (B, 3HW); extract_features L2-normalizes the rows
    elif args.random_init:
        seed_all(cfg.SEED)  # as the trainer does right before building the model
        backbone = build_model(cfg).backbone_for_eval()
    else:
        backbone = load_backbone(cfg, args.weights, args.checkpoint_key)
    backbone.to(device)
    transform = build_eval_transform(cfg)
    bank, queries = build_eval_datasets(cfg, transform, transform)
    for split, dataset in (("train", bank), ("val", queries)):
        logger.info("%s split: %s (%d images)", split, dataset, len(dataset))
    (features,) = knn_features([backbone], bank, queries, batch_size=cfg.TEST.BATCH_SIZE, device=device,
                               num_workers=cfg.DATALOADER.NUM_WORKERS)
    return features


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    train_feats, train_labels, test_feats, test_labels = compute_features(cfg, args)
    if not comm.is_main_process():
        return
    if args.dump_features:
        save_features(args.dump_features, train_feats, train_labels, test_feats, test_labels)
        logger.info("features written to %s", args.dump_features)
    device = resolve_device(cfg)
    ks, temperature = list(cfg.TEST.KNN.K), cfg.TEST.KNN.TEMPERATURE
    results = knn_classifier_multi_k(train_feats.to(device), train_labels, test_feats, test_labels, ks,
                                     temperature, chunk_size=cfg.TEST.KNN.CHUNK_SIZE)
    source = ("pixels" if args.pixels else "random-init backbone" if args.random_init
              else f"loaded from {args.load_features}" if args.load_features else "backbone")
    logger.info("weighted k-NN (T=%g), %d train / %d test %s features:", temperature,
                train_feats.shape[0], test_feats.shape[0], source)
    n_train = int(train_feats.shape[0])
    notes = {k: k_note(k, n_train) for k in results}
    logger.info("| %5s | %7s | %7s | %s", "k", "top-1", "top-5", "note")
    for k, (top1, top5) in results.items():
        logger.info("| %5d | %7.2f | %7.2f | %s", k, top1, top5, notes[k])
    summary = {
        "weights": "" if args.pixels or args.random_init else (args.weights or cfg.MODEL.WEIGHTS),
        "checkpoint_key": args.checkpoint_key,
        "features": source,
        "num_train": int(train_feats.shape[0]),
        "num_test": int(test_feats.shape[0]),
        "temperature": temperature,
        "results": {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in results.items()},
        # the neighbours that voted for each k: fewer than k when the bank is smaller than k
        "effective_k": {str(k): effective_k(k, n_train) for k in results},
        "notes": {str(k): note for k, note in notes.items() if note},
    }
    write_results(cfg, "knn.json", summary)


if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args()
    if (args.pixels or args.random_init) and args.weights:
        parser.error("--pixels and --random-init take no --weights")
    main_or_submit(main, args)  # --slurm submits through submitit; otherwise runs here
