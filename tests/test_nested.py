"""Nested sampling (skymodel.inference.nested): evidence and posterior against brute-force
integration and an analytic evidence, the prior transform against scipy, checkpoint /
resume, the MultiNest glue and backend selection, and input validation."""

import ctypes
import dataclasses
import math
import sys
import types

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from skymodel.components import template_component
from skymodel.inference import nested
from skymodel.inference.nested import (
    BackendUnavailableError,
    NonFiniteLikelihoodError,
    prior_transform,
    run_nested,
    select_backend,
    unit_transform,
)
from skymodel.model import SkyModel
from skymodel.observation import Observation
from skymodel.priors import (
    AbstractPrior,
    Dirichlet,
    LogUniform,
    Normal,
    Uniform,
    UniformVector,
)
from skymodel.roi import ROI

NSIDE = 4
NPIX = 12 * NSIDE**2


# ---------------------------------------------------------------- toy models


def _roi():
    theta, _ = hp.pix2ang(NSIDE, np.arange(NPIX))
    b = np.pi / 2 - theta
    return ROI.from_masks(NSIDE, np.abs(b) < np.radians(20))  # 112 analysis pixels


def _maps():
    _, phi = hp.pix2ang(NSIDE, np.arange(NPIX))
    return np.ones(NPIX), 1.0 + np.cos(phi)


def _vector_component(name, prior):
    from skymodel.components import morphology as M
    from skymodel.components.base import Param
    from skymodel.components.poisson import PoissonComponent

    t1, _ = _maps()
    parts = tuple(M.TemplateMap.from_sky(t1 + i, _ROI, f"t{i}") for i in range(prior.shape[0]))
    return PoissonComponent(name, M.Mixture(parts, Param(prior=prior)), Param(1.0), normalise=False)


@pytest.fixture(scope="module")
def roi():
    return _roi()


@pytest.fixture(scope="module")
def two(roi):
    """Two Poisson templates (norms a ~ U(0, 10), b ~ LogUniform(0.1, 10)) and mock counts."""
    t1, t2 = _maps()
    sky = SkyModel([
        template_component("a", t1, roi, prior=Uniform(0.0, 10.0), normalise=False),
        template_component("b", t2, roi, prior=LogUniform(0.1, 10.0), normalise=False),
    ])
    mu = np.asarray(sky.with_values({"a.norm": 3.0, "b.norm": 1.5}).poisson_mean(roi))
    obs = Observation.from_sky_counts(roi, np.random.default_rng(0).poisson(mu))
    pix = np.asarray(roi.pixels)
    return sky, obs, t1[pix], t2[pix], np.asarray(obs.counts)


@pytest.fixture(scope="module")
def brute(two):
    """Brute force on a midpoint grid of the unit square (the prior measure):
    log Z and the marginal CDFs of u_a, u_b."""
    _, _, t1, t2, k = two
    n = 600  # ~20 nodes per posterior standard deviation in either direction
    u = (np.arange(n) + 0.5) / n
    a = 10.0 * u
    b = np.exp(np.log(0.1) + np.log(100.0) * u)
    const = -scipy.special.gammaln(k + 1.0).sum()
    logl = np.empty((n, n))
    for i in range(n):  # rows: a, columns: b
        mu = a[i] * t1[None, :] + b[:, None] * t2[None, :]
        logl[i] = (scipy.special.xlogy(k, mu) - mu).sum(axis=1) + const
    m = logl.max()
    w = np.exp(logl - m)
    logz = m + np.log(w.sum() / n**2)
    return {
        "logz": logz,
        "u": u,
        "a": a,
        "b": b,
        "cdf_a": np.cumsum(w.sum(axis=1)) / w.sum(),
        "cdf_b": np.cumsum(w.sum(axis=0)) / w.sum(),
    }


@pytest.fixture(scope="module")
def post2(two):
    sky, obs, *_ = two
    return run_nested(sky, obs, backend="dynesty", nlive=300, dlogz=0.05, seed=3, progress=False)


# ---------------------------------------------------------------- (a) evidence


