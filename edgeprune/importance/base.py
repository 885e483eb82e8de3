"""The importance-method interface and its registry.

A method scores every coupled group (see :mod:`edgeprune.groups`); higher = more important. Adding a method is
one module plus one ``@register`` line::

    @register("my-method")
    class MyMethod(Method):
        default_allocation = "uniform"
        def score(self, model, ctx): ...  # -> Scores
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import EdgepruneError
from ..groups import LayerGroups, model_groups

REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


@dataclass
class Scores:
    """Per-layer group scores. ``attn[i]``: [n_kv] for layer i; ``mlp[i]``: [n_ff].

    ``standardized``: the scores are already comparable across layers and modules (the global allocator uses
    them as they are instead of z-scoring per layer/module). ``bias_means``: per-layer input means for FLAP's
    bias compensation (``{"o": [n_q·hd], "down": [n_ff]}``). ``info``: provenance (options, timings).
    """

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    standardized: bool = False
    bias_means: list[dict] | None = None
    layer_ratios: list[float] | None = None  # a method's own per-layer allocation (e.g. SAAP), if any
    info: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a method may use: the calibration token ids, options, a seed, and lazily computed shared statistics."""

    model: object
    calib_ids: torch.Tensor
    seed: int = 0
    options: dict = field(default_factory=dict)
    batch_size: int = 16
    progress: bool = True

    @cached_property
    def groups(self) -> list[LayerGroups]:
        return model_groups(self.model)

    @cached_property
    def layer_stats(self):
        """Dense layer-wise statistics (:func:`edgeprune.calibrate.collect`), computed once and shared."""
        from ..calibrate import collect

        return collect(self.model, self.calib_ids, self.batch_size, progress=self.progress)

    def opt(self, key: str, default):
        return self.options.get(key, default)


class Method:
    name = "base"
    default_allocation = "uniform"
    default_reconstruct: str | None = None   # the repair stage a method implies (None: its own surgery)
    needs_gradients = False

    def score(self, model, ctx: Context) -> Scores:  # pragma: no cover - interface
        raise NotImplementedError


def get_method(name: str) -> Method:
    from . import _load_all

    _load_all()

    if name not in REGISTRY:
        raise EdgepruneError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


# --------------------------------------------------------------------------- helpers shared by methods
def per_kv_group(channel_scores: torch.Tensor, lg: LayerGroups, reduce: str = "sum") -> torch.Tensor:
    """Fold per-channel scores of o_proj's input ([n_q·hd]) into KV-group scores ([n_kv])."""
    x = channel_scores.reshape(lg.n_kv, lg.n_rep * lg.head_dim)
    return x.sum(1) if reduce == "sum" else x.mean(1)


def group_row_sum(w_rows: torch.Tensor, lg: LayerGroups, span: int) -> torch.Tensor:
    """Sum a per-row quantity over consecutive spans (q rows: n_rep·hd per group; k/v rows: hd per group)."""
    return w_rows.reshape(lg.n_kv, span).sum(1)


BLOCK_ELEMS = 1 << 20   # elements per float64 working block (8 MB): the transient memory of blockwise scoring


def block_len(n_other: int, elems: int = BLOCK_ELEMS) -> int:
    """Lines (rows or columns) per block when each line has ``n_other`` elements:
    ``16 · max(1, ⌊elems / (16 · n_other)⌋)`` (a multiple of 16, about ``elems`` elements per block)."""
    return max(16, elems // max(n_other, 1) // 16 * 16)


def per_channel(w: torch.Tensor, fn, dim: int) -> torch.Tensor:
    """A per-channel reduction of a weight matrix in float64 without a float64 copy of the whole matrix:
    ``dim=1`` (input columns j) → ``cat_J fn(W[:, J].double())``, ``dim=0`` (output rows i) →
    ``cat_I fn(W[I, :].double())``, over blocks J (I) of :func:`block_len` lines. ``fn`` maps a float64 block
    (which it may modify in place) to one value per line of it, reducing over the *whole* other dimension — so
    every channel sees exactly the reduction it would see on the whole matrix (e.g. ``fn = lambda b:
    b.abs_().mean(0)`` gives ``mean_i |W_ij|``). The result is float64 on W's device; W is never written."""
    w = w.detach()
    n = w.shape[dim]
    step = block_len(w.shape[1 - dim])
    # the result is allocated up front: a small tensor kept per block would sit in the freed block's place and
    # push the next block to fresh heap (glibc), growing the resident memory block after block
    out = torch.empty(n, dtype=torch.float64, device=w.device)
    for a in range(0, n, step):
        blk = (w[:, a:a + step] if dim == 1 else w[a:a + step]).to(torch.float64, copy=True)
        out[a:a + step] = fn(blk)
        del blk
    return out
