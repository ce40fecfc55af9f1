"""Evaluation: trec_eval-exact metrics (metrics), exact sharded top-k (search), BEIR / STS readers (beir, sts),
BM25 and MiniLM baselines (baselines), encoder evaluation with a resumable vector cache (evaluate)."""
