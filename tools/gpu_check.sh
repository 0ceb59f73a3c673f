#!/usr/bin/env bash
# The GPU check of dino_research in one call: CUDA tests, training-step and data-loader throughput, and
# a short learning run, each part's exit code, log and tables written to OUTDIR.
#
#     bash tools/gpu_check.sh OUTDIR               # on a GPU machine: under 8 minutes on an H200
#     bash tools/gpu_check.sh --dry-run OUTDIR     # (or DRY_RUN=1) every part on the CPU at tiny sizes
#
# Parts, in this order (a failing part is recorded with its exit code and the next one runs; PARTS="a b"
# runs only those):
#   env           python, torch, CUDA, GPU; installs the carried wheels when a dependency does not import
#   cuda          python -m pytest tests/cuda -m cuda (fp16 + GradScaler overflow, bf16, SyncBatchNorm,
#                 pinned memory, bitwise resume on the GPU, checkpoints across devices)
#   train         tools/bench_training.py --device cuda: DINOTrainer.run_step of ViT-S/16 with the paper's head
#                 (65536) and crops (2x224 + 8x96), fp32 / bf16 / fp16, at batch 64 and at the largest
#                 batch that fits; peak memory, MFU against the matmul peaks measured next to every step
#   loader        tools/benchmark.py --only loader: PretrainLoader images/s with LOADER_WORKERS workers
#   augmentation  tools/benchmark.py --only augmentation: multi-crop images/s of one worker
#   learn         configs/fashion_mnist_vit_cpu.yaml on the GPU for LEARN_EPOCHS epochs (k-NN every
#                 LEARN_EVAL_PERIOD epochs, at initialization and of raw pixels): k-NN table, curves.png
#   knn_random    tools/eval_knn.py --random-init (same config and data)
#   knn_pixels    tools/eval_knn.py --pixels
#   core          core suites on the GPU (the trainer end to end, models, k-NN, checkpoints, SIGKILL and
#                 resume) in the time left
# Every part has a time cap, and none runs past TIME_BUDGET_S from the start: a part that reaches its
# limit gets SIGTERM (the trainer then checkpoints and stops; curves and k-NN so far stay), SIGKILL 20 s
# later.
#
# OUTDIR receives at most 4 files, as the device tool brings back (8 files at most, 2 folders deep):
# summary.md (every table, each part's exit code and time), curves.png and attention.png (of the
# learning run) and logs.tar.gz (every log, metrics.json, knn.json, configs, JUnit XML). Checkpoints and
# other work files go to WORK_DIR (default: a new folder under /tmp).
#
# What the GPU machine lacks (no internet there) is carried in .gpu_carry/, which
# tools/gpu_prepare_carry.sh builds here (~31 MiB; git ignores it through .gitignore):
#   .gpu_carry/wheels/          pure-Python wheels of fvcore, iopath, yacs, submitit, termcolor (the
#                               image has torch, timm, tensorboard, matplotlib and the rest)
#   .gpu_carry/fashion-mnist/   the four Fashion-MNIST idx .gz files (FASHION_MNIST_DIR overrides)
# The device tool's call:
#   run(command='bash tools/gpu_check.sh "$OUT"', carry=[".gpu_carry"], timeout_s=600)
#
# Environment: PYTHON (default: the repo's .venv/bin/python if there is one, else python3), WORK_DIR,
# FASHION_MNIST_DIR, LEARN_EPOCHS (5), LEARN_EVAL_PERIOD (1), LOADER_WORKERS ("2 8 16"), NUM_WORKERS
# (data-loader workers of the learning run, 12), TIME_BUDGET_S (470), PARTS, DRY_RUN.
set -u

DRY_RUN=${DRY_RUN:-0}
positional=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        *) positional+=("$arg") ;;
    esac
