"""Proposal backends for Self-Pruner: who generates the initial population and the offspring.

* :class:`GABackend` — classical GA [R]: initial population = the uniform vector plus Gaussian perturbations
  of it; crossover = tournament selection (k=3) of two parents, then uniform or BLX-α blend crossover; mutation =
  a tournament-selected parent plus Gaussian noise (σ = ``mutation_sigma``).
* :class:`LLMBackend` — the paper's scheme: the LLM sees the space and the population as (rates, ppl) pairs and
  replies with a JSON list of rate lists. Replies are parsed strictly (:func:`parse_reply`); a malformed or late
  reply, or any error, is reported as a note (logged by the search) and the missing children come from the GA.
  Subclasses implement ``chat(messages) -> str``:

  - :class:`LlamaCppBackend` — a local GGUF chat model via llama-cpp-python (``llm_gguf`` option or
    ``EDGEPRUNE_LLM_GGUF``). Its time is bounded by ``max_tokens`` (in-process generation cannot be interrupted).
  - :class:`OpenAIBackend` — any OpenAI-compatible ``/chat/completions`` endpoint: base URL and model from the
    options ``llm_base_url`` / ``llm_model`` or ``EDGEPRUNE_LLM_BASE_URL`` / ``EDGEPRUNE_LLM_MODEL``; the key only
    from the environment (``EDGEPRUNE_LLM_API_KEY``, else ``OPENAI_API_KEY``), never logged; HTTP timeout option.
  - :class:`ScriptedBackend` — replays fixed reply strings (reproducible runs, tests, debugging prompts offline).

The prompt wording is ours [R]; the paper's prompts (its Figure 2) were not available.
"""
from __future__ import annotations

import json
import math
import os
import re
import urllib.request
from dataclasses import dataclass

import numpy as np

from ..typed_options import TypedOptions, option
from .search import Individual, Space, crossover, mutate, tournament


@dataclass(frozen=True)
class BackendOptions(TypedOptions):
    """The proposal backend's ``--opt`` options (:func:`make_backend`); an empty ``llm_*`` string falls back to its
    ``EDGEPRUNE_LLM_*`` environment variable."""

    OWNER = "the self-pruner backend"
    backend: str = option("auto", choices=("auto", "ga", "llama-cpp", "openai"), doc="who proposes candidates")
    crossover: str = option("uniform", choices=("uniform", "blend"), doc="GA crossover (blend: BLX-alpha)")
    mutation_sigma: float = option(0.05, lo=0.0, doc="GA mutation noise")
    init_sigma: float = option(0.1, lo=0.0, doc="noise of the initial population around the uniform rates")
    seed_uniform: bool = option(True, doc="the uniform rates are one of the initial individuals")
    llm_gguf: str = option("", doc="llama-cpp: the chat model's GGUF (else EDGEPRUNE_LLM_GGUF)")
    llm_base_url: str = option("", doc="openai: the endpoint's base URL (else EDGEPRUNE_LLM_BASE_URL)")
    llm_model: str = option("", doc="openai: the model name (else EDGEPRUNE_LLM_MODEL)")
    llm_temperature: float = option(0.7, lo=0.0, hi=2.0, doc="sampling temperature of the LLM")
    llm_max_tokens: int = option(2048, lo=1, doc="llama-cpp: tokens per reply at most")
    llm_timeout: float = option(120.0, lo=0.1, doc="openai: HTTP timeout per reply, seconds")


class ProposalBackend:
    """``propose(op, space, population, k, rng) -> (raw vectors, notes)``; ``op`` in init | crossover | mutation."""

    name = "base"

    def propose(self, op: str, space: Space, pop: list[Individual], k: int, rng: np.random.Generator):
        raise NotImplementedError


class GABackend(ProposalBackend):
    name = "ga"

    def __init__(self, crossover: str = "uniform", mutation_sigma: float = 0.05, init_sigma: float = 0.1,
                 seed_uniform: bool = True):
        self.kind, self.msig, self.isig, self.seed_uniform = crossover, mutation_sigma, init_sigma, seed_uniform

    def propose(self, op, space, pop, k, rng):
        if op == "init":
            out = [[space.beta] * space.n] if self.seed_uniform else []
            while len(out) < k:
                out.append(list(space.beta + rng.normal(0.0, self.isig, space.n)))
            return out[:k], []
        fits = [ind.fitness for ind in pop]
        out = []
        for _ in range(k):
            a = pop[tournament(fits, rng)].p
            if op == "crossover":
                out.append(crossover(a, pop[tournament(fits, rng)].p, rng, self.kind))
            else:
                out.append(mutate(a, rng, self.msig))
        return out, []


_LIST = re.compile(r"\[\s*\[.*\]\s*\]", re.S)


def parse_reply(text: str, n: int) -> list[list[float]]:
    """Strict parse: the reply must contain one JSON list of lists of ``n`` finite numbers (a ```json fence and
    surrounding prose are tolerated; anything else raises ``ValueError``)."""
    if not isinstance(text, str):
        raise ValueError("reply is not text")
    m = _LIST.search(text)
    if not m:
        raise ValueError("no JSON list of lists in the reply")
    try:
        data = json.loads(m.group(0))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg}") from None
    out = []
    for row in data:
        if not isinstance(row, list) or len(row) != n:
            raise ValueError(f"a child is not a list of {n} numbers")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row):
            raise ValueError("a child holds a non-numeric or non-finite value")
        out.append([float(x) for x in row])
    if not out:
        raise ValueError("empty list")
    return out


def _fmt(p) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in p) + "]"


