"""Command-line options checked before any work, each message giving the allowed range. One function per command
(``check_prune``, ``check_eval``, ``check_finetune``, ``check_run``); the ranges that depend on the model (layers,
KV heads, context length) are read from its config (cheap: no weights are loaded).

``--opt key=value`` options are typed by their owners (:mod:`edgeprune.typed_options`) and checked against the
chosen configuration by ``PruneConfig.validate``; fine-tuning hyper-parameters by ``FinetuneConfig.validate``.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import EdgepruneError

SEED_MAX = 2 ** 32 - 1            # numpy, torch and random all accept it
CALIB_SAMPLES_MAX = 65_536        # 65k windows of 128 tokens = 8.4M tokens: far beyond what scores need
THREADS_MAX = 1024


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= SEED_MAX:
        raise EdgepruneError(f"{flag} {seed} is out of range; use 0 to {SEED_MAX}")


def check_threads(n: int | None, flag: str = "--threads") -> None:
    if n is not None and not 1 <= n <= THREADS_MAX:
        raise EdgepruneError(f"{flag} {n} is out of range; use 1 to {THREADS_MAX}")


def check_finite(v: float, flag: str, rule: str = "a finite number") -> None:
    if not math.isfinite(v):
        raise EdgepruneError(f"{flag} {v} is not {rule}; give {rule}")


def model_limits(model) -> dict:
    """Layers, the smallest per-layer KV head count and the context length, from the model's config."""
    from .models import read_config, resolve_dir, shapes_from_config

    d = read_config(resolve_dir(model))
    shapes = shapes_from_config(d)
    return {"layers": len(shapes), "min_kv": min(s.num_key_value_heads for s in shapes),
            "context": int(d.get("max_position_embeddings") or 2048)}


def check_context(n: int, flag: str, lim: dict, lo: int) -> None:
    if not lo <= n <= lim["context"]:
        raise EdgepruneError(f"{flag} {n} is out of range for this model; use {lo} to {lim['context']} (its "
                             "max_position_embeddings)")


def check_calib_samples(n: int, flag: str = "--calib-samples") -> None:
    if not 1 <= n <= CALIB_SAMPLES_MAX:
        raise EdgepruneError(f"{flag} {n} is out of range; use 1 to {CALIB_SAMPLES_MAX:,}")


def check_prune(a) -> None:
    """``edgeprune prune``: seed, calibration size and length, skipped layers and --min-kv against the model."""
    check_seed(a.seed)
    check_calib_samples(a.calib_samples)
    lim = model_limits(a.model)
    check_context(a.calib_len, "--calib-len", lim, 8)
    L = lim["layers"]
    first, last = a.skip_first or 0, a.skip_last or 0
    for flag, v in (("--skip-first", a.skip_first), ("--skip-last", a.skip_last)):
        if v is not None and not 0 <= v <= L - 1:
            raise EdgepruneError(f"{flag} {v} is out of range for this {L}-layer model; use 0 to {L - 1}")
    if first + last > L - 1:
        raise EdgepruneError(f"--skip-first {first} + --skip-last {last} leave no layer of this {L}-layer model to "
                             f"prune; keep their sum <= {L - 1}")
    if not 0 <= a.min_kv <= lim["min_kv"]:
        raise EdgepruneError(f"--min-kv {a.min_kv} is out of range for this model (its layers have {lim['min_kv']} "
                             f"KV heads or more); use 0 to {lim['min_kv']}")


def check_eval(a) -> None:
    lim = model_limits(a.model)
    check_context(a.seq_len, "--seq-len", lim, 2)


def check_finetune(a) -> None:
    """``edgeprune finetune``: what FinetuneConfig.validate cannot know (the model's context, threads)."""
    check_threads(a.threads)
    check_context(a.seq_len, "--seq-len", model_limits(a.model), 8)


def check_run(cfg) -> None:
    """``edgeprune run``: every option before the first stage (a bad --method no longer fails after planning)."""
    from .allocation import ALLOCATORS
    from .importance import get_method

    get_method(cfg.method)   # raises one line listing the methods
    if cfg.allocation is not None and cfg.allocation not in ALLOCATORS:
        raise EdgepruneError(f"--allocation {cfg.allocation} unknown; choose from {', '.join(ALLOCATORS)}")
    check_seed(cfg.seed)
    check_calib_samples(cfg.calib_samples)
    check_threads(cfg.threads)
    check_finite(cfg.finetune_minutes, "--finetune-minutes")
    check_finite(cfg.margin_pct, "--margin-pct")
    if cfg.mlp_multiple < 1:
        raise EdgepruneError(f"--mlp-multiple {cfg.mlp_multiple} is out of range; use 1 or more (32 or 256 suit "
                             "quantized formats)")
