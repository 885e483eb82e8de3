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


MARKER = ".edgeprune-output"
"""File in every folder edgeprune writes (model, ONNX export, run folder): only such a folder may be replaced."""
MARKER_TEXT = "written by edgeprune: its --overwrite may replace this folder\n"

_GUARDED: dict[str, bool] = {}     # absolute output path -> whether it existed when guarded (this process)
_LOCKS: dict[str, tuple] = {}      # absolute output path -> (fd holding its flock, lock file) (this process)


def guard_output(out: str | Path, *, kind: str = "dir", inputs=(), outputs=(), overwrite: bool = False,
                 flag: str = "--out", adopt: bool = False) -> Path:
    """The one check for every path edgeprune writes (``--out``, ``--json``, reports, run folders), before any work.

    Refuses, with one line (exit 2): a path that equals, lies inside, or contains an input (``inputs``) or another
    output of the same command (``outputs``); a symbolic link, FIFO, device or socket at the path (only a regular
    file, or a folder holding :data:`MARKER`, is ever replaced); an existing file/folder without ``overwrite`` (a
    ``--json`` passes ``overwrite=True``: a regular file there is replaced); a non-empty folder edgeprune did not
    write, even with ``overwrite`` (unless ``adopt``: ``run --overwrite`` writes its own files into it and deletes
    none of the user's); an unwritable location. Then takes a per-path lock held until the write commits or the
    process ends, so of two processes writing one path exactly one proceeds, the other exits 2; and removes temp
    siblings (``.NAME.tmp-*``) that a killed earlier writer of this path left. ``kind`` is ``"dir"`` or ``"file"``.
    """
    p = Path(os.path.abspath(os.fspath(out)))
    real = p.resolve()
    for kind_, others in (("input", inputs), ("output", outputs)):
        for o in others:
            what = kind_
            if o is None or str(o) == "":
                continue
            o_real = Path(os.path.abspath(os.fspath(o))).resolve()
            what = "input model" if what == "input" and (o_real / "config.json").is_file() else what
            if real == o_real or o_real in real.parents:
                raise EdgepruneError(f"{flag} {p} is {'the' if real == o_real else 'inside the'} {what} {o}; "
                                     f"choose an output path outside the {what}")
            if real in o_real.parents:
                raise EdgepruneError(f"{flag} {p} contains the {what} {o}; writing it would replace that {what}: "
                                     "choose an output path that does not contain it")
    _check_existing(p, kind, overwrite, flag, adopt)
    check_writable(p, flag)
    _lock_output(p, flag)
    _GUARDED[str(p)] = os.path.lexists(p)
    remove_stale_temps(p.parent, p.name)
    return p


def _check_existing(p: Path, kind: str, overwrite: bool, flag: str, adopt: bool) -> None:
    import stat

    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):   # a file among the parents: check_writable names it
        return
    except OSError as e:
        raise EdgepruneError(f"{flag} {p} cannot be inspected ({e.strerror}); choose another path") from None
    m = st.st_mode
    if stat.S_ISLNK(m):
        raise EdgepruneError(f"{flag} {p} is a symbolic link; edgeprune replaces only regular files and folders it "
                             "wrote: remove the link or choose another path")
    if not (stat.S_ISREG(m) or stat.S_ISDIR(m)):
        what = ("a FIFO" if stat.S_ISFIFO(m) else "a socket" if stat.S_ISSOCK(m) else "a device node"
                if stat.S_ISCHR(m) or stat.S_ISBLK(m) else "not a regular file")
        raise EdgepruneError(f"{flag} {p} is {what}; edgeprune writes only regular files and folders: choose "
                             "another path")
    if kind == "file":
        if stat.S_ISDIR(m):
            raise EdgepruneError(f"{flag} {p} is a folder; pass a file path")
        if not overwrite:
            raise EdgepruneError(f"{flag} {p} exists; pass --overwrite or choose another path")
        return
    if stat.S_ISREG(m):
        raise EdgepruneError(f"{flag} {p} is an existing file; pass a directory path")
    try:
        empty = not any(p.iterdir())
    except OSError as e:
        raise EdgepruneError(f"{flag} {p} cannot be listed ({e.strerror}); choose another path") from None
    if empty:
        return
    if not is_ours(p) and not (adopt and overwrite):
        raise EdgepruneError(f"{flag} {p} exists, is not empty and was not written by edgeprune (no {MARKER}); "
                             "choose another path or empty it (--overwrite replaces only edgeprune's own outputs)")
    if not overwrite:
        raise EdgepruneError(f"{flag} {p} exists and is not empty; pass --overwrite or choose another path")


def is_ours(folder: str | Path) -> bool:
    """Whether ``folder`` holds edgeprune's marker (a folder this tool wrote)."""
    return (Path(folder) / MARKER).is_file()


def mark_ours(folder: str | Path) -> None:
    (Path(folder) / MARKER).write_text(MARKER_TEXT)


def _lock_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"edgeprune-locks-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _lock_output(p: Path, flag: str) -> None:
    """Exclusive ``flock`` on a lock file (under the system temp folder, keyed by the path) for ``p``, held by this
    process until :func:`release_output` (which deletes the file) or exit; the kernel drops it when the process
    dies, even by ``kill -9`` (the file then stays, and the next writer of ``p`` reuses and deletes it)."""
    import hashlib

    key = str(p)
    if key in _LOCKS:
        return
    f = _lock_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
    with _signals_deferred():      # a signal between creating the file and recording it would leave the file
        _take_lock(f, key, p, flag)


