"""Baseline importance methods (specs: shared docs methods.md §2): magnitude, Wanda-sp, FLAP, LLM-Pruner."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Context, LayerScore, Method, MethodOptions, Scores, option, per_kv_group, register
from ..numerics import per_channel
from .taylor import GQA_FOLDS, KINDS, BackwardMethod, BackwardOptions, backward_grads, gradient_windows, group_taylor
from ..models import decoder_layers


@register("magnitude")
class Magnitude(Method):
    """Group norm: ``‖W_G‖_p`` over all weights of the group (q/k/v rows + o columns; gate/up rows + down column).
    ``p`` (option ``norm``) is 1 or 2 (default 2). Needs no calibration data. Per-row / per-column sums
    ``Σ |W|^p`` in float64, one block of rows / columns at a time (:func:`~edgeprune.numerics.per_channel`)."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        norm: int = option(2, choices=(1, 2), doc="the p of the group norm")

    default_allocation = "uniform"
    needs_calibration = False

    def score_layer(self, layer, lg, stats, opts) -> LayerScore:
        p = opts.norm
        a, m = layer.self_attn, layer.mlp
        # f(w, d): Σ over dim d of |w|^p, i.e. one value per line of the other dim
        f = ((lambda w, d: per_channel(w, lambda b: b.abs_().sum(d), 1 - d)) if p == 1 else
             (lambda w, d: per_channel(w, lambda b: (b ** 2).sum(d), 1 - d)))
        att = (f(a.q_proj.weight, 1).reshape(lg.n_kv, -1).sum(1) + f(a.k_proj.weight, 1).reshape(lg.n_kv, -1).sum(1)
               + f(a.v_proj.weight, 1).reshape(lg.n_kv, -1).sum(1) + f(a.o_proj.weight, 0).reshape(lg.n_kv, -1).sum(1))
        ch = f(m.gate_proj.weight, 1) + f(m.up_proj.weight, 1) + f(m.down_proj.weight, 0)
        return LayerScore(att if p == 1 else att.sqrt(), ch if p == 1 else ch.sqrt(), info={"norm": p})


@register("wanda-sp")
class WandaSP(Method):
    """Wanda-sp (FLAP repo): for o_proj / down_proj input channel j, ``S_j = mean_i |W_ij| · ‖X_j‖₂``;
    a KV group sums its channels, an MLP channel is its own score. Uniform allocation. ``mean_i |W_ij|`` is
    taken in float64 one block of columns at a time (:func:`~edgeprune.numerics.per_channel`)."""

    default_allocation = "uniform"

    def score_layer(self, layer, lg, st, opts) -> LayerScore:
        col_abs_mean = lambda w: per_channel(w, lambda b: b.abs_().mean(0), 1)   # mean_i |W_ij|
        so = col_abs_mean(layer.self_attn.o_proj.weight.data) * st.o_in.norm
        sd = col_abs_mean(layer.mlp.down_proj.weight.data) * st.down_in.norm
        return LayerScore(per_kv_group(so, lg), sd)


@register("flap")
class FLAP(Method):
    """FLAP: WIFV fluctuation ``S_j = V_j · ‖W[:, j]‖₂²`` of o_proj / down_proj input channels (V_j: sample
    variance over calibration tokens); attention channel scores are squared (as FLAP's code does), then every
    layer-module is z-scored ``(S − mean)/std``; a KV group's score is the mean over its channels. Allocation
    AL-AM: one global threshold over heads and channels weighted by parameter cost. Bias compensation:
    ``b = W[:, removed] · x̄[removed]``. Option ``metric``: WIFV (default), IFV, WIFN."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        metric: str = option("WIFV", choices=("WIFV", "IFV", "WIFN"), doc="fluctuation metric")
        bias_compensation: bool = option(True, doc="fold the removed channels' mean output into a bias")

    default_allocation = "global"
    standardized = True

    def score_layer(self, layer, lg, st, o) -> LayerScore:
        metric = o.metric
        wo, wd = layer.self_attn.o_proj.weight.data, layer.mlp.down_proj.weight.data
        col = lambda w, fn: per_channel(w, fn, 1)   # float64, one block of columns at a time
        if metric == "WIFV":
            sq = lambda b: (b ** 2).sum(0)           # ‖W[:, j]‖₂²
            so, sd = st.o_in.var * col(wo, sq), st.down_in.var * col(wd, sq)
        elif metric == "IFV":
            so, sd = st.o_in.var, st.down_in.var
        else:                                        # WIFN (Options admits only the three metrics)
            am = lambda b: b.abs_().mean(0)          # mean_i |W_ij|
            so, sd = col(wo, am) * st.o_in.norm, col(wd, am) * st.down_in.norm
        so = so ** 2
        z = lambda s: (s - s.mean()) / (s.std() + 1e-12)
        means = {"o": st.o_in.mean.float(), "down": st.down_in.mean.float()} if o.bias_compensation else None
        return LayerScore(per_kv_group(z(so), lg, reduce="mean"), z(sd), means, info={"metric": metric})


@register("llm-pruner")
class LLMPruner(BackwardMethod):
    """LLM-Pruner: first-order / approximate second-order Taylor importance from one backward pass of the LM
    loss on the calibration batch; option ``taylor`` in vectorize | param_first (default) | param_second |
    param_mix; ``sum`` aggregation over group members. Default allocation: uniform with its skipped layers
    (first 4 and last 2 of 32, scaled to the model's depth).

    The batch is ``grad_samples`` (10) windows of ``grad_len`` (64) text tokens without the leading BOS, as the
    official ``get_examples`` draws them (``grad_bos=true`` keeps BOS); ``gqa_fold`` heads (default) | official,
    see :mod:`.taylor`. The official code's choices and what they change: benchmarks/llm_pruner_fidelity.md."""

    @dataclass(frozen=True)
    class Options(BackwardOptions):
        taylor: str = option("param_first", choices=KINDS, doc="Taylor importance kind")
        gqa_fold: str = option("heads", choices=GQA_FOLDS, doc="how q/o channels are credited to KV groups")
        grad_bos: bool = option(False, doc="keep the BOS column in the gradient windows")

    default_allocation = "uniform"

    def score(self, model, ctx: Context) -> Scores:
        o = self.options(ctx)
        kind, fold = o.taylor, o.gqa_fold
        # a streamed block-local view runs stored row prefixes only, so there the windows keep their BOS
        keep_bos = o.grad_bos or getattr(model, "prefix_rows_only", False)
        ids = gradient_windows(ctx.calib_ids, o.grad_samples, o.grad_len, getattr(model.config, "bos_token_id", None),
                               keep_bos)
        grads, fisher = backward_grads(model, ids, batch_size=1, fisher=kind in ("param_second", "param_mix"))
        attn, mlp = group_taylor(model, ctx.groups, lambda i, p: grads[(i, p)],
                                 (lambda i, p: fisher[(i, p)]) if fisher else None, kind, fold)
        return Scores(attn, mlp, info={"taylor": kind, "grad_samples": int(ids.shape[0]), "grad_len": int(ids.shape[1]),
                                       "grad_bos": keep_bos, "gqa_fold": fold})
