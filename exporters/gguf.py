"""GGUF writer for dense and per-layer pruned LLaMA-family models, and quantization through llama.cpp.

Facts this module relies on (llama.cpp ``src/llama-model.cpp``, ``src/models/{llama,deci}.cpp``,
``src/llama-quant.cpp``, read at the version vendored by llama-cpp-python 0.3.36):

* Arch ``llama`` sizes every layer's tensors and graph from layer 0 (``hparams.n_head()``), so it only serves
  models whose layers all have the same shape. Arch ``deci`` reads ``head_count``, ``head_count_kv`` and
  ``feed_forward_length`` per layer (arrays) for tensors, graph and KV cache.
* Both create optional ``attn_q/k/v.bias`` (sized per layer), ``attn_output.bias`` and ``ffn_down.bias``
  ({n_embd}) and add them in the graph, so Qwen2's q/k/v biases and FLAP's bias compensation are exported exactly.
* deci: ``n_ff == 0`` skips the *whole* layer, attention output included (``continue`` before the residual), and
  ``n_head == 0`` means attention-free. A layer with zero MLP channels is therefore written with a **zero-weight
  FFN of 32 channels** (gate = up = down = 0 gives silu(0)·0 = 0, exact), and reported as padded. A layer with
  zero attention heads is written attention-free, or with one zero head carrying the o_proj bias (see
  :func:`plan_layers`).
* llama.cpp applies RoPE to adjacent pairs (GGML "normal" mode) while HF rotates halves, so q/k rows (and the
  q/k biases) are permuted per head: ``w.reshape(n, 2, hd/2, ...).swapaxes(1, 2)``.
* Quantization fallback (``tensor_type_fallback``): a tensor whose row length ``ne[0]`` (= the Linear's
  ``in_features``: hidden, n_q·head_dim for attn_output, n_ff for ffn_down) is not divisible by the block size
  of its target type (32 for Q8_0, 256 for K-quants) falls back: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, and to F16
  when the row length is not a multiple of 32 either.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.planner.tensor_bytes import ZERO_FFN_PAD  # noqa: F401  (one home: the padded zero FFN width)

META_APPROX, META_CONTEXT = "edgeprune.approximations", "edgeprune.max_context"   # accepted approximations
GGUF_FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}   # llama_ftype values
FLOATS = ("f32", "f16")
BLOCK = {"q8_0": 32, "q4_k_m": 256, "q5_k_m": 256, "q6_k": 256}
META_MAX_CHARS = 256          # free-text metadata (general.name, ...): one line, capped
TEMPLATE_MAX_CHARS = 65536    # tokenizer.chat_template keeps its newlines/tabs (Jinja needs them), capped


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Fallback:
    tensor: str
    row_len: int
    wanted: str          # the type llama.cpp wanted (from its log; the nominal type if the log was not seen)
    got: str             # the type actually stored
    bytes: int           # bytes stored
    bytes_wanted: int    # bytes at the wanted type
    predicted: bool      # the row-length rule predicted it
    logged: bool         # llama.cpp logged it as a fallback (output.weight is re-typed silently, see quantize)


@dataclass
class QuantReport:
    quant: str
    n_tensors_quantized: int
    fallbacks: list[Fallback] = field(default_factory=list)
    predicted_not_seen: list[str] = field(default_factory=list)   # rule says fallback, file disagrees (expect [])
    growth_bytes: int = 0
    seconds: float = 0.0

    @property
    def growth_mb(self) -> float:
        return self.growth_bytes / 1e6


@dataclass
class GGUFSummary:
    path: str
    arch: str
    quant: str
    file_mb: float
    n_layers: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    tokenizer: str
    biases: list[str]
    padded_ffn_layers: list[int]
    notes: list[str]
    attn_free_layers: list[int] = field(default_factory=list)
    padded_attn_layers: list[int] = field(default_factory=list)
    quant_report: QuantReport | None = None
    approximations: list[str] = field(default_factory=list)   # accepted with --max-context (exporters.features)
    max_context: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.quant_report is not None:
            d["quant_report"]["growth_mb"] = round(self.quant_report.growth_mb, 4)
            d["quant_report"]["n_fallbacks"] = len(self.quant_report.fallbacks)
        return d


# ----------------------------------------------------------------------------------------------- tensors
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGML adjacent-pair order, per head (works for weights [n·hd, H] and biases)."""
    if n_head == 0:
        return w
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).cpu().numpy()


