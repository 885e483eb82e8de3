"""Thin runtime wrappers with one interface: ``logits(ids) -> [T, V] float32``, ``greedy(ids, n)``, ``nll(ids)``.

* :class:`LlamaCppRuntime` — a GGUF in llama-cpp-python with ``logits_all=True``. ``kv="f32"`` stores the KV
  cache in F32 (``type_k = type_v = GGML_TYPE_F32 = 0``); the default F16 cache alone costs about 1e-2 in logits.
  Extra buffer types (AMX / CPU_REPACK) are always disabled: with them ggml's AMX path segfaults on quantized
  models on this machine kind (feasibility Q1), the same as llama.cpp's ``--no-extra-bufts``.
* :class:`OrtRuntime` — an exported ONNX decoder (``past_key_values.{i}.key`` -> ``present.{i}.key``) in
  onnxruntime, fed with empty pasts ``[B, kv_i, 0, hd]`` for prefill and its own presents for decode.

Neither imports torch, so the speed subprocess measures the runtime's memory alone.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0


def _no_extra_bufts() -> None:
    import llama_cpp.llama_cpp as ll

    if getattr(ll.llama_model_default_params, "_edgeprune", False):
        return
    orig = ll.llama_model_default_params

    def patched():
        p = orig()
        p.use_extra_bufts = False
        return p

    patched._edgeprune = True
    ll.llama_model_default_params = patched   # Llama.__init__ looks it up on this module at call time


def log_softmax_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-position NLL of ``ids[1:]`` given ``logits[:-1]`` (float64 log-sum-exp)."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return lse - x[np.arange(len(x)), ids[1:]]


class Runtime:
    """What both runtimes share: greedy decoding on top of their ``prefill``/``step``."""

    def greedy(self, ids, n: int) -> list[int]:
        out, last = [], self.prefill(ids)
        for _ in range(n):
            out.append(int(last.argmax()))
            last = self.step(out[-1])
        return out


class LlamaCppRuntime(Runtime):
    kind = "gguf"

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2, kv: str = "f16",
                 logits_all: bool = True, verbose: bool = False, deployed: bool = False):
        from edgeprune.errors import EdgepruneError

        try:
            import llama_cpp
        except ImportError:
            raise EdgepruneError("llama-cpp-python is not installed; run scripts/install.sh (GGML_NATIVE=OFF build)") from None
        _no_extra_bufts()
        kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if kv == "f32" else {}
        try:
            if deployed:   # as an application runs it: llama.cpp's default micro-batch and flash attention (which
                # also stops llama.cpp padding every layer's V cache to the widest layer of a per-layer model)
                kw.update(n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512), flash_attn=True)
            else:
                kw.update(n_batch=n_ctx, n_ubatch=n_ctx)
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, logits_all=logits_all, verbose=verbose, **kw)
        except ValueError as e:
            raise EdgepruneError(f"llama.cpp cannot load {path} ({e}); the file is not a valid GGUF for this llama.cpp: "
                                 "re-export it with edgeprune export") from None
        self.n_ctx, self.vocab = n_ctx, self.llm.n_vocab()
        self._bctx = self._bbatch = None
        self._bshape = (0, 0)

    def logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def prefill(self, ids) -> np.ndarray:
        """Fresh context; returns the last position's logits."""
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[len(ids) - 1], dtype=np.float32)

    def step(self, tok: int) -> np.ndarray:
        self.llm.eval([int(tok)])
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def batch_logits(self, chunks) -> np.ndarray:
        """Logits [B, T, V] of B independent sequences in one ``llama_decode``: each chunk is its own sequence id
        in a second context on the same model (``n_seq_max = B``, one KV stream per sequence, same KV type)."""
        import llama_cpp
        from llama_cpp import _internals

        chunks = np.asarray(chunks)
        b, t = chunks.shape
        if self._bctx is None or self._bshape[0] < b or self._bshape[1] < t:
            self._close_batch()
            cp = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
            cp.n_ctx = cp.n_batch = cp.n_ubatch = b * t
            cp.n_seq_max, cp.kv_unified = b, False
            from llama_cpp._utils import suppress_stdout_stderr

            with suppress_stdout_stderr(disable=False):   # llama.cpp logs the context's sizing on stderr
                self._bctx = _internals.LlamaContext(model=self.llm._model, params=cp, verbose=False)
            self._bbatch = _internals.LlamaBatch(n_tokens=b * t, embd=0, n_seq_max=b, verbose=False)
            self._bshape = (b, t)
        self._bbatch.reset()
        for i, c in enumerate(chunks):
            self._bbatch.add_sequence(list(map(int, c)), i, True)
        self._bctx.decode(self._bbatch)
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._bctx.ctx), shape=(b * t * self.vocab,))
        res = out.reshape(b, t, self.vocab).copy()
        self._bctx.kv_cache_clear()
        return res

    def _close_batch(self) -> None:
        for x in (self._bbatch, self._bctx):
            if x is not None:
                x.close()
        self._bctx = self._bbatch = None

    def close(self) -> None:
        self._close_batch()
        self.llm.close() if hasattr(self.llm, "close") else None