def test_log_evidence_matches_brute_force(post2, brute):
    d = post2.diagnostics
    assert post2.method == "nested-dynesty"
    assert post2.log_evidence == d["log_evidence"]
    err = post2.log_evidence_err
    assert 0.03 < err < 0.5
    assert abs(post2.log_evidence - brute["logz"]) < 3 * err, (post2.log_evidence, brute["logz"], err)
    for key in ("n_likelihood_evals", "wall_time", "log_evidence_err", "niter", "kish_ess"):
        assert key in d
    assert d["n_likelihood_evals"] >= d["niter"] + 300
    assert d["converged"] is True and d["backend"] == "dynesty"


def test_log_evidence_matches_analytic_one_parameter(roi):
    """One template, norm a ~ U(lo, hi): Z = C / (hi - lo) T^-(K+1) [gamma(K+1, T hi) -
    gamma(K+1, T lo)], with C = prod t^k / k!, T = sum t, K = sum k."""
    t1, t2 = _maps()
    t = 0.5 * t1 + t2
    lo, hi = 0.2, 6.0
    sky = SkyModel([template_component("s", t, roi, prior=Uniform(lo, hi), normalise=False)])
    obs = Observation.from_sky_counts(roi, np.random.default_rng(5).poisson(2.0 * t[np.asarray(roi.pixels)]))
    k, tp = np.asarray(obs.counts), t[np.asarray(roi.pixels)]
    K, T = k.sum(), tp.sum()
    logc = (scipy.special.xlogy(k, tp) - scipy.special.gammaln(k + 1)).sum()
    ginc = scipy.special.gammainc(K + 1, T * hi) - scipy.special.gammainc(K + 1, T * lo)
    logz = logc - math.log(hi - lo) - (K + 1) * math.log(T) + scipy.special.gammaln(K + 1) + math.log(ginc)
    post = run_nested(sky, obs, backend="dynesty", nlive=400, dlogz=0.05, seed=0, progress=False)
    assert abs(post.log_evidence - logz) < 3 * post.log_evidence_err, (post.log_evidence, logz)
    # the posterior of a is Gamma(K+1, rate T) truncated to [lo, hi]
    q = np.quantile(post["s.norm"], [0.16, 0.5, 0.84])
    ref = scipy.stats.gamma(K + 1, scale=1.0 / T).ppf([0.16, 0.5, 0.84])
    width = 0.5 * (ref[2] - ref[0])
    # (tolerance ~3.5 standard errors of a quantile from ~1300 effective samples)
    assert np.max(np.abs(q - ref)) < 0.2 * width, (q - ref) / width


# ---------------------------------------------------------------- (b) posterior


def test_posterior_quantiles_match_brute_force(post2, brute):
    for site, cdf, grid in (("a.norm", brute["cdf_a"], brute["a"]), ("b.norm", brute["cdf_b"], brute["b"])):
        ref = np.interp([0.16, 0.5, 0.84], cdf, grid)
        got = np.quantile(post2[site], [0.16, 0.5, 0.84])
        width = 0.5 * (ref[2] - ref[0])
        assert np.max(np.abs(got - ref)) < 0.2 * width, (site, (got - ref) / width)
    assert post2.num_samples > 1000
    assert np.all(post2["a.norm"] >= 0) and np.all(post2["a.norm"] <= 10)


def test_batched_run_agrees(two, brute):
    """batch_size > 1: queued proposals evaluated together in one vmapped call."""
    sky, obs, *_ = two
    post = run_nested(sky, obs, backend="dynesty", nlive=150, dlogz=0.1, seed=4, progress=False, batch_size=4)
    assert post.diagnostics["batch_size"] == 4
    assert abs(post.log_evidence - brute["logz"]) < 3 * post.log_evidence_err


# ---------------------------------------------------------------- (c) prior transform


# XLA on CPU flushes subnormal floats to zero, so generated bounds stay normal numbers.
_unit = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(-50, 50, allow_subnormal=False), width=st.floats(1e-3, 100), u=_unit)
def test_uniform_transform_in_support(lo, width, u):
    p = Uniform(lo, lo + width)
    v = unit_transform(p)[0](jnp.asarray([u]))
    assert p.contains(np.asarray(v)) and np.isfinite(v)


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(1e-8, 10), ratio=st.floats(1.001, 1e6), u=_unit)
def test_loguniform_transform_in_support(lo, ratio, u):
    p = LogUniform(lo, lo * ratio)
    v = unit_transform(p)[0](jnp.asarray([u]))
    assert p.contains(np.asarray(v))


