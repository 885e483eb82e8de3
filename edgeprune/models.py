"""Load, validate, reshape and save LLaMA-family models with per-layer shapes.

One representation serves dense and pruned models: the stock Hugging Face class (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``) whose decoder layers hold ``nn.Linear`` modules of per-layer sizes.
The pruned-model format is a normal HF directory: ``model.safetensors``, tokenizer files, and ``config.json``
with a ``pruning`` block::

    "pruning": {"per_layer": [{"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 512,
                               "o_proj_bias": false, "down_proj_bias": false}, ...],
                "provenance": {...}}

The global ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the largest layer's
values unless every layer is the same, in which case they hold the pruned values. ``head_dim`` is always written
explicitly.

Plain ``transformers``: a directory loads with ``AutoModelForCausalLM.from_pretrained`` only when the stock class
computes exactly the pruned function, i.e. every layer has the same shape and no layer carries a bias the
architecture does not declare (FLAP's bias compensation adds o_proj/down_proj biases, which stock Llama/Mistral/Qwen2
would silently drop). Otherwise ``model_type`` is replaced by :data:`PLAIN_REFUSAL` (the real one is kept in
``pruning.model_type``), so plain transformers refuses the folder with an error naming ``edgeprune.load`` instead of
loading another function; :func:`read_config` restores the real type for every edgeprune reader.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import EdgepruneError
from .modelcheck import (check_config, check_files_finite, check_finite, check_header_dtypes, check_vocab,
                         read_safetensors_header)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
PLAIN_REFUSAL = "per-layer-pruned (plain transformers cannot load this exactly: use edgeprune.load(dir))"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer. Heads are whole: ``num_attention_heads = num_key_value_heads * n_rep``."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- inspection
def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def head_dim(model) -> int:
    return decoder_layers(model)[0].self_attn.head_dim


def layer_shapes(model) -> list[LayerShape]:
    """Per-layer shapes read off the modules themselves (not the config)."""
    hd = head_dim(model)
    out = []
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        out.append(LayerShape(
            num_attention_heads=a.q_proj.out_features // hd,
            num_key_value_heads=a.k_proj.out_features // hd,
            intermediate_size=m.gate_proj.out_features,
            o_proj_bias=a.o_proj.bias is not None and not _config_bias(model.config, "o"),
            down_proj_bias=m.down_proj.bias is not None and not bool(getattr(model.config, "mlp_bias", False)),
        ))
    return out


def _config_bias(config, which: str) -> bool:
    """Whether the architecture itself gives this projection a bias (independent of pruning)."""
    if which == "o":
        return bool(getattr(config, "attention_bias", False))
    if which == "qkv":
        return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    raise ValueError(which)


def is_uniform(shapes: list[LayerShape]) -> bool:
    return len(set(shapes)) == 1


def count_params(model) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; non-embedding excludes ``embed_tokens`` and ``lm_head``
    (a tied head is counted once, in total)."""
    seen, total, emb = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "embed_tokens" in name or name.startswith("lm_head"):
            emb += p.numel()
    return total, total - emb


