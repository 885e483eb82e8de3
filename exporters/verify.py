"""``verify``: check an exported artifact (GGUF file or ONNX dir) against its PyTorch reference model.

* **shapes** (first) — the artifact's layer count, per-layer heads / KV heads / MLP widths, hidden, vocab and
  head_dim against the reference's (:mod:`exporters.consistency`); any difference is refused (exit 2) before
  anything is measured.
* **parity** — :mod:`exporters.parity`: fixed prompts plus one longer than any sliding window, all positions:
  ``max_abs_diff = max |z_rt − z_pt|``, ``mean_abs_diff``, ``argmax_agreement``; a 32-token greedy continuation of
  the first prompt (reported, not judged). GGUFs run with an F32 KV cache here, so only the weight format differs.
* **tokenizer** (GGUF) — llama.cpp's own tokenization of the prompts and a WikiText-2 slice vs the HF tokenizer.
* **ppl** — WikiText-2 test, LLM-Pruner protocol (text joined by ``"\\n\\n"``, tokenized once by the HF tokenizer,
  non-overlapping 128-token chunks, ``ppl = exp(mean_chunks(mean_positions NLL))``), from the runtime's logits
  (default KV cache, as deployed) and by PyTorch on the same chunks; ``delta_pct = 100·(rt/pt − 1)``. By default
  a seeded random sample of :data:`exporters.ppl.DEFAULT_CHUNKS` chunks with 95% intervals (``ppl_chunks=None``:
  the whole text), the runtime scoring several chunks per call (:mod:`exporters.ppl`).
* **parity_verdict** — PASS/FAIL against the thresholds of the artifact's quant (:data:`exporters.parity.THRESHOLDS`,
  stated in the output); ``edgeprune verify`` exits 4 on FAIL.
* **approximations** — what the artifact's metadata says it does not compute exactly (accepted at export with
  ``--max-context``); parity is then judged within that context and the long prompt past it is reported.
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

from .parity import PROMPTS, Parity, parity  # noqa: F401  (re-exported: verify's public names)
from .ppl import DEFAULT_CHUNKS


@dataclass
class Ppl:
    runtime: float
    reference: float
    delta_pct: float
    dataset: str
    seq_len: int
    chunks: int
    kv_cache: str
    total_chunks: int = 0
    sample: str = "all"                    # "all", "first N" or "random k of N, seed s"
    runtime_ci95: list[float] = field(default_factory=list)
    reference_ci95: list[float] = field(default_factory=list)
    delta_pct_ci95: list[float] = field(default_factory=list)


def _runtime(artifact: Path, threads: int, kv: str, n_ctx: int):
    from .runtimes import open_runtime

    return open_runtime(artifact, threads=threads, kv=kv, n_ctx=n_ctx)


def runtime_ppl(rt, ids: np.ndarray, seq_len: int = 128, max_chunks: int | None = None) -> tuple[float, int]:
    """Whole-text (or first ``max_chunks`` chunks) runtime perplexity, batched: (ppl, chunks)."""
    from .ppl import chunk_ids, runtime_nll

    c = chunk_ids(ids, seq_len)[:max_chunks or None]
    return math.exp(float(runtime_nll(rt, c).mean())), len(c)


def ppl_compare(rt, model, ids: np.ndarray, seq_len: int, max_chunks: int | None, sample: int | None, seed: int,
                progress: bool = False) -> Ppl:
    """Runtime and PyTorch perplexity on the same chunks: the first ``max_chunks``, else a seeded random
    ``sample`` (None: all), with 95% intervals (:mod:`exporters.ppl`)."""
    from .ppl import chunk_ids, estimate, paired_delta, runtime_nll, sample_indices, torch_nll

    c = chunk_ids(ids, seq_len)
    if max_chunks:
        c = c[:max_chunks]
        idx, how = np.arange(len(c)), f"first {len(c)}"
    else:
        idx = sample_indices(len(c), sample, seed)
        how = "all" if len(idx) == len(c) else f"random {len(idx)} of {len(c)}, seed {seed}"
    nrt = runtime_nll(rt, c[idx], progress=progress)
    npt = torch_nll(model, c[idx], progress=progress)
    ert, ept = estimate(nrt, len(c), seq_len, seed), estimate(npt, len(c), seq_len, seed)
    d, lo, hi = paired_delta(nrt, npt, len(c))
    return Ppl(ert.ppl, ept.ppl, d, "", seq_len, len(idx), "", len(c), how, [ert.lo, ert.hi], [ept.lo, ept.hi], [lo, hi])


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
           stock: bool = True, ppl_chunks: int | None = DEFAULT_CHUNKS, seed: int = 0, progress: bool = False) -> dict:
    """Shapes, parity (with its verdict), runtime perplexity beside PyTorch's, stock runtimes and speed/memory of
    ``artifact``; returns (and optionally writes) a nested dict with ``shapes``, ``parity``, ``ppl``,
    ``parity_verdict``, ``approximations``, ``stock_runtimes``, ``speed``, ``memory``, ``file_mb`` (and
    ``budgets`` with a profile).

    Perplexity: the first ``max_chunks`` chunks when given, else a seeded random sample of ``ppl_chunks`` chunks
    (None: the whole text). Raises EdgepruneError (exit 2) when the artifact's shapes are not the reference's."""
    import torch

    from edgeprune.models import load, load_tokenizer

    from .consistency import artifact_meta, check_shapes
    from .runtimes import artifact_bytes, artifact_kind

    artifact = Path(artifact)
    artifact_kind(artifact)    # exists, and is a GGUF file or an ONNX export
    t0 = time.time()
    torch.set_num_threads(threads)
    model = load(reference_dir, dtype=torch.float32)
    tok = load_tokenizer(reference_dir)
    shapes = check_shapes(artifact, model, reference_dir)      # before anything is measured
    meta = artifact_meta(artifact)
    is_gguf = artifact.suffix == ".gguf"
    res: dict = {"artifact": str(artifact), "reference": str(reference_dir), "runtime": "llama.cpp" if is_gguf else "onnxruntime",
                 "file_mb": round(artifact_bytes(artifact) / 1e6, 3), "threads": threads, "shapes": shapes,
                 "quant": meta["quant"], "approximations": meta["approximations"], "max_context": meta["max_context"]}
    _measure_quality(res, artifact, model, tok, dict(threads=threads, max_chunks=max_chunks, seq_len=seq_len,
                     dataset=dataset, ppl=ppl, greedy_tokens=greedy_tokens, sample=ppl_chunks, seed=seed,
                     progress=progress))
    if stock:   # which stock runtimes load it, and whether their greedy output matches (exporters.stock_runtimes)
        from .stock_runtimes import stock_checks

        res["stock_runtimes"] = stock_checks(artifact, model, tok, greedy_tokens)
    del model
    if speed:
        _measure_speed(res, artifact, threads)
    if profile is not None:
        res["budgets"] = budgets(res, profile)
    res["seconds"] = round(time.time() - t0, 2)
    if json_out:
        from edgeprune.paths import atomic_file, json_text

        with atomic_file(json_out) as tmp:
            Path(tmp).write_text(json_text(res))
    return res


def _measure_quality(res: dict, artifact: Path, model, tok, o: dict) -> None:
    """Parity (F32 KV cache for GGUF), tokenizer, perplexity (as deployed) and the parity verdict into ``res``."""
    from edgeprune.data import eval_ids

    from .features import sliding_window
    from .parity import judge, long_prompt_len, parity

    is_gguf = artifact.suffix == ".gguf"
    mctx = res["max_context"]
    cfg = model.config
    long_len = long_prompt_len(sliding_window(cfg.to_dict()), int(getattr(cfg, "max_position_embeddings", 2048)))
    seq_len = min(o["seq_len"], mctx) if mctx else o["seq_len"]
    n_ctx = max(256, seq_len + o["greedy_tokens"] + 64, long_len + 8)
    rt = _runtime(artifact, o["threads"], "f32", n_ctx=n_ctx)
    try:
        res["parity"] = asdict(parity(rt, model, tok, greedy_tokens=o["greedy_tokens"], kv="f32" if is_gguf else "model",
                                      long_len=long_len, max_context=mctx))
        if o["ppl"]:
            ids = eval_ids(tok, o["dataset"])
            res["tokenizer"] = tokenizer_check(rt, tok, list(PROMPTS) + [tok.decode(ids[1:200])])
            if is_gguf:   # perplexity as deployed: default F16 KV cache
                rt.close()
                rt = _runtime(artifact, o["threads"], "f16", n_ctx=max(256, seq_len))
            p = ppl_compare(rt, model, ids.numpy(), seq_len, o["max_chunks"], o["sample"], o["seed"], o["progress"])
            p.dataset, p.kv_cache = o["dataset"], "f16" if is_gguf else "model"
            res["ppl"] = asdict(p)
    finally:
        rt.close()
    res["parity_verdict"] = judge(res["parity"], res.get("ppl"), res["quant"])


def _measure_speed(res: dict, artifact: Path, threads: int) -> None:
    from .speed import measure_subprocess

    s = measure_subprocess(artifact, threads=threads)
    res["speed"] = {k: s[k] for k in ("load_s", "prefill_tps", "decode_tps", "ttft_ms", "prompt", "gen", "repeats")}
    res["memory"] = {"peak_rss_mb": s["peak_rss_mb"], "baseline_rss_mb": s["baseline_rss_mb"],
                     "model_rss_mb": round(s["peak_rss_mb"] - s["baseline_rss_mb"], 1)}
