"""Issue #16, class 2: ``run`` state carries a fingerprint of model, profile, options and code per stage; a change
re-does the affected stages and removes their earlier results, never mixing an old artifact with a new budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robust_helpers import cached_model, error_line, server, tiny_with_ref_tokenizer


def _cfg(tmp_path, **kw):
    from edgeprune.pipeline import RunConfig

    return RunConfig(model=str(tmp_path / "m"), profile="pixel-8", out=str(tmp_path / "run"), **kw)


def _fps(cfg, src, profile_name="pixel-8"):
    from device_profiles import load_profile
    from edgeprune.runstate import stage_fingerprints

    return stage_fingerprints(cfg, src, load_profile(profile_name), "gguf")


@pytest.fixture
def model(tmp_path):
    from edgeprune import testing as T

    return T.save_tiny(T.tiny_model("gqa"), tmp_path / "m")


def test_fingerprints_follow_what_each_stage_depends_on(tmp_path, model):
    base, _ = _fps(_cfg(tmp_path), model)
    other_profile, _ = _fps(_cfg(tmp_path), model, "galaxy-s24")
    other_method, _ = _fps(_cfg(tmp_path, method="wanda-sp"), model)
    other_chunks, _ = _fps(_cfg(tmp_path, ppl_chunks=7), model)
    assert all(base[s] != other_profile[s] for s in base)                      # the profile: everything
    # the plan scores the model with the method (issue #14: candidates from its real allocation)
    assert [s for s in base if base[s] != other_method[s]] == ["plan", "prune", "finetune", "export", "verify", "report"]
    assert [s for s in base if base[s] != other_chunks[s]] == ["verify", "report"]
    (model / "config.json").write_text((model / "config.json").read_text() + " ")  # the model edited in place
    assert _fps(_cfg(tmp_path), model)[0]["calibrate"] != base["calibrate"]


def test_changed_inputs_drop_later_stages_and_their_outputs(tmp_path, model):
    from edgeprune.runstate import RunState

    out = tmp_path / "run"
    out.mkdir()
    fps, facts = _fps(_cfg(tmp_path), model)
    st = RunState(out, fps, facts, log=lambda m: None)
    for stage, info in (("calibrate", {}), ("plan", {"quant": "q8_0"}), ("prune", {"dir": "pruned"}),
                        ("export", {"artifact": "model-q8_0.gguf"}), ("verify", {})):
        st.mark(stage, info)
    for d in ("pruned",):
        (out / d).mkdir()
    for f in ("plan.json", "model-q8_0.gguf", "verify.json", "measured_speed.json", "keep.txt"):
        (out / f).write_text("x")
    said = []
    fps2, facts2 = _fps(_cfg(tmp_path, method="wanda-sp"), model)
    st2 = RunState(out, fps2, facts2, log=said.append)
    assert set(st2.d["stages"]) == {"calibrate"}
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "state.json"]
    assert len(said) == 1 and "changed: method" in said[0] and "re-doing plan" in said[0]
    # state written by an older edgeprune (no fingerprints) is not trusted either
    (out / "state.json").write_text(json.dumps({"stages": {"calibrate": {}, "plan": {"quant": "f16"}}}))
    assert RunState(out, fps2, facts2, log=said.append).d["stages"] == {}


def test_truncated_state_json_is_one_line(root, tmp_path):
    srv = server(root)
    m = cached_model(root, "tinyref", lambda d: tiny_with_ref_tokenizer(d, Path(__import__("edgeprune.paths", fromlist=["x"]).reference_model_dir())))
    out = tmp_path / "run"
    out.mkdir()
    (out / ".edgeprune-output").write_text("x")
    (out / "state.json").write_text('{"stages": {"calibrate": {"fin')
    r = srv.run("run", m, "--profile", "pixel-8", "--out", out, "--no-host-calibration")
    error_line(r, 2, "state.json", "corrupt", "delete it")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fp")


def test_run_with_another_profile_redoes_everything(root, ref_model_dir, tmp_path):
    """The issue's reproduction: the same --out with a different profile must not judge the old artifact."""
    pytest.importorskip("llama_cpp")
    srv = server(root)
    m = cached_model(root, "tinyref", lambda d: tiny_with_ref_tokenizer(d, ref_model_dir))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")   # a folder of the user's: needs --overwrite, and keeps their file
    args = ["--out", out, "--no-host-calibration", "--ppl-chunks", "2", "--calib-samples", "4"]
    error_line(srv.run("run", m, "--profile", "pixel-8", *args), 2, "not written by edgeprune", "--overwrite")
    r = srv.run("run", m, "--profile", "pixel-8", *args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    r = srv.run("run", m, "--profile", "galaxy-s24", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "was run with other inputs" in r.stdout and "profile" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert "galaxy-s24" in json.dumps(rep) and "pixel-8" not in json.dumps(rep)
    st = json.loads((out / "state.json").read_text())
    assert st["inputs"]["calibrate"]["profile"]["name"] == "galaxy-s24"
    assert (out / "keep.txt").read_text() == "user data"
