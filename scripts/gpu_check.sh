#!/usr/bin/env bash
# End-to-end device check (docs/usage.md): every method for 3 rounds in float32 and bfloat16 on a tiny
# random Llama and ViT built in-process (fully offline), one run killed with SIGKILL and resumed,
# and the exported adapter re-evaluated with PEFT; concurrent clients (docs/concurrency.md): the
# uploads of 8 clients trained at once equal those trained alone, and the speed-up at K = 8 on a
# 6×384 and a ~100M-parameter 12×768 BERT (CUDA only). One PASS/FAIL line per check, the total
# time last; the exit code is 1 if any check failed.
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--models llama,vit] [--methods M,...]
#                        [--dtypes float32,bfloat16] [--no-resume] [--no-concurrent] [--keep DIR]
#
# --device cuda is the default; --device cpu rehearses the same checks without a GPU.
# Details of each check: python -m raflora.experiments.gpu_check --help, and src/raflora/experiments/gpu_check.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# $PYTHON if set, else the checkout's environment (make install) when there is one.
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Deterministic cuBLAS for every run (the resume check compares runs bit for bit).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
exec "$PYTHON" -m raflora.experiments.gpu_check "$@"
