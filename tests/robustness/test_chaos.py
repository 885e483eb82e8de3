"""Chaos: SIGTERM at seeded random moments during ``prune``, ``export``, ``finetune`` and ``run`` (20 signals in
all). Each interrupted command must exit 143 (or 0 if it had finished) with one line and no traceback, leave no
temp sibling, lock or temp folder anywhere (its own TMPDIR included), never a half-written output; and a re-run
(``--resume`` for a fine-tune that left its checkpoint) must give byte-identical outputs to an uninterrupted run.
An output that exists after the signal (it came after the final rename) must already be identical.

The delay of each signal is drawn (``random.Random(SEED)``) uniformly over the uninterrupted command's wall time,
so signals land in loading, calibration, scoring, writing and renaming alike. ``run`` needs llama.cpp (its verify
stage); without llama-cpp-python its signals go to the other commands, so there are always 20.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from robust_helpers import cached_model, server, tiny_dir, tiny_with_ref_tokenizer

SEED = 1616
N_SIGNALS = 20


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


class Cmd:
    """One command under test: its argv for an output path, what to compare, and what an interrupt may leave."""

    def __init__(self, name, argv, compare, keeps_partial=False):
        self.name, self.argv, self.compare, self.keeps_partial = name, argv, compare, keeps_partial


def _commands(root: Path, ref: Path, work: Path, onnx: bool) -> list[Cmd]:
    tiny = cached_model(root, "tiny", tiny_dir)
    tinyref = cached_model(root, "tinyref", lambda d: tiny_with_ref_tokenizer(d, ref))
    text = work / "ft.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") * rng.randint(1, 3) for _ in range(20000)))
    cmds = [
        Cmd("prune", lambda o: ["prune", tiny, "--method", "wanda-sp", "--ratio", "0.3", "--calib-samples", "8",
                                "--calib-len", "32", "--quiet", "--out", o], ["model.safetensors"]),
        Cmd("finetune", lambda o: ["finetune", tiny, "--data", text, "--steps", "8", "--groups", "2", "--batch-size",
                                   "2", "--seq-len", "32", "--eval-every", "4", "--ckpt-every", "2", "--quiet",
                                   "--out", o], ["model.safetensors"]),
    ]
    if onnx and _has("onnxruntime"):   # int8 ONNX is made from an f32 intermediate folder inside the output's temp
        cmds.append(Cmd("export-onnx", lambda o: ["export", tiny, "--format", "onnx", "--quant", "int8", "--out", o],
                        ["model.onnx"]))
    if _has("llama_cpp"):      # a quantized GGUF is made from an f32 intermediate file beside the output
        cmds.append(Cmd("export-gguf", lambda o: ["export", tinyref, "--format", "gguf", "--quant", "q8_0",
                                                  "--out", o], [""]))
        cmds.append(Cmd("run", lambda o: ["run", tinyref, "--profile", "demo-tiny-budget", "--no-host-calibration",
                                          "--ppl-chunks", "2", "--calib-samples", "4", "--threads", "1", "--out", o],
                        _run_outputs, keeps_partial=True))
    return cmds


def _run_outputs(out: Path) -> list[str]:
    """A run's artifact and (when the plan prunes) its pruned weights, as recorded in its state."""
    import json

    st = json.loads((out / "state.json").read_text())["stages"]
    return [st["export"]["artifact"]] + (["pruned/model.safetensors"] if "prune" in st else [])


def _digest(out: Path, names) -> dict:
    from edgeprune.models import dir_digest, file_digest

    names = names(out) if callable(names) else names
    return {n: dir_digest(out / n) if (out / n).is_dir() else file_digest(out / n if n else out) for n in names}


def _leftovers(work: Path, tmpdir: Path) -> list[str]:
    bad = [str(p) for p in work.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name == ".lock"]
    for p in tmpdir.rglob("*"):   # the command's own TMPDIR: only the (empty) shared lock folder may remain
        if not (p.name.startswith("edgeprune-locks-") and p.is_dir() and not any(p.iterdir())):
            bad.append(str(p))
    return bad


