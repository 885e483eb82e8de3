"""Where computation runs and what it costs in memory: device resolution and placement, the process's peak RSS,
available RAM, and handing freed heap memory back to the OS. One home for each of these helpers."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from .errors import EdgepruneError


def resolve_device(device: str | None) -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (CUDA when visible) -> a torch device; refuses a CUDA device
    that is not there."""
    if device in (None, "", "cpu"):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgepruneError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


def place(model, device: str = "cpu", device_map: str | None = None):
    """Put the model on ``device`` (cpu | cuda | auto) or spread it with accelerate's ``device_map``."""
    if device_map:
        if not torch.cuda.is_available():
            return model   # nothing to spread over: stay on the CPU
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = [type(model.model.layers[0]).__name__]
        dm = infer_auto_device_map(model, no_split_module_classes=no_split) if device_map == "auto" else \
            json.loads(device_map)
        return dispatch_model(model, device_map=dm)
    dev = resolve_device(device)
    return model if dev.type == "cpu" else model.to(dev)


def to_cpu(model) -> None:
    """Move a (possibly accelerate-dispatched) model back to the CPU, removing accelerate's hooks."""
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    model.to("cpu")


def on_cpu(model) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def peak_rss_mb() -> float:
    """Peak RSS of this process image in MiB: ``VmHWM`` (reset by exec; ``ru_maxrss`` is not, so a child forked
    from a big parent would report the parent's peak), ``ru_maxrss`` where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mem_available() -> int:
    """Bytes of RAM available to a new allocation (``MemAvailable``; psutil elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed mid-size blocks, which would grow the RSS layer
    after layer); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
