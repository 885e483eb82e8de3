"""Atomic outputs, the run lock, resume after ``kill -9`` and determinism, on real processes.

* ``edgeprune run`` (reference model, profile ``demo-tiny-budget``, no host calibration, 20 perplexity chunks) is
  killed with SIGKILL at a seeded random moment, a concurrent second run on the same folder is refused while it
  holds the lock, and the re-run's pruned safetensors and GGUF are byte-identical to an uninterrupted run's.
* ``edgeprune finetune --resume`` after SIGKILL gives the same merged weights as an uninterrupted run.
* The Self-Pruner search resumes from its JSONL log after SIGKILL and picks the same plan.
* prune -> export gguf twice with the same seed gives byte-identical safetensors and GGUF.
"""
from __future__ import annotations

import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robust_helpers import (QUIET_THREADS, ROOT, cached_model, error_line, opt_args, server, temp_siblings, tiny_dir,
                            tiny_with_ref_tokenizer)

SEED = 8   # issue 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


def _start(*args) -> subprocess.Popen:
    """A fresh ``python -m edgeprune.cli`` in its own process group (kill -9 reaches its speed subprocess too)."""
    return subprocess.Popen([sys.executable, "-m", "edgeprune.cli", *map(str, args)], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **QUIET_THREADS})


def _kill9(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate(timeout=60)


def _wait_for(pred, timeout: float, p: subprocess.Popen | None = None) -> bool:
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        if p is not None and p.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _digests(d: Path, names) -> dict:
    from edgeprune.models import file_digest

    return {n: file_digest(d / n) for n in names}


# ------------------------------------------------------------------------------------------------ edgeprune run
def test_run_killed_resumes_bit_identical_and_lock_refuses_second_run(ref_model_dir, root, tmp_path):
    from edgeprune.models import dir_digest

    from device_profiles import load_profile
    from edgeprune import planner as P

    # a fixed host calibration (as measured for the dense model: f16, 1498 tok/s, 78.7 MB at n_ctx 2048) so that
    # the plan does not depend on what other tests saved into the shared test cache
    P.calibrate_host(P.HostRun(str(ref_model_dir), "f16", 1498.5, 78.7, 16.892, 5000.0, 2048, 160, 128),
                     load_profile("host", calibration=False), save=True)
    before = dir_digest(ref_model_dir)
    args = ["--profile", "demo-tiny-budget", "--no-host-calibration", "--ppl-chunks", "20", "--calib-samples", "16"]
    ref_out = tmp_path / "uninterrupted"
    p = _start("run", ref_model_dir, "--out", ref_out, *args)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    state = json.loads((ref_out / "state.json").read_text())
    art = state["stages"]["export"]["artifact"]
    want = _digests(ref_out, ["pruned/model.safetensors", art])

    killed = tmp_path / "killed"
    rng = random.Random(SEED)
    srv = server(root)   # started first: its imports take seconds, and the run must still hold the lock
    p = _start("run", ref_model_dir, "--out", killed, *args)
    # while it holds the lock, a second run on the same folder is refused, naming the holder's pid
    assert _wait_for(lambda: (killed / ".lock").exists() and (killed / ".lock").read_text().strip(), 300, p), \
        p.communicate()[1][-2000:]
    r = srv.run("run", ref_model_dir, "--out", killed, *args)
    error_line(r, 2, "in use by another edgeprune run", f"pid {p.pid}", "choose another --out")
    # SIGKILL at a seeded random moment between the start of pruning and the end of the run
    delay = rng.uniform(0.0, 25.0)
    _wait_for(lambda: False, delay, p)
    _kill9(p)
    stages = json.loads((killed / "state.json").read_text())["stages"] if (killed / "state.json").exists() else {}
    # nothing that looks finished unless its stage was recorded
    if "prune" not in stages:
        assert not (killed / "pruned").exists() or not (killed / "pruned" / "model.safetensors").exists() or \
            (killed / "pruned" / "config.json").exists()
    p = _start("run", ref_model_dir, "--out", killed, *args)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    assert _digests(killed, ["pruned/model.safetensors", art]) == want, f"killed after {delay:.1f} s, stages {list(stages)}"
    assert not temp_siblings(killed) and not temp_siblings(killed / "pruned")
    assert not (killed / ".lock").exists()
    assert dir_digest(ref_model_dir) == before


# ------------------------------------------------------------------------------------------------ finetune
def test_finetune_killed_resumes_bit_identical(root, tmp_path):
    pytest.importorskip("edgeprune.recovery.finetune")
    model = cached_model(root, "tiny", tiny_dir)
    text = tmp_path / "ft.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") * rng.randint(1, 3) for _ in range(40000)))
    args = ["--data", text, "--steps", "24", "--ckpt-every", "4", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "6", "--groups", "2", "--seed", "3", "--quiet"]
    a = tmp_path / "a"
    r = server(root).run("finetune", model, *args, "--out", a)
    assert r.returncode == 0, r.stderr[-3000:]
    b = tmp_path / "b"
    ckpt = tmp_path / "b.ckpt" / "state.pt"
    p = _start("finetune", model, *args, "--out", b)
    assert _wait_for(ckpt.exists, 300, p), p.communicate()[1][-2000:]
    _wait_for(lambda: False, random.Random(SEED).uniform(0.0, 1.0), p)
    _kill9(p)
    assert not b.exists() or (b / "model.safetensors").exists()     # never a half-written output folder
    if not b.exists():
        r = server(root).run("finetune", model, *args, "--out", b, *(["--resume"] if ckpt.exists() else []))
        assert r.returncode == 0, r.stderr[-3000:]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not temp_siblings(tmp_path)


