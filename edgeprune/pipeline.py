"""``edgeprune run``: calibrate host → plan → prune → recover → export → verify → report, with resume.

Every stage writes its output atomically under ``DIR/`` and records itself in ``DIR/state.json`` only when
complete; a re-run skips finished stages (so interrupting after ``prune`` and re-running does not prune again).
``DIR/.lock`` holds the running process's pid; a second run on the same DIR refuses.

Also registers ``edgeprune profiles`` and ``edgeprune plan``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BudgetError, EdgepruneError
from .paths import atomic_dir, atomic_file, json_text, mark_ours, remove_stale_temps
from .runstate import STAGES, RunState, stage_fingerprints  # noqa: F401  (one home, re-exported)



@dataclass
class RunConfig:
    model: str
    profile: str
    out: str
    method: str = "obs"               # = edgeprune.prune.DEFAULT_METHOD (OBS + its sequential lsq refit)
    allocation: str | None = None
    finetune: str = "none"            # none | groupwise | lora
    finetune_minutes: float = 2.0
    format: str | None = None         # default: the profile's runtime
    calib_samples: int = 64
    seed: int = 0
    mlp_multiple: int = 32
    ppl_chunks: int | None = 200
    threads: int = 1
    margin_pct: float = 2.0
    calibrate_host: bool = True
    overwrite: bool = False           # allow a non-empty folder edgeprune did not make as --out
    max_context: int | None = None    # accepts a format that is exact only up to this context (exporters.features)
    cost_aware: bool = False          # plan on the cost-aware allocation (planner.search: off by default, measured)
    extra: dict = field(default_factory=dict)


class Lock:
    """``DIR/.lock`` holding the running process's pid, with an exclusive ``flock`` on it.

    The kernel drops the flock when the holder dies (even by ``kill -9``), so a stale lock file never blocks a
    re-run, and two processes can never both hold it (no check-then-write race).
    """

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = int(os.pread(fd, 32, 0).decode(errors="replace").strip() or 0)
                except ValueError:
                    pid = 0
                os.close(fd)
                raise EdgepruneError(f"{self.path.parent} is in use by another edgeprune run (pid {pid or 'unknown'}, "
                                     f"lock {self.path}); wait for it to finish or choose another --out") from None
            try:   # the holder before us may have unlinked the file we locked: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return self
            os.close(fd)
        raise EdgepruneError(f"could not take the lock {self.path}; retry")

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)   # releases the flock
            self.fd = None


def _log(msg: str) -> None:
    print(f"[edgeprune run] {msg}", flush=True)


def _fmt_for(profile) -> str:
    return "gguf" if profile.runtime == "llama.cpp" else "onnx"


def _artifact_name(fmt: str, quant: str) -> str:
    return f"model-{quant}.gguf" if fmt == "gguf" else f"onnx-{quant}"


def _export_kwargs(fmt: str, quant: str, profile=None) -> dict:
    if fmt == "gguf":
        return {"quant": quant}
    return {"dtype": "fp16" if quant == "fp16" else "fp32", "quant": "int8" if quant == "int8" else None,
            "target": profile.onnx_target if profile is not None else None}


def run(cfg: RunConfig) -> dict:
    from device_profiles import load_profile

    from . import planner
    from .models import resolve_dir, check_model_dir

    src = resolve_dir(cfg.model)
    check_model_dir(src)   # config, tokenizer and weight headers/shapes, before anything is written
    profile = load_profile(cfg.profile)
    fmt = cfg.format or _fmt_for(profile)
    if fmt != _fmt_for(profile):
        raise EdgepruneError(f"--format {fmt} does not match profile {profile.name}'s runtime {profile.runtime}; "
                             "drop --format or pick a profile for that runtime")
    from exporters.features import check_dir

    from .options import check_run

    check_run(cfg)
    check_dir(src, fmt, cfg.max_context)   # what the target format cannot compute, refused before any work
    if cfg.finetune not in ("none", "groupwise", "lora"):
        raise EdgepruneError(f"--finetune {cfg.finetune} unknown; use none, groupwise or lora")
    if cfg.calib_samples < 1:
        raise EdgepruneError(f"--calib-samples {cfg.calib_samples} must be >= 1")
    if cfg.threads < 1:
        raise EdgepruneError(f"--threads {cfg.threads} must be >= 1")
    if cfg.finetune_minutes <= 0:
        raise EdgepruneError(f"--finetune-minutes {cfg.finetune_minutes} must be > 0")
    if cfg.ppl_chunks is not None and cfg.ppl_chunks < 0:
        raise EdgepruneError(f"--ppl-chunks {cfg.ppl_chunks} must be >= 0 (0: all chunks)")
    from .paths import guard_output, is_ours, release_output

    prof_file = Path(cfg.profile) if os.path.isfile(cfg.profile) else None
    # a folder this tool made is resumed; any other non-empty folder needs --overwrite (then edgeprune writes its
    # own files into it and deletes none of the user's)
    out = guard_output(cfg.out, kind="dir", inputs=(src, prof_file), overwrite=cfg.overwrite or is_ours(cfg.out),
                       adopt=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_locked(cfg, src, out, profile, fmt)
    except BaseException:
        # a run that completed no stage leaves nothing behind (a resumable partial run keeps its stages)
        if created and not (out / "state.json").exists() and not (out / ".lock").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        release_output(out)


def _run_locked(cfg: RunConfig, src: Path, out: Path, profile, fmt: str) -> dict:
    import torch

    from . import planner

    torch.set_num_threads(cfg.threads)   # scoring in plan and in a resumed prune stage: same reductions, same bits
    with Lock(out):
        remove_stale_temps(out)   # temp siblings of a killed earlier run (we hold the lock: nobody owns them)
        mark_ours(out)
        st = RunState(out, *stage_fingerprints(cfg, src, profile, fmt), log=_log)
        t_all = time.time()

        # 1. calibrate: measure the dense model on this host's runtime; fit bandwidth factor and overheads
        if cfg.calibrate_host and not st.done("calibrate"):
            _log("stage calibrate: measuring the dense model on the host runtime")
            st.mark("calibrate", _stage_calibrate(src, out, profile, fmt, cfg))
        cal = st.done("calibrate") or {}
        if cal.get("calibration"):
            from .planner import HostCalibration

            profile = planner.apply_calibration(profile, HostCalibration(**cal["calibration"]))
        plan, scored = _plan_stage(st, cfg, src, out, profile)                  # 2. plan (scores once)
        model_dir = _stage_prune(st, cfg, src, out, profile, plan, scored)      # 3. prune (the plan's scoring)
        scored = None
        if cfg.finetune != "none" and plan["ratio"] > 0:                        # 4. recover
            model_dir = _stage_finetune(st, cfg, model_dir, out)
        art = _stage_export(st, cfg, model_dir, out, profile, fmt, plan)        # 5. export
        if not st.done("verify"):                                               # 6. verify
            _log("stage verify: parity, runtime perplexity, speed and memory")
            from exporters.verify import verify

            verify(str(art), str(model_dir), threads=cfg.threads, max_chunks=cfg.ppl_chunks,
                   json_out=str(out / "verify.json"))
            q = _quality(src, out, cfg, st)
            st.mark("verify", {"verify": "verify.json", "quality": q})

        # 7. report
        _log("stage report")
        from .report import write_report

        rep = write_report(out, profile, st.d, cfg)
        st.mark("report", {"report": "report.md", "wall_s": round(time.time() - t_all, 1)})
        return rep


def _prune_config(cfg: RunConfig, ratio: float, profile):
    from .prune import PruneConfig

    return PruneConfig(method=cfg.method, ratio=ratio, allocation=cfg.allocation, calib_samples=cfg.calib_samples,
                       seed=cfg.seed, multiple=cfg.mlp_multiple, uniform_kv=profile.uniform_kv,
                       uniform_shapes=profile.uniform_shapes)


def _plan_stage(st, cfg: RunConfig, src: Path, out: Path, profile) -> tuple[dict, object]:
    """The plan stage's record and the scoring it planned on (None when the stage was done by an earlier run)."""
    scored = None
    if not st.done("plan"):
        _log(f"stage plan: fitting {src.name} to {profile.name}")
        info, scored = _stage_plan(cfg, src, out, profile)
        st.mark("plan", info)
    return st.done("plan"), scored


