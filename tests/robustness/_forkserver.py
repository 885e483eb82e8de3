"""A pre-imported edgeprune CLI that forks one real child process per request (used by the robustness suite).

Every case of the suite must run the real CLI in its own process (real file descriptors, exit status, rlimits,
uid), but a fresh ``python -m edgeprune.cli`` costs 5-15 s of imports on a busy 2-core machine. This server imports
torch/transformers/edgeprune once and never runs a tensor op (so forking is safe), then for each JSON request on
stdin forks a child that: redirects fds 1/2 to the given files, applies cwd/env/RLIMIT_FSIZE/uid, runs
``edgeprune.cli.main(argv)`` exactly as ``python -m edgeprune.cli`` would (an uncaught exception prints Python's
traceback and exits 1), and ``_exit``s with its return code. The reply is one JSON line ``{"rc": N}`` (a negative
N: killed by that signal). The server exits when stdin closes.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _preload() -> None:
    import importlib

    for mod in ("torch", "transformers", "transformers.models.llama.modeling_llama", "safetensors.torch", "tokenizers",
                "yaml", "gguf", "numpy", "edgeprune.cli", "edgeprune.models", "edgeprune.data", "edgeprune.prune",
                "edgeprune.pipeline", "edgeprune.planner", "edgeprune.evaluate", "device_profiles", "exporters",
                "exporters.gguf", "exporters.verify", "edgeprune.recovery.cli"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001  (an optional module: the child reports the real error)
            pass


def _child(req: dict) -> None:
    fd_out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fd_err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    os.close(fd_out)
    os.close(fd_err)
    os.setsid()
    if req.get("cwd"):
        os.chdir(req["cwd"])
    for k, v in (req.get("env") or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if req.get("fsize") is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    if req.get("uid") is not None:
        os.setgroups([])
        os.setgid(req["uid"])
        os.setuid(req["uid"])
    import tempfile

    tempfile.tempdir = None   # honour a TMPDIR given in env (the server may have computed its own already)
    if req.get("pidfile"):
        with open(req["pidfile"] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(req["pidfile"] + ".tmp", req["pidfile"])
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(req.get("timeout", 300)))
    from edgeprune.cli import main

    try:
        rc = main([str(a) for a in req["argv"]])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc or 0)


def serve() -> None:
    _preload()
    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)
            finally:
                os._exit(120)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc, "pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
