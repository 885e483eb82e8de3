"""Prediction: memory, file size and speed of one (shape, quant) on one device profile.

**Units.** Memory (``*_mb`` of RAM, budgets) is MiB (2^20 bytes, like ``ru_maxrss/1024``); ``file_mb`` is 10^6
bytes (like ``GGUFSummary.file_mb``); bandwidth GB/s is 10^9 bytes/s.

**Runtime memory**: ``overhead = runtime_overhead_mb + compute buffer``: a constant for process + library
(calibratable) plus the compute buffer (:func:`compute_buffer_bytes`); on llama.cpp ``U * 4 * (vocab + hidden)``
with ``U = min(ctx, 512)`` the deployed micro-batch, dominated by its F32 logits. Measured (llama.cpp 0.3.36,
flash attention, n_ctx 2048): 9.0 MiB for the dense reference model (vocab 4096: logits alone 8 MiB) and 9.5 MiB
for a per-layer pruned copy — it does not shrink with the MLP width, so pruning is not credited with
compute-buffer savings.
``peak_rss = weights + kv + overhead`` (weights counted fully resident: llama.cpp maps the file; only the
embedding rows actually used are touched, so this over-counts by at most the embedding table).

**Decode latency** for one token at KV position ``P`` (default: the full context, the worst case)::

    bytes/token = weights - token_embd (+ one row) [+ token_embd when tied: it is the output matmul]
                  + kv_read(P) = 2 * sum_l(n_kv_l) * head_dim * P * kv_elem
    decode_ms   = per_token_overhead_ms + L * per_layer_overhead_ms
                  + bytes / (peak_bw * effective_factor)
                  + 4 * sum_l(n_q_l) * head_dim * P / compute_gflops        (attention compute term)

The weight matmuls at batch 1 are memory-bound (their compute scales with the bytes and is absorbed by the
effective factor when calibrated); the attention term grows with ``P`` and is what matters at long contexts on
slow cores. ``bound`` says which of the bandwidth and attention terms is larger.

**Prefill** of ``N`` tokens (default 512 or the context): ``time = overhead(N=1) + weights/bw + N * flops / compute``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import EdgepruneError
from .shapes import model_shape
from .tensor_bytes import kv_cache_bytes, kv_elem_bytes, matmul_params, tensors

MIB = 1 << 20


@dataclass(frozen=True)
class Prediction:
    """Predicted figures for one (shape, quant) on one profile. ``basis`` is 'projected' for every prediction
    (measured figures come from verify and are labelled 'measured' by the caller); ``calibrated`` says whether the
    profile's figures were fitted on a measured host run."""

    quant: str
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    peak_rss_mb: float
    file_mb: float
    decode_tps: float
    prefill_tps: float
    decode_ms: float
    bytes_per_token: int
    bound: str                      # 'memory' or 'compute' (bandwidth term vs attention compute term)
    params: int
    non_embedding_params: int
    profile: str = ""
    basis: str = "projected"
    calibrated: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("peak_rss_mb", "file_mb", "decode_tps", "prefill_tps", "decode_ms"):
            d[k] = round(d[k], 3)
        return d


def kv_read_bytes(n_kv: int, head_dim: int, pos: int, kv_elem: int) -> int:
    """KV cache read per decoded token at position ``pos``: ``2 * n_kv * head_dim * pos * kv_elem`` (K and V)."""
    return 2 * n_kv * head_dim * pos * kv_elem


def attention_flops(n_q: int, head_dim: int) -> int:
    """Attention flops per decoded token and KV position: ``4 * n_q * head_dim`` (scores and weighted sum)."""
    return 4 * n_q * head_dim


def decode_terms_s(bytes_read: float, flops: float, profile) -> tuple[float, float]:
    """(bandwidth term, compute term) of one decode step, seconds: ``bytes / (peak_bw * factor)`` and
    ``flops / compute``; the fixed per-token and per-layer overheads come on top (:func:`predict`)."""
    bw = profile.peak_bandwidth_gbps * profile.effective_bandwidth_factor * 1e9
    return bytes_read / bw, flops / (profile.compute_gflops * 1e9)


