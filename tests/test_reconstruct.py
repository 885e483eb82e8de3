"""Numerics of edgeprune.reconstruct: least-squares / OBS refit of a projection on its kept input columns."""
import math
import warnings

import pytest
import torch

from edgeprune.reconstruct import (Gram, RefitStats, ReconstructionWarning, lsq_fit, obs_order, obs_remove,
                                   reconstruct)


def _data(d_in=24, d_out=10, n=400, seed=0, corr=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if corr:   # correlated inputs with a non-zero mean, as activations are
        x = x @ (torch.eye(d_in, dtype=torch.float64) + 0.5 * torch.randn(d_in, d_in, generator=g,
                                                                       dtype=torch.float64)) + 0.3
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return x, w


def _gram(x, chunks=3):
    gr = Gram()
    for xs in x.chunk(chunks):
        gr.update(xs)
    return gr


def _stats(x, w, keep, t=None, r=None, chunks=3, full=False):
    st = RefitStats(w, keep, full=full)
    n = len(x)
    for part in torch.arange(n).chunk(chunks):
        st.update(x[part], None if t is None else t[part], None if r is None else r[part])
    return st


def _calib_error(w, x, t, ws, b, keep, r=None):
    out = x[:, keep] @ ws.T.double() + (0 if b is None else b.double())
    y = t @ w.T + (0 if r is None else r)
    return float(((y - out) ** 2).sum())


def _closed_form(x, y, keep, lam, prior, intercept):
    """Independent: ridge regression of the targets ``y`` on the kept inputs via lstsq of an augmented system,
    the damping pulling toward ``prior`` (the original kept weights)."""
    xs = x[:, keep]
    feats = torch.cat([xs, torch.ones(len(x), 1, dtype=torch.float64)], 1) if intercept else xs
    reg = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
    reg[:len(keep), :len(keep)] = lam ** 0.5 * torch.eye(len(keep), dtype=torch.float64)
    a = torch.cat([feats, reg], 0)
    pr = torch.zeros(feats.shape[1], y.shape[1], dtype=torch.float64)
    pr[:len(keep)] = lam ** 0.5 * prior.T
    return torch.linalg.lstsq(a, torch.cat([y, pr], 0)).solution.T


@pytest.mark.parametrize("intercept", [False, True])
def test_lsq_equals_independent_closed_form(intercept):
    x, w = _data()
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11, 13, 17, 20, 21, 23])
    damp = 1e-3
    fit = lsq_fit(_stats(x, w, keep), damp=damp, intercept=intercept)
    lam = damp * float((x[:, keep] ** 2).sum(0).mean())
    sol = _closed_form(x, x @ w.T, keep, lam, w[:, keep], intercept)
    torch.testing.assert_close(fit.weight, sol[:, :len(keep)], rtol=1e-8, atol=1e-9)
    if intercept:
        torch.testing.assert_close(fit.bias, sol[:, len(keep)], rtol=1e-8, atol=1e-9)
    else:
        assert fit.bias is None
    # the error from the normal equations equals the direct one
    assert fit.error == pytest.approx(_calib_error(w, x, x, fit.weight, fit.bias, keep), rel=1e-9)


def test_all_columns_kept_returns_original_weights():
    x, w = _data()
    keep = torch.arange(w.shape[1])
    r0 = reconstruct(_stats(x, w, keep), "lsq", damp=0.0)
    torch.testing.assert_close(r0.weight, w, rtol=1e-7, atol=1e-7)
    assert r0.bias is None or float(r0.bias.abs().max()) < 1e-7
    for intercept in (False, True):   # the damping pulls toward W: exact at any damping
        for damp in (0.0, 1e-2, 1.0):
            fit = lsq_fit(_stats(x, w, keep), damp=damp, intercept=intercept, inplace=True)
            torch.testing.assert_close(fit.weight, w, rtol=1e-7, atol=1e-7)
            assert fit.bias is None or float(fit.bias.abs().max()) < 1e-7


