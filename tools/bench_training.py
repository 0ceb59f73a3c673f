#!/usr/bin/env python
"""Training throughput and model FLOP utilization (MFU) of the real DINO step on CPU.

    python tools/bench_training.py [--precisions fp32 bf16] [--batch 8] [--warmup 2] [--iters 5]
                                   [--threads N] [--probe-size 2048] [--quick] [KEY VALUE ...]

What is timed: ``DINOTrainer.run_step`` itself (schedules, teacher forward on the 2 global crops,
student forward + backward on all crops, loss, per-parameter clipping, fused AdamW, teacher EMA,
center update), built from the default config: ViT-S/16, the paper's head (OUT_DIM 65536), 2x224 +
8x96 crops, ``SOLVER.BATCH_SIZE_PER_GPU`` = ``--batch``, on the CPU, in float32 (``SOLVER.AMP.ENABLED
False``) and with bfloat16 autocast (``SOLVER.AMP.DTYPE bfloat16``). Data loading is excluded: the
step reads one fixed, pre-built batch of crops from memory, and no hook runs. The timed iterations
come after ``SOLVER.FREEZE_LAST_LAYER_EPOCHS``, so the optimizer updates every parameter (the
prototype layer included), as in most of a run.

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one full step
divided by the batch: matrix products (mm, addmm, bmm, the patch-embedding convolution) and fused
attention (CPU flash attention, forward and backward), in the teacher forward and the student
forward and backward. Element-wise work (GELU, LayerNorm, softmax, the loss reductions), the
optimizer, the clipping and the EMA are not counted as FLOPs, but their time is in the step time.

MFU = FLOPs per image x images/s / matmul peak, the peak measured in the same run: right before every
timed step, the best of 3 square ``torch.mm`` of side ``--probe-size`` in the precision's matmul
dtype and in float32. Each step is compared with the peak measured next to it (the speed of a shared
or virtual machine drifts by several percent over minutes) and the median is reported. bfloat16 MFU
is given against both the bfloat16 and the float32 peak. The best rate of a sweep of larger squares
(``--peak-sizes``, before and after all steps) is printed too, as the strictest reference. The
output also says how much CPU other processes used during the steps: re-run when it is not ~0%.

glibc's malloc returns freed activation memory to the kernel and page-faults it back at every step;
the trainer keeps it mapped on CPU (``dino_research/utils/malloc.py``, through ``mallopt``) unless
``MALLOC_*_`` variables are set in the environment; the output says which.

This is a benchmark, not a test: the defaults take a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
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

PRECISIONS = {  # name -> (SOLVER.AMP.ENABLED, SOLVER.AMP.DTYPE, matmul dtype of the peak)
    "fp32": (False, "bfloat16", torch.float32),
    "bf16": (True, "bfloat16", torch.bfloat16),
}
# Tiny model and sizes of --quick (a smoke test of this script, not a measurement).
QUICK_OPTS = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", 2, "MODEL.HEAD.OUT_DIM", 1024,
              "INPUT.GLOBAL_CROP_SIZE", 64, "INPUT.LOCAL_CROP_SIZE", 32]
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


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


def machine_lines() -> list[str]:
    model, flags = cpu_info()
    env = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return [
        f"CPU: {model}, {os.cpu_count()} logical CPUs; flags: {', '.join(flags) or 'none of ' + str(CPU_FLAGS)}",
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}); python {platform.python_version()}",
        f"threads: torch.get_num_threads() = {torch.get_num_threads()}, "
        + ", ".join(f"{k} = {v}" for k, v in env.items()),
    ]


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


# ------------------------------------------------------------------------------ peak
def matmul_gflops(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best GFLOP/s (2 n^3 per product) of ``repeats`` timed n x n products, after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def matmul_peak(dtype: torch.dtype, sizes: Sequence[int] = (2048, 3072, 4096), repeats: int = 3) -> float:
    """Best GFLOP/s over square products of every size in ``sizes``."""
    return max(matmul_gflops(dtype, n, repeats) for n in sizes)


# ------------------------------------------------------------------------------ FLOPs
def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU kernels of F.scaled_dot_product_attention have no formula in torch's flop registry: without
# these, attention would count as zero FLOPs.
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
def build_trainer(precision: str, batch: int, output_dir: str, opts: Sequence = ()) -> DINOTrainer:
    """A ``DINOTrainer`` of the default config (ViT-S/16, paper head and crops) on the CPU, no hooks."""
    enabled, dtype, _ = PRECISIONS[precision]
    cfg = get_cfg()
    cfg.merge_from_list([
        "DATASETS.TRAIN", "Synthetic", "SOLVER.BATCH_SIZE_PER_GPU", batch, "MODEL.DEVICE", "cpu",
        "SOLVER.AMP.ENABLED", enabled, "SOLVER.AMP.DTYPE", dtype, "DATALOADER.NUM_WORKERS", 0,
        "OUTPUT_DIR", output_dir, *opts,
    ])
    cfg.freeze()
    return DINOTrainer(cfg, default_hooks=False)


def fixed_batch(cfg, batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One multi-crop batch of the config's sizes: global crops first, then local crops; zero labels."""
    gen = torch.Generator().manual_seed(0)
    sizes = [cfg.INPUT.GLOBAL_CROP_SIZE] * 2 + [cfg.INPUT.LOCAL_CROP_SIZE] * cfg.INPUT.LOCAL_CROPS_NUMBER
    return [torch.randn(batch, 3, s, s, generator=gen) for s in sizes], torch.zeros(batch, dtype=torch.long)


