"""Parity benchmark: what exact exports measure per quant, against the thresholds of ``exporters.parity``, and
what inexact ones measure (a reference whose weights differ by noise).

For the reference model (and a tiny random pruned model, ``--tiny``) every quant is exported and verified without
the speed step: max |Δlogit| and argmax agreement over verify's prompts (the four short ones and the long one),
runtime-vs-PyTorch perplexity (WikiText-2 test, a seeded random sample of ``--chunks`` 128-token chunks, paired
95% interval). Then the f16 GGUF is verified against a copy of the reference with Gaussian noise of ``--noise``
times each weight tensor's std added (same shapes): a different function, which must FAIL.

    python scripts/bench_parity.py --threads 2 --chunks 64

Writes ``benchmarks/parity.json`` and ``benchmarks/parity.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARTIFACTS = [("gguf", "f32"), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q6_k"), ("gguf", "q5_k_m"),
             ("gguf", "q4_k_m"), ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8")]


def noised_copy(src: Path, dst: Path, rel: float, seed: int = 0) -> Path:
    """A copy of ``src`` whose every weight tensor has N(0, (rel·std)²) noise added: same shapes, another function."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(src / "model.safetensors"))
    out = {k: (v + rel * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype) if v.ndim >= 1 else v
           for k, v in sd.items()}
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def export(model: Path, fmt: str, q: str, work: Path) -> Path:
    import exporters

    if fmt == "gguf":
        art = work / f"{model.name}-{q}.gguf"
        exporters.export(model, "gguf", art, quant=q)
    else:
        art = work / f"{model.name}-onnx-{q}"
        exporters.export(model, "onnx", art, dtype="fp16" if q == "fp16" else "fp32", quant="int8" if q == "int8" else None)
    return art


def row(name: str, art: Path, ref: Path, threads: int, chunks: int) -> dict:
    from exporters.verify import verify

    t = time.time()
    r = verify(art, ref, threads=threads, speed=False, ppl_chunks=chunks)
    p, v = r["parity"], r["parity_verdict"]
    print(f"[{name}] {v['verdict']} max|d| {p['max_abs_diff']:.3g} argmax {p['argmax_agreement']:.4f} "
          f"ppl {r['ppl']['delta_pct']:+.3f}% ({time.time() - t:.0f} s)", flush=True)
    return {"model": name, "artifact": art.name, "quant": r["quant"], "max_abs_diff": p["max_abs_diff"],
            "argmax_agreement": p["argmax_agreement"], "ppl_delta_pct": r["ppl"]["delta_pct"],
            "ppl_delta_ci95": r["ppl"]["delta_pct_ci95"], "verdict": v["verdict"], "thresholds": v["thresholds"],
            "failed": v["failed"]}


def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from export_helpers import make_model

    return make_model(work, "tiny-gqa-pruned", "gqa")[1]


def markdown(res: dict) -> str:
    lines = [f"# Parity per quant\n\nCommand: `{res['command']}`  \nMachine: {res['machine']}  \nProtocol: "
             f"{res['protocol']}\n", "| model | artifact | quant | max abs dlogit | argmax agreement | ppl delta % (95% CI) "
             "| thresholds (max dlogit / argmax / ppl %) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = r["thresholds"]
        lo, hi = r["ppl_delta_ci95"]
        lines.append(f"| {r['model']} | {r['artifact']} | {r['quant']} | {r['max_abs_diff']:.3g} | "
                     f"{r['argmax_agreement']:.4f} | {r['ppl_delta_pct']:+.3f} ({lo:+.3f}, {hi:+.3f}) | "
                     f"{t['max_abs_diff']:g} / {t['argmax_agreement']:g} / {t['ppl_delta_pct']:g} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    from edgeprune.paths import reference_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--tiny", action="store_true", help="also the tiny random pruned model of the tests")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "parity"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    rows = []
    try:
        models = [("ref-llama-8m", reference_model_dir())] + ([("tiny", tiny_model(work))] if a.tiny else [])
        for name, m in models:
            for fmt, q in ARTIFACTS:
                rows.append(row(name, export(m, fmt, q, work), m, a.threads, a.chunks))
        noisy = noised_copy(reference_model_dir(), work / "ref-noised", a.noise)
        f16 = work / "ref-llama-8m-f16.gguf"
        rows.append(row(f"ref-llama-8m f16 GGUF vs reference + {a.noise:g}·std noise", f16, noisy, a.threads, a.chunks))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.node()} {platform.processor()} "
           f"{__import__('os').cpu_count()} cores, shared", "protocol": "exporters.verify without speed: parity over "
           "4 short prompts + the long prompt (F32 KV cache for GGUF), WikiText-2 test ppl on a seeded random sample "
           f"of {a.chunks} 128-token chunks (F16 KV cache for GGUF), runtime vs PyTorch on the same chunks", "rows": rows}
    Path(a.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    Path(a.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
