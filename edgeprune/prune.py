"""``edgeprune prune``: load → calibrate → score → allocate → surgery → save (atomically)."""
from __future__ import annotations

import contextlib
import json
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .allocation import AllocOptions, allocate
from .data import calibration_ids
from .errors import EdgepruneError
from .groups import model_groups
from .importance import Context, get_method
from .models import check_model_dir, count_params, layer_shapes, load, load_tokenizer, save
from .paths import check_output_dir
from .surgery import apply_plan


DEFAULT_METHOD = "obs"   # `edgeprune prune` without --method: OBS importance + sequential lsq refit (its default)


@dataclass
class PruneConfig:
    method: str
    ratio: float
    allocation: str | None = None        # None: the method's own default
    calib: str = "gutenberg"
    calib_samples: int = 128
    calib_len: int = 128
    seed: int = 0
    skip_first: int | None = None        # None: the method's default
    skip_last: int | None = None
    multiple: int = 1
    min_kv: int = 1
    options: dict = field(default_factory=dict)
    stream: bool | None = None           # None: stream when the weights do not fit in RAM (edgeprune.stream)
    device: str = "cpu"                  # cpu | cuda | auto (calibration/scoring; surgery runs on the CPU)
    device_map: str | None = None        # e.g. "auto": spread the in-memory model over GPUs with accelerate
    ray: str | None = None               # Ray address for the self-pruner's fitness evaluations
    uniform_kv: bool = False             # runtime constraint: same KV heads in every layer (allocation.constraints)
    uniform_shapes: bool = False         # runtime constraint: every layer the same shape
    reconstruct: str | None = None       # none|bias|lsq|obs; None: the method's own (FLAP: bias, others: none)
    sequential: bool | None = None       # sequential calibration of the repair; None: on for lsq/obs

    def repair_options(self):
        """The repair stage's options (:mod:`edgeprune.repair`), or None to keep the method's own surgery.
        ``reconstruct=None`` takes the method's ``default_reconstruct`` (``obs``: lsq). ``--opt
        recon_target=resid|dense|self``, ``recon_damp=0.01``, ``recon_intercept=true|false`` refine it."""
        from .importance.base import REGISTRY

        mode = self.reconstruct
        if mode is None:
            get_method(self.method)   # registers every method (and fails on an unknown one)
            mode = REGISTRY[self.method].default_reconstruct
        if mode is None and not self.sequential:
            return None
        from .repair import RepairOptions

        mode = mode or "none"
        seq = self.sequential if self.sequential is not None else mode in ("lsq", "obs")
        o = self.options
        return RepairOptions(mode=mode, sequential=bool(seq), target=str(o.get("recon_target", "resid")),
                             damp=float(o.get("recon_damp", 0.01)), intercept=_flag(o.get("recon_intercept", True)))
    target: Any = None                   # planner.fit.FitTarget: prune to the least ratio that fits it (ratio unused)

    def validate(self) -> None:
        if self.target is not None:
            self.target.validate()
        elif not (0.0 < self.ratio < 1.0):
            raise EdgepruneError(f"--ratio {self.ratio} is outside (0, 1); pass the fraction of non-embedding "
                                 "parameters to remove, e.g. 0.2")
        if self.multiple < 1:
            raise EdgepruneError(f"--round-mlp {self.multiple} must be >= 1")
        if self.min_kv < 0:
            raise EdgepruneError(f"--min-kv {self.min_kv} must be >= 0")
        ro = self.repair_options()
        if ro is not None:
            ro.validate()
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise EdgepruneError(f"--device {self.device}: use cpu, cuda, cuda:N or auto")


@dataclass
class PruneResult:
    out: str
    method: str
    allocation: str
    target_ratio: float
    achieved_ratio: float
    params_before: int
    params_after: int
    nonemb_before: int
    nonemb_after: int
    per_layer: list[dict]
    timings: dict
    peak_rss_mb: float

    def table(self) -> str:
        rows = ["| layer | q heads | kv heads | mlp | removed |", "|---|---|---|---|---|"]
        for r in self.per_layer:
            rows.append(f"| {r['layer']} | {r['num_attention_heads']} | {r['num_key_value_heads']} | "
                        f"{r['intermediate_size']} | {r['removed_frac']:.1%} |")
        return "\n".join(rows)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Scored:
    """One scoring of a model, all that allocation needs at any ratio (score once, allocate many)."""

    scores: Any
    groups: list
    allocation: str
    opts: AllocOptions
    ctx: Context
    timings: dict

    def plan_at(self, ratio: float):
        """The method's own allocation at ``ratio`` (no re-scoring)."""
        return allocate(self.allocation, self.scores, self.groups, replace(self.opts, ratio=ratio), self.ctx)


