"""Issue #16, class 5: every option checked before work with its allowed range in the message; library exceptions
as one line (exit 2); ``--calib FILE`` without the shared folder; profile YAML limits; an optional cache."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from robust_helpers import cached_model, error_line, module_root, opt_args, server, tiny_dir
from test_bad_input import PIXEL, PRUNE, Case, run_case

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


def _popt(c, *flags, **opts):
    """``edgeprune prune`` of the tiny model with extra flags and ``--opt`` options (magnitude unless ``flags``
    name another method: argparse takes the last --method)."""
    return ["prune", c.tiny(), *PRUNE, *flags, *opt_args(opts), "--out", c.out]


SP = ("--allocation", "self-pruner")
# a typo'd key of every owner of --opt keys (method, allocators, self-pruner backend, repair, streaming), a key of an
# owner the configuration does not use, and a bad value of every owner beyond the methods (their values:
# test_bad_input); each refused before any work, one line naming the key and what is accepted
OPT_CASES = [
    C("opt-typo-method-saap", lambda c: _popt(c, "--method", "saap", metrc="WIFV"),
      ("--opt metrc=WIFV", "unknown option for --method saap", "accepted keys", "saap: grad_samples")),
    C("opt-typo-method-flap", lambda c: _popt(c, "--method", "flap", metrc="WIFV"),
      ("metrc", "did you mean metric?", "flap: metric, bias_compensation", "streaming: stream_propagate")),
    C("opt-typo-alloc-saap", lambda c: _popt(c, "--allocation", "saap", saap_beat=2),
      ("saap_beat", "--allocation saap", "did you mean saap_beta?", "the saap allocation: saap_beta, saap_lambda")),
    C("opt-typo-alloc-self-pruner", lambda c: _popt(c, *SP, populaton=4),
      ("populaton", "did you mean population?", "the self-pruner allocation: p_min")),
    C("opt-typo-self-pruner-backend", lambda c: _popt(c, *SP, mutation_sigm=0.1),
      ("mutation_sigm", "did you mean mutation_sigma?", "the self-pruner backend: backend, crossover")),
    C("opt-typo-repair", lambda c: _popt(c, "--reconstruct", "lsq", recon_dmp=0.1),
      ("recon_dmp", "--reconstruct lsq", "did you mean recon_damp?", "the repair stage: recon_target")),
    C("opt-typo-stream", lambda c: _popt(c, stream_dtyp="fp32"), ("stream_dtyp", "did you mean stream_dtype?")),
    C("opt-typo-close-to-unused-owner", lambda c: _popt(c, saap_lamda=0.2),
      ("saap_lamda", "did you mean saap_lambda?", "--allocation saap", "does not use")),
    C("opt-key-of-unused-repair", lambda c: _popt(c, recon_damp=0.1),
      ("recon_damp", "an option of --reconstruct", "does not use", "magnitude: norm")),
    C("opt-key-of-unused-allocator", lambda c: _popt(c, "--allocation", "saap", generations=3),
      ("generations", "--allocation self-pruner", "does not use")),
    C("opt-typo-before-target-mb-measurement", lambda c: ["prune", c.tiny(), "--method", "magnitude", "--target-mb",
                                                          "70", "--opt", "metrc=1", "--out", c.out], ("metrc",)),
    C("opt-alloc-saap-max-range", lambda c: _popt(c, "--allocation", "saap", saap_max=1.5),
      ("saap_max=1.5", "the saap allocation's saap_max", "in [0.0, 1.0]")),
    C("opt-alloc-saap-min-above-max", lambda c: _popt(c, "--allocation", "saap", saap_min=0.6, saap_max=0.4),
      ("saap_min=0.6", "saap_max=0.4", "saap_min <= saap_max")),
    C("opt-alloc-self-pruner-population", lambda c: _popt(c, *SP, population=0),
      ("population=0", "an integer >= 1")),
    C("opt-alloc-self-pruner-p-bounds", lambda c: _popt(c, *SP, p_min=0.9, p_max=0.2), ("p_min=0.9", "p_max=0.2")),
    C("opt-alloc-self-pruner-generations-type", lambda c: _popt(c, *SP, generations=2.5),
      ("generations=2.5", "an integer >= 0")),
    C("opt-backend-kind", lambda c: _popt(c, *SP, backend="gpt"),
      ("backend=gpt", "the self-pruner backend's backend", "one of auto, ga, llama-cpp, openai")),
    C("opt-backend-seed-uniform", lambda c: _popt(c, *SP, seed_uniform="maybe"), ("seed_uniform=maybe", "true or false")),
    C("opt-backend-temperature", lambda c: _popt(c, *SP, llm_temperature=9), ("llm_temperature=9", "in [0.0, 2.0]")),
    C("opt-repair-damp", lambda c: _popt(c, "--reconstruct", "lsq", recon_damp=-1),
      ("recon_damp=-1", "the repair stage's recon_damp", "in [0.0")),
    C("opt-repair-target", lambda c: _popt(c, "--reconstruct", "lsq", recon_target="out"),
      ("recon_target=out", "one of resid, dense, self")),
    C("opt-repair-intercept", lambda c: _popt(c, "--reconstruct", "bias", recon_intercept="perhaps"),
      ("recon_intercept=perhaps", "true or false")),
    C("opt-stream-dtype", lambda c: _popt(c, stream_dtype="int4"),
      ("stream_dtype=int4", "streaming's stream_dtype", "one of auto, fp32, bf16, fp16")),
    C("opt-method-nan", lambda c: _popt(c, "--method", "obs", obs_damp="NaN"), ("obs_damp=nan", "a number >= 0.0")),
]


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
    *OPT_CASES,
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


root = module_root("options")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_option(case, root, ref_model_dir, tmp_path):
    t = time.time()
    run_case(case, root, ref_model_dir, tmp_path)
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


# ------------------------------------------------------------------------------------------------ valid keys still run
def _prune_report(root, tmp_path, *flags, **opts) -> dict:
    """Prune the tiny model with ``flags`` and ``--opt`` options (must succeed); its prune_report.json."""
    import json

    out = tmp_path / "out"
    r = server(root).run("prune", cached_model(root, "tiny", tiny_dir), "--ratio", "0.3", "--calib-samples", "4",
                         "--calib-len", "16", "--quiet", *flags, *opt_args(opts), "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "prune_report.json").read_text())


def test_valid_keys_of_method_saap_repair_and_stream_are_used(root, tmp_path):
    rep = _prune_report(root, tmp_path, "--method", "magnitude", "--allocation", "saap", "--reconstruct", "lsq",
                        norm=1, saap_beta=0.5, saap_max=0.7, recon_damp=0.02, stream_dtype="fp32")
    saap = rep["plan"]["meta"]["saap"]
    assert saap["saap_beta"] == 0.5 and saap["bounds"] == [0.0, 0.7]          # the allocator read its options
    assert max(rep["plan"]["meta"]["layer_ratios"]) <= 0.7 + 1e-9


def test_valid_keys_of_self_pruner_and_its_backend_are_used(root, tmp_path):
    text = tmp_path / "fit.txt"
    text.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z\n" * 200)
    rep = _prune_report(root, tmp_path, "--method", "magnitude", "--allocation", "self-pruner", population=3,
                        n_crossover=1, n_mutation=1, generations=1, fitness_samples=2, fitness_len=16,
                        fitness_source=text, backend="ga", mutation_sigma=0.02, seed_uniform="false")
    sp = rep["plan"]["meta"]["self_pruner"]
    assert sp["population"] == 3 and sp["generations"] == 1 and sp["backend"] == "ga"


def test_every_owner_option_is_documented():
    """docs/methods.md lists every option of the owners beyond the methods (the methods': tests/test_methods.py)."""
    from edgeprune.allocation import ALLOCATORS, option_classes
    from edgeprune.prune import StreamOptions
    from edgeprune.repair import ReconOptions

    doc = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    owners = {c for a in ALLOCATORS for c in option_classes(a)} | {ReconOptions, StreamOptions}
    missing = [(c.OWNER, k) for c in owners for k in c.keys() if f"| {c.OWNER} |" not in doc or f"| `{k}` |" not in doc]
    assert not missing, missing
