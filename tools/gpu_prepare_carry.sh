#!/usr/bin/env bash
# Build .gpu_carry/, what tools/gpu_check.sh needs on a GPU machine that has no internet:
#
#     bash tools/gpu_prepare_carry.sh [CARRY_DIR]      # default: REPO/.gpu_carry
#
#   wheels/          pure-Python wheels of the dependencies the machine's image lacks (fvcore, iopath,
#                    yacs, submitit, termcolor), at the versions installed in this environment: fetched
#                    with pip (built here from the sdist where PyPI has no wheel: fvcore, iopath)
#   fashion-mnist/   the four Fashion-MNIST idx .gz files, copied from FASHION_MNIST_DIR (default
#                    Debian's /usr/share/datasets/fashion-mnist, package dataset-fashion-mnist)
#   MANIFEST.txt     sizes and sha256 of every file
#
# The default folder is in .gitignore (another CARRY folder gets a line in .git/info/exclude, added here), so it travels only when the
# device tool's `carry` names it: run(command='bash tools/gpu_check.sh "$OUT"', carry=[".gpu_carry"]).
# What travels (tracked and untracked files plus carried paths) must stay under 64 MiB: checked at the end.
# Environment: PYTHON (default: the repo's .venv/bin/python if there is one, else python3), FASHION_MNIST_DIR.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${1:-$REPO/.gpu_carry}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
FM_SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
PACKAGES=(fvcore iopath yacs submitit termcolor)
LIMIT=$((64 * 1024 * 1024))

rm -rf "$CARRY/wheels" "$CARRY/fashion-mnist"
mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"

for name in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" "$name==$version" 2>/dev/null; then
        "$PYTHON" -m pip wheel -q --no-deps -w "$CARRY/wheels" "$name==$version"
    fi
done
# Only pure-Python wheels run under the machine's own Python (3.12 there).
impure=$(cd "$CARRY/wheels" && ls ./*.whl | grep -v -E -- '-(py3|py2\.py3)-none-any\.whl$' || true)
if [ -n "$impure" ]; then
    echo "not pure-Python, will not install on the GPU machine's Python: $impure" >&2
    exit 1
fi

for split in train t10k; do
    for kind in images-idx3 labels-idx1; do
        cp -L "$FM_SRC/$split-$kind-ubyte.gz" "$CARRY/fashion-mnist/"
    done
done

(cd "$CARRY" && find . -type f ! -name MANIFEST.txt -print0 | sort -z | xargs -0 sha256sum |
    while read -r sum path; do printf '%10d  %s  %s\n' "$(stat -c %s "$path")" "$sum" "$path"; done) >"$CARRY/MANIFEST.txt"

# git must ignore the folder, or it would travel (and count) in every call, carried or not.
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
    case $exclude in /*) ;; *) exclude=$REPO/$exclude ;; esac
    mkdir -p "$(dirname "$exclude")"
    relative=${CARRY#"$REPO"/}
    grep -qxF "/$relative/" "$exclude" 2>/dev/null || echo "/$relative/" >>"$exclude"
    tree=$(cd "$REPO" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | sort -zu |
        xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
else
    tree=0
fi
carry=$(du -sb "$CARRY" | cut -f1)
cat "$CARRY/MANIFEST.txt"
echo "carry folder: $((carry / 1024)) KiB; working tree (tracked + untracked, not ignored): $((tree / 1024)) KiB;" \
     "together $(((carry + tree) / 1024)) KiB of the device tool's 65536 KiB"
if [ $((carry + tree)) -ge "$LIMIT" ]; then
    echo "too large for the device tool (64 MiB): carry less" >&2
    exit 1
fi
