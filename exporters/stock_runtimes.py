"""Stock-runtime checks: does the artifact load in the runtimes apps use, and do they produce PyTorch's greedy output?

One record per runtime (``verify`` reports them under ``stock_runtimes``):

* ONNX folder: ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(dir).generate`` and
  ``onnxruntime_genai.Model(dir)`` with greedy search, on the token ids of the prompt; ``greedy_match`` compares the
  generated ids with ``transformers``' greedy ``generate`` on the PyTorch model.
* GGUF: llama-cpp-python's high-level API as a chat app calls it: ``Llama.create_chat_completion`` with the
  model's chat template (the GGUF's ``tokenizer.chat_template``) at temperature 0 (llama-cpp-python's greedy
  sampler), and the same request to llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``,
  ``POST /v1/chat/completions``) when its ``[server]`` extra is installed (otherwise the record says
  ``skipped``). The reference is PyTorch's greedy continuation of ``tokenizer.apply_chat_template(messages,
  add_generation_prompt=True)``, stopped at EOS, decoded with special tokens skipped; texts are compared after
  stripping surrounding whitespace. A model without a chat template is reported as skipped for these two.

``loaded`` is False with the runtime's one-line error in ``detail`` when it refuses the artifact.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT = "The capital of France is"


@dataclass
class StockCheck:
    runtime: str
    loaded: bool
    greedy_match: bool | None      # None: not compared (skipped or failed to load)
    tokens: int
    detail: str = ""


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _pt_greedy(model, ids: list[int], n: int, stop_at_eos: bool = False, eos: int | None = None) -> list[int]:
    import torch

    kw = {} if stop_at_eos else {"min_new_tokens": n}
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, pad_token_id=eos if eos is not None else 0, **kw)
    return g[0, len(ids):].tolist()


def check_optimum(folder: Path, ids: list[int], ref: list[int]) -> StockCheck:
    import torch

    try:
        from optimum.onnxruntime import ORTModelForCausalLM

        m = ORTModelForCausalLM.from_pretrained(str(folder))
        with torch.no_grad():
            g = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=len(ref), min_new_tokens=len(ref), do_sample=False, pad_token_id=0)
    except Exception as e:   # the runtime's own refusal, reported rather than raised
        return StockCheck("optimum", False, None, len(ref), _line(e))
    return StockCheck("optimum", True, g[0, len(ids):].tolist() == ref, len(ref))


def check_genai(folder: Path, ids: list[int], ref: list[int]) -> StockCheck:
    try:
        import onnxruntime_genai as og

        m = og.Model(str(folder))
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=len(ids) + len(ref), min_length=len(ids) + len(ref), do_sample=False)
        gen = og.Generator(m, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        got = [int(t) for t in gen.get_sequence(0)][len(ids):]
    except ImportError:
        return StockCheck("onnxruntime-genai", False, None, len(ref), "skipped: onnxruntime-genai is not installed")
    except Exception as e:
        return StockCheck("onnxruntime-genai", False, None, len(ref), _line(e))
    return StockCheck("onnxruntime-genai", True, got == ref, len(ref))


def _chat_reference(model, tok, n: int) -> tuple[list[dict], str] | None:
    if not getattr(tok, "chat_template", None):
        return None
    messages = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = _pt_greedy(model, list(ids), n, stop_at_eos=True, eos=tok.eos_token_id)
    return messages, tok.decode(out, skip_special_tokens=True).strip()


def check_llama_chat(gguf: Path, messages: list[dict], ref_text: str, n: int) -> StockCheck:
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=1, verbose=False)
        out = llm.create_chat_completion(messages=messages, max_tokens=n, temperature=0.0, seed=0)
        text = (out["choices"][0]["message"]["content"] or "").strip()
        llm.close()
    except ImportError:
        return StockCheck("llama-cpp-python chat", False, None, n, "skipped: llama-cpp-python is not installed")
    except Exception as e:
        return StockCheck("llama-cpp-python chat", False, None, n, _line(e))
    return StockCheck("llama-cpp-python chat", True, text == ref_text, n, "" if text == ref_text else text[:120])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def check_llama_server(gguf: Path, messages: list[dict], ref_text: str, n: int, start_s: float = 120) -> StockCheck:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (a child process, stopped afterwards)."""
    name = "llama-cpp-python server"
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return StockCheck(name, False, None, n, "skipped: llama-cpp-python[server] is not installed")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "512", "--n_threads", "1", "--verbose", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_PROXY": "127.0.0.1"})
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > start_s:
                    err = proc.stderr.read() if proc.poll() is not None else "did not start in time"
                    return StockCheck(name, False, None, n, (err.strip().splitlines() or ["exited"])[-1][:200])
                time.sleep(0.5)
        out = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                    {"messages": messages, "max_tokens": n, "temperature": 0.0, "seed": 0}, timeout=300)
        text = (out["choices"][0]["message"]["content"] or "").strip()
    except Exception as e:
        return StockCheck(name, True, None, n, _line(e))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return StockCheck(name, True, text == ref_text, n, "" if text == ref_text else text[:120])


def stock_checks(artifact: str | Path, model, tok, tokens: int = 32) -> list[dict]:
    """Every stock-runtime check that applies to ``artifact`` (see the module doc), as JSON-ready dicts."""
    artifact = Path(artifact)
    if artifact.suffix == ".gguf":
        chat = _chat_reference(model, tok, tokens)
        if chat is None:
            skip = "skipped: the model has no chat template"
            return [asdict(StockCheck(r, False, None, tokens, skip))
                    for r in ("llama-cpp-python chat", "llama-cpp-python server")]
        messages, ref_text = chat
        return [asdict(check_llama_chat(artifact, messages, ref_text, tokens)),
                asdict(check_llama_server(artifact, messages, ref_text, tokens))]
    ids = tok(PROMPT).input_ids
    ref = _pt_greedy(model, ids, tokens)
    return [asdict(check_optimum(artifact, ids, ref)), asdict(check_genai(artifact, ids, ref))]
