"""``edgeprune prune``: check the configuration, pick the engine's layer source and sink (resident or streamed
from the checkpoint), run :func:`edgeprune.engine.run`, and write the pruned model with its report and provenance
(atomically). The layer loop itself is :mod:`edgeprune.engine`'s."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .allocation import AllocOptions, allocate, check_allocation
from .checkpoint import should_stream
from .data import calibration_ids
from .device import place, resolve_device
from .procmem import peak_rss_mb
from . import engine
from .engine import EngineConfig, EngineResult, run, to_cpu_scores
from .errors import EdgepruneError
from .importance import Context, get_method
from .layer_io import CheckpointSource, ResidentSink, ResidentSource, ShardSink
from .models import check_model_dir, count_params, layer_shapes, load, load_tokenizer
from .paths import check_output_dir
from .result import PruneResult, jsonable
from .typed_options import TypedOptions, check_options, option


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

    target: Any = None                   # planner.fit.FitTarget: prune to the least ratio that fits it (ratio unused)
    cost: Any = None                     # allocation.UnitCost: ratio is a fraction of this pool (cost-aware), not params

    def repair_mode(self) -> tuple[str, bool] | None:
        """(mode, sequential) of the repair stage, or None to keep the method's own surgery.
        ``reconstruct=None`` takes the method's ``default_reconstruct`` (``obs``: lsq)."""
        from .importance.base import REGISTRY

        mode = self.reconstruct
        if mode is None:
            get_method(self.method)   # registers every method (and fails on an unknown one)
            mode = REGISTRY[self.method].default_reconstruct
        if mode is None and not self.sequential:
            return None
        mode = mode or "none"
        return mode, bool(self.sequential if self.sequential is not None else mode in ("lsq", "obs"))

    def repair_options(self):
        """The repair stage's options (:mod:`edgeprune.repair`), or None to keep the method's own surgery; ``--opt
        recon_target=resid|dense|self``, ``recon_damp=0.01``, ``recon_intercept=true|false``, ``recon_scores=dense|pruned``
        refine it."""
        rm = self.repair_mode()
        if rm is None:
            return None
        from .repair import ReconOptions, RepairOptions

        o = ReconOptions.parse(self.options)
        return RepairOptions(mode=rm[0], sequential=rm[1], target=o.recon_target, damp=o.recon_damp,
                             intercept=o.recon_intercept, scores=o.recon_scores)

    def option_owners(self) -> tuple[list[tuple[str, type]], str]:
        """(the ``(label, typed options class)`` owners of ``--opt`` keys in this configuration, its name): the
        method, the allocator (and the self-pruner's backend), the repair stage if one runs, streaming."""
        from .allocation import option_classes

        method = get_method(self.method)
        alloc = self.allocation or method.default_allocation
        check_allocation(alloc)
        owners = [(method.name, type(method).Options)]
        owners += [(c.OWNER, c) for c in option_classes(alloc)]
        combo = f"--method {method.name} --allocation {alloc}"
        rm = self.repair_mode()
        if rm is not None:
            from .repair import ReconOptions

            owners.append((ReconOptions.OWNER, ReconOptions))
            combo += f" --reconstruct {rm[0]}"
        return owners + [(StreamOptions.OWNER, StreamOptions)], combo

    def check_options(self) -> None:
        """The method and allocation names and every ``--opt`` key and value against their owners in this
        configuration (:func:`edgeprune.typed_options.check_options`), before any work."""
        owners, combo = self.option_owners()
        check_options(self.options, owners, combo, _elsewhere({c for _, c in owners}))

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
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise EdgepruneError(f"--device {self.device}: use cpu, cuda, cuda:N or auto")
        self.check_options()   # an unknown method, allocation or --opt key, a bad value: one line, before any I/O
        ro = self.repair_options()
        if ro is not None:
            ro.validate()
        self._check_combinations(ro)

    def _check_combinations(self, ro) -> None:
        alloc = self.allocation or get_method(self.method).default_allocation
        propagate, _ = stream_options(self.options)
        if self.stream and alloc == "self-pruner":
            raise EdgepruneError("the self-pruner allocation evaluates whole pruned models and cannot stream; prune "
                                 "without --stream (or pick --allocation uniform/global/saap)")
        if propagate == "pruned" and ro is not None:
            raise EdgepruneError("--opt stream_propagate=pruned and --reconstruct both choose what later layers see; "
                                 "use --sequential with --reconstruct instead")
        if propagate == "pruned" and alloc == "self-pruner":
            raise EdgepruneError("--opt stream_propagate=pruned cannot be combined with the self-pruner allocation "
                                 "(its fitness needs the dense model); pick uniform, global or saap")
        if self.target is not None and self.stream:
            raise EdgepruneError("--target-mb prunes in memory (it allocates many times on one scoring); "
                                 "drop --stream")
        if self.target is not None and propagate == "pruned":
            raise EdgepruneError("--target-mb scores once on the dense model; --opt stream_propagate=pruned "
                                 "scores on the pruned layers' outputs: drop one of them")
        if ro is not None and ro.scores == "pruned":
            if not get_method(self.method).has_layer_scorer():
                raise EdgepruneError(f"--opt recon_scores=pruned re-scores each layer with the method's per-layer "
                                     f"scorer; {self.method} scores the whole model (use recon_scores=dense)")
            if self.target is not None:
                raise EdgepruneError("--target-mb scores once on the dense model; --opt recon_scores=pruned "
                                     "re-scores every layer: drop one of them")


