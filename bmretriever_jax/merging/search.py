"""Choosing merge weights on dev sets (`bmr merge-search`).

Merge weights are scored by NDCG@10 on dev splits: a grid (weights on the simplex in steps of 0.1, i.e. {0.1..0.9}
for two experts, times TIES/DARE densities {0.3, 0.5, 0.7}) or CMA-ES (below) over softmax-normalised weights and a
density in [0.05, 1]. Candidates are merged in memory (merging/folder.py); one encoder's weights are swapped per
candidate so the forward compiles once; corpus vectors are cached per candidate (OUT/vector_cache), so a rerun
costs no encoding. It writes candidates.tsv, search.json, the chosen config as merge.yaml and the merged model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
import yaml

from bmretriever_jax.embed import Encoder, default_task, instruction_for
from bmretriever_jax.util.errors import ConfigError, InputPathError
from bmretriever_jax.eval.evaluate import evaluate_retrieval
from bmretriever_jax.merging.folder import (as_config, flat_to_tree, input_refs, load_flat, merge_flat, merge_to_folder,
                                          merged_settings, open_inputs, tokenizer_folder)
from bmretriever_jax.merging.mergekit import MergeConfig

SPARSE_METHODS = ("ties", "dare_ties", "dare_linear")
WEIGHTED_METHODS = ("linear", "task_arithmetic") + SPARSE_METHODS
DEFAULT_DENSITIES = (0.3, 0.5, 0.7)


# ----------------------------------------------------------------------------------------------------
# CMA-ES (the `cmaes` package: Hansen's (mu/mu_w, lambda)-CMA-ES with default parameters; minimises)
# ----------------------------------------------------------------------------------------------------
def cmaes_minimise(objective: Callable[[np.ndarray, int], float], dim: int, *, budget: int, sigma: float,
                   popsize: Optional[int] = None, seed: int = 0) -> Tuple[np.ndarray, float]:
    """Minimise objective(x, generation) over R^dim in `budget` evaluations -> (best x, its value), first on ties.

    The start point 0 is evaluated first (generation 0), then generations 1, 2, ... of `popsize` points asked from
    CMA-ES (mean 0, step `sigma`); a last generation that does not fit the budget is scored in part and not told.
    Deterministic for a seed."""
    # imported here: `import cmaes` imports scipy.stats when scipy is installed (~1.2 s), needed by this strategy only
    from cmaes import CMA

    if dim < 1:
        raise ConfigError("CMA-ES needs at least one dimension")
    if popsize is not None and popsize < 2:
        raise ConfigError(f"popsize must be >= 2, got {popsize}")
    if sigma <= 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    with np.errstate(divide="ignore"):  # popsize <= 3 (one parent): rank-mu rate 0, a harmless 1/0 in the weights
        es = CMA(mean=np.zeros(dim), sigma=float(sigma), seed=seed, population_size=popsize)
    best_x, best_f = np.zeros(dim), float(objective(np.zeros(dim), 0))
    used = 1
    while used < budget:
        xs = [es.ask() for _ in range(es.population_size)]
        take = min(len(xs), budget - used)
        fs = [float(objective(x, es.generation + 1)) for x in xs[:take]]
        used += take
        for x, f in zip(xs, fs):
            if f < best_f:
                best_x, best_f = x, f
        if take < len(xs):
            break
        es.tell(list(zip(xs, fs)))
    return best_x, best_f


# ----------------------------------------------------------------------------------------------------
# Search spaces
# ----------------------------------------------------------------------------------------------------
def simplex_grid(n: int, step: float = 0.1) -> List[Tuple[float, ...]]:
    """Every weight vector of n positive multiples of `step` summing to 1 (n=2, step 0.1: (0.1, 0.9) .. (0.9, 0.1))."""
    k = round(1 / step)
    if not math.isclose(k * step, 1.0, rel_tol=1e-9) or k < n:
        raise ConfigError(f"grid step {step} must divide 1 into at least {n} parts")
    out = []
    for cuts in itertools.combinations(range(1, k), n - 1):
        parts = np.diff([0, *cuts, k])
        out.append(tuple(round(float(p) / k, 10) for p in parts))
    return out


def grid_candidates(method: str, n_models: int, *, step: float = 0.1,
                    densities: Sequence[float] = DEFAULT_DENSITIES) -> List[Dict[str, Any]]:
    """STM's grid: normalised weights on the simplex, times densities for TIES / DARE."""
    if method not in WEIGHTED_METHODS:
        raise ConfigError(f"merge-search tunes weights of {WEIGHTED_METHODS}; {method!r} has none")
    weights = simplex_grid(n_models, step)
    if method not in SPARSE_METHODS:
        return [{"weights": w} for w in weights]
    return [{"weights": w, "density": float(d)} for w in weights for d in densities]


