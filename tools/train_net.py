#!/usr/bin/env python
"""Train DINO.

    python tools/train_net.py --config configs/dino_vits16.yaml [--num-gpus N] [--resume] [KEY VALUE ...]

One process per GPU (``--num-gpus``), gloo CPU workers where there is no GPU, or the processes of
torchrun. A run whose OUTPUT_DIR holds ``last_checkpoint.pth`` resumes from it at the exact iteration,
once its stored config was compared with this one (``--allow-config-change`` accepts recipe changes).
One run at a time holds OUTPUT_DIR (``OUTPUT_DIR/run.lock``); a second one refuses, naming the first.
"""

import logging

from dino_research.engine import (
    DINOTrainer,
    TrainingStopped,
    default_argument_parser,
    default_setup,
    install_stop_handlers,
    load_config,
)
from dino_research.engine.slurm import main_or_submit
from dino_research.utils.run_lock import hold_run_lock

logger = logging.getLogger("dino_research")


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    # The lock comes first: a second run must not even append to the first one's log.
    with hold_run_lock(cfg.OUTPUT_DIR) as lock:
        default_setup(cfg, args, config_file=None)  # config.yaml: written once the resume is checked
        if lock is not None and lock.took_over:
            logger.warning(lock.took_over)
        install_stop_handlers()  # SIGTERM/SIGINT/SIGUSR1/2: checkpoint at the iteration's end, then exit
        trainer = DINOTrainer(cfg)
        if args.resume and not trainer.checkpointer.has_checkpoint():
            raise SystemExit(f"--resume given but there is no checkpoint at {trainer.checkpointer.last_path}")
        trainer.resume_or_load(resume=True, allow_config_change=args.allow_config_change)
        try:
            trainer.train()
        except TrainingStopped as stop:
            logger.warning("%s. Run the same command again to resume.", stop)
            return
        if trainer.completed:
            logger.info("training complete: %d iterations; outputs in %s", trainer.max_iter, cfg.OUTPUT_DIR)


def build_parser():
    parser = default_argument_parser(__doc__)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even when recipe keys (learning rate, temperatures, augmentation...) differ "
                             "from the checkpoint's config; keys that change what the state means stay refused")
    return parser


if __name__ == "__main__":
    main_or_submit(main, build_parser().parse_args())  # --slurm submits through submitit; otherwise runs here
