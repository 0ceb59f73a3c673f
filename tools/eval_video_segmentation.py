#!/usr/bin/env python
"""DAVIS-2017 video object segmentation by label propagation of frozen features (the DINO paper's Table 5).

    python tools/eval_video_segmentation.py --weights OUTPUT/checkpoint.pth --data-path DAVIS \\
        [--config FILE] [--checkpoint-key teacher] [--split val] [--videos NAME,NAME] \\
        [--n-last-frames 7] [--size-mask-neighborhood 12] [--topk 5] [--frame-size 480] \\
        [--output-dir DIR] [--num-gpus N] [KEY VALUE ...]

DAVIS layout (DAVIS-2017-trainval-480p.zip unpacked): DAVIS/ImageSets/2017/val.txt,
DAVIS/JPEGImages/480p/VIDEO/00000.jpg ..., DAVIS/Annotations/480p/VIDEO/00000.png ... (indexed PNGs).

The first frame's annotation of every video is propagated to the others through the backbone's
last-block patch features (dino_research.evaluation.video_segmentation: context of the first and 7
previous frames, 5 nearest neighbours within 12 patches, softmax(cos / 0.1) weights). Predictions
are written as indexed PNGs with the DAVIS palette to OUTPUT_DIR/davis/VIDEO/FRAME.png (--output-dir),
the layout the official davis2017-evaluation package reads. Videos whose every frame is annotated
(train, val) are then scored as that package does (dino_research.evaluation.davis_metrics: frames
other than the first and last, mean over all objects): the tool logs a per-video table and J&F-Mean,
J-Mean, F-Mean, and writes OUTPUT_DIR/video_segmentation.json (scores in percent). With N processes
(--num-gpus N), process r segments videos r, r+N, r+2N, ...; runs on CPU too.
"""

import logging
import os

import torch.distributed as dist

from dino_research.engine import default_setup, eval_argument_parser, load_config, resolve_device, write_results
from dino_research.engine.slurm import main_or_submit
from dino_research.evaluation.davis_metrics import summarize
from dino_research.evaluation.video_segmentation import (
    check_propagation_backbone,
    davis_video_names,
    segment_davis_video,
)
from dino_research.evaluation.weights import load_backbone
from dino_research.utils import comm

logger = logging.getLogger("dino_research")

SCORES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def build_parser():
    parser = eval_argument_parser(__doc__)
    parser.add_argument("--data-path", required=True, metavar="DAVIS", help="DAVIS-2017 root (layout above)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/SPLIT.txt to segment (default: val)")
    # Comma-separated rather than nargs="+", which would also swallow the KEY VALUE options after it.
    parser.add_argument("--videos", default="", metavar="NAME[,NAME...]", help="only these videos of the split")
    parser.add_argument("--output-dir", default="", metavar="DIR", help="predicted PNGs (default: OUTPUT_DIR/davis)")
    parser.add_argument("--n-last-frames", type=int, default=7, help="previous frames in the context (paper: 7)")
    parser.add_argument("--size-mask-neighborhood", type=int, default=12, metavar="PATCHES",
                        help="take labels from context patches at most this many patches away (paper: 12; 0: any)")
    parser.add_argument("--topk", type=int, default=5, help="neighbours voting for each patch (paper: 5)")
    parser.add_argument("--frame-size", type=int, default=480, metavar="PIXELS",
                        help="resize frames to this shorter side (paper: 480; 0: keep their size)")
    parser.add_argument("--size-multiple", type=int, default=64, metavar="PIXELS",
                        help="round the longer side down to a multiple of this (reference: 64)")
    return parser


