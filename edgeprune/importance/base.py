"""The importance-method interface and its registry.

A method scores every coupled group (see :mod:`edgeprune.groups`); higher = more important. Adding a method is
one module in :mod:`edgeprune.importance` (found by auto-discovery) with one ``@register`` line::

    @register("my-method")
    class MyMethod(Method):
        @dataclass(frozen=True)
        class Options(MethodOptions):
            alpha: float = option(0.5, lo=0.0, doc="...")
        default_allocation = "uniform"
        def score_layer(self, layer, lg, stats, opts): ...   # -> LayerScore  (layer scope), or
        def score(self, model, ctx): ...                     # -> Scores      (model scope)

What a method can do is declared on its class (:class:`Method`): whether it needs calibration statistics or
gradients, the scope of its loss, whether its scores are already standardized, its default allocation and
its default skipped layers. Its options are a typed dataclass (:class:`MethodOptions`) checked before any model
is read (:meth:`Method.parse_options`): a wrong option is one line naming it and its allowed values (exit 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import EdgepruneError
from ..groups import LayerGroups, model_groups
from ..typed_options import TypedOptions, option  # noqa: F401 (option: re-exported for methods)

REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class MethodOptions(TypedOptions):
    """Base of a method's typed options (``--opt key=value``); subclasses add :func:`option` fields (the one typed
    options mechanism, :mod:`edgeprune.typed_options`; messages name the method)."""

    OWNER = "the method"


def skip_rule(first: int, last: int, per: int = 32):
    """A default skipped-layer rule stated for a ``per``-layer model, scaled to the model's depth L:
    ``(round(first·L/per + 0.49), round(last·L/per + 0.49))`` (LLM-Pruner keeps the first 4 and last 2 of 32)."""
    return lambda n_layers: [round(first * n_layers / per + 0.49), round(last * n_layers / per + 0.49)]


NO_SKIP = skip_rule(0, 0)
LLM_PRUNER_SKIP = skip_rule(4, 2)   # the one home of LLM-Pruner's default layer range


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
    """What a method may use: the calibration token ids, options, a seed, the model's groups and (given by the
    engine, :func:`edgeprune.engine.score`) the dense layer-wise calibration statistics."""

    model: object
    calib_ids: torch.Tensor
    seed: int = 0
    options: dict = field(default_factory=dict)
    batch_size: int = 16
    progress: bool = True
    groups: list[LayerGroups] | None = None
    stats: list | None = None           # per-layer LayerStats, filled by the engine for needs_calibration methods

    def __post_init__(self):
        if self.groups is None and self.model is not None:
            self.groups = model_groups(self.model)

    @property
    def layer_stats(self) -> list:
        if self.stats is None:
            raise EdgepruneError("internal: layer statistics were not collected for this method; score through "
                                 "edgeprune.engine.score(method, model, ctx)")
        return self.stats


@dataclass
class LayerScore:
    """One layer's scores from a per-layer scorer: ``attn`` [n_kv], ``mlp`` [n_ff], FLAP-style ``bias_means``."""

    attn: torch.Tensor
    mlp: torch.Tensor
    bias_means: dict | None = None
    info: dict = field(default_factory=dict)


class PerLayer:
    """The default per-layer scorer of a method that defines :meth:`Method.score_layer` (no extra hooks)."""

    def __init__(self, method: "Method", opts: MethodOptions):
        self.method, self.opts, self.first_info = method, opts, None

    def hooks(self, i: int, layer, lg: LayerGroups) -> list:
        return []

    def score(self, i: int, layer, lg: LayerGroups, stats):
        s = self.method.score_layer(layer, lg, stats, self.opts)
        if self.first_info is None:
            self.first_info = s.info
        return s.attn, s.mlp, s.bias_means

    def info(self) -> dict:
        return dict(self.first_info or {})


class Method:
    """An importance method. Capabilities (class attributes, read by the engine, the CLI and the planner):

    * ``Options`` — the typed options dataclass (:class:`MethodOptions`);
    * ``default_allocation`` — allocator used when none is given;
    * ``default_reconstruct`` — the repair stage the method implies when ``reconstruct`` is not given (None: its
      own surgery only; ``obs``: ``lsq``);
    * ``needs_calibration`` — whether it reads calibration statistics (:class:`~edgeprune.calibrate.LayerStats`);
    * ``needs_gradients`` — whether it runs a backward pass (scoring then runs with autograd enabled);
    * ``loss_scope`` — ``"layer"``: scores need only the layer and its calibration statistics (streamed scores
      are identical to in-memory ones); ``"model"``: scores use the model's LM loss (streamed: a block-local
      loss, see :mod:`edgeprune.stream`);
    * ``standardized`` — scores are already comparable across layers and modules (global allocation uses them
      as they are);
    * ``default_skip(n_layers)`` — the ``[first, last]`` layers kept dense unless ``--skip-first/--skip-last``.
    """

    name = "base"
    Options: type[MethodOptions] = MethodOptions
    default_allocation = "uniform"
    default_reconstruct: str | None = None
    needs_calibration = True
    needs_gradients = False
    loss_scope = "layer"
    standardized = False
    default_skip = staticmethod(NO_SKIP)

    @classmethod
    def parse_options(cls, raw: dict) -> MethodOptions:
        return cls.Options.parse(raw or {}, cls.name)

    def options(self, ctx: "Context") -> MethodOptions:
        return self.parse_options(ctx.options)

    # a method implements either score_layer (layer scope: scored inside the engine's loop) or score (model scope)
    def score_layer(self, layer, lg: LayerGroups, stats, opts: MethodOptions) -> LayerScore:
        raise NotImplementedError

    def has_layer_scorer(self) -> bool:
        return type(self).score_layer is not Method.score_layer or type(self).layer_scorer is not Method.layer_scorer

    def layer_scorer(self, ctx: "Context"):
        """An object with ``hooks(i, layer, lg)``, ``score(i, layer, lg, stats) -> (attn, mlp, bias_means)`` and
        ``info()``, used by the engine for every layer in order."""
        return PerLayer(self, self.options(ctx))

    def score(self, model, ctx: "Context") -> "Scores":
        """Model-level scores (``loss_scope = "model"``). Layer-scope methods are scored by the engine
        (:func:`edgeprune.engine.score`)."""
        raise NotImplementedError(f"{self.name} scores per layer; use edgeprune.engine.score(method, model, ctx)")




# --------------------------------------------------------------------------- helpers shared by methods
def per_kv_group(channel_scores: torch.Tensor, lg: LayerGroups, reduce: str = "sum") -> torch.Tensor:
    """Fold per-channel scores of o_proj's input ([n_q·hd]) into KV-group scores ([n_kv])."""
    x = channel_scores.reshape(lg.n_kv, lg.n_rep * lg.head_dim)
    return x.sum(1) if reduce == "sum" else x.mean(1)


def group_row_sum(w_rows: torch.Tensor, lg: LayerGroups, span: int) -> torch.Tensor:
    """Sum a per-row quantity over consecutive spans (q rows: n_rep·hd per group; k/v rows: hd per group)."""
    return w_rows.reshape(lg.n_kv, span).sum(1)
