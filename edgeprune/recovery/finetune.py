"""Recovery fine-tuning of a (pruned) model with LoRA, merged back into a plain pruned-model directory.

Strategies (``docs/methods.md`` §3.2 step 7 and §2.1 step 7; the exact SAAP recipe is not available):

* ``lora`` — LLM-Pruner's recipe: LoRA r=8, α=16, dropout 0.05 on q,k,v,o,gate,up,down of **every** layer, trained
  together (AdamW, no weight decay, linear warm-up then cosine decay to 10 % of ``lr``, grad-norm clip 1.0).
* ``groupwise`` — our reading of SAAP's *group fine-tuning*: the decoder layers are split into ``groups`` groups,
  by pruning severity (``1 − params_ℓ / dense params_ℓ``, most severe first; the dense shape comes from the
  ``source_model`` recorded in the provenance, else from the config's largest layer) or by position for a dense
  model. Groups are tuned **in turn** with the same LoRA recipe while every other layer is frozen; a finished group's
  adapters are merged (peft ``merge_and_unload``) before the next group's are created, so only one group's adapters,
  gradients and optimizer state exist at a time, and layers below the active group run without autograd. The step
  (or time) budget is shared equally by the groups still to run; each group stops early once the held-out loss has
  not improved for ``patience`` evaluations, and keeps its best adapter (so a group never makes held-out loss worse).
* Loss — with a teacher (``teacher='auto'``: the dense ``source_model`` of the provenance, when present) the student
  distils the teacher's next-token distribution (:func:`objective`); with ``teacher='none'`` it is plain next-token
  CE. Distillation is our addition: tuning text from another domain than the evaluation otherwise pulls the model
  towards the tuning text instead of back towards the dense model.
* ``quantize='int8'|'int4'`` — frozen base weights are held as per-group symmetric integers during tuning
  (:mod:`edgeprune.recovery.quant`, QLoRA-style); the output merges all LoRA deltas into the original fp weights.

Data: :class:`edgeprune.recovery.tokens.TokenStream` (seeded shuffle of ~4k-character pieces, packing into
``seq_len`` blocks, a held-out slice of the fine-tuning data for evaluation and early stopping).

Checkpoints (``OUT.ckpt/state.pt``, written atomically every ``ckpt_every`` steps and at group boundaries) hold the
finished groups' LoRA factors, the active adapters, optimizer, torch RNG state, stream position and counters; with
``resume=True`` a step-budgeted run continues bitwise-identically to an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..procmem import peak_rss_mb
from ..errors import EdgepruneError
from ..models import read_config, check_model_dir, decoder_layers, head_dim, layer_shapes, load, load_tokenizer, save
from ..paths import MARKER, atomic_file, check_output_dir, guard_output, mark_ours, remove_stale_temps
from .tokens import TokenStream

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STRATEGIES = ("groupwise", "lora")
QUANTIZE_MODES = ("none", "int8", "int4")


@dataclass
class FinetuneConfig:
    """Everything that determines the result (a resumed run must match it exactly)."""

    data: str = "gutenberg"
    strategy: str = "groupwise"
    steps: int | None = None
    minutes: float | None = None
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    groups: int = 4
    quantize: str = "none"
    quant_group: int = 64
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 25
    patience: int = 4
    warmup: int = 10
    teacher: str | None = None   # resolved teacher model dir (None: plain next-token loss)
    kd_weight: float = 1.0
    kd_temperature: float = 1.0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise EdgepruneError(f"--strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if self.quantize not in QUANTIZE_MODES:
            raise EdgepruneError(f"--quantize {self.quantize!r} is unknown; use one of {', '.join(QUANTIZE_MODES)}")
        if self.steps is not None and self.minutes is not None:
            raise EdgepruneError("give either --steps or --minutes, not both")
        if self.steps is None and self.minutes is None:
            self.steps = 200
        fin = math.isfinite
        checks = [("steps", self.steps is None or self.steps >= 1, ">= 1"),
                  ("minutes", self.minutes is None or (fin(self.minutes) and self.minutes > 0), "> 0 and finite"),
                  ("lr", fin(self.lr) and self.lr > 0, "> 0 and finite"),
                  ("rank", self.rank >= 1, ">= 1"), ("alpha", fin(self.alpha) and self.alpha > 0, "> 0 and finite"),
                  ("seed", 0 <= self.seed <= 2 ** 32 - 1, f"in 0 to {2 ** 32 - 1}"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"), ("groups", self.groups >= 1, ">= 1"),
                  ("seq-len", self.seq_len >= 8, ">= 8"), ("batch-size", self.batch_size >= 1, ">= 1"),
                  ("eval-every", self.eval_every >= 1, ">= 1"), ("patience", self.patience >= 1, ">= 1"),
                  ("kd-weight", 0 <= self.kd_weight <= 1, "in [0, 1]"),
                  ("kd-temperature", fin(self.kd_temperature) and self.kd_temperature > 0, "> 0 and finite")]
        for name, ok, rule in checks:
            if not ok:
                raise EdgepruneError(f"--{name} {getattr(self, name.replace('-', '_'))!r} is out of range; "
                                     f"give a value {rule}")
        if self.strategy == "groupwise" and self.steps is not None and self.steps < self.groups:
            raise EdgepruneError(f"--steps {self.steps} is fewer than --groups {self.groups} (each group needs at "
                                 f"least one step); use --steps >= {self.groups} or --groups <= {self.steps}")


@dataclass
class FinetuneResult:
    out: str | None              # None when the run stopped early (stop_after) and left only a checkpoint
    complete: bool
    strategy: str
    quantize: str
    groups: list[list[int]]      # layer indices of each group, in tuning order
    steps: int
    tokens: int
    train_s: float
    tokens_per_s: float
    eval_loss_before: float      # held-out slice of the fine-tuning data
    eval_loss_after: float
    merge_max_abs_diff: float | None  # logits: tuned model before merging vs the reloaded output
    peak_rss_mb: float
    peak_trainable_params: int
    resumed_from_step: int | None
    checkpoint_dir: str
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ groups
def _params_of(nq: int, nkv: int, ff: int, hidden: int, hd: int) -> int:
    return (2 * nq + 2 * nkv) * hd * hidden + 3 * ff * hidden


def _provenance(config: dict) -> dict:
    """The ``pruning.provenance`` record of a model's config.json ({} for a model edgeprune did not write)."""
    return (config.get("pruning") or {}).get("provenance") or {}


