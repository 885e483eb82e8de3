"""What each export format computes exactly: one table, checked against a model's config before any work.

A model's *features* are read from its ``config.json`` alone (no weights): activation, RoPE type and scaling,
sliding window, biases, tied embeddings, norm. For each feature and target the table says

* ``exact``  — the target computes the same function as the PyTorch model;
* ``approx`` — the target computes another function that equals the model's only up to a context length (a
  sliding window the runtime does not apply is invisible while the context is no longer than the window). The
  user must accept it explicitly, declaring the longest context they will use (``--max-context N`` with N <= the
  window); it is then printed on stderr, recorded in the artifact's metadata and reported by ``verify``;
* ``refuse`` — the target would compute another function: the export is refused before any work (exit 2), with
  one line naming the feature and the format that computes it.

Targets (facts from llama.cpp's ``src/models/{llama,deci}.cpp`` at the version vendored by llama-cpp-python, and
from transformers 4.57's modeling code):

* ``gguf`` — llama.cpp's ``llama``/``deci`` graphs: SiLU-gated MLP only (``LLM_FFN_SILU``), RMSNorm, RoPE
  ``default``/``linear``/``llama3`` (rope_freqs), optional biases on q/k/v/o and gate/up/down, tied output via
  ``token_embd``, full causal attention (no sliding window). No YaRN attention factor as HF computes it, no
  dynamic NTK, no LongRoPE.
* ``onnx`` — the traced PyTorch graph (``torch.onnx.export``): whatever HF computes for a fixed graph, so any
  activation, yarn, sliding windows and biases. Not RoPE types whose frequencies HF recomputes from the sequence
  length at run time (``dynamic``, ``longrope``): the trace freezes them at the example length.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgeprune.errors import EdgepruneError

TARGETS = ("gguf", "onnx")
EXACT, APPROX, REFUSE = "exact", "approx", "refuse"
SILU = ("silu", "swish")
ROPE_GGUF = ("default", "linear", "llama3")
ROPE_ONNX = ("default", "linear", "llama3", "yarn")
NORM = "rmsnorm"   # LLaMA, Mistral and Qwen2 all use RMSNorm with config.rms_norm_eps


@dataclass(frozen=True)
class Feature:
    """One feature of a model, e.g. ``Feature("activation", "gelu")``."""

    name: str
    value: str


@dataclass
class Support:
    """How one target handles one feature, and the one-line reason when it is not exact."""

    feature: Feature
    target: str
    status: str
    why: str = ""


# ------------------------------------------------------------------------------------------- the table
def _activation(v: str, target: str) -> tuple[str, str]:
    if v in SILU or target == "onnx":
        return EXACT, ""
    return REFUSE, "llama.cpp's llama/deci graph always applies SiLU"


def _rope(v: str, target: str) -> tuple[str, str]:
    ok = ROPE_GGUF if target == "gguf" else ROPE_ONNX
    if v in ok:
        return EXACT, ""
    if target == "gguf":
        return REFUSE, f"the GGUF exporter writes only {', '.join(ROPE_GGUF)} RoPE"
    return REFUSE, "HF recomputes these RoPE frequencies from the sequence length at run time; a traced graph freezes them"


def _window(v: str, target: str) -> tuple[str, str]:
    if v == "none" or target == "onnx":
        return EXACT, ""
    return APPROX, "llama.cpp's llama/deci graph attends to the whole context"


# feature name -> rule(value, target) -> (status, why). Biases, tied embeddings and RMSNorm are exact everywhere.
TABLE = {
    "activation": _activation,
    "rope": _rope,
    "sliding_window": _window,
    "qkv_bias": lambda v, t: (EXACT, ""),
    "o_bias": lambda v, t: (EXACT, ""),
    "mlp_bias": lambda v, t: (EXACT, ""),
    "tied_embeddings": lambda v, t: (EXACT, ""),
    "norm": lambda v, t: (EXACT, "") if v == NORM else (REFUSE, f"only {NORM} is exported"),
}


# ------------------------------------------------------------------------------------------- reading a config
def rope_kind(cfg: dict) -> str:
    """RoPE type from ``rope_scaling`` (``rope_type`` or legacy ``type``), else ``rope_parameters``, else default."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        return "default"
    return str(rs.get("rope_type") or rs.get("type") or "default")


