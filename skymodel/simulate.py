"""Mock skies: Poisson maps of smooth components plus point-source populations with a PSF.

The simulator is driven by the same `SkyModel` and parameter values as the fit
(`simulate`), or, without a model, by a full-sky source template and an SCF
(`simulate_population`). For every point-source population it

1. draws the number of sources N ~ Poisson(N_exp), N_exp = sum_p T_p int_{s_min}^inf dN/dS dS;
2. draws each source's S (expected counts at the mean exposure) from dN/dS restricted to
   S >= s_min, by exact inverse-CDF sampling of the broken power law (analytic per segment);
3. draws its position: a pixel with probability proportional to T_p, then a uniformly random
   NESTED descendant at nside_fine = 2^29 (descendants are equal-area, so the position is
   uniform within the pixel up to the descendant size, ~2e-9 rad, far below any PSF);
4. scales S by the exposure at the source (epsilon_p / mean epsilon over the analysis pixels,
   or the exposure-region ratio, as the NPTF likelihood assumes), draws the photon number
   ~ Poisson(S epsilon_p / mean epsilon), and scatters each photon by the PSF: radius from the
   PSF's exact radial distribution on the sphere (`psf.sample_radius`), azimuth uniform,
   exact rotation on the sphere, then ang2pix.

Effect of the lower flux cut `s_min`: sources fainter than s_min are not drawn, so their
photons are missing from the point-source map. The fraction of the population's mean counts
that is dropped, int_0^{s_min} S dN/dS / int_0^inf S dN/dS, is analytic and is returned in
the truth (`PopulationTruth.missing_fraction`); with `faint_as_smooth=True` those mean counts
are added back as a smooth Poisson map (T_p x the missing mean counts per unit template, no
PSF), which is exact in distribution only in the limit where faint sources give at most one
photon each. `s_min = 0` is allowed when the lowest index is < 1 (finite source number).

Random numbers all come from `jax.random` keys: the same key gives the same sky. Work is
vectorised over sources and photons (JAX for the random draws and the sphere geometry,
healpy's C routines for pixel lookup); photons are processed in chunks of fixed (power of
two) size so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np

from skymodel._types import Array, Float, Int

#: finest HEALPix resolution used to place a source uniformly within its pixel
NSIDE_FINE = 2**29
#: photons handled per chunk (memory: ~ 100 bytes per photon)
PHOTON_CHUNK = 2**21


def _bucket(n: float | int) -> int:
    """Next power of two >= n (at least 64): random draws use few distinct shapes, so
    JAX compiles each sampler a handful of times per process, not once per call."""
    return max(64, 1 << (max(int(n), 1) - 1).bit_length())


# --------------------------------------------------------------------------------------
# Broken power law: segments, analytic integrals, inverse-CDF sampling
# --------------------------------------------------------------------------------------


def _value(x) -> np.ndarray:
    return np.asarray(getattr(x, "value", x), dtype=np.float64)


def scf_arrays(scf) -> tuple[float, np.ndarray, np.ndarray]:
    """(A, indices, breaks) of a broken power law as float64 numpy values.

    Accepts a `skymodel.scf.BrokenPowerLaw` (fields `A`, `indices`, `breaks`, as arrays or
    `Param`s) or a tuple `(A, indices, breaks)`. Breaks are highest first, in counts.
    """
    if isinstance(scf, tuple):
        A, indices, breaks = scf
    else:
        try:
            A, indices, breaks = scf.A, scf.indices, scf.breaks
        except AttributeError as err:
            raise ValueError(
                f"expected a BrokenPowerLaw (fields A, indices, breaks) or a tuple "
                f"(A, indices, breaks), got {type(scf).__name__}"
            ) from err
    A = float(_value(A))
    indices = np.atleast_1d(_value(indices)).astype(np.float64)
    breaks = np.atleast_1d(_value(breaks)).astype(np.float64)
    if indices.ndim != 1 or breaks.ndim != 1 or indices.size != breaks.size + 1:
        raise ValueError(
            f"a broken power law needs len(indices) == len(breaks) + 1, got "
            f"{indices.size} indices and {breaks.size} breaks"
        )
    if not (np.isfinite(A) and A >= 0):
        raise ValueError(f"SCF amplitude A must be finite and >= 0, got {A}")
    if not np.all(np.isfinite(indices)):
        raise ValueError(f"SCF indices must be finite, got {indices}")
    if not (np.all(np.isfinite(breaks)) and np.all(breaks > 0)):
        raise ValueError(f"SCF breaks must be finite and positive, got {breaks}")
    if np.any(np.diff(breaks) >= 0):
        raise ValueError(f"SCF breaks must be strictly decreasing (highest first), got {breaks}")
    if indices[0] <= 1:
        raise ValueError(
            f"the first (highest-flux) SCF index must be > 1 for a finite number of "
            f"sources, got {indices[0]}"
        )
    return A, indices, breaks


def _segments(A: float, indices: np.ndarray, breaks: np.ndarray):
    """Segments of dN/dS = C_j (S / r_j)^-n_j on [lo_j, hi_j), highest first."""
    K = breaks.size
    hi = np.concatenate([[np.inf], breaks])
    lo = np.concatenate([breaks, [0.0]])
    ref = np.concatenate([[breaks[0]], breaks])
    C = np.empty(K + 1)
    C[0] = A
    if K >= 1:
        C[1] = A
    for j in range(2, K + 1):  # continuity at each lower break (K is tiny)
        C[j] = C[j - 1] * (breaks[j - 1] / breaks[j - 2]) ** (-indices[j - 1])
    return C, ref, lo, hi, indices


def _power_integral(C, ref, n, p, lo, hi):
    """int_lo^hi S^p C (S/ref)^-n dS for scalars (inf / divergent handled)."""
    if not lo < hi:
        return 0.0
    g = p + 1.0 - n
    if math.isinf(hi):
        if g >= 0:
            return math.inf
        return C * ref**n * lo**g / (-g)
    if lo == 0.0:
        if g <= 0:
            return math.inf
        return C * ref**n * hi**g / g
    L = math.log(hi / lo)
    # hi^g * (1 - (lo/hi)^g) / g, stable for g -> 0
    if abs(g * L) < 1e-12:
        return C * ref**n * hi**g * L
    return C * ref**n * hi**g * (-math.expm1(-g * L)) / g


def scf_integral(scf, p: int, s_lo: float = 0.0, s_hi: float = math.inf) -> float:
    """int_{s_lo}^{s_hi} S^p dN/dS dS of a broken power law (p = 0: number, 1: counts)."""
    C, ref, lo, hi, n = _segments(*scf_arrays(scf))
    total = 0.0
    for j in range(C.size):
        a, b = max(lo[j], s_lo), min(hi[j], s_hi)
        total += _power_integral(C[j], ref[j], n[j], p, a, b)
    return float(total)


def missing_counts_fraction(scf, s_min: float) -> float:
    """Fraction of the population's mean counts carried by sources with S < s_min."""
    total = scf_integral(scf, 1)
    if not math.isfinite(total):
        raise ValueError(
            "the SCF has infinite mean counts (need first index > 2 and last index < 2)"
        )
    if total == 0.0:
        return 0.0
    return float(scf_integral(scf, 1, 0.0, s_min) / total)