_ROI = _roi()


def _single_site_transform(prior):
    """(jitted u -> value, site name) through the model's PriorTransform (with its u clip)."""
    if isinstance(prior, Dirichlet):
        sky = SkyModel([_vector_component("w", prior)])
    else:
        sky = SkyModel([template_component("x", np.ones(NPIX), _ROI, prior=prior)])
    t = prior_transform(sky)
    return jax.jit(t), t.names[0]


_NORMAL = _single_site_transform(Normal(0.0, 1.0))


@settings(max_examples=40, deadline=None)
@given(loc=st.floats(-100, 100, allow_subnormal=False), scale=st.floats(1e-3, 100), u=_unit)
def test_normal_transform_finite_at_every_u(loc, scale, u):
    fn, site = _NORMAL
    z = float(fn(jnp.asarray([u]))[site])
    assert np.isfinite(z) and abs(z) < 8.0  # u clipped to [1e-14, 1 - 1e-14]
    p = Normal(loc, scale)
    assert p.contains(loc + scale * z)


_DIRICHLETS = {c: _single_site_transform(Dirichlet(c)) for c in [(1 / 3, 1 / 3, 1 / 3), (0.05, 20.0), (1.0, 2.0, 3.0, 4.0, 5.0)]}


@pytest.mark.parametrize("conc", list(_DIRICHLETS), ids=["third", "extreme", "five"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dirichlet_transform_on_simplex(conc, data):
    fn, site = _DIRICHLETS[conc]
    u = data.draw(st.lists(_unit, min_size=len(conc), max_size=len(conc)))
    w = np.asarray(fn(jnp.asarray(u))[site])
    assert w.shape == (len(conc),) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    assert Dirichlet(conc).contains(w)


def _draws(prior, n=4000, seed=0):
    fn, dim, _ = unit_transform(prior)
    u = np.random.default_rng(seed).uniform(size=(n, dim))
    return np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(u)))


@pytest.mark.parametrize(
    "prior, ref",
    [
        (Uniform(-2.0, 5.0), scipy.stats.uniform(-2.0, 7.0)),
        (LogUniform(1e-3, 40.0), scipy.stats.loguniform(1e-3, 40.0)),
        (Normal(1.5, 0.3), scipy.stats.norm(1.5, 0.3)),
    ],
    ids=["uniform", "loguniform", "normal"],
)
def test_scalar_transform_distribution_ks(prior, ref):
    x = _draws(prior)
    assert scipy.stats.kstest(x, ref.cdf).pvalue > 1e-3
    # the test has power: a slightly wrong reference is rejected
    shifted = lambda y: ref.cdf(y - 0.1 * ref.std())
    assert scipy.stats.kstest(x, shifted).pvalue < 1e-3


def test_dirichlet_transform_distribution_ks():
    conc = (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 2.0)
    w = _draws(Dirichlet(conc))
    a0 = sum(conc)
    for i, a in enumerate(conc):  # marginals are Beta(a_i, a0 - a_i)
        assert scipy.stats.kstest(w[:, i], scipy.stats.beta(a, a0 - a).cdf).pvalue > 1e-3
    assert scipy.stats.kstest(w[:, 0], scipy.stats.beta(0.5, a0 - 0.5).cdf).pvalue < 1e-3
    # pairwise: w0 / (w0 + w1) ~ Beta(a0', a1') (aggregation property)
    r = w[:, 0] / (w[:, 0] + w[:, 1])
    assert scipy.stats.kstest(r, scipy.stats.beta(conc[0], conc[1]).cdf).pvalue > 1e-3


def test_uniform_vector_transform_ks():
    x = _draws(UniformVector(-0.05, 0.05, 5))
    assert x.shape == (4000, 5)
    for j in range(5):
        assert scipy.stats.kstest(x[:, j], scipy.stats.uniform(-0.05, 0.1).cdf).pvalue > 1e-3


@dataclasses.dataclass(frozen=True)
class _ExpPrior(AbstractPrior):
    """A user prior without from_unit: nested sampling falls back to the NumPyro icdf."""

    rate: float
    kind: str = "exponential"

    @property
    def shape(self):
        return ()

    def to_numpyro(self):
        return dist.Exponential(self.rate) if self.kind == "exponential" else dist.Weibull(1.0, 2.0)

    def from_unit(self, u):
        raise NotImplementedError

    def contains(self, value):
        return bool(np.all(np.asarray(value) >= 0))

    def initial(self):
        return 1.0 / self.rate