def sliding_window(cfg: dict) -> int | None:
    """The shortest attention window any layer applies, or None (full attention everywhere).

    Mistral: ``sliding_window`` on every layer when set. Qwen2: only with ``use_sliding_window``, on the layers
    ``layer_types`` marks ``sliding_attention`` (transformers derives them from ``max_window_layers``). A window
    at least ``max_position_embeddings`` long never masks anything and counts as none.
    """
    w = cfg.get("sliding_window")
    if not isinstance(w, int) or w <= 0:
        return None
    mt = cfg.get("model_type")
    if mt == "qwen2":
        if not cfg.get("use_sliding_window"):
            return None
        types = cfg.get("layer_types")
        if isinstance(types, list) and "sliding_attention" not in types:
            return None
        if types is None and int(cfg.get("max_window_layers", 0)) >= int(cfg.get("num_hidden_layers", 0)):
            return None
    elif mt != "mistral":
        return None
    mpe = cfg.get("max_position_embeddings")
    return None if isinstance(mpe, int) and w >= mpe else w


def features(cfg: dict) -> list[Feature]:
    """The features of a model, from its config dict (``config.json`` contents)."""
    per = (cfg.get("pruning") or {}).get("per_layer") or []
    w = sliding_window(cfg)
    qkv = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    o = bool(cfg.get("attention_bias")) or any(s.get("o_proj_bias") for s in per if isinstance(s, dict))
    mlp = bool(cfg.get("mlp_bias")) or any(s.get("down_proj_bias") for s in per if isinstance(s, dict))
    return [Feature("activation", str(cfg.get("hidden_act", "silu"))),
            Feature("rope", rope_kind(cfg)),
            Feature("sliding_window", "none" if w is None else str(w)),
            Feature("qkv_bias", str(qkv).lower()),
            Feature("o_bias", str(o).lower()),
            Feature("mlp_bias", str(mlp).lower()),
            Feature("tied_embeddings", str(bool(cfg.get("tie_word_embeddings", False))).lower()),
            Feature("norm", NORM)]


def support(cfg: dict, target: str) -> list[Support]:
    if target not in TARGETS:
        raise EdgepruneError(f"target format '{target}' unknown; use one of {', '.join(TARGETS)}")
    return [Support(f, target, *TABLE[f.name](f.value, target)) for f in features(cfg)]


# ------------------------------------------------------------------------------------------- the check
@dataclass
class Check:
    """Outcome of :func:`check` for one target: the approximations accepted (one line each) and the context
    the artifact is declared for (None: any context the model supports)."""

    target: str
    approximations: list[str] = field(default_factory=list)
    max_context: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _who_can(f: Feature, target: str) -> str:
    others = [t for t in TARGETS if t != target and TABLE[f.name](f.value, t)[0] == EXACT]
    return f"export --format {others[0]} computes it exactly" if others else "no edgeprune export format computes it"


def check(cfg: dict, target: str, max_context: int | None = None) -> Check:
    """Refuse (EdgepruneError, exit 2) a feature ``target`` cannot compute; accept an approximation only when
    ``max_context`` (the longest context the user will run) is given and within the range where it is exact."""
    out = Check(target, max_context=max_context)
    for s in support(cfg, target):
        f = s.feature
        if s.status == REFUSE:
            raise EdgepruneError(f"{f.name} '{f.value}' cannot be exported to {target} ({s.why}); {_who_can(f, target)}")
        if s.status != APPROX:
            continue
        w = int(f.value)
        if max_context is None:
            raise EdgepruneError(
                f"{f.name} {w} is not applied by {target} ({s.why}), so outputs differ past {w} tokens; "
                f"{_who_can(f, target)}, or pass --max-context N (N <= {w}) to accept {target} for contexts up to N")
        if max_context > w:
            raise EdgepruneError(f"--max-context {max_context} exceeds {f.name} {w}: {target} would differ from the "
                                 f"model past {w} tokens; pass --max-context {w} or less, or {_who_can(f, target)}")
        out.approximations.append(f"{f.name} {w} not applied ({s.why}); exact only for contexts up to {w} tokens, "
                                  f"accepted for contexts up to {max_context} (--max-context)")
    return out


def check_dir(model_dir, target: str, max_context: int | None = None) -> Check:
    """:func:`check` on a model directory's ``config.json`` (read without loading weights)."""
    from pathlib import Path

    from edgeprune.models import read_config

    return check(read_config(Path(model_dir)), target, max_context)


def summary(cfg: dict) -> dict:
    """For ``info``: each feature's value and, per target, exact / approx / refuse (with the reason)."""
    rows = []
    sup = {t: support(cfg, t) for t in TARGETS}
    for i, f in enumerate(features(cfg)):
        rows.append({"feature": f.name, "value": f.value,
                     **{t: sup[t][i].status + (f" ({sup[t][i].why})" if sup[t][i].why else "") for t in TARGETS}})
    return {"features": rows, "exportable": {t: all(s.status != REFUSE for s in sup[t]) for t in TARGETS}}
