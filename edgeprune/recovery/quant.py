"""Frozen base weights held quantized during tuning (QLoRA-style, CPU-only, no bitsandbytes).

Recipe: each frozen ``nn.Linear`` weight ``W [out, in]`` is cut into groups of ``group`` input channels (the last
group zero-padded) and stored as symmetric integers with one fp32 scale per (row, group)::

    s = max|W_g| / qmax   (qmax = 127 for int8, 7 for int4)      q = clamp(round(W_g / s), -qmax, qmax)

int8 keeps one ``int8`` per weight; int4 packs two 4-bit values into one ``uint8``. The forward pass dequantizes on
the fly inside a custom autograd function that saves only the packed integers (never the fp32 weight), so the
backward pass recomputes ``deq(W)`` to form ``grad_x = grad_y · deq(W)``. The base weight gets no gradient.

``QuantLinear`` subclasses ``nn.Linear`` so that peft wraps it with its ordinary LoRA ``Linear``; its ``weight``
is an integer buffer, which makes peft keep the adapters in fp32. LoRA updates of groups that are finished are kept
as frozen low-rank factors (``deltas``) — they cannot be merged into the integers without re-quantization error;
the final output merges every delta into the *original* full-precision weights reloaded from disk.
"""
from __future__ import annotations

import torch
from torch import nn

QMAX = {"int8": 127, "int4": 7}


def quantize_weight(w: torch.Tensor, bits: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    ng = -(-in_f // group)
    wp = torch.zeros(out_f, ng * group, dtype=torch.float32)
    wp[:, :in_f] = w.float()
    wp = wp.view(out_f, ng, group)
    scale = (wp.abs().amax(-1, keepdim=True) / QMAX[bits]).clamp_min(1e-12)
    q = torch.round(wp / scale).clamp_(-QMAX[bits], QMAX[bits]).to(torch.int8)
    if bits == "int4":  # two's-complement nibbles, packed pairwise along the group
        u = (q & 0xF).to(torch.uint8).view(out_f, ng, group // 2, 2)
        q = u[..., 0] | (u[..., 1] << 4)
    return q.contiguous(), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: str, in_f: int) -> torch.Tensor:
    if bits == "int4":
        lo, hi = (q & 0xF).to(torch.int8), (q >> 4).to(torch.int8)
        q = torch.stack([lo, hi], -1).flatten(-2)
        q = torch.where(q > 7, q - 16, q)
    w = q.to(scale.dtype) * scale
    return w.flatten(1)[:, :in_f]


class _QMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bits, in_f):
        ctx.save_for_backward(q, scale)
        ctx.bits, ctx.in_f = bits, in_f
        return x @ dequantize_weight(q, scale, bits, in_f).to(x.dtype).t()

    @staticmethod
    def backward(ctx, g):
        q, scale = ctx.saved_tensors
        gx = g @ dequantize_weight(q, scale, ctx.bits, ctx.in_f).to(g.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None


class QuantLinear(nn.Linear):
    """A frozen Linear whose weight is stored as int8/int4 + per-group scales, plus frozen LoRA deltas."""

    def __init__(self, lin: nn.Linear, bits: str, group: int = 64):
        nn.Module.__init__(self)
        if bits not in QMAX:
            raise ValueError(bits)
        group = min(group, lin.in_features + lin.in_features % 2)
        group += group % 2
        self.in_features, self.out_features, self.bits, self.group = lin.in_features, lin.out_features, bits, group
        q, s = quantize_weight(lin.weight.data, bits, group)
        self.register_buffer("weight", q)
        self.register_buffer("scale", s)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        self.deltas: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (A [r,in], B [out,r], scaling)

    def dequantized(self) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scale, self.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QMatmul.apply(x, self.weight, self.scale, self.bits, self.in_features)
        for a, b, s in self.deltas:
            y = y + (x @ a.t() @ b.t()) * s
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.bits}, group={self.group}, deltas={len(self.deltas)}"


def quantize_linears(model, names: list[str], bits: str, group: int = 64) -> None:
    """Replace the named ``nn.Linear`` modules of ``model`` by :class:`QuantLinear` in place."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, QuantLinear(getattr(parent, attr), bits, group))
