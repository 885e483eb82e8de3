"""Engine: surgery, format, calibration statistics, allocators, baseline scores (tiny random models)."""
import json

import pytest
import torch

from edgeprune import models as M
from edgeprune import surgery as S
from edgeprune import testing as T
from edgeprune.allocation import AllocOptions, allocate
from edgeprune.calibrate import ChannelStats
from edgeprune.engine import collect
from edgeprune.groups import Plan, model_groups, plan_params
from edgeprune.engine import score
from edgeprune.importance import Context, get_method

KINDS = [("gqa", False, False), ("mha", True, True), ("qwen2", False, False), ("mistral", False, True)]


@pytest.mark.parametrize("kind,bias,tied", KINDS)
def test_surgery_equals_masking_and_reload_is_exact(tmp_path, kind, bias, tied):
    m, ref = T.tiny_model(kind, bias, tied), T.tiny_model(kind, bias, tied)
    plan = T.random_plan(m, seed=3)
    S.apply_plan(m, plan)
    S.mask_plan(ref, plan)
    ids = torch.randint(0, 128, (2, 16))
    out = m(ids).logits
    assert (out - ref(ids).logits).abs().max() < 1e-5
    shapes = M.layer_shapes(m)
    assert not M.is_uniform(shapes)
    d = T.save_tiny(m, tmp_path / "p")
    cfg = json.loads((d / "config.json").read_text())
    assert [s["num_key_value_heads"] for s in cfg["pruning"]["per_layer"]] == [s.num_key_value_heads for s in shapes]
    m2 = M.load(d)
    assert torch.equal(m2(ids).logits, out)
    # generation with the KV cache equals generation without it on per-layer shapes
    g1 = m2.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    g2 = m2.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


def test_uniform_result_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = T.tiny_model("gqa")
    g = model_groups(m)
    plan = Plan([[0] * 0 + [1] for _ in g], [list(range(0, 96, 2)) for _ in g])
    S.apply_plan(m, plan)
    d = T.save_tiny(m, tmp_path / "u")
    plain = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(plain(ids).logits, m(ids).logits)


def test_param_accounting_matches_modules():
    m = T.tiny_model("qwen2")
    g = model_groups(m)
    total0, non0 = M.count_params(m)
    plan = T.random_plan(m, seed=1)
    other = non0 - plan_params(g, [(lg.n_kv, lg.n_mlp) for lg in g])
    S.apply_plan(m, plan)
    assert M.count_params(m)[1] == other + plan_params(g, plan.kept_counts())


def test_channel_stats_match_direct():
    torch.manual_seed(0)
    xs = [torch.randn(3, 7, 5) * (i + 1) + i for i in range(4)]
    st = ChannelStats()
    for x in xs:
        st.update(x)
    allx = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    assert torch.allclose(st.mean, allx.mean(0))
    assert torch.allclose(st.var, allx.var(0))
    assert torch.allclose(st.norm, allx.norm(dim=0))


def test_layerwise_calibration_equals_full_forward():
    m = T.tiny_model("gqa")
    ids = torch.randint(0, 128, (6, 16))
    outs = {}
    collect(m, ids, batch_size=4, on_layer=lambda i, layer, hin, hout: outs.__setitem__(i, torch.cat(hout)),
            progress=False)
    hs = m(ids, output_hidden_states=True).hidden_states
    for i in range(len(m.model.layers) - 1):
        assert torch.allclose(outs[i], hs[i + 1], atol=1e-5)


def _ctx(m):
    return Context(model=m, calib_ids=torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)),
                   progress=False)