def _layer_tensors(layer, hd: int, pad_ffn: bool, attn: str = "keep") -> dict[str, np.ndarray]:
    """GGUF tensors of one layer; ``attn`` is "keep", "free" (no attention tensors) or "pad" (one zero head)."""
    a, m = layer.self_attn, layer.mlp
    H = layer.input_layernorm.weight.shape[0]
    nq, nkv = a.q_proj.out_features // hd, a.k_proj.out_features // hd
    t = {"ffn_norm.weight": _np(layer.post_attention_layernorm.weight)}
    if attn == "pad":
        z = np.zeros((hd, H), np.float32)
        t.update({"attn_norm.weight": _np(layer.input_layernorm.weight), "attn_q.weight": z, "attn_k.weight": z,
                  "attn_v.weight": z, "attn_output.weight": np.zeros((H, hd), np.float32),
                  "attn_output.bias": _np(a.o_proj.bias) if a.o_proj.bias is not None else np.zeros(H, np.float32)})
    elif attn == "keep":
        t.update({"attn_norm.weight": _np(layer.input_layernorm.weight),
                  "attn_q.weight": permute_qk(_np(a.q_proj.weight), nq),
                  "attn_k.weight": permute_qk(_np(a.k_proj.weight), nkv),
                  "attn_v.weight": _np(a.v_proj.weight),
                  "attn_output.weight": _np(a.o_proj.weight)})
    if attn == "keep" and a.q_proj.bias is not None:
        t["attn_q.bias"] = permute_qk(_np(a.q_proj.bias), nq)
        t["attn_k.bias"] = permute_qk(_np(a.k_proj.bias), nkv)
        t["attn_v.bias"] = _np(a.v_proj.bias)
    if attn == "keep" and a.o_proj.bias is not None:
        t["attn_output.bias"] = _np(a.o_proj.bias)
    if pad_ffn:
        t["ffn_gate.weight"] = np.zeros((ZERO_FFN_PAD, H), np.float32)
        t["ffn_up.weight"] = np.zeros((ZERO_FFN_PAD, H), np.float32)
        t["ffn_down.weight"] = np.zeros((H, ZERO_FFN_PAD), np.float32)
    else:
        t["ffn_gate.weight"] = _np(m.gate_proj.weight)
        t["ffn_up.weight"] = _np(m.up_proj.weight)
        t["ffn_down.weight"] = _np(m.down_proj.weight)
    for name in ("gate_proj", "up_proj"):
        if getattr(m, name).bias is not None:
            if pad_ffn:
                raise EdgepruneError("a zero-MLP layer with gate/up biases cannot be represented; remove mlp_bias")
            t[f"ffn_{name.split('_')[0]}.bias"] = _np(getattr(m, name).bias)
    if m.down_proj.bias is not None:
        t["ffn_down.bias"] = _np(m.down_proj.bias)
    return t


def _rope(cfg) -> tuple[dict, np.ndarray | None]:
    """RoPE hyper-parameters; for Llama-3 scaling also the per-frequency divisors llama.cpp reads as rope_freqs.

    llama3 rule per frequency f (wavelength λ = 2π/f): λ < L/hf -> 1; λ > L/lf -> factor; else smoothly
    1 / ((1-s)/factor + s) with s = (L/λ - lf)/(hf - lf), L = original_max_position_embeddings.
    """
    theta = float(getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    rs = getattr(cfg, "rope_scaling", None) or {}
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    hd = cfg.head_dim
    out = {"theta": theta, "kind": kind}
    if kind == "default":
        return out, None
    if kind == "linear":
        out["factor"] = float(rs["factor"])
        return out, None
    if kind == "llama3":
        factor, lf, hf = float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        L = float(rs.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        div = []
        for f in freqs:
            lam = 2 * math.pi / f
            if lam < L / hf:
                div.append(1.0)
            elif lam > L / lf:
                div.append(factor)
            else:
                s = (L / lam - lf) / (hf - lf)
                div.append(1.0 / ((1 - s) / factor + s))
        return out, np.asarray(div, np.float32)
    raise EdgepruneError(f"rope_scaling type '{kind}' is not supported by the GGUF exporter (default, linear, llama3 are)")


# ----------------------------------------------------------------------------------------------- vocab
def _tok_json(src: Path) -> dict | None:
    p = src / "tokenizer.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _added(tj: dict | None) -> dict[int, tuple[str, bool]]:
    return {t["id"]: (t["content"], bool(t.get("special"))) for t in (tj or {}).get("added_tokens", [])}


def _pad(tokens: list, scores: list, types: list, V: int) -> None:
    import gguf

    if len(tokens) > V:
        raise EdgepruneError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {V}; "
                             "the tokenizer does not belong to this model")
    for i in range(len(tokens), V):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)


