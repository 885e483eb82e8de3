"""Perplexity on a runtime that finishes: a seeded sample of chunks, evaluated in batches, with its 95% interval.

Protocol (LLM-Pruner's, as :mod:`edgeprune.evaluate`): the text is tokenized once and cut into N non-overlapping
``seq_len``-token chunks; chunk c scores ``m_c`` = mean NLL over its positions; ``ppl = exp(mean_c m_c)``.

Sampling: k of the N chunks drawn without replacement (``numpy.random.default_rng(seed)``), evaluated in index
order. With ``m̄`` the sample mean and ``s`` the sample standard deviation of ``m_c``,

    se = s / √k · √(1 − k/N)          (finite-population correction: k = N gives se = 0, the whole-text figure)
    ppl ≈ exp(m̄),  95% interval  [exp(m̄ − 1.96·se), exp(m̄ + 1.96·se)]   (normal approximation to the mean)

Runtime vs PyTorch on the same chunks is a *paired* comparison: ``d_c = m_c^rt − m_c^pt`` and
``delta_pct = 100·(exp(d̄) − 1)`` (= ``100·(ppl_rt/ppl_pt − 1)``), its interval from the standard error of ``d̄``
the same way; it is much tighter than either perplexity's own interval.

Batching: runtimes with ``batch_logits(chunks [B, T])`` (onnxruntime; llama.cpp through several sequences in one
``llama_decode``) score B chunks per call; the batch is capped so that B·T·V float32 logits stay under
``MAX_BATCH_BYTES``.

The one-call fast path for quality estimates (the planner's candidates): :func:`artifact_ppl`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_CHUNKS = 64       # verify's default sample (``--ppl-chunks all`` for the whole text)
Z95 = 1.959964
MAX_BATCH_BYTES = 256 * 2 ** 20
MAX_BATCH = 8


@dataclass
class PplEstimate:
    """exp(mean chunk NLL) over ``chunks`` of ``total_chunks`` chunks, with the 95% interval [lo, hi]."""

    ppl: float
    lo: float
    hi: float
    chunks: int
    total_chunks: int
    seq_len: int
    seed: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_ids(ids, seq_len: int = 128) -> np.ndarray:
    """All non-overlapping ``seq_len`` chunks of a 1-D token stream, [N, seq_len] (partial tail dropped)."""
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(a) // seq_len
    if n == 0:
        from edgeprune.errors import EdgepruneError

        raise EdgepruneError(f"text has {len(a)} tokens, fewer than one {seq_len}-token chunk; use a longer text")
    return a[: n * seq_len].reshape(n, seq_len)


def sample_indices(total: int, k: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of k chunks out of ``total`` (all of them when k is None or >= total)."""
    if k is None or k >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))


def _interval(mean: float, sd: float, k: int, total: int) -> tuple[float, float]:
    se = 0.0 if k <= 1 else sd / math.sqrt(k) * math.sqrt(max(0.0, 1 - k / total))
    return mean - Z95 * se, mean + Z95 * se


def estimate(nll: np.ndarray, total: int, seq_len: int, seed: int | None = 0) -> PplEstimate:
    """Perplexity and its 95% interval from per-chunk mean NLLs of a sample of ``total`` chunks."""
    nll = np.asarray(nll, dtype=np.float64)
    m = float(nll.mean())
    lo, hi = _interval(m, float(nll.std(ddof=1)) if len(nll) > 1 else 0.0, len(nll), total)
    return PplEstimate(math.exp(m), math.exp(lo), math.exp(hi), len(nll), total, seq_len,
                       seed if len(nll) < total else None)


def paired_delta(nll_rt: np.ndarray, nll_pt: np.ndarray, total: int) -> tuple[float, float, float]:
    """(delta_pct, lo, hi): 100·(ppl_rt/ppl_pt − 1) on the same chunks, with its paired 95% interval."""
    d = np.asarray(nll_rt, np.float64) - np.asarray(nll_pt, np.float64)
    m = float(d.mean())
    lo, hi = _interval(m, float(d.std(ddof=1)) if len(d) > 1 else 0.0, len(d), total)
    return 100 * math.expm1(m), 100 * math.expm1(lo), 100 * math.expm1(hi)


def batch_size(rt, seq_len: int) -> int:
    """Chunks per runtime call: 1 without ``batch_logits``, else as many as fit MAX_BATCH_BYTES of logits."""
    if not hasattr(rt, "batch_logits"):
        return 1
    v = getattr(rt, "vocab", None) or 32000
    return max(1, min(MAX_BATCH, MAX_BATCH_BYTES // (seq_len * v * 4)))


def runtime_nll(rt, chunks: np.ndarray, progress: bool = False, desc: str = "runtime ppl") -> np.ndarray:
    """Mean NLL of each chunk ([k, T] token ids) from the runtime's logits, in batches where it allows it."""
    from tqdm import tqdm

    from .runtimes import log_softmax_nll

    b = batch_size(rt, chunks.shape[1])
    out = []
    with tqdm(total=len(chunks), desc=desc, unit="chunk", disable=not progress, leave=False) as bar:
        for s in range(0, len(chunks), b):
            x = chunks[s:s + b]
            lg = rt.batch_logits(x) if b > 1 else rt.logits(x[0])[None]
            out += [float(log_softmax_nll(lg[i], x[i]).mean()) for i in range(len(x))]
            bar.update(len(x))
    return np.asarray(out)


def torch_nll(model, chunks: np.ndarray, batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Mean NLL of each chunk in PyTorch (:func:`edgeprune.evaluate.chunk_nll`)."""
    import torch

    from edgeprune.evaluate import chunk_nll

    return chunk_nll(model, torch.as_tensor(chunks), batch_size, progress).numpy()


def artifact_ppl(artifact, ids, seq_len: int = 128, chunks: int | None = DEFAULT_CHUNKS, seed: int = 0,
                 threads: int = 2, kv: str = "f16", progress: bool = False) -> tuple[PplEstimate, np.ndarray]:
    """Fast runtime perplexity of an exported artifact (GGUF file or ONNX dir) on token ids ``ids``: a seeded
    sample of ``chunks`` chunks (None: all), batched. Returns the estimate and the per-chunk NLLs (index order of
    :func:`sample_indices` with the same seed), so a caller can pair them with another model's on the same chunks.
    GGUFs run with the default F16 KV cache (``kv``), as deployed."""
    from .runtimes import open_runtime

    all_chunks = chunk_ids(ids, seq_len)
    idx = sample_indices(len(all_chunks), chunks, seed)
    rt = open_runtime(artifact, threads=threads, kv=kv, n_ctx=max(256, seq_len))
    try:
        nll = runtime_nll(rt, all_chunks[idx], progress=progress)
    finally:
        rt.close()
    return estimate(nll, len(all_chunks), seq_len, seed), nll