def finite_source_number(scf) -> bool:
    """Whether the SCF has finitely many sources down to S = 0 (lowest index < 1), so that
    `s_min = 0` is allowed."""
    return float(np.asarray(scf.indices)[-1]) < 1.0


def _segment_weights(scf, s_min: float) -> tuple[np.ndarray, ...]:
    C, ref, lo, hi, n = _segments(*scf_arrays(scf))
    lo = np.maximum(lo, s_min)
    w = np.array([_power_integral(C[j], ref[j], n[j], 0, lo[j], hi[j]) for j in range(C.size)])
    if not np.all(np.isfinite(w)):
        raise ValueError(
            f"the number of sources above s_min={s_min} is infinite: raise s_min above 0 "
            f"(the lowest SCF index {n[-1]} must be < 1 for s_min = 0)"
        )
    return w, lo, hi, n


@jax.jit
def _inverse_cdf(u, lo, hi, n):
    """Inverse CDF of S^-n on [lo, hi) at u in [0, 1).

    hi may be inf (then n > 1), lo may be 0 (then n < 1). With g = 1 - n and
    L = log(hi/lo): g < 0 anchors at lo, g > 0 at hi (both stable), g ~ 0 is log-uniform.
    """
    g = 1.0 - n
    lo_safe = jnp.where(lo > 0, lo, 1.0)
    hi_safe = jnp.where(jnp.isfinite(hi), hi, 1.0)
    L = jnp.where(jnp.isfinite(hi) & (lo > 0), jnp.log(hi_safe / lo_safe), jnp.inf)
    small = jnp.abs(g) < 1e-10
    g_safe = jnp.where(small, 1.0, g)
    # g < 0: S = lo (1 + u expm1(g L))^(1/g)   (L = inf allowed: expm1(-inf) = -1)
    neg = lo_safe * jnp.exp(jnp.log1p(u * jnp.expm1(g_safe * L)) / g_safe)
    # g > 0: S = hi (1 - (1 - u)(1 - e^{-g L}))^(1/g)   (lo = 0 allowed)
    pos = hi_safe * jnp.exp(jnp.log1p((1.0 - u) * jnp.expm1(-g_safe * L)) / g_safe)
    # g ~ 0: S = lo e^{u L}
    log_uniform = lo_safe * jnp.exp(u * jnp.where(jnp.isfinite(L), L, 0.0))
    return jnp.where(small, log_uniform, jnp.where(g < 0, neg, pos))


