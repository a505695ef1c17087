"""Morphology numerics and morphology classes, against independent computations
(scipy quad, scipy sph_harm_y, the shipped Fermi templates, finite differences)."""

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from skymodel import morphology_numerics as mn
from skymodel.components.base import Param, normalise_on
from skymodel.components.morphology import (
    Blend,
    ExposureWeighted,
    HarmonicModulation,
    LorimerDisk,
    Mixture,
    NFWSquared,
    TemplateMap,
)
from skymodel.priors import Dirichlet, Uniform
from skymodel.roi import ROI

R_SUN = mn.R_SUN


# ---------------------------------------------------------------- brute-force references


def nfw_quad(l, b, gamma, r_s=20.0, r_sun=R_SUN, s_max=mn.NFW_S_MAX):
    c = np.cos(b) * np.cos(l)

    def f(s):
        r = np.sqrt(max(s * s + r_sun * r_sun - 2 * s * r_sun * c, 1e-300))
        return (r / r_s) ** (-2 * gamma) * (1 + r / r_s) ** (2 * gamma - 6)

    s0 = r_sun * c
    pts = [s0] if 0 < s0 < s_max else None
    return quad(f, 0, s_max, points=pts, limit=500, epsabs=0, epsrel=1e-11)[0]


def disk_quad(l, b, z_s, C, B, r_sun=R_SUN, s_max=mn.DISK_S_MAX):
    def f(s):
        R = np.hypot(s * np.cos(b) - r_sun * np.cos(l), r_sun * np.sin(l))
        return (R / r_sun) ** B * np.exp(-C * (R - r_sun) / r_sun - s * abs(np.sin(b)) / z_s)

    sc = np.clip(r_sun * np.cos(l) / np.cos(b), 0, s_max)
    pts = [sc] if 0 < sc < s_max else None
    return quad(f, 0, s_max, points=pts, limit=500, epsabs=0, epsrel=1e-11)[0]


DIRECTIONS = [  # (l, b) radians: 0.2 deg from the GC, inner Galaxy, plane, anticentre, pole
    (np.radians(0.2), 0.0),
    (np.radians(0.05), np.radians(-0.15)),
    (np.radians(3.0), np.radians(2.5)),
    (np.radians(-20.0), np.radians(10.0)),
    (np.radians(120.0), np.radians(-60.0)),
    (np.radians(179.0), np.radians(1.0)),
    (0.0, np.radians(89.0)),
]


@pytest.mark.parametrize("gamma", [0.2, 0.7, 1.0, 1.25, 2.0])
def test_nfw_vs_quad(gamma):
    l, b = np.array(DIRECTIONS).T
    got = np.asarray(mn.nfw_squared_los(l, b, gamma))
    want = np.array([nfw_quad(li, bi, gamma) for li, bi in DIRECTIONS])
    np.testing.assert_allclose(got, want, rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    l=st.floats(-np.pi, np.pi, allow_subnormal=False),
    b=st.floats(-1.55, 1.55, allow_subnormal=False),
    gamma=st.floats(0.2, 2.0),
)
def test_nfw_vs_quad_random(l, b, gamma):
    if np.degrees(np.arccos(np.cos(l) * np.cos(b))) < 0.05:
        return  # inside the cusp's sub-pixel core; covered by the fixed cases above
    got = float(mn.nfw_squared_los(np.array([l]), np.array([b]), gamma)[0])
    assert got == pytest.approx(nfw_quad(l, b, gamma), rel=1e-8)


@pytest.mark.parametrize(
    "z_s,C,B", [(0.1, 8.0, 1.9), (0.3, 5.0, 1.9), (2.5, 0.05, 1.9), (1.0, 1.7, 0.0), (0.5, 3.0, 0.5)]
)
def test_disk_vs_quad(z_s, C, B):
    l, b = np.array(DIRECTIONS).T
    got = np.asarray(mn.lorimer_disk_los(l, b, z_s, C, B))
    want = np.array([disk_quad(li, bi, z_s, C, B) for li, bi in DIRECTIONS])
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_real_harmonics_vs_scipy(lmax):
    rng = np.random.default_rng(lmax)
    l = rng.uniform(-np.pi, np.pi, 50)
    b = np.arcsin(rng.uniform(-1, 1, 50))
    got = np.asarray(mn.real_spherical_harmonics(l, b, lmax))
    idx = mn.harmonic_indices(lmax)
    assert got.shape == (mn.n_harmonic_coefficients(lmax), 50) == (len(idx), 50)
    for row, (ell, m) in zip(got, idx):
        want = scipy.special.sph_harm_y(ell, m, np.pi / 2 - b, l).real
        np.testing.assert_allclose(row, want, rtol=1e-12, atol=1e-13)


