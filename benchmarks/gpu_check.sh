#!/usr/bin/env bash
# The GPU check: one run on a CUDA machine, about 3-5 minutes, never more than BUDGET seconds
# (default 480) plus a few seconds. From the repository root, with torchdyn, torchdeq and mlxtend
# importable:
#
#   bash benchmarks/gpu_check.sh
#   PYTHON=/path/to/python OUT=/some/dir BUDGET=600 bash benchmarks/gpu_check.sh
#
# Steps, each with its time limit, cut to what is left of BUDGET (a failed or timed-out step
# does not stop the others; a step with less than 20 s left is skipped):
#   cuda_tests   40 s   the CUDA tests of tests/test_precision_devices.py (when pytest is installed)
#   mnist       120 s   MNIST training step, all methods side by side: python -m benchmarks.mnist_step --device cuda,
#                       30 warm-up and 30 measured steps -> benchmarks/results/mnist_gpu/mnist_step.{md,json}
#   sync_count   60 s   host-device synchronisations per forward / backward solve and per solver step:
#                       python -m benchmarks.sync_count -> benchmarks/results/sync_count_gpu.{md,json}
#   cifar_small  90 s   CIFAR-10 step benchmark (paper section 4.2, Tables 2 and 3), the five forms side by
#   cifar_large 180 s   side, batch 128 (python -m benchmarks.cifar_step) -> benchmarks/results/cifar_{small,large}_gpu.{md,json}
#
# With OUT set, the eight result files are copied into $OUT, flat, as each step ends:
# mnist_gpu.{md,json}, sync_count_gpu.{md,json}, cifar_small_gpu.{md,json}, cifar_large_gpu.{md,json}.
# The result tables are printed as each step ends; a failed step prints the end of its output.
# Exit status: 0 all steps passed, 1 some failed, 2 CUDA is not available.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-}"
BUDGET="${BUDGET:-480}"
RESULTS=benchmarks/results
LOGS="$(mktemp -d)"
STAMP="$LOGS/.stamp"

echo "== machine"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| available:", torch.cuda.is_available(),
"|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
"$PYTHON" -c 'import importlib, sys
failed = []
for name in ("torchdyn", "torchdeq", "mlxtend.data", "pytorch_lightning", "torchdyn_deq"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", None) or module.__file__, end=" | ")
    except Exception as error:
        failed.append(name)
        print(f"\n{name}: does not import: {error!r}")
print()
sys.exit(1 if failed else 0)' || echo "WARNING: a package the steps need does not import (above): the steps that need it will fail"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: CUDA is not available to $PYTHON (torch.cuda.is_available() is False); this check needs a GPU" >&2
    exit 2
fi

failed=()

# step NAME SECONDS COMMAND...: run COMMAND with a time limit (at most what is left of BUDGET),
# its output into $LOGS/NAME.log
step() {
    local name=$1 limit=$2 start=$SECONDS left=$((BUDGET - SECONDS)) rc
    shift 2
    echo
    touch -d "1 second ago" "$STAMP"  # what the step writes is newer
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED, only $left s left of the ${BUDGET} s budget"
        failed+=("$name")
        return 1
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (limit ${limit} s): $*"
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "   ok, $((SECONDS - start)) s"
        return 0
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "   FAILED $name: timed out after $((SECONDS - start)) s; the end of its output:"
    else
        echo "   FAILED $name: exit status $rc after $((SECONDS - start)) s; the end of its output:"
    fi
    tail -n 30 "$LOGS/$name.log" | sed 's/^/   | /'
    failed+=("$name")
    return 1
}

# show_and_save FILE NAME: print FILE's tables and header lines, copy it to $OUT/NAME; only a
# FILE written by the step just run (newer than its start) counts
show_and_save() {
    local file=$1 name=$2
    if [ ! -f "$file" ] || [ ! "$file" -nt "$STAMP" ]; then
        echo "   (no new $file)"
        return 0
    fi
    case "$file" in
        *.md) grep -E '^\||^# |^Device|, device ' "$file" ;;
    esac
    if [ -n "$OUT" ]; then
        mkdir -p "$OUT" && cp "$file" "$OUT/$name" && echo "   -> \$OUT/$name"
    fi
}

if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    step cuda_tests 40 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_precision_devices.py -k cuda \
        && tail -n 1 "$LOGS/cuda_tests.log"
else
    echo; echo "== cuda_tests: skipped (pytest is not installed)"
fi

step mnist 120 "$PYTHON" -m benchmarks.mnist_step --device cuda --warmup 30 --steps 30 \
    --out-dir "$RESULTS/mnist_gpu"
show_and_save "$RESULTS/mnist_gpu/mnist_step.md" mnist_gpu.md
show_and_save "$RESULTS/mnist_gpu/mnist_step.json" mnist_gpu.json

step sync_count 60 "$PYTHON" -m benchmarks.sync_count --device cuda --out "$RESULTS/sync_count_gpu"
show_and_save "$RESULTS/sync_count_gpu.md" sync_count_gpu.md
show_and_save "$RESULTS/sync_count_gpu.json" sync_count_gpu.json

for size in small large; do
    if [ "$size" = small ]; then limit=90; else limit=180; fi
    step "cifar_$size" "$limit" "$PYTHON" -m benchmarks.cifar_step --device cuda --model "$size" \
        --batch-size 128 --warmup "${WARMUP:-3}" --repeats "${REPEATS:-5}" --out "$RESULTS/cifar_${size}_gpu"
    show_and_save "$RESULTS/cifar_${size}_gpu.md" "cifar_${size}_gpu.md"
    show_and_save "$RESULTS/cifar_${size}_gpu.json" "cifar_${size}_gpu.json"
done

echo
echo "== done in $SECONDS s; logs in $LOGS"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