def sample_source_counts(
    key: Array,
    scf,
    template_sum: float,
    s_min: float,
    max_sources: int,
) -> tuple[Float[Array, " cap"], Int[Array, ""], float]:
    """Draw the source counts S (counts at the mean exposure) of one population.

    The number of sources is N ~ Poisson(N_exp), N_exp = template_sum x int_{s_min} dN/dS,
    and each S is drawn exactly from dN/dS on [s_min, inf) (inverse CDF per power-law
    segment, segment chosen by its share of the number). Output has a static capacity:
    entries i >= N are 0. Raises ValueError if N > max_sources.

    Returns (S of shape (max_sources,), N, N_exp).
    """
    s_min = float(s_min)
    if not (math.isfinite(s_min) and s_min >= 0):
        raise ValueError(f"s_min must be finite and >= 0, got {s_min}")
    template_sum = float(template_sum)
    if not (math.isfinite(template_sum) and template_sum >= 0):
        raise ValueError(f"template_sum must be finite and >= 0, got {template_sum}")
    max_sources = int(max_sources)
    if max_sources < 1:
        raise ValueError(f"max_sources must be >= 1, got {max_sources}")
    w, lo, hi, n = _segment_weights(scf, s_min)
    n_exp = template_sum * float(w.sum())
    k_n, k_seg, k_u = jax.random.split(key, 3)
    n_src = jax.random.poisson(k_n, n_exp) if n_exp > 0 else jnp.asarray(0)
    if int(n_src) > max_sources:
        raise ValueError(
            f"drew {int(n_src)} sources (expected {n_exp:.4g}) but max_sources={max_sources}: "
            f"raise max_sources or raise s_min (now {s_min})"
        )
    if n_exp == 0:
        return jnp.zeros(max_sources), jnp.asarray(0), 0.0
    p = w / w.sum()
    seg = jax.random.choice(k_seg, p.size, shape=(max_sources,), p=jnp.asarray(p))
    u = jax.random.uniform(k_u, (max_sources,), dtype=jnp.float64)
    S = _inverse_cdf(u, jnp.asarray(lo)[seg], jnp.asarray(hi)[seg], jnp.asarray(n)[seg])
    valid = jnp.arange(max_sources) < n_src
    return jnp.where(valid, S, 0.0), n_src, n_exp


