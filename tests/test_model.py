"""SkyModel and Observation: site names, with_values, likelihood vs scipy, gradients vs
finite differences, priors vs scipy, input validation."""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import Array, Float

from skymodel.components.base import AbstractComponent, AbstractMorphology, Param, normalise_on
from skymodel.model import SkyModel, numpyro_model
from skymodel.observation import Observation
from skymodel.priors import Dirichlet, Uniform
from skymodel.roi import ROI

NSIDE = 8


# ---------------------------------------------------------------- user-defined components


@typing.final
class Tmpl(AbstractComponent):
    """norm x fixed template (given on the model pixels)."""

    name: str = eqx.field(static=True)
    template: Float[Array, " nmodel"]
    norm: Param

    def expected_counts(self, roi):
        return self.norm.value * self.template[roi.analysis_index]


@typing.final
class Mix(AbstractComponent):
    """norm x sum_i w_i template_i with Dirichlet weights."""

    name: str = eqx.field(static=True)
    templates: Float[Array, "k nmodel"]
    weights: Param
    norm: Param

    def expected_counts(self, roi):
        return self.norm.value * (self.weights.value @ self.templates)[roi.analysis_index]


@typing.final
class LatShape(AbstractMorphology):
    """exp(-|b| / scale) * (1 + tilt * sin b); tilt is a fixed parameter."""

    scale: Param
    tilt: Param

    def evaluate(self, roi):
        return jnp.exp(-jnp.abs(roi.b) / self.scale.value) * (1 + self.tilt.value * jnp.sin(roi.b))


@typing.final
class Shaped(AbstractComponent):
    name: str = eqx.field(static=True)
    morphology: LatShape
    norm: Param

    def expected_counts(self, roi):
        return self.norm.value * normalise_on(self.morphology.evaluate(roi), roi)[roi.analysis_index]


def _roi_mask():
    npix = 12 * NSIDE**2
    theta, _ = __import__("healpy").pix2ang(NSIDE, np.arange(npix))
    b = np.pi / 2 - theta
    return np.abs(b) < np.radians(10)  # analysis excludes the plane


def _roi():
    npix = 12 * NSIDE**2
    return ROI.from_masks(NSIDE, _roi_mask(), norm_mask=np.zeros(npix, bool))


@pytest.fixture(scope="module")
def roi():
    return _roi()


def _templates(roi):
    b = np.asarray(roi.b)
    l = np.asarray(roi.l)
    iso = np.ones_like(b)
    mix = np.stack([1 + 0.5 * np.cos(l), 1 + 0.5 * np.sin(b), np.exp(-np.abs(l))])
    return iso, mix


def make_sky(roi, *, iso=1.5, w=(0.2, 0.3, 0.5), mix=2.0, scale=0.4, disk=3.0):
    iso_t, mix_t = _templates(roi)
    return SkyModel(
        [
            Tmpl("iso", jnp.asarray(iso_t), Param(iso, Uniform(1e-3, 10))),
            Mix("mix", jnp.asarray(mix_t), Param(w, Dirichlet.symmetric(3, 1.0)), Param(mix, Uniform(0, 10))),
            Shaped("disk", LatShape(Param(scale, Uniform(0.1, 1.0)), Param(0.3)), Param(disk, Uniform(0, 10))),
            Tmpl("fixed", jnp.asarray(iso_t), Param(0.25)),
        ]
    )


def numpy_mean(roi, iso, w, mix, scale, disk):
    """Independent NumPy evaluation of the model's expected counts on analysis pixels."""
    iso_t, mix_t = _templates(roi)
    b = np.asarray(roi.b)
    shape = np.exp(-np.abs(b) / scale) * (1 + 0.3 * np.sin(b))
    shape = shape / shape[np.asarray(roi.norm_index)].mean()
    full = iso * iso_t + mix * (np.asarray(w) @ mix_t) + disk * shape + 0.25 * iso_t
    return full[np.asarray(roi.analysis_index)]


@pytest.fixture(scope="module")
def sky(roi):
    return make_sky(roi)


@pytest.fixture(scope="module")
def obs(roi, sky):
    mu = np.asarray(sky.poisson_mean(roi))
    return Observation.from_sky_counts(roi, np.random.default_rng(1).poisson(mu))


SITES = ["iso.norm", "mix.weights", "mix.norm", "disk.morphology.scale", "disk.norm"]


# ---------------------------------------------------------------- structure


def test_site_names_generated_from_paths(sky):
    assert list(sky.free_parameters()) == SITES


