"""Measured quality of plan candidates, on a held-out slice of the calibration source (never an evaluation text).

**Held-out slice.** ``n`` windows of ``L`` tokens drawn by :func:`edgeprune.data.calibration_ids` from the
calibration source with seed ``seed + 7919`` — windows drawn independently of the calibration windows (seed
``seed``); the gutenberg source already excludes the reference model's held-back text, and WikiText-2/PTB
calibration reads their *valid* splits, not the test texts.

**Loss** of a candidate (quant ``q``, ratio ``r``) as ``Δ ln ppl`` against the dense model:

* pruning loss ``P(r) = ln ppl_torch(pruned at r) − ln ppl_torch(dense)``: the method's own allocation at ``r``
  (cost-aware: ``r`` of the candidate's pool, :mod:`.costs`) from the one scoring, applied by surgery (with the method's bias compensation) to a copy of the model. A
  method whose default adds the reconstruction stage (:mod:`edgeprune.repair`, e.g. ``obs``) is measured
  *without* it (one refit per ratio would multiply the plan's cost): ``P`` then over-states the pruned model's
  loss, which can only make the planner prefer less pruning;
* quantization loss ``Q(q) = ln ppl_rt(dense at q) − ln ppl_rt(dense f16)`` on the target runtime: the dense f16
  GGUF quantized by llama.cpp's own quantizer (``llama_model_quantize``), evaluated by llama.cpp (F16 KV cache,
  as deployed). ONNX profiles use the prior for ``Q`` (:mod:`.priors`).
* combined ``L(q, r) = P(r) + Q(q)``. Justification: both are small weight perturbations of the same loss; to
  first order their effects on the mean log-likelihood add, and measuring ``Q`` on the dense model costs one
  quantization per quant instead of one per (quant, ratio). It is *checked*: :meth:`MeasuredQuality.end_to_end`
  measures the pruned-then-quantized model on the runtime; the plan stage does this for the chosen candidate and
  the runner-up, reports the error of the additive estimate, and keeps the one that measures better.
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np

from .priors import QUANT_PRIOR
from .search import Candidate

HELDOUT_SEED_OFFSET = 7919


def heldout_ids(tokenizer, source: str, n: int, seq_len: int, seed: int):
    """The held-out slice: ``[n, seq_len]`` windows of the calibration source, apart from calibration's seed."""
    from ..data import calibration_ids

    return calibration_ids(tokenizer, source, n, seq_len, seed + HELDOUT_SEED_OFFSET)


def torch_nll(model, ids) -> float:
    """Mean next-token NLL of the windows in PyTorch (each window on its own)."""
    import torch

    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(nll)


def runtime_nll(gguf: Path, ids, threads: int = 1) -> float:
    """Mean next-token NLL of the windows on llama.cpp (F16 KV cache, as deployed)."""
    from exporters.runtimes import log_softmax_nll, open_runtime

    rt = open_runtime(gguf, threads=threads, kv="f16", n_ctx=max(256, ids.shape[1]))
    try:
        arr = ids.numpy()
        return float(np.mean([log_softmax_nll(rt.logits(w), w).mean() for w in arr]))
    finally:
        rt.close()


