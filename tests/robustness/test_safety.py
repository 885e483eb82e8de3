"""Safe loading and safe output: no remote code, weights_only unpickling, plain YAML, sanitised GGUF metadata, an
LLM endpoint that replies garbage or hangs (the search survives), and an API key that never reaches any output."""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from robust_helpers import (ROOT, cached_model, edit_config, error_line, opt_args, server, tiny_dir, tiny_with_ref_tokenizer,
                            write_malicious_bin)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("safety")


# ------------------------------------------------------------------------------------------------ remote code
def test_trust_remote_code_never_enabled():
    """No call site passes trust_remote_code=True (only the user could, and no command offers it)."""
    hits = []
    for f in list((ROOT / "edgeprune").rglob("*.py")) + list((ROOT / "exporters").rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"trust_remote_code\s*=\s*(True|1)\b", line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
    cli = (ROOT / "edgeprune" / "cli.py").read_text() + (ROOT / "edgeprune" / "pipeline.py").read_text()
    assert "--trust-remote-code" not in cli


def test_auto_map_code_is_never_executed(root, tmp_path):
    """A LLaMA checkpoint whose config.json and tokenizer_config.json point auto_map at a python file that would
    write a marker: info, prune and export load it through the built-in classes and never import that file."""
    marker = tmp_path / "MARKER"
    d = tmp_path / "model"
    shutil.copytree(cached_model(root, "tinyref", lambda p: tiny_with_ref_tokenizer(p, _ref())), d)
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (d / name).write_text(code + "class EvilForCausalLM: pass\nclass EvilConfig: pass\nclass EvilTokenizer: pass\n")
    edit_config(d, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    srv = server(root)
    r = srv.run("info", d)
    assert r.returncode == 0, r.stderr
    r = srv.run("prune", d, "--method", "magnitude", "--ratio", "0.3", "--calib-samples", "4", "--calib-len", "16",
                "--quiet", "--out", tmp_path / "p")
    assert r.returncode == 0 or "Traceback" not in r.stderr, r.stderr
    r = srv.run("export", d, "--format", "gguf", "--quant", "f32", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "code from the checkpoint folder was executed"


def _ref() -> Path:
    from edgeprune.paths import reference_model_dir

    d = reference_model_dir()
    if not (d / "config.json").exists():
        pytest.skip("reference model not found")
    return d


def test_pickle_checkpoint_loads_weights_only(tmp_path):
    """edgeprune.load refuses a .bin whose unpickling would run code (weights_only=True), and a clean .bin loads."""
    import torch

    from edgeprune import models as M
    from edgeprune import testing as T
    from edgeprune.errors import EdgepruneError

    d = tiny_dir(tmp_path / "m")
    sd = {k: v for k, v in M.load(d).state_dict().items()}
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    assert M.load(d).config.hidden_size == 64           # an honest .bin still loads
    marker = tmp_path / "MARKER"
    write_malicious_bin(d, marker)
    with pytest.raises(EdgepruneError, match="cannot be loaded safely"):
        M.load(d)
    assert not marker.exists()
    assert "weights_only=True" in (ROOT / "edgeprune" / "models.py").read_text()
    del T


def test_yaml_is_safe_loaded(tmp_path):
    from device_profiles import load_profile
    from edgeprune.errors import EdgepruneError

    marker = tmp_path / "MARKER"
    p = tmp_path / "p.yaml"
    p.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(EdgepruneError, match="YAML tag not allowed"):
        load_profile(p)
    assert not marker.exists()
    for f in list((ROOT / "device_profiles").rglob("*.py")) + list((ROOT / "edgeprune").rglob("*.py")) + \
            list((ROOT / "exporters").rglob("*.py")):
        text = f.read_text()
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), f"{f}: use yaml.safe_load"


# ------------------------------------------------------------------------------------------------ metadata
def test_gguf_metadata_strings_are_sanitised(root, tmp_path):
    """general.name comes from the folder name and the chat template from tokenizer_config.json: control
    characters and newlines never reach the GGUF (the template keeps its newlines), and lengths are capped."""
    import gguf

    import exporters
    from exporters.gguf import META_MAX_CHARS, TEMPLATE_MAX_CHARS

    src = cached_model(root, "tinyref", lambda p: tiny_with_ref_tokenizer(p, _ref()))
    d = tmp_path / ("evil\nname\x1b[2J\x07" + "x" * 200)
    shutil.copytree(src, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}\x00\x1b[31m{{ m['content'] }}\n{% endfor %}" + "y" * 70000
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    out = tmp_path / "m.gguf"
    exporters.export(str(d), "gguf", str(out), quant="f32")
    r = gguf.GGUFReader(str(out))
    strings = {}
    for name, f in r.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            strings[name] = bytes(f.parts[f.data[0]]).decode("utf-8")
    name = strings["general.name"]
    assert name.startswith("evil name") and len(name) <= META_MAX_CHARS
    assert not any(ord(c) < 32 or ord(c) == 127 for c in name)
    tmpl = strings.get("tokenizer.chat_template")
    if tmpl is not None:
        assert "\n" in tmpl and len(tmpl) <= TEMPLATE_MAX_CHARS
        assert not any((ord(c) < 32 and c not in "\n\t") or ord(c) == 127 for c in tmpl)
    for k, v in strings.items():
        assert len(v) <= TEMPLATE_MAX_CHARS, k


def test_onnx_export_writes_no_free_text_metadata():
    """The ONNX exporter sets no doc strings or metadata_props from model/folder names (config.json and
    edgeprune_onnx.json beside the graph are JSON, which escapes control characters)."""
    text = (ROOT / "exporters" / "onnx_export.py").read_text()
    assert "metadata_props" not in text and "doc_string" not in text and "producer_name" not in text


# ------------------------------------------------------------------------------------------------ LLM backend
SENTINEL = "sk-edgeprune-SENTINEL-7f3a9c"


class _LLM(BaseHTTPRequestHandler):
    """OpenAI-compatible /chat/completions that misbehaves by ``mode``; records what it received."""

    mode = "garbage"
    seen: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        type(self).seen.append({"auth": self.headers.get("Authorization"), "body": body[:200]})
        if self.mode == "slow":
            time.sleep(2.5)   # > the client's 1 s timeout; bounded so the server always finishes
        status, reply = 200, {"garbage": b"<html>not json at all", "http500": b"internal error", "slow": b"{}",
                              "prose": json.dumps({"choices": [{"message": {"content": "Prune the middle layers more."}}]
                                                   }).encode()}[self.mode]
        if self.mode == "http500":
            status = 500
        try:   # the client may have given up already (timeout, error status): nothing to tell it then
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def llm_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _LLM)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    _LLM.seen = []
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode", ["garbage", "prose", "slow", "http500"])
def test_self_pruner_survives_a_bad_llm_and_never_leaks_the_key(mode, llm_server, root, tmp_path):
    pytest.importorskip("edgeprune.self_pruner")
    _LLM.mode = mode
    port = llm_server.server_address[1]
    log = tmp_path / "search.jsonl"
    text = tmp_path / "fit.txt"
    text.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z\n" * 400)
    out = tmp_path / "out"
    tiny = cached_model(root, "tiny", tiny_dir)
    opts = {"backend": "openai", "llm_base_url": f"http://127.0.0.1:{port}/v1", "llm_model": "test-model",
            "llm_timeout": 1, "population": 4, "n_crossover": 2, "n_mutation": 2, "generations": 1,
            "fitness_samples": 2, "fitness_len": 16, "fitness_source": str(text), "log": str(log)}
    argv = ["prune", tiny, "--method", "magnitude", "--allocation", "self-pruner", "--ratio", "0.3",
            "--calib-samples", "4", "--calib-len", "16", "--out", out]
    argv += opt_args(opts)
    r = server(root).run(*argv, env={"EDGEPRUNE_LLM_API_KEY": SENTINEL, "OPENAI_API_KEY": None})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert _LLM.seen, "the backend never called the local endpoint"
    assert all(s["auth"] == f"Bearer {SENTINEL}" for s in _LLM.seen)   # the key comes from the environment
    events = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    status = {e.get("status") for e in events if e.get("event") == "backend"}
    assert status & {"malformed", "error"} and "fallback" in status, status
    # the key appears nowhere: stdout, stderr, the search log, the pruned model's files (config provenance, report)
    blobs = {"stdout": r.stdout, "stderr": r.stderr, "log": log.read_text()}
    for f in out.rglob("*"):
        if f.is_file():
            blobs[str(f.relative_to(out))] = f.read_bytes().decode("utf-8", "replace")
    leaked = [k for k, v in blobs.items() if SENTINEL in v or SENTINEL[3:] in v]
    assert not leaked, leaked


def test_self_pruner_misconfigured_backend_is_one_line(root, tmp_path):
    pytest.importorskip("edgeprune.self_pruner")
    tiny = cached_model(root, "tiny", tiny_dir)
    r = server(root).run("prune", tiny, "--method", "magnitude", "--allocation", "self-pruner", "--ratio", "0.3",
                         "--calib-samples", "4", "--calib-len", "16", "--opt", "backend=openai", "--out",
                         tmp_path / "out", env={"EDGEPRUNE_LLM_BASE_URL": None, "EDGEPRUNE_LLM_MODEL": None})
    error_line(r, 2, "llm_base_url", "--opt")
    assert not (tmp_path / "out").exists()
