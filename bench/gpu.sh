#!/usr/bin/env bash
# GPT-2 124M (from config, no download) on one H100/H200, bf16, torch.compile off and on:
# raw PyTorch loop vs ember vs transformers Trainer; tokens/s and MFU. About 5 minutes.
# Results: bench/results/gpu.md and gpu.json. Extra flags go to `python -m bench.gpu`
# (e.g. --peak-flops 989e12, --compile off, --steps 40).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' || {
    echo "bench/gpu.sh: no CUDA device here; nothing to run (use: python -m bench.compare on CPU)" >&2
    exit 0
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
exec "$PY" -m bench.gpu "$@"
