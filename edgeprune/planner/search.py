"""Plan search: predict (allowed quant, ratio) candidates on a profile and choose what to ship.

**Candidates.** For every allowed quant, the least ratio whose shapes fit every predicted budget (memory with the
KV cache at the profile's context, decode latency, prefill) is found by bisection at ``resolution`` (0.5% of the
pool) on ``shape_at(ratio, cost)``: the method's real allocation when the model's weights were scored
(:mod:`edgeprune.planner.fit`), else the uniform config-only prediction (:func:`~.shapes.pruned_shape`).
**Cost-aware** planning (``cost_aware=True``, ``run --cost-aware``; :mod:`.costs`): each quant's allocation removes
what costs least quality per byte (memory binds: weights + KV cache at the profile's context) or per predicted ms
(decode latency binds), and its ratio is the fraction of that pool (bytes / ms of the layers) removed;
``achieved_ratio`` is always the fraction of non-embedding parameters. It is **off by default**: measured on the
reference model at demo-tiny-budget (benchmarks/planner.md, "Cost-aware vs parameter-ratio allocation") it shipped
a worse model at equal predicted memory (held-back ppl +3.5% with the default repair, +21% without) and its extra
KV-group removals did not lower the measured peak RSS as much as the allocated KV cache predicts (it missed the
budget measured), so the parameter-ratio allocation stays the default until that changes.
A grid of ratios (every 5%) is predicted too, for the table and the frontier; the step below each least ratio
is kept as evidence that less pruning does not fit.

**Choice.** Among the feasible candidates, the one with the lowest predicted quality loss (``Δ ln ppl``) wins;
ties go to the faster one (lower decode ms). The loss is *measured* when a :class:`QualityModel` built on the
weights is given (:mod:`edgeprune.planner.quality`), else the documented *prior* (:mod:`edgeprune.planner.priors`),
which ranks least pruning first. ``max_dppl_pct`` is checked on the measured perplexity after pruning/recovery.
No fit -> :class:`BudgetError` naming the budget and the shortfall.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Protocol

from ..allocation.base import UnitCost
from ..errors import BudgetError, EdgepruneError
from .costs import costs_for
from .judge import UNITS as _UNITS
from .judge import judge
from .prediction import Prediction, predict
from .priors import loss_pct, prior_loss, prior_rank
from .shapes import ModelShape, model_shape, pruned_shape

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(15))   # 0.00 .. 0.70
PREDICTED = ("max_memory_mb", "max_decode_ms_per_token", "min_prefill_tps")
RESOLUTION = 0.005


@dataclass(frozen=True)
class Candidate:
    quant: str
    ratio: float                     # requested fraction of non-embedding params removed
    achieved_ratio: float            # what the predicted shapes actually remove
    prediction: Prediction
    fits: dict[str, bool]            # budget name -> predicted to be met
    shortfall: dict[str, float]      # budget name -> amount over (positive = violated)
    loss: float | None = None        # predicted quality loss, Δ ln ppl
    loss_basis: str = ""             # 'measured' or 'prior'
    role: str = "grid"               # 'grid', 'least' (least fitting ratio of its quant) or 'below' (one step less)
    cost: UnitCost | None = field(default=None, repr=False)   # cost-aware allocation's pool (None: parameters)

    @property
    def ratio_of(self) -> str:
        """What ``ratio`` is a fraction of: 'params', or the cost pool's unit ('bytes', 'ms')."""
        return "params" if self.cost is None else self.cost.unit

    @property
    def feasible(self) -> bool:
        return all(self.fits.values())

    @property
    def loss_pct(self) -> float | None:
        return None if self.loss is None else loss_pct(self.loss)

    def to_dict(self) -> dict:
        return {"quant": self.quant, "ratio": self.ratio, "achieved_ratio": round(self.achieved_ratio, 4),
                "ratio_of": self.ratio_of, "feasible": self.feasible, "fits": self.fits, "role": self.role,
                "shortfall": {k: round(v, 3) for k, v in self.shortfall.items()},
                "loss": None if self.loss is None else round(self.loss, 6),
                "loss_pct": None if self.loss is None else round(self.loss_pct, 3), "loss_basis": self.loss_basis,
                "prediction": self.prediction.to_dict()}


class QualityModel(Protocol):
    """Predicts the quality loss of a candidate and orders candidates (lower key = better)."""

    basis: str

    def loss(self, quant: str, ratio: float, achieved_ratio: float, cost: UnitCost | None = None) -> float: ...

    def rank(self, c: Candidate) -> tuple: ...


