"""Is this artifact the export of this reference model? Shapes compared before anything is measured.

Read from the artifact without running it: a GGUF's metadata (``{arch}.block_count``, ``attention.head_count``,
``attention.head_count_kv``, ``feed_forward_length`` — scalars for ``llama``, per-layer arrays for ``deci`` —,
``embedding_length``, ``attention.key_length`` and the ``token_embd`` tensor's vocab), or an ONNX export's graph inputs
(per-layer KV heads, head_dim), logits width (vocab) and ``config.json`` (q heads, MLP widths, hidden).
The reference's shapes are what the exporter would write for it (GGUF: :func:`exporters.gguf.plan_layers`,
which pads empty layers). Any difference — layer count, per-layer heads / KV heads / MLP width, hidden, vocab,
head_dim — is refused with one line (exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgeprune.errors import EdgepruneError

from .gguf import META_APPROX, META_CONTEXT  # GGUF metadata keys of an accepted approximation (written there)

KEYS = ("layers", "hidden", "vocab", "head_dim", "heads", "kv_heads", "ffn")


def _per_layer(v, n: int) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n


def gguf_shapes(path: Path) -> dict:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file
        raise EdgepruneError(f"llama.cpp cannot load {path} ({type(e).__name__}: {str(e)[:80]}); the file is not a "
                             "valid GGUF: re-export it with edgeprune export") from None

    def get(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    arch = get("general.architecture")
    n = get(f"{arch}.block_count")
    if n is None:
        raise EdgepruneError(f"{path} has no {arch}.block_count metadata; it is not a LLaMA-family GGUF")
    emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    return {"layers": int(n), "hidden": int(get(f"{arch}.embedding_length")),
            "vocab": int(emb.shape[1]) if emb is not None else None, "head_dim": int(get(f"{arch}.attention.key_length") or 0),
            "heads": _per_layer(get(f"{arch}.attention.head_count"), n),
            "kv_heads": _per_layer(get(f"{arch}.attention.head_count_kv"), n),
            "ffn": _per_layer(get(f"{arch}.feed_forward_length"), n)}


def onnx_shapes(path: Path) -> dict:
    import onnx

    from edgeprune.models import shapes_from_config

    d = path if path.is_dir() else path.parent
    try:
        cfg = json.loads((d / "config.json").read_text())
        g = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:   # type: ignore[attr-defined]
        raise EdgepruneError(f"{d} is not a readable ONNX export ({type(e).__name__}); re-export it with edgeprune "
                             "export") from None
    dims = {i.name: [x.dim_value or None for x in i.type.tensor_type.shape.dim] for i in g.input}
    kv = [dims[f"past_key_values.{i}.key"][1] for i in range(sum(1 for k in dims if k.endswith(".key")))]
    shapes = shapes_from_config(cfg)
    return {"layers": len(kv), "hidden": cfg.get("hidden_size"),
            "vocab": next((o.type.tensor_type.shape.dim[-1].dim_value or None for o in g.output if o.name == "logits"), None),
            "head_dim": dims["past_key_values.0.key"][3] if kv else None,
            "heads": [s.num_attention_heads for s in shapes], "kv_heads": kv,
            "ffn": [s.intermediate_size for s in shapes]}


def reference_shapes(model, fmt: str) -> dict:
    from edgeprune.models import head_dim, layer_shapes

    cfg = model.config
    if fmt == "gguf":
        from .gguf import plan_layers

        lp = plan_layers(model)
        heads, kv, ffn = lp.heads, lp.kv, lp.ffn
    else:
        s = layer_shapes(model)
        heads, kv, ffn = [x.num_attention_heads for x in s], [x.num_key_value_heads for x in s], [x.intermediate_size for x in s]
    return {"layers": len(heads), "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "head_dim": head_dim(model),
            "heads": heads, "kv_heads": kv, "ffn": ffn}


def differences(art: dict, ref: dict) -> list[str]:
    """Human-readable differences, layer count first (per-layer lists are only compared when it matches)."""
    out = [f"{k} {art[k]} vs {ref[k]}" for k in ("layers", "hidden", "vocab", "head_dim")
           if art.get(k) is not None and art[k] != ref[k]]
    if art["layers"] != ref["layers"]:
        return out
    for i in range(ref["layers"]):
        bad = [f"{k} {art[k][i]} vs {ref[k][i]}" for k in ("heads", "kv_heads", "ffn") if art[k][i] != ref[k][i]]
        if bad:
            out.append(f"layer {i}: " + ", ".join(bad))
    return out


def check_shapes(artifact: str | Path, model, reference: str | Path = "") -> dict:
    """Artifact vs reference shapes; raises EdgepruneError (exit 2) on any difference, else returns the shapes."""
    from .runtimes import artifact_kind

    p = Path(artifact)
    fmt = artifact_kind(p)
    art = gguf_shapes(p) if fmt == "gguf" else onnx_shapes(p)
    ref = reference_shapes(model, fmt)
    diff = differences(art, ref)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise EdgepruneError(f"{p} was not exported from {reference or 'the reference'}: artifact vs reference "
                             f"{'; '.join(diff[:3])}{more}; pass the model directory it was exported from as --reference")
    return {"verdict": "PASS", "compared": list(KEYS), **{k: art[k] for k in ("layers", "hidden", "vocab", "head_dim")}}


FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 15: "q4_k_m", 17: "q5_k_m", 18: "q6_k"}   # general.file_type


def artifact_meta(artifact: str | Path) -> dict:
    """What the artifact says about itself: ``quant`` (f32, f16, q8_0, ..., onnx-fp16, int8), the
    ``approximations`` accepted at export (one line each) and the ``max_context`` it was declared for."""
    p = Path(artifact)
    if p.suffix == ".gguf":
        import gguf

        r = gguf.GGUFReader(str(p))

        def get(key):
            f = r.fields.get(key)
            return None if f is None else f.contents()

        ft = get("general.file_type")
        approx = get(META_APPROX) or []
        mctx = get(META_CONTEXT)
        return {"quant": FILE_TYPES.get(ft, f"file_type {ft}"), "approximations": list(approx),
                "max_context": int(mctx) if mctx is not None else None}
    d = p if p.is_dir() else p.parent
    try:
        m = json.loads((d / "edgeprune_onnx.json").read_text())
    except (OSError, ValueError):
        m = {}
    quant = m.get("quant") or ("onnx-fp16" if m.get("dtype") == "fp16" else "f32")
    return {"quant": quant, "approximations": list(m.get("approximations") or []), "max_context": m.get("max_context")}
