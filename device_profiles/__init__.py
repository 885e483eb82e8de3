"""Device profiles: what a target device offers (memory, bandwidth, compute) and what the user asks of it (budgets).

A profile is a YAML file (``device_profiles/<name>.yaml`` or any path)::

    name: pixel-8
    class: phone                      # phone | laptop | sbc | desktop
    description: ...
    runtime: llama.cpp                # llama.cpp | onnxruntime | onnxruntime-genai | optimum (the last two: ONNX,
                                      # exported for that app runtime; modelled as onnxruntime)
    uniform_kv: false                 # optional: the runtime needs the same KV heads in every layer (optimum: must be
                                      # true); uniform_shapes: true asks for every layer the same shape
    allowed_quants: [q8_0, q4_k_m]    # llama.cpp: f32 f16 q8_0 q6_k q5_k_m q4_k_m; onnxruntime: fp32 fp16 int8
    context_length: 2048
    device:                           # every figure is {value: X, source: "..."}; source "estimated: why" if not sourced
      ram_gb:                     {value: 8,    source: "..."}
      usable_memory_mb:           {value: 3000, source: "estimated: ..."}   # what ONE process may take
      peak_bandwidth_gbps:        {value: 51.2, source: "..."}
      effective_bandwidth_factor: {value: 0.7,  source: "..."}   # achieved / peak for decode, in (0, 1]
      cores:                      {value: 9,    source: "..."}
      threads:                    {value: 4,    source: "..."}   # threads the runtime uses
      compute_gflops:             {value: 150,  source: "..."}   # effective matmul throughput (prefill, compute term)
      runtime_overhead_mb:        {value: 60,   source: "..."}   # process + runtime library, excl. weights/KV/compute buffer
      per_token_overhead_ms:      {value: 1.0,  source: "..."}   # fixed cost per decoded token
      per_layer_overhead_ms:      {value: 0.05, source: "..."}   # fixed cost per layer per decoded token
    budgets:                          # the user's choices, not device facts: plain numbers
      max_memory_mb: 2048             # <= usable_memory_mb
      max_decode_ms_per_token: 100
      min_prefill_tps: 50             # optional
      max_dppl_pct: 20                # optional quality floor (checked on measured perplexity, not predicted)

``base: host`` takes every ``device`` figure from the measured host profile (the YAML may then omit ``device`` or
override single figures); the demo profile uses it. The ``host`` profile itself is measured at load time
(:mod:`device_profiles.host`). Anything malformed raises :class:`edgeprune.errors.EdgepruneError` with one line
naming the file and the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from edgeprune.errors import EdgepruneError

from .figures import FIGURES, Figure

PROFILE_DIR = Path(__file__).resolve().parent
CLASSES = ("phone", "laptop", "sbc", "desktop")
#: allowed quant names per runtime, best quality first (the planner's preference order)
QUANTS: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"),
    "onnxruntime": ("fp32", "fp16", "int8"),
}
RUNTIMES = tuple(QUANTS)
#: runtimes an app loads the export with -> (the engine the planner models, the ONNX export target, shape needs).
#: optimum builds one KV width for all layers; onnxruntime-genai 0.18 reads each layer's width from the graph
#: (exporters/onnx_runtimes.py), so it needs no shape constraint.
APP_RUNTIMES: dict[str, tuple[str, str, bool]] = {
    "onnxruntime-genai": ("onnxruntime", "genai", False),
    "optimum": ("onnxruntime", "optimum", True),
}

BUDGETS: dict[str, tuple[bool, float | None]] = {   # name -> (required, exclusive lower bound)
    "max_memory_mb": (True, 0),
    "max_decode_ms_per_token": (True, 0),
    "min_prefill_tps": (False, 0),
    "max_dppl_pct": (False, 0),
}
TOP_KEYS = {"name", "class", "description", "runtime", "allowed_quants", "context_length", "device", "budgets",
            "base", "notes", "uniform_kv", "uniform_shapes"}


@dataclass(frozen=True)
class Budgets:
    max_memory_mb: float
    max_decode_ms_per_token: float
    min_prefill_tps: float | None = None
    max_dppl_pct: float | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """A validated profile. Device figures are plain attributes; ``sources[field]`` says where each came from."""

    name: str
    device_class: str
    runtime: str
    allowed_quants: tuple[str, ...]
    context_length: int
    ram_gb: float
    usable_memory_mb: float
    peak_bandwidth_gbps: float
    effective_bandwidth_factor: float
    cores: int
    threads: int
    compute_gflops: float
    runtime_overhead_mb: float
    per_token_overhead_ms: float
    per_layer_overhead_ms: float
    budgets: Budgets
    sources: dict[str, str] = field(default_factory=dict)
    description: str = ""
    path: str = ""
    is_host: bool = False       # figures measured on this machine (host or base: host)
    calibrated: bool = False    # effective factor / overhead fitted from a measured run (see planner.calibrate_host)
    app_runtime: str = ""       # what the app loads the export with (onnxruntime-genai, optimum); "" = ``runtime``
    uniform_kv: bool = False    # the runtime needs the same KV heads in every layer (MLP widths free)
    uniform_shapes: bool = False  # the runtime needs every layer the same shape

    @property
    def onnx_target(self) -> str:
        """The ONNX export target for this profile (exporters.onnx_runtimes.TARGETS)."""
        return APP_RUNTIMES[self.app_runtime][1] if self.app_runtime else "edgeprune"

    @property
    def effective_bandwidth_gbps(self) -> float:
        return self.peak_bandwidth_gbps * self.effective_bandwidth_factor

    def figure(self, name: str) -> Figure:
        return Figure(getattr(self, name), self.sources.get(name, ""))

    def quants_best_first(self) -> tuple[str, ...]:
        return tuple(q for q in QUANTS[self.runtime] if q in self.allowed_quants)

    def with_figures(self, **figs: Figure) -> "DeviceProfile":
        """A copy with some device figures replaced (value and source)."""
        src = dict(self.sources)
        vals = {}
        for k, f in figs.items():
            if k not in FIGURES:
                raise EdgepruneError(f"profile {self.name}: unknown device figure '{k}'")
            vals[k] = FIGURES[k][0](f.value)
            src[k] = f.source
        return replace(self, sources=src, **vals)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "class": self.device_class, "runtime": self.app_runtime or self.runtime,
             "uniform_kv": self.uniform_kv, "uniform_shapes": self.uniform_shapes,
             "allowed_quants": list(self.allowed_quants), "context_length": self.context_length,
             "device": {k: {"value": getattr(self, k), "source": self.sources.get(k, "")} for k in FIGURES},
             "budgets": {f.name: getattr(self.budgets, f.name) for f in fields(Budgets)},
             "is_host": self.is_host, "calibrated": self.calibrated, "path": self.path}
        return d


# ------------------------------------------------------------------------------------------------ validation
def _err(where: str, fld: str, msg: str) -> EdgepruneError:
    return EdgepruneError(f"{where}: field '{fld}' {msg}")


MIN_POSITIVE = 1e-6   # smallest positive figure or budget accepted


def _number(where: str, fld: str, v: Any, typ: type, lo: float, lo_incl: bool, hi: float | None):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(where, fld, f"must be a number, got {v!r}; fix the value")
    try:
        fv = float(v)
    except OverflowError:
        raise _err(where, fld, f"is a {len(str(abs(v)))}-digit number, far beyond any device; fix the value") from None
    if typ is int and (not fv.is_integer()):
        raise _err(where, fld, f"must be a whole number, got {v!r}; fix the value")
    if not lo_incl and lo == 0 and 0 < fv < MIN_POSITIVE:   # products of such figures underflow to 0
        raise _err(where, fld, f"is {v!r}, below {MIN_POSITIVE:g} (no real device or budget is that small; products "
                   "of such figures underflow); fix the value")
    if not math.isfinite(fv) or (v < lo if lo_incl else v <= lo) or (hi is not None and v > hi):
        bound = f"{'>=' if lo_incl else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise _err(where, fld, f"is {v!r}, which is impossible (must be {bound}); fix the value")
    return typ(v)


def _figure(where: str, fld: str, raw: Any) -> Figure:
    typ, lo, incl, hi = FIGURES[fld]
    if not isinstance(raw, dict):
        raise _err(where, f"device.{fld}", f"must be {{value: X, source: '...'}} (got {raw!r}); "
                   "give the value and its source, or source 'estimated: why'")
    extra = set(raw) - {"value", "source"}
    if extra:
        raise _err(where, f"device.{fld}.{sorted(extra)[0]}", "is not a known key; only 'value' and 'source' are allowed")
    if "value" not in raw:
        raise _err(where, f"device.{fld}.value", "is missing; add the figure's value")
    src = raw.get("source")
    if not isinstance(src, str) or not src.strip():
        raise _err(where, f"device.{fld}.source", "is missing or empty; cite a source or write 'estimated: why'")
    return Figure(_number(where, f"device.{fld}", raw["value"], typ, lo, incl, hi), src.strip())


def _device_figures(where: str, raw: dict, device_defaults: dict[str, Figure] | None) -> dict[str, Figure]:
    """The profile's ``device`` figures (over ``device_defaults``), each checked; all of :data:`FIGURES` present."""
    dev = raw.get("device", {})
    if dev is None:
        dev = {}
    if not isinstance(dev, dict):
        raise _err(where, "device", f"must be a mapping of figures, got {type(dev).__name__}")
    unknown = set(dev) - set(FIGURES)
    if unknown:
        raise _err(where, f"device.{sorted(unknown)[0]}", f"is not a known figure (known: {', '.join(FIGURES)}); remove or rename it")
    figs: dict[str, Figure] = dict(device_defaults or {})
    for k, v in dev.items():
        figs[k] = _figure(where, k, v)
    for k in FIGURES:
        if k not in figs:
            raise _err(where, f"device.{k}", "is missing; add {value: X, source: '...'}")
    return figs


