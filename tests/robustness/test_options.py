"""Issue #16, class 5: every option checked before work with its allowed range in the message; library exceptions
as one line (exit 2); ``--calib FILE`` without the shared folder; profile YAML limits; an optional cache."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from robust_helpers import cached_model, error_line, server, tiny_dir
from test_bad_input import PIXEL, PRUNE, Case, Ctx, check_case

C = Case
BIG = str(2 ** 70)


def _bad_ckpt(c: Ctx):
    import torch

    (c.work / "out.ckpt").mkdir()
    torch.save({"step": 3}, c.work / "out.ckpt" / "state.pt")


def _laughs() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join(f"*{prev}" for _ in range(9)) + "]")
    return "\n".join(lines) + "\nname: laughs\n"


def _run(c, *extra):
    return ["run", c.tiny(), "--profile", "pixel-8", "--out", c.out, "--no-host-calibration", *extra]


CASES = [
    C("prune-seed-beyond-64-bits", lambda c: ["prune", c.tiny(), *PRUNE, "--seed", BIG, "--out", c.out], ("--seed " + BIG, "0 to 4294967295")),
    C("prune-skip-first-100", lambda c: ["prune", c.tiny(), *PRUNE, "--skip-first", "100", "--out", c.out],
      ("--skip-first 100", "4-layer model", "use 0 to 3")),
    C("prune-skip-first-negative", lambda c: ["prune", c.tiny(), *PRUNE, "--skip-first", "-3", "--out", c.out], ("--skip-first -3", "use 0 to 3")),
    C("prune-skip-all-layers", lambda c: ["prune", c.tiny(), *PRUNE, "--skip-first", "2", "--skip-last", "2", "--out", c.out],
      ("leave no layer", "<= 3")),
    C("prune-min-kv-above-heads", lambda c: ["prune", c.tiny(), *PRUNE, "--min-kv", "5", "--out", c.out], ("--min-kv 5", "use 0 to 2")),
    C("prune-calib-len-above-context", lambda c: ["prune", c.tiny(), *PRUNE, "--calib-len", "999999", "--out", c.out],
      ("--calib-len 999999", "8 to 256", "max_position_embeddings")),
    C("prune-calib-samples-unbounded", lambda c: ["prune", c.tiny(), *PRUNE, "--calib-samples", "100000000", "--out", c.out],
      ("--calib-samples 100000000", "1 to 65,536")),
    C("prune-calib-dev-zero", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", "/dev/zero", "--out", c.out],
      ("/dev/zero", "not a regular file")),
    C("eval-seq-len-above-context", lambda c: ["eval", c.tiny(), "--seq-len", "999999", "--quiet"], ("--seq-len 999999", "2 to 256")),
    C("finetune-lr-inf", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--lr", "inf", "--out", c.out],
      ("--lr inf", "finite")),
    C("finetune-lr-nan", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--lr", "nan", "--out", c.out], ("--lr nan",)),
    C("finetune-steps-below-groups", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "2", "--out", c.out],
      ("--steps 2", "--groups 4", "--steps >= 4")),
    C("finetune-seed-huge", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--seed", BIG, "--out", c.out],
      ("--seed", "4294967295")),
    C("finetune-threads-zero", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--threads", "0",
                                          "--out", c.out], ("--threads 0", "1 to 1024")),
    C("finetune-seq-len-above-context", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--seq-len",
                                                   "4096", "--out", c.out], ("--seq-len 4096", "8 to 256")),
    C("finetune-checkpoint-wrong-structure", lambda c: (_bad_ckpt(c), ["finetune", c.tiny(), "--data", c.text(), "--steps",
                                                                       "4", "--resume", "--out", c.out])[-1],
      ("state.pt", "not an edgeprune fine-tuning checkpoint", "run without --resume")),
    C("run-method-unknown-before-stages", lambda c: _run(c, "--method", "sparsegpt"), ("sparsegpt",)),
    C("run-seed-negative", lambda c: _run(c, "--seed", "-1"), ("--seed -1", "0 to")),
    C("run-threads-zero", lambda c: _run(c, "--threads", "0"), ("--threads 0", "1 to 1024")),
    C("run-calib-samples-huge", lambda c: _run(c, "--calib-samples", "100000000"), ("--calib-samples", "65,536")),
    # profiles
    C("profile-billion-laughs", lambda c: ["plan", c.tiny(), "--profile", c.profile(_laughs())], ("p.yaml", "expands to more than")),
    C("profile-duplicate-key", lambda c: ["plan", c.tiny(), "--profile", c.profile(PIXEL + "\nname: other\n")],
      ("p.yaml", "duplicate key 'name'", "remove the duplicate")),
    C("profile-not-utf8", lambda c: ["plan", c.tiny(), "--profile", c.profile(PIXEL.encode() + b"\n# caf\xe9\n")],
      ("p.yaml", "not UTF-8")),
    C("profile-400-digit-number", lambda c: ["plan", c.tiny(), "--profile", c.profile(
        PIXEL.replace("max_memory_mb: 2048", "max_memory_mb: " + "9" * 400))], ("budgets.max_memory_mb", "400-digit")),
    C("profile-underflowing-bandwidth", lambda c: ["plan", c.tiny(), "--profile", c.profile(
        _set_value(PIXEL, "peak_bandwidth_gbps", "1.0e-300"))], ("peak_bandwidth_gbps", "below 1e-06")),
    C("profile-huge-file", lambda c: ["plan", c.tiny(), "--profile", c.profile(PIXEL + "#" * (2 << 20))], ("too large for a profile",)),
]


def _set_value(text: str, fld: str, v: str) -> str:
    import re

    return re.sub(rf"({fld}:\s*{{\s*value:\s*)[^,}}]+", rf"\g<1>{v}", text)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("options")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_option(case, root, ref_model_dir, tmp_path):
    srv = server(root)
    ctx = Ctx(tmp_path / "w", root, ref_model_dir)
    t = time.time()
    check_case(case, ctx, lambda argv, **kw: srv.run(*argv, **kw))
    assert time.time() - t < 60, "refused, but only after minutes"


def test_underflow_case_really_sets_the_figure():
    assert "1.0e-300" in _set_value(PIXEL, "peak_bandwidth_gbps", "1.0e-300")


def test_calib_file_needs_no_shared_folder(root, tmp_path):
    tiny = cached_model(root, "tiny", tiny_dir)
    text = tmp_path / "c.txt"
    text.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z\n" * 400)
    r = server(root).run("prune", tiny, *PRUNE, "--calib", text, "--out", tmp_path / "out",
                         env={"EDGEPRUNE_SHARED": str(tmp_path / "nowhere"), "EDGEPRUNE_DATA": None})
    assert r.returncode == 0, r.stderr[-2000:]


def test_unwritable_home_cache_is_optional(root, tmp_path):
    r = server(root).run("profiles", env={"EDGEPRUNE_CACHE": None, "HOME": "/etc/hostname"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pixel-8" in r.stdout
    notes = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(notes) == 1 and "EDGEPRUNE_CACHE" in notes[0], r.stderr


def test_truncated_onnx_is_one_line(root, tmp_path):
    pytest.importorskip("onnxruntime")
    srv = server(root)
    tiny = cached_model(root, "tiny", tiny_dir)
    out = tmp_path / "onnx"
    assert srv.run("export", tiny, "--format", "onnx", "--out", out).returncode == 0
    data = (out / "model.onnx").read_bytes()
    (out / "model.onnx").write_bytes(data[: len(data) // 3])
    r = srv.run("verify", out, "--reference", tiny, "--ppl-chunks", "1")
    error_line(r, 2, "ONNX", "re-export")
