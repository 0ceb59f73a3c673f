"""Checks of a whole config, run at start, before any dataset or model is built.

``CfgNode`` already refuses unknown keys and wrong types while merging. What it cannot see is a value
of the right type that no run can use: a registry name nothing registered, a crop the ViT cannot cut
into patches, a warmup longer than training, a probability of 1.5. :func:`check_config` looks for all
of them at once and raises one :class:`ConfigError` with one line per problem,

    KEY = VALUE: what is wrong; fix: ...

so a user fixes everything in one go. ``engine.load_config`` calls it after the merges, so every tool
and the trainer get it. Two checks depend on the machine, not on the config, and are separate
functions for the trainer to call once it knows them: :func:`check_amp` (the device) and
:func:`check_world_size` (the number of processes). They are not part of ``load_config`` because
evaluation tools share the config and never use AMP or a training batch: the default config
(float16 AMP, ``MODEL.DEVICE auto``) must still load on a machine without a GPU.
"""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Callable, Optional

from .config import ConfigError, get_cfg

logger = logging.getLogger("dino_research")

# The ViT's positional embedding covers a 224-pixel image; a patch must fit in it.
VIT_MAX_PATCH_SIZE = 224

# What the packages above config/ declare when they are imported (config imports none of them):
# the registry behind each key, the closed choices of a key, the backbones that hold BatchNorm.
# Every tool loads its config through dino_research.engine, which imports them all.
_REGISTRY_KEYS: dict[str, object] = {}
_CHOICES: dict[str, tuple[str, ...]] = {}
_BATCHNORM_BACKBONES: set[str] = set()


def declare_registry_key(key: str, registry) -> None:
    """``key`` names a component of ``registry`` (an fvcore Registry): :func:`check_config` refuses
    other names, listing the registered ones. Called by the package that owns the registry."""
    _REGISTRY_KEYS[key] = registry


def declare_choices(key: str, allowed) -> tuple[str, ...]:
    """``key`` takes one of ``allowed`` (compared lower-case for ``SOLVER.OPTIMIZER``); called where
    the key is read, which keeps the list. Returns ``allowed`` as a tuple."""
    _CHOICES[key] = tuple(allowed)
    return _CHOICES[key]


def declare_batchnorm_backbone(name: str) -> None:
    """Backbone ``name`` contains BatchNorm (:func:`check_world_size` then needs 2 images per forward)."""
    _BATCHNORM_BACKBONES.add(name)


def choices(key: str) -> tuple[str, ...]:
    """The declared choices of ``key`` (empty when its owner is not imported)."""
    return _CHOICES.get(key, ())


# ------------------------------------------------------------------------------ value rules
# A rule is (predicate, phrase): the phrase completes "must be ...".
Rule = tuple[Callable[[Any], bool], str]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _between(lo: float, hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v):
        return (_num(v) and (v > lo if lo_open else v >= lo)
                and (hi is None or (v < hi if hi_open else v <= hi)))

    if hi is None:
        return ok, f"{'>' if lo_open else '>='} {lo}"
    return ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _values(n: Optional[int], each: Rule, ordered: bool = False, integer: bool = False) -> Rule:
    """``n`` values (``None``: one or more), each satisfying ``each``; ``ordered``: first <= second."""

    def ok(v):
        return (isinstance(v, (list, tuple)) and (len(v) == n if n else len(v) >= 1)
                and all(each[0](x) and (not integer or isinstance(x, int)) for x in v)
                and (not ordered or v[0] <= v[1]))

    count = f"{n}" if n else "one or more"
    kind = "integers" if integer else "values"
    return ok, f"{count} {kind}, each {each[1]}" + (", the first <= the second" if ordered else "")


POSITIVE = _between(0, lo_open=True)
NON_NEGATIVE = _between(0)
AT_LEAST_ONE = _between(1)
UNIT = _between(0, 1)  # probabilities and EMA momenta
ANY_NUMBER: Rule = (_num, "a finite number")