def _vocab_spm(w, src: Path, V: int) -> None:
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.NORMAL)
    for i, (content, special) in sorted(_added(_tok_json(src)).items()):
        ttype = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        if i < len(tokens):
            types[i] = ttype if special else types[i]
            continue
        while len(tokens) < i:
            tokens.append(f"[PAD{len(tokens)}]".encode()); scores.append(-1000.0); types.append(gguf.TokenType.UNUSED)
        tokens.append(content.encode("utf-8")); scores.append(0.0); types.append(ttype)
    _pad(tokens, scores, types, V)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def _byte_level(node: dict | None) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_byte_level(n) for n in node.get("pretokenizers", []) or [])


def _split_regexes(node: dict | None) -> list[str]:
    if not node:
        return []
    out = []
    if node.get("type") == "Split":
        out.append((node.get("pattern") or {}).get("Regex", ""))
    for n in node.get("pretokenizers", []) or []:
        out += _split_regexes(n)
    return out


def bpe_pre(tj: dict) -> str:
    """llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json, from its split regex:
    Llama-3 splits digits in runs of 1-3 (``\\p{N}{1,3}``) -> ``llama-bpe``; Qwen2 splits single digits
    (``\\p{N}`` after the letter rules) -> ``qwen2``; plain ByteLevel regex -> ``gpt-2``."""
    rx = " ".join(_split_regexes(tj.get("pre_tokenizer")))
    if not rx:
        return "gpt-2"
    if "\\p{N}{1,3}" in rx:
        return "llama-bpe"
    if "\\p{L}+|\\p{N}|" in rx:
        return "qwen2"
    return "default"


def _vocab_bpe(w, src: Path, tj: dict, V: int) -> str:
    import gguf

    vocab = dict(tj["model"]["vocab"])
    added = _added(tj)
    for i, (content, _) in added.items():
        vocab[content] = i
    by_id = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode()); types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i].encode("utf-8"))
            types.append((gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED) if i in added
                         else gguf.TokenType.NORMAL)
        scores.append(0.0)
    _pad(tokens, scores, types, V)
    pre = bpe_pre(tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    return pre


def write_vocab(w, src: Path, V: int) -> str:
    """SentencePiece (``tokenizer.model``) or byte-level BPE (``tokenizer.json``), plus special token ids,
    add_bos/add_eos and the chat template (via ``gguf.SpecialVocab``). Returns a description."""
    import gguf

    tj = _tok_json(src)
    if (src / "tokenizer.model").is_file():
        _vocab_spm(w, src, V)
        kind = "spm"
        merges = False
    elif tj and tj.get("model", {}).get("type") == "BPE" and _byte_level(tj.get("pre_tokenizer")):
        kind = f"bpe/{_vocab_bpe(w, src, tj, V)}"
        merges = True
    else:
        what = (tj or {}).get("model", {}).get("type", "none")
        raise EdgepruneError(f"{src}: tokenizer type '{what}' cannot be written to GGUF; llama.cpp needs a "
                             "SentencePiece tokenizer.model or a byte-level BPE tokenizer.json")
    import logging

    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)   # "Unknown separator token" chatter
    sv = gguf.SpecialVocab(src, load_merges=merges, n_vocab=V)
    sv.add_to_gguf(w, quiet=True)
    return kind


