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
    check_writable(out)
    return out


def check_output_file(out: str | Path, inputs: tuple[str | Path, ...] = (), flag: str = "--out") -> Path:
    """Refuse a single-file output (GGUF, JSON) that is a folder, sits inside an input model, or cannot be written."""
    out = Path(out).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if inp in out.parents:
            raise EdgepruneError(f"{flag} {out} is inside the input {inp}; choose an output path outside the input model")
    if out.is_dir():
        raise EdgepruneError(f"{flag} {out} is a folder; pass a file path")
    check_writable(out, flag)
    return out


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(out: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output whose folder cannot be created or written (read-only disk, no
    permission, a file where a folder should be)."""
    out = Path(out).resolve()
    anc = _nearest_existing(out.parent)
    if not anc.is_dir():
        raise EdgepruneError(f"{flag} {out}: {anc} is a file, not a folder; choose an output path under a folder")
    for d in (anc, out) if out.is_dir() else (anc,):
        if not os.access(d, os.W_OK | os.X_OK):
            raise EdgepruneError(f"{flag} {out}: cannot write in {d} (read-only file system or no permission); "
                                 "choose a writable location or fix the folder's permissions")


def _make_parents(p: Path) -> list[Path]:
    """mkdir -p ``p``; returns the folders it created (deepest first) so a failed write can remove them again."""
    made = []
    q = p
    while not q.exists() and q != q.parent:
        made.append(q)
        q = q.parent
    p.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def remove_stale_temps(folder: str | Path) -> list[str]:
    """Delete temp siblings (``.NAME.tmp-*``, ``.NAME.old-*``) that a killed writer left in ``folder``. Only call this
    while holding the folder's lock (no live writer can own them)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        if f.name.startswith(".") and (".tmp-" in f.name or ".old-" in f.name):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)
            removed.append(f.name)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = True):
    """Yield a temporary sibling directory; on success rename it to ``out`` (replacing it), on failure remove it.

    An interrupted write therefore leaves either the previous ``out`` or nothing, never a half-written one.
    """
    out = Path(out)
    made = _make_parents(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        _name_target(e, out)
        raise
    os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp makes 0700; a finished output gets the usual mode
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
    made = _make_parents(out.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except BaseException:
        _remove_empty(made)
        raise
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; a finished artifact gets the usual mode
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        _name_target(e, out)
        raise


def _name_target(e: BaseException, out: Path) -> None:
    """A failed write that does not say which file (numpy's tofile, a full disk) names the artifact being written."""
    if isinstance(e, OSError) and not e.filename:
        try:
            e.filename = str(out)
        except (AttributeError, TypeError):
            pass


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