def test_icdf_fallback_distribution_ks():
    x = _draws(_ExpPrior(2.5))
    assert np.all(x >= 0)
    assert scipy.stats.kstest(x, scipy.stats.expon(scale=1 / 2.5).cdf).pvalue > 1e-3
    # NumPyro distributions directly, incl. batched / to_event ones
    y = _draws(dist.Normal(jnp.zeros(3), 2.0).to_event(1))
    assert y.shape == (4000, 3)
    assert scipy.stats.kstest(y[:, 2], scipy.stats.norm(0, 2).cdf).pvalue > 1e-3


def test_prior_without_inverse_cdf_is_refused():
    sky = SkyModel([template_component("x", np.ones(NPIX), _ROI, prior=_ExpPrior(1.0, "weibull"), value=1.0)])
    with pytest.raises(ValueError, match=r"parameter 'x.norm'.*inverse CDF"):
        prior_transform(sky)
    with pytest.raises(ValueError, match="discrete"):
        unit_transform(dist.Poisson(3.0))
    with pytest.raises(ValueError, match="event shape"):
        unit_transform(dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)))


def test_prior_transform_blocks_follow_site_order():
    """Each site gets its own block of cube coordinates, in free_parameters() order."""
    t1, _ = _maps()
    sky = SkyModel([
        template_component("u", t1, _ROI, prior=Uniform(1.0, 3.0)),
        _vector_component("m", Dirichlet((0.5, 1.0, 2.0))),
        template_component("l", t1, _ROI, prior=LogUniform(0.01, 100.0)),
    ])
    t = prior_transform(sky)
    assert t.names == ("u.norm", "m.morphology.weights", "l.norm")
    assert t.unit_dims == (1, 3, 1) and t.ndim == 5
    assert t.labels() == ["u.norm", "m.morphology.weights[0]", "m.morphology.weights[1]",
                          "m.morphology.weights[2]", "l.norm"]
    u = np.array([0.25, 0.1, 0.6, 0.9, 0.75])
    v = jax.jit(t)(jnp.asarray(u))
    assert float(v["u.norm"]) == pytest.approx(1.5)
    assert float(v["l.norm"]) == pytest.approx(10.0)
    np.testing.assert_allclose(v["m.morphology.weights"], Dirichlet((0.5, 1.0, 2.0)).from_unit(u[1:4]))
    b = t.batch(np.stack([u, u]))
    assert b["m.morphology.weights"].shape == (2, 3)


# ---------------------------------------------------------------- checkpoint / resume


class _Interrupted(RuntimeError):
    pass


def test_resume_after_interruption_reproduces_uninterrupted_run(two, tmp_path, monkeypatch):
    sky, obs, *_ = two
    kw = dict(backend="dynesty", nlive=60, dlogz=0.5, seed=11, progress=False)
    ref = run_nested(sky, obs, **kw)

    real = nested.cube_log_likelihood

    def interrupting(*args):
        f = real(*args)
        calls = [0]

        def g(u):
            calls[0] += u.shape[0]
            if calls[0] > 400:
                raise _Interrupted("simulated crash")
            return f(u)

        return g

    ckpt = tmp_path / "nested.pkl"
    monkeypatch.setattr(nested, "cube_log_likelihood", interrupting)
    with pytest.raises(_Interrupted):
        run_nested(sky, obs, checkpoint_path=ckpt, checkpoint_every=0.0, **kw)
    monkeypatch.setattr(nested, "cube_log_likelihood", real)
    assert ckpt.exists()
    resumed = run_nested(sky, obs, checkpoint_path=ckpt, resume=True, **kw)
    assert resumed.log_evidence == ref.log_evidence
    assert resumed.diagnostics["niter"] == ref.diagnostics["niter"]
    assert resumed.diagnostics["n_likelihood_evals"] == ref.diagnostics["n_likelihood_evals"]
    np.testing.assert_array_equal(resumed["a.norm"], ref["a.norm"])
    # resuming a finished run gives the same result without new evaluations
    again = run_nested(sky, obs, checkpoint_path=ckpt, resume=True, **kw)
    assert again.log_evidence == ref.log_evidence
    assert again.diagnostics["n_likelihood_evals"] == ref.diagnostics["n_likelihood_evals"]