# ------------------------------------------------------------------------------------------------ self-pruner log
def test_self_pruner_search_resumes_from_its_log(root, tmp_path):
    pytest.importorskip("edgeprune.self_pruner")
    model = cached_model(root, "tiny", lambda d: tiny_dir(d, layers=6))
    text = tmp_path / "fit.txt"
    text.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z\n" * 400)

    def argv(out, log):
        a = ["prune", model, "--method", "magnitude", "--allocation", "self-pruner", "--ratio", "0.4",
             "--calib-samples", "4", "--calib-len", "16", "--quiet", "--out", out]
        return a + opt_args({"backend": "ga", "population": 8, "n_crossover": 4, "n_mutation": 4, "generations": 6,
                             "fitness_samples": 4, "fitness_len": 32, "fitness_source": str(text), "log": str(log)})

    r = server(root).run(*argv(tmp_path / "a", tmp_path / "a.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = tmp_path / "b.jsonl"
    p = _start(*argv(tmp_path / "b", log))
    n_kill = random.Random(SEED).randint(5, 30)
    assert _wait_for(lambda: log.exists() and log.read_text().count("\n") >= n_kill, 300, p), p.communicate()[1][-2000:]
    _kill9(p)
    assert not (tmp_path / "b").exists()
    r = server(root).run(*argv(tmp_path / "b", log))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------ determinism
def test_prune_and_export_twice_byte_identical(ref_model_dir, root, tmp_path):
    from edgeprune.models import dir_digest

    before = dir_digest(ref_model_dir)
    got = []
    for k in range(2):   # same file names (the GGUF's general.name is the model folder's name)
        d, g = tmp_path / f"run{k}" / "pruned", tmp_path / f"run{k}" / "model.gguf"
        r = server(root).run("prune", ref_model_dir, "--method", "flap", "--ratio", "0.3", "--calib-samples", "16",
                             "--seed", "5", "--round-mlp", "32", "--quiet", "--out", d)
        assert r.returncode == 0, r.stderr[-3000:]
        r = server(root).run("export", d, "--format", "gguf", "--quant", "q8_0", "--out", g)
        assert r.returncode == 0, r.stderr[-3000:]
        got.append(((d / "model.safetensors").read_bytes(), g.read_bytes()))
    assert got[0][0] == got[1][0], "pruned safetensors differ between two identical runs"
    assert got[0][1] == got[1][1], "GGUF differs between two identical runs"
    assert not temp_siblings(tmp_path / "run0") and not temp_siblings(tmp_path / "run1")
    assert dir_digest(ref_model_dir) == before


# ------------------------------------------------------------------------------------------------ atomic writers
def test_quant_fallback_is_explained_not_fatal(ref_model_dir, root, tmp_path):
    """hidden 64 is not a multiple of K-quants' 256-value block: llama.cpp stores those tensors as q5_0 (or f16);
    export succeeds and says so in one note line."""
    model = cached_model(root, "tinyref", lambda d: tiny_with_ref_tokenizer(d, ref_model_dir))
    out = tmp_path / "m.gguf"
    r = server(root).run("export", model, "--format", "gguf", "--quant", "q4_k_m", "--out", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    notes = [l for l in r.stderr.splitlines() if l.startswith("edgeprune: note:")]
    assert len(notes) == 1 and "could not take q4_k_m" in notes[0] and "--round-mlp 256" in notes[0], r.stderr
    summary = json.loads(r.stdout)
    assert summary["quant_report"]["n_fallbacks"] > 0 and out.is_file()
    assert not temp_siblings(tmp_path)


WRITES = {"write_text", "write_bytes", "savefig", "save_file", "save", "tofile", "save_pretrained", "copy", "copy2",
          "open"}
# functions that write into a folder their caller made atomic (or that write logs/scratch, not artifacts)
ALLOWED = {
    ("edgeprune/models.py", "copy_tokenizer"),          # into save()'s / export's temp folder
    ("edgeprune/testing.py", "write_tokenizer"),        # test fixtures
    ("edgeprune/zeroshot.py", "_write_task_dir"),       # lm-eval task yamls in a scratch temp folder
    ("exporters/onnx_export.py", "export_decoder"),     # into export_onnx's atomic_dir temp folder
    ("exporters/onnx_export.py", "_rename_external"),   # same
    ("exporters/onnx_export.py", "to_fp16"),            # same
    ("exporters/onnx_export.py", "to_int8"),            # same
    ("edgeprune/self_pruner/search.py", "search"),      # append-only JSONL log; a torn last line is skipped on resume
    ("edgeprune/checkpoint.py", "write"),               # ShardWriter: shards into the ShardSink's atomic_dir
    ("edgeprune/checkpoint.py", "finish"),              # same (the shard index)
    ("edgeprune/layer_io.py", "finish"),                # ShardSink: config, report into its atomic_dir
    ("exporters/remote.py", "push"),                    # LocalTransport: a copy into the scratch "device" folder
    ("exporters/remote.py", "_speed_bundle"),           # files for the device, in a scratch temp folder
    ("edgeprune/paths.py", "mark_ours"),                # a constant one-line marker; a torn write is still a marker
}


def test_every_artifact_writer_is_atomic():
    """Every function that writes a file either does it inside atomic_file/atomic_dir (temp sibling + rename) or
    is listed above with the reason its target is already a temp folder."""
    bad = []
    for f in sorted(list((ROOT / "edgeprune").rglob("*.py")) + list((ROOT / "exporters").rglob("*.py")) +
                    list((ROOT / "device_profiles").rglob("*.py"))):
        rel = str(f.relative_to(ROOT))
        tree = ast.parse(f.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            src = ast.get_source_segment(f.read_text(), fn) or ""
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                if isinstance(node.func, ast.Name) and node.func.id == "open":   # builtin open(path, "w")
                    node.func = ast.Attribute(value=ast.Name(id="builtins"), attr="open")
                if not isinstance(node.func, ast.Attribute):
                    continue
                name = node.func.attr
                if name not in WRITES:
                    continue
                modes = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if name == "open" and not any(str(m)[:1] in "wax" for m in modes):
                    continue
                if name in ("copy", "copy2") and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "shutil"):
                    continue
                if name == "save" and not (isinstance(node.func.value, ast.Name) and
                                           node.func.value.id in ("torch", "onnx", "prog")):
                    continue
                if ("atomic_file(" in src or "atomic_dir(" in src or "os.replace(" in src or
                        (rel, fn.name) in ALLOWED or fn.name in ("_savefig",)):
                    continue
                bad.append(f"{rel}:{node.lineno} {fn.name}() calls .{name}() outside atomic_file/atomic_dir")
    assert not bad, "\n".join(bad)


def test_cache_writes_leave_no_temp_sibling_when_interrupted(tmp_path, monkeypatch):
    """replace_text (the host cache's writer): an interrupt after the temp sibling is written removes it and keeps
    the old text; an uninterrupted write replaces it."""
    from edgeprune.paths import replace_text

    f = tmp_path / "host.json"
    replace_text(f, "old")
    real = Path.write_text

    def written_then_interrupted(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_text(f, "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["host.json"] and f.read_text() == "old"
    replace_text(f, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["host.json"] and f.read_text() == "new"
