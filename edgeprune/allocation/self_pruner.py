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

Options (``--opt``): ``population`` 30, ``n_crossover`` 10, ``n_mutation`` 10, ``generations`` 20 (the paper's),
``backend`` auto|ga|llama-cpp|openai (+ ``llm_*``, see :mod:`edgeprune.self_pruner.backends`), ``crossover``
uniform|blend, ``mutation_sigma``, ``init_sigma``, ``seed_uniform``, ``log`` (JSONL path; resumes if it exists),
``fitness_source``, ``fitness_samples`` (16), ``fitness_len`` (128), ``p_min``, ``p_max``.
"""
from __future__ import annotations

import copy
import time

import torch

from ..errors import EdgepruneError
from ..evaluate import perplexity_ids
from ..groups import Plan
from ..self_pruner import SearchConfig, Space, make_backend, search
from ..surgery import apply_plan
from .base import AllocOptions, per_layer_plan, uniform_layer_ratio


def fitness_ids(ctx, opts: dict) -> tuple[torch.Tensor, str]:
    n, L = int(opts.get("fitness_samples", 16)), int(opts.get("fitness_len", 128))
    src = opts.get("fitness_source", "gutenberg")
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
    ex = opts.extra
    idx = opts.prunable(len(groups))
    beta = uniform_layer_ratio(groups, opts)[idx[0]]
    P = [float(groups[i].n_kv * groups[i].attn_group_params + groups[i].n_mlp * groups[i].mlp_group_params) for i in idx]
    space = Space(len(idx), beta, float(ex.get("p_min", 0.0)), max(float(ex.get("p_max", 0.8)), beta),
                  tuple(p / sum(P) for p in P))
    ids, fit_desc = fitness_ids(ctx, ex)
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

    cfg = SearchConfig(population=int(ex.get("population", 30)), n_crossover=int(ex.get("n_crossover", 10)),
                       n_mutation=int(ex.get("n_mutation", 10)), generations=int(ex.get("generations", 20)),
                       seed=ctx.seed, log=ex.get("log"))
    try:
        backend = make_backend(ex, ctx.seed, f"{getattr(ctx.model.config, 'model_type', 'llama')} with {len(groups)} "
                                             f"decoder layers ({len(idx)} prunable)")
    except ValueError as e:   # a misconfigured backend is bad input (exit 2), not an internal error
        raise EdgepruneError(f"self-pruner --opt: {e}; fix the --opt values") from None
    t = time.time()
    search_fitness, ray_info = fitness, None
    if ex.get("ray"):   # distributed fitness evaluations (edgeprune.distributed): same function, one task each
        from ..distributed import PrefetchBackend, RayEvaluator

        search_fitness = RayEvaluator(fitness, str(ex["ray"]), int(ex.get("ray_retries", 3)),
                                      int(ex["ray_cpus"]) if ex.get("ray_cpus") else None)
        backend = PrefetchBackend(backend, search_fitness)
        ray_info = {"address": str(ex["ray"])}
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
