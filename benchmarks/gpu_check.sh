#!/usr/bin/env bash
# CIFAR-10 step benchmark on CUDA (paper section 4.2, Tables 2 and 3): the five forms (Multiscale
# Neural ODE, continuous Vanilla / Skip / Skip Reg. DEQ, discrete DEQ) side by side, batch 128,
# for MDEQ-small and MDEQ-large. Writes benchmarks/results/cifar_{small,large}_gpu.{md,json}.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Fails with exit status 2 and a message when CUDA is not available.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: CUDA is not available to $PYTHON (torch.cuda.is_available() is False); this check needs a GPU" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
for size in small large; do
    echo "== MDEQ-$size, batch 128 =="
    "$PYTHON" examples/cifar_multiscale.py --benchmark --device cuda --model "$size" --batch-size 128 \
        --warmup "${WARMUP:-3}" --repeats "${REPEATS:-5}" --out "benchmarks/results/cifar_${size}_gpu"
done
