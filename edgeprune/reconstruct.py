"""Weight reconstruction after structured removal: refit an output-side projection on its kept input columns.

Removing input columns ``R`` of an output projection ``W`` (``o_proj``: the columns of whole head groups;
``down_proj``: MLP channels) changes its output by ``W_{:,R} X_R``. With calibration inputs ``X`` (one column per
token) the kept columns ``S`` can absorb part of it. The refit aims at a *target output* ``Y = W X_t + R``: the
dense output ``W X`` by default; under sequential calibration ``X`` comes from the already pruned layers before
while ``X_t`` are the dense model's inputs, and ``R`` may add an output-space correction (e.g. the residual-stream
error ``h_dense − h_pruned`` the earlier layers left). Pure numerics, torch (+ LAPACK through scipy); the engine's
repair stage supplies the statistics (:class:`RefitStats`) and applies the result.

* ``none`` — ``W' = W_{:,S}``.
* ``bias`` (FLAP, arXiv 2312.11983, generalised to a target): ``W' = W_{:,S}``, ``b = mean(Y − W_{:,S} X_S)``
  (``= W_{:,R} x̄_R`` when ``Y = W X``): restores the removed inputs' mean.
* ``lsq`` (OSSCAR's final refit, arXiv 2403.12983; SlimLLM's regression, arXiv 2505.22689): the minimiser of
  ``‖Y − W'_S X_S − b 1ᵀ‖² + λ‖W'_S − W_{:,S}‖²``, i.e. with ``x̃ = [x_S; 1]`` (the intercept as a constant
  input, unpenalised), ``A = Σ x̃ x̃ᵀ`` and ``B = Σ y x̃ᵀ``: ``[W'_S, b] = (B + λ[W_S, 0]) (A + λĨ)⁻¹``
  (``Ĩ``: identity on the first ``k`` inputs). For ``Y = W X`` and λ = 0 this is ``W H_{:,S} H_{S,S}⁻¹`` with
  ``H = X Xᵀ`` (and the intercept). The damping pulls toward the original weights (not toward zero, as a plain
  ridge would), so keeping every column returns ``W`` exactly, and the result is the fixed point of the damped
  OBS updates below. ``λ = damp · mean(diag H_{S,S})`` [R: our choice of prior; the papers damp ``H`` the same
  way].
* ``obs`` (SlimGPT, arXiv 2412.18110; ZipLM, arXiv 2302.04089): greedy structured Optimal Brain Surgeon on
  ``H⁻¹ = (H + λI)⁻¹``. Removing group ``Q`` costs ``Σ_rows w_Q (H⁻¹_{QQ})⁻¹ w_Qᵀ`` (the output error after the
  optimal update of the rest); the survivors move by ``δW = −W_{:,Q} (H⁻¹_{QQ})⁻¹ H⁻¹_{Q,:}`` and
  ``H⁻¹ ← H⁻¹ − H⁻¹_{:,Q} (H⁻¹_{QQ})⁻¹ H⁻¹_{Q,:}``. Applied to a given removal set the updates end exactly at the
  ``lsq`` solution without intercept (a test checks it); the greedy order is the OBS importance
  (:func:`obs_order`). As a refit mode it needs the full ``d_in²`` Gram matrix and its inverse (not bounded
  below; use ``lsq`` at scale).

Calibration errors ``‖Y − W'_S X_S − b 1ᵀ‖²`` are reported relative to ``‖Y‖²``. ``none``'s error ``e₀`` and the
residual sum ``Σ (y − W_S x_S)`` are accumulated directly (so ``bias`` costs nothing: ``e_bias = e₀ − n‖b‖²``);
the ``lsq`` error follows from the normal equations without touching ``A`` again:
``e = ‖Y‖² − tr((B + λW̃_S) Ṽᵀ) + λ(2 tr(W_S V'ᵀ) − ‖V'‖²)`` with ``Ṽ = [V', b]``.

Numerics (issue #13 item 4): a Cholesky solve with the relative damping above, in float64 when ``k ≤
F64_MAX_DIM`` kept inputs and in float32 above. A rank-deficient ``H_{S,S}`` (fewer calibration tokens than kept
inputs, or a dead kept input), a Cholesky that fails, a non-finite result, an estimated condition number above
``MAX_COND``, or a refit whose calibration error exceeds the plain ``bias`` fit's degrades to ``bias`` with a
warning naming the layer — never NaN weights.

**Memory bound** (issue #13 item 5). Only the kept inputs' statistics are ever formed — never the full
``d_in × d_in`` Gram matrix nor an input-space cross moment: for ``k`` kept of ``d_in`` inputs and ``d_out``
outputs, with ``s = 8`` bytes (``k ≤ F64_MAX_DIM``) or 4 (above),

    refit bytes ≈ s·(k+1)² (A) + s·d_out·(k+1) (B) + O(s·BLOCK_ELEMS) (transient blocks)

The Cholesky factor overwrites ``A`` (LAPACK ``potrf`` in place) and the solution overwrites ``B`` one block of
output rows at a time (``potrs`` in place), so the solve adds only blocks. The target outputs ``y = W t + r``
are formed one token block at a time with ``W`` cast one block of rows at a time (``W`` itself is never copied
whole). For ``down_proj`` (``d_in`` = intermediate ``I``, ``d_out`` = hidden ``H``): at most
``4(I+1)² + 4H(I+1)`` bytes when ``I > 4096``; LLaMA-7B (``H`` = 4096, ``I`` = 11008) keeping 80 % of the
channels: 310 MB + 144 MB (at most 485 + 180 MB); ``o_proj`` (``d_in`` = heads·head_dim ≤ 4096, float64):
``8(k+1)² + 8H(k+1)`` ≤ 134 + 134 MB. The refit statistics of one projection live only while that projection is
repaired.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

MODES = ("none", "bias", "lsq", "obs")
DAMP = 0.01                # λ relative to mean(diag H)
MAX_COND = 1e12            # above this estimated condition number of the damped H_SS, fall back to bias
F64_MAX_DIM = 4096         # statistics wider than this many inputs are kept in float32
TOKEN_BLOCK = 4096         # tokens per Gram accumulation block
BLOCK_ELEMS = 1 << 22      # elements of one transient block of the refit (token blocks, rows of W, solve rows)


class ReconstructionWarning(UserWarning):
    """A refit degraded to ``bias`` (singular / ill-conditioned Gram matrix or no gain)."""


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``, by two reductions (``torch.isfinite`` would allocate ``|t|`` and two masks: 1.7×
    the tensor, 0.8 GB for a 7B down_proj Gram)."""
    return t.numel() == 0 or (math.isfinite(float(t.amax())) and math.isfinite(float(t.amin())))


