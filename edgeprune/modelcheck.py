"""The one model validator: every config field edgeprune reads (typed and range-checked, in :data:`FIELDS`),
weight dtypes and finiteness (read in blocks, never memory-mapped), and the tokenizer against ``vocab_size``.

``models.read_config`` runs :func:`check_config` for every reader of a config; ``models.check_model_dir`` runs the
weight checks on the files (before any work: ``run``, ``prune``), ``models.load`` on the tensors it loaded, and
``models.load_tokenizer`` the vocabulary check. Each failure is one line naming the file, field or tensor and the fix.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .errors import EdgepruneError


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _pos_int(v) -> bool:
    return _int(v) and 0 < v <= 1 << 40


def _token_id(v) -> bool:
    return v is None or (_int(v) and v >= 0) or (isinstance(v, list) and all(_int(x) and x >= 0 for x in v))


_ACTS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "gelu_fast", "quick_gelu")
# field -> (required, test, what the value must be)
FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "architectures": (True, lambda v: isinstance(v, list) and len(v) >= 1 and all(isinstance(x, str) for x in v),
                      "a list of class names, e.g. [\"LlamaForCausalLM\"]"),
    "hidden_size": (True, _pos_int, "a positive integer"),
    "num_hidden_layers": (True, _pos_int, "a positive integer"),
    "num_attention_heads": (True, _pos_int, "a positive integer"),
    "intermediate_size": (True, _pos_int, "a positive integer"),
    "vocab_size": (True, _pos_int, "a positive integer"),
    "num_key_value_heads": (False, lambda v: v is None or _pos_int(v), "a positive integer"),
    "head_dim": (False, lambda v: v is None or (_pos_int(v) and v % 2 == 0), "a positive even integer (RoPE)"),
    "max_position_embeddings": (False, _pos_int, "a positive integer"),
    "rms_norm_eps": (False, lambda v: _num(v) and 0 < v < 1, "a number in (0, 1), e.g. 1e-5"),
    "rope_theta": (False, lambda v: _num(v) and v > 0, "a positive number"),
    "rope_scaling": (False, lambda v: v is None or isinstance(v, dict), "null or a mapping"),
    "rope_parameters": (False, lambda v: v is None or isinstance(v, dict), "null or a mapping"),
    "tie_word_embeddings": (False, lambda v: isinstance(v, bool), "true or false"),
    "attention_bias": (False, lambda v: isinstance(v, bool), "true or false"),
    "mlp_bias": (False, lambda v: isinstance(v, bool), "true or false"),
    "use_cache": (False, lambda v: isinstance(v, bool), "true or false"),
    "attention_dropout": (False, lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "initializer_range": (False, lambda v: _num(v) and v >= 0, "a non-negative number"),
    "hidden_act": (False, lambda v: v in _ACTS, f"one of {', '.join(_ACTS)}"),
    "sliding_window": (False, lambda v: v is None or _pos_int(v), "null or a positive integer"),
    "model_type": (False, lambda v: v is None or isinstance(v, str), "a string"),
    "torch_dtype": (False, lambda v: v is None or v in ("float32", "float16", "bfloat16"),
                    "float32, float16 or bfloat16"),
    "dtype": (False, lambda v: v is None or v in ("float32", "float16", "bfloat16"), "float32, float16 or bfloat16"),
    "bos_token_id": (False, _token_id, "null, a token id or a list of ids"),
    "eos_token_id": (False, _token_id, "null, a token id or a list of ids"),
    "pad_token_id": (False, _token_id, "null, a token id or a list of ids"),
    "pruning": (False, lambda v: isinstance(v, dict), "a mapping (written by edgeprune)"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


def _bad(cfg_file, key: str, v, what: str) -> EdgepruneError:
    shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
    return EdgepruneError(f"{cfg_file}: field '{key}' must be {what} (got {shown}); restore the model's config.json")


def check_config(d: dict, cfg_file, keys: tuple[str, ...] | None = None) -> dict:
    """Every field of :data:`FIELDS` (or only ``keys``) typed and in range, then the cross-field rules (heads
    divide, head_dim even)."""
    for key, (required, ok, what) in FIELDS.items():
        if keys is not None and key not in keys:
            continue
        if key not in d:
            if required:
                raise EdgepruneError(f"{cfg_file}: field '{key}' is missing (it must be {what}); restore the "
                                     "model's config.json")
            continue
        if not ok(d[key]):
            raise _bad(cfg_file, key, d[key], what)
    if keys is not None:
        return d
    nq, nkv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if "pruning" not in d and nq % nkv:
        raise _bad(cfg_file, "num_key_value_heads", nkv, f"a divisor of num_attention_heads {nq}")
    if d.get("head_dim") is None and d["hidden_size"] % nq:
        raise _bad(cfg_file, "num_attention_heads", nq, f"a divisor of hidden_size {d['hidden_size']} (or give "
                   "head_dim)")
    if d.get("head_dim") is None and (d["hidden_size"] // nq) % 2:
        raise _bad(cfg_file, "hidden_size", d["hidden_size"], "such that hidden_size / num_attention_heads is even "
                   "(RoPE)")
    return d


def check_header_dtypes(f: Path, header: dict) -> None:
    """Refuse a safetensors file holding non-float weights (int8/uint8 quantized checkpoints, f64, f8)."""
    for name, v in header.items():
        if name != "__metadata__" and isinstance(v, dict) and v.get("dtype") not in FLOAT_DTYPES:
            raise EdgepruneError(f"{f}: weight {name} has dtype {v.get('dtype')}; edgeprune reads float checkpoints "
                                 f"({', '.join(FLOAT_DTYPES)}): pass the original (not quantized) weights")


def check_finite(name: str, t, where) -> None:
    """Refuse a tensor with NaN or Inf values (checked in row blocks: never a full-size temporary)."""
    import torch

    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        blk = flat[i:i + step]
        if not bool(torch.isfinite(blk).all()):
            n = sum(int((~torch.isfinite(flat[j:j + step])).sum()) for j in range(0, flat.numel(), step))
            raise EdgepruneError(f"{where}: weight {name} holds {n} NaN/Inf value(s); the checkpoint is corrupt or "
                                 "diverged: re-download it or use an earlier checkpoint (edgeprune refuses "
                                 "non-finite weights)")


def read_safetensors_header(f: Path) -> tuple[int, dict]:
    """(offset of the data, header dict) of a safetensors file; one line naming the file when it is not one."""
    import json

    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or 8 + n > size:
                raise EdgepruneError(f"{f} is truncated or not a safetensors file ({size} bytes); re-download or "
                                     "re-export the weights")
            hdr = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgepruneError(f"{f} has a corrupt safetensors header; re-download or re-export the weights") from None
    if not isinstance(hdr, dict):
        raise EdgepruneError(f"{f} has a corrupt safetensors header; re-download or re-export the weights")
    return 8 + n, hdr


# a float is NaN or Inf exactly when all its exponent bits are set: (unsigned view, exponent mask) per dtype
EXPONENT_MASKS = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}
FINITE_BLOCK = 16 << 20   # bytes read at a time


def check_files_finite(files: list[Path]) -> None:
    """Every float tensor of the safetensors ``files`` is finite. Each tensor's bytes are read with ``pread`` in
    :data:`FINITE_BLOCK` blocks into one buffer (RSS + 16 MiB whatever the file size: a memory map would keep every
    touched page of the file resident, i.e. the whole checkpoint file) and tested by their exponent bits."""
    import os

    import numpy as np

    buf = bytearray(FINITE_BLOCK)
    for f in files:
        start, hdr = read_safetensors_header(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            for name, v in hdr.items():
                if name == "__metadata__" or not isinstance(v, dict) or v.get("dtype") not in EXPONENT_MASKS:
                    continue
                kind, mask = EXPONENT_MASKS[v["dtype"]]
                b, e = (start + int(x) for x in v["data_offsets"])
                bad = 0
                for off in range(b, e, FINITE_BLOCK):
                    got = os.preadv(fd, [memoryview(buf)[:min(FINITE_BLOCK, e - off)]], off)
                    bits = np.frombuffer(buf, dtype=kind, count=got // np.dtype(kind).itemsize)
                    bad += int(np.count_nonzero((bits & mask) == mask))
                if bad:
                    raise EdgepruneError(f"{f}: weight {name} holds {bad} NaN/Inf value(s); the checkpoint is corrupt "
                                         "or diverged: re-download it or use an earlier checkpoint (edgeprune refuses "
                                         "non-finite weights)")
        finally:
            os.close(fd)


def check_vocab(tok, vocab_size: int, where) -> None:
    """A tokenizer whose ids reach past the embedding table would index out of range."""
    n = len(tok)
    if n > vocab_size:
        raise EdgepruneError(f"{where}: the tokenizer has {n} tokens but config.json vocab_size is {vocab_size}; "
                             "restore the tokenizer files that came with this model")
