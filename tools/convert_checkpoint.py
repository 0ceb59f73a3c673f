#!/usr/bin/env python
"""Turn a checkpoint that holds pickled Python objects into a plain, safely loadable one.

    python tools/convert_checkpoint.py --trust-pickle dino_vitbase16_pretrain_full_checkpoint.pth out.pth

dino_research reads every file with ``torch.load(weights_only=True)``, which refuses pickled objects
because unpickling can execute arbitrary code. The reference DINO's full training checkpoints store
their ``argparse.Namespace`` of arguments, so they are refused. This command loads such a file with
full unpickling -- run it ONLY on files whose origin you trust -- and writes a copy that keeps only
tensors and plain containers (the Namespace becomes a dict of its plain values; other objects are
dropped and listed).

OUTPUT must be a file name: a directory is refused, and so is the input itself (the same path, or the
same file through a symbolic or hard link), so that a trusted original is never overwritten. Missing
parent folders are created. Every refusal or unreadable input is one line on stderr and exit status 2.
"""

import argparse
import os
import sys

import torch

from dino_research.checkpoint import CheckpointError, atomic_save, describe_file, output_path

PLAIN = (str, int, float, bool, type(None))
_DROP = object()


def to_plain(obj, path: str, dropped: list):
    """Keep tensors and plain containers, turn a Namespace into a dict, drop (and list) the rest."""
    if isinstance(obj, (torch.Tensor,) + PLAIN):
        return obj
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            value = to_plain(value, f"{path}.{key}", dropped)
            if value is not _DROP and isinstance(key, PLAIN):
                out[key] = value
        return out
    if isinstance(obj, (list, tuple)):
        items = (to_plain(v, f"{path}[{i}]", dropped) for i, v in enumerate(obj))
        return type(obj)(v for v in items if v is not _DROP)
    dropped.append(f"{path} ({type(obj).__name__})")
    return _DROP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--trust-pickle", action="store_true", required=True,
                        help="required: confirms you trust INPUT enough to let it run code while loading")
    args = parser.parse_args()
    try:
        output_path(args.output, [args.input])  # refused before anything is unpickled
        if not os.path.isfile(args.input):
            raise CheckpointError(f"{args.input} is {describe_file(args.input).description}")
        try:
            data = torch.load(args.input, map_location="cpu", weights_only=False)  # the explicit, trusted opt-in
        except Exception as e:  # noqa: BLE001 - whatever a damaged or foreign file makes the unpickler raise
            raise CheckpointError(f"{args.input} does not load even with --trust-pickle: it is "
                                  f"{describe_file(args.input).description} ({type(e).__name__})") from None
        dropped: list = []
        plain = to_plain(data, "checkpoint", dropped)
        atomic_save(plain, args.output)
    except (CheckpointError, OSError) as e:  # the user's to fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.load(args.output, weights_only=True)  # proves the result is safe to load
    print(f"wrote {args.output}; it loads with weights_only=True")
    for item in dropped:
        print(f"dropped non-plain object: {item}")


if __name__ == "__main__":
    main()
