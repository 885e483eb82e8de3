"""The exporter feature table (exporters.features) against every supported config variant: each one either
exports with parity (verify's verdict PASS, a long prompt included) or is refused up front (exit 2, one line naming
the feature and the format that can take it, nothing written, weights never read)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgeprune.errors import EdgepruneError
from export_helpers import SPM_FILES

# name -> (kind, config edits, weight dtype, expected gguf outcome)
VARIANTS = {
    "mha": ("mha", {}, None, "exact"),
    "gqa-tied": ("gqa", {"tie_word_embeddings": True}, None, "exact"),
    "llama3-rope": ("gqa", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                    None, "exact"),
    "linear-rope": ("gqa", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None, "exact"),
    "yarn-rope": ("gqa", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}},
                  None, "rope 'yarn'"),
    "mistral-no-window": ("mistral", {"sliding_window": None}, None, "exact"),
    "mistral-window": ("mistral", {"sliding_window": 16}, None, "sliding_window 16"),
    "qwen2-bias": ("qwen2", {}, None, "exact"),
    "attn-mlp-bias": ("gqa", {"attention_bias": True, "mlp_bias": True}, None, "exact"),
    "gelu": ("gqa", {"hidden_act": "gelu"}, None, "activation 'gelu'"),
    "bf16": ("gqa", {}, torch.bfloat16, "exact"),
    "fp16": ("gqa", {}, torch.float16, "exact"),
}


def build_variant(tmp, name: str):
    """A tiny random model (hidden 64, 2 layers, the reference SentencePiece tokenizer) with the variant's config."""
    import transformers

    from edgeprune.paths import reference_model_dir
    from edgeprune.testing import save_tiny, tiny_config

    kind, edits, dtype, _ = VARIANTS[name]
    cfg = tiny_config(kind, vocab=4096, hidden=64, layers=2, heads=4, ffn=96)
    for k, v in edits.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    m = getattr(transformers, cfg.architectures[0])(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.08)
    if dtype is not None:
        m = m.to(dtype)
    d = tmp / name
    save_tiny(m.eval(), d)
    for f in SPM_FILES:
        shutil.copy(reference_model_dir() / f, d / f)
    return d


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    return {n: build_variant(tmp, n) for n in VARIANTS}


def test_table_names_each_feature(variants):
    from edgeprune.models import read_config
    from exporters.features import features, summary

    cfg = read_config(variants["gelu"])
    names = [f.name for f in features(cfg)]
    assert names == ["activation", "rope", "sliding_window", "qkv_bias", "o_bias", "mlp_bias", "tied_embeddings", "norm"]
    s = summary(cfg)
    assert s["exportable"] == {"gguf": False, "onnx": True}
    assert summary(read_config(variants["qwen2-bias"]))["exportable"] == {"gguf": True, "onnx": True}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_exports_with_parity_or_is_refused(variants, name, tmp_path):
    pytest.importorskip("llama_cpp")
    import exporters
    from exporters.verify import verify

    expect = VARIANTS[name][3]
    d = variants[name]
    quant = "f16" if VARIANTS[name][2] is not None else "f32"
    art = tmp_path / "m.gguf"
    if expect != "exact":
        (d / "model.safetensors").rename(d / "weights.hidden")     # refused before the weights are read
        try:
            with pytest.raises(EdgepruneError, match=expect) as e:
                exporters.export(d, "gguf", art, quant=quant)
        finally:
            (d / "weights.hidden").rename(d / "model.safetensors")
        assert "onnx" in str(e.value) and "\n" not in str(e.value)
        assert not art.exists() and not list(tmp_path.iterdir())
        return
    exporters.export(d, "gguf", art, quant=quant)
    r = verify(art, d, threads=1, speed=False, ppl=False)
    assert r["parity_verdict"]["verdict"] == "PASS", (r["parity_verdict"], r["parity"]["prompts"])
    assert max(p["tokens"] for p in r["parity"]["prompts"]) >= 160          # the long prompt ran
    assert r["approximations"] == [] and r["shapes"]["verdict"] == "PASS"


def test_gelu_refused_for_gguf_cli_and_exact_in_onnx(variants, tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import run_cli
    from exporters.verify import verify

    r = run_cli("export", variants["gelu"], "--format", "gguf", "--out", tmp_path / "g.gguf")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "activation 'gelu'" in lines[0] and "--format onnx" in lines[0]
    assert not (tmp_path / "g.gguf").exists()
    info = run_cli("info", variants["gelu"], "--json", tmp_path / "info.json")
    assert info.returncode == 0 and "export gguf: activation gelu: refuse" in info.stdout
    assert json.loads((tmp_path / "info.json").read_text())["export"]["exportable"]["gguf"] is False

    import exporters

    exporters.export(variants["gelu"], "onnx", tmp_path / "onnx")
    v = verify(tmp_path / "onnx", variants["gelu"], threads=1, speed=False, ppl=False)
    assert v["parity_verdict"]["verdict"] == "PASS" and v["parity"]["max_abs_diff"] < 1e-4


def test_sliding_window_needs_flag_and_verify_reports_it(variants, tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import run_cli

    d = variants["mistral-window"]
    art = tmp_path / "w.gguf"
    r = run_cli("export", d, "--format", "gguf", "--quant", "f32", "--out", art)
    assert r.returncode == 2 and "sliding_window 16" in r.stderr and "--max-context" in r.stderr, r.stderr
    assert not art.exists()
    r = run_cli("export", d, "--format", "gguf", "--quant", "f32", "--out", art, "--max-context", "32")
    assert r.returncode == 2 and "exceeds sliding_window 16" in r.stderr and not art.exists()
    r = run_cli("export", d, "--format", "gguf", "--quant", "f32", "--out", art, "--max-context", "16")
    assert r.returncode == 0, r.stderr
    assert "edgeprune: note: approximation accepted: sliding_window 16" in r.stderr
    assert json.loads(r.stdout)["approximations"] and json.loads(r.stdout)["max_context"] == 16
    v = run_cli("verify", art, "--reference", d, "--ppl-chunks", "3", "--quiet", "--json", tmp_path / "v.json")
    res = json.loads((tmp_path / "v.json").read_text())
    assert "approximation in this artifact: sliding_window 16" in v.stderr
    assert res["approximations"] and res["max_context"] == 16 and res["ppl"]["seq_len"] == 16
    assert all(p["tokens"] <= 16 for p in res["parity"]["prompts"])            # judged within the declared context
    beyond = res["parity"]["beyond_context"]
    assert beyond["tokens"] > 16 and beyond["max_abs_diff"] > 10 * res["parity"]["max_abs_diff"]   # the window shows
    assert v.returncode == 0 and res["parity_verdict"]["verdict"] == "PASS", res["parity_verdict"]


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["yarn-rope", "mistral-window"])
def test_refused_for_gguf_exact_in_onnx(variants, name, tmp_path):
    import exporters
    from exporters.verify import verify

    exporters.export(variants[name], "onnx", tmp_path / "onnx")
    v = verify(tmp_path / "onnx", variants[name], threads=1, speed=False, ppl=False)
    assert v["parity_verdict"]["verdict"] == "PASS" and v["parity"]["max_abs_diff"] < 1e-4
