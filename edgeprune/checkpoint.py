"""Safetensors checkpoints one tensor at a time: a lazy reader (:class:`Checkpoint`) and a streaming shard writer
(:class:`ShardWriter`), the two ends of layer streaming (:mod:`edgeprune.engine`'s ``checkpoint`` source and
``shards`` sink).

**Reader**: the safetensors headers (one file or a sharded ``model.safetensors.index.json``) are parsed, and each
tensor is read on demand with ``pread`` into its own buffer. No file is memory-mapped, so checkpoint pages never
count in the process RSS (a memory map would: touched file pages stay resident in the mapping and show in
``VmHWM``).

**Writer**: ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``; each tensor's bytes
are streamed to the file (no serialisation copy).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .procmem import mem_available
from .errors import EdgepruneError
from .models import read_config, resolve_dir

AUTO_FRACTION = 0.4   # stream when weights > this × MemAvailable (the in-memory path peaks near 2× the weights)
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class Checkpoint:
    """A safetensors checkpoint (single file or sharded with an index) read one tensor at a time with pread."""

    def __init__(self, path: str | Path):
        self.path = resolve_dir(path)
        self.config = read_config(self.path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted({self.path / f for f in json.loads(index.read_text())["weight_map"].values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise EdgepruneError(f"{index} is corrupt; restore the model's safetensors index") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise EdgepruneError(f"{self.path} has no *.safetensors weights; streaming reads safetensors only "
                                 "(convert pytorch_model.bin first, or prune without --stream)")
        self.where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self._fds: dict[Path, int] = {}
        for f in files:
            if not f.is_file():
                raise EdgepruneError(f"{f} is listed in the index but missing; re-download the model")
            self._scan(f)

    def _scan(self, f: Path) -> None:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or 8 + n > size:
                raise EdgepruneError(f"{f} is truncated or not a safetensors file; re-download the weights")
            try:
                hdr = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EdgepruneError(f"{f} has a corrupt safetensors header; re-download the weights") from None
        for k, v in hdr.items():
            if k == "__metadata__":
                continue
            try:
                dt = ST_DTYPES[v["dtype"]]
                b, e = (int(x) for x in v["data_offsets"])
                shape = tuple(int(x) for x in v["shape"])
            except (KeyError, TypeError, ValueError):
                raise EdgepruneError(f"{f}: tensor {k} has an unsupported or corrupt header entry") from None
            if 8 + n + e > size:
                raise EdgepruneError(f"{f} is truncated ({size:,} bytes); re-download the weights")
            self.where[k] = (f, dt, shape, 8 + n + b, 8 + n + e)

    def keys(self) -> list[str]:
        return list(self.where)

    def nbytes(self, prefix: str = "") -> int:
        return sum(e - b for k, (_, _, _, b, e) in self.where.items() if k.startswith(prefix))

    def dtype(self) -> torch.dtype:
        """Storage dtype of the decoder weights (the dtype the in-memory loader gives the model)."""
        for k, (_, dt, *_rest) in self.where.items():
            if ".layers." in k and k.endswith("proj.weight"):
                return dt
        return next(iter(self.where.values()))[1]

    def get(self, name: str) -> torch.Tensor:
        f, dt, shape, b, e = self.where[name]
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(f, os.O_RDONLY)
        buf = bytearray(e - b)
        view, off = memoryview(buf), 0
        while off < len(buf):
            got = os.preadv(fd, [view[off:]], b + off)
            if got <= 0:
                raise EdgepruneError(f"{f}: unexpected end of file reading {name}; re-download the weights")
            off += got
        if not buf:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(buf, dtype=dt).reshape(shape)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        pre = f"model.layers.{i}."
        return {k[len(pre):]: self.get(k) for k in self.where if k.startswith(pre)}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def should_stream(model_path: str | Path, fraction: float = AUTO_FRACTION) -> bool:
    """Whether the checkpoint's weights exceed ``fraction`` × available RAM (False when it is not safetensors)."""
    try:
        ck = Checkpoint(model_path)
    except EdgepruneError:
        return False
    try:
        return ck.nbytes() > fraction * mem_available()
    finally:
        ck.close()


class ShardWriter:
    """Writes safetensors shards (streaming each tensor's bytes) and ``model.safetensors.index.json``."""

    def __init__(self, folder: Path, n_shards: int):
        self.folder, self.n, self.k = Path(folder), n_shards, 0
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> str:
        self.k += 1
        name = f"model-{self.k:05d}-of-{self.n:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        hdr, off = {"__metadata__": {"format": "pt"}}, 0
        for k, v in tensors.items():
            nb = v.numel() * v.element_size()
            hdr[k] = {"dtype": ST_NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(hdr, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.folder / name, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for k, v in tensors.items():
                if v.numel():
                    fh.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
                self.weight_map[k] = name
                self.total += v.numel() * v.element_size()
        return name

    def finish(self) -> None:
        idx = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")


def layer_tensors(layer, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer i's tensors under their checkpoint names, in ``dtype``."""
    return {f"model.layers.{i}.{k}": v.to(dtype) for k, v in layer.state_dict().items()}
