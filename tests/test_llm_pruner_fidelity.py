"""LLM-Pruner fidelity: the GQA group reduction and the gradient windows, checked against sums written out here.

What the official llama3.py path does (benchmarks/llm_pruner_fidelity.md): it removes, with KV head h, the query
heads h·r … h·r+r−1, but credits KV head h with query heads h, h+n_kv, … when it scores the group; and its
calibration windows are text from a random offset inside a document, without BOS.
"""
import pytest
import torch

from edgeprune import testing as T
from edgeprune.groups import model_groups
from edgeprune.importance import Context, get_method
from edgeprune.importance.taylor import backward_grads, gradient_windows, group_taylor
from edgeprune.models import decoder_layers


def _random_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[(i, name)] = torch.randn(mod.weight.shape, generator=g)
    return out


def _expected_attn(layer, grads, i, n_kv, r, d, q_heads_of):
    """Σ |W ⊙ G| over k/v rows of head h, q rows and o columns of the query heads ``q_heads_of(h)``."""
    a = layer.self_attn
    sal = {n: (getattr(a, n).weight.double() * grads[(i, f"self_attn.{n}")].double()).abs()
           for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    out = torch.zeros(n_kv, dtype=torch.float64)
    for h in range(n_kv):
        out[h] = sal["k_proj"][h * d:(h + 1) * d].sum() + sal["v_proj"][h * d:(h + 1) * d].sum()
        for q in q_heads_of(h):
            out[h] += sal["q_proj"][q * d:(q + 1) * d].sum() + sal["o_proj"][:, q * d:(q + 1) * d].sum()
    return out


@pytest.mark.parametrize("heads,kv,hidden", [(8, 4, 64), (12, 4, 96)])
def test_gqa_fold_credits_the_right_query_heads(heads, kv, hidden):
    m = T.tiny_model("gqa", heads=heads, kv_heads=kv, hidden=hidden, layers=2)
    groups, grads = model_groups(m), _random_grads(m)
    r, d = heads // kv, hidden // heads
    folds = {"heads": lambda h: [h * r + j for j in range(r)],      # the heads removed with KV head h
             "official": lambda h: [h + j * kv for j in range(r)]}  # llama3.py's view(r, n_kv·d).sum(0)
    got = {}
    for fold, q_heads_of in folds.items():
        attn, _ = group_taylor(m, groups, lambda i, p: grads[(i, p)], None, "param_first", fold)
        for i, layer in enumerate(decoder_layers(m)):
            want = _expected_attn(layer, grads, i, kv, r, d, q_heads_of)
            assert torch.allclose(attn[i], want, rtol=1e-9), (fold, i)
        got[fold] = attn
    assert not torch.allclose(got["heads"][0], got["official"][0])   # the two folds are different functions


def test_folds_agree_without_gqa():
    m = T.tiny_model("mha", layers=1)
    groups, grads = model_groups(m), _random_grads(m, 1)
    a = [group_taylor(m, groups, lambda i, p: grads[(i, p)], None, "param_first", f)[0][0] for f in ("heads", "official")]
    assert torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="gqa_fold"):
        group_taylor(m, groups, lambda i, p: grads[(i, p)], None, "param_first", "modulo")


def test_gradient_windows_drop_bos_like_the_official_sampler():
    ids = torch.arange(5 * 9).view(5, 9) + 10
    ids[:, 0] = 1
    assert torch.equal(gradient_windows(ids, 3, 4, bos_id=1), ids[:3, 1:5])
    assert torch.equal(gradient_windows(ids, 3, 4, bos_id=1, keep_bos=True), ids[:3, :4])
    assert torch.equal(gradient_windows(ids, 2, 50, bos_id=1), ids[:2, 1:])        # short rows: what there is
    ids[2, 0] = 7                                                                # not every row starts with BOS
    assert torch.equal(gradient_windows(ids, 3, 4, bos_id=1), ids[:3, :4])
    assert torch.equal(gradient_windows(ids, 3, 4, bos_id=None), ids[:3, :4])


def test_llm_pruner_scores_the_windows_and_fold_it_is_told():
    m = T.tiny_model("gqa", heads=8, kv_heads=4, hidden=64, layers=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.ones(6, 1, dtype=torch.long), torch.randint(3, 128, (6, 20), generator=g)], 1)
    groups = model_groups(m)

    def reference(win, fold):
        grads, _ = backward_grads(m, win, batch_size=1)
        return group_taylor(m, groups, lambda i, p: grads[(i, p)], None, "param_first", fold)

    cases = [({}, ids[:4, 1:13], "heads"),
             ({"grad_bos": "true"}, ids[:4, :12], "heads"),
             ({"gqa_fold": "official"}, ids[:4, 1:13], "official")]
    for opts, win, fold in cases:
        ctx = Context(model=m, calib_ids=ids, options={"grad_samples": 4, "grad_len": 12, **opts}, progress=False)
        s = get_method("llm-pruner").score(m, ctx)
        attn, mlp = reference(win, fold)
        for x, y in zip(s.attn + s.mlp, attn + mlp):
            assert torch.allclose(x, y, rtol=1e-6), opts
        assert s.info["gqa_fold"] == fold and s.info["grad_len"] == 12
    from edgeprune.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match="grad_bos must be true or false"):   # typed options: one line, exit 2
        get_method("llm-pruner").score(m, Context(model=m, calib_ids=ids, options={"grad_bos": "maybe"}))
