"""Fit-to-budget planner: predict memory and speed of a (pruned, quantized) model on a device, pick a plan.

Pure functions; nothing here loads weights or runs a model.

**Units.** Memory (``*_mb`` of RAM, budgets) is MiB (2^20 bytes, like ``ru_maxrss/1024``); ``file_mb`` is 10^6
bytes (like ``GGUFSummary.file_mb``); bandwidth GB/s is 10^9 bytes/s.

**Weight bytes** (llama.cpp, GGUF): every tensor the runtime stores, at the type llama.cpp gives it, with block
sizes from ``gguf.constants.GGML_QUANT_SIZES`` (block of ``b`` weights in ``s`` bytes: F32 1/4, F16 1/2,
Q8_0 32/34, Q6_K 256/210, Q5_K 256/176, Q4_K 256/144, Q5_0 32/22, Q5_1 32/24)::

    bytes(tensor) = ne1 * (ne0 / b) * s          ne0 = row length = the Linear's in_features

Per-tensor types follow ``llama_tensor_get_type`` in llama.cpp ``src/llama-quant.cpp`` for the six ftypes
(approximation: the 70B/MoE/imatrix branches are ignored):

* 1-D tensors (norms, biases) stay F32; f32/f16 files store every 2-D tensor at that type.
* output head (``output.weight``, or ``token_embd.weight`` when tied — llama.cpp then uses it as the output):
  Q6_K for q4_k_m/q5_k_m/q6_k (Q8_0 if ``ne0 % 256``), Q8_0 for q8_0.
* q4_k_m / q5_k_m: ``attn_v`` and ``ffn_down`` get Q6_K in the layers where
  ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``; every other 2-D tensor Q4_K / Q5_K.
* fallback (feasibility.md Q3): ``ne0`` not divisible by the type's block size -> Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, and F16 if the fallback's block does not divide either (Q8_0 -> F16 directly).
* a layer with 0 MLP channels is exported with a 32-channel zero FFN (``exporters/gguf.py``), counted as such.

ONNX (onnxruntime): 2-D weights at 4 (fp32), 2 (fp16) or 1 (int8, dynamic quantization incl. the embedding
Gather; scales ignored) bytes; 1-D at 4 (2 for fp16). A tied head is counted twice (assumption: the exported
graph keeps a transposed copy for the MatMul).

**KV cache** at context ``C`` (llama.cpp: F16 cache, ``C`` padded to a multiple of 256)::

    kv_bytes = 2 * sum_l(n_kv_l) * head_dim * C * 2
    onnxruntime: element size 4 (2 for fp16) and x2, because past and present coexist during a step.

**Runtime memory**: ``overhead = runtime_overhead_mb + C_batch * 4 * (hidden + max_l n_ff_l)`` (a constant for
process + library, calibratable; plus the compute buffer touched per batch token, approximate).
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

**Pruned shapes** (:func:`pruned_shape`) are predicted without pruning: remove the fraction ``r`` of the
non-embedding parameters uniformly — every layer keeps ``round(n_kv * (1-r))`` KV groups (at least 1, q heads
follow ``n_rep``) and the MLP width that brings the layer's parameters closest to ``(1-r)`` of the dense layer,
rounded to a multiple of ``mlp_multiple``.

**Policy** (:func:`plan`): walk the allowed quants from best quality (f32 > f16 > q8_0 > q6_k > q5_k_m > q4_k_m;
fp32 > fp16 > int8); for the first quant where some ratio fits every predicted budget (memory, decode latency,
prefill), take the smallest such ratio. ``max_dppl_pct`` cannot be predicted and is checked on the measured
perplexity after pruning/recovery. No fit -> :class:`BudgetError` naming the budget and the shortfall.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import BudgetError, EdgepruneError
from .models import LayerShape

MIB = 1 << 20
DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(15))   # 0.00 .. 0.70
ZERO_FFN_PAD = 32


# ============================================================================================== model shapes
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model: global sizes and per-layer shapes."""

    hidden: int
    vocab: int
    head_dim: int
    tied: bool
    layers: tuple[LayerShape, ...]
    qkv_bias: bool = False
    mlp_bias: bool = False
    name: str = ""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_params(self, s: LayerShape) -> int:
        """q,k,v,o + gate,up,down + 2 norms (+ biases)."""
        H, hd = self.hidden, self.head_dim
        p = 2 * H * s.num_attention_heads * hd + 2 * H * s.num_key_value_heads * hd + 3 * H * s.intermediate_size
        p += 2 * H
        if self.qkv_bias:
            p += (s.num_attention_heads + 2 * s.num_key_value_heads) * hd
        if self.mlp_bias:
            p += 2 * s.intermediate_size + H
        p += H if s.o_proj_bias else 0
        p += H if s.down_proj_bias and not self.mlp_bias else 0
        return p

    @property
    def non_embedding_params(self) -> int:
        """As ``models.count_params``: everything but ``embed_tokens`` and ``lm_head`` (final norm included)."""
        return sum(self.layer_params(s) for s in self.layers) + self.hidden

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.vocab * self.hidden * (1 if self.tied else 2)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [s.to_dict() for s in self.layers]
        return d