# ----------------------------------------------------------------------------------------------- metadata
def sanitize_meta(text, keep_newlines: bool = False, limit: int = META_MAX_CHARS) -> str:
    """A metadata string as it may be written into a GGUF: control/format characters removed (newlines and tabs
    too unless ``keep_newlines``), whitespace collapsed on one line, at most ``limit`` characters. Names come from
    folder names and downloaded configs, and end up in other tools' logs and UIs."""
    import unicodedata

    keep = "\n\t" if keep_newlines else ""
    s = "".join(c if c in keep or unicodedata.category(c)[0] != "C" else " " for c in str(text))
    if not keep_newlines:
        s = " ".join(s.split())
    return s[:limit]


def _sanitize_kv(w) -> None:
    """Apply :func:`sanitize_meta` to every string key-value of a GGUFWriter (the token list, an array, is untouched)."""
    import gguf

    for kv in w.kv_data:
        for key, v in list(kv.items()):
            if v.type == gguf.GGUFValueType.STRING and isinstance(v.value, str):
                tmpl = key.startswith("tokenizer.chat_template")
                clean = sanitize_meta(v.value, keep_newlines=tmpl, limit=TEMPLATE_MAX_CHARS if tmpl else META_MAX_CHARS)
                if clean != v.value:
                    kv[key] = gguf.GGUFValue(value=clean, type=v.type, sub_type=getattr(v, "sub_type", None))


# ----------------------------------------------------------------------------------------------- writer
@dataclass
class LayerPlan:
    """What each GGUF layer holds, after the explicit handling of empty attention / MLP."""

    heads: list[int]
    kv: list[int]
    ffn: list[int]
    pad_ffn: list[int]          # zero MLP channels -> 32-channel zero FFN
    attn_free: list[int]        # zero heads -> deci attention-free layer (n_head = 0)
    pad_attn: list[int]         # zero heads but o_proj bias (or layer 0) -> one zero head carrying the bias


def plan_layers(model) -> LayerPlan:
    """A layer with no heads becomes deci's attention-free layer (exact: HF adds nothing but the residual),
    except layer 0 (llama.cpp derives head_dim/n_rot from layer 0) and layers whose o_proj has a bias (deci's
    attention-free path would drop it): those get one all-zero head whose output is exactly the bias."""
    from edgeprune.models import head_dim, layer_shapes

    hd = head_dim(model)
    if hd % 2:
        raise EdgepruneError(f"head_dim {hd} is odd; RoPE needs an even head_dim")
    lp = LayerPlan([], [], [], [], [], [])
    for i, (s, layer) in enumerate(zip(layer_shapes(model), model.model.layers)):
        nq, nkv = s.num_attention_heads, s.num_key_value_heads
        if nq == 0 or nkv == 0:
            if i == 0 or layer.self_attn.o_proj.bias is not None:
                lp.pad_attn.append(i)
                nq = nkv = 1
            else:
                lp.attn_free.append(i)
                nq = nkv = 0
        lp.heads.append(nq)
        lp.kv.append(nkv)
        if s.intermediate_size == 0:
            lp.pad_ffn.append(i)
        lp.ffn.append(s.intermediate_size or ZERO_FFN_PAD)
    return lp