def test_numpyro_sites_equal_free_parameters_fixed_not_sampled(sky, obs):
    tr = numpyro.handlers.trace(numpyro.handlers.seed(numpyro_model, 0)).get_trace(sky, obs)
    sampled = [k for k, s in tr.items() if s["type"] == "sample" and not s.get("is_observed", False)]
    assert sampled == SITES
    assert "loglike" in tr  # the factor
    assert not any("fixed" in k or "tilt" in k for k in tr)
    # the factor equals the log-likelihood at the sampled values
    vals = {k: tr[k]["value"] for k in SITES}
    ll = sky.with_values(vals).log_likelihood(obs)
    factor = tr["loglike"]["fn"].log_prob(tr["loglike"]["value"])
    np.testing.assert_allclose(float(factor), float(ll), rtol=1e-12)


def test_duplicate_names_rejected(roi):
    t = jnp.ones(roi.n_model)
    with pytest.raises(ValueError, match="unique.*'a'"):
        SkyModel([Tmpl("a", t, Param(1.0)), Tmpl("a", t, Param(2.0))])
    with pytest.raises(ValueError, match="AbstractComponent"):
        SkyModel([Tmpl("a", t, Param(1.0)), "not a component"])
    with pytest.raises(ValueError, match="at least one"):
        SkyModel([])


# ---------------------------------------------------------------- with_values


def test_with_values_round_trip(sky):
    draw = sky.sample_prior(jax.random.PRNGKey(3), 1)
    values = {k: v[0] for k, v in draw.items()}
    new = sky.with_values(values)
    got = new.parameter_values()
    assert list(got) == SITES
    for k in SITES:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(values[k]))
    # the original is unchanged, and the fixed parameters are untouched
    np.testing.assert_array_equal(sky.parameter_values()["iso.norm"], 1.5)
    assert float(new.components[2].morphology.tilt.value) == 0.3
    assert new.with_values(sky.parameter_values()).parameter_values().keys() == got.keys()


def test_with_values_errors(sky):
    with pytest.raises(KeyError, match="valid names.*iso.norm"):
        sky.with_values({"iso.nrom": 1.0})
    with pytest.raises(ValueError, match="shape"):
        sky.with_values({"mix.weights": jnp.ones(2) / 2})
    with pytest.raises(ValueError, match="outside the support"):
        sky.with_values({"iso.norm": 11.0})
    with pytest.raises(ValueError, match="outside the support"):
        sky.with_values({"mix.weights": jnp.array([0.5, 0.5, 0.5])})
    # under jit the support is not checked (values are tracers) and nothing fails
    f = jax.jit(lambda v: sky.with_values({"iso.norm": v}).parameter_values()["iso.norm"])
    assert float(f(2.0)) == 2.0


# ---------------------------------------------------------------- likelihood


def test_log_likelihood_matches_scipy(roi, sky, obs):
    vals = dict(iso=0.7, w=(0.6, 0.1, 0.3), mix=3.3, scale=0.25, disk=1.2)
    s = sky.with_values(
        {"iso.norm": vals["iso"], "mix.weights": jnp.asarray(vals["w"]), "mix.norm": vals["mix"],
         "disk.morphology.scale": vals["scale"], "disk.norm": vals["disk"]}
    )
    mu = numpy_mean(roi, **vals)
    np.testing.assert_allclose(np.asarray(s.poisson_mean(roi)), mu, rtol=1e-12)
    ref = scipy.stats.poisson.logpmf(np.asarray(obs.counts), mu)
    np.testing.assert_allclose(np.asarray(s.pixel_log_likelihood(obs)), ref, rtol=1e-10)
    np.testing.assert_allclose(float(s.log_likelihood(obs)), ref.sum(), rtol=1e-12)
    ec = s.expected_counts(roi)
    assert list(ec) == ["iso", "mix", "disk", "fixed"]
    np.testing.assert_allclose(sum(np.asarray(v) for v in ec.values()), mu, rtol=1e-12)
    templates, scfs = s.point_source_terms(roi)
    assert templates.shape == (0, roi.n_pixels) and scfs == ()


def test_log_likelihood_jit_equals_eager(sky, obs):
    eager = sky.log_likelihood(obs)
    jitted = eqx.filter_jit(lambda s, o: s.log_likelihood(o))(sky, obs)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-13)


