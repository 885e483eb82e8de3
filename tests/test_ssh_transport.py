"""``edgeprune validate --transport ssh:USER@HOST:PORT`` end to end against a real SSH server on 127.0.0.1.

The server is asyncssh (SSH with key authentication, exec channels run by /bin/sh, the classic scp protocol) with
its "device" in a temporary folder; the client side is the real OpenSSH ``ssh``/``scp`` that edgeprune calls. No
traffic leaves 127.0.0.1. Failure modes: key refused, host unreachable, no space on the device (the server's file
writes fail with ENOSPC past a quota, as a full filesystem's do), no llama.cpp runtime on the device. Every case
must leave the device folder empty."""
from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from conftest import run_cli

asyncssh = pytest.importorskip("asyncssh")
if not (shutil.which("ssh") and shutil.which("scp")):
    pytest.skip("OpenSSH ssh/scp clients not installed", allow_module_level=True)

DEVICE = {"path": os.environ.get("PATH", ""), "quota": None}   # what the fake device offers (changed per test)


class QuotaSFTP(asyncssh.SFTPServer):
    """The device's file system: real files, but writes past DEVICE['quota'] bytes fail with ENOSPC."""

    written = 0

    def write(self, file_obj, offset, data):
        q = DEVICE["quota"]
        if q is not None:
            QuotaSFTP.written += len(data)
            if QuotaSFTP.written > q:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(file_obj, offset, data)


async def _exec(process):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = DEVICE["path"]
    proc = await asyncio.create_subprocess_shell(process.command or "true", stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    process.stdout.write(out.decode(errors="replace"))
    process.stderr.write(err.decode(errors="replace"))
    process.exit(proc.returncode)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssh")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client, stranger = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    client.write_private_key(str(tmp / "id_ok"))
    stranger.write_private_key(str(tmp / "id_stranger"))
    for k in ("id_ok", "id_stranger"):
        (tmp / k).chmod(0o600)                     # ssh ignores a private key others can read
    (tmp / "authorized_keys").write_bytes(client.export_public_key())
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box = {}

    async def start():
        box["srv"] = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
            authorized_client_keys=str(tmp / "authorized_keys"), process_factory=_exec, sftp_factory=QuotaSFTP,
            allow_scp=True)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(30)
    port = box["srv"].sockets[0].getsockname()[1]
    (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    yield {"port": port, "tmp": tmp}
    loop.call_soon_threadsafe(box["srv"].close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    import exporters
    from export_helpers import make_model

    tmp = tmp_path_factory.mktemp("art")
    _, d = make_model(tmp, "m", "gqa")
    exporters.export(d, "gguf", tmp / "m.gguf", quant="f16")
    return tmp / "m.gguf"


def _validate(server, art, device, key="id_ok", port=None):
    return run_cli("validate", art, "--transport", f"ssh:edge@127.0.0.1:{port or server['port']}", "--device-dir",
                   device, "--ssh-key", server["tmp"] / key, "--ssh-known-hosts", server["tmp"] / "known_hosts",
                   "--threads", "1")


def _one_line(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-1500:]
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture
def device(tmp_path):
    DEVICE.update(path=os.environ.get("PATH", ""), quota=None)
    QuotaSFTP.written = 0
    d = tmp_path / "device"
    d.mkdir()
    yield d
    assert list(d.iterdir()) == [], "files left on the device"


def test_measures_on_the_device_and_leaves_nothing(server, gguf, device):
    pytest.importorskip("llama_cpp")
    DEVICE["path"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"   # python3 with llama-cpp-python, no llama-bench
    import json

    r = _validate(server, gguf, device)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["transport"] == "ssh" and res["decode_tps"] > 0 and res["prefill_tps"] > 0 and res["peak_rss_mb"] > 0
    assert "llama-cpp-python" in res["basis"]


def test_refused_key(server, gguf, device):
    _one_line(_validate(server, gguf, device, key="id_stranger"), "refused the key", "--ssh-key")


def test_unreachable_host(server, gguf, device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    _one_line(_validate(server, gguf, device, port=free), "cannot reach", f"127.0.0.1:{free}")


def test_no_space_on_device(server, gguf, device):
    DEVICE["path"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    DEVICE["quota"] = 4096
    pytest.importorskip("llama_cpp")
    _one_line(_validate(server, gguf, device), "no space", "--device-dir")


def test_no_runtime_on_device(server, gguf, device):
    DEVICE["path"] = "/usr/bin:/bin"
    r = _validate(server, gguf, device)
    if r.returncode == 0:
        pytest.skip("the system python3 has llama-cpp-python: cannot simulate a device without a runtime")
    _one_line(r, "no llama.cpp runtime", "llama-bench", "pip install llama-cpp-python")
