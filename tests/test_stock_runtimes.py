"""verify's stock-runtime checks (exporters.stock_runtimes): a GGUF through llama-cpp-python's chat completion with
the model's chat template (greedy), and the OpenAI-compatible server when its extra is installed; ONNX through
optimum and onnxruntime-genai (tested on the exports of test_onnx_runtimes / test_export_onnx)."""
from __future__ import annotations

import pytest

from export_helpers import make_model

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    import exporters

    tmp = tmp_path_factory.mktemp("chat")
    m, d = make_model(tmp, "bpe", "gqa", tok="bpe")
    exporters.export(d, "gguf", tmp / "m.gguf", quant="f32")
    return m, d, tmp / "m.gguf"


def test_gguf_chat_completion_matches_pytorch_greedy(chat_gguf, one_thread):
    from edgeprune.models import load_tokenizer
    from exporters.stock_runtimes import stock_checks

    m, d, gguf = chat_gguf
    recs = {r["runtime"]: r for r in stock_checks(gguf, m, load_tokenizer(d), tokens=16)}
    chat = recs["llama-cpp-python chat"]
    assert chat["loaded"] and chat["greedy_match"], chat
    server = recs["llama-cpp-python server"]
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        assert server["detail"].startswith("skipped") and server["greedy_match"] is None
    else:
        assert server["loaded"] and server["greedy_match"], server


def test_gguf_without_chat_template_is_skipped_not_failed(tmp_path, one_thread):
    import exporters
    from edgeprune.models import load_tokenizer
    from exporters.stock_runtimes import stock_checks

    m, d = make_model(tmp_path, "spm", "gqa")       # the reference SentencePiece tokenizer has no chat template
    exporters.export(d, "gguf", tmp_path / "m.gguf", quant="f32")
    recs = stock_checks(tmp_path / "m.gguf", m, load_tokenizer(d), tokens=8)
    assert all(r["detail"] == "skipped: the model has no chat template" for r in recs)
