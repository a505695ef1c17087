"""Tests for skymodel.psf: PSF models (normalisation, CDF, sampling, limits, IRF reading)
and the PSF correction rho(f) (delta limit, flux conservation, brute-force integration,
reproducibility, cache)."""

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from skymodel import psf as P

DEG = np.pi / 180.0

# a table of constructors drives the contract tests
PSFS = {
    "gauss_0.5deg": lambda: P.GaussianPSF.from_degrees(0.5),
    "gauss_1rad": lambda: P.GaussianPSF(1.0),  # sphere truncation matters here
    "king": lambda: P.KingPSF(0.3, 2.5, 0.01),
    "king_wide": lambda: P.KingPSF(0.5, 1.5, 0.3),  # heavy tail reaching the antipode
    "fermi_2gev": lambda: P.DoubleKingPSF.fermi_2gev(),
    "radial": lambda: P.RadialPSF(
        np.linspace(0.0, 0.05, 400), np.exp(-0.5 * (np.linspace(0.0, 0.05, 400) / 0.01) ** 2)
    ),
}


_GL_X, _GL_W = np.polynomial.legendre.leggauss(48)


def _sphere_integral(fn, upper=np.pi, breaks=()):
    """int_0^upper 2 pi sin(r) fn(r) dr: 48-point Gauss-Legendre on log-spaced pieces
    (plus `breaks`), one vectorised call of `fn`."""
    edges = np.concatenate([[0.0], np.geomspace(1e-7 * upper, upper, 400)])
    if len(breaks):
        edges = np.unique(np.append(edges, np.asarray(breaks, float)[np.asarray(breaks) < upper]))
    a, b = edges[:-1, None], edges[1:, None]
    r = 0.5 * (b - a) * _GL_X[None, :] + 0.5 * (a + b)
    vals = 2 * np.pi * np.sin(r) * np.asarray(fn(r))
    return float(np.sum(0.5 * (b - a) * _GL_W[None, :] * vals))


def _breaks(name, psf):
    return np.asarray(psf.r_grid) if name == "radial" else ()


@pytest.mark.parametrize("name", list(PSFS))
def test_density_integrates_to_one_on_sphere(name):
    psf = PSFS[name]()
    total = _sphere_integral(lambda r: psf.density(r), breaks=_breaks(name, psf))
    tol = 1e-4 if name == "radial" else 1e-10
    assert total == pytest.approx(1.0, abs=tol)