@pytest.mark.parametrize("mode", ["bias", "lsq", "obs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_never_increases_calibration_error(mode, seed):
    x, w = _data(seed=seed)
    keep = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))[:9].sort().values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReconstructionWarning)
        r = reconstruct(_stats(x, w, keep, full=mode == "obs"), mode)
    e_none = _calib_error(w, x, x, w[:, keep], None, keep)
    e = _calib_error(w, x, x, r.weight, r.bias, keep)
    assert e <= e_none * (1 + 1e-9)
    assert r.error <= r.error_none + 1e-12
    assert r.error_none == pytest.approx(e_none / float(((x @ w.T) ** 2).sum()), rel=1e-9)
    if mode in ("lsq", "obs"):
        assert e < 0.9 * e_none        # and here it actually buys something
        assert r.mode == mode


def test_moment_error_matches_direct_error():
    x, w = _data(seed=3)
    keep = torch.tensor([1, 4, 6, 7, 10, 15, 22])
    for mode in ("bias", "lsq", "obs"):
        r = reconstruct(_stats(x, w, keep, full=True), mode)
        direct = _calib_error(w, x, x, r.weight, r.bias, keep) / float(((x @ w.T) ** 2).sum())
        assert r.error == pytest.approx(direct, rel=1e-9), mode


def test_obs_updates_end_at_the_lsq_solution():
    x, w = _data(seed=4)
    removed = [torch.tensor([3, 4]), torch.tensor([10]), torch.tensor([17, 18, 19])]
    keep = torch.tensor(sorted(set(range(w.shape[1])) - {3, 4, 10, 17, 18, 19}))
    full = obs_remove(w, _gram(x), removed, damp=1e-2)
    # OBS damps the full H once (λ = 0.01 mean diag H); lsq damps H_SS by its own mean diagonal: give lsq the
    # same absolute λ through its relative damping
    h = x.T @ x
    lam = 1e-2 * float(h.diagonal().mean())
    fit = lsq_fit(_stats(x, w, keep), damp=lam / float(h[keep, keep].mean()), intercept=False)
    torch.testing.assert_close(full[:, keep], fit.weight, rtol=1e-7, atol=1e-8)
    assert float(full[:, [3, 4, 10, 17, 18, 19]].abs().max()) == 0
    # and both are the undamped least-squares solution when λ → 0
    fit0 = lsq_fit(_stats(x, w, keep), damp=0.0, intercept=False)
    torch.testing.assert_close(fit0.weight, w @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep]), rtol=1e-7, atol=1e-8)


def test_rank_deficient_gram_gives_finite_weights_and_warning():
    x, w = _data(n=8)                       # 8 tokens for 24 inputs: H has rank 8
    keep = torch.arange(0, 24, 2)
    with pytest.warns(ReconstructionWarning, match="layer 5 down_proj"):
        r = reconstruct(_stats(x, w, keep, chunks=2), "lsq", name="layer 5 down_proj")
    assert r.mode == "bias" and torch.isfinite(r.weight).all() and torch.isfinite(r.bias).all()
    x, w = _data()
    x[:, 4] = 0                             # a dead channel that is kept
    with pytest.warns(ReconstructionWarning, match="layer 2 o_proj.*dead"):
        r = reconstruct(_stats(x, w, torch.arange(0, 24, 2)), "lsq", name="layer 2 o_proj")
    assert torch.isfinite(r.weight).all()


def test_singular_gram_without_damping_degrades_to_bias():
    x, w = _data()
    x[:, 1] = x[:, 0]                       # exactly collinear kept inputs, no damping: singular
    with pytest.warns(ReconstructionWarning, match="layer 0 o_proj"):
        r = reconstruct(_stats(x, w, torch.arange(12)), "lsq", damp=0.0, name="layer 0 o_proj")
    assert r.mode == "bias" and torch.isfinite(r.weight).all()