def decode_cmaes(x: np.ndarray, method: str, n_models: int) -> Dict[str, Any]:
    """A CMA-ES point -> options: softmax weights (sum 1) and, for TIES / DARE, density = 0.05 + 0.95 sigmoid."""
    z = np.asarray(x[:n_models], np.float64)
    w = np.exp(z - z.max())
    w = w / w.sum()
    out: Dict[str, Any] = {"weights": tuple(float(v) for v in w)}
    if method in SPARSE_METHODS:
        out["density"] = float(0.05 + 0.95 / (1 + math.exp(-float(x[n_models]))))
    return out


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------
class CandidateEncoder:
    """Duck-typed encoder (encode_queries / encode_passages / fingerprint / max_length) whose weights are swapped per
    candidate: one Encoder, so its jitted forward compiles once for the whole search."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.fingerprint = ""

    @property
    def max_length(self):
        return self.encoder.max_length

    def set_params(self, params, tag: str) -> None:
        self.encoder.params = jax.tree.map(jnp.asarray, params)
        h = hashlib.sha256(tag.encode())
        for leaf in jax.tree.leaves(params):  # a strided sample of every leaf: the weights themselves key the cache
            x = np.asarray(leaf).ravel()
            h.update(np.ascontiguousarray(x[:: max(1, x.size // 4096)][:4096]).tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def encode_queries(self, queries, instruction=None, batch_size: int = 32, **kw):
        return self.encoder.encode_queries(queries, instruction, batch_size=batch_size)

    def encode_passages(self, docs, batch_size: int = 32, **kw):
        return self.encoder.encode_passages(docs, batch_size=batch_size)


def _dev_instruction(dev: str, instruction: Optional[str]) -> str:
    return instruction_for(instruction if instruction is not None else default_task(dev))


def _label(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


@dataclasses.dataclass
class SearchResult:
    candidates: List[Dict[str, Any]]
    best: Dict[str, Any]
    config: Dict[str, Any]  # the chosen merge as a mergekit config dict
    out: Optional[str] = None


def chosen_config(mc: MergeConfig, options: Mapping[str, Any], dtype: Optional[str] = None) -> Dict[str, Any]:
    """A mergekit config dict (runnable by `bmr merge`) of mc with the method options `options`."""
    models = []
    for i, ref in enumerate(mc.models):
        p = {}
        if "weights" in options:
            p["weight"] = float(options["weights"][i])
        if "density" in options and mc.method in SPARSE_METHODS:
            d = options["density"]
            p["density"] = float(d[i] if isinstance(d, (list, tuple)) else d)
        models.append({"model": ref, "parameters": p} if p else {"model": ref})
    cfg: Dict[str, Any] = {"merge_method": mc.method, "models": models}
    if mc.base_model is not None:
        cfg["base_model"] = mc.base_model
    glob = {}
    if "normalize" in options:
        glob["normalize"] = bool(options["normalize"])
    if "lambda_" in options:
        glob["lambda"] = float(options["lambda_"])
    if "rescale" in options and mc.method in SPARSE_METHODS:
        r = options["rescale"]
        if r == "density":
            raise ConfigError("rescale='density' has no mergekit spelling; use the Python API")
        glob["rescale"] = r in (True, "l1")
    if glob:
        cfg["parameters"] = glob
    if dtype or mc.dtype:
        cfg["dtype"] = dtype or mc.dtype
    if mc.extra.get("tokenizer_source"):
        cfg["tokenizer_source"] = mc.extra["tokenizer_source"]
    return cfg


def search(config, dev: Sequence[str], *, strategy: str = "grid", split: str = "dev",
           instruction: Optional[str] = None, out: Optional[str] = None, grid_step: float = 0.1,
           densities: Sequence[float] = DEFAULT_DENSITIES, budget: int = 24, popsize: Optional[int] = None,
           sigma: float = 0.5, seed: int = 0, max_length: Optional[int] = None, dtype: str = "auto",
           batch_size: int = 32, cache_dir: Optional[str] = None, write_model: bool = True,
           quiet: bool = False, log: Callable[[str], None] = print) -> SearchResult:
    """Choose merge weights (and TIES / DARE density) by mean NDCG@10 over the `dev` BEIR folders' `split`.

    config: a mergekit config (its weights / densities are the search's to choose; its other parameters stay).
    strategy: "grid" (simplex weights in `grid_step` x `densities`) or "cmaes" (`budget` evaluations, the equal-weight
    point first). The best candidate (first on ties) is written as OUT/merge.yaml and merged into OUT/model."""
    mc = as_config(config)
    if mc.method not in WEIGHTED_METHODS:
        raise ConfigError(f"merge-search tunes weights of {WEIGHTED_METHODS}; {mc.method!r} has none")
    if strategy not in ("grid", "cmaes"):
        raise ConfigError(f"strategy {strategy!r}; allowed: grid, cmaes")
    if not dev:
        raise ConfigError("merge-search needs at least one dev BEIR folder")
    for d in dev:
        if not os.path.isdir(d):
            raise InputPathError(f"dev folder {d!r} does not exist")
    n = len(mc.models)
    sources = open_inputs(mc, quiet=True)
    settings = merged_settings(mc, sources, seed)
    tok_folder = tokenizer_folder(mc, sources, None)
    if not tok_folder:
        raise ConfigError("no input has tokenizer files: cannot encode dev queries")
    cfg = sources[input_refs(mc)[0]].cfg
    flats = {ref: load_flat(s) for ref, s in sources.items()}
    fixed = {k: v for k, v in mc.options.items() if k not in ("weights", "density")}
    if out is not None:
        os.makedirs(out, exist_ok=True)
    cache_dir = cache_dir or (os.path.join(out, "vector_cache") if out else None)
    instructions = {d: _dev_instruction(d, instruction) for d in dev}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_folder)
    L = int(max_length or settings.get("max_length") or min(512, cfg.max_position_embeddings))
    enc: Optional[CandidateEncoder] = None
    rows: List[Dict[str, Any]] = []
    seen: Dict[str, Dict[str, Any]] = {}

    def evaluate(options: Dict[str, Any], generation: int) -> float:
        nonlocal enc
        key = json.dumps(options, sort_keys=True)
        t0 = time.time()
        if key in seen:  # the same point twice (CMA-ES or rounding): reuse its score
            row = dict(seen[key], id=len(rows), generation=generation, seconds=0.0)
            rows.append(row)
            return row["ndcg@10"]
        merged = merge_flat(mc, flats, {**fixed, **options}, seed=seed)
        params = flat_to_tree(cfg, merged)
        del merged
        if enc is None:
            enc = CandidateEncoder(Encoder(cfg, params, tokenizer, max_length=L,
                                           pooling=settings.get("pooling", "last"),
                                           normalize=settings.get("normalize", True), dtype=dtype,
                                           bidirectional=settings.get("bidirectional", False)))
        enc.set_params(params, json.dumps([input_refs(mc), mc.method, key, seed]))
        scores = {}
        for d in dev:
            res = evaluate_retrieval(enc, d, split, instructions[d], cache_dir=cache_dir, batch_size=batch_size,
                                     progress=False)  # one line per candidate instead
            scores[_label(d)] = float(res["ndcg@10"])
        mean = float(np.mean(list(scores.values())))
        row = {"id": len(rows), "strategy": strategy, "generation": generation, "weights": list(options["weights"]),
               "density": options.get("density"), "scores": scores, "ndcg@10": mean,
               "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        seen[key] = row
        if not quiet:
            dens = f" density={row['density']:.3f}" if row["density"] is not None else ""
            log(f"  [{row['id']:3d}] weights=" + ",".join(f"{w:.3f}" for w in row["weights"]) + dens +
                f"  ndcg@10={mean:.4f}")
        return mean

    if strategy == "grid":
        for options in grid_candidates(mc.method, n, step=grid_step, densities=densities):
            evaluate(options, 0)
    else:
        dim = n + (1 if mc.method in SPARSE_METHODS else 0)
        # the equal-weight, mid-density point first; maximises NDCG@10
        cmaes_minimise(lambda x, generation: -evaluate(decode_cmaes(x, mc.method, n), generation), dim,
                       budget=budget, sigma=sigma, popsize=popsize, seed=seed)

    best = max(rows, key=lambda r: (r["ndcg@10"], -r["id"]))
    best_options = {"weights": tuple(best["weights"])}
    if best["density"] is not None:
        best_options["density"] = best["density"]
    chosen = chosen_config(mc, {**fixed, **best_options})
    result = SearchResult(rows, best, chosen, out)
    if out is not None:
        _write_search(out, rows, best, chosen, dict(method=mc.method, models=list(mc.models), base_model=mc.base_model,
                                                    strategy=strategy, dev=list(dev), split=split, seed=seed,
                                                    max_length=L, dtype=dtype))
        if write_model:
            del flats
            merge_to_folder(chosen, os.path.join(out, "model"), seed=seed)
        if not quiet:
            log(f"best: candidate {best['id']} ndcg@10={best['ndcg@10']:.4f} -> {out}/merge.yaml" +
                (f", {out}/model" if write_model else ""))
    return result


def _write_search(out: str, rows, best, chosen, info) -> None:
    devs = list(rows[0]["scores"]) if rows else []
    with open(os.path.join(out, "candidates.tsv"), "w") as f:
        f.write("\t".join(["id", "strategy", "generation", "weights", "density", *[f"ndcg@10:{d}" for d in devs],
                           "ndcg@10", "seconds"]) + "\n")
        for r in rows:
            f.write("\t".join([str(r["id"]), r["strategy"], str(r["generation"]),
                               ",".join(f"{w:.6g}" for w in r["weights"]),
                               "" if r["density"] is None else f"{r['density']:.6g}",
                               *[f"{r['scores'][d]:.6f}" for d in devs], f"{r['ndcg@10']:.6f}",
                               str(r["seconds"])]) + "\n")
    with open(os.path.join(out, "search.json"), "w") as f:
        json.dump({**info, "candidates": rows, "best": best, "config": chosen}, f, indent=1)
    with open(os.path.join(out, "merge.yaml"), "w") as f:
        yaml.safe_dump(chosen, f, sort_keys=False)
