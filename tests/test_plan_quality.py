"""Issue #14: plans from the method's real allocation, chosen by measured quality, budgets hit exactly.

Runtime figures come from llama.cpp (skipped without llama-cpp-python); the quality slice is held out of the
calibration source, the acceptance checks use the reference model's held-back text on the runtime.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli
from device_profiles import load_profile
from edgeprune import planner as P

pytest.importorskip("llama_cpp")

@pytest.fixture(scope="module")
def host_measurement(ref_model_dir, tmp_path_factory):
    """The dense reference f16 GGUF measured on this host as deployed (llama.cpp, n_ctx 2048, best of 3)."""
    import exporters
    from exporters.speed import measure_subprocess

    art = tmp_path_factory.mktemp("hostcal") / "ref-f16.gguf"
    exporters.export(str(ref_model_dir), "gguf", str(art), quant="f16")
    m = measure_subprocess(art, threads=1, n_ctx=2048)
    return P.HostRun(str(ref_model_dir), "f16", m.get("decode_tps_best") or m["decode_tps"], m["peak_rss_mb"],
                     m["file_mb"], m.get("prefill_tps_best") or m["prefill_tps"], 2048, m.get("kv_tokens"),
                     m.get("prompt"))


@pytest.fixture
def calibrated_host(host_measurement, tmp_path, monkeypatch):
    """This host's calibration (from the measurement above) in a private cache, so that plans do not depend on
    what other tests saved."""
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    P.calibrate_host(host_measurement, load_profile("host", calibration=False), save=True)
    return load_profile("host")


def _heldout_runtime_ppl(gguf, ref_model_dir, chunks: int = 60) -> float:
    from edgeprune.data import eval_ids
    from edgeprune.models import load_tokenizer
    from exporters.runtimes import open_runtime
    from exporters.verify import runtime_ppl

    ids = eval_ids(load_tokenizer(ref_model_dir), "heldout").numpy()
    rt = open_runtime(gguf, threads=1, kv="f16", n_ctx=256)
    try:
        return runtime_ppl(rt, ids, 128, chunks)[0]
    finally:
        rt.close()


def _artifact(src, d: Path, method: str, ratio: float, quant: str, calib_samples: int) -> Path:
    """The candidate as run would ship it: pruned at ``ratio`` (or not), exported, quantized by llama.cpp."""
    import exporters
    from edgeprune.prune import PruneConfig, run_prune

    if ratio > 0:
        run_prune(src, d / "pruned", PruneConfig(method, ratio, calib_samples=calib_samples, multiple=32),
                  overwrite=True, progress=False)
        src = d / "pruned"
    art = d / f"{quant}.gguf"
    exporters.export(str(src), "gguf", str(art), quant=quant)
    return art


@pytest.fixture(scope="module")
def budget_mb(host_measurement) -> float:
    """The memory budget these tests plan for: the dense f16 peak just measured minus 5 MB, the rule
    demo-tiny-budget's comment gives (74 MB there, from a 78.1-78.9 MB peak). A fixed 74 MB made the tests depend
    on this run's measurement: one clean-clone CI measured a base so high that f16 at 70% missed 74 MB by 4 KB."""
    return round(host_measurement.peak_rss_mb - 5, 2)


def _profile_yaml(tmp_path, quants, budget_mb: float) -> Path:
    """demo-tiny-budget with other quants allowed, its memory budget at ``budget_mb`` and its speed budgets made
    generous: memory is what these tests are about, and the shared test machine may be loaded many times over
    (decode measured 8x slower than quiet)."""
    text = Path(load_profile("demo-tiny-budget").path).read_text()
    assert "max_memory_mb: 74\n" in text
    text = text.replace("max_memory_mb: 74\n", f"max_memory_mb: {budget_mb}\n")
    text = text.replace("allowed_quants: [f16]", f"allowed_quants: [{', '.join(quants)}]")
    text = text.replace("name: demo-tiny-budget", "name: demo-tiny-budget-quants")
    text = text.replace("max_decode_ms_per_token: 5 ", "max_decode_ms_per_token: 100 ")
    text = text.replace("min_prefill_tps: 500 ", "min_prefill_tps: 10 ")
    p = tmp_path / "demo-quants.yaml"
    p.write_text(text)
    return p


