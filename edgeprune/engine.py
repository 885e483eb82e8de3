"""The pruning engine: the one layer loop of edgeprune.

In-memory pruning is the streamed path with every layer resident. A *source* hands out decoder layers
(:class:`~edgeprune.layer_io.ResidentSource`: the model's own modules; :class:`~edgeprune.layer_io.CheckpointSource`:
one layer at a time from the safetensors), a *sink* takes the pruned ones (resident: saved at the end;
shards: written at once). :func:`run` walks the layers::

    h = layer-0 inputs of the calibration rows
    pass 1, for each layer i:
        calibrate: run layer i over h with the statistics hooks (+ the method's and cfg.hooks' hooks)
        score:     layer scope -> the method's per-layer scorer; model scope -> see below
        per-layer allocation (uniform): plan layer i -> [repair] -> surgery -> sink      (one pass)
        h = the layer's outputs (dense; the pruned layer's with propagate="pruned")
    global allocation (global, saap, self-pruner): allocate over all scores, then
    pass 2, for each layer i: [calibrate on h (sequential / repair)] -> [repair] -> surgery -> sink

**Scoring.** A method with a per-layer scorer (``loss_scope = "layer"``: magnitude, wanda-sp, flap, bip) is
scored inside the loop, so streamed and in-memory scores are the same numbers. A method with a model-level loss
(``loss_scope = "model"``: llm-pruner, saap, mini-llm — or any method that only defines ``score(model, ctx)``)
keeps its ``score_model`` path: resident, it is scored once on the dense model after pass 1 collected the
statistics it asks for; streamed, every layer is scored on a block-local view (:class:`LayerView`: the layer's
input hidden states -> layer -> final norm -> head, the logit-lens loss; see docs/methods.md).

**Extension points** (:class:`EngineConfig`), all no-ops by default:

* ``hooks`` — extra calibration hooks ``(i, layer) -> [handles]`` registered while layer i runs over its
  calibration inputs (e.g. Gram matrices ``H = X Xᵀ`` of the ``o_proj`` / ``down_proj`` inputs, accumulated
  blockwise by the hook itself);
* ``repair`` — called once per layer *after* its kept groups are chosen and *before* surgery with a
  :class:`LayerWork` (the dense layer, its groups, kept KV groups / MLP channels, calibration statistics, input
  hidden states, bias means); it may modify the layer's weights in place (weight reconstruction);
* ``stage`` — a layer stage that replaces the default surgery in pass 2 (forcing two passes): ``start(hs0,
  kwargs)`` with the layer-0 calibration inputs, then ``step(i, layer, groups, keep_kv, keep_mlp)`` for every
  layer in order, pruning the layer in place and advancing its own calibration streams
  (:class:`edgeprune.repair.RepairStage`: ``--reconstruct lsq|obs|bias``, ``--sequential``); a stage with
  ``rescore`` set has each layer re-scored by the method's per-layer scorer on ``stage.inputs()`` (its pruned
  stream) and its kept groups re-selected with the plan's per-layer counts (``--opt recon_scores=pruned``);
* ``propagate="pruned"`` — sequential mode: layer i is calibrated on the outputs of the already pruned (and
  repaired) layers 0..i-1. With a global allocation, pass 1 scores on dense inputs and pass 2 runs the layers
  sequentially (calibrate on pruned inputs -> repair -> surgery -> forward).

Scoring and allocation stay separable: :func:`score` returns the dense :class:`~edgeprune.importance.Scores` of
a resident model and :func:`edgeprune.allocation.allocate` turns scores into a plan for any ratio, so a planner
can score once and allocate many times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .allocation import AllocOptions, allocate, per_layer_ratios
from .allocation.base import per_layer_plan, topk_sorted
from .calibrate import Collector, LayerStats, calibrate_layer, layer_forward
from .procmem import trim
from .errors import EdgepruneError
from .groups import LayerGroups, Plan
from .layer_io import ResidentSink, ResidentSource
from .importance.base import Context, Method, Scores
from .surgery import prune_layer



@dataclass
class LayerWork:
    """What a repair stage receives for one layer, after its kept groups are chosen and before surgery."""

    index: int
    layer: nn.Module                       # dense (unpruned) layer, on the compute device
    groups: LayerGroups
    keep_kv: list[int]
    keep_mlp: list[int]
    stats: LayerStats | None               # calibration statistics of this layer's inputs (None: not calibrated)
    inputs: list[torch.Tensor]             # the layer's calibration input hidden states (dense or pruned-path)
    kwargs: dict                           # decoder-layer keyword arguments (rotary embeddings, mask)
    bias_means: dict | None                # FLAP-style compensation means, applied by surgery


@dataclass
class EngineConfig:
    allocation: str
    alloc: AllocOptions
    propagate: str = "dense"               # "pruned": sequential calibration on the pruned layers' outputs
    hooks: list[Collector] = field(default_factory=list)
    repair: Callable[[LayerWork], None] | None = None
    stage: object | None = None            # a layer stage that replaces surgery (edgeprune.repair.RepairStage)
    progress: bool = True


@dataclass
class EngineResult:
    plan: Plan
    scores: Scores
    passes: int
    timings: dict


# ------------------------------------------------------------------------------------------------- scorers
class LayerScorer:
    """Scores each layer inside the loop with the method's per-layer scorer."""

    deferred = False

    def __init__(self, method: Method, ctx: Context):
        self.impl = method.layer_scorer(ctx)
        self.needs_inputs = method.needs_calibration

    def hooks(self, i: int, layer: nn.Module, lg: LayerGroups) -> list:
        return self.impl.hooks(i, layer, lg)

    def score(self, i, layer, lg, st, hs, outs, kwargs):
        return self.impl.score(i, layer, lg, st)

    def info(self) -> dict:
        return self.impl.info()


