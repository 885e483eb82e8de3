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

Without ``sequential`` every layer is repaired on the dense stream (like FLAP's bias compensation). Both
streams' hidden states are kept (``2·N·L·H`` floats); projection inputs are never stored, only the Gram
statistics (:class:`~edgeprune.reconstruct.Gram`), so the dense layer (a copy kept while the layer is repaired)
runs next to the pruned one in each stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .groups import LayerGroups, kv_index, q_index
from .reconstruct import DAMP, MODES, Gram, reconstruct
from .surgery import take_linear
from .typed_options import TypedOptions, option

TARGETS = ("resid", "dense", "self")


@dataclass(frozen=True)
class ReconOptions(TypedOptions):
    """The repair stage's ``--opt`` options (claimed only when a configuration runs the repair stage:
    ``--reconstruct`` or a method whose default is a refit)."""

    OWNER = "the repair stage"
    recon_target: str = option("resid", choices=TARGETS, doc="what the refit aims at (see the module docstring)")
    recon_damp: float = option(DAMP, lo=0.0, hi=1e6, doc="damping relative to mean(diag H)")
    recon_intercept: bool = option(True, doc="the refit may add an output bias")


@dataclass
class RepairOptions:
    """``mode`` in none|bias|lsq|obs; ``sequential`` calibration; ``target`` resid|dense|self; damping and whether
    the refit may add an output bias (``intercept``)."""

    mode: str = "lsq"
    sequential: bool = True
    target: str = "resid"
    damp: float = DAMP
    intercept: bool = True

    def validate(self) -> None:
        from .errors import EdgepruneError

        if self.mode not in MODES:
            raise EdgepruneError(f"--reconstruct {self.mode}: use one of {', '.join(MODES)}")
        if self.target not in TARGETS:
            raise EdgepruneError(f"--opt recon_target={self.target}: use resid, dense or self")
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


def _gram(layer, proj, hs: list[torch.Tensor], kwargs: dict, dense=None, hs_dense=None, resid=None) -> Gram:
    """Gram statistics of ``proj``'s inputs over ``hs`` (through ``layer``). With ``dense`` (the dense layer) and
    ``hs_dense``, the dense projection inputs on the dense stream are the target inputs, batch by batch; with
    ``resid`` also the residual-stream error ``h_dense − h`` at the projection's output, which the refit then
    absorbs: ``resid = "input"`` for o_proj (the layer's input hidden states), or a function giving the module
    whose input is that residual stream (``post_attention_layernorm`` for down_proj)."""
    from .calibrate import layer_forward

    g, cur = Gram(), {}
    pre = lambda key: (lambda _m, args: cur.__setitem__(key, args[0].detach()))
    hooks = [proj(layer).register_forward_pre_hook(pre("x"))]
    if dense is not None:
        hooks.append(proj(dense).register_forward_pre_hook(pre("t")))
        if callable(resid):
            hooks += [resid(layer).register_forward_pre_hook(pre("h")),
                      resid(dense).register_forward_pre_hook(pre("hd"))]
    try:
        for b, h in enumerate(hs):
            layer_forward(layer, h, kwargs)
            r = None
            if dense is not None:
                layer_forward(dense, hs_dense[b], kwargs)
                r = (hs_dense[b] - h) if resid == "input" else (cur["hd"] - cur["h"]) if callable(resid) else None
            g.update(cur["x"], cur.get("t"), r)
    finally:
        for hd in hooks:
            hd.remove()
    return g


def _swap(lin, keep, r):
    new = take_linear(lin, cols=keep, extra_bias=r.bias)
    new.weight.data.copy_(r.weight)
    return new


@torch.no_grad()
def repair_layer(i: int, layer, lg: LayerGroups, kv: torch.Tensor, ch: torch.Tensor, hs: list[torch.Tensor],
                 kwargs: dict, opts: RepairOptions, dense=None, hs_dense: list[torch.Tensor] | None = None
                 ) -> LayerRepair:
    """Prune ``layer`` in place to KV groups ``kv`` and channels ``ch``, refitting o_proj / down_proj on the
    calibration inputs ``hs`` (with ``dense``/``hs_dense``: toward the dense layer's outputs on the dense stream).
    ``dense`` must be an untouched copy of the layer when given."""
    rep = LayerRepair(i)
    a, m = layer.self_attn, layer.mlp
    if kv.numel() != lg.n_kv:
        qi, ki = q_index(lg, kv), kv_index(lg, kv)
        g = _gram(layer, lambda l: l.self_attn.o_proj, hs, kwargs, dense, hs_dense,
                  "input" if opts.target == "resid" else None) if opts.mode != "none" else Gram()
        r = reconstruct(a.o_proj.weight.data, g, qi, opts.mode, opts.damp, opts.intercept, f"layer {i} o_proj") \
            if opts.mode != "none" else None
        a.q_proj, a.k_proj, a.v_proj = take_linear(a.q_proj, rows=qi), take_linear(a.k_proj, rows=ki), take_linear(a.v_proj, rows=ki)
        a.o_proj = _swap(a.o_proj, qi, r) if r is not None else take_linear(a.o_proj, cols=qi)
        _set_heads(a, lg, kv.numel())
        if r is not None:
            rep.modes["o_proj"], rep.errors["o_proj"], rep.errors_none["o_proj"] = r.mode, r.error, r.error_none
        del g
    if ch.numel() != lg.n_mlp:
        g = _gram(layer, lambda l: l.mlp.down_proj, hs, kwargs, dense, hs_dense,
                  (lambda l: l.post_attention_layernorm) if opts.target == "resid" else None) \
            if opts.mode != "none" else Gram()
        r = reconstruct(m.down_proj.weight.data, g, ch, opts.mode, opts.damp, opts.intercept, f"layer {i} down_proj") \
            if opts.mode != "none" else None
        m.gate_proj, m.up_proj = take_linear(m.gate_proj, rows=ch), take_linear(m.up_proj, rows=ch)
        m.down_proj = _swap(m.down_proj, ch, r) if r is not None else take_linear(m.down_proj, cols=ch)
        m.intermediate_size = ch.numel()
        if r is not None:
            rep.modes["down_proj"], rep.errors["down_proj"], rep.errors_none["down_proj"] = r.mode, r.error, r.error_none
        del g
    return rep


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
    import copy

    kv_t, ch_t = torch.tensor(kv, dtype=torch.long), torch.tensor(ch, dtype=torch.long)
    if not opts.sequential:   # every layer sees the dense stream: its outputs before surgery go on
        nxt = _forward(layer, st.hs, st.kwargs)
        rep = repair_layer(i, layer, lg, kv_t, ch_t, st.hs, st.kwargs, opts)
        st.hs = nxt
        return rep
    dense = copy.deepcopy(layer) if st.hs_dense is not None else None
    rep = repair_layer(i, layer, lg, kv_t, ch_t, st.hs, st.kwargs, opts, dense, st.hs_dense)
    if dense is not None:
        st.hs_dense = _forward(dense, st.hs_dense, st.kwargs)
    st.hs = _forward(layer, st.hs, st.kwargs)
    return rep


class RepairStage:
    """The repair stage as an engine layer stage (:class:`edgeprune.engine.EngineConfig` ``stage``): the engine
    calls :meth:`start` with the layer-0 calibration inputs, then :meth:`step` for every layer in order."""

    def __init__(self, opts: RepairOptions):
        opts.validate()
        self.opts, self.layers, self.st = opts, [], None

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