def _elsewhere(used: set) -> dict[str, str]:
    """``--opt`` key -> the flag whose owner claims it, over the owners a configuration does not use (every
    method, allocator and the repair stage), so a key of another configuration is named as such."""
    from .allocation import ALLOCATORS, option_classes
    from .importance import method_names
    from .repair import ReconOptions

    out: dict[str, str] = {}
    for k in ReconOptions.keys():
        out[k] = "--reconstruct lsq|obs"
    for a in ALLOCATORS:
        for c in option_classes(a):
            for k in c.keys():
                out.setdefault(k, f"--allocation {a}")
    for m in method_names():
        for k in type(get_method(m)).Options.keys():
            out.setdefault(k, f"--method {m}")
    for c in used:
        for k in c.keys():
            out.pop(k, None)
    return out


@dataclass
class Scored:
    """One scoring of a resident model by the engine (:func:`edgeprune.engine.score`), all that allocation needs
    at any ratio (score once, allocate many); :func:`prune_model` applies one of its plans with the engine's
    second pass (:func:`edgeprune.engine.apply`)."""

    scores: Any
    groups: list
    allocation: str
    opts: AllocOptions
    ctx: Context
    timings: dict
    repair_bias: bool | None = None      # None: no repair stage (the method's surgery); else: it adds o/down biases

    def bias_means(self, n_layers: int) -> list | None:
        """Per layer, which pruned projections gain a bias: the method's compensation (FLAP), or, when the repair
        stage replaces the method's surgery, the refit's intercept on every pruned ``o_proj`` / ``down_proj``."""
        if self.repair_bias is None:
            return self.scores.bias_means
        return [{"o": True, "down": True}] * n_layers if self.repair_bias else None

    def plan_at(self, ratio: float, cost=None):
        """The method's own allocation at ``ratio`` (no re-scoring); ``cost``: a cost-aware pool
        (:class:`~edgeprune.allocation.base.UnitCost`, then ``ratio`` is a fraction of it), else the options'."""
        opts = replace(self.opts, ratio=ratio) if cost is None else replace(self.opts, ratio=ratio, cost=cost)
        return allocate(self.allocation, self.scores, self.groups, opts, self.ctx)


