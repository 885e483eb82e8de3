"""On-device validation: push an artifact to a device, run the runtime's own benchmark there, parse tokens/s and
memory.

A :class:`Transport` knows how to copy a file to the device and run a command on it:

* :class:`LocalTransport` — this machine, in a scratch folder (same steps, used by the tests);
* :class:`SSHTransport` — boards and laptops (``scp`` / ``ssh``; key-based login, no passwords handled here);
* :class:`ADBTransport` — Android phones (``adb push`` / ``adb shell``).

The benchmark command is the runtime's own: llama.cpp's ``llama-bench -m FILE -p P -n N -t T -o json`` (its JSON
lists one record per test, ``n_prompt``/``n_gen`` and ``avg_ts`` tokens/s), wrapped in ``/usr/bin/time -v`` where
available for the peak RSS ("Maximum resident set size (kbytes)"). On the local transport, where no llama-bench
binary is installed, ``python -m exporters.speed`` (the same llama.cpp library, timed the same way) is used and its
JSON parsed instead.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeprune.errors import EdgepruneError


@dataclass
class DeviceResult:
    transport: str
    device: str
    prefill_tps: float | None
    decode_tps: float | None
    peak_rss_mb: float | None
    command: str
    basis: str = "measured on device"

    def to_dict(self) -> dict:
        return asdict(self)


class Transport:
    name = "base"

    def push(self, local: Path) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, cmd: str, timeout: float = 1800) -> tuple[int, str, str]:  # pragma: no cover - interface
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove what :meth:`push` left on this machine (the local scratch folder); called after every validate."""

    def _sh(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise EdgepruneError(f"'{argv[0]}' is not installed on this machine; install it to use the "
                                 f"{self.name} transport") from None
        except subprocess.TimeoutExpired:
            raise EdgepruneError(f"{self.name}: '{' '.join(argv[:3])} ...' timed out after {timeout:.0f} s; check the "
                                 "device connection") from None
        return r.returncode, r.stdout, r.stderr


class LocalTransport(Transport):
    """Runs the same push/run steps on this machine, in a scratch folder."""

    name = "local"

    def __init__(self, workdir: str | Path | None = None):
        self._own = workdir is None   # a scratch folder we made is removed by cleanup(); a given one is kept
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="edgeprune-device-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = "localhost"

    def cleanup(self) -> None:
        if self._own:
            shutil.rmtree(self.dir, ignore_errors=True)

    def push(self, local: Path) -> str:
        dst = self.dir / Path(local).name
        shutil.copy2(local, dst) if Path(local).is_file() else shutil.copytree(local, dst, dirs_exist_ok=True)
        return str(dst)

    def run(self, cmd: str, timeout: float = 1800) -> tuple[int, str, str]:
        root = Path(__file__).resolve().parent.parent
        return self._sh(["bash", "-c", f"cd {shlex.quote(str(root))} && {cmd}"], timeout)


class SSHTransport(Transport):
    """``ssh``/``scp`` with key authentication only (``BatchMode``: never a password prompt). ``key`` and
    ``known_hosts`` pin the identity file and the host-key file (strict checking) instead of ~/.ssh's defaults.
    Files go through ``scp -O`` (the classic protocol, whose errors carry the device's own text such as "No space
    left on device"; OpenSSH >= 8.7 clients)."""

    name = "ssh"

    def __init__(self, host: str, remote_dir: str = "/tmp/edgeprune", port: int = 22, key: str | None = None,
                 known_hosts: str | None = None, connect_timeout: int = 10):
        self.host, self.remote_dir, self.port = host, remote_dir, port
        self.key, self.known_hosts, self.timeout = key, known_hosts, connect_timeout
        self.device = f"{host}:{port}"

    def _opts(self) -> list[str]:
        o = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.timeout}", "-o", "LogLevel=ERROR"]
        if self.key:
            o += ["-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            o += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return o

    def connection_error(self, err: str) -> EdgepruneError | None:
        """One line for ssh's own failures (exit 255), None for the remote command's."""
        text = err.strip()
        last = text.splitlines()[-1] if text else "no output"
        if "Permission denied" in text:
            return EdgepruneError(f"ssh: {self.device} refused the key ({last}); add your public key to the device's "
                                  "~/.ssh/authorized_keys or pass the right one with --ssh-key")
        if "Host key verification failed" in text:
            return EdgepruneError(f"ssh: {self.device}'s host key is unknown or changed; add it to your known_hosts "
                                  "(ssh-keyscan) or pass --ssh-known-hosts")
        for sign in ("Connection refused", "timed out", "No route to host", "Could not resolve", "Network is unreachable",
                     "Connection closed", "Connection reset"):
            if sign in text:
                return EdgepruneError(f"ssh: cannot reach {self.device} ({last}); check the address and port and that "
                                      "the device runs an SSH server")
        return None

    def run(self, cmd: str, timeout: float = 1800):
        rc, out, err = self._sh(["ssh", "-p", str(self.port), *self._opts(), self.host, cmd], timeout)
        if rc == 255 and (e := self.connection_error(err)):
            raise e
        return rc, out, err

    def push(self, local: Path, dest: str | None = None) -> str:
        dest = dest or self.remote_dir
        rc, _, err = self._sh(["scp", "-O", "-q", "-P", str(self.port), *self._opts(), "-r", str(local),
                               f"{self.host}:{dest}/"], 3600)
        if rc:
            if "No space left" in err or "Disk quota" in err:
                raise EdgepruneError(f"no space on {self.device} in {dest} for {Path(local).name} "
                                     f"({_size_mb(Path(local)):.1f} MB); free space there or pick another folder "
                                     "with --device-dir")
            raise self.connection_error(err) or EdgepruneError(
                f"scp to {self.device} failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
        return f"{dest}/{Path(local).name}"


class ADBTransport(Transport):
    name = "adb"

    def __init__(self, serial: str | None = None, remote_dir: str = "/data/local/tmp/edgeprune"):
        self.serial, self.remote_dir, self.device = serial, remote_dir, serial or "adb-default"

    def _adb(self) -> list[str]:
        return ["adb"] + (["-s", self.serial] if self.serial else [])

    def push(self, local: Path, dest: str | None = None) -> str:
        dest = dest or self.remote_dir
        self._sh(self._adb() + ["shell", f"mkdir -p {dest}"], 60)
        rc, _, err = self._sh(self._adb() + ["push", str(local), f"{dest}/"], 3600)
        if rc:
            raise EdgepruneError(f"adb push failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
        return f"{dest}/{Path(local).name}"

    def run(self, cmd: str, timeout: float = 1800):
        return self._sh(self._adb() + ["shell", cmd], timeout)


# ------------------------------------------------------------------------------------------------ parsing
def parse_llama_bench(stdout: str) -> tuple[float | None, float | None]:
    """(prefill tok/s, decode tok/s) from ``llama-bench -o json``: records with n_prompt>0 (pp) or n_gen>0 (tg)."""
    start = stdout.find("[")
    try:
        recs = json.loads(stdout[start:]) if start >= 0 else []
    except json.JSONDecodeError:
        raise EdgepruneError("llama-bench output is not JSON; run it with -o json (llama.cpp b3000 or newer)") from None
    pp = [r["avg_ts"] for r in recs if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
    tg = [r["avg_ts"] for r in recs if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    return (pp[0] if pp else None), (tg[0] if tg else None)


def parse_time_v(stderr: str) -> float | None:
    """Peak RSS in MB from GNU ``time -v`` ("Maximum resident set size (kbytes): N")."""
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stderr)
    return int(m.group(1)) / 1024 if m else None


def validate(artifact: str | Path, transport: Transport, prompt: int = 128, gen: int = 32, threads: int = 4,
             llama_bench: str = "llama-bench") -> DeviceResult:
    """Push ``artifact`` and benchmark it on the device; returns measured tokens/s and peak RSS. On a device
    (ssh, adb): probe for llama-bench (else llama-cpp-python, else one line naming what to install), check free
    space, push into a fresh run folder, and remove it afterwards whatever happens."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise EdgepruneError(f"artifact {artifact} does not exist; export it first (edgeprune export)")
    if isinstance(transport, LocalTransport):
        try:
            return _validate_local(artifact, transport, prompt, gen, threads)
        finally:
            transport.cleanup()   # the scratch copy of the artifact
    return _validate_on_device(artifact, transport, prompt, gen, threads, llama_bench)


def _run_checked(transport: Transport, cmd: str, what: str) -> tuple[str, str]:
    """(stdout, stderr) of ``cmd`` on the device; a non-zero exit raises one line with the last line of stderr."""
    rc, out, err = transport.run(cmd)
    if rc:
        raise EdgepruneError(f"{what} failed on {transport.device} (exit {rc}): "
                             f"{err.strip().splitlines()[-1] if err.strip() else 'no output'}")
    return out, err


def _last_json(out: str) -> dict:
    """The last JSON line of a benchmark's stdout (``exporters.speed`` prints one)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _validate_local(artifact: Path, transport: "LocalTransport", prompt: int, gen: int, threads: int) -> DeviceResult:
    remote = transport.push(artifact)
    cmd = (f"{shlex.quote(sys.executable)} -m exporters.speed {shlex.quote(remote)} --threads {threads} "
           f"--prompt {prompt} --gen {gen} --repeats 3")
    d = _last_json(_run_checked(transport, cmd, "benchmark")[0])
    return DeviceResult(transport.name, transport.device, d["prefill_tps"], d["decode_tps"], d["peak_rss_mb"], cmd)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def probe_runtime(transport: Transport, llama_bench: str = "llama-bench") -> str:
    """Which benchmark the device can run: ``llama-bench`` on its PATH, else Python with llama-cpp-python (then
    edgeprune's own ``exporters.speed`` is pushed and run there). Raises one line naming what to install."""
    q = shlex.quote(llama_bench)
    rc, out, _ = transport.run(f"command -v {q} >/dev/null 2>&1 && echo llama-bench || "
                               "(python3 -c 'import llama_cpp, numpy' >/dev/null 2>&1 && echo python) || echo none", 120)
    found = out.strip().splitlines()[-1] if out.strip() else "none"
    if found not in ("llama-bench", "python"):
        raise EdgepruneError(f"{transport.device} has no llama.cpp runtime: neither {llama_bench} on its PATH nor "
                             "python3 with llama-cpp-python; install llama.cpp (llama-bench) or run "
                             "'pip install llama-cpp-python numpy' on the device")
    return found


def _workdir(transport: Transport) -> tuple[str, bool]:
    """A fresh run folder under the transport's device folder: (path, whether the device folder was created)."""
    base = shlex.quote(transport.remote_dir)
    rc, out, err = transport.run(f"if [ -d {base} ]; then echo old; else mkdir -p {base} && echo new; fi && "
                                 f"mktemp -d {base}/run-XXXXXX", 60)
    lines = out.strip().splitlines()
    if rc or len(lines) < 2:
        raise EdgepruneError(f"cannot create a folder under {transport.remote_dir} on {transport.device} "
                             f"({(err.strip().splitlines() or ['exit ' + str(rc)])[-1]}); pass a writable --device-dir")
    return lines[-1], lines[0] == "new"


def _cleanup(transport: Transport, work: str, created_base: bool) -> None:
    cmd = f"rm -rf {shlex.quote(work)}"
    if created_base:
        cmd += f"; rmdir {shlex.quote(transport.remote_dir)} 2>/dev/null"
    try:
        transport.run(cmd + "; true", 120)
    except EdgepruneError:
        pass


def _check_space(transport: Transport, work: str, need_mb: float) -> None:
    rc, out, _ = transport.run(f"df -Pk {shlex.quote(work)} | tail -1", 60)
    fields = out.split()
    if rc == 0 and len(fields) >= 4 and fields[3].isdigit() and int(fields[3]) / 1024 < need_mb * 1.05:
        raise EdgepruneError(f"no space on {transport.device}: {int(fields[3]) / 1024:.0f} MB free in "
                             f"{transport.remote_dir}, the artifact needs {need_mb:.0f} MB; free space there or pick "
                             "another folder with --device-dir")


SPEED_BUNDLE = {"exporters": ("__init__.py", "runtimes.py", "speed.py"),
                "edgeprune": ("__init__.py", "errors.py", "procmem.py")}   # all torch-free


def _speed_bundle(tmp: Path) -> Path:
    """:data:`SPEED_BUNDLE`: what ``python3 -m exporters.speed`` needs on a device (numpy and the runtime besides)."""
    root = Path(__file__).resolve().parent.parent
    for pkg, files in SPEED_BUNDLE.items():
        (tmp / "bench" / pkg).mkdir(parents=True)
        for f in files:
            shutil.copy2(root / pkg / f, tmp / "bench" / pkg / f)
    return tmp / "bench"


def _validate_on_device(artifact: Path, transport: Transport, prompt: int, gen: int, threads: int,
                        llama_bench: str) -> DeviceResult:
    """Probe the runtime, push into a fresh run folder (after a free-space check), benchmark, and remove
    everything it put on the device, also on failure."""
    kind = probe_runtime(transport, llama_bench)
    work, created = _workdir(transport)
    try:
        _check_space(transport, work, _size_mb(artifact))
        remote = transport.push(artifact, work)
        if kind == "python":
            with tempfile.TemporaryDirectory() as tmp:
                transport.push(_speed_bundle(Path(tmp)), work)
            cmd = (f"cd {shlex.quote(work)}/bench && python3 -m exporters.speed {shlex.quote(remote)} "
                   f"--threads {threads} --prompt {prompt} --gen {gen} --repeats 3")
            d = _last_json(_run_checked(transport, cmd, "benchmark")[0])
            return DeviceResult(transport.name, transport.device, d["prefill_tps"], d["decode_tps"], d["peak_rss_mb"],
                                cmd, basis="measured on device (llama-cpp-python; no llama-bench there)")
        cmd = (f"(command -v /usr/bin/time >/dev/null && /usr/bin/time -v {llama_bench} || {llama_bench}) "
               f"-m {shlex.quote(remote)} -p {prompt} -n {gen} -t {threads} -o json")
        out, err = _run_checked(transport, cmd, "llama-bench")
        pp, tg = parse_llama_bench(out)
        return DeviceResult(transport.name, transport.device, pp, tg, parse_time_v(err), cmd)
    finally:
        _cleanup(transport, work, created)
