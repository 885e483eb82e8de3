"""Device figures: what a profile's ``device`` section may hold (:data:`FIGURES`) and one figure with its source
(:class:`Figure`). Shared by the profile validator (:mod:`device_profiles`) and the host measurement
(:mod:`device_profiles.host`)."""
from __future__ import annotations

from dataclasses import dataclass

# device figures: name -> (type, lower bound, lower bound inclusive?, upper bound or None)
FIGURES: dict[str, tuple[type, float, bool, float | None]] = {
    "ram_gb": (float, 0, False, 4096),
    "usable_memory_mb": (float, 0, False, None),
    "peak_bandwidth_gbps": (float, 0, False, 20000),
    "effective_bandwidth_factor": (float, 0, False, 1.0),
    "cores": (int, 1, True, 1024),
    "threads": (int, 1, True, 4096),
    "compute_gflops": (float, 0, False, 1e7),
    "runtime_overhead_mb": (float, 0, True, None),
    "per_token_overhead_ms": (float, 0, True, 10000),
    "per_layer_overhead_ms": (float, 0, True, 1000),
}


@dataclass(frozen=True)
class Figure:
    """One device figure and where it comes from (a citation, ``computed: ...``, ``measured: ...``,
    ``calibrated: ...`` or ``estimated: ...``)."""

    value: float
    source: str

    @property
    def estimated(self) -> bool:
        return self.source.strip().lower().startswith("estimated")
