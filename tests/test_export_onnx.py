"""ONNX export: per-layer KV I/O with optimum's names, one graph for prefill + decode, exact vs PyTorch,
dynamic batch, empty layers, fp16 and int8. Real onnxruntime, no mocks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from export_helpers import hf_greedy, make_model, prompt_ids, ref_logits

ort = pytest.importorskip("onnxruntime")

import exporters  # noqa: E402
from exporters.runtimes import OrtRuntime  # noqa: E402


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    m, d = make_model(tmp, "gqa", "gqa")
    s = exporters.export(d, "onnx", tmp / "onnx")
    return m, d, s


def test_names_and_per_layer_kv(gqa):
    m, d, s = gqa
    sess = ort.InferenceSession(f"{s['path']}/model.onnx", providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    L = len(m.model.layers)
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert outs == ["logits"] + [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    kv = [layer.self_attn.k_proj.out_features // 16 for layer in m.model.layers]
    assert [ins[f"past_key_values.{i}.key"][1] for i in range(L)] == kv == s["kv_heads"] and len(set(kv)) > 1
    assert all(isinstance(ins[f"past_key_values.{i}.value"][2], str) for i in range(L))   # dynamic past axis
    meta = json.loads(open(f"{s['path']}/edgeprune_onnx.json").read())
    assert meta["opset"] == 20 and not s["external_data"]


def test_exact_prefill_decode_and_greedy(gqa):
    m, d, s = gqa
    rt = OrtRuntime(s["path"], threads=1)
    ids = prompt_ids(m.config.vocab_size, 20)
    ref = ref_logits(m, ids)
    assert np.abs(rt.logits(ids) - ref).max() < 1e-4
    last = rt.prefill(ids[:16])                                   # prefill 16, then 4 cached decode steps
    steps = [last] + [rt.step(t) for t in ids[16:19]]
    assert np.abs(np.stack(steps) - ref[15:19]).max() < 1e-4
    assert rt.greedy(ids[:8], 16) == hf_greedy(m, ids[:8], 16)
    # dynamic batch: two rows at once
    two = np.asarray([ids[:10], ids[10:20]])
    lg, _ = rt.run(two, rt.empty_past(2), 0)
    assert np.abs(lg[1] - ref_logits(m, ids[10:20])).max() < 1e-4


def test_genai_runs_per_layer_kv(gqa):
    """onnxruntime-genai takes each layer's KV width from the graph (genai_config holds one number)."""
    from test_onnx_runtimes import N, _genai_greedy

    m, d, s = gqa
    assert len(set(s["kv_heads"])) > 1 and any("optimum cannot load" in n for n in s["notes"])
    ids = prompt_ids(m.config.vocab_size, 12, seed=1)
    assert _genai_greedy(s["path"], ids, N) == hf_greedy(m, ids, N)
    from edgeprune.models import load_tokenizer
    from exporters.stock_runtimes import stock_checks

    recs = {r["runtime"]: r for r in stock_checks(s["path"], m, load_tokenizer(d), tokens=8)}
    assert not recs["optimum"]["loaded"] and recs["optimum"]["detail"]          # optimum's own refusal, reported
    assert recs["onnxruntime-genai"]["loaded"] and recs["onnxruntime-genai"]["greedy_match"]


def test_qwen2_bias_tied_and_empty_layers(tmp_path):
    def edit(plan, model):
        plan.keep_mlp[1] = []
        plan.keep_kv[2] = []
    m, d = make_model(tmp_path, "qwen", "qwen2", tied=True, tok="bpe", edit=edit)
    s = exporters.export(d, "onnx", tmp_path / "onnx")
    rt = OrtRuntime(s["path"], threads=1)
    ids = prompt_ids(m.config.vocab_size)
    assert np.abs(rt.logits(ids) - ref_logits(m, ids)).max() < 1e-4
    assert rt.greedy(ids[:8], 8) == hf_greedy(m, ids[:8], 8)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() and (tmp_path / "onnx" / "config.json").is_file()


def test_fp16_and_int8(gqa, tmp_path):
    m, d, s32 = gqa
    ids = prompt_ids(m.config.vocab_size)
    ref = ref_logits(m, ids)
    from exporters.onnx_export import derive_onnx   # same converters export_onnx uses, minus a re-export

    s16 = derive_onnx(s32["path"], tmp_path / "fp16", dtype="fp16").to_dict()
    s8 = derive_onnx(s32["path"], tmp_path / "int8", quant="int8").to_dict()
    assert s16["file_mb"] < 0.7 * s32["file_mb"] and s8["file_mb"] < 0.8 * s32["file_mb"]
    rt16, rt8 = OrtRuntime(s16["path"], threads=1), OrtRuntime(s8["path"], threads=1)
    assert np.abs(rt16.logits(ids) - ref).max() < 2e-2
    l8 = rt8.logits(ids)
    assert np.isfinite(l8).all() and (l8.argmax(-1) == ref.argmax(-1)).mean() > 0.5
    assert len(rt16.greedy(ids[:8], 4)) == 4


@pytest.mark.heavy
def test_fp16_full_path(gqa, tmp_path):
    m, d, _ = gqa
    s = exporters.export(d, "onnx", tmp_path / "fp16", dtype="fp16")
    ids = prompt_ids(m.config.vocab_size)
    assert np.abs(OrtRuntime(s["path"], threads=1).logits(ids) - ref_logits(m, ids)).max() < 2e-2


def test_bad_requests_refused(gqa, tmp_path):
    m, d, _ = gqa
    with pytest.raises(EdgepruneError, match="dtype"):
        exporters.export(d, "onnx", tmp_path / "x", dtype="int4")
    with pytest.raises(EdgepruneError, match="format"):
        exporters.export(d, "tflite", tmp_path / "x")
