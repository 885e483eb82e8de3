"""Exporters: GGUF (llama.cpp) and ONNX (onnxruntime) for dense and per-layer pruned models, and ``verify``.

``export(model_dir, fmt, out, quant=None, dtype=None) -> dict`` is what ``edgeprune export`` calls;
``exporters.verify.verify(artifact, reference_dir, ...)`` is what ``edgeprune verify`` calls.
"""
from __future__ import annotations

from pathlib import Path

FORMATS = ("gguf", "onnx")


def export(model_dir: str | Path, fmt: str, out: str | Path, quant: str | None = None, dtype: str | None = None,
           threads: int = 2, target: str | None = None, max_context: int | None = None) -> dict:
    """Export ``model_dir`` to ``out``.

    gguf: ``quant`` in f32, f16 (default), q8_0, q4_k_m, q5_k_m, q6_k (``dtype`` f32/f16 is accepted as an alias
    when ``quant`` is not given); ``out`` is a .gguf file. onnx: ``dtype`` fp32 (default) or fp16, ``quant`` None
    or int8; ``out`` is a directory; ``target`` edgeprune (default), optimum (refuses per-layer KV heads) or
    genai. Returns a JSON-ready summary (``quant_report`` lists quantization fallbacks,
    ``notes`` what the user should know). A feature the format cannot compute is refused before any work
    (:mod:`exporters.features`); ``max_context`` accepts an approximation that is exact up to that context.
    """
    from edgeprune.errors import EdgepruneError

    if fmt == "gguf":
        if target not in (None, "llama.cpp"):
            raise EdgepruneError(f"--target {target} applies to ONNX; GGUF has one target (llama.cpp): drop --target")
        from .gguf import export_gguf

        q = quant or {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16"}.get(dtype or "", dtype) or "f16"
        return {"format": "gguf", **export_gguf(model_dir, out, q, threads=threads, max_context=max_context).to_dict()}
    if fmt == "onnx":
        from .onnx_export import export_onnx

        return {"format": "onnx", **export_onnx(model_dir, out, dtype or "fp32", quant, target=target or "edgeprune",
                                                max_context=max_context).to_dict()}
    raise EdgepruneError(f"export format '{fmt}' unknown; use gguf or onnx")
