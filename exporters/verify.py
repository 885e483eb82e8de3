"""``verify``: check an exported artifact (GGUF file or ONNX dir) against its PyTorch reference model.

* **parity** — fixed prompts, all positions: ``max_abs_diff = max |z_rt − z_pt|``, ``mean_abs_diff``,
  ``argmax_agreement`` = fraction of positions with the same argmax; a 32-token greedy continuation of the first
  prompt compared token by token (``greedy_match`` = identical, ``greedy_prefix`` = tokens equal before the first
  difference). GGUFs run with an F32 KV cache here, so only the weight format differs from PyTorch.
* **tokenizer** (GGUF) — llama.cpp's own tokenization of the prompts and a WikiText-2 slice vs the HF tokenizer.
* **ppl** — WikiText-2 test, LLM-Pruner protocol (text joined by ``"\\n\\n"``, tokenized once by the HF tokenizer,
  non-overlapping 128-token chunks, ``ppl = exp(mean_chunks(mean_positions NLL))``), computed from the runtime's
  logits (default KV cache, as deployed) and by PyTorch on the same token ids; ``delta_pct = 100·(rt/pt − 1)``.
* **speed / memory** — :mod:`exporters.speed` in a separate process (load time, prefill and decode tokens/s,
  TTFT, peak RSS).
* **stock runtimes** — :mod:`exporters.stock_runtimes`: optimum and onnxruntime-genai (ONNX), llama-cpp-python's
  chat completion and OpenAI-compatible server (GGUF): loaded or not, greedy output equal to PyTorch's or not.
* **budgets** — with a profile, PASS/FAIL for each budget it sets (memory MB, decode ms/token, file MB).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "In 1905 Albert Einstein published four papers that",
    "The quick brown fox jumps over the lazy dog because",
)


@dataclass
class Parity:
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    greedy_match: bool
    greedy_prefix: int
    greedy_tokens: int
    positions: int
    kv_cache: str
    greedy_reference: list[int] = field(default_factory=list)
    greedy_runtime: list[int] = field(default_factory=list)


@dataclass
class Ppl:
    runtime: float
    reference: float
    delta_pct: float
    dataset: str
    seq_len: int
    chunks: int
    kv_cache: str


def _runtime(artifact: Path, threads: int, kv: str, n_ctx: int):
    from .runtimes import open_runtime

    return open_runtime(artifact, threads=threads, kv=kv, n_ctx=n_ctx)


def parity(rt, model, tok, prompts=PROMPTS, greedy_tokens: int = 32, kv: str = "f32") -> Parity:
    import torch

    diffs, agree, n, mean_acc = [], 0, 0, 0.0
    for p in prompts:
        ids = tok(p).input_ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        got = rt.logits(ids)
        d = np.abs(got - ref)
        diffs.append(float(d.max()))
        mean_acc += float(d.mean()) * len(ids)
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        n += len(ids)
    ids = tok(prompts[0]).input_ids
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=greedy_tokens, min_new_tokens=greedy_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0)
    ref_g = g[0, len(ids):].tolist()
    rt_g = rt.greedy(ids, greedy_tokens)
    prefix = next((i for i, (a, b) in enumerate(zip(ref_g, rt_g)) if a != b), min(len(ref_g), len(rt_g)))
    return Parity(max(diffs), mean_acc / n, agree / n, ref_g == rt_g, prefix, greedy_tokens, n, kv, ref_g, rt_g)


def runtime_ppl(rt, ids: np.ndarray, seq_len: int = 128, max_chunks: int | None = None) -> tuple[float, int]:
    from .runtimes import log_softmax_nll

    n = len(ids) // seq_len
    if max_chunks:
        n = min(n, max_chunks)
    means = [float(log_softmax_nll(rt.logits(c), c).mean()) for c in ids[: n * seq_len].reshape(n, seq_len)]
    return math.exp(float(np.mean(means))), n


def tokenizer_check(rt, tok, texts) -> dict:
    if not hasattr(rt, "tokenize"):
        return {}
    same = sum(int(rt.tokenize(t, add_bos=True) == tok(t).input_ids) for t in texts)
    return {"match": same / len(texts), "texts": len(texts)}


def budgets(result: dict, profile) -> dict:
    """PASS/FAIL per budget. ``profile``: a mapping or object with any of ``max_memory_mb``,
    ``max_decode_ms`` (ms per decoded token), ``max_file_mb``; or a name/path resolved by
    ``edgeprune.device_profiles.load_profile`` when that module exists, else a YAML file."""
    if isinstance(profile, (str, Path)):
        try:
            from device_profiles import load_profile  # type: ignore
            profile = load_profile(str(profile))
        except ImportError:
            import yaml

            p = Path(profile)
            if not p.is_file():
                raise EdgepruneError(f"profile {profile} not found; pass a profile YAML file") from None
            profile = yaml.safe_load(p.read_text())

    if not isinstance(profile, dict) and hasattr(profile, "budgets"):   # a device_profiles.DeviceProfile
        b = profile.budgets
        profile = {"max_memory_mb": b.max_memory_mb, "max_decode_ms": b.max_decode_ms_per_token}

    def get(*names):
        for k in names:
            v = profile.get(k) if isinstance(profile, dict) else getattr(profile, k, None)
            if v is None and isinstance(profile, dict) and isinstance(profile.get("budgets"), dict):
                v = profile["budgets"].get(k)
            if v is not None:
                return float(v)
        return None

    from edgeprune.planner.judge import judge

    limits = {"max_memory_mb": get("max_memory_mb", "memory_mb"),
              "max_decode_ms_per_token": get("max_decode_ms", "max_decode_latency_ms"), "max_file_mb": get("max_file_mb")}
    values = {"peak_rss_mb": result.get("memory", {}).get("peak_rss_mb"), "file_mb": result.get("file_mb"),
              "decode_ms": 1000.0 / result["speed"]["decode_tps"] if "speed" in result else None}
    names = {"max_memory_mb": "memory_mb", "max_decode_ms_per_token": "decode_ms", "max_file_mb": "file_mb"}
    out = {names[k]: {"budget": v.limit, "measured": round(v.value, 3), "verdict": v.verdict}
           for k, v in judge(values, {k: x for k, x in limits.items() if x is not None}, basis="measured").items()}
    out["overall"] = "PASS" if all(b["verdict"] == "PASS" for b in out.values()) else "FAIL"
    return out


def verify(artifact: str | Path, reference_dir: str | Path, profile=None, threads: int = 2,
           json_out: str | Path | None = None, max_chunks: int | None = None, seq_len: int = 128,
           dataset: str = "wikitext2", speed: bool = True, ppl: bool = True, greedy_tokens: int = 32,
           stock: bool = True) -> dict:
    """Parity, runtime perplexity beside PyTorch's, and speed/memory of ``artifact``; returns (and optionally
    writes) a nested dict with ``parity.*``, ``ppl.*``, ``speed.*``, ``memory.*``, ``file_mb``."""
    import torch

    from edgeprune.data import eval_ids
    from edgeprune.evaluate import perplexity_ids
    from edgeprune.models import load, load_tokenizer

    from .runtimes import artifact_bytes
    from .speed import measure_subprocess

    artifact = Path(artifact)
    if not artifact.exists():
        raise EdgepruneError(f"artifact {artifact} does not exist; pass a .gguf file or an ONNX export directory")
    t0 = time.time()
    torch.set_num_threads(threads)
    model = load(reference_dir, dtype=torch.float32)
    tok = load_tokenizer(reference_dir)
    is_gguf = artifact.suffix == ".gguf"
    res: dict = {"artifact": str(artifact), "reference": str(reference_dir), "runtime": "llama.cpp" if is_gguf else "onnxruntime",
                 "file_mb": round(artifact_bytes(artifact) / 1e6, 3), "threads": threads}
    kv_par = "f32" if is_gguf else "model"
    rt = _runtime(artifact, threads, "f32", n_ctx=max(256, seq_len + greedy_tokens + 64))
    res["parity"] = asdict(parity(rt, model, tok, greedy_tokens=greedy_tokens, kv=kv_par))
    if stock:   # which stock runtimes load it, and whether their greedy output matches (exporters.stock_runtimes)
        from .stock_runtimes import stock_checks

        res["stock_runtimes"] = stock_checks(artifact, model, tok, greedy_tokens)
    if ppl:
        ids = eval_ids(tok, dataset)
        res["tokenizer"] = tokenizer_check(rt, tok, list(PROMPTS) + [tok.decode(ids[1:200])])
        if is_gguf:   # perplexity as deployed: default F16 KV cache
            rt.close()
            rt = _runtime(artifact, threads, "f16", n_ctx=max(256, seq_len))
        p_rt, n = runtime_ppl(rt, ids.numpy(), seq_len, max_chunks)
        p_pt = perplexity_ids(model, ids, seq_len, max_chunks=max_chunks)
        res["ppl"] = asdict(Ppl(p_rt, p_pt, 100 * (p_rt / p_pt - 1), dataset, seq_len, n, "f16" if is_gguf else "model"))
    rt.close()
    del rt, model
    if speed:
        s = measure_subprocess(artifact, threads=threads)
        res["speed"] = {k: s[k] for k in ("load_s", "prefill_tps", "decode_tps", "ttft_ms", "prompt", "gen", "repeats")}
        res["memory"] = {"peak_rss_mb": s["peak_rss_mb"], "baseline_rss_mb": s["baseline_rss_mb"],
                         "model_rss_mb": round(s["peak_rss_mb"] - s["baseline_rss_mb"], 1)}
    if profile is not None:
        res["budgets"] = budgets(res, profile)
    res["seconds"] = round(time.time() - t0, 2)
    if json_out:
        from edgeprune.paths import atomic_file, json_text

        with atomic_file(json_out) as tmp:
            Path(tmp).write_text(json_text(res))
    return res