def _stage_prune(st, cfg: RunConfig, src: Path, out: Path, profile, plan: dict, scored) -> Path:
    """The pruned model's folder (the source when the plan does not prune). Pruned once, at the plan's ratio, with
    the plan's scoring (a resumed run scores again: same seed, same scores, same allocation)."""
    if plan["ratio"] <= 0:
        return src
    if not st.done("prune"):
        _log(f"stage prune: {cfg.method} at ratio {plan['ratio']} (of the {plan.get('ratio_of', 'params')})")
        st.mark("prune", _prune_at_plan(cfg, src, out, profile, plan, scored))
    return out / "pruned"


def _stage_plan(cfg: RunConfig, src: Path, out: Path, profile) -> tuple[dict, object]:
    """Score once, plan on the real allocation with measured quality, check the top two end to end; writes
    ``plan.json`` (also when nothing fits) and returns the stage record and the scoring."""
    from . import planner
    from .models import load, load_tokenizer
    from .planner.fit import shape_at
    from .planner.quality import MeasuredQuality, confirm
    from .prune import score

    model, tok = load(src), load_tokenizer(src)
    pcfg = _prune_config(cfg, 0.5, profile)
    sc = score(model, tok, pcfg, progress=False)
    dense = planner.model_shape(model)
    ro = pcfg.repair_options()
    q = MeasuredQuality(sc, src, tok, profile.runtime, profile.quants_best_first(), seed=cfg.seed,
                        threads=cfg.threads, repair=None if ro is None else ro.mode)
    try:
        try:
            res = planner.plan(dense, profile, mlp_multiple=cfg.mlp_multiple, margin_pct=cfg.margin_pct,
                               shape_at=shape_at(sc, dense), quality=q, cost_aware=cfg.cost_aware)
            if q.repair_note():
                res.notes.append(q.repair_note())
        except BudgetError as e:
            r = getattr(e, "result", None)
            if r is not None:
                _write_json(out / "plan.json", {**r.to_dict(), "quality": q.describe()})
            raise
        check = confirm(res, q, profile) if profile.runtime == "llama.cpp" else None
        _write_json(out / "plan.json", {**res.to_dict(), "quality": q.describe(), "check": check,
                                        "table_text": planner.format_table(res)})
    finally:
        q.close()
    print(planner.format_table(res))
    for n in res.notes:
        _log(f"note: {n}")
    _log(res.explanation)
    c = res.chosen
    return {"quant": c.quant, "ratio": c.ratio, "ratio_of": c.ratio_of, "cost": None if c.cost is None else
            c.cost.to_dict(), "achieved_ratio": c.achieved_ratio, "loss": c.loss, "explanation": res.explanation,
            "why": res.why, "check": check}, sc


