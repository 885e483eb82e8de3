"""Shared fixtures for the exporter tests: tiny pruned models saved with a real SentencePiece tokenizer (the
reference model's, vocab 4096) or a freshly trained byte-level BPE tokenizer (vocab 300, model vocab 320)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from edgeprune.paths import reference_model_dir
from edgeprune.surgery import apply_plan
from edgeprune.testing import random_plan, save_tiny, tiny_model

SPM_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXT = ("The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers. "
        "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. ") * 20
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_bpe_tokenizer(out: Path, vocab: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             special_tokens=[])
    tk.train_from_iterator([TEXT], tr)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT
    fast.save_pretrained(str(out))


def make_model(tmp: Path, name: str, kind: str = "gqa", bias: bool = False, tied: bool = False, tok: str = "spm",
               prune: bool = True, seed: int = 1, edit=None, **kw):
    """A tiny (optionally randomly per-layer pruned) model saved under tmp/name; returns (model, dir)."""
    vocab = 4096 if tok == "spm" else 320
    m = tiny_model(kind, bias=bias, tied=tied, vocab=vocab, seed=seed, **kw)
    if prune:
        plan = random_plan(m, seed=seed)
        means = None
        if edit is not None:
            means = edit(plan, m)
        apply_plan(m, plan, bias_means=means)
    d = tmp / name
    save_tiny(m, d)
    if tok == "spm":
        for f in SPM_FILES:
            shutil.copy(reference_model_dir() / f, d / f)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (d / f).unlink(missing_ok=True)
        write_bpe_tokenizer(d)
    from edgeprune.models import load

    return load(d), d


def ref_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(model, ids, n: int) -> list[int]:
    with torch.no_grad():
        g = model.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return g[0, len(ids):].tolist()


def prompt_ids(vocab: int, n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()
