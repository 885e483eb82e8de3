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
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="edgeprune-device-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = "localhost"

    def push(self, local: Path) -> str:
        dst = self.dir / Path(local).name
        shutil.copy2(local, dst) if Path(local).is_file() else shutil.copytree(local, dst, dirs_exist_ok=True)
        return str(dst)

    def run(self, cmd: str, timeout: float = 1800) -> tuple[int, str, str]:
        root = Path(__file__).resolve().parent.parent
        return self._sh(["bash", "-c", f"cd {shlex.quote(str(root))} && {cmd}"], timeout)


class SSHTransport(Transport):
    name = "ssh"

    def __init__(self, host: str, remote_dir: str = "/tmp/edgeprune", port: int = 22):
        self.host, self.remote_dir, self.port, self.device = host, remote_dir, port, host

    def push(self, local: Path) -> str:
        self._sh(["ssh", "-p", str(self.port), self.host, f"mkdir -p {shlex.quote(self.remote_dir)}"], 60)
        rc, _, err = self._sh(["scp", "-P", str(self.port), "-r", str(local), f"{self.host}:{self.remote_dir}/"], 3600)
        if rc:
            raise EdgepruneError(f"scp to {self.host} failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
        return f"{self.remote_dir}/{Path(local).name}"

    def run(self, cmd: str, timeout: float = 1800):
        return self._sh(["ssh", "-p", str(self.port), self.host, cmd], timeout)


class ADBTransport(Transport):
    name = "adb"

    def __init__(self, serial: str | None = None, remote_dir: str = "/data/local/tmp/edgeprune"):
        self.serial, self.remote_dir, self.device = serial, remote_dir, serial or "adb-default"

    def _adb(self) -> list[str]:
        return ["adb"] + (["-s", self.serial] if self.serial else [])

    def push(self, local: Path) -> str:
        self._sh(self._adb() + ["shell", f"mkdir -p {self.remote_dir}"], 60)
        rc, _, err = self._sh(self._adb() + ["push", str(local), f"{self.remote_dir}/"], 3600)
        if rc:
            raise EdgepruneError(f"adb push failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
        return f"{self.remote_dir}/{Path(local).name}"

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
    """Push ``artifact`` and benchmark it on the device; returns measured tokens/s and peak RSS."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise EdgepruneError(f"artifact {artifact} does not exist; export it first (edgeprune export)")
    remote = transport.push(artifact)
    if isinstance(transport, LocalTransport):
        cmd = (f"{shlex.quote(sys.executable)} -m exporters.speed {shlex.quote(remote)} --threads {threads} "
               f"--prompt {prompt} --gen {gen} --repeats 3")
        rc, out, err = transport.run(cmd)
        if rc:
            raise EdgepruneError(f"benchmark failed on {transport.device}: {err.strip().splitlines()[-1] if err else rc}")
        d = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
        return DeviceResult(transport.name, transport.device, d["prefill_tps"], d["decode_tps"], d["peak_rss_mb"], cmd)
    cmd = (f"(command -v /usr/bin/time >/dev/null && /usr/bin/time -v {llama_bench} || {llama_bench}) "
           f"-m {shlex.quote(remote)} -p {prompt} -n {gen} -t {threads} -o json")
    rc, out, err = transport.run(cmd)
    if rc:
        raise EdgepruneError(f"llama-bench failed on {transport.device} (exit {rc}): "
                             f"{err.strip().splitlines()[-1] if err.strip() else 'no output'}; is llama-bench on its PATH?")
    pp, tg = parse_llama_bench(out)
    return DeviceResult(transport.name, transport.device, pp, tg, parse_time_v(err), cmd)
