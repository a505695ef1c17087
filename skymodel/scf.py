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
from jax.scipy.special import gammaln

from skymodel._special import (
    SERIES_TERMS,
    Y_SPLIT,
    _cf_upper_many,
    _computed_once,
    _log_factorial,
    _power_interval,
    _series_interval,
)
from skymodel._tracing import is_traced
from skymodel._types import Array, ArrayLike, Float


def _tail_terms(a_max: float) -> int:
    """Static number E of terms of P(a, y) = sum_{i >= 1} r(a + i, y) that give it to 1e-17
    relative wherever y <= a <= a_max: the remainder over the first term is at most
    prod_{i <= E} a / (a + i) times a geometric tail (largest at a = a_max)."""
    a = float(a_max)
    log_rem, E = 0.0, 0
    while True:
        E += 1
        log_rem += math.log(a / (a + E))
        if log_rem - math.log1p(-a / (a + E + 1.0)) < math.log(1e-17):
            return E


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
    if np.ndim(indices) != 1 or np.ndim(breaks) != 1:
        raise ValueError(
            f"indices and breaks must be 1-d, got shapes {np.shape(indices)} and "
            f"{np.shape(breaks)}"
        )
    if np.shape(breaks)[0] < 1:
        raise ValueError("a broken power law needs at least one break")
    if np.shape(indices)[0] != np.shape(breaks)[0] + 1:
        raise ValueError(
            f"need len(indices) == len(breaks) + 1, got {np.shape(indices)[0]} indices "
            f"and {np.shape(breaks)[0]} breaks"
        )


def _f64(x):
    return jnp.asarray(x, dtype=jnp.float64)


#: Default bound on the indices when they are traced and no `max_index` is given: orders
#: m <= max_index are computed by the small-order method (see `_generating_terms`).
DEFAULT_MAX_INDEX = 40.0


#: Default lower bound on the indices when they are traced and no `min_index` is given:
#: the climb of Q through the orders m <= 0 and the series for P are sized by it.
DEFAULT_MIN_INDEX = -100.0


def _low_orders(indices, min_index) -> int:
    """Static L >= 0 such that every index n >= -L: Q climbs from alpha through at most
    L + 1 orders m <= 1, and a = m + 1 - n <= m + 1 + L."""
    if min_index is None:
        min_index = DEFAULT_MIN_INDEX if is_traced(indices) else float(np.min(np.asarray(indices)))
    return max(0, -math.floor(float(min_index)))


def _direct_orders(indices, m_max: int, max_index) -> int:
    """Static number K of low orders m = 1..K handled by the small-order method: every m
    with a = m + 1 - n <= 1 for some segment must be <= K."""
    if max_index is None:
        max_index = DEFAULT_MAX_INDEX if is_traced(indices) else float(np.max(np.asarray(indices)))
    return int(min(m_max, max(1, math.floor(float(max_index)))))


def _prepared(A, indices, breaks, m_max: int, max_index, min_index):
    """One SCF's (A, indices, breaks) as float64, checked (ValueError when concrete, an
    error under jit when traced), and its static kernel bounds (K, L): every index lies in
    [-L, K + 1) (`_direct_orders`, `_low_orders`)."""
    A = _f64(A)
    indices = _f64(indices)
    breaks = _f64(breaks)
    _check_shapes(indices, breaks)
    if np.ndim(A) != 0:
        raise ValueError(f"A must be a scalar, got shape {np.shape(A)}")
    if not is_traced(A, indices, breaks):
        _check_concrete(A, indices, breaks)
    K = _direct_orders(indices, m_max, max_index)
    if K < m_max:
        # orders m <= n (a <= 1) must all lie in the small-order block 1..K
        if not is_traced(indices) and np.max(np.asarray(indices)) >= K + 1:
            raise ValueError(
                f"indices {np.asarray(indices)} exceed max_index={max_index} (pass a larger "
                f"max_index)"
            )
        indices = eqx.error_if(
            indices,
            jnp.any(indices >= K + 1),
            f"an SCF index exceeds its static bound max_index={K} (pass a larger max_index)",
        )
    L = _low_orders(indices, min_index)
    if not is_traced(indices) and np.min(np.asarray(indices)) < -L:
        raise ValueError(
            f"indices {np.asarray(indices)} go below min_index={min_index} (pass a smaller "
            f"min_index)"
        )
    indices = eqx.error_if(
        indices,
        jnp.any(indices < -L),
        f"an SCF index is below its static bound min_index={-L} (pass a smaller min_index)",
    )
    return _check_traced(A, indices, breaks), indices, breaks, K, L