# ----------------------------------------------------------------------------------------------- reshaping
def _linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def resize_to_shapes(model, shapes: list[LayerShape]) -> None:
    """Replace every layer's projections by (uninitialised) Linear modules of the given per-layer shapes."""
    cfg = model.config
    H, hd = cfg.hidden_size, head_dim(model)
    qkv_bias, o_bias, mlp_bias = _config_bias(cfg, "qkv"), _config_bias(cfg, "o"), bool(getattr(cfg, "mlp_bias", False))
    layers = decoder_layers(model)
    if len(shapes) != len(layers):
        raise EdgepruneError(f"config lists {len(shapes)} per-layer shapes but the model has {len(layers)} layers; "
                             "the config.json 'pruning.per_layer' list is inconsistent")
    for layer, s in zip(layers, shapes):
        a, m = layer.self_attn, layer.mlp
        if s.num_key_value_heads and s.num_attention_heads % s.num_key_value_heads:
            raise EdgepruneError(f"config.json 'pruning.per_layer': a layer has {s.num_attention_heads} q heads, not a "
                                 f"multiple of its {s.num_key_value_heads} KV heads; re-export the pruned model")
        nq, nkv, ff = s.num_attention_heads, s.num_key_value_heads, s.intermediate_size
        a.q_proj = _linear(H, nq * hd, qkv_bias, a.q_proj)
        a.k_proj = _linear(H, nkv * hd, qkv_bias, a.k_proj)
        a.v_proj = _linear(H, nkv * hd, qkv_bias, a.v_proj)
        a.o_proj = _linear(nq * hd, H, o_bias or s.o_proj_bias, a.o_proj)
        a.num_key_value_groups = nq // nkv if nkv else 1
        if hasattr(a, "num_heads"):
            a.num_heads = nq
        if hasattr(a, "num_key_value_heads"):
            a.num_key_value_heads = nkv
        m.gate_proj = _linear(H, ff, mlp_bias, m.gate_proj)
        m.up_proj = _linear(H, ff, mlp_bias, m.up_proj)
        m.down_proj = _linear(ff, H, mlp_bias or s.down_proj_bias, m.down_proj)
        m.intermediate_size = ff


# ----------------------------------------------------------------------------------------------- loading
def config_json(f: Path):
    """The parsed contents of a ``config.json`` (one line naming the file when it is not valid JSON)."""
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepruneError(f"{f} is not valid JSON ({e}); restore the model's config.json") from None


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EdgepruneError(f"{path} has no config.json; pass a Hugging Face model directory")
    d = config_json(cfg_file)
    if not isinstance(d, dict):
        raise EdgepruneError(f"{cfg_file} is not a JSON object; restore the model's config.json")
    d = restore_model_type(d)
    check_config(d, cfg_file, keys=("architectures",))
    arch = (d.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise EdgepruneError(
            f"{path}: architecture {arch or d.get('model_type') or 'unknown'!s} is not supported; "
            f"edgeprune handles {', '.join(SUPPORTED)}")
    return check_config(d, cfg_file)


def restore_model_type(d: dict) -> dict:
    """The config dict with its real ``model_type`` (undoing the :data:`PLAIN_REFUSAL` marker)."""
    if d.get("model_type") == PLAIN_REFUSAL:
        d = {**d, "model_type": (d.get("pruning") or {}).get("model_type")}
    return d


def plain_loadable(shapes: list[LayerShape]) -> bool:
    """Whether stock ``from_pretrained`` rebuilds exactly this model: one shape for every layer and no bias beyond
    the ones the architecture's config declares (those are not flagged in :class:`LayerShape`)."""
    return is_uniform(shapes) and not any(s.o_proj_bias or s.down_proj_bias for s in shapes)


def resolve_dir(model: str | Path) -> Path:
    p = Path(model)
    if p.exists():
        if not p.is_dir():
            raise EdgepruneError(f"{p} is a file, not a model directory; pass the folder holding config.json")
        return p
    if "/" in str(model) and not str(model).startswith((".", "/")) and str(model).count("/") == 1:
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # offline, unknown id
            raise EdgepruneError(f"model {model} is not a local directory and could not be fetched from the hub "
                                 f"({type(e).__name__}); pass a local model directory") from None
    raise EdgepruneError(f"model path {model} does not exist; pass a local Hugging Face model directory")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError):
            raise EdgepruneError(f"{index} is corrupt; restore the model's safetensors index") from None
    sd: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            if not f.is_file():
                raise EdgepruneError(f"{f} is listed in the index but missing; re-download the model")
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise EdgepruneError(f"{f} is unreadable or truncated ({str(e).splitlines()[0][:120]}); "
                                     "re-download or re-export the weights") from None
        return sd
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        for f in bins:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise EdgepruneError(f"{f} cannot be loaded safely ({type(e).__name__}); convert it to safetensors") from None
        return sd
    raise EdgepruneError(f"{path} has no model weights (*.safetensors or pytorch_model.bin); copy the weight files "
                         "into the folder or re-download the model")


