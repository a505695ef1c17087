"""Component contract tests, driven by a registry of constructors, plus the Poisson
component's semantics and a user-defined component."""

import typing

import equinox as eqx
import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from skymodel import morphology_numerics as mn
from skymodel.components.base import AbstractComponent, AbstractMorphology, Param, is_param
from skymodel.components.morphology import LorimerDisk, NFWSquared, TemplateMap
from skymodel.components.poisson import PoissonComponent
from skymodel.components.templates import gce_morphology, mixture_component, template_component
from skymodel.priors import Uniform
from skymodel.roi import ROI

NSIDE = 16


def _lb(nside):
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)))
    b = np.pi / 2 - theta
    return np.where(phi > np.pi, phi - 2 * np.pi, phi), b


@pytest.fixture(scope="module")
def roi():
    l, b = _lb(NSIDE)
    r = np.degrees(np.arccos(np.cos(l) * np.cos(b)))
    norm_mask = ~((r < 30) & (np.abs(np.degrees(b)) > 2))
    mask = norm_mask | ((np.abs(np.degrees(l)) < 5) & (np.abs(np.degrees(b)) < 8))  # a "source mask"
    expo = 1e11 * (1 + 0.2 * np.sin(l) + 0.1 * np.cos(b))
    return ROI.from_masks(NSIDE, mask, norm_mask=norm_mask, exposure=expo)


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(0)
    l, b = _lb(NSIDE)
    smooth = [np.exp(-((l - c) ** 2) / 0.3 - b**2 / w) + 0.1 for c, w in [(0, 0.05), (0.2, 0.2), (-0.3, 0.1)]]
    return {"smooth": smooth, "noise": rng.uniform(0.5, 1.5, l.size)}


# ---------------------------------------------------------------- a user-defined component


@typing.final
class GaussianBlob(AbstractComponent):
    """User-defined: amplitude x exp(-(1 - cos psi) / width^2), psi = angle from (l0, b0)."""

    name: str = eqx.field(static=True)
    amplitude: Param
    width: Param
    l0: float = eqx.field(static=True, default=0.0)
    b0: float = eqx.field(static=True, default=0.0)

    def expected_counts(self, roi):
        l, b = roi.l[roi.analysis_index], roi.b[roi.analysis_index]
        cos_psi = jnp.sin(b) * np.sin(self.b0) + jnp.cos(b) * np.cos(self.b0) * jnp.cos(l - self.l0)
        return self.amplitude.value * jnp.exp(-(1 - cos_psi) / self.width.value**2)


@typing.final
class Ring(AbstractMorphology):
    """User-defined morphology: a ring of radius `radius` (rad) around the GC."""

    radius: Param

    def evaluate(self, roi):
        psi = jnp.arccos(jnp.clip(jnp.cos(roi.l) * jnp.cos(roi.b), -1, 1))
        return 0.05 + jnp.exp(-(((psi - self.radius.value) / 0.05) ** 2))


# ---------------------------------------------------------------- the registry


def _bulges(maps):
    return maps["smooth"][:2]


REGISTRY = {
    "template": lambda roi, maps: template_component("iso", maps["noise"], roi, value=1.3),
    "template_raw": lambda roi, maps: template_component(
        "psc", maps["noise"], roi, prior=Uniform(0, 3), value=0.7, normalise=False
    ),
    "mixture": lambda roi, maps: mixture_component("pib", maps["smooth"], roi),
    "mixture_modulated": lambda roi, maps: mixture_component("pib", maps["smooth"], roi, modulation_lmax=2),
    "gce_nfw": lambda roi, maps: PoissonComponent("gce", gce_morphology(roi), Param(None, Uniform(1e-5, 4))),
    "gce_blend": lambda roi, maps: PoissonComponent(
        "gce", gce_morphology(roi, _bulges(maps), exposure_weighted=True), Param(None, Uniform(1e-5, 4))
    ),
    "gce_one_bulge_density": lambda roi, maps: PoissonComponent(
        "gce", gce_morphology(roi, _bulges(maps)[:1], exposure_weighted=False), Param(0.3)
    ),
    "disk": lambda roi, maps: PoissonComponent("dsk", LorimerDisk(), Param(None, Uniform(0, 2))),
    "user_ring": lambda roi, maps: PoissonComponent("ring", Ring(Param(0.2, Uniform(0.05, 0.4))), Param(1.5)),
    "user_blob": lambda roi, maps: GaussianBlob("blob", Param(2.0, Uniform(0, 5)), Param(0.15, Uniform(0.05, 1))),
}