def _prune_at_plan(cfg: RunConfig, src: Path, out: Path, profile, plan: dict, scored) -> dict:
    """Prune at the plan's ratio; the real shapes must be the ones the plan priced (checked, logged)."""
    from dataclasses import replace

    from . import planner
    from .allocation import UnitCost
    from .prune import run_prune

    pcfg = replace(_prune_config(cfg, plan["ratio"], profile), cost=UnitCost.from_dict(plan.get("cost")))
    r = run_prune(src, out / "pruned", pcfg, overwrite=True, progress=False, scored=scored)
    p = planner.predict(str(out / "pruned"), plan["quant"], profile)
    fits, short = planner.check(p, profile, cfg.margin_pct / 100)
    if not all(fits.values()):   # cannot happen when the allocation is deterministic; never prune again
        _log(f"warning: pruned shapes miss {[k for k, v in fits.items() if not v]} by "
             f"{ {k: round(v, 2) for k, v in short.items() if v > 0} } (the plan predicted they fit)")
    return {"dir": "pruned", "ratio": plan["ratio"], "achieved_ratio": r.achieved_ratio,
            "params_after": r.params_after, "wall_s": r.timings["total_s"], "predicted_fits": fits}


def _stage_finetune(st, cfg: RunConfig, model_dir: Path, out: Path) -> Path:
    if not st.done("finetune"):
        _log(f"stage finetune: {cfg.finetune} for {cfg.finetune_minutes} min")
        from .recovery import finetune

        finetune(str(model_dir), "gutenberg", str(out / "finetuned"), strategy=cfg.finetune,
                 minutes=cfg.finetune_minutes, seed=cfg.seed, overwrite=True)
        st.mark("finetune", {"dir": "finetuned", "strategy": cfg.finetune})
    return out / "finetuned"