@pytest.mark.parametrize("name", list(PSFS))
def test_cdf_matches_quadrature(name):
    psf = PSFS[name]()
    r68 = float(psf.containment_radius(0.68))
    tol = 1e-4 if name == "radial" else 1e-10
    for r in [0.3 * r68, r68, 3.0 * r68]:
        r = min(r, np.pi)
        q = _sphere_integral(lambda x: psf.density(x), upper=r, breaks=_breaks(name, psf))
        assert float(psf.cdf(r)) == pytest.approx(q, abs=tol)
    assert float(psf.cdf(r68)) == pytest.approx(0.68, abs=1e-9 if name != "radial" else 1e-3)
    assert float(psf.cdf(np.pi)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", list(PSFS))
def test_sample_radius_ks(name):
    psf = PSFS[name]()
    r = np.asarray(psf.sample_radius(jax.random.PRNGKey(1), (20000,)))
    assert r.shape == (20000,)
    assert np.all((r >= 0) & (r <= np.pi))
    res = scipy.stats.kstest(r, lambda x: np.asarray(psf.cdf(x)))
    assert res.pvalue > 1e-3


def test_sample_radius_ks_detects_wrong_psf():
    # the KS test above can fail: samples from one PSF against a 10% wider one's CDF
    a, b = P.GaussianPSF.from_degrees(0.5), P.GaussianPSF.from_degrees(0.55)
    r = np.asarray(a.sample_radius(jax.random.PRNGKey(1), (20000,)))
    assert scipy.stats.kstest(r, lambda x: np.asarray(b.cdf(x))).pvalue < 1e-6


def test_flat_sky_formula_small_r():
    """Near the source the density is SCIENCE.md's flat-sky double King in r/s_pe (we use
    the chord 2 sin(r/2) for r: relative change r^2/24 in x, ~1e-4 in density at 1 deg)."""
    psf = P.DoubleKingPSF.fermi_2gev()
    s = 0.00456544

    def king(x, sig, g):
        return (1 - 1 / g) / (2 * np.pi * sig**2) * (1 + x**2 / (2 * g * sig**2)) ** (-g)

    r = np.array([0.0, 0.01, 0.1, 0.3, 1.0]) * DEG
    x = r / s
    fc = 0.748988
    ref = (fc * king(x, 0.428654, 7.82363) + (1 - fc) * king(x, 0.715963, 3.61884)) / s**2
    np.testing.assert_allclose(np.asarray(psf.density(r)), ref, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(psf.density(r[:3])), ref[:3], rtol=1e-7)


def test_gaussian_small_sigma_flat_formula():
    psf = P.GaussianPSF.from_degrees(0.2)
    s = 0.2 * DEG
    r = np.linspace(0, 1.0, 7) * DEG
    ref = np.exp(-0.5 * (r / s) ** 2) / (2 * np.pi * s**2)
    # chord vs arc: relative (r/sigma)^2 r^2 / 24 (3e-4 at 5 sigma = 1 deg)
    np.testing.assert_allclose(np.asarray(psf.density(r)), ref, rtol=5e-4)
    np.testing.assert_allclose(np.asarray(psf.density(r[:3])), ref[:3], rtol=2e-5)


def test_king_large_gamma_is_gaussian():
    sig = 0.01
    g = P.GaussianPSF(sig)
    r = np.linspace(0.0, 5 * sig, 11)
    for gamma, tol in [(1e3, 2e-2), (1e7, 1e-5)]:
        k = P.KingPSF(sig, gamma)
        np.testing.assert_allclose(
            np.asarray(k.density(r)),
            np.asarray(g.density(r)),
            rtol=tol,
            atol=tol * float(g.density(0.0)) * 1e-3,
        )
        np.testing.assert_allclose(np.asarray(k.cdf(r)), np.asarray(g.cdf(r)), atol=tol)
    # and a moderate gamma is clearly not Gaussian (the check can fail)
    assert abs(float(P.KingPSF(sig, 2.0).cdf(2 * sig)) - float(g.cdf(2 * sig))) > 0.05


def test_gaussian_is_von_mises_fisher():
    """On the sphere our Gaussian equals the vMF law with kappa = 1/sigma^2 (exact)."""
    sigma = 0.7
    kappa = 1.0 / sigma**2
    psf = P.GaussianPSF(sigma)
    r = np.linspace(0, np.pi, 9)
    vmf = kappa / (2 * np.pi * (1 - np.exp(-2 * kappa))) * np.exp(kappa * (np.cos(r) - 1))
    np.testing.assert_allclose(np.asarray(psf.density(r)), vmf, rtol=1e-12)


def test_jit_and_grad():
    psf = P.KingPSF(0.4, 3.0, 0.005)
    r = jnp.linspace(0.0, 0.05, 5)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda p, r: p.density(r))(psf, r)),
        np.asarray(psf.density(r)),
        rtol=1e-14,
    )

    def c(sig):
        return P.KingPSF(sig, 3.0, 0.005).cdf(0.003)

    g = float(jax.grad(c)(0.4))
    h = 1e-6
    fd = (float(c(0.4 + h)) - float(c(0.4 - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: P.GaussianPSF(-1.0),
        lambda: P.GaussianPSF(np.nan),
        lambda: P.KingPSF(0.1, 1.0),
        lambda: P.KingPSF(0.1, 2.0, 0.0),
        lambda: P.DoubleKingPSF(1.5, 0.4, 7.0, 0.7, 3.0, 0.005),
        lambda: P.DoubleKingPSF(0.5, 0.4, 0.9, 0.7, 3.0, 0.005),
        lambda: P.RadialPSF([0.0, 0.2, 0.1], [1.0, 1.0, 1.0]),
        lambda: P.RadialPSF([0.0, 0.1], [1.0, -1.0]),
        lambda: P.RadialPSF([0.0, 0.1], [1.0, np.nan]),
        lambda: P.RadialPSF([0.0, 0.1, 0.2], [1.0, 1.0]),
        lambda: P.RadialPSF([0.0, 0.1], [0.0, 0.0]),
    ],
)
def test_bad_psf_input_raises(make):
    with pytest.raises(ValueError):
        make()


# --------------------------------------------------------------------------- IRF file


def test_from_irf_fits(data_root):
    path = data_root / "fermi-gc" / "psf" / "psf_P8R3_ULTRACLEANVETO_V3_PSF.fits"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from astropy.io import fits

    psf = P.DoubleKingPSF.from_irf_fits(path, event_type=3, energy_mev=2000.0, cos_theta=1.0)
    # independent read: energy bin 1778-3162 MeV, last cos-theta bin (0.9-1.0)
    with fits.open(path) as h:
        t = h["RPSF_PSF3"].data
        e_lo, e_hi = t["ENERG_LO"][0], t["ENERG_HI"][0]
        j = int(np.flatnonzero((e_lo <= 2000) & (e_hi > 2000))[0])
        names = ("NTAIL", "SCORE", "STAIL", "GCORE", "GTAIL")
        row = {k: float(np.asarray(t[k][0])[-1, j]) for k in names}
        c0, c1, c2 = np.asarray(h["PSF_SCALING_PARAMS_PSF3"].data["PSFSCALE"]).ravel()
    assert float(psf.score) == pytest.approx(row["SCORE"], rel=1e-6)
    assert float(psf.gtail) == pytest.approx(row["GTAIL"], rel=1e-6)
    assert float(psf.fcore) == pytest.approx(
        1.0 / (1.0 + row["NTAIL"] * row["STAIL"] ** 2 / row["SCORE"] ** 2), rel=1e-6
    )
    # the scale function reproduces SCIENCE.md's s_pe at 2 GeV
    assert float(psf.spe) == pytest.approx(0.00456544, rel=2e-5)
    assert float(psf.spe) == pytest.approx(np.hypot(c0 * 20.0**c2, c1), rel=1e-6)

    # SCIENCE.md's 2 GeV numbers are an incidence-averaged PSF, linear in E between bin
    # centres. With the exposure-weighted cos-theta distribution of ULTRACLEANVETO PSF3
    # (published in Rodd's PSF_king.py, rounded), this P8R3 table is within ~1% of them.
    w = [0.0, 0.0, 0.00094, 0.0155, 0.0697, 0.1644, 0.3087, 0.4408]
    avg = P.DoubleKingPSF.from_irf_fits(
        path, 3, 2000.0, cos_theta=None, ctheta_weights=w, energy_interpolation="linear"
    )
    ref = P.DoubleKingPSF.fermi_2gev()
    for name in ("fcore", "score", "gcore", "stail", "gtail", "spe"):
        got, want = float(getattr(avg, name)), float(getattr(ref, name))
        assert got == pytest.approx(want, rel=0.015), name
    # ... while normal incidence alone is far off (gcore 10.3 vs 7.8)
    assert abs(float(psf.gcore) / float(ref.gcore) - 1) > 0.2

    with pytest.raises(ValueError):
        P.DoubleKingPSF.from_irf_fits(path, event_type=5)
    with pytest.raises(ValueError):
        P.DoubleKingPSF.from_irf_fits(path, energy_mev=1e9)
    with pytest.raises(ValueError):
        P.DoubleKingPSF.from_irf_fits(path, cos_theta=None)


# --------------------------------------------------------------------------- PSF correction


def _brute_force_fractions(sigma, nside, vec, radius, nside_fine):
    """Fraction of a Gaussian PSF (flat-sky formula in the arc distance, numpy) in each
    coarse pixel: midpoint rule on a fine HEALPix grid."""
    fine = hp.query_disc(nside_fine, vec, radius)
    fv = np.array(hp.pix2vec(nside_fine, fine)).T
    ang = np.arccos(np.clip(fv @ vec, -1, 1))
    dens = np.exp(-0.5 * (ang / sigma) ** 2) / (2 * np.pi * sigma**2) * hp.nside2pixarea(nside_fine)
    coarse = hp.vec2pix(nside, fv[:, 0], fv[:, 1], fv[:, 2])
    u, inv = np.unique(coarse, return_inverse=True)
    return dict(zip(u.tolist(), np.bincount(inv, weights=dens)))


def test_pixel_fractions_vs_brute_force():
    psf = P.GaussianPSF.from_degrees(0.3)
    nside = 64
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(4, 3))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    s, p, f = P.psf_pixel_fractions(psf, nside, vecs, n_points=16384, seed=5)
    for k in range(len(vecs)):
        np.testing.assert_allclose(f[s == k].sum(), 1.0, atol=1e-12)  # every photon lands
        ref = _brute_force_fractions(0.3 * DEG, nside, vecs[k], 6 * 0.3 * DEG, 4096)
        mine = dict(zip(p[s == k].tolist(), f[s == k]))
        for pix, fr in ref.items():
            if fr > 1e-3:
                assert mine.get(pix, 0.0) == pytest.approx(fr, abs=3e-3), (k, pix)


