"""Fit a scored model to a budget on its real allocation: score once, allocate many, bisect the ratio.

:class:`~edgeprune.prune.Scored` holds one scoring of the model (the method's group scores, the dense groups,
the allocation options); ``scored.plan_at(ratio)`` runs the method's own allocator at any ratio without scoring
again. :func:`shape_at` turns such a plan into the :class:`~.shapes.ModelShape` the pruned model will have
(kept KV groups x ``n_rep`` query heads, kept MLP channels per layer), which :func:`~.prediction.predict` prices
with the KV cache at the profile's context. :func:`choose_ratio` finds by bisection the least ratio (at 0.5% of
the non-embedding parameters) whose real shapes fit every predicted budget of a :class:`FitTarget`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..errors import BudgetError, EdgepruneError
from .judge import UNITS
from .prediction import predict
from .search import RESOLUTION, check, least_ratio
from .shapes import ModelShape


@dataclass(frozen=True)
class FitTarget:
    """Prune to the least ratio whose real shapes fit ``profile``'s predicted budgets at ``quant``."""

    profile: Any                 # device_profiles.DeviceProfile
    quant: str
    margin_pct: float = 0.0
    resolution: float = RESOLUTION
    max_ratio: float = 0.9
    cost_aware: bool = False     # bisect the binding budget's pool (bytes with the KV cache) instead of parameters

    def validate(self) -> None:
        from device_profiles import QUANTS

        if self.quant not in QUANTS[self.profile.runtime]:
            raise EdgepruneError(f"--quant {self.quant} is not a {self.profile.runtime} type; use one of "
                                 f"{', '.join(QUANTS[self.profile.runtime])}")
        if not 0 < self.resolution < self.max_ratio < 1:
            raise EdgepruneError(f"fit resolution {self.resolution} / max ratio {self.max_ratio} out of range")

    def describe(self) -> dict:
        b = self.profile.budgets
        return {"profile": self.profile.name, "quant": self.quant, "context": self.profile.context_length,
                "max_memory_mb": b.max_memory_mb, "max_decode_ms_per_token": b.max_decode_ms_per_token,
                "min_prefill_tps": b.min_prefill_tps, "margin_pct": self.margin_pct, "resolution": self.resolution,
                "calibrated": self.profile.calibrated}


def shape_from_plan(dense: ModelShape, plan, bias_means: list | None = None) -> ModelShape:
    """The shapes a plan leaves: per layer, kept KV groups (q heads follow ``n_rep``) and kept MLP channels; a
    pruned projection gains a bias where the method compensates it (``bias_means[i]`` has ``"o"`` / ``"down"``,
    as :func:`edgeprune.surgery.apply_plan` does)."""
    layers = []
    for i, (s, kv, ch) in enumerate(zip(dense.layers, plan.keep_kv, plan.keep_mlp)):
        n_rep = s.num_attention_heads // s.num_key_value_heads if s.num_key_value_heads else 1
        means = (bias_means[i] if bias_means else None) or {}
        o_bias = s.o_proj_bias or (len(kv) != s.num_key_value_heads and "o" in means)
        down_bias = s.down_proj_bias or (len(ch) != s.intermediate_size and "down" in means)
        layers.append(replace(s, num_key_value_heads=len(kv), num_attention_heads=len(kv) * n_rep,
                              intermediate_size=len(ch), o_proj_bias=o_bias, down_proj_bias=down_bias))
    return replace(dense, layers=tuple(layers))


def shape_at(scored, dense: ModelShape) -> Callable[..., ModelShape]:
    """``(ratio, cost=None) -> shapes`` from the method's own allocation on one scoring (memoized); ``cost``: the
    cost-aware pool (:class:`~edgeprune.allocation.base.UnitCost`), None for parameters."""
    memo: dict = {}

    def at(r: float, cost=None) -> ModelShape:
        if (r, cost) not in memo:
            memo[(r, cost)] = dense if r == 0 else shape_from_plan(dense, scored.plan_at(r, cost),
                                                                   scored.bias_means(len(dense.layers)))
        return memo[(r, cost)]
    return at


