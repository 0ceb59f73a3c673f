"""projects/SinkhornCentering: a component added without editing the core, through the config's IMPORTS.

Sinkhorn-Knopp against a hand-written reference, across 2 gloo ranks against one process, and the
project's config training end to end with tools/train_net.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_research.config import ConfigError
from dino_research.config.imports import import_components
from dino_research.engine import load_config
from dino_research.modeling import build_loss

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "projects" / "SinkhornCentering"
sys.path.insert(0, str(REPO / "tests"))
from dist_utils import run_on_gloo  # noqa: E402

sinkhorn = import_components([str(PROJECT / "sinkhorn_centering.py")])[0]


def reference_sinkhorn(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """The textbook alternation in float64: prototypes to mass N/K each, then samples to mass 1."""
    q = np.exp(logits / temp)
    n, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(axis=0, keepdims=True) * (n / k)
        q = q / q.sum(axis=1, keepdims=True)
    return q


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_equals_the_reference(iterations):
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)) * 3
    got = sinkhorn.sinkhorn_knopp(logits, 0.5, iterations)
    np.testing.assert_allclose(got.numpy(), reference_sinkhorn(logits.double().numpy(), 0.5, iterations), rtol=1e-5)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(12))


def test_many_iterations_balance_the_prototypes():
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(1)) * 2
    logits[:, 0] += 5.0  # one prototype dominates every sample: what centering must undo
    q = sinkhorn.sinkhorn_knopp(logits, 0.1, iterations=200)
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 40 / 8), atol=1e-3, rtol=0)
    # A plain sharpened softmax of the same logits gives that prototype most of the batch.
    assert torch.softmax(logits / 0.1, dim=1).sum(dim=0)[0] > 30


def test_large_logits_do_not_overflow():
    q = sinkhorn.sinkhorn_knopp(torch.tensor([[1000.0, 0.0], [0.0, 1000.0]]), 0.04)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(dim=1), torch.ones(2))


def _two_ranks(rank, world_size, logits, out_file):
    part = logits.chunk(world_size)[rank]
    torch.save(sinkhorn.sinkhorn_knopp(part, 0.2, 3), f"{out_file}.{rank}")


def test_two_ranks_with_half_the_batch_each_equal_one_process(tmp_path):
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    run_on_gloo(_two_ranks, 2, logits, str(tmp_path / "q"))
    got = torch.cat([torch.load(tmp_path / f"q.{r}") for r in range(2)])
    torch.testing.assert_close(got, sinkhorn.sinkhorn_knopp(logits, 0.2, 3), atol=1e-6, rtol=1e-5)


def test_the_config_selects_the_project_loss_and_imports_it_once(monkeypatch):
    monkeypatch.chdir(REPO)  # IMPORTS paths are relative to the current directory
    config = str(PROJECT / "configs" / "fashion_mnist_sinkhorn.yaml")
    loss = build_loss(load_config(config, []))
    assert type(loss).__name__ == "DINOSinkhornLoss" and loss.sinkhorn_iterations == 3
    build_loss(load_config(config, []))  # loading again does not register twice (the registry would refuse)
    # The loss is DINO's cross-entropy over view pairs with Sinkhorn targets: check one case by hand.
    student, teacher = torch.randn(4, 1024), torch.randn(2, 1024)  # B=1, 2 global + 2 local crops
    q = sinkhorn.sinkhorn_knopp(teacher, 0.04, 3)
    log_p = torch.log_softmax(student / 0.1, dim=1)
    pairs = [(i, v) for i in range(2) for v in range(4) if i != v]
    expected = torch.stack([-(q[i] * log_p[v]).sum() for i, v in pairs]).mean()
    torch.testing.assert_close(loss(student, teacher, 0.04), expected)
    assert not hasattr(loss, "center") and "center" not in dict(loss.named_buffers())  # no running state
    # The project's own key, set by the file's YAML or an override, and checked like a core key.
    assert build_loss(load_config(config, ["SINKHORN.ITERATIONS", "5"])).sinkhorn_iterations == 5
    with pytest.raises(ConfigError, match="unknown config key 'SINKHORN.ITERATOINS'. Did you mean: SINKHORN.ITERATIONS"):
        load_config(config, ["SINKHORN.ITERATOINS", "5"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(config, ["SINKHORN.ITERATIONS", "2.5"])


def test_a_bad_import_is_a_config_error_naming_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"IMPORTS: no file 'missing\.py'"):
        load_config("", ["IMPORTS", "['missing.py']"])
    with pytest.raises(ConfigError, match="IMPORTS: cannot import module 'no_such_module_xyz'"):
        load_config("", ["IMPORTS", "['no_such_module_xyz']"])


def test_train_net_runs_the_project_config(tmp_path):
    tiny = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", "2", "MODEL.BACKBONE.PATCH_SIZE", "7",
            "MODEL.HEAD.USE_BN", "False", "MODEL.TEACHER.EMA", "ParamEMA", "MODEL.HEAD.OUT_DIM", "64",
            "MODEL.HEAD.HIDDEN_DIM", "32", "MODEL.HEAD.BOTTLENECK_DIM", "16", "DATASETS.TRAIN", "Synthetic",
            "DATASETS.SYNTHETIC_SIZE", "8", "DATASETS.SYNTHETIC_IMAGE_SIZE", "32", "DATASETS.TRAIN_SUBSET", "0",
            "SOLVER.BATCH_SIZE_PER_GPU", "4", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0",
            "SOLVER.FREEZE_LAST_LAYER_EPOCHS", "0", "TEST.EVAL_PERIOD", "0", "TEST.ATTENTION.PERIOD", "0",
            "LOG_PERIOD", "1", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "tools/train_net.py", "--config",
                           "projects/SinkhornCentering/configs/fashion_mnist_sinkhorn.yaml", *tiny],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [0, 1]
    assert all(np.isfinite(r["loss"]) and "center_norm" not in r for r in rows if "loss" in r)
    assert "teacher_entropy" in rows[-1]
    assert "DINOSinkhornLoss" in (tmp_path / "out" / "config.yaml").read_text()
