"""SAAP importance (arXiv 2412.15127; spec: shared docs methods.md §3): vector-wise and element-wise Taylor
importance of each coupled group, fused with homoscedastic-uncertainty weights.

Verified (abstract): two scores, vector-wise and element-wise, are fused "as outputs under a Gaussian likelihood
with homoscedastic uncertainty", with two *learned* noise parameters σ₁, σ₂; modules are then ranked to choose
which layers to prune (our :mod:`edgeprune.allocation.saap`).

Ours [R] (exact equations not available): the Kendall-style fused score

    I(G) = I_vec(G) / (2σ₁²) + I_elem(G) / (2σ₂²) + log σ₁ + log σ₂

with ``I_vec = Σ_members |Σ_k W_k g_k|`` and ``I_elem = Σ_members Σ_k |W_k g_k|`` (option ``elem``:
``param_first`` default | ``param_second`` | ``param_mix``), g from one backward pass of the LM loss on
LLM-Pruner's calibration slice (``grad_samples`` × ``grad_len``, default 10 × 64). σ_k is shared by every group
of the chosen ``sigma_scope``:

* ``sigma=closed`` (default): σ_k minimises ``Σ_G I_k(G)/(2σ_k²) + |𝒢|·log σ_k``, so ``σ_k² = mean_G I_k(G)``;
  the fused score is ``½(I_vec/mean I_vec + I_elem/mean I_elem)`` + a constant — invariant to rescaling either
  raw score.
* ``sigma=learned``: ``s_k = log σ_k²`` optimised by Adam (``sigma_steps``, ``sigma_lr``) on the same objective
  (Kendall et al.'s parameterisation). With no other trainable parameters it converges to the closed form; a
  finite number of steps gives the early-stopped weights. The log terms are constants and do not move ranks.
* ``sigma_scope``: ``global`` (default: one σ per score over every group of the model, the literal reading of
  "homoscedastic"), ``module`` (separate σ for attention groups and MLP channels), ``layer`` (per layer-module).

Default allocation: ``saap`` (importance-fluctuation layer ratios). Skipped layers default to LLM-Pruner's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Context, Scores, option, register
from .taylor import BackwardMethod, BackwardOptions, backward_grads, group_taylor

SCOPES = ("global", "module", "layer")


def _blocks(attn: list[torch.Tensor], mlp: list[torch.Tensor], scope: str) -> list[list[torch.Tensor]]:
    """Partition of the score tensors into the sets that share one σ."""
    if scope == "global":
        return [attn + mlp]
    if scope == "module":
        return [attn, mlp]
    if scope == "layer":
        return [[t] for t in attn + mlp]
    raise ValueError(f"sigma_scope {scope} unknown; use one of {SCOPES}")


def closed_sigma2(block: list[torch.Tensor]) -> float:
    """σ² = mean over the block's groups (the minimiser of Σ I/(2σ²) + n·log σ)."""
    v = torch.cat([t.double().reshape(-1) for t in block])
    return max(float(v.mean()), 1e-30)


def learned_sigma2(block: list[torch.Tensor], steps: int = 500, lr: float = 0.1, init: float = 0.0) -> float:
    """Adam on s = log σ² (start ``init``, i.e. σ = 1) minimising mean_G [I(G)·e^{−s}/2 + s/2] (Kendall et al.);
    returns e^s. The optimum is the closed form; ``steps`` × ``lr`` bounds how far s can travel."""
    x = torch.cat([t.double().reshape(-1) for t in block]).clamp_min(0).detach()
    s = torch.tensor(float(init), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = (x * torch.exp(-s) / 2 + s / 2).mean()
            loss.backward()
            opt.step()
    return float(torch.exp(s.detach()))


def fuse(vec: tuple[list[torch.Tensor], list[torch.Tensor]], elem: tuple[list[torch.Tensor], list[torch.Tensor]],
         sigma: str = "closed", scope: str = "global", sigmas: tuple[float, float] | None = None,
         steps: int = 500, lr: float = 0.1):
    """Fused scores ``I_vec/(2σ₁²) + I_elem/(2σ₂²) + log σ₁ + log σ₂`` (pure function).

    ``vec`` / ``elem`` are (attn, mlp) lists of per-layer tensors. ``sigmas`` = fixed (σ₁², σ₂²) overrides
    ``sigma``. Returns (attn, mlp, info) with the σ² used for every block.
    """
    va, vm = vec
    ea, em = elem
    n_a = len(va)
    vb, eb = _blocks(list(va), list(vm), scope), _blocks(list(ea), list(em), scope)
    out: list[torch.Tensor] = []
    used = []
    for bv, be in zip(vb, eb):
        if sigmas is not None:
            s1, s2 = sigmas
        elif sigma == "closed":
            s1, s2 = closed_sigma2(bv), closed_sigma2(be)
        elif sigma == "learned":
            s1, s2 = learned_sigma2(bv, steps, lr), learned_sigma2(be, steps, lr)
        else:
            raise ValueError(f"sigma {sigma} unknown; use closed or learned")
        const = 0.5 * (math.log(s1) + math.log(s2))  # log σ₁ + log σ₂
        out += [tv.double() / (2 * s1) + te.double() / (2 * s2) + const for tv, te in zip(bv, be)]
        used.append((s1, s2))
    attn, mlp = out[:n_a], out[n_a:]  # every scope keeps the attn-then-mlp order
    info = {"sigma": "fixed" if sigmas is not None else sigma, "sigma_scope": scope,
            "sigma2": [[a, b] for a, b in used]}  # one [σ₁², σ₂²] per block (global: 1, module: attn, mlp)
    return attn, mlp, info


@register("saap")
class SAAP(BackwardMethod):
    """SAAP: fused vector-/element-wise Taylor importance (see the module docstring for the formula and what is ours).
    Options: ``sigma`` closed|learned, ``sigma_scope`` global|module|layer, ``elem`` param_first|param_second|
    param_mix, ``grad_samples``, ``grad_len``, ``sigma_steps``, ``sigma_lr``."""

    @dataclass(frozen=True)
    class Options(BackwardOptions):
        elem: str = option("param_first", choices=("param_first", "param_second", "param_mix"),
                           doc="element-wise Taylor kind")
        sigma: str = option("closed", choices=("closed", "learned"), doc="how the fusion weights are found")
        sigma_scope: str = option("global", choices=SCOPES, doc="groups that share one sigma")
        sigma_steps: int = option(500, lo=1, doc="Adam steps (sigma=learned)")
        sigma_lr: float = option(0.1, lo=0.0, doc="Adam learning rate (sigma=learned)")

    default_allocation = "saap"

    def score(self, model, ctx: Context) -> Scores:
        o = self.options(ctx)
        elem, sigma, scope = o.elem, o.sigma, o.sigma_scope
        ids = self.grad_ids(ctx, o)
        grads, fisher = backward_grads(model, ids, batch_size=1, fisher=elem != "param_first")
        g = lambda i, p: grads[(i, p)]
        f = (lambda i, p: fisher[(i, p)]) if fisher else None
        vec = group_taylor(model, ctx.groups, g, None, "vectorize")
        el = group_taylor(model, ctx.groups, g, f, elem)
        attn, mlp, info = fuse(vec, el, sigma, scope, steps=o.sigma_steps, lr=o.sigma_lr)
        return Scores(attn, mlp, info={**info, "elem": elem, "grad_samples": int(ids.shape[0]),
                                       "grad_len": int(ids.shape[1])})
