"""Taylor importance of coupled groups (LLM-Pruner; reused by SAAP and MINI-LLM).

For a member weight ``W`` of a group with gradient ``g = ∂L/∂W`` (and diagonal Fisher ``F ≈ mean_n g_n²``):

* ``vectorize`` (vector-wise):        ``|Σ_k W_k g_k|`` over each row/column, summed over the group's channels
* ``param_first`` (element-wise, 1st): ``Σ_k |W_k g_k|``
* ``param_second`` (element-wise, 2nd): ``Σ_k |W_k F_kk W_k|``
* ``param_mix``:                      ``Σ_k |W_k g_k − ½ W_k F_kk W_k|``

Group score = sum over members (q/k/v rows and o columns of a KV group; gate/up rows and the down column of a
channel) — LLM-Pruner's default ``sum`` aggregation.

GQA coupling (``gqa_fold``). A KV group ``h`` serves query heads ``h·r … h·r + r − 1`` (``r = n_rep``; HF's
``repeat_kv``), and those are the heads removed with it — in edgeprune and in the official code alike (its expand
index mapping sends KV channel ``i`` to query channels ``r·i … r·i + r − 1``). The official ``llama3.py`` path
(``TaylorImportance`` in ``LLMPruner/pruner/hf_llama_pruner.py``) *scores* the group differently: it folds a
member's per-channel salience of length ``n_q·d`` onto the ``n_kv·d`` KV channels by
``view(r, n_kv·d).sum(0)``, so KV head ``h`` is credited with query heads ``h, h + n_kv, h + 2·n_kv, …``.
``heads`` (default) scores the heads that are removed; ``official`` reproduces the official fold (read from the
code, reimplemented here) so that its selections can be matched exactly (see benchmarks/llm_pruner_fidelity.md).
With ``r = 1`` both are the same.

Calibration windows (:func:`gradient_windows`). The official code draws ``num_examples`` windows of ``seq_len``
tokens at random offsets inside tokenized documents (``get_examples``), so a window begins mid-text, without BOS
(unless it happens to start at offset 0); edgeprune's calibration rows all begin with BOS, which
``gradient_windows`` drops by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import LLM_PRUNER_SKIP, Method, MethodOptions, option

from ..groups import LayerGroups
from ..models import decoder_layers

KINDS = ("vectorize", "param_first", "param_second", "param_mix")
GQA_FOLDS = ("heads", "official")
# (module path inside the layer, channel dim, which group kind, span key)
MEMBERS = (("self_attn.q_proj", 0, "attn", "q"), ("self_attn.k_proj", 0, "attn", "kv"),
           ("self_attn.v_proj", 0, "attn", "kv"), ("self_attn.o_proj", 1, "attn", "q"),
           ("mlp.gate_proj", 0, "mlp", "c"), ("mlp.up_proj", 0, "mlp", "c"), ("mlp.down_proj", 1, "mlp", "c"))


def submodule(layer, path: str):
    mod = layer
    for p in path.split("."):
        mod = getattr(mod, p)
    return mod


def salience(w: torch.Tensor, g: torch.Tensor | None, fisher: torch.Tensor | None, kind: str, dim: int) -> torch.Tensor:
    """Per-channel salience along ``dim`` (0: rows, 1: columns)."""
    other = 1 - dim
    w = w.double()
    if kind == "vectorize":
        return (w * g.double()).sum(other).abs()
    if kind == "param_first":
        return (w * g.double()).abs().sum(other)
    if kind == "param_second":
        return (w * fisher.double() * w).abs().sum(other)
    if kind == "param_mix":
        return (w * g.double() - 0.5 * w * fisher.double() * w).abs().sum(other)
    raise ValueError(f"unknown Taylor kind {kind}; use one of {KINDS}")


def kv_group_sum(s: torch.Tensor, lg: LayerGroups, span: str, gqa_fold: str = "heads") -> torch.Tensor:
    """Sum a member's per-channel salience ``s`` into its ``n_kv`` attention groups.

    ``span`` ``kv`` (k/v rows, ``n_kv·d`` channels): group h takes channels ``h·d … (h+1)·d − 1``. ``span`` ``q``
    (q rows / o columns, ``n_q·d`` channels): ``heads`` gives group h the channels of query heads ``h·r … h·r+r−1``
    (``s.reshape(n_kv, r·d).sum(1)``); ``official`` first folds ``s`` as ``s.view(r, n_kv·d).sum(0)`` (the official
    llama3.py reduction), i.e. query heads ``h, h+n_kv, …``."""
    if gqa_fold not in GQA_FOLDS:
        raise ValueError(f"unknown gqa_fold {gqa_fold}; use one of {GQA_FOLDS}")
    if span == "q" and gqa_fold == "official":
        s = s.reshape(-1, lg.n_kv * lg.head_dim).sum(0)
    return s.reshape(lg.n_kv, -1).sum(1)


def gradient_windows(ids: torch.Tensor, n: int, length: int, bos_id: int | None, keep_bos: bool = False) -> torch.Tensor:
    """The first ``n`` calibration rows cut to ``length`` tokens, for the Taylor backward pass.

    With ``keep_bos`` false and every row starting with ``bos_id``, the BOS column is dropped first: the windows are
    then ``length`` consecutive text tokens from a random offset inside a document, as the official
    ``get_examples`` draws them; otherwise ``ids[:n, :length]``. Fewer tokens are returned if the rows are short."""
    ids = ids[:n]
    if not keep_bos and bos_id is not None and ids.shape[1] > 1 and bool((ids[:, 0] == bos_id).all()):
        ids = ids[:, 1:]
    return ids[:, :length]


def group_taylor(model, groups: list[LayerGroups], grad: Callable[[int, str], torch.Tensor],
                 fisher: Callable[[int, str], torch.Tensor] | None, kind: str, gqa_fold: str = "heads"):
    """Per-layer (attn [n_kv], mlp [n_ff]) Taylor scores. ``grad(i, member_path)`` returns ∂L/∂W of that member;
    ``gqa_fold`` says how q/o channels are credited to KV groups (:func:`kv_group_sum`)."""
    attn, mlp = [], []
    for i, (layer, lg) in enumerate(zip(decoder_layers(model), groups)):
        a = torch.zeros(lg.n_kv, dtype=torch.float64)
        c = torch.zeros(lg.n_mlp, dtype=torch.float64)
        for path, dim, which, span in MEMBERS:
            w = submodule(layer, path).weight.data
            s = salience(w, grad(i, path) if kind != "param_second" else None,
                         fisher(i, path) if fisher is not None and kind in ("param_second", "param_mix") else None,
                         kind, dim)
            if which == "attn":
                a += kv_group_sum(s, lg, span, gqa_fold)
            else:
                c += s
        attn.append(a)
        mlp.append(c)
    return attn, mlp


def backward_grads(model, ids: torch.Tensor, batch_size: int = 1, fisher: bool = False):
    """One backward pass over the calibration set (LM loss); returns (grads, fisher) dicts keyed (layer, path).

    With ``fisher``, per-batch squared gradients are averaged (LLM-Pruner's ``acc_grad`` diagonal Fisher).
    The model's own ``.grad`` fields are cleared afterwards.
    """
    params = {}
    for i, layer in enumerate(decoder_layers(model)):
        for path, *_ in MEMBERS:
            params[(i, path)] = submodule(layer, path).weight
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    grads = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    fish = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()} if fisher else None
    nb = 0
    try:
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b:b + batch_size]
            loss = model(x, labels=x, use_cache=False).loss
            gs = torch.autograd.grad(loss, list(params.values()))
            for k, g in zip(params, gs):
                grads[k] += g.float()
                if fish is not None:
                    fish[k] += g.float() ** 2
            nb += 1
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
            p.grad = None
    for k in grads:
        grads[k] /= nb
        if fish is not None:
            fish[k] /= nb
    return grads, fish


@dataclass(frozen=True)
class BackwardOptions(MethodOptions):
    """Options shared by the methods scored from one backward pass (LLM-Pruner's calibration slice)."""

    grad_samples: int = option(10, lo=1, doc="calibration rows in the backward pass")
    grad_len: int = option(64, lo=2, doc="tokens per row in the backward pass")


class BackwardMethod(Method):
    """Capabilities of a method scored from one backward pass of the model's LM loss (LLM-Pruner, SAAP): no
    layer statistics, gradients, a model-level loss (block-local when streamed), LLM-Pruner's skipped layers."""

    Options = BackwardOptions
    needs_calibration = False
    needs_gradients = True
    loss_scope = "model"
    default_skip = staticmethod(LLM_PRUNER_SKIP)

    @staticmethod
    def grad_ids(ctx, o: BackwardOptions) -> torch.Tensor:
        return ctx.calib_ids[: o.grad_samples, : o.grad_len]
