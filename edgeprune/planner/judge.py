"""Budget pass/fail: the one place that compares figures with budgets (used by plan, verify and report).

A budget named ``max_X`` is met when ``value <= limit``, ``min_X`` when ``value >= limit``. Each budget reads one
figure (:data:`FIGURE`): ``max_memory_mb`` the peak RSS (MiB), ``max_decode_ms_per_token`` the decode latency,
``min_prefill_tps`` the prefill throughput, ``max_file_mb`` the artifact size, ``max_dppl_pct`` the perplexity
increase in percent. ``margin`` (a fraction) demands that the value beats the limit by that much:
``value <= limit * (1 - margin)`` / ``value >= limit / (1 - margin)``.

``headroom`` is how far the value is inside the limit (negative = violated), in the budget's unit;
``headroom_pct`` relative to the limit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

FIGURE = {"max_memory_mb": "peak_rss_mb", "max_decode_ms_per_token": "decode_ms", "min_prefill_tps": "prefill_tps",
          "max_file_mb": "file_mb", "max_dppl_pct": "dppl_pct"}
UNITS = {"max_memory_mb": "MB", "max_decode_ms_per_token": "ms/token", "min_prefill_tps": "tok/s",
         "max_file_mb": "MB", "max_dppl_pct": "%"}


@dataclass(frozen=True)
class Verdict:
    budget: str
    limit: float
    value: float
    ok: bool
    headroom: float          # limit - value for max_*, value - limit for min_* (after the margin)
    basis: str = ""          # 'measured' or 'projected'

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"

    @property
    def shortfall(self) -> float:
        return -self.headroom

    @property
    def headroom_pct(self) -> float:
        return 100 * self.headroom / self.limit if self.limit else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "value": round(self.value, 3), "headroom": round(self.headroom, 3),
                "headroom_pct": round(self.headroom_pct, 2), "verdict": self.verdict}


def budgets_of(obj: Any) -> dict[str, float]:
    """The set budgets of a profile, a ``Budgets`` object or a mapping, as ``{name: limit}`` (unset ones left out)."""
    b = getattr(obj, "budgets", obj)
    get = b.get if isinstance(b, Mapping) else (lambda k: getattr(b, k, None))
    return {k: float(get(k)) for k in FIGURE if get(k) is not None}


def judge(values: Mapping[str, float | None], budgets: Any, *, margin: float = 0.0,
          basis: str = "") -> dict[str, Verdict]:
    """One :class:`Verdict` per budget that is set and whose figure is present in ``values``.

    ``values``: figures by name (``peak_rss_mb``, ``decode_ms``, ``prefill_tps``, ``file_mb``, ``dppl_pct``).
    ``budgets``: a profile, its ``Budgets`` or a mapping ``{budget name: limit}``.
    """
    k = 1.0 - margin
    out = {}
    for name, limit in budgets_of(budgets).items():
        v = values.get(FIGURE[name])
        if v is None:
            continue
        v = float(v)
        head = v - limit / k if name.startswith("min_") else limit * k - v
        out[name] = Verdict(name, limit, v, head >= 0, head, basis)
    return out


def overall(verdicts: Mapping[str, Verdict]) -> bool:
    return all(v.ok for v in verdicts.values())