_RANGES: tuple[tuple[str, Rule], ...] = (
    ("MODEL.BACKBONE.DROP_PATH_RATE", _between(0, 1, hi_open=True)),
    ("MODEL.BACKBONE.DEPTH", NON_NEGATIVE),
    ("MODEL.BACKBONE.NUM_HEADS", NON_NEGATIVE),
    ("MODEL.BACKBONE.PATCH_SIZE", _between(1, VIT_MAX_PATCH_SIZE)),
    ("MODEL.BACKBONE.RESNET_WIDTH", AT_LEAST_ONE),
    ("MODEL.HEAD.OUT_DIM", AT_LEAST_ONE),
    ("MODEL.HEAD.HIDDEN_DIM", AT_LEAST_ONE),
    ("MODEL.HEAD.BOTTLENECK_DIM", AT_LEAST_ONE),
    ("MODEL.HEAD.NUM_LAYERS", AT_LEAST_ONE),
    ("MODEL.LOSS.STUDENT_TEMP", POSITIVE),
    ("MODEL.LOSS.TEACHER_TEMP", POSITIVE),
    ("MODEL.LOSS.WARMUP_TEACHER_TEMP", POSITIVE),
    ("MODEL.LOSS.CENTER_MOMENTUM", UNIT),
    ("MODEL.TEACHER.MOMENTUM", UNIT),
    ("MODEL.TEACHER.MOMENTUM_END", UNIT),
    ("MODEL.BACKBONE.TIMM_OUTPUT_STRIDE", ((lambda v: v in (0, 8, 16, 32)), "0 (the model's own), 8, 16 or 32")),
    ("INPUT.GLOBAL_CROP_SIZE", AT_LEAST_ONE),
    ("INPUT.LOCAL_CROPS_NUMBER", NON_NEGATIVE),
    ("INPUT.GLOBAL_CROPS_SCALE", _values(2, _between(0, 1, lo_open=True), ordered=True)),
    ("INPUT.LOCAL_CROPS_SCALE", _values(2, _between(0, 1, lo_open=True), ordered=True)),
    ("INPUT.CROP_RATIO", _values(2, POSITIVE, ordered=True)),
    ("INPUT.FLIP_PROB", UNIT),
    ("INPUT.COLOR_JITTER", ((lambda v: _values(4, NON_NEGATIVE)[0](v) and v[3] <= 0.5),
                            "(brightness, contrast, saturation, hue), all >= 0 and hue <= 0.5")),
    ("INPUT.COLOR_JITTER_PROB", UNIT),
    ("INPUT.GRAYSCALE_PROB", UNIT),
    ("INPUT.BLUR_RADIUS", _values(2, NON_NEGATIVE, ordered=True)),
    ("INPUT.GLOBAL_BLUR_PROBS", _values(2, UNIT)),
    ("INPUT.LOCAL_BLUR_PROB", UNIT),
    ("INPUT.GLOBAL_SOLARIZE_PROBS", _values(2, UNIT)),
    ("INPUT.SOLARIZE_THRESHOLD", ((lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 256),
                                  "an int in [0, 256] (0 inverts every value, 256 none)")),
    ("INPUT.LOCAL_CROP_SIZE", AT_LEAST_ONE),
    ("INPUT.MEAN", _values(3, ANY_NUMBER)),
    ("INPUT.STD", _values(3, POSITIVE)),
    ("DATALOADER.NUM_WORKERS", NON_NEGATIVE),
    ("DATASETS.TRAIN_SUBSET", NON_NEGATIVE),
    ("SOLVER.BASE_LR", POSITIVE),
    ("SOLVER.MIN_LR", NON_NEGATIVE),
    ("SOLVER.SKIP_NONFINITE", NON_NEGATIVE),
    ("SOLVER.EPOCHS", AT_LEAST_ONE),
    ("SOLVER.WEIGHT_DECAY", NON_NEGATIVE),
    ("SOLVER.WEIGHT_DECAY_END", NON_NEGATIVE),
    ("SOLVER.CLIP_GRAD", NON_NEGATIVE),
    ("SOLVER.BATCH_SIZE_PER_GPU", AT_LEAST_ONE),
    ("SOLVER.MOMENTUM", _between(0, 1, hi_open=True)),
    ("SOLVER.BETAS", _values(2, _between(0, 1, hi_open=True))),  # torch.optim.AdamW's own rule
    ("SOLVER.ACCUMULATE_STEPS", AT_LEAST_ONE),
    ("SOLVER.CHECKPOINT_PERIOD", NON_NEGATIVE),
    ("SOLVER.SNAPSHOT_EPOCHS", NON_NEGATIVE),
    ("TEST.RESIZE_SIZE", AT_LEAST_ONE),
    ("TEST.CROP_SIZE", AT_LEAST_ONE),
    ("TEST.BATCH_SIZE", AT_LEAST_ONE),
    ("TEST.EVAL_PERIOD", NON_NEGATIVE),
    ("TEST.KNN.K", _values(None, AT_LEAST_ONE, integer=True)),
    ("TEST.KNN.TEMPERATURE", POSITIVE),
    ("TEST.KNN.CHUNK_SIZE", AT_LEAST_ONE),
    ("TEST.ATTENTION.PERIOD", NON_NEGATIVE),
    ("TEST.ATTENTION.NUM_IMAGES", AT_LEAST_ONE),
    ("TEST.ATTENTION.THRESHOLD", _between(0, 1, lo_open=True)),
    ("TEST.LINEAR.EPOCHS", AT_LEAST_ONE),
    ("TEST.LINEAR.BASE_LR", POSITIVE),
    ("TEST.LINEAR.BATCH_SIZE", AT_LEAST_ONE),
    ("TEST.LINEAR.MOMENTUM", _between(0, 1, hi_open=True)),
    ("TEST.LINEAR.WEIGHT_DECAY", NON_NEGATIVE),
    ("TEST.LINEAR.N_LAST_BLOCKS", AT_LEAST_ONE),
    ("TEST.LINEAR.LR_GRID", _values(None, POSITIVE)),
    ("LOG_PERIOD", AT_LEAST_ONE),
)


