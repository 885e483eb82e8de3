"""MINI-LLM importance (arXiv 2407.11681; spec: shared docs methods.md §4): feature-map sensitivity with a
zeroth-order (SPSA) gradient estimate, from forward passes only.

Verified: the FMS criterion combines weight magnitude, activation and gradient; the gradient is estimated by
SPSA with forward passes only; perturbation scale ε is an input; groups are kept per layer with the top (1 − p)
scores (Algorithm 1: a uniform per-layer ratio → default allocation ``uniform``).

Ours [R] (Eq. 7 and 9 not available):

* SPSA / MeZO estimate over every member weight W (q, k, v, o, gate, up, down of every layer) at once: for
  q = 1..Q, z_q ~ N(0, I) regenerated from seed s_q (never stored),
  ``c_q = (L(W + εz_q) − L(W − εz_q)) / (2ε)`` on the batch B (``spsa_samples`` × ``spsa_len`` calibration
  tokens, LM loss), and ``ĝ = (1/Q) Σ_q c_q z_q``. Only the Q scalars c_q are kept; ĝ is materialised one layer
  at a time from the seeds when that layer is scored, so memory stays at a forward pass plus one layer.
* Perturbation (option ``perturb``): ``functional`` (default) — W is never written; each Linear computes
  ``x·(W ± εz)ᵀ`` with z regenerated on the fly, so the weights are bit-exactly unchanged (transient memory:
  one weight matrix). ``inplace`` — MeZO's ``W += εz; W −= 2εz; W += εz``; in float32 this is *not* bit-exact:
  each step can leave an error of a few ulps of W (tested below 1e-6 relative).
* Score per weight (option ``variant``): ``norm`` (default) ``S_ij = |W_ij ĝ_ij| · ‖X_j‖₂``, or ``mean`` (the
  third-party prototype) ``S_ij = |W_ij ĝ_ij · x̄_j|``; X_j = input channel j of that Linear over all calibration
  tokens (q/k/v: the normed attention input; o: head outputs; gate/up: the normed MLP input; down: the MLP
  activations). Group score = sum over the group's members (LLM-Pruner's ``sum``).
* Option ``grad=backprop`` replaces ĝ by the true gradient (the ablation "FMS with true gradients").

Options: ``eps`` (1e-3), ``n_perturb`` = Q (64), ``spsa_samples`` (8), ``spsa_len`` (128), ``spsa_batch``
(rows per forward, 1: the smallest activation/logit footprint), ``variant``, ``perturb``, ``grad``. Everything runs under ``torch.no_grad``; no ``.grad`` is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Context, Method, Scores, register
from .taylor import MEMBERS, _get, backward_grads
from ..models import decoder_layers

STAT_OF = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
           "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}


def member_linears(model) -> list[tuple[tuple[int, str], torch.nn.Linear]]:
    return [((i, p), _get(layer, p)) for i, layer in enumerate(decoder_layers(model)) for p, *_ in MEMBERS]


def noise(seed: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """z for perturbation ``seed`` and member ``k``: regenerated, never stored."""
    g = torch.Generator(device=like.device).manual_seed(seed * 1_000_003 + k)
    return torch.randn(like.shape, generator=g, dtype=like.dtype, device=like.device)


@torch.no_grad()
def lm_loss(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    tot, n = 0.0, 0
    for b in range(0, ids.shape[0], batch_size):
        x = ids[b:b + batch_size]
        logits = model(x, use_cache=False).logits
        tot += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                     reduction="sum"))
        n += x[:, 1:].numel()
    return tot / n


@dataclass
class SPSA:
    """The whole SPSA estimate: seeds and coefficients c_q; ĝ of member k is Σ_q c_q z(s_q, k) / Q."""

    seeds: list[int]
    coeffs: list[float]
    eps: float

    def grad(self, k: int, like: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(like)
        for s, c in zip(self.seeds, self.coeffs):
            g.add_(noise(s, k, like), alpha=c / len(self.seeds))
        return g


def _perturbed_loss(model, ids, lins, seed: int, scale: float, mode: str, batch_size: int) -> float:
    if mode == "functional":
        for k, lin in enumerate(lins):
            lin.forward = (lambda x, lin=lin, k=k: F.linear(x, noise(seed, k, lin.weight).mul_(scale).add_(lin.weight),
                                                            lin.bias))  # one transient matrix
        try:
            return lm_loss(model, ids, batch_size)
        finally:
            for lin in lins:
                del lin.forward
    for k, lin in enumerate(lins):
        lin.weight.data.add_(noise(seed, k, lin.weight), alpha=scale)
    return lm_loss(model, ids, batch_size)


@torch.no_grad()
def spsa_estimate(model, ids: torch.Tensor, eps: float = 1e-3, n_perturb: int = 64, seed: int = 0,
                  mode: str = "functional", batch_size: int = 8) -> SPSA:
    """Two forward passes per perturbation; returns seeds and ``c_q = (L⁺ − L⁻)/(2ε)`` only."""
    if mode not in ("functional", "inplace"):
        raise ValueError(f"perturb {mode} unknown; use functional or inplace")
    lins = [lin for _, lin in member_linears(model)]
    seeds = [seed * 7919 + q + 1 for q in range(n_perturb)]
    coeffs = []
    for s in seeds:
        lp = _perturbed_loss(model, ids, lins, s, eps, mode, batch_size)            # inplace: W + εz
        lm = _perturbed_loss(model, ids, lins, s, -2 * eps if mode == "inplace" else -eps, mode, batch_size)
        if mode == "inplace":                                                       # W − εz → W
            for k, lin in enumerate(lins):
                lin.weight.data.add_(noise(s, k, lin.weight), alpha=eps)
        coeffs.append((lp - lm) / (2 * eps))
    return SPSA(seeds, coeffs, eps)


def fms_salience(w: torch.Tensor, g: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel FMS along ``dim`` (0 rows, 1 columns): Σ over the other dim of ``|W ⊙ g| · x_j`` where x is the
    per-input-channel activation factor (‖X_j‖₂ or |x̄_j|) broadcast over rows."""
    s = (w * g).abs_().mul_(x.to(w.dtype)[None, :])   # in the weight dtype: one transient matrix
    return s.sum(1 - dim, dtype=torch.float64)


