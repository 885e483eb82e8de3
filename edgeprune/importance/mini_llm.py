"""MINI-LLM importance (arXiv 2407.11681; spec: shared docs methods.md §4): feature-map sensitivity with a
zeroth-order (SPSA) gradient estimate, from forward passes only.

Verified: the FMS criterion combines weight magnitude, activation and gradient; the gradient is estimated by
SPSA with forward passes only; perturbation scale ε is an input; groups are kept per layer with the top (1 − p)
scores (Algorithm 1: a uniform per-layer ratio → default allocation ``uniform``).

Ours [R] (Eq. 7 and 9 not available):

* SPSA / MeZO estimate over every member weight W (q, k, v, o, gate, up, down of every layer) at once: for
  q = 1..Q, z_q ~ N(0, I) regenerated from seed s_q (never stored),
  ``c_q = (L(W + εz_q) − L(W − εz_q)) / (2ε)`` on the batch B (``spsa_samples`` × ``spsa_len`` calibration
  tokens, LM loss), and ``ĝ = (1/Q) Σ_q c_q z_q``. Only the Q scalars c_q are kept. z of member k is the
  N(0, 1) stream (in W's dtype) of one generator seeded ``s_q·1 000 003 + k``, drawn one block of rows at a
  time (:func:`noise_blocks`; blocks of :func:`~edgeprune.numerics.block_len` rows): the perturbation, the estimate ĝ
  (accumulated in float32, float64 for float64 weights) and the score all work block by block, so memory
  stays at a forward pass plus a few blocks — never a copy of a weight matrix.
* Perturbation (option ``perturb``): ``functional`` (default) — W is never written; each Linear computes its
  output rows block by block, ``y[:, I] = x·(W[I] ± εz[I])ᵀ (+ b[I])``, with z[I] regenerated on the fly, so
  the weights are bit-exactly unchanged (transient memory: one block). ``inplace`` — MeZO's
  ``W += εz; W −= 2εz; W += εz`` block by block; *not* bit-exact: each step can leave an error of a few ulps
  of W (tested below 1e-6 relative in float32; far more in bfloat16, with 8 significant bits).
* Score per weight (option ``variant``): ``norm`` (default) ``S_ij = |W_ij ĝ_ij| · ‖X_j‖₂``, or ``mean`` (the
  third-party prototype) ``S_ij = |W_ij ĝ_ij · x̄_j|``; X_j = input channel j of that Linear over all calibration
  tokens (q/k/v: the normed attention input; o: head outputs; gate/up: the normed MLP input; down: the MLP
  activations), in float64, one block of rows at a time (:func:`fms_salience`). Group score = sum over the
  group's members (LLM-Pruner's ``sum``).
* Option ``grad=backprop`` replaces ĝ by the true gradient (the ablation "FMS with true gradients").

Options: ``eps`` (1e-3), ``n_perturb`` = Q (64), ``spsa_samples`` (8), ``spsa_len`` (128), ``spsa_batch``
(rows per forward, 1: the smallest activation/logit footprint), ``variant``, ``perturb``, ``grad``. Everything runs under ``torch.no_grad``; no ``.grad`` is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Context, Method, MethodOptions, Scores, option, register
from ..numerics import block_len
from .taylor import MEMBERS, submodule, backward_grads
from ..models import decoder_layers

STAT_OF = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
           "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}


def member_linears(model) -> list[tuple[tuple[int, str], torch.nn.Linear]]:
    return [((i, p), submodule(layer, p)) for i, layer in enumerate(decoder_layers(model)) for p, *_ in MEMBERS]


def row_blocks(like: torch.Tensor) -> list[tuple[int, int]]:
    """The row blocks ``[r0, r1)`` in which z, ĝ and the scores of a weight matrix are made (:func:`~edgeprune.numerics.block_len`
    rows each, the last one shorter)."""
    n = like.shape[0]
    step = block_len(like[0].numel()) if like.dim() > 1 else max(n, 1)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _gen(seed: int, k: int, like: torch.Tensor) -> torch.Generator:
    return torch.Generator(device=like.device).manual_seed(seed * 1_000_003 + k)


def _draw(gen: torch.Generator, like: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return torch.randn((r1 - r0, *like.shape[1:]), generator=gen, dtype=like.dtype, device=like.device)


def noise_blocks(seed: int, k: int, like: torch.Tensor):
    """z for perturbation ``seed`` and member ``k``, one row block at a time: yields ``(r0, r1, z[r0:r1])``, drawn
    in order from one generator seeded ``seed·1 000 003 + k`` (regenerated, never stored whole)."""
    g = _gen(seed, k, like)
    for r0, r1 in row_blocks(like):
        yield r0, r1, _draw(g, like, r0, r1)


def noise(seed: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """The whole z (the concatenated :func:`noise_blocks`); for tests and small matrices."""
    return torch.cat([z for *_, z in noise_blocks(seed, k, like)])


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

    def grad_blocks(self, k: int, like: torch.Tensor):
        """Yields ``(r0, r1, ĝ[r0:r1])``, ``ĝ = (1/Q) Σ_q c_q z(s_q, k)`` accumulated in float32 (float64 for
        float64 weights), one row block at a time (the Q generators advance together)."""
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        gens = [_gen(s, k, like) for s in self.seeds]
        for r0, r1 in row_blocks(like):
            g = torch.zeros((r1 - r0, *like.shape[1:]), dtype=acc, device=like.device)
            for gen, c in zip(gens, self.coeffs):
                g.add_(_draw(gen, like, r0, r1), alpha=c / len(self.seeds))
            yield r0, r1, g

    def grad(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """The whole ĝ of member k (the concatenated :meth:`grad_blocks`); for tests and small matrices."""
        return torch.cat([g for *_, g in self.grad_blocks(k, like)])


def _blockwise_linear(lin, seed: int, k: int, scale: float):
    """``x ↦ x·(W + scale·z)ᵀ + b`` computed one block of output rows at a time (W is never written)."""
    def forward(x):
        w, b = lin.weight, lin.bias
        y = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.result_type(x, w), device=x.device)
        for r0, r1, z in noise_blocks(seed, k, w):   # y allocated first: no small tensor kept between blocks
            y[..., r0:r1] = F.linear(x, z.mul_(scale).add_(w[r0:r1]), None if b is None else b[r0:r1])
        return y
    return forward


def _perturbed_loss(model, ids, lins, seed: int, scale: float, mode: str, batch_size: int) -> float:
    if mode == "functional":
        for k, lin in enumerate(lins):
            lin.forward = _blockwise_linear(lin, seed, k, scale)   # one transient block of rows
        try:
            return lm_loss(model, ids, batch_size)
        finally:
            for lin in lins:
                del lin.forward
    _add_noise(lins, seed, scale)
    return lm_loss(model, ids, batch_size)


def _add_noise(lins, seed: int, scale: float) -> None:
    """MeZO's in-place step ``W += scale·z``, one row block at a time."""
    for k, lin in enumerate(lins):
        for r0, r1, z in noise_blocks(seed, k, lin.weight.data):
            lin.weight.data[r0:r1].add_(z, alpha=scale)


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
            _add_noise(lins, s, eps)
        coeffs.append((lp - lm) / (2 * eps))
    return SPSA(seeds, coeffs, eps)