def shapes_from_config(d: dict) -> list[LayerShape]:
    per = (d.get("pruning") or {}).get("per_layer")
    L = d["num_hidden_layers"]
    if per is None:
        nkv = d.get("num_key_value_heads") or d["num_attention_heads"]
        return [LayerShape(d["num_attention_heads"], nkv, d["intermediate_size"])] * L
    try:
        return [LayerShape(**s) for s in per]
    except TypeError as e:
        raise EdgepruneError(f"config.json 'pruning.per_layer' is malformed ({e}); re-export the pruned model") from None


def load(model: str | Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False):
    """Load a dense or pruned model directory into the stock HF class with per-layer shapes.

    Raises :class:`EdgepruneError` with a one-line reason for anything that is not a readable
    LLaMA/Mistral/Qwen2 checkpoint. ``trust_remote_code`` is accepted for API symmetry but never needed:
    only the three built-in architectures are loaded, so no code from the checkpoint ever runs.
    """
    path = resolve_dir(model)
    d = read_config(path)
    sd = _load_state_dict(path)
    for k, t in sd.items():
        if not t.is_floating_point() or t.dtype == torch.float64:
            raise EdgepruneError(f"{path}: weight {k} has dtype {str(t.dtype).replace('torch.', '')}; edgeprune reads "
                                 "float checkpoints (float32, float16, bfloat16): pass the original (not quantized) "
                                 "weights")
        check_finite(k, t, path)
    m, config = meta_model(d)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in sd:
        raise EdgepruneError(f"{path}: config says untied embeddings (tie_word_embeddings=false) but the weights have "
                             "no lm_head.weight; fix tie_word_embeddings in config.json")
    expected = m.state_dict()
    for k, t in sd.items():
        if k in expected and tuple(expected[k].shape) != tuple(t.shape):
            raise EdgepruneError(f"{path}: weight {k} has shape {tuple(t.shape)} but config.json implies "
                                 f"{tuple(expected[k].shape)}; restore the config.json that came with these weights")
    if tied and "lm_head.weight" in sd:
        sd = dict(sd)
        if not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
            raise EdgepruneError(f"{path}: config says tied embeddings but lm_head.weight differs from embed_tokens; "
                                 "set tie_word_embeddings=false in config.json")
        sd.pop("lm_head.weight")
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    if tied:
        m.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise EdgepruneError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); the checkpoint is incomplete or from another architecture: "
                             "re-download it")
    rebuild_buffers(m, config)
    if dtype is not None:
        m = m.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
    m.eval()
    m.config.use_cache = True
    m.name_or_path = str(path)
    return m


def meta_model(d: dict):
    """The stock HF class for a validated config dict, on the meta device, resized to its per-layer shapes."""
    import transformers

    shapes = shapes_from_config(d)
    arch = d["architectures"][0]
    try:
        config = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k not in ("pruning", "architectures")})
    except (ValueError, TypeError, KeyError) as e:
        raise EdgepruneError(f"config.json cannot be read as a {arch} config ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:150] if str(e) else ''}); restore the model's config.json") from None
    config.architectures = [arch]
    if getattr(config, "head_dim", None) is None:
        config.head_dim = d["hidden_size"] // d["num_attention_heads"]
    with torch.device("meta"):
        m = getattr(transformers, arch)(config)
    resize_to_shapes(m, shapes)
    return m, config