def stat_dtype(d: int) -> torch.dtype:
    """Accumulation dtype of statistics over ``d`` inputs: float64 up to ``F64_MAX_DIM``, float32 above."""
    return torch.float64 if d <= F64_MAX_DIM else torch.float32


@dataclass
class Gram:
    """Running second moment ``xx = H = Σ x xᵀ`` of a projection's (full) inputs over ``n`` tokens, accumulated
    one token block at a time (at most ``BLOCK_ELEMS`` converted elements; no float64 copy of the activations)
    — the OBS importance's statistic."""

    xx: torch.Tensor | None = None
    n: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.xx is None:
            self.xx = torch.zeros(x.shape[1], x.shape[1], dtype=stat_dtype(x.shape[1]), device=x.device)
        step = max(1, min(TOKEN_BLOCK, BLOCK_ELEMS // x.shape[1]))
        for a in range(0, x.shape[0], step):
            xb = x[a:a + step].to(self.xx.dtype)
            self.xx.addmm_(xb.T, xb)
        self.n += x.shape[0]


class RefitStats:
    """The sufficient statistics of a refit of ``w [d_out, d_in]`` on the kept inputs ``keep`` (``k`` of them)
    toward the target outputs ``y = W t + r`` (module docstring): ``a = Σ x̃ x̃ᵀ`` ``[(k+1)²]``, ``b = Σ y x̃ᵀ``
    ``[d_out, k+1]`` (``x̃ = [x_S; 1]``), ``yy = Σ‖y‖²``, ``e0 = Σ‖y − W_S x_S‖²``, ``s0 = Σ (y − W_S x_S)``, ``n``
    tokens. ``w`` is referenced, not copied. ``full=True`` also keeps the full :class:`Gram` (the ``obs`` mode)."""

    def __init__(self, w: torch.Tensor, keep: torch.Tensor, full: bool = False):
        self.w = w.detach()
        self.keep = keep.to(torch.long).to(w.device)
        k, (d_out, d_in), dev = self.keep.numel(), self.w.shape, w.device
        self.dtype = stat_dtype(k)
        self.a = torch.zeros(k + 1, k + 1, dtype=self.dtype, device=dev)
        self.b = torch.zeros(d_out, k + 1, dtype=self.dtype, device=dev)
        self.s0 = torch.zeros(d_out, dtype=torch.float64, device=dev)
        self.yy = self.e0 = 0.0
        self.n = 0
        self.mask = torch.zeros(d_in, dtype=self.dtype, device=dev)
        self.mask[self.keep] = 1
        self.full = Gram() if full else None

    @property
    def k(self) -> int:
        return self.keep.numel()

    def update(self, x: torch.Tensor, t: torch.Tensor | None = None, r: torch.Tensor | None = None) -> None:
        """Add a batch of inputs ``x [..., d_in]``, their target inputs ``t`` (same shape; default ``x``) and output
        corrections ``r [..., d_out]`` (default none), one token block at a time."""
        x = x.detach().reshape(-1, x.shape[-1])
        t = x if t is None else t.detach().reshape(-1, x.shape[1])
        r = None if r is None else r.detach().reshape(-1, self.w.shape[0])
        if self.full is not None:
            self.full.update(x)
        step = max(64, BLOCK_ELEMS // max(self.w.shape))
        for a in range(0, x.shape[0], step):
            self._block(x[a:a + step], t[a:a + step], None if r is None else r[a:a + step])
        self.n += x.shape[0]

    def _block(self, xb: torch.Tensor, tb: torch.Tensor, rb: torch.Tensor | None) -> None:
        dt, k = self.dtype, self.k
        xb = xb.to(dt)
        y, z = self.apply_w(tb.to(dt), xb * self.mask)        # W t and W_S x_S
        if rb is not None:
            y += rb.to(dt)
        u = y - z
        self.yy += float(y.pow(2).sum(dtype=torch.float64))
        self.e0 += float(u.pow(2).sum(dtype=torch.float64))
        self.s0 += u.sum(0, dtype=torch.float64)
        del u, z
        xt = torch.empty(xb.shape[0], k + 1, dtype=dt, device=xb.device)
        xt[:, :k] = xb.index_select(1, self.keep)
        xt[:, k] = 1
        self.a.addmm_(xt.T, xt)
        self.b.addmm_(y.T, xt)

    def apply_w(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """``u Wᵀ`` for each ``u [n, d_in]`` (in the statistics' dtype), ``W`` cast one block of rows at a time."""
        d_out, d_in = self.w.shape
        rows = max(1, BLOCK_ELEMS // d_in)
        outs = [torch.empty(u.shape[0], d_out, dtype=self.dtype, device=u.device) for u in inputs]
        for r0 in range(0, d_out, rows):
            wr = self.w[r0:r0 + rows].to(self.dtype)
            for u, o in zip(inputs, outs):
                o[:, r0:r0 + rows] = u @ wr.T
        return outs

    def kept_rows(self, r0: int, r1: int) -> torch.Tensor:
        """``W_{r0:r1, S}`` in the statistics' dtype."""
        return self.w[r0:r1].index_select(1, self.keep).to(self.dtype)


@dataclass
class Refit:
    """The kept projection: ``weight [d_out, |S|]``, an additive ``bias [d_out]`` (or None), the mode actually
    used, and the calibration error ``‖Y − W' X_S − b‖² / ‖Y‖²`` of the result and of ``none``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    mode: str
    error: float
    error_none: float


def bias_fit(st: RefitStats) -> tuple[torch.Tensor, float]:
    """FLAP's compensation, generalised: ``b = mean(y − W_S x_S)`` (float64) and its error ``e₀ − n‖b‖²``."""
    b = st.s0 / max(st.n, 1)
    return b, st.e0 - float(st.s0 @ b)


def _rows(st: RefitStats) -> int:
    return max(1, BLOCK_ELEMS // (st.k + 1))


def fit_error(st: RefitStats, v: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``‖Y − V X_S − b 1ᵀ‖² = ‖Y‖² − 2 tr(B Ṽᵀ) + tr(Ṽ A Ṽᵀ)`` from the statistics (``Ṽ = [V, b]``; ``A``, ``B``
    intact), one block of output rows at a time."""
    k, e = st.k, st.yy
    for r0 in range(0, v.shape[0], _rows(st)):
        r1 = min(r0 + _rows(st), v.shape[0])
        vb = torch.zeros(r1 - r0, k + 1, dtype=st.dtype, device=v.device)
        vb[:, :k] = v[r0:r1]
        if bias is not None:
            vb[:, k] = bias[r0:r1]
        e += float(((vb @ st.a) * vb).sum(dtype=torch.float64)) - 2 * float((st.b[r0:r1] * vb).sum(dtype=torch.float64))
    return e


def _cholesky_inplace(a: torch.Tensor) -> bool:
    """Factor the symmetric ``a`` in place (``a = L Lᵀ``, ``L`` in ``a``'s upper triangle read as a transpose:
    LAPACK ``potrf`` on the Fortran view); False when ``a`` is not (numerically) positive definite or its estimated
    condition number ``(max/min diag L)²`` exceeds ``MAX_COND``."""
    if a.device.type == "cpu":
        from scipy.linalg import get_lapack_funcs

        an = a.numpy()
        (potrf,) = get_lapack_funcs(("potrf",), (an,))
        c, info = potrf(an.T, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return False
        if not __import__("numpy").shares_memory(c, an):
            a.copy_(torch.from_numpy(c.T))
    else:   # accelerator: torch's Cholesky (a copy), stored the same way
        l, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return False
        a.copy_(l.T)
    dg = a.diagonal()
    return bool(torch.isfinite(dg).all()) and float(dg.min()) > 0 and (float(dg.max()) / float(dg.min())) ** 2 <= MAX_COND


def _solve_inplace(a: torch.Tensor, rhs: torch.Tensor) -> None:
    """``rhs ← rhs · A⁻¹`` for ``a`` factored by :func:`_cholesky_inplace` (``rhs`` C-contiguous rows)."""
    if a.device.type == "cpu":
        from scipy.linalg import get_lapack_funcs

        an, bn = a.numpy(), rhs.numpy()
        (potrs,) = get_lapack_funcs(("potrs",), (an,))
        x, _ = potrs(an.T, bn.T, lower=1, overwrite_b=1)
        if not __import__("numpy").shares_memory(x, bn):
            rhs.copy_(torch.from_numpy(x.T))
    else:
        rhs.copy_(torch.cholesky_solve(rhs.T, a.T, upper=False).T)


@dataclass
class Fit:
    weight: torch.Tensor                   # [d_out, k] in the statistics' dtype
    bias: torch.Tensor | None
    error: float                           # absolute calibration error


def lsq_fit(st: RefitStats, damp: float = DAMP, intercept: bool = True, inplace: bool = False) -> Fit | None:
    """Damped least squares (module docstring); None when the system is singular / ill-conditioned. With
    ``inplace`` the factor overwrites ``st.a`` and the solution ``st.b`` (the statistics are used up)."""
    k = st.k
    a = st.a if intercept else st.a[:k, :k]
    b = st.b if intercept else st.b[:, :k]
    a = a if inplace and a.is_contiguous() else a.clone(memory_format=torch.contiguous_format)
    b = b if inplace and b.is_contiguous() else b.clone(memory_format=torch.contiguous_format)
    lam = damp * float(a.diagonal()[:k].mean()) if k else 0.0
    if not math.isfinite(lam):
        return None
    a.diagonal()[:k].add_(lam)
    if not _cholesky_inplace(a):
        return None
    err = st.yy
    for r0 in range(0, b.shape[0], _rows(st)):
        rhs = b[r0:r0 + _rows(st)]
        ws = st.kept_rows(r0, r0 + rhs.shape[0])
        rhs[:, :k].add_(ws, alpha=lam)
        before = rhs.clone()
        _solve_inplace(a, rhs)
        if not bool(torch.isfinite(rhs).all()):
            return None
        v = rhs[:, :k]
        err += (-float((before * rhs).sum(dtype=torch.float64))
                + lam * (2 * float((ws * v).sum(dtype=torch.float64)) - float(v.pow(2).sum(dtype=torch.float64))))
    if not math.isfinite(err):
        return None
    return Fit(b[:, :k], b[:, k] if intercept else None, err)


def obs_fit(st: RefitStats, damp: float = DAMP) -> Fit | None:
    """The ``obs`` mode: structured OBS updates removing every non-kept column of the full ``H`` (``st.full``)."""
    if st.full is None:
        raise ValueError("obs refit needs the full Gram matrix: build RefitStats(..., full=True)")
    removed = torch.ones(st.w.shape[1], dtype=torch.bool, device=st.w.device)
    removed[st.keep] = False
    full = obs_remove(st.w.double(), st.full, [removed.nonzero().reshape(-1)], damp)
    if full is None:
        return None
    v = full.index_select(1, st.keep).to(st.dtype)
    return Fit(v, None, fit_error(st, v, None))


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


def _obs_inverse(g: Gram, damp: float, name: str) -> torch.Tensor:
    """``(H + λI)⁻¹`` for :func:`obs_order`. Float64 statistics are copied; when singular, damping 1.0, then
    ``I`` (magnitude cost). Float32 ones (wider than ``F64_MAX_DIM``) are inverted in place, using ``g.xx`` up;
    when singular, the diagonal ``(diag H + mean(diag H))⁻¹`` (the diagonal OBS cost under damping 1.0)."""
    if g.xx.dtype == torch.float64:
        hinv = _damped_inverse(g.xx, damp)
        if hinv is None:
            warnings.warn(f"{name}: H is singular even with damping {damp}; OBS order uses damping 1.0",
                          ReconstructionWarning, stacklevel=3)
            hinv = _damped_inverse(g.xx, 1.0)
        return hinv if hinv is not None else torch.eye(g.xx.shape[0], dtype=torch.float64, device=g.xx.device)
    h, g.xx = g.xx, None
    dg = h.diagonal().clone()
    if not _inverse_inplace(h, damp):
        warnings.warn(f"{name}: H is singular even with damping {damp}; OBS order uses the diagonal cost under "
                      "damping 1.0", ReconstructionWarning, stacklevel=3)
        h.zero_()
        h.diagonal().copy_(1 / (dg + max(float(dg.mean()), 1e-30)))
    return h


def _inverse_inplace(h: torch.Tensor, damp: float) -> bool:
    """``h ← (h + λI)⁻¹`` in place: :func:`_cholesky_inplace`, then LAPACK ``potri`` on the factor (torch's
    ``cholesky_inverse`` off the CPU) and one triangle mirrored block by block; False (``h`` overwritten) when
    the factorisation fails or the inverse is not finite."""
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    if not _cholesky_inplace(h):
        return False
    if h.device.type != "cpu":
        h.copy_(torch.cholesky_inverse(h, upper=True))              # the factor is stored as Lᵀ
        return _finite(h)
    import numpy as np
    from scipy.linalg import get_lapack_funcs

    hn = h.numpy()
    (potri,) = get_lapack_funcs(("potri",), (hn,))
    c, info = potri(hn.T, lower=1, overwrite_c=1)                  # Fortran lower = the C view's upper triangle
    if info != 0:
        return False
    if not np.shares_memory(c, hn):
        hn[...] = c.T
    blk = 1024
    for i0 in range(0, h.shape[0], blk):                            # upper triangle -> lower, block by block
        i1 = min(i0 + blk, h.shape[0])
        d = h[i0:i1, i0:i1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        h[i1:, i0:i1] = h[i0:i1, i1:].T
    return _finite(h)


def _damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    l, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    hinv = torch.cholesky_inverse(l)
    return hinv if _finite(hinv) else None


def _obs_step(w: torch.Tensor, hinv: torch.Tensor, q: torch.Tensor):
    """One OBS removal of column group ``q``, in place: ``W −= W_Q (H⁻¹_QQ)⁻¹ H⁻¹_Q,:``, downdate ``H⁻¹``."""
    hq = hinv.index_select(0, q)                                   # H⁻¹_{Q,:}
    iqq = torch.linalg.inv(hq.index_select(1, q))                 # (H⁻¹_QQ)⁻¹
    _sub_product(w, w.index_select(1, q) @ iqq, hq)
    _sub_product(hinv, hq.T @ iqq, hq)
    w[:, q] = 0
    hinv[q, :] = 0
    hinv[:, q] = 0
    return w, hinv


def _sub_product(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``m −= a @ b`` in place, ``BLOCK_ELEMS`` elements of ``m`` at a time (no temporary as large as ``m``)."""
    rows = max(1, BLOCK_ELEMS // m.shape[1])
    for r0 in range(0, m.shape[0], rows):
        m[r0:r0 + rows].sub_(a[r0:r0 + rows] @ b)


def obs_costs(w: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each group (rows of ``groups`` [n_groups, g] index columns):
    ``tr(W_Q (H⁻¹_QQ)⁻¹ W_Qᵀ)`` for every Q (batched g×g solves, ``BLOCK_ELEMS`` weights at a time)."""
    per = max(1, BLOCK_ELEMS // (groups.shape[1] * w.shape[0]))
    out = []
    for c in groups.split(per):
        blk = hinv[c[:, :, None], c[:, None, :]]                   # [G, g, g]
        wq = w[:, c].permute(1, 2, 0)                              # [G, g, d_out]
        sol = wq * (1 / blk) if groups.shape[1] == 1 else torch.linalg.solve(blk, wq)   # 1×1: LAPACK solves by the reciprocal
        out.append((wq * sol).sum((1, 2)))
    return torch.cat(out)


def obs_order(w: torch.Tensor, g: Gram, group_size: int, damp: float = DAMP, max_steps: int = 256,
              name: str = "") -> tuple[list[int], list[float]]:
    """Greedy OBS removal order of the column groups ``[j·size, (j+1)·size)`` of ``W`` (ZipLM / SlimGPT):
    each step removes the cheapest ``ceil(n_groups / max_steps)`` groups (one at a time when there are at most
    ``max_steps``), applies their update and downdates ``H⁻¹``. Returns the group indices in removal order and
    the cost each had when removed (the layer's squared output error it added), in the Gram's dtype (float64 up
    to ``F64_MAX_DIM`` inputs; above, float32 and in place: the Gram is used up, and the working memory is one
    ``d²`` matrix plus a copy of ``W``). A singular ``H`` degrades with a warning (:func:`_obs_inverse`)."""
    d = w.shape[1]
    n_groups = d // group_size
    groups = torch.arange(d).reshape(n_groups, group_size)
    w = w.to(g.xx.dtype, copy=True)
    hinv = _obs_inverse(g, damp, name)
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


def _rank_deficient(st: RefitStats) -> str:
    """Why ``H_{S,S}`` is certainly rank-deficient (fewer tokens than kept inputs, or a dead kept input with
    ``H_jj ≤ 1e-12 · max H_jj``), or '' when it is not known to be."""
    k = st.k
    if st.n < k:
        return f"{st.n} calibration tokens for {k} kept inputs: H is rank-deficient"
    dg = st.a.diagonal()[:k].double()
    if k and float(dg.min()) <= 1e-12 * float(dg.max()):
        return f"{int((dg <= 1e-12 * dg.max()).sum())} kept input(s) are dead (zero on every calibration token)"
    return ""


def reconstruct(st: RefitStats, mode: str = "lsq", damp: float = DAMP, intercept: bool = True,
                name: str = "") -> Refit:
    """Refit ``st.w`` on its kept input columns ``st.keep`` with ``mode`` in :data:`MODES` (module docstring);
    ``lsq`` uses the statistics up (factor and solution in place). ``obs`` on a given kept set is the ``lsq`` fit
    without intercept (damping ``λ = damp · mean(diag H)`` of the full ``H``), computed by OBS updates.
    Falls back to ``bias`` (warning naming ``name``) when the solve fails or would raise the calibration error."""
    if mode not in MODES:
        raise ValueError(f"reconstruction mode {mode!r} unknown; use one of {', '.join(MODES)}")
    w, keep = st.w, st.keep
    rel = (lambda e: e / st.yy) if st.yy > 0 else (lambda e: e)
    e_none = rel(st.e0)
    if mode == "none" or keep.numel() == w.shape[1]:   # nothing removed: nothing to repair
        return Refit(w.index_select(1, keep), None, "none", e_none, e_none)
    bb, eb = bias_fit(st)
    e_bias = rel(eb)
    deficient = _rank_deficient(st)
    fit = None
    if not deficient and mode == "lsq":
        fit = lsq_fit(st, damp, intercept, inplace=True)
    elif not deficient and mode == "obs":
        fit = obs_fit(st, damp)
    if fit is not None:
        e_fit = rel(fit.error)
        if math.isfinite(e_fit) and e_fit <= e_bias + 1e-12 * abs(e_bias):
            return _out(fit.weight, fit.bias, w.dtype, mode, e_fit, e_none)
        reason = f"its calibration error {e_fit:.4g} is not below bias's {e_bias:.4g}"
    elif mode != "bias":
        reason = deficient or "its damped Gram matrix is singular or ill-conditioned"
    if mode != "bias":
        warnings.warn(f"{name or 'projection'}: {mode} refit skipped ({reason}); using bias compensation",
                      ReconstructionWarning, stacklevel=2)
    ws = w.index_select(1, keep)
    if e_bias > e_none:   # bias can only lose against none through rounding; never worse than none
        return _out(ws, None, w.dtype, "none", e_none, e_none)
    return _out(ws, bb, w.dtype, "bias", e_bias, e_none)


def _out(ws, b, dtype, mode, e, e_none) -> Refit:
    ws = ws.to(dtype).contiguous()         # a refit is a view of the solved B: its own (kept-size) matrix
    b = None if b is None else b.to(dtype).contiguous()
    if not _finite(ws) or (b is not None and not _finite(b)):
        raise FloatingPointError(f"{mode} refit produced non-finite weights")  # guarded above; never expected
    return Refit(ws, b, mode, e, e_none)
