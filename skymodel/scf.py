"""Source-count functions: broken power laws with any number of breaks (NPTFit convention).

    dN/dS = A (S/S_b1)^-n1                          S >= S_b1
          = A (S/S_b1)^-n2                          S_b2 <= S < S_b1
          = A (S_b2/S_b1)^-n2 (S/S_b2)^-n3          S_b3 <= S < S_b2     ... (continuous)

S is in counts (expected photons from one source at the mean exposure); A multiplies the
per-pixel source-density template, so every quantity below is per unit template.

The generating-function terms of the NPTF likelihood (SCIENCE.md),

    x_m     = sum_i w_i f_i integral dS dN/dS (f_i S)^m e^(-f_i S) / m!     m = 1..m_max
    x_total = sum_i w_i f_i integral dS dN/dS (1 - e^(-f_i S))            (= sum_m x_m)

with a PSF-correction table (f_i, w_i = df_i rho(f_i) / f_i, NPTFit's df_rho_div_f, so that
w_i f_i = df_i rho(f_i) is the PSF measure), are evaluated exactly: per
power-law segment the S-integral is an incomplete gamma function of order m + 1 - n
(possibly negative), see `skymodel._special`. No S-grid, no cut-off.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammainc, gammaincc, gammaln

from skymodel._special import (
    Y_SPLIT,
    _cf_upper,
    _interval_small_a,
    _one_minus_exp_interval,
    _power_interval,
)
from skymodel._types import Array, ArrayLike, Float


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _segments(indices, breaks):
    """Per segment j (highest S first): lower and upper edge in S, pivot P_j and
    log v_j, where dN/dS / A = v_j (S / P_j)^(-n_j) on the segment."""
    lower = jnp.concatenate([breaks, jnp.zeros((1,), breaks.dtype)])
    upper = jnp.concatenate([jnp.full((1,), jnp.inf, breaks.dtype), breaks])
    pivot = jnp.concatenate([breaks[:1], breaks])
    # log v_1 = log v_2 = 0; log v_{j+1} = log v_j - n_j log(S_b{j} / S_b{j-1}), j >= 2
    steps = -indices[1:-1] * (jnp.log(breaks[1:]) - jnp.log(breaks[:-1]))
    logv = jnp.concatenate([jnp.zeros((2,), breaks.dtype), jnp.cumsum(steps)])
    return lower, upper, pivot, logv


def _check_traced(A, indices, breaks):
    bad = (
        ~(A >= 0)
        | ~(indices[0] > 2)
        | ~(indices[-1] < 2)
        | jnp.any(~(breaks > 0))
        | jnp.any(~(breaks[1:] < breaks[:-1]))
        | jnp.any(~jnp.isfinite(indices))
        | jnp.any(~jnp.isfinite(breaks))
        | ~jnp.isfinite(A)
    )
    return eqx.error_if(
        A,
        bad,
        "invalid broken power law: need A >= 0, n1 > 2, last index < 2, "
        "breaks positive and strictly decreasing",
    )


def _check_concrete(A, indices, breaks):
    A_ = np.asarray(A)
    n_ = np.asarray(indices)
    b_ = np.asarray(breaks)
    if not np.isfinite(A_) or A_ < 0:
        raise ValueError(f"BrokenPowerLaw needs a finite amplitude A >= 0, got A={A_}")
    if not np.all(np.isfinite(n_)):
        raise ValueError(f"BrokenPowerLaw indices must be finite, got {n_}")
    if not n_[0] > 2:
        raise ValueError(
            f"BrokenPowerLaw needs the first (highest-S) index n1 > 2 for a finite total "
            f"flux, got n1={n_[0]}"
        )
    if not n_[-1] < 2:
        raise ValueError(
            f"BrokenPowerLaw needs the last (lowest-S) index < 2 for a finite total flux, "
            f"got {n_[-1]}"
        )
    if not np.all(np.isfinite(b_)) or not np.all(b_ > 0):
        raise ValueError(f"BrokenPowerLaw breaks must be positive and finite, got {b_}")
    if not np.all(np.diff(b_) < 0):
        raise ValueError(
            f"BrokenPowerLaw breaks must be strictly decreasing (S_b1 > S_b2 > ...), got {b_}"
        )


def _check_shapes(indices, breaks):
    if jnp.ndim(indices) != 1 or jnp.ndim(breaks) != 1:
        raise ValueError(
            f"indices and breaks must be 1-d, got shapes {jnp.shape(indices)} and "
            f"{jnp.shape(breaks)}"
        )
    if jnp.shape(breaks)[0] < 1:
        raise ValueError("a broken power law needs at least one break")
    if jnp.shape(indices)[0] != jnp.shape(breaks)[0] + 1:
        raise ValueError(
            f"need len(indices) == len(breaks) + 1, got {jnp.shape(indices)[0]} indices "
            f"and {jnp.shape(breaks)[0]} breaks"
        )


def _f64(x):
    return jnp.asarray(x, dtype=jnp.float64)


#: Default bound on the indices when they are traced and no `max_index` is given: orders
#: m <= max_index are computed by the small-order method (see `_generating_terms`).
DEFAULT_MAX_INDEX = 40.0


def _direct_orders(indices, m_max: int, max_index) -> int:
    """Static number K of low orders m = 1..K handled by the small-order method: every m
    with a = m + 1 - n <= 1 for some segment must be <= K."""
    if max_index is None:
        if _is_concrete(indices):
            max_index = float(np.max(np.asarray(indices)))
        else:
            max_index = DEFAULT_MAX_INDEX
    return int(min(m_max, max(1, math.floor(float(max_index)))))


def generating_terms(
    A: Float[ArrayLike, ""] | float,
    indices: Float[ArrayLike, " nseg"] | Sequence[float],
    breaks: Float[ArrayLike, " nbreak"] | Sequence[float],
    f: Float[ArrayLike, " nf"] | Sequence[float],
    weights: Float[ArrayLike, " nf"] | Sequence[float],
    m_max: int,
    ratio: Float[ArrayLike, ""] | float = 1.0,
    max_index: float | None = None,
) -> tuple[Float[Array, " nm"], Float[Array, ""]]:
    """x_m (m = 1..m_max, shape (m_max,)) and x_total = sum_{m>=1} x_m, per unit template.

    A, indices (n1..n_{B+1}), breaks (S_b1 > ... > S_bB, counts): the broken power law;
    (f, weights): PSF-correction table (fraction of flux in the pixel, df rho(f) / f);
    the delta PSF is f = [1], weights = [1].
    ratio: exposure-region ratio eps_r / mean eps (breaks * ratio, A / ratio).
    max_index: a static upper bound on the indices (e.g. a prior's upper edge); needed
    only when the indices are traced and may exceed DEFAULT_MAX_INDEX.
    Exact (incomplete gamma functions), differentiable in A, indices, breaks, f, ratio.
    """
    m_max = int(m_max)
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    A = _f64(A)
    indices = _f64(indices)
    breaks = _f64(breaks)
    f = _f64(f)
    weights = _f64(weights)
    ratio = _f64(ratio)
    _check_shapes(indices, breaks)
    if jnp.ndim(f) != 1 or jnp.shape(f) != jnp.shape(weights) or jnp.shape(f)[0] < 1:
        raise ValueError(
            f"PSF table f and weights must be 1-d of equal, nonzero length, got shapes "
            f"{jnp.shape(f)} and {jnp.shape(weights)}"
        )
    if jnp.ndim(A) != 0 or jnp.ndim(ratio) != 0:
        raise ValueError(
            f"A and ratio must be scalars, got shapes {jnp.shape(A)}, {jnp.shape(ratio)}"
        )
    if _is_concrete(A, indices, breaks):
        _check_concrete(A, indices, breaks)
    if _is_concrete(f, weights, ratio):
        if not (np.all(np.asarray(f) > 0) and np.all(np.isfinite(np.asarray(f)))):
            raise ValueError(f"PSF-correction fractions f must be positive, got {np.asarray(f)}")
        if not np.all(np.asarray(weights) >= 0):
            raise ValueError(f"PSF-correction weights must be >= 0, got {np.asarray(weights)}")
        if not (np.asarray(ratio) > 0 and np.isfinite(np.asarray(ratio))):
            raise ValueError(f"exposure ratio must be positive, got {np.asarray(ratio)}")
    K = _direct_orders(indices, m_max, max_index)
    if K < m_max:
        # orders m <= n (a <= 1) must all lie in the small-order block 1..K
        if _is_concrete(indices) and np.max(np.asarray(indices)) >= K + 1:
            raise ValueError(
                f"indices {np.asarray(indices)} exceed max_index={max_index} (pass a larger "
                f"max_index)"
            )
        indices = eqx.error_if(
            indices,
            jnp.any(indices >= K + 1),
            f"an SCF index exceeds its static bound max_index={K} (pass a larger max_index)",
        )
    A = _check_traced(A, indices, breaks)
    f = eqx.error_if(f, jnp.any(~(f > 0)), "PSF-correction fractions f must be positive")
    ratio = eqx.error_if(ratio, ~(ratio > 0), "exposure ratio must be positive")
    return _generating_terms(A, indices, breaks, f, weights, m_max, ratio, K)


def _safe(cond, x, fill):
    """x where cond, else `fill` (for the double-where trick)."""
    return jnp.where(cond, x, fill)


@functools.partial(jax.jit, static_argnums=(5, 7))
def _generating_terms(A, indices, breaks, f, weights, m_max: int, ratio, K: int):
    """Exact x_m by recurrences in m of normalised incomplete gamma functions.

    Per PSF bin i and segment j (dN/dS / A = v_j (S/P_j)^-n_j on [lower_j, upper_j)),
    with c = ratio f_i (the breaks stay, the ratio moves into the kernel):

        x_m = A sum_ij w_i f_i v_j P_j (c P_j)^(n_j - 1) I_m(a; c lower_j, c upper_j),
        I_m(a; lo, hi) = integral_lo^hi t^(a-1) e^-t dt / m!,   a = m + 1 - n_j.

    At each endpoint y of [lo, hi], with T_k(y) = e^-y y^(k - n) / k!:
      U_m(y) = Gamma(a, y) / m!,  U_m = (a_{m-1} / m) U_{m-1} + T_m      (upward)
      L_m(y) = gamma(a, y) / m!,  L_m = ((m+1) / a_m) (L_{m+1} + T_{m+1})  (downward)
    Both have positive terms (for a > 0), so they are stable in the direction used. L is
    used where y <= a, U where y > a, and I_m = L(hi) - L(lo), U(lo) - U(hi) or
    Gamma(a)/m! - L(lo) - U(hi); no difference cancels more than the interval is small.
    Orders with a <= 1 (m <= n, at most K of them; steep segments) use U from the small-a
    functions of `skymodel._special`: Legendre's continued fraction for y >= Y_SPLIT, and
    below it two seeds (a in (0, 1] and a - 1) and the downward recurrence
    U_{m-1} = (m / a_{m-1}) (U_m - T_m), stable there (a_{m-1} <= -1, y < Y_SPLIT).
    Seeds: L at m = m_max and U at m = 1 when a_1 > 1, by jax.scipy's regularised functions.
    """
    lower, upper, pivot, logv = _segments(indices, breaks)
    n = indices  # (nseg,)
    c = ratio * f  # (nf,)
    log_cp = jnp.log(c)[:, None] + jnp.log(pivot)[None, :]  # (nf, nseg)
    pref = (weights * f)[:, None] * jnp.exp(logv + jnp.log(pivot) + (n - 1.0) * log_cp)
    lo = c[:, None] * lower[None, :]  # (nf, nseg); last column 0
    # first column inf (built without inf * c, whose derivative would be inf * 0 = NaN)
    top = jnp.isinf(upper)
    hi = jnp.where(top, jnp.inf, c[:, None] * jnp.where(top, 1.0, upper)[None, :])

    # ---- per endpoint y (axis 0: lo, hi), broadcast (2, nf, nseg)
    y = jnp.stack([lo, hi])
    y_zero = y <= 0.0
    y_inf = jnp.isinf(y)
    y_ok = ~(y_zero | y_inf)
    ys = _safe(y_ok, y, 1.0)
    logy = jnp.log(ys)

    M = m_max
    m = jnp.arange(1, M + 1, dtype=jnp.float64)  # (M,)
    a = m[:, None, None, None] + 1.0 - n  # (M, 1, 1, nseg)
    # T_k for k = 1..M+1: (M+1, 2, nf, nseg)
    k = jnp.arange(1, M + 2, dtype=jnp.float64)[:, None, None, None]
    logT = -ys + (k - n) * logy - gammaln(k + 1.0)
    T = jnp.where(y_ok, jnp.exp(logT), 0.0)

    # ---- small orders (a <= 1): U by continued fraction (y >= Y_SPLIT) or by two seeds
    # and the downward recurrence (y < Y_SPLIT)
    m_top = jnp.clip(jnp.floor(n), 0.0, K)  # (nseg,) largest m with a <= 1 (0: none)
    a_top = m_top + 1.0 - n  # in (0, 1] when m_top >= 1
    big = y_ok & (ys >= Y_SPLIT)
    small = y_ok & ~big
    yl = _safe(small, ys, 1.0)

    # one call of the small-a integral for all seeds: U at (a_top, y) and (a_top - 1, y)
    # for both endpoints, and the lowest order of the last segment on [0, hi]
    a_first = jnp.where(2.0 - n <= 1.0, 2.0 - n, 1.0)
    a_first = _safe(a_first > 0.0, a_first, 0.5)
    hi0 = _safe(y_ok[1], hi, 1.0)
    ok0, ok1 = m_top >= 1.0, m_top >= 2.0
    a_s = jnp.concatenate([
        jnp.broadcast_to(_safe(ok0, a_top, 0.5), y.shape),
        jnp.broadcast_to(_safe(ok1, a_top - 1.0, 0.5), y.shape),
        jnp.broadcast_to(a_first, hi.shape)[None],
    ])
    lo_s = jnp.concatenate([yl, yl, jnp.zeros((1,) + hi.shape)])
    hi_s = jnp.concatenate([jnp.full((4,) + hi.shape, jnp.inf), hi0[None]])
    vals = _interval_small_a(a_s, lo_s, hi_s)
    s0 = jnp.where(ok0, vals[0:2] * jnp.exp(-gammaln(jnp.maximum(m_top, 1.0) + 1.0)), 0.0)
    s1 = jnp.where(ok1, vals[2:4] * jnp.exp(-gammaln(jnp.maximum(m_top - 1.0, 1.0) + 1.0)), 0.0)
    I0 = vals[4]

    md = jnp.arange(1, K + 1, dtype=jnp.float64)  # (K,)
    a_d = md[:, None, None, None] + 1.0 - n  # (K, 1, 1, nseg)

    def down(U_next, inp):
        mm, am, Tn = inp  # order m, a_m, T_{m+1}
        d = m_top - mm
        a_safe = jnp.where(d >= 2.0, am, -1.0)
        rec = ((mm + 1.0) / a_safe) * (U_next - Tn)
        U = jnp.where(d == 0.0, s0, jnp.where(d == 1.0, s1, jnp.where(d >= 2.0, rec, 0.0)))
        return U, U

    _, U_down = jax.lax.scan(
        down, jnp.zeros(y.shape), (md, jnp.broadcast_to(a_d, (K,) + y.shape), T[1 : K + 1]),
        reverse=True,
    )
    a_cf = jnp.where(a_d <= 1.0, a_d, 1.0)  # (not jnp.minimum: its gradient halves at ties)
    y_cf = _safe(big, ys, Y_SPLIT)
    cf = _cf_upper(jnp.broadcast_to(a_cf, (K,) + y.shape), jnp.broadcast_to(y_cf, (K,) + y.shape))
    cf = cf * jnp.exp(-gammaln(md + 1.0))[:, None, None, None]
    U_dir = jnp.where(big, cf, jnp.where(small, U_down, 0.0))  # (K, 2, nf, nseg)
    U_dir = jnp.concatenate([U_dir, jnp.zeros((M - K,) + y.shape)]) if M > K else U_dir

    # ---- large orders (a > 1): seeds and the two stable recurrences
    a1 = 2.0 - n  # a at m = 1
    a1_ok = a1 > 1.0
    a1s = _safe(a1_ok, a1, 2.0)
    U1 = jnp.where(a1_ok & y_ok, gammaincc(a1s, ys) * jnp.exp(gammaln(a1s)), 0.0)
    aM = M + 1.0 - n
    aM_ok = aM > 1.0
    aMs = _safe(aM_ok, aM, 2.0)
    LM = jnp.where(aM_ok & y_ok, gammainc(aMs, ys) * jnp.exp(gammaln(aMs) - gammaln(M + 1.0)), 0.0)

    a_full = jnp.broadcast_to(a, (M,) + y.shape)

    def up(U_prev, inp):
        mm, am, Tm, Ud = inp
        a_prev = am - 1.0
        rec = (jnp.maximum(a_prev, 0.0) / mm) * U_prev + Tm
        return jnp.where(am <= 1.0, Ud, jnp.where(mm == 1.0, U1, rec))

    def down_l(L_next, inp):
        mm, am, Tn = inp
        a_safe = jnp.where(am > 1.0, am, 2.0)
        rec = ((mm + 1.0) / a_safe) * (L_next + Tn)
        return jnp.where(am > 1.0, jnp.where(mm == M, LM, rec), 0.0)

    def both(carry, inp):  # U upward in m and L downward, in one loop (half the steps)
        U_prev, L_next = carry
        U, L = up(U_prev, inp[0]), down_l(L_next, inp[1])
        return (U, L), (U, L)

    rev = (m[::-1], a_full[::-1], T[1:][::-1])
    _, (U, L) = jax.lax.scan(both, (jnp.zeros(y.shape), jnp.zeros(y.shape)),
                             ((m, a_full, T[:M], U_dir), rev))
    L = L[::-1]

    # ---- combine per order and segment
    U_lo, U_hi = U[:, 0], jnp.where(y_inf[1], 0.0, U[:, 1])  # (M, nf, nseg)
    L_lo, L_hi = jnp.where(y_zero[0], 0.0, L[:, 0]), L[:, 1]
    a3 = a[:, 0]  # (M, 1, nseg)
    a_pos = jnp.where(a3 > 1.0, a3, 2.0)
    G = jnp.exp(gammaln(a_pos) - gammaln(m + 1.0)[:, None, None])
    hi_below = hi <= a3
    lo_below = lo <= a3
    I_rec = jnp.where(
        hi_below, L_hi - L_lo, jnp.where(lo_below, G - L_lo - U_hi, U[:, 0] - U_hi)
    )
    # small orders: U(lo) - U(hi); at lo = 0 (last segment, m = 1 only) the direct integral I0
    I_dir = jnp.where(y_zero[0], I0, U_lo - U_hi)
    I = jnp.where(a3 > 1.0, I_rec, I_dir)
    x_m = A * jnp.einsum("mfs,fs->m", I, pref)

    J = _one_minus_exp_interval(jnp.broadcast_to(n, lo.shape), lo, hi)
    x_total = A * jnp.sum(pref * J)
    return x_m, x_total


def _dnds(A, indices, breaks, S):
    lower, upper, pivot, logv = _segments(indices, breaks)
    S = S[..., None]
    inside = (S >= lower) & (S < upper)
    Ss = jnp.where(S > 0, S, 1.0)
    val = jnp.exp(logv - indices * (jnp.log(Ss) - jnp.log(pivot)))
    out = jnp.sum(jnp.where(inside, val, 0.0), axis=-1)
    return A * jnp.where(S[..., 0] > 0, out, jnp.inf)


def _moment(A, indices, breaks, power, s_min):
    """A * integral_{s_min}^inf S^power dN/dS dS."""
    lower, upper, pivot, logv = _segments(indices, breaks)
    lo = jnp.maximum(lower, s_min)
    hi = jnp.maximum(upper, lo)
    # int (S/P)^-n S^p dS = P^(p+1) int_{lo/P}^{hi/P} t^(p-n) dt
    b = power + 1.0 - indices
    # hi = inf on the top segment: divide only finite values (d(inf/P)/dP would be NaN)
    top = jnp.isinf(hi)
    hi_t = jnp.where(top, jnp.inf, jnp.where(top, 1.0, hi) / pivot)
    I = _power_interval(b, lo / pivot, hi_t)
    I = jnp.where(hi > lo, I, 0.0)
    return A * jnp.sum(jnp.exp(logv + (power + 1.0) * jnp.log(pivot)) * I)


@typing.final
class BrokenPowerLaw(eqx.Module):
    """Broken power-law source-count function (NPTFit convention, highest break first).

    A: amplitude (per unit template); indices: n_1..n_{B+1} (shape (B+1,));
    breaks: S_b1 > ... > S_bB in counts (shape (B,), B >= 1);
    max_index: optional static upper bound on the indices (e.g. the prior's upper edge),
    which sizes the small-order block of `generating_terms` when the indices are traced.
    """

    A: Float[Array, ""]
    indices: Float[Array, " nseg"]
    breaks: Float[Array, " nbreak"]
    max_index: float | None = eqx.field(static=True, default=None)

    def __init__(self, A, indices, breaks, max_index: float | None = None):
        self.A = _f64(A)
        self.indices = jnp.atleast_1d(_f64(indices))
        self.breaks = jnp.atleast_1d(_f64(breaks))
        self.max_index = None if max_index is None else float(max_index)

    def __check_init__(self):
        if jnp.ndim(self.A) != 0:
            raise ValueError(f"A must be a scalar, got shape {jnp.shape(self.A)}")
        _check_shapes(self.indices, self.breaks)
        if _is_concrete(self.A, self.indices, self.breaks):
            _check_concrete(self.A, self.indices, self.breaks)

    @property
    def n_breaks(self) -> int:
        return int(self.breaks.shape[0])

    def dnds(self, S: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        """dN/dS at S (counts), per unit template (inf at S = 0)."""
        return _dnds(self.A, self.indices, self.breaks, _f64(S))

    def mean_counts(self) -> Float[Array, ""]:
        """integral S dN/dS dS: mean point-source counts per unit template."""
        return _moment(self.A, self.indices, self.breaks, 1.0, 0.0)

    def number_of_sources(self, s_min: Float[ArrayLike, ""] | float = 0.0) -> Float[Array, ""]:
        """integral_{s_min}^inf dN/dS dS (inf for s_min = 0 when the last index >= 1)."""
        return _moment(self.A, self.indices, self.breaks, 0.0, _f64(s_min))

    def rescaled(self, ratio: Float[ArrayLike, ""] | float) -> "BrokenPowerLaw":
        """The SCF in an exposure region with eps_r / mean eps = ratio: breaks * ratio,
        A / ratio (the same sources, counted in that region's counts)."""
        ratio = _f64(ratio)
        return BrokenPowerLaw(self.A / ratio, self.indices, self.breaks * ratio, self.max_index)

    def with_unit_amplitude(self) -> "BrokenPowerLaw":
        return BrokenPowerLaw(1.0, self.indices, self.breaks, self.max_index)

    def amplitude_for_mean_counts(self, mean: Float[ArrayLike, ""] | float) -> Float[Array, ""]:
        """A such that mean_counts() == mean (the paper's S_ps parameterisation)."""
        unit = _moment(jnp.ones(()), self.indices, self.breaks, 1.0, 0.0)
        return _f64(mean) / unit

    def with_mean_counts(self, mean: Float[ArrayLike, ""] | float) -> "BrokenPowerLaw":
        return BrokenPowerLaw(self.amplitude_for_mean_counts(mean), self.indices, self.breaks, self.max_index)

    def generating_terms(
        self,
        f: Float[ArrayLike, " nf"] | Sequence[float],
        weights: Float[ArrayLike, " nf"] | Sequence[float],
        m_max: int,
        ratio: Float[ArrayLike, ""] | float = 1.0,
    ) -> tuple[Float[Array, " nm"], Float[Array, ""]]:
        """x_m for m = 1..m_max and x_total, per unit template; see `generating_terms`."""
        return generating_terms(
            self.A, self.indices, self.breaks, f, weights, m_max, ratio, self.max_index
        )


__all__ = ["BrokenPowerLaw", "generating_terms"]
