"""Dev evaluation inside training, on every device: the dev corpus and queries are encoded with the training
state where it lies (sharded over the mesh, LoRA applied in the layers as in the step), each batch split over
the batch axes (data x fsdp) so every chip encodes its rows; only the vectors [n, D] travel to the hosts.
No parameter is gathered to host 0 and no host waits while another encodes.

    MeshEncoder(run, model_cfg, tokenizer, mesh)  -> .bind(state, frozen) -> encode_queries / encode_passages
    dev_eval(run, encoder)                          -> {"dev_ndcg@10": ...}; a collective (every process calls it)
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bmretriever_jax.config import RunConfig
from bmretriever_jax.embed import TASK_INSTRUCTIONS, Encoder, embed_batch
from bmretriever_jax.text import default_task, instruction_for
from bmretriever_jax.util.precision import resolve_dtype


class MeshEncoder(Encoder):
    """The `Encoder` API over the training state on its mesh (see the module docstring). Every process must
    make the same calls with the same texts (each reads the small dev split itself)."""

    def __init__(self, run: RunConfig, model_cfg, tokenizer, mesh, *, rows_per_shard: int = 8):
        from bmretriever_jax.training.step import BATCH_AXES, assemble, batch_shards

        m = run.model
        self.cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
        self.max_length, self.pooling, self.normalize = m.max_length, m.pooling, m.normalize
        self.dtype, self.bidirectional = resolve_dtype(m.dtype), m.bidirectional
        self.instructions, self.source = dict(TASK_INSTRUCTIONS), ""
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        shards = batch_shards(mesh) if mesh.size > 1 else 1
        self.rows = shards * rows_per_shard * max(1, jax.process_count() // shards)
        self.rows_sharding = NamedSharding(mesh, P(BATCH_AXES))
        act = NamedSharding(mesh, P(BATCH_AXES, None, None)) if mesh.size > 1 else None
        out = NamedSharding(mesh, P(BATCH_AXES, None))

        def fn(trainable_model, frozen, ids, mask):
            return embed_batch(model_cfg, assemble(run, trainable_model, frozen), ids, mask, pooling=m.pooling,
                               normalize=m.normalize, dtype=self.dtype, bidirectional=m.bidirectional,
                               activation_sharding=act)

        self._fn = jax.jit(fn, out_shardings=out)
        self._state = None
        self._fingerprint = "unbound"

    def bind(self, state: dict, frozen: dict, step: int) -> "MeshEncoder":
        """Encode with these (sharded) weights from now on."""
        self._state = (state["trainable"]["model"], frozen)
        self._fingerprint = f"training-step-{step}"  # never cached: dev_eval passes no cache folder
        return self

    @property
    def params(self):  # the Encoder API's plain params would need a gather: not offered here
        raise AttributeError("MeshEncoder encodes with the sharded training state; it has no host params")

    def _batch_rows(self, batch_size: int) -> int:  # a multiple of the batch shards and processes
        return self.rows

    def _vectors(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Every host holds the whole padded batch; each device encodes its rows; the vectors come back to all."""
        if self._state is None:
            raise RuntimeError("MeshEncoder.bind(state, frozen, step) first")
        g_ids, g_mask = (jax.make_array_from_callback(a.shape, self.rows_sharding, functools.partial(_take, a))
                         for a in (ids, mask))
        vecs = self._fn(*self._state, g_ids, g_mask)
        vecs = multihost_utils.process_allgather(vecs, tiled=True) if jax.process_count() > 1 else vecs
        return np.asarray(vecs, np.float32)


def _take(a: np.ndarray, index) -> np.ndarray:
    return a[index]


def dev_eval(run: RunConfig, encoder: MeshEncoder, cache_dir: Optional[str] = None) -> dict:
    """NDCG@10 etc. on the dev split of data.dev with the encoder's bound weights; every process calls it
    (and gets the same numbers)."""
    from bmretriever_jax.eval.evaluate import evaluate_retrieval

    task = run.data.dev_task or default_task(run.data.dev)  # data/scifact -> scifact's instruction
    res = evaluate_retrieval(encoder, run.data.dev, run.data.dev_split, instruction_for(task), cache_dir=cache_dir,
                             progress=False)  # inside the train bar
    return {f"dev_{k}": v for k, v in res.items() if isinstance(v, (int, float))}