def test_cross_target_refit_equals_closed_form():
    """Sequential calibration: inputs x come from pruned layers, the target inputs t from the dense model, and
    the target output may carry a residual-stream correction r."""
    x, w = _data(seed=5)
    g = torch.Generator().manual_seed(9)
    t = x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    r = 0.1 * torch.randn(len(x), w.shape[0], generator=g, dtype=torch.float64)
    keep = torch.arange(0, 24, 3)
    for rr in (None, r):
        st = _stats(x, w, keep, t, rr)
        rec = reconstruct(st, "lsq", damp=1e-3)
        e = _calib_error(w, x, t, rec.weight, rec.bias, keep, rr)
        assert e < _calib_error(w, x, t, w[:, keep], None, keep, rr)
        lam = 1e-3 * float((x[:, keep] ** 2).sum(0).mean())
        sol = _closed_form(x, t @ w.T + (0 if rr is None else rr), keep, lam, w[:, keep], True)
        torch.testing.assert_close(rec.weight, sol[:, :-1], rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(rec.bias, sol[:, -1], rtol=1e-8, atol=1e-9)


def test_obs_order_removes_the_cheap_groups_first():
    x, w = _data(d_in=32, seed=6)
    w[:, 8:16] *= 1e-3                      # group 1 (columns 8..15) barely matters
    order, costs = obs_order(w, _gram(x), group_size=8)
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3] and len(costs) == 4
    assert all(c >= 0 for c in costs)


def test_obs_order_in_place_float32_matches_float64(monkeypatch):
    """Above F64_MAX_DIM inputs the OBS order runs in float32, in place, on the Gram itself (used up), in blocks
    (tiny blocks here): the same order and costs as the float64 path, within float32 accuracy."""
    import edgeprune.reconstruct as rc

    x, w = _data(d_in=48, d_out=16, n=900, seed=8)
    ref_order, ref_costs = obs_order(w, _gram(x), group_size=4)
    monkeypatch.setattr(rc, "F64_MAX_DIM", 16)
    monkeypatch.setattr(rc, "BLOCK_ELEMS", 40)
    g = _gram(x.float())
    assert g.xx.dtype == torch.float32
    order, costs = obs_order(w.float(), g, group_size=4)
    assert g.xx is None                                  # inverted in place: no second d² matrix
    assert order == ref_order
    torch.testing.assert_close(torch.tensor(costs), torch.tensor(ref_costs, dtype=torch.float32), rtol=2e-3,
                               atol=1e-3 * max(ref_costs))


def test_obs_order_on_a_singular_float32_gram_warns_and_is_finite(monkeypatch):
    import edgeprune.reconstruct as rc

    monkeypatch.setattr(rc, "F64_MAX_DIM", 4)
    x, w = _data(d_in=12, seed=9)
    g = _gram(torch.zeros_like(x).float())               # all inputs dead: H = 0 for every damping
    with pytest.warns(ReconstructionWarning, match="layer 3 down_proj.*diagonal"):
        order, costs = obs_order(w.float(), g, group_size=1, name="layer 3 down_proj")
    assert sorted(order) == list(range(12)) and all(math.isfinite(c) for c in costs)


def test_gram_float32_above_threshold_and_blockwise(monkeypatch):
    import edgeprune.reconstruct as rc

    monkeypatch.setattr(rc, "F64_MAX_DIM", 16)
    monkeypatch.setattr(rc, "TOKEN_BLOCK", 7)
    x, _ = _data()
    g = _gram(x.float())
    assert g.xx.dtype == torch.float32
    torch.testing.assert_close(g.xx.double(), x.T @ x, rtol=1e-4, atol=1e-2)
    assert g.n == len(x)


