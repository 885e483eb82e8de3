"""Plain ``transformers`` on edgeprune's model folders: exact or refused, never another function (issue #15 item 7).

Every method prunes a tiny GQA model uniformly (no dense skip layers), the folder is saved, and stock
``AutoModelForCausalLM.from_pretrained`` must either reproduce ``edgeprune.load``'s logits (max |d| < 1e-4) or raise
an error that names ``edgeprune.load``.
"""
from __future__ import annotations

import pytest
import torch

from edgeprune.importance import REGISTRY, load_all
from edgeprune.models import PLAIN_REFUSAL, load, load_tokenizer, save
from edgeprune.prune import PruneConfig, prune_model
from edgeprune.testing import tiny_model

load_all()
CHEAP = {"mini-llm": {"n_perturb": 4, "spsa_samples": 2}, "bip": {"lipschitz": "none"}}  # scores only


def _plain_or_refusal(d, ids):
    """(logits from stock transformers, None) or (None, error text)."""
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    except (ValueError, RuntimeError, OSError) as e:
        return None, str(e)
    with torch.no_grad():
        return m.eval()(ids).logits, None


def _check(d, ids):
    with torch.no_grad():
        ours = load(d)(ids).logits
    plain, err = _plain_or_refusal(d, ids)
    if plain is None:
        assert "edgeprune.load" in err, err
        return "refused"
    assert (plain - ours).abs().max().item() < 1e-4
    return "exact"


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_uniform_output_of_every_method_loads_exactly_or_refuses(method, tmp_path, ref_model_dir, one_thread):
    tok = load_tokenizer(ref_model_dir)
    m = tiny_model("gqa", vocab=4096, hidden=128, heads=8, ffn=256, layers=3, seed=3)
    cfg = PruneConfig(method, 0.3, allocation="uniform", calib_samples=4, calib_len=32, skip_first=0, skip_last=0,
                      options=CHEAP.get(method, {}))
    prune_model(m, tok, cfg, progress=False)
    save(m, tmp_path / "p", tokenizer_src=ref_model_dir)
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    verdict = _check(tmp_path / "p", ids)
    biased = any(lay.self_attn.o_proj.bias is not None or lay.mlp.down_proj.bias is not None for lay in m.model.layers)
    assert verdict == ("refused" if biased else "exact")   # a bias-free uniform model must stay loadable


@pytest.mark.parametrize("kind", ["gqa", "mistral", "qwen2"])
def test_bias_compensation_and_per_layer_shapes_are_refused(kind, tmp_path, ref_model_dir, one_thread):
    """The silently-wrong cases: a uniform plan with o/down bias compensation (stock classes would drop the
    biases) and a per-layer plan (stock classes have one shape)."""
    import json

    from edgeprune.groups import Plan
    from edgeprune.surgery import apply_plan
    from edgeprune.testing import random_plan

    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(1))
    m = tiny_model(kind, vocab=4096, hidden=64, heads=4, ffn=96, layers=2, seed=2)
    save(m, tmp_path / "dense", tokenizer_src=ref_model_dir)
    assert _check(tmp_path / "dense", ids) == "exact"
    per_layer = tiny_model(kind, vocab=4096, hidden=64, heads=4, ffn=96, layers=2, seed=2)
    apply_plan(per_layer, random_plan(per_layer, seed=2))
    g = torch.Generator().manual_seed(3)
    means = [{"o": torch.randn(64, generator=g), "down": torch.randn(96, generator=g)} for _ in range(2)]
    apply_plan(m, Plan([[1], [1]], [list(range(0, 96, 2))] * 2, {}), bias_means=means)
    for name, model in (("uniform-bias", m), ("per-layer", per_layer)):
        save(model, tmp_path / name, tokenizer_src=ref_model_dir)
        assert _check(tmp_path / name, ids) == "refused", name
        d = json.loads((tmp_path / name / "config.json").read_text())
        assert d["model_type"] == PLAIN_REFUSAL and d["pruning"]["model_type"] == m.config.model_type