def _interrupted(srv, argv, delay: float, tag: Path):
    res = {}
    pidfile = tag.with_suffix(".pid")
    th = threading.Thread(target=lambda: res.update(r=srv.run(*argv, pidfile=pidfile, env={"TMPDIR": str(tag)},
                                                              timeout=600)))
    th.start()
    t0 = time.time()
    while not pidfile.exists() and th.is_alive() and time.time() - t0 < 120:
        time.sleep(0.01)
    time.sleep(delay)
    try:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    except (ProcessLookupError, FileNotFoundError):
        pass
    th.join()
    return res["r"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("chaos")


def _plan(cmds: list[Cmd], rng: random.Random) -> list[Cmd]:
    """N_SIGNALS commands: at most 3 of the slow ``run`` (20 s each here), the rest round-robin over the others."""
    runs = [c for c in cmds if c.name == "run"][:1] * 3
    rest = [c for c in cmds if c.name != "run"]
    plan = runs + [rest[i % len(rest)] for i in range(N_SIGNALS - len(runs))]
    rng.shuffle(plan)
    return plan


def test_sigterm_at_random_points_leaves_nothing_and_rerun_is_identical(root, ref_model_dir, tmp_path):
    _chaos(root, ref_model_dir, tmp_path, onnx=False)


@pytest.mark.heavy
def test_chaos_with_onnx_export(root, ref_model_dir, tmp_path):
    """The same with int8 ONNX exports too (45 s each on a busy 2-core machine: heavy)."""
    _chaos(root, ref_model_dir, tmp_path, onnx=True)


def _chaos(root, ref_model_dir, tmp_path, onnx: bool) -> None:
    srv = server(root)
    cmds = _commands(root, ref_model_dir, tmp_path, onnx)
    rng = random.Random(SEED)
    plan = _plan(cmds, rng)
    ref, wall = {}, {}
    for c in cmds:   # the uninterrupted reference outputs and wall times
        o = tmp_path / "ref" / c.name / ("m.gguf" if c.name == "export-gguf" else "out")
        t = time.time()
        r = srv.run(*c.argv(o), timeout=900)
        wall[c.name] = time.time() - t
        assert r.returncode == 0, (c.name, r.stderr[-3000:])
        ref[c.name] = _digest(o, c.compare)
    print("uninterrupted wall s:", {k: round(v, 1) for k, v in wall.items()})
    outcomes = []
    for k, c in enumerate(plan):
        work = tmp_path / f"t{k}"
        tag = tmp_path / f"tmp{k}"
        work.mkdir()
        tag.mkdir()
        o = work / ("m.gguf" if c.name == "export-gguf" else "out")
        delay = rng.uniform(0.1, max(0.2, wall[c.name]))
        r = _interrupted(srv, c.argv(o), delay, tag)
        where = f"{c.name} #{k} SIGTERM after {delay:.2f} s"
        assert r.returncode in (0, 143), (where, r.returncode, r.stderr[-3000:])
        assert "Traceback" not in r.stderr, (where, r.stderr[-3000:])
        if r.returncode == 143:
            assert "interrupted (SIGTERM)" in r.stderr.splitlines()[-1], (where, r.stderr[-500:])
            # an output is either absent or complete (a signal after the final rename leaves the finished one,
            # compared with the reference below)
        assert _leftovers(work, tag) == [], (where, _leftovers(work, tag))
        if c.keeps_partial or not o.exists():
            resume = ["--resume"] if c.name == "finetune" and Path(str(o) + ".ckpt").exists() else []
            r2 = srv.run(*c.argv(o), *resume, timeout=900)
            assert r2.returncode == 0, (where, "re-run", r2.stderr[-3000:])
        assert _digest(o, c.compare) == ref[c.name], f"{where}: the re-run differs from an uninterrupted run"
        assert _leftovers(work, tag) == [], (where, "after re-run", _leftovers(work, tag))
        outcomes.append(r.returncode)
    assert len(outcomes) == N_SIGNALS and outcomes.count(143) >= N_SIGNALS // 2, outcomes
