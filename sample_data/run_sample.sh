#!/usr/bin/env bash
# The main job on the bundled sample: cache the reference once, train from the cache, evaluate.
# Rerunning is cheap: finished caches are reused and a finished run is resumed as a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/sample}"
MODEL=sample_data/tiny-llama
export HF_HUB_OFFLINE=1

dpo precompute-ref sample_data/train.jsonl --model "$MODEL" --out "$OUT/train-cache"
dpo precompute-ref sample_data/heldout.jsonl --model "$MODEL" --out "$OUT/heldout-cache"
# Same hyper-parameters as the test suite's sample run (tests/conftest.py SAMPLE_TRAIN_ARGS).
dpo train "$OUT/train-cache" --model "$MODEL" --out "$OUT/run" \
    --lr 5e-4 --epochs 1 --batch-size 16 --warmup-steps 5 \
    --eval-cache "$OUT/heldout-cache" --eval-every 25 --save-every 25 --resume
# Reference vs the trained policy, side by side, plus three held-out generations of each.
dpo eval "$OUT/heldout-cache" --model "$MODEL" --model "$OUT/run" \
    --per-example "$OUT/heldout-per-example.parquet" --samples 3 --ref-model "$MODEL"
