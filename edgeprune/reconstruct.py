"""Weight reconstruction after structured removal: refit an output-side projection on its kept input columns.

Removing input columns ``R`` of an output projection ``W`` (``o_proj``: the columns of whole head groups;
``down_proj``: MLP channels) changes its output by ``W_{:,R} X_R``. With calibration inputs ``X`` (one column
per token), ``H = X Xᵀ`` and the target inputs ``X_t`` (the same ``X``, or under sequential calibration the dense
model's inputs while ``X`` comes from the already pruned layers before), the kept columns ``S`` can absorb part
of it. Pure numerics, torch only; the engine supplies the statistics (:class:`Gram`) and applies the result.

* ``none`` — ``W' = W_{:,S}``.
* ``bias`` (FLAP, arXiv 2312.11983, generalised to a target): ``W' = W_{:,S}``,
  ``b = W x̄_t − W_{:,S} x̄_S`` (``= W_{:,R} x̄_R`` when ``X_t = X``): restores the removed inputs' mean.

Every mode may also aim at ``W X_t + R``, an output-space correction ``R`` (e.g. the residual-stream error the
earlier pruned layers left, ``h_dense − h_pruned``); ``C`` then gains ``R X_Sᵀ`` and the means ``r̄``.
* ``lsq`` (OSSCAR's final refit, arXiv 2403.12983; SlimLLM's regression, arXiv 2505.22689): the minimiser of
  ``‖W X_t − W'_S X_S − b 1ᵀ‖² + λ‖W'_S − W_{:,S}‖²``, i.e.
  ``W'_S = (W C_{:,S} + λ W_{:,S}) (H_{S,S} + λI)⁻¹`` with the cross moment ``C = X_t Xᵀ`` (``= H`` when
  ``X_t = X``, giving ``W H_{:,S} H_{S,S}⁻¹`` at λ = 0). The damping pulls toward the original weights (not
  toward zero, as a plain ridge would), so keeping every column returns ``W`` exactly, and the result is the
  fixed point of the damped OBS updates below. With ``intercept`` the constant input joins the regression
  (unpenalised: the bias absorbs the mean, as ``bias`` does, and the weights the rest).
  ``λ = damp · mean(diag H_{S,S})`` [R: our choice of prior; the papers damp ``H`` the same way].
* ``obs`` (SlimGPT, arXiv 2412.18110; ZipLM, arXiv 2302.04089): greedy structured Optimal Brain Surgeon on
  ``H⁻¹ = (H + λI)⁻¹``. Removing group ``Q`` costs ``Σ_rows w_Q (H⁻¹_{QQ})⁻¹ w_Qᵀ`` (the output error after the
  optimal update of the rest); the survivors move by ``δW = −W_{:,Q} (H⁻¹_{QQ})⁻¹ H⁻¹_{Q,:}`` and
  ``H⁻¹ ← H⁻¹ − H⁻¹_{:,Q} (H⁻¹_{QQ})⁻¹ H⁻¹_{Q,:}``. Applied to a given removal set the updates end exactly at the
  ``lsq`` solution without intercept (a test checks it); the greedy order is the OBS importance
  (:func:`obs_order`).

Numerics (issue #13 item 4): solves in float64 via Cholesky with the relative damping above. A rank-deficient
``H_{S,S}`` (fewer calibration tokens than kept inputs, or a dead kept input), a Cholesky that fails, a
non-finite result, an estimated condition number above ``MAX_COND``, or a refit whose calibration error exceeds
the plain ``bias`` fit's degrades to ``bias`` with a warning naming the layer — never NaN weights.

Memory: ``H`` is ``d_in²`` (``down_proj``: intermediate², 11008² for a 7B model: 0.48 GB in float32, 0.97 GB in
float64). :class:`Gram` accumulates in float64 up to ``F64_MAX_DIM`` inputs and in float32 above (token blocks of
``TOKEN_BLOCK`` rows, so no float64 copy of the activations); the solve works on ``H_{S,S}`` in the Gram's dtype.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

MODES = ("none", "bias", "lsq", "obs")
DAMP = 0.01                # λ relative to mean(diag H)
MAX_COND = 1e12            # above this estimated condition number of the damped H_SS, fall back to bias
F64_MAX_DIM = 4096         # Gram matrices wider than this accumulate in float32
TOKEN_BLOCK = 4096         # tokens per accumulation block


class ReconstructionWarning(UserWarning):
    """A refit degraded to ``bias`` (singular / ill-conditioned Gram matrix or no gain)."""


@dataclass
class Gram:
    """Running second moments of a projection's inputs ``x`` (and optionally of target inputs ``t`` and of an
    output-space correction ``r``): ``xx = Σ x xᵀ``, ``tx = Σ t xᵀ``, ``rx = Σ r xᵀ``, ``sx = Σ x``, ``st = Σ t``,
    ``sr = Σ r``, ``n`` tokens. Without a target, ``t = x``; the fitted output is then ``W t + r``
    (``r``: e.g. the residual-stream error ``h_dense − h_pruned`` the refit may also absorb)."""

    xx: torch.Tensor | None = None
    tx: torch.Tensor | None = None
    sx: torch.Tensor | None = None
    st: torch.Tensor | None = None
    rx: torch.Tensor | None = None
    sr: torch.Tensor | None = None
    n: int = 0

    def update(self, x: torch.Tensor, t: torch.Tensor | None = None, r: torch.Tensor | None = None) -> None:
        """Add a batch ``x [..., d]`` (its target inputs ``t``, same shape, and output corrections ``r [..., d_out]``),
        one token block at a time."""
        x = x.detach().reshape(-1, x.shape[-1])
        d = x.shape[1]
        dt = torch.float64 if d <= F64_MAX_DIM else torch.float32
        if self.xx is None:
            self.xx = torch.zeros(d, d, dtype=dt, device=x.device)
            self.sx = torch.zeros(d, dtype=torch.float64, device=x.device)
            if t is not None:
                self.tx = torch.zeros(d, d, dtype=dt, device=x.device)
                self.st = torch.zeros(d, dtype=torch.float64, device=x.device)
        if (t is None) != (self.tx is None):
            raise ValueError("Gram.update: give target inputs on every call or on none")
        if t is not None:
            t = t.detach().reshape(-1, d)
        if r is not None:
            r = r.detach().reshape(-1, r.shape[-1])
            if self.rx is None:
                self.rx = torch.zeros(r.shape[1], d, dtype=dt, device=x.device)
                self.sr = torch.zeros(r.shape[1], dtype=torch.float64, device=x.device)
        for a in range(0, x.shape[0], TOKEN_BLOCK):
            xb = x[a:a + TOKEN_BLOCK].to(dt)
            self.xx.addmm_(xb.T, xb)
            self.sx += xb.sum(0, dtype=torch.float64)
            if t is not None:
                tb = t[a:a + TOKEN_BLOCK].to(dt)
                self.tx.addmm_(tb.T, xb)
                self.st += tb.sum(0, dtype=torch.float64)
            if r is not None:
                rb = r[a:a + TOKEN_BLOCK].to(dt)
                self.rx.addmm_(rb.T, xb)
                self.sr += rb.sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    @property
    def cross(self) -> torch.Tensor:
        """``C = Σ t xᵀ`` (``H`` itself without a target)."""
        return self.xx if self.tx is None else self.tx

    def target_cross(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``Σ (W t + r) x_Sᵀ = W C_{:,S} (+ R_{:,S})`` in float64."""
        c = w @ self.cross.index_select(1, keep).double()
        return c if self.rx is None else c + self.rx.index_select(1, keep).double()

    def target_mean_sum(self, w: torch.Tensor) -> torch.Tensor:
        """``Σ (W t + r) = W s_t (+ s_r)``."""
        s = w @ (self.sx if self.st is None else self.st)
        return s if self.sr is None else s + self.sr


