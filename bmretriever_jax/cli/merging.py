"""`bmr merge`, `bmr export` and `bmr merge-search` (the library side: merge/, export.py)."""
from __future__ import annotations

import json
from typing import Any, Dict

from bmretriever_jax.cli.models import DTYPE_HELP, DTYPES
from bmretriever_jax.util.errors import ConfigError

# the choices, written here so that building the parser imports no jax; tests/test_readme_commands.py checks
# that they equal export.FORMATS, merge.search.WEIGHTED_METHODS and merge.search.DEFAULT_DENSITIES
EXPORT_FORMATS = ("hf", "sentence-transformers", "peft")
WEIGHTED_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
DEFAULT_DENSITIES = (0.3, 0.5, 0.7)


def cmd_merge(a):
    from bmretriever_jax.merging.folder import merge_to_folder

    out = merge_to_folder(a.config, a.out, seed=a.seed, tokenizer_source=a.tokenizer_source, quiet=a.quiet)
    print(f"merged model written to {out}")


def cmd_export(a):
    from bmretriever_jax.convert import export as ex

    out = ex.export(a.source, a.out, a.format, step=a.step, instruction=a.instruction, max_length=a.max_length,
                    dtype=a.dtype, base_model=a.base_model, quiet=a.quiet)
    print(f"{a.format} export written to {out}")


def _search_config(a) -> Dict[str, Any] | str:
    if a.config:
        if a.method or a.models:
            raise ConfigError("give either CONFIG or --method/--models, not both")
        return a.config
    if not a.method or not a.models:
        raise ConfigError("give a mergekit CONFIG.yaml, or --method and --models (and --base-model)")
    cfg: Dict[str, Any] = {"merge_method": a.method, "models": [{"model": m, "parameters": {"weight": 1.0}}
                                                                for m in a.models]}
    if a.base_model:
        cfg["base_model"] = a.base_model
    return cfg


def cmd_merge_search(a):
    from bmretriever_jax.merging.search import search

    res = search(_search_config(a), a.dev, strategy=a.strategy, split=a.split, instruction=a.instruction,
                 out=a.out, grid_step=a.grid_step, densities=a.densities, budget=a.budget, popsize=a.popsize,
                 sigma=a.sigma, seed=a.seed, max_length=a.max_length, dtype=a.dtype, batch_size=a.batch_size,
                 cache_dir=a.cache_dir, write_model=not a.no_model, quiet=a.quiet)
    print(json.dumps({"best": res.best, "config": res.config}, indent=1))


def add_commands(sub) -> None:
    s = sub.add_parser("merge", help="merge models / runs / LoRA experts from a mergekit-format YAML config")
    s.add_argument("config", help="mergekit YAML (merge_method, base_model, models, parameters, dtype)")
    s.add_argument("--out", required=True, help="new folder for the merged model")
    s.add_argument("--seed", type=int, default=0, help="PRNG seed of DARE's random drops")
    s.add_argument("--tokenizer-source", default=None, help="base | a model whose tokenizer to copy (default: base)")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("export", help="export a run / checkpoint / model for transformers, sentence-transformers, PEFT")
    s.add_argument("source", help="RUN folder, RUN/checkpoints[/STEP], a model folder or a model name")
    s.add_argument("--format", choices=list(EXPORT_FORMATS), default="hf")
    s.add_argument("--out", required=True, help="new folder")
    s.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    s.add_argument("--instruction", default=None, help="sentence-transformers 'query' prompt: task name or text")
    s.add_argument("--max-length", type=int, default=None, help="default: the model's bmretriever.json / run config")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    s.add_argument("--base-model", default=None, help="PEFT base_model_name_or_path (default: the run's base folder)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("merge-search", help="choose merge weights by NDCG@10 on dev splits (grid or CMA-ES)")
    s.add_argument("config", nargs="?", default=None, help="mergekit YAML whose weights / densities are searched")
    s.add_argument("--method", choices=list(WEIGHTED_METHODS), default=None)
    s.add_argument("--models", nargs="*", default=[], help="experts (runs, folders) when no CONFIG is given")
    s.add_argument("--base-model", default=None)
    s.add_argument("--dev", nargs="+", required=True, help="BEIR folders scored on --split")
    s.add_argument("--split", default="dev")
    s.add_argument("--instruction", default=None, help="query instruction for every dev folder (default: by folder)")
    s.add_argument("--strategy", choices=["grid", "cmaes"], default="grid")
    s.add_argument("--grid-step", type=float, default=0.1)
    s.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES))
    s.add_argument("--budget", type=int, default=24, help="CMA-ES: number of candidates scored")
    s.add_argument("--popsize", type=int, default=None)
    s.add_argument("--sigma", type=float, default=0.5, help="CMA-ES initial step size (weight logits)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--cache-dir", default=None, help="corpus vector cache (default OUT/vector_cache)")
    s.add_argument("--out", required=True)
    s.add_argument("--no-model", action="store_true", help="write the table and merge.yaml only")
    s.set_defaults(fn=cmd_merge_search)