def score(model, tokenizer, cfg: PruneConfig, progress: bool = True) -> Scored:
    """Calibrate and score ``model`` (not modified) with the engine's first pass, and set up the allocation
    options. A model on an accelerator is moved to the CPU afterwards (surgery and allocators run there)."""
    method = get_method(cfg.method)
    t0 = time.time()
    source = ResidentSource(model)
    ctx = _context(cfg, tokenizer, model)
    ctx.calib_ids = ctx.calib_ids.to(source.device)
    ctx.progress = progress
    ecfg = engine_config(cfg, method, len(source.groups()), count_params(model)[1], progress)
    t1 = time.time()
    scores = engine.score(method, model, ctx)
    ctx.progress = False
    to_cpu_scores(scores)
    source.prepare_surgery()
    ctx.calib_ids = ctx.calib_ids.cpu()
    ro = cfg.repair_options()
    return Scored(scores, source.groups(), ecfg.allocation, ecfg.alloc, ctx,
                  {"calib_s": round(t1 - t0, 2), "score_s": round(time.time() - t1, 2)},
                  None if ro is None else (ro.mode != "none" and (ro.intercept or ro.mode == "bias")))


@dataclass(frozen=True)
class StreamOptions(TypedOptions):
    """The layer loop's ``--opt`` options (every configuration has them)."""

    OWNER = "streaming"
    stream_propagate: str = option("dense", choices=("dense", "pruned"),
                                   doc="what later layers are calibrated on: the dense or the pruned outputs")
    stream_dtype: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"),
                               doc="compute dtype of a streamed layer")


def stream_options(options: dict) -> tuple[str, str]:
    """(propagate, dtype) of the layer-streaming options ``stream_propagate`` / ``stream_dtype``, checked."""
    o = StreamOptions.parse(options)
    return o.stream_propagate, o.stream_dtype


def engine_config(cfg: PruneConfig, method, n_layers: int, nonemb: int, progress: bool,
                  repair=None, hooks=None) -> EngineConfig:
    """The engine's configuration for ``cfg`` (skip range: the method's default unless given)."""
    skip = method.default_skip(n_layers)
    extra = {k: v for k, v in cfg.options.items() if k not in StreamOptions.keys()}
    if cfg.ray and "ray" not in extra:
        extra["ray"] = cfg.ray
    opts = AllocOptions(ratio=cfg.ratio, nonemb_params=nonemb,
                        skip_first=skip[0] if cfg.skip_first is None else cfg.skip_first,
                        skip_last=skip[1] if cfg.skip_last is None else cfg.skip_last,
                        min_kv=cfg.min_kv, multiple=cfg.multiple, extra=extra,
                        uniform_kv=cfg.uniform_kv, uniform_shapes=cfg.uniform_shapes, cost=cfg.cost)
    stage = None
    ro = cfg.repair_options()
    if ro is not None:   # the repair stage replaces the method's own surgery (and FLAP's bias compensation)
        from .repair import RepairStage

        stage = RepairStage(ro)
    return EngineConfig(allocation=cfg.allocation or method.default_allocation, alloc=opts,
                        propagate=stream_options(cfg.options)[0], hooks=list(hooks or []), repair=repair,
                        stage=stage, progress=progress)


def _context(cfg: PruneConfig, tokenizer, model) -> Context:
    torch.manual_seed(cfg.seed)
    ids = calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed)
    options = {k: v for k, v in cfg.options.items() if k not in StreamOptions.keys()}
    if cfg.ray and "ray" not in options:
        options["ray"] = cfg.ray
    return Context(model=model, calib_ids=ids, seed=cfg.seed, options=options, progress=False)


def prune_model(model, tokenizer, cfg: PruneConfig, progress: bool = True, sink=None, scored: Scored | None = None):
    """Prune a resident ``model`` in place with the engine; returns (plan, scores, info). No I/O besides reading
    the calibration text (and ``sink``'s writes, if one is given).

    With ``cfg.target`` (a :class:`~edgeprune.planner.fit.FitTarget`) the ratio is the least whose real shapes
    fit the target, found by bisection on one scoring (``info["ratio"]``, ``info["fit"]``). ``scored``: a
    scoring of this same model already made (by the planner), used instead of scoring again."""
    res, info = _prune_resident(model, tokenizer, cfg, progress, sink or ResidentSink(None, None), scored)
    return res.plan, res.scores, info