_RANGE_OF = dict(_RANGES)


def _get(cfg, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _override(key: str, value: Any) -> str:
    """``KEY VALUE`` as typed on a command line (sequences quoted for the shell)."""
    text = str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
    return f"{key} {text!r}" if isinstance(value, (list, tuple)) or text == "" else f"{key} {text}"


class _Problems:
    """The lines found so far, each ``KEY = VALUE: what is wrong; fix: ...``."""

    def __init__(self, cfg):
        self.cfg, self.lines = cfg, []

    def add(self, key: str, what: str, fix: str) -> None:
        self.lines.append(f"{key} = {_get(self.cfg, key)!r}: {what}; fix: {fix}")

    def require(self, key: str, rule: Rule) -> bool:
        ok, phrase = rule
        try:
            good = bool(ok(_get(self.cfg, key)))
        except TypeError:  # e.g. a string inside a tuple of numbers
            good = False
        if not good:
            self.add(key, f"must be {phrase}", f"e.g. the default, {_override(key, _get(get_cfg(), key))}")
        return good

    def raise_if_any(self, context: str) -> None:
        if self.lines:
            n = len(self.lines)
            raise ConfigError(f"{context}: {n} problem{'s' if n > 1 else ''} (fix all, then run again):\n"
                              + "\n".join(f"  {line}" for line in self.lines))


# ------------------------------------------------------------------------------ check_config
def check_config(cfg) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` that makes a run fail or meaningless.

    Checks registry names (listing the registered ones), closed choices, value ranges, crop sizes
    against the ViT patch size, and epoch counts against ``SOLVER.EPOCHS``. Builds nothing: the
    registries are imported (which registers the built-in components), no dataset is read. A
    component from outside the package must be imported before the config is loaded.
    """
    p = _Problems(cfg)
    _check_names(p, cfg)
    for key, rule in _RANGES:
        p.require(key, rule)
    _check_backbone_and_crops(p, cfg)
    _check_epochs(p, cfg)
    if (_num(cfg.TEST.RESIZE_SIZE) and _num(cfg.TEST.CROP_SIZE)
            and 1 <= cfg.TEST.RESIZE_SIZE < cfg.TEST.CROP_SIZE):
        p.add("TEST.RESIZE_SIZE", f"smaller than TEST.CROP_SIZE = {cfg.TEST.CROP_SIZE}, the center crop would not fit",
              f"TEST.RESIZE_SIZE >= {cfg.TEST.CROP_SIZE} (the paper resizes to 256 for a 224 crop)")
    p.raise_if_any("invalid configuration")


def _check_names(p: _Problems, cfg) -> None:
    for key, registry in _REGISTRY_KEYS.items():
        name = _get(cfg, key)
        names = sorted(dict(registry))
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        p.add(key, f"not a registered {registry._name.lower()}; registered names: {', '.join(names)}",
              (f"did you mean {_override(key, close[0])}? " if close else "one of these names ")
              + "(a component from outside dino_research must be imported, which registers it, "
                "before the config is loaded)")
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if (value.lower() if key == "SOLVER.OPTIMIZER" and isinstance(value, str) else value) not in allowed:
            p.add(key, f"not one of: {', '.join(allowed)}", f"one of them, e.g. {_override(key, allowed[0])}")


def check_value(key: str, value: Any) -> Any:
    """``value`` if it satisfies the range rule of config key ``key`` (the one table of value rules,
    which components built by hand call too), else :class:`ConfigError` ``KEY = VALUE: must be ...``."""
    rule = _RANGE_OF.get(key)
    if rule is None:
        raise KeyError(f"no value rule for {key}")
    try:
        good = bool(rule[0](value))
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key} = {value!r}: must be {rule[1]}")
    return value


def _check_backbone_and_crops(p: _Problems, cfg) -> None:
    b, inp = cfg.MODEL.BACKBONE, cfg.INPUT
    local = inp.LOCAL_CROPS_NUMBER > 0 and AT_LEAST_ONE[0](inp.LOCAL_CROP_SIZE)  # else reported by the ranges
    if b.NAME == "timm":
        import timm

        if not b.TIMM_MODEL:
            p.add("MODEL.BACKBONE.TIMM_MODEL", "MODEL.BACKBONE.NAME is 'timm' but no timm model is named",
                  "a timm model name, e.g. MODEL.BACKBONE.TIMM_MODEL convnext_tiny (timm.list_models() lists them)")
        elif not timm.is_model(b.TIMM_MODEL):
            close = difflib.get_close_matches(b.TIMM_MODEL, timm.list_models(), n=3, cutoff=0.6)
            p.add("MODEL.BACKBONE.TIMM_MODEL", "not a timm model",
                  f"one of {', '.join(close)}?" if close else "a name from timm.list_models()")
    if not b.NAME.startswith("vit"):
        if cfg.TEST.ATTENTION.PERIOD > 0:
            p.add("TEST.ATTENTION.PERIOD", f"attention maps need a ViT backbone; MODEL.BACKBONE.NAME is {b.NAME!r}, "
                  "which has no [CLS]-to-patch attention", "TEST.ATTENTION.PERIOD 0")
        return
    if not _RANGE_OF["MODEL.BACKBONE.PATCH_SIZE"][0](b.PATCH_SIZE):
        return  # reported by the range checks
    patch = b.PATCH_SIZE
    for key in ["INPUT.GLOBAL_CROP_SIZE"] + (["INPUT.LOCAL_CROP_SIZE"] if local else []) + ["TEST.CROP_SIZE"]:
        size = _get(cfg, key)
        if not _num(size) or size < 1 or size % patch == 0:
            continue  # a non-positive size is reported by the range checks
        # The ViT refuses inputs that do not split into whole patches (the reference would silently
        # drop the last rows and columns of pixels), so this would fail at the first forward pass.
        what = (f"smaller than one patch (MODEL.BACKBONE.PATCH_SIZE = {patch})" if size < patch
                else f"not a multiple of MODEL.BACKBONE.PATCH_SIZE = {patch}")
        p.add(key, f"{what}: the ViT only takes images made of whole {patch}x{patch} patches",
              f"{_override(key, max(patch, round(size / patch) * patch))}, or a MODEL.BACKBONE.PATCH_SIZE "
              f"dividing every crop size")


def _check_epochs(p: _Problems, cfg) -> None:
    epochs = cfg.SOLVER.EPOCHS
    if not (_num(epochs) and epochs >= 1):
        return  # reported by the range checks; comparisons with it would only add noise
    why = {
        "SOLVER.WARMUP_EPOCHS": "training would end before the learning-rate warmup does",
        "SOLVER.FREEZE_LAST_LAYER_EPOCHS": "the prototype (last) layer of the head would never be trained",
        "MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS": "the teacher temperature would never reach MODEL.LOSS.TEACHER_TEMP",
    }
    for key, consequence in why.items():
        if not p.require(key, NON_NEGATIVE):
            continue
        value = _get(cfg, key)
        if value > epochs:
            p.add(key, f"more than SOLVER.EPOCHS = {epochs}: {consequence}",
                  f"{_override(key, epochs)} or less, or SOLVER.EPOCHS {value} or more")
    if cfg.SOLVER.FREEZE_LAST_LAYER_EPOCHS == epochs:
        logger.warning("SOLVER.FREEZE_LAST_LAYER_EPOCHS = SOLVER.EPOCHS = %d: the prototype layer is frozen for "
                       "the whole run", epochs)


# ------------------------------------------------------------------------------ checks needing the machine
def _device_type(cfg, device_type: Optional[str]) -> str:
    if device_type is not None:
        return device_type
    if cfg.MODEL.DEVICE == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.MODEL.DEVICE


def check_amp(cfg, device_type: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` when ``SOLVER.AMP`` cannot run on the training device.

    float16 autocast needs CUDA (on a CPU PyTorch has no float16 kernels for most layers).
    ``device_type`` ("cpu" or "cuda") defaults to what ``MODEL.DEVICE`` resolves to on this machine.
    Not called by ``load_config``: evaluation tools never use AMP; the trainer checks it at start.
    """
    p, device = _Problems(cfg), _device_type(cfg, device_type)
    if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE == "float16" and device != "cuda":
        p.add("SOLVER.AMP.DTYPE", f"float16 autocast needs a CUDA device, this run is on {device} "
                                  f"(MODEL.DEVICE = {cfg.MODEL.DEVICE!r})",
              "set SOLVER.AMP.DTYPE bfloat16 or SOLVER.AMP.ENABLED False")
    p.raise_if_any("configuration unusable on this machine")
    bf16_on_cpu = cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE == "bfloat16" and device == "cpu"
    if bf16_on_cpu and not cpu_has_fast_bfloat16():
        # Legal, and numerically fine, but every bf16 matmul is emulated: measured 0.57x float32 on an
        # Intel Xeon without AVX512_BF16/AMX, against 1.67x on a CPU with them (README, Benchmarks).
        logger.warning("SOLVER.AMP.DTYPE = bfloat16 on a CPU without bfloat16 instructions (AVX512_BF16 or AMX): "
                       "autocast will be slower than float32; set SOLVER.AMP.ENABLED False for speed")


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN sees AVX512_BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: no fast CPU bfloat16 either
        return False


def check_world_size(cfg, world_size: int, device_type: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` when the batch is too small for the ``world_size`` training processes.

    Any batch of at least one image per process is legal for PyTorch (more loader workers than
    images included), so "too small" has one meaning here: BatchNorm. In training mode it normalizes
    each channel over the images of one forward pass: ``SOLVER.BATCH_SIZE_PER_GPU`` per process,
    times ``world_size`` when the trainer converts it to SyncBatchNorm (CUDA only; on CPU statistics
    stay per process). ``SOLVER.ACCUMULATE_STEPS`` does not help, each micro-batch is normalized
    alone. With a single image, BatchNorm normalizes over that image's crops and removes what they
    share, which is exactly what DINO learns; so with ``MODEL.HEAD.USE_BN`` or a BatchNorm backbone
    (:func:`declare_batchnorm_backbone`) at least 2 images must be normalized together.
    """
    p = _Problems(cfg)
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    synced = _device_type(cfg, device_type) == "cuda" and world_size > 1
    together = cfg.SOLVER.BATCH_SIZE_PER_GPU * (world_size if synced else 1)
    bn = ["MODEL.HEAD.USE_BN True"] if cfg.MODEL.HEAD.USE_BN else []
    if cfg.MODEL.BACKBONE.NAME in _BATCHNORM_BACKBONES:
        bn.append(f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME}")
    if bn and together < 2:
        scope = ("one process" if world_size == 1 else
                 f"{world_size} processes, but SyncBatchNorm needs CUDA: statistics stay per process")
        p.add("SOLVER.BATCH_SIZE_PER_GPU",
              f"BatchNorm ({', '.join(bn)}) would normalize over the crops of a single image ({scope}), "
              f"removing what they share",
              "SOLVER.BATCH_SIZE_PER_GPU 2 or more (SOLVER.ACCUMULATE_STEPS does not count)"
              + (", or MODEL.HEAD.USE_BN False" if cfg.MODEL.HEAD.USE_BN and len(bn) == 1 else ""))
    p.raise_if_any(f"configuration unusable with {world_size} training process{'es' if world_size > 1 else ''}")
