"""Layer streaming: prune (and evaluate) a model larger than memory, one decoder layer at a time.

``edgeprune prune --stream`` (and automatically when the checkpoint's weights exceed ``AUTO_FRACTION`` × the
available RAM, :func:`~edgeprune.checkpoint.should_stream`) runs the engine (:mod:`edgeprune.engine`) with the
``checkpoint`` layer source and the ``shards`` sink (:mod:`edgeprune.layer_io`): layers are read one at a time
from the safetensors (``pread``, no memory map), calibrated, scored, pruned and written as their own shard.

Peak memory ≈ embeddings (+ head for block-loss methods) + one layer + the calibration activations
``[N, L, H]`` + one layer's forward. Nothing else scales with a weight matrix: scorers and the statistics hooks
reduce in float64 one block of rows/columns at a time (:func:`edgeprune.numerics.per_channel`, ≈ 8 MB blocks),
and surgery swaps in one kept matrix at a time before the pruned layer is written; freed heap memory is handed
back to the OS (:func:`edgeprune.procmem.trim`) after each layer's forward, scoring and write.

Options: ``stream_propagate`` — ``dense`` (default: what the in-memory path does, so layer-scope methods give
bit-identical results) or ``pruned`` (sequential: later layers are calibrated on the pruned layers' outputs);
``stream_dtype`` — ``auto`` (the checkpoint's dtype) | fp32 | bf16 | fp16. Methods with a model-level loss run
block-locally (docs/methods.md, "Streaming"). ``self-pruner`` needs whole-model fitness evaluations and is refused.

This module keeps the streamed forward (:func:`streamed_perplexity`) and the public names of the checkpoint
reader/writer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checkpoint import AUTO_FRACTION, Checkpoint, ShardWriter, should_stream  # noqa: F401  (public names)
from .device import resolve_device


@torch.no_grad()
def streamed_perplexity(model_path, ids: torch.Tensor, seq_len: int = 128, max_chunks: int | None = None,
                        batch_size: int = 8, dtype: str | torch.dtype | None = None, device: str = "cpu",
                        progress: bool = False) -> float:
    """:func:`edgeprune.evaluate.perplexity_ids` (same chunks, same formula) with one decoder layer in memory at a
    time: embeddings → every layer over all chunks → final norm + head. Works on dense and pruned (sharded)
    checkpoints; ``ids`` may be 1-D (cut into chunks) or [N, seq_len] rows."""
    from .engine import forward
    from .layer_io import CheckpointSource
    from .models import DTYPES

    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in DTYPES.items()}[dtype]
    dev = resolve_device(device)
    if ids.dim() == 1:
        from .evaluate import chunk_ids

        chunks = chunk_ids(ids, seq_len, max_chunks)
    else:
        chunks = ids[:max_chunks] if max_chunks else ids
    source = CheckpointSource(model_path, dtype or "auto", dev, head=True)
    try:
        hs = forward(source, chunks, batch_size, progress)
        losses = []
        for b, h in zip(range(0, chunks.shape[0], batch_size), hs):
            x = chunks[b:b + batch_size].to(dev)
            logits = source.model.lm_head(source.model.model.norm(h)).float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="none").view(x.shape[0], -1)
            losses.append(nll.mean(1).double().cpu())
    finally:
        source.close()
    return math.exp(torch.cat(losses).mean().item())