class ModelScorer:
    """Resident model-level scoring: once, on the dense model, after pass 1 collected the statistics."""

    deferred = True

    def __init__(self, method: Method, ctx: Context, model):
        self.method, self.ctx, self.model = method, ctx, model
        self.needs_inputs = method.needs_calibration

    def hooks(self, i, layer, lg) -> list:
        return []

    def score(self, i, layer, lg, st, hs, outs, kwargs):
        return None

    def score_all(self, stats: list) -> Scores:
        if self.method.needs_calibration:
            self.ctx.stats = stats
        with torch.enable_grad() if self.method.needs_gradients else torch.no_grad():
            return self.method.score(self.model, self.ctx)


class BlockScorer:
    """Streamed model-level scoring: each layer on its block-local view (:class:`LayerView`)."""

    deferred = False
    needs_inputs = True

    def __init__(self, method: Method, ctx: Context, source):
        self.method, self.ctx, self.source, self.first_info = method, ctx, source, None

    def hooks(self, i, layer, lg) -> list:
        return []

    def score(self, i, layer, lg, st, hs, outs, kwargs):
        ids = self.ctx.calib_ids.to(self.source.device)
        view = LayerView(self.source.config, layer, self.source, hs, kwargs, ids)
        seed = self.ctx.seed * 100003 + i
        ctx = Context(model=view, calib_ids=ids, seed=seed, options=self.ctx.options, progress=False,
                      groups=[lg], stats=[st] if st is not None else None)
        with torch.enable_grad() if self.method.needs_gradients else torch.no_grad():
            sc = self.method.score(view, ctx)
        if self.first_info is None:
            self.first_info = sc.info
        means = sc.bias_means[0] if sc.bias_means is not None else None
        return sc.attn[0], sc.mlp[0], means

    def info(self) -> dict:
        return dict(self.first_info or {})


def make_scorer(method: Method, ctx: Context, source):
    if method.has_layer_scorer():
        return LayerScorer(method, ctx)
    return BlockScorer(method, ctx, source) if source.streamed else ModelScorer(method, ctx, source.model)