def test_correction_delta_limit():
    pc = P.PSFCorrection.compute(
        P.GaussianPSF(1e-6), 128, n_sources=2000, n_points=64, use_cache=False
    )
    assert float(pc.f[-1]) > 0.99
    assert float(pc.weights[-1] * pc.f[-1] ** 2) > 0.99
    assert float(pc.mean_fraction()) == pytest.approx(1.0, abs=2e-3)


def test_correction_flux_and_brute_force_moments():
    """sum w f^2 (flux kept above f_trunc) and sum w f^3 (mean of f^2) against a direct
    fine-grid integration of a Gaussian PSF over the pixels around random sources."""
    sigma_deg, nside, ft = 0.5, 64, 0.01
    psf = P.GaussianPSF.from_degrees(sigma_deg)
    pc = P.PSFCorrection.compute(
        psf, nside, n_sources=4000, n_points=1024, num_f_bins=200, f_trunc=ft, use_cache=False
    )
    rng = np.random.default_rng(11)
    vecs = rng.normal(size=(150, 3))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    m2, m3 = [], []
    for v in vecs:
        bf = _brute_force_fractions(sigma_deg * DEG, nside, v, 6 * sigma_deg * DEG, 1024)
        fr = np.array(list(bf.values()))
        fr = fr[fr >= ft]
        m2.append(fr.sum())
        m3.append((fr**2).sum())
    m2, m3 = np.array(m2), np.array(m3)
    se3 = m3.std() / np.sqrt(len(m3))
    se2 = m2.std() / np.sqrt(len(m2))
    assert float(pc.mean_fraction()) == pytest.approx(m2.mean(), abs=4 * se2 + 2e-3)
    assert float(pc.moment(3)) == pytest.approx(m3.mean(), abs=4 * se3 + 2e-3)
    # flux conservation: the loss is only the f < f_trunc part
    assert 0.97 < float(pc.mean_fraction()) <= 1.0
    # sanity: the moment differs from the delta-PSF value 1 by far more than the tolerance
    assert float(pc.moment(3)) < 0.8


