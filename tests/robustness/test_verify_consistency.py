"""Issue #16, "verify judges consistency": an artifact verified against a reference it was not exported from is
refused before anything is measured (exit 2, one line naming what differs: layer count, per-layer heads / KV heads /
MLP widths); a reference of the same shapes but other weights gets a parity FAIL (exit 4) with the thresholds
stated beside the numbers."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export_helpers import make_model  # noqa: E402

from robust_helpers import error_line, run_cli_subprocess  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("consistency")
    a = make_model(tmp, "a", "gqa", seed=1)[1]                   # randomly pruned, per layer
    b = make_model(tmp, "b", "gqa", seed=2)[1]                   # same family, another per-layer plan
    short = make_model(tmp, "short", "gqa", seed=1, layers=2)[1]  # fewer layers
    return {"a": a, "b": b, "short": short, "tmp": tmp}


@pytest.fixture(scope="module")
def gguf_a(models):
    pytest.importorskip("llama_cpp")
    import exporters

    art = models["tmp"] / "a.gguf"
    exporters.export(models["a"], "gguf", art, quant="f32")
    return art


def test_per_layer_shapes_differ(models, gguf_a):
    r = run_cli_subprocess("verify", gguf_a, "--reference", models["b"], "--quiet")
    line = error_line(r, 2, "was not exported from", "layer ", "--reference")
    assert "vs" in line and r.stdout == ""


def test_layer_count_differs(models, gguf_a):
    r = run_cli_subprocess("verify", gguf_a, "--reference", models["short"], "--quiet")
    error_line(r, 2, "layers 4 vs 2")


def test_onnx_shapes_differ(models, tmp_path):
    pytest.importorskip("onnxruntime")
    from exporters.consistency import check_shapes, onnx_shapes
    from edgeprune.errors import EdgepruneError
    from edgeprune.models import load

    import exporters

    exporters.export(models["short"], "onnx", tmp_path / "onnx")
    assert onnx_shapes(tmp_path / "onnx")["layers"] == 2
    with pytest.raises(EdgepruneError, match="layers 2 vs 4"):
        check_shapes(tmp_path / "onnx", load(models["a"]), models["a"])
    assert check_shapes(tmp_path / "onnx", load(models["short"]))["verdict"] == "PASS"


def test_noised_reference_fails_parity(models, gguf_a, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench_parity import noised_copy

    noisy = noised_copy(models["a"], tmp_path / "noisy", 0.05)
    r = run_cli_subprocess("verify", gguf_a, "--reference", noisy, "--ppl-chunks", "4", "--quiet", "--json",
                           tmp_path / "v.json")
    assert r.returncode == 4, r.stderr[-2000:]
    assert "parity FAIL (f32 thresholds)" in r.stderr and "Traceback" not in r.stderr
    res = json.loads((tmp_path / "v.json").read_text())
    v = res["parity_verdict"]
    assert v["verdict"] == "FAIL" and v["failed"] and v["thresholds"]["max_abs_diff"] > 0
    assert res["shapes"]["verdict"] == "PASS"
    # the exact reference passes (same function, same chunks; speed is not part of the verdict)
    from edgeprune.cli import verify_exit
    from exporters.verify import verify

    ok = verify(gguf_a, models["a"], threads=1, speed=False, ppl_chunks=4)
    assert ok["parity_verdict"]["verdict"] == "PASS" and verify_exit(ok) == 0, ok["parity_verdict"]
    shutil.rmtree(noisy)