class PriorQuality:
    """The config-only prior (:mod:`.priors`): least pruning first, then the smaller quantization loss."""

    basis = "prior"

    def loss(self, quant: str, ratio: float, achieved_ratio: float, cost: UnitCost | None = None) -> float:
        return prior_loss(quant, achieved_ratio)

    def rank(self, c: Candidate) -> tuple:
        return prior_rank(c.quant, c.achieved_ratio)


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
    policy: str = ("for each allowed quant, the least ratio (bisection at 0.5%) whose shapes fit every predicted "
                   "budget; among those, the lowest predicted quality loss, ties to the faster")
    notes: list[str] = field(default_factory=list)
    calibrated: bool = False
    mlp_multiple: int = 32
    quality_basis: str = "prior"
    runner_up: Candidate | None = None
    why: str = ""

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.feasible]

    def to_dict(self) -> dict:
        ch = self.chosen
        return {"profile": self.profile, "runtime": self.runtime, "model": self.model,
                "dense_params": self.dense_params, "dense_non_embedding_params": self.dense_non_embedding_params,
                "budgets": self.budgets, "policy": self.policy, "calibrated": self.calibrated,
                "mlp_multiple": self.mlp_multiple, "quality_basis": self.quality_basis,
                "chosen": None if ch is None else {**ch.to_dict(),
                                                   "per_layer": [s.to_dict() for s in self.chosen_shapes.layers]},
                "runner_up": None if self.runner_up is None else self.runner_up.to_dict(), "why": self.why,
                "explanation": self.explanation, "refusal": self.refusal, "notes": self.notes,
                "table": [c.to_dict() for c in self.candidates]}


def check(pred: Prediction, profile, margin: float = 0.0) -> tuple[dict[str, bool], dict[str, float]]:
    """Predicted pass/fail and shortfall (positive = violated) of the budgets a prediction can be judged on."""
    vals = {"peak_rss_mb": pred.peak_rss_mb, "decode_ms": pred.decode_ms, "prefill_tps": pred.prefill_tps}
    v = {k: x for k, x in judge(vals, profile, margin=margin, basis="projected").items() if k in PREDICTED}
    return {k: x.ok for k, x in v.items()}, {k: x.shortfall for k, x in v.items()}


def least_ratio(fits: Callable[[float], bool], hi: float, resolution: float = RESOLUTION) -> float | None:
    """The least ratio ``k·resolution`` (``0 <= k·resolution <= hi``) with ``fits(ratio)``, by bisection; None when
    even ``hi`` does not fit. Assumes fitting is monotone in the ratio (more pruning never costs more)."""
    if fits(0.0):
        return 0.0
    top = int(round(hi / resolution + 1e-9))
    if top == 0 or not fits(round(top * resolution, 6)):
        return None
    lo, k = 0, top                       # fits(lo) is False, fits(k) is True
    while k - lo > 1:
        mid = (lo + k) // 2
        if fits(round(mid * resolution, 6)):
            k = mid
        else:
            lo = mid
    return round(k * resolution, 6)


class _Evaluator:
    """Predictions, budget checks and losses of (quant, ratio), each computed once."""

    def __init__(self, ms: ModelShape, profile, shape_at: Callable[..., ModelShape], quality: QualityModel,
                 margin: float, costs: dict[str, UnitCost | None]):
        self.ms, self.profile, self.quality, self.margin, self.costs = ms, profile, quality, margin, costs
        self._shape_at, self.shapes, self.preds = shape_at, {}, {}

    def shape(self, q: str, r: float) -> ModelShape:
        key = (self.costs.get(q), r)
        if key not in self.shapes:
            self.shapes[key] = self.ms if r == 0 else self._shape_at(r, key[0])
        return self.shapes[key]

    def predicted(self, q: str, r: float) -> Candidate:
        if (q, r) not in self.preds:
            ps = self.shape(q, r)
            p = predict(ps, q, self.profile)
            fits, short = check(p, self.profile, self.margin)
            self.preds[(q, r)] = Candidate(q, r, 1 - ps.non_embedding_params / self.ms.non_embedding_params, p, fits,
                                           short, cost=self.costs.get(q))
        return self.preds[(q, r)]

    def candidate(self, q: str, r: float, role: str = "grid") -> Candidate:
        c = self.predicted(q, r)
        return replace(c, loss=self.quality.loss(q, r, c.achieved_ratio, c.cost), loss_basis=self.quality.basis,
                       role=role)