def _budgets(where: str, raw: dict) -> Budgets:
    bud = raw["budgets"]
    if not isinstance(bud, dict):
        raise _err(where, "budgets", f"must be a mapping, got {type(bud).__name__}")
    unknown = set(bud) - set(BUDGETS)
    if unknown:
        raise _err(where, f"budgets.{sorted(unknown)[0]}", f"is not a known budget (known: {', '.join(BUDGETS)}); remove or rename it")
    bvals: dict[str, float | None] = {}
    for k, (required, lo) in BUDGETS.items():
        v = bud.get(k)
        if v is None:
            if required:
                raise _err(where, f"budgets.{k}", "is missing; add it")
            bvals[k] = None
            continue
        bvals[k] = _number(where, f"budgets.{k}", v, float, lo, False, None)
    return Budgets(**bvals)


def validate(raw: Any, where: str, device_defaults: dict[str, Figure] | None = None) -> DeviceProfile:
    """Check a parsed YAML mapping and build a :class:`DeviceProfile`. ``device_defaults`` supplies figures the
    YAML may omit (used for ``base: host``)."""
    if not isinstance(raw, dict):
        raise EdgepruneError(f"{where}: a profile must be a YAML mapping (got {type(raw).__name__}); see device_profiles/README")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise _err(where, sorted(unknown)[0], f"is not a known key (known: {', '.join(sorted(TOP_KEYS))}); remove or rename it")
    for req in ("name", "class", "runtime", "allowed_quants", "context_length", "budgets"):
        if req not in raw:
            raise _err(where, req, "is missing; add it")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise _err(where, "name", f"must be a non-empty name without spaces, got {name!r}")
    cls = raw["class"]
    if cls not in CLASSES:
        raise _err(where, "class", f"is {cls!r}; must be one of {', '.join(CLASSES)}")
    rt = raw["runtime"]
    app = rt if rt in APP_RUNTIMES else ""
    rt = APP_RUNTIMES[rt][0] if app else rt
    if rt not in QUANTS:
        raise _err(where, "runtime", f"is {rt!r}; must be one of {', '.join(RUNTIMES + tuple(APP_RUNTIMES))}")
    shape = {}
    for k in ("uniform_kv", "uniform_shapes"):
        shape[k] = raw.get(k, False)
        if not isinstance(shape[k], bool):
            raise _err(where, k, f"must be true or false, got {shape[k]!r}")
    if app and APP_RUNTIMES[app][2] and not (shape["uniform_kv"] or shape["uniform_shapes"]):
        raise _err(where, "uniform_kv", f"must be true for runtime {app} (it allocates one KV width for every "
                   "layer); add 'uniform_kv: true'")
    aq = raw["allowed_quants"]
    if not isinstance(aq, list) or not aq:
        raise _err(where, "allowed_quants", f"must be a non-empty list, got {aq!r}")
    for q in aq:
        if q not in QUANTS[rt]:
            raise _err(where, "allowed_quants", f"has unknown quant {q!r} for runtime {rt}; allowed: {', '.join(QUANTS[rt])}")
    if len(set(aq)) != len(aq):
        raise _err(where, "allowed_quants", f"lists a quant twice ({aq}); remove the duplicate")
    ctx = _number(where, "context_length", raw["context_length"], int, 1, True, 1 << 22)

    figs = _device_figures(where, raw, device_defaults)
    budgets = _budgets(where, raw)

    # cross-field impossibilities
    ram_mb = figs["ram_gb"].value * 1024
    if figs["usable_memory_mb"].value > ram_mb:
        raise _err(where, "device.usable_memory_mb", f"is {figs['usable_memory_mb'].value:g} MB, more than the "
                   f"{ram_mb:g} MB of RAM; lower it")
    if budgets.max_memory_mb > figs["usable_memory_mb"].value:
        raise _err(where, "budgets.max_memory_mb", f"is {budgets.max_memory_mb:g} MB, more than usable_memory_mb "
                   f"{figs['usable_memory_mb'].value:g} MB; lower the budget")
    if figs["threads"].value > 4 * figs["cores"].value:
        raise _err(where, "device.threads", f"is {figs['threads'].value}, more than 4x the {figs['cores'].value} cores; fix it")

    desc = raw.get("description", "")
    return DeviceProfile(
        name=name, device_class=cls, runtime=rt, allowed_quants=tuple(aq), context_length=ctx,
        budgets=budgets, sources={k: f.source for k, f in figs.items()}, description=str(desc or ""), path=where,
        app_runtime=app, **shape,
        **{k: FIGURES[k][0](f.value) for k, f in figs.items()},
    )