def test_real_harmonics_orthogonal_on_sphere():
    nside = 32
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)))
    y = np.asarray(mn.real_spherical_harmonics(phi, np.pi / 2 - theta, 3))
    gram = y @ y.T * 4 * np.pi / y.shape[1]
    m = np.array([m for _, m in mn.harmonic_indices(3)])
    # int (Re Y_lm)^2 = 1 for m = 0 and 1/2 for m > 0
    np.testing.assert_allclose(gram, np.diag(np.where(m == 0, 1.0, 0.5)), atol=2e-3)


def test_real_harmonics_bad_lmax():
    with pytest.raises(ValueError, match="lmax"):
        mn.real_spherical_harmonics(np.zeros(3), np.zeros(3), 0)


# ---------------------------------------------------------------- against the shipped maps


def _fiducial_lb(fermi_dir):
    nside = 128
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)))
    b = np.pi / 2 - theta
    l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
    r = np.degrees(np.arccos(np.cos(l) * np.cos(b)))
    mask = np.load(fermi_dir / "mask_psc_3fgl_0p8deg.npy")
    sel = (r < 25) & (np.abs(np.degrees(b)) > 2) & ~mask
    return l, b, sel, np.load(fermi_dir / "exposure.npy")


def _shape_dev(model, ref):
    model, ref = model / model.mean(), ref / ref.mean()
    d = model / ref - 1
    return np.abs(d).max(), np.sqrt(np.mean(d**2))


@pytest.mark.parametrize("gamma,fname", [(1.0, "template_nfw_g1p0.npy"), (1.2, "template_nfw_g1p2.npy")])
def test_nfw_matches_fermi_template(fermi_dir, gamma, fname):
    """The shipped NFW^2 maps are pixel-centre NFW^2 (r_s = 20, R_sun = 8.5 kpc) x exposure."""
    l, b, sel, expo = _fiducial_lb(fermi_dir)
    ref = np.load(fermi_dir / fname)[sel]
    j = np.asarray(mn.nfw_squared_los(l[sel], b[sel], gamma, r_sun=8.5)) * expo[sel]
    dmax, drms = _shape_dev(j, ref)
    assert dmax < 2e-4 and drms < 1e-4, (dmax, drms)
    # with the paper's R_sun = 8.224 the shape differs by ~1% at the ROI edge; exposure matters
    j2 = np.asarray(mn.nfw_squared_los(l[sel], b[sel], gamma)) * expo[sel]
    assert 3e-3 < _shape_dev(j2, ref)[0] < 3e-2
    assert _shape_dev(j / expo[sel], ref)[0] > 0.05


def test_nfw_matches_nptfit_example_gce(nptfit_dir):
    """The classic NPTFit example's GCE template is gamma = 1 NFW^2 (R_sun = 8.5) x exposure."""
    theta, phi = hp.pix2ang(128, np.arange(hp.nside2npix(128)))
    b = np.pi / 2 - theta
    l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
    r = np.degrees(np.arccos(np.cos(l) * np.cos(b)))
    sel = (r < 25) & (np.abs(np.degrees(b)) > 2)
    expo = np.load(nptfit_dir / "fermidata_exposure.npy")[sel]
    ref = np.load(nptfit_dir / "template_gce.npy")[sel]
    j = np.asarray(mn.nfw_squared_los(l[sel], b[sel], 1.0, r_sun=8.5)) * expo
    dmax, drms = _shape_dev(j, ref)
    assert dmax < 2e-3 and drms < 3e-4, (dmax, drms)
    j12 = np.asarray(mn.nfw_squared_los(l[sel], b[sel], 1.2, r_sun=8.5)) * expo
    assert _shape_dev(j12, ref)[0] > 0.3  # the comparison can tell slopes apart


