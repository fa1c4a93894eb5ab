#!/usr/bin/env bash
# GPU check of ember's distributed strategies: DDP over NCCL, FSDP2 (bf16, CPU offload), DeepSpeed
# ZeRO-2/3 in bf16 (when `deepspeed` is installed), each trained, compared with a reference and
# resumed from an asynchronous checkpoint. One process per GPU (NCCL needs a device per rank); on a
# one-GPU machine that is world size 1, which still runs every code path but the reductions.
# About 2 minutes. Prints one line per check and PASS/FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' || {
    echo "bench/gpu_distributed.sh: no CUDA device here; the CPU multi-process tests are tests/strategy" >&2
    exit 0
}
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS="ignore::FutureWarning"
exec timeout 900 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
    -m tests.gpu.check_distributed "$@"
