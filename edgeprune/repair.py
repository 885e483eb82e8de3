"""The repair stage: prune one decoder layer and refit its output projections on calibration activations.

For layer ``l`` with kept KV groups ``K`` and MLP channels ``C`` (:class:`~edgeprune.groups.Plan`), in order:

1. **attention** — the ``o_proj`` inputs ``X`` (all heads, the layer still dense) are gathered on the layer's
   calibration inputs; ``o_proj`` is refitted on the kept head columns (:func:`edgeprune.reconstruct.reconstruct`)
   and q/k/v rows + o columns of the removed groups are cut;
2. **MLP** — with the attention already pruned and refitted, the ``down_proj`` inputs are gathered the same way
   and ``down_proj`` is refitted on the kept channels; gate/up rows and down columns are cut.

**Sequential calibration** (SparseGPT, arXiv 2301.00774; ZipLM, arXiv 2302.04089): with ``sequential`` the
layer's inputs are the outputs of the already pruned and repaired layers ``0..l−1`` (the *pruned stream*) while
the dense model runs alongside on its own inputs (the *dense stream*). ``target`` says what the refit aims at:

* ``self`` — ``W X`` on the pruned stream (SparseGPT's choice: keep what this layer computes from its inputs);
* ``dense`` — the dense model's projection output ``W X_dense`` (the refit also absorbs the error the earlier
  layers left in this projection's inputs);
* ``resid`` (default) — ``W X_dense + (h_dense − h)``, where ``h`` is the residual stream the projection's
  output is added to (the layer input for ``o_proj``, the post-attention residual for ``down_proj``): the refit
  also pulls the residual stream itself back toward the dense model's [R: our extension; measured in
  benchmarks/quality.md].

Without ``sequential`` every layer is repaired on the dense stream (like FLAP's bias compensation).

Memory: no copy of the layer is kept. The dense stream runs through the layer while it is still dense (in the
``o_proj`` stage, which also records the dense stream's post-attention residuals ``h_dense'`` and the layer's
dense outputs); the ``down_proj`` targets come from the still dense MLP applied to ``h_dense'``. So the calibration
hidden states held are ``hs``, ``hs_dense``, ``h_dense'`` and the dense outputs: ``4·N·L·H`` values in the compute
dtype (N rows of L tokens, hidden size H). Projection inputs are never stored, only the refit statistics of the
kept columns (:class:`~edgeprune.reconstruct.RefitStats`, bounded as documented in :mod:`edgeprune.reconstruct`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .procmem import trim
from .groups import LayerGroups, kv_index, q_index
from .reconstruct import DAMP, MODES, RefitStats, reconstruct
from .surgery import take_linear
from .typed_options import TypedOptions, option

TARGETS = ("resid", "dense", "self")
SCORE_INPUTS = ("dense", "pruned")


@dataclass(frozen=True)
class ReconOptions(TypedOptions):
    """The repair stage's ``--opt`` options (claimed only when a configuration runs the repair stage:
    ``--reconstruct`` or a method whose default is a refit)."""

    OWNER = "the repair stage"
    recon_target: str = option("resid", choices=TARGETS, doc="what the refit aims at (see the module docstring)")
    recon_damp: float = option(DAMP, lo=0.0, hi=1e6, doc="damping relative to mean(diag H)")
    recon_intercept: bool = option(True, doc="the refit may add an output bias")
    recon_scores: str = option("dense", choices=SCORE_INPUTS,
                               doc="inputs the importance scores see: the dense model's (scored once) or the "
                                   "pruned stream's (each layer re-scored after the layers before it are pruned "
                                   "and refitted, keeping the allocation's per-layer counts)")


@dataclass
class RepairOptions:
    """``mode`` in none|bias|lsq|obs; ``sequential`` calibration; ``target`` resid|dense|self; damping and whether
    the refit may add an output bias (``intercept``)."""

    mode: str = "lsq"
    sequential: bool = True
    target: str = "resid"
    damp: float = DAMP
    intercept: bool = True
    scores: str = "dense"

    def validate(self) -> None:
        from .errors import EdgepruneError

        if self.mode not in MODES:
            raise EdgepruneError(f"--reconstruct {self.mode}: use one of {', '.join(MODES)}")
        if self.target not in TARGETS:
            raise EdgepruneError(f"--opt recon_target={self.target}: use resid, dense or self")
        if self.scores not in SCORE_INPUTS:
            raise EdgepruneError(f"--opt recon_scores={self.scores}: use dense or pruned")
        if not (0.0 <= self.damp < 1e6):
            raise EdgepruneError(f"--opt recon_damp={self.damp}: use a damping >= 0 (relative to mean(diag H)), "
                                 "e.g. 0.01")


@dataclass
class LayerRepair:
    """What the repair did to one layer: the mode used and the relative calibration error per projection."""

    layer: int
    modes: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    errors_none: dict = field(default_factory=dict)


def _forward(layer, hs, kwargs):
    from .calibrate import layer_forward

    return [layer_forward(layer, h, kwargs) for h in hs]


def _run(fn, h: torch.Tensor, mods: dict) -> tuple[torch.Tensor, dict]:
    """``fn(h)`` with the inputs of the modules ``mods`` (name -> module) captured for this call only."""
    cap = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, k=k: cap.__setitem__(k, args[0].detach()))
             for k, m in mods.items()]
    try:
        out = fn(h)
    finally:
        for hd in hooks:
            hd.remove()
    return out, cap


REPAIR_TOKENS = 512   # tokens per layer forward in the statistics passes: bounds the activations held at once


def _chunks(h: torch.Tensor) -> list[torch.Tensor]:
    """``h [rows, T, d]`` as row chunks of about :data:`REPAIR_TOKENS` tokens (views). The statistics are sums over
    tokens, so chunking changes only the order of the additions; a whole calibration batch of a 7B layer
    (16 x 128 tokens) held ≈ 0.45 GB of MLP activations per forward."""
    return list(torch.split(h, max(1, REPAIR_TOKENS // h.shape[1]), dim=0))


def _paired(h: torch.Tensor, d: torch.Tensor | None):
    """The row chunks of ``h`` with the matching chunks of ``d`` (None throughout when there is no ``d``)."""
    hc = _chunks(h)
    return zip(hc, _chunks(d) if d is not None else [None] * len(hc))


def _attn_stats(layer, qi, hs, kwargs, opts: RepairOptions, hs_dense) -> tuple[RefitStats | None, list]:
    """The o_proj refit statistics over the calibration batches (the layer still dense) and, with a dense
    stream, that stream's post-attention residuals (the dense layer's, computed on the spot)."""
    from .calibrate import layer_forward

    fwd = lambda h: layer_forward(layer, h, kwargs)
    o, post = layer.self_attn.o_proj, layer.post_attention_layernorm
    st = RefitStats(o.weight, qi, full=opts.mode == "obs") if qi is not None else None
    hd = []
    for b, h in enumerate(hs):
        posts = []
        for hc, dc in _paired(h, hs_dense[b] if hs_dense is not None else None):
            cx = _run(fwd, hc, {"x": o})[1] if st is not None else None
            t = r = None
            if dc is not None:
                cd = _run(fwd, dc, {"t": o, "post": post})[1]
                posts.append(cd["post"])
                t = cd["t"]
                r = dc - hc if opts.target == "resid" else None
            if st is not None:
                st.update(cx["x"], t, r)
        if hs_dense is not None:
            hd.append(torch.cat(posts))
    return st, hd


def _mlp_stats(layer, ch, hs, kwargs, opts: RepairOptions, hd) -> RefitStats:
    """The down_proj refit statistics: inputs from the layer (attention already pruned and refitted) on ``hs``;
    with a dense stream, targets from the (still dense) MLP on the dense post-attention residuals ``hd``, which
    become the dense layer's outputs in place (``hd + mlp(post(hd))``, the decoder layer's own last step)."""
    from .calibrate import layer_forward

    fwd = lambda h: layer_forward(layer, h, kwargs)
    down, post = layer.mlp.down_proj, layer.post_attention_layernorm
    st = RefitStats(down.weight, ch, full=opts.mode == "obs")
    for b, h in enumerate(hs):
        outs = []
        for hc, dc in _paired(h, hd[b] if hd else None):
            cx = _run(fwd, hc, {"x": down, "h": post})[1]
            t = r = None
            if dc is not None:
                y, cd = _run(lambda z: layer.mlp(post(z)), dc, {"t": down})
                outs.append(dc + y)
                t = cd["t"]
                r = dc - cx["h"] if opts.target == "resid" else None
            st.update(cx["x"], t, r)
        if hd:
            hd[b] = torch.cat(outs)
    return st


def _dense_outputs(layer, hd: list) -> None:
    """The dense layer's outputs from its post-attention residuals, in place: ``hd + mlp(post(hd))`` (the MLP
    still dense)."""
    post = layer.post_attention_layernorm
    for b in range(len(hd)):
        hd[b] = torch.cat([dc + layer.mlp(post(dc)) for dc in _chunks(hd[b])])


def _swap(lin, keep, r):
    return take_linear(lin, cols=keep, extra_bias=r.bias, weight=r.weight)


def _record(rep: LayerRepair, proj: str, r) -> None:
    rep.modes[proj], rep.errors[proj], rep.errors_none[proj] = r.mode, r.error, r.error_none


@torch.no_grad()
def repair_layer(i: int, layer, lg: LayerGroups, kv: torch.Tensor, ch: torch.Tensor, hs: list[torch.Tensor],
                 kwargs: dict, opts: RepairOptions, hs_dense: list[torch.Tensor] | None = None
                 ) -> tuple[LayerRepair, list | None]:
    """Prune ``layer`` in place to KV groups ``kv`` and channels ``ch``, refitting o_proj / down_proj on the
    calibration inputs ``hs`` (with ``hs_dense``: toward the dense layer's outputs on the dense stream). Returns the
    record and, with ``hs_dense``, the dense layer's outputs on it (computed before any surgery: no copy of the
    layer is kept)."""
    rep = LayerRepair(i)
    a, m = layer.self_attn, layer.mlp
    cut_attn, cut_mlp = kv.numel() != lg.n_kv, ch.numel() != lg.n_mlp
    qi = q_index(lg, kv) if cut_attn else None
    st, hd = None, []
    if hs_dense is not None or (cut_attn and opts.mode != "none"):
        st, hd = _attn_stats(layer, qi if opts.mode != "none" else None, hs, kwargs, opts, hs_dense)
    if cut_attn:
        ki = kv_index(lg, kv)
        r = reconstruct(st, opts.mode, opts.damp, opts.intercept, f"layer {i} o_proj") if st is not None else None
        del st
        trim()   # the refit statistics: back to the OS before the MLP's are built
        a.q_proj, a.k_proj, a.v_proj = take_linear(a.q_proj, rows=qi), take_linear(a.k_proj, rows=ki), take_linear(a.v_proj, rows=ki)
        a.o_proj = _swap(a.o_proj, qi, r) if r is not None else take_linear(a.o_proj, cols=qi)
        _set_heads(a, lg, kv.numel())
        if r is not None:
            _record(rep, "o_proj", r)
        del r
    if cut_mlp:
        r = None
        if opts.mode != "none":   # hd becomes the dense outputs on the way
            r = reconstruct(_mlp_stats(layer, ch, hs, kwargs, opts, hd), opts.mode, opts.damp, opts.intercept,
                            f"layer {i} down_proj")
        elif hd:
            _dense_outputs(layer, hd)
        m.gate_proj, m.up_proj = take_linear(m.gate_proj, rows=ch), take_linear(m.up_proj, rows=ch)
        m.down_proj = _swap(m.down_proj, ch, r) if r is not None else take_linear(m.down_proj, cols=ch)
        m.intermediate_size = ch.numel()
        if r is not None:
            _record(rep, "down_proj", r)
        del r
        trim()
    elif hd:
        _dense_outputs(layer, hd)
    return rep, (hd if hs_dense is not None else None)


def _set_heads(a, lg: LayerGroups, n_kv: int) -> None:
    a.num_key_value_groups = lg.n_rep
    if hasattr(a, "num_heads"):
        a.num_heads = n_kv * lg.n_rep
    if hasattr(a, "num_key_value_heads"):
        a.num_key_value_heads = n_kv


@dataclass
class Streams:
    """Calibration hidden states entering the current layer: ``hs`` (the pruned stream, or the dense one when
    not sequential), ``hs_dense`` (the dense stream, for the ``dense`` and ``resid`` targets) and the layers' keyword
    arguments (rotary embeddings, mask)."""

    hs: list
    kwargs: dict
    hs_dense: list | None = None

    @classmethod
    def start(cls, hs: list, kwargs: dict, opts: RepairOptions) -> "Streams":
        dense = [h.clone() for h in hs] if opts.sequential and opts.target != "self" else None
        return cls(list(hs), kwargs, dense)


@torch.no_grad()
def repair_step(i: int, layer, lg: LayerGroups, kv: list[int], ch: list[int], st: Streams,
                opts: RepairOptions) -> LayerRepair:
    """Prune and repair one layer in place and advance the calibration streams past it — the body of the layer
    loop, shared by the in-memory (:func:`prune_repaired`) and the streamed path."""
    kv_t, ch_t = torch.tensor(kv, dtype=torch.long), torch.tensor(ch, dtype=torch.long)
    if not opts.sequential:   # every layer sees the dense stream: its outputs before surgery go on
        nxt = _forward(layer, st.hs, st.kwargs)
        rep, _ = repair_layer(i, layer, lg, kv_t, ch_t, st.hs, st.kwargs, opts)
        st.hs = nxt
        return rep
    rep, dense_out = repair_layer(i, layer, lg, kv_t, ch_t, st.hs, st.kwargs, opts, st.hs_dense)
    if dense_out is not None:
        st.hs_dense = dense_out
    st.hs = _forward(layer, st.hs, st.kwargs)
    return rep


class RepairStage:
    """The repair stage as an engine layer stage (:class:`edgeprune.engine.EngineConfig` ``stage``): the engine
    calls :meth:`start` with the layer-0 calibration inputs, then :meth:`step` for every layer in order."""

    def __init__(self, opts: RepairOptions):
        opts.validate()
        self.opts, self.layers, self.st = opts, [], None
        self.rescore = opts.scores == "pruned"   # the engine re-selects each layer's groups on :meth:`inputs`

    def inputs(self) -> list:
        """The calibration inputs of the current layer on the pruned stream (the dense stream when not sequential)."""
        return self.st.hs

    def start(self, hs: list, kwargs: dict) -> None:
        self.st = Streams.start(hs, kwargs, self.opts)

    def step(self, i: int, layer, lg: LayerGroups, kv: list[int], ch: list[int]) -> None:
        self.layers.append(repair_step(i, layer, lg, kv, ch, self.st, self.opts))

    def record(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self.opts), "layers": [asdict(r) for r in self.layers]}


def prune_repaired(model, plan, ids: torch.Tensor, opts: RepairOptions, batch_size: int = 16,
                   progress: bool = True) -> list[LayerRepair]:
    """Apply ``plan`` to ``model`` in place, layer by layer, with the repair stage (module docstring), through the
    engine's layer loop. Returns per-layer :class:`LayerRepair` records."""
    from .engine import apply_stage

    stage = RepairStage(opts)
    apply_stage(model, plan, ids, stage, batch_size, progress)
    return stage.layers
