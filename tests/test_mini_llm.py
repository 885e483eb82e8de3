"""MINI-LLM: the SPSA estimate approaches the true gradient as Q grows; scoring is forward-only and lean."""
import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from edgeprune import testing as T
from edgeprune.engine import score
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
        s = score(get_method("mini-llm"), m, ctx)
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
        sc[g] = score(get_method("mini-llm"), m, ctx).mlp[0]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_perturbation_and_salience_match_whole_matrix(dtype):
    """z, ĝ, the perturbed forward and the FMS score are made one row block at a time (several blocks here); they
    must equal the whole-matrix formulas: y = x·(W + εz)ᵀ + b, S_i = Σ_j |W_ij ĝ_ij|·x_j, S_j = Σ_i |W_ij ĝ_ij|·x_j."""
    from edgeprune.importance.mini_llm import SPSA, _blockwise_linear, fms_salience, noise, row_blocks

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4096, 600, dtype=dtype)
    w = lin.weight.data
    assert len(row_blocks(w)) >= 3
    x = torch.randn(2, 3, 4096, generator=g).to(dtype)
    with torch.no_grad():
        y = _blockwise_linear(lin, 7, 2, 1e-3)(x)
        ref = torch.nn.functional.linear(x, noise(7, 2, w).mul_(1e-3).add_(w), lin.bias)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref, **tol)
    est = SPSA([11, 12, 13], [0.5, -2.0, 1.25], 1e-3)
    gh = est.grad(4, w)
    assert gh.dtype == torch.float32 and gh.shape == w.shape
    want = sum(c * noise(s, 4, w).float() for s, c in zip(est.seeds, est.coeffs)) / 3
    torch.testing.assert_close(gh, want, rtol=1e-6, atol=1e-6)
    xs = torch.rand(4096, generator=g, dtype=torch.float64)
    s_full = (w.double() * gh.double()).abs() * xs[None, :]
    for dim in (0, 1):
        got = fms_salience(w, est.grad_blocks(4, w), xs, dim)
        torch.testing.assert_close(got, s_full.sum(1 - dim), rtol=1e-12, atol=0)
