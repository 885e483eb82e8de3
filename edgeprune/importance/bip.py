"""LLM-BIP importance (arXiv 2412.06419; spec: shared docs methods.md §5): a unit's effect on its own block's
output, from one forward pass, with no backward pass and no gradients.

Verified (abstract): FFN channels and attention heads are scored by their influence on the output of their own
transformer block, approximated in a single forward pass through an upper bound derived from Lipschitz
continuity. Everything below is ours [R], derived from the LLaMA block
``h = x + Attn(N₁(x))``, ``y = h + FFN(N₂(h))``, ``FFN(u) = Σ_j W_down[:, j]·a_j(u)``:

* **MLP channel j** — deleting it changes the block output by exactly ``Δy_t = −W_down[:, j]·a_{t,j}``, so
  ``‖Δy_t‖ = ‖W_down[:, j]‖₂·|a_{t,j}|`` and the score is
  ``I_j = ‖W_down[:, j]‖₂ · sqrt(E_t[a_j²])`` (option ``mlp_agg=rms``, default) or ``‖W_down[:, j]‖₂·E_t|a_j|``
  (``mlp_agg=abs``). Exact; no Lipschitz argument.
* **Attention (KV) group g** — deleting it changes the attention branch by ``Δh_t = −W_o[:, S_g]·o_{t,S_g}``
  (S_g: the o_proj input columns of the group's query heads; the other heads are unaffected). That change passes
  through ``F(h) = h + FFN(N₂(h))``, so ``‖Δy_t‖ ≤ K_ℓ·‖Δh_t‖`` and the score is
  ``I_g = K_ℓ · E_t ‖W_o[:, S_g] o_{t,S_g}‖₂`` (per token, not the looser ‖W_o[:, S_g]‖·‖o‖).
* **K_ℓ** (option ``lipschitz``): ``one_plus`` (default) ``1 + max_t σ_max(J_t)``, with J_t the Jacobian of
  FFN∘RMSNorm at token t, by power iteration (``lip_iters``, 20) on ``lip_tokens`` (64) calibration tokens of
  the post-attention residual stream; ``residual``: ``max_t σ_max(I + J_t)`` (tighter); ``none``: K = 1.
  J is applied analytically (SiLU-gated FFN, RMSNorm) — plain matmuls, no autograd. It is a local estimate:
  the mean-value bound holds to first order in Δh, which is why the tests check it rather than assume it.
* K only matters when heads are compared across blocks or with channels. Default allocation **uniform** (a
  per-block ratio, as LLM-Pruner and MINI-LLM); ``--allocation global`` z-scores per layer-module (FLAP-style
  per-block normalisation) then ranks globally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Context, Method, MethodOptions, option, register
from ..numerics import block_len, per_channel
from ..groups import LayerGroups


def down_col_norm(w_down: torch.Tensor) -> torch.Tensor:
    """``‖W_down[:, j]‖₂`` for every MLP channel j, in float64 one block of columns at a time → [n_ff]."""
    return per_channel(w_down, lambda b: b.norm(dim=0), 1)


def mlp_channel_change(w_down: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-token block-output change of deleting each MLP channel: ``‖W_down[:, j]‖₂·|a_{t,j}|`` → [T, n_ff]."""
    return a.reshape(-1, a.shape[-1]).double().abs() * down_col_norm(w_down)[None, :]


def abs_col_sum(a: torch.Tensor) -> torch.Tensor:
    """``Σ_t |a_{t,j}|`` over all tokens of a batch of MLP activations ``[..., n_ff]``, in float64 one block of
    channels at a time → [n_ff] on a's device."""
    return per_channel(a.reshape(-1, a.shape[-1]), lambda b: b.abs_().sum(0), 1)


def attn_group_change(w_o: torch.Tensor, o: torch.Tensor, lg: LayerGroups) -> torch.Tensor:
    """Per-token attention-branch change of deleting each KV group: ``‖W_o[:, S_g] o_{t,S_g}‖₂`` → [T, n_kv]."""
    o = o.reshape(-1, o.shape[-1])
    span = lg.n_rep * lg.head_dim
    out = torch.empty(o.shape[0], lg.n_kv, dtype=torch.float64)
    for g in range(lg.n_kv):
        sl = slice(g * span, (g + 1) * span)
        out[:, g] = (o[:, sl] @ w_o[:, sl].T).double().norm(dim=1)
    return out


def mm(x: torch.Tensor, w: torch.Tensor, dt: torch.dtype, t: bool = False) -> torch.Tensor:
    """``x·Wᵀ`` (``t``) or ``x·W`` in ``dt``. A weight stored in another dtype is converted one block of output
    columns at a time (``W[I]`` rows for ``x·Wᵀ``, ``W[:, J]`` columns for ``x·W``, :func:`~edgeprune.numerics.block_len`
    lines each), never as a whole: ``out[:, I] = x·W[I].to(dt)ᵀ`` (each output column is the same dot product)."""
    if w.dtype == dt:
        return x @ (w.T if t else w)
    n_out = w.shape[0] if t else w.shape[1]
    step = block_len(w.shape[1] if t else w.shape[0])
    out = torch.empty(*x.shape[:-1], n_out, dtype=dt, device=x.device)
    for a in range(0, n_out, step):
        out[..., a:a + step] = x @ (w[a:a + step].to(dt).T if t else w[:, a:a + step].to(dt))
    return out