class LayerView(nn.Module):
    """A one-layer model for model-level methods under streaming: ``decoder_layers(view) == [layer]``,
    ``view.config``; its forward maps rows of the calibration ids to the layer's stored input hidden states and
    returns ``lm_head(norm(layer(h)))`` (the block-local logit-lens loss)."""

    prefix_rows_only = True   # its forward accepts prefixes of the calibration rows only (the stored hidden states)

    def __init__(self, config, layer: nn.Module, source=None, hs: list[torch.Tensor] | None = None,
                 kwargs: dict | None = None, ids: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        if source is not None and getattr(source, "head_loaded", False):
            self.norm, self.lm_head = source.model.model.norm, source.model.lm_head
        self._h = torch.cat(hs) if hs else None
        self._kwargs, self._ids = kwargs or {}, ids

    def _rows(self, x: torch.Tensor) -> list[int]:
        ref = self._ids[:, : x.shape[1]].to(x.device)
        rows = []
        for row in x:
            hit = (ref == row).all(1).nonzero()
            if hit.numel() == 0:
                raise EdgepruneError("internal: the block-local model was called with ids outside the calibration set")
            rows.append(int(hit[0]))
        return rows

    def forward(self, input_ids, labels=None, use_cache=False, **_):
        if self._h is None or not hasattr(self, "lm_head"):
            raise EdgepruneError("internal: this method needs a block loss but the streamed layer has no head")
        n = input_ids.shape[1]
        h = self._h[self._rows(input_ids), :n]
        y = layer_forward(self.model.layers[0], h, slice_kwargs(self._kwargs, n))
        logits = self.lm_head(self.norm(y))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss)


def slice_kwargs(kwargs: dict, n: int) -> dict:
    """Decoder-layer keyword arguments for the first ``n`` positions (causal: the prefix's states are its own)."""
    out = {}
    for k, v in kwargs.items():
        if k == "position_embeddings" and v is not None:
            v = tuple(t[..., :n, :] for t in v)
        elif k == "attention_mask" and isinstance(v, torch.Tensor):
            v = v[..., :n, :n]
        elif k in ("cache_position", "position_ids") and isinstance(v, torch.Tensor):
            v = v[..., :n]
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------- the loop
@dataclass
class _Walk:
    """State of one run of the loop."""

    source: object
    sink: object
    scorer: object
    cfg: EngineConfig
    groups: list[LayerGroups]
    kwargs: dict = field(default_factory=dict)
    hs: list | None = None                     # the current layer's inputs (owned by the loop: freed as it goes)
    keep_stats: bool = False                   # keep every layer's statistics (deferred scoring, repair in pass 2)
    ratios: list[float] | None = None          # per-layer allocation: known before scoring
    attn: list = field(default_factory=list)
    mlp: list = field(default_factory=list)
    means: list = field(default_factory=list)
    stats: list = field(default_factory=list)
    keep_kv: list = field(default_factory=list)
    keep_mlp: list = field(default_factory=list)


def _calibrate(w: _Walk, i: int, layer, hs, scorer_hooks: bool, cfg_hooks: bool):
    """(stats, outputs) of layer i over ``hs`` with the statistics hooks, the scorer's and (the pass that feeds
    repair) cfg.hooks'."""
    lg = w.groups[i]

    def extra(j, lay):
        return ((w.scorer.hooks(j, lay, lg) if scorer_hooks else [])
                + ([h for c in w.cfg.hooks for h in c(j, lay)] if cfg_hooks else []))

    st, outs = calibrate_layer(layer, hs, w.kwargs, extra, i)
    if w.source.streamed:
        st = cpu_stats(st)
        trim()   # the forward's freed activations: back to the OS before scoring allocates
    return st, outs


def _finish_layer(w: _Walk, i: int, layer, keep_kv, keep_mlp, st, hs, means):
    """Repair, surgery and sink for layer i; returns its outputs when the pruned path propagates."""
    lg = w.groups[i]
    if w.cfg.repair is not None:
        w.cfg.repair(LayerWork(i, layer, lg, keep_kv, keep_mlp, st, hs, w.kwargs, means))
    if w.source.streamed:
        layer = layer.to("cpu")
    prune_layer(layer, lg, torch.tensor(keep_kv, dtype=torch.long), torch.tensor(keep_mlp, dtype=torch.long), means)
    w.sink.write(i, layer)
    outs = None
    if w.cfg.propagate == "pruned" and hs:
        layer = layer.to(w.source.device)
        with torch.no_grad():
            outs = [layer_forward(layer, h, w.kwargs) for h in hs]
    w.source.done(i, layer)
    return outs


