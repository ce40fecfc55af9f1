"""Tiny random transformers models of every family, saved to disk (shared by parity and export tests)."""
import json
import os

import torch
import transformers

VOCAB = 97


def tiny_hf_config(family: str, bidirectional: bool = False):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, rotary_pct=0.25, tie_word_embeddings=False)
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False)
    if family == "gemma":
        return transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=32)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
            sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                           "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
            use_bidirectional_attention=bidirectional)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    raise ValueError(family)


def tiny_hf_model(family: str, path: str, bidirectional: bool = False, seed: int = 0):
    """Build, randomise (norm weights too, so offsets are tested) and save a tiny base model; return it."""
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(tiny_hf_config(family, bidirectional))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family.startswith("gemma") else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path)
    return model


def padded_batch(seed: int = 0, batch: int = 3, length: int = 11):
    """Left-padded ids/mask as int64 torch tensors: rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pad = (b * 3) % length
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


WORDS = ("the a of in and to is for with on by as at from that this are was be it claim query passage "
         "represent retrieve documents given scientific support refute gene protein cell cancer drug "
         "patients risk blood heart brain virus covid vaccine study trial dose effect increase decrease "
         "treatment disease mouse human expression level response immune").split()


def save_tiny_tokenizer(path: str):
    """A word-level tokenizer over VOCAB ids (unknown words -> <unk>), saved as transformers files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials)}
    for w in WORDS + [f"w{i}" for i in range(VOCAB)]:
        if len(vocab) >= VOCAB:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def tiny_model_dir(path: str, family: str = "gemma3", seed: int = 0) -> str:
    """A tiny random model + tokenizer folder that every `bmr` command accepts as --model."""
    tiny_hf_model(family, path, seed=seed)
    save_tiny_tokenizer(path)
    return path


def tiny_pairs(n: int = 64, seed: int = 0):
    """Learnable synthetic pairs: the query shares two topic words with its positive passage."""
    import random

    rng = random.Random(seed)
    topics = WORDS[20:]
    out = []
    for i in range(n):
        a, b = rng.sample(topics, 2)
        filler = " ".join(rng.sample(WORDS[:20], 4))
        out.append({"query": f"{a} {b} query", "positive": {"title": "", "text": f"{filler} {a} {b}"},
                    "negatives": [{"title": "", "text": f"{filler} {rng.choice(topics)} {rng.choice(topics)}"}],
                    "task": "scifact"})
    return out


def tiny_beir(root):
    """12 documents on 4 topics, 4 dev queries each judging its topic's 3 documents."""
    os.makedirs(os.path.join(root, "qrels"))
    topics = WORDS[20:]
    with open(os.path.join(root, "corpus.jsonl"), "w") as c, open(os.path.join(root, "queries.jsonl"), "w") as q, \
            open(os.path.join(root, "qrels", "dev.tsv"), "w") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for t in range(4):
            a, b = topics[2 * t], topics[2 * t + 1]
            q.write(json.dumps({"_id": f"q{t}", "text": f"{a} {b} query"}) + "\n")
            for j in range(3):
                c.write(json.dumps({"_id": f"d{t}{j}", "title": "", "text": f"{WORDS[j]} {a} {WORDS[j + 3]} {b}"}) + "\n")
                r.write(f"q{t}\td{t}{j}\t1\n")
    return root