def test_refit_statistics_are_bounded_and_float32_refit_is_close(monkeypatch):
    """Only the kept columns' statistics exist ((k+1)² and d_out·(k+1), never d_in²); above F64_MAX_DIM kept
    inputs they are float32, accumulated and solved in blocks (tiny blocks here), in place, and the refit is
    within float32 accuracy of the float64 one."""
    import edgeprune.reconstruct as rc

    x, w = _data(d_in=40, d_out=12, n=600, seed=7)
    g = torch.Generator().manual_seed(1)
    t, r = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64), 0.05 * torch.randn(600, 12, generator=g, dtype=torch.float64)
    keep = torch.arange(0, 40, 2)
    ref = reconstruct(_stats(x, w, keep, t, r), "lsq")
    monkeypatch.setattr(rc, "F64_MAX_DIM", 8)
    monkeypatch.setattr(rc, "BLOCK_ELEMS", 50)
    st = _stats(x.float(), w.float(), keep, t.float(), r.float(), chunks=4)
    assert st.a.dtype == torch.float32 and st.a.shape == (21, 21) and st.b.shape == (12, 21)
    a_ptr, b_ptr = st.a.data_ptr(), st.b.data_ptr()
    got = reconstruct(st, "lsq")
    assert got.mode == "lsq" and st.a.data_ptr() == a_ptr and st.b.data_ptr() == b_ptr   # factored/solved in place
    torch.testing.assert_close(got.weight.double(), ref.weight, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(got.bias.double(), ref.bias, rtol=2e-3, atol=2e-4)
    assert got.error == pytest.approx(ref.error, rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------- the repair stage on a model
def _final_error(model, dense, ids):
    with torch.no_grad():
        a = model(ids, output_hidden_states=True).hidden_states[-1]
        b = dense(ids, output_hidden_states=True).hidden_states[-1]
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_repair_stage_lowers_model_error(kind, one_thread):
    import copy

    from edgeprune import testing as T
    from edgeprune.repair import RepairOptions, prune_repaired

    dense = T.tiny_model(kind, layers=3).eval()
    plan = T.random_plan(dense, seed=1, keep_frac=(0.4, 0.7))
    ids = torch.randint(3, dense.config.vocab_size, (16, 24), generator=torch.Generator().manual_seed(0))
    errs = {}
    for name, o in {"none": RepairOptions("none", sequential=False), "bias": RepairOptions("bias", sequential=False),
                    "lsq": RepairOptions("lsq", sequential=False),
                    "lsq-seq": RepairOptions("lsq", sequential=True, target="dense"),
                    "lsq-self": RepairOptions("lsq", sequential=True, target="self"),
                    "lsq-resid": RepairOptions("lsq", sequential=True, target="resid")}.items():
        m = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReconstructionWarning)
            reps = prune_repaired(m, plan, ids, o, batch_size=4, progress=False)
        assert [p.self_attn.k_proj.out_features // p.self_attn.head_dim for p in m.model.layers] == \
            [len(k) for k in plan.keep_kv]
        assert all(torch.isfinite(p).all() for p in m.parameters())
        errs[name] = _final_error(m, dense, ids)
        if name != "none":
            assert all(r.errors[k] <= r.errors_none[k] + 1e-12 for r in reps for k in r.errors)
    assert errs["lsq"] < errs["bias"] < errs["none"]
    assert errs["lsq-seq"] < errs["lsq"]
    assert errs["lsq-resid"] < errs["lsq-seq"]      # absorbing the residual-stream error: closest to dense


@pytest.fixture(scope="module")
def repaired_dir(tmp_path_factory):
    """A tiny model pruned with the lsq repair (sequential, with intercept: o_proj/down_proj gain biases),
    saved with the reference SentencePiece tokenizer."""
    import shutil

    from edgeprune import testing as T
    from edgeprune.models import load
    from edgeprune.paths import reference_model_dir
    from edgeprune.repair import RepairOptions, prune_repaired
    from export_helpers import SPM_FILES

    torch.set_num_threads(1)
    m = T.tiny_model("gqa", vocab=4096, seed=1).eval()
    ids = torch.randint(3, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReconstructionWarning)
        prune_repaired(m, T.random_plan(m, seed=1), ids, RepairOptions("lsq"), batch_size=4, progress=False)
    assert any(l.mlp.down_proj.bias is not None for l in m.model.layers)
    d = T.save_tiny(m, tmp_path_factory.mktemp("repaired") / "m")
    for f in SPM_FILES:
        shutil.copy(reference_model_dir() / f, d / f)
    torch.testing.assert_close(load(d)(ids[:1]).logits, m(ids[:1]).logits)   # the saved format keeps the refit
    return d


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_reconstructed_model_exports_and_verifies(repaired_dir, tmp_path, fmt):
    pytest.importorskip("llama_cpp" if fmt == "gguf" else "onnxruntime")
    import exporters
    from exporters.verify import verify

    art = tmp_path / ("m.gguf" if fmt == "gguf" else "onnx")
    exporters.export(repaired_dir, fmt, art, **({"quant": "f32"} if fmt == "gguf" else {}))
    r = verify(art, repaired_dir, threads=1, max_chunks=3)
    assert r["parity"]["max_abs_diff"] < 1e-4 and r["parity"]["argmax_agreement"] == 1.0
    assert r["parity"]["greedy_match"] and abs(r["ppl"]["delta_pct"]) < 0.5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from edgeprune import testing as T

    return T.save_tiny(T.tiny_model("gqa", seed=3, layers=4), tmp_path_factory.mktemp("rc") / "gqa")


@pytest.mark.parametrize("method,allocation,recon,scores", [("obs", None, "lsq", "dense"),
                                                             ("wanda-sp", "uniform", "lsq", "dense"),
                                                             ("flap", None, "bias", "dense"),
                                                             ("obs", None, "lsq", "pruned")])
def test_streamed_reconstruction_equals_in_memory(tiny_dir, tmp_path, method, allocation, recon, scores):
    import json

    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, run_prune

    torch.set_num_threads(1)
    outs = []
    for stream in (False, True):
        cfg = PruneConfig(method, 0.3, allocation=allocation, calib_samples=16, calib_len=32, stream=stream,
                          reconstruct=recon, options={"recon_scores": scores} if scores != "dense" else {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReconstructionWarning)
            run_prune(tiny_dir, tmp_path / f"s{int(stream)}", cfg, progress=False)
        outs.append(tmp_path / f"s{int(stream)}")
    sa, sb = load(outs[0]).state_dict(), load(outs[1]).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    prov = json.loads((outs[1] / "config.json").read_text())["pruning"]["provenance"]
    rec = prov["reconstruction"]
    assert rec["mode"] == recon and rec["sequential"] == (recon == "lsq") and len(rec["layers"]) == 4
    assert prov["stream"]["streamed"] and not prov["bias_compensation"]
    if recon == "lsq":   # the refit actually happened somewhere, and never made a projection worse
        assert any(m == "lsq" for l in rec["layers"] for m in l["modes"].values())
        assert all(l["errors"][k] <= l["errors_none"][k] + 1e-9 for l in rec["layers"] for k in l["errors"])


def test_obs_method_ranks_a_useless_group_last(one_thread):
    from edgeprune import testing as T
    from edgeprune.engine import score
    from edgeprune.importance import Context, get_method

    m = T.tiny_model("gqa", layers=2).eval()
    lg_span = m.model.layers[0].self_attn.o_proj.in_features // (m.model.layers[0].self_attn.k_proj.out_features //
                                                                 m.model.layers[0].self_attn.head_dim)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight[:, lg_span:2 * lg_span] *= 1e-4   # KV group 1 barely matters
        m.model.layers[1].mlp.down_proj.weight[:, 5] = 0                            # channel 5 is useless
    ids = torch.randint(3, m.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    sc = score(get_method("obs"), m, Context(model=m, calib_ids=ids, progress=False))
    assert sc.standardized and len(sc.attn) == len(sc.mlp) == 2
    assert int(sc.attn[0].argmin()) == 1 and int(sc.mlp[1].argmin()) == 5
    assert all(torch.isfinite(t).all() and (t >= 0).all() for t in sc.attn + sc.mlp)


def _plan(tiny_dir, tmp_path, name, **opts):
    import json

    from edgeprune.prune import PruneConfig, run_prune

    cfg = PruneConfig("obs", 0.5, allocation="global", calib_samples=16, calib_len=32, reconstruct="lsq",
                      options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReconstructionWarning)
        run_prune(tiny_dir, tmp_path / name, cfg, progress=False)
    return json.loads((tmp_path / name / "prune_report.json").read_text())["plan"]


def test_scores_on_the_pruned_stream_reselect_groups_with_the_same_counts(tiny_dir, tmp_path):
    """recon_scores=pruned: each layer is re-scored on the outputs of the already pruned and refitted layers;
    the global allocation's per-layer counts stay, layer 0 (same inputs on both streams) keeps the same groups,
    and a later layer's selection moves."""
    torch.set_num_threads(1)
    dense = _plan(tiny_dir, tmp_path, "dense")
    pruned = _plan(tiny_dir, tmp_path, "pruned", recon_scores="pruned")
    assert [len(k) for k in pruned["keep_kv"]] == [len(k) for k in dense["keep_kv"]]
    assert [len(k) for k in pruned["keep_mlp"]] == [len(k) for k in dense["keep_mlp"]]
    assert pruned["keep_kv"][0] == dense["keep_kv"][0] and pruned["keep_mlp"][0] == dense["keep_mlp"][0]
    assert pruned["keep_mlp"][1:] != dense["keep_mlp"][1:]


def test_scores_on_the_pruned_stream_refused_for_a_model_level_method(tiny_dir, tmp_path):
    from edgeprune.errors import EdgepruneError
    from edgeprune.prune import PruneConfig

    cfg = PruneConfig("llm-pruner", 0.2, reconstruct="lsq", options={"recon_scores": "pruned"})
    with pytest.raises(EdgepruneError, match="recon_scores=pruned.*llm-pruner scores the whole model"):
        cfg.validate()


def test_float32_refit_matches_float64_on_real_activations(ref_model_dir, one_thread, monkeypatch):
    """The float32 path (used above F64_MAX_DIM kept inputs, e.g. a 7B down_proj) on the reference model's own
    down_proj / o_proj inputs: the refit weights agree with the float64 path to 1e-4 relative and the calibration
    error (reported and recomputed on the data) to 1e-5."""
    import edgeprune.reconstruct as rc
    from edgeprune.data import calibration_ids
    from edgeprune.models import load, load_tokenizer

    m = load(ref_model_dir).eval()
    ids = calibration_ids(load_tokenizer(ref_model_dir), "gutenberg", 16, 128, 0)
    lay = m.model.layers[3]
    caps = {"down": [], "o": []}
    lay.mlp.down_proj.register_forward_pre_hook(lambda _m, a: caps["down"].append(a[0].reshape(-1, a[0].shape[-1])))
    lay.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: caps["o"].append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        m(ids)
    for name, lin in (("down", lay.mlp.down_proj), ("o", lay.self_attn.o_proj)):
        x, w = torch.cat(caps[name]).detach(), lin.weight.data
        keep = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))[: w.shape[1] // 2].sort().values
        fits = {}
        for f64max in (4096, 0):
            monkeypatch.setattr(rc, "F64_MAX_DIM", f64max)
            st = RefitStats(w, keep)
            for part in x.split(512):
                st.update(part)
            assert st.a.dtype == (torch.float64 if f64max else torch.float32)
            fits[f64max] = reconstruct(st, "lsq")
        a, b = fits[4096], fits[0]
        assert a.mode == b.mode == "lsq"
        assert float((a.weight.double() - b.weight.double()).norm() / a.weight.double().norm()) < 1e-4
        y = x.double() @ w.double().T
        direct = float(((y - x[:, keep].double() @ b.weight.double().T - b.bias.double()) ** 2).sum() / (y ** 2).sum())
        assert b.error == pytest.approx(a.error, abs=1e-5) and direct == pytest.approx(a.error, abs=1e-5)
        assert a.error < 0.5 * a.error_none


def test_refit_with_every_column_removed_is_the_mean_and_float32_weights_are_contiguous(monkeypatch):
    """k = 0 kept inputs (e.g. --min-kv 0 removes every head): the refit is the target's mean as a bias; and a
    float32 refit of float32 weights (no dtype change) comes back as its own contiguous matrix."""
    import edgeprune.reconstruct as rc

    x, w = _data()
    r = reconstruct(_stats(x, w, torch.tensor([], dtype=torch.long)), "lsq")
    assert r.weight.shape == (w.shape[0], 0)
    torch.testing.assert_close(r.bias, (x @ w.T).mean(0), rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(rc, "F64_MAX_DIM", 4)
    r = reconstruct(_stats(x.float(), w.float(), torch.arange(0, 24, 2)), "lsq")
    assert r.mode == "lsq" and r.weight.dtype == torch.float32 and r.weight.is_contiguous()