def _pass1(w: _Walk, ids_needed: bool, one_pass: bool) -> None:
    from tqdm import tqdm

    hs, w.hs = w.hs or [], None

    for i in tqdm(range(len(w.groups)), desc="prune", unit="layer", disable=None if w.cfg.progress else True, leave=False):
        layer = w.source.layer(i)
        if getattr(w.scorer, "forward_only", False):
            st, outs = None, [layer_forward(layer, h, w.kwargs) for h in hs]
        elif ids_needed:
            st, outs = _calibrate(w, i, layer, hs, True, one_pass)
        else:
            st, outs = None, hs
        sc = w.scorer.score(i, layer, w.groups[i], st, hs, outs, w.kwargs)
        trim()   # the scorer's freed blocks: back to the OS before surgery allocates
        w.stats.append(st if w.keep_stats else None)
        if sc is not None:
            a, m, means = sc
            w.attn.append(a.detach().double().cpu())
            w.mlp.append(m.detach().double().cpu())
            w.means.append({k: v.cpu() for k, v in means.items()} if means is not None else None)
        if one_pass:
            p = per_layer_plan([w.attn[i]], [w.mlp[i]], [w.groups[i]], [w.ratios[i]], w.cfg.alloc)
            w.keep_kv.append(p.keep_kv[0])
            w.keep_mlp.append(p.keep_mlp[0])
            pruned = _finish_layer(w, i, layer, p.keep_kv[0], p.keep_mlp[0], st, hs, w.means[i])
            outs = pruned if pruned is not None else outs
        del layer
        hs = outs
        trim()


def _stage_pass(w: _Walk, plan: Plan, hs0: list) -> None:
    """Pass 2 with a layer stage: ``stage.step`` prunes (and refits) layer i in place on the calibration streams it
    keeps itself (started from the layer-0 inputs), then the sink takes the layer."""
    from tqdm import tqdm

    w.cfg.stage.start(hs0, w.kwargs)
    for i in tqdm(range(len(w.groups)), desc="prune (repair)", unit="layer", disable=None if w.cfg.progress else True,
                  leave=False):
        layer = w.source.layer(i)
        if getattr(w.cfg.stage, "rescore", False):
            _rescore(w, plan, i, layer, w.cfg.stage.inputs())
        w.cfg.stage.step(i, layer, w.groups[i], plan.keep_kv[i], plan.keep_mlp[i])
        if w.source.streamed:
            layer = layer.to("cpu")
        w.sink.write(i, layer)
        w.source.done(i, layer)
        del layer
        trim()


def _rescore(w: _Walk, plan: Plan, i: int, layer, hs: list) -> None:
    """Re-select layer i's kept groups by the method's per-layer scores on ``hs`` (the stage's pruned stream:
    the outputs of the already pruned and refitted layers), keeping the plan's numbers of KV groups and MLP
    channels (so the allocation, the ratio and any runtime constraint on shapes are unchanged)."""
    st, outs = _calibrate(w, i, layer, hs, True, False)
    del outs
    sc = w.scorer.score(i, layer, w.groups[i], st, hs, None, w.kwargs)
    if sc is None:
        raise EdgepruneError("internal: re-scoring on the pruned stream needs a per-layer scorer")
    plan.keep_kv[i] = topk_sorted(sc[0].detach().double().cpu(), len(plan.keep_kv[i]))
    plan.keep_mlp[i] = topk_sorted(sc[1].detach().double().cpu(), len(plan.keep_mlp[i]))
    trim()


def _pass2(w: _Walk, plan: Plan, hs0: list | None, bias_means) -> None:
    from tqdm import tqdm

    if w.cfg.stage is not None:
        return _stage_pass(w, plan, hs0)
    hs = hs0
    for i in tqdm(range(len(w.groups)), desc="prune (pass 2)", unit="layer", disable=None if w.cfg.progress else True,
                  leave=False):
        layer = w.source.layer(i)
        st = w.stats[i]
        if hs is not None:   # sequential / repair: this layer's statistics on the inputs it will see
            st, outs = _calibrate(w, i, layer, hs, False, True)
        means = bias_means[i] if bias_means is not None else None
        pruned = _finish_layer(w, i, layer, plan.keep_kv[i], plan.keep_mlp[i], st, hs or [], means)
        if hs is not None:
            hs = pruned if pruned is not None else outs
        del layer
        trim()


