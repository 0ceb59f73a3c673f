"""The trainer's CUDA paths: float16 autocast with the gradient scaler (an overflow skips the step and
halves the scale), bfloat16 autocast, SyncBatchNorm, pinned-memory batches, checkpoints resumed bitwise
on the GPU and checkpoints resumed on another device; and the GPU benchmark's batch search.

Tests and cases marked ``cuda`` need a GPU and skip without one: ``python -m pytest tests/cuda -m cuda``
on a GPU machine (``tools/gpu_check.sh`` runs them). Most tests are parametrized over the device: their
``cpu`` case runs the same code on the CPU in the normal suite, so the helpers and everything that is
not CUDA-specific are checked without a GPU. Where the CUDA case uses float16, which has no CPU
kernels, the CPU case trains in float32 with an *enabled* CPU ``GradScaler`` put in the trainer's
place: the scaler's path through ``run_step`` and the checkpointer is the same.

Bitwise comparisons on the GPU run with ``torch.use_deterministic_algorithms(True, warn_only=True)``
(cuDNN deterministic, ``CUBLAS_WORKSPACE_CONFIG`` set below, before CUDA starts); when a resumed run
differs, the test trains the uninterrupted run again and says whether the GPU run itself is
deterministic, so that a failure names its cause.
"""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from dino_research.checkpoint import LAST_CHECKPOINT, load_file
from dino_research.engine import DINOTrainer, default_setup
from dino_research.engine.simple_trainer import as_model_batch, to_device
from dino_research.utils.events import EventStorage

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "engine"))
sys.path.insert(0, str(TESTS))
from dist_utils import run_on_gloo  # noqa: E402
from test_training import StopAfter, make_cfg  # noqa: E402
from tool_utils import load_tool  # noqa: E402

# cuBLAS reads this when it creates its first handle: deterministic matmul workspaces. Harmless without a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = ("needs a CUDA device: torch.cuda.is_available() is False "
           "(run `python -m pytest tests/cuda -m cuda` or tools/gpu_check.sh on a GPU machine)")
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]

PRECISION_OPTS = {
    "fp32": ["SOLVER.AMP.ENABLED", "False"],
    "bf16": ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16"],
    "fp16": ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16"],
}
AUTOCAST_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A BatchNorm backbone: the CIFAR-style ResNet-18 at width 8, its statistics followed by the teacher.
BN_BACKBONE = ["MODEL.BACKBONE.NAME", "cifar_resnet", "MODEL.BACKBONE.DEPTH", "18", "MODEL.BACKBONE.RESNET_WIDTH", "8",
               "MODEL.BACKBONE.DROP_PATH_RATE", "0.0", "MODEL.TEACHER.EMA", "ParamAndBufferEMA"]
INIT_SCALE = 2.0**16  # GradScaler's default


# ------------------------------------------------------------------------------ helpers
def build(out, device, precision="fp32", *extra, hooks=True):
    """A DINOTrainer of the tiny test config (``tests/engine/test_training.py``) on ``device``.

    ``precision`` "fp16" on the CPU: float32 with an enabled CPU GradScaler in the trainer's and the
    checkpointer's place (float16 autocast has no CPU kernels; the trainer refuses it there).
    """
    cpu_scaler = device == "cpu" and precision == "fp16"
    cfg = make_cfg(out, "MODEL.DEVICE", device, *PRECISION_OPTS["fp32" if cpu_scaler else precision], *extra)
    default_setup(cfg)
    trainer = DINOTrainer(cfg, default_hooks=hooks)
    if cpu_scaler:
        trainer.scaler = trainer.checkpointer.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    return trainer


def steps(trainer, iterations):
    """``run_step`` at each of the consecutive ``iterations``, without hooks, reading the loader from there."""
    iterations = list(iterations)
    trainer.open_data(iterations[0])
    with EventStorage(iterations[0]) as trainer.storage:
        for it in iterations:
            trainer.iter = trainer.storage.iter = it
            trainer.run_step()
        return trainer.storage.latest()


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimizer_tensors(optimizer):
    """``{"index.name": tensor}`` of the optimizer's per-parameter state (moments, step counts)."""
    return {f"{i}.{name}": value.detach().clone() for i, state in optimizer.state_dict()["state"].items()
            for name, value in state.items() if isinstance(value, torch.Tensor)}