def _stage_export(st, cfg: RunConfig, model_dir: Path, out: Path, profile, fmt: str, plan: dict) -> Path:
    art = out / _artifact_name(fmt, plan["quant"])
    if not st.done("export"):
        _log(f"stage export: {fmt} {plan['quant']}")
        import exporters

        if art.exists():
            shutil.rmtree(art) if art.is_dir() else art.unlink()
        summ = exporters.export(str(model_dir), fmt, str(art), max_context=cfg.max_context,
                                **_export_kwargs(fmt, plan["quant"], profile))
        st.mark("export", {"artifact": art.name, "summary": summ})
    return art


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json_text(obj))


def _stage_calibrate(src: Path, out: Path, profile, fmt: str, cfg: RunConfig) -> dict:
    """Export the dense model at the profile's allowed quants (up to two) and measure each; fit the host figures."""
    from . import planner
    from exporters.speed import measure_subprocess

    import exporters

    from .report import best_of_repeats

    if fmt != "gguf":
        return {"skipped": "host calibration is implemented for llama.cpp profiles"}
    # Two sizes at the same quant (the dense model, and a copy with half its non-embedding parameters removed by
    # magnitude, which costs seconds) let the fit separate the fixed per-token cost from the bytes term without
    # mixing in the different kernels of another quant type.
    q = "f16" if "f16" in profile.allowed_quants or not profile.allowed_quants else profile.allowed_quants[0]
    runs, measured = [], []
    with atomic_dir(out / "calibrate") as tmp:
        from .models import load, load_tokenizer, save
        from .prune import PruneConfig, prune_model

        half = load(src)
        prune_model(half, load_tokenizer(src), PruneConfig("magnitude", 0.5, calib_samples=1), progress=False)
        save(half, tmp / "half", tokenizer_src=src, provenance={"purpose": "host calibration"})
        for name, d in (("dense", src), ("half", tmp / "half")):
            art = tmp / f"{name}-{q}.gguf"
            exporters.export(str(d), "gguf", str(art), quant=q, max_context=cfg.max_context)
            m = best_of_repeats(measure_subprocess(art, threads=cfg.threads, n_ctx=profile.context_length, gen=64, repeats=5))
            measured.append({"model": name, "quant": q, **m})
            runs.append(planner.HostRun(str(d), q, m["decode_tps"], m["peak_rss_mb"], m["file_mb"], m["prefill_tps"],
                                        profile.context_length, m.get("kv_tokens"), m.get("prompt")))
        cal = planner.settle_overhead(planner.calibrate_host(runs, profile), runs[0].peak_rss_mb)
        for f in tmp.glob("*.gguf"):
            f.unlink()  # keep the measurements, not the artifacts
        shutil.rmtree(tmp / "half")
    return {"measured_dense": measured, "calibration": cal.to_dict()}



def _quality(src: Path, out: Path, cfg: RunConfig, st: RunState) -> dict:
    """PyTorch perplexity (same chunks as verify) of the dense, pruned and recovered models."""
    from .evaluate import perplexity
    from .models import load, load_tokenizer

    tok = load_tokenizer(src)
    q = {"protocol": f"wikitext2, 128-token chunks, first {cfg.ppl_chunks or 'all'} chunks"}
    for name, d in (("dense", src), ("pruned", out / "pruned"), ("finetuned", out / "finetuned")):
        if Path(d).is_dir():
            q[name] = perplexity(load(d), tok, "wikitext2", 128, cfg.ppl_chunks)
    return q


