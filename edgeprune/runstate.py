"""``edgeprune run``'s resumable state, with a fingerprint per stage so that a re-run never mixes results.

Each stage's fingerprint hashes what it depends on, chained through every stage before it::

    fp(stage) = sha256(fp(previous stage) + json(inputs of this stage))

``calibrate`` (the first) covers the model (resolved path, then name, size and mtime of every file), the
profile (every validated field), the export format, the host-calibration switch and the code version (a hash of
edgeprune's own source files); ``plan`` adds the MLP multiple and margin; ``prune`` the method, allocation,
calibration samples and seed; ``finetune`` its strategy, minutes and seed; ``verify`` its chunks and threads.
So changing the profile re-does everything, changing ``--method`` re-does prune and after, ``--ppl-chunks`` only
verify and report. Stages recorded under another fingerprint (or none: an older state file) are dropped, and
their outputs deleted, before anything runs; so are outputs of stages that are not recorded as done.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path

from .errors import EdgepruneError
from .paths import atomic_file, json_text

STAGES = ("calibrate", "plan", "prune", "finetune", "export", "verify", "report")
# RunConfig fields each stage depends on (beyond the model, profile and code, which the first stage covers)
STAGE_OPTIONS = {
    "calibrate": ("format", "threads", "calibrate_host", "max_context"),
    # the plan scores the model with the method (candidates from its real allocation), so it depends on all of these
    "plan": ("mlp_multiple", "margin_pct", "method", "allocation", "calib_samples", "seed", "cost_aware"),
    "prune": (),
    "finetune": ("finetune", "finetune_minutes", "seed"),
    "export": (),
    "verify": ("ppl_chunks", "threads"),
    "report": (),
}
# files and folders (under the run folder) each stage writes; removed when the stage is not (or no longer) done
STAGE_OUTPUTS = {
    "calibrate": ("calibrate",),
    "plan": ("plan.json",),
    "prune": ("pruned",),
    "finetune": ("finetuned",),
    "export": (),   # the artifact's name is recorded in the stage (model-QUANT.gguf / onnx-QUANT)
    "verify": ("verify.json", "measured_speed.json"),
    "report": ("report.md", "report.json"),
}


def code_version() -> str:
    """sha256 (16 hex) of edgeprune's source files: any change of the code counts as a change of the run."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("edgeprune", "exporters", "device_profiles"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def model_identity(src: Path) -> dict:
    """The model folder's resolved path and the name, size and mtime of each file in it (no weight hashing: a
    re-download or an edit changes size or mtime)."""
    src = Path(src).resolve()
    files = {}
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            s = f.stat()
            files[f.name] = [s.st_size, s.st_mtime_ns]
    return {"path": str(src), "files": files}


def _jsonable(x):
    if is_dataclass(x):
        return _jsonable(asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def stage_fingerprints(cfg, src: Path, profile, fmt: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(fingerprint per stage, the inputs each stage's fingerprint covers)."""
    fps, facts, prev = {}, {}, ""
    for stage in STAGES:
        f = {k: _jsonable(getattr(cfg, k, None)) for k in STAGE_OPTIONS[stage]}
        if stage == "calibrate":
            f |= {"model": model_identity(src), "profile": _jsonable(profile), "format": fmt, "code": code_version()}
        prev = hashlib.sha256((prev + json.dumps(f, sort_keys=True)).encode()).hexdigest()[:24]
        fps[stage], facts[stage] = prev, f
    return fps, facts


class RunState:
    """``DIR/state.json``: the stages done, each with the fingerprint it was made under."""

    def __init__(self, out: Path, fingerprints: dict[str, str] | None = None, facts: dict[str, dict] | None = None,
                 log=print):
        self.out, self.path = Path(out), Path(out) / "state.json"
        self.fp, self.facts = fingerprints or {}, facts or {}
        try:
            self.d = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
            if not isinstance(self.d, dict) or not isinstance(self.d.get("stages"), dict):
                raise ValueError("no 'stages' mapping")
        except (ValueError, UnicodeDecodeError) as e:
            raise EdgepruneError(f"{self.path} is corrupt ({type(e).__name__}); delete it to start the run over "
                                 "(finished stages are then re-done)") from None
        if fingerprints is not None:
            self._drop_stale(log)

    def _drop_stale(self, log) -> None:
        old_facts = self.d.get("inputs", {})
        stale = None
        for stage in STAGES:
            info = self.d["stages"].get(stage)
            if stale is None and info is not None and info.get("fingerprint") != self.fp.get(stage):
                stale = stage
            if stale is not None or info is None:
                self.d["stages"].pop(stage, None)
                self._remove_outputs(stage, info)
        if stale is not None:
            changed = sorted(k for s in STAGES for k in self.facts.get(s, {})
                             if old_facts.get(s, {}).get(k) != self.facts[s][k])
            log(f"{self.out} was run with other inputs (changed: {', '.join(changed) or 'unknown'}); re-doing "
                f"{stale} and the stages after it, their earlier results removed")
        self.d["inputs"] = self.facts
        if self.path.exists():
            self._save()

    def _remove_outputs(self, stage: str, info: dict | None) -> None:
        names = list(STAGE_OUTPUTS[stage])
        if stage == "export":
            names += [p.name for p in self.out.glob("model-*.gguf")] + [p.name for p in self.out.glob("onnx-*")]
        if info:
            names += [v for k, v in info.items() if k in ("dir", "artifact") and isinstance(v, str)]
        for n in names:
            p = self.out / n
            if p.resolve().parent != self.out.resolve():
                continue   # only direct children of the run folder
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def done(self, stage: str) -> dict | None:
        return self.d["stages"].get(stage)

    def mark(self, stage: str, info: dict) -> None:
        if stage in self.fp:
            info = {**info, "fingerprint": self.fp[stage]}
        self.d["stages"][stage] = info
        self._save()

    def _save(self) -> None:
        with atomic_file(self.path) as tmp:
            tmp.write_text(json_text(self.d))
