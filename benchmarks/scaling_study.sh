#!/usr/bin/env bash
# The batch-size scaling study (docs/studies/scaling.md): Gemma 3 270M + LoRA r16,
# queries 32 / passages 64 tokens, float32, 1,024 training queries at every point, gradient cache (chunks of 8),
# sqrt lr scaling from 2e-4 at batch 16, with and without one BM25-mined hard negative; dev NDCG@10 on
# SciFact dev claims and MedQuAD dev questions over 1,000-document corpora. Resumable: rerun after a kill.
# About 2-3 hours on 2 CPU cores. Usage: bash benchmarks/scaling_study.sh [extra bmr sweep args]
#   STUDY_POINTS="16/1 4/0"  only these points (global batch / hard negatives; default: all eight)
#   STUDY_OUT=DIR            the sweep's folder (default: benchmarks/results/scaling-study)
#   STUDY_DATA=DIR           the training pairs' folder (default: runs/study)
set -euo pipefail
cd "$(dirname "$0")/.."
BMR=${BMR:-bmr}
P=${STUDY_DATA:-runs/study}
OUT=${STUDY_OUT:-benchmarks/results/scaling-study}
POINTS=${STUDY_POINTS:-4/0 256/0 4/1 256/1 16/0 64/0 16/1 64/1}
mkdir -p $P
[ -s $P/train_hn.jsonl ] || {
  $BMR pairs scifact --out $P/scifact.jsonl
  $BMR pairs pubmedqa --out $P/pubmedqa.jsonl
  $BMR pairs medquad --max-pairs 1500 --seed 0 --out $P/medquad.jsonl   # balance 15k MedQuAD pairs vs 1.3k
  cat $P/scifact.jsonl $P/pubmedqa.jsonl $P/medquad.jsonl > $P/train.jsonl
  $BMR mine $P/train.jsonl --out $P/train_hn.jsonl --num-negatives 1 --top-k 100
}
point_args=()
for p in $POINTS; do
  point_args+=(--point "train.global_batch_size=${p%/*},data.num_negatives=${p#*/}")
done
# float32 everywhere: the study ran on CPUs without bf16 units (dtype auto -> float32), and a rerun on any
# machine should train the same numbers (a rerun on an AVX512-BF16 CPU did, to every digit: docs/studies/scaling.md)
$BMR sweep configs/quickstart.yaml model.max_length=64 model.query_max_length=32 model.dtype=float32 \
  "data.train=[$P/train_hn.jsonl]" train.grad_cache_chunk=8 train.lr=2e-4 train.log_every=1 \
  --examples 1024 --lr-rule sqrt --lr-base-batch 16 "${point_args[@]}" \
  --dev data/scifact --dev data/medquad --dev-docs 1000 --keep-models --out "$OUT" "$@"