def test_resume_refuses_checkpoint_of_another_model(two, roi, tmp_path):
    sky, obs, *_ = two
    ckpt = tmp_path / "n.pkl"
    run_nested(sky, obs, backend="dynesty", nlive=20, dlogz=5.0, seed=0, progress=False,
               checkpoint_path=ckpt, maxiter=30)
    other = Observation.from_sky_counts(roi, np.asarray(obs.counts) + 1)
    with pytest.raises(ValueError, match="different model or data"):
        run_nested(sky, other, backend="dynesty", nlive=20, seed=0, progress=False,
                   checkpoint_path=ckpt, resume=True)


# ---------------------------------------------------------------- backends, MultiNest glue


def test_multinest_missing_names_install(monkeypatch):
    if nested.multinest_status()[0]:
        pytest.skip("MultiNest is installed here")
    with pytest.raises(BackendUnavailableError, match=r"pip install.*multinest.*conda-forge"):
        select_backend("multinest")
    name, reason = select_backend("auto")
    assert name == "dynesty" and "MultiNest unavailable" in reason


def test_multinest_wrapper_without_library(tmp_path, monkeypatch):
    """pymultinest importable but libmultinest missing (pymultinest then calls sys.exit):
    reported as unavailable, not an exit."""
    pkg = tmp_path / "pymultinest"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sys\nsys.exit(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pymultinest", raising=False)
    monkeypatch.setattr(nested, "_multinest_library_names", lambda: ["libmultinest_does_not_exist.so"])
    ok, why = nested.multinest_status()
    assert not ok and "shared library does not load" in why
    with pytest.raises(BackendUnavailableError, match="LD_LIBRARY_PATH"):
        select_backend("multinest")


def test_auto_logs_choice(two, caplog):
    sky, obs, *_ = two
    with caplog.at_level("INFO", logger="skymodel.inference.nested"):
        post = run_nested(sky, obs, nlive=20, dlogz=5.0, seed=0, progress=False, maxiter=20)
    assert any("nested sampling with" in r.message for r in caplog.records)
    assert post.diagnostics["backend_reason"].startswith("auto")
    assert post.diagnostics["converged"] is False


def _fake_pymultinest(points, logz, calls):
    """A stand-in for pymultinest with its API (run(LogLikelihood, Prior, n_dims, **kw) with
    ctypes cubes; Analyzer.get_stats / get_equal_weighted_posterior)."""
    mod = types.ModuleType("pymultinest")

    def run(LogLikelihood, Prior, n_dims, **kw):
        calls["kw"] = kw
        rng = np.random.default_rng(0)
        for _ in range(25):
            cube = (ctypes.c_double * n_dims)(*rng.uniform(size=n_dims))
            if Prior:
                Prior(cube, n_dims, n_dims)
            calls.setdefault("logl", []).append(LogLikelihood(cube, n_dims, n_dims, 0.0))

    class Analyzer:
        def __init__(self, n_params, outputfiles_basename, verbose=True):
            calls["base"] = outputfiles_basename

        def get_stats(self):
            return {"nested sampling global log-evidence": logz,
                    "nested sampling global log-evidence error": 0.2}

        def get_equal_weighted_posterior(self):
            return np.column_stack([points, np.zeros(len(points))])

    mod.run, mod.Analyzer = run, Analyzer
    return mod


def test_multinest_glue(two, monkeypatch, tmp_path):
    sky, obs, *_ = two
    pts = np.array([[0.1, 0.5], [0.3, 0.25], [0.9, 0.75]])
    calls = {}
    monkeypatch.setitem(sys.modules, "pymultinest", _fake_pymultinest(pts, -123.0, calls))
    monkeypatch.setattr(nested, "multinest_status", lambda: (True, "test double"))
    post = run_nested(sky, obs, backend="multinest", nlive=50, dlogz=0.3, seed=2, progress=False,
                      checkpoint_path=tmp_path / "mn")
    assert post.method == "nested-multinest" and post.log_evidence == -123.0
    np.testing.assert_allclose(post["a.norm"], 10.0 * pts[:, 0])
    np.testing.assert_allclose(post["b.norm"], np.exp(np.log(0.1) + np.log(100.0) * pts[:, 1]))
    assert post.diagnostics["n_likelihood_evals"] == 25
    assert all(np.isfinite(calls["logl"]))
    assert calls["kw"]["n_live_points"] == 50 and calls["kw"]["evidence_tolerance"] == 0.3
    assert calls["base"].startswith(str(tmp_path / "mn"))
    # the likelihood the fake received is the model's at the transformed point
    t = prior_transform(sky)
    u = np.random.default_rng(0).uniform(size=2)
    want = float(sky.with_values(t(jnp.asarray(u))).log_likelihood(obs))
    assert calls["logl"][0] == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- (d) input errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"nlive": 0}, "nlive must be an int"),
        ({"nlive": True}, "nlive must be an int"),
        ({"nlive": 4}, r"nlive=4 is too small for 2 unit-cube dimensions"),
        ({"dlogz": 0.0}, "dlogz must be a positive"),
        ({"dlogz": float("nan")}, "dlogz must be a positive"),
        ({"backend": "ultranest"}, "backend must be one of"),
        ({"sample": "hmc"}, "sample must be one of"),
        ({"resume": True}, "resume=True needs a checkpoint_path"),
        ({"seed": -1}, "seed must be an int"),
        ({"batch_size": 0}, "batch_size must be an int"),
        ({"maxiter": 0}, "maxiter must be an int"),
    ],
)
def test_bad_arguments(two, kwargs, match):
    sky, obs, *_ = two
    with pytest.raises(ValueError, match=match):
        run_nested(sky, obs, **{"backend": "dynesty", "progress": False, **kwargs})