def shape_from_config(d: dict, name: str = "") -> ModelShape:
    """A :class:`ModelShape` from a config.json dict (dense or with ``pruning.per_layer``)."""
    from .models import shapes_from_config

    try:
        H, V = int(d["hidden_size"]), int(d["vocab_size"])
        hd = int(d.get("head_dim") or H // int(d["num_attention_heads"]))
        layers = tuple(shapes_from_config(d))
    except (KeyError, TypeError, ValueError) as e:
        raise EdgepruneError(f"config{(' of ' + name) if name else ''}: field {e} is missing or malformed; "
                             "pass a LLaMA-family config.json") from None
    name = name or str(d.get("_name_or_path") or d.get("name_or_path") or "")
    return ModelShape(H, V, hd, bool(d.get("tie_word_embeddings", False)), layers,
                      qkv_bias=d.get("model_type") == "qwen2" or bool(d.get("attention_bias", False)),
                      mlp_bias=bool(d.get("mlp_bias", False)), name=name)


def model_shape(model: Any) -> ModelShape:
    """Accepts a ModelShape, a model directory / config.json path, a config dict, a transformers config, or a
    loaded HF model (shapes read off its modules)."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, (str, Path)):
        p = Path(model)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise EdgepruneError(f"{p}: no config.json found; pass a model directory")
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgepruneError(f"{f} is not valid JSON ({e}); restore the model's config.json") from None
        return shape_from_config(d, name=p.name if p.is_dir() else p.parent.name)
    if isinstance(model, dict):
        return shape_from_config(model)
    if hasattr(model, "model") and hasattr(model, "config") and hasattr(model.model, "layers"):
        from .models import head_dim, layer_shapes

        cfg = model.config
        return ModelShape(cfg.hidden_size, cfg.vocab_size, head_dim(model), bool(getattr(cfg, "tie_word_embeddings", False)),
                          tuple(layer_shapes(model)),
                          qkv_bias=model.model.layers[0].self_attn.q_proj.bias is not None,
                          mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
                          name=Path(str(getattr(model, "name_or_path", "") or "")).name)
    if hasattr(model, "to_dict"):
        return shape_from_config(model.to_dict())
    raise EdgepruneError(f"cannot read model shapes from a {type(model).__name__}; pass a model directory")


def pruned_shape(ms: ModelShape, ratio: float, mlp_multiple: int = 32) -> ModelShape:
    """Predicted shapes after removing ``ratio`` of the non-embedding parameters uniformly (see module doc)."""
    if not 0 <= ratio < 1:
        raise EdgepruneError(f"pruning ratio {ratio} out of range; use 0 <= ratio < 1")
    if ratio == 0:
        return ms
    keep = 1 - ratio
    H, hd = ms.hidden, ms.head_dim
    out = []
    for s in ms.layers:
        n_rep = s.num_attention_heads // s.num_key_value_heads if s.num_key_value_heads else 1
        nkv = max(1, round(s.num_key_value_heads * keep)) if s.num_key_value_heads else 0
        attn = replace(s, num_attention_heads=nkv * n_rep, num_key_value_heads=nkv, intermediate_size=0)
        target = keep * ms.layer_params(s)
        per_ch = ms.layer_params(replace(attn, intermediate_size=1)) - ms.layer_params(attn)
        ff = (target - ms.layer_params(attn)) / per_ch if per_ch else 0
        m = max(1, mlp_multiple)
        ff = int(min(s.intermediate_size, max(m, round(ff / m) * m)))
        if s.intermediate_size < m:
            ff = s.intermediate_size
        out.append(replace(attn, intermediate_size=ff))
    return replace(ms, layers=tuple(out))


# ============================================================================================== tensor bytes
@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne0: int          # row length (in_features); 1-D tensors: their length
    ne1: int          # rows (out_features); 1 for 1-D
    dtype: str        # ggml type name (F32, F16, Q8_0, Q4_K, ...) or onnx element type (FP32, FP16, INT8)
    nbytes: int


def _ggml_sizes() -> dict[str, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {t.name: GGML_QUANT_SIZES[t] for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


LLAMA_BASE = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
ONNX_BYTES = {"fp32": (4, 4), "fp16": (2, 2), "int8": (1, 4)}   # (2-D weights, 1-D tensors)


def _raw_tensors(ms: ModelShape) -> list[tuple[str, int, int]]:
    """(gguf name, ne0, ne1) in file order; 1-D tensors have ne1 = 1 and names ending in norm/bias."""
    H, hd, V = ms.hidden, ms.head_dim, ms.vocab
    t = [("token_embd.weight", H, V)]
    for i, s in enumerate(ms.layers):
        nq, nkv = s.num_attention_heads * hd, s.num_key_value_heads * hd
        ff = s.intermediate_size or ZERO_FFN_PAD
        p = f"blk.{i}."
        t.append((p + "attn_norm.weight", H, 1))
        if s.num_attention_heads:
            t += [(p + "attn_q.weight", H, nq), (p + "attn_k.weight", H, nkv), (p + "attn_v.weight", H, nkv),
                  (p + "attn_output.weight", nq, H)]
            if ms.qkv_bias:
                t += [(p + "attn_q.bias", nq, 1), (p + "attn_k.bias", nkv, 1), (p + "attn_v.bias", nkv, 1)]
            if s.o_proj_bias:
                t.append((p + "attn_output.bias", H, 1))
        t += [(p + "ffn_norm.weight", H, 1), (p + "ffn_gate.weight", H, ff), (p + "ffn_up.weight", H, ff),
              (p + "ffn_down.weight", ff, H)]
        if s.down_proj_bias or ms.mlp_bias:
            t.append((p + "ffn_down.bias", H, 1))
    t.append(("output_norm.weight", H, 1))
    if not ms.tied:
        t.append(("output.weight", H, V))
    return t


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_cpp_tensors(ms: ModelShape, quant: str) -> list[TensorSpec]:
    """Every tensor of the GGUF llama.cpp would hold for ``ms`` at ``quant``, with its type and bytes."""
    if quant not in LLAMA_BASE:
        raise EdgepruneError(f"quant '{quant}' is not a llama.cpp type; use one of {', '.join(LLAMA_BASE)}")
    sizes = _ggml_sizes()
    base = LLAMA_BASE[quant]
    raw = _raw_tensors(ms)
    n_v = sum(1 for n, *_ in raw if n.endswith("attn_v.weight"))
    n_down = sum(1 for n, *_ in raw if n.endswith("ffn_down.weight"))
    i_v = i_down = 0
    out = []
    for name, ne0, ne1 in raw:
        if ne1 == 1:
            typ = "F32"
        elif quant in ("f32", "f16"):
            typ = base
        else:
            typ = base
            is_output = name == "output.weight" or (ms.tied and name == "token_embd.weight")
            if is_output:
                if ne0 % 256:
                    typ = "Q8_0"
                elif base != "Q8_0":
                    typ = "Q6_K"
            elif name.endswith("attn_v.weight"):
                if quant in ("q4_k_m", "q5_k_m") and _use_more_bits(i_v, n_v):
                    typ = "Q6_K"
                i_v += 1
            elif name.endswith("ffn_down.weight"):
                if quant in ("q4_k_m", "q5_k_m") and _use_more_bits(i_down, n_down):
                    typ = "Q6_K"
                i_down += 1
            if ne0 % sizes[typ][0]:
                typ = FALLBACK.get(typ, "F16")
                if ne0 % sizes[typ][0]:
                    typ = "F16"
        blk, tsz = sizes[typ]
        out.append(TensorSpec(name, ne0, ne1, typ, ne1 * (ne0 // blk) * tsz))
    return out


def onnx_tensors(ms: ModelShape, quant: str) -> list[TensorSpec]:
    if quant not in ONNX_BYTES:
        raise EdgepruneError(f"quant '{quant}' is not an onnxruntime type; use one of {', '.join(ONNX_BYTES)}")
    w2, w1 = ONNX_BYTES[quant]
    raw = _raw_tensors(ms)
    if ms.tied:
        raw.append(("output.weight", ms.hidden, ms.vocab))
    return [TensorSpec(n, a, b, quant.upper() if b > 1 else ("FP16" if w1 == 2 else "FP32"), a * b * (w2 if b > 1 else w1))
            for n, a, b in raw]


def tensors(ms: ModelShape, quant: str, runtime: str) -> list[TensorSpec]:
    return llama_cpp_tensors(ms, quant) if runtime == "llama.cpp" else onnx_tensors(ms, quant)


def weight_bytes(ms: ModelShape, quant: str, runtime: str = "llama.cpp") -> int:
    """Sum of tensor bytes as the runtime stores them (see module doc)."""
    return sum(t.nbytes for t in tensors(ms, quant, runtime))


def kv_elem_bytes(quant: str, runtime: str) -> int:
    return 2 if runtime == "llama.cpp" or quant == "fp16" else 4


def kv_bytes(ms: ModelShape, n_tokens: int, quant: str = "f16", runtime: str = "llama.cpp",
             flash_attn: bool = True) -> int:
    """``(sum_l n_kv_l + sum_l v_l) * head_dim * n_tokens * elem`` (K and V).

    llama.cpp without flash attention pads every layer's V cache to the largest per-layer V width when the
    widths differ ("padding V cache"; seen in its log for per-layer pruned models), so there ``v_l = max_l n_kv_l``
    for layers that have attention; otherwise ``v_l = n_kv_l``. edgeprune measures (and so predicts) llama.cpp as
    deployed, with flash attention on (llama.cpp's default where the backend supports it): no padding.
    """
    kv = [s.num_key_value_heads for s in ms.layers]
    v = kv
    if runtime == "llama.cpp" and not flash_attn and len(set(k for k in kv if k)) > 1:
        v = [max(kv) if k else 0 for k in kv]
    return (sum(kv) + sum(v)) * ms.head_dim * n_tokens * kv_elem_bytes(quant, runtime)


def kv_alloc_tokens(ctx: int, runtime: str) -> int:
    return -(-ctx // 256) * 256 if runtime == "llama.cpp" else ctx


def matmul_params(ms: ModelShape) -> int:
    """Weights multiplied per token: all layer projections + the output head (the embedding is a gather)."""
    H, hd = ms.hidden, ms.head_dim
    per = sum(2 * H * s.num_attention_heads * hd + 2 * H * s.num_key_value_heads * hd + 3 * H * s.intermediate_size
              for s in ms.layers)
    return per + ms.vocab * H


# ============================================================================================== prediction
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
    kv = kv_bytes(ms, kv_alloc_tokens(ctx, rt), quant, rt) * (2 if rt == "onnxruntime" else 1)
    max_ff = max((s.intermediate_size for s in ms.layers), default=0)
    compute_buf = min(ctx, 512 if not profile.is_host else ctx) * 4 * (ms.hidden + max_ff)
    overhead = int(profile.runtime_overhead_mb * MIB) + compute_buf
    peak = (w + kv + overhead) / MIB

    emb = next(t for t in ts if t.name == "token_embd.weight")
    read = w - emb.nbytes + emb.nbytes // max(1, emb.ne1)
    if ms.tied and rt == "llama.cpp":
        read += emb.nbytes
    kv_read = 2 * sum(s.num_key_value_heads for s in ms.layers) * ms.head_dim * pos * kv_elem
    bpt = read + kv_read
    attn_flops = 4 * sum(s.num_attention_heads for s in ms.layers) * ms.head_dim
    bw = profile.peak_bandwidth_gbps * profile.effective_bandwidth_factor * 1e9
    fixed_s = (profile.per_token_overhead_ms + ms.n_layers * profile.per_layer_overhead_ms) / 1e3
    t_mem, t_cmp = bpt / bw, attn_flops * pos / (profile.compute_gflops * 1e9)
    dec_s = fixed_s + t_mem + t_cmp
    pf_flops = n_prompt * 2 * matmul_params(ms) + attn_flops * n_prompt * n_prompt / 2
    pf_s = fixed_s + read / bw + pf_flops / (profile.compute_gflops * 1e9)
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


# ============================================================================================== planning
@dataclass(frozen=True)
class Candidate:
    quant: str
    ratio: float                     # requested fraction of non-embedding params removed
    achieved_ratio: float            # what the predicted shapes actually remove
    prediction: Prediction
    fits: dict[str, bool]            # budget name -> predicted to be met
    shortfall: dict[str, float]      # budget name -> amount over (positive = violated)

    @property
    def feasible(self) -> bool:
        return all(self.fits.values())

    def to_dict(self) -> dict:
        return {"quant": self.quant, "ratio": self.ratio, "achieved_ratio": round(self.achieved_ratio, 4),
                "feasible": self.feasible, "fits": self.fits,
                "shortfall": {k: round(v, 3) for k, v in self.shortfall.items()},
                "prediction": self.prediction.to_dict()}


@dataclass
class PlanResult:
    profile: str
    runtime: str
    model: str
    dense_params: int
    dense_non_embedding_params: int
    budgets: dict[str, float | None]
    candidates: list[Candidate]
    chosen: Candidate | None
    chosen_shapes: ModelShape | None
    explanation: str
    refusal: str | None = None
    policy: str = ("least pruning at the best-quality quant that fits every predicted budget "
                   "(max_memory_mb, max_decode_ms_per_token, min_prefill_tps)")
    notes: list[str] = field(default_factory=list)
    calibrated: bool = False
    mlp_multiple: int = 32

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.feasible]

    def to_dict(self) -> dict:
        return {"profile": self.profile, "runtime": self.runtime, "model": self.model,
                "dense_params": self.dense_params, "dense_non_embedding_params": self.dense_non_embedding_params,
                "budgets": self.budgets, "policy": self.policy, "calibrated": self.calibrated,
                "mlp_multiple": self.mlp_multiple,
                "chosen": None if self.chosen is None else {"quant": self.chosen.quant, "ratio": self.chosen.ratio,
                                                            "achieved_ratio": round(self.chosen.achieved_ratio, 4),
                                                            "prediction": self.chosen.prediction.to_dict(),
                                                            "per_layer": [s.to_dict() for s in self.chosen_shapes.layers]},
                "explanation": self.explanation, "refusal": self.refusal, "notes": self.notes,
                "table": [c.to_dict() for c in self.candidates]}


def _check(pred: Prediction, profile, margin: float = 0.0) -> tuple[dict[str, bool], dict[str, float]]:
    b, k = profile.budgets, 1 - margin
    short = {"max_memory_mb": pred.peak_rss_mb - b.max_memory_mb * k,
             "max_decode_ms_per_token": pred.decode_ms - b.max_decode_ms_per_token * k}
    if b.min_prefill_tps is not None:
        short["min_prefill_tps"] = b.min_prefill_tps / k - pred.prefill_tps
    return {k: v <= 0 for k, v in short.items()}, short


_UNITS = {"max_memory_mb": "MB", "max_decode_ms_per_token": "ms/token", "min_prefill_tps": "tok/s"}


def plan(model: Any, profile, ratios: Iterable[float] | None = None, *, mlp_multiple: int = 32,
         strict: bool = True, margin_pct: float = 0.0) -> PlanResult:
    """Predict every (allowed quant, ratio) and choose by the policy in the module doc.

    ``model``: a model directory, config dict, HF model or :class:`ModelShape` (dense shapes; if already pruned,
    ratios are relative to it). ``margin_pct`` demands that predictions beat each budget by that many percent.
    Raises :class:`BudgetError` (exit 3) with a one-line reason when nothing fits and
    ``strict``; the full :class:`PlanResult` is attached as ``err.result``.
    """
    from device_profiles import DeviceProfile, load_profile

    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    ms = model_shape(model)
    ratios = sorted(set(DEFAULT_RATIOS if ratios is None else (round(float(r), 4) for r in ratios)))
    for r in ratios:
        if not 0 <= r < 1:
            raise EdgepruneError(f"ratio {r} out of range; ratios must lie in [0, 1)")
    dense_ne = ms.non_embedding_params
    cands: list[Candidate] = []
    shapes_at: dict[float, ModelShape] = {}
    for q in profile.quants_best_first():
        for r in ratios:
            ps = shapes_at.setdefault(r, pruned_shape(ms, r, mlp_multiple))
            p = predict(ps, q, profile)
            fits, short = _check(p, profile, margin_pct / 100)
            cands.append(Candidate(q, r, 1 - ps.non_embedding_params / dense_ne, p, fits, short))
    chosen = next((c for q in profile.quants_best_first() for c in cands if c.quant == q and c.feasible), None)
    b = profile.budgets
    budgets = {"max_memory_mb": b.max_memory_mb, "max_decode_ms_per_token": b.max_decode_ms_per_token,
               "min_prefill_tps": b.min_prefill_tps, "max_dppl_pct": b.max_dppl_pct}
    notes = [f"memory and speed are projected for {profile.name} "
             f"({'calibrated on a measured host run' if profile.calibrated else 'uncalibrated figures'}); "
             f"decode latency is taken at the full context ({profile.context_length} tokens)"]
    if b.max_dppl_pct is not None:
        notes.append(f"max_dppl_pct {b.max_dppl_pct:g}% is not predicted; it is checked on measured perplexity "
                     "after pruning and recovery")
    res = PlanResult(profile.name, profile.runtime, ms.name, ms.total_params, dense_ne, budgets, cands, chosen,
                     shapes_at.get(chosen.ratio) if chosen else None, "", notes=notes, calibrated=profile.calibrated,
                     mlp_multiple=mlp_multiple)
    if chosen is not None:
        res.explanation = _explain(res, profile, chosen)
        return res
    res.refusal = res.explanation = _refusal(res, profile, ms)
    if strict:
        err = BudgetError(res.refusal)
        err.result = res
        raise err
    return res


def _explain(res: PlanResult, profile, c: Candidate) -> str:
    p = c.prediction
    better = [q for q in profile.quants_best_first() if q != c.quant][: profile.quants_best_first().index(c.quant)]
    why_q = (f"; better-quality {', '.join(better)} fit no ratio up to {max(x.ratio for x in res.candidates):.0%}"
             if better else "")
    why_r = "no pruning needed" if c.ratio == 0 else (
        f"{c.ratio:.0%} is the least pruning that fits (achieved {c.achieved_ratio:.1%} of non-embedding params)")
    parts = [f"memory {p.peak_rss_mb:.1f} MB <= {profile.budgets.max_memory_mb:g} MB",
             f"decode {p.decode_ms:.2f} ms/token <= {profile.budgets.max_decode_ms_per_token:g}"]
    if profile.budgets.min_prefill_tps is not None:
        parts.append(f"prefill {p.prefill_tps:.0f} tok/s >= {profile.budgets.min_prefill_tps:g}")
    return (f"chose {c.quant} at ratio {c.ratio:.2f} on {profile.name}: {why_r}{why_q}; projected "
            + ", ".join(parts) + ".")


def _refusal(res: PlanResult, profile, ms: ModelShape) -> str:
    """Which budget cannot be met, and by how much at the most favourable (quant, ratio)."""
    parts = []
    for k in ("max_memory_mb", "max_decode_ms_per_token", "min_prefill_tps"):
        vals = [c for c in res.candidates if k in c.shortfall]
        if not vals:
            continue
        best = min(vals, key=lambda c: c.shortfall[k])
        if best.shortfall[k] > 0:
            lim = getattr(profile.budgets, k)
            parts.append(f"{k} {lim:g} {_UNITS[k]} is missed by {best.shortfall[k]:.3g} {_UNITS[k]} "
                         f"({100 * best.shortfall[k] / lim:.0f}%) even at {best.quant} with {best.ratio:.0%} pruning")
    if not parts:   # each budget alone is reachable, but never together
        mem_ok = [c for c in res.candidates if c.fits["max_memory_mb"]]
        c = min(mem_ok, key=lambda c: c.shortfall["max_decode_ms_per_token"])
        bad = [k for k, ok in c.fits.items() if not ok]
        parts.append(f"no (quant, ratio) meets all budgets together; closest is {c.quant} at {c.ratio:.0%}, which "
                     f"misses {', '.join(f'{k} by {c.shortfall[k]:.3g} {_UNITS[k]}' for k in bad)}")
    return (f"no plan fits {profile.name} for {ms.name or 'the model'} ({ms.total_params / 1e6:.1f}M params, quants "
            f"{'/'.join(profile.quants_best_first())}, ratios up to {max(c.ratio for c in res.candidates):.0%}): "
            + "; ".join(parts) + "; relax the budget, allow a smaller quant, or use a smaller model")


def format_table(result: PlanResult) -> str:
    """Text table: one row per ratio, one column per quant; each cell 'MEM MB / DECODE ms' and a mark
    ('*' chosen, 'ok' fits, or the letters of the missed budgets: M memory, L latency, P prefill)."""
    quants = list(dict.fromkeys(c.quant for c in result.candidates))
    ratios = list(dict.fromkeys(c.ratio for c in result.candidates))
    cell = {(c.quant, c.ratio): c for c in result.candidates}
    letters = {"max_memory_mb": "M", "max_decode_ms_per_token": "L", "min_prefill_tps": "P"}
    w = 22
    b = result.budgets
    lines = [f"profile {result.profile} ({result.runtime}); model {result.model or '?'} "
             f"{result.dense_params / 1e6:.2f}M params; budgets: memory <= {b['max_memory_mb']:g} MB, "
             f"decode <= {b['max_decode_ms_per_token']:g} ms/token"
             + (f", prefill >= {b['min_prefill_tps']:g} tok/s" if b.get("min_prefill_tps") else "")
             + ("  [calibrated]" if result.calibrated else "  [projected, uncalibrated]"),
             "cells: peak MB / decode ms per token; * chosen, ok fits, M/L/P = misses memory/latency/prefill",
             "ratio " + "".join(f"{q:>{w}}" for q in quants)]
    for r in ratios:
        row = f"{r:5.2f} "
        for q in quants:
            c = cell[(q, r)]
            p = c.prediction
            mark = "*" if c is result.chosen else ("ok" if c.feasible else
                                                    "".join(letters[k] for k, ok in c.fits.items() if not ok))
            row += f"{f'{p.peak_rss_mb:.1f}/{p.decode_ms:.2f} {mark}':>{w}}"
        lines.append(row)
    lines.append(("chosen: " + result.explanation) if result.chosen else ("REFUSED: " + (result.refusal or "")))
    return "\n".join(lines)


# ============================================================================================== host calibration
@dataclass(frozen=True)
class HostRun:
    """One measured run on the host (from ``exporters.verify.verify``): the model's shapes and quant, and what
    was measured. ``kv_tokens`` is the mean KV position during the timed decode steps; ``n_ctx`` the context
    the runtime allocated; ``n_prompt`` the prefill length timed."""

    model: Any
    quant: str
    decode_tps: float
    peak_rss_mb: float
    file_mb: float | None = None
    prefill_tps: float | None = None
    n_ctx: int | None = None
    kv_tokens: int | None = None
    n_prompt: int | None = None


@dataclass(frozen=True)
class HostCalibration:
    runtime: str
    effective_bandwidth_factor: float
    runtime_overhead_mb: float
    per_token_overhead_ms: float
    per_layer_overhead_ms: float
    compute_gflops: float
    n_runs: int
    residuals: dict[str, list[float]]
    notes: list[str]

    def figures(self):
        from device_profiles import Figure

        src = f"calibrated: fitted on {self.n_runs} measured host run(s)"
        return {"effective_bandwidth_factor": Figure(self.effective_bandwidth_factor, src),
                "runtime_overhead_mb": Figure(self.runtime_overhead_mb, src),
                "per_token_overhead_ms": Figure(self.per_token_overhead_ms, src),
                "per_layer_overhead_ms": Figure(self.per_layer_overhead_ms, src),
                "compute_gflops": Figure(self.compute_gflops, src)}

    def to_dict(self) -> dict:
        return asdict(self)


def host_run_from_verify(result: Any, model: Any, quant: str, **kw) -> HostRun:
    """Build a :class:`HostRun` from a verify result (attributes or dict: ``speed.decode_tps``,
    ``speed.prefill_tps``, ``memory.peak_rss_mb``, ``file_mb``)."""
    def get(obj, *path):
        for k in path:
            if obj is None:
                return None
            obj = obj.get(k) if isinstance(obj, dict) else getattr(obj, k, None)
        return obj

    return HostRun(model, quant, float(get(result, "speed", "decode_tps")), float(get(result, "memory", "peak_rss_mb")),
                   file_mb=get(result, "file_mb"), prefill_tps=get(result, "speed", "prefill_tps"), **kw)


def calibrate_host(runs: HostRun | Sequence[HostRun], profile="host", *, save: bool = False) -> HostCalibration:
    """Fit the host's effective-bandwidth factor, fixed per-token cost, memory overhead and compute throughput
    from measured runs.

    * decode: ``1000/decode_tps = a + bytes_per_token / (peak_bw * f)``. With >= 2 runs of different
      bytes/token, least squares gives ``a`` (split into the profile's per-token/per-layer proportions) and ``f``;
      with one run ``a`` keeps the profile's value and ``f`` is solved (if the run is faster than ``a`` allows,
      ``a`` is halved until the bandwidth term is positive).
    * memory: ``runtime_overhead_mb = mean(peak_rss - weights - kv - compute buffer)``.
    * compute: from prefill, ``gflops = mean(flops / (t_prefill - a - read/bw))`` when prefill was measured.
    ``save=True`` stores the figures so that ``load_profile('host')`` (and ``base: host`` profiles) use them.
    """
    from device_profiles import DeviceProfile, load_profile

    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile, calibration=False)
    runs = [runs] if isinstance(runs, HostRun) else list(runs)
    if not runs:
        raise EdgepruneError("calibrate_host needs at least one measured run")
    notes: list[str] = []
    base = replace(profile, effective_bandwidth_factor=1.0, runtime_overhead_mb=0.0,
                   per_token_overhead_ms=0.0, per_layer_overhead_ms=0.0)
    rows = []
    for r in runs:
        if r.decode_tps <= 0 or r.peak_rss_mb <= 0:
            raise EdgepruneError(f"measured run has impossible figures (decode_tps={r.decode_tps}, "
                                 f"peak_rss_mb={r.peak_rss_mb}); re-run verify")
        ms = model_shape(r.model)
        ctx = r.n_ctx or profile.context_length
        p = predict(ms, r.quant, base, n_ctx=ctx, kv_tokens=r.kv_tokens if r.kv_tokens is not None else 64,
                    n_prompt=r.n_prompt)
        rows.append((r, ms, p))
    # decode: t_ms = a + b * MB, b = 1 / (GB/s) in ms/MB
    xs = [p.bytes_per_token / 1e6 for _, _, p in rows]
    # measured time minus the (small) attention compute term the prediction adds on top of the fit
    ys = [1000 / r.decode_tps - (p.decode_ms - p.bytes_per_token / (profile.peak_bandwidth_gbps * 1e6))
          for r, _, p in rows]
    L = rows[0][1].n_layers
    a_prof = profile.per_token_overhead_ms + L * profile.per_layer_overhead_ms
    if len(rows) >= 2 and max(xs) - min(xs) > 0.05 * max(xs):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        if b <= 0 or a < 0:
            notes.append(f"decode fit degenerate (a={a:.3g} ms, b={b:.3g} ms/MB); using one-point fit")
            b = None
    else:
        b = None
    if b is None:
        a = a_prof
        # one point cannot split fixed cost from the bandwidth term: keep the fixed cost to at most a quarter of
        # the measured time (feasibility.md Q5 measured 16% for a 135M model and a few % for 1B on this machine
        # kind), so that speedups of smaller variants are not mistaken for fixed overhead
        while a > 1e-4 and any(y - a <= 0.75 * y for y in ys):
            a /= 2
        b = sum((y - a) / x for x, y in zip(xs, ys)) / len(xs)
        if a != a_prof:
            notes.append(f"fixed per-token cost lowered from {a_prof:.3g} to {a:.3g} ms to fit the measured speed")
    eff_gbps = 1 / b                      # (MB/ms) = GB/s
    factor = eff_gbps / profile.peak_bandwidth_gbps
    if factor > 1:
        notes.append(f"effective bandwidth {eff_gbps:.1f} GB/s exceeds the probed peak "
                     f"{profile.peak_bandwidth_gbps:.1f} GB/s (model fits in cache); peak raised to match")
    split = a / a_prof if a_prof > 0 else 0.0
    per_tok = profile.per_token_overhead_ms * split if a_prof > 0 else a
    per_layer = profile.per_layer_overhead_ms * split if a_prof > 0 else 0.0
    overhead = [r.peak_rss_mb - p.peak_rss_mb for r, _, p in rows]
    ov = sum(overhead) / len(overhead)
    if ov < 0:
        notes.append(f"measured RSS is below the predicted weights + KV by {-ov:.1f} MB (pages not touched); "
                     "overhead set to 0")
        ov = 0.0
    gfl = []
    for r, ms, p in rows:
        if r.prefill_tps:
            n = r.n_prompt or min(512, r.n_ctx or profile.context_length)
            t = n / r.prefill_tps - a / 1e3 - p.bytes_per_token / (eff_gbps * 1e9)
            hd_fl = 4 * sum(s.num_attention_heads for s in ms.layers) * ms.head_dim
            if t > 0:
                gfl.append((n * 2 * matmul_params(ms) + hd_fl * n * n / 2) / t / 1e9)
    gflops = sum(gfl) / len(gfl) if gfl else profile.compute_gflops
    cal = HostCalibration(profile.runtime, round(min(factor, 1.0), 4), round(ov, 2), round(per_tok, 4),
                          round(per_layer, 5), round(gflops, 1), len(rows),
                          {"decode_ms": [round(y - (a + b * x), 4) for x, y in zip(xs, ys)],
                           "peak_rss_mb": [round(o - ov, 3) for o in overhead]}, notes)
    if factor > 1:
        # keep factor <= 1 by raising the peak: record it through the profile on save
        cal = replace(cal, notes=cal.notes + [f"peak_bandwidth_gbps={eff_gbps:.2f}"])
    if save:
        from device_profiles import Figure
        from device_profiles.host import save_calibration

        figs = cal.figures()
        if factor > 1:
            figs["peak_bandwidth_gbps"] = Figure(round(eff_gbps, 3), figs["compute_gflops"].source)
        save_calibration(profile.runtime, figs)
    return cal


def apply_calibration(profile, cal: HostCalibration):
    """The profile with the calibrated figures (what ``load_profile`` does with a saved calibration)."""
    figs = cal.figures()
    for n in cal.notes:
        if n.startswith("peak_bandwidth_gbps="):
            from device_profiles import Figure

            figs["peak_bandwidth_gbps"] = Figure(float(n.split("=")[1]), figs["compute_gflops"].source)
    return replace(profile.with_figures(**figs), calibrated=True)
