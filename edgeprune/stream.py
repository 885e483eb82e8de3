"""Layer streaming: prune (and evaluate) a model larger than memory, one decoder layer at a time.

``edgeprune prune --stream`` (and automatically when the checkpoint's weights exceed
``AUTO_FRACTION`` × the available RAM, see :func:`should_stream`) runs this instead of load → prune → save:

1. **Lazy checkpoint** (:class:`Checkpoint`): the safetensors headers (one file or a sharded
   ``model.safetensors.index.json``) are parsed, and each tensor is read on demand with ``pread`` into its own
   buffer. No file is memory-mapped, so checkpoint pages never count in the process RSS (a memory map would:
   touched file pages stay resident in the mapping and show in ``VmHWM``).
2. **Skeleton**: the stock HF class on the meta device with the per-layer shapes (as :func:`edgeprune.models.load`
   builds it); only the embeddings (and, for methods with a block loss, the final norm and ``lm_head``) are real.
   The calibration ids go through the embeddings and :func:`edgeprune.calibrate.layer0_inputs` exactly as in
   the non-streamed path (same batches, same rotary/mask keyword arguments).
3. **One layer at a time**: a deep copy of the meta layer gets its tensors assigned (``load_state_dict(assign=
   True)``, in the compute dtype: the checkpoint's own by default — the dtype :func:`~edgeprune.models.load`
   gives the non-streamed path — or ``--opt stream_dtype=fp32`` to upcast), the calibration hidden states run
   through it with the same statistics hooks as :func:`~edgeprune.calibrate.collect`, the layer is scored, and
   its outputs become the next layer's inputs.
4. **Allocation**: ``uniform`` needs only the layer's own scores (the per-layer fraction follows from the
   config), so the layer is pruned (:func:`edgeprune.surgery._prune_layer`) and written at once — one pass.
   Every other allocator (``global``, ``saap``) needs all scores: pass 1 keeps only the small score vectors
   (and FLAP's bias means), the plan is made, and pass 2 reads every layer again, prunes and writes it.
   ``self-pruner`` needs whole-model fitness evaluations and is refused under streaming.
5. **Output**: the standard pruned format, sharded — ``model-0000k-of-0000n.safetensors`` (embeddings; one
   shard per decoder layer; final norm + head) with ``model.safetensors.index.json``, ``config.json`` with
   ``pruning.per_layer`` + provenance, tokenizer files, ``prune_report.json`` — written into a temporary
   sibling directory and renamed at the end (atomic like :func:`edgeprune.models.save`). Tensors are written in
   the checkpoint's dtype with a small safetensors writer that streams each tensor's bytes (no serialisation
   copy).

Peak memory ≈ embeddings (+ head for block-loss methods) + one layer + the calibration activations
``[N, L, H]`` + one layer's forward. Nothing else scales with a weight matrix: scorers and the statistics hooks
reduce in float64 one block of rows/columns at a time (:func:`edgeprune.importance.base.per_channel`, ≈ 8 MB
blocks), MINI-LLM perturbs, estimates and scores block by block, and surgery swaps in one kept matrix at a time
(the old one is freed at once) before the pruned layer is written. Freed heap memory is handed back to the OS
(:func:`trim`) after the layer's calibration forward, after scoring and after writing.

**What the layer passes on** (option ``stream_propagate``): ``dense`` (default) — the dense layer's outputs,
exactly what the non-streamed path does (it scores every layer on the dense model before any surgery), so
gradient-free methods (``magnitude``, ``wanda-sp``, ``flap``, ``bip``) give bit-identical scores and kept
groups; ``pruned`` — the pruned layer's outputs (sequential pruning à la SparseGPT: later layers are
calibrated on what they will see), only with one-pass (``uniform``) allocation.

**Methods with a loss** (``mini-llm``'s SPSA, ``llm-pruner``'s and ``saap``'s backward pass) cannot see the
model's LM loss when only one layer exists. Under streaming they run **block-locally**: the layer is wrapped in
a model-like view whose forward takes the layer's calibration input hidden states and returns
``lm_head(norm(layer(h)))`` — the *logit-lens* next-token loss of that block's output. The true LM loss
measures a perturbation's effect after all later layers; the block loss measures it as if the block were the
last. We do not use the reconstruction loss ``‖layer_W(h) − y_dense‖²`` suggested for this: at the dense
weights it is at its minimum (0), so its gradient is zero and SPSA's ``(L(W+εz) − L(W−εz))/2ε`` is zero up to
O(ε²) noise — it carries no first-order information. The per-layer SPSA seed is ``seed·100003 + i``.
SAAP's σ is then per layer (each layer is scored on its own). These scores differ from the non-streamed ones
by design.

**Accelerators**: ``device`` (cpu | cuda | auto) places the current layer, the embeddings and the activations;
statistics and scores come back to the CPU, surgery runs on the CPU.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import calibrate_layer  # noqa: F401  (one-layer calibration, shared with collect)
from .errors import EdgepruneError

AUTO_FRACTION = 0.4   # stream when weights > this × MemAvailable (the in-memory path peaks near 2× the weights)
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
BLOCK_LOSS_FREE = ("magnitude", "wanda-sp", "flap", "bip", "obs")   # methods that never call the model's loss


# ------------------------------------------------------------------------------------------- lazy checkpoint
class Checkpoint:
    """A safetensors checkpoint (single file or sharded with an index) read one tensor at a time with pread."""

    def __init__(self, path: str | Path):
        from .models import _read_config, _resolve

        self.path = _resolve(path)
        self.config = _read_config(self.path)
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


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


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


def trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed mid-size blocks, which would grow the RSS layer
    after layer); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "cpu"):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgepruneError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


# ------------------------------------------------------------------------------------------- model pieces
class Skeleton:
    """Meta-device model with real embeddings / final norm / head (as needed) and rebuilt rotary buffers."""

    def __init__(self, ck: Checkpoint, dtype: torch.dtype, device: torch.device, head: bool):
        from .models import _meta_model, _rebuild_buffers

        self.ck, self.dtype, self.device = ck, dtype, device
        self.model, self.config = _meta_model(ck.config)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.model.model.embed_tokens.load_state_dict({"weight": self._t("model.embed_tokens.weight")}, assign=True)
        if self.tied:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self.head_loaded = False
        _rebuild_buffers(self.model, self.config)
        if head:
            self.load_head()
        self.model.eval()
        self.model.model.embed_tokens.to(device)
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

    def drop_embeddings(self) -> None:
        """Free the input embeddings (after the layer-0 inputs exist), unless the head is tied to them."""
        if not (self.tied and self.head_loaded):
            self.model.model.embed_tokens.to_empty(device="meta")   # a new (meta) Parameter replaces the old
            if self.tied:                                           # the head still held the old one: re-tie
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
        trim()

    def layer(self, i: int) -> nn.Module:
        """Layer i materialised (dense, from the checkpoint) in the compute dtype on the device."""
        layer = copy.deepcopy(self.model.model.layers[i])
        sd = self.ck.layer(i)
        want = layer.state_dict()
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

    def groups(self):
        from .groups import model_groups

        return model_groups(self.model)


class LayerView(nn.Module):
    """A one-layer model for the importance methods: ``decoder_layers(view) == [layer]``, ``view.config``; its
    forward is the block-local LM: rows of the calibration ids → the layer's stored input hidden states →
    ``lm_head(norm(layer(h)))`` (logit-lens loss; see the module docstring)."""

    prefix_rows_only = True   # its forward accepts prefixes of the calibration rows only (the stored hidden states)

    def __init__(self, config, layer: nn.Module, skel: Skeleton | None = None, hs: list[torch.Tensor] | None = None,
                 kwargs: dict | None = None, ids: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        if skel is not None and skel.head_loaded:
            self.norm, self.lm_head = skel.model.model.norm, skel.model.lm_head
        self._h = torch.cat(hs) if hs else None
        self._kwargs, self._ids = kwargs or {}, ids

    def _rows(self, x: torch.Tensor) -> list[int]:
        ref = self._ids[:, : x.shape[1]].to(x.device)
        rows = []
        for row in x:
            hit = (ref == row).all(1).nonzero()
            if hit.numel() == 0:
                raise EdgepruneError("internal: the block-local model was called with ids outside the calibration set")
            rows.append(int(hit[0]))
        return rows

    def forward(self, input_ids, labels=None, use_cache=False, **_):
        from .calibrate import _layer_forward

        if self._h is None or not hasattr(self, "lm_head"):
            raise EdgepruneError("internal: this method needs a block loss but the streamed layer has no head")
        n = input_ids.shape[1]
        h = self._h[self._rows(input_ids), :n]
        y = _layer_forward(self.model.layers[0], h, slice_kwargs(self._kwargs, n))
        logits = self.lm_head(self.norm(y))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss)


def slice_kwargs(kwargs: dict, n: int) -> dict:
    """Decoder-layer keyword arguments for the first ``n`` positions (causal: the prefix's states are its own)."""
    out = {}
    for k, v in kwargs.items():
        if k == "position_embeddings" and v is not None:
            v = tuple(t[..., :n, :] for t in v)
        elif k == "attention_mask" and isinstance(v, torch.Tensor):
            v = v[..., :n, :n]
        elif k in ("cache_position", "position_ids") and isinstance(v, torch.Tensor):
            v = v[..., :n]
        out[k] = v
    return out


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(t, device) for t in x)
    return x




