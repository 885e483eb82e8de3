"""Helpers for the robustness suite: the CLI fork server client, error-contract assertions, bad model builders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
# one intra-op thread: the test models are tiny, and on a shared 2-core machine spinning OpenMP threads made
# single steps 10-100x slower
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class ForkServer:
    """Client of ``_forkserver.py``: each :meth:`run` is a real child process running ``edgeprune.cli.main``."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "server.log", "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT), **QUIET_THREADS}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_forkserver.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=str(ROOT))
        self.lock = threading.Lock()
        self.n = 0
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"fork server did not start: {(self.workdir / 'server.log').read_text()[-2000:]}")

    def run(self, *argv, env: dict | None = None, cwd=None, fsize: int | None = None, uid: int | None = None,
            timeout: int = 300, pidfile: Path | None = None) -> Result:
        """Run the CLI in a forked child and wait for it; ``pidfile``: the child writes its pid there first (so
        another thread can signal it)."""
        with self.lock:
            self.n += 1
            so, se = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
            req = {"argv": [str(a) for a in argv], "env": env or {}, "cwd": str(cwd) if cwd else None,
                   "fsize": fsize, "uid": uid, "timeout": timeout, "stdout": str(so), "stderr": str(se),
                   "pidfile": str(pidfile) if pidfile else None}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"fork server died: {(self.workdir / 'server.log').read_text()[-2000:]}")
            rc = json.loads(line)["rc"]
            return Result(rc, so.read_text(errors="replace"), se.read_text(errors="replace"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


def run_cli_subprocess(*args, timeout: int = 600, preexec_fn=None, env: dict | None = None) -> Result:
    """A fresh ``python -m edgeprune.cli`` (the full import path, exactly as a user runs it)."""
    r = subprocess.run([sys.executable, "-m", "edgeprune.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=preexec_fn, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT), **QUIET_THREADS, **(env or {})})
    return Result(r.returncode, r.stdout, r.stderr)


def error_line(r: Result, code: int, *must: str) -> str:
    """Assert the error contract: exit ``code``, exactly one non-empty stderr line (``edgeprune: error: ...``)
    holding every string in ``must`` (case-insensitive), and no traceback. Returns the line."""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr: {r.stderr[-2000:]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("edgeprune: error: "), line
    for m in must:
        assert m.lower() in line.lower(), f"{m!r} not in: {line}"
    return line


def listing(d: Path) -> set[str]:
    """Every path under ``d`` (hidden ones included), relative."""
    d = Path(d)
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


def temp_siblings(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))


# ------------------------------------------------------------------------------------------------ model builders
def tiny_dir(out: Path, **kw) -> Path:
    from edgeprune import testing as T

    return T.save_tiny(T.tiny_model("gqa", **kw), out)


def tiny_with_ref_tokenizer(out: Path, ref: Path, **kw) -> Path:
    """A tiny random model carrying the reference model's SentencePiece tokenizer (so it exports to GGUF)."""
    from edgeprune import testing as T
    from edgeprune.models import TOKENIZER_FILES, save

    vocab = json.loads((ref / "config.json").read_text())["vocab_size"]
    save(T.tiny_model("gqa", vocab=vocab, **kw), out, overwrite=True, provenance={"source": "random"})
    for f in TOKENIZER_FILES:
        if (ref / f).is_file():
            shutil.copy(ref / f, out / f)
    return out


def edit_config(d: Path, **changes) -> Path:
    p = d / "config.json"
    c = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    p.write_text(json.dumps(c))
    return d


MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('remote code ran')\n"


class Evil:
    """Pickled, ``__reduce__`` would run ``os.system``-like code (writes a marker file) when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(marker=self.marker),))


def write_malicious_bin(d: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    """A torch checkpoint (zip format) whose unpickling would execute code."""
    import torch

    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "evil": Evil(str(marker))}, d / name)
    return d / name


# ------------------------------------------------------------------------------------------------ shared fixtures
# (no conftest.py here: tests/conftest.py is imported as the module ``conftest`` by the other test files)
_SERVER: ForkServer | None = None
_MODELS: dict[str, Path] = {}


def server(tmp_root: Path) -> ForkServer:
    """One fork server per pytest process (closed at exit)."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        import atexit

        _SERVER = ForkServer(tmp_root / "forkserver")
        atexit.register(_SERVER.close)
    return _SERVER


def module_root(name: str):
    """A module-scoped ``root`` fixture (``root = module_root("x")``): the module's temp folder, shared by its fork
    server and cached models."""
    import pytest

    @pytest.fixture(scope="module")
    def root(tmp_path_factory):
        return tmp_path_factory.mktemp(name)
    return root


def opt_args(opts: dict) -> list[str]:
    """``--opt key=value`` arguments, one pair per entry of ``opts``."""
    return [a for k, v in opts.items() for a in ("--opt", f"{k}={v}")]


def cached_model(tmp_root: Path, name: str, build) -> Path:
    """Build a model directory once per pytest process."""
    if name not in _MODELS or not _MODELS[name].exists():
        _MODELS[name] = build(tmp_root / "models" / name)
    return _MODELS[name]
