"""Tests of the simulator: exact sampling pieces, and closure against the NPTF p_k.

Independent references: scipy quadrature of the broken power law (numbers, CDF, missing
counts), healpy geometry (pixel membership, angular distances), a compound-Poisson p_k
computed here from quad x_m (delta PSF), and the project's own NPTF likelihood (the
closure test of the PSF correction and the exposure regions).
"""

import math

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

import importlib

sim = importlib.import_module("skymodel.simulate")  # the package re-exports the function `simulate`

SIG = 1e-3  # significance of every chi-square / KS test (seeds fixed: deterministic)


# ------------------------------------------------------------------ independent helpers


def dnds_ref(S, A, indices, breaks):
    """Broken power law written out directly from SCIENCE.md (highest break first)."""
    S = np.asarray(S, dtype=float)
    out = np.empty_like(S)
    edges = [np.inf] + list(breaks) + [0.0]
    top = A  # dN/dS at the upper edge of the current segment (segments 1, 2, ...)
    for j in range(len(indices)):
        sel = (S < edges[j]) & (S >= edges[j + 1])
        if j == 0:
            out[sel] = A * (S[sel] / breaks[0]) ** (-indices[0])
        else:
            out[sel] = top * (S[sel] / edges[j]) ** (-indices[j])
            if j + 1 < len(edges) - 1:
                top = top * (edges[j + 1] / edges[j]) ** (-indices[j])
    return out


def quad_ref(fn, lo, hi, breaks):
    pts = sorted({lo, hi, *[b for b in breaks if lo < b < hi]})
    total = 0.0
    for a, b in zip(pts[:-1], pts[1:]):
        total += integrate.quad(fn, a, b, limit=200, epsabs=0, epsrel=1e-11)[0]
    return total


def pk_reference(T, A, indices, breaks, k_max, f=(1.0,), dfrho=(1.0,), ratio=1.0):
    """p_k from the generating function, x_m = T sum_i dfrho_i int dS dN/dS_r (f_i S)^m
    e^(-f_i S) / m!, with dN/dS_r(S) = dN/dS(S / ratio) / ratio (the SCF in an exposure
    region) and (f_i, dfrho_i = Delta f rho(f_i)) a PSF table; the S-integral on a dense
    log grid (breaks on grid points, Simpson), recursion p_k = sum_m m x_m p_(k-m) / k."""
    f = np.asarray(f, float)[:, None]
    dfrho = np.asarray(dfrho, float)[:, None]
    edges = sorted({1e-9, *[b * ratio for b in breaks], 1e7})
    logs = np.concatenate([np.linspace(np.log(a), np.log(b), 4001)[:-1]
                           for a, b in zip(edges[:-1], edges[1:])] + [[np.log(edges[-1])]])
    S = np.exp(logs)
    w = S * dnds_ref(S / ratio, A, indices, breaks) / ratio  # dS = S dlogS
    y = f * S[None, :]
    xm = np.array([
        T * np.sum(dfrho * integrate.simpson(
            w * np.exp(m * np.log(y) - y - special.gammaln(m + 1)), x=logs, axis=-1)[:, None])
        for m in range(1, k_max + 1)
    ])
    xtot = T * np.sum(dfrho * integrate.simpson(w * -np.expm1(-y), x=logs, axis=-1)[:, None])
    p = np.zeros(k_max + 1)
    p[0] = np.exp(-xtot)
    for k in range(1, k_max + 1):
        p[k] = sum(m * xm[m - 1] * p[k - m] for m in range(1, k + 1)) / k
    return p


def chi2_pvalue(counts, pk, min_expected=5.0):
    """Chi-square p-value of the histogram of `counts` against pmf `pk` (tail merged)."""
    n = counts.size
    K = pk.size
    hist = np.bincount(np.minimum(counts, K), minlength=K + 1)[: K + 1].astype(float)
    prob = np.append(pk, max(0.0, 1.0 - pk.sum()))
    # merge bins from the top until every expected count >= min_expected
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, p in zip(hist[::-1], prob[::-1]):
        o_acc += o
        e_acc += n * p
        if e_acc >= min_expected:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 or o_acc > 0:
        obs[-1] += o_acc
        exp[-1] += e_acc
    obs, exp = np.array(obs), np.array(exp)
    stat = np.sum((obs - exp) ** 2 / exp)
    return stats.chi2.sf(stat, obs.size - 1), stat, obs.size - 1


