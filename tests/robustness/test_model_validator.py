"""Issue #16, class 3: one model validator before any work. Config fields typed and range-checked (one table),
float dtypes, finite weights (streamed), tokenizer vs vocab; and ``--json`` is always strict JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robust_helpers import cached_model, edit_config, module_root
from test_bad_input import PRUNE, Case, Ctx, run_case

C = Case


def _poke(value: float):
    """Set one weight of the model to ``value`` (NaN / Inf), rewriting model.safetensors."""
    def f(d: Path):
        from safetensors.torch import load_file, save_file

        sd = load_file(str(d / "model.safetensors"))
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = value
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return f


def _int8(d: Path):
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    k = "model.layers.0.self_attn.q_proj.weight"
    sd[k] = (sd[k] * 100).to(torch.int8)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _small_vocab(ctx: Ctx) -> Path:
    """A model with a 100-token embedding carrying the reference model's 4096-token tokenizer."""
    from edgeprune import testing as T
    from edgeprune.models import TOKENIZER_FILES, save

    def build(d: Path):
        save(T.tiny_model("gqa", vocab=100), d, overwrite=True)
        for f in TOKENIZER_FILES:
            if (ctx.ref / f).is_file():
                __import__("shutil").copy(ctx.ref / f, d / f)
        return d
    return cached_model(ctx.root, "smallvocab", build)


def cfg(**kw):
    return lambda d: edit_config(d, **kw)


CASES = [
    C("head-dim-negative", lambda c: ["prune", c.model(cfg(head_dim=-16)), *PRUNE, "--out", c.out], ("'head_dim'", "-16", "restore")),
    C("head-dim-string", lambda c: ["info", c.model(cfg(head_dim="16"))], ("'head_dim'", "'16'", "positive even integer")),
    C("kv-heads-negative", lambda c: ["info", c.model(cfg(num_key_value_heads=-4))], ("'num_key_value_heads'", "-4")),
    C("kv-heads-not-divisor", lambda c: ["info", c.model(cfg(pruning=None, num_key_value_heads=3))],
      ("'num_key_value_heads'", "divisor of num_attention_heads")),
    C("rms-eps-string", lambda c: ["eval", c.model(cfg(rms_norm_eps="1e-5")), "--quiet"], ("'rms_norm_eps'", "'1e-5'", "(0, 1)")),
    C("architectures-string", lambda c: ["prune", c.model(cfg(architectures="LlamaForCausalLM")), *PRUNE, "--out", c.out],
      ("'architectures'", "a list of class names")),
    C("tie-embeddings-string", lambda c: ["info", c.model(cfg(tie_word_embeddings="no"))], ("'tie_word_embeddings'", "true or false")),
    C("rope-theta-zero", lambda c: ["export", c.model(cfg(rope_theta=0)), "--format", "onnx", "--out", c.out], ("'rope_theta'",)),
    C("hidden-act-unknown", lambda c: ["info", c.model(cfg(hidden_act="swiglu9"))], ("'hidden_act'", "swiglu9", "one of")),
    C("weights-int8", lambda c: ["prune", c.model(_int8), *PRUNE, "--out", c.out], ("q_proj", "I8", "float checkpoints")),
    C("weights-int8-info", lambda c: ["info", c.model(_int8)], ("q_proj", "int8", "float checkpoints")),
    C("weights-nan-prune", lambda c: ["prune", c.model(_poke(float("nan"))), *PRUNE, "--out", c.out],
      ("down_proj", "NaN/Inf", "re-download")),
    C("weights-nan-prune-stream", lambda c: ["prune", c.model(_poke(float("nan"))), *PRUNE, "--stream", "--out", c.out],
      ("down_proj", "NaN/Inf")),
    C("weights-inf-export", lambda c: ["export", c.model(_poke(float("inf")), base="tinyref"), "--format", "gguf",
                                       "--out", c.work / "m.gguf"], ("down_proj", "NaN/Inf")),
    C("weights-nan-eval", lambda c: ["eval", c.model(_poke(float("nan"))), "--max-chunks", "1", "--quiet",
                                     "--json", c.work / "e.json"], ("NaN/Inf",)),
    C("weights-nan-finetune", lambda c: ["finetune", c.model(_poke(float("nan"))), "--data", c.text(), "--steps", "4",
                                         "--out", c.out, "--quiet"], ("NaN/Inf",)),
    C("weights-nan-run", lambda c: ["run", c.model(_poke(float("nan"))), "--profile", "pixel-8", "--out", c.out,
                                    "--no-host-calibration"], ("NaN/Inf",)),
    C("tokenizer-larger-than-vocab", lambda c: ["eval", _small_vocab(c), "--max-chunks", "1", "--quiet"],
      ("tokenizer has 4096 tokens", "vocab_size is 100", "restore the tokenizer")),
]


