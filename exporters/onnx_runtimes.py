"""What stock ONNX runtimes need in an export folder: optimum's ``config.json`` and onnxruntime-genai's
``genai_config.json``. One job: turn the pruned model's shapes into those two files, or refuse a target that cannot
represent them.

Found by trying (optimum 2.1 / optimum-onnx 0.1, onnxruntime-genai 0.18, see tests/test_onnx_runtimes.py):

* ``optimum.onnxruntime.ORTModelForCausalLM`` builds the empty prefill past of *every* layer as
  ``[batch, config.num_key_value_heads, 0, hidden_size // num_attention_heads]`` (``modeling_decoder.py``; only
  gemma/nemotron read ``head_dim``). It needs one KV-head count for all layers, the graph's I/O names
  (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``,
  ``present.{i}.key/value``, which our exporter already uses) and ``use_cache``; ``use_io_binding`` True or
  False gives the same tokens (its preallocated outputs use the same two config fields). After head pruning
  ``hidden_size // num_attention_heads`` is not the head size (256 // 6 = 42, not 32), and no true value of either
  field gives it. The folder's config.json therefore writes ``num_attention_heads = hidden_size // head_dim``
  (what optimum divides by) and says so in the export notes; the true per-layer counts stay in
  ``pruning.per_layer`` and ``head_dim``. This config describes the ONNX graph for optimum only; the PyTorch model
  folder keeps its true config.
* ``onnxruntime_genai.Model`` (0.18) reads ``genai_config.json``: one ``head_size`` and ``num_key_value_heads``
  for the decoder, I/O name templates, context length, EOS/BOS/pad and search defaults. ``past_present_share_buffer``
  must be false: our graph concatenates past and new keys (no GroupQueryAttention op writing into a shared
  buffer). With that setting genai takes each layer's KV width from the graph's past inputs: a model with per-layer
  KV heads [2, 1, 2, 2] generated the same 32 greedy tokens as PyTorch whether the config said 1, 2 or 3 KV heads
  (tried 2026-12-01; tests/test_onnx_runtimes.py keeps it true). MLP widths live inside the graph.

Per-layer KV-head counts: optimum cannot take them (one width for every layer's empty past), so ``--target optimum``
refuses such a model with the fix (re-prune with ``uniform_kv``); genai and edgeprune's runtime take them.
"""
from __future__ import annotations

from edgeprune.errors import EdgepruneError

TARGETS = ("edgeprune", "optimum", "genai")


def kv_uniform(kv_heads: list[int]) -> bool:
    return len(set(kv_heads)) == 1 and kv_heads[0] > 0


def check_target(target: str, kv_heads: list[int]) -> None:
    """Refuse a stock-runtime target that cannot hold this model's per-layer KV widths (before any export work)."""
    if target not in TARGETS:
        raise EdgepruneError(f"--target {target} unknown; use one of {', '.join(TARGETS)}")
    if target == "optimum" and not kv_uniform(kv_heads):
        raise EdgepruneError(
            f"--target optimum: optimum allocates one KV-head count for every layer but this model has per-layer KV "
            f"heads {kv_heads}; re-prune with uniform KV (profile 'uniform_kv: true' or --uniform-kv), or use "
            "--target genai (onnxruntime-genai takes per-layer KV)")


def optimum_config(cfg: dict, kv_heads: list[int], q_heads: list[int], hd: int) -> tuple[dict, list[str]]:
    """config.json for ``ORTModelForCausalLM`` (see the module doc); returns (config, notes)."""
    cfg = dict(cfg, use_cache=True)
    notes = []
    if not kv_uniform(kv_heads):
        notes.append(f"per-layer KV heads {kv_heads}: optimum cannot load this folder (one KV width for all "
                     "layers); onnxruntime-genai and edgeprune's runtime can. Re-prune with uniform_kv for optimum")
        return cfg, notes
    cfg["num_key_value_heads"] = kv_heads[0]
    H = int(cfg["hidden_size"])
    nq = max(q_heads)
    if H // nq != hd:
        cfg["num_attention_heads"] = H // hd
        notes.append(f"config.json num_attention_heads is written as {H // hd} (= hidden_size / head_dim, from which "
                     f"optimum derives the KV head size) although the graph has {sorted(set(q_heads))} q heads per "
                     "layer; pruning.per_layer holds the true counts")
    return cfg, notes


def genai_config(cfg: dict, kv_heads: list[int], q_heads: list[int], hd: int, filename: str = "model.onnx") -> dict:
    """genai_config.json for ``onnxruntime_genai.Model(dir)``: explicit head size, KV heads (the largest layer's;
    genai reads each layer's own width from the graph), context length, EOS/BOS and greedy search defaults."""
    ctx = int(cfg.get("max_position_embeddings") or 2048)
    eos = cfg.get("eos_token_id")
    eos = eos if eos is not None else 2
    pad = cfg.get("pad_token_id")
    first_eos = eos[0] if isinstance(eos, list) else eos
    model_type = cfg.get("model_type") if cfg.get("model_type") in ("llama", "mistral", "qwen2") else "llama"
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": hd, "hidden_size": int(cfg["hidden_size"]),
        "num_attention_heads": max(q_heads), "num_key_value_heads": max(kv_heads), "num_hidden_layers": len(kv_heads),
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    search = {"do_sample": False, "max_length": ctx, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
              "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
              "diversity_penalty": 0.0}
    return {"model": {"bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": eos,
                      "pad_token_id": pad if pad is not None else first_eos, "context_length": ctx,
                      "vocab_size": int(cfg["vocab_size"]), "type": model_type, "decoder": decoder},
            "search": search}
