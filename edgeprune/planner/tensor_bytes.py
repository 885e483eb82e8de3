"""Tensor bytes: what each tensor of a (pruned) model costs on the runtime, and the KV cache.

**Units.** ``*_bytes`` are bytes; callers convert to MiB (RAM) or 10^6 bytes (file sizes).

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

So one KV group of layer ``l`` costs its weights *and* ``2 * C * head_dim * elem`` bytes of cache; an MLP channel
only its weights (:func:`group_bytes`; :func:`kv_cache_bytes` is the cache as allocated, what memory counts).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgepruneError
from .shapes import ModelShape

ZERO_FFN_PAD = 32   # channels of the zero FFN the GGUF writer gives a layer with none (llama.cpp 'deci')


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


def kv_cache_bytes(ms: ModelShape, ctx: int, quant: str = "f16", runtime: str = "llama.cpp") -> int:
    """The KV cache the runtime holds at context ``ctx``: :func:`kv_bytes` at :func:`kv_alloc_tokens` (llama.cpp
    pads the context to a multiple of 256), x2 on onnxruntime (past and present coexist during a step)."""
    return kv_bytes(ms, kv_alloc_tokens(ctx, runtime), quant, runtime) * (2 if runtime == "onnxruntime" else 1)


ATTN_GROUP_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q.bias",
                      "attn_k.bias", "attn_v.bias")
MLP_CHANNEL_TENSORS = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def layer_module_bytes(ms: ModelShape, quant: str, runtime: str) -> tuple[list[int], list[int]]:
    """Per layer, the bytes of the tensors KV groups own (q/k/v/o and the q/k/v biases) and of those MLP channels
    own (gate/up/down), at the types the runtime stores them (:func:`tensors`)."""
    attn, mlp = [0] * ms.n_layers, [0] * ms.n_layers
    for t in tensors(ms, quant, runtime):
        if t.name.startswith("blk."):
            i, rest = t.name[4:].split(".", 1)
            if rest in ATTN_GROUP_TENSORS:
                attn[int(i)] += t.nbytes
            elif rest in MLP_CHANNEL_TENSORS:
                mlp[int(i)] += t.nbytes
    return attn, mlp


def group_bytes(ms: ModelShape, quant: str, runtime: str, ctx: int) -> tuple[list[float], list[float]]:
    """Per layer i, what one KV group and one MLP channel cost on the runtime, in bytes::

        kv[i]  = attn_tensor_bytes_i / n_kv_i + kv_cache_bytes(ms, ctx) / sum_l n_kv_l
        mlp[i] = ffn_tensor_bytes_i / n_mlp_i

    averaged over the dense layer's tensors at their runtime types (a pruned row length can change a K-quant
    tensor's fallback type; the planner prices the real pruned shapes with :func:`tensors`, this is the rate the
    allocator trades units at). KV cache per group: linear in the groups with flash attention (no V padding)."""
    attn, mlp = layer_module_bytes(ms, quant, runtime)
    n_kv = sum(s.num_key_value_heads for s in ms.layers)
    per_group_cache = kv_cache_bytes(ms, ctx, quant, runtime) / n_kv if n_kv else 0.0
    kv = [a / s.num_key_value_heads + per_group_cache if s.num_key_value_heads else 0.0
          for a, s in zip(attn, ms.layers)]
    return kv, [m / s.intermediate_size if s.intermediate_size else 0.0 for m, s in zip(mlp, ms.layers)]


def matmul_params(ms: ModelShape) -> int:
    """Weights multiplied per token: all layer projections + the output head (the embedding is a gather)."""
    H, hd = ms.hidden, ms.head_dim
    per = sum(2 * H * s.num_attention_heads * hd + 2 * H * s.num_key_value_heads * hd + 3 * H * s.intermediate_size
              for s in ms.layers)
    return per + ms.vocab * H

