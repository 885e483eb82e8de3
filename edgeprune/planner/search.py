"""Plan search: predict every (allowed quant, ratio) on a profile and choose what to ship.

**Policy** (:func:`plan`): walk the allowed quants from best quality (f32 > f16 > q8_0 > q6_k > q5_k_m > q4_k_m;
fp32 > fp16 > int8); for the first quant where some ratio fits every predicted budget (memory, decode latency,
prefill), take the smallest such ratio. ``max_dppl_pct`` cannot be predicted and is checked on the measured
perplexity after pruning/recovery. No fit -> :class:`BudgetError` naming the budget and the shortfall.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import BudgetError, EdgepruneError
from .judge import UNITS as _UNITS
from .judge import judge
from .prediction import Prediction, predict
from .shapes import ModelShape, model_shape, pruned_shape

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(15))   # 0.00 .. 0.70
PREDICTED = ("max_memory_mb", "max_decode_ms_per_token", "min_prefill_tps")


@dataclass(frozen=True)
class Candidate:
    quant: str
    ratio: float                     # requested fraction of non-embedding params removed
    achieved_ratio: float            # what the predicted shapes actually remove
    prediction: Prediction
    fits: dict[str, bool]            # budget name -> predicted to be met
    shortfall: dict[str, float]      # budget name -> amount over (positive = violated)

    @property
    def feasible(self) -> bool:
        return all(self.fits.values())

    def to_dict(self) -> dict:
        return {"quant": self.quant, "ratio": self.ratio, "achieved_ratio": round(self.achieved_ratio, 4),
                "feasible": self.feasible, "fits": self.fits,
                "shortfall": {k: round(v, 3) for k, v in self.shortfall.items()},
                "prediction": self.prediction.to_dict()}


@dataclass
class PlanResult:
    profile: str
    runtime: str
    model: str
    dense_params: int
    dense_non_embedding_params: int
    budgets: dict[str, float | None]
    candidates: list[Candidate]
    chosen: Candidate | None
    chosen_shapes: ModelShape | None
    explanation: str
    refusal: str | None = None
    policy: str = ("least pruning at the best-quality quant that fits every predicted budget "
                   "(max_memory_mb, max_decode_ms_per_token, min_prefill_tps)")
    notes: list[str] = field(default_factory=list)
    calibrated: bool = False
    mlp_multiple: int = 32

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.feasible]

    def to_dict(self) -> dict:
        return {"profile": self.profile, "runtime": self.runtime, "model": self.model,
                "dense_params": self.dense_params, "dense_non_embedding_params": self.dense_non_embedding_params,
                "budgets": self.budgets, "policy": self.policy, "calibrated": self.calibrated,
                "mlp_multiple": self.mlp_multiple,
                "chosen": None if self.chosen is None else {"quant": self.chosen.quant, "ratio": self.chosen.ratio,
                                                            "achieved_ratio": round(self.chosen.achieved_ratio, 4),
                                                            "prediction": self.chosen.prediction.to_dict(),
                                                            "per_layer": [s.to_dict() for s in self.chosen_shapes.layers]},
                "explanation": self.explanation, "refusal": self.refusal, "notes": self.notes,
                "table": [c.to_dict() for c in self.candidates]}


def check(pred: Prediction, profile, margin: float = 0.0) -> tuple[dict[str, bool], dict[str, float]]:
    """Predicted pass/fail and shortfall (positive = violated) of the budgets a prediction can be judged on."""
    vals = {"peak_rss_mb": pred.peak_rss_mb, "decode_ms": pred.decode_ms, "prefill_tps": pred.prefill_tps}
    v = {k: x for k, x in judge(vals, profile, margin=margin, basis="projected").items() if k in PREDICTED}
    return {k: x.ok for k, x in v.items()}, {k: x.shortfall for k, x in v.items()}


def plan(model: Any, profile, ratios: Iterable[float] | None = None, *, mlp_multiple: int = 32,
         strict: bool = True, margin_pct: float = 0.0) -> PlanResult:
    """Predict every (allowed quant, ratio) and choose by the policy in the module doc.

    ``model``: a model directory, config dict, HF model or :class:`ModelShape` (dense shapes; if already pruned,
    ratios are relative to it). ``margin_pct`` demands that predictions beat each budget by that many percent.
    Raises :class:`BudgetError` (exit 3) with a one-line reason when nothing fits and
    ``strict``; the full :class:`PlanResult` is attached as ``err.result``.
    """
    from device_profiles import DeviceProfile, load_profile

    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    ms = model_shape(model)
    ratios = sorted(set(DEFAULT_RATIOS if ratios is None else (round(float(r), 4) for r in ratios)))
    for r in ratios:
        if not 0 <= r < 1:
            raise EdgepruneError(f"ratio {r} out of range; ratios must lie in [0, 1)")
    dense_ne = ms.non_embedding_params
    cands: list[Candidate] = []
    shapes_at: dict[float, ModelShape] = {}
    for q in profile.quants_best_first():
        for r in ratios:
            ps = shapes_at.setdefault(r, pruned_shape(ms, r, mlp_multiple))
            p = predict(ps, q, profile)
            fits, short = check(p, profile, margin_pct / 100)
            cands.append(Candidate(q, r, 1 - ps.non_embedding_params / dense_ne, p, fits, short))
    chosen = next((c for q in profile.quants_best_first() for c in cands if c.quant == q and c.feasible), None)
    b = profile.budgets
    budgets = {"max_memory_mb": b.max_memory_mb, "max_decode_ms_per_token": b.max_decode_ms_per_token,
               "min_prefill_tps": b.min_prefill_tps, "max_dppl_pct": b.max_dppl_pct}
    notes = [f"memory and speed are projected for {profile.name} "
             f"({'calibrated on a measured host run' if profile.calibrated else 'uncalibrated figures'}); "
             f"decode latency is taken at the full context ({profile.context_length} tokens)"]
    if b.max_dppl_pct is not None:
        notes.append(f"max_dppl_pct {b.max_dppl_pct:g}% is not predicted; it is checked on measured perplexity "
                     "after pruning and recovery")
    res = PlanResult(profile.name, profile.runtime, ms.name, ms.total_params, dense_ne, budgets, cands, chosen,
                     shapes_at.get(chosen.ratio) if chosen else None, "", notes=notes, calibrated=profile.calibrated,
                     mlp_multiple=mlp_multiple)
    if chosen is not None:
        res.explanation = _explain(res, profile, chosen)
        return res
    res.refusal = res.explanation = _refusal(res, profile, ms)
    if strict:
        err = BudgetError(res.refusal)
        err.result = res
        raise err
    return res


def _explain(res: PlanResult, profile, c: Candidate) -> str:
    p = c.prediction
    better = [q for q in profile.quants_best_first() if q != c.quant][: profile.quants_best_first().index(c.quant)]
    why_q = (f"; better-quality {', '.join(better)} fit no ratio up to {max(x.ratio for x in res.candidates):.0%}"
             if better else "")
    why_r = "no pruning needed" if c.ratio == 0 else (
        f"{c.ratio:.0%} is the least pruning that fits (achieved {c.achieved_ratio:.1%} of non-embedding params)")
    parts = [f"memory {p.peak_rss_mb:.1f} MB <= {profile.budgets.max_memory_mb:g} MB",
             f"decode {p.decode_ms:.2f} ms/token <= {profile.budgets.max_decode_ms_per_token:g}"]
    if profile.budgets.min_prefill_tps is not None:
        parts.append(f"prefill {p.prefill_tps:.0f} tok/s >= {profile.budgets.min_prefill_tps:g}")
    return (f"chose {c.quant} at ratio {c.ratio:.2f} on {profile.name}: {why_r}{why_q}; projected "
            + ", ".join(parts) + ".")


def _refusal(res: PlanResult, profile, ms: ModelShape) -> str:
    """Which budget cannot be met, and by how much at the most favourable (quant, ratio)."""
    parts = []
    for k in ("max_memory_mb", "max_decode_ms_per_token", "min_prefill_tps"):
        vals = [c for c in res.candidates if k in c.shortfall]
        if not vals:
            continue
        best = min(vals, key=lambda c: c.shortfall[k])
        if best.shortfall[k] > 0:
            lim = getattr(profile.budgets, k)
            parts.append(f"{k} {lim:g} {_UNITS[k]} is missed by {best.shortfall[k]:.3g} {_UNITS[k]} "
                         f"({100 * best.shortfall[k] / lim:.0f}%) even at {best.quant} with {best.ratio:.0%} pruning")
    if not parts:   # each budget alone is reachable, but never together
        mem_ok = [c for c in res.candidates if c.fits["max_memory_mb"]]
        c = min(mem_ok, key=lambda c: c.shortfall["max_decode_ms_per_token"])
        bad = [k for k, ok in c.fits.items() if not ok]
        parts.append(f"no (quant, ratio) meets all budgets together; closest is {c.quant} at {c.ratio:.0%}, which "
                     f"misses {', '.join(f'{k} by {c.shortfall[k]:.3g} {_UNITS[k]}' for k in bad)}")
    return (f"no plan fits {profile.name} for {ms.name or 'the model'} ({ms.total_params / 1e6:.1f}M params, quants "
            f"{'/'.join(profile.quants_best_first())}, ratios up to {max(c.ratio for c in res.candidates):.0%}): "
            + "; ".join(parts) + "; relax the budget, allow a smaller quant, or use a smaller model")


def format_table(result: PlanResult) -> str:
    """Text table: one row per ratio, one column per quant; each cell 'MEM MB / DECODE ms' and a mark
    ('*' chosen, 'ok' fits, or the letters of the missed budgets: M memory, L latency, P prefill)."""
    quants = list(dict.fromkeys(c.quant for c in result.candidates))
    ratios = list(dict.fromkeys(c.ratio for c in result.candidates))
    cell = {(c.quant, c.ratio): c for c in result.candidates}
    letters = {"max_memory_mb": "M", "max_decode_ms_per_token": "L", "min_prefill_tps": "P"}
    w = 22
    b = result.budgets
    lines = [f"profile {result.profile} ({result.runtime}); model {result.model or '?'} "
             f"{result.dense_params / 1e6:.2f}M params; budgets: memory <= {b['max_memory_mb']:g} MB, "
             f"decode <= {b['max_decode_ms_per_token']:g} ms/token"
             + (f", prefill >= {b['min_prefill_tps']:g} tok/s" if b.get("min_prefill_tps") else "")
             + ("  [calibrated]" if result.calibrated else "  [projected, uncalibrated]"),
             "cells: peak MB / decode ms per token; * chosen, ok fits, M/L/P = misses memory/latency/prefill",
             "ratio " + "".join(f"{q:>{w}}" for q in quants)]
    for r in ratios:
        row = f"{r:5.2f} "
        for q in quants:
            c = cell[(q, r)]
            p = c.prediction
            mark = "*" if c is result.chosen else ("ok" if c.feasible else
                                                    "".join(letters[k] for k, ok in c.fits.items() if not ok))
            row += f"{f'{p.peak_rss_mb:.1f}/{p.decode_ms:.2f} {mark}':>{w}}"
        lines.append(row)
    lines.append(("chosen: " + result.explanation) if result.chosen else ("REFUSED: " + (result.refusal or "")))
    return "\n".join(lines)

