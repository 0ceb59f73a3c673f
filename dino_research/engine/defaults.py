"""Command-line arguments and per-process set-up shared by every tool."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from ..config import CfgNode, check_config, get_cfg
from ..config.checks import declare_choices
from ..config.imports import import_components
from ..utils import comm
from ..utils.logger import setup_logger
from ..utils.run_lock import check_output_dir
from ..utils.seeding import seed_all  # noqa: F401  (re-exported: engine.seed_all)
from .slurm import add_slurm_arguments

logger = logging.getLogger("dino_research")


def default_argument_parser(description: str = "dino_research") -> argparse.ArgumentParser:
    """``--config FILE [--num-gpus N] [--num-machines M --machine-rank R --dist-url URL] [--resume]
    [KEY VALUE ...]``; ``--config-file`` is accepted as an alias of ``--config``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-file", dest="config_file", default="", metavar="FILE",
                        help="YAML config (may use _BASE_); defaults come from dino_research/config/defaults.py")
    parser.add_argument("--resume", action="store_true",
                        help="resume from OUTPUT_DIR/last_checkpoint.pth (also automatic when it exists)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine: one per GPU, or gloo CPU workers without a GPU")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (0-based)")
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0, or 'auto' on one machine")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of user errors (bad config, file, folder) too; also "
                             "DINO_RESEARCH_DEBUG=1")
    parser.add_argument("--dist-timeout", type=float, default=30.0, metavar="MINUTES",
                        help="a collective waiting this long for another process (dead or hung) fails the run "
                             "instead of hanging; must exceed the slowest checkpoint write (default 30)")
    add_slurm_arguments(parser)
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.BASE_LR 0.001 SOLVER.EPOCHS 300")
    return parser


def eval_argument_parser(description: str = "dino_research evaluation") -> argparse.ArgumentParser:
    """:func:`default_argument_parser` plus ``--weights FILE`` and ``--checkpoint-key teacher|student``,
    shared by the evaluation tools (see ``dino_research.evaluation.load_backbone`` for the formats)."""
    parser = default_argument_parser(description)
    parser.add_argument("--weights", default="", metavar="FILE",
                        help="checkpoint, exported backbone or official DINO file (default: MODEL.WEIGHTS)")
    parser.add_argument("--checkpoint-key", default="teacher", choices=("teacher", "student"),
                        help="which network of a training checkpoint to evaluate")
    return parser


def _imports_of(config_file: str, opts: list) -> list:
    """``IMPORTS`` as the file (with its ``_BASE_`` files) and the overrides set it, read before the
    config is built; a malformed value is left for the merge to report."""
    imports = []
    if config_file:
        imports = CfgNode.load_yaml_with_base(config_file).get("IMPORTS", []) or []
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "IMPORTS":
            imports = CfgNode._decode_cfg_value(value)
    return list(imports) if isinstance(imports, (list, tuple)) else []


def load_config(config_file: str, opts: list) -> CfgNode:
    """The modules of ``IMPORTS`` imported (their components and config keys registered), then the
    defaults, ``config_file`` and ``opts``; checked, then frozen.

    Raises :class:`~dino_research.config.ConfigError` on an unknown key or a wrong type (while
    merging) and on every value no run can use (:func:`~dino_research.config.check_config`, all
    problems in one message), before anything is built or written.
    """
    # IMPORTS first (from the file, then the overrides): the modules may add config keys
    # (register_config_extension) that the file and overrides set, and registered names the check needs.
    import_components(_imports_of(config_file, list(opts)))
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    import_components(cfg.IMPORTS)  # the same list: already imported, nothing runs twice
    check_config(cfg)
    cfg.freeze()
    return cfg


# MODEL.DEVICE's values (resolve_device).
DEVICES = declare_choices("MODEL.DEVICE", ("auto", "cpu", "cuda"))


def resolve_device(cfg) -> torch.device:
    """``MODEL.DEVICE``: "auto" picks this process's local GPU when CUDA is available, else the CPU."""
    choice = cfg.MODEL.DEVICE
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("MODEL.DEVICE is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cpu":
        return torch.device("cpu")
    raise ValueError(f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r} is not one of: {', '.join(DEVICES)}")


def _holds_training_run(folder: str) -> bool:
    """Whether ``folder`` holds a training run's checkpoints (or a live run's lock)."""
    return any(os.path.exists(os.path.join(folder, name)) for name in ("last_checkpoint.pth", "run.lock")) or any(
        name.startswith("checkpoint_") and name.endswith(".pth") for name in os.listdir(folder))


def default_setup(cfg: CfgNode, args: argparse.Namespace | None = None,
                  config_file: str | None = "config.yaml") -> None:
    """Per-process set-up: output folder, logs (per rank), environment summary, seeds, config dump.

    Every rank seeds ``SEED + rank`` (so drop path differs across ranks, as independent GPUs would);
    the main process writes the merged config to ``OUTPUT_DIR/config_file`` (None: not written; the
    trainer writes ``config.yaml`` itself once a resume was checked against the checkpoint's config).
    In a folder that holds a training run's checkpoints, ``config.yaml`` is left to describe them and
    the tool's config is written as ``config_TOOL.yaml`` (TOOL: the script's name).

    Raises:
        UserError: ``OUTPUT_DIR`` is a file or not writable (before anything is written).
    """
    rank = comm.get_rank()
    check_output_dir(cfg.OUTPUT_DIR)
    setup_logger(cfg.OUTPUT_DIR, rank=rank)
    logger.info("rank %d of %d; torch %s; python %s; %d CPU threads", rank, comm.get_world_size(), torch.__version__,
                sys.version.split()[0], torch.get_num_threads())
    if args is not None:
        logger.info("command line: %s", " ".join(sys.argv))
    if comm.is_main_process() and config_file:
        path = os.path.join(cfg.OUTPUT_DIR, config_file)
        if config_file == "config.yaml" and _holds_training_run(cfg.OUTPUT_DIR):
            # An evaluation pointed at a training run's folder: config.yaml keeps describing the
            # checkpoints there; this tool's config goes beside it under the tool's name.
            tool = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "tool"
            path = os.path.join(cfg.OUTPUT_DIR, f"config_{tool}.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info("full config written to %s", path)
    seed_all(cfg.SEED + rank)


def write_results(cfg: CfgNode, filename: str, summary: dict) -> str:
    """Write an evaluation's ``summary`` as indented JSON to ``OUTPUT_DIR/filename``, atomically (a
    reader, e.g. ``tools/collect_results.py`` over a sweep, never sees half a file); returns the path.
    Call it on the main process."""
    path = os.path.join(cfg.OUTPUT_DIR, filename)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a summary that failed half-way: the previous file stays as it was
            os.remove(tmp)
    logger.info("results written to %s", path)
    return path
