"""Config checks: every value no run can use fails in load_config, before anything is built, with a line
``KEY = VALUE: what is wrong; fix: ...`` per problem."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dino_research.config import ConfigError, check_amp, check_config, check_world_size, flatten_config, get_cfg
from dino_research.config.checks import choices
from dino_research.engine import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def config_error(*opts) -> str:
    with pytest.raises(ConfigError) as e:
        load_config("", list(opts))
    return str(e.value)


def problem_lines(message: str) -> list:
    return [line.strip() for line in message.splitlines()[1:]]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes(path):
    load_config(str(path), [])


def test_default_config_passes():
    check_config(get_cfg())


@pytest.mark.parametrize("key,registry", [
    ("MODEL.META_ARCHITECTURE", "META_ARCH_REGISTRY"), ("MODEL.BACKBONE.NAME", "BACKBONE_REGISTRY"),
    ("MODEL.HEAD.NAME", "HEAD_REGISTRY"), ("MODEL.LOSS.NAME", "LOSS_REGISTRY"), ("MODEL.TEACHER.EMA", "EMA_REGISTRY"),
    ("MODEL.LOSS.TEACHER_TEMP_SCHEDULER", "SCHEDULER_REGISTRY"),
    ("MODEL.TEACHER.MOMENTUM_SCHEDULER", "SCHEDULER_REGISTRY"), ("SOLVER.LR_SCHEDULER", "SCHEDULER_REGISTRY"),
    ("SOLVER.WEIGHT_DECAY_SCHEDULER", "SCHEDULER_REGISTRY"), ("INPUT.AUGMENTATION", "AUGMENTATION_REGISTRY"),
    ("DATASETS.TRAIN", "DATASET_REGISTRY"), ("TEST.DATASET", "DATASET_REGISTRY"),
])
def test_unknown_registry_name_lists_the_registered_names(key, registry):
    import dino_research.data
    import dino_research.modeling
    import dino_research.solver

    registry = next(getattr(m, registry) for m in (dino_research.modeling, dino_research.solver, dino_research.data)
                    if hasattr(m, registry))
    (line,) = problem_lines(config_error(key, "NoSuchThing"))
    assert line.startswith(f"{key} = 'NoSuchThing': not a registered")
    assert "registered names: " + ", ".join(sorted(dict(registry))) in line
    assert "fix: one of these names" in line and "imported" in line


def test_misspelled_registry_name_suggests_the_closest():
    (line,) = problem_lines(config_error("MODEL.BACKBONE.NAME", "vit_smal"))
    assert "fix: did you mean MODEL.BACKBONE.NAME vit_small?" in line


# (overrides, key named on the line, text of the fix)
CASES = {
    # closed choices
    "optimizer": (["SOLVER.OPTIMIZER", "adam"], "SOLVER.OPTIMIZER = 'adam'", "SOLVER.OPTIMIZER adamw"),
    "amp dtype": (["SOLVER.AMP.DTYPE", "fp16"], "SOLVER.AMP.DTYPE = 'fp16'", "SOLVER.AMP.DTYPE float16"),
    "device": (["MODEL.DEVICE", "gpu"], "MODEL.DEVICE = 'gpu'", "MODEL.DEVICE auto"),
    # ViT patches vs crops
    "global crop below patch": (["INPUT.GLOBAL_CROP_SIZE", "8"], "INPUT.GLOBAL_CROP_SIZE = 8",
                                "INPUT.GLOBAL_CROP_SIZE 16"),
    "local crop not multiple": (["INPUT.LOCAL_CROP_SIZE", "90"], "INPUT.LOCAL_CROP_SIZE = 90",
                                "INPUT.LOCAL_CROP_SIZE 96"),
    "test crop not multiple": (["TEST.CROP_SIZE", "220"], "TEST.CROP_SIZE = 220", "TEST.CROP_SIZE 224"),
    "patch size": (["MODEL.BACKBONE.PATCH_SIZE", "0"], "MODEL.BACKBONE.PATCH_SIZE = 0", "PATCH_SIZE 16"),
    "patch above vit image": (["MODEL.BACKBONE.PATCH_SIZE", "448", "INPUT.GLOBAL_CROP_SIZE", "448"],
                              "MODEL.BACKBONE.PATCH_SIZE = 448", "PATCH_SIZE 16"),
    "local crop size zero": (["INPUT.LOCAL_CROP_SIZE", "0"], "INPUT.LOCAL_CROP_SIZE = 0", "INPUT.LOCAL_CROP_SIZE 96"),
    "resize below crop": (["TEST.RESIZE_SIZE", "200"], "TEST.RESIZE_SIZE = 200", "TEST.RESIZE_SIZE >= 224"),
    # batch and workers
    "batch": (["SOLVER.BATCH_SIZE_PER_GPU", "0"], "SOLVER.BATCH_SIZE_PER_GPU = 0", "BATCH_SIZE_PER_GPU 64"),
    "workers": (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS = -1", "NUM_WORKERS 10"),
    "accumulate": (["SOLVER.ACCUMULATE_STEPS", "0"], "SOLVER.ACCUMULATE_STEPS = 0", "ACCUMULATE_STEPS 1"),
    "test batch": (["TEST.BATCH_SIZE", "0"], "TEST.BATCH_SIZE = 0", "TEST.BATCH_SIZE 128"),
    # epochs
    "freeze > epochs": (["SOLVER.FREEZE_LAST_LAYER_EPOCHS", "200", "SOLVER.EPOCHS", "100"],
                        "SOLVER.FREEZE_LAST_LAYER_EPOCHS = 200",
                        "SOLVER.FREEZE_LAST_LAYER_EPOCHS 100 or less, or SOLVER.EPOCHS 200 or more"),
    "warmup > epochs": (["SOLVER.WARMUP_EPOCHS", "11", "SOLVER.EPOCHS", "10"], "SOLVER.WARMUP_EPOCHS = 11",
                        "SOLVER.WARMUP_EPOCHS 10 or less"),
    "teacher temp warmup > epochs": (["MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS", "30", "SOLVER.EPOCHS", "20"],
                                     "MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS = 30", "SOLVER.EPOCHS 30 or more"),
    "epochs": (["SOLVER.EPOCHS", "0"], "SOLVER.EPOCHS = 0", "SOLVER.EPOCHS 100"),
    "negative warmup": (["SOLVER.WARMUP_EPOCHS", "-1"], "SOLVER.WARMUP_EPOCHS = -1", "SOLVER.WARMUP_EPOCHS 10"),
    # timm backbone
    "timm without model": (["MODEL.BACKBONE.NAME", "timm"], "MODEL.BACKBONE.TIMM_MODEL = ''",
                           "MODEL.BACKBONE.TIMM_MODEL convnext_tiny"),
    "timm unknown model": (["MODEL.BACKBONE.NAME", "timm", "MODEL.BACKBONE.TIMM_MODEL", "convnext_tiy"],
                           "MODEL.BACKBONE.TIMM_MODEL = 'convnext_tiy'", "convnext_tiny"),
}


@pytest.mark.parametrize("opts,key,fix", CASES.values(), ids=CASES.keys())
def test_impossible_value_names_key_value_and_fix(opts, key, fix):
    (line,) = problem_lines(config_error(*opts))
    assert line.startswith(key + ":") and "; fix: " in line
    assert fix in line.split("; fix: ", 1)[1]


RANGES = [
    ("MODEL.LOSS.STUDENT_TEMP", "0.0"), ("MODEL.LOSS.TEACHER_TEMP", "-0.04"), ("MODEL.LOSS.WARMUP_TEACHER_TEMP", "0.0"),
    ("MODEL.LOSS.CENTER_MOMENTUM", "1.5"), ("MODEL.TEACHER.MOMENTUM", "-0.1"), ("MODEL.TEACHER.MOMENTUM_END", "1.01"),
    ("INPUT.GLOBAL_CROPS_SCALE", "(0.0, 1.0)"), ("INPUT.GLOBAL_CROPS_SCALE", "(0.6, 0.4)"),
    ("INPUT.LOCAL_CROPS_SCALE", "(0.05, 1.2)"), ("INPUT.LOCAL_CROPS_SCALE", "(0.05,)"),
    ("INPUT.CROP_RATIO", "(1.5, 0.5)"), ("INPUT.CROP_RATIO", "(0.0, 1.0)"),
    ("INPUT.FLIP_PROB", "1.5"), ("INPUT.COLOR_JITTER_PROB", "-0.2"), ("INPUT.GRAYSCALE_PROB", "2.0"),
    ("INPUT.GLOBAL_BLUR_PROBS", "(1.0, 1.1)"), ("INPUT.GLOBAL_BLUR_PROBS", "(1.0,)"), ("INPUT.LOCAL_BLUR_PROB", "-0.5"),
    ("INPUT.GLOBAL_SOLARIZE_PROBS", "(0.0, 0.2, 0.2)"), ("INPUT.COLOR_JITTER", "(0.4, 0.4, 0.2)"),
    ("INPUT.BLUR_RADIUS", "(2.0, 0.1)"), ("INPUT.MEAN", "(0.5, 0.5)"), ("INPUT.STD", "(0.2, 0.0, 0.2)"),
    ("MODEL.HEAD.OUT_DIM", "0"), ("MODEL.HEAD.HIDDEN_DIM", "0"), ("MODEL.HEAD.BOTTLENECK_DIM", "-1"),
    ("MODEL.HEAD.NUM_LAYERS", "0"), ("SOLVER.BASE_LR", "0.0"), ("SOLVER.MIN_LR", "-1e-6"), ("SOLVER.CLIP_GRAD", "-1.0"),
    ("SOLVER.WEIGHT_DECAY", "-0.04"), ("SOLVER.BETAS", "(0.9, 1.0)"), ("SOLVER.CHECKPOINT_PERIOD", "-1"),
    ("SOLVER.SNAPSHOT_EPOCHS", "-20"), ("LOG_PERIOD", "0"), ("MODEL.BACKBONE.DROP_PATH_RATE", "1.0"),
    ("TEST.KNN.K", "(10, 0)"), ("TEST.KNN.K", "(10, 'a')"), ("TEST.KNN.K", "(1.5,)"), ("TEST.KNN.TEMPERATURE", "0.0"),
    ("TEST.KNN.CHUNK_SIZE", "0"), ("TEST.LINEAR.LR_GRID", "()"), ("SOLVER.SKIP_NONFINITE", "-1"),
]


@pytest.mark.parametrize("key,value", RANGES, ids=[f"{k}={v}" for k, v in RANGES])
def test_value_out_of_range_names_the_rule_and_the_default(key, value):
    (line,) = problem_lines(config_error(key, value))
    default = flatten_config(get_cfg())[key]
    default = str(tuple(default)) if isinstance(default, (list, tuple)) else str(default)
    assert line.startswith(f"{key} = ") and ": must be " in line
    assert f"fix: e.g. the default, {key} " in line and default in line


def test_every_problem_is_reported_at_once():
    message = config_error("SOLVER.FREEZE_LAST_LAYER_EPOCHS", "200", "SOLVER.EPOCHS", "100",
                           "MODEL.HEAD.NAME", "DINOHaed", "INPUT.FLIP_PROB", "1.5")
    assert message.startswith("invalid configuration: 3 problems")
    lines = problem_lines(message)
    assert [line.split(" = ")[0] for line in lines] == [
        "MODEL.HEAD.NAME", "INPUT.FLIP_PROB", "SOLVER.FREEZE_LAST_LAYER_EPOCHS"]


def test_legal_corner_cases_pass(caplog):
    load_config("", ["INPUT.LOCAL_CROPS_NUMBER", "0", "INPUT.LOCAL_CROP_SIZE", "90"])  # local size unused
    load_config("", ["MODEL.BACKBONE.NAME", "resnet50", "INPUT.LOCAL_CROP_SIZE", "90"])  # no patches
    load_config("", ["DATALOADER.NUM_WORKERS", "8", "SOLVER.BATCH_SIZE_PER_GPU", "2"])  # more workers than images
    load_config("", ["SOLVER.OPTIMIZER", "AdamW"])  # build_optimizer is case-insensitive
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dino_research").addHandler(handler)
    try:
        load_config("", ["SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "1"])  # freeze 1 = epochs 1: a warning
    finally:
        logging.getLogger("dino_research").removeHandler(handler)
    assert any("frozen for the whole run" in r.getMessage() for r in records)


def test_closed_choices_match_their_builders():
    from dino_research.engine import trainer
    from dino_research.solver import build_optimizer

    assert set(choices("SOLVER.AMP.DTYPE")) == set(trainer.AMP_DTYPES)  # declared by their owner
    cfg = get_cfg()
    for name in choices("SOLVER.OPTIMIZER"):
        cfg.SOLVER.OPTIMIZER = name
        assert isinstance(build_optimizer(cfg, nn.Linear(2, 2)), torch.optim.Optimizer)


def test_amp_float16_needs_cuda():
    cfg = load_config("", ["MODEL.DEVICE", "cpu"])  # the config itself loads: eval tools never use AMP
    with pytest.raises(ConfigError) as e:
        check_amp(cfg)
    assert "SOLVER.AMP.DTYPE = 'float16'" in str(e.value)
    assert "SOLVER.AMP.DTYPE bfloat16 or SOLVER.AMP.ENABLED False" in str(e.value)
    check_amp(cfg, device_type="cuda")
    check_amp(load_config("", ["MODEL.DEVICE", "cpu", "SOLVER.AMP.DTYPE", "bfloat16"]))
    check_amp(load_config("", ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False"]))


def test_bfloat16_on_a_cpu_without_bf16_instructions_is_a_warning(monkeypatch, caplog):
    from dino_research.config import checks

    bf16_cpu = load_config("", ["MODEL.DEVICE", "cpu", "SOLVER.AMP.DTYPE", "bfloat16"])
    monkeypatch.setattr(checks, "cpu_has_fast_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dino_research"):
        check_amp(bf16_cpu)
        check_amp(bf16_cpu, device_type="cuda")  # the GPU has its own bf16 units: no warning
    assert len(caplog.records) == 1 and "slower than float32" in caplog.text
    assert "SOLVER.AMP.ENABLED False" in caplog.text
    caplog.clear()
    monkeypatch.setattr(checks, "cpu_has_fast_bfloat16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dino_research"):
        check_amp(bf16_cpu)
    assert not caplog.records


def test_amp_auto_device_resolves_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="this run is on cpu"):
        check_amp(get_cfg())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_amp(get_cfg())


def test_batchnorm_needs_two_images_normalized_together():
    resnet = load_config("", ["MODEL.BACKBONE.NAME", "resnet50", "SOLVER.BATCH_SIZE_PER_GPU", "1",
                              "SOLVER.ACCUMULATE_STEPS", "8"])
    with pytest.raises(ConfigError) as e:
        check_world_size(resnet, 1, device_type="cuda")  # accumulation does not enlarge a BatchNorm batch
    (line,) = problem_lines(str(e.value))
    assert line.startswith("SOLVER.BATCH_SIZE_PER_GPU = 1: BatchNorm (MODEL.BACKBONE.NAME resnet50)")
    assert "fix: SOLVER.BATCH_SIZE_PER_GPU 2 or more" in line
    with pytest.raises(ConfigError):
        check_world_size(resnet, 4, device_type="cpu")  # no SyncBatchNorm on CPU: 1 image per process
    check_world_size(resnet, 2, device_type="cuda")  # SyncBatchNorm: 2 images normalized together
    head_bn = load_config("", ["MODEL.HEAD.USE_BN", "True", "SOLVER.BATCH_SIZE_PER_GPU", "1"])
    with pytest.raises(ConfigError, match="or MODEL.HEAD.USE_BN False"):
        check_world_size(head_bn, 1, device_type="cpu")
    check_world_size(load_config("", ["SOLVER.BATCH_SIZE_PER_GPU", "1"]), 1, device_type="cpu")  # no BatchNorm


def test_train_net_refuses_before_building_anything(tmp_path):
    out, data = tmp_path / "out", tmp_path / "no_such_dataset"
    # AMP off and the CPU: without the config check, the first error would be the missing dataset.
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config", str(REPO / "configs" / "dino_vits16.yaml"),
           "SOLVER.FREEZE_LAST_LAYER_EPOCHS", "200", "SOLVER.EPOCHS", "100", "SOLVER.AMP.ENABLED", "False",
           "MODEL.DEVICE", "cpu", "DATASETS.TRAIN_ROOT", str(data), "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "SOLVER.FREEZE_LAST_LAYER_EPOCHS = 200: more than SOLVER.EPOCHS = 100" in proc.stderr
    assert "fix: SOLVER.FREEZE_LAST_LAYER_EPOCHS 100 or less" in proc.stderr
    assert str(data) not in proc.stderr  # no dataset was looked for
    assert not out.exists()  # nothing set up: no log, no config dump, no checkpoint


def test_config_imports_nothing_above_it_and_the_owners_declare_their_names():
    """config/ is a leaf (importing it loads no data/modeling/solver/engine module); the registries and
    closed choices it checks are declared by the packages that own them, when those are imported."""
    code = ("import sys, dino_research.config, dino_research.config.checks as c; "
            "print(sorted(m for m in sys.modules if m.startswith('dino_research.') and m.split('.')[1] "
            "not in ('config', 'utils'))); print(len(c._REGISTRY_KEYS)); import dino_research.engine; "
            "print(len(c._REGISTRY_KEYS), sorted(c._CHOICES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]" and out[1] == "0"
    assert out[2].startswith("12 ") and all(k in out[2] for k in ("SOLVER.OPTIMIZER", "SOLVER.AMP.DTYPE",
                                                                 "MODEL.DEVICE", "TEST.UNKNOWN_VAL_CLASSES"))


def test_a_component_built_by_hand_checks_its_value_with_the_config_table():
    from dino_research.modeling.losses import DINOLoss

    with pytest.raises(ConfigError, match=r"MODEL.LOSS.STUDENT_TEMP = 0.0: must be > 0"):
        DINOLoss(out_dim=4, student_temp=0.0)
    cfg = get_cfg()
    cfg.MODEL.LOSS.STUDENT_TEMP = 0.0
    with pytest.raises(ConfigError, match=r"MODEL.LOSS.STUDENT_TEMP = 0.0: must be > 0"):  # the same rule, same words
        check_config(cfg)
