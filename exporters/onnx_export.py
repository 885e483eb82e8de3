"""ONNX export of a decoder with a per-layer KV cache (one graph for prefill and decode).

Inputs / outputs use optimum's decoder names, so the graph looks like an optimum ``text-generation-with-past``
export except that every layer has its own KV-head count:

    input_ids [B,S] int64, attention_mask [B,P+S] int64, position_ids [B,S] int64,
    past_key_values.{i}.key / .value [B, kv_i, P, hd]   ->   logits [B,S,V], present.{i}.key / .value [B, kv_i, P+S, hd]

Empty pasts (P = 0) serve the prefill. Export is ``torch.onnx.export(dynamo=True)`` at opset 20 (feasibility Q4:
optimum's exporter builds its dummy past from the config's single ``num_key_value_heads`` and fails on per-layer
models; the legacy exporter breaks on transformers 4.57's vmap masks). ``dynamic_shapes`` must list the inputs in
``forward`` order (else ``_rename_dynamic_axes`` raises IndexError). Weights go to ``model.onnx_data`` when the
model is over 2 GB (protobuf's limit). fp16: the fp32 graph converted by onnxruntime's float16 tool with fp32
I/O kept. int8: ``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 MatMul weights).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgepruneError

OPSET = 20
TWO_GB = 2 * 1024 ** 3


@dataclass
class OnnxSummary:
    path: str
    dtype: str
    quant: str | None
    file_mb: float
    n_layers: int
    kv_heads: list[int]
    external_data: bool
    opset: int
    export_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class KVWrapper(nn.Module):
    """Explicit per-layer past in, logits and per-layer presents out (a DynamicCache is rebuilt inside)."""

    def __init__(self, model):
        super().__init__()
        self.m = model
        self.L = len(model.model.layers)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.L):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True)
        pkv = out.past_key_values
        pres = []
        for i in range(self.L):
            if isinstance(self.m.model.layers[i].self_attn, NoAttention):
                pres += [past[2 * i], past[2 * i + 1]]
                continue
            layer = pkv.layers[i]
            pres += [layer.keys, layer.values]
        return (out.logits, *pres)


class NoAttention(nn.Module):
    """Stand-in for a layer whose attention heads were all pruned: HF's o_proj of width 0 outputs just its bias
    (or zero). Exporting the real module would emit Reshape(-1) on an empty tensor, which ORT rejects. The layer's
    (empty, [B, 0, P, hd]) past is passed through unchanged."""

    def __init__(self, attn: nn.Module, hidden: int):
        super().__init__()
        self.inner = attn
        self.bias = attn.o_proj.bias
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states * 0
        return (out + self.bias if self.bias is not None else out), None


def io_names(L: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(L):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def _example(model, b: int = 2, s: int = 5, p: int = 7):
    from edgeprune.models import head_dim

    hd = head_dim(model)
    dt = next(model.parameters()).dtype
    ids = torch.randint(0, model.config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = []
    for layer in model.model.layers:
        kv = layer.self_attn.k_proj.out_features // hd
        past += [torch.randn(b, kv, p, hd, dtype=dt), torch.randn(b, kv, p, hd, dtype=dt)]
    return ids, mask, pos, past


def _param_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def export_decoder(model, out_file: Path, external: bool | None = None) -> bool:
    """Write the fp32 graph of ``model`` to ``out_file``; returns whether external data was used."""
    from torch.export import Dim

    model = model.float().eval()
    model.config.use_cache = True
    if getattr(model.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        model.config._attn_implementation = "sdpa"
    L = len(model.model.layers)
    ids, mask, pos, past = _example(model)
    empty = [i for i, layer in enumerate(model.model.layers) if layer.self_attn.q_proj.out_features == 0]
    for i in empty:
        model.model.layers[i].self_attn = NoAttention(model.model.layers[i].self_attn, model.config.hidden_size)
    w = KVWrapper(model).eval()
    b, s, p = Dim("batch"), Dim("seq"), Dim("past")
    dyn = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: Dim.AUTO}, "position_ids": {0: b, 1: s},
           "past": [{0: b, 2: p} for _ in range(2 * L)]}
    ins, outs = io_names(L)
    external = _param_bytes(model) > TWO_GB * 0.9 if external is None else external
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(w, (ids, mask, pos, past), dynamo=True, dynamic_shapes=dyn, opset_version=OPSET,
                                 input_names=ins, output_names=outs, verbose=False, optimize=True)
    for i in empty:
        model.model.layers[i].self_attn = model.model.layers[i].self_attn.inner
    prog.save(str(out_file), external_data=external)
    if external:   # the dynamo exporter names the data file <model>.onnx.data; optimum expects model.onnx_data
        data = out_file.with_name(out_file.name + ".data")
        if data.is_file():
            _rename_external(out_file, data, out_file.with_name("model.onnx_data"))
    return external


def _rename_external(model_file: Path, old: Path, new: Path) -> None:
    import onnx

    m = onnx.load(str(model_file), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value == old.name:
                e.value = new.name
    old.rename(new)
    onnx.save(m, str(model_file))


def to_fp16(src: Path, dst: Path, external: bool) -> None:
    """Weights and compute in fp16; inputs/outputs stay fp32 (Cast nodes at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    m16 = convert_float_to_float16(m, keep_io_types=True, disable_shape_infer=external)
    onnx.save(m16, str(dst), save_as_external_data=external, location="model.onnx_data" if external else None)


def to_int8(src: Path, dst: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=external)


def export_onnx(model_dir: str | Path, out: str | Path, dtype: str = "fp32", quant: str | None = None,
                external: bool | None = None, target: str = "edgeprune",
                max_context: int | None = None) -> OnnxSummary:
    """model dir -> ONNX directory ``out`` (model.onnx [+ model.onnx_data], config.json for optimum,
    genai_config.json for onnxruntime-genai, tokenizer files, edgeprune_onnx.json describing the
    I/O). ``target`` optimum refuses per-layer KV heads, which it cannot load (see :mod:`.onnx_runtimes`).
    What the traced graph cannot compute is refused first (:mod:`exporters.features`)."""
    import shutil

    from edgeprune.models import copy_tokenizer, head_dim, layer_shapes, load, pruned_config
    from edgeprune.paths import atomic_dir

    from .features import check_dir
    from .onnx_runtimes import check_target, genai_config, optimum_config

    accepted = check_dir(model_dir, "onnx", max_context)

    if dtype not in ("fp32", "fp16"):
        raise EdgepruneError(f"ONNX dtype '{dtype}' unknown; use fp32 or fp16")
    if quant not in (None, "none", "int8"):
        raise EdgepruneError(f"ONNX quant '{quant}' unknown; use int8 (dynamic, onnxruntime) or leave it out")
    quant = None if quant == "none" else quant
    if quant and dtype == "fp16":
        raise EdgepruneError("int8 ONNX is made from the fp32 graph; pass --dtype fp32 with --quant int8")
    out = Path(out)
    if out.is_file():
        raise EdgepruneError(f"--out {out} is a file; ONNX exports are directories")
    model = load(model_dir, dtype=torch.float32)
    shapes = layer_shapes(model)
    kv, q = [s.num_key_value_heads for s in shapes], [s.num_attention_heads for s in shapes]
    check_target(target, kv)
    t0 = time.time()
    with atomic_dir(out, overwrite=True) as tmp:
        # the f32 graph of an fp16/int8 export lives inside tmp, so whatever interrupts the export removes it too
        work = tmp / ".f32" if (dtype != "fp32" or quant) else tmp
        work.mkdir(exist_ok=True)
        try:
            ext = export_decoder(model, work / "model.onnx", external)
            if dtype == "fp16":
                to_fp16(work / "model.onnx", tmp / "model.onnx", ext)
            elif quant == "int8":
                to_int8(work / "model.onnx", tmp / "model.onnx", ext)
        finally:
            if work != tmp:
                shutil.rmtree(work, ignore_errors=True)
        cfg, notes = optimum_config(pruned_config(model, refuse_plain=False), kv, q, head_dim(model))
        notes = list(accepted.approximations) + list(notes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        genai = genai_config(cfg, kv, q, head_dim(model))
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
        copy_tokenizer(model_dir, tmp)
        ins, outs = io_names(len(shapes))
        meta = {"format": "edgeprune-onnx-decoder", "opset": OPSET, "dtype": dtype, "quant": quant,
                "head_dim": head_dim(model), "kv_heads": [s.num_key_value_heads for s in shapes],
                "inputs": ins, "outputs": outs, "external_data": ext,
                "approximations": accepted.approximations, "max_context": max_context if accepted.approximations else None}
        (tmp / "edgeprune_onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.name in ("model.onnx", "model.onnx_data"))
    return OnnxSummary(str(out), dtype, quant, size / 1e6, len(shapes), kv, ext, OPSET, round(time.time() - t0, 2),
                       notes)


def derive_onnx(src: str | Path, out: str | Path, dtype: str = "fp32", quant: str | None = None) -> OnnxSummary:
    """fp16 or int8 variant of an existing fp32 export directory (no re-export from PyTorch)."""
    import shutil

    from edgeprune.paths import atomic_dir

    src, out = Path(src), Path(out)
    meta = json.loads((src / "edgeprune_onnx.json").read_text())
    if meta["dtype"] != "fp32" or meta["quant"]:
        raise EdgepruneError(f"{src} is not an fp32 export; derive fp16/int8 variants from the fp32 one")
    if not ((dtype == "fp16") ^ (quant == "int8")):
        raise EdgepruneError("derive either dtype=fp16 or quant=int8")
    t0 = time.time()
    ext = bool(meta["external_data"])
    with atomic_dir(out, overwrite=True) as tmp:
        (to_fp16 if dtype == "fp16" else to_int8)(src / "model.onnx", tmp / "model.onnx", ext)
        for f in src.iterdir():
            if "onnx" not in f.name:
                shutil.copy2(f, tmp / f.name)
        meta.update(dtype=dtype, quant=quant)
        (tmp / "edgeprune_onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if "onnx" in f.name and f.name != "edgeprune_onnx.json")
    return OnnxSummary(str(out), dtype, quant, size / 1e6, len(meta["kv_heads"]), meta["kv_heads"], ext, OPSET,
                       round(time.time() - t0, 2))
