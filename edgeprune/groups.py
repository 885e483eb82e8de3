"""Coupled groups: the units that structural pruning removes.

* **Attention group** = one KV group of one layer: its ``head_dim`` rows of ``k_proj`` and ``v_proj``, the
  ``n_rep = n_q / n_kv`` query heads that share it (their rows of ``q_proj``) and the matching ``o_proj`` columns.
  For MHA (n_rep = 1) a group is one head. Removing whole KV groups keeps ``n_q = n_kv * n_rep`` in every layer,
  which both HF's ``repeat_kv`` and llama.cpp require.
* **MLP group** = one intermediate channel: a row of ``gate_proj``, a row of ``up_proj``, a column of ``down_proj``.

A :class:`Plan` says which groups each layer keeps; :mod:`edgeprune.surgery` applies it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models import decoder_layers, head_dim


@dataclass(frozen=True)
class LayerGroups:
    """Group structure of one decoder layer, and the parameters one group owns."""

    n_kv: int           # attention groups (KV heads)
    n_rep: int          # query heads per KV head
    head_dim: int
    n_mlp: int          # MLP channels
    hidden: int
    qkv_bias: bool = False
    mlp_bias: bool = False

    @property
    def attn_group_params(self) -> int:
        """q rows + o cols (n_rep heads) + k and v rows, plus q/k/v biases: (2·n_rep + 2)·hd·H (+ (n_rep+2)·hd)."""
        p = (2 * self.n_rep + 2) * self.head_dim * self.hidden
        return p + ((self.n_rep + 2) * self.head_dim if self.qkv_bias else 0)

    @property
    def mlp_group_params(self) -> int:
        """gate row + up row + down column: 3·H (+ 2 biases)."""
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    def q_rows(self, g: int) -> range:
        """Rows of q_proj (and columns of o_proj) owned by KV group g."""
        return range(g * self.n_rep * self.head_dim, (g + 1) * self.n_rep * self.head_dim)

    def kv_rows(self, g: int) -> range:
        return range(g * self.head_dim, (g + 1) * self.head_dim)


def model_groups(model) -> list[LayerGroups]:
    cfg, hd = model.config, head_dim(model)
    out = []
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        nkv = a.k_proj.out_features // hd
        nq = a.q_proj.out_features // hd
        out.append(LayerGroups(n_kv=nkv, n_rep=nq // nkv if nkv else 1, head_dim=hd, n_mlp=m.gate_proj.out_features,
                               hidden=cfg.hidden_size, qkv_bias=a.q_proj.bias is not None,
                               mlp_bias=m.gate_proj.bias is not None))
    return out


def q_index(lg: LayerGroups, kv_keep: torch.Tensor) -> torch.Tensor:
    """Indices of q_proj rows / o_proj columns for the kept KV groups (in kept order)."""
    if kv_keep.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    span = lg.n_rep * lg.head_dim
    return (kv_keep[:, None] * span + torch.arange(span)[None, :]).reshape(-1)


def kv_index(lg: LayerGroups, kv_keep: torch.Tensor) -> torch.Tensor:
    if kv_keep.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return (kv_keep[:, None] * lg.head_dim + torch.arange(lg.head_dim)[None, :]).reshape(-1)


@dataclass
class Plan:
    """Which groups each layer keeps (sorted index lists), plus how the plan was made."""

    keep_kv: list[list[int]]
    keep_mlp: list[list[int]]
    meta: dict = field(default_factory=dict)

    def kept_counts(self) -> list[tuple[int, int]]:
        return [(len(a), len(m)) for a, m in zip(self.keep_kv, self.keep_mlp)]

    def to_dict(self) -> dict:
        return {"keep_kv": self.keep_kv, "keep_mlp": self.keep_mlp, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(keep_kv=[list(map(int, x)) for x in d["keep_kv"]],
                   keep_mlp=[list(map(int, x)) for x in d["keep_mlp"]], meta=d.get("meta", {}))


def plan_params(groups: list[LayerGroups], counts: list[tuple[int, int]]) -> int:
    """Prunable (attention + MLP) parameters that remain under the given kept counts."""
    return sum(k * g.attn_group_params + c * g.mlp_group_params for g, (k, c) in zip(groups, counts))
