"""Runtime-vs-PyTorch parity: the prompts, the measurements, and the verdict with thresholds per quant.

Measurements over fixed prompts, every position (``z`` = logits):

    max_abs_diff     = max |z_rt − z_pt|          mean_abs_diff = mean |z_rt − z_pt|
    argmax_agreement = fraction of positions where argmax z_rt = argmax z_pt

plus a greedy continuation of the first prompt compared token by token (reported, not judged: one near-tie flips
every later token). The prompts are :data:`PROMPTS` and one *long* prompt of :func:`long_prompt_len` tokens, longer
than any sliding window the model has, so a runtime that ignores the window is caught.

Verdict (:func:`judge`): PASS when, for the artifact's quant, ``max_abs_diff <= T.max_abs_diff``,
``argmax_agreement >= T.argmax_agreement`` and ``|ppl delta_pct| <= T.ppl_delta_pct`` (runtime vs PyTorch on the
same chunks). :data:`THRESHOLDS` was set from measurements of exact exports (the reference model and the tiny
test models, every quant; ``benchmarks/parity.md``) with a margin of at least 3x on max |Δlogit| (8x for f16), and
checked to fail on the f16 GGUF of the reference model verified against the reference with 1% (and 0.3%) noise
added to its weights. The absolute logit thresholds suit models whose logits are of the reference model's scale
(|z| up to ~20); a quantized model with much larger logits may need its row raised — measure it with
``scripts/bench_parity.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "In 1905 Albert Einstein published four papers that",
    "The quick brown fox jumps over the lazy dog because",
)
LONG_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
             "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
             "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ")
LONG_MIN = 160          # tokens of the long prompt for a model without a sliding window
LONG_PAST_WINDOW = 32   # tokens beyond the shortest sliding window


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float
    argmax_agreement: float
    ppl_delta_pct: float


# quant -> thresholds. GGUF parity runs with an F32 KV cache (only the weight format differs); its perplexity with
# the deployed F16 cache. ONNX fp32/fp16 use the f32/onnx-fp16 rows, ONNX int8 (dynamic, activations too) "int8".
THRESHOLDS = {
    "f32": Thresholds(1e-3, 0.99, 0.1),
    "f16": Thresholds(5e-2, 0.98, 0.5),
    "onnx-fp16": Thresholds(1e-1, 0.98, 0.5),
    "q8_0": Thresholds(5e-1, 0.95, 1.0),
    "q6_k": Thresholds(7.5e-1, 0.93, 2.0),
    "q5_k_m": Thresholds(1.0, 0.9, 3.0),
    "q4_k_m": Thresholds(2.0, 0.85, 6.0),
    "int8": Thresholds(1.5, 0.9, 5.0),
}


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
    prompts: list[dict] = field(default_factory=list)     # per prompt: tokens, max_abs_diff, argmax_agreement
    beyond_context: dict | None = None   # the long prompt past a declared --max-context (reported, not judged)


def long_prompt_len(window: int | None, limit: int) -> int:
    """Tokens of the long prompt: past the sliding window when there is one, never past ``limit``."""
    want = max(LONG_MIN, (window or 0) + LONG_PAST_WINDOW)
    return max(2, min(want, limit))


def long_prompt_ids(tok, n: int) -> list[int]:
    """Exactly ``n`` token ids of :data:`LONG_TEXT` (repeated as needed), starting with BOS when the tokenizer adds it."""
    text, ids = LONG_TEXT, tok(LONG_TEXT).input_ids
    while len(ids) < n:
        text += LONG_TEXT
        ids = tok(text).input_ids
    return ids[:n]


def _compare(rt, model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    return rt.logits(ids), ref


def _prompt_row(got: np.ndarray, ref: np.ndarray) -> dict:
    d = np.abs(got - ref)
    return {"tokens": len(ref), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "agree": int((got.argmax(-1) == ref.argmax(-1)).sum())}


def _greedy(rt, model, tok, ids: list[int], n: int) -> tuple[list[int], list[int]]:
    import torch

    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0)
    return g[0, len(ids):].tolist(), rt.greedy(ids, n)


def parity(rt, model, tok, prompts=PROMPTS, greedy_tokens: int = 32, kv: str = "f32", long_len: int = LONG_MIN,
           max_context: int | None = None) -> Parity:
    """Compare ``rt`` with ``model`` on ``prompts`` plus a ``long_len``-token prompt. With ``max_context`` (an
    artifact declared for contexts up to N), every prompt is judged on its first N tokens and the full long prompt
    is reported under ``beyond_context``."""
    seqs = [tok(p).input_ids for p in prompts] + [long_prompt_ids(tok, long_len)]
    beyond = None
    if max_context is not None and len(seqs[-1]) > max_context:
        beyond = _prompt_row(*_compare(rt, model, seqs[-1]))
        beyond["agreement"] = beyond.pop("agree") / beyond["tokens"]
        seqs = [s[:max_context] for s in seqs]
    rows = [_prompt_row(*_compare(rt, model, s)) for s in seqs]
    n = sum(r["tokens"] for r in rows)
    first = seqs[0]
    g_tokens = greedy_tokens if max_context is None else max(0, min(greedy_tokens, max_context - len(first)))
    ref_g, rt_g = _greedy(rt, model, tok, first, g_tokens) if g_tokens else ([], [])
    prefix = next((i for i, (a, b) in enumerate(zip(ref_g, rt_g)) if a != b), min(len(ref_g), len(rt_g)))
    for r in rows:
        r["argmax_agreement"] = r.pop("agree") / r["tokens"]
    return Parity(max(r["max_abs_diff"] for r in rows), sum(r["mean_abs_diff"] * r["tokens"] for r in rows) / n,
                  sum(r["argmax_agreement"] * r["tokens"] for r in rows) / n, ref_g == rt_g, prefix, g_tokens, n, kv,
                  ref_g, rt_g, rows, beyond)


def thresholds_for(quant: str) -> tuple[str, Thresholds]:
    """(row name, thresholds) for an artifact quant; an unknown one is judged with the loosest row."""
    if quant in THRESHOLDS:
        return quant, THRESHOLDS[quant]
    return "q4_k_m", THRESHOLDS["q4_k_m"]


def judge(par: dict, ppl: dict | None, quant: str) -> dict:
    """PASS/FAIL of parity for ``quant``, with the thresholds, the measured values and what failed."""
    row, t = thresholds_for(quant)
    failed = []
    if not par["max_abs_diff"] <= t.max_abs_diff:
        failed.append(f"max_abs_diff {par['max_abs_diff']:.4g} > {t.max_abs_diff:g}")
    if not par["argmax_agreement"] >= t.argmax_agreement:
        failed.append(f"argmax_agreement {par['argmax_agreement']:.4f} < {t.argmax_agreement:g}")
    if ppl is not None and not abs(ppl["delta_pct"]) <= t.ppl_delta_pct:
        failed.append(f"|ppl delta_pct| {abs(ppl['delta_pct']):.3f} > {t.ppl_delta_pct:g}")
    return {"verdict": "FAIL" if failed else "PASS", "quant": quant, "thresholds_row": row,
            "thresholds": asdict(t), "failed": failed}