@pytest.mark.parametrize("z_s,fname", [(0.3, "template_dsk_z0p3.npy"), (1.0, "template_dsk_z1p0.npy")])
def test_disk_matches_fermi_template(fermi_dir, z_s, fname):
    """The shipped disk maps are exponential disks exp(-R / 5 kpc) exp(-|z|/z_s) (B = 0,
    C = R_sun / 5 kpc, R_sun = 8.5) x exposure."""
    l, b, sel, expo = _fiducial_lb(fermi_dir)
    ref = np.load(fermi_dir / fname)[sel]
    d = np.asarray(mn.lorimer_disk_los(l[sel], b[sel], z_s, 8.5 / 5.0, 0.0, r_sun=8.5)) * expo[sel]
    dmax, drms = _shape_dev(d, ref)
    assert dmax < 1e-2 and drms < 5e-3, (dmax, drms)


# ---------------------------------------------------------------- morphology classes


@pytest.fixture(scope="module")
def roi():
    nside = 16
    npix = hp.nside2npix(nside)
    theta, phi = hp.pix2ang(nside, np.arange(npix))
    b = np.pi / 2 - theta
    l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
    r = np.degrees(np.arccos(np.cos(l) * np.cos(b)))
    norm_mask = ~((r < 30) & (np.abs(np.degrees(b)) > 2))
    mask = norm_mask.copy()
    mask[np.abs(np.degrees(l)) < 4] = True  # analysis region smaller than the normalisation one
    expo = 1e11 * (1 + 0.3 * np.cos(theta))
    return ROI.from_masks(nside, mask, norm_mask=norm_mask, exposure=expo)


def test_nfw_morphology_matches_numerics(roi):
    morph = NFWSquared(Param(1.3, Uniform(0.2, 2)))
    np.testing.assert_allclose(morph.evaluate(roi), mn.nfw_squared_los(roi.l, roi.b, 1.3), rtol=1e-14)
    assert morph.evaluate(roi).shape == (roi.n_model,)


def test_nfw_gradient_vs_finite_difference(roi):
    @jax.jit
    def f(g):
        m = NFWSquared(Param(g, Uniform(0.2, 2)))
        return jnp.sum(normalise_on(m.evaluate(roi), roi) ** 2)

    for g in (0.4, 1.1, 1.9):
        grad = jax.grad(f)(jnp.asarray(g))
        h = 1e-5
        fd = (f(jnp.asarray(g + h)) - f(jnp.asarray(g - h))) / (2 * h)
        assert float(grad) == pytest.approx(float(fd), rel=1e-6)


def test_disk_gradients_vs_finite_difference(roi):
    @jax.jit
    def f(z_s, C, B):
        m = LorimerDisk(Param(z_s), Param(C), Param(B))
        return jnp.sum(jnp.log(m.evaluate(roi)))

    args = (0.4, 3.0, 1.9)
    grads = jax.grad(f, argnums=(0, 1, 2))(*map(jnp.asarray, args))
    for i in range(3):
        h = 1e-6
        up = list(args)
        dn = list(args)
        up[i] += h
        dn[i] -= h
        fd = (f(*up) - f(*dn)) / (2 * h)
        assert float(grads[i]) == pytest.approx(float(fd), rel=1e-6)


def test_disk_default_priors(roi):
    m = LorimerDisk()
    assert m.z_s.prior == Uniform(0.1, 2.5) and m.C.prior == Uniform(0.05, 8.0)
    assert not m.B.free and float(m.B.value) == mn.LORIMER_B


def _template(roi, seed):
    rng = np.random.default_rng(seed)
    return TemplateMap(rng.uniform(0.5, 2.0, roi.n_model))


def test_mixture_of_identical_parts_is_the_part(roi):
    t = _template(roi, 0)
    mix = Mixture((t, t, t), Param(np.array([0.2, 0.5, 0.3]), Dirichlet.symmetric(3, 1 / 3)))
    np.testing.assert_allclose(mix.evaluate(roi), normalise_on(t.evaluate(roi), roi), rtol=1e-13)