# ------------------------------------------------------------------------------------------- scorers
class _BIPStream:
    """LLM-BIP under streaming: the same hooks, generator and arithmetic as
    :meth:`edgeprune.importance.bip.BIP.score` (kept in step by tests/test_stream.py), split per layer."""

    def __init__(self, ctx):
        self.lip, self.mlp_agg = ctx.opt("lipschitz", "one_plus"), ctx.opt("mlp_agg", "rms")
        self.n_tok, self.iters = int(ctx.opt("lip_tokens", 64)), int(ctx.opt("lip_iters", 20))
        if self.lip not in ("one_plus", "residual", "none") or self.mlp_agg not in ("rms", "abs"):
            raise ValueError("bip options: lipschitz one_plus|residual|none, mlp_agg rms|abs")
        self.gen = torch.Generator().manual_seed(ctx.seed)
        self.seed, self.ks, self.acc = ctx.seed, [], {}

    def extra(self, lg):
        from .importance.bip import abs_col_sum, attn_group_change

        def hooks(i, layer):
            self.acc = st = {"attn": torch.zeros(lg.n_kv, dtype=torch.float64),
                             "abs": torch.zeros(lg.n_mlp, dtype=torch.float64), "n": 0, "h": []}

            def o_hook(mod, args):
                st["attn"] += attn_group_change(mod.weight, args[0], lg).sum(0).cpu()
                st["n"] += args[0].shape[0] * args[0].shape[1]

            def d_hook(mod, args):
                st["abs"] += abs_col_sum(args[0]).cpu()

            def h_hook(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1])
                k = min(x.shape[0], max(self.n_tok // 4, 1))
                st["h"].append(x[torch.randperm(x.shape[0], generator=self.gen)[:k].to(x.device)].clone())

            hs = [layer.self_attn.o_proj.register_forward_pre_hook(o_hook),
                  layer.mlp.down_proj.register_forward_pre_hook(d_hook)]
            if self.lip != "none":
                hs.append(layer.post_attention_layernorm.register_forward_pre_hook(h_hook))
            return hs
        return hooks

    @torch.no_grad()
    def score(self, i, layer, lg, st):
        from .importance.bip import down_col_norm, token_lipschitz

        a = self.acc
        if self.lip == "none":
            k = 1.0
        else:
            h = torch.cat(a["h"])[: self.n_tok]
            sig = token_lipschitz(layer, h, self.iters, residual=self.lip == "residual", seed=self.seed + i)
            k = float(sig.max()) + (1.0 if self.lip == "one_plus" else 0.0)
        wn = down_col_norm(layer.mlp.down_proj.weight).cpu()
        act = (st.down_in.sq / st.down_in.n).sqrt().cpu() if self.mlp_agg == "rms" else a["abs"] / st.down_in.n
        self.ks.append(k)
        self.acc = {}
        return k * a["attn"] / max(a["n"], 1), wn * act

    def info(self):
        return {"lipschitz": self.lip, "K": self.ks, "mlp_agg": self.mlp_agg, "lip_tokens": self.n_tok,
                "forward_passes": 1}


def _skip_default(method, n_layers: int) -> list[int]:
    """The method's default skipped layers (what its ``Scores.info['skip_default']`` says for the full depth)."""
    if method.name in ("llm-pruner", "saap"):
        return [round(4 * n_layers / 32 + 0.49), round(2 * n_layers / 32 + 0.49)]
    return [0, 0]


def _cpu_stats(st):
    for cs in (st.o_in, st.down_in, st.attn_in, st.mlp_in):
        for f in ("mean", "m2", "sq"):
            v = getattr(cs, f)
            if isinstance(v, torch.Tensor):
                setattr(cs, f, v.cpu())
    return st


# ------------------------------------------------------------------------------------------- output
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


def _layer_tensors(layer, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.{k}": v.to(dtype) for k, v in layer.state_dict().items()}


# ------------------------------------------------------------------------------------------- prune
def run_prune_streamed(model_path, out, cfg, overwrite: bool = False, progress: bool = True):
    """The streamed counterpart of :func:`edgeprune.prune.run_prune` (same result type and output format)."""
    from tqdm import tqdm

    from . import __version__
    from .allocation import AllocOptions, allocate
    from .allocation.base import per_layer_plan, uniform_layer_ratio
    from .data import calibration_ids
    from .groups import LayerGroups
    from .importance import Context, Scores, get_method
    from .models import count_params, copy_tokenizer, load_tokenizer, pruned_config
    from .paths import atomic_dir, check_output_dir
    from .prune import PruneResult, _jsonable, peak_rss_mb
    from .surgery import _prune_layer

    cfg.validate()
    method = get_method(cfg.method)
    alloc = cfg.allocation or method.default_allocation
    opts_x = dict(cfg.options)
    propagate = opts_x.pop("stream_propagate", "dense")
    sdt = opts_x.pop("stream_dtype", "auto")
    if propagate not in ("dense", "pruned"):
        raise EdgepruneError(f"--opt stream_propagate={propagate}: use dense or pruned")
    if alloc == "self-pruner":
        raise EdgepruneError("the self-pruner allocation evaluates whole pruned models and cannot stream; prune "
                             "without --stream (or pick --allocation uniform/global/saap)")
    repair = cfg.repair_options()
    one_pass = alloc == "uniform" and repair is None   # the repair stage runs in pass 2 (it needs layer 0's inputs)
    if propagate == "pruned" and repair is not None:
        raise EdgepruneError("--opt stream_propagate=pruned and --reconstruct both choose what later layers see; "
                             "use --sequential with --reconstruct instead")
    if propagate == "pruned" and not one_pass:
        raise EdgepruneError(f"--opt stream_propagate=pruned needs a per-layer allocation (uniform), not {alloc}")
    out = check_output_dir(out, overwrite, inputs=(model_path,))
    device = resolve_device(cfg.device)
    t0 = time.time()
    ck = Checkpoint(model_path)
    store_dt = ck.dtype()
    from .models import DTYPES

    if sdt == "auto":
        dtype = store_dt
    elif sdt in DTYPES:
        dtype = DTYPES[sdt]
    else:
        raise EdgepruneError(f"--opt stream_dtype={sdt}: use auto, fp32, bf16 or fp16")
    needs_block = method.name not in BLOCK_LOSS_FREE
    needs_calib = method.name != "magnitude"
    skel = Skeleton(ck, dtype, device, head=needs_block)
    tok = load_tokenizer(model_path)
    dense_groups = skel.groups()
    L = len(dense_groups)
    total_b, nonemb_b = count_params(skel.model)
    skip = _skip_default(method, L)
    opts = AllocOptions(ratio=cfg.ratio, nonemb_params=nonemb_b,
                        skip_first=skip[0] if cfg.skip_first is None else cfg.skip_first,
                        skip_last=skip[1] if cfg.skip_last is None else cfg.skip_last,
                        min_kv=cfg.min_kv, multiple=cfg.multiple, extra=opts_x,
                        uniform_kv=cfg.uniform_kv, uniform_shapes=cfg.uniform_shapes)
    ratios = uniform_layer_ratio(dense_groups, opts) if one_pass else None
    torch.manual_seed(cfg.seed)
    ids = calibration_ids(tok, cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed)
    ctx0 = Context(model=skel.model, calib_ids=ids, seed=cfg.seed, options=opts_x, progress=False)
    hs, kwargs = [], {}
    if needs_calib:
        from .calibrate import layer0_inputs

        with torch.no_grad():
            hs, kwargs = layer0_inputs(skel.model, ids.to(device), ctx0.batch_size)
    skel.drop_embeddings()
    hs0 = hs if repair is not None else None   # layer 0's calibration inputs, for the repair pass
    t1 = time.time()
    bip = _BIPStream(ctx0) if method.name == "bip" else None
    grams: list = []
    if method.name == "obs":
        from .importance.obs import gram_collector

        gram_hooks = gram_collector(grams)
    attn_all, mlp_all, means_all, infos = [], [], [], []
    keep_kv, keep_mlp = [], []
    with atomic_dir(out, overwrite=True) as tmp:
        writer = ShardWriter(tmp, L + 2)
        writer.write({"model.embed_tokens.weight": ck.get("model.embed_tokens.weight")})
        for i in tqdm(range(L), desc="stream", unit="layer", disable=not progress, leave=False):
            layer = skel.layer(i)
            lg: LayerGroups = dense_groups[i]
            st, outs = None, hs
            if needs_calib:
                extra = bip.extra(lg) if bip else (gram_hooks if method.name == "obs" else None)
                st, outs = calibrate_layer(layer, hs, kwargs, extra, i)
                st = _cpu_stats(st)
                trim()   # the forward's freed activations: back to the OS before scoring allocates
            if bip is not None:
                a, m = bip.score(i, layer, lg, st)
                sc = Scores([a], [m])
            else:
                view = LayerView(skel.config, layer, skel, hs, kwargs, ids.to(device))
                ctx = Context(model=view, calib_ids=ids.to(device), seed=cfg.seed if not needs_block else
                              cfg.seed * 100003 + i, options=opts_x, progress=False)
                ctx.__dict__["groups"] = [lg]
                if st is not None:
                    ctx.__dict__["layer_stats"] = [st]
                if grams:
                    ctx.__dict__["grams"] = [grams[i]]
                import contextlib

                with contextlib.nullcontext() if method.needs_gradients else torch.no_grad():
                    sc = method.score(view, ctx)
                del view, ctx
            trim()       # the scorer's freed blocks: back to the OS before surgery allocates
            a, m = sc.attn[0].detach().double().cpu(), sc.mlp[0].detach().double().cpu()
            means = None
            if sc.bias_means is not None:
                means = {k: v.cpu() for k, v in sc.bias_means[0].items()}
            if i == 0 or not infos:
                infos.append(sc.info)
            attn_all.append(a)
            mlp_all.append(m)
            means_all.append(means)
            if one_pass:
                p = per_layer_plan([a], [m], [lg], [ratios[i]], opts)
                keep_kv.append(p.keep_kv[0])
                keep_mlp.append(p.keep_mlp[0])
                layer = layer.to("cpu")
                _prune_layer(layer, lg, torch.tensor(p.keep_kv[0], dtype=torch.long),
                             torch.tensor(p.keep_mlp[0], dtype=torch.long), means)
                writer.write(_layer_tensors(layer, i, store_dt))
                if propagate == "pruned" and needs_calib:
                    layer = layer.to(device)
                    with torch.no_grad():
                        from .calibrate import _layer_forward

                        outs = [_layer_forward(layer, h, kwargs) for h in hs]
                skel.model.model.layers[i] = layer.to("meta")
            del layer
            hs = outs
            trim()
        t2 = time.time()
        scores = Scores(attn_all, mlp_all, standardized=method.name in ("flap", "obs"),   # scores already on one scale
                        bias_means=means_all if any(x is not None for x in means_all) else None,
                        info=bip.info() if bip else dict(infos[0] if infos else {}))
        if not one_pass:
            plan = allocate(alloc, scores, dense_groups, opts, None)
            keep_kv, keep_mlp = plan.keep_kv, plan.keep_mlp
            plan_meta = dict(plan.meta)
            rst = None
            if repair is not None:
                from .repair import Streams, repair_step

                rst, repairs = Streams.start(hs0, kwargs, repair), []
                del hs0, hs
            for i in tqdm(range(L), desc="stream (surgery)", unit="layer", disable=not progress, leave=False):
                if rst is not None:   # the repair stage: the same step as the in-memory path
                    layer = skel.layer(i)
                    repairs.append(repair_step(i, layer, dense_groups[i], keep_kv[i], keep_mlp[i], rst, repair))
                    layer = layer.to("cpu")
                else:
                    layer = skel.layer(i).to("cpu")
                    _prune_layer(layer, dense_groups[i], torch.tensor(keep_kv[i], dtype=torch.long),
                                 torch.tensor(keep_mlp[i], dtype=torch.long), (scores.bias_means or [None] * L)[i])
                writer.write(_layer_tensors(layer, i, store_dt))
                skel.model.model.layers[i] = layer.to("meta")
                del layer
                trim()
        else:
            plan_meta = {"layer_ratios": ratios, "allocation": alloc}
        head = {"model.norm.weight": ck.get("model.norm.weight")}
        if not skel.tied:
            head["lm_head.weight"] = ck.get("lm_head.weight")
        writer.write(head)
        del head
        writer.finish()
        t3 = time.time()
        total_a, nonemb_a = count_params(skel.model)
        from .models import layer_shapes

        after = layer_shapes(skel.model)
        per_layer = []
        for i, (lg, kv, ch) in enumerate(zip(dense_groups, keep_kv, keep_mlp)):
            p = lg.n_kv * lg.attn_group_params + lg.n_mlp * lg.mlp_group_params
            kept = len(kv) * lg.attn_group_params + len(ch) * lg.mlp_group_params
            per_layer.append({"layer": i, **{k: v for k, v in after[i].to_dict().items() if not k.endswith("_bias")},
                              "kv_kept": len(kv) / lg.n_kv, "mlp_kept": len(ch) / lg.n_mlp,
                              "removed_frac": 1 - kept / p})
        stream_info = {"streamed": True, "passes": 1 if one_pass else 2, "propagate": propagate,
                       "compute_dtype": str(dtype).replace("torch.", ""), "device": str(device),
                       "block_local_loss": needs_block, "shards": writer.n}
        provenance = {
            "edgeprune_version": __version__, "source_model": str(Path(model_path).resolve()), "method": cfg.method,
            "allocation": alloc, "target_ratio": cfg.ratio, "achieved_ratio": round(1 - nonemb_a / nonemb_b, 6),
            "calibration": {"source": cfg.calib, "samples": cfg.calib_samples, "seq_len": cfg.calib_len,
                            "seed": cfg.seed},
            "skip_layers": [opts.skip_first, opts.skip_last], "round_mlp": cfg.multiple, "min_kv": cfg.min_kv,
            "options": cfg.options, "scores_info": _jsonable(scores.info),
            "bias_compensation": scores.bias_means is not None and repair is None, "stream": stream_info,
            "reconstruction": _jsonable({**asdict(repair), "layers": [asdict(r) for r in repairs]})
            if repair is not None else {"mode": "method default"},
        }
        timings = {"calib_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2), "allocate_apply_s": round(t3 - t2, 2),
                   "total_s": round(time.time() - t0, 2)}
        res = PruneResult(out=str(out), method=cfg.method, allocation=alloc, target_ratio=cfg.ratio,
                          achieved_ratio=1 - nonemb_a / nonemb_b, params_before=total_b, params_after=total_a,
                          nonemb_before=nonemb_b, nonemb_after=nonemb_a, per_layer=per_layer, timings=timings,
                          peak_rss_mb=peak_rss_mb())
        d = pruned_config(skel.model, provenance)
        d["torch_dtype"] = str(store_dt).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(model_path, tmp)
        rep = _jsonable(asdict(res))
        rep["plan"] = {"keep_kv": keep_kv, "keep_mlp": keep_mlp, "meta": _jsonable(plan_meta)}
        (tmp / "prune_report.json").write_text(json.dumps(rep, indent=2) + "\n")
    ck.close()
    return res


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def streamed_perplexity(model_path, ids: torch.Tensor, seq_len: int = 128, max_chunks: int | None = None,
                        batch_size: int = 8, dtype: str | torch.dtype | None = None, device: str = "cpu",
                        progress: bool = False) -> float:
    """:func:`edgeprune.evaluate.perplexity_ids` (same chunks, same formula) with one decoder layer in memory at a
    time: embeddings → every layer over all chunks → final norm + head. Works on dense and pruned (sharded)
    checkpoints; ``ids`` may be 1-D (cut into chunks) or [N, seq_len] rows."""
    from tqdm import tqdm

    from .calibrate import layer0_inputs, _layer_forward
    from .models import DTYPES

    ck = Checkpoint(model_path)
    dt = ck.dtype() if dtype in (None, "auto") else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
    dev = resolve_device(device)
    if ids.dim() == 1:
        from .evaluate import chunk_ids

        chunks = chunk_ids(ids, seq_len, max_chunks)
    else:
        chunks = ids[:max_chunks] if max_chunks else ids
    skel = Skeleton(ck, dt, dev, head=True)
    hs, kwargs = layer0_inputs(skel.model, chunks.to(dev), batch_size)
    skel.drop_embeddings()
    for i in tqdm(range(len(skel.model.model.layers)), desc="ppl (stream)", disable=not progress, leave=False):
        layer = skel.layer(i)
        hs = [_layer_forward(layer, h, kwargs) for h in hs]
        del layer
        trim()
    losses = []
    for b, h in zip(range(0, chunks.shape[0], batch_size), hs):
        x = chunks[b:b + batch_size].to(dev)
        logits = skel.model.lm_head(skel.model.model.norm(h)).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                              reduction="none").view(x.shape[0], -1)
        losses.append(nll.mean(1).double().cpu())
    ck.close()
    return math.exp(torch.cat(losses).mean().item())