def plan(model: Any, profile, ratios: Iterable[float] | None = None, *, mlp_multiple: int = 32,
         strict: bool = True, margin_pct: float = 0.0, shape_at: Callable[..., ModelShape] | None = None,
         quality: QualityModel | None = None, resolution: float = RESOLUTION,
         cost_aware: bool = False) -> PlanResult:
    """Candidates and the choice by the policy in the module doc.

    ``model``: a model directory, config dict, HF model or :class:`ModelShape` (dense shapes; if already pruned,
    ratios are relative to it). ``shape_at(ratio, cost)``: the shapes the method's allocation gives at ``ratio``
    of the pool ``cost`` (None: parameters; default: the uniform config-only prediction, always in parameters).
    ``cost_aware`` (needs ``shape_at``; off by default, see the module doc) prices each quant's allocation by its
    binding budget (:func:`.costs.costs_for`). ``quality``: measured losses (default: the prior). ``margin_pct`` demands
    that predictions beat each budget by that many percent. Raises :class:`BudgetError` (exit 3) with a
    one-line reason when nothing fits and ``strict``; the full :class:`PlanResult` is attached as ``err.result``.
    """
    from device_profiles import DeviceProfile, load_profile

    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    ms = model_shape(model)
    grid = sorted(set(DEFAULT_RATIOS if ratios is None else (round(float(r), 4) for r in ratios)))
    if any(not 0 <= r < 1 for r in grid):
        raise EdgepruneError(f"ratios {grid} out of range; ratios must lie in [0, 1)")
    quants = profile.quants_best_first()
    costs = costs_for(ms, profile, quants) if cost_aware and shape_at is not None else {}
    ev = _Evaluator(ms, profile, shape_at or (lambda r, cost=None: pruned_shape(ms, r, mlp_multiple)),
                    quality or PriorQuality(), margin_pct / 100, costs)
    cands = _candidates(ev, quants, grid, resolution)
    ranked = sorted((c for c in cands if c.role == "least"), key=lambda c: (ev.quality.rank(c), c.prediction.decode_ms))
    chosen = ranked[0] if ranked else None
    res = PlanResult(profile.name, profile.runtime, ms.name, ms.total_params, ms.non_embedding_params,
                     {k: getattr(profile.budgets, k) for k in (*PREDICTED, "max_dppl_pct")}, cands, chosen,
                     ev.shape(chosen.quant, chosen.ratio) if chosen else None, "", notes=_notes(profile, costs),
                     calibrated=profile.calibrated, mlp_multiple=mlp_multiple, quality_basis=ev.quality.basis,
                     runner_up=ranked[1] if len(ranked) > 1 else None)
    if chosen is not None:
        res.why = _why(res)
        res.explanation = explain(res, profile, chosen)
        return res
    res.refusal = res.explanation = _refusal(res, profile, ms)
    if strict:
        err = BudgetError(res.refusal)
        err.result = res
        raise err
    return res


def _candidates(ev: _Evaluator, quants: tuple[str, ...], grid: list[float], resolution: float) -> list[Candidate]:
    """The grid for every quant, plus each quant's least fitting ratio and the step below it."""
    roles: dict[tuple[str, float], str] = {(q, r): "grid" for q in quants for r in grid}
    for q in quants:
        r = least_ratio(lambda x: ev.predicted(q, x).feasible, max(grid), resolution)
        if r is not None:
            roles[(q, r)] = "least"
            if r > 0:
                roles[(q, round(r - resolution, 6))] = "below"
    order = {q: i for i, q in enumerate(quants)}
    feasible = any(role == "least" for role in roles.values())   # a refusal needs no quality measurement
    return [ev.candidate(q, r, role) if feasible else ev.predicted(q, r)
            for (q, r), role in sorted(roles.items(), key=lambda x: (order[x[0][0]], x[0][1]))]


def _notes(profile, costs: dict[str, UnitCost | None]) -> list[str]:
    b = profile.budgets
    notes = [f"memory and speed are projected for {profile.name} "
             f"({'calibrated on a measured host run' if profile.calibrated else 'uncalibrated figures'}); "
             f"memory counts the KV cache at the profile's context ({profile.context_length} tokens); decode "
             "latency is taken at the full context"]
    if costs:
        notes.append("cost-aware allocation: " + "; ".join(
            f"{q}: ratio = fraction of the layers' {'parameters' if c is None else c.unit} removed"
            + ("" if c is None else f" ({c.basis})") for q, c in costs.items()))
    if b.max_dppl_pct is not None:
        notes.append(f"max_dppl_pct {b.max_dppl_pct:g}% is not predicted; it is checked on measured perplexity "
                     "after pruning and recovery")
    return notes