def differences(expected: dict, got: dict) -> list:
    """Keys whose tensors differ (bitwise, on the CPU), or that only one side has."""
    keys = set(expected) | set(got)
    return sorted(k for k in keys if k not in expected or k not in got
                  or not torch.equal(expected[k].cpu(), got[k].cpu()))


def record_output_dtypes(module):
    """Record the dtype of every output of ``module`` (a list, filled as it runs); returns (list, handle)."""
    seen = []
    return seen, module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))


@contextlib.contextmanager
def no_tf32():
    """float32 matmuls and convolutions in full float32 on CUDA (cuDNN allows TF32 by default)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def deterministic(device):
    """Deterministic kernels on CUDA (warn-only: an op without a deterministic kernel warns instead of failing)."""
    if device != "cuda":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def train_run(out, device, precision, stop_after=None, allow_config_change=False):
    """Train (resuming from ``out`` when it holds a checkpoint), optionally stopping after iteration
    ``stop_after`` as a kill would (``StopAfter``); returns the trainer."""
    trainer = build(out, device, precision)
    if stop_after is not None:
        trainer.register_hooks([StopAfter(stop_after)])
    trainer.resume_or_load(resume=True, allow_config_change=allow_config_change)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


def run_state(trainer) -> dict:
    """Everything a bitwise resume must reproduce: model, optimizer state and gradient-scaler scale."""
    state = {f"model.{k}": v for k, v in clone_state(trainer.model).items()}
    state.update({f"optimizer.{k}": v for k, v in optimizer_tensors(trainer.optimizer).items()})
    if trainer.scaler.is_enabled():
        state["scaler.scale"] = torch.tensor(trainer.scaler.get_scale())
    return state


def eval_loss(trainer, batch, it):
    """DINO's loss of ``batch`` at iteration ``it``'s schedules, in eval mode (no stochastic depth)."""
    values = {k: v for k, v in trainer.schedule_values(it).items() if k not in ("lr", "weight_decay")}
    trainer.model.eval()
    try:
        with torch.no_grad():
            return float(trainer.model(to_device(batch, trainer.device), **values)["loss"])
    finally:
        trainer.model.train()


# ------------------------------------------------------------------------------ float16 and the scaler
@pytest.mark.parametrize("device", DEVICES)
def test_float16_overflow_skips_the_step_and_halves_the_scale(tmp_path, device):
    trainer = build(tmp_path, device, "fp16", hooks=False)
    scaler = trainer.scaler
    assert scaler.is_enabled() and scaler.get_scale() == INIT_SCALE
    student = trainer.model.student
    dtypes, handle = record_output_dtypes(student.backbone.blocks[0].attn.qkv)

    # 1. A step at the trainer's initial scale: autocast runs the linear layers in float16 over float32
    # master weights. (This first step may itself overflow and halve the scale: that is the scaler's job.)
    steps(trainer, [0])
    handle.remove()
    assert set(dtypes) == {torch.float16 if device == "cuda" else torch.float32}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert scaler.get_scale() in (INIT_SCALE, INIT_SCALE / 2)
    scaler.update(new_scale=1024.0)  # from here on a scale at which these tiny gradients never overflow

    def skipped_step(it):
        """Run iteration ``it``; assert that the student and the optimizer state did not move and
        that the scale halved."""
        weights, moments, scale = clone_state(student), optimizer_tensors(trainer.optimizer), scaler.get_scale()
        steps(trainer, [it])
        assert differences(weights, clone_state(student)) == [], f"the overflowing step {it} updated the student"
        assert differences(moments, optimizer_tensors(trainer.optimizer)) == [], "the optimizer state moved"
        assert scaler.get_scale() == scale / 2
        # The scaler skips the optimizer step only: the teacher EMA and the center update still run, as
        # in the reference (unlike SOLVER.SKIP_NONFINITE's skip, which counts the step and leaves them).
        assert trainer.nonfinite_skipped == 0

    # 2. An inf gradient in one parameter (after the backward, before unscaling and clipping).
    weight = student.backbone.blocks[0].mlp.fc1.weight
    handle = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    skipped_step(1)
    handle.remove()
    assert scaler.get_scale() == 512.0

    # 3. A real float16 overflow: at a scale of 2^60 the scaled gradients overflow float16 in the
    # backward pass (float32 gradients on the CPU would not).
    if device == "cuda":
        scaler.update(new_scale=2.0**60)
        skipped_step(2)
        assert scaler.get_scale() == 2.0**59
        scaler.update(new_scale=512.0)

    # 4. Training goes on at the lowered scale.
    before = clone_state(student)
    steps(trainer, [3])
    assert differences(before, clone_state(student)), "a step at a safe scale changed no weight"
    assert scaler.get_scale() == 512.0
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_step(tmp_path, device):
    trainer = build(tmp_path, device, "bf16", hooks=False)
    assert not trainer.scaler.is_enabled()  # bfloat16 needs no loss scaling
    dtypes, handle = record_output_dtypes(trainer.model.student.backbone.blocks[0].attn.qkv)
    before = clone_state(trainer.model)
    latest = steps(trainer, [0, 1])
    handle.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert torch.isfinite(torch.tensor(latest["loss"][0]))
    changed = differences(before, clone_state(trainer.model))
    assert any(k.startswith("student.") for k in changed) and any(k.startswith("teacher.") for k in changed)
    assert "loss.center" in changed


# ------------------------------------------------------------------------------ SyncBatchNorm
def _syncbn_matches_batchnorm_of_the_whole_batch(rank, world_size) -> bool:
    """SyncBatchNorm of each rank's share == BatchNorm of all shares concatenated (outputs and running stats)."""
    gen = torch.Generator().manual_seed(0)
    shares = [torch.randn(3, 4, 5, 5, generator=gen) * (r + 1) + r for r in range(world_size)]
    sync, plain = nn.SyncBatchNorm(4).cuda(), nn.BatchNorm2d(4).cuda()
    out = sync(shares[rank].cuda())
    expected = plain(torch.cat(shares).cuda())[3 * rank: 3 * (rank + 1)]
    return (torch.allclose(out, expected, atol=1e-5) and torch.allclose(sync.running_mean, plain.running_mean, atol=1e-6)
            and torch.allclose(sync.running_var, plain.running_var, atol=1e-5))


