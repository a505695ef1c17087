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

import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from skymodel._special import (
    A_CUT,
    _gamma_interval,
    _interval_large_a,
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


def generating_terms(
    A: Float[ArrayLike, ""] | float,
    indices: Float[ArrayLike, " nseg"] | Sequence[float],
    breaks: Float[ArrayLike, " nbreak"] | Sequence[float],
    f: Float[ArrayLike, " nf"] | Sequence[float],
    weights: Float[ArrayLike, " nf"] | Sequence[float],
    m_max: int,
    ratio: Float[ArrayLike, ""] | float = 1.0,
) -> tuple[Float[Array, " nm"], Float[Array, ""]]:
    """x_m (m = 1..m_max, shape (m_max,)) and x_total = sum_{m>=1} x_m, per unit template.

    A, indices (n1..n_{B+1}), breaks (S_b1 > ... > S_bB, counts): the broken power law;
    (f, weights): PSF-correction table (fraction of flux in the pixel, df rho(f) / f);
    the delta PSF is f = [1], weights = [1].
    ratio: exposure-region ratio eps_r / mean eps (breaks * ratio, A / ratio).
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
    if m_max > _M_LOW:
        if _is_concrete(indices) and np.max(np.asarray(indices)) > _M_LOW:
            raise ValueError(
                f"indices above {_M_LOW} are not supported with m_max > {_M_LOW}, got "
                f"{np.asarray(indices)}"
            )
        indices = eqx.error_if(
            indices, jnp.any(indices > _M_LOW), f"indices above {_M_LOW} are not supported"
        )
    A = _check_traced(A, indices, breaks)
    f = eqx.error_if(f, jnp.any(~(f > 0)), "PSF-correction fractions f must be positive")
    ratio = eqx.error_if(ratio, ~(ratio > 0), "exposure ratio must be positive")
    return _generating_terms(A, indices, breaks, f, weights, m_max, ratio)


@eqx.filter_jit
def _generating_terms(A, indices, breaks, f, weights, m_max, ratio):
    lower, upper, pivot, logv = _segments(indices, breaks)
    c = ratio * f  # (nf,)
    # prefactor per (f, segment): (df rho) v_j P_j (c P_j)^(n_j - 1), df rho = w f
    log_cp = jnp.log(c)[:, None] + jnp.log(pivot)[None, :]  # (nf, nseg)
    log_pref = logv + jnp.log(pivot) + (indices - 1.0) * log_cp
    pref = (weights * f)[:, None] * jnp.exp(log_pref)  # (nf, nseg)
    y_lo = c[:, None] * lower[None, :]  # (nf, nseg), last column 0
    y_hi = c[:, None] * upper[None, :]  # first column inf

    m = jnp.arange(1, m_max + 1, dtype=jnp.float64)  # (nm,)
    a = m[:, None, None] + 1.0 - indices[None, None, :]  # (nm, 1, nseg)
    log_mfact = gammaln(m + 1.0)[:, None, None]
    a_full = jnp.broadcast_to(a, (m_max,) + y_lo.shape)
    lo_full = jnp.broadcast_to(y_lo, a_full.shape)
    hi_full = jnp.broadcast_to(y_hi, a_full.shape)
    G = _gamma_interval_m(a_full, lo_full, hi_full, log_mfact)  # (nm, nf, nseg)
    x_m = A * jnp.einsum("mfs,fs->m", G, pref)

    J = _one_minus_exp_interval(jnp.broadcast_to(indices, y_lo.shape), y_lo, y_hi)
    x_total = A * jnp.sum(pref * J)
    return x_m, x_total


# Orders m with a = m + 1 - n <= A_CUT only occur for m <= n; the special-function branch for
# small a is computed on the first _M_LOW orders only (indices up to _M_LOW are supported).
_M_LOW = 40


def _gamma_interval_m(a, lo, hi, log_mfact):
    """_gamma_interval over an (nm, nf, nseg) grid, with the small-a branch evaluated only on
    the lowest orders (where it can be needed)."""
    nm = a.shape[0]
    log_mfact = jnp.broadcast_to(log_mfact, a.shape)
    k = min(nm, _M_LOW)
    low = _gamma_interval(a[:k], lo[:k], hi[:k], log_mfact[:k])
    if nm == k:
        return low
    ah = a[k:]
    # indices > _M_LOW would need the small-a branch here: make that impossible
    ah_s = jnp.where(ah > A_CUT, ah, A_CUT + 1.0)
    high = _interval_large_a(ah_s, lo[k:], hi[k:], log_mfact[k:])
    return jnp.concatenate([low, high], axis=0)


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
    I = _power_interval(b, lo / pivot, hi / pivot)
    I = jnp.where(hi > lo, I, 0.0)
    return A * jnp.sum(jnp.exp(logv + (power + 1.0) * jnp.log(pivot)) * I)


@typing.final
class BrokenPowerLaw(eqx.Module):
    """Broken power-law source-count function (NPTFit convention, highest break first).

    A: amplitude (per unit template); indices: n_1..n_{B+1} (shape (B+1,));
    breaks: S_b1 > ... > S_bB in counts (shape (B,), B >= 1).
    """

    A: Float[Array, ""]
    indices: Float[Array, " nseg"]
    breaks: Float[Array, " nbreak"]

    def __init__(self, A, indices, breaks):
        self.A = _f64(A)
        self.indices = jnp.atleast_1d(_f64(indices))
        self.breaks = jnp.atleast_1d(_f64(breaks))

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
        return BrokenPowerLaw(self.A / ratio, self.indices, self.breaks * ratio)

    def with_unit_amplitude(self) -> "BrokenPowerLaw":
        return BrokenPowerLaw(1.0, self.indices, self.breaks)

    def amplitude_for_mean_counts(self, mean: Float[ArrayLike, ""] | float) -> Float[Array, ""]:
        """A such that mean_counts() == mean (the paper's S_ps parameterisation)."""
        unit = _moment(jnp.ones(()), self.indices, self.breaks, 1.0, 0.0)
        return _f64(mean) / unit

    def with_mean_counts(self, mean: Float[ArrayLike, ""] | float) -> "BrokenPowerLaw":
        return BrokenPowerLaw(self.amplitude_for_mean_counts(mean), self.indices, self.breaks)

    def generating_terms(
        self,
        f: Float[ArrayLike, " nf"] | Sequence[float],
        weights: Float[ArrayLike, " nf"] | Sequence[float],
        m_max: int,
        ratio: Float[ArrayLike, ""] | float = 1.0,
    ) -> tuple[Float[Array, " nm"], Float[Array, ""]]:
        """x_m for m = 1..m_max and x_total, per unit template; see `generating_terms`."""
        return generating_terms(self.A, self.indices, self.breaks, f, weights, m_max, ratio)


__all__ = ["BrokenPowerLaw", "generating_terms"]