def compute_buffer_bytes(ms, ctx: int, runtime: str, is_host: bool = False) -> int:
    """llama.cpp: the deployed micro-batch's F32 logits and hidden rows, ``min(ctx, 512) * 4 * (vocab + hidden)``
    (measured, see the module doc). onnxruntime (not measured here): ``C * 4 * (hidden + max_l n_ff_l)`` with
    ``C = min(ctx, 512)`` (the whole context on the host)."""
    if runtime == "llama.cpp":
        return min(ctx, 512) * 4 * (ms.vocab + ms.hidden)
    max_ff = max((s.intermediate_size for s in ms.layers), default=0)
    return min(ctx, 512 if not is_host else ctx) * 4 * (ms.hidden + max_ff)


def predict(shapes: Any, quant: str, profile, *, kv_tokens: int | None = None, n_prompt: int | None = None,
            n_ctx: int | None = None) -> Prediction:
    """Predict memory, file size and speed (formulas in the module doc).

    ``shapes``: anything :func:`model_shape` accepts. ``n_ctx``: context allocated (default the profile's).
    ``kv_tokens``: KV position at which decode latency is taken (default ``n_ctx``, the worst case; pass the
    measured run's position to compare with a measurement). ``n_prompt``: prefill length (default min(512, ctx)).
    """
    from device_profiles import DeviceProfile, QUANTS

    if not isinstance(profile, DeviceProfile):
        from device_profiles import load_profile

        profile = load_profile(profile)
    ms = model_shape(shapes)
    rt = profile.runtime
    if quant not in QUANTS[rt]:
        raise EdgepruneError(f"quant '{quant}' is not available on runtime {rt}; use one of {', '.join(QUANTS[rt])}")
    ctx = n_ctx or profile.context_length
    pos = ctx if kv_tokens is None else kv_tokens
    n_prompt = n_prompt or min(512, ctx)
    ts = tensors(ms, quant, rt)
    w = sum(t.nbytes for t in ts)
    kv_elem = kv_elem_bytes(quant, rt)
    kv = kv_cache_bytes(ms, ctx, quant, rt)
    compute_buf = compute_buffer_bytes(ms, ctx, rt, profile.is_host)
    overhead = int(profile.runtime_overhead_mb * MIB) + compute_buf
    peak = (w + kv + overhead) / MIB

    emb = next(t for t in ts if t.name == "token_embd.weight")
    read = w - emb.nbytes + emb.nbytes // max(1, emb.ne1)
    if ms.tied and rt == "llama.cpp":
        read += emb.nbytes
    kv_read = kv_read_bytes(sum(s.num_key_value_heads for s in ms.layers), ms.head_dim, pos, kv_elem)
    bpt = read + kv_read
    attn_flops = attention_flops(sum(s.num_attention_heads for s in ms.layers), ms.head_dim)
    fixed_s = (profile.per_token_overhead_ms + ms.n_layers * profile.per_layer_overhead_ms) / 1e3
    t_mem, t_cmp = decode_terms_s(bpt, attn_flops * pos, profile)
    dec_s = fixed_s + t_mem + t_cmp
    pf_flops = n_prompt * 2 * matmul_params(ms) + attn_flops * n_prompt * n_prompt / 2
    pf_mem, pf_cmp = decode_terms_s(read, pf_flops, profile)
    pf_s = fixed_s + pf_mem + pf_cmp
    meta = 4096 + ms.vocab * 24 + len(ts) * 96                 # GGUF header, vocab strings/scores/types, tensor infos
    return Prediction(quant=quant, weight_bytes=w, kv_bytes=kv, overhead_bytes=overhead, peak_rss_mb=peak,
                      file_mb=(w + meta) / 1e6, decode_tps=1 / dec_s, prefill_tps=n_prompt / pf_s,
                      decode_ms=dec_s * 1e3, bytes_per_token=bpt, bound="memory" if t_mem >= t_cmp else "compute",
                      params=ms.total_params, non_embedding_params=ms.non_embedding_params, profile=profile.name,
                      calibrated=profile.calibrated)


def compare(pred: Prediction, measured: dict) -> dict:
    """Side-by-side blocks with the same keys and the relative error (measured - predicted) / measured."""
    keys = ("decode_tps", "prefill_tps", "peak_rss_mb", "file_mb")
    out = {"predicted": {k: round(getattr(pred, k), 3) for k in keys},
           "measured": {k: measured.get(k) for k in keys}, "error_pct": {}}
    for k in keys:
        m = measured.get(k)
        if m:
            out["error_pct"][k] = round(100 * (getattr(pred, k) - m) / m, 2)
    return out