def _prepared_psf(f, weights, ratios):
    """The PSF-correction table (f, weights) and the exposure ratios (nreg,), float64 and
    checked."""
    f = _f64(f)
    weights = _f64(weights)
    ratios = _f64(ratios)
    if np.ndim(f) != 1 or np.shape(f) != np.shape(weights) or np.shape(f)[0] < 1:
        raise ValueError(
            f"PSF table f and weights must be 1-d of equal, nonzero length, got shapes "
            f"{np.shape(f)} and {np.shape(weights)}"
        )
    if not is_traced(f, weights, ratios):
        if not (np.all(np.asarray(f) > 0) and np.all(np.isfinite(np.asarray(f)))):
            raise ValueError(f"PSF-correction fractions f must be positive, got {np.asarray(f)}")
        if not np.all(np.asarray(weights) >= 0):
            raise ValueError(f"PSF-correction weights must be >= 0, got {np.asarray(weights)}")
        r = np.asarray(ratios)
        if not (np.all(r > 0) and np.all(np.isfinite(r))):
            raise ValueError(f"exposure ratio must be positive, got {r}")
    f = eqx.error_if(f, jnp.any(~(f > 0)), "PSF-correction fractions f must be positive")
    ratios = eqx.error_if(ratios, jnp.any(~(ratios > 0)), "exposure ratio must be positive")
    return f, weights, ratios


def _checked_m_max(m_max) -> int:
    m_max = int(m_max)
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    return m_max


def generating_terms(
    A: Float[ArrayLike, ""] | float,
    indices: Float[ArrayLike, " nseg"] | Sequence[float],
    breaks: Float[ArrayLike, " nbreak"] | Sequence[float],
    f: Float[ArrayLike, " nf"] | Sequence[float],
    weights: Float[ArrayLike, " nf"] | Sequence[float],
    m_max: int,
    ratio: Float[ArrayLike, ""] | float = 1.0,
    max_index: float | None = None,
    min_index: float | None = None,
) -> tuple[Float[Array, " nm"], Float[Array, ""]]:
    """x_m (m = 1..m_max, shape (m_max,)) and x_total = sum_{m>=1} x_m, per unit template.

    A, indices (n1..n_{B+1}), breaks (S_b1 > ... > S_bB, counts): the broken power law;
    (f, weights): PSF-correction table (fraction of flux in the pixel, df rho(f) / f);
    the delta PSF is f = [1], weights = [1].
    ratio: exposure-region ratio eps_r / mean eps (breaks * ratio, A / ratio).
    max_index, min_index: static bounds on the indices (e.g. a prior's edges); needed only
    when the indices are traced and may exceed DEFAULT_MAX_INDEX or go below
    DEFAULT_MIN_INDEX. Tighter bounds make the kernel smaller (it stays exact).
    Exact (incomplete gamma functions), differentiable in A, indices, breaks, f, ratio.
    """
    m_max = _checked_m_max(m_max)
    A, indices, breaks, K, L = _prepared(A, indices, breaks, m_max, max_index, min_index)
    if np.ndim(ratio) != 0:
        raise ValueError(f"ratio must be a scalar, got shape {np.shape(ratio)}")
    f, weights, ratios = _prepared_psf(f, weights, jnp.reshape(_f64(ratio), (1,)))
    x, x_total = _generating_terms(A[None], (indices,), (breaks,), f, weights, ratios, m_max, K, L)
    return x[0, 0], x_total[0, 0]