def time_steps(trainer: DINOTrainer, warmup: int, iters: int,
               probe: Callable[[], dict]) -> tuple[list[float], list[dict]]:
    """Seconds of each of ``iters`` calls of ``run_step`` after ``warmup`` untimed ones, and the
    result of ``probe()`` (the matmul peaks) taken right before each timed call.

    Iterations are numbered from the end of the prototype-layer freeze (the whole model is updated).
    """
    first = trainer.cfg.SOLVER.FREEZE_LAST_LAYER_EPOCHS * trainer.iters_per_epoch
    times, probes = [], []
    for i in range(warmup + iters):
        trainer.iter = trainer.storage.iter = first + i
        if i >= warmup:
            probes.append(probe())
        start = time.perf_counter()
        trainer.run_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, probes


def bench_training(precisions: Sequence[str] = ("fp32", "bf16"), batch: int = 8, warmup: int = 2,
                   iters: int = 5, threads: Optional[int] = None, *, opts: Sequence = (),
                   peak_sizes: Sequence[int] = (2048, 3072, 4096), probe_size: int = 2048) -> list[dict]:
    """Time the DINO training step per precision; one dict per precision, in order.

    The speed of a shared or virtual machine drifts (other tenants, clock boost), so the matmul peak
    is measured next to every timed step: before each step, the best of 3 square products of side
    ``probe_size`` in the precision's matmul dtype (and in float32). Each step's MFU is its achieved
    GFLOP/s over that probe; ``mfu`` is the median. The best rate of a sweep over ``peak_sizes``
    (before and after all steps) is reported too, as the strictest reference.

    Keys: ``precision``, ``images_per_s`` (batch / median step time), ``s_per_iter`` (median),
    ``s_per_iter_all`` (every timed step), ``flops_per_image``, ``achieved_gflops`` (at the median
    step), ``peak_gflops`` (median probe of this dtype), ``fp32_peak_gflops`` (median float32 probe),
    ``mfu``, ``mfu_vs_fp32_peak`` (medians of the per-step ratios), ``sweep_peak_gflops``,
    ``mfu_vs_sweep_peak``, ``speedup_vs_fp32`` (None without an fp32 row), ``threads``, ``other_load``
    (share of the CPUs other processes used during the steps: re-run when it is not near 0). ``opts``
    are extra config overrides (KEY, VALUE, ...).
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {sorted(PRECISIONS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    dtypes = [torch.float32] + sorted({PRECISIONS[p][2] for p in precisions} - {torch.float32}, key=str)
    sweep = {dtype: matmul_peak(dtype, peak_sizes) for dtype in dtypes}
    measured = []
    for precision in precisions:
        probe_dtypes = {torch.float32, PRECISIONS[precision][2]}
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = build_trainer(precision, batch, output_dir, opts)
            crops_and_labels = fixed_batch(trainer.cfg, batch)
            # In memory: no data loading.
            trainer.data_source = lambda start, batch=crops_and_labels: itertools.repeat(batch)
            trainer.open_data(0)
            with EventStorage(0) as trainer.storage:
                with OtherLoad() as other_load:
                    times, probes = time_steps(trainer, warmup, iters, lambda dtypes=probe_dtypes: {
                        dtype: matmul_gflops(dtype, probe_size) for dtype in dtypes})
                flops = count_step_flops(trainer)
            del trainer
        measured.append((precision, times, probes, flops, other_load.share))
    sweep = {dtype: max(peak, matmul_peak(dtype, peak_sizes)) for dtype, peak in sweep.items()}

    rows = []
    for precision, times, probes, flops, other_load in measured:
        dtype = PRECISIONS[precision][2]
        step = statistics.median(times)
        achieved = [flops / t / 1e9 for t in times]
        rows.append(dict(
            precision=precision, images_per_s=batch / step, s_per_iter=step, s_per_iter_all=times,
            flops_per_image=flops / batch, achieved_gflops=flops / step / 1e9,
            peak_gflops=statistics.median(p[dtype] for p in probes),
            fp32_peak_gflops=statistics.median(p[torch.float32] for p in probes),
            mfu=statistics.median(a / p[dtype] for a, p in zip(achieved, probes)),
            mfu_vs_fp32_peak=statistics.median(a / p[torch.float32] for a, p in zip(achieved, probes)),
            sweep_peak_gflops=sweep[dtype], mfu_vs_sweep_peak=flops / step / 1e9 / sweep[dtype],
            threads=torch.get_num_threads(), other_load=other_load,
        ))
    fp32 = next((r for r in rows if r["precision"] == "fp32"), None)
    for r in rows:
        r["speedup_vs_fp32"] = r["images_per_s"] / fp32["images_per_s"] if fp32 else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| precision | images/s | s/iter (median) | GFLOPs/image | achieved GFLOP/s | matmul peak GFLOP/s "
             "(own dtype, next to the steps) | MFU (vs own peak) | MFU vs fp32 peak | speedup vs fp32 "
             "| CPU used by other processes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = "n/a" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x"
        lines.append(
            f"| {r['precision']} | {r['images_per_s']:.3f} | {r['s_per_iter']:.2f} | {r['flops_per_image'] / 1e9:.1f} "
            f"| {r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | {100 * r['mfu']:.1f}% "
            f"| {100 * r['mfu_vs_fp32_peak']:.1f}% | {speedup} | {100 * r['other_load']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--batch", type=int, default=8, help="SOLVER.BATCH_SIZE_PER_GPU")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per precision")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per precision (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=[2048, 3072, 4096],
                        help="sides of the square matmuls of the sweep (best rate of the whole run)")
    parser.add_argument("--probe-size", type=int, default=2048,
                        help="side of the square matmuls measured before every timed step (the MFU's peak)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny ViT, small crops and head, batch 2, 1+1 steps (not a measurement)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="extra config overrides")
    args = parser.parse_args(argv)
    opts = list(args.opts)
    if args.quick:
        opts = QUICK_OPTS + opts
        args.batch, args.warmup, args.iters, args.peak_sizes, args.probe_size = 2, 1, 1, [256], 256

    print(f"Command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    load_before = os.getloadavg()[0]
    rows = bench_training(args.precisions, args.batch, args.warmup, args.iters, args.threads, opts=opts,
                          peak_sizes=args.peak_sizes, probe_size=args.probe_size)
    print()
    print(f"DINO training step, {'ViT-Tiny depth 2 (--quick)' if args.quick else 'ViT-S/16'}, batch {args.batch}, "
          f"2 global + local crops of the default config{' + ' + ' '.join(map(str, opts)) if opts else ''}; "
          f"median of {args.iters} steps after {args.warmup} warm-up steps.")
    print()
    print(markdown_table(rows))
    print()
    print("- Timed: `DINOTrainer.run_step` (teacher forward, student forward + backward, loss, clipping, fused "
          "AdamW, teacher EMA, center update); data loading excluded (one fixed in-memory batch), no hooks.")
    print("- FLOPs: torch.utils.flop_counter over one step / batch: matmuls, patch-embedding conv and fused "
          "attention, forward and backward; element-wise ops, optimizer and EMA are not counted (their time is).")
    print(f"- Peak: before every timed step, the best of 3 torch.mm of {args.probe_size}x{args.probe_size} matrices "
          "in the precision's matmul dtype and in float32 (the machine's speed drifts: each step is compared with "
          "the peak measured next to it); peak column = median probe, MFU = median over steps of achieved / probe. "
          "MFU uses the precision's own dtype; the next column the float32 peak.")
    print(f"- Strictest reference, the best rate of a sweep of {args.peak_sizes} square matmuls before and after "
          "all steps: " + "; ".join(f"{r['precision']}: {r['sweep_peak_gflops']:.1f} GFLOP/s, MFU "
                                    f"{100 * r['mfu_vs_sweep_peak']:.1f}%" for r in rows))
    print("- Steps (s): " + "; ".join(f"{r['precision']}: " + ", ".join(f"{t:.2f}" for t in r["s_per_iter_all"])
                                      for r in rows))
    for line in machine_lines():
        print(f"- {line}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    chosen = ", ".join(f"{k}={v}" for k, v in sorted(malloc.items()))
    print(f"- glibc malloc: {chosen + ' (environment)' if malloc else 'freed memory kept mapped by the trainer'}")
    print(f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