def test_mixture_is_weighted_sum_of_normalised_parts(roi):
    t1, t2 = _template(roi, 1), _template(roi, 2)
    w = np.array([0.7, 0.3])
    mix = Mixture((t1, t2), Param(w, Dirichlet.symmetric(2, 1.0)))
    n1 = np.asarray(t1.values) / np.asarray(t1.values)[np.asarray(roi.norm_index)].mean()
    n2 = np.asarray(t2.values) / np.asarray(t2.values)[np.asarray(roi.norm_index)].mean()
    np.testing.assert_allclose(mix.evaluate(roi), w[0] * n1 + w[1] * n2, rtol=1e-13)


def test_mixture_weight_count_checked(roi):
    t = _template(roi, 0)
    with pytest.raises(ValueError, match="2 parts"):
        Mixture((t, t), Param(np.array([0.2, 0.5, 0.3]), Dirichlet.symmetric(3, 1.0)))
    with pytest.raises(ValueError, match="at least 2"):
        Mixture((t,))


def test_blend_limits(roi):
    t = _template(roi, 3)
    nfw = NFWSquared(Param(1.2))
    nt, nn = normalise_on(t.evaluate(roi), roi), normalise_on(nfw.evaluate(roi), roi)
    np.testing.assert_allclose(Blend(t, nfw, Param(1.0)).evaluate(roi), nt, rtol=1e-13)
    np.testing.assert_allclose(Blend(t, nfw, Param(0.0)).evaluate(roi), nn, rtol=1e-13)
    np.testing.assert_allclose(Blend(t, nfw, Param(0.25)).evaluate(roi), 0.25 * nt + 0.75 * nn, rtol=1e-13)


def test_modulation(roi):
    t = _template(roi, 4)
    zero = HarmonicModulation(t, Param(np.zeros(5)), lmax=2)
    np.testing.assert_allclose(zero.evaluate(roi), t.evaluate(roi), rtol=1e-15)
    default = HarmonicModulation(t, lmax=2)
    assert default.coefficients.value.shape == (5,) and default.coefficients.prior.shape == (5,)
    a = np.array([0.03, -0.02, 0.01, 0.04, -0.05])
    got = HarmonicModulation(t, Param(a), lmax=2).evaluate(roi)
    # independent: scipy harmonics
    th, ph = np.pi / 2 - np.asarray(roi.b), np.asarray(roi.l)
    field = sum(
        ai * scipy.special.sph_harm_y(ell, m, th, ph).real
        for ai, (ell, m) in zip(a, [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)])
    )
    np.testing.assert_allclose(got, np.asarray(t.values) * (1 + field), rtol=1e-12)
    with pytest.raises(ValueError, match="needs 5 coefficients"):
        HarmonicModulation(t, Param(np.zeros(4)), lmax=2)


def test_exposure_weighted(roi):
    t = _template(roi, 5)
    np.testing.assert_allclose(ExposureWeighted(t).evaluate(roi), t.values * roi.exposure, rtol=1e-15)


def test_template_from_sky_validation(roi):
    npix = hp.nside2npix(roi.nside)
    good = np.ones(npix)
    tm = TemplateMap.from_sky(good, roi, label="iso")
    assert tm.evaluate(roi).shape == (roi.n_model,)
    with pytest.raises(ValueError, match="'bub'.*shape"):
        TemplateMap.from_sky(np.ones(npix - 1), roi, label="bub")
    bad = good.copy()
    bad[np.asarray(roi.model_pixels)[0]] = np.nan
    with pytest.raises(ValueError, match="'bub'.*non-finite"):
        TemplateMap.from_sky(bad, roi, label="bub")
    bad[np.asarray(roi.model_pixels)[0]] = -1.0
    with pytest.raises(ValueError, match="'bub'.*negative"):
        TemplateMap.from_sky(bad, roi, label="bub")
    zero = np.zeros(npix)
    with pytest.raises(ValueError, match="'bub'.*zero everywhere"):
        TemplateMap.from_sky(zero, roi, label="bub")
    other = ROI.from_masks(roi.nside, np.zeros(npix, bool))
    with pytest.raises(ValueError, match="different ROI"):
        tm.evaluate(other)