class MeasuredQuality:
    """``loss(q, r) = P(r) + Q(q)`` measured as in the module doc; ``P`` memoized per ratio."""

    basis = "measured"

    def __init__(self, scored, model_dir, tokenizer, runtime: str, quants, *, source: str = "gutenberg",
                 n: int = 32, seq_len: int = 128, seed: int = 0, threads: int = 1, repair: str | None = None):
        self.scored, self.model_dir, self.threads, self.runtime = scored, Path(model_dir), threads, runtime
        self.repair = repair      # the repair the shipped model gets (e.g. 'lsq'), which P(r) leaves out
        self.model = scored.ctx.model
        self.ids = heldout_ids(tokenizer, source, n, seq_len, seed)
        self.slice = f"{source}: {n} x {seq_len} tokens, seed {seed + HELDOUT_SEED_OFFSET} (held out from calibration)"
        self.dense_nll = torch_nll(self.model, self.ids)
        self._prune: dict[tuple, float] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeprune-quality-")
        self.quants, self._quant, self._dense_rt = tuple(quants), None, None

    @property
    def quant(self) -> dict[str, float]:
        """``Q(q)`` for every allowed quant, measured on first use (f16/f32 are the reference: 0)."""
        if self._quant is None:
            if self.runtime != "llama.cpp":
                self._quant = {q: QUANT_PRIOR[q] for q in self.quants}
            else:
                self._quant = {q: 0.0 if q in ("f16", "f32") else self._runtime_quant_loss(q) for q in self.quants}
        return self._quant

    def _dense_f16(self) -> tuple[Path, float]:
        """The dense model's f16 GGUF and its runtime NLL on the slice (made once)."""
        if self._dense_rt is None:
            import exporters

            f16 = Path(self._tmp.name) / "dense-f16.gguf"
            exporters.export(str(self.model_dir), "gguf", str(f16), quant="f16")
            self._dense_rt = (f16, runtime_nll(f16, self.ids, self.threads))
        return self._dense_rt

    def _runtime_quant_loss(self, q: str) -> float:
        from exporters.gguf import quantize

        f16, base = self._dense_f16()
        art = Path(self._tmp.name) / f"dense-{q}.gguf"
        quantize(f16, art, q, threads=self.threads)
        return runtime_nll(art, self.ids, self.threads) - base

    def pruned(self, r: float, cost=None):
        """A copy of the model pruned at ``r`` (of ``cost``'s pool, or of the parameters) by the method's allocation
        on the one scoring."""
        from ..surgery import apply_plan

        m = copy.deepcopy(self.model)
        apply_plan(m, self.scored.plan_at(r, cost), self.scored.scores.bias_means)
        return m

    def prune_loss(self, r: float, cost=None) -> float:
        if r == 0:
            return 0.0
        if (r, cost) not in self._prune:
            self._prune[(r, cost)] = torch_nll(self.pruned(r, cost), self.ids) - self.dense_nll
        return self._prune[(r, cost)]

    def loss(self, quant: str, ratio: float, achieved_ratio: float, cost=None) -> float:
        return self.prune_loss(ratio, cost) + self.quant[quant]

    def rank(self, c: Candidate) -> tuple:
        return (round(c.loss, 4),)       # equal to 0.01% of ppl: a tie, the faster one wins

    def end_to_end(self, c: Candidate) -> float:
        """Measured ``Δ ln ppl`` of the candidate itself: pruned in PyTorch, exported to f16 GGUF, quantized by
        llama.cpp, evaluated on the runtime, against the dense f16 GGUF."""
        from ..models import load_tokenizer, save  # noqa: F401
        import exporters
        from exporters.gguf import quantize

        d = Path(self._tmp.name) / f"e2e-{c.quant}-{c.ratio}"
        src = self.model_dir
        if c.ratio > 0:
            save(self.pruned(c.ratio, c.cost), d / "model", tokenizer_src=self.model_dir, provenance={"purpose": "plan check"})
            src = d / "model"
        f16 = d / "f16.gguf"
        d.mkdir(parents=True, exist_ok=True)
        exporters.export(str(src), "gguf", str(f16), quant="f16")
        art = f16
        if c.quant not in ("f16", "f32"):
            art = d / f"{c.quant}.gguf"
            quantize(f16, art, c.quant, threads=self.threads)
        return runtime_nll(art, self.ids, self.threads) - self._dense_f16()[1]

    def repair_note(self) -> str | None:
        """One sentence when the shipped model gets a repair that the pruning loss leaves out (module doc)."""
        if self.repair in (None, "none"):
            return None
        return (f"the predicted quality loss is measured without the method's default '{self.repair}' repair that "
                "the shipped model gets (one refit per candidate ratio would multiply the plan's cost), so it "
                "over-states the shipped model's loss; the shipped model's quality is measured by the verify stage")

    def describe(self) -> dict:
        return {"slice": self.slice, "dense_ppl_torch": round(math.exp(self.dense_nll), 4),
                "repair_included": self.repair in (None, "none"), "repair_note": self.repair_note(),
                "quant_basis": "prior (no runtime quantizer for this runtime)" if self.runtime != "llama.cpp" else
                "measured on llama.cpp",
                "quant_loss": {q: round(v, 6) for q, v in (self._quant or {}).items()},
                "prune_loss": {f"{r}" + ("" if c is None else f" of {c.unit}"): round(v, 6)
                               for (r, c), v in sorted(self._prune.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))}}

    def close(self) -> None:
        self._tmp.cleanup()


def confirm(res, quality: MeasuredQuality, profile, tol: float = 1e-3) -> dict:
    """Measure the chosen candidate and the runner-up end to end; if the runner-up measures better by more than
    ``tol`` (0.1% of ppl), it becomes the choice. Returns the check (predicted vs measured, per candidate), which
    is also appended to ``res.notes``."""
    from .priors import loss_pct
    from .search import explain

    if res.chosen is None or res.runner_up is None:
        return {"candidates": [], "swapped": False, "protocol": "no runner-up to check the choice against"}
    pair = [res.chosen, res.runner_up]
    rows = []
    for c in pair:
        m = quality.end_to_end(c)
        rows.append({"quant": c.quant, "ratio": c.ratio, "predicted": round(c.loss, 5), "measured": round(m, 5),
                     "error": round(c.loss - m, 5)})
    swapped = len(rows) == 2 and rows[1]["measured"] < rows[0]["measured"] - tol
    if swapped:
        res.chosen, res.runner_up = res.runner_up, res.chosen
        res.chosen_shapes = quality_shape(quality, res.chosen.ratio, res.chosen.cost)
        c, r = res.chosen, res.runner_up
        res.why = (f"{c.quant} at {c.achieved_ratio:.1%} pruning beat the runner-up {r.quant} at "
                   f"{r.achieved_ratio:.1%} because, measured end to end on the runtime, its quality loss is lower "
                   f"(+{loss_pct(rows[1]['measured']):.2f}% vs +{loss_pct(rows[0]['measured']):.2f}% perplexity), "
                   "although the additive estimate ranked it second.")
        res.explanation = explain(res, profile, c)
    check = {"candidates": rows, "swapped": swapped,
             "protocol": f"end to end on llama.cpp, {quality.slice}; loss = Δ ln ppl vs the dense f16 GGUF"}
    res.notes.append("additive quality estimate checked end to end: " + "; ".join(
        f"{r['quant']} at {r['ratio']:.3f}: predicted {r['predicted']:+.4f}, measured {r['measured']:+.4f}"
        for r in rows) + (" (runner-up measured better: chosen instead)" if swapped else ""))
    return check


def quality_shape(quality: MeasuredQuality, r: float, cost=None):
    from .fit import shape_from_plan
    from .shapes import model_shape

    dense = model_shape(quality.model)
    return dense if r == 0 else shape_from_plan(dense, quality.scored.plan_at(r, cost),
                                                quality.scored.bias_means(len(dense.layers)))