def test_gradient_matches_finite_differences(sky, obs):
    base = {k: jnp.asarray(v) for k, v in sky.parameter_values().items()}

    def f(values):
        return sky.with_values(values, check=False).log_likelihood(obs)

    grad = jax.grad(f)(base)
    h = 1e-6
    for k, v in base.items():
        flat = np.asarray(v, dtype=np.float64).reshape(-1)
        for i in range(flat.size):
            up, dn = flat.copy(), flat.copy()
            up[i] += h
            dn[i] -= h
            fu = float(f({**base, k: jnp.asarray(up.reshape(v.shape))}))
            fd = float(f({**base, k: jnp.asarray(dn.reshape(v.shape))}))
            fd_grad = (fu - fd) / (2 * h)
            g = float(np.asarray(grad[k]).reshape(-1)[i])
            assert g == pytest.approx(fd_grad, rel=1e-5, abs=1e-4), (k, i)


def test_gradient_with_point_sources_matches_finite_differences(roi):
    """Every parameter of a model with a point-source population (paper's S_ps, lambda
    parameterisation, two breaks, a PSF table, 2 exposure regions): jax.grad == central
    finite differences, and nothing is NaN (first_break once gave NaN via inf / S_b)."""
    from skymodel.components.point_sources import PointSourcePopulation, TotalCountsSCF
    from skymodel.psf import PSFCorrection

    npix = 12 * NSIDE**2
    expo = 1.0 + 0.5 * np.cos(np.pi / 2 - __import__("healpy").pix2ang(NSIDE, np.arange(npix))[0])
    roi2 = ROI.from_masks(NSIDE, np.asarray(_roi_mask()), norm_mask=np.zeros(npix, bool),
                          exposure=expo, n_exposure_regions=2)
    iso_t, _ = _templates(roi2)
    pop = PointSourcePopulation(
        "ps",
        LatShape(Param(0.5, Uniform(0.1, 1.0)), Param(0.0)),
        TotalCountsSCF(Param(0.8, Uniform(1e-3, 4.0)),
                       [Param(5.0, Uniform(2.1, 8.0)), Param(1.2, Uniform(0.5, 1.99)),
                        Param(-1.0, Uniform(-4.0, 0.0))],
                       Param(12.0, Uniform(5.0, 40.0)), [Param(0.4, Uniform(0.1, 0.95))]),
    )
    sky = SkyModel([Tmpl("iso", jnp.asarray(iso_t), Param(1.5, Uniform(1e-3, 10.0))), pop])
    psf = PSFCorrection.from_arrays([0.1, 0.4, 0.8], [1.5, 0.8, 0.5])
    counts = np.random.default_rng(1).poisson(3.0, roi2.n_pixels)
    obs = Observation(roi2, counts, psf=psf)
    base = {k: jnp.asarray(v) for k, v in sky.parameter_values().items()}

    def f(values):
        return sky.with_values(values, check=False).log_likelihood(obs)

    grad = jax.jit(jax.grad(f))(base)
    fj = jax.jit(f)
    h = 1e-6
    for k, v in base.items():
        fd = (float(fj({**base, k: v + h})) - float(fj({**base, k: v - h}))) / (2 * h)
        assert np.isfinite(float(grad[k])), k
        assert float(grad[k]) == pytest.approx(fd, rel=1e-5, abs=1e-4), k


# ---------------------------------------------------------------- priors


def test_log_prior_matches_scipy(sky):
    vals = {"iso.norm": 2.0, "mix.weights": jnp.array([0.1, 0.6, 0.3]), "mix.norm": 4.0,
            "disk.morphology.scale": 0.5, "disk.norm": 7.0}
    ref = (
        -np.log(10 - 1e-3)
        + scipy.stats.dirichlet.logpdf([0.1, 0.6, 0.3], [1.0, 1.0, 1.0])
        - np.log(10)
        - np.log(0.9)
        - np.log(10)
    )
    np.testing.assert_allclose(float(sky.log_prior(vals)), ref, rtol=1e-12)
    with pytest.raises(KeyError, match="missing"):
        sky.log_prior({"iso.norm": 1.0})


def test_sample_prior_shapes_support_and_moments(sky):
    n = 4000
    draws = sky.sample_prior(jax.random.PRNGKey(0), n)
    assert list(draws) == SITES
    params = sky.free_parameters()
    for k, v in draws.items():
        assert v.shape == (n,) + tuple(params[k].value.shape)
        assert all(params[k].prior.contains(np.asarray(x)) for x in np.asarray(v)[:50])
    # U(a, b) mean and Dirichlet(1,1,1) mean 1/3 within 5 standard errors
    x = np.asarray(draws["disk.morphology.scale"])
    assert abs(x.mean() - 0.55) < 5 * (0.9 / np.sqrt(12)) / np.sqrt(n)
    w = np.asarray(draws["mix.weights"])
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.abs(w.mean(axis=0) - 1 / 3) < 5 * np.sqrt(2 / 36) / np.sqrt(n))
    with pytest.raises(ValueError, match="positive"):
        sky.sample_prior(jax.random.PRNGKey(0), 0)