def test_analytic_templates():
    nside = 16
    npix = hp.nside2npix(nside)
    expo = np.linspace(1.0, 2.0, npix)
    maps = mn.analytic_templates(nside, exposure=expo)
    assert set(maps) == {"iso", "bub", "pib", "ics", "dif", "nfw", "dsk"}
    for k, m in maps.items():
        assert m.shape == (npix,) and np.all(np.isfinite(m)) and np.all(m >= 0), k
    theta, phi = hp.pix2ang(nside, np.arange(npix))
    b = np.degrees(np.pi / 2 - theta)
    l = np.degrees(np.where(phi > np.pi, phi - 2 * np.pi, phi))
    np.testing.assert_allclose(maps["iso"] / expo, (maps["iso"] / expo)[0])
    # bubbles: lobes above and below the plane near l = 0, nothing at high |l| or |b| > 60
    lobe = (np.abs(l) < 10) & (np.abs(np.abs(b) - 25) < 10)
    assert maps["bub"][lobe].min() > 0.5 * maps["bub"].max()
    assert maps["bub"][np.abs(b) > 65].max() < 1e-2 * maps["bub"].max()
    # disks peak in the plane towards the inner Galaxy; NFW^2 peaks at the GC
    for k in ("pib", "dsk", "dif"):
        assert np.argmax(maps[k] / (expo if k != "dsk" else 1)) in np.flatnonzero(np.abs(b) < 5)
    assert np.degrees(np.arccos(np.cos(np.radians(l[np.argmax(maps["nfw"])])) * np.cos(np.radians(b[np.argmax(maps["nfw"])])))) < 5
    with pytest.raises(ValueError, match="exposure"):
        mn.analytic_templates(nside, exposure=np.ones(10))


@pytest.mark.parametrize("kind", ["nfw", "disk"])
def test_line_of_sight_tables_cached_and_traced_agree(kind):
    """The geometry tables are computed once in numpy for concrete directions and inside
    the compiled function for traced ones; both give the same integral and gradient."""
    rng = np.random.default_rng(7)
    l = rng.uniform(-np.pi, np.pi, 300)
    b = np.arcsin(rng.uniform(-1, 1, 300))
    if kind == "nfw":
        def fn(l, b, p):
            return mn.nfw_squared_los(l, b, p[0])
        p = jnp.array([1.3])
    else:
        def fn(l, b, p):
            return mn.lorimer_disk_los(l, b, p[0], p[1], p[2])
        p = jnp.array([0.4, 3.0, 1.9])

    cached = jax.jit(lambda p: jnp.sum(jnp.log(fn(l, b, p))))
    traced = jax.jit(lambda l, b, p: jnp.sum(jnp.log(fn(l, b, p))))
    np.testing.assert_allclose(cached(p), traced(l, b, p), rtol=1e-14)
    np.testing.assert_allclose(jax.grad(cached)(p), jax.grad(traced, argnums=2)(l, b, p), rtol=1e-12)
    assert mn._cached_tables.cache_info().currsize > 0


def test_line_of_sight_tables_made_under_jit_stay_concrete():
    """Tables first asked for while a jit traces are cached as concrete device arrays (a
    cached tracer would break every later call), and eager calls reuse them uncopied."""
    from skymodel._tracing import is_traced

    rng = np.random.default_rng(11)
    l = rng.uniform(-np.pi, np.pi, 200)
    b = np.arcsin(rng.uniform(-1, 1, 200))
    mn._cached_tables.cache_clear()
    compiled = jax.jit(lambda g: mn.nfw_squared_los(l, b, g))(1.1)
    assert mn._cached_tables.cache_info().currsize == 1
    eager = mn.nfw_squared_los(l, b, 1.1)  # would raise UnexpectedTracerError
    np.testing.assert_allclose(eager, compiled, rtol=1e-14)
    key = ("nfw", l.tobytes(), b.tobytes(), 20.0, R_SUN, mn.NFW_S_MAX, mn.NFW_NODES)
    tables = mn._cached_tables(*key)
    assert all(isinstance(t, jax.Array) and not is_traced(t) for t in tables)
    assert mn._cached_tables(*key)[0] is tables[0]
    assert mn._cached_tables.cache_info().currsize == 1
