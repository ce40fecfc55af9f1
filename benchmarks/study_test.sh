#!/usr/bin/env bash
# The scaling study's test numbers (docs/studies/scaling.md, "Test results"): retrain the best point
# (batch 16 + 1 hard negative) and the batch-4 point without hard negatives with the study's settings (the
# committed study keeps metrics, not models), then evaluate them and the BM25 / MiniLM baselines on the FULL
# SciFact test corpus (300 claims, 5,183 abstracts) and the MedQuAD test split. ~35 min of training and
# ~25 min of evaluation on 2 CPU cores (float32). Resumable like the study. Results: runs/study-test/.
set -euo pipefail
cd "$(dirname "$0")/.."
BMR=${BMR:-bmr}
T=runs/study-test
STUDY_OUT=$T STUDY_POINTS="16/1 4/0" BMR="$BMR" bash benchmarks/scaling_study.sh --no-baseline
$BMR eval --model "$T/global_batch_size=16,num_negatives=1/model" "$T/global_batch_size=4,num_negatives=0/model" \
  --data data/scifact data/medquad --split test --dtype float32 --out $T/test.json
$BMR eval --baseline bm25 minilm --data data/scifact data/medquad --split test --out $T/test-baselines.json
${PYTHON:-python} benchmarks/study_report.py --test-from $T   # -> benchmarks/results/scaling-study/test.json, docs/studies/scaling.md
