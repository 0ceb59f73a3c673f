#!/usr/bin/env python
"""Export a backbone of a training checkpoint in the official DINO backbone format.

    python tools/export_backbone.py OUTPUT_DIR/last_checkpoint.pth teacher_backbone.pth [--which student]

The result is a plain state dict with the official keys (``cls_token``, ``pos_embed``,
``blocks.N.*``, ...), loadable by the reference code, by ``MODEL.WEIGHTS`` and by the evaluation tools.
"""

import argparse

from dino_research.checkpoint import atomic_save, load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by tools/train_net.py")
    parser.add_argument("output", help="where to write the backbone state dict")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="which network's backbone (the teacher is the one the paper evaluates)")
    args = parser.parse_args()
    data = load_file(args.checkpoint)
    if not isinstance(data, dict) or "model" not in data:
        raise SystemExit(f"{args.checkpoint}: not a dino_research training checkpoint (no 'model' entry)")
    prefix = f"{args.which}.backbone."
    state = {k[len(prefix):]: v for k, v in data["model"].items() if k.startswith(prefix)}
    if not state:
        raise SystemExit(f"{args.checkpoint}: no '{prefix}*' weights found")
    atomic_save(state, args.output)
    print(f"wrote {len(state)} tensors of the {args.which} backbone to {args.output}")


if __name__ == "__main__":
    main()