def score(model, tokenizer, cfg: PruneConfig, progress: bool = True) -> Scored:
    """Calibrate and score ``model`` (not modified) and set up the allocation options."""
    method = get_method(cfg.method)
    alloc = cfg.allocation or method.default_allocation
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    ids = calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if not on_cpu:
        ids = ids.to(model.get_input_embeddings().weight.device)
    if cfg.ray and "ray" not in cfg.options:
        cfg.options = {**cfg.options, "ray": cfg.ray}
    ctx = Context(model=model, calib_ids=ids, seed=cfg.seed, options=dict(cfg.options), progress=progress)
    t1 = time.time()
    with contextlib.nullcontext() if method.needs_gradients else torch.no_grad():
        scores = method.score(model, ctx)
    scores.attn = [s.detach().double().cpu() for s in scores.attn]
    scores.mlp = [s.detach().double().cpu() for s in scores.mlp]
    if not on_cpu:   # surgery (index_select with CPU plans) and saving run on the CPU
        _to_cpu(model)
        ctx.calib_ids = ctx.calib_ids.cpu()
        if scores.bias_means is not None:
            scores.bias_means = [{k: v.cpu() for k, v in d.items()} for d in scores.bias_means]
    skip = scores.info.get("skip_default", [0, 0])
    _, nonemb = count_params(model)
    opts = AllocOptions(ratio=cfg.ratio, nonemb_params=nonemb,
                        skip_first=skip[0] if cfg.skip_first is None else cfg.skip_first,
                        skip_last=skip[1] if cfg.skip_last is None else cfg.skip_last,
                        min_kv=cfg.min_kv, multiple=cfg.multiple, extra=dict(cfg.options),
                        uniform_kv=cfg.uniform_kv, uniform_shapes=cfg.uniform_shapes)
    return Scored(scores, model_groups(model), alloc, opts, ctx,
                  {"calib_s": round(t1 - t0, 2), "score_s": round(time.time() - t1, 2)})


def prune_model(model, tokenizer, cfg: PruneConfig, progress: bool = True, scored: Scored | None = None):
    """Prune ``model`` in place; returns (plan, scores, info). No I/O besides reading calibration text.

    With ``cfg.target`` (a :class:`~edgeprune.planner.fit.FitTarget`) the ratio is the least whose real shapes
    fit the target, found by bisection on this one scoring (``info["ratio"]``, ``info["fit"]``). ``scored``: a
    scoring of this same model already made (by the planner), used instead of scoring again."""
    cfg.validate()
    sc = scored or score(model, tokenizer, cfg, progress)
    t2 = time.time()
    ratio, fit = cfg.ratio, None
    if cfg.target is not None:
        from .planner import model_shape
        from .planner.fit import choose_ratio

        ratio = choose_ratio(cfg.target, sc, model_shape(model))
        fit = {**cfg.target.describe(), "ratio": ratio}
    plan = sc.plan_at(ratio)
    repair = cfg.repair_options()
    if repair is None:
        apply_plan(model, plan, sc.scores.bias_means)
    else:   # the repair stage replaces the method's own surgery (and FLAP's bias compensation)
        from .repair import prune_repaired

        reps = prune_repaired(model, plan, sc.ctx.calib_ids, repair, sc.ctx.batch_size, progress)
    info = {"allocation": sc.allocation, "skip": [sc.opts.skip_first, sc.opts.skip_last], "ratio": ratio, "fit": fit,
            "scores_info": sc.scores.info,
            "timings": {**sc.timings, "allocate_apply_s": round(time.time() - t2, 2)},
            "plan_meta": {k: v for k, v in plan.meta.items()}}
    if repair is not None:
        info["reconstruction"] = {**asdict(repair), "layers": [asdict(r) for r in reps]}
    return plan, sc.scores, info


def _flag(v) -> bool:
    if isinstance(v, str):
        if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise EdgepruneError(f"--opt value {v!r} must be true or false")
        return v.lower() in ("true", "1", "yes")
    return bool(v)


def _to_cpu(model) -> None:
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    model.to("cpu")


