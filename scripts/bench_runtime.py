"""Runtime benchmark: dense vs per-layer pruned (20%, 50%, MLP widths rounded to 256) random models shaped like
SmolLM2-135M / Llama-3.2-1B, in llama.cpp (f16, q8_0, q4_k_m) and onnxruntime (fp32, int8).

Protocol: every measurement is a fresh subprocess (:mod:`exporters.speed`: load, warm-up, prefill of ``--prompt``
tokens, ``--gen`` single-token decode steps; peak RSS = VmHWM of the child). For each format the variants are
measured **alternately** (dense, p20, p50, dense, ...) ``--repeats`` times and medians are quoted, so drift on a
shared machine hits all variants alike. The ideal speedup is the bytes ratio ``file_dense / file_pruned``: decode
reads every weight once per token (a tied embedding is read in full as the LM head), so it bounds decode speed.

    python scripts/bench_runtime.py --shapes llama-3.2-1b --layers 4 --threads 1 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_variants(shape: str, layers: int | None, work: Path, ratios: list[float], seed: int = 0) -> dict[str, Path]:
    """Save the dense model and one pruned model per ratio (random KV groups / channels, non-uniform per layer,
    MLP widths multiples of 256) in the edgeprune format, with the reference SentencePiece tokenizer padded."""
    from edgeprune.models import count_params, save
    from edgeprune.paths import reference_model_dir
    from edgeprune.surgery import apply_plan
    from edgeprune.testing import random_plan, shaped_model

    out = {}
    for name, r in [("dense", 0.0)] + [(f"p{round(100 * r)}", r) for r in ratios]:
        d = work / f"{shape}-{name}"
        m = shaped_model(shape, layers=layers, seed=seed)       # HF init: N(0, 0.02) weights, norms 1
        if r:
            lo, hi = max(0.05, 1 - 1.5 * r), min(1.0, 1 - 0.5 * r)      # per-layer keep fraction, mean 1 - r
            apply_plan(m, random_plan(m, seed=seed, keep_frac=(lo, hi), multiple=256))
        save(m, d, provenance={"bench": shape, "ratio": r}, overwrite=True)
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(reference_model_dir() / f, d / f)
        out[name] = d
        print(f"[build] {d.name}: {count_params(m)[1] / 1e6:.1f}M non-embedding params", flush=True)
        del m
    return out


def export_all(variants: dict[str, Path], formats: list[str], work: Path) -> dict[tuple[str, str], Path]:
    import exporters
    from exporters.onnx_export import derive_onnx

    arts = {}
    for name, d in variants.items():
        for fmt in formats:
            kind, q = fmt.split(":")
            t = time.time()
            if kind == "gguf":
                out = work / f"{d.name}.{q}.gguf"
                exporters.export(d, "gguf", out, quant=q, threads=2)
            elif q == "fp32":
                out = work / f"{d.name}.onnx"
                exporters.export(d, "onnx", out)
            else:   # int8 from the fp32 graph (export onnx:fp32 first)
                out = work / f"{d.name}.onnx-{q}"
                derive_onnx(work / f"{d.name}.onnx", out, quant=q)
            arts[(name, fmt)] = out
            print(f"[export] {out.name} {time.time() - t:.1f}s", flush=True)
    return arts


def run(args) -> dict:
    from exporters.speed import measure_subprocess

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"shapes": {}}
    for shape in args.shapes:
        variants = build_variants(shape, args.layers, work, args.ratios)
        arts = export_all(variants, args.formats, work)
        res = {}
        for fmt in args.formats:
            runs = {v: [] for v in variants}
            for rep in range(args.repeats):
                for v in variants:                     # alternate dense / pruned within each repeat
                    runs[v].append(measure_subprocess(arts[(v, fmt)], threads=args.threads, prompt=args.prompt,
                                                      gen=args.gen, repeats=1))
                    print(f"[measure] {shape} {fmt} {v} rep{rep}: decode {runs[v][-1]['decode_tps']:.2f} tok/s",
                          flush=True)
            med = {v: {k: statistics.median(r[k] for r in rs) for k in
                       ("decode_tps", "prefill_tps", "ttft_ms", "load_s", "peak_rss_mb", "file_mb")}
                   for v, rs in runs.items()}
            for v in variants:
                if v != "dense":
                    ideal = med["dense"]["file_mb"] / med[v]["file_mb"]
                    sp = med[v]["decode_tps"] / med["dense"]["decode_tps"]
                    med[v].update(ideal_ratio=round(ideal, 3), decode_speedup=round(sp, 3),
                                  prefill_speedup=round(med[v]["prefill_tps"] / med["dense"]["prefill_tps"], 3),
                                  efficiency=round(sp / ideal, 3))
            res[fmt] = {"median": med, "runs": runs}
        results["shapes"][shape] = res
        if not args.keep:
            for p in list(variants.values()) + list(arts.values()):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return results


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    import llama_cpp
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "loadavg_start": load,
            "llama_cpp_python": llama_cpp.__version__, "onnxruntime": onnxruntime.__version__,
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()}


def write_md(res: dict, path: Path) -> None:
    a = res["args"]
    lay = f", first {a['layers']} layers only" if a["layers"] else ""
    lines = ["# Runtime benchmark: dense vs per-layer pruned", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, "
             f"load average at start {', '.join(f'{x:.1f}' for x in res['machine']['loadavg_start'])} (shared machine); "
             f"llama-cpp-python {res['machine']['llama_cpp_python']} (AMX-free build, extra buffer types off), "
             f"onnxruntime {res['machine']['onnxruntime']}; git {res['machine']['git']}.  ",
             f"Protocol: random weights with the public shapes{lay}; "
             f"pruned = random per-layer KV groups and MLP channels (non-uniform), MLP widths multiples of 256; "
             f"fresh subprocess per measurement, {a['threads']} thread(s), prefill {a['prompt']} tokens, decode "
             f"{a['gen']} single-token steps (GGUF: default F16 KV cache); variants measured alternately, "
             f"median of {a['repeats']}. Ideal = file-bytes ratio dense/pruned; efficiency = decode speedup / ideal.",
             "", "| shape | format | variant | file MB | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB | "
             "decode speedup | ideal (bytes) | efficiency |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, fr in res["results"]["shapes"].items():
        for fmt, r in fr.items():
            for v, m in r["median"].items():
                lines.append(f"| {shape} | {fmt} | {v} | {m['file_mb']:.1f} | {m['decode_tps']:.2f} | "
                             f"{m['prefill_tps']:.1f} | {m['ttft_ms']:.0f} | {m['peak_rss_mb']:.0f} | "
                             f"{m.get('decode_speedup', 1.0):.3f} | {m.get('ideal_ratio', 1.0):.3f} | "
                             f"{m.get('efficiency', 1.0):.3f} |")
    lines += ["", "Raw per-run numbers: `benchmarks/runtime.json`."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b"], choices=["smollm2-135m", "llama-3.2-1b"])
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (for speed)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--formats", nargs="+", default=["gguf:f16", "gguf:q8_0", "gguf:q4_k_m", "onnx:fp32", "onnx:int8"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/edgeprune-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "runtime"))
    ap.add_argument("--keep", action="store_true", help="keep the models and artifacts in --work")
    args = ap.parse_args()
    from edgeprune.paths import atomic_file

    t0 = time.time()
    mach = machine()
    results = run(args)
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)
                                                if Path(sys.argv[0]).is_absolute() else sys.argv[0])] + sys.argv[1:]),
           "machine": mach, "args": vars(args), "seconds": round(time.time() - t0, 1), "results": results}
    out = Path(args.out)
    with atomic_file(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(res, indent=2) + "\n")
    with atomic_file(out.with_suffix(".md")) as tmp:
        write_md(res, tmp)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