def _params(component):
    leaves = jax.tree_util.tree_leaves(component, is_leaf=is_param)
    return [p for p in leaves if is_param(p)]


def _with_values(component, values):
    return eqx.tree_at(lambda c: [p.value for p in _params(c)], component, list(values))


def _perturbed_values(component, rng):
    """Values moved inside their priors (Dirichlet weights stay on the simplex)."""
    out = []
    for p in _params(component):
        v = np.asarray(p.value)
        if p.value.ndim == 1 and np.isclose(v.sum(), 1.0) and np.all(v > 0):
            w = v * rng.uniform(0.7, 1.3, v.shape)
            out.append(jnp.asarray(w / w.sum()))
        else:
            out.append(jnp.asarray(v * rng.uniform(0.8, 1.2, v.shape) + (v == 0) * 0.01))
    return out


@pytest.fixture(params=sorted(REGISTRY))
def component(request, roi, maps):
    return REGISTRY[request.param](roi, maps)


def test_contract(component, roi):
    """Shape, dtype, finite, non-negative, priors consistent, jit == eager, no retrace."""
    params = _params(component)
    assert params, "a component without parameters"
    for p in params:
        if p.prior is not None:
            assert p.value.shape == p.prior.shape
            assert p.prior.contains(np.asarray(p.value))

    eager = component.expected_counts(roi)
    assert eager.shape == (roi.n_pixels,)
    assert eager.dtype == jnp.float64
    assert bool(jnp.all(jnp.isfinite(eager))) and bool(jnp.all(eager >= 0))
    assert float(jnp.max(eager)) > 0

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def counts(c, r):
        return c.expected_counts(r)

    first = counts(component, roi)
    np.testing.assert_allclose(first, eager, rtol=1e-12, atol=0)
    rng = np.random.default_rng(1)
    for _ in range(3):  # new parameter values: same compiled function
        other = _with_values(component, _perturbed_values(component, rng))
        out = counts(other, roi)
        assert out.shape == first.shape and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out, first)  # the parameters did change the counts


def test_contract_gradients_vs_finite_differences(component, roi):
    rng = np.random.default_rng(2)
    weights = jnp.asarray(rng.uniform(0.5, 1.5, roi.n_pixels))

    @jax.jit
    def loss(values):
        return jnp.sum(weights * _with_values(component, values).expected_counts(roi))

    values = [jnp.asarray(p.value) for p in _params(component)]
    grads = jax.grad(loss)(values)
    for i, v in enumerate(values):
        flat = np.atleast_1d(np.asarray(v))
        for j in range(flat.size):
            h = 1e-6 * max(1.0, abs(flat[j]))
            up = [np.array(x, copy=True) for x in values]
            dn = [np.array(x, copy=True) for x in values]
            np.reshape(up[i], -1)[j] += h
            np.reshape(dn[i], -1)[j] -= h
            fd = (loss([jnp.asarray(x) for x in up]) - loss([jnp.asarray(x) for x in dn])) / (2 * h)
            g = float(np.reshape(np.asarray(grads[i]), -1)[j])
            scale = max(abs(float(fd)), 1e-6 * float(jnp.sum(weights)))
            assert abs(g - float(fd)) <= 1e-5 * scale, (i, j, g, float(fd))


# ---------------------------------------------------------------- Poisson component semantics


def test_norm_is_mean_counts_on_normalisation_region(roi, maps):
    # with analysis pixels == normalisation pixels, the mean expected counts is the norm
    l, b = _lb(NSIDE)
    r = np.degrees(np.arccos(np.cos(l) * np.cos(b)))
    m = ~(r < 30)
    full = ROI.from_masks(NSIDE, m)
    comp = template_component("bub", maps["smooth"][0], full, value=2.5)
    assert float(jnp.mean(comp.expected_counts(full))) == pytest.approx(2.5, rel=1e-13)
    # on the masked ROI: norm x map / mean(map over the unmasked normalisation region)
    comp = template_component("bub", maps["smooth"][0], roi, value=2.5)
    sky = maps["smooth"][0]
    norm_pix = np.asarray(roi.model_pixels)[np.asarray(roi.norm_index)]
    np.testing.assert_allclose(
        comp.expected_counts(roi), 2.5 * sky[np.asarray(roi.pixels)] / sky[norm_pix].mean(), rtol=1e-13
    )


