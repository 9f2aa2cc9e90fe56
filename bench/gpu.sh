#!/usr/bin/env bash
# dpocli vs TRL 1.16 on one GPU, in one command (bench/gpu_bench.py documents rows and figures).
#
#   bash bench/gpu.sh              # one CUDA GPU, bf16, Qwen2.5-0.5B shapes: < 8 minutes on an H200
#   bash bench/gpu.sh --smoke      # the same script on CPU with a tiny model (SMOKE=1 works too)
#   bash bench/gpu.sh --flex       # adds the DPOCLI_ATTN_KERNEL=flex row (unverified kernel)
#   (the GPU run ends with the vision-language memory rows of bench/vlm_memory.py; they need
#   torchvision-free PIL image processors only, so any torch build works)
#
# Any other arguments go to gpu_bench.py (--rows, --out-dir, --trl-python).
# Offline machine: trl and its dependencies come from bench/wheelhouse/ when that folder exists
# (bench/make_wheelhouse.sh fills it where the package index is reachable); not in --smoke.
# dpocli itself runs from this checkout (PYTHONPATH), on the torch / transformers installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"

profile=gpu
args=()
for arg in "$@"; do
    case "$arg" in
        --smoke) profile=smoke ;;
        *) args+=("$arg") ;;
    esac
done
if [[ "${SMOKE:-0}" == "1" ]]; then profile=smoke; fi

if [[ "$profile" == gpu ]]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
'no CUDA device: run bench/gpu.sh --smoke for the CPU smoke run')"
fi

# Only for the real run: the wheelhouse targets the GPU image (CPython 3.12), and a smoke run on a
# development machine takes TRL from the benchmark venv instead (gpu_bench.py --trl-python).
if [[ "$profile" == gpu && -d bench/wheelhouse ]] \
    && ! "$PYTHON" -c "import trl, accelerate, datasets, typer, rich" 2>/dev/null; then
    echo "[gpu.sh] installing bench/wheelhouse/requirements.txt from bench/wheelhouse" >&2
    "$PYTHON" -m pip install --quiet --no-index --find-links bench/wheelhouse \
        -r bench/wheelhouse/requirements.txt
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

start=$(date +%s)
"$PYTHON" bench/gpu_bench.py --profile "$profile" ${args[@]+"${args[@]}"}
# Vision-language rows (issue 27): training peak memory of dpocli from its VLM cache vs TRL 1.16's
# VLM DPO (reference live) at the same batch, SmolVLM-256M shapes (bench/vlm_memory.py).
if [[ "$profile" == gpu ]]; then
    "$PYTHON" bench/vlm_memory.py --shapes smolvlm-256m --device cuda --batch-size 8 --steps 5 \
        --trl-python "$PYTHON"
fi
echo "[gpu.sh] done in $(( $(date +%s) - start )) s" >&2