def population_terms(
    scfs: Sequence["BrokenPowerLaw"],
    f: Float[ArrayLike, " nf"] | Sequence[float],
    weights: Float[ArrayLike, " nf"] | Sequence[float],
    m_max: int,
    ratios: Float[ArrayLike, " nreg"] | Sequence[float] = (1.0,),
) -> tuple[Float[Array, "npop nreg nm"], Float[Array, "npop nreg"]]:
    """`generating_terms` of several broken power laws (any numbers of breaks) at several
    exposure ratios, in one kernel: x (npop, nreg, m_max) and x_total (npop, nreg).

    The populations' segments and the regions' PSF bins (ratio * f) are laid side by side
    in one evaluation (with the widest of the populations' static index bounds, which
    stays exact), instead of one evaluation per population and region.
    """
    m_max = _checked_m_max(m_max)
    scfs = tuple(scfs)
    if not scfs:
        raise ValueError("population_terms needs at least one SCF")
    for s in scfs:
        if not isinstance(s, BrokenPowerLaw):
            raise ValueError(
                f"population_terms takes BrokenPowerLaw SCFs, got {type(s).__name__} (other "
                f"SCF types: their own generating_terms)"
            )
    prepared = [_prepared(s.A, s.indices, s.breaks, m_max, s.max_index, s.min_index) for s in scfs]
    A = jnp.stack([p[0] for p in prepared])
    K = max(p[3] for p in prepared)
    L = max(p[4] for p in prepared)
    if np.ndim(ratios) != 1:
        raise ValueError(f"ratios must be 1-d (nreg,), got shape {np.shape(ratios)}")
    f, weights, ratios = _prepared_psf(f, weights, ratios)
    return _generating_terms(
        A, tuple(p[1] for p in prepared), tuple(p[2] for p in prepared), f, weights, ratios,
        m_max, K, L,
    )


def _safe(cond, x, fill):
    """x where cond, else `fill` (for the double-where trick)."""
    return jnp.where(cond, x, fill)


