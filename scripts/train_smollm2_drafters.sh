#!/usr/bin/env bash
# Reproduce the shipped SmolLM2-135M-Instruct DSpark drafter and its evaluation (docs/training.md).
#
#   bash scripts/train_smollm2_drafters.sh [RUN_DIR] [STEPS]
#
# One data build (the target answers the first 300 fitting prompts of each training file; cached
# and resumable in RUN_DIR/data: 861 sequences, 186,901 answer tokens, ~25 min on the 2-core VM),
# then a DSpark drafter over a 16k draft vocabulary (bf16 autocast on CPUs with bf16 instructions, 8 x 16 anchors per step, the
# last 40 sequences held out for the logged tau), STS fitted on held-out gsm8k-a prompts, eval and
# bench on ../shared/data/prompts/eval. Every step resumes where it stopped (`train` resumes from
# RUN_DIR/dspark/train_state.pt). DFLASH=1 and EAGLE3=1 train the baselines with the same data,
# steps and batches (EAGLE-3 has no draft vocabulary here: ~8x slower per step).
set -euo pipefail
RUN=${1:-runs/smollm2}
STEPS=${2:-4800}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
TRAIN=$SHARED/data/prompts/train
EVAL=$SHARED/data/prompts/eval
THREADS=${THREADS:-2}
# bf16 autocast only where the CPU has bf16 matrix instructions (emulated, it is far slower than fp32)
BF16=$(grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null && echo --bf16 || true)
# The file order fixes which prompts are used.
PROMPTS=("$TRAIN/gsm8k-a.jsonl" "$TRAIN/livecodebench.jsonl" "$TRAIN/arena-hard-v2-a.jsonl" "$TRAIN/lbpp.jsonl"
         "$TRAIN/swe-bench.jsonl")
COMMON=(--data-dir "$RUN/data" --prompts "${PROMPTS[@]}" --limit-per-file 300 --data-batch 32
        --steps "$STEPS" --save-every 250 --batch-sequences 8 --anchors 16 --lr 1e-3 $BF16 --holdout 40
        --threads "$THREADS")

dspark-native train --kind dspark --draft-vocab 16384 --out "$RUN/dspark" "${COMMON[@]}"
[ "${DFLASH:-0}" = 1 ] && dspark-native train --kind dflash --draft-vocab 16384 --out "$RUN/dflash" "${COMMON[@]}"
[ "${EAGLE3:-0}" = 1 ] && dspark-native train --kind eagle3 --out "$RUN/eagle3" "${COMMON[@]}"

# STS on held-out training prompts: gsm8k-a past line 400 (the data build takes its first 300).
dspark-native calibrate "$TRAIN/gsm8k-a.jsonl" --skip 400 --limit 24 --max-new-tokens 128 \
  --drafter "$RUN/dspark/final" --threads "$THREADS" --out "$RUN/dspark/sts.json"

dspark-native eval "$EVAL" --drafter "$RUN/dspark/final" --sts "$RUN/dspark/sts.json" --limit 12 \
  --max-new-tokens 128 --threads "$THREADS" --out "$RUN/eval_dspark.json"
dspark-native bench "$EVAL" --drafter "$RUN/dspark/final" --sts "$RUN/dspark/sts.json" --limit 4 \
  --max-new-tokens 128 --threads "$THREADS" --out "$RUN/bench_dspark.json"
