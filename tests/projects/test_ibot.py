"""projects/iBOT: the patch loss against its formula written out, masking statistics, the patch center
on 2 ranks = 1 process, train_net end to end with the project's config, and a bitwise resume."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_research.config.imports import import_components
from dino_research.engine import DINOTrainer, default_setup, load_config

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "projects" / "iBOT"
CONFIG = str(PROJECT / "configs" / "ibot_vits16.yaml")
masking, ibot = import_components([str(PROJECT / "ibot_masking.py"), str(PROJECT / "ibot.py")])
sys.path.insert(0, str(REPO / "tests"))
from dist_utils import run_on_gloo  # noqa: E402

TINY = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", "2", "MODEL.BACKBONE.PATCH_SIZE", "8",
        "MODEL.BACKBONE.DROP_PATH_RATE", "0.1", "MODEL.HEAD.OUT_DIM", "64", "MODEL.HEAD.HIDDEN_DIM", "32",
        "MODEL.HEAD.BOTTLENECK_DIM", "16", "IBOT.PATCH_OUT_DIM", "48", "IBOT.SHARED_HEAD", "False",
        "INPUT.GLOBAL_CROP_SIZE", "32", "INPUT.LOCAL_CROP_SIZE", "16", "INPUT.LOCAL_CROPS_NUMBER", "2",
        "DATASETS.TRAIN", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "16", "DATASETS.SYNTHETIC_IMAGE_SIZE", "40",
        "SOLVER.BATCH_SIZE_PER_GPU", "4", "SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "1",
        "MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS", "1", "SOLVER.FREEZE_LAST_LAYER_EPOCHS", "1",
        "SOLVER.AMP.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "3",
        "SOLVER.SNAPSHOT_EPOCHS", "0", "LOG_PERIOD", "1"]


def _cfg(out, *extra):
    return load_config(CONFIG, TINY + ["OUTPUT_DIR", str(out), *extra])


# ------------------------------------------------------------------------------------ the patch loss
def test_patch_loss_equals_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    G, B, T, K = 2, 3, 4, 5
    student = torch.randn(G * B, T, K, generator=g)
    teacher = torch.softmax(torch.randn(G * B, T, K, generator=g), dim=-1)
    masks = torch.zeros(G * B, T, dtype=torch.bool)
    masks[0, [1, 3]] = True  # crop 0, image 0: two masked patches
    masks[4, 0] = True  # crop 1, image 1: one
    # images 1, 2 of crop 0 and 0, 2 of crop 1 have no mask: they contribute 0 to their crop's mean.
    temp = 0.1

    def ce(i, t):  # -sum_k q log p for row i, patch t
        log_p = torch.log_softmax(student[i, t] / temp, dim=-1)
        return -(teacher[i, t] * log_p).sum()

    crop0 = ((ce(0, 1) + ce(0, 3)) / 2 + 0 + 0) / 3
    crop1 = (0 + ce(4, 0) / 1 + 0) / 3
    expected = (crop0 + crop1) / 2
    torch.testing.assert_close(ibot.ibot_patch_loss(student, teacher, masks, temp, G), expected)


def test_ibot_forward_loss_is_cls_plus_patch_and_sees_the_masks(make_tiny_cfg, tmp_path):
    cfg = _cfg(tmp_path)
    model = ibot.iBOT(cfg).eval()
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    masks = [torch.zeros(2, 4, 4, dtype=torch.bool) for _ in range(2)]
    masks[0][0, :2, :2] = True
    out = model({"crops": crops, "masks": masks}, teacher_temp=0.04, patch_teacher_temp=0.07)
    assert out["teacher_out"].shape == (4, 64) and out["teacher_patch"].shape == (4, 16, 48)
    assert out["student_out"].shape == (8, 64)
    torch.testing.assert_close(out["loss"], out["cls_loss"] + out["patch_loss"])
    # The student's masked tokens go through the mask token: changing it changes the patch loss (a
    # random direction: a constant added to every feature would vanish in the LayerNorms).
    with torch.no_grad():
        model.student.mask_token.add_(torch.randn(model.student.mask_token.shape))
    again = model({"crops": crops, "masks": masks}, teacher_temp=0.04, patch_teacher_temp=0.07)
    assert not torch.allclose(again["patch_loss"], out["patch_loss"])
    unmasked = model({"crops": crops, "masks": [torch.zeros_like(m) for m in masks]}, teacher_temp=0.04,
                     patch_teacher_temp=0.07)
    assert unmasked["patch_loss"].item() == 0.0  # no masked patch: nothing to predict


# ------------------------------------------------------------------------------------ masking
def test_masking_statistics_follow_the_paper():
    rng = random.Random(0)
    grid = 14  # 224 / 16
    masks = [masking.draw_mask(grid, grid, 0.5, (0.1, 0.5), (0.3, 1 / 0.3), rng) for _ in range(2000)]
    fractions = np.array([m.mean() for m in masks])
    masked = fractions[fractions > 0]
    assert abs(len(masked) / len(masks) - 0.5) < 0.04  # half of the crops are masked at all
    # Blocks never overshoot the target: at most 50% of the patches, and the mean near the middle of
    # the range (blocks stop a little short when none fits the remainder).
    assert masked.max() <= 0.5 + 1e-9 and masked.min() > 0.0
    assert 0.22 < masked.mean() < 0.32
    target = 0.3 * grid * grid
    one = masking.block_mask(grid, grid, target, rng=random.Random(1))
    assert target - 20 <= one.sum() <= target


def test_the_augmentation_adds_one_mask_per_global_crop_and_collates(tmp_path):
    from PIL import Image

    from dino_research.data import build_augmentation, collate_crops

    cfg = _cfg(tmp_path, "IBOT.MASK_PROBABILITY", "1.0")
    aug = build_augmentation(cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    sample = aug(image)
    assert [tuple(c.shape) for c in sample["crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert [tuple(m.shape) for m in sample["masks"]] == [(4, 4), (4, 4)] and all(m.any() for m in sample["masks"])
    batch, labels = collate_crops([(sample, 0), (aug(image), 1)])
    assert [tuple(m.shape) for m in batch["masks"]] == [(2, 4, 4)] * 2 and batch["masks"][0].dtype == torch.bool
    assert tuple(batch["crops"][0].shape) == (2, 3, 32, 32) and labels.tolist() == [0, 1]


def test_the_device_stage_passes_the_masks_and_gives_the_same_crops(tmp_path):
    from PIL import Image

    from dino_research.data import build_augmentation, collate_crops, device_stage

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    plain = build_augmentation(_cfg(tmp_path))
    cfg = _cfg(tmp_path, "INPUT.DEVICE_AUGMENTATION", "True")
    split = build_augmentation(cfg)
    samples = {}
    for name, aug in (("plain", plain), ("split", split)):
        random.seed(0), torch.manual_seed(0)
        samples[name] = [(aug(image), 0), (aug(image), 1)]
    assert samples["split"][0][0]["crops"][0].dtype == torch.uint8
    expected, _ = collate_crops(samples["plain"])
    batch, _ = collate_crops(samples["split"])
    got = device_stage(cfg, split)(batch, torch.device("cpu"))
    assert set(got) == {"crops", "masks"}
    for a, b in zip(got["crops"] + got["masks"], expected["crops"] + expected["masks"]):
        assert torch.equal(a, b)


def test_the_projects_keys_and_schedule():
    cfg = load_config(CONFIG, TINY + ["IBOT.PATCH_TEACHER_TEMP", "0.06", "SOLVER.EPOCHS", "3"])
    from dino_research.solver import build_schedules

    temps = build_schedules(cfg, iters_per_epoch=4)["patch_teacher_temp"]
    assert [temps(i) for i in (0, 3, 4, 11)] == pytest.approx([0.04, 0.04, 0.06, 0.06])
    with pytest.raises(Exception, match="unknown config key 'IBOT.PATCH_TEACHER_TMP'"):
        load_config(CONFIG, ["IBOT.PATCH_TEACHER_TMP", "0.06"])
    assert "patch_teacher_temp" not in build_schedules(load_config("", []), iters_per_epoch=4)  # DINO runs: none


# ------------------------------------------------------------------------------------ distributed
def _patch_center(rank, world_size, teacher_patch, out_file):
    model = ibot.iBOT(load_config(CONFIG, TINY))
    part = teacher_patch.chunk(world_size)[rank]
    teacher_cls = torch.randn(part.shape[0], 64)
    model.after_step([{"teacher_patch": part, "teacher_out": teacher_cls}], momentum=1.0)
    torch.save(model.patch_center, f"{out_file}.{rank}")


def test_two_ranks_with_half_the_batch_each_update_the_patch_center_as_one_process(tmp_path):
    teacher_patch = torch.randn(8, 16, 48, generator=torch.Generator().manual_seed(3))
    run_on_gloo(_patch_center, 2, teacher_patch, str(tmp_path / "c"))
    alone = ibot.iBOT(load_config(CONFIG, TINY))
    alone.after_step([{"teacher_patch": teacher_patch, "teacher_out": torch.randn(8, 64)}], momentum=1.0)
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"c.{rank}"), alone.patch_center)
    # center = 0.9 * 0 + 0.1 * mean over images and patches
    torch.testing.assert_close(alone.patch_center, 0.1 * teacher_patch.mean(dim=(0, 1)).reshape(1, 1, -1))


# ------------------------------------------------------------------------------------ end to end
def test_train_net_runs_the_project_config(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/train_net.py", "--config", CONFIG, *TINY, "OUTPUT_DIR", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(8))
    assert all(np.isfinite(r["loss"]) and r["cls_loss"] > 0 and r["patch_loss"] >= 0 for r in steps)
    assert abs(steps[0]["loss"] - steps[0]["cls_loss"] - steps[0]["patch_loss"]) < 1e-4  # the loss is smoothed later
    assert any(r["patch_loss"] > 0 for r in steps)
    assert [r["patch_teacher_temp"] for r in steps] == pytest.approx([0.04] * 4 + [0.07] * 4)
    assert "iBOT" in (out / "config.yaml").read_text() and (out / "teacher_backbone.pth").is_file()


class _StopAfter:
    trainer = None

    def __init__(self, n):
        self.n = n

    def before_train(self):
        pass

    def after_step(self):
        if self.trainer.iter + 1 == self.n:
            raise KeyboardInterrupt

    def after_train(self):
        pass


def _train(cfg, stop_after=None):
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    if stop_after:
        trainer.register_hooks([_StopAfter(stop_after)])
    trainer.resume_or_load()
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


def test_a_resumed_ibot_run_equals_the_uninterrupted_one_bitwise(tmp_path):
    full = _train(_cfg(tmp_path / "full"))
    _train(_cfg(tmp_path / "cut"), stop_after=3)  # checkpoint at iteration 3 (CHECKPOINT_PERIOD 3)
    resumed = _train(_cfg(tmp_path / "cut"))
    assert resumed.start_iter == 3
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and "patch_center" in a and "student.mask_token" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
