"""Runtime shape constraints (issue #15 item 3): ``uniform_kv`` / ``uniform_shapes`` honoured by every allocator,
carried by profiles, and an ``edgeprune run`` on an onnxruntime-genai profile ships a folder that
``onnxruntime_genai.Model(folder)`` loads on its own."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from edgeprune.errors import EdgepruneError
from edgeprune.models import layer_shapes, load_tokenizer
from edgeprune.prune import PruneConfig, prune_model
from edgeprune.testing import tiny_model


@pytest.mark.parametrize("allocation", ["uniform", "global", "saap"])
def test_allocators_honour_uniform_kv_and_uniform_shapes(allocation, ref_model_dir, one_thread):
    tok = load_tokenizer(ref_model_dir)
    got = {}
    for flags in ({}, {"uniform_kv": True}, {"uniform_shapes": True}):
        m = tiny_model("gqa", vocab=4096, hidden=128, heads=8, ffn=256, layers=6, seed=4)
        cfg = PruneConfig("flap", 0.35, allocation=allocation, calib_samples=4, calib_len=32, **flags)
        _, _, info = prune_model(m, tok, cfg, progress=False)
        shapes = layer_shapes(m)
        got[tuple(flags)] = shapes
        if flags:
            assert len({s.num_key_value_heads for s in shapes}) == 1
            from edgeprune.models import count_params

            removed = 1 - count_params(m)[1] / count_params(tiny_model("gqa", vocab=4096, hidden=128, heads=8,
                                                                            ffn=256, layers=6))[1]
            assert abs(removed - 0.35) < 0.05, removed          # the projection keeps the allocator's ratio
    assert len({(s.num_attention_heads, s.intermediate_size) for s in got[("uniform_shapes",)]}) == 1
    if allocation != "uniform":   # the unconstrained allocators really are per-layer here
        assert len({s.num_key_value_heads for s in got[()]}) > 1 or len({s.intermediate_size for s in got[()]}) > 1


def _profile(tmp_path, runtime: str, extra: str = "", memory_mb: float = 2048) -> str:
    p = tmp_path / f"{runtime}.yaml"
    p.write_text(f"""name: test-{runtime}
class: phone
runtime: {runtime}
{extra}
allowed_quants: [fp32]
context_length: 256
device:
  ram_gb: {{value: 8, source: "estimated: test"}}
  usable_memory_mb: {{value: 3000, source: "estimated: test"}}
  peak_bandwidth_gbps: {{value: 50, source: "estimated: test"}}
  effective_bandwidth_factor: {{value: 0.5, source: "estimated: test"}}
  cores: {{value: 8, source: "estimated: test"}}
  threads: {{value: 2, source: "estimated: test"}}
  compute_gflops: {{value: 100, source: "estimated: test"}}
  runtime_overhead_mb: {{value: 10, source: "estimated: test"}}
  per_token_overhead_ms: {{value: 1, source: "estimated: test"}}
  per_layer_overhead_ms: {{value: 0.1, source: "estimated: test"}}
budgets:
  max_memory_mb: {memory_mb}
  max_decode_ms_per_token: 1000
""")
    return str(p)


def test_profiles_say_what_their_runtime_needs(tmp_path):
    from device_profiles import load_profile

    p = load_profile(_profile(tmp_path, "onnxruntime-genai", "uniform_kv: true"))
    assert (p.runtime, p.app_runtime, p.onnx_target, p.uniform_kv) == ("onnxruntime", "onnxruntime-genai", "genai", True)
    with pytest.raises(EdgepruneError, match="uniform_kv: true"):
        load_profile(_profile(tmp_path, "optimum"))
    with pytest.raises(EdgepruneError, match="true or false"):
        load_profile(_profile(tmp_path, "onnxruntime-genai", "uniform_kv: sometimes"))
    shipped = load_profile("galaxy-s24-onnx")
    assert shipped.device_class == "phone" and shipped.onnx_target == "genai"


def test_run_on_genai_profile_ships_a_genai_folder(tmp_path, ref_model_dir):
    """A budget (13.4 MB; the dense model is predicted at 13.75 MB) that forces pruning: the run prunes with the
    profile's uniform_kv and ships an ONNX folder that onnxruntime_genai.Model loads on its own."""
    og = pytest.importorskip("onnxruntime_genai")
    import shutil

    from edgeprune.models import TOKENIZER_FILES, save

    model = tmp_path / "m"
    save(tiny_model("gqa", vocab=4096, hidden=64, heads=4, ffn=256, layers=4), model)
    for f in TOKENIZER_FILES:
        if (ref_model_dir / f).is_file():
            shutil.copy(ref_model_dir / f, model / f)
    out = tmp_path / "run"
    prof = _profile(tmp_path, "onnxruntime-genai", "uniform_kv: true", memory_mb=13.4)
    r = run_cli("run", model, "--profile", prof, "--out", out, "--no-host-calibration", "--ppl-chunks", "2",
                "--calib-samples", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    per_layer = json.loads((out / "pruned" / "config.json").read_text())["pruning"]["per_layer"]
    assert len({s["num_key_value_heads"] for s in per_layer}) == 1 and per_layer[0]["intermediate_size"] < 256
    folders = [p for p in out.iterdir() if p.is_dir() and (p / "genai_config.json").is_file()]
    assert len(folders) == 1, sorted(p.name for p in out.iterdir())
    m = og.Model(str(folders[0]))                     # the folder alone: config, graph, tokenizer
    tok = og.Tokenizer(m)
    params = og.GeneratorParams(m)
    ids = tok.encode("Once upon a time")
    params.set_search_options(max_length=len(ids) + 8, min_length=len(ids) + 8, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == len(ids) + 8
    assert json.loads((folders[0] / "genai_config.json").read_text())["search"]["do_sample"] is False
