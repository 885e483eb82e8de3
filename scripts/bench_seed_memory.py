#!/usr/bin/env python
"""Peak memory and wall time of *scoring* on a 1B-shaped random model: a forward-only pass vs MINI-LLM (SPSA,
forward passes only) vs LLM-BIP (one forward pass) vs LLM-Pruner (backward pass).

Each measurement runs in its own child process (``--child KIND``) that builds the model, scores, and reports
``VmHWM`` (peak RSS, reset after the model is built) and ``ru_maxrss`` (whole child life), plus the RSS right after the model was built. Writes
``benchmarks/memory.json`` and ``benchmarks/memory.md``.

    python scripts/bench_seed_memory.py [--shape llama-3.2-1b] [--layers 2] [--calib 32] [--q 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("load", "forward", "mini-llm", "bip", "llm-pruner")


def _rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so that it covers scoring only (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(kind: str, a) -> dict:
    import torch

    from edgeprune.engine import score
    from edgeprune.importance import Context, get_method
    from edgeprune.importance.mini_llm import lm_loss
    from edgeprune.procmem import peak_rss_mb
    from edgeprune.testing import shaped_model

    torch.manual_seed(0)
    model = shaped_model(a.shape, layers=a.layers)
    for p in model.parameters():
        p.requires_grad_(True)  # as loaded by transformers: the scorers must not rely on requires_grad=False
    ids = torch.randint(3, model.config.vocab_size, (a.calib, a.calib_len), generator=torch.Generator().manual_seed(0))
    import gc

    gc.collect()
    rss_load = _rss_now_mb()
    reset = _reset_peak()
    opts = {"n_perturb": a.q, "spsa_samples": a.rows, "spsa_len": a.calib_len, "grad_samples": a.rows,
            "grad_len": a.calib_len}
    ctx = Context(model=model, calib_ids=ids, options=opts, batch_size=8, progress=False)
    t = time.time()
    if kind == "forward":  # gradient-free: layer-wise calibration statistics + the LM loss of the same rows
        with torch.no_grad():
            score(get_method("wanda-sp"), model, ctx)
            lm_loss(model, ids[:a.rows], batch_size=1)
    elif kind in ("mini-llm", "bip"):
        with torch.no_grad():
            score(get_method(kind), model, ctx)
    elif kind == "llm-pruner":  # its own path: one backward per row (batch 1), as LLM-Pruner's code does
        score(get_method(kind), model, ctx)
    wall = time.time() - t
    return {"kind": kind, "rss_after_load_mb": round(rss_load, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1) if reset else None,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "score_s": round(wall, 2), "grads_allocated": any(p.grad is not None for p in model.parameters())}


def measure(kind: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--shape", a.shape, "--layers", str(a.layers), "--calib",
           str(a.calib), "--calib-len", str(a.calib_len), "--q", str(a.q), "--rows", str(a.rows)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed: {p.stderr[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=KINDS)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calib", type=int, default=32, help="calibration rows for the layer-wise statistics")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2, help="rows for the SPSA loss / the LLM-Pruner backward")
    ap.add_argument("--q", type=int, default=4, help="SPSA perturbations (memory does not depend on Q)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "memory"))
    return ap


def main() -> None:
    a = parser().parse_args()
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    res = {"command": "python scripts/bench_seed_memory.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "protocol": (f"random {a.shape}-shaped LlamaForCausalLM with {a.layers} decoder layers, float32, CPU; "
                        f"calibration {a.calib} x {a.calib_len} random tokens (layer-wise statistics, batch 8); "
                        f"loss rows {a.rows} x {a.calib_len} (SPSA loss / LLM-Pruner backward, batch 1); SPSA Q={a.q}; "
                        "each kind in a fresh child process; peak = the kernel's peak RSS (VmHWM) reset with "
                        "/proc/self/clear_refs after the model is built, i.e. model + scoring; ru_maxrss (whole "
                        "child life, dominated by the random model's construction) is kept in the JSON"),
           "rows": {}}
    for k in a.kinds.split(","):
        print(f"measuring {k}", flush=True)
        res["rows"][k] = measure(k, a)
    fwd = res["rows"].get("forward", {}).get("peak_rss_mb")
    load = res["rows"].get("load", {}).get("rss_after_load_mb")
    for r in res["rows"].values():
        if fwd:
            r["peak_vs_forward"] = round(r["peak_rss_mb"] / fwd, 3)
        if load:
            r["over_load_mb"] = round(r["peak_rss_mb"] - load, 1)
    Path(a.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Scoring memory: forward-only vs MINI-LLM vs LLM-BIP vs LLM-Pruner", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ", f"Protocol: {res['protocol']}", "",
             "| scoring | peak RSS MB (model + scoring) | × forward-only | above the built model MB | wall s | .grad allocated |",
             "|---|---|---|---|---|---|"]
    for k, r in res["rows"].items():
        lines.append(f"| {k} | {r['peak_rss_mb']} | {r.get('peak_vs_forward', '–')} | {r.get('over_load_mb', '–')} | "
                     f"{r['score_s']} | {r['grads_allocated']} |")
    lines += ["", "`load` only builds the model (the floor: RSS of the built model); `forward` is gradient-free scoring (Wanda-sp's layer-wise "
              "statistics plus the LM loss of the loss rows, no grad). MINI-LLM's wall time grows linearly with Q "
              "(2 forwards of the loss rows per perturbation); its memory does not."]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