def test_correction_fermi_flux_conservation():
    pc = P.PSFCorrection.compute(
        P.DoubleKingPSF.fermi_2gev(), 128, n_sources=2000, n_points=256, use_cache=False
    )
    assert pc.f.shape == (10,)
    assert np.all(np.diff(np.asarray(pc.f)) > 0)
    assert np.all(np.asarray(pc.f) >= 0.01) and np.all(np.asarray(pc.f) <= 1.0)
    mf = float(pc.mean_fraction())
    assert 0.9 < mf < 1.0  # the tail spreads a few % of the flux below f_trunc
    renorm = P.PSFCorrection.compute(
        P.DoubleKingPSF.fermi_2gev(),
        128,
        n_sources=2000,
        n_points=256,
        renormalise=True,
        use_cache=False,
    )
    assert float(renorm.mean_fraction()) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(np.asarray(renorm.weights) * mf, np.asarray(pc.weights), rtol=1e-12)


def test_correction_reproducible_and_cached(tmp_path, monkeypatch):
    psf = P.KingPSF(0.5, 3.0, 0.004)
    kw = dict(n_sources=500, n_points=64, seed=7)
    a = P.PSFCorrection.compute(psf, 64, cache_dir=tmp_path, **kw)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    b = P.PSFCorrection.compute(psf, 64, use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(a.f), np.asarray(b.f))
    np.testing.assert_array_equal(np.asarray(a.weights), np.asarray(b.weights))
    c = P.PSFCorrection.compute(psf, 64, use_cache=False, **{**kw, "seed": 8})
    assert not np.array_equal(np.asarray(a.weights), np.asarray(c.weights))

    # the second call loads from disk (computing would raise) and gives identical arrays
    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(P, "psf_pixel_fractions", boom)
    d = P.PSFCorrection.compute(psf, 64, cache_dir=tmp_path, **kw)
    np.testing.assert_array_equal(np.asarray(a.f), np.asarray(d.f))
    np.testing.assert_array_equal(np.asarray(a.weights), np.asarray(d.weights))
    # another PSF or setting is a different cache entry
    with pytest.raises(AssertionError):
        P.PSFCorrection.compute(P.KingPSF(0.5, 3.1, 0.004), 64, cache_dir=tmp_path, **kw)
    with pytest.raises(AssertionError):
        P.PSFCorrection.compute(psf, 64, cache_dir=tmp_path, **{**kw, "f_trunc": 0.02})


