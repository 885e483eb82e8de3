"""Speed and memory of one artifact, measured in a fresh process (``python -m exporters.speed ARTIFACT``).

The child imports only numpy and the runtime (never torch), so its peak RSS is the runtime's. Protocol:
load (timed) -> warm-up (one prefill + 4 steps) -> ``repeats`` times: prefill of ``prompt`` tokens, then
``gen`` single-token decode steps. Reported figures are medians over the repeats:

    prefill_tps = prompt / t_prefill      ttft_ms = 1000 · t_prefill (first token's logits ready)
    decode_tps  = gen / t_decode          peak_rss_mb = VmHWM of the child (whole process)

The token ids are fixed pseudo-random ids (content does not change the cost). GGUFs run with the default F16 KV
cache and ``logits_all=False`` (what an application would use).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeprune.procmem import peak_rss_mb   # torch-free: the child must hold the runtime alone


@dataclass
class Speed:
    load_s: float
    prefill_tps: float
    decode_tps: float
    ttft_ms: float
    peak_rss_mb: float
    baseline_rss_mb: float
    file_mb: float
    threads: int
    prompt: int
    gen: int
    repeats: int
    runtime: str
    n_ctx: int = 0
    kv_tokens: int = 0      # mean KV position during the timed decode steps
    prefill_tps_best: float = 0.0   # best of the repeats: robust to other load on a shared machine
    decode_tps_best: float = 0.0


def measure(artifact: str, threads: int = 1, prompt: int = 128, gen: int = 32, repeats: int = 3,
            n_ctx: int | None = None) -> Speed:
    import numpy as np

    from exporters.runtimes import LlamaCppRuntime, OrtRuntime, artifact_bytes

    base = peak_rss_mb()
    t = time.perf_counter()
    p = Path(artifact)
    if p.suffix == ".gguf":
        n_ctx = max(n_ctx or 0, prompt + gen + 8)
        rt = LlamaCppRuntime(p, n_ctx=n_ctx, threads=threads, logits_all=False, deployed=True)
    else:
        rt = OrtRuntime(p, threads=threads)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, min(rt.vocab or 256, 256), prompt - 1).tolist()
    rt.prefill(ids[:8])
    for _ in range(4):
        rt.step(5)
    pre, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        last = rt.prefill(ids)
        pre.append(time.perf_counter() - t)
        tok = int(last.argmax())
        t = time.perf_counter()
        for _ in range(gen):
            tok = int(rt.step(tok).argmax())
        dec.append(time.perf_counter() - t)
    tp, td = statistics.median(pre), statistics.median(dec)
    return Speed(round(load_s, 4), round(prompt / tp, 2), round(gen / td, 2), round(1000 * tp, 2),
                 round(peak_rss_mb(), 1), round(base, 1), round(artifact_bytes(p) / 1e6, 3), threads, prompt, gen,
                 repeats, rt.kind,
                 n_ctx=n_ctx or 0, kv_tokens=prompt + gen // 2, prefill_tps_best=round(prompt / min(pre), 2),
                 decode_tps_best=round(gen / min(dec), 2))


def measure_subprocess(artifact: str | Path, threads: int = 1, prompt: int = 128, gen: int = 32, repeats: int = 3,
                       timeout: float = 1800, n_ctx: int | None = None) -> dict:
    """Run :func:`measure` in a child process and return its dict (raises RuntimeError with the child's stderr)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "exporters.speed", str(artifact), "--threads", str(threads), "--prompt", str(prompt),
           "--gen", str(gen), "--repeats", str(repeats)] + (["--n-ctx", str(n_ctx)] if n_ctx else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"speed subprocess failed (rc={r.returncode}): {r.stderr[-500:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=None)
    a = ap.parse_args(argv)
    s = measure(a.artifact, a.threads, a.prompt, a.gen, a.repeats, n_ctx=a.n_ctx)
    print(json.dumps(asdict(s)), flush=True)
    os._exit(0)   # skip llama-cpp-python's noisy __del__ at interpreter shutdown


if __name__ == "__main__":
    main()
