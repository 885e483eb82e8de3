"""The README's "Load the result in your app" snippets, executed as written (only the artifact paths replaced)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDERS = ("run/model-q8_0.gguf", "run/onnx-fp32")


def snippet(name: str) -> str:
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no '{name}' snippet"
    return m.group(1)


def run_snippet(name: str, artifact: Path) -> str:
    code = snippet(name)
    for ph in PLACEHOLDERS:
        code = code.replace(ph, str(artifact))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip(), "the snippet printed nothing"
    return r.stdout


def test_llama_cpp_snippet(tmp_path):
    pytest.importorskip("llama_cpp")
    import exporters
    from export_helpers import make_model

    _, d = make_model(tmp_path, "bpe", "gqa", tok="bpe")
    exporters.export(d, "gguf", tmp_path / "m.gguf", quant="q8_0")
    run_snippet("llama.cpp", tmp_path / "m.gguf")

# the optimum and onnxruntime-genai snippets run in test_onnx_runtimes.py, on its uniform-KV export
