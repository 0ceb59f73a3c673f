#!/usr/bin/env python
"""Export a backbone of a training checkpoint in the official DINO backbone format.

    python tools/export_backbone.py OUTPUT_DIR/last_checkpoint.pth teacher_backbone.pth [--which student]

The result is a plain state dict with the official keys (``cls_token``, ``pos_embed``,
``blocks.N.*``, ...), loadable by the reference code, by ``MODEL.WEIGHTS`` and by the evaluation tools.

An OUTPUT that is a directory receives ``OUTPUT/teacher_backbone.pth`` (``student_backbone.pth`` with
``--which student``); missing parent folders are created. OUTPUT may not be the checkpoint itself (the
same path, or the same file through a symbolic or hard link): the tool refuses instead of overwriting
its input. Every refusal or unreadable input is one line on stderr and exit status 2.
"""

import argparse
import sys

from dino_research.checkpoint import CheckpointError, atomic_save, backbone_state, load_file, output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by tools/train_net.py (or an official DINO file)")
    parser.add_argument("output", help="where to write the backbone state dict (a file, or a directory)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="which network's backbone (the teacher is the one the paper evaluates)")
    args = parser.parse_args()
    try:
        output = output_path(args.output, [args.checkpoint], default_name=f"{args.which}_backbone.pth")
        state = backbone_state(load_file(args.checkpoint), args.which, args.checkpoint)
        atomic_save(state, output)
    except (CheckpointError, OSError) as e:  # the user's to fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {len(state)} tensors of the {args.which} backbone to {output}")


if __name__ == "__main__":
    main()
