"""Where the engine's layers come from (sources) and where the pruned layers go (sinks).

Sources (:mod:`edgeprune.engine` reads layers only through them):

* :class:`ResidentSource` — the model's own modules (no copy); surgery happens in place.
* :class:`CheckpointSource` — a meta-device skeleton of the model (real embeddings, and the final norm / head
  when a method needs a block loss) whose layer ``i`` is read from the safetensors checkpoint on demand
  (:class:`~edgeprune.checkpoint.Checkpoint`, in the compute dtype, on the compute device) and dropped to the
  meta device once written.

Sinks: :class:`ResidentSink` (the whole model is written at the end with :func:`edgeprune.models.save`) and
:class:`ShardSink` (one safetensors shard per layer, written as soon as the layer is pruned; embeddings first,
final norm + head last; config, tokenizer and report at the end, all inside one atomic temporary directory).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .calibrate import layer0_inputs
from .checkpoint import Checkpoint, ShardWriter, layer_tensors
from .device import to_cpu
from .procmem import map_large_blocks, trim
from .errors import EdgepruneError
from .groups import model_groups
from .models import DTYPES, copy_tokenizer, decoder_layers, meta_model, pruned_config, rebuild_buffers, save
from .paths import atomic_dir


class ResidentSource:
    """Layers of a model in memory (on whatever device it was placed)."""

    streamed = False

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.device = model.get_input_embeddings().weight.device

    def groups(self):
        return model_groups(self.model)

    def inputs(self, ids: torch.Tensor, batch_size: int):
        return layer0_inputs(self.model, ids.to(self.device), batch_size)

    def layer(self, i: int) -> nn.Module:
        return decoder_layers(self.model)[i]

    def drop_embeddings(self) -> None:
        """The resident model keeps its embeddings."""

    def done(self, i: int, layer: nn.Module) -> None:
        """Layer i is final (pruned in place): nothing to release."""

    def prepare_surgery(self) -> None:
        """Surgery (and the allocators' fitness evaluations) run on the CPU."""
        if self.device.type != "cpu":
            to_cpu(self.model)
            self.device = torch.device("cpu")

    def close(self) -> None:
        pass


class CheckpointSource:
    """Layers read one at a time from a safetensors checkpoint (layer streaming)."""

    streamed = True

    def __init__(self, path: str | Path, dtype: str, device: torch.device, head: bool):
        map_large_blocks()   # layer-sized tensors come and go: keep them off the heap so the RSS does not ratchet
        self.ck = Checkpoint(path)
        self.store_dtype = self.ck.dtype()
        if dtype != "auto" and dtype not in DTYPES:
            raise EdgepruneError(f"--opt stream_dtype={dtype}: use auto, fp32, bf16 or fp16")
        self.dtype = self.store_dtype if dtype == "auto" else DTYPES[dtype]
        self.device = device
        self.model, self.config = meta_model(self.ck.config)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        emb = self.model.model.embed_tokens
        emb.load_state_dict({"weight": self._t("model.embed_tokens.weight")}, assign=True)
        if self.tied:
            self.model.lm_head.weight = emb.weight
        self.head_loaded = False
        rebuild_buffers(self.model, self.config)
        if head:
            self.load_head()
        self.model.eval()
        emb.to(device)
        self.model.model.rotary_emb.to(device)

    def _t(self, name: str) -> torch.Tensor:
        return self.ck.get(name).to(self.dtype)

    def load_head(self) -> None:
        m = self.model
        m.model.norm.load_state_dict({"weight": self._t("model.norm.weight")}, assign=True)
        self.head_loaded = True
        if not self.tied:
            m.lm_head.load_state_dict({"weight": self._t("lm_head.weight")}, assign=True)
        m.model.norm.to(self.device)
        m.lm_head.to(self.device)

    def groups(self):
        return model_groups(self.model)

    def inputs(self, ids: torch.Tensor, batch_size: int):
        """Layer-0 inputs of the calibration rows, then the input embeddings are freed (unless tied to the head)."""
        with torch.no_grad():
            out = layer0_inputs(self.model, ids.to(self.device), batch_size)
        self.drop_embeddings()
        return out

    def drop_embeddings(self) -> None:
        if not (self.tied and self.head_loaded):
            self.model.model.embed_tokens.to_empty(device="meta")   # a new (meta) Parameter replaces the old
            if self.tied:                                           # the head still held the old one: re-tie
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
        trim()

    def layer(self, i: int) -> nn.Module:
        """Layer i materialised (dense, from the checkpoint) in the compute dtype on the device."""
        layer = copy.deepcopy(self.model.model.layers[i])
        sd, want = self.ck.layer(i), layer.state_dict()
        for k, t in sd.items():
            if k in want and tuple(want[k].shape) != tuple(t.shape):
                raise EdgepruneError(f"{self.ck.path}: weight model.layers.{i}.{k} has shape {tuple(t.shape)} but "
                                     f"config.json implies {tuple(want[k].shape)}; restore the matching config.json")
        sd = {k: (v if v.dtype == self.dtype else v.to(self.dtype)) for k, v in sd.items()}
        missing, unexpected = layer.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise EdgepruneError(f"{self.ck.path}: layer {i} weights do not match the config (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); the checkpoint is incomplete")
        return layer.to(self.device).eval()

    def prepare_surgery(self) -> None:
        pass

    def done(self, i: int, layer: nn.Module) -> None:
        """Layer i is written: keep only its (pruned) shapes, on the meta device."""
        self.model.model.layers[i] = layer.to("meta")
        trim()

    def close(self) -> None:
        self.ck.close()


class ResidentSink:
    """The pruned model stays in memory; :meth:`finish` saves it (atomically) when ``out`` is given."""

    def __init__(self, out: Path | None, tokenizer_src):
        self.out, self.tokenizer_src = out, tokenizer_src

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin(self) -> None:
        """Nothing is written before the end."""

    def write(self, i: int, layer: nn.Module) -> None:
        pass

    def finish(self, model, provenance: dict, report: str) -> None:
        if self.out is not None:
            save(model, self.out, tokenizer_src=self.tokenizer_src, provenance=provenance, overwrite=True,
                 extra_files={"prune_report.json": report})


class ShardSink:
    """One safetensors shard per layer, written as soon as the layer is final (in the checkpoint's dtype)."""

    def __init__(self, out: Path, source: CheckpointSource, tokenizer_src):
        self.out, self.src, self.tokenizer_src = out, source, tokenizer_src
        self._ctx = atomic_dir(out, overwrite=True)

    def __enter__(self):
        self.tmp = self._ctx.__enter__()
        n = len(self.src.model.model.layers)
        self.writer = ShardWriter(self.tmp, n + 2)
        return self

    def begin(self) -> None:
        """The first shard: the input embeddings. The engine calls this once the source has computed the layer-0
        inputs and freed its own copy, before the first layer is read (written on entry, two copies of the
        embeddings were resident at the streamed peak; written with layer 0, the layer as well)."""
        self.writer.write({"model.embed_tokens.weight": self.src.ck.get("model.embed_tokens.weight")})

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def write(self, i: int, layer: nn.Module) -> None:
        self.writer.write(layer_tensors(layer, i, self.src.store_dtype))

    def finish(self, model, provenance: dict, report: str) -> None:
        ck = self.src.ck
        head = {"model.norm.weight": ck.get("model.norm.weight")}
        if not self.src.tied:
            head["lm_head.weight"] = ck.get("lm_head.weight")
        self.writer.write(head)
        del head
        self.writer.finish()
        d = pruned_config(model, provenance)
        d["torch_dtype"] = str(self.src.store_dtype).replace("torch.", "")
        (self.tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(self.tokenizer_src, self.tmp)
        (self.tmp / "prune_report.json").write_text(report)
