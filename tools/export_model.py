#!/usr/bin/env python
"""Export the backbone of a checkpoint for other code: DINO's layout, timm, safetensors or ONNX.

    python tools/export_model.py CHECKPOINT --format {dino,timm,safetensors,onnx} OUT [--which teacher]
        [--tolerance 1e-4] [--config FILE] [KEY VALUE ...]

* ``dino``: the official DINO backbone state dict (as tools/export_backbone.py writes it).
* ``timm``: a state dict ``timm.create_model(NAME, num_classes=0).load_state_dict(...)`` loads strictly;
  the exact call is printed (e.g. ``'vit_small_patch16_224'``; a depth other than 12 adds ``depth=``).
* ``safetensors``: the DINO state dict as safetensors, the architecture in its metadata.
* ``onnx``: ``images (B, 3, H, W) -> features (B, D)``, dynamic batch and image size (for a ViT, H and
  W multiples of the patch size). Feed images normalized with INPUT.MEAN/STD (ImageNet's).

Each file is loaded back in its own runtime (our loader, timm, safetensors, onnxruntime) and its
features compared with the backbone's on random images at 224 and 160 pixels: the largest difference
is printed, and above ``--tolerance`` (relative to the features' largest magnitude) the export fails
and no file is left. safetensors and ONNX need the ``export`` extra: ``pip install -e ".[export]"``.

CHECKPOINT is a training checkpoint (its stored config gives the architecture) or an official DINO
file (then give the architecture with --config and/or KEY VALUE, e.g. MODEL.BACKBONE.NAME vit_small).
An OUT that is a folder (or ends with /) receives ``<which>_backbone.<pth|timm.pth|safetensors|onnx>``. Every refusal
is one line on stderr and exit status 2.
"""

import argparse
import os
import sys

from dino_research.checkpoint import output_path
from dino_research.checkpoint.export import DEFAULT_TOLERANCE, EXPORT_FORMATS, export_model
from dino_research.config import CfgNode
from dino_research.engine import load_config
from dino_research.evaluation.weights import load_backbone_and_config
from dino_research.utils.errors import report_user_errors

EXTENSIONS = {"dino": ".pth", "timm": ".timm.pth", "safetensors": ".safetensors", "onnx": ".onnx"}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of tools/train_net.py, an exported or official backbone")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("output", help="the file to write (or a folder)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="which network of a training checkpoint (the teacher is the one the paper evaluates)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted |ours - exported| relative to max |ours| (default %(default)g)")
    parser.add_argument("--config", "--config-file", dest="config_file", default="", metavar="FILE",
                        help="the architecture of a file that stores no config (official DINO weights)")
    # "*", not REMAINDER: the options may then also follow OUT or the overrides.
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parser


def main(args) -> dict:
    cfg = load_config(args.config_file, args.opts)
    if args.output.endswith(("/", os.sep)):  # a folder to be: created, then it receives the default name
        os.makedirs(args.output, exist_ok=True)
    output = output_path(args.output, [args.checkpoint], default_name=f"{args.which}_backbone{EXTENSIONS[args.format]}")
    backbone, built_from = load_backbone_and_config(cfg, args.checkpoint, args.which)
    arch = built_from.MODEL.BACKBONE
    report = export_model(backbone, args.format, output, backbone_name=arch.NAME, timm_model=arch.TIMM_MODEL,
                          tolerance=args.tolerance,
                          metadata={"which": args.which, "source": args.checkpoint, "patch_size": arch.PATCH_SIZE,
                                    "depth": len(getattr(backbone, "blocks", [])) or arch.DEPTH,
                                    "embed_dim": backbone.embed_dim, "mean": list(cfg.INPUT.MEAN),
                                    "std": list(cfg.INPUT.STD), "backbone_config": CfgNode(
                                        {"BACKBONE": arch}).dump().strip()})
    for check in report["checks"]:
        note = "" if check["enforced"] else " (reported only: timm resizes a ViT's positions its own way off 224)"
        print(f"{args.format}: {check['size']}x{check['size']}, batch {check['batch']}: max |ours - exported| = "
              f"{check['max_diff']:.3g} ({check['relative']:.3g} relative; tolerance {args.tolerance:g}){note}")
    print(f"wrote the {args.which} backbone ({arch.NAME}) to {output}; load it with: {report['load']}")
    return report


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    try:
        with report_user_errors():
            main(parsed)
    except OSError as e:  # an unwritable output: one line, as the other refusals
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