def test_non_int_nlive_refused(two):
    """A float nlive: refused by the annotation under the test suite's runtime type
    checker (TypeError), by run_nested's own check without it (ValueError)."""
    sky, obs, *_ = two
    with pytest.raises((ValueError, TypeError), match="nlive"):
        run_nested(sky, obs, backend="dynesty", progress=False, nlive=12.5)


def test_no_free_parameters_refused(roi, two):
    _, obs, *_ = two
    sky = SkyModel([template_component("c", np.ones(NPIX), roi, prior=None, value=2.0)])
    with pytest.raises(ValueError, match="no free parameters"):
        run_nested(sky, obs, backend="dynesty", progress=False)


def test_nan_likelihood_is_an_error_naming_the_point():
    t = prior_transform(SkyModel([template_component("x", np.ones(NPIX), _ROI, prior=Uniform(0.0, 1.0))]))
    ev = nested._Evaluator(lambda u: jnp.where(u[:, 0] > 0.5, jnp.nan, -1.0), 2, 1, t)
    assert ev.evaluate(np.array([[0.2], [0.3], [0.1]])).tolist() == [-1.0, -1.0, -1.0]
    with pytest.raises(NonFiniteLikelihoodError, match=r"nan at \{'x.norm': 0.75"):
        ev.evaluate(np.array([[0.2], [0.75]]))
    ev_inf = nested._Evaluator(lambda u: jnp.full(u.shape[0], -jnp.inf), 1, 1, t)
    assert ev_inf.evaluate(np.array([[0.2]]))[0] == -np.inf  # zero likelihood is allowed


def test_model_errors_surface(roi, two):
    """A prior that reaches negative expected counts: the likelihood's own check fires."""
    _, obs, *_ = two
    sky = SkyModel([template_component("n", np.ones(NPIX), roi, prior=Normal(0.0, 1.0), normalise=False)])
    with pytest.raises(Exception, match="mu must be finite and >= 0"):
        run_nested(sky, obs, backend="dynesty", nlive=20, progress=False)


# ---------------------------------------------------------------- the NPTFit example config


def _nptfit_roi_mask(d):
    """NPTFit's make_mask_total(band_mask_range=2, mask_ring outer=30, custom_mask=psc),
    re-implemented from its definition (True = masked)."""
    nside = 128
    npix = 12 * nside**2
    theta, _ = hp.pix2ang(nside, np.arange(npix))
    band = (np.radians(88.0) < theta) & (theta < np.radians(92.0))
    ring = ~(np.dot(hp.ang2vec(np.pi / 2, 0.0), hp.pix2vec(nside, np.arange(npix))) >= np.cos(np.radians(30.0)))
    psc = np.load(d / "fermidata_pscmask.npy").astype(bool)
    return band | ring | psc


