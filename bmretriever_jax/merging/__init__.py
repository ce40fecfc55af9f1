"""Model merging as leaf-by-leaf pytree arithmetic: Linear, Task Arithmetic, TIES, DARE, SLERP, Model Stock.

Definitions follow mergekit 0.1.5 (arcee-ai/mergekit: merge_methods/generalized_task_arithmetic.py,
sparsify.py, linear.py, slerp.py, model_stock.py, registry.py), including its defaults:

  method           normalize  rescale  sparsify    sign consensus
  linear           True       -        -           -            sum_i w_i x_i / sum_i w_i
  task_arithmetic  False      False    -           -            base + lambda * sum_i w_i d_i
  ties             True       False    magnitude   sum          disjoint mean of agreeing w_i d_i
  dare_ties        False      True     random      sum
  dare_linear      False      True     random      -
with d_i = x_i - base trimmed/dropped BEFORE weighting, the elected sign = sign(sum_i w_i d_i) (>= 0 is +),
"normalize" dividing by sum_i w_i (TIES: by the sum of the weights of the models that agree with the elected
sign at that element), then lambda. mergekit's rescale=True is "l1": the dropped delta is scaled so each
tensor keeps its L1 norm (`rescale="density"` gives the DARE paper's 1/density, exactly unbiased).
`int8_mask` only changes the dtype of mergekit's mask tensor, so it has no counterpart here.

Differences from mergekit, on purpose: arithmetic is always float32 (mergekit computes in the load dtype),
the result is cast to `dtype` (default: the base's leaf dtype, or the first model's for linear); DARE's
random masks come from a jax PRNG key folded with each leaf path and model index (reproducible and
independent of leaf order, but not torch's random stream); linear with weights summing to 0 raises.

Whole-tensor reductions (TIES top-k, DARE's L1 rescale, SLERP's angle, Model Stock's angle) run per
TENSOR in mergekit, where each layer is its own tensor. Our layers are stacked ([L, ...] under "layers/"),
so `stacked` = [(regex, n)] says which leaves have n leading stacked axes; each slice along them is merged
as one tensor, which makes the results equal mergekit's on the exported per-layer weights (up to fused
HF tensors such as GPT-NeoX's query_key_value and top-k tie order).

Everything runs one leaf path at a time over `LeafReader`s (in-memory dicts, safetensors files or
sharded directories) into a `LeafWriter`, so memory is about one output model plus one leaf per input;
`parse_merge_config` reads mergekit YAML and `run_merge` ties it together.

Layout: methods.py (per-leaf kernels, the registry), stream.py (the streamed engine and the tree-level
functions below), mergekit.py (YAML configs), folder.py (`bmr merge` into a model folder, in-memory merges),
search.py (`bmr merge-search`: grid and CMA-ES over dev NDCG@10); tensor readers and writers: ../weights.py.
"""
from bmretriever_jax.merging.mergekit import MergeConfig, parse_merge_config, run_merge
from bmretriever_jax.merging.methods import METHODS
from bmretriever_jax.merging.stream import (STACKED, dare_linear, dare_ties, leaf_keys, linear, merge_streamed, merge_trees,
                                          model_stock, slerp, task_arithmetic, ties)

__all__ = ["METHODS", "MergeConfig", "STACKED", "dare_linear", "dare_ties", "leaf_keys", "linear", "merge_streamed",
           "merge_trees", "model_stock", "parse_merge_config", "run_merge", "slerp", "task_arithmetic", "ties"]
