#!/usr/bin/env python
"""Training throughput and model FLOP utilization (MFU) of the real DINO step, on the CPU or a GPU.

    python tools/bench_training.py [--device cpu|cuda] [--precisions fp32 bf16 fp16] [--batch-size 8]
                                   [--max-batch] [--warmup 2] [--iters 5] [--threads N] [--probe-size N]
                                   [--profile N] [--reference DINO_CHECKOUT] [--quick] [KEY VALUE ...]

What is timed: ``DINOTrainer.run_step`` itself (schedules, teacher forward on the 2 global crops,
student forward + backward on all crops, loss, per-parameter clipping, fused AdamW, teacher EMA,
center update), built from the default config: ViT-S/16, the paper's head (OUT_DIM 65536), 2x224 +
8x96 crops, ``SOLVER.BATCH_SIZE_PER_GPU`` = ``--batch-size``, on ``--device`` (``MODEL.DEVICE``), in float32
(``SOLVER.AMP.ENABLED False``), with bfloat16 autocast (``SOLVER.AMP.DTYPE bfloat16``) and, on a GPU
only, with float16 autocast and its gradient scaler (``SOLVER.AMP.DTYPE float16``, the paper's
setting). Data loading is excluded: the step reads one fixed, pre-built batch of crops from memory
(on a GPU, from the GPU's memory: the host-to-device copy of one batch from pinned memory is timed
apart and printed), and no hook runs. The timed iterations
come after ``SOLVER.FREEZE_LAST_LAYER_EPOCHS``, so the optimizer updates every parameter (the
prototype layer included), as in most of a run.

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one full step
divided by the batch: matrix products (mm, addmm, bmm, the patch-embedding convolution) and fused
attention (CPU flash attention, forward and backward), in the teacher forward and the student
forward and backward. Element-wise work (GELU, LayerNorm, softmax, the loss reductions), the
optimizer, the clipping and the EMA are not counted as FLOPs, but their time is in the step time.

MFU = FLOPs per image x images/s / matmul peak, the peak measured in the same run: right before every
timed step, the best of 3 square ``torch.mm`` of side ``--probe-size`` in the precision's matmul
dtype and in float32 (on a GPU also in bfloat16, the tensor-core peak every row is compared with;
GPU products are timed with CUDA events). Each step is compared with the peak measured next to it (the speed of a shared
or virtual machine drifts by several percent over minutes) and the median is reported. bfloat16 MFU
is given against both the bfloat16 and the float32 peak. The best rate of a sweep of larger squares
(``--peak-sizes``, before and after all steps) is printed too, as the strictest reference. The
output also says how much CPU other processes used during the steps: re-run when it is not ~0%.

glibc's malloc returns freed activation memory to the kernel and page-faults it back at every step;
the trainer keeps it mapped on CPU (``dino_research/utils/malloc.py``, through ``mallopt``) unless
``MALLOC_*_`` variables are set in the environment; the output says which.

On a GPU, ``--max-batch`` also times every precision at the largest batch that fits in the GPU's
memory (doubling from ``--batch-size`` until a step runs out of memory, then bisecting to within
1/8), and the table gives each row's peak memory (``torch.cuda.max_memory_allocated``).

This is a benchmark, not a test: the defaults take a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dino_research.config import get_cfg
from dino_research.engine import DINOTrainer
from dino_research.utils.events import EventStorage
from dino_research.utils.profiling import markdown_tables, profile_steps

PRECISIONS = {  # name -> (SOLVER.AMP.ENABLED, SOLVER.AMP.DTYPE, matmul dtype of the peak)
    "fp32": (False, "bfloat16", torch.float32),
    "bf16": (True, "bfloat16", torch.bfloat16),
    "fp16": (True, "float16", torch.float16),  # CUDA only (the trainer refuses float16 on a CPU)
}
# Tiny model and sizes of --quick (a smoke test of this script, not a measurement).
QUICK_OPTS = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", 2, "MODEL.HEAD.OUT_DIM", 1024,
              "INPUT.GLOBAL_CROP_SIZE", 64, "INPUT.LOCAL_CROP_SIZE", 32]
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
# Default matmul sides of the peak probes: a GPU needs larger products than a CPU to reach its peak.
DEFAULT_SIZES = {"cpu": {"probe": 2048, "sweep": [2048, 3072, 4096]},
                 "cuda": {"probe": 8192, "sweep": [4096, 8192, 16384]}}


# ------------------------------------------------------------------------------ machine
def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the flags of ``CPU_FLAGS`` it has (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def machine_lines(device: str = "cpu") -> list[str]:
    model, flags = cpu_info()
    env = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    lines = [
        f"CPU: {model}, {os.cpu_count()} logical CPUs; flags: {', '.join(flags) or 'none of ' + str(CPU_FLAGS)}",
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}); python {platform.python_version()}",
        f"threads: torch.get_num_threads() = {torch.get_num_threads()}, "
        + ", ".join(f"{k} = {v}" for k, v in env.items()),
    ]
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        lines.append(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB; "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
                     f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}")
    return lines


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between ``__enter__`` and ``__exit__``
    (``.share``, 0..1; NaN without /proc/stat): a timing disturbed by other work shows here."""

    @staticmethod
    def _busy_and_own() -> tuple[float, float]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        own = os.times()
        return busy, own.user + own.system

    def __enter__(self) -> "OtherLoad":
        self.share = float("nan")
        try:
            self._start = (time.perf_counter(), *self._busy_and_own())
        except (OSError, ValueError):
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            wall, busy, own = time.perf_counter(), *self._busy_and_own()
            others = (busy - self._start[1]) - (own - self._start[2])
            self.share = max(0.0, others / ((wall - self._start[0]) * (os.cpu_count() or 1)))


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose operations are synchronous)."""
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ peak
def matmul_gflops(dtype: torch.dtype, n: int, repeats: int = 3, device: str = "cpu") -> float:
    """Best GFLOP/s (2 n^3 per product) of ``repeats`` timed n x n products on ``device``, after one
    warm-up. GPU products are timed with CUDA events (the kernel's time, not the launch)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            start = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - start
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def matmul_peak(dtype: torch.dtype, sizes: Sequence[int] = (2048, 3072, 4096), repeats: int = 3,
                device: str = "cpu") -> float:
    """Best GFLOP/s over square products of every size in ``sizes``."""
    return max(matmul_gflops(dtype, n, repeats, device) for n in sizes)


# ------------------------------------------------------------------------------ FLOPs
def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU kernels of F.scaled_dot_product_attention have no formula in torch's flop registry: without
# these, attention would count as zero FLOPs. (The CUDA kernels, flash, memory-efficient and cuDNN,
# have theirs in the registry.)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_step_flops(trainer: DINOTrainer) -> int:
    """FLOPs of one ``run_step`` (matmuls and attention, forward and backward); runs one step."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        trainer.run_step()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------ training step
def bench_config(precision: str, batch: int, output_dir: str, opts: Sequence = (), device: str = "cpu"):
    """The frozen config of the timed steps: the default (ViT-S/16, paper head and crops) + ``opts``."""
    enabled, dtype, _ = PRECISIONS[precision]
    cfg = get_cfg()
    cfg.merge_from_list([
        "DATASETS.TRAIN", "Synthetic", "DATASETS.SYNTHETIC_SIZE", max(64, batch), "SOLVER.BATCH_SIZE_PER_GPU", batch,
        "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", enabled, "SOLVER.AMP.DTYPE", dtype,
        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", output_dir, *opts,
    ])
    cfg.freeze()
    return cfg


def build_trainer(precision: str, batch: int, output_dir: str, opts: Sequence = (), device: str = "cpu") -> DINOTrainer:
    """A ``DINOTrainer`` of :func:`bench_config` on ``device``, no hooks."""
    return DINOTrainer(bench_config(precision, batch, output_dir, opts, device), default_hooks=False)


def reference_rows(checkout: str, rows: list[dict], warmup: int, iters: int, opts: Sequence, device: str) -> list[dict]:
    """The reference loop (``tools/reference_loop.py``) timed on the crops of every fp32 / fp16 row:
    ``{"precision", "batch", "images_per_s", "ours_images_per_s", "ratio"}`` (ratio = ours / reference)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_loop.py")
    spec = importlib.util.spec_from_file_location("reference_loop", path)
    reference_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference_loop)
    out = []
    for r in rows:
        if "error" in r or r["precision"] not in ("fp32", "fp16"):
            continue
        with tempfile.TemporaryDirectory() as output_dir:
            cfg = bench_config(r["precision"], r["batch"], output_dir, opts, device)
            timed = reference_loop.time_reference_loop(checkout, cfg, fixed_batch(cfg, r["batch"], device)[0],
                                                       warmup, iters, r["precision"], device)
        out.append(dict(precision=r["precision"], batch=r["batch"], images_per_s=timed["images_per_s"],
                        ours_images_per_s=r["images_per_s"], ratio=r["images_per_s"] / timed["images_per_s"]))
    return out