def layer_severity(model, model_dir: str | Path) -> list[float]:
    """Fraction of each layer's attention+MLP weights removed relative to the dense model (0 for a dense model)."""
    d = json.loads((Path(model_dir) / "config.json").read_text())
    src = _provenance(d).get("source_model")
    dense = d
    if src and (Path(src) / "config.json").is_file():
        try:
            dense = json.loads((Path(src) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
    shapes, hd, H = layer_shapes(model), head_dim(model), model.config.hidden_size
    full = _params_of(dense["num_attention_heads"], dense.get("num_key_value_heads") or dense["num_attention_heads"],
                      dense["intermediate_size"], H, hd)
    full = max([full] + [_params_of(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size, H, hd)
                         for s in shapes])
    return [1 - _params_of(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size, H, hd) / full
            for s in shapes]


def make_groups(severity: list[float], k: int) -> list[list[int]]:
    """Split layers into ``k`` groups: by severity (most pruned first) or, if all layers are alike, by position."""
    n = len(severity)
    k = max(1, min(k, n))
    if max(severity) - min(severity) < 1e-9:
        order = list(range(n))
    else:
        order = sorted(range(n), key=lambda i: (-severity[i], i))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [sorted(order[bounds[i]:bounds[i + 1]]) for i in range(k)]


def target_names(model, layers: list[int]) -> list[str]:
    """Full module names of the LoRA targets in the given layers (zero-width projections are skipped)."""
    out = []
    for i in layers:
        for name, mod in decoder_layers(model)[i].named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS and min(mod.in_features, mod.out_features) > 0:
                out.append(f"model.layers.{i}.{name}")
    return out


def _check_rank(model, rank: int) -> None:
    for name in target_names(model, list(range(len(decoder_layers(model))))):
        m = model.get_submodule(name)
        if rank > min(m.in_features, m.out_features):
            raise EdgepruneError(f"--rank {rank} is larger than {name} ({m.in_features} in, {m.out_features} out); "
                                 f"use --rank <= {min(m.in_features, m.out_features)}")


# ------------------------------------------------------------------------------------------------ LoRA plumbing
def _inject(model, names: list[str], cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names, bias="none",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, lcfg)


def _adapter_state(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def _load_adapter(pm, state: dict[str, torch.Tensor]) -> None:
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _factors(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A, B, scaling)} of the active adapters."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[name] = (mod.lora_A["default"].weight.detach().clone(), mod.lora_B["default"].weight.detach().clone(),
                         float(mod.scaling["default"]))
    return out


def _finish_group(model, pm, cfg: FinetuneConfig):
    """Fold the active group's adapters into the model; returns (model, factors)."""
    fac = _factors(pm)
    if cfg.quantize == "none":
        return pm.merge_and_unload(), fac
    model = pm.unload()
    for name, f in fac.items():
        model.get_submodule(name).deltas.append(f)
    return model, fac


def _replay_group(model, fac: dict, cfg: FinetuneConfig):
    """Re-apply a finished group's factors exactly as :func:`_finish_group` did (used when resuming)."""
    pm = _inject(model, sorted(fac), cfg)
    with torch.no_grad():
        for name, (a, b, _) in fac.items():
            mod = pm.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    return _finish_group(model, pm, cfg)[0]


# ------------------------------------------------------------------------------------------------ helpers
def resolve_teacher(model_dir: str | Path, teacher: str | None) -> str | None:
    """The teacher model directory for distillation, or None for plain next-token fine-tuning.

    ``'auto'``: the dense ``source_model`` recorded in the pruned model's provenance when that directory still holds a
    model with the same vocabulary (else None); ``'none'`` / None: no teacher; any other value: that directory (it must
    be a model with the same vocabulary, or this raises).
    """
    if teacher in (None, "none"):
        return None
    own = read_config(Path(model_dir))
    if teacher != "auto":
        return _checked_teacher(model_dir, own, teacher)
    src = _provenance(own).get("source_model")
    try:
        return _checked_teacher(model_dir, own, str(src)) if src else None
    except EdgepruneError:
        return None  # the recorded source is gone or unusable: plain next-token loss


def _checked_teacher(model_dir: str | Path, own: dict, teacher: str) -> str | None:
    """``teacher`` resolved, after checking it is a model with the vocabulary of ``own`` (raises otherwise)."""
    if Path(teacher).resolve() == Path(model_dir).resolve():
        return None  # a model is its own teacher: distillation would be a no-op
    try:
        check_model_dir(teacher)
    except EdgepruneError as e:
        raise EdgepruneError(f"--teacher {teacher}: {e}") from None
    vocab = read_config(Path(teacher))["vocab_size"]
    if vocab != own["vocab_size"]:
        raise EdgepruneError(f"--teacher {teacher} has vocabulary {vocab}, the model has {own['vocab_size']}; "
                             "give the dense model this one was pruned from, or --teacher none")
    return str(Path(teacher).resolve())


def objective(model, x: torch.Tensor, teacher=None, kd_weight: float = 1.0, temperature: float = 1.0):
    """Training objective on a batch of token blocks ``x`` (B, T); returns ``(loss, next-token CE)``.

    Without a teacher ``loss = CE``. With one (logit distillation from the dense model, our addition to the recipe):

        loss = (1 − β)·CE + β·τ²·mean_{b,t} KL( softmax(z_teacher/τ) ‖ softmax(z_student/τ) )

    over the positions that predict a next token (t < T − 1); β = ``kd_weight``, τ = ``temperature``.
    """
    out = model(input_ids=x, labels=x, use_cache=False)
    ce = out.loss
    if teacher is None or kd_weight == 0:
        return ce, ce.item()
    with torch.no_grad():
        zt = teacher(input_ids=x, use_cache=False).logits[:, :-1].float()
    zs = out.logits[:, :-1].float()
    lt = torch.log_softmax(zt / temperature, -1)
    kl = (lt.exp() * (lt - torch.log_softmax(zs / temperature, -1))).sum(-1).mean() * temperature ** 2
    return (1 - kd_weight) * ce + kd_weight * kl, ce.item()


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int = 8, teacher=None, kd_weight: float = 1.0,
              temperature: float = 1.0) -> float:
    """Mean :func:`objective` over ``blocks`` (the next-token CE when there is no teacher)."""
    was = model.training
    model.eval()
    tot = 0.0
    for b in range(0, len(blocks), batch_size):
        x = blocks[b:b + batch_size]
        tot += objective(model, x, teacher, kd_weight, temperature)[0].item() * len(x)
    model.train(was)
    return tot / len(blocks)