def _start(source, sink, method: Method, ctx: Context, cfg: EngineConfig, scorer=None):
    """The loop's state, the layer-0 inputs (when anything needs them) and whether one pass suffices."""
    if cfg.propagate not in ("dense", "pruned"):
        raise EdgepruneError(f"--opt stream_propagate={cfg.propagate}: use dense or pruned")
    groups = source.groups()
    scorer = scorer or make_scorer(method, ctx, source)
    ratios = per_layer_ratios(cfg.allocation, groups, cfg.alloc) if cfg.alloc is not None else None
    w = _Walk(source, sink, scorer, cfg, groups, ratios=ratios)
    # surgery runs on the CPU: a resident model on an accelerator is scored first, then moved (two passes)
    one_pass = (ratios is not None and not scorer.deferred and cfg.stage is None
                and (source.streamed or source.device.type == "cpu"))
    extra = cfg.repair is not None or cfg.stage is not None or cfg.propagate == "pruned" or bool(cfg.hooks)
    forward2 = not one_pass and extra
    ids_needed = scorer.needs_inputs or extra
    w.keep_stats = scorer.deferred or (not one_pass and cfg.repair is not None)
    if ids_needed:
        w.hs, w.kwargs = source.inputs(ctx.calib_ids, ctx.batch_size)   # frees a streamed source's embeddings
    else:
        source.drop_embeddings()
    if sink is not None:
        sink.begin()
    return w, ids_needed, one_pass, forward2


def _scores(w: _Walk, method: Method) -> Scores:
    if w.scorer.deferred:
        return w.scorer.score_all(w.stats)
    return Scores(w.attn, w.mlp, standardized=method.standardized,
                  bias_means=w.means if any(x is not None for x in w.means) else None, info=w.scorer.info())


def run(source, sink, method: Method, ctx: Context, cfg: EngineConfig) -> EngineResult:
    """Prune every layer of ``source`` into ``sink`` (see the module docstring); returns the plan and scores."""
    t0 = time.time()
    w, ids_needed, one_pass, forward2 = _start(source, sink, method, ctx, cfg)
    hs0 = list(w.hs) if forward2 else None
    with torch.no_grad():
        _pass1(w, ids_needed, one_pass)
    t1 = time.time()
    scores = _scores(w, method)
    if one_pass:
        plan = Plan(w.keep_kv, w.keep_mlp, {"layer_ratios": w.ratios, "allocation": cfg.allocation})
    else:
        to_cpu_scores(scores)
        source.prepare_surgery()
        if not source.streamed:
            ctx.calib_ids = ctx.calib_ids.cpu()
        plan = allocate(cfg.allocation, scores, w.groups, cfg.alloc, None if source.streamed else ctx)
        with torch.no_grad():
            _pass2(w, plan, hs0, scores.bias_means)
    return EngineResult(plan, scores, 1 if one_pass else 2,
                        {"score_s": round(t1 - t0, 2), "allocate_apply_s": round(time.time() - t1, 2)})


def score(method: Method, model, ctx: Context) -> Scores:
    """Dense scores of a resident model (pass 1 of the loop, nothing pruned): the scoring half of :func:`run`,
    to be allocated (:func:`edgeprune.allocation.allocate`) for as many ratios as needed."""
    w, ids_needed, _, _ = _start(ResidentSource(model), None, method, ctx,
                                 EngineConfig(allocation="", alloc=None, progress=ctx.progress))
    w.keep_stats = True
    with torch.no_grad():
        _pass1(w, ids_needed, False)
    if method.needs_calibration and ctx.stats is None:
        ctx.stats = w.stats   # shared with later scorings on the same context
    return _scores(w, method)


def apply(source, sink, plan: Plan, ctx: Context, cfg: EngineConfig, bias_means=None) -> None:
    """Pass 2 of the loop alone: prune every layer of ``source`` by a given ``plan`` (e.g. one allocation of a
    planner's scoring, :class:`edgeprune.prune.Scored`) into ``sink``. Surgery with ``bias_means``, or
    ``cfg.stage`` / ``cfg.repair`` / ``propagate="pruned"`` from the layer-0 inputs of ``ctx.calib_ids`` -- the
    same steps, in the same order, as :func:`run`'s second pass."""
    scorer = _StatsOnly(None, None)
    scorer.needs_inputs = False   # layer-0 inputs only when a stage, repair or propagation needs them
    cfg = EngineConfig(allocation=cfg.allocation, alloc=None, propagate=cfg.propagate, hooks=cfg.hooks,
                       repair=cfg.repair, stage=cfg.stage, progress=cfg.progress)
    w, _, _, _ = _start(source, sink, Method(), ctx, cfg, scorer=scorer)
    hs0, w.hs = w.hs, None
    w.stats = [None] * len(w.groups)
    source.prepare_surgery()
    with torch.no_grad():
        _pass2(w, plan, hs0, bias_means)


