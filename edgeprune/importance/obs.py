"""OBS importance (SlimGPT, arXiv 2412.18110; ZipLM, arXiv 2302.04089): the output error that removing a group
costs after the optimal update of the rest.

Per layer, on the dense calibration inputs of ``o_proj`` (head groups: the ``n_rep·head_dim`` columns of one KV
group) and ``down_proj`` (one column per channel), with ``H = X Xᵀ + λI`` (``λ = damp · mean(diag H)``):
greedy structured OBS (:func:`edgeprune.reconstruct.obs_order`) removes, step by step, the group ``Q`` of least
``cost(Q) = Σ_rows w_Q (H⁻¹_{QQ})⁻¹ w_Qᵀ``, updates the survivors ``δW = −W_{:,Q} (H⁻¹_{QQ})⁻¹ H⁻¹_{Q,:}`` and
downdates ``H⁻¹``. A group's score is the running maximum of the costs up to its removal (so keeping the top-k
scores of a layer keeps exactly the greedy survivors for every k), divided by the parameters the group owns
[R: SlimGPT/ZipLM use fixed or searched per-layer rates; the per-parameter scale, which lets the ``global``
allocator compare heads with channels and layers with layers — all costs are squared errors of the layer's
contribution to the same residual stream — is ours]. The scores are standardized (used as they are).

Memory: one ``d_in²`` Gram matrix per projection (float64 up to 4,096 inputs, float32 above), plus a working copy of
``W``. Above 4,096 inputs the Gram is inverted and downdated in place (at 7B, ``down_proj``'s 11,008 inputs:
485 + 180 MB); it is scored first and freed before ``o_proj``'s inverse (float64, a copy) is formed.

Options: ``obs_damp`` (default 0.01), ``obs_steps`` (at most this many greedy steps per projection: more
groups are removed per step above it; default 256).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Context, Method, MethodOptions, option, register


def gram_collector(store: list):
    """A :data:`edgeprune.calibrate.Collector` that accumulates the Gram statistics of the inputs of ``o_proj``
    and ``down_proj`` into ``store[i] = {"o": Gram, "down": Gram}``."""
    from ..reconstruct import Gram

    def hooks(i, layer):
        while len(store) <= i:
            store.append(None)
        store[i] = g = {"o": Gram(), "down": Gram()}
        return [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: g["o"].update(args[0])),
                layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: g["down"].update(args[0]))]
    return hooks


def ranked_scores(order: list[int], costs: list[float], n: int, params: int) -> torch.Tensor:
    """Score of each group from the greedy removal: running max of the removal costs / parameters per group."""
    s = torch.zeros(n, dtype=torch.float64)
    run = 0.0
    for j, c in zip(order, costs):
        run = max(run, float(c))
        s[j] = run / params
    return s


@register("obs")
class OBS(Method):
    """Structured OBS cost (module docstring). Default allocation: ``global``; default repair: the sequential
    least-squares refit (``lsq``, what OBS's updates converge to), as SlimGPT and ZipLM update the kept weights."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        obs_damp: float = option(0.01, lo=0.0, doc="damping relative to mean(diag H)")
        obs_steps: int = option(256, lo=1, doc="greedy steps per projection at most")

    default_allocation = "global"
    default_reconstruct = "lsq"
    standardized = True

    def layer_scorer(self, ctx: Context) -> "OBSScorer":
        return OBSScorer(self.options(ctx))


class OBSScorer:
    """Per layer: Gram statistics of the ``o_proj`` / ``down_proj`` inputs during the layer's calibration forward
    (:func:`gram_collector`), then the greedy OBS order of each projection; the Gram matrices are freed at once."""

    def __init__(self, opts):
        self.o, self.grams = opts, []

    def hooks(self, i: int, layer, lg) -> list:
        return gram_collector(self.grams)(i, layer)

    def score(self, i: int, layer, lg, st):
        from ..reconstruct import obs_order

        g, span = self.grams[i], lg.n_rep * lg.head_dim
        damp, steps = self.o.obs_damp, self.o.obs_steps
        # down_proj first: its (larger) Gram is inverted in place and freed before o_proj's is copied
        om, cm = obs_order(layer.mlp.down_proj.weight.data, g.pop("down"), 1, damp, steps, f"layer {i} down_proj")
        oa, ca = obs_order(layer.self_attn.o_proj.weight.data, g.pop("o"), span, damp, steps, f"layer {i} o_proj")
        self.grams[i] = None   # free the layer's Gram matrices as soon as they are used
        return (ranked_scores(oa, ca, lg.n_kv, lg.attn_group_params),
                ranked_scores(om, cm, lg.n_mlp, lg.mlp_group_params), None)

    def info(self) -> dict:
        return {"obs_damp": self.o.obs_damp, "obs_steps": self.o.obs_steps}
