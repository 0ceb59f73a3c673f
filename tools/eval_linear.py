#!/usr/bin/env python
"""Linear probe of a frozen backbone: the paper's protocol, or the fast grid over cached features.

    python tools/eval_linear.py --config FILE --weights FILE [--checkpoint-key teacher] [--num-gpus N]
        [--fast [--dump-features P | --load-features P]] [KEY VALUE ...]

Settings come from ``TEST.*`` and ``TEST.LINEAR.*`` (see ``dino_research/config/defaults.py``).
Without ``--fast``: one classifier on augmented images, resumed from ``OUTPUT_DIR/linear_checkpoint.pth``
when present. With ``--fast``: features of center crops extracted once, a grid of classifiers
(feature variants x ``TEST.LINEAR.LR_GRID``) trained together; see ``dino_research.evaluation.linear_fast``.
Writes ``OUTPUT_DIR/linear.json``: ``{"mode", "best": {"top1", "top5", "lr", "n_last_blocks", "avgpool",
...}, "last": {...}, ...}``.
"""

import logging
import os

from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device
from dino_research.engine.slurm import main_or_submit
from dino_research.evaluation import load_backbone
from dino_research.evaluation.linear import LINEAR_RESULTS, run_linear_eval, write_linear_results
from dino_research.evaluation.linear_fast import run_fast_linear_eval
from dino_research.utils import comm

logger = logging.getLogger("dino_research")


def parse_args():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--fast", action="store_true",
                        help="train a grid of classifiers on cached center-crop features (DINOv2-style)")
    parser.add_argument("--dump-features", default="", metavar="P",
                        help="with --fast: write the extracted features to P (P.rankR-of-W per process)")
    parser.add_argument("--load-features", default="", metavar="P",
                        help="with --fast: read features written by --dump-features instead of extracting")
    args = parser.parse_args()
    if (args.dump_features or args.load_features) and not args.fast:
        parser.error("--dump-features and --load-features need --fast")
    if args.dump_features and args.load_features:
        parser.error("give --dump-features or --load-features, not both")
    return args


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    device = resolve_device(cfg)
    backbone = None if args.load_features else load_backbone(cfg, args.weights, args.checkpoint_key)
    if args.fast:
        result = run_fast_linear_eval(cfg, backbone, device, dump_features=args.dump_features,
                                      load_features=args.load_features)
    else:
        result = run_linear_eval(cfg, backbone, device)
    if comm.is_main_process():
        path = os.path.join(cfg.OUTPUT_DIR, LINEAR_RESULTS)
        write_linear_results(path, result)
        logger.info("linear probe (%s): best top-1 %.2f, top-5 %.2f; results written to %s", result["mode"],
                    result["best"]["top1"], result["best"]["top5"], path)


if __name__ == "__main__":
    args = parse_args()
    main_or_submit(main, args)  # --slurm submits through submitit; otherwise runs here
