"""Self-Pruner allocation: search the layer-wise rates with :mod:`edgeprune.self_pruner`, using any method's
dense scores (computed once) to choose *which* groups each layer keeps.

Fitness [R: the paper uses WikiText-2 ppl; we never search on an evaluation text]: perplexity of the physically
pruned model (``deepcopy`` of the dense model + :func:`~edgeprune.surgery.apply_plan`, with the method's bias
compensation if it has one) on ``fitness_samples`` × ``fitness_len`` tokens drawn from ``fitness_source``
(default ``gutenberg``, whose held-back evaluation text is excluded) with seed ``seed + 1`` — windows apart from
the calibration windows of seed ``seed``. Falls back to the last quarter of the calibration rows when the
model has no tokenizer on disk.

Rates: ``p_i`` for every non-skipped layer; ``β`` = the uniform rate that meets the parameter target over those
layers; constraint ``Σ w_i p_i = β`` with ``w_i`` ∝ the layer's prunable parameters (so the budget is exactly
what :func:`per_layer_plan` removes, up to whole groups); bounds ``p_min`` (0.0) and ``p_max`` (0.8).

Options (``--opt``): :class:`Options` (search sizes, the paper's by default: population 30, 10 + 10 offspring,
20 generations; fitness text; bounds; log; Ray) and the proposal backend's
:class:`~edgeprune.self_pruner.backends.BackendOptions`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..errors import EdgepruneError
from ..evaluate import perplexity_ids
from ..groups import Plan
from ..self_pruner import BackendOptions, SearchConfig, Space, make_backend, search
from ..surgery import apply_plan
from ..typed_options import TypedOptions, option
from .base import AllocOptions, per_layer_plan, uniform_layer_ratio


@dataclass(frozen=True)
class Options(TypedOptions):
    """The self-pruner allocation's ``--opt`` options (search, fitness text, Ray); its proposal backend's are
    :class:`~edgeprune.self_pruner.backends.BackendOptions`."""

    OWNER = "the self-pruner allocation"
    p_min: float = option(0.0, lo=0.0, hi=1.0, doc="least removal rate of a prunable layer")
    p_max: float = option(0.8, lo=0.0, hi=1.0, doc="largest removal rate (raised to the uniform rate if below)")
    population: int = option(30, lo=1, doc="individuals kept per generation")
    n_crossover: int = option(10, lo=0, doc="crossover children per generation")
    n_mutation: int = option(10, lo=0, doc="mutation children per generation")
    generations: int = option(20, lo=0, doc="generations after the initial population")
    log: str = option("", doc="JSONL search log (an existing one is replayed: resume)")
    fitness_source: str = option("gutenberg", doc="text of the fitness perplexity (a corpus name or a file)")
    fitness_samples: int = option(16, lo=1, doc="rows of the fitness text")
    fitness_len: int = option(128, lo=2, doc="tokens per row of the fitness text")
    ray: str = option("", doc="Ray address for the fitness evaluations (as --ray)")
    ray_retries: int = option(3, lo=0, doc="retries of a failed Ray fitness task")
    ray_cpus: int = option(0, lo=0, doc="CPUs of a local Ray instance (0: Ray's default)")

    def __post_init__(self):
        if self.p_min > self.p_max:
            raise EdgepruneError(f"--opt p_min={self.p_min} is above p_max={self.p_max}; give "
                                 "0 <= p_min <= p_max <= 1")


OPTIONS = (Options, BackendOptions)


def fitness_ids(ctx, o: Options) -> tuple[torch.Tensor, str]:
    n, L, src = o.fitness_samples, o.fitness_len, o.fitness_source
    path = getattr(ctx.model, "name_or_path", "") or ""
    try:
        from ..data import calibration_ids
        from ..models import load_tokenizer

        tok = load_tokenizer(path)
        return calibration_ids(tok, src, n, L, ctx.seed + 1), f"{src}: {n} x {L} tokens, seed {ctx.seed + 1}"
    except Exception:  # noqa: BLE001 — in-memory models (tests) have no tokenizer: hold apart calibration rows
        ids = ctx.calib_ids[-max(1, ctx.calib_ids.shape[0] // 4):]
        return ids, f"last {ids.shape[0]} calibration rows"


def allocate(scores, groups, opts: AllocOptions, ctx=None) -> Plan:
    if ctx is None:
        raise EdgepruneError("the self-pruner allocation needs the dense model (importance context)")
    ex, o = opts.extra, Options.parse(opts.extra)
    idx = opts.prunable(len(groups))
    beta = uniform_layer_ratio(groups, opts)[idx[0]]
    P = [opts.layer_cost(i, groups[i]) for i in idx]    # parameters, or bytes / ms in cost-aware mode
    space = Space(len(idx), beta, o.p_min, max(o.p_max, beta), tuple(p / sum(P) for p in P))
    ids, fit_desc = fitness_ids(ctx, o)
    seq = ids.shape[1]
    flat = ids.reshape(-1)

    def to_ratios(p):
        r = [0.0] * len(groups)
        for i, v in zip(idx, p):
            r[i] = v
        return r

    def fitness(p) -> float:
        plan = per_layer_plan(scores.attn, scores.mlp, groups, to_ratios(p), opts)
        m = copy.deepcopy(ctx.model)
        apply_plan(m, plan, scores.bias_means)
        return perplexity_ids(m, flat, seq_len=seq)

    cfg = SearchConfig(population=o.population, n_crossover=o.n_crossover, n_mutation=o.n_mutation,
                       generations=o.generations, seed=ctx.seed, log=o.log or None)
    try:
        backend = make_backend(ex, ctx.seed, f"{getattr(ctx.model.config, 'model_type', 'llama')} with {len(groups)} "
                                             f"decoder layers ({len(idx)} prunable)")
    except ValueError as e:   # a misconfigured backend is bad input (exit 2), not an internal error
        raise EdgepruneError(f"self-pruner --opt: {e}; fix the --opt values") from None
    t = time.time()
    search_fitness, ray_info = fitness, None
    if o.ray:   # distributed fitness evaluations (edgeprune.distributed): same function, one task each
        from ..distributed import PrefetchBackend, RayEvaluator

        search_fitness = RayEvaluator(fitness, o.ray, o.ray_retries, o.ray_cpus or None)
        backend = PrefetchBackend(backend, search_fitness)
        ray_info = {"address": o.ray}
    res = search(space, search_fitness, backend, cfg)
    if ray_info is not None:
        ray_info["tasks"] = search_fitness.submitted
    uni = fitness([beta] * len(idx))  # cached by the search when seed_uniform; cheap otherwise
    ratios = to_ratios(res.best.p)
    plan = per_layer_plan(scores.attn, scores.mlp, groups, ratios, opts)
    plan.meta.update({"layer_ratios": ratios, "self_pruner": {
        "backend": backend.name, "best_fitness": res.best.fitness, "uniform_fitness": uni, "history": res.history,
        "evaluations": res.evaluations, "fitness": f"ppl of the physically pruned model on {fit_desc}",
        "population": cfg.population, "offspring": [cfg.n_crossover, cfg.n_mutation], "generations": cfg.generations,
        "bounds": [space.lo, space.hi], "beta": beta, "search_s": round(time.time() - t, 1),
        "malformed": sum(1 for e in res.events if e.get("status") in ("malformed", "error")), "ray": ray_info}})
    return plan