# ------------------------------------------------------------------------------------------------ loading
MAX_YAML_BYTES = 1 << 20     # a profile is a few hundred bytes; 1 MiB leaves room and bounds parsing
MAX_YAML_NODES = 10_000      # nodes after expanding aliases: a nested-alias "billion laughs" is refused early


class _ProfileLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents that expand (through aliases) past
    :data:`MAX_YAML_NODES` nodes, before constructing anything."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", k.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


def _expanded_size(root) -> int:
    """Node count of ``root`` with every alias expanded, computed without expanding (memoised per node)."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(n) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in busy:
            raise yaml.composer.ComposerError(None, None, "recursive alias", n.start_mark)
        busy.add(id(n))
        kids = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else
                n.value if isinstance(n, yaml.SequenceNode) else [])
        total = 1
        for c in kids:
            total += size(c)
            if total > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_YAML_NODES:,} nodes "
                                                  "through aliases", n.start_mark)
        busy.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(root)


def _read_yaml(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise EdgepruneError(f"{path}: {path.stat().st_size:,} bytes is too large for a profile (at most "
                                 f"{MAX_YAML_BYTES:,}); pass the profile YAML file")
        data = path.read_bytes()
    except OSError as e:
        raise EdgepruneError(f"{path}: cannot read profile ({e.strerror}); check the path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgepruneError(f"{path}: not UTF-8 text (byte {e.start}); save the profile as UTF-8 (iconv -t UTF-8)") \
            from None
    try:
        loader = _ProfileLoader(text)   # plain YAML only (SafeLoader): a !!python/... tag is refused
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.constructor.ConstructorError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        if "duplicate key" in str(e.problem):
            raise EdgepruneError(f"{path}: {e.problem}{at}; each key may appear once: remove the duplicate") from None
        raise EdgepruneError(f"{path}: YAML tag not allowed{at} ({e.problem}); profiles are plain YAML, remove the "
                             "tag and fix the value") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise EdgepruneError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__}); fix the syntax") from None


def list_profiles() -> list[str]:
    """Names of the shipped profiles (``host`` included), sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file() or "/" in str(name_or_path):
        if not p.is_file():
            raise EdgepruneError(f"profile file {p} does not exist; pass an existing YAML file or one of: "
                                 f"{', '.join(list_profiles())}")
        return p
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise EdgepruneError(f"unknown profile '{name_or_path}'; choose one of: {', '.join(list_profiles())} "
                             "or pass a path to a YAML file")
    return shipped


