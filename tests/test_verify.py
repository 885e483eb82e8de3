"""verify: parity, runtime perplexity beside PyTorch, speed/memory in a subprocess, budgets, JSON keys."""
from __future__ import annotations

import json

import pytest

from edgeprune.errors import EdgepruneError
from export_helpers import make_model

KEYS = ("parity.max_abs_diff", "parity.argmax_agreement", "parity.greedy_match", "ppl.runtime", "ppl.reference",
        "speed.prefill_tps", "speed.decode_tps", "memory.peak_rss_mb", "file_mb")


def _get(d, dotted):
    for k in dotted.split("."):
        d = d[k]
    return d


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    return make_model(tmp, "m", "gqa")[1]


def _check(r, tol):
    for k in KEYS:
        assert _get(r, k) is not None, k
    assert r["parity"]["max_abs_diff"] < tol and r["parity"]["argmax_agreement"] == 1.0
    assert r["parity"]["greedy_match"] and r["parity"]["greedy_prefix"] == 32
    assert abs(r["ppl"]["delta_pct"]) < 0.5 and r["ppl"]["chunks"] == 3 and r["ppl"]["seq_len"] == 128
    assert r["speed"]["decode_tps"] > 0 and r["speed"]["prefill_tps"] > 0 and r["speed"]["ttft_ms"] > 0
    assert 10 < r["memory"]["peak_rss_mb"] < 2000                     # the child's own RSS, no torch in it


def test_verify_gguf(pruned, tmp_path):
    pytest.importorskip("llama_cpp")
    import exporters
    from exporters.verify import verify

    exporters.export(pruned, "gguf", tmp_path / "m.gguf", quant="f32")
    out = tmp_path / "v.json"
    r = verify(tmp_path / "m.gguf", pruned, threads=1, json_out=out, max_chunks=3,
               profile={"max_memory_mb": 100000, "max_decode_ms": 0.0001})
    _check(r, 1e-4)
    assert r["tokenizer"]["match"] == 1.0 and r["runtime"] == "llama.cpp"
    assert r["budgets"]["memory_mb"]["verdict"] == "PASS" and r["budgets"]["decode_ms"]["verdict"] == "FAIL"
    assert r["budgets"]["overall"] == "FAIL"
    assert json.loads(out.read_text())["parity"]["max_abs_diff"] == r["parity"]["max_abs_diff"]


def test_verify_onnx(pruned, tmp_path):
    pytest.importorskip("onnxruntime")
    import exporters
    from exporters.verify import verify

    exporters.export(pruned, "onnx", tmp_path / "onnx")
    r = verify(tmp_path / "onnx", pruned, threads=1, max_chunks=3)
    _check(r, 1e-4)
    assert r["runtime"] == "onnxruntime" and "budgets" not in r


def test_verify_missing_artifact(pruned, tmp_path):
    from exporters.verify import verify

    with pytest.raises(EdgepruneError, match="does not exist"):
        verify(tmp_path / "nope.gguf", pruned)
