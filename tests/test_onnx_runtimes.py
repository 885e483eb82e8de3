"""ONNX exports loaded by the stock runtimes apps use: optimum's ORTModelForCausalLM and onnxruntime-genai.

A tiny model with pruned heads (uniform KV, per-layer MLP widths, so hidden_size / num_attention_heads is not the
head size) must generate the same 32 greedy tokens through both as through PyTorch. A per-layer KV model generates
through onnxruntime-genai too, and is refused for optimum with one line (exit 2). Real runtimes, no mocks."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from export_helpers import hf_greedy, make_model, prompt_ids

pytest.importorskip("onnxruntime")
N = 32


def _uniform_kv(plan, model):
    """Keep KV group 1 in every layer (so q heads 4 -> 2), MLP widths as the random plan drew them."""
    plan.keep_kv = [[1] for _ in plan.keep_kv]
    return None


@pytest.fixture(scope="module")
def uniform_kv(tmp_path_factory):
    import exporters

    tmp = tmp_path_factory.mktemp("ukv")
    m, d = make_model(tmp, "ukv", "gqa", edit=_uniform_kv)
    assert len({layer.mlp.gate_proj.out_features for layer in m.model.layers}) > 1    # MLP widths stay free
    s = exporters.export(d, "onnx", tmp / "onnx", target="genai")
    return m, d, tmp / "onnx", s


def test_optimum_generates_pytorch_greedy_tokens(uniform_kv):
    from optimum.onnxruntime import ORTModelForCausalLM

    m, _, out, s = uniform_kv
    assert any("num_attention_heads" in n for n in s["notes"])     # the one field that cannot be true is named
    ort_model = ORTModelForCausalLM.from_pretrained(out)
    ids = prompt_ids(m.config.vocab_size, 12)
    with torch.no_grad():
        g = ort_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
    assert g[0, len(ids):].tolist() == hf_greedy(m, ids, N)


def _genai_greedy(folder, ids: list[int], n: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def test_genai_generates_pytorch_greedy_tokens(uniform_kv):
    m, _, out, _ = uniform_kv
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["decoder"]["head_size"] == 16 and cfg["decoder"]["num_key_value_heads"] == 1
    ids = prompt_ids(m.config.vocab_size, 12)
    assert _genai_greedy(out, ids, N) == hf_greedy(m, ids, N)


def test_per_layer_kv_is_refused_for_optimum(tmp_path):
    """(That genai runs the per-layer graph is tested in test_export_onnx.py on its per-layer export.)"""
    _, d = make_model(tmp_path, "pl", "gqa")
    r = run_cli("export", d, "--format", "onnx", "--target", "optimum", "--out", tmp_path / "o")
    assert r.returncode == 2 and "uniform_kv" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_verify_reports_stock_runtimes_for_onnx(uniform_kv):
    """verify's per-artifact record: both stock runtimes loaded the folder and matched PyTorch's greedy tokens."""
    from edgeprune.models import load_tokenizer
    from exporters.stock_runtimes import stock_checks

    m, d, out, _ = uniform_kv
    recs = {r["runtime"]: r for r in stock_checks(out, m, load_tokenizer(d), tokens=N)}
    assert recs["optimum"]["loaded"] and recs["optimum"]["greedy_match"], recs
    assert recs["onnxruntime-genai"]["loaded"] and recs["onnxruntime-genai"]["greedy_match"], recs


def test_readme_onnx_snippets(uniform_kv):
    """The README's optimum and onnxruntime-genai snippets, as written, on this export."""
    from test_readme_snippets import run_snippet

    run_snippet("optimum", uniform_kv[2])
    run_snippet("onnxruntime-genai", uniform_kv[2])