def choose_ratio(target: FitTarget, scored, dense: ModelShape):
    """(ratio, cost): the least ratio (bisection at ``target.resolution``) of the non-embedding parameters, or with
    ``target.cost_aware`` of the binding budget's pool (:func:`.costs.unit_cost`: bytes with the KV cache for a
    memory target; ``cost`` None otherwise), whose real shapes fit every predicted budget; raises
    :class:`BudgetError` naming the shortfall when even ``max_ratio`` does not fit."""
    from .costs import unit_cost

    at = shape_at(scored, dense)
    margin = target.margin_pct / 100
    cost = unit_cost(dense, target.quant, target.profile) if target.cost_aware else None

    def fits(r: float) -> bool:
        return all(check(predict(at(r, cost), target.quant, target.profile), target.profile, margin)[0].values())

    r = least_ratio(fits, target.max_ratio, target.resolution)
    if r is None:
        _, short = check(predict(at(target.max_ratio, cost), target.quant, target.profile), target.profile, margin)
        bad = "; ".join(f"{k} {getattr(target.profile.budgets, k):g} {UNITS[k]} missed by {v:.3g} {UNITS[k]}"
                        for k, v in short.items() if v > 0)
        raise BudgetError(f"even {target.max_ratio:.0%} pruning at {target.quant} does not fit {target.profile.name}: "
                          f"{bad}; raise the budget or choose a smaller quant")
    return r, cost


def verify_context() -> int:
    """The context ``verify`` measures memory at (``exporters.speed.measure``: prompt + generated + 8 tokens)."""
    from exporters.speed import measure

    d = inspect.signature(measure).parameters
    return d["prompt"].default + d["gen"].default + 8


TARGET_MB_MARGIN_PCT = 1.0   # --target-mb: headroom for run-to-run noise in the measured peak RSS


def memory_target(target_mb: float, quant: str = "f16", ctx: int | None = None, profile=None) -> FitTarget:
    """A :class:`FitTarget` for ``prune --target-mb``: this host's (calibrated) llama.cpp figures, a memory budget
    of ``target_mb`` MiB at context ``ctx`` (default: the context ``verify`` measures at), no speed budget. The
    prediction must fit with a 1% margin: llama.cpp's measured peak RSS varies by a few tenths of a MB from run to
    run (seen: 65.0 MB against a prediction fitted to 64.9), and the promise is "within N"."""
    from device_profiles import Budgets, load_profile

    if not target_mb > 0:
        raise EdgepruneError(f"--target-mb {target_mb} must be > 0 (MiB of peak memory on the runtime)")
    if ctx is not None and ctx < 1:
        raise EdgepruneError(f"--ctx {ctx} must be >= 1")
    prof = profile or load_profile("host")
    prof = replace(prof, name=f"target-{target_mb:g}MB", context_length=ctx or verify_context(),
                   budgets=Budgets(max_memory_mb=float(target_mb), max_decode_ms_per_token=1e9))
    t = FitTarget(prof, quant, margin_pct=TARGET_MB_MARGIN_PCT)
    t.validate()
    return t


def host_profile_for(model_dir, ctx: int, threads: int = 1):
    """This host's llama.cpp profile, calibrated: the saved calibration if there is one, else one measurement of
    the dense model (f16 GGUF in a temporary folder, ``exporters.speed`` in a subprocess at context ``ctx``)."""
    import tempfile
    from pathlib import Path

    from device_profiles import load_profile

    from .host_fit import HostRun, apply_calibration, calibrate_host

    prof = load_profile("host")
    if prof.calibrated:
        return prof
    import exporters
    from exporters.speed import measure_subprocess

    with tempfile.TemporaryDirectory(prefix="edgeprune-hostcal-") as d:
        art = Path(d) / "dense-f16.gguf"
        exporters.export(str(model_dir), "gguf", str(art), quant="f16")
        m = measure_subprocess(art, threads=threads, n_ctx=ctx)
    run = HostRun(str(model_dir), "f16", m.get("decode_tps_best") or m["decode_tps"], m["peak_rss_mb"], m["file_mb"],
                  m.get("prefill_tps_best") or m["prefill_tps"], m.get("n_ctx") or ctx, m.get("kv_tokens"),
                  m.get("prompt"))
    base = load_profile("host", calibration=False)
    return apply_calibration(base, calibrate_host(run, base))
