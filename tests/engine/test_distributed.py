"""DDP on CPU (gloo): 2 workers with batch 4 each train exactly like 1 process with batch 8."""

import subprocess
import sys
from pathlib import Path

import torch

from dino_research.checkpoint import LAST_CHECKPOINT, load_file
from dino_research.engine.launch import cpu_threads_per_worker

REPO = Path(__file__).resolve().parents[2]

COMMON = [
    "MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DROP_PATH_RATE", "0.0",
    "MODEL.HEAD.OUT_DIM", "64", "MODEL.HEAD.HIDDEN_DIM", "32", "MODEL.HEAD.BOTTLENECK_DIM", "16",
    "INPUT.GLOBAL_CROP_SIZE", "32", "INPUT.LOCAL_CROP_SIZE", "16", "INPUT.LOCAL_CROPS_NUMBER", "2",
    "DATASETS.TRAIN", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "24", "DATASETS.SYNTHETIC_IMAGE_SIZE", "40",
    "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0", "SOLVER.FREEZE_LAST_LAYER_EPOCHS", "0",
    "SOLVER.AMP.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1",
]


def run_cli(output_dir, num_gpus, batch, torchrun=False):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_gpus}"]
                if torchrun else [sys.executable])
    cmd = [*launcher, str(REPO / "tools" / "train_net.py"), "--config", str(REPO / "configs" / "dino_vits16.yaml"),
           *([] if torchrun else ["--num-gpus", str(num_gpus)]), *COMMON, "SOLVER.BATCH_SIZE_PER_GPU", str(batch), "OUTPUT_DIR", str(output_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(output_dir / LAST_CHECKPOINT))


def test_two_gloo_workers_match_one_process_with_the_total_batch(tmp_path):
    single = run_cli(tmp_path / "single", num_gpus=1, batch=8)
    ddp = run_cli(tmp_path / "ddp", num_gpus=2, batch=4)
    assert single["iteration"] == ddp["iteration"] == 3
    assert len(ddp["rng"]) == 2  # every rank's generator state is saved
    teacher_keys = [k for k in single["model"] if k.startswith("teacher.")]
    assert teacher_keys
    for key in teacher_keys + ["loss.center"]:
        torch.testing.assert_close(ddp["model"][key], single["model"][key], rtol=0, atol=1e-5, msg=key)
    # And training did move the teacher away from its initialization.
    moved = [k for k in teacher_keys if not torch.equal(single["model"][k], single["model"]["student." + k[8:]])]
    assert moved
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "rank 0 of 2" in log and (tmp_path / "ddp" / "log_rank1.txt").is_file()
    # The two workers share the machine's cores instead of each starting one thread per core.
    expected = cpu_threads_per_worker(2, environ={})
    assert f"{expected or torch.get_num_threads()} CPU threads" in log


def test_local_workers_share_the_cores():
    assert cpu_threads_per_worker(2, environ={}, available=2, total=2) == 1
    assert cpu_threads_per_worker(4, environ={}, available=16, total=16) == 4
    assert cpu_threads_per_worker(4, environ={}, available=2, total=2) == 1  # never 0
    assert cpu_threads_per_worker(1, environ={}, available=16, total=16) is None  # alone: torch's default
    assert cpu_threads_per_worker(2, environ={"OMP_NUM_THREADS": "3"}, available=16, total=16) is None
    assert cpu_threads_per_worker(8, environ={}, available=4, total=64) is None  # pinned by SLURM / taskset


def test_torchrun_environment_is_used_instead_of_spawning(tmp_path):
    """Under torchrun the script joins the given process group: same result as --num-gpus 2."""
    spawned = run_cli(tmp_path / "spawned", num_gpus=2, batch=4)
    launched = run_cli(tmp_path / "torchrun", num_gpus=2, batch=4, torchrun=True)
    # torchrun sets OMP_NUM_THREADS=1, which changes float summation order: equal up to rounding.
    for key, value in spawned["model"].items():
        torch.testing.assert_close(launched["model"][key], value, rtol=0, atol=1e-5, msg=key)
    assert "rank 0 of 2" in (tmp_path / "torchrun" / "log.txt").read_text()