def test_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYMODEL_CACHE", str(tmp_path / "c"))
    P.PSFCorrection.compute(P.GaussianPSF.from_degrees(1.0), 16, n_sources=50, n_points=16)
    assert len(list((tmp_path / "c").glob("psfcorr-*.npz"))) == 1


def test_delta_and_from_arrays():
    d = P.PSFCorrection.delta()
    assert float(d.mean_fraction()) == 1.0
    np.testing.assert_array_equal(np.asarray(d.f), [1.0])
    t = P.PSFCorrection.from_arrays([0.1, 0.5, 0.9], [2.0, 1.0, 0.5])
    assert float(t.mean_fraction()) == pytest.approx(0.02 + 0.25 + 0.405)
    assert t.f.dtype == jnp.float64
    # a PSFCorrection is a pytree that passes through jit
    out = jax.jit(lambda pc: pc.mean_fraction())(t)
    assert float(out) == pytest.approx(float(t.mean_fraction()))


@pytest.mark.parametrize(
    "f, w",
    [
        ([0.1, 0.5], [1.0]),  # shapes differ
        ([[0.1, 0.5]], [[1.0, 1.0]]),  # not 1-D
        ([], []),  # empty
        ([0.1, 0.5], [1.0, -1.0]),  # negative weight
        ([0.1, np.nan], [1.0, 1.0]),  # NaN
        ([0.1, 0.5], [1.0, np.inf]),  # inf
        ([0.0, 0.5], [1.0, 1.0]),  # f = 0
        ([0.5, 1.5], [1.0, 1.0]),  # f > 1
        ([0.5, 0.6], [0.0, 0.0]),  # all-zero weights
    ],
)
def test_from_arrays_rejects(f, w):
    with pytest.raises(ValueError):
        P.PSFCorrection.from_arrays(f, w)


def test_compute_rejects_bad_settings():
    g = P.GaussianPSF(0.01)
    for kw in [dict(nside=100), dict(nside=64, f_trunc=0.0), dict(nside=64, binning="cubic"),
               dict(nside=64, n_sources=0)]:
        nside = kw.pop("nside")
        with pytest.raises(ValueError):
            P.PSFCorrection.compute(g, nside, use_cache=False, **kw)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.05, 2.0),
    gamma=st.floats(1.05, 50.0),
    scale=st.floats(1e-4, 0.3),
    p=st.floats(1e-6, 1 - 1e-6),
)
def test_king_quantile_inverts_cdf(sigma, gamma, scale, p):
    k = P.KingPSF(sigma, gamma, scale)
    r = float(k.quantile(p))
    assert 0.0 <= r <= np.pi
    assert float(k.cdf(r)) == pytest.approx(p, abs=1e-9)
    # monotone: a slightly larger radius contains more
    assert float(k.cdf(min(r * 1.01, np.pi))) >= p - 1e-12


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(1e-4, 1.5), p=st.floats(1e-6, 1 - 1e-6))
def test_gaussian_quantile_inverts_cdf(sigma, p):
    g = P.GaussianPSF(sigma)
    assert float(g.cdf(g.quantile(p))) == pytest.approx(p, abs=1e-9)
