#!/usr/bin/env bash
# Reproduce the SmolLM2-135M-Instruct drafters and their evaluation (docs/training.md).
#
#   bash scripts/train_smollm2_drafters.sh [RUN_DIR] [STEPS]
#
# One data build (the target answers the training prompts; cached and resumable in RUN_DIR/data),
# then DSpark, DFlash and EAGLE-3 drafters trained with the same data, steps and block size 7,
# STS fitted for DSpark on held-out training prompts, and eval on ../shared/data/prompts/eval.
# Every step resumes where it stopped. On the 2-core CPU VM the whole run takes about 2 hours.
set -euo pipefail
RUN=${1:-runs/smollm2}
STEPS=${2:-800}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
TRAIN=$SHARED/data/prompts/train
EVAL=$SHARED/data/prompts/eval
THREADS=${THREADS:-2}
SEQS=${SEQS:-320}
# Same file order as the shipped drafter's data (the order fixes which prompts are used).
PROMPTS=("$TRAIN/gsm8k-a.jsonl" "$TRAIN/livecodebench.jsonl" "$TRAIN/arena-hard-v2-a.jsonl" "$TRAIN/lbpp.jsonl"
         "$TRAIN/swe-bench.jsonl")
COMMON=(--data-dir "$RUN/data" --prompts "${PROMPTS[@]}" --limit-per-file 120 --data-batch 32
        --max-sequences "$SEQS" --steps "$STEPS" --lr 1e-3 --threads "$THREADS")

for kind in dspark dflash eagle3; do
  dspark-native train --kind "$kind" --out "$RUN/$kind" "${COMMON[@]}"
done

# STS on held-out training prompts: past the first 150 lines of each file, which the data build
# (at most ~75 prompts per file at SEQS=320) never reaches.
dspark-native calibrate "$TRAIN/gsm8k-a.jsonl" "$TRAIN/lbpp.jsonl" "$TRAIN/arena-hard-v2-a.jsonl" \
  --skip 150 --limit 12 --max-new-tokens 128 --max-batch 4 --drafter "$RUN/dspark/final" \
  --threads "$THREADS" --out "$RUN/dspark/sts.json"

for kind in dspark dflash eagle3; do
  sts=()
  [ "$kind" = dspark ] && sts=(--sts "$RUN/dspark/sts.json" --png "$RUN/dspark/reliability")
  dspark-native eval "$EVAL" --drafter "$RUN/$kind/final" "${sts[@]}" --limit 12 --max-new-tokens 128 \
    --max-batch 4 --threads "$THREADS" --out "$RUN/eval_$kind.json"
done
