"""Export for the PyTorch world: transformers (every family), sentence-transformers and PEFT load our exports and give
our vectors (max abs difference <= 1e-4, fp32); runs (LoRA and full fine-tunes, Orbax) export like model folders; the
import of an export gives back the same tree; errors name what is wrong."""
import json
import os
import re

import jax
import numpy as np
import pytest

from bmretriever_jax.cli import main as bmr
import torch
import transformers
from safetensors.numpy import save_file

from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.convert import export as ex
from bmretriever_jax.models import lora
from bmretriever_jax.util import treeutil
from bmretriever_jax.config import LoraSection, RunConfig, to_dict
from bmretriever_jax.convert.hf import load_hf, save_hf
from bmretriever_jax.embed import Encoder, format_passage, format_query, instruction_for, pad_left, tokenize
from hf_tiny import tiny_model_dir

FAMILIES = ["gpt_neox", "llama", "mistral", "gemma", "gemma3", "qwen3"]
QUERIES = ["gene protein query", "blood pressure in patients", ""]
DOCS = [{"title": "", "text": "the cancer cell expression level"}, {"title": "", "text": "virus vaccine dose effect"},
        {"title": "", "text": " ".join(["immune response"] * 40)}]  # longer than max_length: truncated
MAX_LEN = 24


# ------------------------------------------------------------------------------------------------ helpers
def flat_max_diff(a, b):
    fa, fb = treeutil.flatten(a), treeutil.flatten(b)
    assert set(fa) == set(fb), sorted(set(fa) ^ set(fb))
    return max(float(np.abs(np.asarray(fa[k], np.float32) - np.asarray(fb[k], np.float32)).max()) for k in fa)


def write_settings(folder, **kw):
    s = {"pooling": "last", "normalize": True, "max_length": MAX_LEN, "bidirectional": False, "base_model": None,
         "lora": None, **kw}
    with open(os.path.join(folder, "bmretriever.json"), "w") as f:
        json.dump(s, f)


def random_adapters(params, lcfg, seed=0):
    """Adapters with non-zero lora_b (init gives zeros, which would hide any mistake)."""
    ad = treeutil.flatten(jax.tree.map(np.asarray, lora.init(params, lcfg, jax.random.key(seed))))
    rng = np.random.default_rng(seed)
    return {k: v if k.endswith("lora_a") else rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in ad.items()}


def lora_expert(path, family, *, seed=0, rslora=False, rank=3, base=None):
    """A model folder as `bmr train` writes it for a LoRA run: merged weights + adapter.safetensors + settings.
    Returns (base folder, folder, LoraConfig, flat adapters)."""
    base = base or tiny_model_dir(str(path) + "_base", family)
    cfg, params = load_hf(base)
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank, rslora=rslora)
    flat = random_adapters(params, lcfg, seed)
    merged = jax.tree.map(np.asarray, lora.merge(params, treeutil.unflatten(flat), lcfg))
    save_hf(cfg, merged, str(path))
    ex.copy_tokenizer(base, str(path))
    write_settings(str(path), base_model=base, lora={"enabled": True, "rank": rank, "alpha": 2.0 * rank,
                                                     "rslora": rslora, "dropout": 0.0, "targets": list(lcfg.targets)})
    save_file(flat, os.path.join(str(path), ex.ADAPTER_FILE))
    return base, str(path), lcfg, flat


def fake_run(path, base, trainable, *, lcfg=None, step=5, max_length=MAX_LEN):
    """A training run folder with one Orbax checkpoint (as training/loop.py writes it) holding `trainable` (adapters with
    lora on, else full-fine-tune leaves), without training."""
    run = RunConfig(out=str(path))
    run.model.name, run.model.max_length = base, max_length
    run.lora = LoraSection(enabled=lcfg is not None, **({} if lcfg is None else dict(
        rank=lcfg.rank, alpha=lcfg.alpha, rslora=lcfg.rslora, targets=list(lcfg.targets))))
    cfg, _ = load_hf(base)
    state = {"step": np.int32(step), "trainable": {"model": treeutil.unflatten(dict(trainable))},
             "opt_state": {"count": np.int32(step)}}
    meta = {"config": to_dict(run), "model_folder": base, "model_config": cfg.to_dict()}
    with ckpt.manager(os.path.join(str(path), "checkpoints"), async_save=False) as m:
        ckpt.save(m, step, state, {"position": 0}, meta)
        m.wait_until_finished()
    return str(path)


