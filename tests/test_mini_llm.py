"""MINI-LLM: the SPSA estimate approaches the true gradient as Q grows; scoring is forward-only and lean."""
import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from edgeprune import testing as T
from edgeprune.importance import Context, get_method
from edgeprune.importance.mini_llm import member_linears, spsa_estimate
from edgeprune.importance.taylor import backward_grads

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _small():
    m = T.tiny_model("gqa", layers=1, hidden=16, heads=2, ffn=16, seed=1).double()
    return m, torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_spsa_cosine_with_true_gradient_rises_with_q():
    m, ids = _small()
    grads, _ = backward_grads(m, ids, batch_size=ids.shape[0])
    true = torch.cat([grads[k].reshape(-1).double() for k, _ in member_linears(m)])
    cos = []
    for q in (1, 16, 256):
        est = spsa_estimate(m, ids, eps=1e-4, n_perturb=q, seed=0, batch_size=ids.shape[0])
        g = torch.cat([est.grad(k, lin.weight.data).reshape(-1) for k, (_, lin) in enumerate(member_linears(m))])
        cos.append(float(torch.nn.functional.cosine_similarity(g, true, dim=0)))
    assert all(a < b for a, b in zip(cos, cos[1:])), cos
    assert cos[-1] > 0.3, cos   # d = 1536 weights: E[cos] ≈ sqrt(Q / (Q + d))


@pytest.mark.parametrize("perturb", ["functional", "inplace"])
def test_scoring_is_forward_only_and_restores_weights(perturb):
    m, ids = _small()
    m.float()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ctx = Context(model=m, calib_ids=ids, options={"n_perturb": 8, "perturb": perturb}, progress=False)
    with torch.no_grad():
        s = get_method("mini-llm").score(m, ctx)
    assert all(p.grad is None for p in m.parameters())
    for n, p in m.named_parameters():
        if perturb == "functional":
            assert torch.equal(p, before[n]), n                               # bit-exact: W never written
        else:
            assert (p - before[n]).abs().max() <= 1e-6 * before[n].abs().max(), n   # MeZO restore: a few ulps
    assert all(torch.isfinite(t).all() and (t >= 0).all() for t in s.attn + s.mlp)


def test_backprop_variant_scores_correlate_with_spsa():
    m, ids = _small()
    sc = {}
    for g in ("spsa", "backprop"):
        ctx = Context(model=m, calib_ids=ids, options={"n_perturb": 256, "grad": g, "eps": 1e-4, "spsa_batch": 4,
                                                       "grad_samples": 4, "grad_len": 16}, progress=False)
        sc[g] = get_method("mini-llm").score(m, ctx).mlp[0]
    rank = lambda t: torch.argsort(torch.argsort(t)).double()
    rho = float(torch.corrcoef(torch.stack([rank(sc["spsa"]), rank(sc["backprop"])]))[0, 1])
    assert rho > 0.3, rho


def _bench():
    spec = importlib.util.spec_from_file_location("bench_seed_memory", ROOT / "scripts" / "bench_seed_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.heavy
def test_peak_memory_close_to_forward_and_below_backward():
    """1B-shaped random model (2 layers), each scorer in its own subprocess (ru_maxrss)."""
    b = _bench()
    a = b.parser().parse_args(["--layers", "2", "--calib", "16", "--rows", "2", "--q", "2"])
    r = {k: b.measure(k, a) for k in ("forward", "mini-llm", "llm-pruner")}
    assert not r["mini-llm"]["grads_allocated"]
    assert r["mini-llm"]["peak_rss_mb"] <= 1.15 * r["forward"]["peak_rss_mb"], r
    assert r["llm-pruner"]["peak_rss_mb"] - r["forward"]["peak_rss_mb"] > \
        3 * max(r["mini-llm"]["peak_rss_mb"] - r["forward"]["peak_rss_mb"], 50), r