root = module_root("validator")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_validator(case, root, ref_model_dir, tmp_path):
    run_case(case, root, ref_model_dir, tmp_path)


def test_every_field_in_the_table_is_checked():
    """Each FIELDS entry refuses a value of the wrong type (a string where a number or list goes, etc.)."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.modelcheck import FIELDS, check_config

    good = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 128}
    check_config(dict(good), "config.json")
    for key in FIELDS:
        for bad in ({"x": 1}, "str", -3, float("nan"), True):
            if key in ("rope_scaling", "rope_parameters", "pruning") and isinstance(bad, dict):
                continue
            if key == "model_type" and isinstance(bad, str):
                continue
            if key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache") and bad is True:
                continue
            with pytest.raises(EdgepruneError, match=f"'{key}'"):
                check_config({**good, key: bad}, "config.json")


def test_finiteness_check_streams(tmp_path):
    """The streamed check holds one tensor at a time: peak RSS grows by far less than the checkpoint's size."""
    import resource
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    sd = {f"t{i}": torch.randn(1024, 1024 * 8) for i in range(8)}   # 8 x 32 MB = 256 MB
    save_file(sd, str(tmp_path / "w.safetensors"))
    del sd
    code = ("import resource, sys, numpy, torch, safetensors; from edgeprune.modelcheck import check_files_finite; "
            "from pathlib import Path; a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "check_files_finite([Path(sys.argv[1])]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - a)")
    grew_kb = int(subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.safetensors")], capture_output=True,
                                 text=True, check=True, cwd=str(Path(__file__).resolve().parents[2])).stdout)
    assert grew_kb < 64 * 1024, f"peak RSS grew {grew_kb / 1024:.0f} MB for a 256 MB checkpoint"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_finiteness_check_finds_every_nan_and_inf(tmp_path, dtype):
    """The block check counts NaN and Inf in every float dtype, also past the first read block."""
    import torch
    from safetensors.torch import save_file

    from edgeprune.errors import EdgepruneError
    from edgeprune.modelcheck import FINITE_BLOCK, check_files_finite

    dt = getattr(torch, dtype)
    n = 3 * FINITE_BLOCK // torch.finfo(dt).bits * 8 // 2   # 1.5 blocks of elements
    t = torch.randn(n).to(dt)
    save_file({"a": torch.ones(3, dtype=dt), "w": t}, str(tmp_path / "ok.safetensors"))
    check_files_finite([tmp_path / "ok.safetensors"])
    t[[0, n // 2, n - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dt)
    save_file({"a": torch.ones(3, dtype=dt), "w": t}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EdgepruneError, match="weight w holds 3 NaN/Inf"):
        check_files_finite([tmp_path / "bad.safetensors"])


def test_json_is_strict_even_with_non_finite_numbers(tmp_path):
    """``eval --json`` (and every other JSON edgeprune writes) never contains a bare NaN/Infinity."""
    from edgeprune.cli import _write_json

    p = tmp_path / "e.json"
    _write_json(str(p), {"ppl.wikitext2": float("nan"), "x": [float("inf"), 1.5]})

    def refuse(c):
        raise ValueError(c)
    d = json.loads(p.read_text(), parse_constant=refuse)
    assert d == {"ppl.wikitext2": None, "x": [None, 1.5]}