def torch_vectors(model, tokenizer, texts, max_length=MAX_LEN, pooling="last"):
    """Our pipeline (template-free texts, EOS appended, left padding, pooling, L2 norm) on a transformers model."""
    seqs = tokenize(tokenizer, texts, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = pad_left(seqs, max(len(s) for s in seqs), pad)
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    h = h.float()
    v = h[:, -1] if pooling == "last" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(v, dim=-1).numpy()


def our_texts(instruction):
    return [format_query(q, instruction) for q in QUERIES] + [format_passage(d) for d in DOCS]


# ------------------------------------------------------------------------------------------------- hf
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip_every_family(family, tmp_path):
    base, folder, lcfg, flat = lora_expert(tmp_path / "expert", family)
    cfg, params = load_hf(folder)
    out = ex.export(folder, str(tmp_path / "hf"), "hf")
    # import of the export gives back the same tree
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg and flat_max_diff(params, params2) == 0.0
    # transformers.AutoModel runs it and gives our vectors (our Encoder on the export: its tree is the source's)
    model = transformers.AutoModel.from_pretrained(out).eval()
    ours = Encoder.load(out, dtype="float32", quiet=True)
    assert ours.max_length == MAX_LEN  # bmretriever.json travelled with the weights
    texts = our_texts(instruction_for("scifact"))
    vecs = ours.encode_texts(texts)
    assert np.abs(torch_vectors(model, ours.tokenizer, texts) - vecs).max() <= 1e-4
    assert os.path.exists(os.path.join(out, ex.ADAPTER_FILE))


def test_lora_run_export_folds_the_adapter(tmp_path):
    base = tiny_model_dir(str(tmp_path / "base"), "gemma3")
    cfg, params = load_hf(base)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    flat = random_adapters(params, lcfg, seed=3)
    run = fake_run(tmp_path / "run", base, flat, lcfg=lcfg)
    want = jax.tree.map(np.asarray, lora.merge(params, treeutil.unflatten(flat), lcfg))
    for i, src in enumerate([run, os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "5")]):
        source = ex.open_source(src)
        assert source.step == 5 and source.lora == lcfg and source.settings["max_length"] == MAX_LEN
        out = ex.export(source, str(tmp_path / f"hf{i}"), "hf")
        assert flat_max_diff(load_hf(out)[1], want) <= 1e-6
    # the run's adapter exports to PEFT and imports back unchanged
    peft_dir = ex.export(run, str(tmp_path / "peft"), "peft")
    lcfg2, tree = ex.load_peft(peft_dir, cfg)
    assert (lcfg2.rank, lcfg2.alpha, lcfg2.rslora) == (4, 8.0, False)
    assert flat_max_diff(tree, treeutil.unflatten(flat)) == 0.0
    assert json.load(open(os.path.join(peft_dir, "adapter_config.json")))["base_model_name_or_path"] == base
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
        ex.open_source(run, step=7)
    # a run given relative to the working directory (`bmr merge-search --models runs/x`): Orbax needs
    # absolute paths, open_source makes them so
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        source = ex.open_source("run")
        assert source.step == 5
        out = ex.export(source, str(tmp_path / "hf_rel"), "hf")
    finally:
        os.chdir(cwd)
    assert flat_max_diff(load_hf(out)[1], want) <= 1e-6


def test_full_finetune_run_streams_trained_leaves(tmp_path):
    # GPT-NeoX with only q (and the embedding) trained: the fused query_key_value mixes trained q with base k, v
    base = tiny_model_dir(str(tmp_path / "base"), "gpt_neox")
    cfg, params = load_hf(base)
    flat = treeutil.flatten(params)
    rng = np.random.default_rng(0)
    trained = {p: flat[p] + rng.normal(0, 0.1, flat[p].shape).astype(np.float32)
               for p in ("layers/attn/q/kernel", "embed/embedding", "layers/mlp/up/bias")}
    run = fake_run(tmp_path / "run", base, trained)
    source = ex.open_source(run)
    assert source.adapters is None
    out = ex.export(source, str(tmp_path / "hf"), "hf")
    assert flat_max_diff(load_hf(out)[1], treeutil.unflatten({**flat, **trained})) == 0.0
    with pytest.raises(ValueError, match="no LoRA adapter"):
        ex.export(run, str(tmp_path / "peft"), "peft")