@pytest.mark.parametrize("alloc", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_allocators_meet_target_and_constraints(alloc, ratio):
    m = T.tiny_model("gqa", layers=6, heads=8, ffn=256, hidden=64)
    ctx = _ctx(m)
    scores = score(get_method("wanda-sp"), m, ctx)
    g = model_groups(m)
    _, non = M.count_params(m)
    opts = AllocOptions(ratio=ratio, nonemb_params=non, skip_first=1, skip_last=1, multiple=8)
    plan = allocate(alloc, scores, g, opts)
    other = non - plan_params(g, [(lg.n_kv, lg.n_mlp) for lg in g])
    achieved = 1 - (other + plan_params(g, plan.kept_counts())) / non
    assert abs(achieved - ratio) < 0.03
    assert plan.kept_counts()[0] == (g[0].n_kv, g[0].n_mlp) and plan.kept_counts()[-1] == (g[-1].n_kv, g[-1].n_mlp)
    for (k, c), lg in zip(plan.kept_counts(), g):
        assert k >= 1 and c % 8 == 0 and c >= 8
    # the kept groups are the top-scored ones within each layer
    if alloc == "uniform":
        for i, keep in enumerate(plan.keep_mlp):
            drop = sorted(set(range(g[i].n_mlp)) - set(keep))
            if drop:
                assert scores.mlp[i][keep].min() >= scores.mlp[i][drop].max()


def test_wanda_sp_and_flap_scores_follow_their_formulas():
    m = T.tiny_model("mha")
    ctx = _ctx(m)
    st = collect(m, ctx.calib_ids, ctx.batch_size)[1]
    w = m.model.layers[1].mlp.down_proj.weight.double()
    wanda = score(get_method("wanda-sp"), m, ctx)
    assert torch.allclose(wanda.mlp[1], w.abs().mean(0) * st.down_in.norm)
    flap = score(get_method("flap"), m, ctx)
    s = st.down_in.var * (w ** 2).sum(0)
    assert torch.allclose(flap.mlp[1], (s - s.mean()) / s.std(), atol=1e-6)
    assert flap.standardized and flap.bias_means is not None


def test_flap_bias_compensation_preserves_mean_contribution():
    m = T.tiny_model("gqa")
    lin = m.model.layers[0].mlp.down_proj
    w = lin.weight.detach().clone()
    mean = torch.randn(lin.in_features)
    g = model_groups(m)
    keep = list(range(0, g[0].n_mlp, 3))
    plan = Plan([list(range(lg.n_kv)) for lg in g], [keep] + [list(range(lg.n_mlp)) for lg in g[1:]])
    S.apply_plan(m, plan, [{"down": mean}] + [None] * (len(g) - 1))
    new = m.model.layers[0].mlp.down_proj
    removed = [j for j in range(w.shape[1]) if j not in keep]
    assert torch.allclose(new.bias, w[:, removed] @ mean[removed], atol=1e-5)
    # an input whose removed channels sit at their mean gives the same output as before
    x = torch.randn(5, w.shape[1])
    x[:, removed] = mean[removed]
    assert torch.allclose(new(x[:, keep]), x @ w.T, atol=1e-5)


def test_llm_pruner_taylor_uses_gradients():
    m = T.tiny_model("gqa")
    ctx = _ctx(m)
    for kind in ("vectorize", "param_first", "param_second"):
        ctx.options["taylor"] = kind
        s = score(get_method("llm-pruner"), m, ctx)
        assert all(torch.isfinite(a).all() and a.abs().sum() > 0 for a in s.attn)
    assert all(p.grad is None for p in m.parameters())


def test_unknown_method_and_allocation():
    from edgeprune.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match="unknown method"):
        get_method("nope")
    m = T.tiny_model("gqa")
    with pytest.raises(EdgepruneError, match="unknown allocation"):
        allocate("nope", None, model_groups(m), AllocOptions(0.2, 1))


def test_blockwise_channel_reductions_match_whole_matrix():
    """per_channel / ChannelStats work on float64 blocks of a matrix (several blocks here) and must give what the
    whole-matrix float64 reduction gives, without writing the weights (even float64 ones)."""
    from edgeprune.numerics import BLOCK_ELEMS, block_len, per_channel

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 3 * BLOCK_ELEMS // 64 + 40, generator=g) * 0.02).bfloat16()
    assert w.shape[1] > 2 * block_len(w.shape[0])
    w64 = w.double()
    assert torch.equal(per_channel(w, lambda b: b.abs_().mean(0), 1), w64.abs().mean(0))
    assert torch.equal(per_channel(w, lambda b: b.norm(dim=0), 1), w64.norm(dim=0))
    wt = w.T.contiguous()
    assert torch.equal(per_channel(wt, lambda b: (b ** 2).sum(1), 0), (wt.double() ** 2).sum(1))
    before = w64.clone()
    assert torch.equal(per_channel(w64, lambda b: b.abs_().sum(0), 1), before.abs().sum(0))
    assert torch.equal(w64, before)
    st = ChannelStats()
    x = w.reshape(2, 32, -1)
    st.update(x)
    st.update(x[:, :5] * 2)
    allx = torch.cat([x.reshape(-1, x.shape[-1]), (x[:, :5] * 2).reshape(-1, x.shape[-1])]).double()
    assert torch.allclose(st.mean, allx.mean(0)) and torch.allclose(st.var, allx.var(0))
    assert torch.allclose(st.norm, allx.norm(dim=0))


def test_surgery_allocates_only_the_kept_weights():
    """take_linear builds the new Linear around the selected rows/columns (no initialised matrix copied into) and keeps
    no reference to the old weight, so the old matrix is freed as soon as the layer drops it."""
    import weakref

    lin = torch.nn.Linear(16, 8, bias=True)
    rows = torch.tensor([0, 3, 5])
    old = weakref.ref(lin.weight)
    new = S.take_linear(lin, rows=rows)
    assert torch.equal(new.weight, lin.weight[rows]) and torch.equal(new.bias, lin.bias[rows])
    assert new.weight.data_ptr() != lin.weight.data_ptr() and new.bias.data_ptr() != lin.bias.data_ptr()
    del lin
    assert old() is None