def _syncbn_worker(rank, world_size, device, out):
    if device == "cuda":
        # Both ranks share the one GPU over gloo (NCCL refuses two ranks on one device); gloo moves
        # CUDA tensors through the host, which is all SyncBatchNorm and DDP need here.
        torch.cuda.set_device(0)
    trainer = build(Path(out), device, "fp32", *BN_BACKBONE, hooks=False)
    modules = list(trainer.model.modules())
    result = {"sync": sum(isinstance(m, nn.SyncBatchNorm) for m in modules),
              "plain": sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in modules),
              "device": next(trainer.model.parameters()).device.type}
    steps(trainer, [0, 1])
    bn = trainer.model.student.backbone.stem[1]
    stats = torch.cat([bn.running_mean, bn.running_var]).detach().cpu()
    gathered = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    result["same_stats"] = all(torch.equal(gathered[0], g) for g in gathered)
    if device == "cuda":
        result["direct"] = _syncbn_matches_batchnorm_of_the_whole_batch(rank, world_size)
    torch.save(result, Path(out) / f"result_rank{rank}.pth")


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_backbone_is_synchronized_across_processes(tmp_path, device):
    """2 processes: on CUDA the trainer converts the backbone's BatchNorm to SyncBatchNorm, whose
    statistics cover the batch of both (equal on every rank); on the CPU it keeps BatchNorm, with
    per-process statistics, and says so."""
    run_on_gloo(_syncbn_worker, 2, device, str(tmp_path))
    results = [torch.load(tmp_path / f"result_rank{r}.pth") for r in range(2)]
    for result in results:
        assert result["device"] == device
        if device == "cuda":
            assert result["sync"] > 0 and result["plain"] == 0, result
            assert result["same_stats"], "SyncBatchNorm running statistics differ across ranks"
            assert result["direct"], "SyncBatchNorm differs from BatchNorm over the concatenated batch"
        else:
            assert result["sync"] == 0 and result["plain"] > 0, result
            assert not result["same_stats"]  # each process normalized its own images
    if device == "cpu":
        assert "SyncBatchNorm needs CUDA" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------------------ pinned memory