def test_unnormalised_component_uses_raw_values(roi, maps):
    comp = template_component("psc", maps["noise"], roi, prior=None, value=0.5, normalise=False)
    np.testing.assert_allclose(comp.expected_counts(roi), 0.5 * maps["noise"][np.asarray(roi.pixels)], rtol=1e-15)
    assert not comp.norm.free


def test_modulated_mixture_renormalised(roi, maps):
    comp = mixture_component("pib", maps["smooth"], roi, modulation_lmax=2)
    comp = eqx.tree_at(lambda c: c.morphology.coefficients.value, comp, jnp.full(5, 0.05))
    vals = comp.morphology.evaluate(roi)
    assert float(jnp.mean((vals / jnp.mean(vals[roi.norm_index]))[roi.norm_index])) == pytest.approx(1.0)
    assert comp.morphology.coefficients.prior.shape == (5,)
    assert comp.morphology.base.weights.prior.concentration == pytest.approx((1 / 3,) * 3)


def test_gce_blend_matches_formula(roi, maps):
    """S x [f normalise(Σ w_i bulge_i expo) + (1 - f) normalise(NFW^2 expo)], independently."""
    morph = gce_morphology(roi, _bulges(maps), exposure_weighted=True)
    morph = eqx.tree_at(lambda m: (m.fraction.value, m.first.weights.value, m.second.base.gamma.value),
                        morph, (jnp.asarray(0.3), jnp.asarray([0.25, 0.75]), jnp.asarray(1.1)))
    comp = PoissonComponent("gce", morph, Param(0.8))
    pix = np.asarray(roi.model_pixels)
    nidx = np.asarray(roi.norm_index)
    expo = np.asarray(roi.exposure)

    def unit(x):
        return x / x[nidx].mean()

    b1, b2 = (unit(m[pix] * expo) for m in _bulges(maps))
    nfw = unit(np.asarray(mn.nfw_squared_los(np.asarray(roi.l), np.asarray(roi.b), 1.1)) * expo)
    want = unit(0.3 * (0.25 * b1 + 0.75 * b2) + 0.7 * nfw) * 0.8
    np.testing.assert_allclose(comp.expected_counts(roi), want[np.asarray(roi.analysis_index)], rtol=1e-12)


def test_gce_without_bulges_is_nfw(roi):
    m = gce_morphology(roi, exposure_weighted=False, gamma_prior=None, gamma_value=1.0)
    np.testing.assert_allclose(m.evaluate(roi), NFWSquared(Param(1.0)).evaluate(roi), rtol=1e-15)


def test_user_component_in_a_sum(roi, maps):
    """A user component works next to library components (as a SkyModel would sum them)."""
    comps = (REGISTRY["user_blob"](roi, maps), REGISTRY["template"](roi, maps))

    @eqx.filter_jit
    def total(cs):
        return sum(c.expected_counts(roi) for c in cs)

    mu = total(comps)
    np.testing.assert_allclose(mu, comps[0].expected_counts(roi) + comps[1].expected_counts(roi), rtol=1e-14)
    blob = comps[0].expected_counts(roi)
    l, b = np.asarray(roi.l)[np.asarray(roi.analysis_index)], np.asarray(roi.b)[np.asarray(roi.analysis_index)]
    psi = np.arccos(np.cos(l) * np.cos(b))
    np.testing.assert_allclose(blob, 2.0 * np.exp(-(1 - np.cos(psi)) / 0.15**2), rtol=1e-12)


def test_construction_errors(roi, maps):
    with pytest.raises(ValueError, match="scalar Param"):
        PoissonComponent("x", TemplateMap(np.ones(roi.n_model)), Param(np.ones(2)))
    with pytest.raises((ValueError, TypeCheckError), match="AbstractMorphology"):
        PoissonComponent("x", np.ones(3), Param(1.0))
    with pytest.raises(ValueError, match="at least 2 maps"):
        mixture_component("pib", maps["smooth"][:1], roi)
    with pytest.raises(ValueError, match="'iso'.*negative"):
        template_component("iso", -maps["noise"], roi)