def apply_stage(model, plan: Plan, ids: torch.Tensor, stage, batch_size: int = 16, progress: bool = False) -> None:
    """Apply ``plan`` to a resident model through a layer ``stage`` (e.g. :class:`edgeprune.repair.RepairStage`),
    layer by layer from the layer-0 inputs of ``ids`` (pass 2 of the loop alone)."""
    ctx = Context(model=model, calib_ids=ids, batch_size=batch_size, progress=progress)
    cfg = EngineConfig(allocation="", alloc=None, stage=stage, progress=progress)
    w, _, _, _ = _start(ResidentSource(model), ResidentSink(None, None), Method(), ctx, cfg,
                        scorer=_StatsOnly(None, None))
    hs, w.hs = w.hs, None
    with torch.no_grad():
        _stage_pass(w, plan, hs)


class _StatsOnly:
    """A scorer that only collects statistics (for :func:`collect`)."""

    deferred, needs_inputs = False, True

    def __init__(self, extra: Collector | None, on_layer):
        self.extra, self.on_layer = extra, on_layer

    def hooks(self, i, layer, lg) -> list:
        return self.extra(i, layer) if self.extra is not None else []

    def score(self, i, layer, lg, st, hs, outs, kwargs):
        if self.on_layer is not None:
            self.on_layer(i, layer, hs, outs)
        return None


class _ForwardOnly(_StatsOnly):
    forward_only = True


def forward(source, ids: torch.Tensor, batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """The last layer's output hidden states of ``ids`` (batches of ``batch_size`` rows): pass 1 of the loop with
    no statistics, no scoring, nothing pruned (the streamed forward of :func:`edgeprune.stream.streamed_perplexity`)."""
    ctx = Context(model=None, calib_ids=ids, batch_size=batch_size, progress=progress)
    cfg = EngineConfig(allocation="", alloc=None, progress=progress)
    w, _, _, _ = _start(source, None, Method(), ctx, cfg, scorer=_ForwardOnly(None, None))
    out = []
    w.scorer.on_layer = lambda i, layer, hin, hout: out.extend(hout) if i == len(w.groups) - 1 else None
    with torch.no_grad():
        _pass1(w, True, False)
    return out


def collect(model, ids: torch.Tensor, batch_size: int = 16, extra: Collector | None = None,
            on_layer: Callable[[int, nn.Module, list, list], None] | None = None,
            progress: bool = False) -> list[LayerStats]:
    """Dense per-layer :class:`~edgeprune.calibrate.LayerStats` of a resident model (pass 1 of the loop).
    ``extra(i, layer)`` may register more hooks; ``on_layer(i, layer, inputs, outputs)`` sees each layer's hidden
    states."""
    ctx = Context(model=model, calib_ids=ids, batch_size=batch_size, progress=progress)
    cfg = EngineConfig(allocation="", alloc=None, progress=progress)
    w, _, _, _ = _start(ResidentSource(model), None, Method(), ctx, cfg, scorer=_StatsOnly(extra, on_layer))
    w.keep_stats = True
    with torch.no_grad():
        _pass1(w, True, False)
    return w.stats


def to_cpu_scores(scores: Scores) -> None:
    scores.attn = [s.detach().double().cpu() for s in scores.attn]
    scores.mlp = [s.detach().double().cpu() for s in scores.mlp]
    if scores.bias_means is not None:
        scores.bias_means = [{k: v.cpu() for k, v in d.items()} if d is not None else None
                             for d in scores.bias_means]


def cpu_stats(st: LayerStats) -> LayerStats:
    for cs in (st.o_in, st.down_in, st.attn_in, st.mlp_in):
        for f in ("mean", "m2", "sq"):
            v = getattr(cs, f)
            if isinstance(v, torch.Tensor):
                setattr(cs, f, v.cpu())
    return st