@pytest.mark.parametrize("device", DEVICES)
def test_loader_batches_reach_the_device(tmp_path, device):
    """With worker processes, batches arrive in pinned memory when CUDA is available and the
    trainer's (non-blocking) copy puts the same values on the training device."""
    trainer = build(tmp_path, device, "fp32", "DATALOADER.NUM_WORKERS", "2", hooks=False)
    stream = trainer.loader.iterate(0)
    crops, labels = next(stream)
    if device == "cuda":
        assert trainer.loader.loader.pin_memory
        assert all(c.is_pinned() for c in crops) and labels.is_pinned()
    batch = to_device(as_model_batch((crops, labels)), trainer.device)
    assert [c.shape for c in batch["crops"]] == [c.shape for c in crops]
    for host, moved in zip(crops, batch["crops"]):
        assert moved.device.type == device
        assert torch.equal(moved.cpu(), host)  # .cpu() waits for the copy on the same stream
    trainer.loader.close()
    latest = steps(trainer, [0, 1])  # the real loader feeds run_step
    assert torch.isfinite(torch.tensor(latest["loss"][0]))
    trainer.loader.close()


@pytest.mark.parametrize("device", DEVICES)
def test_the_augmentations_device_stage_gives_the_in_worker_bytes_there(device):
    """INPUT.DEVICE_AUGMENTATION's stage on ``device`` equals the in-worker crops computed on the CPU:
    the same float32 operations, no fused rounding (on CUDA too), Pillow's blur in exact float64."""
    import random

    import numpy as np
    from PIL import Image

    from dino_research.data import collate_crops
    from dino_research.data.augmentations import DINOMultiCrop

    settings = dict(global_crop_size=48, local_crop_size=24, local_crops_number=2, color_jitter_prob=1.0,
                    grayscale_prob=0.3, local_blur_prob=1.0, global_solarize_probs=(0.5, 0.5))
    plain, split = DINOMultiCrop(**settings), DINOMultiCrop(device_augmentation=True, **settings)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8))
    expected, samples = [], []
    for seed in range(8):
        random.seed(seed), torch.manual_seed(seed)
        expected.append(plain(image))
        random.seed(seed), torch.manual_seed(seed)
        samples.append((split(image), seed))
    batch, _ = collate_crops(samples)
    finished = split.finish_batch(batch, torch.device(device))
    for c, crops in enumerate(finished["crops"]):
        assert crops.device.type == device
        assert torch.equal(crops.cpu(), torch.stack([e[c] for e in expected])), f"crop {c}"


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("device,precision", [
    pytest.param("cpu", "fp16", id="cpu-scaler"),  # float32 with an enabled CPU GradScaler
    pytest.param("cuda", "fp32", id="cuda-fp32", marks=CUDA),
    pytest.param("cuda", "fp16", id="cuda-fp16", marks=CUDA),
    pytest.param("cuda", "bf16", id="cuda-bf16", marks=CUDA),
])
def test_checkpoint_written_on_the_device_resumes_bitwise_there(tmp_path, device, precision):
    """Stop after iteration 3 (a checkpoint), resume: model, optimizer state and scale end bitwise
    equal to the uninterrupted run's (the kill/resume protocol of tests/engine/test_training.py)."""
    with deterministic(device):
        full = train_run(tmp_path / "full", device, precision)
        stopped = train_run(tmp_path / "resumed", device, precision, stop_after=3)
        assert stopped.iter + 1 == 3
        data = load_file(str(tmp_path / "resumed" / LAST_CHECKPOINT))
        assert data["iteration"] == 3
        if device == "cuda":
            assert "cuda" in data["rng"][0]  # the CUDA generator (stochastic depth) is saved too
        assert bool(data["scaler"]) == (precision == "fp16")
        resumed = train_run(tmp_path / "resumed", device, precision)
        assert resumed.start_iter == 3 and resumed.completed
        assert next(resumed.model.parameters()).device.type == device
        differing = differences(run_state(full), run_state(resumed))
        if differing:
            again = train_run(tmp_path / "full_again", device, precision)
            unstable = differences(run_state(full), run_state(again))
            cause = (f"the GPU run itself is not deterministic: two uninterrupted runs differ in {len(unstable)} "
                     f"entries (e.g. {unstable[:3]}), so the resume cannot be checked bitwise"
                     if unstable else "two uninterrupted runs agree: the resume lost or changed state")
            pytest.fail(f"resumed run differs from the uninterrupted one in {len(differing)} entries "
                        f"(e.g. {differing[:5]}); {cause}")


