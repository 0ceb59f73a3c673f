"""Resume checks the checkpoint against the config: a change of what the state means is refused with
every difference and the fixes (nothing on disk touched), recipe changes need --allow-config-change,
a longer run is allowed and says how its schedules are recomputed, and config.yaml is written only
after the check, the previous one kept beside it."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from dino_research.checkpoint import LAST_CHECKPOINT, load_file
from dino_research.engine.resume_check import ResumeConfigError, check_state_shapes, config_differences, key_class

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_training import TINY, make_cfg, train  # noqa: E402


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_net(out, *extra):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), *TINY, "OUTPUT_DIR", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch tiny run (4 iterations per epoch of 4 images), finished."""
    out = tmp_path_factory.mktemp("resume") / "run"
    proc = _train_net(out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("override,expected", [
    (["SOLVER.BATCH_SIZE_PER_GPU", "2"], ["iterations per epoch: 4 in the checkpoint, 8 now",
                                          "total batch (BATCH_SIZE_PER_GPU x processes x ACCUMULATE_STEPS): 4"]),
    (["DATASETS.SYNTHETIC_SIZE", "32"], ["iterations per epoch: 4 in the checkpoint, 8 now",
                                         "DATASETS.SYNTHETIC_SIZE: 16 in the checkpoint, 32 now"]),
    (["MODEL.HEAD.OUT_DIM", "128"], ["MODEL.HEAD.OUT_DIM: 64 in the checkpoint, 128 now (the saved weights belong"]),
    (["MODEL.BACKBONE.DEPTH", "3"], ["MODEL.BACKBONE.DEPTH: 0 in the checkpoint, 3 now"]),
    (["SOLVER.BASE_LR", "0.001"], ["SOLVER.BASE_LR: 0.0005 in the checkpoint, 0.001 now",
                                   "--allow-config-change resumes with the new values"]),
], ids=["batch", "dataset-size", "out-dim", "depth", "recipe"])
def test_a_changed_meaning_is_refused_listing_each_difference_and_nothing_is_touched(finished_run, override,
                                                                                      expected):
    before = {p.name: _digest(p) for p in finished_run.glob("*.pth")}
    config_before = (finished_run / "config.yaml").read_text()
    proc = _train_net(finished_run, "SOLVER.EPOCHS", "3", *override)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "size mismatch" not in proc.stderr
    assert f"cannot resume from {finished_run / LAST_CHECKPOINT} (iteration 8, epoch 2)" in proc.stderr
    for text in expected:
        assert text in proc.stderr
    assert "set another OUTPUT_DIR" in proc.stderr and f"MODEL.WEIGHTS {finished_run / LAST_CHECKPOINT}" in proc.stderr
    assert {p.name: _digest(p) for p in finished_run.glob("*.pth")} == before
    assert (finished_run / "config.yaml").read_text() == config_before  # written only after the check
    assert not list(finished_run.glob("config_until_iter_*"))


def test_extending_the_run_is_allowed_logged_and_keeps_the_previous_config(tmp_path):
    out = tmp_path / "run"
    assert _train_net(out).returncode == 0
    first_config = (out / "config.yaml").read_text()
    proc = _train_net(out, "SOLVER.EPOCHS", "3", "LOG_PERIOD", "1", "TEST.KNN.TEMPERATURE", "0.1")
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout
    assert "resuming with a changed config: SOLVER.EPOCHS: 2 in the checkpoint, 3 now" in log
    assert "schedules are recomputed over 3 epochs" in log and "at the resumed iteration 8: lr" in log
    assert "LOG_PERIOD: 2 in the checkpoint, 1 now" in log
    assert "TEST.KNN.TEMPERATURE" in log
    assert load_file(str(out / LAST_CHECKPOINT))["iteration"] == 12  # trained the added epoch
    assert (out / "config_until_iter_0000008.yaml").read_text() == first_config
    assert "EPOCHS: 3" in (out / "config.yaml").read_text()


def test_a_recipe_change_resumes_with_allow_config_change(tmp_path):
    out = tmp_path / "run"
    assert _train_net(out, "SOLVER.EPOCHS", "1").returncode == 0
    proc = _train_net(out, "SOLVER.EPOCHS", "2", "MODEL.LOSS.TEACHER_TEMP", "0.05", "--allow-config-change")
    assert proc.returncode == 2 and "looks like an option: options go before the first override" in proc.stderr
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--allow-config-change", *TINY, "OUTPUT_DIR",
           str(out), "SOLVER.EPOCHS", "2", "MODEL.LOSS.TEACHER_TEMP", "0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MODEL.LOSS.TEACHER_TEMP: 0.04 in the checkpoint, 0.05 now (recipe change allowed" in proc.stdout


def test_same_total_batch_another_split_is_allowed(tmp_path):
    """BATCH_SIZE_PER_GPU 4 -> 2 with ACCUMULATE_STEPS 1 -> 2: the same images per step, in the same order."""
    cfg = make_cfg(tmp_path, "SOLVER.EPOCHS", "1")
    train(cfg)
    longer = make_cfg(tmp_path, "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE_PER_GPU", "2", "SOLVER.ACCUMULATE_STEPS", "2")
    trainer = train(longer)
    assert trainer.start_iter == 4 and trainer.iter + 1 == 8


def test_reducing_epochs_below_the_progress_is_refused(tmp_path):
    train(make_cfg(tmp_path))  # 8 iterations
    with pytest.raises(ResumeConfigError, match=r"already at epoch 2.00: there is nothing left to train"):
        train(make_cfg(tmp_path, "SOLVER.EPOCHS", "1"))


def test_key_classes_and_differences():
    assert key_class("MODEL.HEAD.OUT_DIM") == key_class("SEED") == key_class("SOLVER.OPTIMIZER") == "state"
    assert key_class("SOLVER.EPOCHS") == key_class("TEST.KNN.K") == key_class("DATALOADER.NUM_WORKERS") == "run"
    assert key_class("SOLVER.BASE_LR") == key_class("INPUT.FLIP_PROB") == key_class("PROJECT.NEW_KEY") == "recipe"
    cfg = make_cfg("/tmp/x")
    dump = cfg.dump()
    assert config_differences(dump, cfg) == []  # tuples dumped as lists compare equal
    changed = make_cfg("/tmp/x", "INPUT.GLOBAL_CROPS_SCALE", "(0.3, 1.0)", "SOLVER.EPOCHS", "5")
    assert config_differences(dump, changed) == [("INPUT.GLOBAL_CROPS_SCALE", [0.4, 1.0], (0.3, 1.0)),
                                                 ("SOLVER.EPOCHS", 2, 5)]
    assert ("OLD.KEY", 1, "(absent)") in config_differences(dump + "OLD:\n  KEY: 1\n", cfg)
    # A key added after the checkpoint was written is no difference while it holds its default.
    older = dump.replace("  EXIF_TRANSPOSE: true\n", "")
    assert older != dump and config_differences(older, cfg) == []
    no_exif = make_cfg("/tmp/x", "INPUT.EXIF_TRANSPOSE", "False")
    assert config_differences(older, no_exif) == [("INPUT.EXIF_TRANSPOSE", "(absent)", False)]


def test_state_that_does_not_fit_is_a_message_not_a_size_mismatch_traceback():
    import torch

    model = {"a": torch.zeros(2, 3), "b": torch.zeros(1)}
    with pytest.raises(ResumeConfigError, match=r"a: checkpoint \(4, 3\), model \(2, 3\); missing \['b'\]; "
                                                 r"unexpected \['c'\]"):
        check_state_shapes(model, {"a": torch.zeros(4, 3), "c": torch.zeros(1)}, "ckpt.pth")
    check_state_shapes(model, {"a": torch.ones(2, 3), "b": torch.ones(1)}, "ckpt.pth")  # fits: no error
