"""Self-Pruner's evolutionary search over layer-wise pruning rates (arXiv 2502.14413; shared docs methods.md §6).

Verified: the variable is the vector of layer rates p = (p_1..p_n) with mean equal to the target β; an LLM
generates the initial population, selects parents and produces offspring by crossover and mutation; fitness is
perplexity; population 30, 10 mutation + 10 crossover offspring, at most 20 iterations [S].

Ours [R]: the constraint is a *weighted* mean ``Σ_i w_i p_i = β`` with ``w_i = P_i / Σ P`` (P_i: prunable
parameters of layer i), so it is exactly the parameter budget that ``per_layer_plan`` removes (plain mean when all
layers have the same size); every proposal is repaired (:func:`repair`: clip to [p_min, p_max], then a common
shift found by bisection); survivors are the best ``population`` of parents ∪ children (elitist truncation, so the
best fitness never worsens); duplicate vectors reuse their cached fitness; the random generator of every
(generation, operator) step is derived from (seed, generation, operator), so a replay from the log continues
exactly as the uninterrupted run would.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

OPS = ("init", "crossover", "mutation")


@dataclass(frozen=True)
class Space:
    """Search space: ``n`` layer rates, weighted mean ``beta`` (weights ``w`` sum to 1), bounds [lo, hi]."""

    n: int
    beta: float
    lo: float
    hi: float
    w: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.w:
            object.__setattr__(self, "w", tuple([1.0 / self.n] * self.n))
        if not (self.lo - 1e-12 <= self.beta <= self.hi + 1e-12):
            raise ValueError(f"target rate {self.beta:.4f} lies outside the bounds [{self.lo}, {self.hi}]")

    def mean(self, p) -> float:
        return float(np.dot(self.w, p))

    def feasible(self, p, tol: float = 1e-6) -> bool:
        p = np.asarray(p, dtype=float)
        return (len(p) == self.n and np.all(np.isfinite(p)) and abs(self.mean(p) - self.beta) < tol
                and p.min() >= self.lo - 1e-12 and p.max() <= self.hi + 1e-12)


def repair(p, space: Space) -> list[float]:
    """Closest-by-shift feasible vector: ``clip(p + t, lo, hi)`` with t such that the weighted mean is β."""
    p = np.asarray(p, dtype=float)
    p = np.where(np.isfinite(p), p, space.beta)
    w = np.asarray(space.w)
    f = lambda t: float(np.dot(w, np.clip(p + t, space.lo, space.hi))) - space.beta
    a, b = space.lo - p.max() - 1.0, space.hi - p.min() + 1.0
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if f(mid) < 0 else (a, mid)
    q = np.clip(p + (a + b) / 2, space.lo, space.hi)
    free = (q > space.lo + 1e-12) & (q < space.hi - 1e-12)   # close the last float residual on free entries
    if free.any():
        q[free] += (space.beta - float(np.dot(w, q))) / float(w[free].sum())
        q = np.clip(q, space.lo, space.hi)
    return [float(x) for x in q]


# ----------------------------------------------------------------------------------- classical GA operators
def tournament(fits: list[float], rng: np.random.Generator, k: int = 3) -> int:
    idx = rng.choice(len(fits), size=min(k, len(fits)), replace=False)
    return int(min(idx, key=lambda i: (fits[i], i)))


def crossover(a, b, rng: np.random.Generator, kind: str = "uniform", alpha: float = 0.5) -> list[float]:
    a, b = np.asarray(a), np.asarray(b)
    if kind == "uniform":
        return list(np.where(rng.random(len(a)) < 0.5, a, b))
    if kind == "blend":  # BLX-α
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        d = hi - lo
        return list(rng.uniform(lo - alpha * d, hi + alpha * d))
    raise ValueError(f"crossover {kind} unknown; use uniform or blend")


def mutate(a, rng: np.random.Generator, sigma: float = 0.05) -> list[float]:
    return list(np.asarray(a) + rng.normal(0.0, sigma, len(a)))


# ----------------------------------------------------------------------------------------------- the search
@dataclass
class SearchConfig:
    population: int = 30
    n_crossover: int = 10
    n_mutation: int = 10
    generations: int = 20
    seed: int = 0
    log: str | None = None          # JSONL search log; an existing one is replayed (resume)


@dataclass
class Individual:
    p: list[float]
    fitness: float


@dataclass
class SearchResult:
    best: Individual
    history: list[float]            # best fitness after initialisation and after every generation
    evaluations: int                # fitness calls actually made in this process
    events: list[dict] = field(default_factory=list)


def genome_key(p) -> tuple:
    return tuple(round(float(x), 6) for x in p)


def step_rng(seed: int, gen: int, op: str) -> np.random.Generator:
    return np.random.default_rng([seed, gen, OPS.index(op)])


def search(space: Space, fitness: Callable[[list[float]], float], backend, cfg: SearchConfig,
           on_event: Callable[[dict], None] | None = None) -> SearchResult:
    """Run (or resume) the search. ``backend`` proposes raw vectors (see :mod:`.backends`); every proposal is
    repaired before evaluation. Lower fitness (perplexity) is better."""
    cache: dict[tuple, float] = {}
    replay: dict[tuple[int, str], list[list[float]]] = {}
    logp = Path(cfg.log) if cfg.log else None
    if logp and logp.exists():
        for line in logp.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from an interrupted run
            if e.get("event") == "eval":
                cache[genome_key(e["p"])] = float(e["fitness"])
            elif e.get("event") == "proposal":
                replay[(int(e["gen"]), e["op"])] = e["children"]
    fh = logp.open("a") if logp else None
    events: list[dict] = []
    n_eval = 0

    def emit(e: dict) -> None:
        events.append(e)
        if fh:
            fh.write(json.dumps(e) + "\n")
            fh.flush()
        if on_event:
            on_event(e)

    def propose(gen: int, op: str, pop: list[Individual], k: int) -> list[list[float]]:
        if (gen, op) in replay:
            return replay[(gen, op)]
        rng = step_rng(cfg.seed, gen, op)
        raw, notes = backend.propose(op, space, pop, k, rng)
        for note in notes:
            emit({"event": "backend", "gen": gen, "op": op, **note})
        kids = [repair(c, space) for c in raw][:k]
        if any(not space.feasible(c) for c in kids):  # cannot happen; guard the invariant loudly
            raise AssertionError("repair produced an infeasible vector")
        emit({"event": "proposal", "gen": gen, "op": op, "children": kids})
        return kids

    def evaluate(gen: int, kids: list[list[float]]) -> list[Individual]:
        nonlocal n_eval
        out = []
        for c in kids:
            k = genome_key(c)
            if k not in cache:
                f = float(fitness(c))
                cache[k] = f if math.isfinite(f) else float("inf")
                n_eval += 1
                emit({"event": "eval", "gen": gen, "p": c, "fitness": cache[k]})
            out.append(Individual(c, cache[k]))
        return out

    rank = lambda ind: (ind.fitness, genome_key(ind.p))
    pop = sorted(evaluate(0, propose(0, "init", [], cfg.population)), key=rank)[:cfg.population]
    history = [pop[0].fitness]
    emit({"event": "generation", "gen": 0, "best": pop[0].fitness, "best_p": pop[0].p})
    for gen in range(1, cfg.generations + 1):
        kids = propose(gen, "crossover", pop, cfg.n_crossover) + propose(gen, "mutation", pop, cfg.n_mutation)
        merged, seen = [], set()
        for ind in pop + evaluate(gen, kids):
            if genome_key(ind.p) not in seen:
                seen.add(genome_key(ind.p))
                merged.append(ind)
        pop = sorted(merged, key=rank)[:cfg.population]
        history.append(pop[0].fitness)
        emit({"event": "generation", "gen": gen, "best": pop[0].fitness, "best_p": pop[0].p})
    if fh:
        fh.close()
    return SearchResult(pop[0], history, n_eval, events)