def _write_hparams(w, cfg, lp: LayerPlan, hd: int, rope: dict, accepted) -> None:
    """Hyper-parameters: scalars when every layer has the same shape (arch llama), per-layer arrays otherwise (deci);
    an accepted approximation (``accepted.approximations``) and its declared context in ``edgeprune.*`` keys."""
    import gguf

    uniform = len(set(zip(lp.heads, lp.kv, lp.ffn))) == 1
    w.add_block_count(len(lp.heads))
    ctx = accepted.max_context if accepted.approximations else getattr(cfg, "max_position_embeddings", 2048)
    w.add_context_length(int(ctx))
    if accepted.approximations:
        w.add_array(META_APPROX, accepted.approximations)
        w.add_uint32(META_CONTEXT, int(accepted.max_context))
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(lp.ffn[0] if uniform else lp.ffn)
    w.add_head_count(lp.heads[0] if uniform else lp.heads)
    w.add_head_count_kv(lp.kv[0] if uniform else lp.kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(rope["theta"])
    if rope["kind"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)


def write_gguf(model, tokenizer_dir: str | Path, out: str | Path, dtype: str = "f32",
               max_context: int | None = None) -> GGUFSummary:
    """Write ``model`` (HF Llama/Mistral/Qwen2 with per-layer shapes) as a GGUF at ``dtype`` f32 or f16.

    2-D weights are stored at ``dtype``; norms and biases always as f32. The output is written atomically.
    What llama.cpp cannot compute is refused first (:func:`exporters.features.check`); an approximation accepted
    with ``max_context`` is recorded in the metadata (``edgeprune.approximations``, ``edgeprune.max_context``) and
    the file's ``context_length`` becomes ``max_context`` (what an application defaults to).
    """
    import gguf

    from edgeprune.models import head_dim
    from edgeprune.paths import atomic_file

    from .features import check

    if dtype not in FLOATS:
        raise EdgepruneError(f"GGUF float type '{dtype}' unknown; use f32 or f16 (or a --quant type)")
    cfg = model.config
    accepted = check(cfg.to_dict(), "gguf", max_context)
    hd = head_dim(model)
    lp = plan_layers(model)
    heads, kv, ffn, padded = lp.heads, lp.kv, lp.ffn, lp.pad_ffn
    arch = "llama" if len(set(zip(heads, kv, ffn))) == 1 else "deci"
    notes = list(accepted.approximations)
    rope, rope_freqs = _rope(cfg)
    V, L = cfg.vocab_size, len(heads)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    out = Path(out)
    biases = set()
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name)
        _write_hparams(w, cfg, lp, hd, rope, accepted)
        w.add_file_type(ftype)
        kind = write_vocab(w, Path(tokenizer_dir), V)

        def add(name: str, arr: np.ndarray) -> None:
            if arr.ndim >= 2 and dtype == "f16":
                arr = arr.astype(np.float16)
            w.add_tensor(name, np.ascontiguousarray(arr))

        add("token_embd.weight", _np(model.model.embed_tokens.weight))
        if rope_freqs is not None:
            add("rope_freqs.weight", rope_freqs)
        for i, layer in enumerate(model.model.layers):
            mode = "pad" if i in lp.pad_attn else "free" if i in lp.attn_free else "keep"
            for name, arr in _layer_tensors(layer, hd, i in padded, mode).items():
                if name.endswith(".bias"):
                    biases.add(name.split(".")[0])
                add(f"blk.{i}.{name}", arr)
        add("output_norm.weight", _np(model.model.norm.weight))
        if not tied:
            add("output.weight", _np(model.lm_head.weight))
        _sanitize_kv(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if lp.attn_free:
        notes.append(f"layers {lp.attn_free} have no attention heads; written as deci attention-free layers (exact)")
    if lp.pad_attn:
        notes.append(f"layers {lp.pad_attn} have no attention heads but need an attention block (layer 0 or an "
                     "o_proj bias); written with one zero head that outputs exactly the bias")
    if padded:
        notes.append(f"layers {padded} have no MLP channels; written with a {ZERO_FFN_PAD}-channel zero FFN "
                     "(deci would otherwise skip the whole layer); output is identical")
    return GGUFSummary(str(out), arch, dtype, out.stat().st_size / 1e6, L, heads, kv, ffn, kind, sorted(biases),
                       padded, notes, attn_free_layers=lp.attn_free, padded_attn_layers=lp.pad_attn,
                       approximations=accepted.approximations, max_context=max_context)


# ----------------------------------------------------------------------------------------------- quantize
def predict_fallbacks(path: str | Path, quant: str) -> list[tuple[str, int]]:
    """Tensors whose row length breaks the block rule for ``quant``: [(name, row_len)]. Only 2-D ``*.weight``
    tensors are quantized (norms and biases stay f32)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    blk = BLOCK[quant]
    return [(t.name, int(t.shape[0])) for t in r.tensors
            if t.name.endswith(".weight") and len(t.shape) == 2 and int(t.shape[0]) % blk]


def quantize(src: str | Path, dst: str | Path, quant: str, threads: int = 2) -> QuantReport:
    """Quantize a f32/f16 GGUF with ``llama_model_quantize``; report every tensor that fell back to another type
    and how many bytes that cost compared with the type llama.cpp wanted for it."""
    import re
    import time

    import gguf

    from edgeprune.paths import atomic_file

    if quant not in GGUF_FTYPES:
        raise EdgepruneError(f"quant '{quant}' unknown; use one of f32, f16, {', '.join(GGUF_FTYPES)}")
    try:
        import llama_cpp
    except ImportError:
        raise EdgepruneError("quantized GGUF needs llama-cpp-python; install it with scripts/install.sh "
                             "(built with GGML_NATIVE=OFF)") from None
    predicted = dict(predict_fallbacks(src, quant))
    log = io.StringIO()
    t0 = time.time()
    with atomic_file(dst) as tmp:
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = GGUF_FTYPES[quant]
        p.nthread = threads
        old, sys.stderr = sys.stderr, log        # llama-cpp-python's log callback prints to sys.stderr
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), llama_cpp.byref(p))
        finally:
            sys.stderr = old
        if rc != 0:
            raise EdgepruneError(f"llama_model_quantize failed (rc={rc}) for {quant}: {log.getvalue()[-300:]}")
    secs = time.time() - t0
    wanted = {m.group(1): m.group(2) for m in
              re.finditer(r"(\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\w+)\)", log.getvalue())}
    nominal = {"q8_0": "q8_0", "q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}[quant]
    r = gguf.GGUFReader(str(dst))
    types = {t.name: (t.tensor_type.name, int(t.n_elements), int(t.n_bytes), int(t.shape[0])) for t in r.tensors}
    n_q = sum(1 for n, (tt, *_) in types.items() if tt not in ("F32",))
    seen_log = "quantize" in log.getvalue()
    fbs, missing = [], []
    for name in sorted(set(predicted) | set(wanted)):
        tt, n, nb, row = types[name]
        want = wanted.get(name) or ("q6_K" if name == "output.weight" and BLOCK[quant] == 256 else nominal)
        if name not in wanted and tt.lower() == want.lower():
            missing.append(name)          # rule predicted a fallback that did not happen
            continue
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want.upper()]]
        fbs.append(Fallback(name, row, want, tt.lower(), nb, int(n / bs * ts), name in predicted, name in wanted))
    return QuantReport(quant, n_q, fbs, missing if seen_log else [], sum(f.bytes - f.bytes_wanted for f in fbs), round(secs, 3))


# ----------------------------------------------------------------------------------------------- entry point
def export_gguf(model_dir: str | Path, out: str | Path, quant: str = "f16", threads: int = 2,
                keep_intermediate: bool = False, max_context: int | None = None) -> GGUFSummary:
    """model dir -> GGUF at ``quant`` (f32, f16, q8_0, q4_k_m, q5_k_m, q6_k). Quantized files are made from an
    f32 intermediate (f16 if the checkpoint is f16/bf16), written beside ``out`` and removed afterwards.
    The model's features are checked against llama.cpp's (:mod:`exporters.features`) before it is loaded."""
    import torch

    from edgeprune.models import load

    from .features import check_dir

    if quant not in FLOATS and quant not in GGUF_FTYPES:
        raise EdgepruneError(f"quant '{quant}' unknown; use one of {', '.join(FLOATS + tuple(GGUF_FTYPES))}")
    check_dir(model_dir, "gguf", max_context)
    out = Path(out)
    if out.is_dir():
        raise EdgepruneError(f"--out {out} is a directory; pass a .gguf file path")
    model = load(model_dir)
    if quant in FLOATS:
        return write_gguf(model, model_dir, out, quant, max_context)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    # the float intermediate is a hidden temp sibling: a killed export never leaves a finished-looking .gguf
    # (written inside the try: a signal between its final rename and the quantization must still remove it)
    mid = out.with_name(f".{out.name}.tmp-{os.getpid()}-{'f16' if half else 'f32'}.gguf")
    try:
        s = write_gguf(model, model_dir, mid, "f16" if half else "f32", max_context)
        del model
        rep = quantize(mid, out, quant, threads)
    finally:
        if not keep_intermediate:
            mid.unlink(missing_ok=True)
    s.path, s.quant, s.file_mb, s.quant_report = str(out), quant, out.stat().st_size / 1e6, rep
    return s
