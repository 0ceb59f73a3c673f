"""The step profile: run_step's phase labels are found, the phases add up to the step, and the
operator table lists the matrix products a ViT step is made of."""

import tempfile

from tool_utils import load_tool

from dino_research.utils.events import EventStorage
from dino_research.utils.logger import setup_logger
from dino_research.utils.profiling import STEP_PHASES, markdown_tables, profile_steps


def test_profile_of_a_real_step_has_every_phase_and_the_matmuls():
    # The trainer logs as it is built: point the library's logger at stdout only, not at the log.txt
    # of an earlier test's deleted output folder.
    setup_logger(None)
    bench = load_tool("bench_training")
    with tempfile.TemporaryDirectory() as out:
        trainer = bench.build_trainer("fp32", 2, out, bench.QUICK_OPTS)
        bench.use_batch(trainer, 2)
        with EventStorage(0) as trainer.storage:
            trainer.iter = trainer.storage.iter = trainer.cfg.SOLVER.FREEZE_LAST_LAYER_EPOCHS * trainer.iters_per_epoch
            trainer.run_step()  # warm-up
            result = profile_steps(trainer.run_step, steps=2)
    phases = {p["phase"]: p for p in result["phases"]}
    # No device stage of the augmentation in this run: its label is left out, not shown as 0 ms.
    assert list(phases) == [name.split("/")[1] for name in STEP_PHASES if name != "step/augment"] + ["rest of the step"]
    for name in ("forward", "backward", "clip", "optimizer", "after_step"):
        assert phases[name]["ms"] > 0, name  # every label of run_step was seen
    assert abs(sum(p["ms"] for p in result["phases"]) - result["step_ms"]) < 1e-6
    assert phases["rest of the step"]["ms"] > -0.05 * result["step_ms"]  # labels do not overlap
    ops = {r["op"]: r for r in result["ops"]}
    assert {"aten::mm", "aten::addmm"} & set(ops), list(ops)
    assert all(r["self_ms"] >= 0 and r["calls"] > 0 for r in result["ops"])
    assert sorted((r["self_ms"] for r in result["ops"]), reverse=True) == [r["self_ms"] for r in result["ops"]]
    text = markdown_tables(result)
    assert "| forward |" in text and "| operator (by self time) |" in text