def ffn_jacobian_ops(layer, h: torch.Tensor):
    """(J·v, Jᵀ·w) of ``FFN(RMSNorm(h))`` at the rows of h [T, d], analytic (SiLU-gated MLP, RMSNorm)."""
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    if "silu" not in type(mlp.act_fn).__name__.lower() and getattr(mlp.act_fn, "__name__", "") != "silu":
        raise ValueError("bip's Lipschitz estimate supports SiLU-gated MLPs only; use --opt lipschitz=none")
    dt = mlp.down_proj.weight.dtype if mlp.down_proj.weight.dtype == torch.float64 else torch.float32
    h = h.to(dt)
    gam = norm.weight.to(dt)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    d = h.shape[-1]
    r = (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    u = gam * h * r
    wg, wu, wd = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
    gp, up = mm(u, wg, dt, t=True), mm(u, wu, dt, t=True)
    sig = torch.sigmoid(gp)
    silu, dsilu = gp * sig, sig * (1 + gp * (1 - sig))

    def jv(v):
        nv = gam * (r * v - r ** 3 * (h * v).sum(-1, keepdim=True) / d * h)
        return mm(dsilu * up * mm(nv, wg, dt, t=True) + silu * mm(nv, wu, dt, t=True), wd, dt, t=True)

    def jtw(w):
        b = mm(w, wd, dt)
        t = mm(dsilu * up * b, wg, dt) + mm(silu * b, wu, dt)
        gt = gam * t
        return r * gt - r ** 3 / d * h * (h * gt).sum(-1, keepdim=True)

    return jv, jtw


def token_lipschitz(layer, h: torch.Tensor, iters: int = 30, residual: bool = False, seed: int = 0) -> torch.Tensor:
    """σ_max of J_t (or of I + J_t) for every token row of h, by batched power iteration → [T]."""
    jv, jtw = ffn_jacobian_ops(layer, h)
    if residual:
        a, at = (lambda v: v + jv(v)), (lambda w: w + jtw(w))
    else:
        a, at = jv, jtw
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(h.dtype)
    v = v / v.norm(dim=-1, keepdim=True)
    for _ in range(iters):
        v = at(a(v))
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return a(v).double().norm(dim=-1)


@register("bip")
class BIP(Method):
    """LLM-BIP: block-output effect of each unit from one forward pass; see the module docstring."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        lipschitz: str = option("one_plus", choices=("one_plus", "residual", "none"), doc="the K of a block")
        mlp_agg: str = option("rms", choices=("rms", "abs"), doc="aggregation of MLP activations over tokens")
        lip_tokens: int = option(64, lo=1, doc="tokens of the Lipschitz estimate")
        lip_iters: int = option(20, lo=1, doc="power iterations")

    default_allocation = "uniform"

    def layer_scorer(self, ctx: Context) -> "BIPScorer":
        return BIPScorer(self.options(ctx), ctx.seed)


class BIPScorer:
    """LLM-BIP per layer (the engine calls it for layers 0, 1, ... in order): hooks on ``o_proj`` / ``down_proj``
    (and the post-attention norm for K) accumulate during the layer's calibration forward, then
    :meth:`score` forms the scores. The token sampler's generator (seed ``seed``) runs across layers in order;
    layer i's power iteration uses seed ``seed + i``."""

    def __init__(self, opts, seed: int):
        self.o, self.seed = opts, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.ks, self.acc = [], {}

    def hooks(self, i: int, layer, lg: LayerGroups) -> list:
        self.acc = st = {"attn": torch.zeros(lg.n_kv, dtype=torch.float64),
                         "abs": torch.zeros(lg.n_mlp, dtype=torch.float64), "n": 0, "h": []}
        n_tok = self.o.lip_tokens

        def o_hook(mod, args):
            st["attn"] += attn_group_change(mod.weight, args[0], lg).sum(0).cpu()
            st["n"] += args[0].shape[0] * args[0].shape[1]

        def d_hook(mod, args):
            st["abs"] += abs_col_sum(args[0]).cpu()

        def h_hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            k = min(x.shape[0], max(n_tok // 4, 1))
            st["h"].append(x[torch.randperm(x.shape[0], generator=self.gen)[:k].to(x.device)].clone())

        hs = [layer.self_attn.o_proj.register_forward_pre_hook(o_hook),
              layer.mlp.down_proj.register_forward_pre_hook(d_hook)]
        if self.o.lipschitz != "none":
            hs.append(layer.post_attention_layernorm.register_forward_pre_hook(h_hook))
        return hs

    @torch.no_grad()
    def score(self, i: int, layer, lg: LayerGroups, st):
        a, lip = self.acc, self.o.lipschitz
        if lip == "none":
            k = 1.0
        else:
            h = torch.cat(a["h"])[: self.o.lip_tokens]
            sig = token_lipschitz(layer, h, self.o.lip_iters, residual=lip == "residual", seed=self.seed + i)
            k = float(sig.max()) + (1.0 if lip == "one_plus" else 0.0)
        wn = down_col_norm(layer.mlp.down_proj.weight).cpu()
        act = (st.down_in.sq / st.down_in.n).sqrt().cpu() if self.o.mlp_agg == "rms" else a["abs"] / st.down_in.n
        self.ks.append(k)
        self.acc = {}
        return k * a["attn"] / max(a["n"], 1), wn * act, None

    def info(self) -> dict:
        return {"lipschitz": self.o.lipschitz, "K": self.ks, "mlp_agg": self.o.mlp_agg,
                "lip_tokens": self.o.lip_tokens, "forward_passes": 1}
