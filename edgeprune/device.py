"""Where computation runs: device resolution and placement (the process's memory is :mod:`edgeprune.procmem`)."""
from __future__ import annotations

import json

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