class OrtRuntime(Runtime):
    kind = "onnx"

    def __init__(self, path: str | Path, threads: int = 2):
        import onnxruntime as ort

        from edgeprune.errors import EdgepruneError

        path = Path(path)
        f = path / "model.onnx" if path.is_dir() else path
        if not f.is_file():
            raise EdgepruneError(f"{path} holds no model.onnx; pass the ONNX export directory")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.L = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        self.kv = [ins[f"past_key_values.{i}.key"].shape[1] for i in range(self.L)]
        self.hd = ins["past_key_values.0.key"].shape[3]
        self.fdtype = np.float16 if "float16" in ins["past_key_values.0.key"].type else np.float32
        self.has_pos = "position_ids" in ins
        self.out_names = [o.name for o in self.sess.get_outputs()]
        v = self.sess.get_outputs()[0].shape[-1]
        self.vocab = v if isinstance(v, int) else None
        self.past: list[np.ndarray] | None = None
        self.n = 0

    def empty_past(self, b: int = 1) -> list[np.ndarray]:
        return [np.zeros((b, self.kv[i // 2], 0, self.hd), self.fdtype) for i in range(2 * self.L)]

    def run(self, ids: np.ndarray, past: list[np.ndarray], start: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: ids [B, T] after ``start`` cached positions -> (logits [B, T, V] f32, presents)."""
        b, t = ids.shape
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, start + t), np.int64)}
        if self.has_pos:
            feed["position_ids"] = np.broadcast_to(np.arange(start, start + t, dtype=np.int64), (b, t)).copy()
        for i in range(self.L):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        outs = self.sess.run(None, feed)
        return outs[0].astype(np.float32), outs[1:]

    def logits(self, ids) -> np.ndarray:
        lg, _ = self.run(np.asarray([ids]), self.empty_past(), 0)
        return lg[0]

    def batch_logits(self, chunks) -> np.ndarray:
        """Logits [B, T, V] of B equal-length sequences in one call."""
        chunks = np.asarray(chunks)
        return self.run(chunks, self.empty_past(len(chunks)), 0)[0]

    def prefill(self, ids) -> np.ndarray:
        lg, self.past = self.run(np.asarray([ids]), self.empty_past(), 0)
        self.n = len(ids)
        return lg[0, -1]

    def step(self, tok: int) -> np.ndarray:
        lg, self.past = self.run(np.asarray([[int(tok)]]), self.past, self.n)
        self.n += 1
        return lg[0, -1]

    def close(self) -> None:
        self.sess = None


def open_runtime(artifact: str | Path, threads: int = 2, kv: str = "f16", n_ctx: int = 512):
    """GGUF file -> :class:`LlamaCppRuntime`; ONNX dir or .onnx file -> :class:`OrtRuntime`."""
    p = Path(artifact)
    if artifact_kind(p) == "gguf":
        return LlamaCppRuntime(p, n_ctx=n_ctx, threads=threads, kv=kv)
    return OrtRuntime(p, threads=threads)


def artifact_kind(artifact: str | Path) -> str:
    """"gguf" for a .gguf file, "onnx" for an ONNX export directory or .onnx file; anything else is refused."""
    from edgeprune.errors import EdgepruneError

    p = Path(artifact)
    if not p.exists():
        raise EdgepruneError(f"artifact {p} does not exist; pass a .gguf file or an ONNX export directory")
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if (p.is_dir() and (p / "model.onnx").is_file()) or p.suffix == ".onnx":
        return "onnx"
    raise EdgepruneError(f"{p} is neither a .gguf file nor a directory with model.onnx")


def artifact_bytes(artifact: str | Path) -> int:
    p = Path(artifact)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and (f.suffix in (".onnx",) or "onnx" in f.name))


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