def _cumsum_rows(x, reverse: bool = False, block: int = 8):
    """Cumulative sum over axis 0 in two levels (within blocks of `block` rows, then over
    block totals), by triangular matrix products: O(rows * block) work, few operations
    (jnp.cumsum lowers to an O(rows^2) reduce-window on CPU)."""
    if reverse:
        return _cumsum_rows(x[::-1], block=block)[::-1]
    rows = x.shape[0]
    nb = -(-rows // block)
    xb = jnp.concatenate([x, jnp.zeros((nb * block - rows,) + x.shape[1:], x.dtype)])
    xb = xb.reshape((nb, block) + x.shape[1:])
    # a batched matrix product (the triangle repeated per block): both operands in the
    # GEMM's row-major layout, so XLA does not transpose x into and out of it
    tri = jnp.broadcast_to(jnp.tril(jnp.ones((block, block), x.dtype)), (nb, block, block))
    within = jnp.einsum("bij,bjr->bir", tri, xb.reshape(nb, block, -1)).reshape(xb.shape)
    before = jnp.einsum("ij,j...->i...", jnp.tril(jnp.ones((nb, nb), x.dtype), -1), within[:, -1])
    return (within + before[:, None]).reshape((nb * block,) + x.shape[1:])[:rows]


def _density(a, ys, logy):
    """r = e^-y y^(a-1) / Gamma(a) (a > 0): the step of the regularised incomplete gamma
    functions, Q(a + 1, y) = Q(a, y) + r(a + 1, y) and P(a, y) = sum_{i >= 1} r(a + i, y).
    a broadcasts against ys (segments last): its log Gamma is computed once per element of
    a, not per endpoint and PSF bin (`_computed_once`; -25% of the SCF terms' run time)."""
    return jnp.exp(-ys + (a - 1.0) * logy - _computed_once(gammaln(a)))


def _q_up(Q_alpha, alpha, steps, ys, logy, ok, max_steps: int):
    """Q(alpha + steps, y) = Q(alpha, y) + sum_{i=1..steps} r(alpha + i, y): the upward
    recurrence (positive terms), steps <= max_steps (static) an integer-valued array."""
    i = jnp.arange(1, max_steps + 1, dtype=jnp.float64).reshape((-1,) + (1,) * ys.ndim)
    use = (i <= steps) & ok
    return Q_alpha + jnp.sum(jnp.where(use, _density(alpha + i, ys, logy), 0.0), axis=0)


def _p_series(a, ys, logy, ok, terms: int, block: int = 4):
    """P(a, y) = sum_{i>=1} r(a + i, y), to 1e-17 relative where y <= a (a > 0) when
    terms >= `_tail_terms` for the largest a (terms is rounded up to a multiple of
    `block`); not used (and inaccurate) where y > a.

    One exp per `block` terms: r(a + i, y) exactly at i = 1, 1 + block, ..., and between
    them r(a + i + 1, y) = r(a + i, y) y / (a + i), at most block - 1 products (a few
    rounding errors per term; where y <= a the terms decrease, so an anchor that
    underflows drops only terms below 1e-308 of the first)."""
    nb = -(-terms // block)
    shape = (-1,) + (1,) * ys.ndim
    i0 = jnp.arange(1, nb * block + 1, block, dtype=jnp.float64).reshape(shape)  # (nb, ...)
    r = _density(a + i0, ys, logy)
    total = r
    for j in range(1, block):
        r = r * (ys / (a + i0 + (j - 1)))
        total = total + r
    return jnp.sum(jnp.where(ok, total, 0.0), axis=0)


def _seed_series(alpha, ys):
    """The parts below Y_SPLIT of the five seeds of `_generating_terms`, (5,) + ys.shape:
    with u = min(y, Y_SPLIT) at the endpoints ys = (lo, hi) (shape (2, nf, nseg)) and
    alpha (nseg,) in (0, 1],

        [ int_u^Y t^(alpha-1) e^-t  (lo, hi),  int_u^Y t^(alpha-2) e^-t  (lo, hi),
          int_0^u_hi t^(alpha-1) e^-t ],

    by e^-t = sum_k (-t)^k / k! integrated term by term. All three share the powers
    u^(alpha+k), so there is one exp per endpoint and term (not one exp, log and expm1 per
    seed and term as in `_series_interval`). Terms whose exponent b = alpha + k - 1 or
    alpha + k - 2 may be near 0 (k <= 1) use the stable `_power_interval`; the others have
    b > 1, where (Y^b - u^b) / b has no pole. As in `_series_interval`, the sum alternates
    with terms up to ~Y^k / k! (< 5), an absolute rounding error of a few 1e-15, which the
    seeds add to Gamma(a, Y) >= 0.0035 (a > -1): ~1e-12 relative at worst.
    """
    u = jnp.minimum(ys, Y_SPLIT)  # (2, nf, nseg)
    k = np.arange(SERIES_TERMS, dtype=np.float64)
    coef = np.where(k % 2 == 0, 1.0, -1.0) * np.exp(-_log_factorial(k))  # (-1)^k / k!
    b = alpha + k[:, None]  # (K, nseg): exponents alpha + k
    power = jnp.exp(b[:, None, None, :] * jnp.log(u))  # (K, 2, nf, nseg): u^(alpha + k)
    top = jnp.exp(b * math.log(Y_SPLIT))  # Y^(alpha + k)
    diff = (top[:, None, None, :] - power)[1:]  # Y^b - u^b for b = alpha + k, k >= 1
    c_a = coef[1:, None] / b[1:]  # seed alpha, terms k >= 1
    c_b = coef[2:, None] / b[1:-1]  # seed alpha - 1, terms k >= 2 (b = alpha + k - 1)
    stable_a = _power_interval(alpha, u, Y_SPLIT)  # int_u^Y t^(alpha-1): k = 0 of seed alpha
    stable_b = _power_interval(alpha - 1.0, u, Y_SPLIT)
    seed_a = stable_a + jnp.einsum("ks,kefs->efs", c_a, diff)
    # seed alpha - 1: k = 0 is int t^(alpha-2), k = 1 is -int t^(alpha-1)
    seed_b = stable_b - stable_a + jnp.einsum("ks,kefs->efs", c_b, diff[:-1])
    # [0, u_hi] at alpha: sum_k (-1)^k / k! u^(alpha+k) / (alpha + k), no difference to take
    seed_0 = jnp.einsum("ks,kfs->fs", coef[:, None] / b, power[:, 1])
    return jnp.concatenate([seed_a, seed_b, seed_0[None]])


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _generating_terms(A, indices, breaks, f, weights, ratios, m_max: int, K: int, L: int):
    """Exact x_m (npop, nreg, m_max) and x_total (npop, nreg) of broken power laws
    (A: (npop,); indices, breaks: tuples of each population's arrays) in exposure regions
    (ratios: (nreg,)), by recurrences in m of regularised incomplete gamma functions.

    All populations' segments lie along one segment axis and all regions' PSF bins
    (c = ratio f_i) along one bin axis, so one evaluation serves them all; below,
    "segment" and "PSF bin" mean entries of these axes.
    Per PSF bin i and segment j (dN/dS / A = v_j (S/P_j)^-n_j on [lower_j, upper_j)),
    with c = ratio f_i (the breaks stay, the ratio moves into the kernel):

        x_m = A sum_ij w_i f_i v_j P_j (c P_j)^(n_j - 1) I_m(a; c lower_j, c upper_j),
        I_m(a; lo, hi) = integral_lo^hi t^(a-1) e^-t dt / m!,   a = a_m = m + 1 - n_j.

    Orders with a > 1: with g_m = Gamma(a_m) / m! and, at each endpoint y, Q_m = Q(a_m, y)
    and P_m = P(a_m, y) (regularised upper and lower functions),
      Q_m = Q_{m-1} + r_m,   P_m = P_{m+1} + r_{m+1},   r_j = e^-y y^(a_j - 1) / Gamma(a_j),
    sums of positive terms in [0, 1] (the stable upward and downward recurrences, done as
    cumulative sums). P is used where y <= a, Q where y > a: I_m = g_m (P(hi) - P(lo)),
    g_m (Q(lo) - Q(hi)) or g_m (1 - P(lo) - Q(hi)); no difference cancels more than the
    interval is small. Q starts from alpha = floor(n) + 1 - n in (0, 1] (order
    m_top = floor(n)), where Gamma(alpha, y) comes from the small-a functions of
    `skymodel._special` (series below Y_SPLIT, Legendre's continued fraction above), and
    climbs through the orders m <= 0 when n < 1 (at most L + 1 of them, n >= -L static);
    P starts from its series at order M.
    Orders with a <= 1 (1 <= m <= m_top <= K; steep segments) use U_m = Gamma(a_m, y) / m!:
    the continued fraction for y >= Y_SPLIT, and below it two seeds (orders m_top and
    m_top - 1) and the downward recurrence U_{m-1} = (m / a_{m-1}) (U_m - T_m), stable
    there (a_{m-1} <= -1, y < Y_SPLIT), T_m = e^-y y^(m-n) / m!.
    x_total uses integral t^-n (1 - e^-t): a series below Y_SPLIT and, above, the power
    integral minus Gamma(1 - n) on the interval (the same continued fraction, or Q and P
    at a = 1 - n from the same seeds). No jax.scipy incomplete gamma function (their
    convergence loops dominated the run and compile time).
    """
    npop, nreg, nf = A.shape[0], ratios.shape[0], f.shape[0]
    lower, upper, pivot, logv = (
        jnp.concatenate(parts) for parts in zip(*map(_segments, indices, breaks))
    )
    n = jnp.concatenate(indices)  # (nseg,): all populations' segments
    # A of the population each segment belongs to, 0 elsewhere: (npop, nseg)
    owner = np.repeat(np.arange(npop), [i.shape[0] for i in indices])
    A_seg = jnp.where(owner[None, :] == np.arange(npop)[:, None], A[:, None], 0.0)
    c = (ratios[:, None] * f[None, :]).reshape(-1)  # (nf,) from here on: nreg * nf bins
    wf = jnp.tile(weights * f, nreg)
    log_cp = jnp.log(c)[:, None] + jnp.log(pivot)[None, :]  # (nf, nseg)
    pref = wf[:, None] * jnp.exp(logv + jnp.log(pivot) + (n - 1.0) * log_cp)
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
    y2 = jnp.maximum(y, Y_SPLIT)  # the continued-fraction part of each endpoint
    y2_ok = ~jnp.isinf(y2)
    y2s = _safe(y2_ok, y2, Y_SPLIT)
    logy2 = jnp.log(y2s)

    M = m_max
    m = jnp.arange(1, M + 1, dtype=jnp.float64)  # (M,)
    a = m[:, None, None, None] + 1.0 - n  # (M, 1, 1, nseg)

    # ---- seeds: Gamma(alpha, y) (alpha = m_top + 1 - n in (0, 1]) and, when m_top >= 2,
    # Gamma(alpha - 1, y), at both endpoints; and the lowest order of the last segment on
    # [0, hi]. Series below Y_SPLIT here; every continued fraction in one call below.
    m_top = jnp.clip(jnp.floor(n), -L, K)  # (nseg,) largest m with a_m <= 1 (may be <= 0)
    alpha = m_top + 1.0 - n  # in (0, 1]
    ok1 = m_top >= 2.0
    # the last segment's lowest order on [0, hi] is needed where 1 <= n < 2, i.e. at alpha
    a_s = jnp.concatenate([
        jnp.broadcast_to(alpha, y.shape),
        jnp.broadcast_to(alpha - 1.0, y.shape),
        jnp.broadcast_to(alpha, hi.shape)[None],
    ])  # (5, nf, nseg)
    lo_s = jnp.concatenate([ys, ys, jnp.zeros((1,) + hi.shape)])
    hi_s = jnp.concatenate([jnp.full((4,) + hi.shape, jnp.inf), ys[1:]])
    series = _seed_series(alpha, ys)

    # ---- small orders (a <= 1) above Y_SPLIT: continued fraction
    md = jnp.arange(1, K + 1, dtype=jnp.float64)  # (K,)
    a_d = md[:, None, None, None] + 1.0 - n  # (K, 1, 1, nseg)
    a_cf = jnp.where(a_d <= 1.0, a_d, 1.0)  # (not jnp.minimum: its gradient halves at ties)
    big = y_ok & (ys >= Y_SPLIT)
    small = y_ok & ~big
    y_cf = _safe(big, ys, Y_SPLIT)
    # x_total above Y_SPLIT needs Gamma(1 - n, y2) where 1 - n <= 1
    a0 = 1.0 - n
    a0_small = a0 <= 1.0
    a0_cf = jnp.where(a0_small, a0, 1.0)
    cf_main, cf_seed_lo, cf_seed_hi, cf_J = _cf_upper_many(
        (jnp.broadcast_to(a_cf, (K,) + y.shape), jnp.broadcast_to(y_cf, (K,) + y.shape)),
        (a_s, jnp.maximum(lo_s, Y_SPLIT)),
        (a_s[4], jnp.maximum(hi_s[4], Y_SPLIT)),
        (jnp.broadcast_to(a0_cf, y.shape), y2),
    )
    vals = series + cf_seed_lo - jnp.concatenate([jnp.zeros((4,) + hi.shape), cf_seed_hi[None]])
    inv_fact_top = jnp.exp(-gammaln(jnp.maximum(m_top, 1.0) + 1.0))
    s0 = jnp.where(m_top >= 1.0, vals[0:2] * inv_fact_top, 0.0)
    s1 = jnp.where(ok1, vals[2:4] * jnp.exp(-gammaln(jnp.maximum(m_top - 1.0, 1.0) + 1.0)), 0.0)
    I0 = vals[4]

    # ---- small orders below Y_SPLIT: seeds and the downward recurrence
    k = md[:, None, None, None] + 1.0
    log_fact_k = _log_factorial(np.arange(2, K + 2)).reshape(-1, 1, 1, 1)
    T_next = jnp.where(y_ok, jnp.exp(-ys + (k - n) * logy - log_fact_k), 0.0)  # T_{m+1}

    def down(U_next, inp):
        mm, am, Tn = inp  # order m, a_m, T_{m+1}
        d = m_top - mm
        a_safe = jnp.where(d >= 2.0, am, -1.0)
        rec = ((mm + 1.0) / a_safe) * (U_next - Tn)
        U = jnp.where(d == 0.0, s0, jnp.where(d == 1.0, s1, jnp.where(d >= 2.0, rec, 0.0)))
        return U, U

    _, U_down = jax.lax.scan(
        down, jnp.zeros(y.shape), (md, jnp.broadcast_to(a_d, (K,) + y.shape), T_next),
        reverse=True,
    )
    cf_main = cf_main * np.exp(-_log_factorial(np.arange(1, K + 1)))[:, None, None, None]
    U_dir = jnp.where(big, cf_main, jnp.where(small, U_down, 0.0))  # (K, 2, nf, nseg)
    U_dir = jnp.concatenate([U_dir, jnp.zeros((M - K,) + y.shape)]) if M > K else U_dir

    # ---- large orders (a > 1): Q upward from order m_s = max(m_top, 1), P downward
    inv_gamma_alpha = jnp.exp(-gammaln(alpha))
    Q_alpha = vals[0:2] * inv_gamma_alpha  # Q(alpha, y)
    # Q(a_1, y) when m_top <= 0: climb from alpha through orders m_top + 1 .. 1 (<= L + 1)
    Q1 = _q_up(Q_alpha, alpha, 1.0 - m_top, ys, logy, y_ok, L + 1)
    m_s = jnp.maximum(m_top, 1.0)
    m4 = m[:, None, None, None]
    a_r = _safe(m4 > m_s, a, 2.0)  # r_j used for j > m_s only (a_j > 1 there)
    r = jnp.where((m4 > m_s) & y_ok, _density(a_r, ys, logy), 0.0)  # (M, 2, nf, nseg)
    Qn = jnp.where(m_top >= 1.0, Q_alpha, Q1) + _cumsum_rows(r)
    aM = M + 1.0 - n
    aM_ok = aM > 1.0
    PM = _p_series(_safe(aM_ok, aM, 2.0), ys, logy, aM_ok & y_ok, _tail_terms(M + 1.0 + L))
    r_above = jnp.concatenate([r[1:], jnp.zeros((1,) + y.shape)])  # r_{m+1}
    Pn = PM + _cumsum_rows(r_above, reverse=True)

    # ---- combine per order and segment
    a3 = a[:, 0]  # (M, 1, nseg)
    a_pos = jnp.where(a3 > 1.0, a3, 2.0)
    g = jnp.exp(_computed_once(gammaln(a_pos)) - _log_factorial(np.arange(1, M + 1))[:, None, None])
    Q_lo, Q_hi = Qn[:, 0], jnp.where(y_inf[1], 0.0, Qn[:, 1])  # (M, nf, nseg)
    P_lo, P_hi = jnp.where(y_zero[0], 0.0, Pn[:, 0]), Pn[:, 1]
    I_rec = g * jnp.where(
        hi <= a3, P_hi - P_lo, jnp.where(lo <= a3, 1.0 - P_lo - Q_hi, Q_lo - Q_hi)
    )
    # small orders: U(lo) - U(hi); at lo = 0 (last segment, m = 1 only) the direct integral I0
    U_lo, U_hi = U_dir[:, 0], jnp.where(y_inf[1], 0.0, U_dir[:, 1])
    I_dir = jnp.where(y_zero[0], I0, U_lo - U_hi)
    I = jnp.where(a3 > 1.0, I_rec, I_dir)
    pref_r = pref.reshape(nreg, nf, -1)
    # weighted sum over PSF bins in I's own layout (an einsum over "mrfs" made XLA
    # transpose I, with its whole elementwise computation fused in, at strided writes)
    I_sum = jnp.sum(I.reshape(M, nreg, nf, -1) * pref_r[None], axis=2)  # (M, nreg, nseg)
    x_m = jnp.einsum("mrs,ps->prm", I_sum, A_seg)

    # ---- x_total: integral of t^-n (1 - e^-t) over [lo, hi] per segment
    u, v = jnp.minimum(lo, Y_SPLIT), jnp.minimum(hi, Y_SPLIT)
    J_series = -_series_interval(jnp.broadcast_to(a0, lo.shape), u, v, 1)
    lo2, hi2 = y2[0], y2[1]
    empty = hi2 <= lo2
    hi2s = jnp.where(empty, lo2 + 1.0, hi2)
    a0_pow = jnp.where(empty & (a0 >= 0.0), -1.0, a0)
    power = _power_interval(a0_pow, lo2, hi2s)
    # Gamma(a0) on [lo2, hi2]: continued fraction (a0 <= 1), or Q (up from alpha, from
    # the same seeds above Y_SPLIT) and P (series) at a0 = alpha - m_top > 1
    gam = cf_J[0] - cf_J[1]
    if L > 0:  # some index may be < 0: a0 = 1 - n = alpha - m_top > 1
        a0_big = _safe(a0_small, 2.0, a0)
        Q_alpha2 = cf_seed_lo[0:2] * inv_gamma_alpha  # Q(alpha, y2)
        ok_big = y2_ok & ~a0_small
        Q0 = _q_up(Q_alpha2, alpha, -m_top, y2s, logy2, ok_big, L)
        P0 = _p_series(a0_big, y2s, logy2, ok_big, _tail_terms(1.0 + L))
        Q0_hi = jnp.where(y2_ok[1], Q0[1], 0.0)
        P0_hi = jnp.where(y2_ok[1], P0[1], 1.0)
        gam_big = jnp.exp(gammaln(a0_big)) * jnp.where(
            hi2 <= a0_big,
            P0_hi - P0[0],
            jnp.where(lo2 <= a0_big, 1.0 - P0[0] - Q0_hi, Q0[0] - Q0_hi),
        )
        gam = jnp.where(a0_small, gam, gam_big)
    J = J_series + jnp.where(empty, 0.0, power - gam)
    x_total = jnp.einsum("rfs,rfs,ps->pr", J.reshape(nreg, nf, -1), pref_r, A_seg)
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
    max_index, min_index: optional static bounds on the indices (e.g. the prior's edges),
    which size the kernel of `generating_terms` when the indices are traced.
    """

    A: Float[Array, ""]
    indices: Float[Array, " nseg"]
    breaks: Float[Array, " nbreak"]
    max_index: float | None = eqx.field(static=True, default=None)
    min_index: float | None = eqx.field(static=True, default=None)

    def __init__(
        self, A, indices, breaks, max_index: float | None = None, min_index: float | None = None
    ):
        self.A = _f64(A)
        self.indices = jnp.atleast_1d(_f64(indices))
        self.breaks = jnp.atleast_1d(_f64(breaks))
        self.max_index = None if max_index is None else float(max_index)
        self.min_index = None if min_index is None else float(min_index)

    def __check_init__(self):
        if np.ndim(self.A) != 0:
            raise ValueError(f"A must be a scalar, got shape {np.shape(self.A)}")
        _check_shapes(self.indices, self.breaks)
        if not is_traced(self.A, self.indices, self.breaks):
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
        return BrokenPowerLaw(
            self.A / ratio, self.indices, self.breaks * ratio, self.max_index, self.min_index
        )

    def with_unit_amplitude(self) -> "BrokenPowerLaw":
        return BrokenPowerLaw(1.0, self.indices, self.breaks, self.max_index, self.min_index)

    def amplitude_for_mean_counts(self, mean: Float[ArrayLike, ""] | float) -> Float[Array, ""]:
        """A such that mean_counts() == mean (the paper's S_ps parameterisation)."""
        unit = _moment(jnp.ones(()), self.indices, self.breaks, 1.0, 0.0)
        return _f64(mean) / unit

    def with_mean_counts(self, mean: Float[ArrayLike, ""] | float) -> "BrokenPowerLaw":
        return BrokenPowerLaw(
            self.amplitude_for_mean_counts(mean), self.indices, self.breaks, self.max_index,
            self.min_index,
        )

    def generating_terms(
        self,
        f: Float[ArrayLike, " nf"] | Sequence[float],
        weights: Float[ArrayLike, " nf"] | Sequence[float],
        m_max: int,
        ratio: Float[ArrayLike, ""] | float = 1.0,
    ) -> tuple[Float[Array, " nm"], Float[Array, ""]]:
        """x_m for m = 1..m_max and x_total, per unit template; see `generating_terms`."""
        return generating_terms(
            self.A, self.indices, self.breaks, f, weights, m_max, ratio, self.max_index,
            self.min_index,
        )


__all__ = ["BrokenPowerLaw", "generating_terms", "population_terms"]
