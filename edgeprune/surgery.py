"""Physically remove groups: build smaller Linear layers holding the kept rows/columns.

Per layer with kept KV groups ``K`` and kept MLP channels ``C``::

    q_proj.weight <- q_proj.weight[q_index(K)]          k/v_proj.weight <- .weight[kv_index(K)]
    o_proj.weight <- o_proj.weight[:, q_index(K)]        gate/up.weight  <- .weight[C]
    down_proj.weight <- down_proj.weight[:, C]

Optional **bias compensation** (FLAP): the removed input channels' mean contribution is folded into a new bias,
``b_o += W_o[:, removed] · x̄_o[removed]`` and ``b_down += W_down[:, removed] · x̄_down[removed]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .groups import LayerGroups, Plan, kv_index, model_groups, q_index
from .numerics import per_channel
from .models import decoder_layers


def take_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                extra_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``W[rows]`` or ``W[:, cols]`` (and ``b[rows] (+ extra_bias)``). The kept weights are
    the only new allocation (no initialised weight to copy into): while the caller swaps it in, memory holds the
    old matrix plus the kept part of it, once the old module is dropped only the kept part. ``weight`` (e.g. a
    refit of ``W[:, cols]``) is taken as the new matrix itself instead of the selection."""
    w = lin.weight.data
    if weight is not None:
        w = weight
    else:
        if rows is not None:
            w = w.index_select(0, rows)
        if cols is not None:
            w = w.index_select(1, cols)
    b = lin.bias.data if lin.bias is not None else None
    if b is not None:
        b = b.index_select(0, rows) if rows is not None else b.clone()
    if extra_bias is not None:
        eb = extra_bias.to(device=w.device, dtype=w.dtype)
        b = eb if b is None else b + eb
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad if lin.bias is not None else
                                lin.weight.requires_grad)
    return new


def _compensation(lin: nn.Linear, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
    removed = torch.ones(lin.in_features, dtype=torch.bool)
    removed[keep] = False
    if not removed.any():
        return None
    w = lin.weight.data
    mr, removed = mean[removed].double().to(w.device), removed.to(w.device)
    # W[:, removed] · x̄[removed] in float64, one block of rows at a time
    return per_channel(w, lambda b: b[:, removed] @ mr, 0).to(lin.weight.dtype)


@torch.no_grad()
def apply_plan(model, plan: Plan, bias_means: list[dict] | None = None) -> None:
    """Prune ``model`` in place according to ``plan``.

    ``bias_means[i]`` may hold ``"o"`` (mean of o_proj input, [n_q·hd]) and ``"down"`` (mean of down_proj input,
    [n_ff]) for bias compensation of layer i.
    """
    groups = model_groups(model)
    for i, (layer, lg) in enumerate(zip(decoder_layers(model), groups)):
        prune_layer(layer, lg, torch.tensor(plan.keep_kv[i], dtype=torch.long),
                     torch.tensor(plan.keep_mlp[i], dtype=torch.long), (bias_means or [None] * len(groups))[i])


def prune_layer(layer, lg: LayerGroups, kv: torch.Tensor, ch: torch.Tensor, means: dict | None) -> None:
    """Prune one decoder layer in place. One matrix at a time: each ``take_linear`` is swapped in before the next is
    built, so (when nothing else holds the layer's weights) the transient memory is one kept matrix."""
    a, m = layer.self_attn, layer.mlp
    if kv.numel() != lg.n_kv:
        qi, ki = q_index(lg, kv), kv_index(lg, kv)
        comp = _compensation(a.o_proj, qi, means["o"]) if means and "o" in means else None
        a.q_proj = take_linear(a.q_proj, rows=qi)
        a.k_proj = take_linear(a.k_proj, rows=ki)
        a.v_proj = take_linear(a.v_proj, rows=ki)
        a.o_proj = take_linear(a.o_proj, cols=qi, extra_bias=comp)
        a.num_key_value_groups = lg.n_rep
        if hasattr(a, "num_heads"):
            a.num_heads = kv.numel() * lg.n_rep
        if hasattr(a, "num_key_value_heads"):
            a.num_key_value_heads = kv.numel()
    if ch.numel() != lg.n_mlp:
        comp = _compensation(m.down_proj, ch, means["down"]) if means and "down" in means else None
        m.gate_proj = take_linear(m.gate_proj, rows=ch)
        m.up_proj = take_linear(m.up_proj, rows=ch)
        m.down_proj = take_linear(m.down_proj, cols=ch, extra_bias=comp)
        m.intermediate_size = ch.numel()


@torch.no_grad()
def mask_plan(model, plan: Plan) -> None:
    """Zero (instead of removing) the o_proj / down_proj columns of removed groups: the same function as
    :func:`apply_plan` without bias compensation. Used to test surgery."""
    for layer, lg, kv, ch in zip(decoder_layers(model), model_groups(model), plan.keep_kv, plan.keep_mlp):
        keep_q = torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        keep_q[q_index(lg, torch.tensor(kv, dtype=torch.long))] = True
        layer.self_attn.o_proj.weight[:, ~keep_q] = 0
        keep_c = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.bool)
        keep_c[torch.tensor(ch, dtype=torch.long)] = True
        layer.mlp.down_proj.weight[:, ~keep_c] = 0
