"""Where a training step's time goes: phases and operators, from ``torch.profiler``.

``DINOTrainer.run_step`` labels its phases with ``torch.profiler.record_function`` (names in
:data:`STEP_PHASES`; a label costs ~1 us when no profiler runs). :func:`profile_steps` runs a few
steps under the profiler and returns two tables:

- phases: milliseconds per step of each label (the augmentation's device stage, forward, backward,
  clipping, optimizer, the model's after-step update: EMA and center) and of the rest of the step
  (schedules, logging scalars);
- operators: the aten operators with the most *self* time per step (time inside the operator, not
  in the operators it calls), their share of the step and their calls per step.

On a GPU the device's own time per operator is read as well (``self_device_ms``); the phase times
are host times there (the host waits at the loss's ``.item()`` and the clipping's checks).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["STEP_PHASES", "phase", "profile_steps", "markdown_tables"]

# The record_function labels of run_step, in step order.
STEP_PHASES = ("step/augment", "step/forward", "step/backward", "step/clip", "step/optimizer", "step/after_step")


def phase(name: str) -> record_function:
    """``with phase("step/forward"):``: a profiler label of one of :data:`STEP_PHASES`."""
    return record_function(name)


def profile_steps(step: Callable[[], None], steps: int = 2, top: int = 15, device: str = "cpu") -> dict:
    """Run ``step()`` ``steps`` times under ``torch.profiler`` (after the caller's warm-up).

    Returns ``{"step_ms": wall ms per step (under the profiler, so a few % above an unprofiled
    step), "phases": [{"phase", "ms", "share"}], "ops": [{"op", "self_ms", "share", "calls",
    "self_device_ms"}]}``, per-step averages; ``share`` is of ``step_ms``. ``ops`` holds the ``top``
    operators by self host time (on ``device == "cuda"``: by self device time).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) * 1e3 / steps
    averages = prof.key_averages()
    by_name = {event.key: event for event in averages}
    phases = []
    for name in STEP_PHASES:
        event = by_name.get(name)
        if event is None and name == "step/augment":  # only with INPUT.DEVICE_AUGMENTATION
            continue
        ms = event.cpu_time_total / 1e3 / steps if event is not None else 0.0
        phases.append({"phase": name.split("/", 1)[1], "ms": ms, "share": ms / step_ms})
    rest = step_ms - sum(p["ms"] for p in phases)
    phases.append({"phase": "rest of the step", "ms": rest, "share": rest / step_ms})

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0))

    ops = [e for e in averages if not e.key.startswith("step/") and not e.key.startswith("ProfilerStep")]
    ops.sort(key=(device_us if device == "cuda" else (lambda e: e.self_cpu_time_total)), reverse=True)
    rows = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / 1e3 / steps / step_ms, "calls": e.count / steps,
             "self_device_ms": device_us(e) / 1e3 / steps if device == "cuda" else None}
            for e in ops[:top]]
    return {"step_ms": step_ms, "phases": phases, "ops": rows}


def markdown_tables(result: dict) -> str:
    """:func:`profile_steps`'s result as two markdown tables (phases, then operators)."""
    lines = [f"Step under the profiler: {result['step_ms']:.1f} ms.", "",
             "| phase | ms/step | share of the step |", "|---|---:|---:|"]
    lines += [f"| {p['phase']} | {p['ms']:.1f} | {100 * p['share']:.1f}% |" for p in result["phases"]]
    device = any(r["self_device_ms"] is not None for r in result["ops"])
    lines += ["", "| operator (by self time) | self ms/step | share of the step | calls/step"
              + (" | self GPU ms/step |" if device else " |"),
              "|---|---:|---:|---:|" + ("---:|" if device else "")]
    for r in result["ops"]:
        cells = [r["op"], f"{r['self_ms']:.2f}", f"{100 * r['share']:.1f}%", f"{r['calls']:g}"]
        if device:
            cells.append(f"{r['self_device_ms']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
