"""Layer-wise calibration: feed one decoder layer at a time (as FLAP and Wanda-sp do).

The embeddings run once; then each decoder layer ``i`` receives the calibration hidden states, forward hooks
collect statistics of its inputs, and its outputs become the next layer's inputs. Peak memory is one layer's
weights plus the activations ``[N, L, H]``. This module holds the one-layer step (:func:`calibrate_layer`);
the loop over layers is :mod:`edgeprune.engine`'s.

Per layer, :class:`LayerStats` accumulates (over all N·L tokens, in float64):

* ``o_in`` / ``down_in`` — statistics of the **inputs** of ``o_proj`` (the concatenated head outputs) and of
  ``down_proj`` (the MLP activations ``σ(W_gate u) ⊙ W_up u``): count, mean ``x̄_j``, ``M2_j = Σ (x_j − x̄_j)²``
  (Welford / Chan merge) and ``sq_j = Σ x_j²``.
* ``attn_in`` / ``mlp_in`` — ``Σ x_j²`` of the normalised inputs of q/k/v and gate/up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .numerics import block_len
from .models import decoder_layers


@dataclass
class ChannelStats:
    """Running per-channel statistics (Chan et al. parallel variance)."""

    n: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    sq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x [..., C]`` (nb tokens): the batch's ``x̄_b = mean_t x_t``, ``M2_b = Σ_t (x_t − x̄_b)²``
        and ``Σ_t x_t²`` are computed in float64 one block of channels at a time (no float64 copy of the whole
        batch; every channel sees the same reduction as on the whole batch), then merged (Chan et al.)."""
        x = x.detach().reshape(-1, x.shape[-1])
        nb, c = x.shape
        mb, m2b, sqb = (torch.empty(c, dtype=torch.float64, device=x.device) for _ in range(3))
        step = block_len(nb)
        for a in range(0, c, step):
            xb = x[:, a:a + step].to(torch.float64, copy=True)
            m = xb.mean(0)
            mb[a:a + step] = m
            sqb[a:a + step] = (xb * xb).sum(0)
            m2b[a:a + step] = ((xb - m) ** 2).sum(0)
            del xb
        if self.n == 0:
            self.n, self.mean, self.m2, self.sq = nb, mb, m2b, sqb
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta ** 2 * self.n * nb / n
        self.sq = self.sq + sqb
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        """Sample variance V_j = M2_j / (n − 1)."""
        return self.m2 / max(self.n - 1, 1)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens."""
        return self.sq.sqrt()


@dataclass
class LayerStats:
    o_in: ChannelStats = field(default_factory=ChannelStats)
    down_in: ChannelStats = field(default_factory=ChannelStats)
    attn_in: ChannelStats = field(default_factory=ChannelStats)
    mlp_in: ChannelStats = field(default_factory=ChannelStats)


@torch.no_grad()
def layer0_inputs(model, ids: torch.Tensor, batch_size: int = 16):
    """Hidden states entering layer 0 for every calibration row, and the keyword arguments the decoder layers
    need (rotary position embeddings, causal mask, positions), captured from one real model call."""
    layers = decoder_layers(model)
    captured: dict = {}

    class _Stop(Exception):
        pass

    def pre_hook(_mod, args, kwargs):
        captured.setdefault("h", []).append((args[0] if args else kwargs["hidden_states"]).detach())
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for b in range(0, ids.shape[0], batch_size):
            try:
                model(ids[b:b + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return captured["h"], kwargs


def layer_forward(layer, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    kw = dict(kwargs)
    am = kw.get("attention_mask")
    if isinstance(am, torch.Tensor) and am.shape[0] not in (1, h.shape[0]):
        kw["attention_mask"] = am[:1].expand(h.shape[0], *am.shape[1:])
    pe = kw.get("position_embeddings")
    if pe is not None and pe[0].shape[0] not in (1, h.shape[0]):
        kw["position_embeddings"] = tuple(t[:1].expand(h.shape[0], *t.shape[1:]) for t in pe)
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


Collector = Callable[[int, torch.nn.Module], list]  # (layer index, layer) -> hook handles


@torch.no_grad()
def calibrate_layer(layer, hs: list[torch.Tensor], kwargs: dict, extra: Collector | None = None, i: int = 0):
    """Run one decoder layer over the calibration hidden states with the statistics hooks attached;
    returns (LayerStats, outputs). The step of :mod:`edgeprune.engine`'s layer loop."""
    st = LayerStats()
    a, m = layer.self_attn, layer.mlp
    handles = [
        a.o_proj.register_forward_pre_hook(lambda _m, args: st.o_in.update(args[0])),
        m.down_proj.register_forward_pre_hook(lambda _m, args: st.down_in.update(args[0])),
        a.q_proj.register_forward_pre_hook(lambda _m, args: st.attn_in.update(args[0])),
        m.gate_proj.register_forward_pre_hook(lambda _m, args: st.mlp_in.update(args[0])),
    ]
    if extra is not None:
        handles += extra(i, layer)
    try:
        outs = [layer_forward(layer, h, kwargs) for h in hs]
    finally:
        for hd in handles:
            hd.remove()
    return st, outs