@settings(max_examples=20, deadline=None)
@given(st.floats(0.01, 9.9), st.floats(0.11, 0.99))
def test_log_likelihood_hypothesis_vs_scipy(iso, scale):
    roi = _roi_cached()
    sky = make_sky(roi)
    counts = np.arange(roi.n_pixels) % 7
    obs = Observation.from_sky_counts(roi, counts)
    s = sky.with_values({"iso.norm": iso, "disk.morphology.scale": scale})
    mu = numpy_mean(roi, iso=iso, w=(0.2, 0.3, 0.5), mix=2.0, scale=scale, disk=3.0)
    ref = scipy.stats.poisson.logpmf(counts, mu).sum()
    assert float(s.log_likelihood(obs)) == pytest.approx(ref, rel=1e-11)


_ROI_CACHE = []


def _roi_cached():
    if not _ROI_CACHE:
        _ROI_CACHE.append(_roi())
    return _ROI_CACHE[0]


# ---------------------------------------------------------------- Observation


def test_observation_validation(roi):
    npix = 12 * NSIDE**2
    good = np.random.default_rng(0).poisson(3.0, npix)
    obs = Observation.from_sky_counts(roi, good)
    np.testing.assert_array_equal(np.asarray(obs.counts), good[np.asarray(roi.pixels)])
    assert obs.counts.dtype == jnp.float64
    # analysis-pixel counts are accepted too
    obs2 = Observation.from_sky_counts(roi, good[np.asarray(roi.pixels)])
    np.testing.assert_array_equal(np.asarray(obs2.counts), np.asarray(obs.counts))
    bad = good.astype(float)
    p = int(roi.pixels[0])
    for value, msg in [(-1.0, "non-negative"), (0.5, "integer"), (np.nan, "finite"), (np.inf, "finite")]:
        b = bad.copy()
        b[p] = value
        with pytest.raises(ValueError, match=msg):
            Observation.from_sky_counts(roi, b)
    # a bad value outside the ROI does not matter
    masked = int(np.setdiff1d(np.arange(npix), np.asarray(roi.pixels))[0])
    b = bad.copy()
    b[masked] = -5
    Observation.from_sky_counts(roi, b)
    with pytest.raises(ValueError, match="entries"):
        Observation.from_sky_counts(roi, good[:-1])
    with pytest.raises(ValueError, match="one-dimensional"):
        Observation.from_sky_counts(roi, good[None])
    with pytest.raises(ValueError, match="shape"):
        Observation(roi, jnp.ones(3))


def test_samplers_trace_the_model_with_tabulated_line_of_sight(roi, monkeypatch):
    """Inside the samplers' compiled functions (NumPyro's model under jit, the nested
    samplers' cube likelihood) the ROI stays concrete, so NFW^2 and the Lorimer disk use
    their cached geometry tables instead of rebuilding them in every call."""
    from numpyro.infer.util import log_density

    import skymodel.morphology_numerics as mn
    from skymodel.components import LorimerDisk, NFWSquared, PoissonComponent
    from skymodel.inference.nested import cube_log_likelihood, prior_transform

    sky = SkyModel(
        [
            PoissonComponent("gce", NFWSquared(Param(1.1, Uniform(0.2, 2.0))), Param(2.0, Uniform(0, 10))),
            PoissonComponent("dsk", LorimerDisk(), Param(1.0, Uniform(0, 10))),
        ]
    )
    obs = Observation.from_sky_counts(roi, np.random.default_rng(2).poisson(np.asarray(sky.poisson_mean(roi))))
    values = {k: p.value for k, p in sky.free_parameters().items()}
    want = float(sky.log_likelihood(obs))

    def refuse(*args, **kwargs):
        raise AssertionError("line-of-sight tables rebuilt inside a compiled function")

    monkeypatch.setattr(mn, "_los_direct", refuse)
    got = jax.jit(lambda v: log_density(numpyro_model, (sky, obs), {}, v)[0])(values)
    assert float(got) == pytest.approx(want + float(sky.log_prior(values)), rel=1e-12)
    transform = prior_transform(sky)
    u = np.full((1, transform.ndim), 0.3)
    np.testing.assert_allclose(
        cube_log_likelihood(sky, obs, transform)(jnp.asarray(u)),
        [float(sky.with_values(transform(jnp.asarray(u[0]))).log_likelihood(obs))],
        rtol=1e-12,
    )
