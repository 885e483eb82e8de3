"""The ``host`` profile's figures: measured on this machine, cached, and refined by a saved calibration.

Probes (about 0.5 s in all, run once and cached in ``$EDGEPRUNE_CACHE`` or ``~/.cache/edgeprune/host.json``):

* cores = ``os.cpu_count()``; RAM and available memory from ``psutil``; usable = 0.9 x available at probe time.
* peak bandwidth = best of 7 ``numpy.copyto`` of a 64 MiB float64 array, counting read + write bytes
  (one thread, like a single-threaded STREAM copy).
* compute = best of 5 float32 1024x1024 matmuls (``2*n^3`` FLOP each) through numpy's BLAS.

Defaults that no probe can give (effective-bandwidth factor, runtime overhead, per-token fixed cost) come from
``../shared/docs/feasibility.md`` Q5 and are marked ``estimated``; :func:`edgeprune.planner.calibrate_host` fits
them from a measured run and saves them with :func:`save_calibration`; :func:`apply_saved_calibration` reads them
back at load time.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from dataclasses import replace
from pathlib import Path

from edgeprune.paths import replace_text

from .figures import FIGURES, Figure

PROBE_VERSION = 1

#: figures no probe measures, per runtime (value, source)
RUNTIME_DEFAULTS: dict[str, dict[str, tuple[float, str]]] = {
    "llama.cpp": {
        "effective_bandwidth_factor": (0.55, "estimated: feasibility.md Q5 fit gives ~10 GB/s for llama.cpp decode "
                                             "at 1 thread vs ~18-19 GB/s numpy copy here; refit by calibrate_host"),
        "runtime_overhead_mb": (60.0, "estimated: Python + numpy + llama_cpp shared library resident set; refit by "
                                      "calibrate_host"),
        "per_token_overhead_ms": (1.0, "estimated: feasibility.md Q5 fixed cost 4.7-5.0 ms/token at 30 layers, split "
                                       "as 1.0 ms per eval() call + 0.125 ms per layer"),
        "per_layer_overhead_ms": (0.125, "estimated: feasibility.md Q5 (see per_token_overhead_ms)"),
    },
    "onnxruntime": {
        "effective_bandwidth_factor": (0.5, "estimated: no ORT decode measurement on this machine yet; refit by "
                                            "calibrate_host"),
        "runtime_overhead_mb": (120.0, "estimated: Python + numpy + onnxruntime library and arena; refit by "
                                       "calibrate_host"),
        "per_token_overhead_ms": (1.5, "estimated: one InferenceSession.run per token from Python"),
        "per_layer_overhead_ms": (0.1, "estimated: per-layer kernel launches and past/present KV copies"),
    },
}


def cache_dir() -> Path | None:
    """``$EDGEPRUNE_CACHE`` or ``~/.cache/edgeprune``, or None when it cannot be created or written (a read-only
    or missing home): the cache is optional, measurements are then simply not kept (one note on stderr)."""
    try:
        d = Path(os.environ.get("EDGEPRUNE_CACHE") or Path.home() / ".cache" / "edgeprune")
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK | os.X_OK):
            return d
    except (OSError, RuntimeError, KeyError):
        d = os.environ.get("EDGEPRUNE_CACHE") or "~/.cache/edgeprune"
    global _NOTED
    if not _NOTED:
        import sys

        print(f"edgeprune: note: the cache folder {d} cannot be written; host measurements are not kept (set "
              "EDGEPRUNE_CACHE to a writable folder to keep them)", file=sys.stderr)
        _NOTED = True
    return None


_NOTED = False


def _key() -> str:
    return f"{socket.gethostname()}|{os.cpu_count()}|{platform.machine()}|v{PROBE_VERSION}"


def probe_bandwidth_gbps(mib: int = 64, repeats: int = 7) -> float:
    """Best-of-N single-thread copy bandwidth in GB/s: ``2 * nbytes / t`` (read + write)."""
    import numpy as np

    a = np.ones(mib * (1 << 20) // 8)
    b = np.empty_like(a)
    np.copyto(b, a)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def probe_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-N float32 matmul throughput in GFLOP/s: ``2 n^3 / t``."""
    import numpy as np

    x = np.random.default_rng(0).random((n, n), dtype=np.float32)
    x @ x
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def measure() -> dict:
    """Run the probes (about 0.5 s) and return raw numbers."""
    import psutil

    vm = psutil.virtual_memory()
    cores = os.cpu_count() or 1
    return {"key": _key(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": cores,
            "ram_gb": vm.total / 2 ** 30, "available_mb": vm.available / 2 ** 20,
            "bandwidth_gbps": probe_bandwidth_gbps(), "gflops": probe_gflops()}


def host_measurement(refresh: bool = False) -> dict:
    """Cached :func:`measure` result for this machine (re-measured when the machine or probe version changes)."""
    c = cache_dir()
    if c is None:
        return measure()
    f = c / "host.json"
    if not refresh and f.is_file():
        try:
            d = json.loads(f.read_text())
            if d.get("key") == _key():
                return d
        except (OSError, json.JSONDecodeError):
            pass
    d = measure()
    replace_text(f, json.dumps(d, indent=1))
    return d


def host_figures(refresh: bool = False, runtime: str = "llama.cpp") -> dict[str, Figure]:
    m = host_measurement(refresh)
    at = f"measured {m['time']}"
    figs = {
        "ram_gb": Figure(round(m["ram_gb"], 2), f"{at}: psutil.virtual_memory().total"),
        "usable_memory_mb": Figure(round(min(0.9 * m["available_mb"], m["ram_gb"] * 1024), 1),
                                   f"{at}: 0.9 x psutil available memory"),
        "peak_bandwidth_gbps": Figure(round(m["bandwidth_gbps"], 2), f"{at}: numpy copy probe, 1 thread, best of 7"),
        "cores": Figure(m["cores"], f"{at}: os.cpu_count()"),
        "threads": Figure(max(1, m["cores"] // 2), "estimated: llama-cpp-python default n_threads = cores // 2"),
        "compute_gflops": Figure(round(m["gflops"], 1), f"{at}: numpy float32 1024^3 matmul probe, best of 5"),
    }
    for k, (v, src) in RUNTIME_DEFAULTS[runtime].items():
        figs[k] = Figure(v, src)
    return figs


# ------------------------------------------------------------------------------------------------ calibration
def calibration_file() -> Path | None:
    c = cache_dir()
    return None if c is None else c / "host_calibration.json"


def _read_entry(f: Path | None, runtime: str):
    """This machine's entry for ``runtime`` in the cache file ``f`` (None when absent or unreadable)."""
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get(_key(), {}).get(runtime)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _write_entry(f: Path | None, runtime: str, value) -> Path | None:
    """Set this machine's entry for ``runtime`` in ``f`` (other machines and runtimes kept; atomic replace)."""
    if f is None:
        return None
    try:
        d = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        d = {}
    d.setdefault(_key(), {})[runtime] = value
    replace_text(f, json.dumps(d, indent=1))
    return f


def save_calibration(runtime: str, figures: dict[str, Figure]) -> Path | None:
    """Store fitted figures for ``runtime`` (merged with what is there), keyed to this machine."""
    return _write_entry(calibration_file(), runtime, {k: {"value": v.value, "source": v.source}
                                                      for k, v in figures.items() if k in FIGURES})


def saved_calibration(runtime: str) -> dict[str, Figure]:
    d = _read_entry(calibration_file(), runtime) or {}
    try:
        return {k: Figure(float(v["value"]), str(v["source"])) for k, v in d.items() if k in FIGURES}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def apply_saved_calibration(profile):
    """The :class:`~device_profiles.DeviceProfile` with this host's saved calibration applied (if any)."""
    figs = saved_calibration(profile.runtime)
    if not figs:
        return profile
    return replace(profile.with_figures(**figs), calibrated=True)


# ------------------------------------------------------------------------------------------------ memory record
def _overhead_file() -> Path | None:
    c = cache_dir()
    return None if c is None else c / "host_memory_overhead.json"


def recorded_overhead(runtime: str) -> float | None:
    """The runtime memory overhead (MB) this machine last recorded for ``runtime``, or None."""
    v = _read_entry(_overhead_file(), runtime)
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def record_overhead(runtime: str, mb: float) -> None:
    """Record ``mb`` as this machine's runtime memory overhead for ``runtime`` (atomic replace)."""
    _write_entry(_overhead_file(), runtime, round(float(mb), 3))
