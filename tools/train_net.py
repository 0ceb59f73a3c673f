#!/usr/bin/env python
"""Train DINO.

    python tools/train_net.py --config configs/dino_vits16.yaml [--num-gpus N] [--resume] [KEY VALUE ...]

One process per GPU (``--num-gpus``), gloo CPU workers where there is no GPU, or the processes of
torchrun. A run whose OUTPUT_DIR holds ``last_checkpoint.pth`` resumes from it at the exact iteration.
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
from dino_research.utils.slurm import main_or_submit


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    install_stop_handlers()  # SIGTERM/SIGINT/SIGUSR1/2: checkpoint at the iteration's end, then exit
    trainer = DINOTrainer(cfg)
    if args.resume and not trainer.checkpointer.has_checkpoint():
        raise SystemExit(f"--resume given but there is no checkpoint at {trainer.checkpointer.last_path}")
    trainer.resume_or_load(resume=True)  # automatic whenever OUTPUT_DIR holds a checkpoint
    try:
        trainer.train()
    except TrainingStopped as stop:
        logging.getLogger("dino_research").warning("%s. Run the same command again to resume.", stop)


if __name__ == "__main__":
    args = default_argument_parser(__doc__).parse_args()
    main_or_submit(main, args)  # --slurm submits through submitit; otherwise runs here
