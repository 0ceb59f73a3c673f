"""User errors are one message naming the file/key/value and the fix, exit status 2, no traceback
(``--debug`` shows it), also in log.txt; real bugs keep their traceback; nothing is reported done
after a failure."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dino_research.config import ConfigError, get_cfg

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_training import TINY  # noqa: E402


def _run(*args, env=None, preexec_fn=None, tool="train_net.py"):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=preexec_fn)


def _assert_one_message(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def _configs(tmp_path):
    (tmp_path / "syntax.yaml").write_text("SOLVER:\n  EPOCHS: 3\n   BASE_LR: 0.1\n")
    (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\nSOLVER:\n  EPOCHS: 3\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    (tmp_path / "tab.yaml").write_text("SOLVER:\n\tEPOCHS: 3\n")


@pytest.mark.parametrize("name,fragments", [
    ("syntax.yaml", ["syntax.yaml is not valid YAML at line 3, column 11", "indentation"]),
    ("empty.yaml", ["config file", "empty.yaml is empty", "_BASE_: Base-DINO.yaml"]),
    ("a.yaml", ["_BASE_ cycle:", "a.yaml -> ", "b.yaml -> ", "Remove the _BASE_ entry"]),
    ("tab.yaml", ["tab.yaml is not valid YAML at line 2", "not tabs"]),
    ("missing.yaml", ["config file not found:", "missing.yaml"]),
])
def test_bad_config_files_are_one_message(tmp_path, name, fragments):
    _configs(tmp_path)
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(str(tmp_path / name))
    for fragment in fragments:
        assert fragment in str(info.value)
    if name in ("syntax.yaml", "a.yaml"):  # and through a tool (the _BASE_ cycle was 1,000 frames deep)
        _assert_one_message(_run("--config", str(tmp_path / name)), *fragments)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write into, made for real: ``chmod 555`` for a normal user; as root
    (who writes anywhere) a read-only tmpfs mounted there, else an immutable folder (``chattr +i``)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "Permission denied"
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode == 0:
        yield folder, "Read-only file system"
        subprocess.run(["umount", str(folder)], check=True)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder, "Operation not permitted"
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    pytest.skip("running as root with neither mount nor chattr permitted: no folder is unwritable here")


def test_output_dir_not_writable_is_detected_at_start(unwritable_dir):
    folder, reason = unwritable_dir
    proc = _run(*TINY, "OUTPUT_DIR", str(folder / "run"))
    _assert_one_message(proc, f"OUTPUT_DIR = {folder / 'run'} is not writable ({reason})")
    assert not (folder / "run").exists()


def test_a_batch_larger_than_the_dataset_is_one_message_also_in_the_log_and_from_workers(tmp_path):
    proc = _run(*TINY, "SOLVER.BATCH_SIZE_PER_GPU", "32", "OUTPUT_DIR", str(tmp_path / "one"))
    _assert_one_message(proc, "has 16 images, fewer than one optimizer step needs (32 =",
                        "lower SOLVER.BATCH_SIZE_PER_GPU to at most 16")
    assert "ConfigError: dataset Synthetic" in (tmp_path / "one" / "log.txt").read_text()
    # The same error in two spawned workers: printed once, by rank 0, and the launcher adds no traceback.
    proc = _run("--num-gpus", "2", *TINY, "SOLVER.BATCH_SIZE_PER_GPU", "12", "OUTPUT_DIR", str(tmp_path / "two"))
    _assert_one_message(proc, "fewer than one optimizer step needs (24 =", "at most 8")
    assert "ConfigError" in (tmp_path / "two" / "log_rank1.txt").read_text()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    proc = _run("--debug", *TINY, "SOLVER.BATCH_SIZE_PER_GPU", "32", "OUTPUT_DIR", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = _run(*TINY, "SOLVER.BATCH_SIZE_PER_GPU", "32", "OUTPUT_DIR", str(tmp_path),
                env=dict(os.environ, DINO_RESEARCH_DEBUG="1"))
    assert "Traceback" in proc.stderr


BUGGY_BACKBONE = '''
import torch.nn as nn
from dino_research.modeling import BACKBONE_REGISTRY


@BACKBONE_REGISTRY.register()
class BuggyBackbone(nn.Module):
    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        self.embed_dim = 8
        self.linear = nn.Linear(3, 8)

    def forward(self, x):
        raise RuntimeError("a bug in a project's backbone")
'''


def test_a_real_bug_keeps_its_traceback_and_reaches_the_log_and_nothing_is_reported_done(tmp_path):
    module = tmp_path / "buggy_backbone.py"
    module.write_text(BUGGY_BACKBONE)
    out = tmp_path / "run"
    proc = _run(*TINY, "IMPORTS", f"['{module}']", "MODEL.BACKBONE.NAME", "BuggyBackbone", "OUTPUT_DIR", str(out))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "a bug in a project's backbone" in proc.stderr
    log = (out / "log.txt").read_text()
    assert "fatal error:" in log and "Traceback" in log and "a bug in a project's backbone" in log
    assert "training complete" not in log and "exported" not in log
    assert not (out / "teacher_backbone.pth").exists()


def test_a_run_failing_at_its_last_iteration_exports_nothing(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_numerical_faults import build, poison_batches

    from dino_research.engine import NonFiniteLossError

    trainer = build(tmp_path)
    poison_batches(trainer, {trainer.max_iter - 1})
    with pytest.raises(NonFiniteLossError):
        trainer.train()
    assert not trainer.completed
    assert not (tmp_path / "teacher_backbone.pth").exists()
    assert "exported" not in (tmp_path / "log.txt").read_text()


def test_a_missing_data_root_is_one_message(tmp_path):
    proc = _run(*TINY, "DATASETS.TRAIN", "ImageFolder", "DATASETS.TRAIN_ROOT", str(tmp_path / "nowhere"),
                "OUTPUT_DIR", str(tmp_path / "run"))
    _assert_one_message(proc, f"ImageFolder: root '{tmp_path / 'nowhere'}' does not exist")


def test_an_evaluation_in_a_training_folder_leaves_its_config_yaml_alone(tmp_path):
    out = tmp_path / "run"
    assert _run(*TINY, "SOLVER.EPOCHS", "1", "OUTPUT_DIR", str(out)).returncode == 0
    before = (out / "config.yaml").read_text()
    proc = _run(*TINY, "TEST.DATASET", "Synthetic", "TEST.CROP_SIZE", "32", "TEST.RESIZE_SIZE", "32",
                "TEST.KNN.K", "(1,)", "OUTPUT_DIR", str(out), "--weights", str(out / "last_checkpoint.pth"),
                tool="eval_knn.py")
    assert proc.returncode == 2 and "looks like an option" in proc.stderr  # options come first
    proc = _run("--weights", str(out / "last_checkpoint.pth"), *TINY, "TEST.DATASET", "Synthetic", "TEST.CROP_SIZE",
                "32", "TEST.RESIZE_SIZE", "32", "TEST.KNN.K", "(1,)", "OUTPUT_DIR", str(out), tool="eval_knn.py")
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.yaml").read_text() == before
    assert "KNN" in (out / "config_eval_knn.yaml").read_text()