@register("mini-llm")
class MiniLLM(Method):
    """MINI-LLM: ``S_ij = |W_ij ĝ_ij|·‖X_j‖₂`` with SPSA ĝ (forward passes only); see the module docstring."""

    default_allocation = "uniform"

    @torch.no_grad()
    def score(self, model, ctx: Context) -> Scores:
        eps, Q = float(ctx.opt("eps", 1e-3)), int(ctx.opt("n_perturb", 64))
        variant, mode, gsrc = ctx.opt("variant", "norm"), ctx.opt("perturb", "functional"), ctx.opt("grad", "spsa")
        if variant not in ("norm", "mean"):
            raise ValueError(f"mini-llm variant {variant} unknown; use norm or mean")
        ids = ctx.calib_ids[: int(ctx.opt("spsa_samples", 8)), : int(ctx.opt("spsa_len", 128))]
        stats = ctx.layer_stats
        members = member_linears(model)
        if gsrc == "spsa":
            est = spsa_estimate(model, ids, eps, Q, ctx.seed, mode, int(ctx.opt("spsa_batch", 1)))
            gfun = lambda k, key, w: est.grad(k, w)
            extra = {"spsa_loss_diffs": [round(c * 2 * eps, 8) for c in est.coeffs[:8]]}
        elif gsrc == "backprop":
            with torch.enable_grad():
                grads, _ = backward_grads(model, ids, batch_size=1)
            gfun = lambda k, key, w: grads[key]
            extra = {}
        else:
            raise ValueError(f"mini-llm grad {gsrc} unknown; use spsa or backprop")
        attn = [torch.zeros(lg.n_kv, dtype=torch.float64) for lg in ctx.groups]
        mlp = [torch.zeros(lg.n_mlp, dtype=torch.float64) for lg in ctx.groups]
        dims = {p: d for p, d, *_ in MEMBERS}
        for k, ((i, path), lin) in enumerate(members):   # ĝ of one member at a time
            st = getattr(stats[i], STAT_OF[path])
            x = st.norm if variant == "norm" else st.mean.abs()
            s = fms_salience(lin.weight.data, gfun(k, (i, path), lin.weight.data), x, dims[path])
            if path.startswith("self_attn"):
                attn[i] += s.reshape(ctx.groups[i].n_kv, -1).sum(1)
            else:
                mlp[i] += s
        return Scores(attn, mlp, info={"eps": eps, "n_perturb": Q, "variant": variant, "perturb": mode, "grad": gsrc,
                                       "spsa_samples": int(ids.shape[0]), "spsa_len": int(ids.shape[1]), **extra})