@pytest.mark.heavy
def test_run_ships_the_best_of_three_feasible_alternatives(ref_model_dir, calibrated_host, budget_mb, tmp_path):
    """demo-tiny-budget's memory budget with f16/q8_0/q4_k_m allowed: the shipped candidate's held-back ppl on
    llama.cpp is within 1% of the best of the three alternatives (each quant at its least fitting ratio)."""
    out = tmp_path / "run"
    r = run_cli("run", ref_model_dir, "--profile", _profile_yaml(tmp_path, ["f16", "q8_0", "q4_k_m"], budget_mb),
                "--out", out, "--no-host-calibration", "--ppl-chunks", "10", "--calib-samples", "16", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    least = {c["quant"]: c for c in plan["table"] if c["role"] == "least"}
    assert set(least) == {"f16", "q8_0", "q4_k_m"} and plan["quality_basis"] == "measured"
    from edgeprune.pipeline import RunConfig

    method = RunConfig(model="", profile="", out="").method         # run's default method, as the run used
    ppl = {q: _heldout_runtime_ppl(_artifact(ref_model_dir, tmp_path / q, method, c["ratio"], q, 16), ref_model_dir)
           for q, c in least.items()}
    state = json.loads((out / "state.json").read_text())
    shipped = out / state["stages"]["export"]["artifact"]
    got = _heldout_runtime_ppl(shipped, ref_model_dir)
    assert got <= 1.01 * min(ppl.values()), (plan["chosen"]["quant"], got, ppl)
    assert plan["why"] and "frontier.png" in (out / "report.md").read_text()
    assert len(plan["check"]["candidates"]) == 2


def test_plan_stage_chooses_the_best_of_three_feasible_alternatives(ref_model_dir, calibrated_host, budget_mb,
                                                                    tmp_path):
    """CI variant of the test above: ``run``'s plan stage alone (one scoring, measured quality, end-to-end check),
    then the three alternatives measured on the held-back text on llama.cpp."""
    from edgeprune.pipeline import RunConfig, _stage_plan

    prof = load_profile(_profile_yaml(tmp_path, ["f16", "q8_0", "q4_k_m"], budget_mb))
    cfg = RunConfig(model=str(ref_model_dir), profile=str(prof.path), out=str(tmp_path), calib_samples=16)
    info, _ = _stage_plan(cfg, Path(ref_model_dir), tmp_path, prof)
    plan = json.loads((tmp_path / "plan.json").read_text())
    least = {c["quant"]: c for c in plan["table"] if c["role"] == "least"}
    assert set(least) == {"f16", "q8_0", "q4_k_m"} and plan["quality_basis"] == "measured"
    ppl = {q: _heldout_runtime_ppl(_artifact(ref_model_dir, tmp_path / q, cfg.method, c["ratio"], q, 16),
                                   ref_model_dir) for q, c in least.items()}
    assert info["ratio"] == least[info["quant"]]["ratio"]
    assert ppl[info["quant"]] <= 1.01 * min(ppl.values()), (info["quant"], ppl)
    assert "beat the runner-up" in plan["why"]


def test_demo_run_prunes_once_at_the_least_fitting_ratio(ref_model_dir, calibrated_host, budget_mb, tmp_path):
    out = tmp_path / "run"
    r = run_cli("run", ref_model_dir, "--profile", _profile_yaml(tmp_path, ["f16"], budget_mb), "--out", out,
                "--no-host-calibration",
                "--ppl-chunks", "10", "--calib-samples", "16", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "re-prun" not in r.stdout + r.stderr
    st = json.loads((out / "state.json").read_text())["stages"]
    plan = json.loads((out / "plan.json").read_text())
    assert st["prune"]["ratio"] == st["plan"]["ratio"] == plan["chosen"]["ratio"] > 0
    assert all(st["prune"]["predicted_fits"].values())
    below = [c for c in plan["table"] if c["role"] == "below"]
    assert below and not below[0]["feasible"] and abs(below[0]["ratio"] - (plan["chosen"]["ratio"] - 0.005)) < 1e-9
    rep = json.loads((out / "report.json").read_text())
    v = rep["verdicts"]["max_memory_mb"]
    assert v["basis"] == "measured" and v["verdict"] == "PASS", v


def test_prune_target_mb_hits_the_budget_within_3pct(ref_model_dir, tmp_path, monkeypatch):
    """``prune --target-mb N --quant f16``: the exported GGUF's peak RSS, measured as verify measures it, is within
    N and within 3% of it. N is set below the dense model's measured peak so that pruning is needed."""
    import exporters
    from exporters.speed import measure_subprocess

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))   # no saved calibration: prune measures
    dense = tmp_path / "dense.gguf"
    exporters.export(str(ref_model_dir), "gguf", str(dense), quant="f16")
    n = round(0.93 * measure_subprocess(dense, threads=2)["peak_rss_mb"], 1)
    out = tmp_path / "pruned"
    r = run_cli("prune", ref_model_dir, "--method", "flap", "--target-mb", n, "--quant", "f16", "--calib-samples",
                "16", "--round-mlp", "32", "--out", out, "--quiet", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    art = tmp_path / "pruned-f16.gguf"
    exporters.export(str(out), "gguf", str(art), quant="f16")
    peak = measure_subprocess(art, threads=2)["peak_rss_mb"]
    assert 0.97 * n <= peak <= n, (peak, n)
    prov = json.loads((out / "config.json").read_text())
    assert "fit" in json.dumps(prov)


def _busy_child():
    """Another job loading the machine: a process spinning on one core (the test's own child, ended by pid)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


@pytest.mark.heavy
def test_plan_stage_chooses_the_same_candidate_three_times_one_under_load(ref_model_dir, host_measurement, budget_mb,
                                                                          tmp_path, monkeypatch):
    """Three runs of ``run``'s plan stage on demo-tiny-budget, each scoring afresh and planning on its own host
    calibration (settled against what the machine recorded, as ``run`` does): (1) quiet, (2) with the machine
    loaded by another job (a spinning process) during the host measurement and the whole plan stage, (3)
    simulated load (the quiet measurement at 3x the per-token times).
    All three choose the same candidate. Speed budgets are relaxed as in the tests above: on the shared test
    machine a loaded decode can truly exceed 5 ms/token, and then a different plan would be right, not unstable.
    Heavy: three scorings and three measured-quality plans (minutes each on a loaded 2-core machine); the CI
    variant is test_planner.py::test_real_allocation_plan_is_stable_under_simulated_load (one scoring)."""
    import exporters
    from edgeprune.pipeline import RunConfig, _stage_plan
    from exporters.speed import measure_subprocess

    base = load_profile(_profile_yaml(tmp_path, ["f16"], budget_mb), calibration=False)
    host = load_profile("host", calibration=False)
    quiet = host_measurement
    slow = replace(quiet, decode_tps=quiet.decode_tps / 3, prefill_tps=quiet.prefill_tps / 3)
    chosen = []
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))   # one machine: one cache, as three runs share
    for mode in ("quiet", "loaded", "simulated"):
        busy = _busy_child() if mode == "loaded" else None
        try:
            run = quiet if mode == "quiet" else slow
            if busy is not None:
                art = tmp_path / "dense-f16.gguf"
                exporters.export(str(ref_model_dir), "gguf", str(art), quant="f16")
                m = measure_subprocess(art, threads=1, n_ctx=2048)
                run = replace(quiet, decode_tps=m.get("decode_tps_best") or m["decode_tps"],
                              peak_rss_mb=m["peak_rss_mb"], prefill_tps=m.get("prefill_tps_best") or m["prefill_tps"])
            prof = P.apply_calibration(base, P.settle_overhead(P.calibrate_host(run, host), run.peak_rss_mb))
            cfg = RunConfig(model=str(ref_model_dir), profile=str(prof.path), out=str(tmp_path), calib_samples=16)
            (tmp_path / mode).mkdir()
            info, _ = _stage_plan(cfg, Path(ref_model_dir), tmp_path / mode, prof)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        chosen.append((info["quant"], info["ratio"], info["ratio_of"]))
    assert len(set(chosen)) == 1 and chosen[0][1] > 0, chosen
    plan = json.loads((tmp_path / "quiet" / "plan.json").read_text())
    assert any("without the method's default 'lsq' repair" in n for n in plan["notes"]), plan["notes"]