def _safetensors_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking the file holds all the bytes the header promises."""
    start, hdr = read_safetensors_header(f)
    size, n = f.stat().st_size, start - 8
    check_header_dtypes(f, hdr)
    try:
        tensors = {k: v for k, v in hdr.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: tuple(int(x) for x in v["shape"]) for k, v in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise EdgepruneError(f"{f} has a corrupt safetensors header; re-download or re-export the weights") from None
    if 8 + n + end > size:
        raise EdgepruneError(f"{f} is truncated ({size:,} bytes, its header needs {8 + n + end:,}); re-download or "
                             "re-export the weights")
    return shapes


def check_model_dir(model: str | Path) -> Path:
    """Validation of a model directory before any work: config (:mod:`.modelcheck` table), tokenizer files,
    safetensors headers (complete files, float dtypes, shapes matching the config), and every weight finite
    (read in blocks, never memory-mapped; once per folder state per process). Raises :class:`EdgepruneError`."""
    path = resolve_dir(model)
    d = read_config(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EdgepruneError(f"{path} has no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files "
                             "from the source model")
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise EdgepruneError(f"{index} is corrupt; restore the model's safetensors index") from None
    if not files:
        if sorted(path.glob("pytorch_model*.bin")):
            return path   # checked when loaded (weights_only=True)
        raise EdgepruneError(f"{path} has no model weights (*.safetensors or pytorch_model.bin); copy the weight files "
                         "into the folder or re-download the model")
    got: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise EdgepruneError(f"{f} is listed in the index but missing; re-download the model")
        got.update(_safetensors_shapes(f))
    m, _ = meta_model(d)
    for k, t in m.state_dict().items():
        if k in got and tuple(t.shape) != got[k]:
            raise EdgepruneError(f"{path}: weight {k} has shape {got[k]} but config.json implies {tuple(t.shape)}; "
                                 "restore the config.json that came with these weights")
    key = (str(path.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _CHECKED:   # streamed, one tensor at a time: never a second copy of the model in memory
        check_files_finite(files)
        _CHECKED.add(key)
    return path


_CHECKED: set = set()   # model folders (path + file sizes/mtimes) whose weights were found finite in this process


def rebuild_buffers(model, config) -> None:
    """Non-persistent buffers (RoPE ``inv_freq``) were created on the meta device; rebuild them on the CPU."""
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=config)
    for name, b in model.named_buffers():
        if b.is_meta:
            raise EdgepruneError(f"internal: buffer {name} was not initialised")


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    path = resolve_dir(model)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EdgepruneError(f"{path} has no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files "
                             "from the source model")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise EdgepruneError(f"{path}: tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:100]}); restore the "
                             "tokenizer files from the source model") from None
    if (path / "config.json").is_file():
        check_vocab(tok, read_config(path)["vocab_size"], path)
    return tok


# ----------------------------------------------------------------------------------------------- saving
def pruned_config(model, provenance: dict | None = None, refuse_plain: bool = True) -> dict:
    """config.json contents for a (possibly) per-layer pruned model. With ``refuse_plain`` (model folders), a model
    stock transformers cannot rebuild exactly gets the :data:`PLAIN_REFUSAL` model_type (see the module doc)."""
    d = restore_model_type(model.config.to_dict())
    shapes = layer_shapes(model)
    d["head_dim"] = head_dim(model)
    d["num_hidden_layers"] = len(shapes)
    d.pop("pruning", None)
    biased = any(s.o_proj_bias or s.down_proj_bias for s in shapes)
    if is_uniform(shapes) and not biased:
        s = shapes[0]
        d["num_attention_heads"], d["num_key_value_heads"], d["intermediate_size"] = (
            s.num_attention_heads, s.num_key_value_heads, s.intermediate_size)
    else:
        d["num_attention_heads"] = max(s.num_attention_heads for s in shapes) or d["num_attention_heads"]
        d["num_key_value_heads"] = max(s.num_key_value_heads for s in shapes) or d["num_key_value_heads"]
        d["intermediate_size"] = max(s.intermediate_size for s in shapes) or d["intermediate_size"]
    d["pruning"] = {"per_layer": [s.to_dict() for s in shapes], "provenance": provenance or {}}
    if refuse_plain and not plain_loadable(shapes):
        d["pruning"]["model_type"], d["model_type"] = d["model_type"], PLAIN_REFUSAL
    d["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    d.pop("dtype", None)
    return d


def save(model, out: str | Path, tokenizer_src: str | Path | None = None, provenance: dict | None = None,
         overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model in the pruned-model format, atomically (temp sibling, then rename)."""
    from safetensors.torch import save_file

    from .paths import atomic_dir

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sd = {}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        for k, v in model.state_dict().items():
            if tied and k == "lm_head.weight":
                continue
            sd[k] = v.detach().contiguous().cpu()
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(pruned_config(model, provenance), indent=2, sort_keys=True) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer(tokenizer_src, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    src = Path(src)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)


def file_digest(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (used to prove inputs are never modified)."""
    path = Path(path)
    return {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
