"""Host calibration: fit this machine's effective bandwidth, fixed costs, memory overhead and compute throughput
from measured runs, as typed fields (:class:`HostCalibration`) that :func:`apply_calibration` puts into a profile.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from ..errors import EdgepruneError
from .prediction import predict
from .shapes import model_shape
from .tensor_bytes import matmul_params


@dataclass(frozen=True)
class HostRun:
    """One measured run on the host (from ``exporters.verify.verify``): the model's shapes and quant, and what
    was measured. ``kv_tokens`` is the mean KV position during the timed decode steps; ``n_ctx`` the context
    the runtime allocated; ``n_prompt`` the prefill length timed."""

    model: Any
    quant: str
    decode_tps: float
    peak_rss_mb: float
    file_mb: float | None = None
    prefill_tps: float | None = None
    n_ctx: int | None = None
    kv_tokens: int | None = None
    n_prompt: int | None = None


@dataclass(frozen=True)
class HostCalibration:
    """Fitted host figures. ``peak_bandwidth_gbps`` is set only when the measured effective bandwidth exceeded
    the probed peak (the model fits in cache): the peak is then raised to it and the factor capped at 1."""

    runtime: str
    effective_bandwidth_factor: float
    runtime_overhead_mb: float
    per_token_overhead_ms: float
    per_layer_overhead_ms: float
    compute_gflops: float
    n_runs: int
    residuals: dict[str, list[float]]
    notes: list[str]
    peak_bandwidth_gbps: float | None = None

    def figures(self):
        from device_profiles import Figure

        src = f"calibrated: fitted on {self.n_runs} measured host run(s)"
        figs = {k: Figure(getattr(self, k), src) for k in FITTED}
        if self.peak_bandwidth_gbps is not None:
            figs["peak_bandwidth_gbps"] = Figure(self.peak_bandwidth_gbps, src)
        return figs

    def to_dict(self) -> dict:
        return asdict(self)


FITTED = ("effective_bandwidth_factor", "runtime_overhead_mb", "per_token_overhead_ms", "per_layer_overhead_ms",
          "compute_gflops")


def host_run_from_verify(result: Any, model: Any, quant: str, **kw) -> HostRun:
    """Build a :class:`HostRun` from a verify result (attributes or dict: ``speed.decode_tps``,
    ``speed.prefill_tps``, ``memory.peak_rss_mb``, ``file_mb``)."""
    def get(obj, *path):
        for k in path:
            if obj is None:
                return None
            obj = obj.get(k) if isinstance(obj, dict) else getattr(obj, k, None)
        return obj

    return HostRun(model, quant, float(get(result, "speed", "decode_tps")), float(get(result, "memory", "peak_rss_mb")),
                   file_mb=get(result, "file_mb"), prefill_tps=get(result, "speed", "prefill_tps"), **kw)


def calibrate_host(runs: HostRun | Sequence[HostRun], profile="host", *, save: bool = False) -> HostCalibration:
    """Fit the host's effective-bandwidth factor, fixed per-token cost, memory overhead and compute throughput
    from measured runs.

    * decode: ``1000/decode_tps = a + bytes_per_token / (peak_bw * f)``. With >= 2 runs of different
      bytes/token, least squares gives ``a`` (split into the profile's per-token/per-layer proportions) and ``f``;
      with one run ``a`` keeps the profile's value and ``f`` is solved (if the run is faster than ``a`` allows,
      ``a`` is halved until the bandwidth term is positive) — :func:`fit_decode`.
    * memory: ``runtime_overhead_mb = mean(peak_rss - weights - kv - compute buffer)`` — :func:`fit_overhead`.
    * compute: from prefill, ``gflops = mean(flops / (t_prefill - a - read/bw))`` when prefill was measured —
      :func:`fit_compute`.
    ``save=True`` stores the figures so that ``load_profile('host')`` (and ``base: host`` profiles) use them.
    """
    from device_profiles import DeviceProfile, load_profile

    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile, calibration=False)
    rows = _predicted_rows(runs, profile)
    notes: list[str] = []
    xs = [p.bytes_per_token / 1e6 for _, _, p in rows]
    # measured time minus the (small) attention compute term the prediction adds on top of the fit
    ys = [1000 / r.decode_tps - (p.decode_ms - p.bytes_per_token / (profile.peak_bandwidth_gbps * 1e6))
          for r, _, p in rows]
    a_prof = profile.per_token_overhead_ms + rows[0][1].n_layers * profile.per_layer_overhead_ms
    a, b = fit_decode(xs, ys, a_prof, notes)
    eff_gbps = 1 / b                      # (MB/ms) = GB/s
    factor = eff_gbps / profile.peak_bandwidth_gbps
    peak = None
    if factor > 1:
        notes.append(f"effective bandwidth {eff_gbps:.1f} GB/s exceeds the probed peak "
                     f"{profile.peak_bandwidth_gbps:.1f} GB/s (model fits in cache); peak raised to match")
        peak = round(eff_gbps, 3)
    split = a / a_prof if a_prof > 0 else 0.0
    per_tok = profile.per_token_overhead_ms * split if a_prof > 0 else a
    per_layer = profile.per_layer_overhead_ms * split if a_prof > 0 else 0.0
    ov, overhead = fit_overhead(rows, notes)
    gflops = fit_compute(rows, profile, a, eff_gbps)
    cal = HostCalibration(profile.runtime, round(min(factor, 1.0), 4), round(ov, 2), round(per_tok, 4),
                          round(per_layer, 5), round(gflops, 1), len(rows),
                          {"decode_ms": [round(y - (a + b * x), 4) for x, y in zip(xs, ys)],
                           "peak_rss_mb": [round(o - ov, 3) for o in overhead]}, notes, peak)
    if save:
        from device_profiles.host import save_calibration

        save_calibration(profile.runtime, cal.figures())
    return cal


MEMORY_NOISE_MB = 0.5      # floor of the peak-RSS measurement's run-to-run noise
MEMORY_NOISE_PCT = 1.0     # ... or this share of the measured peak, whichever is larger


def memory_noise_mb(peak_rss_mb: float) -> float:
    """The run-to-run noise of a measured peak RSS: ``max(0.5 MB, 1% of the peak)`` (llama.cpp's peak of the same
    GGUF varied by 0.1-0.3 MB between identical runs here, 63.4 vs 63.5 MB in CI; the heap layout moves it)."""
    return max(MEMORY_NOISE_MB, MEMORY_NOISE_PCT / 100 * peak_rss_mb)


def settle_overhead(cal: HostCalibration, peak_rss_mb: float) -> HostCalibration:
    """Hysteresis on the fitted memory overhead across runs on this machine: a new overhead within
    :func:`memory_noise_mb` of the one this machine recorded last keeps the recorded value (and says so in the
    notes), so a plan changes only when memory moved by more than the measurement's noise; otherwise the new value
    is recorded. The settled value is off by at most the noise, which ``run``'s 2% planning margin covers. Speed
    figures are not settled here: each measurement is already the best of its repeats."""
    from device_profiles.host import record_overhead, recorded_overhead

    old, new, noise = recorded_overhead(cal.runtime), cal.runtime_overhead_mb, memory_noise_mb(peak_rss_mb)
    if old is not None and abs(new - old) <= noise:
        note = (f"memory overhead measured {new:.2f} MB, within the measurement's noise (±{noise:.2f} MB) of the "
                f"{old:.2f} MB this machine recorded: kept {old:.2f}")
        return replace(cal, runtime_overhead_mb=old, notes=[*cal.notes, note])
    record_overhead(cal.runtime, new)
    return cal


def _predicted_rows(runs, profile) -> list[tuple[HostRun, Any, Any]]:
    """(run, shapes, prediction with zero overheads and factor 1) for each measured run."""
    runs = [runs] if isinstance(runs, HostRun) else list(runs)
    if not runs:
        raise EdgepruneError("calibrate_host needs at least one measured run")
    base = replace(profile, effective_bandwidth_factor=1.0, runtime_overhead_mb=0.0,
                   per_token_overhead_ms=0.0, per_layer_overhead_ms=0.0)
    rows = []
    for r in runs:
        if r.decode_tps <= 0 or r.peak_rss_mb <= 0:
            raise EdgepruneError(f"measured run has impossible figures (decode_tps={r.decode_tps}, "
                                 f"peak_rss_mb={r.peak_rss_mb}); re-run verify")
        ms = model_shape(r.model)
        p = predict(ms, r.quant, base, n_ctx=r.n_ctx or profile.context_length,
                    kv_tokens=r.kv_tokens if r.kv_tokens is not None else 64, n_prompt=r.n_prompt)
        rows.append((r, ms, p))
    return rows


def fit_decode(xs: list[float], ys: list[float], a_prof: float, notes: list[str]) -> tuple[float, float]:
    """``(a, b)`` of ``t_ms = a + b * MB`` (``b = 1 / (GB/s)`` in ms/MB): least squares over >= 2 runs whose
    bytes/token differ by > 5%, else a one-point fit keeping the fixed cost at most a quarter of the time."""
    if len(xs) >= 2 and max(xs) - min(xs) > 0.05 * max(xs):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        if b > 0 and a >= 0:
            return a, b
        notes.append(f"decode fit degenerate (a={a:.3g} ms, b={b:.3g} ms/MB); using one-point fit")
    a = a_prof
    # one point cannot split fixed cost from the bandwidth term: keep the fixed cost to at most a quarter of
    # the measured time (feasibility.md Q5 measured 16% for a 135M model and a few % for 1B on this machine
    # kind), so that speedups of smaller variants are not mistaken for fixed overhead
    while a > 1e-4 and any(y - a <= 0.75 * y for y in ys):
        a /= 2
    if a != a_prof:
        notes.append(f"fixed per-token cost lowered from {a_prof:.3g} to {a:.3g} ms to fit the measured speed")
    return a, sum((y - a) / x for x, y in zip(xs, ys)) / len(xs)


def fit_overhead(rows, notes: list[str]) -> tuple[float, list[float]]:
    """Mean of measured peak RSS minus predicted weights + KV + compute buffer (clipped at 0), and each run's."""
    overhead = [r.peak_rss_mb - p.peak_rss_mb for r, _, p in rows]
    ov = sum(overhead) / len(overhead)
    if ov < 0:
        notes.append(f"measured RSS is below the predicted weights + KV by {-ov:.1f} MB (pages not touched); "
                     "overhead set to 0")
        ov = 0.0
    return ov, overhead


def fit_compute(rows, profile, a_ms: float, eff_gbps: float) -> float:
    """GFLOP/s from measured prefill: ``flops / (t_prefill - a - read/bw)``; the profile's figure without one."""
    gfl = []
    for r, ms, p in rows:
        if r.prefill_tps:
            n = r.n_prompt or min(512, r.n_ctx or profile.context_length)
            t = n / r.prefill_tps - a_ms / 1e3 - p.bytes_per_token / (eff_gbps * 1e9)
            hd_fl = 4 * sum(s.num_attention_heads for s in ms.layers) * ms.head_dim
            if t > 0:
                gfl.append((n * 2 * matmul_params(ms) + hd_fl * n * n / 2) / t / 1e9)
    return sum(gfl) / len(gfl) if gfl else profile.compute_gflops


def apply_calibration(profile, cal: HostCalibration):
    """The profile with the calibrated figures (what ``load_profile`` does with a saved calibration)."""
    return replace(profile.with_figures(**cal.figures()), calibrated=True)