@dataclass
class Refit:
    """The kept projection: ``weight [d_out, |S|]``, an additive ``bias [d_out]`` (or None), the mode actually
    used, and the calibration error ``‖W X_t − W' X_S − b‖²`` of the result and of ``none`` (relative to
    ``‖W X_t‖²`` when that is known, else up to a constant)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    mode: str
    error: float
    error_none: float


def _err(w: torch.Tensor, g: Gram, keep: torch.Tensor, ws: torch.Tensor, b: torch.Tensor | None) -> float:
    """``‖W X_t − W'_S X_S − b 1ᵀ‖² − ‖W X_t‖²`` from the moments (float64):
    ``tr(W'H_SS W'ᵀ) − 2 tr(W C_{:,S} W'ᵀ) + 2 bᵀ(W'_S s_S − W s_t) + n‖b‖²``."""
    h = g.xx.index_select(0, keep).index_select(1, keep).double()
    e = ((ws @ h) * ws).sum() - 2 * (g.target_cross(w, keep) * ws).sum()
    if b is not None:
        e = e + 2 * b @ (ws @ g.sx[keep] - g.target_mean_sum(w)) + g.n * (b @ b)
    return float(e)


def _base(w: torch.Tensor, g: Gram) -> float | None:
    """``‖W X_t‖²`` when the target equals the input (else unknown: None)."""
    return float(((w @ g.xx.double()) * w).sum()) if g.tx is None and g.rx is None else None


def bias_fit(w: torch.Tensor, g: Gram, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's compensation, generalised: ``W' = W_{:,S}``, ``b = W x̄_t − W_{:,S} x̄_S`` (float64)."""
    ws = w.index_select(1, keep)
    b = (g.target_mean_sum(w) - ws @ g.sx[keep]) / max(g.n, 1)
    return ws, b


