"""The benchmark scripts still run and print their tables (``--quick``: tiny sizes, nothing measured).

Speed targets are not asserted here (they live in the scripts' output and the README); this only
keeps the scripts from rotting: every section runs on the current code, and the numbers it prints
are well-formed (positive rates, FLOPs counted, identical k-NN accuracies from both methods).
"""

import re
import subprocess
import sys
from pathlib import Path

from tool_utils import load_tool

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _table_rows(text, first_cell):
    """Cells of the Markdown rows whose first cell starts with ``first_cell``."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_benchmark_sections_run_and_print_their_tables(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--quick"])
    load_tool("benchmark").main(["--quick"])
    out = capsys.readouterr().out
    assert "## Multi-crop augmentation" in out and "## Training step" in out
    plain, ours = _table_rows(out, "plain torchvision"), _table_rows(out, "`DINOMultiCrop")
    assert len(plain) == len(ours) == 1 and float(ours[0][1]) > 0 and plain[0][3] == "1.00x"
    training = {row[0]: row for row in _table_rows(out, "fp32") + _table_rows(out, "bf16")}
    assert set(training) == {"fp32", "bf16"}
    for precision, row in training.items():
        images_per_s, gflops_per_image, mfu = float(row[1]), float(row[3]), float(row[6].rstrip("%"))
        assert images_per_s > 0 and gflops_per_image > 0 and mfu > 0, (precision, row)
    assert training["fp32"][3] == training["bf16"][3]  # the same FLOPs, whatever the precision
    decode = _table_rows(out, "64x48")
    assert len(decode) == 1 and all(float(cell) > 0 for cell in decode[0][2:7]), decode
    assert "## From JPEG to crops" in out
    worker, split = _table_rows(out, "in the worker (default)"), _table_rows(out, "split: the worker's part")
    assert len(worker) == len(split) == 1 and worker[0][4] == "1.00x" and float(split[0][1]) > 0
    # uint8 crops and their draws instead of float32 crops: about a quarter of the bytes.
    assert 0.2 < float(split[0][3]) / float(worker[0][3]) < 0.3
    loader = _table_rows(out, "in the workers") + _table_rows(out, "split: the workers' part")
    assert [row[1] for row in loader] == ["0", "1", "0", "1"] and all(float(row[2]) > 0 for row in loader)


def test_admissible_draft_factor_keeps_every_global_crop_at_least_224_pixels():
    factor = load_tool("benchmark").admissible_draft_factor
    # Short side of the smallest box: sqrt(0.4 * W * H * 3/4); 500x375 -> 237 px (no reduction),
    # 2000x1500 -> 949 px (949 / 4 = 237 >= 224, 949 / 8 < 224), 4000x3000 -> 1897 (1/8 is the cap).
    assert (factor(500, 375), factor(2000, 1500), factor(4000, 3000)) == (1, 4, 8)


def test_knn_benchmark_runs_and_both_methods_agree():
    proc = subprocess.run([sys.executable, str(TOOLS / "benchmark_knn.py"), "--quick", "--num-train", "2000",
                           "--num-test", "300", "--classes", "20"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Both methods give identical accuracies." in proc.stdout
    per_k = [line for line in proc.stdout.splitlines() if re.match(r"\| (10|20|100|200) \|", line)]
    assert len(per_k) == 4, proc.stdout  # one row per k