def load_profile(name_or_path: str | Path, *, refresh_host: bool = False, calibration: bool = True) -> DeviceProfile:
    """Load and validate a shipped profile by name, or a user YAML file by path.

    ``host`` and profiles with ``base: host`` take their device figures from a measurement of this machine
    (cached; ``refresh_host=True`` re-measures) and, when ``calibration`` is true and a host calibration was saved
    by :func:`edgeprune.planner.calibrate_host` for the profile's runtime, its fitted figures.
    """
    path = _resolve(name_or_path)
    raw = _read_yaml(path)
    where = str(path)
    defaults = None
    base = raw.get("base") if isinstance(raw, dict) else None
    if base is not None:
        if base != "host":
            raise _err(where, "base", f"is {base!r}; the only supported base is 'host'")
        from . import host

        rt = raw.get("runtime") if isinstance(raw, dict) else None
        rt = APP_RUNTIMES[rt][0] if rt in APP_RUNTIMES else rt
        defaults = host.host_figures(refresh=refresh_host, runtime=rt if rt in QUANTS else "llama.cpp")
    prof = validate(raw, where, device_defaults=defaults)
    if base == "host":
        prof = replace(prof, is_host=True)
        if calibration:
            from . import host

            prof = host.apply_saved_calibration(prof)
    return prof


__all__ = ["BUDGETS", "Budgets", "CLASSES", "DeviceProfile", "FIGURES", "Figure", "QUANTS", "RUNTIMES",
           "list_profiles", "load_profile", "validate"]
