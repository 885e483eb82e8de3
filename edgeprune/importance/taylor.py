"""Taylor importance of coupled groups (LLM-Pruner; reused by SAAP and MINI-LLM).

For a member weight ``W`` of a group with gradient ``g = ∂L/∂W`` (and diagonal Fisher ``F ≈ mean_n g_n²``):

* ``vectorize`` (vector-wise):        ``|Σ_k W_k g_k|`` over each row/column, summed over the group's channels
* ``param_first`` (element-wise, 1st): ``Σ_k |W_k g_k|``
* ``param_second`` (element-wise, 2nd): ``Σ_k |W_k F_kk W_k|``
* ``param_mix``:                      ``Σ_k |W_k g_k − ½ W_k F_kk W_k|``

Group score = sum over members (q/k/v rows and o columns of a KV group; gate/up rows and the down column of a
channel) — LLM-Pruner's default ``sum`` aggregation.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..groups import LayerGroups
from ..models import decoder_layers

KINDS = ("vectorize", "param_first", "param_second", "param_mix")
# (module path inside the layer, channel dim, which group kind, span key)
MEMBERS = (("self_attn.q_proj", 0, "attn", "q"), ("self_attn.k_proj", 0, "attn", "kv"),
           ("self_attn.v_proj", 0, "attn", "kv"), ("self_attn.o_proj", 1, "attn", "q"),
           ("mlp.gate_proj", 0, "mlp", "c"), ("mlp.up_proj", 0, "mlp", "c"), ("mlp.down_proj", 1, "mlp", "c"))


def _get(layer, path: str):
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


def group_taylor(model, groups: list[LayerGroups], grad: Callable[[int, str], torch.Tensor],
                 fisher: Callable[[int, str], torch.Tensor] | None, kind: str):
    """Per-layer (attn [n_kv], mlp [n_ff]) Taylor scores. ``grad(i, member_path)`` returns ∂L/∂W of that member."""
    attn, mlp = [], []
    for i, (layer, lg) in enumerate(zip(decoder_layers(model), groups)):
        a = torch.zeros(lg.n_kv, dtype=torch.float64)
        c = torch.zeros(lg.n_mlp, dtype=torch.float64)
        for path, dim, which, span in MEMBERS:
            w = _get(layer, path).weight.data
            s = salience(w, grad(i, path) if kind != "param_second" else None,
                         fisher(i, path) if fisher is not None and kind in ("param_second", "param_mix") else None,
                         kind, dim)
            if which == "attn":
                a += s.reshape(lg.n_kv, -1).sum(1)
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
            params[(i, path)] = _get(layer, path).weight
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