def _lr_factor(frac: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _fingerprint(model_dir, cfg: FinetuneConfig) -> dict:
    return {"model_dir": str(Path(model_dir).resolve()), **asdict(cfg)}


# ------------------------------------------------------------------------------------------------ main entry
def finetune(model_dir: str | Path, data: str, out: str | Path, strategy: str = "groupwise", steps: int | None = None,
             minutes: float | None = None, lr: float = 1e-3, rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.05, groups: int = 4, quantize: str = "none", seq_len: int = 128, batch_size: int = 8,
             seed: int = 0, resume: bool = False, eval_every: int = 25, patience: int = 4, ckpt_every: int = 50,
             overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
             threads: int | None = None, teacher: str | None = "auto", kd_weight: float = 1.0,
             kd_temperature: float = 1.0) -> FinetuneResult:
    """Fine-tune ``model_dir`` on ``data`` and write the merged model to ``out`` (see the module docstring).

    ``stop_after`` ends this run after that many optimizer steps without writing ``out`` (as if it were killed);
    the checkpoint directory ``OUT.ckpt`` keeps the last periodic checkpoint for ``resume=True``. ``threads`` sets
    torch's intra-op threads for the run (1 is much faster for small models on a busy machine).
    """
    cfg = FinetuneConfig(data=str(data), strategy=strategy, steps=steps, minutes=minutes, lr=lr, rank=rank, alpha=alpha,
                         dropout=dropout, groups=groups, quantize=quantize, seq_len=seq_len, batch_size=batch_size,
                         seed=seed, eval_every=eval_every, patience=patience, kd_weight=kd_weight,
                         kd_temperature=kd_temperature)
    ro = RunOptions(resume=resume, ckpt_every=ckpt_every, overwrite=overwrite, progress=progress,
                    stop_after=stop_after, teacher=teacher)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _Run(model_dir, out, cfg, ro).run()
    finally:
        torch.set_num_threads(old)


@dataclass
class RunOptions:
    """How this invocation runs (not part of the result's fingerprint)."""

    resume: bool = False
    ckpt_every: int = 50
    overwrite: bool = False
    progress: bool = True
    stop_after: int | None = None
    teacher: str | None = "auto"


def _fresh_state() -> dict:
    return {"group": 0, "step_in_group": 0, "global_step": 0, "position": 0, "done": [], "adapter": None,
            "optim": None, "best_adapter": None, "best_loss": None, "bad_evals": 0, "group_budget": None,
            "group_t0": 0.0, "train_s": 0.0, "tokens": 0, "history": [], "eval_before": None,
            "rng": None, "peak_trainable": 0}


class _Run:
    """One fine-tuning run: outputs and checkpoint, model and data, the group loop, the merge."""

    def __init__(self, model_dir, out, cfg: FinetuneConfig, ro: RunOptions):
        self.t_start = time.time()
        cfg.validate()
        if ro.ckpt_every < 1:
            raise EdgepruneError(f"--ckpt-every {ro.ckpt_every} must be >= 1")
        self.model_dir, self.cfg, self.ro = model_dir, cfg, ro
        self.out = self._outputs(out)
        self._load()
        self._initial_state()

    def _outputs(self, out) -> Path:
        cfg, ro = self.cfg, self.ro
        ins = (self.model_dir, *(Path(x) for x in (cfg.data, ro.teacher) if x and os.path.exists(str(x))))
        out = check_output_dir(out, ro.overwrite, inputs=ins)
        self.ckpt_dir = guard_output(out.with_name(out.name + ".ckpt"), kind="dir", inputs=ins, overwrite=True,
                                     adopt=True, flag="checkpoint folder")
        self.ckpt_file = self.ckpt_dir / "state.pt"
        remove_stale_temps(self.ckpt_dir)   # a checkpoint save killed mid-write (we hold the folder's lock)
        if self.ckpt_dir.is_dir() and not self.ckpt_file.is_file() and \
                not any(f.name != MARKER for f in self.ckpt_dir.iterdir()):
            shutil.rmtree(self.ckpt_dir)   # a first checkpoint save that failed left only the empty folder
        if ro.resume and not self.ckpt_file.is_file():
            raise EdgepruneError(f"--resume: no checkpoint at {self.ckpt_file}; run without --resume to start")
        if not ro.resume and self.ckpt_dir.exists():
            raise EdgepruneError(f"a checkpoint of an earlier run exists at {self.ckpt_dir}; pass --resume to "
                                 "continue it or delete it to start over")
        return out

    def _load(self) -> None:
        cfg = self.cfg
        tok = load_tokenizer(self.model_dir)
        self.stream = TokenStream(tok, cfg.data, cfg.seq_len, cfg.seed)
        self.model = load(self.model_dir)
        _check_rank(self.model, cfg.rank)
        cfg.teacher = resolve_teacher(self.model_dir, self.ro.teacher) if cfg.kd_weight > 0 else None
        tmodel = load(cfg.teacher).eval().requires_grad_(False) if cfg.teacher is not None else None
        self.kd = dict(teacher=tmodel, kd_weight=cfg.kd_weight, temperature=cfg.kd_temperature)
        logging.getLogger("peft").setLevel(logging.ERROR)
        n_layers = len(decoder_layers(self.model))
        self.grp = ([list(range(n_layers))] if cfg.strategy == "lora"
                    else make_groups(layer_severity(self.model, self.model_dir), cfg.groups))
        if cfg.quantize != "none":
            from .quant import quantize_linears

            quantize_linears(self.model, target_names(self.model, list(range(n_layers))), cfg.quantize,
                             cfg.quant_group)

    def _initial_state(self) -> None:
        """Fresh state (and the held-out loss before tuning), or the checkpoint's (groups replayed)."""
        self.fp, self.st, self.resumed_from = _fingerprint(self.model_dir, self.cfg), _fresh_state(), None
        if not self.ro.resume:
            torch.manual_seed(self.cfg.seed)
            self.st["eval_before"] = self.st["best_loss"] = eval_loss(self.model, self.stream.eval_blocks, **self.kd)
            return
        try:   # weights_only: a checkpoint holds tensors and plain containers, never objects to construct
            st = torch.load(self.ckpt_file, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise EdgepruneError(f"checkpoint {self.ckpt_file} cannot be loaded safely ({type(e).__name__}); delete "
                                 f"{self.ckpt_dir} and run without --resume") from None
        need = ("fingerprint", "group", "step_in_group", "global_step", "position", "done", "rng", "history")
        if not isinstance(st, dict) or any(k not in st for k in need) or not isinstance(st["fingerprint"], dict):
            raise EdgepruneError(f"checkpoint {self.ckpt_file} is not an edgeprune fine-tuning checkpoint (missing "
                                 f"{[k for k in need if not isinstance(st, dict) or k not in st][:3]}); delete "
                                 f"{self.ckpt_dir} and run without --resume")
        if st["fingerprint"] != self.fp:
            diff = [k for k in self.fp if st["fingerprint"].get(k) != self.fp[k]]
            raise EdgepruneError(f"the checkpoint in {self.ckpt_dir} was written with different settings "
                                 f"({', '.join(diff)}); rerun with the same options or delete it")
        self.st, self.resumed_from = st, st["global_step"]
        for fac in st["done"]:
            self.model = _replay_group(self.model, fac, self.cfg)
        self.stream.skip_to(st["position"])

    def save_ckpt(self, pm=None, opt=None) -> None:
        st, ckpt_dir = self.st, self.ckpt_dir
        st.update(fingerprint=self.fp, position=self.stream.position, rng=torch.get_rng_state(),
                  adapter=_adapter_state(pm) if pm is not None else None,
                  optim=opt.state_dict() if opt is not None else None)
        made = not ckpt_dir.exists()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        mark_ours(ckpt_dir)
        try:
            with atomic_file(self.ckpt_file) as tmp:
                torch.save(st, tmp)
        except BaseException:
            if made:   # never leave an empty checkpoint folder (re-runs would ask for --resume)
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            raise

    # ------------------------------------------------------------------------------------------ the group loop
    def run(self) -> FinetuneResult:
        from tqdm import tqdm

        cfg, st = self.cfg, self.st
        self.bar = tqdm(total=cfg.steps, initial=st["global_step"], disable=not self.ro.progress, unit="step",
                        desc=f"finetune {cfg.strategy}", dynamic_ncols=True)
        self.run_steps, self.pending_rng = 0, st["rng"] if self.ro.resume else None
        self.budget_total = cfg.steps if cfg.steps is not None else cfg.minutes * 60
        stopped = False
        while st["group"] < len(self.grp) and not stopped:
            g = st["group"]
            pm, opt, params = self._start_group(g)
            stopped = self._train_group(g, pm, opt, params)
            if stopped:
                break
            self._end_group(g, pm)
            self.last_pm = pm
            if g == len(self.grp) - 1:
                break  # the last group is merged in _save, after recording pre-merge logits
            self.model, fac = _finish_group(self.model, pm, cfg)
            st["done"].append(fac)
            st.update(group=g + 1, step_in_group=0, adapter=None, optim=None, best_adapter=None, bad_evals=0)
        self.bar.close()
        return self.result(None, None) if stopped else self._save()

    def _start_group(self, g: int):
        """Adapters and optimizer of group g (fresh at a group boundary, or restored mid-group)."""
        st, cfg = self.st, self.cfg
        mid_group = st["adapter"] is not None
        if not mid_group:
            if self.pending_rng is not None:
                torch.set_rng_state(self.pending_rng)
            used = st["global_step"] if cfg.steps is not None else st["train_s"]
            st["group_budget"] = (self.budget_total - used) / (len(self.grp) - g)
            st["group_t0"] = st["train_s"]
            self.save_ckpt()  # group boundary (before the adapters are created: their init consumes the RNG)
        self.model.train()
        pm = _inject(self.model, target_names(self.model, self.grp[g]), cfg)
        params = [p for p in pm.parameters() if p.requires_grad]
        st["peak_trainable"] = max(st["peak_trainable"], sum(p.numel() for p in params))
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        if mid_group:
            _load_adapter(pm, st["adapter"])
            opt.load_state_dict(st["optim"])
            torch.set_rng_state(self.pending_rng)
        else:
            st["best_adapter"], st["bad_evals"] = _adapter_state(pm), 0
        self.pending_rng = None
        return pm, opt, params

    def _train_group(self, g: int, pm, opt, params) -> bool:
        """Steps of group g until its budget is spent or it stops improving; True when ``stop_after`` ended the run."""
        st, cfg = self.st, self.cfg
        while True:
            done_frac = ((st["step_in_group"] / st["group_budget"]) if cfg.steps is not None
                         else (st["train_s"] - st["group_t0"]) / st["group_budget"])
            if done_frac >= 1 - 1e-9 or st["bad_evals"] >= cfg.patience:
                return False
            if self.ro.stop_after is not None and self.run_steps >= self.ro.stop_after:
                return True
            self._step(g, pm, opt, params, done_frac)
            if st["global_step"] % self.ro.ckpt_every == 0:
                self.save_ckpt(pm, opt)

    def _step(self, g: int, pm, opt, params, done_frac: float) -> None:
        st, cfg = self.st, self.cfg
        t0 = time.time()
        for pg in opt.param_groups:
            pg["lr"] = cfg.lr * _lr_factor(done_frac, st["step_in_group"], cfg.warmup)
        x = self.stream.next_batch(cfg.batch_size)
        loss, ce = objective(pm, x, **self.kd)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        st["step_in_group"] += 1
        st["global_step"] += 1
        st["tokens"] += x.numel()
        self.run_steps += 1
        rec = {"step": st["global_step"], "group": g, "loss": round(loss.item(), 5), "ce": round(ce, 5)}
        if st["step_in_group"] % cfg.eval_every == 0:
            ev = eval_loss(pm, self.stream.eval_blocks, **self.kd)
            rec["eval_loss"] = round(ev, 5)
            if ev < st["best_loss"] - 1e-4:
                st["best_loss"], st["best_adapter"], st["bad_evals"] = ev, _adapter_state(pm), 0
            else:
                st["bad_evals"] += 1
        st["history"].append(rec)
        st["train_s"] += time.time() - t0  # wall time of the step and its evaluation
        self.bar.update(1)
        self.bar.set_postfix(group=f"{g + 1}/{len(self.grp)}", loss=f"{loss.item():.3f}",
                             tok_s=f"{st['tokens'] / max(st['train_s'], 1e-9):.0f}", eval=f"{st['best_loss']:.3f}")

    def _end_group(self, g: int, pm) -> None:
        """Evaluate the group's final adapter, keep the best one."""
        st = self.st
        if st["step_in_group"] % self.cfg.eval_every:
            ev = eval_loss(pm, self.stream.eval_blocks, **self.kd)
            st["history"].append({"step": st["global_step"], "group": g, "eval_loss": round(ev, 5)})
            if ev < st["best_loss"] - 1e-4:
                st["best_loss"], st["best_adapter"] = ev, _adapter_state(pm)
        _load_adapter(pm, st["best_adapter"])

    def result(self, out_path, merge_diff) -> FinetuneResult:
        st, cfg = self.st, self.cfg
        return FinetuneResult(
            out=out_path, complete=out_path is not None, strategy=cfg.strategy, quantize=cfg.quantize, groups=self.grp,
            steps=st["global_step"], tokens=st["tokens"], train_s=round(st["train_s"], 2),
            tokens_per_s=round(st["tokens"] / max(st["train_s"], 1e-9), 1), eval_loss_before=st["eval_before"],
            eval_loss_after=st["best_loss"], merge_max_abs_diff=merge_diff, peak_rss_mb=round(peak_rss_mb(), 1),
            peak_trainable_params=st["peak_trainable"], resumed_from_step=self.resumed_from,
            checkpoint_dir=str(self.ckpt_dir), history=st["history"])

    # ------------------------------------------------------------------------------------------ merge, save, verify
    def _merged(self):
        """The model with every group's adapters merged (into the original fp weights when tuned quantized)."""
        model, fac = _finish_group(self.model, self.last_pm, self.cfg)
        self.st["done"].append(fac)
        if self.cfg.quantize != "none":
            model = load(self.model_dir)
            with torch.no_grad():
                for gf in self.st["done"]:
                    for name, (a, b, s) in gf.items():
                        model.get_submodule(name).weight += (b @ a) * s
        return model.eval()

    def _provenance(self) -> dict:
        cfg, st, model_dir = self.cfg, self.st, self.model_dir
        prov = copy.deepcopy(_provenance(json.loads((Path(model_dir) / "config.json").read_text())))
        prov.setdefault("source_model", str(Path(model_dir).resolve()))
        prov["finetune"] = {
            "edgeprune_version": __version__, "input_model": str(Path(model_dir).resolve()), **asdict(cfg),
            "groups_layers": self.grp, "steps_done": st["global_step"], "tokens": st["tokens"],
            "train_s": round(st["train_s"], 2), "eval_loss_before": round(st["eval_before"], 5),
            "eval_loss_after": round(st["best_loss"], 5), "resumed_from_step": self.resumed_from,
            "recipe": "LoRA on q,k,v,o,gate,up,down; AdamW wd 0, warmup then cosine to 0.1 lr, clip 1.0; merged"
                      + (f"; loss (1-{cfg.kd_weight})*CE + {cfg.kd_weight}*tau^2*KL(teacher||student), tau "
                         f"{cfg.kd_temperature}" if cfg.teacher else "; loss CE"),
        }
        return prov

    def _save(self) -> FinetuneResult:
        probe = self.stream.eval_blocks[:2]
        self.last_pm.eval()
        with torch.no_grad():
            before = self.last_pm(input_ids=probe, use_cache=False).logits
        model = self._merged()
        extra, report = {}, Path(self.model_dir) / "prune_report.json"
        if report.is_file():
            extra["prune_report.json"] = report.read_text()
        save(model, self.out, tokenizer_src=self.model_dir, provenance=self._provenance(), overwrite=True,
             extra_files=extra)
        with torch.no_grad():
            after = load(self.out)(input_ids=probe, use_cache=False).logits
        diff = (before - after).abs().max().item()
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        res = self.result(str(self.out), diff)
        if self.ro.progress:
            what = "KL to the teacher" if self.cfg.teacher else "loss"
            print(f"finetune: held-out {what} {res.eval_loss_before:.4f} -> {res.eval_loss_after:.4f}; {res.steps} "
                  f"steps, {res.tokens:,} tokens in {res.train_s:.0f} s ({res.tokens_per_s:.0f} tok/s); peak RSS "
                  f"{res.peak_rss_mb:.0f} MB; merge check max|Δlogit| {diff:.2e}; saved to {self.out}  "
                  f"({time.time() - self.t_start:.0f} s total)")
        return res