done
if [ ${#positional[@]} -ne 1 ]; then
    echo "usage: $0 [--dry-run] OUTDIR" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "${positional[0]}" || exit 2
OUTDIR=$(cd "${positional[0]}" && pwd)
WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK_DIR"
LOGS=$WORK_DIR/logs
mkdir -p "$LOGS"
: >"$LOGS/parts.tsv"
CARRY=$REPO/.gpu_carry
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # the bitwise tests' cuBLAS workspaces
START=$(date +%s)
TIME_BUDGET_S=${TIME_BUDGET_S:-470}
PARTS=${PARTS:-env cuda train loader augmentation learn knn_random knn_pixels core}
LOADER_WORKERS=${LOADER_WORKERS:-2 8 16}
LEARN_EPOCHS=${LEARN_EPOCHS:-5}
LEARN_EVAL_PERIOD=${LEARN_EVAL_PERIOD:-1}
NUM_WORKERS=${NUM_WORKERS:-12}
DEVICE=cuda
[ "$DRY_RUN" = 1 ] && DEVICE=cpu

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
wanted() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$LOGS/parts.tsv"; }

# run_part NAME CAP_S COMMAND...: COMMAND's output to $LOGS/NAME.log, for at most CAP_S seconds and
# never past TIME_BUDGET_S; the exit code goes to parts.tsv (124: stopped at the limit). At the limit
# SIGTERM goes to the whole process group (pytest's helpers too), or with GRACEFUL=1 to COMMAND alone:
# the trainer then checkpoints and stops, and closes its data-loader workers itself (a worker killed by
# the group's SIGTERM would make the trainer fail instead).
run_part() {
    local name=$1 cap=$2 foreground=()
    shift 2
    [ "${GRACEFUL:-0}" = 1 ] && foreground=(--foreground)
    wanted "$name" || return 0
    local left=$(( TIME_BUDGET_S - ($(date +%s) - START) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        record "$name" skipped 0 "no time left of TIME_BUDGET_S=$TIME_BUDGET_S"
        say "$name: skipped, no time left"
        return 0
    fi
    say "$name (at most ${limit}s): $*"
    echo "\$ $*" >>"$LOGS/$name.log"
    local t0 rc note=""
    t0=$(date +%s)
    timeout "${foreground[@]}" --signal=TERM --kill-after=20 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
    rc=$?
    [ "$rc" = 124 ] && note="stopped at its ${limit}s limit"
    record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note"
    say "$name: exit code $rc after $(( $(date +%s) - t0 ))s${note:+ ($note)}"
    if [ "$rc" != 0 ]; then tail -n 15 "$LOGS/$name.log" | sed 's/^/    | /'; fi
}

# ------------------------------------------------------------------------------ env
env_part() {
    local t0 rc=0
    t0=$(date +%s)
    {
        echo "mode: $([ "$DRY_RUN" = 1 ] && echo 'dry run (CPU, tiny sizes)' || echo 'GPU')"
        echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')); python: $PYTHON"
        echo "cpus: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    } >>"$LOGS/env.log" 2>&1
    "$PYTHON" - >>"$LOGS/env.log" 2>&1 <<'PY' || rc=$?
import importlib.metadata as md
import platform

import torch

print(f"python {platform.python_version()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}; cuda available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs")
print("packages: " + ", ".join(f"{n} {md.version(n)}" for n in (
    "fvcore", "iopath", "yacs", "submitit", "timm", "torchvision", "tensorboard", "matplotlib", "numpy", "pytest")))
import dino_research.engine  # noqa: E402,F401  (every registry imports)
print("dino_research imports")
PY
    record env "$rc" "$(( $(date +%s) - t0 ))"
    say "env: exit code $rc"
    cat "$LOGS/env.log"
}

# ------------------------------------------------------------------------------ data of the learning run
fashion_mnist_dir() {
    local dir
    for dir in "${FASHION_MNIST_DIR:-}" "$CARRY/fashion-mnist" /usr/share/datasets/fashion-mnist; do
        if [ -n "$dir" ] && [ -f "$dir/train-images-idx3-ubyte.gz" ]; then echo "$dir"; return 0; fi
    done
    return 1
}

# A small Fashion-MNIST (first 256 training and 128 test images) for the dry run, in the same idx .gz
# layout, so the run reads it through the same FashionMNIST dataset and root keys.
tiny_fashion_mnist() {
    local src=$1 dst=$2
    "$PYTHON" - "$src" "$dst" <<'PY'
import gzip
import os
import sys

import numpy as np

from dino_research.data.fashion_mnist import IMAGES_MAGIC, LABELS_MAGIC, read_idx

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for split, n in (("train", 256), ("t10k", 128)):
    if src:
        images = read_idx(f"{src}/{split}-images-idx3-ubyte.gz", IMAGES_MAGIC)[:n]
        labels = read_idx(f"{src}/{split}-labels-idx1-ubyte.gz", LABELS_MAGIC)[:n]
    else:  # no source: random images, labels 0..9
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10
    for kind, array, magic in (("images-idx3", images, IMAGES_MAGIC), ("labels-idx1", labels, LABELS_MAGIC)):
        header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(f"{dst}/{split}-{kind}-ubyte.gz", "wb") as f:
            f.write(header + np.ascontiguousarray(array).tobytes())
print(f"tiny Fashion-MNIST in {dst} (from {src or 'random pixels'})")
PY
}

# ------------------------------------------------------------------------------ summary
summarize() {
    "$PYTHON" - "$WORK_DIR" "$OUTDIR" "$DRY_RUN" <<'PY'
import glob
import json
import os
import statistics
import sys

work, outdir, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
logs = os.path.join(work, "logs")


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def section(text, start, stop=None):
    """Lines of ``text`` from the first line starting with ``start`` (to one starting with ``stop``)."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith(start):
            for rest in lines[i:]:
                if stop and rest.startswith(stop) and out:
                    break
                out.append(rest)
            break
    return "\n".join(out)


def pytest_tail(text):
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "short test summary info" in line:
            return "\n".join(lines[i:])
    return "\n".join(lines[-12:])


def knn_rows(metrics_path):
    """{(prefix, iteration): {k: top1}} of the k-NN scalars in metrics.json."""
    rows, other = {}, {}
    for line in read(metrics_path).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for key, value in row.items():
            if "/top1_k" in key:
                prefix, k = key.split("/top1_k")
                it = 0 if prefix == "knn_init" else row.get("iteration", 0)
                rows.setdefault((prefix, it), {})[int(k)] = value
        for key in ("loss", "images/s", "teacher_entropy", "kl_teacher_student"):
            if key in row:
                other.setdefault(key, []).append(row[key])
    return rows, other


out = [f"# dino_research GPU check{' (DRY RUN: CPU, tiny sizes; no number here is a measurement)' if dry else ''}", ""]
out += ["## Parts", "", "| part | exit code | seconds | note |", "|---|---:|---:|---|"]
for line in read(os.path.join(logs, "parts.tsv")).splitlines():
    name, rc, seconds, note = (line.split("\t") + [""] * 4)[:4]
    out.append(f"| {name} | {rc} | {seconds} | {note} |")
out += ["", "## Environment", "", "```", read(os.path.join(logs, "env.log")).strip(), "```", ""]


def pytest_section(name, title):
    text = read(os.path.join(logs, f"{name}.log"))
    return [f"## {title}", "", "```", pytest_tail(text).strip(), "```", ""] if text else []


out += pytest_section("cuda", "CUDA tests (`pytest tests/cuda -m cuda`)")
train = read(os.path.join(logs, "train.log"))
if train:
    out += ["## Training step (tools/bench_training.py)", "", section(train, "DINO training step on") or
            "(no table: see train.log)\n```\n" + "\n".join(train.splitlines()[-20:]) + "\n```", ""]
    search = [line for line in train.splitlines() if line.startswith(("largest batch", "  "))]
    if search:
        out += ["Batch search:", "", "```", *search, "```", ""]
for name in ("loader", "augmentation"):
    text = read(os.path.join(logs, f"{name}.log"))
    if text:
        out += [section(text, "## ") or f"## {name}\n\n```\n" + "\n".join(text.splitlines()[-15:]) + "\n```", ""]

learn = os.path.join(work, "learn")
if os.path.isdir(learn):
    rows, other = knn_rows(os.path.join(learn, "metrics.json"))
    log = read(os.path.join(learn, "log.txt"))
    out += ["## Learning run (configs/fashion_mnist_vit_cpu.yaml on the device)", ""]
    run_line = next((line for line in log.splitlines() if "DINO run:" in line), "")
    if run_line:
        out += [run_line.split("]: ", 1)[-1], ""]
    if rows:
        columns = sorted(rows, key=lambda c: ({"knn_init": 0, "knn": 1, "knn_pixels": 2}.get(c[0], 3), c[1]))
        names = {"knn_init": "at initialization", "knn_pixels": "raw pixels"}
        ks = sorted({k for c in columns for k in rows[c]})
        out.append("| k | " + " | ".join(names.get(p, f"teacher after {it + 1} it.") for p, it in columns) + " |")
        out.append("|---:|" + "---:|" * len(columns))
        for k in ks:
            out.append(f"| {k} | " + " | ".join(f"{rows[c].get(k, float('nan')):.2f}" for c in columns) + " |")
        out.append("")
        out.append("k-NN top-1 (%) of the teacher, weighted k-NN over the training split, test split as queries.")
        out.append("")
    if other:
        parts = [f"last loss {other['loss'][-1]:.4f}" if "loss" in other else "",
                 f"images/s median {statistics.median(other['images/s']):.0f}" if "images/s" in other else "",
                 f"last teacher entropy {other['teacher_entropy'][-1]:.3f}" if "teacher_entropy" in other else ""]
        out += ["Training: " + "; ".join(p for p in parts if p), ""]
    tail = [line for line in log.splitlines() if "training complete" in line or "stopped by" in line]
    out += [t.split("]: ", 1)[-1] for t in tail[-1:]] + [""]
for name, what in (("knn_random", "--random-init"), ("knn_pixels", "--pixels")):
    data = read(os.path.join(work, name, "knn.json"))
    if data:
        res = json.loads(data)["results"]
        out += [f"## tools/eval_knn.py {what}", "", "| k | top-1 | top-5 |", "|---:|---:|---:|"]
        out += [f"| {k} | {v['top1']:.2f} | {v['top5']:.2f} |" for k, v in res.items()] + [""]
random_init, trained = read(os.path.join(work, "knn_random", "knn.json")), rows if os.path.isdir(learn) else {}
if random_init and ("knn_init", 0) in trained:  # two paths to the same network must agree
    tool = {int(k): v["top1"] for k, v in json.loads(random_init)["results"].items()}
    same = all(abs(tool[k] - v) < 1e-6 for k, v in trained[("knn_init", 0)].items() if k in tool)
    out += [f"eval_knn.py --random-init {'equals' if same else 'DIFFERS FROM'} the training run's k-NN at "
            "initialization (same seed, same network).", ""]
out += pytest_section("core", "Core suites on the device")
figures = [os.path.basename(p) for p in glob.glob(os.path.join(outdir, "*.png"))]
out += ["Files: summary.md, logs.tar.gz" + (", " + ", ".join(sorted(figures)) if figures else ""), ""]
with open(os.path.join(outdir, "summary.md"), "w") as f:
    f.write("\n".join(out))
PY
}

finish() {
    local learn=$WORK_DIR/learn
    [ -f "$learn/curves.png" ] && cp "$learn/curves.png" "$OUTDIR/curves.png"
    local attention
    attention=$(ls -t "$learn"/attention/*.png 2>/dev/null | head -n 1)
    [ -n "$attention" ] && cp "$attention" "$OUTDIR/attention.png"
    summarize || echo "summary failed" >&2
    (cd "$WORK_DIR" && tar -czf "$OUTDIR/logs.tar.gz" --exclude='*.pth' --exclude='*.pth.tmp.*' --exclude=site \
        --exclude='tensorboard' --exclude='fashion-mnist-tiny' --exclude='*.whl' logs learn knn_random knn_pixels \
        2>/dev/null)
    say "done: $(ls "$OUTDIR" | tr '\n' ' ')(work files in $WORK_DIR)"
    cat "$OUTDIR/summary.md" 2>/dev/null
}
trap finish EXIT

# ------------------------------------------------------------------------------ the parts
say "mode $([ "$DRY_RUN" = 1 ] && echo 'DRY RUN (CPU)' || echo GPU); output $OUTDIR; work $WORK_DIR; budget ${TIME_BUDGET_S}s"
# The dependencies the machine's image lacks, from the carried wheels (only when one does not import).
if ! "$PYTHON" -c "import fvcore, iopath, yacs, submitit, termcolor" 2>/dev/null; then
    say "installing the carried wheels: $(cd "$CARRY/wheels" 2>/dev/null && ls ./*.whl | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK_DIR/site" \
        "$CARRY"/wheels/*.whl >>"$LOGS/env.log" 2>&1 || say "pip install of the carried wheels failed (env.log)"
    export PYTHONPATH="$PYTHONPATH:$WORK_DIR/site"
fi
wanted env && env_part

PYTEST=("$PYTHON" -m pytest -q -rfEs -p no:cacheprovider)
run_part cuda 150 "${PYTEST[@]}" tests/cuda -m cuda --junitxml="$LOGS/cuda_junit.xml"

if [ "$DRY_RUN" = 1 ]; then
    run_part train 120 "$PYTHON" tools/bench_training.py --quick --device cpu --precisions fp32 bf16
    run_part loader 60 "$PYTHON" tools/benchmark.py --only loader --quick
    run_part augmentation 60 "$PYTHON" tools/benchmark.py --only augmentation --quick
else
    run_part train 170 "$PYTHON" tools/bench_training.py --device cuda --precisions fp32 bf16 fp16 --batch-size 64 \
        --max-batch --warmup 2 --iters 6
    # shellcheck disable=SC2086  # a list of worker counts
    run_part loader 45 "$PYTHON" tools/benchmark.py --only loader --loader-workers $LOADER_WORKERS --loader-batches 16
    run_part augmentation 25 "$PYTHON" tools/benchmark.py --only augmentation --iterations 20 --repeats 3
fi

if wanted learn || wanted knn_random || wanted knn_pixels; then
    if FM=$(fashion_mnist_dir); then
        LEARN=(SOLVER.EPOCHS "$LEARN_EPOCHS" TEST.EVAL_PERIOD "$LEARN_EVAL_PERIOD" DATALOADER.NUM_WORKERS "$NUM_WORKERS"
               LOG_PERIOD 50)
        EVAL=(DATALOADER.NUM_WORKERS "$NUM_WORKERS")
        if [ "$DRY_RUN" = 1 ]; then
            tiny_fashion_mnist "$FM" "$WORK_DIR/fashion-mnist-tiny" >>"$LOGS/learn.log" 2>&1
            FM=$WORK_DIR/fashion-mnist-tiny
            LEARN=(SOLVER.EPOCHS 1 TEST.EVAL_PERIOD 1 SOLVER.BATCH_SIZE_PER_GPU 32 DATALOADER.NUM_WORKERS 1 LOG_PERIOD 2)
            EVAL=(DATALOADER.NUM_WORKERS 1)
        fi
        ROOTS=(MODEL.DEVICE "$DEVICE" DATASETS.TRAIN_ROOT "$FM" TEST.TRAIN_ROOT "$FM" TEST.VAL_ROOT "$FM")
        CONFIG=configs/fashion_mnist_vit_cpu.yaml
        GRACEFUL=1 run_part learn 200 "$PYTHON" tools/train_net.py --config "$CONFIG" "${ROOTS[@]}" "${LEARN[@]}" \
            OUTPUT_DIR "$WORK_DIR/learn"
        run_part knn_random 45 "$PYTHON" tools/eval_knn.py --config "$CONFIG" --random-init "${ROOTS[@]}" "${EVAL[@]}" \
            OUTPUT_DIR "$WORK_DIR/knn_random"
        run_part knn_pixels 45 "$PYTHON" tools/eval_knn.py --config "$CONFIG" --pixels "${ROOTS[@]}" "${EVAL[@]}" \
            OUTPUT_DIR "$WORK_DIR/knn_pixels"
    else
        for part in learn knn_random knn_pixels; do
            wanted $part && record $part missing-data 0 "no Fashion-MNIST: set FASHION_MNIST_DIR or carry .gpu_carry"
        done
        say "learn: no Fashion-MNIST idx files (FASHION_MNIST_DIR, $CARRY/fashion-mnist, /usr/share/datasets/fashion-mnist)"
    fi
fi

if [ "$DRY_RUN" = 1 ]; then
    run_part core 60 "${PYTEST[@]}" tests/solver/test_schedules.py --junitxml="$LOGS/core_junit.xml"
else
    run_part core 300 "${PYTEST[@]}" tests/engine/test_training.py tests/modeling tests/evaluation/test_knn.py \
        tests/checkpoint tests/reliability/test_kill_resume.py --junitxml="$LOGS/core_junit.xml"
fi
exit 0