# ------------------------------------------------------------------------------------------------ CLI
def add_parsers(sub) -> None:
    s = sub.add_parser("profiles", help="list device profiles")
    s.set_defaults(fn=_cmd_profiles)

    s = sub.add_parser("plan", help="choose the pruning ratio and quant that fit a device profile")
    s.add_argument("model")
    s.add_argument("--profile", required=True, help="shipped profile name or a YAML path")
    s.add_argument("--mlp-multiple", type=int, default=32)
    s.add_argument("--json", default=None)
    s.set_defaults(fn=_cmd_plan)

    s = sub.add_parser("run", help="plan -> prune -> recover -> export -> verify -> report, resumable")
    s.add_argument("model")
    s.add_argument("--profile", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--method", default="obs", help="pruning method (default obs: OBS cost + least-squares refit)")
    s.add_argument("--allocation", default=None)
    s.add_argument("--finetune", default="none", help="none, groupwise or lora")
    s.add_argument("--finetune-minutes", type=float, default=2.0)
    s.add_argument("--format", choices=["gguf", "onnx"], default=None)
    s.add_argument("--calib-samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mlp-multiple", type=int, default=32)
    s.add_argument("--ppl-chunks", type=int, default=200, help="chunks for runtime/PyTorch perplexity (0: all)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--max-context", type=int, default=None,
                   help="the longest context you will run; accepts a format exact only up to it (see export)")
    s.add_argument("--no-host-calibration", action="store_true")
    s.add_argument("--cost-aware", action="store_true",
                   help="allocate by quality lost per byte of the binding budget (weights + KV cache at the profile's "
                        "context) instead of per parameter; off by default (benchmarks/planner.md)")
    s.add_argument("--overwrite", action="store_true",
                   help="allow --out to be a non-empty folder edgeprune did not create (its files are kept)")
    s.set_defaults(fn=_cmd_run)


def _cmd_profiles(a) -> int:
    from device_profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        b = p.budgets
        print(f"{name:28s} {p.device_class:8s} {p.app_runtime or p.runtime:12s} mem<={b.max_memory_mb:g} MB  "
              f"decode<={b.max_decode_ms_per_token:g} ms/token  quants={','.join(p.allowed_quants)}")
    return 0


def _cmd_plan(a) -> int:
    from . import planner
    from .paths import guard_output

    if a.json:
        guard_output(a.json, kind="file", overwrite=True, flag="--json",
                     inputs=(a.model, a.profile if os.path.isfile(a.profile) else None))
    try:
        res = planner.plan(a.model, a.profile, mlp_multiple=a.mlp_multiple)
    except BudgetError as e:
        r = getattr(e, "result", None)
        if r is not None and a.json:
            with atomic_file(a.json) as tmp:
                tmp.write_text(json_text(r.to_dict()))
        raise
    print(planner.format_table(res))
    print(res.explanation)
    if a.json:
        with atomic_file(a.json) as tmp:
            tmp.write_text(json_text(res.to_dict()))
    return 0


def _cmd_run(a) -> int:
    cfg = RunConfig(model=a.model, profile=a.profile, out=a.out, method=a.method, allocation=a.allocation,
                    finetune=a.finetune, finetune_minutes=a.finetune_minutes, format=a.format,
                    calib_samples=a.calib_samples, seed=a.seed, mlp_multiple=a.mlp_multiple,
                    ppl_chunks=a.ppl_chunks or None, threads=a.threads, calibrate_host=not a.no_host_calibration,
                    cost_aware=a.cost_aware,
                    overwrite=a.overwrite, max_context=a.max_context)
    rep = run(cfg)
    print(f"report: {Path(a.out) / 'report.md'}")
    print("verdicts: " + ", ".join(f"{k}={v['verdict']}" for k, v in rep["verdicts"].items()))
    return 0
