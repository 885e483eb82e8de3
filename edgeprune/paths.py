"""Where the shared data lives, and atomic output directories.

The shared folder (datasets, reference model) is found at ``$EDGEPRUNE_SHARED`` or, failing that, at ``../shared``
relative to the repository root or the current directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EdgepruneError

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    env = os.environ.get("EDGEPRUNE_SHARED")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    for c in candidates:
        if (c / "data").is_dir():
            return c.resolve()
    raise EdgepruneError(
        f"shared data folder not found (looked at {', '.join(str(c) for c in candidates)}); "
        "set EDGEPRUNE_SHARED to the folder holding data/ and models/"
    )


def data_dir() -> Path:
    return Path(os.environ.get("EDGEPRUNE_DATA", shared_dir() / "data"))


def reference_model_dir() -> Path:
    return shared_dir() / "models" / "ref-llama-8m"


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output path that would clobber user data or sit inside an input model."""
    out = Path(out).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp or inp in out.parents:
            raise EdgepruneError(f"--out {out} is inside the input {inp}; choose an output path outside the input model")
    if out.exists():
        if out.is_file():
            raise EdgepruneError(f"--out {out} is an existing file; pass a directory path")
        if any(out.iterdir()) and not overwrite:
            raise EdgepruneError(f"--out {out} exists and is not empty; pass --overwrite or choose another path")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = True):
    """Yield a temporary sibling directory; on success rename it to ``out`` (replacing it), on failure remove it.

    An interrupted write therefore leaves either the previous ``out`` or nothing, never a half-written one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EdgepruneError(f"{out} exists; pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(out: str | Path):
    """Yield a temporary sibling file path; rename it to ``out`` when the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
