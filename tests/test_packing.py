"""Packed sequences (data/packing.py, models/ops.py segment functions) equal the padded path: the packer keeps
every token and never drops a text; packed vectors equal padded ones for every family (causal, bidirectional,
sliding windows, last / mean pooling); and one train step's loss and gradients (LoRA and full, plain and
gradient-cached, 1 device and the 8-device mesh) equal the padded step's to <= 1e-5 (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from bmretriever_jax.config import load_config
from bmretriever_jax.convert.hf import load_hf
from bmretriever_jax.data import packing
from bmretriever_jax.embed import pad_left
from bmretriever_jax.models.decoder import encode
from bmretriever_jax.models.ops import gather_slots, segment_positions
from bmretriever_jax.parallel import sharding
from bmretriever_jax.training import init_state, make_mesh, make_tokenize_fn, make_train_step, split_params, to_global
from bmretriever_jax.training.step import batch_shards, calibrate_packing
from bmretriever_jax.util import treeutil
from hf_tiny import VOCAB, tiny_hf_model, tiny_model_dir, tiny_pairs

FAMILIES = ["gpt_neox", "llama", "mistral", "gemma", "gemma3", "qwen3"]


def _seqs(seed, n, lo, hi):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, VOCAB, size=int(rng.integers(lo, hi + 1)))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- packer
def test_pack_keeps_every_token_in_place():
    seqs = _seqs(0, 24, 1, 12)
    rows = max(packing.rows_needed([len(s) for s in seqs[i:i + 12]], 16, 5) for i in (0, 12))
    assert rows < 12  # fewer rows than texts
    assert packing.choose_rows([[len(s) for s in seqs]], n_shards=2, length=16, max_segments=5) >= rows
    out = packing.pack(seqs, n_shards=2, rows=rows, length=16, max_segments=5, pad_id=0)
    assert out is not None and packing.pack(seqs, n_shards=2, rows=rows - 1, length=16, max_segments=5,
                                            pad_id=0) is None
    ids, seg, slot = out["ids"], out["seg"], out["slot"]
    assert ids.shape == (2 * rows, 16) and seg.shape == (2 * rows, 16) and slot.shape == (24,)
    assert int((seg > 0).sum()) == sum(map(len, seqs))  # no token lost or added
    for j, s in enumerate(seqs):
        shard = j // 12
        row, k = divmod(int(slot[j]), 5)
        r = shard * rows + row
        cols = np.nonzero(seg[r] == k + 1)[0]
        assert list(ids[r, cols]) == s and np.all(np.diff(cols) == 1)  # contiguous, same tokens, same order
    assert seg.max() <= 5


def test_pack_refuses_what_does_not_fit_and_the_fallback_always_fits():
    seqs = _seqs(1, 8, 10, 16)
    assert packing.pack(seqs, n_shards=1, rows=2, length=16, max_segments=4, pad_id=0) is None
    fallback = packing.pack(seqs, n_shards=1, rows=8, length=16, max_segments=4, pad_id=0)
    assert fallback is not None and (fallback["seg"] > 0).sum() == sum(map(len, seqs))
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack([[5] * 17], n_shards=1, rows=1, length=16, max_segments=4, pad_id=0)


def test_max_segments_caps_a_row():
    seqs = [[7]] * 10
    assert packing.rows_needed([1] * 10, 16, 3) == 4
    out = packing.pack(seqs, n_shards=1, rows=4, length=16, max_segments=3, pad_id=0)
    assert out["seg"].max() == 3 and packing.pack(seqs, n_shards=1, rows=3, length=16, max_segments=3,
                                                  pad_id=0) is None


def test_choose_rows_covers_the_worst_shard_and_the_tail():
    lengths = [[16, 16, 1, 1], [8, 8, 8, 8]]  # shard 0 of batch 0 needs 2 rows of 16, the others 1
    assert packing.choose_rows(lengths, n_shards=2, length=16, max_segments=8, sigmas=0) == 2
    # needs 2, 1, 1, 1: mean 1.25, sd 0.433 -> 6 sigmas: ceil(3.85) = 4, but a shard has only 2 texts
    assert packing.choose_rows(lengths, n_shards=2, length=16, max_segments=8) == 2
    # one shard of 16 texts: needs 3 and 4 rows; loads (tokens / 16) 2.375 and 4: mean 3.1875, sd 0.8125;
    # overhead (whole rows needed beyond the load rounded up) 0 and 0 -> 1 sigma: ceil(3.1875 + 0.8125) = 4
    wide = [[16, 16] + [1] * 6 + [0] * 8, [8] * 8 + [0] * 8]
    assert packing.choose_rows(wide, n_shards=1, length=16, max_segments=16, sigmas=1) == 4
    assert packing.choose_rows(wide, n_shards=1, length=16, max_segments=16, sigmas=0) == 4
    assert packing.choose_rows(wide, n_shards=1, length=16, max_segments=16) == 9  # ceil(3.1875 + 4.875)
    # a placement overhead counts on top of the rounded tail: 3 texts of 9 need 3 rows of 16 for a load of 1.69
    odd = [[9, 9, 9, 0], [9, 9, 9, 0]]
    assert packing.choose_rows(odd, n_shards=1, length=16, max_segments=16, sigmas=1) == 3  # ceil(1.6875) + 1
    assert packing.choose_rows([[4, 4, 4, 4]], n_shards=1, length=16, max_segments=8) == 1


def test_balance_order_deals_equal_counts_and_evens_the_loads():
    rng = np.random.default_rng(5)
    costs = rng.integers(1, 500, size=64).astype(float)
    order = packing.balance_order(costs, 8)
    assert sorted(order.tolist()) == list(range(64))  # the same pairs, another order
    blocks = order.reshape(8, 8)
    assert all(np.all(np.diff(b) > 0) for b in blocks)  # batch order inside a block
    loads, naive = costs[blocks].sum(1), costs.reshape(8, 8).sum(1)
    assert loads.max() - loads.min() < 0.1 * (naive.max() - naive.min())
    assert loads.max() - loads.min() <= costs.max()  # greedy's bound
    np.testing.assert_array_equal(order, packing.balance_order(costs, 8))  # deterministic
    np.testing.assert_array_equal(packing.balance_order(costs, 1), np.arange(64))


def test_pack_pairs_shares_rows_and_maps_both_kinds_back():
    q, p = _seqs(6, 8, 1, 5), _seqs(7, 16, 4, 16)  # 8 queries, 2 passages each, 2 shards
    seqs = packing.joint_blocks(q, p, 2)[0]
    R = max(packing.rows_needed([len(t) for t in seqs[s * 12:(s + 1) * 12]], 16, 6) for s in (0, 1))
    assert R < 12
    out = packing.pack_pairs(q, p, n_shards=2, rows=R, length=16, max_segments=6, pad_id=0)
    assert out["ids"].shape == (2 * R, 16) and out["q_slot"].shape == (8,) and out["p_slot"].shape == (16,)
    assert int((out["seg"] > 0).sum()) == sum(map(len, q + p))
    for texts, slots, per in ((q, out["q_slot"], 4), (p, out["p_slot"], 8)):
        for j, t in enumerate(texts):
            row, k = divmod(int(slots[j]), 6)
            r = (j // per) * R + row  # text j stays in its pair's shard
            assert list(out["ids"][r, out["seg"][r] == k + 1]) == t
    q_rows = {(j // 4) * R + int(s) // 6 for j, s in enumerate(out["q_slot"])}
    p_rows = {(j // 8) * R + int(s) // 6 for j, s in enumerate(out["p_slot"])}
    assert q_rows & p_rows  # some row holds a query and a passage
    tight = packing.pack_pairs(q, p, n_shards=2, rows=1, length=16, max_segments=6, pad_id=0)
    assert tight["ids"].shape == (24, 16) and packing.is_fallback(tight)  # one text per row
    assert not packing.is_fallback(out)
    # another host fell back: this packed batch is re-packed into the fallback shape, the same texts
    again = packing.to_fallback(out, n_shards=2, max_segments=6, pad_id=0)
    assert again.keys() == tight.keys()
    for k in tight:
        np.testing.assert_array_equal(again[k], tight[k], err_msg=k)


def test_segment_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0], [0, 0, 0, 1, 2, 3, 4]])


# ---------------------------------------------------------------------------------------------- vectors
def _vectors(cfg, params, seqs, pooling, bidirectional, length=24, K=6):
    ids, mask = pad_left(seqs, length, 0)
    rows = packing.rows_needed([len(s) for s in seqs], length, K)
    assert rows < len(seqs) // 2
    want = encode(cfg, params, jnp.asarray(ids), jnp.asarray(mask), pooling=pooling, dtype="float32",
                  bidirectional=bidirectional)
    packed = packing.pack(seqs, n_shards=1, rows=rows, length=length, max_segments=K, pad_id=0)
    assert packed is not None
    slots = encode(cfg, params, jnp.asarray(packed["ids"]), jnp.asarray(packed["seg"]), pooling=pooling,
                   dtype="float32", bidirectional=bidirectional, max_segments=K)
    got = gather_slots(slots, jnp.asarray(packed["slot"]))
    return np.asarray(got), np.asarray(want)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_vectors_equal_padded(tmp_path, family):
    tiny_hf_model(family, str(tmp_path))
    cfg, params = load_hf(str(tmp_path))
    # lengths straddle the tiny models' sliding windows (5, 6), so windows inside segments are exercised
    seqs = _seqs(2, 10, 2, 12)
    for pooling in ("last", "mean"):
        got, want = _vectors(cfg, params, seqs, pooling, bidirectional=False)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_packed_vectors_equal_padded_bidirectional(tmp_path):
    tiny_hf_model("gemma3", str(tmp_path), bidirectional=True)
    cfg, params = load_hf(str(tmp_path))
    got, want = _vectors(cfg, params, _seqs(3, 10, 2, 12), "mean", bidirectional=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- train step
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("m") / "model"), family="gemma3")


def _items(n=8):
    return [{"query": p["query"], "task": "scifact", "instruction": None, "positive": p["positive"],
             "negatives": p["negatives"], "index": i} for i, p in enumerate(tiny_pairs(n))]


def _step(model_dir, *, packed: bool, lora: bool, grad_cache: int = 0, mesh_over=("mesh.data=1",)):
    run = load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "model.max_length=48",
                             "model.query_max_length=48", f"lora.enabled={str(lora).lower()}",
                             f"train.grad_cache_chunk={grad_cache}", "data.num_negatives=1",
                             f"data.packing={str(packed).lower()}", "data.pack_max_segments=8", *mesh_over])
    cfg, base = load_hf(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    mesh = make_mesh(run, jax.devices()[: int(np.prod([int(o.split("=")[1]) for o in mesh_over]))])
    trainable, frozen = split_params(base, run, jax.random.PRNGKey(0))
    if lora:  # non-zero B so every adapter leaf gets a gradient
        trainable = jax.tree.map(lambda x: x + 0.01, trainable)
    opt = optax.sgd(1.0)
    before = jax.device_get(trainable)
    state = init_state(run, trainable, opt)
    sh = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, sh)
    frozen = sharding.shard(frozen, mesh)
    items = _items()
    kw = {}
    if packed:
        n = batch_shards(mesh)
        kw = dict(pack_rows=calibrate_packing(tok, run, [items], n), n_local_shards=n)
    host = make_tokenize_fn(tok, run, **kw)(items)
    new, metrics = make_train_step(cfg, run, opt, mesh, sh)(state, frozen, to_global(host, mesh))
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before, jax.device_get(new["trainable"]["model"]))
    return float(metrics["loss"]), treeutil.flatten(grads), host


def _assert_same(a, b):
    (la, ga, _), (lb, gb, _) = a, b
    assert abs(la - lb) <= 1e-5 * max(1.0, abs(lb))
    assert ga.keys() == gb.keys()
    for k in gb:
        scale = max(float(np.abs(gb[k]).max()), 1e-6)
        np.testing.assert_allclose(ga[k], gb[k], atol=1e-5 * scale, rtol=0, err_msg=k)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("lora, grad_cache", [(False, 0), (True, 2), pytest.param(False, 2, marks=SLOW),
                                              pytest.param(True, 0, marks=SLOW)],
                         ids=["full-plain", "lora-gradcache", "full-gradcache", "lora-plain"])
def test_packed_step_equals_padded(model_dir, lora, grad_cache):
    packed = _step(model_dir, packed=True, lora=lora, grad_cache=grad_cache)
    padded = _step(model_dir, packed=False, lora=lora, grad_cache=grad_cache)
    _assert_same(packed, padded)
    host, pad = packed[2], padded[2]
    assert host["ids"].shape[0] < 8 + 16, host["ids"].shape  # fewer rows than 8 queries + 16 passages
    text = (pad["q_mask"] > 0).sum() + (pad["p_mask"] > 0).sum()
    assert int((host["seg"] > 0).sum()) == int(text)
    assert packing.text_share(host["seg"]) > text / (pad["q_mask"].size + pad["p_mask"].size)


@pytest.mark.parametrize("mesh_over, grad_cache", [
    (("mesh.data=2", "mesh.fsdp=4"), 1), pytest.param(("mesh.data=2", "mesh.fsdp=4"), 0, marks=SLOW),
    pytest.param(("mesh.data=8",), 0, marks=SLOW), pytest.param(("mesh.data=8",), 1, marks=SLOW)],
    ids=["data2fsdp4-gradcache", "data2fsdp4-plain", "data8-plain", "data8-gradcache"])
def test_packed_step_on_the_mesh_equals_one_device_padded(model_dir, mesh_over, grad_cache):
    packed = _step(model_dir, packed=True, lora=True, grad_cache=grad_cache, mesh_over=mesh_over)
    padded = _step(model_dir, packed=False, lora=True, grad_cache=0)
    _assert_same(packed, padded)


# ---------------------------------------------------------------------------------------------- plans
def test_plans_count_text_and_packing_computes_less():
    from bmretriever_jax.pods.podplan import step_flops
    from bmretriever_jax.pods.plan import resolve_model_config

    prof = packing.load_profile("pretrain")
    assert len(prof["passage"]) == 5183  # SciFact corpus titles -> abstracts
    common = dict(global_batch=256, group=1, n_shards=4, query_length=512, passage_length=512, max_segments=16)
    padded = packing.plan_packing(prof, packed=False, **common)
    packed = packing.plan_packing(prof, packed=True, **common)
    assert padded["computed_tokens"] == 2 * 256 * 512
    assert padded["text_tokens"] == pytest.approx(packed["text_tokens"])
    # 64 pairs per shard, balanced: whole rows, with room for the tail of the sampled batches' loads
    assert padded["text_share"] < 0.4 and packed["text_share"] > 0.8
    unbalanced = packing.plan_packing(prof, packed=True, balance=False, **common)
    assert unbalanced["text_share"] < packed["text_share"] - 0.05
    cfg = resolve_model_config("pythia-410m")[0]
    over = ["model.name=pythia-410m", "model.max_length=512", "model.query_max_length=512", "lora.enabled=false",
            "train.stage=pretrain", "train.global_batch_size=256", "data.num_negatives=0"]
    fl_pad = step_flops(cfg, load_config(None, over), 4)
    fl_pack = step_flops(cfg, load_config(None, over + ["data.packing=true"]), 4)
    assert fl_pad["tokens"] == padded["computed_tokens"] and fl_pack["tokens"] == packed["computed_tokens"]
    assert fl_pack["executed"] < 0.5 * fl_pad["executed"]
    with pytest.raises(Exception, match="allowed: finetune, pretrain"):
        packing.load_profile("nope")