@pytest.mark.parametrize("written_on,resumed_on,precision", [
    pytest.param("cpu", "cpu", "fp16", id="cpu-to-cpu-scaler"),  # the helpers, and a scaler resumed from none
    pytest.param("cpu", "cuda", "fp32", id="cpu-to-cuda", marks=CUDA),
    pytest.param("cpu", "cuda", "fp16", id="cpu-to-cuda-fp16", marks=CUDA),
    pytest.param("cuda", "cpu", "fp32", id="cuda-to-cpu", marks=CUDA),
])
def test_checkpoint_resumes_on_another_device(tmp_path, written_on, resumed_on, precision):
    """A float32 checkpoint written on one device resumes on the other (``MODEL.DEVICE`` may change on
    resume): the state arrives bitwise on the new device, computes the same loss there as on the
    device that wrote it, and training finishes. With ``precision`` fp16 the resumed run switches to
    float16 (``--allow-config-change``): its scaler starts from its initial scale, since the
    checkpoint's disabled scaler saved none."""
    out = tmp_path / "run"
    train_run(out, written_on, "fp32", stop_after=3)
    data = load_file(str(out / LAST_CHECKPOINT))
    assert data["iteration"] == 3 and data["scaler"] == {}

    trainer = build(out, resumed_on, precision)
    trainer.resume_or_load(resume=True, allow_config_change=True)
    assert trainer.start_iter == 3
    for key, value in trainer.model.state_dict().items():
        assert value.device.type == resumed_on, key
        assert torch.equal(value.cpu(), data["model"][key]), key
    saved = data["optimizer"]["state"]
    for index, state in trainer.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and name != "step":  # fused AdamW keeps its step on the device
                assert value.device.type == resumed_on, (index, name)
            assert torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(saved[index][name])), (index, name)
    if precision == "fp16":
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == INIT_SCALE

    # The same state gives the same loss on both devices (float32 rounding apart: TF32 off, since the
    # teacher's sharpening at temperature 0.04 magnifies TF32's 1e-3 relative errors).
    writer = build(tmp_path / "writer", written_on, "fp32", hooks=False)
    writer.checkpointer.restore(data)
    batch = as_model_batch(next(trainer.loader.iterate(3 * trainer.accumulate)))
    with no_tf32():
        here, there = eval_loss(trainer, batch, 3), eval_loss(writer, batch, 3)
    assert here == pytest.approx(there, rel=1e-3, abs=1e-4)
    trainer.loader.close()

    trainer.train()
    assert trainer.completed and trainer.iter + 1 == trainer.max_iter
    final = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert differences(data["model"], final), "training did not continue after the resume"
    assert load_file(str(out / LAST_CHECKPOINT))["iteration"] == trainer.max_iter


# ------------------------------------------------------------------------------ the GPU benchmark's batch search
def test_largest_batch_search_of_the_training_benchmark(tmp_path, monkeypatch):
    """``tools/bench_training.py --max-batch``: doubling, then bisection to within 1/8, rebuilding the
    trainer after an out-of-memory error. Here steps "run out of memory" above 300 images (CPU, no model)."""
    bench = load_tool("bench_training")
    built, fed = [], []

    class FakeTrainer:
        iters_per_epoch, storage, iter = 1, None, 0

        class cfg:
            class SOLVER:
                FREEZE_LAST_LAYER_EPOCHS = 0

        def run_step(self):
            if fed[-1] > 300:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "build_trainer", lambda *a, **k: built.append(a) or FakeTrainer())
    monkeypatch.setattr(bench, "use_batch", lambda trainer, batch: fed.append(batch))
    found = bench.largest_batch("bf16", 64, str(tmp_path), device="cpu", log=lambda *_: None)
    assert 300 * 7 / 8 <= found <= 300
    assert fed[:4] == [64, 128, 256, 512]  # doubling until the first failure
    assert len(built) == 1 + sum(b > 300 for b in fed)  # one trainer, rebuilt after each failure
    assert bench.largest_batch("bf16", 512, str(tmp_path), device="cpu", log=lambda *_: None) == 0


def test_markdown_table_shows_failed_rows():
    bench = load_tool("bench_training")
    table = bench.markdown_table([{"precision": "fp32", "batch": None, "error": "batch 64 does not fit"}])
    header, _, row = table.splitlines()
    assert row.count("|") == header.count("|") and "batch 64 does not fit" in row