def _chol_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """``rhs · a⁻¹`` for symmetric positive definite ``a`` via Cholesky; None when ``a`` is not (numerically)
    positive definite or its estimated condition number (``(max/min diag L)²``) exceeds ``MAX_COND``."""
    l, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    dg = l.diagonal()
    if not bool(torch.isfinite(dg).all()) or float(dg.min()) <= 0 or (float(dg.max()) / float(dg.min())) ** 2 > MAX_COND:
        return None
    x = torch.cholesky_solve(rhs.T.contiguous(), l).T
    return x if bool(torch.isfinite(x).all()) else None


def lsq_fit(w: torch.Tensor, g: Gram, keep: torch.Tensor, damp: float = DAMP,
            intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Damped least squares (module docstring); None when the system is singular / ill-conditioned."""
    k = keep.numel()
    h = g.xx.index_select(0, keep).index_select(1, keep).double()
    c = g.target_cross(w, keep)
    lam = damp * float(h.diagonal().mean()) if k else 0.0
    if not math.isfinite(lam):
        return None
    if intercept:
        n = float(g.n)
        a = torch.empty(k + 1, k + 1, dtype=torch.float64, device=h.device)
        a[:k, :k] = h
        a[:k, k] = a[k, :k] = g.sx[keep]
        a[k, k] = n
        a[:k, :k].diagonal().add_(lam)
        rhs = torch.cat([c + lam * w.index_select(1, keep), g.target_mean_sum(w)[:, None]], 1)
        x = _chol_solve(a, rhs)
        return None if x is None else (x[:, :k], x[:, k])
    h.diagonal().add_(lam)
    x = _chol_solve(h, c + lam * w.index_select(1, keep))
    return None if x is None else (x, None)


def obs_remove(w: torch.Tensor, g: Gram, remove: list[torch.Tensor], damp: float = DAMP):
    """Apply structured OBS updates removing the column groups ``remove`` (in that order) from ``W``;
    returns the updated full-width ``W`` (removed columns zero) or None when ``H + λI`` is not invertible.
    Equals the damped ``lsq`` refit without intercept on the kept columns (exact arithmetic)."""
    hinv = _damped_inverse(g.xx.double(), damp)
    if hinv is None:
        return None
    w = w.clone()
    for q in remove:
        w, hinv = _obs_step(w, hinv, q)
    return w


def _damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    l, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    hinv = torch.cholesky_inverse(l)
    return hinv if bool(torch.isfinite(hinv).all()) else None


def _obs_step(w: torch.Tensor, hinv: torch.Tensor, q: torch.Tensor):
    """One OBS removal of column group ``q``: ``W −= W_Q (H⁻¹_QQ)⁻¹ H⁻¹_Q,:``, downdate ``H⁻¹``."""
    hq = hinv.index_select(0, q)                                   # H⁻¹_{Q,:}
    iqq = torch.linalg.inv(hq.index_select(1, q))                 # (H⁻¹_QQ)⁻¹
    w = w - (w.index_select(1, q) @ iqq) @ hq
    hinv = hinv - hq.T @ iqq @ hq
    w[:, q] = 0
    hinv[q, :] = 0
    hinv[:, q] = 0
    return w, hinv


def obs_costs(w: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each group (rows of ``groups`` [n_groups, g] index columns):
    ``tr(W_Q (H⁻¹_QQ)⁻¹ W_Qᵀ)`` for every Q at once (batched g×g solves)."""
    blk = hinv[groups[:, :, None], groups[:, None, :]]             # [G, g, g]
    wq = w[:, groups].permute(1, 2, 0)                             # [G, g, d_out]
    return (wq * torch.linalg.solve(blk, wq)).sum((1, 2))


def obs_order(w: torch.Tensor, g: Gram, group_size: int, damp: float = DAMP, max_steps: int = 256,
              name: str = "") -> tuple[list[int], list[float]]:
    """Greedy OBS removal order of the column groups ``[j·size, (j+1)·size)`` of ``W`` (ZipLM / SlimGPT):
    each step removes the cheapest ``ceil(n_groups / max_steps)`` groups (one at a time when there are at most
    ``max_steps``), applies their update and downdates ``H⁻¹``. Returns the group indices in removal order and
    the cost each had when removed (float64, the layer's squared output error it added). On a singular ``H``
    the order falls back to the diagonal OBS cost ``‖W_{:,j}‖² / H⁻¹_jj`` under heavier damping, with a warning."""
    d = w.shape[1]
    n_groups = d // group_size
    groups = torch.arange(d).reshape(n_groups, group_size)
    w = w.double().clone()
    hinv = _damped_inverse(g.xx.double(), damp)
    if hinv is None:
        warnings.warn(f"{name}: H is singular even with damping {damp}; OBS order uses damping 1.0",
                      ReconstructionWarning, stacklevel=2)
        hinv = _damped_inverse(g.xx.double(), 1.0)
        if hinv is None:
            hinv = torch.eye(d, dtype=torch.float64)
    alive = torch.ones(n_groups, dtype=torch.bool)
    order, costs = [], []
    step = max(1, math.ceil(n_groups / max_steps))
    while alive.any():
        idx = alive.nonzero().reshape(-1)
        cost = obs_costs(w, hinv, groups[idx])
        pick = idx[torch.argsort(cost, stable=True)[:step]]
        picked_cost = cost[torch.argsort(cost, stable=True)[:step]]
        order += pick.tolist()
        costs += picked_cost.tolist()
        alive[pick] = False
        if alive.any():
            w, hinv = _obs_step(w, hinv, groups[pick].reshape(-1))
    return order, costs


def _rank_deficient(g: Gram, keep: torch.Tensor) -> str:
    """Why ``H_{S,S}`` is certainly rank-deficient (fewer tokens than kept inputs, or a dead kept input with
    ``H_jj ≤ 1e-12 · max H_jj``), or '' when it is not known to be."""
    if g.n < keep.numel():
        return f"{g.n} calibration tokens for {keep.numel()} kept inputs: H is rank-deficient"
    dg = g.xx.diagonal()[keep].double()
    if keep.numel() and float(dg.min()) <= 1e-12 * float(dg.max()):
        return f"{int((dg <= 1e-12 * dg.max()).sum())} kept input(s) are dead (zero on every calibration token)"
    return ""


def reconstruct(w: torch.Tensor, g: Gram, keep: torch.Tensor, mode: str = "lsq", damp: float = DAMP,
                intercept: bool = True, name: str = "") -> Refit:
    """Refit projection ``w [d_out, d_in]`` on kept input columns ``keep`` with ``mode`` in :data:`MODES`.
    ``obs`` on a given kept set is the ``lsq`` fit without intercept (damping ``λ = damp · mean(diag H)`` of the
    full ``H``), computed by sequential OBS updates.
    Falls back to ``bias`` (warning naming ``name``) when the solve fails or would raise the calibration error."""
    if mode not in MODES:
        raise ValueError(f"reconstruction mode {mode!r} unknown; use one of {', '.join(MODES)}")
    w64 = w.detach().double()
    keep = keep.to(torch.long).to(w.device)
    base = _base(w64, g)
    rel = (lambda e: (e + base) / base) if base else (lambda e: e)
    ws0 = w64.index_select(1, keep)
    e_none = rel(_err(w64, g, keep, ws0, None))
    if mode == "none" or keep.numel() == w.shape[1]:   # nothing removed: nothing to repair
        return Refit(ws0.to(w.dtype), None, "none", e_none, e_none)
    wb, bb = bias_fit(w64, g, keep)
    e_bias = rel(_err(w64, g, keep, wb, bb))
    fit = None
    deficient = _rank_deficient(g, keep)
    if deficient:
        fit = None
    elif mode == "lsq":
        fit = lsq_fit(w64, g, keep, damp, intercept)
    elif mode == "obs":
        removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        removed[keep] = False
        full = obs_remove(w64, g, [removed.nonzero().reshape(-1)], damp) if removed.any() else w64
        fit = None if full is None else (full.index_select(1, keep), None)
    if fit is not None:
        e_fit = rel(_err(w64, g, keep, fit[0], fit[1]))
        if math.isfinite(e_fit) and e_fit <= e_bias + 1e-12 * abs(e_bias):
            return _out(fit[0], fit[1], w.dtype, mode, e_fit, e_none)
        reason = f"its calibration error {e_fit:.4g} is not below bias's {e_bias:.4g}"
    elif mode != "bias":
        reason = deficient or "its damped Gram matrix is singular or ill-conditioned"
    if mode != "bias":
        warnings.warn(f"{name or 'projection'}: {mode} refit skipped ({reason}); using bias compensation",
                      ReconstructionWarning, stacklevel=2)
    if e_bias > e_none:   # bias can only lose against none through a degenerate target; never worse than none
        return _out(ws0, None, w.dtype, "none", e_none, e_none)
    return _out(wb, bb, w.dtype, "bias", e_bias, e_none)


def _out(ws, b, dtype, mode, e, e_none) -> Refit:
    ws = ws.to(dtype)
    b = None if b is None else b.to(dtype)
    if not bool(torch.isfinite(ws).all()) or (b is not None and not bool(torch.isfinite(b).all())):
        raise FloatingPointError(f"{mode} refit produced non-finite weights")  # guarded above; never expected
    return Refit(ws, b, mode, e, e_none)