def _take_lock(f: Path, key: str, p: Path, flag: str) -> None:
    import fcntl

    for _ in range(50):
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EdgepruneError(f"{flag} {p} is in use by another edgeprune run (pid {pid}), which is writing it; "
                                 f"wait for it to finish or choose another {flag}") from None
        try:   # the holder before us may have deleted the file we locked: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(f).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _LOCKS[key] = (fd, f)
            return
        os.close(fd)
    raise EdgepruneError(f"could not take the lock for {flag} {p}; retry")


def release_output(out: str | Path) -> None:
    """Drop this process's lock on ``out`` (after its write committed or failed) and delete the lock file."""
    key = str(Path(os.path.abspath(os.fspath(out))))
    _GUARDED.pop(key, None)
    with _signals_deferred():           # a signal between forgetting the lock and deleting it would leave the file
        held = _LOCKS.pop(key, None)
        if held is not None:
            fd, f = held
            Path(f).unlink(missing_ok=True)   # while still locked: a waiting opener re-checks the inode
            os.close(fd)


def release_all_outputs() -> None:
    """Every lock this process holds (the CLI calls this on its way out, whatever the outcome)."""
    for key in list(_LOCKS):
        release_output(key)


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = (), **kw) -> Path:
    """:func:`guard_output` for a folder output."""
    return guard_output(out, kind="dir", inputs=inputs, overwrite=overwrite, **kw)


def check_output_file(out: str | Path, inputs: tuple[str | Path, ...] = (), flag: str = "--out",
                      overwrite: bool = True, **kw) -> Path:
    """:func:`guard_output` for a single-file output (GGUF, JSON); a regular file there is replaced."""
    return guard_output(out, kind="file", inputs=inputs, overwrite=overwrite, flag=flag, **kw)


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


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[str]:
    """Delete temp siblings (``.NAME.tmp-*``, ``.NAME.old-*``) that a killed writer left in ``folder``; with
    ``name``, only those of that one output. Only call this while holding the lock of the folder (or of that
    output): no live writer can own them then."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    mine = (f".{name}.tmp-", f".{name}.old-", f"..{name}.tmp-") if name else None
    for f in folder.iterdir():
        if (f.name.startswith(mine) if mine else
                f.name.startswith(".") and (".tmp-" in f.name or ".old-" in f.name)):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)
            removed.append(f.name)
    return removed


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` at that instant (``renameat2(RENAME_NOREPLACE)``);
    raises :class:`FileExistsError` otherwise. Falls back to link+unlink (files) or a checked rename (folders:
    ``rename`` onto a non-empty folder fails by itself) where the system call is missing."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        AT_FDCWD, RENAME_NOREPLACE = -100, 1
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


@contextlib.contextmanager
def _signals_deferred():
    """SIGTERM/SIGHUP/SIGINT held back for the few renames of a commit (delivered right after), so a signal never
    leaves the old output moved aside and the new one not yet in place."""
    import signal

    sigs = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    with _signals_deferred():
        _commit_now(tmp, out, overwrite)


def _commit_now(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``. If nothing was at ``out`` when it was guarded, the move must not
    replace anything (another writer got there first: this result is discarded, exit 2)."""
    existed = _GUARDED.get(str(Path(os.path.abspath(out))))
    if existed is None:
        existed = os.path.lexists(out)
    if not existed or not os.path.lexists(out):
        try:
            _rename_noreplace(tmp, out)
            return
        except FileExistsError:
            raise EdgepruneError(f"{out} was written by another process while this one was working; this result "
                                 "was discarded (the other one was kept): choose another path or re-run") from None
    if not overwrite:
        raise EdgepruneError(f"{out} exists; pass --overwrite")
    if tmp.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = True):
    """Yield a temporary sibling directory; on success rename it to ``out`` (replacing it), on failure remove it.

    An interrupted write therefore leaves either the previous ``out`` or nothing, never a half-written one. The
    folder gets edgeprune's :data:`MARKER`; the rename follows :func:`_commit` (no-replace for a new path).
    """
    out = Path(out)
    made = _make_parents(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except BaseException:
        _remove_empty(made)
        release_output(out)
        raise
    try:
        yield tmp
        mark_ours(tmp)
        os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp makes 0700; a finished output gets the usual mode
        _commit(tmp, out, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        _name_target(e, out)
        raise
    finally:
        release_output(out)


@contextlib.contextmanager
def atomic_file(out: str | Path):
    """Yield a temporary sibling file path; rename it to ``out`` when the block succeeds (see :func:`_commit`)."""
    out = Path(out)
    made = _make_parents(out.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except BaseException:
        _remove_empty(made)
        release_output(out)
        raise
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; a finished artifact gets the usual mode
        _commit(tmp, out, overwrite=True)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        _name_target(e, out)
        raise
    finally:
        release_output(out)


def replace_text(f: str | Path, text: str) -> Path:
    """Write ``text`` to ``f`` through a hidden temp sibling and an atomic replace (last writer wins: for caches,
    not outputs). Whatever interrupts the write removes the sibling; readers see the old text or the new."""
    f = Path(f)
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        with _signals_deferred():
            os.replace(tmp, f)
    finally:
        tmp.unlink(missing_ok=True)
    return f


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


def json_text(obj, **kw) -> str:
    """``obj`` as strict JSON text (one home for every JSON edgeprune writes): NaN and ±Inf floats, which
    ``json.dumps`` would write as bare ``NaN``/``Infinity`` (not JSON), become ``null``."""
    import json
    import math

    def fin(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: fin(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fin(v) for v in x]
        return x

    kw.setdefault("indent", 2)
    kw.setdefault("default", str)
    return json.dumps(fin(obj), allow_nan=False, **kw) + "\n"
