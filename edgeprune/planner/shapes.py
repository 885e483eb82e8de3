"""Model shapes for the planner: global sizes and per-layer shapes, read from a config or a loaded model.

**Pruned shapes** (:func:`pruned_shape`) are the *config-only* prediction, used when no weights are available:
remove the fraction ``r`` of the non-embedding parameters uniformly — every layer keeps ``round(n_kv * (1-r))``
KV groups (at least 1, q heads follow ``n_rep``) and the MLP width that brings the layer's parameters closest to
``(1-r)`` of the dense layer, rounded to a multiple of ``mlp_multiple``. With weights, the planner uses the
method's own allocation instead (:mod:`edgeprune.planner.fit`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import EdgepruneError
from ..models import LayerShape, config_json


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model: global sizes and per-layer shapes."""

    hidden: int
    vocab: int
    head_dim: int
    tied: bool
    layers: tuple[LayerShape, ...]
    qkv_bias: bool = False
    mlp_bias: bool = False
    name: str = ""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_params(self, s: LayerShape) -> int:
        """q,k,v,o + gate,up,down + 2 norms (+ biases)."""
        H, hd = self.hidden, self.head_dim
        p = 2 * H * s.num_attention_heads * hd + 2 * H * s.num_key_value_heads * hd + 3 * H * s.intermediate_size
        p += 2 * H
        if self.qkv_bias:
            p += (s.num_attention_heads + 2 * s.num_key_value_heads) * hd
        if self.mlp_bias:
            p += 2 * s.intermediate_size + H
        p += H if s.o_proj_bias else 0
        p += H if s.down_proj_bias and not self.mlp_bias else 0
        return p

    @property
    def non_embedding_params(self) -> int:
        """As ``models.count_params``: everything but ``embed_tokens`` and ``lm_head`` (final norm included)."""
        return sum(self.layer_params(s) for s in self.layers) + self.hidden

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.vocab * self.hidden * (1 if self.tied else 2)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [s.to_dict() for s in self.layers]
        return d


def shape_from_config(d: dict, name: str = "") -> ModelShape:
    """A :class:`ModelShape` from a config.json dict (dense or with ``pruning.per_layer``)."""
    from ..models import restore_model_type, shapes_from_config

    d = restore_model_type(d)
    try:
        H, V = int(d["hidden_size"]), int(d["vocab_size"])
        hd = int(d.get("head_dim") or H // int(d["num_attention_heads"]))
        layers = tuple(shapes_from_config(d))
    except (KeyError, TypeError, ValueError) as e:
        raise EdgepruneError(f"config{(' of ' + name) if name else ''}: field {e} is missing or malformed; "
                             "pass a LLaMA-family config.json") from None
    name = name or str(d.get("_name_or_path") or d.get("name_or_path") or "")
    return ModelShape(H, V, hd, bool(d.get("tie_word_embeddings", False)), layers,
                      qkv_bias=d.get("model_type") == "qwen2" or bool(d.get("attention_bias", False)),
                      mlp_bias=bool(d.get("mlp_bias", False)), name=name)


def model_shape(model: Any) -> ModelShape:
    """Accepts a ModelShape, a model directory / config.json path, a config dict, a transformers config, or a
    loaded HF model (shapes read off its modules)."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, (str, Path)):
        p = Path(model)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise EdgepruneError(f"{p}: no config.json found; pass a model directory")
        d = config_json(f)
        return shape_from_config(d, name=p.name if p.is_dir() else p.parent.name)
    if isinstance(model, dict):
        return shape_from_config(model)
    if hasattr(model, "model") and hasattr(model, "config") and hasattr(model.model, "layers"):
        from ..models import head_dim, layer_shapes

        cfg = model.config
        return ModelShape(cfg.hidden_size, cfg.vocab_size, head_dim(model), bool(getattr(cfg, "tie_word_embeddings", False)),
                          tuple(layer_shapes(model)),
                          qkv_bias=model.model.layers[0].self_attn.q_proj.bias is not None,
                          mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
                          name=Path(str(getattr(model, "name_or_path", "") or "")).name)
    if hasattr(model, "to_dict"):
        return shape_from_config(model.to_dict())
    raise EdgepruneError(f"cannot read model shapes from a {type(model).__name__}; pass a model directory")


def pruned_shape(ms: ModelShape, ratio: float, mlp_multiple: int = 32) -> ModelShape:
    """Predicted shapes after removing ``ratio`` of the non-embedding parameters uniformly (see module doc)."""
    if not 0 <= ratio < 1:
        raise EdgepruneError(f"pruning ratio {ratio} out of range; use 0 <= ratio < 1")
    if ratio == 0:
        return ms
    keep = 1 - ratio
    H, hd = ms.hidden, ms.head_dim
    out = []
    for s in ms.layers:
        n_rep = s.num_attention_heads // s.num_key_value_heads if s.num_key_value_heads else 1
        nkv = max(1, round(s.num_key_value_heads * keep)) if s.num_key_value_heads else 0
        attn = replace(s, num_attention_heads=nkv * n_rep, num_key_value_heads=nkv, intermediate_size=0)
        target = keep * ms.layer_params(s)
        per_ch = ms.layer_params(replace(attn, intermediate_size=1)) - ms.layer_params(attn)
        ff = (target - ms.layer_params(attn)) / per_ch if per_ch else 0
        m = max(1, mlp_multiple)
        ff = int(min(s.intermediate_size, max(m, round(ff / m) * m)))
        if s.intermediate_size < m:
            ff = s.intermediate_size
        out.append(replace(attn, intermediate_size=ff))
    return replace(ms, layers=tuple(out))

