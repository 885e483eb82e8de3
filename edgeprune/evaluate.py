"""Quality and speed in PyTorch.

Perplexity follows LLM-Pruner's protocol: the evaluation text is tokenized once, cut into non-overlapping
chunks of ``seq_len`` tokens (the trailing partial chunk is dropped), each chunk is scored independently, and

    ppl = exp( mean_over_chunks( mean_over_positions( −log p(x_t | x_<t) ) ) )

Every result records its protocol, e.g. ``ppl.wikitext2.seq128``.
"""
from __future__ import annotations

import math
import time

import torch

from .data import eval_ids


def chunk_ids(ids: torch.Tensor, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seq_len`` chunks of a 1-D token stream ([n, seq_len]; the partial tail is dropped)."""
    n = ids.numel() // seq_len
    if max_chunks:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one {seq_len}-token chunk")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity_ids(model, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 32, max_chunks: int | None = None,
                   progress: bool = False) -> float:
    return math.exp(chunk_nll(model, chunk_ids(ids, seq_len, max_chunks), batch_size, progress).mean().item())


@torch.no_grad()
def chunk_nll(model, chunks: torch.Tensor, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Mean NLL of each chunk ([n, T] token ids) over its positions, float64 [n]."""
    from tqdm import tqdm

    n = chunks.shape[0]
    losses = []
    for b in tqdm(range(0, n, batch_size), desc="ppl", unit="batch", disable=not progress, leave=False):
        x = chunks[b:b + batch_size]
        logits = model(x, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none").view(x.shape[0], -1)
        losses.append(nll.mean(1).double())
    return torch.cat(losses)


def perplexity(model, tokenizer, dataset: str, seq_len: int = 128, max_chunks: int | None = None,
               progress: bool = False) -> float:
    return perplexity_ids(model, eval_ids(tokenizer, dataset), seq_len, max_chunks=max_chunks, progress=progress)


@torch.no_grad()
def generation_speed(model, tokenizer, prompt: str = "Once upon a time", new_tokens: int = 32, warmup: int = 1,
                     repeats: int = 3) -> dict:
    """Greedy generation tokens/s in PyTorch (median of ``repeats``), with the KV cache."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    times = []
    for r in range(warmup + repeats):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        if r >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"decode_tps": new_tokens / times[len(times) // 2], "new_tokens": new_tokens, "protocol": "pytorch-generate"}


def evaluate(model, tokenizer, ppl: list[str] = ("wikitext2",), seq_len: int = 128, tasks: list[str] = (),
             limit: int | None = None, speed: bool = False, max_chunks: int | None = None,
             progress: bool = True) -> dict:
    """Flat result dict with protocol-bearing keys: ``ppl.<set>.seq<L>``, ``zeroshot.<task>``, ``speed.*``."""
    out: dict = {}
    for name in ppl:
        t = time.time()
        out[f"ppl.{name}.seq{seq_len}"] = perplexity(model, tokenizer, name, seq_len, max_chunks, progress)
        out[f"time_s.ppl.{name}"] = round(time.time() - t, 2)
    if tasks:
        from .zeroshot import evaluate_zeroshot

        zs = evaluate_zeroshot(model, tokenizer, list(tasks), limit=limit)
        for k, v in zs.items():
            out[f"zeroshot.{k}"] = v
    if speed:
        for k, v in generation_speed(model, tokenizer).items():
            out[f"speed.{k}"] = v
    out["protocol"] = {"ppl": f"LLM-Pruner: texts joined by '\\n\\n', non-overlapping {seq_len}-token chunks, "
                              "mean chunk NLL" + (f", first {max_chunks} chunks" if max_chunks else "")}
    return out