def build_prompt(op: str, space: Space, pop: list[Individual], k: int, model_desc: str) -> list[dict]:
    rule = (f"Each candidate is a list of exactly {space.n} pruning rates, one per prunable decoder layer (input "
            f"side first), each in [{space.lo:.2f}, {space.hi:.2f}], whose mean is {space.beta:.4f}"
            + ("" if len(set(space.w)) == 1 else f" when weighted by the layer sizes {_fmt(space.w)}") + ".")
    sys = ("You are an expert in structured pruning of large language models and in evolutionary search. "
           "Reply with a JSON list of lists of numbers only, no prose.")
    if op == "init":
        task = (f"Model: {model_desc}. Propose {k} diverse initial candidates for the layer-wise pruning rates, using "
                "your knowledge of which layers of a transformer are redundant.")
    else:
        table = "\n".join(f"{_fmt(ind.p)} -> perplexity {ind.fitness:.4f}" for ind in pop)
        what = ("select parents and produce {k} children by crossover (combining parents' rates)" if op == "crossover"
                else "select parents and produce {k} children by mutation (small changes to a parent's rates)")
        task = (f"Model: {model_desc}. Current population (rates -> perplexity, lower is better):\n{table}\n"
                f"{what.format(k=k)}, aiming at lower perplexity.")
    return [{"role": "system", "content": sys}, {"role": "user", "content": f"{task}\n{rule}\nOutput {k} lists."}]


class LLMBackend(ProposalBackend):
    """Asks an LLM; falls back to the GA for anything missing or malformed."""

    name = "llm"

    def __init__(self, fallback: GABackend | None = None, model_desc: str = "a LLaMA-family decoder"):
        self.fallback = fallback or GABackend()
        self.model_desc = model_desc

    def chat(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def propose(self, op, space, pop, k, rng):
        notes, kids = [], []
        try:
            reply = self.chat(build_prompt(op, space, pop, k, self.model_desc))
            try:
                kids = parse_reply(reply, space.n)[:k]
                notes.append({"backend": self.name, "status": "ok", "children": len(kids)})
            except ValueError as e:
                notes.append({"backend": self.name, "status": "malformed", "error": str(e),
                              "reply": str(reply)[:500]})
        except Exception as e:  # noqa: BLE001 — timeouts, HTTP and runtime errors must not stop the search
            notes.append({"backend": self.name, "status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if len(kids) < k:
            extra, _ = self.fallback.propose(op, space, pop, k - len(kids), rng)
            kids += extra
            notes.append({"backend": "ga", "status": "fallback", "children": len(extra)})
        return kids, notes


class ScriptedBackend(LLMBackend):
    """Replays ``replies`` in order (cycling); records the prompts it was given."""

    name = "scripted"

    def __init__(self, replies: list[str], **kw):
        super().__init__(**kw)
        self.replies, self.i, self.prompts = list(replies), 0, []

    def chat(self, messages):
        self.prompts.append(messages)
        r = self.replies[self.i % len(self.replies)]
        self.i += 1
        if isinstance(r, Exception):
            raise r
        return r


class LlamaCppBackend(LLMBackend):
    name = "llama-cpp"

    def __init__(self, gguf: str, temperature: float = 0.7, max_tokens: int = 2048, n_ctx: int = 8192, seed: int = 0,
                 **kw):
        super().__init__(**kw)
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, seed=seed, verbose=False)
        self.temperature, self.max_tokens = temperature, max_tokens

    def chat(self, messages):
        r = self.llm.create_chat_completion(messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        return r["choices"][0]["message"]["content"]


class OpenAIBackend(LLMBackend):
    name = "openai"

    def __init__(self, base_url: str, model: str, temperature: float = 0.7, timeout: float = 120.0, **kw):
        super().__init__(**kw)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.timeout = model, temperature, timeout

    def chat(self, messages):
        key = os.environ.get("EDGEPRUNE_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 — user-configured endpoint
            return json.loads(resp.read())["choices"][0]["message"]["content"]


def make_backend(opts: dict, seed: int = 0, model_desc: str = "a LLaMA-family decoder") -> ProposalBackend:
    """``backend`` = auto (llama-cpp if a GGUF is configured, else openai if a base URL is, else ga) | ga |
    llama-cpp | openai; ``opts``: the raw ``--opt`` dict (its :class:`BackendOptions` keys are read, checked)."""
    o = BackendOptions.parse(opts)
    ga = GABackend(crossover=o.crossover, mutation_sigma=o.mutation_sigma, init_sigma=o.init_sigma,
                   seed_uniform=o.seed_uniform)
    gguf = o.llm_gguf or os.environ.get("EDGEPRUNE_LLM_GGUF")
    url = o.llm_base_url or os.environ.get("EDGEPRUNE_LLM_BASE_URL")
    kind = o.backend
    if kind == "auto":
        kind = "llama-cpp" if gguf else "openai" if url else "ga"
    temp = o.llm_temperature
    if kind == "ga":
        return ga
    if kind == "llama-cpp":
        if not gguf:
            raise ValueError("backend llama-cpp needs --opt llm_gguf=PATH or EDGEPRUNE_LLM_GGUF")
        return LlamaCppBackend(gguf, temperature=temp, max_tokens=o.llm_max_tokens, seed=seed,
                               fallback=ga, model_desc=model_desc)
    if kind == "openai":
        model = o.llm_model or os.environ.get("EDGEPRUNE_LLM_MODEL")
        if not (url and model):
            raise ValueError("backend openai needs llm_base_url and llm_model (options or EDGEPRUNE_LLM_* env vars)")
        return OpenAIBackend(url, model, temperature=temp, timeout=o.llm_timeout, fallback=ga,
                             model_desc=model_desc)
    raise ValueError(f"self-pruner backend {kind} unknown; use auto, ga, llama-cpp or openai")