def fixed_batch(cfg, batch: int, device: str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """One multi-crop batch of the config's sizes on ``device``: global crops first, then local crops;
    zero labels."""
    gen = torch.Generator().manual_seed(0)
    sizes = [cfg.INPUT.GLOBAL_CROP_SIZE] * 2 + [cfg.INPUT.LOCAL_CROP_SIZE] * cfg.INPUT.LOCAL_CROPS_NUMBER
    return ([torch.randn(batch, 3, s, s, generator=gen).to(device) for s in sizes],
            torch.zeros(batch, dtype=torch.long, device=device))


def host_to_device_ms(crops: Sequence[torch.Tensor], repeats: int = 3) -> float:
    """Best milliseconds to copy ``crops`` from pinned host memory to the GPU (non-blocking, as the
    trainer's ``to_device``), over ``repeats`` copies."""
    pinned = [c.cpu().pin_memory() for c in crops]
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        copies = [c.to("cuda", non_blocking=True) for c in pinned]
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
        del copies
    return best


def use_batch(trainer: DINOTrainer, batch: int) -> None:
    """Feed ``trainer`` one fixed in-memory batch of ``batch`` images from now on (no data loading)."""
    crops_and_labels = fixed_batch(trainer.cfg, batch, trainer.device.type)
    trainer.data_source = lambda start, batch=crops_and_labels: itertools.repeat(batch)
    trainer.open_data(0)


def time_steps(trainer: DINOTrainer, warmup: int, iters: int,
               probe: Callable[[], dict]) -> tuple[list[float], list[dict], list[float]]:
    """Seconds of each of ``iters`` calls of ``run_step`` after ``warmup`` untimed ones, the result
    of ``probe()`` (the matmul peaks) taken right before each timed call, and the seconds of each
    warm-up call (the first includes ``MODEL.COMPILE``'s compilation). On a GPU the device is
    synchronized before and after each step.

    Iterations are numbered from the end of the prototype-layer freeze (the whole model is updated).
    """
    device = trainer.device.type
    first = trainer.cfg.SOLVER.FREEZE_LAST_LAYER_EPOCHS * trainer.iters_per_epoch
    times, probes, warmup_times = [], [], []
    for i in range(warmup + iters):
        trainer.iter = trainer.storage.iter = first + i
        if i >= warmup:
            probes.append(probe())
        synchronize(device)
        start = time.perf_counter()
        trainer.run_step()
        synchronize(device)
        (times if i >= warmup else warmup_times).append(time.perf_counter() - start)
    return times, probes, warmup_times


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def largest_batch(precision: str, start: int, output_dir: str, opts: Sequence = (), device: str = "cuda",
                  limit: int = 8192, log=print) -> int:
    """The largest batch (``start`` x 2^k, then bisected to within 1/8) whose training step runs on
    ``device`` without running out of memory; 0 when not even ``start`` fits.

    One trainer serves every try (the step's memory is the model, its optimizer state and the
    batch's activations); after an out-of-memory error it is rebuilt, since the failed step may have
    stopped half way (a gradient scaler between unscale and update).
    """
    state = {"trainer": None}

    def fits(batch: int) -> bool:
        if state["trainer"] is None:
            state["trainer"] = build_trainer(precision, batch, output_dir, opts, device)
        trainer = state["trainer"]
        try:
            use_batch(trainer, batch)
            with EventStorage(0) as trainer.storage:
                first = trainer.cfg.SOLVER.FREEZE_LAST_LAYER_EPOCHS * trainer.iters_per_epoch
                trainer.iter = trainer.storage.iter = first
                trainer.run_step()
            synchronize(device)
            ok = True
        except RuntimeError as e:
            if not _out_of_memory(e):
                raise
            ok = False
        if not ok:
            state["trainer"] = trainer = None
        _release(device)
        log(f"  {precision} batch {batch}: {'fits' if ok else 'out of memory'}")
        return ok

    if not fits(start):
        return 0
    lo, hi = start, None
    while lo * 2 <= limit:
        if not fits(lo * 2):
            hi = lo * 2
            break
        lo *= 2
    while hi is not None and hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    state["trainer"] = None
    _release(device)
    return lo


def _measure(trainer: DINOTrainer, precision: str, batch: int, warmup: int, iters: int, probe_size: int,
             device: str, profile: int = 0) -> dict:
    """Timed steps, their probes, the FLOPs of one step and the peak memory of ``trainer`` at ``batch``;
    with ``profile`` > 0, also :func:`~dino_research.utils.profiling.profile_steps` over that many
    more steps (after the timed ones, so the profiler's overhead is not in the timings)."""
    probe_dtypes = {torch.float32, PRECISIONS[precision][2]} | ({torch.bfloat16} if device == "cuda" else set())
    use_batch(trainer, batch)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with EventStorage(0) as trainer.storage:
        with OtherLoad() as other_load:
            times, probes, warmup_times = time_steps(trainer, warmup, iters, lambda: {
                dtype: matmul_gflops(dtype, probe_size, device=device) for dtype in probe_dtypes})
        peak_memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
        flops = count_step_flops(trainer)
        profiled = profile_steps(trainer.run_step, profile, device=device) if profile else None
    h2d = host_to_device_ms(fixed_batch(trainer.cfg, batch)[0]) if device == "cuda" else None
    return dict(precision=precision, batch=batch, times=times, probes=probes, flops=flops,
                other_load=other_load.share, peak_memory=peak_memory, h2d_ms=h2d, profile=profiled,
                warmup_times=warmup_times)


def bench_training(precisions: Sequence[str] = ("fp32", "bf16"), batch: int = 8, warmup: int = 2,
                   iters: int = 5, threads: Optional[int] = None, *, opts: Sequence = (),
                   peak_sizes: Optional[Sequence[int]] = None, probe_size: Optional[int] = None,
                   device: str = "cpu", max_batch: bool = False, max_batch_limit: int = 8192,
                   profile: int = 0, log=print) -> list[dict]:
    """Time the DINO training step per precision; one dict per (precision, batch), in order.

    The speed of a shared or virtual machine drifts (other tenants, clock boost), so the matmul peak
    is measured next to every timed step: before each step, the best of 3 square products of side
    ``probe_size`` in the precision's matmul dtype (and in float32; on a GPU also in bfloat16). Each
    step's MFU is its achieved GFLOP/s over that probe; ``mfu`` is the median. The best rate of a
    sweep over ``peak_sizes`` (before and after all steps) is reported too, as the strictest
    reference. ``probe_size`` and ``peak_sizes`` default to sizes that reach the device's peak
    (:data:`DEFAULT_SIZES`). With ``max_batch`` (CUDA), every precision is also timed at
    :func:`largest_batch` (a row with ``batch`` None and ``error`` set when even ``batch`` does not fit).

    Keys: ``precision``, ``batch``, ``device``, ``images_per_s`` (batch / median step time),
    ``s_per_iter`` (median), ``s_per_iter_all`` (every timed step), ``flops_per_image``,
    ``achieved_gflops`` (at the median step), ``peak_gflops`` (median probe of this dtype),
    ``fp32_peak_gflops`` (median float32 probe), ``mfu``, ``mfu_vs_fp32_peak``, ``mfu_vs_bf16_peak``
    (GPU only, else None; medians of the per-step ratios), ``sweep_peak_gflops``, ``mfu_vs_sweep_peak``,
    ``speedup_vs_fp32`` (against the fp32 row of the same batch; None without one), ``threads``,
    ``other_load`` (share of the CPUs other processes used during the steps: re-run when it is not near
    0), ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` over the timed steps; None on a
    CPU), ``h2d_ms`` (host-to-device copy of one batch from pinned memory; None on a CPU).
    ``opts`` are extra config overrides (KEY, VALUE, ...). With ``profile`` = N > 0 every row also
    has ``profile``: :func:`~dino_research.utils.profiling.profile_steps` of N more steps (phases and
    the operators with the most self time).
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {sorted(PRECISIONS)}")
    if device not in DEFAULT_SIZES:
        raise ValueError(f"device must be one of {sorted(DEFAULT_SIZES)}, got {device!r}")
    if device == "cpu" and "fp16" in precisions:
        raise ValueError("fp16 (float16 autocast with a gradient scaler) needs --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    if max_batch and device != "cuda":
        raise ValueError("--max-batch searches the GPU's memory: it needs --device cuda")
    peak_sizes = list(peak_sizes or DEFAULT_SIZES[device]["sweep"])
    probe_size = probe_size or DEFAULT_SIZES[device]["probe"]
    if threads is not None:
        torch.set_num_threads(threads)
    dtypes = [torch.float32] + sorted({PRECISIONS[p][2] for p in precisions} - {torch.float32}, key=str)
    if device == "cuda" and torch.bfloat16 not in dtypes:
        dtypes.append(torch.bfloat16)
    sweep = {dtype: matmul_peak(dtype, peak_sizes, device=device) for dtype in dtypes}
    measured = []
    for precision in precisions:
        with tempfile.TemporaryDirectory() as output_dir:
            batches = [batch]
            if max_batch:
                log(f"largest batch of {precision} (from {batch}, doubling, then to within 1/8):")
                found = largest_batch(precision, batch, output_dir, opts, device, max_batch_limit, log=log)
                if found == 0:
                    measured.append(dict(precision=precision, batch=None, error=f"batch {batch} does not fit"))
                    batches = []
                elif found != batch:
                    batches.append(found)
            for b in batches:
                trainer = build_trainer(precision, b, output_dir, opts, device)
                try:
                    measured.append(_measure(trainer, precision, b, warmup, iters, probe_size, device, profile))
                except RuntimeError as e:  # the search's batch fitted one step, not several: say so
                    if not _out_of_memory(e):
                        raise
                    measured.append(dict(precision=precision, batch=b, error=f"out of memory at batch {b}"))
                finally:
                    del trainer
                    _release(device)
    sweep = {dtype: max(peak, matmul_peak(dtype, peak_sizes, device=device)) for dtype, peak in sweep.items()}

    rows = []
    for m in measured:
        if "error" in m:
            rows.append(dict(precision=m["precision"], batch=m["batch"], device=device, error=m["error"]))
            continue
        dtype, times, probes, flops, b = PRECISIONS[m["precision"]][2], m["times"], m["probes"], m["flops"], m["batch"]
        step = statistics.median(times)
        achieved = [flops / t / 1e9 for t in times]
        rows.append(dict(
            precision=m["precision"], batch=b, device=device, images_per_s=b / step, s_per_iter=step,
            s_per_iter_all=times, flops_per_image=flops / b, achieved_gflops=flops / step / 1e9,
            peak_gflops=statistics.median(p[dtype] for p in probes),
            fp32_peak_gflops=statistics.median(p[torch.float32] for p in probes),
            mfu=statistics.median(a / p[dtype] for a, p in zip(achieved, probes)),
            mfu_vs_fp32_peak=statistics.median(a / p[torch.float32] for a, p in zip(achieved, probes)),
            mfu_vs_bf16_peak=(statistics.median(a / p[torch.bfloat16] for a, p in zip(achieved, probes))
                              if device == "cuda" else None),
            sweep_peak_gflops=sweep[dtype], mfu_vs_sweep_peak=flops / step / 1e9 / sweep[dtype],
            threads=torch.get_num_threads(), other_load=m["other_load"], peak_memory_bytes=m["peak_memory"],
            h2d_ms=m["h2d_ms"], profile=m["profile"], warmup_s=m["warmup_times"],
        ))
    for r in rows:
        fp32 = next((f for f in rows if f["precision"] == "fp32" and f["batch"] == r["batch"] and "error" not in f),
                    None)
        if "error" not in r:
            r["speedup_vs_fp32"] = r["images_per_s"] / fp32["images_per_s"] if fp32 else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| precision | images/s | s/iter (median) | GFLOPs/image | achieved GFLOP/s | matmul peak GFLOP/s "
             "(own dtype, next to the steps) | MFU (vs own peak) | MFU vs fp32 peak | speedup vs fp32 "
             "| CPU used by other processes | batch | peak GPU memory (GiB) | MFU vs bf16 peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            cells = [r["precision"], r["error"]] + [""] * 8 + [str(r["batch"] or "n/a"), "", ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        speedup = "n/a" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x"
        memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        bf16 = "n/a" if r["mfu_vs_bf16_peak"] is None else f"{100 * r['mfu_vs_bf16_peak']:.1f}%"
        lines.append(
            f"| {r['precision']} | {r['images_per_s']:.3f} | {r['s_per_iter']:.3f} | {r['flops_per_image'] / 1e9:.1f} "
            f"| {r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | {100 * r['mfu']:.1f}% "
            f"| {100 * r['mfu_vs_fp32_peak']:.1f}% | {speedup} | {100 * r['other_load']:.0f}% "
            f"| {r['batch']} | {memory} | {bf16} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=sorted(DEFAULT_SIZES), help="MODEL.DEVICE of the steps")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS),
                        help="fp32 (AMP off), bf16 / fp16 (SOLVER.AMP.DTYPE bfloat16 / float16; fp16 on CUDA only)")
    parser.add_argument("--batch-size", "--batch", dest="batch", type=int, default=8, help="SOLVER.BATCH_SIZE_PER_GPU")
    parser.add_argument("--max-batch", action="store_true",
                        help="CUDA: also time each precision at the largest batch that fits in the GPU's memory")
    parser.add_argument("--max-batch-limit", type=int, default=8192, help="largest batch --max-batch tries")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per precision")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per precision (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=None,
                        help="sides of the square matmuls of the sweep (best rate of the whole run); default "
                             + "; ".join(f"{d}: {' '.join(map(str, s['sweep']))}" for d, s in DEFAULT_SIZES.items()))
    parser.add_argument("--probe-size", type=int, default=None,
                        help="side of the square matmuls measured before every timed step (the MFU's peak); "
                             "default " + ", ".join(f"{d}: {s['probe']}" for d, s in DEFAULT_SIZES.items()))
    parser.add_argument("--profile", type=int, default=2, metavar="N",
                        help="torch.profiler over N more steps per row: time per phase (forward, backward, "
                             "clipping, optimizer, EMA) and the operators with the most self time (0: off)")
    parser.add_argument("--reference", metavar="DINO_CHECKOUT", default=None,
                        help="a facebookresearch/dino checkout: also time its train_one_epoch on the same crops "
                             "(fp32 and fp16 rows) and print our speed over its (tools/reference_loop.py)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny ViT, small crops and head, batch 2, 1+1 steps (not a measurement)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="extra config overrides")
    args = parser.parse_args(argv)
    opts = list(args.opts)
    if "fp16" in args.precisions and args.device != "cuda":
        parser.error("fp16 (float16 autocast with a gradient scaler) needs --device cuda")
    if args.max_batch and args.device != "cuda":
        parser.error("--max-batch needs --device cuda")
    if args.reference and not all(os.path.isfile(os.path.join(args.reference, f))
                                  for f in ("main_dino.py", "utils.py", "vision_transformer.py")):
        parser.error(f"--reference {args.reference!r}: not a facebookresearch/dino checkout (it needs main_dino.py, "
                     "utils.py and vision_transformer.py); clone https://github.com/facebookresearch/dino there")
    if args.quick:
        opts = QUICK_OPTS + opts
        args.batch, args.warmup, args.iters, args.peak_sizes, args.probe_size = 2, 1, 1, [256], 256
        args.max_batch_limit = min(args.max_batch_limit, 16)

    print(f"Command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    load_before = os.getloadavg()[0]
    rows = bench_training(args.precisions, args.batch, args.warmup, args.iters, args.threads, opts=opts,
                          peak_sizes=args.peak_sizes, probe_size=args.probe_size, device=args.device,
                          max_batch=args.max_batch, max_batch_limit=args.max_batch_limit, profile=args.profile)
    ok = [r for r in rows if "error" not in r]
    probe_size = args.probe_size or DEFAULT_SIZES[args.device]["probe"]
    peak_sizes = args.peak_sizes or DEFAULT_SIZES[args.device]["sweep"]
    print()
    print(f"DINO training step on {args.device}, {'ViT-Tiny depth 2 (--quick)' if args.quick else 'ViT-S/16'}, batch "
          f"{args.batch}{' and the largest that fits' if args.max_batch else ''}, "
          f"2 global + local crops of the default config{' + ' + ' '.join(map(str, opts)) if opts else ''}; "
          f"median of {args.iters} steps after {args.warmup} warm-up steps.")
    print()
    print(markdown_table(rows))
    print()
    print("- Timed: `DINOTrainer.run_step` (teacher forward, student forward + backward, loss, clipping, fused "
          "AdamW, teacher EMA, center update); data loading excluded (one fixed in-memory batch"
          f"{', already on the GPU' if args.device == 'cuda' else ''}), no hooks.")
    print("- FLOPs: torch.utils.flop_counter over one step / batch: matmuls, patch-embedding conv and fused "
          "attention, forward and backward; element-wise ops, optimizer and EMA are not counted (their time is).")
    print(f"- Peak: before every timed step, the best of 3 torch.mm of {probe_size}x{probe_size} matrices "
          "in the precision's matmul dtype and in float32"
          f"{' and bfloat16 (CUDA events)' if args.device == 'cuda' else ''} (the machine's speed drifts: each step "
          "is compared with the peak measured next to it); peak column = median probe, MFU = median over steps of "
          "achieved / probe. MFU uses the precision's own dtype; the next column the float32 peak"
          f"{', the last one the bfloat16 (tensor-core) peak' if args.device == 'cuda' else ''}.")
    print(f"- Strictest reference, the best rate of a sweep of {peak_sizes} square matmuls before and after "
          "all steps: " + "; ".join(f"{r['precision']} batch {r['batch']}: {r['sweep_peak_gflops']:.1f} GFLOP/s, MFU "
                                    f"{100 * r['mfu_vs_sweep_peak']:.1f}%" for r in ok))
    print("- Warm-up steps (s; the first includes MODEL.COMPILE's compilation): " + "; ".join(
        f"{r['precision']} batch {r['batch']}: " + ", ".join(f"{t:.1f}" for t in r["warmup_s"]) for r in ok))
    print("- Steps (s): " + "; ".join(f"{r['precision']} batch {r['batch']}: "
                                      + ", ".join(f"{t:.3f}" for t in r["s_per_iter_all"]) for r in ok))
    if args.device == "cuda":
        print("- Host-to-device copy of one batch from pinned memory (not in the step time; the trainer does it "
              "at the start of every step): " + "; ".join(f"batch {r['batch']}: {r['h2d_ms']:.1f} ms" for r in ok
                                                          if r["precision"] == ok[0]["precision"]))
    for line in machine_lines(args.device):
        print(f"- {line}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    chosen = ", ".join(f"{k}={v}" for k, v in sorted(malloc.items()))
    if args.device == "cpu":
        print(f"- glibc malloc: {chosen + ' (environment)' if malloc else 'freed memory kept mapped by the trainer'}")
    print(f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    if args.reference:
        print("\n### Against the reference loop\n")
        print(f"`main_dino.train_one_epoch` of {args.reference}, one process, same crops and sizes, "
              f"{args.iters} iterations after {args.warmup} (tools/reference_loop.py says what is adapted).\n")
        print("| precision | batch | reference images/s | ours images/s | ours / reference |")
        print("|---|---:|---:|---:|---:|")
        for r in reference_rows(args.reference, ok, args.warmup, args.iters, opts, args.device):
            print(f"| {r['precision']} | {r['batch']} | {r['images_per_s']:.3f} | {r['ours_images_per_s']:.3f} "
                  f"| {r['ratio']:.2f}x |")
    for r in ok:
        if r.get("profile"):
            print(f"\n### Where the time goes: {r['precision']}, batch {r['batch']} "
                  f"(torch.profiler, {args.profile} steps after the timed ones)\n")
            print(markdown_tables(r["profile"]))


if __name__ == "__main__":
    main()
