"""The real GGUF models against transformers' own GGUF loading (slow: ~1-2 min each on 2 cores)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

SENTENCES = [
    "Given a scientific claim, retrieve documents that support or refute the claim\nQuery: "
    "0-dimensional biomaterials show inductive properties.",
    "Represent this passage\npassage: Alterations of the architecture of cerebral white matter in the "
    "developing human brain can affect cortical development and result in functional disabilities.",
    "What are the symptoms of Marfan syndrome?",
]
EDGE_CASES = ["", "   ", "Ünïcödé β-lactamase IL-6/IL-10 ratio ≥ 2.5 µg/mL"]


def _reference(gguf_file):
    import torch
    import transformers

    d, f = os.path.dirname(gguf_file), os.path.basename(gguf_file)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModel.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    return tok, model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_gguf_matches_transformers(name):
    import torch

    from bmretriever_jax.convert import hub
    from bmretriever_jax.embed import pad_left
    from bmretriever_jax.models import forward

    cfg, params, tok, folder = hub.load(name, quiet=True)
    ref_tok, ref_model = _reference(hub.gguf_path(name))
    # tokenisation, token for token
    for s in SENTENCES + EDGE_CASES:
        assert tok(s)["input_ids"] == ref_tok(s)["input_ids"], s
    seqs = [tok(s)["input_ids"] + [tok.eos_token_id] for s in SENTENCES]
    T = max(map(len, seqs))
    ids, mask = pad_left(seqs, T, tok.pad_token_id if tok.pad_token_id is not None else 0)
    ours = np.asarray(forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask), dtype=jnp.float32))
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos, dtype=torch.long)).last_hidden_state.float().numpy()
    m = mask.astype(bool)
    scale = np.abs(ref[m]).max()
    print(name, "max abs diff", np.abs(ours[m] - ref[m]).max(), "max |ref|", scale)
    # relative to the largest hidden value (78 for Gemma 3, 54 for SmolLM2): 1e-5 of it is as strict as the
    # absolute 1e-3 this replaced at Gemma's scale, and stricter at SmolLM2's. Measured: 2.6e-4 / 1.2e-4.
    assert np.abs(ours[m] - ref[m]).max() <= 1e-5 * scale