# ------------------------------------------------------------------------------------ sentence-transformers
@pytest.mark.parametrize("family,pooling", [("gemma3", "last"), ("llama", "mean")])
def test_sentence_transformers_gives_our_vectors(family, pooling, tmp_path):
    from sentence_transformers import SentenceTransformer

    base, folder, _, _ = lora_expert(tmp_path / "expert", family, seed=1)
    write_settings(folder, pooling=pooling, lora=json.load(open(os.path.join(folder, "bmretriever.json")))["lora"])
    out = ex.export(folder, str(tmp_path / "st"), "sentence-transformers", instruction="scifact")
    st = SentenceTransformer(out, device="cpu")
    ours = Encoder.load(out, dtype="float32", quiet=True)  # the same folder: its tokenizer files are untouched
    assert ours.pooling == pooling
    q_ours = ours.encode_queries(QUERIES, "scifact")
    assert np.abs(st.encode(QUERIES, prompt_name="query") - q_ours).max() <= 1e-4
    assert np.abs(st.encode(QUERIES, prompt_name="scifact") - q_ours).max() <= 1e-4
    nf = ours.encode_queries(QUERIES, "nfcorpus")
    assert np.abs(st.encode(QUERIES, prompt_name="nfcorpus") - nf).max() <= 1e-4
    texts = [d["text"] for d in DOCS]
    p_ours = ours.encode_passages(DOCS)
    assert np.abs(st.encode(texts, prompt_name="passage") - p_ours).max() <= 1e-4
    assert np.abs(st.encode_document(texts) - p_ours).max() <= 1e-4
    # the long passage really was truncated (the edge the tokenizer arguments must get right)
    assert len(tokenize(ours.tokenizer, [format_passage(DOCS[2])], 10_000)[0]) > MAX_LEN
    assert st.max_seq_length == MAX_LEN and st.tokenizer.padding_side == "left"
    with open(os.path.join(out, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode_lasttoken"] is (pooling == "last")


def test_sentence_transformers_refuses_what_it_cannot_express(tmp_path):
    folder = tiny_model_dir(str(tmp_path / "m"), "llama")
    write_settings(folder, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional llama"):
        ex.export(folder, str(tmp_path / "st"), "sentence-transformers")
    assert not os.path.exists(tmp_path / "st")


# ----------------------------------------------------------------------------------------------------- peft
@pytest.mark.parametrize("family,rslora", [("llama", False), ("gpt_neox", True)])
def test_peft_adapter_gives_our_vectors(family, rslora, tmp_path):
    import peft

    base, folder, lcfg, flat = lora_expert(tmp_path / "expert", family, seed=2, rslora=rslora)
    out = ex.export(folder, str(tmp_path / "peft"), "peft")
    c = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (c["peft_type"], c["task_type"], c["r"], c["use_rslora"]) == ("LORA", "FEATURE_EXTRACTION", 3, rslora)
    assert c["base_model_name_or_path"] == base
    if family == "llama":
        assert c["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    else:  # GPT-NeoX's fused q/k/v: one adapter of rank 3r with alpha keeping the scale
        assert c["rank_pattern"] == {"query_key_value": 9}
    model = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(base), out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    texts = our_texts(instruction_for("nfcorpus"))
    cfg, params = load_hf(base)
    merged = lora.merge(params, treeutil.unflatten(flat), lcfg)
    ours = Encoder(cfg, merged, tok, max_length=MAX_LEN, dtype="float32").encode_texts(texts)
    assert np.abs(torch_vectors(model, tok, texts) - ours).max() <= 1e-4
    # and the adapter really matters: the base model alone is far off
    assert np.abs(torch_vectors(transformers.AutoModel.from_pretrained(base).eval(), tok, texts) - ours).max() > 1e-2
    # import of the export gives back the same adapter tree
    lcfg2, tree = ex.load_peft(out, cfg)
    assert (lcfg2.rank, lcfg2.alpha, lcfg2.rslora) == (lcfg.rank, lcfg.alpha, rslora)
    assert flat_max_diff(tree, treeutil.unflatten(flat)) == 0.0


# ------------------------------------------------------------------------------------------ errors and CLI
def test_errors_name_the_problem(tmp_path):
    folder = tiny_model_dir(str(tmp_path / "m"), "qwen3")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        ex.export(folder, str(tmp_path / "x"), "onnx")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        ex.export(folder, str(tmp_path / "p"), "peft")
    ex.export(folder, str(tmp_path / "hf"), "hf")
    with pytest.raises(FileExistsError, match="not empty"):
        ex.export(folder, str(tmp_path / "hf"), "hf")
    with pytest.raises(FileNotFoundError, match="unknown model"):
        ex.export(str(tmp_path / "nowhere"), str(tmp_path / "y"), "hf")
    # a checkpoint missing a tensor is named
    from safetensors.numpy import load_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj.weight"):
        ex.open_source(str(broken))


def test_cli_export(tmp_path, capsys):
    import argparse

    from bmretriever_jax.cli import merging

    p = argparse.ArgumentParser()
    p.add_argument("-q", "--quiet", action="store_true")
    merging.add_commands(p.add_subparsers(dest="cmd"))
    base, folder, _, _ = lora_expert(tmp_path / "expert", "llama")
    a = p.parse_args(["-q", "export", folder, "--format", "peft", "--out", str(tmp_path / "peft")])
    a.fn(a)
    assert "peft export written" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(SystemExit):
        p.parse_args(["export", folder, "--format", "onnx", "--out", str(tmp_path / "x")])
    capsys.readouterr()
    assert bmr(["-q", "export", base, "--format", "peft", "--out", str(tmp_path / "y")]) == 2
    assert re.match(r"bmr export: error: .*no LoRA adapter[^\n]*\n$", capsys.readouterr().err)