# --------------------------------------------------------------------------------------
# Positions and the PSF
# --------------------------------------------------------------------------------------


def sample_positions(
    key: Array, template_sky: np.ndarray, nside: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` source positions: a RING pixel with probability proportional to
    `template_sky` (nsky,), then uniformly within the pixel (random NESTED descendant at
    nside 2^29, whose centre is returned; error < 2e-9 rad).

    Returns (pixel (n,) RING indices, unit vectors (n, 3)).
    """
    t = np.asarray(template_sky, dtype=np.float64)
    if t.shape != (hp.nside2npix(nside),):
        raise ValueError(f"template has shape {t.shape}, expected ({hp.nside2npix(nside)},)")
    if np.any(~np.isfinite(t)) or np.any(t < 0) or t.sum() <= 0:
        raise ValueError("source template must be finite, >= 0 and not all zero")
    k_pix, k_sub = jax.random.split(key)
    support = np.flatnonzero(t > 0)
    cdf = np.cumsum(t[support])
    u = np.asarray(jax.random.uniform(k_pix, (_bucket(n),), dtype=jnp.float64))[:n] * cdf[-1]
    idx = np.minimum(np.searchsorted(cdf, u, side="right"), support.size - 1)
    pix = support[idx]
    level = int(round(math.log2(NSIDE_FINE // nside)))
    nest = hp.ring2nest(nside, pix).astype(np.int64)
    sub = np.asarray(
        jax.random.randint(k_sub, (_bucket(n),), 0, 4**level, dtype=jnp.int64), dtype=np.int64
    )[:n]
    fine = nest * np.int64(4**level) + sub
    vec = np.stack(hp.pix2vec(NSIDE_FINE, fine, nest=True), axis=-1)
    return pix, vec


@jax.jit
def _rotate(vec, r, phi):
    """Move unit vectors `vec` (n, 3) by angle r (n,) at azimuth phi (n,) on the sphere."""
    z = jnp.array([0.0, 0.0, 1.0])
    x = jnp.array([1.0, 0.0, 0.0])
    a = jnp.where(jnp.abs(vec[:, 2:3]) < 0.9, z, x)
    e1 = jnp.cross(a, vec)
    e1 = e1 / jnp.linalg.norm(e1, axis=-1, keepdims=True)
    e2 = jnp.cross(vec, e1)
    d = jnp.cos(phi)[:, None] * e1 + jnp.sin(phi)[:, None] * e2
    return jnp.cos(r)[:, None] * vec + jnp.sin(r)[:, None] * d


def scatter_photons(
    key: Array,
    source_vec: np.ndarray,
    photons: np.ndarray,
    nside: int,
    psf_model=None,
    chunk: int = PHOTON_CHUNK,
) -> np.ndarray:
    """Full-sky counts map (nsky,) of the photons of sources at unit vectors `source_vec`
    (n, 3), `photons` (n,) per source, each displaced by `psf_model` (None: no PSF)."""
    source_vec = np.asarray(source_vec, dtype=np.float64)
    photons = np.asarray(photons, dtype=np.int64)
    npix = hp.nside2npix(nside)
    total = int(photons.sum())
    if total == 0:
        return np.zeros(npix, dtype=np.int64)
    if psf_model is None:
        pix = hp.vec2pix(nside, *source_vec.T)
        return np.bincount(pix, weights=photons, minlength=npix).astype(np.int64)
    owner = np.repeat(np.arange(photons.size), photons)
    counts = np.zeros(npix, dtype=np.int64)
    size = min(chunk, 1 << (total - 1).bit_length())  # power of two: few distinct shapes
    for c, start in enumerate(range(0, total, size)):
        k_r, k_phi = jax.random.split(jax.random.fold_in(key, c))
        r = jnp.asarray(psf_model.sample_radius(k_r, (size,)), dtype=jnp.float64)
        phi = jax.random.uniform(k_phi, (size,), dtype=jnp.float64, maxval=2 * jnp.pi)
        own = owner[start : start + size]
        m = own.size
        v = np.zeros((size, 3))
        v[:m] = source_vec[own]
        v[m:, 2] = 1.0
        out = np.asarray(_rotate(jnp.asarray(v), r, phi))[:m]
        counts += np.bincount(hp.vec2pix(nside, *out.T), minlength=npix)
    return counts


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


class SourceList(eqx.Module):
    """The simulated sources of one population (n sources).

    pixel: RING pixel holding the source; l, b: Galactic coordinates (radians);
    S: expected counts at the mean exposure (the SCF's variable); expected: expected counts
    at the source's exposure; photons: photons drawn.
    """

    pixel: Int[Array, " n"]
    l: Float[Array, " n"]
    b: Float[Array, " n"]
    S: Float[Array, " n"]
    expected: Float[Array, " n"]
    photons: Int[Array, " n"]

    @property
    def n(self) -> int:
        return int(self.pixel.shape[0])


class PopulationTruth(eqx.Module):
    """Truth of one point-source population.

    n_expected: expected number of sources above s_min; missing_fraction: fraction of the
    population's mean counts from sources below s_min (not simulated as sources).
    """

    name: str = eqx.field(static=True)
    sources: SourceList
    counts_sky: Int[Array, " nsky"]
    n_expected: float = eqx.field(static=True)
    missing_fraction: float = eqx.field(static=True)
    s_min: float = eqx.field(static=True)


class Simulation(eqx.Module):
    """A mock sky and its truth.

    counts: (npix,) counts on the ROI's analysis pixels; counts_sky: (nsky,) full-sky map
    (smooth components only on analysis pixels; point-source photons wherever they land);
    component_counts: name -> (npix,) counts of each component on the analysis pixels
    (for populations, the photons landing there; with `faint_as_smooth`, also the smooth
    faint part under "<name>/faint"); populations: name -> PopulationTruth.
    """

    counts: Int[Array, " npix"]
    counts_sky: Int[Array, " nsky"]
    component_counts: dict[str, Any]
    populations: dict[str, PopulationTruth]
    settings: dict[str, Any] = eqx.field(static=True)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _exposure_ratio_sky(nside, exposure_sky, template_sky, mean_exposure):
    npix = hp.nside2npix(nside)
    if exposure_sky is None:
        return np.ones(npix)
    e = np.asarray(exposure_sky, dtype=np.float64)
    if e.shape != (npix,):
        raise ValueError(f"exposure map has shape {e.shape}, expected ({npix},)")
    support = np.asarray(template_sky) > 0
    if np.any(~np.isfinite(e[support])) or np.any(e[support] <= 0):
        raise ValueError("exposure must be finite and positive where the template is > 0")
    if mean_exposure is None:
        mean_exposure = e[support].mean()
    mean_exposure = float(mean_exposure)
    if not (math.isfinite(mean_exposure) and mean_exposure > 0):
        raise ValueError(f"mean_exposure must be finite and positive, got {mean_exposure}")
    return np.where(support, e / mean_exposure, 1.0)


def simulate_population(
    key: Array,
    template_sky: Float[Array, " nsky"] | np.ndarray,
    scf,
    nside: int,
    psf_model=None,
    exposure_sky: Float[Array, " nsky"] | np.ndarray | None = None,
    *,
    mean_exposure: float | None = None,
    s_min: float = 0.0,
    max_sources: int | None = None,
    name: str = "ps",
    chunk: int = PHOTON_CHUNK,
) -> PopulationTruth:
    """Simulate one point-source population on the full sky (no SkyModel needed).

    template_sky: (nsky,) RING map multiplying the SCF amplitude A (sources per pixel per
    unit dN/dS); scf: BrokenPowerLaw or (A, indices, breaks), S in counts at the mean
    exposure; exposure_sky: (nsky,) exposure (None: uniform) — a source in pixel p has
    expected counts S x exposure_sky[p] / mean_exposure (default mean over template > 0);
    s_min: lower cut on S (see module docstring); max_sources: capacity (default: N_exp +
    10 sqrt(N_exp) + 100).
    """
    nside = int(nside)
    if not hp.isnsideok(nside) or nside > NSIDE_FINE:
        raise ValueError(f"nside must be a power of 2 <= 2^29, got {nside}")
    t = np.asarray(template_sky, dtype=np.float64)
    npix = hp.nside2npix(nside)
    if t.shape != (npix,):
        raise ValueError(f"template has shape {t.shape}, expected ({npix},) for nside {nside}")
    if np.any(~np.isfinite(t)) or np.any(t < 0):
        raise ValueError("source template must be finite and >= 0")
    ratio = _exposure_ratio_sky(nside, exposure_sky, t, mean_exposure)
    s_min = float(s_min)
    w, _, _, _ = _segment_weights(scf, s_min)
    n_exp_guess = float(t.sum() * w.sum())
    if max_sources is None:
        max_sources = _bucket(n_exp_guess + 10 * math.sqrt(n_exp_guess) + 100)
    k_s, k_pos, k_ph, k_psf = jax.random.split(key, 4)
    S, n_src, n_exp = sample_source_counts(k_s, scf, float(t.sum()), s_min, max_sources)
    n_src = int(n_src)
    S = np.asarray(S)[:n_src]
    if n_src > 0:
        pix, vec = sample_positions(k_pos, t, nside, n_src)
    else:
        pix, vec = np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    expected = S * ratio[pix]
    padded = np.zeros(_bucket(n_src))
    padded[:n_src] = expected
    photons = np.asarray(jax.random.poisson(k_ph, jnp.asarray(padded)), dtype=np.int64)[:n_src]
    counts = scatter_photons(k_psf, vec, photons, nside, psf_model, chunk=chunk)
    theta, phi = hp.vec2ang(vec) if n_src else (np.zeros(0), np.zeros(0))
    l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
    sources = SourceList(
        pixel=jnp.asarray(pix, dtype=jnp.int64),
        l=jnp.asarray(l, dtype=jnp.float64),
        b=jnp.asarray(np.pi / 2 - theta, dtype=jnp.float64),
        S=jnp.asarray(S, dtype=jnp.float64),
        expected=jnp.asarray(expected, dtype=jnp.float64),
        photons=jnp.asarray(photons),
    )
    missing = missing_counts_fraction(scf, s_min) if s_min > 0 else 0.0
    return PopulationTruth(
        name=name,
        sources=sources,
        counts_sky=jnp.asarray(counts),
        n_expected=float(n_exp),
        missing_fraction=missing,
        s_min=s_min,
    )


def simulate(
    key: Array,
    sky,
    roi,
    psf_model=None,
    *,
    exposure: str = "pixel",
    s_min: float | dict[str, float] = 0.0,
    max_sources: int | None = None,
    faint_as_smooth: bool = False,
    chunk: int = PHOTON_CHUNK,
) -> Simulation:
    """Simulate a mock sky from a SkyModel at its current parameter values.

    sky: a `SkyModel` (anything with a `components` tuple); smooth components give
    Poisson(expected_counts(roi)) on the analysis pixels; point-source populations
    (`AbstractPointSourcePopulation`) are simulated source by source from
    `source_template(roi)` and `source_count_function(roi)`, sources placed in the
    analysis pixels only. exposure: "pixel" (source counts S x eps_p / mean eps over the
    analysis pixels) or "region" (S x the exposure-region ratio of the pixel, exactly what
    the NPTF likelihood assumes). s_min: lower cut on S, one value or per population name.
    faint_as_smooth: add the mean counts of sources below s_min as a smooth Poisson map.
    """
    from skymodel.components.base import AbstractPointSourcePopulation

    if exposure not in ("pixel", "region"):
        raise ValueError(f'exposure must be "pixel" or "region", got {exposure!r}')
    components = getattr(sky, "components", None)
    if components is None:
        raise ValueError(f"sky must have a `components` tuple, got {type(sky).__name__}")
    nside = int(roi.nside)
    npix_sky = hp.nside2npix(nside)
    pixels = np.asarray(roi.pixels)
    if exposure == "pixel":
        eps = np.asarray(roi.analysis_exposure, dtype=np.float64)
        ratio = eps / eps.mean()
    else:
        ratio = np.asarray(roi.region_ratio)[np.asarray(roi.region)]
    ratio_sky = np.ones(npix_sky)
    ratio_sky[pixels] = ratio

    counts_sky = np.zeros(npix_sky, dtype=np.int64)
    comp_counts: dict[str, Any] = {}
    pops: dict[str, PopulationTruth] = {}
    keys = jax.random.split(key, len(components))
    for c, k in zip(components, keys):  # a handful of components
        name = c.name
        if isinstance(c, AbstractPointSourcePopulation):
            cut = float(s_min.get(name, 0.0) if isinstance(s_min, dict) else s_min)
            t = np.asarray(c.source_template(roi), dtype=np.float64)
            t_sky = np.zeros(npix_sky)
            t_sky[pixels] = t
            scf = c.source_count_function(roi)
            k_pop, k_faint = jax.random.split(k)
            truth = simulate_population(
                k_pop, t_sky, scf, nside, psf_model, ratio_sky,
                mean_exposure=1.0, s_min=cut, max_sources=max_sources, name=name,
                chunk=chunk,
            )
            pops[name] = truth
            cs = np.asarray(truth.counts_sky)
            counts_sky += cs
            comp_counts[name] = jnp.asarray(cs[pixels])
            if faint_as_smooth and cut > 0:
                mu = t * ratio * scf_integral(scf, 1, 0.0, cut)
                faint = np.asarray(jax.random.poisson(k_faint, jnp.asarray(mu)), dtype=np.int64)
                counts_sky[pixels] += faint
                comp_counts[f"{name}/faint"] = jnp.asarray(faint)
        else:
            mu = np.asarray(c.expected_counts(roi), dtype=np.float64)
            if mu.shape != pixels.shape or np.any(~np.isfinite(mu)) or np.any(mu < 0):
                raise ValueError(
                    f"component {name!r} gave expected counts of shape {mu.shape} with "
                    f"non-finite or negative values; expected ({pixels.size},) >= 0"
                )
            n = np.asarray(jax.random.poisson(k, jnp.asarray(mu)), dtype=np.int64)
            counts_sky[pixels] += n
            comp_counts[name] = jnp.asarray(n)
    settings = dict(
        nside=nside,
        exposure=exposure,
        s_min=s_min if not isinstance(s_min, dict) else tuple(sorted(s_min.items())),
        faint_as_smooth=faint_as_smooth,
        psf=type(psf_model).__name__ if psf_model is not None else None,
    )
    return Simulation(
        counts=jnp.asarray(counts_sky[pixels]),
        counts_sky=jnp.asarray(counts_sky),
        component_counts=comp_counts,
        populations=pops,
        settings=settings,
    )


__all__ = [
    "PopulationTruth",
    "Simulation",
    "SourceList",
    "missing_counts_fraction",
    "sample_positions",
    "sample_source_counts",
    "scatter_photons",
    "scf_integral",
    "scf_arrays",
    "simulate",
    "simulate_population",
]
