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
    assert r["ppl"]["sample"] == "first 3" and r["ppl"]["delta_pct_ci95"][0] <= r["ppl"]["delta_pct"]
    v = r["parity_verdict"]
    assert v["verdict"] == "PASS" and v["quant"] == "f32" and v["thresholds"]["max_abs_diff"] > 0, v
    assert r["shapes"]["verdict"] == "PASS" and r["approximations"] == []
    assert max(p["tokens"] for p in r["parity"]["prompts"]) >= 160       # the long prompt
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


def test_batched_runtime_nll_equals_one_by_one(pruned, tmp_path):
    """Several chunks per runtime call (llama.cpp: one sequence id each; onnxruntime: a batch) give each chunk's
    NLL as scoring it alone does; a sample of all chunks is the whole-text figure with a zero-width interval."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    import exporters
    from exporters.ppl import artifact_ppl, chunk_ids, estimate, runtime_nll
    from exporters.runtimes import log_softmax_nll, open_runtime

    exporters.export(pruned, "gguf", tmp_path / "m.gguf", quant="f32")
    ids = np.random.default_rng(0).integers(3, 4096, 6 * 32)
    c = chunk_ids(ids, 32)
    rt = open_runtime(tmp_path / "m.gguf", threads=1, kv="f32", n_ctx=256)
    batched = runtime_nll(rt, c)
    single = np.array([float(log_softmax_nll(rt.logits(x), x).mean()) for x in c])
    rt.close()
    assert np.allclose(batched, single, atol=1e-4), (batched, single)
    est, nll = artifact_ppl(tmp_path / "m.gguf", ids, seq_len=32, chunks=None, threads=1, kv="f32")
    assert est.chunks == est.total_chunks == 6 and est.lo == est.hi == est.ppl
    assert est.ppl == pytest.approx(np.exp(batched.mean()), rel=1e-5)
    sub = estimate(nll[:3], 6, 32)
    assert sub.lo < sub.ppl < sub.hi


@pytest.mark.heavy
def test_ppl_chunks_all_is_the_whole_text_figure(ref_model_dir, tmp_path):
    """``verify --ppl-chunks all`` on the reference model's f16 GGUF scores every WikiText-2 chunk (batched on
    llama.cpp) and gives the whole-text figure: its PyTorch side equals ``edgeprune eval``'s whole-text perplexity
    exactly (same chunks), and the runtime's equals it to 4 significant digits (f16 weights, F16 KV cache), with a
    zero-width interval. Heavy: the whole text is 3,683 chunks on each side."""
    pytest.importorskip("llama_cpp")
    import exporters
    from edgeprune.evaluate import perplexity
    from edgeprune.models import load, load_tokenizer
    from exporters.verify import verify

    art = tmp_path / "ref-f16.gguf"
    exporters.export(str(ref_model_dir), "gguf", str(art), quant="f16")
    r = verify(art, ref_model_dir, threads=2, ppl_chunks=None, speed=False, stock=False)["ppl"]
    whole = perplexity(load(ref_model_dir), load_tokenizer(ref_model_dir), "wikitext2", 128)
    assert r["sample"] == "all" and r["chunks"] == r["total_chunks"]
    assert r["reference"] == pytest.approx(whole, rel=1e-6), (r["reference"], whole)
    assert f"{r['runtime']:.4g}" == f"{whole:.4g}", (r["runtime"], whole)
    assert r["runtime_ci95"][0] == r["runtime_ci95"][1] == pytest.approx(r["runtime"])
