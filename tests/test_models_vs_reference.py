"""Every backbone against the transformers PyTorch model with the same (tiny, random) weights."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bmretriever_jax.convert.hf import load_hf
from bmretriever_jax.models import forward
from hf_tiny import padded_batch, tiny_hf_model

FAMILIES = ["gpt_neox", "llama", "mistral", "gemma", "gemma3", "qwen3"]


def _hf_hidden(model, ids, mask):
    # explicit positions (first real token = 0), as ours; rotary attention is shift-invariant anyway
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state.float().numpy()


def _ours(path, ids, mask, bidirectional=False, dtype=jnp.float32):
    cfg, params = load_hf(path)
    out = forward(cfg, params, jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32),
                  dtype=dtype, bidirectional=bidirectional)
    return cfg, np.asarray(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_parity_fp32(family, tmp_path):
    model = tiny_hf_model(family, str(tmp_path))
    ids, mask = padded_batch(length=13)
    ref = _hf_hidden(model, ids, mask)
    _, out = _ours(str(tmp_path), ids, mask)
    m = mask.numpy().astype(bool)
    assert np.abs(out[m] - ref[m]).max() <= 1e-4


@pytest.mark.parametrize("family", ["gemma3"])
def test_bidirectional_parity_fp32(family, tmp_path):
    model = tiny_hf_model(family, str(tmp_path), bidirectional=True)
    ids, mask = padded_batch(length=13)
    ref = _hf_hidden(model, ids, mask)
    _, out = _ours(str(tmp_path), ids, mask, bidirectional=True)
    m = mask.numpy().astype(bool)
    assert np.abs(out[m] - ref[m]).max() <= 1e-4
    # and it really differs from causal attention
    _, causal = _ours(str(tmp_path), ids, mask, bidirectional=False)
    assert np.abs(causal[m] - out[m]).max() > 1e-2


def test_bf16_compute_close_to_fp32(tmp_path):
    """bf16 matmul inputs with f32 accumulation stay close to fp32 (the default precision)."""
    tiny_hf_model("gemma3", str(tmp_path))
    ids, mask = padded_batch(length=13)
    _, ref = _ours(str(tmp_path), ids, mask)
    _, out = _ours(str(tmp_path), ids, mask, dtype=jnp.bfloat16)
    m = mask.numpy().astype(bool)
    rel = np.linalg.norm(out[m] - ref[m]) / np.linalg.norm(ref[m])
    assert rel < 2e-2


def test_padding_does_not_change_real_tokens(tmp_path):
    """A sequence alone and left-padded inside a batch gives the same last hidden state."""
    tiny_hf_model("llama", str(tmp_path))
    ids, mask = padded_batch(length=13)
    _, batched = _ours(str(tmp_path), ids, mask)
    row = 2
    n = int(mask[row].sum())
    _, alone = _ours(str(tmp_path), ids[row:row + 1, -n:], mask[row:row + 1, -n:])
    np.testing.assert_allclose(batched[row, -1], alone[0, -1], atol=1e-5)


def test_unknown_architecture(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "bert", "architectures": ["BertModel"]}, f)
    with pytest.raises(ValueError, match="unsupported architecture model_type='bert'"):
        load_hf(str(tmp_path))


def test_missing_and_misshaped_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    tiny_hf_model("qwen3", str(tmp_path))
    f = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(f)
    name = next(k for k in tensors if "layers.1.self_attn.k_proj.weight" in k)
    broken = dict(tensors)
    broken[name] = np.zeros((3, 3), np.float32)
    save_file(broken, f)
    with pytest.raises(ValueError, match=r"k_proj.weight.*layers/attn/k/kernel.*shape \(3, 3\)"):
        load_hf(str(tmp_path))
    del broken[name]
    save_file(broken, f)
    with pytest.raises(KeyError, match="layers.1.self_attn.k_proj.weight"):
        load_hf(str(tmp_path))


def test_refuses_pickle(tmp_path):
    tiny_hf_model("llama", str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load pickle"):
        load_hf(str(tmp_path))


def test_sharded_checkpoint(tmp_path):
    model = tiny_hf_model("gemma", str(tmp_path / "one"))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    ids, mask = padded_batch()
    _, a = _ours(str(tmp_path / "one"), ids, mask)
    _, b = _ours(str(tmp_path / "sharded"), ids, mask)
    np.testing.assert_array_equal(a, b)


# the families whose attention differs where the blocks cut: partial rotary (gpt_neox), a sliding window
# (mistral), sliding + full layers with q/k norms and soft scaling (gemma3); the others share these paths
@pytest.mark.parametrize("family", ["gpt_neox", "mistral", "gemma3"])
def test_causal_attention_in_query_blocks(family, tmp_path, monkeypatch):
    """On CPU, causal attention runs in query blocks (decoder.CPU_CAUSAL_BLOCKS), each against the keys up to
    its end. Forced here at 16 tokens (sliding windows of 5 and 6 bite): the same hidden states as
    transformers, as one block (up to summation order), for packed rows too, and the same gradients."""
    import jax

    from bmretriever_jax.models import decoder, encode

    model = tiny_hf_model(family, str(tmp_path))
    ids, mask = padded_batch(length=16)
    ref = _hf_hidden(model, ids, mask)
    cfg, params = load_hf(str(tmp_path))
    jids, jmask = jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 7 + [3] * 2 + [0] * 2], 3, axis=0), jnp.int32)  # 3 texts + padding
    monkeypatch.setattr(decoder, "CPU_CAUSAL_MIN_TOKENS", 0)

    def run(blocks):
        monkeypatch.setattr(decoder, "CPU_CAUSAL_BLOCKS", blocks)
        hidden = forward(cfg, params, jids, jmask, dtype=jnp.float32)
        packed = encode(cfg, params, jids, seg, dtype=jnp.float32, max_segments=3)
        grads = jax.grad(lambda p: jnp.sum(forward(cfg, p, jids, jmask, dtype=jnp.float32, remat=True)
                                           * (jmask[..., None] > 0)))(params)  # remat: as the training configs
        return np.asarray(hidden), np.asarray(packed), grads

    one, packed_one, grads_one = run(1)
    for blocks in (2, 4):
        out, packed, grads = run(blocks)
        m = mask.numpy().astype(bool)
        assert np.abs(out[m] - ref[m]).max() <= 1e-4
        # one block vs several: the same sums in another order (float32 rounding, relative to the values' size)
        assert np.abs(out[m] - one[m]).max() <= 1e-5 * np.abs(one[m]).max()
        assert np.abs(packed - packed_one).max() <= 1e-5 * np.abs(packed_one).max()
        for (path, g), g1 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_one)):
            scale = float(np.abs(g1).max()) or 1.0
            assert np.abs(np.asarray(g) - np.asarray(g1)).max() <= 1e-5 * scale, jax.tree_util.keystr(path)
    # and the blocks were really used: the traced program has more dot products than one block's; not where the
    # rule does not hold: bidirectional attention, T not divisible by the blocks, T under the minimum (a fresh
    # jit each time: the settings are read when tracing)
    def dots(blocks, min_tokens=0, length=16, **kw):
        monkeypatch.setattr(decoder, "CPU_CAUSAL_BLOCKS", blocks)
        monkeypatch.setattr(decoder, "CPU_CAUSAL_MIN_TOKENS", min_tokens)
        fn = jax.jit(lambda p: forward(cfg, p, jids[:, :length], jmask[:, :length], dtype=jnp.float32, **kw))
        return fn.lower(params).as_text().count("dot_general")

    assert dots(4) > dots(1)
    assert dots(4, bidirectional=True) == dots(1, bidirectional=True)
    assert dots(4, length=15) == dots(1, length=15)
    assert dots(4, min_tokens=32) == dots(1)