def fms_salience(w: torch.Tensor, g_blocks, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel FMS along ``dim`` (0 rows, 1 columns): ``Σ`` over the other dim of ``|W_ij ĝ_ij| · x_j``, x the
    per-input-channel activation factor (‖X_j‖₂ or |x̄_j|). ``g_blocks`` yields ``(r0, r1, ĝ[r0:r1])``; each row
    block is scored in float64 (a block-sized copy), rows give their own sums (dim 0) or add to the column sums
    (dim 1) → float64 on the CPU."""
    x = x.to(device=w.device, dtype=torch.float64)
    out = torch.zeros(w.shape[dim], dtype=torch.float64, device=w.device)
    for r0, r1, g in g_blocks:
        s = w[r0:r1].to(torch.float64, copy=True).mul_(g).abs_().mul_(x[None, :])
        if dim == 0:
            out[r0:r1] = s.sum(1)
        else:
            out += s.sum(0)
        del s
    return out.cpu()


def _slices(g: torch.Tensor):
    return ((r0, r1, g[r0:r1]) for r0, r1 in row_blocks(g))


@register("mini-llm")
class MiniLLM(Method):
    """MINI-LLM: ``S_ij = |W_ij ĝ_ij|·‖X_j‖₂`` with SPSA ĝ (forward passes only); see the module docstring."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        eps: float = option(1e-3, lo=1e-12, doc="SPSA perturbation scale")
        n_perturb: int = option(64, lo=1, doc="SPSA perturbations")
        variant: str = option("norm", choices=("norm", "mean"),
                              doc="activation factor: ‖X_j‖₂ (norm) or abs(mean x_j) (mean)")
        perturb: str = option("functional", choices=("functional", "inplace"), doc="how W + eps z is applied")
        grad: str = option("spsa", choices=("spsa", "backprop"), doc="gradient estimate")
        spsa_samples: int = option(8, lo=1, doc="calibration rows of the SPSA loss")
        spsa_len: int = option(128, lo=2, doc="tokens per row of the SPSA loss")
        spsa_batch: int = option(1, lo=1, doc="rows per forward pass")

    default_allocation = "uniform"
    loss_scope = "model"

    @torch.no_grad()
    def score(self, model, ctx: Context) -> Scores:
        o = self.options(ctx)
        eps, Q, variant, mode, gsrc = o.eps, o.n_perturb, o.variant, o.perturb, o.grad
        ids = ctx.calib_ids[: o.spsa_samples, : o.spsa_len]
        stats = ctx.layer_stats
        members = member_linears(model)
        if gsrc == "spsa":
            est = spsa_estimate(model, ids, eps, Q, ctx.seed, mode, o.spsa_batch)
            gfun = lambda k, key, w: est.grad_blocks(k, w)
            extra = {"spsa_loss_diffs": [round(c * 2 * eps, 8) for c in est.coeffs[:8]]}
        else:   # backprop
            with torch.enable_grad():
                grads, _ = backward_grads(model, ids, batch_size=1)
            gfun = lambda k, key, w: _slices(grads[key])
            extra = {}
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