def test_nptfit_example_config_matches_nptfit_conventions(nptfit_dir, monkeypatch):
    from skymodel import config as C
    from skymodel.components.point_sources import NPTFitSCF

    monkeypatch.setenv("SKYMODEL_DATA", str(nptfit_dir.parent))
    b = C.build("nptfit_example")
    mask = _nptfit_roi_mask(nptfit_dir)
    np.testing.assert_array_equal(np.asarray(b.roi.pixels), np.flatnonzero(~mask))
    assert b.roi.n_regions == 1
    exp = np.load(nptfit_dir / "fermidata_exposure.npy")
    pix = np.flatnonzero(~mask)
    for name, tmpl in (("gce_ps", "template_gce.npy"), ("dsk_ps", "template_dsk.npy")):
        want = np.load(nptfit_dir / tmpl) / (exp / np.mean(exp))  # NPTFit's rescale
        np.testing.assert_allclose(b.sky.component(name).source_template(b.roi), want[pix], rtol=1e-12)
        scf = b.sky.component(name).scf_parameters
        assert isinstance(scf, NPTFitSCF) and scf.log10_amplitude
    for name in ("iso", "gce", "bub"):
        comp = b.sky.component(name)
        assert comp.norm.prior == Uniform(0.0, 2.0)
        raw = np.load(nptfit_dir / f"template_{name}.npy")[pix]
        unit = b.sky.with_values({f"{name}.norm": 1.0}).component(name).expected_counts(b.roi)
        np.testing.assert_allclose(unit, raw, rtol=1e-12)  # used as given, no renormalisation
    dif = b.sky.component("dif")
    assert dif.norm.prior is None and float(dif.norm.value) == 12.85
    priors = {k: p.prior for k, p in b.sky.free_parameters().items()}
    assert priors["gce_ps.scf_parameters.amplitude"] == Uniform(-6.0, 1.0)
    assert priors["gce_ps.scf_parameters.indices.0"] == Uniform(2.05, 30.0)
    assert priors["gce_ps.scf_parameters.indices.1"] == Uniform(-2.0, 1.95)
    assert priors["dsk_ps.scf_parameters.breaks.0"] == Uniform(0.05, 40.0)
    psf = b.observation.psf
    assert float(psf.mean_fraction()) == pytest.approx(1.0, abs=1e-12)  # NPTFit renormalises rho
    assert len(psf.f) == 10 and np.all(np.asarray(psf.f) <= 1.0)


@pytest.mark.slow
def test_nptfit_example_likelihood_without_point_sources_is_poisson(nptfit_dir, monkeypatch):
    """log10 A = -6 and S_b = 0.05 leave the point sources ~1e-6 counts per pixel: the NPTF
    likelihood must equal scipy's Poisson log-pmf of the smooth model."""
    from skymodel import config as C

    monkeypatch.setenv("SKYMODEL_DATA", str(nptfit_dir.parent))
    b = C.build("nptfit_example")
    values = {k: p.value for k, p in b.sky.free_parameters().items()}
    values.update({"iso.norm": 0.4, "gce.norm": 0.1, "bub.norm": 0.9})
    for pop in ("gce_ps", "dsk_ps"):
        values.update({f"{pop}.scf_parameters.amplitude": -6.0, f"{pop}.scf_parameters.breaks.0": 0.05})
    got = float(jax.jit(lambda v: b.sky.with_values(v, check=False).log_likelihood(b.observation))(values))
    pix = np.asarray(b.roi.pixels)
    t = {n: np.load(nptfit_dir / f"template_{n}.npy")[pix] for n in ("dif", "iso", "gce", "bub")}
    mu = 12.85 * t["dif"] + 0.4 * t["iso"] + 0.1 * t["gce"] + 0.9 * t["bub"]
    want = scipy.stats.poisson.logpmf(np.asarray(b.observation.counts), mu).sum()
    ps = sum(float(np.sum(b.sky.with_values(values).component(p).expected_counts(b.roi))) for p in ("gce_ps", "dsk_ps"))
    assert ps < 1.0
    assert got == pytest.approx(want, abs=2.0 * ps + 1e-6)