def _prune_resident(model, tokenizer, cfg: PruneConfig, progress: bool, sink, scored: Scored | None = None):
    """(engine result, info): the engine's loop (:func:`edgeprune.engine.run`), or, for a given scoring or a fit
    target, its first pass once (:func:`score`), the allocation at the chosen ratio and its second pass
    (:func:`edgeprune.engine.apply`)."""
    cfg.validate()
    method = get_method(cfg.method)
    t0 = time.time()
    source = ResidentSource(model)
    n, nonemb = len(source.groups()), count_params(model)[1]
    if scored is None and cfg.target is None:
        ctx = _context(cfg, tokenizer, model)
        ctx.calib_ids = ctx.calib_ids.to(source.device)
        ecfg = engine_config(cfg, method, n, nonemb, progress)
        t1 = time.time()
        res = run(source, sink, method, ctx, ecfg)
        return res, _info(ecfg, res, t1 - t0, cfg.ratio)
    sc = scored or score(model, tokenizer, cfg, progress)
    t2 = time.time()
    ratio, fit, cost = cfg.ratio, None, cfg.cost
    if cfg.target is not None:
        from .planner import model_shape
        from .planner.fit import choose_ratio

        ratio, cost = choose_ratio(cfg.target, sc, model_shape(model))
        fit = {**cfg.target.describe(), "ratio": ratio, "ratio_of": "params" if cost is None else cost.unit}
    plan = sc.plan_at(ratio, cost)
    ecfg = engine_config(replace(cfg, ratio=ratio, cost=cost), method, n, nonemb, progress)
    engine.apply(ResidentSource(model), sink, plan, sc.ctx, ecfg, sc.scores.bias_means)
    res = EngineResult(plan, sc.scores, 2, {"score_s": sc.timings["score_s"],
                                            "allocate_apply_s": round(time.time() - t2, 2)})
    return res, _info(ecfg, res, sc.timings["calib_s"], ratio, fit)


def _info(ecfg: EngineConfig, res: EngineResult, calib_s: float, ratio: float, fit: dict | None = None) -> dict:
    info = {"allocation": ecfg.allocation, "skip": [ecfg.alloc.skip_first, ecfg.alloc.skip_last], "ratio": ratio,
            "fit": fit, "scores_info": res.scores.info, "timings": {"calib_s": round(calib_s, 2), **res.timings},
            "plan_meta": dict(res.plan.meta), "passes": res.passes,
            "cost": None if ecfg.alloc.cost is None else ecfg.alloc.cost.to_dict()}
    if ecfg.stage is not None:
        info["reconstruction"] = ecfg.stage.record()
    return info


def _streamed(model_path, cfg: PruneConfig, method, progress: bool):
    """(source, ctx, engine config) of a streamed prune: layers from the checkpoint."""
    device = resolve_device(cfg.device)
    source = CheckpointSource(model_path, stream_options(cfg.options)[1], device,
                              head=method.loss_scope == "model" or not method.has_layer_scorer())
    ctx = _context(cfg, load_tokenizer(model_path), source.model)
    ecfg = engine_config(cfg, method, len(source.groups()), count_params(source.model)[1], progress)
    return source, ctx, ecfg


def run_prune(model_path: str | Path, out: str | Path, cfg: PruneConfig, overwrite: bool = False,
              progress: bool = True, scored: Scored | None = None) -> PruneResult:
    """Prune the model at ``model_path`` into ``out``: in memory, or streamed layer by layer (``cfg.stream``;
    automatic when the weights would not fit and the allocation can stream). ``scored``: the planner's scoring
    of that model, loaded with its defaults (``scored.ctx.model`` is pruned in place instead of loading and
    scoring again); ``cfg.target`` (``--target-mb``) also prunes in memory on one scoring."""
    cfg.validate()   # an unknown method, option or allocation fails here, before anything is read
    out = check_output_dir(out, overwrite, inputs=(model_path,))  # and an unusable --out
    check_model_dir(model_path)   # the one model validator (config table, dtypes, finite weights), before work
    method = get_method(cfg.method)
    stream = cfg.stream
    if cfg.target is not None or scored is not None:   # one scoring allocated at a chosen ratio: in memory
        stream = False
    if stream is None:
        stream = (cfg.allocation or method.default_allocation) != "self-pruner" and should_stream(model_path)
    t0 = time.time()
    if stream:
        source, ctx, ecfg = _streamed(model_path, cfg, method, progress)
        sink = ShardSink(out, source, model_path)
    else:
        model = scored.ctx.model if scored is not None else place(load(model_path), cfg.device, cfg.device_map)
        source = ResidentSource(model)
        sink = ResidentSink(out, model_path)
    dense_groups, (total_b, nonemb_b) = source.groups(), count_params(source.model)
    t1 = time.time()
    try:
        with sink:
            if stream:
                res = run(source, sink, method, ctx, ecfg)
                info = _info(ecfg, res, t1 - t0, cfg.ratio)
            else:
                res, info = _prune_resident(source.model, load_tokenizer(model_path), cfg, progress, sink, scored)
            result = _result(cfg, out, source, dense_groups, (total_b, nonemb_b), info, res.plan, t0)
            prov = _provenance(cfg, model_path, result, info, res, source)
            rep = jsonable(asdict(result))
            rep["plan"] = {"keep_kv": res.plan.keep_kv, "keep_mlp": res.plan.keep_mlp,
                           "meta": jsonable(dict(res.plan.meta))}
            sink.finish(source.model, prov, json.dumps(rep, indent=2) + "\n")
    finally:
        source.close()
    return result


