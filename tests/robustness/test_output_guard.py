"""Issue #16, class 1: one output-path guard for every path every command writes.

Each reproduction from the issue is a case here: the command must exit 2 with one line, delete or alter nothing the
user did not name as an output, and leave nothing behind (``check_case`` from the bad-input suite proves it).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from robust_helpers import cached_model, error_line, listing, module_root, run_cli_subprocess, server, tiny_dir
from test_bad_input import PRUNE, Case, Ctx, run_case

C = Case


def _user_folder(c: Ctx) -> Path:
    """anc/ holding the input model and the user's other files (the issue's data-loss reproduction)."""
    anc = c.work / "anc"
    anc.mkdir()
    import shutil

    shutil.copytree(c.tiny(), anc / "model")
    (anc / "notes.txt").write_text("user data")
    return anc


def _fifo(c: Ctx) -> Path:
    p = c.work / "pipe"
    os.mkfifo(p)
    return p


def _link(c: Ctx) -> Path:
    target = c.file("precious.json", "{}")
    p = c.work / "link.json"
    p.symlink_to(target)
    return p


def _not_ours(c: Ctx) -> Path:
    c.out.mkdir()
    (c.out / "keep.txt").write_text("user data")
    return c.out


CASES = [
    # --out that CONTAINS the input, with --overwrite (deleted the model and the user's files before)
    C("prune-out-contains-input", lambda c: ["prune", (a := _user_folder(c)) / "model", *PRUNE, "--out", a, "--overwrite"],
      ("contains the input model", "does not contain it")),
    C("finetune-out-contains-input", lambda c: ["finetune", (a := _user_folder(c)) / "model", "--data", c.text(), "--steps",
                                                "4", "--out", a, "--overwrite", "--quiet"], ("contains the input",)),
    C("export-onnx-out-contains-input", lambda c: ["export", (a := _user_folder(c)) / "model", "--format", "onnx",
                                                   "--out", a, "--overwrite"], ("contains the input model",)),
    C("prune-out-is-calib-folder", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", (c.text(), c.inp)[1], "--out", c.inp,
                                              "--overwrite"], ("is the input",)),
    C("run-out-contains-model", lambda c: ["run", (a := _user_folder(c)) / "model", "--profile", "pixel-8", "--out", a,
                                           "--no-host-calibration", "--overwrite"], ("contains the input model",)),
    # --json onto an input, a folder, a FIFO, a symlink
    C("info-json-is-model-config", lambda c: ["info", m := c.model(), "--json", m / "config.json"], ("inside the input model",)),
    C("eval-json-inside-model", lambda c: ["eval", m := c.model(), "--json", m / "e.json", "--quiet"], ("inside the input model",)),
    C("info-json-fifo", lambda c: ["info", c.tiny(), "--json", _fifo(c)], ("is a FIFO", "choose another path")),
    C("info-json-symlink", lambda c: ["info", c.tiny(), "--json", _link(c)], ("symbolic link",)),
    C("info-json-device", lambda c: ["info", c.tiny(), "--json", "/dev/null"], ("device node",)),
    C("finetune-json-is-folder", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--out", c.out,
                                            "--json", (c.work / "jd").mkdir() or c.work / "jd", "--quiet"], ("--json", "is a folder")),
    C("finetune-json-inside-out", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--out", c.out,
                                             "--json", c.out / "r.json", "--quiet"], ("--json", "inside the output")),
    C("plan-json-is-profile", lambda c: ["plan", c.tiny(), "--profile", p := c.profile(
        (Path(__file__).resolve().parents[2] / "device_profiles" / "pixel-8.yaml").read_text()), "--json", p],
      ("is the input",)),
    C("verify-json-is-reference-config", lambda c: ["verify", c.work / "x.gguf", "--reference", m := c.model(),
                                                    "--json", m / "config.json"], ("inside the input model",)),
    # folders edgeprune did not write are never replaced, --overwrite or not
    C("prune-overwrite-foreign-folder", lambda c: ["prune", c.tiny(), *PRUNE, "--out", _not_ours(c), "--overwrite"],
      ("not written by edgeprune", "choose another path")),
    C("export-onnx-overwrite-foreign", lambda c: ["export", c.tiny(), "--format", "onnx", "--out", _not_ours(c), "--overwrite"],
      ("not written by edgeprune",)),
    C("run-into-foreign-folder", lambda c: ["run", c.tiny(), "--profile", "pixel-8", "--out", _not_ours(c),
                                            "--no-host-calibration"], ("not written by edgeprune", "--overwrite")),
    C("export-gguf-onto-fifo", lambda c: ["export", c.tinyref(), "--format", "gguf", "--out", _fifo(c), "--overwrite"],
      ("is a FIFO",)),
]


root = module_root("guard")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_guard(case, root, ref_model_dir, tmp_path):
    ctx = run_case(case, root, ref_model_dir, tmp_path)
    notes = ctx.work / "anc" / "notes.txt"
    if notes.parent.exists():
        assert notes.read_text() == "user data"
    if (ctx.work / "pipe").exists():
        assert __import__("stat").S_ISFIFO(os.lstat(ctx.work / "pipe").st_mode)


def test_own_output_is_replaced_with_overwrite(root, tmp_path):
    """The marker makes edgeprune's own folders replaceable (and only with --overwrite)."""
    srv = server(root)
    tiny = cached_model(root, "tiny", tiny_dir)
    out = tmp_path / "out"
    assert srv.run("prune", tiny, *PRUNE, "--out", out).returncode == 0
    error_line(srv.run("prune", tiny, *PRUNE, "--out", out), 2, "not empty", "--overwrite")
    r = srv.run("prune", tiny, *PRUNE, "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_writers_one_path_exactly_one_wins(root, tmp_path):
    """Two ``prune --out X`` at once: one exits 0, the other 2 with one line; X is the winner's complete model."""
    tiny = cached_model(root, "tiny", tiny_dir)
    out = tmp_path / "X"
    res = [None, None]

    def go(i):
        res[i] = run_cli_subprocess("prune", tiny, *PRUNE, "--seed", str(i), "--out", out, timeout=600)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    codes = sorted(r.returncode for r in res)
    assert codes == [0, 2], [(r.returncode, r.stderr[-500:]) for r in res]
    loser = next(r for r in res if r.returncode == 2)
    error_line(loser, 2, str(out))
    winner = next(i for i, r in enumerate(res) if r.returncode == 0)
    import json

    prov = json.loads((out / "config.json").read_text())["pruning"]["provenance"]
    assert prov["calibration"]["seed"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]


def test_commit_never_replaces_what_appeared_meanwhile(tmp_path):
    """The rename is checked at rename time: a path that was free when guarded and taken since is not replaced."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.paths import atomic_dir, atomic_file, guard_output

    for kind, ctx in (("dir", atomic_dir), ("file", atomic_file)):
        out = tmp_path / f"o-{kind}"
        guard_output(out, kind=kind)
        with pytest.raises(EdgepruneError, match="written by another process"):
            with ctx(out) as tmp:
                (tmp / "a").write_text("mine") if kind == "dir" else tmp.write_text("mine")
                (out.mkdir(), (out / "a").write_text("theirs")) if kind == "dir" else out.write_text("theirs")
        assert ((out / "a") if kind == "dir" else out).read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-dir", "o-file"]


def test_failed_first_checkpoint_leaves_no_empty_folder(root, tmp_path):
    """A first checkpoint save that fails (a file where the checkpoint goes) leaves no empty ``OUT.ckpt``; a re-run
    then starts normally instead of asking for --resume."""
    srv = server(root)
    tiny = cached_model(root, "tiny", tiny_dir)
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z\n" * 400)
    ck = tmp_path / "out.ckpt"
    ck.mkdir()   # empty leftover of an earlier failed save
    r = srv.run("finetune", tiny, "--data", text, "--steps", "4", "--groups", "2", "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.txt"]
