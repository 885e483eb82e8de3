"""Blockwise float64 numerics shared by scorers, calibration statistics and surgery (no project imports).

Everything that reduces a weight matrix or an activation batch per channel does it in float64 one block of
lines at a time, so the transient memory is a block (about ``BLOCK_ELEMS`` elements), never a float64 copy of the
whole matrix, and every channel still sees exactly the reduction it would see on the whole matrix.
"""
from __future__ import annotations

import torch

BLOCK_ELEMS = 1 << 20   # elements per float64 working block (8 MB): the transient memory of blockwise scoring


def block_len(n_other: int, elems: int = BLOCK_ELEMS) -> int:
    """Lines (rows or columns) per block when each line has ``n_other`` elements:
    ``16 · max(1, ⌊elems / (16 · n_other)⌋)`` (a multiple of 16, about ``elems`` elements per block)."""
    return max(16, elems // max(n_other, 1) // 16 * 16)


def per_channel(w: torch.Tensor, fn, dim: int) -> torch.Tensor:
    """A per-channel reduction of a weight matrix in float64 without a float64 copy of the whole matrix:
    ``dim=1`` (input columns j) → ``cat_J fn(W[:, J].double())``, ``dim=0`` (output rows i) →
    ``cat_I fn(W[I, :].double())``, over blocks J (I) of :func:`block_len` lines. ``fn`` maps a float64 block
    (which it may modify in place) to one value per line of it, reducing over the *whole* other dimension — so
    every channel sees exactly the reduction it would see on the whole matrix (e.g. ``fn = lambda b:
    b.abs_().mean(0)`` gives ``mean_i |W_ij|``). The result is float64 on W's device; W is never written."""
    w = w.detach()
    n = w.shape[dim]
    step = block_len(w.shape[1 - dim])
    # the result is allocated up front: a small tensor kept per block would sit in the freed block's place and
    # push the next block to fresh heap (glibc), growing the resident memory block after block
    out = torch.empty(n, dtype=torch.float64, device=w.device)
    for a in range(0, n, step):
        blk = (w[:, a:a + step] if dim == 1 else w[a:a + step]).to(torch.float64, copy=True)
        out[a:a + step] = fn(blk)
        del blk
    return out