def _result(cfg: PruneConfig, out, source, dense_groups, before: tuple[int, int], info: dict, plan, t0: float):
    total_b, nonemb_b = before
    total_a, nonemb_a = count_params(source.model)
    return PruneResult(out=str(out), method=cfg.method, allocation=info["allocation"], target_ratio=info["ratio"],
                       achieved_ratio=1 - nonemb_a / nonemb_b, params_before=total_b, params_after=total_a,
                       nonemb_before=nonemb_b, nonemb_after=nonemb_a,
                       per_layer=per_layer_report(dense_groups, layer_shapes(source.model), plan),
                       timings={**info["timings"], "total_s": round(time.time() - t0, 2)}, peak_rss_mb=peak_rss_mb())


def per_layer_report(dense_groups, after, plan) -> list[dict]:
    rows = []
    for i, (lg, kv, ch) in enumerate(zip(dense_groups, plan.keep_kv, plan.keep_mlp)):
        p = lg.n_kv * lg.attn_group_params + lg.n_mlp * lg.mlp_group_params
        kept = len(kv) * lg.attn_group_params + len(ch) * lg.mlp_group_params
        rows.append({"layer": i, **{k: v for k, v in after[i].to_dict().items() if not k.endswith("_bias")},
                     "kv_kept": len(kv) / lg.n_kv, "mlp_kept": len(ch) / lg.n_mlp, "removed_frac": 1 - kept / p})
    return rows


def _provenance(cfg: PruneConfig, model_path, result: PruneResult, info: dict, res: EngineResult, source) -> dict:
    prov = {
        "edgeprune_version": __version__, "source_model": str(Path(model_path).resolve()), "method": cfg.method,
        "allocation": info["allocation"], "target_ratio": info["ratio"], "fit": info["fit"],
        "ratio_of": "params" if info.get("cost") is None else info["cost"]["unit"], "cost": info.get("cost"),
        "achieved_ratio": round(result.achieved_ratio, 6),
        "calibration": {"source": cfg.calib, "samples": cfg.calib_samples, "seq_len": cfg.calib_len, "seed": cfg.seed},
        "skip_layers": info["skip"], "round_mlp": cfg.multiple, "min_kv": cfg.min_kv, "options": cfg.options,
        "scores_info": jsonable(info["scores_info"]),
        "bias_compensation": res.scores.bias_means is not None and "reconstruction" not in info,
        "reconstruction": jsonable(info.get("reconstruction", {"mode": "method default"})),
    }
    if source.streamed:
        prov["stream"] = {"streamed": True, "passes": res.passes, "propagate": stream_options(cfg.options)[0],
                          "compute_dtype": str(source.dtype).replace("torch.", ""), "device": str(source.device),
                          "block_local_loss": not get_method(cfg.method).has_layer_scorer(),
                          "shards": source_shards(source)}
    return prov


def source_shards(source) -> int:
    return len(source.model.model.layers) + 2