def gather(items: list) -> list:
    """Every rank's ``items`` concatenated, on every rank (one process: ``items``)."""
    if comm.get_world_size() == 1:
        return items
    gathered = [None] * comm.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # The layout first: a wrong --data-path fails before the weights are read.
    names = davis_video_names(args.data_path, args.split, [v for v in args.videos.split(",") if v])
    device = resolve_device(cfg)
    backbone = load_backbone(cfg, args.weights, args.checkpoint_key).to(device)
    try:
        check_propagation_backbone(backbone)
    except TypeError as e:
        raise SystemExit(f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME}: {e}") from None
    output_dir = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "davis")
    protocol = dict(n_last_frames=args.n_last_frames, size_mask_neighborhood=args.size_mask_neighborhood,
                    topk=args.topk, short_side=args.frame_size, multiple=args.size_multiple)
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = names[rank::world]
    logger.info("%d videos of %s/%s, %d on this process; predictions to %s", len(names), args.data_path,
                args.split, len(mine), output_dir)
    done = []
    for i, name in enumerate(mine):
        result = segment_davis_video(backbone, args.data_path, name, output_dir, mean=cfg.INPUT.MEAN,
                                     std=cfg.INPUT.STD, device=device, **protocol)
        unscored = "" if result["scores"] is not None else ", not scored (not every frame annotated)"
        logger.info("[%d/%d] %s: %d frames, %d object(s)%s", i + 1, len(mine), name, result["frames"],
                    result["objects"], unscored)
        done.append(result)
    done = gather(done)
    if not comm.is_main_process():
        return
    done.sort(key=lambda r: names.index(r["name"]))
    scored = {r["name"]: r["scores"] for r in done if r["scores"] is not None and r["objects"] > 0}
    summary = {
        "weights": args.weights or cfg.MODEL.WEIGHTS, "checkpoint_key": args.checkpoint_key,
        "data_path": args.data_path, "split": args.split, "predictions": output_dir,
        "protocol": {**protocol, "temperature": 0.1, "mean": list(cfg.INPUT.MEAN), "std": list(cfg.INPUT.STD)},
        "videos": [r["name"] for r in done], "scored": list(scored),
    }
    if scored:
        table = summarize(scored)
        summary["results"] = {key: 100 * table[key] for key in SCORES}
        summary["per_video"] = {v: {k: 100 * x if k.endswith("Mean") else x for k, x in row.items()}
                                for v, row in table["per_video"].items()}
        summary["per_object"] = {o: {k: 100 * x for k, x in row.items()} for o, row in table["per_object"].items()}
        lines = [f"| {'video':24s} | objects | scored frames | J&F-Mean | J-Mean | F-Mean |"]
        for video, row in summary["per_video"].items():
            lines.append(f"| {video:24s} | {row['objects']:7d} | {row['scored_frames']:13d} | {row['J&F-Mean']:8.1f} | "
                         f"{row['J-Mean']:6.1f} | {row['F-Mean']:6.1f} |")
        results = summary["results"]
        logger.info("DAVIS-2017 %s, %d videos, %d objects (frames 1..T-2 scored; means over objects):\n%s\n"
                    "J&F-Mean %.1f  J-Mean %.1f  F-Mean %.1f  (J-Recall %.1f, F-Recall %.1f, J-Decay %.1f, F-Decay "
                    "%.1f)", args.split, len(scored), len(table["per_object"]), "\n".join(lines), results["J&F-Mean"],
                    results["J-Mean"], results["F-Mean"], results["J-Recall"], results["F-Recall"],
                    results["J-Decay"], results["F-Decay"])
    else:
        logger.warning("no video of %s has an annotation for every frame: predictions written, nothing scored "
                       "(score them with the DAVIS server for test-dev)", args.split)
    write_results(cfg, "video_segmentation.json", summary)


if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args()
    if args.n_last_frames < 0 or args.topk < 1 or args.size_mask_neighborhood < 0 or args.frame_size < 0 \
            or args.size_multiple < 1:
        parser.error("--n-last-frames and --size-mask-neighborhood must be >= 0, --topk and --size-multiple >= 1, "
                     "--frame-size >= 0")
    main_or_submit(main, args)  # --slurm submits through submitit; otherwise runs here
