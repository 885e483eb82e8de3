"""Self-Pruner: constraint after every operator, reproducibility, elitism, malformed replies, resume."""
import json

import numpy as np
import pytest
import torch

from edgeprune import testing as T
from edgeprune.allocation import AllocOptions, allocate
from edgeprune.groups import model_groups, plan_params
from edgeprune.engine import score
from edgeprune.importance import Context, get_method
from edgeprune.models import count_params
from edgeprune.self_pruner import GABackend, ScriptedBackend, SearchConfig, Space, parse_reply, repair, search
from edgeprune.self_pruner.search import crossover, mutate

pytestmark = pytest.mark.usefixtures("one_thread")


SPACE = Space(6, 0.3, 0.05, 0.7, tuple(np.array([1, 1, 2, 2, 1, 1]) / 8))
GOAL = np.array(repair([0.1, 0.2, 0.3, 0.4, 0.5, 0.2], SPACE))


def fit(p):
    return 1.0 + float(((np.asarray(p) - GOAL) ** 2).sum())


def _replies():
    good = json.dumps([[0.3] * 6, [0.1, 0.2, 0.3, 0.4, 0.5, 0.2]])
    return ["```json\n" + good + "\n```", "I think [[0.3, 0.3]] is best", "not json at all", good.replace("]]", "]"),
            json.dumps([[0.2, 0.9, 0.1, 0.5, 0.3, "x"]]), TimeoutError("read timed out"), json.dumps([[5, -3, 1, 1, 1, 1]] * 3)]


def test_repair_and_every_operator_keep_the_constraint():
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = rng.normal(0.3, 0.5, 6) * rng.choice([1, 10, 1e3])
        q = repair(p, SPACE)
        assert SPACE.feasible(q)
        assert SPACE.feasible(repair(crossover(q, repair(rng.random(6), SPACE), rng, "blend"), SPACE))
        assert SPACE.feasible(repair(crossover(q, GOAL, rng, "uniform"), SPACE))
        assert SPACE.feasible(repair(mutate(q, rng, 0.2), SPACE))
    assert SPACE.feasible(repair([np.nan, np.inf, 0, 0, 0, 0], SPACE))
    with pytest.raises(ValueError):
        Space(4, 0.9, 0.0, 0.8)


def test_strict_parsing():
    assert parse_reply("```json\n[[0.1, 0.2]]\n```", 2) == [[0.1, 0.2]]
    for bad in ("[[0.1]]", "[[0.1, true]]", "[[0.1, NaN]]", "nothing", "[[0.1, 0.2]", "[]", None):
        with pytest.raises(ValueError):
            parse_reply(bad, 2)


def _run(tmp_path, name, gens, backend=None, seed=0, log=True):
    cfg = SearchConfig(population=8, n_crossover=4, n_mutation=4, generations=gens, seed=seed,
                       log=str(tmp_path / f"{name}.jsonl") if log else None)
    return search(SPACE, fit, backend or ScriptedBackend(_replies()), cfg)


def test_scripted_run_is_reproducible_elitist_and_survives_malformed(tmp_path):
    a, b = _run(tmp_path, "a", 6), _run(tmp_path, "b", 6)
    assert a.history == b.history and a.best.p == b.best.p
    strip = lambda ev: [e for e in ev if e["event"] != "backend"]
    assert strip(a.events) == strip(b.events)
    assert all(x >= y for x, y in zip(a.history, a.history[1:]))            # best never worsens
    statuses = {e["status"] for e in a.events if e["event"] == "backend"}
    assert {"ok", "malformed", "error", "fallback"} <= statuses
    for e in a.events:                                                        # constraint after every operator
        if e["event"] == "proposal":
            assert all(SPACE.feasible(c) for c in e["children"])
    assert len(a.history) == 7
    c = _run(tmp_path, "c", 6, seed=1)
    assert c.events != a.events                                               # the seed matters


def test_ga_backend_improves_and_resume_gives_the_same_result(tmp_path):
    full = _run(tmp_path, "full", 8, GABackend())
    assert full.best.fitness < fit([0.3] * 6)                                 # beats the uniform vector
    part = _run(tmp_path, "part", 3, GABackend())
    calls = {"n": 0}

    def flaky(p):  # dies in the middle of generation 5
        calls["n"] += 1
        if calls["n"] > 14:
            raise KeyboardInterrupt
        return fit(p)

    with pytest.raises(KeyboardInterrupt):
        search(SPACE, flaky, GABackend(), SearchConfig(8, 4, 4, 8, 0, str(tmp_path / "part.jsonl")))
    res = _run(tmp_path, "part", 8, GABackend())
    assert res.best.p == full.best.p and res.history == full.history
    assert part.evaluations + 14 + res.evaluations == full.evaluations       # nothing evaluated twice


def test_allocator_on_tiny_model_meets_target_and_beats_uniform(tmp_path):
    m = T.tiny_model("gqa", layers=4)
    ids = torch.randint(3, 128, (12, 32), generator=torch.Generator().manual_seed(0))
    ctx = Context(model=m, calib_ids=ids, progress=False)
    with torch.no_grad():
        s = score(get_method("wanda-sp"), m, ctx)
    g, ne = model_groups(m), count_params(m)[1]
    ex = {"population": 6, "n_crossover": 3, "n_mutation": 3, "generations": 2, "log": str(tmp_path / "s.jsonl")}
    plan = allocate("self-pruner", s, g, AllocOptions(ratio=0.3, nonemb_params=ne, extra=ex), ctx)
    sp = plan.meta["self_pruner"]
    full = plan_params(g, [(l.n_kv, l.n_mlp) for l in g])
    assert abs((full - plan_params(g, plan.kept_counts())) / ne - 0.3) < 0.03
    assert sp["best_fitness"] <= sp["uniform_fitness"] and sp["backend"] == "ga"
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), T.tiny_model("gqa", layers=4).parameters()))