# ------------------------------------------------------------------ SCF sampling

SCF3 = (2.5, np.array([3.5, 1.0, 0.3, -1.0]), np.array([40.0, 8.0, 1.5]))  # index 1 segment


@pytest.mark.parametrize("s_min", [0.0, 0.7, 12.0])
def test_source_counts_follow_dnds(s_min):
    A, ind, br = SCF3
    n_ref = quad_ref(lambda s: dnds_ref(np.array([s]), A, ind, br)[0], s_min, np.inf, br)
    assert sim.scf_integral(SCF3, 0, s_min) == pytest.approx(n_ref, rel=1e-8)
    T = 4000.0 / n_ref  # template sum giving ~4000 sources
    S, n, n_exp = sim.sample_source_counts(jax.random.key(1), SCF3, T, s_min, 20_000)
    assert n_exp == pytest.approx(4000.0, rel=1e-8)
    n = int(n)
    S = np.asarray(S)
    assert np.all(S[n:] == 0) and np.all(S[:n] >= s_min)
    assert abs(n - n_exp) < 5 * math.sqrt(n_exp)

    def cdf(x):
        return np.array(
            [quad_ref(lambda s: dnds_ref(np.array([s]), A, ind, br)[0], s_min, xi, br) / n_ref
             if xi > s_min else 0.0 for xi in np.atleast_1d(x)]
        )

    xs = np.sort(S[:n])[:: max(1, n // 800)]  # a thinned sample keeps quad calls few
    assert stats.kstest(xs, cdf).pvalue > SIG


def test_mean_counts_and_missing_fraction():
    A, ind, br = SCF3
    total = quad_ref(lambda s: s * dnds_ref(np.array([s]), A, ind, br)[0], 0.0, np.inf, br)
    assert sim.scf_integral(SCF3, 1) == pytest.approx(total, rel=1e-8)
    for s_min in (0.2, 1.5, 5.0, 100.0):
        below = quad_ref(lambda s: s * dnds_ref(np.array([s]), A, ind, br)[0], 0.0, s_min, br)
        assert sim.missing_counts_fraction(SCF3, s_min) == pytest.approx(below / total, rel=1e-8)


def test_number_of_sources_is_poisson():
    scf = (1.0, np.array([3.0, 0.5]), np.array([5.0]))
    keys = jax.random.split(jax.random.key(3), 200)
    ns = np.array([int(sim.sample_source_counts(k, scf, 7.0, 1.0, 1000)[1]) for k in keys])
    n_exp = 7.0 * sim.scf_integral(scf, 0, 1.0)
    # mean and variance of a Poisson
    assert abs(ns.mean() - n_exp) < 4 * math.sqrt(n_exp / ns.size)
    assert ns.var(ddof=1) / n_exp == pytest.approx(1.0, abs=0.35)


def test_bad_inputs_raise():
    scf = (1.0, np.array([3.0, 1.5]), np.array([5.0]))
    with pytest.raises(ValueError, match="max_sources"):
        sim.sample_source_counts(jax.random.key(0), scf, 1e4, 1.0, 10)
    with pytest.raises(ValueError, match="s_min"):
        sim.sample_source_counts(jax.random.key(0), scf, 10.0, 0.0, 100)  # last index >= 1
    with pytest.raises(ValueError, match="decreasing"):
        sim.scf_arrays((1.0, np.array([3.0, 1.5, 0.5]), np.array([1.0, 5.0])))
    with pytest.raises(ValueError, match="indices"):
        sim.scf_arrays((1.0, np.array([3.0]), np.array([5.0])))
    with pytest.raises(ValueError, match="template"):
        sim.simulate_population(jax.random.key(0), np.ones(10), scf, 4)
    with pytest.raises(ValueError, match="exposure"):
        sim.simulate_population(jax.random.key(0), np.ones(192), scf, 4, None,
                                -np.ones(192), s_min=1.0)


# ------------------------------------------------------------------ positions, geometry


def test_positions_uniform_within_pixel():
    nside, pix = 4, 77
    t = np.zeros(hp.nside2npix(nside))
    t[pix] = 1.0
    got, vec = sim.sample_positions(jax.random.key(5), t, nside, 40_000)
    assert np.all(got == pix)
    assert np.all(hp.vec2pix(nside, *vec.T) == pix)
    # the 64 NESTED descendants at nside 32 are equal-area: counts must be uniform
    fine = hp.vec2pix(nside * 8, *vec.T, nest=True)
    nest = hp.ring2nest(nside, pix)
    assert np.all(fine // 64 == nest)
    hist = np.bincount(fine - nest * 64, minlength=64)
    assert stats.chisquare(hist).pvalue > SIG


def test_positions_follow_template():
    nside = 8
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, hp.nside2npix(nside)) * (rng.uniform(size=hp.nside2npix(nside)) > 0.3)
    pix, _ = sim.sample_positions(jax.random.key(6), t, nside, 200_000)
    hist = np.bincount(pix, minlength=t.size)
    assert hist[t == 0].sum() == 0
    sel = t > 0
    assert stats.chisquare(hist[sel], t[sel] / t[sel].sum() * pix.size).pvalue > SIG


def test_rotation_is_exact_on_the_sphere():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[:3] = [[0, 0, 1], [0, 0, -1], [1, 0, 0]]  # poles and the equator
    r = rng.uniform(0, np.pi, 2000)
    phi = rng.uniform(0, 2 * np.pi, 2000)
    out = np.asarray(sim._rotate(jnp.asarray(v), jnp.asarray(r), jnp.asarray(phi)))
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-12)
    th1, ph1 = hp.vec2ang(v)
    th2, ph2 = hp.vec2ang(out)
    dist = hp.rotator.angdist(np.array([th1, ph1]), np.array([th2, ph2]))
    assert np.allclose(dist, r, atol=1e-7)


def test_reproducible_and_key_dependent():
    nside = 16
    scf = (0.05, np.array([3.0, 0.5]), np.array([10.0]))
    t = np.ones(hp.nside2npix(nside))
    a = sim.simulate_population(jax.random.key(9), t, scf, nside)
    b = sim.simulate_population(jax.random.key(9), t, scf, nside)
    c = sim.simulate_population(jax.random.key(10), t, scf, nside)
    assert np.array_equal(a.counts_sky, b.counts_sky)
    assert np.array_equal(a.sources.S, b.sources.S)
    assert not np.array_equal(a.counts_sky, c.counts_sky)
    # photons are conserved (delta PSF) and sit in the source's pixel
    assert int(a.counts_sky.sum()) == int(a.sources.photons.sum())
    assert np.array_equal(
        np.bincount(a.sources.pixel, weights=a.sources.photons, minlength=t.size),
        np.asarray(a.counts_sky),
    )


# ------------------------------------------------------------------ closure, delta PSF


@pytest.mark.parametrize(
    "name,A,indices,breaks",
    [
        pytest.param("faint", 2.0, [5.0, 0.5], [2.0], marks=pytest.mark.slow),  # S_b = 2
        ("bright", 2e-3, [4.0, -0.5], [30.0]),  # few bright sources, S_b = 30
    ],
)
def test_closure_delta_psf_compound_poisson(name, A, indices, breaks):
    nside = 32
    npix = hp.nside2npix(nside)
    scf = (A, np.array(indices), np.array(breaks))
    k_max = 60
    pk = pk_reference(1.0, A, indices, breaks, k_max)
    mean_ref = sim.scf_integral(scf, 1)
    counts = []
    for i in range(2):
        tr = sim.simulate_population(jax.random.key(100 + i), np.ones(npix), scf, nside)
        counts.append(np.asarray(tr.counts_sky))
    counts = np.concatenate(counts)
    p, stat, dof = chi2_pvalue(counts, pk)
    assert p > SIG, (name, stat, dof)
    assert abs(counts.mean() - mean_ref) < 5 * counts.std() / math.sqrt(counts.size)


def test_pk_reference_matches_quad():
    """The grid reference used below agrees with adaptive quadrature (delta PSF)."""
    A, ind, br = 2.0, [5.0, 0.5], [2.0]
    p = pk_reference(1.0, A, ind, br, 6)
    m = 3
    x3 = quad_ref(lambda s: dnds_ref(np.array([s]), A, ind, br)[0]
                  * np.exp(m * np.log(s) - s - special.gammaln(m + 1)), 0.0, np.inf, br)
    xtot = quad_ref(lambda s: dnds_ref(np.array([s]), A, ind, br)[0] * -np.expm1(-s),
                    0.0, np.inf, br)
    assert p[0] == pytest.approx(np.exp(-xtot), rel=1e-7)
    # p_3 involves x_1..x_3; check x_3 through p_3 - (terms from x_1, x_2)
    p1 = pk_reference(1.0, A, ind, br, 2)
    x1 = p1[1] / p1[0]
    x2 = (2 * p1[2] - x1 * p1[1]) / (2 * p1[0])
    x3_from_p = (3 * p[3] - x1 * p[2] - 2 * x2 * p[1]) / (3 * p[0])
    assert x3_from_p == pytest.approx(x3, rel=1e-7)


# ------------------------------------------------------------------ closure vs the NPTF p_k

NSIDE_C = 32
POPS = {
    "faint": (2.0, [5.0, 0.5], [2.0]),  # ~9 sources and 8 counts per pixel, S_b = 2
    "bright": (2e-3, [4.0, -0.5], [30.0]),  # 0.06 sources and 1.6 counts per pixel, S_b = 30
}
REGION_EXPOSURE = np.array([0.6, 1.0, 1.7])  # piecewise-constant exposure of 3 bands


@pytest.fixture(scope="module")
def psf_tables(tmp_path_factory):
    """PSF models and their PSF-correction tables at NSIDE_C (fine table: f_trunc 1e-4)."""
    from skymodel.psf import GaussianPSF, KingPSF, PSFCorrection

    cache = tmp_path_factory.mktemp("psfcache")
    out = {"delta": (None, None)}
    for name, psf in (("gauss", GaussianPSF.from_degrees(1.0)),
                      ("king", KingPSF(np.deg2rad(0.7), 2.5))):
        out[name] = (psf, lambda psf=psf: PSFCorrection.compute(
            psf, NSIDE_C, n_sources=20_000, f_trunc=1e-4, num_f_bins=60, cache_dir=cache))
    return out


def _simulate_closure(psf, scf, n_regions, n_real):
    """Counts of a flat full-sky population, grouped by exposure region (bands in theta;
    with a PSF, pixels within 10 deg of a band edge are dropped and only every 4th NESTED
    pixel is kept, so the histogrammed pixels are nearly independent)."""
    npix = hp.nside2npix(NSIDE_C)
    theta, _ = hp.pix2ang(NSIDE_C, np.arange(npix))
    if n_regions == 1:
        region = np.zeros(npix, int)
        keep = np.ones(npix, bool)
    else:
        region = np.digitize(theta, [np.pi / 3, 2 * np.pi / 3])
        edge = np.min(np.abs(theta[:, None] - np.array([np.pi / 3, 2 * np.pi / 3])), axis=1)
        keep = edge > np.deg2rad(10.0) if psf is not None else np.ones(npix, bool)
    exposure = REGION_EXPOSURE[region] if n_regions > 1 else np.ones(npix)
    ratio = np.array([exposure[region == r].mean() for r in range(n_regions)]) / exposure.mean()
    if psf is not None:
        keep &= hp.ring2nest(NSIDE_C, np.arange(npix)) % 4 == 0
    per_region = [[] for _ in range(n_regions)]
    for i in range(n_real):
        tr = sim.simulate_population(jax.random.key(1000 + i), np.ones(npix), scf, NSIDE_C,
                                     psf, exposure)
        c = np.asarray(tr.counts_sky)
        for r in range(n_regions):
            per_region[r].append(c[keep & (region == r)])
    return [np.concatenate(x) for x in per_region], ratio


def _nptf_pk(scf, corr, k_max, ratio):
    """The likelihood's p_0..p_kmax for one pixel with T = 1 (pk_table of the SCF's x_m)."""
    from skymodel.likelihood import pk_table

    f, w = (jnp.ones(1), jnp.ones(1)) if corr is None else (corr.f, corr.weights)
    xm, xtot = scf.generating_terms(f, w, k_max, ratio)
    return np.asarray(pk_table(jnp.zeros(1), xm[None, :], jnp.reshape(xtot, (1,)), k_max))[0]


def _closure_params():
    fast = {("delta", "faint", 1), ("gauss", "bright", 3)}
    out = []
    for psf in ("delta", "gauss", "king"):
        for pop in ("faint", "bright"):
            for nreg in (1, 3):
                marks = () if (psf, pop, nreg) in fast else (pytest.mark.slow,)
                out.append(pytest.param(psf, pop, nreg, marks=marks, id=f"{psf}-{pop}-{nreg}reg"))
    return out


@pytest.mark.parametrize("psf_name,pop,n_regions", _closure_params())
def test_closure_against_nptf_likelihood(psf_tables, psf_name, pop, n_regions):
    """Histogram of simulated pixel counts == the likelihood's p_k (chi-square, 1e-3)."""
    from skymodel.scf import BrokenPowerLaw

    A, ind, br = POPS[pop]
    scf = BrokenPowerLaw(A, np.array(ind), np.array(br))
    psf, corr = psf_tables[psf_name]
    corr = corr() if corr is not None else None
    counts, ratio = _simulate_closure(psf, scf, n_regions, 2 if psf is None else 16)
    stat = dof = 0.0
    for c, r in zip(counts, ratio):
        pk = _nptf_pk(scf, corr, 60, float(r))
        _, s, d = chi2_pvalue(c, pk)
        stat, dof = stat + s, dof + d
        assert d > 0, f"p_k (region ratio {r}) puts all its mass beyond k = 60: {pk[:5]}"
        # mean counts: r x mean counts per unit template (flux fully kept by the simulator)
        assert abs(c.mean() - r * float(scf.mean_counts())) < 5 * c.std() / math.sqrt(c.size)
    assert stats.chi2.sf(stat, dof) > SIG, (stat, dof)


@pytest.mark.slow
@pytest.mark.parametrize("psf_name,pop,n_regions",
                         [("gauss", "faint", 3), ("king", "bright", 1), ("king", "faint", 3)])
def test_closure_against_independent_pk(psf_tables, psf_name, pop, n_regions):
    """Same closure against p_k computed here from the PSF table (Delta f rho = w f)."""
    A, ind, br = POPS[pop]
    psf, corr = psf_tables[psf_name]
    corr = corr()
    f, dfrho = np.asarray(corr.f), np.asarray(corr.weights) * np.asarray(corr.f)
    counts, ratio = _simulate_closure(psf, (A, np.array(ind), np.array(br)), n_regions, 16)
    stat = dof = 0.0
    for c, r in zip(counts, ratio):
        pk = pk_reference(1.0, A, ind, br, 100, f, dfrho, float(r))
        _, s, d = chi2_pvalue(c, pk)
        stat, dof = stat + s, dof + d
    assert stats.chi2.sf(stat, dof) > SIG, (stat, dof)


def test_psf_radial_sampling_is_exact(psf_tables):
    """Photon offsets from their source follow psf.cdf (KS), end to end through the
    rotation on the sphere."""
    for name in ("gauss", "king"):
        psf, _ = psf_tables[name]
        r = np.asarray(psf.sample_radius(jax.random.key(4), (20_000,)))
        assert stats.kstest(r, lambda x: np.asarray(psf.cdf(jnp.asarray(x)))).pvalue > SIG
        src = np.tile(hp.ang2vec(0.3, 1.2), (20_000, 1))
        phi = np.asarray(jax.random.uniform(jax.random.key(5), (20_000,), maxval=2 * np.pi))
        out = np.asarray(sim._rotate(jnp.asarray(src), jnp.asarray(r), jnp.asarray(phi)))
        d = np.arccos(np.clip(out @ src[0], -1, 1))
        assert stats.kstest(d, lambda x: np.asarray(psf.cdf(jnp.asarray(x)))).pvalue > SIG


# ------------------------------------------------------------------ driven by a SkyModel


def test_simulate_sky_model_with_exposure_regions():
    import typing

    import equinox as eqx

    from skymodel.components.base import AbstractComponent, AbstractPointSourcePopulation
    from skymodel.model import SkyModel
    from skymodel.roi import ROI
    from skymodel.scf import BrokenPowerLaw

    @typing.final
    class Flat(AbstractComponent):
        name: str = eqx.field(static=True)
        norm: float = eqx.field(static=True)

        def expected_counts(self, roi):
            return self.norm * jnp.ones(roi.n_pixels)

    @typing.final
    class FlatPS(AbstractPointSourcePopulation):
        name: str = eqx.field(static=True)

        def expected_counts(self, roi):
            return self.source_count_function(roi).mean_counts() * jnp.ones(roi.n_pixels)

        def source_template(self, roi):
            return jnp.ones(roi.n_pixels)

        def source_count_function(self, roi):
            A, ind, br = POPS["bright"]
            return BrokenPowerLaw(A, jnp.array(ind), jnp.array(br))

    nside = NSIDE_C
    npix = hp.nside2npix(nside)
    theta, _ = hp.pix2ang(nside, np.arange(npix))
    mask = np.abs(np.pi / 2 - theta) < np.deg2rad(20)
    band = np.digitize(theta, [np.pi / 3, 2 * np.pi / 3])  # two caps and the masked middle
    exposure = np.where(band == 0, 0.7, 1.6)  # 2 regions of equal size, constant within
    roi = ROI.from_masks(nside, mask, exposure=exposure, n_exposure_regions=2)
    sky = SkyModel([Flat("iso", 2.5), FlatPS("ps")])
    out = sim.simulate(jax.random.key(11), sky, roi, exposure="region")
    again = sim.simulate(jax.random.key(11), sky, roi, exposure="region")
    assert np.array_equal(out.counts, again.counts)
    iso = np.asarray(out.component_counts["iso"])
    ps = np.asarray(out.component_counts["ps"])
    assert np.array_equal(np.asarray(out.counts), iso + ps)
    assert abs(iso.mean() - 2.5) < 5 * math.sqrt(2.5 / iso.size)
    truth = out.populations["ps"]
    assert np.all(np.isin(np.asarray(truth.sources.pixel), np.asarray(roi.pixels)))
    # expected counts at the source = S x region ratio; the histogram matches p_k per region
    region = np.asarray(roi.region)
    ratio = np.asarray(roi.region_ratio)
    pos = np.searchsorted(np.asarray(roi.pixels), np.asarray(truth.sources.pixel))
    assert np.allclose(truth.sources.expected, truth.sources.S * ratio[region[pos]])
    A, ind, br = POPS["bright"]
    stat = dof = 0.0
    for r in range(2):
        pk = pk_reference(1.0, A, ind, br, 100, ratio=float(ratio[r]))
        _, s, d = chi2_pvalue(ps[region == r], pk)
        stat, dof = stat + s, dof + d
    assert stats.chi2.sf(stat, dof) > SIG, (stat, dof)
    with pytest.raises(ValueError, match="exposure"):
        sim.simulate(jax.random.key(0), sky, roi, exposure="bogus")


def test_s_min_missing_flux_and_faint_as_smooth():
    """Sources below s_min are dropped; the missing mean counts match the analytic
    fraction, and faint_as_smooth restores the mean."""
    nside = 32
    npix = hp.nside2npix(nside)
    A, ind, br = POPS["faint"]
    scf = (A, np.array(ind), np.array(br))
    s_min = 1.0
    tr = sim.simulate_population(jax.random.key(21), np.ones(npix), scf, nside, s_min=s_min)
    frac = sim.missing_counts_fraction(scf, s_min)
    total = sim.scf_integral(scf, 1)
    c = np.asarray(tr.counts_sky)
    assert tr.missing_fraction == pytest.approx(frac)
    assert np.all(np.asarray(tr.sources.S) >= s_min)
    assert abs(c.mean() - total * (1 - frac)) < 5 * c.std() / math.sqrt(c.size)
