"""`bmr eval`: NDCG@10 etc. on BEIR folders and Spearman on STS files, for models and baselines (and their fusion)."""
from __future__ import annotations

import json

from bmretriever_jax.util.atomic import atomic_write, check_writable_dir, check_writable_file
from bmretriever_jax.cli.models import DTYPE_HELP, DTYPES
from bmretriever_jax.util.errors import ConfigError


def cmd_eval(a):
    from bmretriever_jax.eval.suite import evaluate_all, print_table

    models = list(a.model or []) + list(a.baseline or [])
    if not models:
        raise ConfigError("name at least one --model or --baseline")
    if a.out:
        check_writable_file(a.out)  # before the encoding, not after the table
    if a.save_runs:
        check_writable_dir(a.save_runs, "--save-runs")
    res = evaluate_all(models, a.data, split=a.split, instruction=a.instruction, max_length=a.max_length,
                       dtype=a.dtype, cache_dir=a.cache_dir, quiet=a.quiet, fusion_method=a.fusion,
                       fusion_dev_split=a.fusion_dev_split, fuse=a.fuse, save_runs=a.save_runs)
    print_table(res)
    if a.out:
        with atomic_write(a.out, "w") as f:
            json.dump(res, f, indent=1)


def add_commands(sub) -> None:
    s = sub.add_parser("eval", help="NDCG@10 etc. on BEIR folders and Spearman on STS files")
    s.add_argument("--model", nargs="*", default=[], help="gemma3-270m, a model folder, runs/X/model, ...")
    s.add_argument("--baseline", nargs="*", choices=["bm25", "minilm"], default=[])
    s.add_argument("--data", nargs="+", required=True, help="BEIR folders (data/scifact) and/or STS .tsv files")
    s.add_argument("--split", default="test")
    s.add_argument("--instruction", default=None, help="task name or literal query instruction (default: by data)")
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    s.add_argument("--cache-dir", default=None,
                   help="corpus vector cache (default $BMR_CACHE/vectors, i.e. ~/.cache/bmretriever_jax/vectors)")
    s.add_argument("--out", default=None, help="write the results as JSON")
    s.add_argument("--fusion", choices=["rrf", "wsum"], default=None,
                   help="add a row fusing every model/baseline named, or those of --fuse (top-1000 lists): "
                        "reciprocal-rank fusion or weighted sum of min-max normalised scores; see docs/retrieval.md")
    s.add_argument("--fuse", nargs="+", default=None, metavar="SYSTEM",
                   help="fuse only these of the models / baselines named (default: all of them)")
    s.add_argument("--fusion-dev-split", default="dev",
                   help="split the fusion parameters (RRF k, wsum weights) are chosen on (default dev; a data set "
                        "without it uses k=60 / equal weights)")
    s.add_argument("--save-runs", default=None, metavar="DIR",
                   help="write TREC run files DIR/<data>/<split>/<system>.trec (fused ones too)")
    s.set_defaults(fn=cmd_eval)