def place(model, device: str = "cpu", device_map: str | None = None):
    """Put the model on ``device`` (cpu | cuda | auto) or spread it with accelerate's ``device_map``."""
    from .stream import resolve_device

    if device_map:
        if not torch.cuda.is_available():
            return model   # nothing to spread over: stay on the CPU
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = [type(model.model.layers[0]).__name__]
        dm = infer_auto_device_map(model, no_split_module_classes=no_split) if device_map == "auto" else \
            json.loads(device_map)
        return dispatch_model(model, device_map=dm)
    dev = resolve_device(device)
    return model if dev.type == "cpu" else model.to(dev)


def run_prune(model_path: str | Path, out: str | Path, cfg: PruneConfig, overwrite: bool = False,
              progress: bool = True, scored: Scored | None = None) -> PruneResult:
    """Prune the model at ``model_path`` into ``out``. ``scored``: the planner's scoring of that model, loaded
    with its defaults (``scored.ctx.model`` is pruned in place instead of loading and scoring again)."""
    cfg.validate()
    get_method(cfg.method)  # fail fast on an unknown method, before loading anything
    check_output_dir(out, overwrite, inputs=(model_path,))  # and on an unusable --out, before reading the model
    check_model_dir(model_path)   # the one model validator (config table, dtypes, finite weights), before work
    stream = cfg.stream
    if cfg.target is not None:   # bisection re-runs the allocator on one scoring: needs the scores in memory
        if stream:
            raise EdgepruneError("--target-mb prunes in memory (it allocates many times on one scoring); "
                                 "drop --stream")
        stream = False
    if stream is None:   # automatic: only when the weights would not fit and the allocation can stream
        from .stream import should_stream

        stream = (cfg.allocation or get_method(cfg.method).default_allocation) != "self-pruner" and \
            should_stream(model_path)
    if scored is not None:
        stream = False
    if stream:
        from .stream import run_prune_streamed

        return run_prune_streamed(model_path, out, cfg, overwrite=overwrite, progress=progress)
    out = check_output_dir(out, overwrite, inputs=(model_path,))
    t0 = time.time()
    model = scored.ctx.model if scored is not None else place(load(model_path), cfg.device, cfg.device_map)
    tok = load_tokenizer(model_path)
    before = layer_shapes(model)
    dense_groups = model_groups(model)
    total_b, nonemb_b = count_params(model)
    plan, scores, info = prune_model(model, tok, cfg, progress, scored=scored)
    total_a, nonemb_a = count_params(model)
    after = layer_shapes(model)
    per_layer = []
    for i, (lg, kv, ch) in enumerate(zip(dense_groups, plan.keep_kv, plan.keep_mlp)):
        p = lg.n_kv * lg.attn_group_params + lg.n_mlp * lg.mlp_group_params
        kept = len(kv) * lg.attn_group_params + len(ch) * lg.mlp_group_params
        per_layer.append({"layer": i, **{k: v for k, v in after[i].to_dict().items() if not k.endswith("_bias")},
                          "kv_kept": len(kv) / lg.n_kv, "mlp_kept": len(ch) / lg.n_mlp, "removed_frac": 1 - kept / p})
    provenance = {
        "edgeprune_version": __version__, "source_model": str(Path(model_path).resolve()), "method": cfg.method,
        "allocation": info["allocation"], "target_ratio": info["ratio"], "fit": info["fit"],
        "achieved_ratio": round(1 - nonemb_a / nonemb_b, 6),
        "calibration": {"source": cfg.calib, "samples": cfg.calib_samples, "seq_len": cfg.calib_len, "seed": cfg.seed},
        "skip_layers": info["skip"], "round_mlp": cfg.multiple, "min_kv": cfg.min_kv, "options": cfg.options,
        "scores_info": _jsonable(info["scores_info"]),
        "bias_compensation": scores.bias_means is not None and "reconstruction" not in info,
        "reconstruction": _jsonable(info.get("reconstruction", {"mode": "method default"})),
    }
    res = PruneResult(out=str(out), method=cfg.method, allocation=info["allocation"], target_ratio=info["ratio"],
                      achieved_ratio=1 - nonemb_a / nonemb_b, params_before=total_b, params_after=total_a,
                      nonemb_before=nonemb_b, nonemb_after=nonemb_a, per_layer=per_layer,
                      timings={**info["timings"], "total_s": round(time.time() - t0, 2)}, peak_rss_mb=peak_rss_mb())
    report = json.dumps(_jsonable(asdict(res)), indent=2) + "\n"
    save(model, out, tokenizer_src=model_path, provenance=provenance, overwrite=True,
         extra_files={"prune_report.json": report})
    return res


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float):
        return round(x, 6)
    return x
