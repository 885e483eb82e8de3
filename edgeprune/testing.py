"""Tiny random models for tests and benchmarks (no downloads): MHA/GQA, with or without q/k/v bias, tied or not,
and a random per-layer pruning of them. Also builders for public model *shapes* (random weights)."""
from __future__ import annotations

from pathlib import Path

import torch

from .groups import Plan, model_groups
from .models import save

SHAPES = {
    # hidden, layers, heads, kv heads, ffn, vocab, tied  (from the public config.json files)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
}


def tiny_config(kind: str = "gqa", bias: bool = False, tied: bool = False, layers: int = 4, hidden: int = 64,
                heads: int = 4, kv_heads: int | None = None, ffn: int = 96, vocab: int = 128):
    """kind: 'gqa' (LLaMA, heads/2 KV heads), 'mha' (LLaMA), 'qwen2' (q/k/v bias), 'mistral'."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kv = kv_heads or (heads // 2 if kind in ("gqa", "qwen2", "mistral") else heads)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=256,
                  head_dim=hidden // heads, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":
        cfg = Qwen2Config(**common)
    elif kind == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    else:
        cfg = LlamaConfig(**common, attention_bias=bias)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def tiny_model(kind: str = "gqa", bias: bool = False, tied: bool = False, seed: int = 0, std: float = 0.08, **kw):
    """A random model whose logits are not flat (weights ~ N(0, std))."""
    import transformers

    cfg = tiny_config(kind, bias, tied, **kw)
    torch.manual_seed(seed)
    m = getattr(transformers, cfg.architectures[0])(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0, std)
    return m.eval()


def shaped_model(name: str, layers: int | None = None, dtype=torch.float32, seed: int = 0):
    """A random LlamaForCausalLM with a public model's shape (optionally fewer layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SHAPES[name])
    if layers:
        s["num_hidden_layers"] = layers
    cfg = LlamaConfig(**s, head_dim=s["hidden_size"] // s["num_attention_heads"], max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(dtype)
    return m.eval()


def random_plan(model, seed: int = 0, keep_frac: tuple[float, float] = (0.5, 1.0), multiple: int = 1) -> Plan:
    """A random non-uniform plan (each layer keeps >= 1 KV group)."""
    g = torch.Generator().manual_seed(seed)
    kv, mlp = [], []
    for lg in model_groups(model):
        f = keep_frac[0] + (keep_frac[1] - keep_frac[0]) * torch.rand(2, generator=g)
        nk = max(1, round(lg.n_kv * float(f[0])))
        nm = max(multiple, round(lg.n_mlp * float(f[1]) / multiple) * multiple)
        kv.append(sorted(torch.randperm(lg.n_kv, generator=g)[:nk].tolist()))
        mlp.append(sorted(torch.randperm(lg.n_mlp, generator=g)[:min(nm, lg.n_mlp)].tolist()))
    return Plan(kv, mlp, {"method": "random", "seed": seed})


def write_tokenizer(out: Path, vocab: int = 128) -> None:
    """A minimal word-level fast tokenizer (no download) for tiny test models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))


def save_tiny(model, out: Path, provenance: dict | None = None) -> Path:
    """Save a tiny model with a word-level tokenizer, in the edgeprune format."""
    out = Path(out)
    save(model, out, provenance=provenance or {"source": "random"}, overwrite=True)
    write_tokenizer(out, model.config.vocab_size)
    return out