def _why(res: PlanResult) -> str:
    """One sentence: why the chosen candidate beat the runner-up."""
    c, r = res.chosen, res.runner_up
    if r is None:
        return f"{c.quant} is the only allowed quant with a feasible ratio."
    basis = "measured on held-out calibration text" if res.quality_basis == "measured" else \
        "prior: least pruning first, see edgeprune/planner/priors.py"
    if c.loss is not None and r.loss is not None and round(c.loss, 6) == round(r.loss, 6):
        return (f"{c.quant} at {c.achieved_ratio:.1%} pruning ties the runner-up {r.quant} at {r.achieved_ratio:.1%} "
                f"on predicted quality loss and decodes faster ({c.prediction.decode_ms:.2f} vs "
                f"{r.prediction.decode_ms:.2f} ms/token).")
    return (f"{c.quant} at {c.achieved_ratio:.1%} pruning beat the runner-up {r.quant} at {r.achieved_ratio:.1%} "
            f"because its predicted quality loss is lower (+{c.loss_pct:.2f}% vs +{r.loss_pct:.2f}% perplexity, "
            f"{basis}).")


def explain(res: PlanResult, profile, c: Candidate) -> str:
    p = c.prediction
    of = "" if c.ratio_of == "params" else f" of the layers' {c.ratio_of} (weights + KV cache, cost-aware)" \
        if c.ratio_of == "bytes" else f" of the layers' predicted decode {c.ratio_of} (cost-aware)"
    why_r = "no pruning needed" if c.ratio == 0 else (
        f"{c.ratio:.1%}{of} is the least pruning (0.5% steps) whose shapes fit "
        f"(achieved {c.achieved_ratio:.1%} of non-embedding params)")
    parts = [f"memory {p.peak_rss_mb:.1f} MB <= {profile.budgets.max_memory_mb:g} MB",
             f"decode {p.decode_ms:.2f} ms/token <= {profile.budgets.max_decode_ms_per_token:g}"]
    if profile.budgets.min_prefill_tps is not None:
        parts.append(f"prefill {p.prefill_tps:.0f} tok/s >= {profile.budgets.min_prefill_tps:g}")
    return (f"chose {c.quant} at ratio {c.ratio:.3f} on {profile.name}: {why_r}; predicted quality loss "
            f"+{c.loss_pct:.2f}% ppl ({c.loss_basis}); projected " + ", ".join(parts) + ". " + res.why)


def _refusal(res: PlanResult, profile, ms: ModelShape) -> str:
    """Which budget cannot be met, and by how much at the most favourable (quant, ratio)."""
    parts = []
    for k in PREDICTED:
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
    """Text table: one row per ratio, one column per quant; each cell 'MEM MB / DECODE ms +LOSS%' and a mark
    ('*' chosen, '<' least fitting ratio of its quant, 'ok' fits, or the letters of the missed budgets: M memory,
    L latency, P prefill). Rows between grid steps are the bisection's least ratio and the step below it."""
    quants = list(dict.fromkeys(c.quant for c in result.candidates))
    ratios = sorted(set(c.ratio for c in result.candidates))
    cell = {(c.quant, c.ratio): c for c in result.candidates}
    letters = {"max_memory_mb": "M", "max_decode_ms_per_token": "L", "min_prefill_tps": "P"}
    w = 30
    b = result.budgets
    lines = [f"profile {result.profile} ({result.runtime}); model {result.model or '?'} "
             f"{result.dense_params / 1e6:.2f}M params; budgets: memory <= {b['max_memory_mb']:g} MB, "
             f"decode <= {b['max_decode_ms_per_token']:g} ms/token"
             + (f", prefill >= {b['min_prefill_tps']:g} tok/s" if b.get("min_prefill_tps") else "")
             + ("  [calibrated]" if result.calibrated else "  [projected, uncalibrated]"),
             f"cells: peak MB / decode ms per token, predicted quality loss (% ppl, {result.quality_basis}); "
             "* chosen, < least fitting ratio, ok fits, M/L/P = misses memory/latency/prefill",
             "ratio  " + "".join(f"{q:>{w}}" for q in quants)]
    units = {q: c.ratio_of for c in result.candidates for q in [c.quant]}
    if set(units.values()) != {"params"}:
        lines.insert(2, "ratio = fraction removed of the layers' " + ", ".join(f"{u} ({q})" for q, u in units.items())
                     + " (cost-aware allocation); achieved parameter ratios are in plan.json")
    for r in ratios:
        row = f"{r:6.3f} "
        for q in quants:
            c = cell.get((q, r))
            if c is None:
                row += f"{'-':>{w}}"
                continue
            p = c.prediction
            mark = "*" if c is result.chosen else ("<" if c.role == "least" else "ok" if c.feasible else
                                                    "".join(letters[k] for k, ok in c.fits.items() if not ok))
            loss = "" if c.loss is None else f" +{c.loss_pct:.2f}%"
            row += f"{f'{p.peak_rss_mb:.1f}/{p.decode_ms:.2f}{loss} {mark}':>{w}}"
        lines.append(row)
    lines.append(("chosen: " + result.explanation) if result.chosen else ("REFUSED: " + (result.refusal or "")))
    return "\n".join(lines)
