"""SAAP: homoscedastic-uncertainty fusion properties and importance-fluctuation layer ratios."""
import pytest
import torch

from edgeprune import testing as T
from edgeprune.allocation import AllocOptions, allocate
from edgeprune.groups import model_groups, plan_params
from edgeprune.engine import score
from edgeprune.importance import Context, get_method
from edgeprune.importance.saap import closed_sigma2, fuse, learned_sigma2
from edgeprune.models import count_params


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(seed=0, layers=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.rand(n, generator=g, dtype=torch.float64) ** 3
    return ([r(4) * 10 for _ in range(layers)], [r(32) for _ in range(layers)]), \
           ([r(4) * 3 for _ in range(layers)], [r(32) * 0.01 for _ in range(layers)])


def _order(attn, mlp):
    return torch.argsort(torch.cat(attn + mlp), stable=True)


def test_closed_form_is_scale_invariant_in_every_scope():
    vec, elem = _raw()
    for scope in ("global", "module", "layer"):
        ref = fuse(vec, elem, "closed", scope)
        for c in (1e-3, 7.3, 1e4):
            sv = ([t * c for t in vec[0]], [t * c for t in vec[1]])
            se = ([t * c for t in elem[0]], [t * c for t in elem[1]])
            for a, b in ((sv, elem), (vec, se)):
                out = fuse(a, b, "closed", scope)
                if scope == "global":  # one σ pair: the whole model keeps its order
                    assert torch.equal(_order(*out[:2]), _order(*ref[:2]))
                for x, y in zip(out[0] + out[1], ref[0] + ref[1]):  # within every layer-module
                    assert torch.equal(torch.argsort(x, stable=True), torch.argsort(y, stable=True))


def test_equal_sigmas_rank_like_the_sum_and_fused_is_nonzero():
    vec, elem = _raw(1)
    a, m, info = fuse(vec, elem, sigmas=(0.37, 0.37))
    s = ([x + y for x, y in zip(vec[0], elem[0])], [x + y for x, y in zip(vec[1], elem[1])])
    assert torch.equal(_order(a, m), _order(*s))
    assert info["sigma"] == "fixed"
    # scores are finite and nonzero wherever a raw score is nonzero (SAAP's stated motivation)
    z = ([torch.zeros(4)] * 4, [torch.zeros(32)] * 4)
    a, m, _ = fuse(vec, z)
    assert all(torch.isfinite(t).all() and (t != 0).all() for t in a + m)


def test_learned_sigma_converges_to_closed_form():
    vec, _ = _raw(2)
    blk = vec[0] + vec[1]
    assert abs(learned_sigma2(blk, steps=1500, lr=0.05) / closed_sigma2(blk) - 1) < 1e-3


def _prune_fraction(plan, groups, nonemb):
    full = plan_params(groups, [(g.n_kv, g.n_mlp) for g in groups])
    return (full - plan_params(groups, plan.kept_counts())) / nonemb


def test_saap_end_to_end_ratios_differ_and_meet_target():
    m = T.tiny_model("gqa", layers=6, heads=8, ffn=192)
    ids = torch.randint(3, 128, (8, 32))
    ctx = Context(model=m, calib_ids=ids, options={"sigma": "learned", "sigma_steps": 200}, progress=False)
    s = score(get_method("saap"), m, ctx)
    assert s.info["sigma"] == "learned" and len(s.info["sigma2"]) == 1
    groups, (_, ne) = model_groups(m), count_params(m)
    for ratio, sf, sl in ((0.2, 0, 0), (0.5, 1, 1)):
        opts = AllocOptions(ratio=ratio, nonemb_params=ne, skip_first=sf, skip_last=sl)
        plan = allocate("saap", s, groups, opts, ctx)
        r = plan.meta["layer_ratios"]
        assert abs(sum(r[i] * (g.n_kv * g.attn_group_params + g.n_mlp * g.mlp_group_params)
                       for i, g in enumerate(groups)) / ne - ratio) < 1e-9   # exact before group rounding
        assert abs(_prune_fraction(plan, groups, ne) - ratio) < 0.02          # after rounding to whole groups
        inner = r[sf:len(r) - sl]
        assert max(inner) - min(inner) > 0.02                                  # non-uniform
        assert all(r[i] == 0 for i in list(range(sf)) + list(range(len(r) - sl, len(r))))


def test_saap_allocator_accepts_any_methods_scores():
    m = T.tiny_model("mha", layers=4)
    ids = torch.randint(3, 128, (8, 32))
    groups, (_, ne) = model_groups(m), count_params(m)
    for name in ("magnitude", "flap", "wanda-sp"):
        ctx = Context(model=m, calib_ids=ids, progress=False)
        with torch.no_grad():
            s = score(get_method(name), m, ctx)
        plan = allocate("saap", s, groups, AllocOptions(ratio=0.3, nonemb_params=ne), ctx)
        assert abs(_prune_fraction(plan, groups, ne) - 0.3) < 0.03
