"""Recovery on mocks (skymodel.validation, benchmarks/recovery.py).

Independent references: the coverage statistics against exactly known posteriors (a
conjugate Gaussian model, where the central interval covers the truth with probability
exactly the level, and deliberately over/under-confident posteriors that must fail);
Clopper-Pearson intervals against scipy's binomtest; the GCE point-source fraction against
its closed form S_ps / (S_ps + S_gce) (one exposure region, analysis = normalisation
pixels); `count_pmf` against the NPTF likelihood and normalisation; and the whole chain
(simulate -> SVI) against the known truth of a few mocks.
"""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from skymodel import validation as V

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ statistics


def test_central_interval_is_equal_tailed():
    x = np.linspace(0.0, 1.0, 100_001)
    lo, hi = V.central_interval(x, 0.68)
    assert lo == pytest.approx(0.16, abs=1e-9) and hi == pytest.approx(0.84, abs=1e-9)
    lo, hi = V.central_interval(np.stack([x, 10 * x], axis=1), 0.95)
    np.testing.assert_allclose(lo, [0.025, 0.25], atol=1e-9)
    np.testing.assert_allclose(hi, [0.975, 9.75], atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    q=st.floats(0.0, 1.0, allow_subnormal=False),
    level=st.sampled_from([0.5, 0.68, 0.9, 0.95, 0.99]),
    loc=st.floats(-1e3, 1e3, allow_subnormal=False),
    log_scale=st.floats(-5, 5),
)
def test_truth_inside_iff_its_quantile_is_central(q, level, loc, log_scale):
    """Samples are a monotone map of an even grid; a truth at posterior quantile q is
    inside the central `level` interval iff |q - 1/2| <= level/2."""
    n = 2001
    u = np.linspace(0.0, 1.0, n)
    g = lambda v: loc + math.exp(log_scale) * np.sinh(4 * (v - 0.5))
    margin = abs(abs(q - 0.5) - level / 2)
    if margin < 2.0 / n:  # at the edge the answer depends on interpolation
        return
    inside = bool(V.interval_contains(g(u)[::-1], g(q), level))  # order must not matter
    assert inside == (abs(q - 0.5) <= level / 2)


def _gaussian_posteriors(n_mocks, n_samples, sigma, width_factor, seed):
    """theta ~ N(0, 1), x ~ N(theta, sigma^2): the exact posterior is
    N(x / (1 + sigma^2), sigma^2 / (1 + sigma^2)); `width_factor` scales its width."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=n_mocks)
    x = theta + sigma * rng.normal(size=n_mocks)
    mean = x / (1 + sigma**2)
    sd = math.sqrt(sigma**2 / (1 + sigma**2)) * width_factor
    samples = mean[:, None] + sd * rng.normal(size=(n_mocks, n_samples))
    return samples, theta


def test_coverage_of_exact_posteriors_is_nominal_and_miscalibration_is_caught():
    m = 3000
    samples, theta = _gaussian_posteriors(m, 400, sigma=0.7, width_factor=1.0, seed=1)
    cov = V.coverage(samples, theta, levels=(0.5, 0.68, 0.95))
    for level, c in cov.items():
        lo, hi = V.binomial_interval(int(round(c * m)), m, 0.999)
        # quantiles of 400 samples add a little noise: widen by 0.01
        assert lo - 0.01 <= level <= hi + 0.01, (level, c)
    narrow = V.coverage(*_gaussian_posteriors(m, 400, 0.7, 0.5, seed=2))
    wide = V.coverage(*_gaussian_posteriors(m, 400, 0.7, 2.0, seed=3))
    # exact: P(|Z| < z_level * factor)
    for level in (0.68, 0.95):
        z = stats.norm.ppf(0.5 + level / 2)
        assert narrow[level] == pytest.approx(2 * stats.norm.cdf(0.5 * z) - 1, abs=0.035)
        assert wide[level] == pytest.approx(2 * stats.norm.cdf(2.0 * z) - 1, abs=0.035)
    assert narrow[0.68] < 0.45 and narrow[0.95] < 0.8 and wide[0.68] > 0.9


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (68, 100), (950, 1000), (1, 1)])
def test_binomial_interval_matches_scipy(k, n):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = V.binomial_interval(k, n, 0.95)
    assert lo == pytest.approx(ref.low, abs=1e-10) and hi == pytest.approx(ref.high, abs=1e-10)


def test_bias_summary():
    b = V.bias_summary([1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    assert b["mean"] == pytest.approx(4.0 / 3.0)
    assert b["std"] == pytest.approx(np.std([0.0, 1.0, 3.0], ddof=1))
    assert b["sem"] == pytest.approx(b["std"] / math.sqrt(3)) and b["n"] == 3
    assert math.isnan(V.bias_summary([1.0], [0.0])["std"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="level"):
        V.central_interval([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        V.central_interval([1.0], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        V.central_interval([1.0, np.nan], 0.5)
    with pytest.raises(ValueError, match="one truth per mock"):
        V.coverage([np.ones(3)], [1.0, 2.0])
    with pytest.raises(ValueError, match="0 <= k <= n"):
        V.binomial_interval(5, 3)
    with pytest.raises(ValueError, match="templates"):
        V.fiducial_like_config(16, templates="bogus")
    with pytest.raises(ValueError, match="power of 2"):
        V.fiducial_like_config(12)
    setup = _setup(8)
    with pytest.raises(ValueError, match="truth mode"):
        setup.truth("bogus")
    with pytest.raises(ValueError, match="PRNG key"):
        setup.truth("prior")
    with pytest.raises(KeyError, match="unknown component"):
        V.gce_ps_fraction(setup.sky, setup.roi, {"gce.norm": [1.0]}, ps="nope")


# ------------------------------------------------------------------ model pieces


def _setup(nside, **kw):
    kw.setdefault("psf", "none")
    kw.setdefault("free_gamma", False)
    kw.setdefault("disk", False)
    kw.setdefault("exposure_regions", 1)
    return V.MockSetup.from_config(V.fiducial_like_config(nside, **kw))


def test_gce_ps_fraction_closed_form():
    """One exposure region, no source mask: both GCE templates have mean 1 over the
    analysis pixels, so f_ps = S_ps / (S_ps + S_gce) exactly."""
    setup = _setup(16)
    s_ps = np.array([0.1, 0.8, 2.0, 3.5])
    s_gce = np.array([1.0, 0.5, 0.01, 3.0])
    vals = {k: np.full(4, v) for k, v in setup.truth("fixed").items()}
    vals["gce_ps.scf_parameters.total_counts"] = s_ps
    vals["gce.norm"] = s_gce
    vals["gce_ps.scf_parameters.indices.1"] = np.array([-1.5, 0.0, 1.0, 1.8])
    got = V.gce_ps_fraction(setup.sky, setup.roi, vals, batch_size=3)
    np.testing.assert_allclose(got, s_ps / (s_ps + s_gce), rtol=1e-10)


def test_fiducial_like_setup_and_prior_truths():
    setup = V.MockSetup.from_config(V.fiducial_like_config(16))
    free = setup.sky.free_parameters()
    assert set(setup.truth("fixed")) == set(free) == set(V.FIDUCIAL_LIKE_TRUTH)
    assert setup.roi.n_regions == 4 and setup.psf_correction is not None
    t1 = setup.truth("prior", jax.random.PRNGKey(1))
    t2 = setup.truth("prior", jax.random.PRNGKey(2))
    assert t1 != t2 and all(free[k].prior.contains(v) for k, v in t1.items())


def test_mock_with_infinitely_many_faint_sources():
    """A last index >= 1 (allowed by the fiducial priors) means infinitely many faint
    sources: the mock simulates those above FAINT_CUT as sources and adds the rest as their
    mean counts (the analytic missing fraction), instead of failing."""
    setup = V.MockSetup.from_config(V.fiducial_like_config(16))
    truth = setup.truth("fixed")
    truth["dsk_ps.scf_parameters.indices.1"] = 1.5
    mock = setup.mock(truth, seed=4)
    pops = mock.simulation.populations
    assert pops["dsk_ps"].s_min == V.FAINT_CUT and pops["gce_ps"].s_min == 0.0
    scf = setup.sky.with_values(truth).component("dsk_ps").source_count_function(setup.roi)
    from skymodel.simulate import missing_counts_fraction

    assert 0.0 < pops["dsk_ps"].missing_fraction == pytest.approx(missing_counts_fraction(scf, V.FAINT_CUT))
    assert np.all(np.isfinite(np.asarray(mock.observation.counts)))


def test_scf_gradients_are_finite():
    """d A / d(first break) of the total-counts parameterisation is finite and matches
    finite differences (A = S_ps / mean counts per unit A)."""
    setup = _setup(8)

    def mean_counts_of(b):
        sky = setup.sky.with_values({"gce_ps.scf_parameters.first_break": b}, check=False)
        return sky.component("gce_ps").source_count_function().A

    g = jax.grad(mean_counts_of)(jnp.asarray(20.0))
    fd = (mean_counts_of(20.0 + 1e-5) - mean_counts_of(20.0 - 1e-5)) / 2e-5
    assert np.isfinite(g) and g == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.slow
def test_count_pmf_matches_likelihood():
    setup = _setup(8, psf="fermi_2gev", exposure_regions=2)
    mock = setup.mock(setup.truth("fixed"), seed=3)
    sky = setup.sky.with_values(mock.truth)
    k = np.asarray(mock.observation.counts).astype(int)
    k_max = int(k.max()) + 40
    logp = np.asarray(V.count_pmf(sky, mock.observation, k_max, log=True))
    ll = np.asarray(sky.pixel_log_likelihood(mock.observation))
    np.testing.assert_allclose(logp[np.arange(k.size), k], ll, rtol=1e-10, atol=1e-10)
    total = np.exp(logp).sum(axis=1)  # the tail beyond k_max is tiny at these means
    assert np.all(total > 0.999) and np.all(total < 1 + 1e-9)


# ------------------------------------------------------------------ recovery


KEY = ["pib.norm", "ics.norm", "gce.norm", "gce_ps.scf_parameters.total_counts", V.GCE_PS_FRACTION]


def test_svi_recovers_truth_on_mocks():
    """The quick recovery (~1 min). 2 mocks of a small model (nside 16, 25 deg ROI, no PSF,
    one exposure region): SVI (multivariate-normal guide) puts the truth inside the central
    95% interval of the key parameters for every mock, and its f_ps interval is
    informative: narrower than 3/4 of the central 95% interval of f_ps under the prior
    (0.06-0.95). With ~2,000 photons at nside 16 the data constrain f_ps only moderately
    (seed 0: 95% interval 0.35-0.91)."""
    setup = _setup(16)
    truth = setup.truth("fixed")
    f_true = float(V.gce_ps_fraction(setup.sky, setup.roi, {k: [v] for k, v in truth.items()})[0])
    prior_f = V.gce_ps_fraction(setup.sky, setup.roi, setup.sky.sample_prior(jax.random.key(9), 2000))
    p_lo, p_hi = V.central_interval(prior_f, 0.95)
    from skymodel.inference import run_svi

    for seed in (0, 1):
        mock = setup.mock(truth, seed)
        n = 1500
        res = run_svi(setup.sky, mock.observation, guide="mvn", num_steps=n,
                      learning_rate=optax.cosine_decay_schedule(0.02, n, 0.05), num_particles=4,
                      progress=False, seed=seed, chunk_size=500)
        post = res.posterior(3000, seed=seed)
        samples = dict(post.samples)
        samples[V.GCE_PS_FRACTION] = V.gce_ps_fraction(setup.sky, setup.roi, post.samples)
        tr = dict(truth, **{V.GCE_PS_FRACTION: f_true})
        for k in KEY:
            lo, hi = V.central_interval(samples[k], 0.95)
            assert lo <= tr[k] <= hi, (seed, k, tr[k], lo, hi)
        lo, hi = V.central_interval(samples[V.GCE_PS_FRACTION], 0.95)
        assert hi - lo < 0.75 * (p_hi - p_lo), (seed, lo, hi, p_lo, p_hi)


# ------------------------------------------------------------------ the benchmark script


def _bench():
    spec = importlib.util.spec_from_file_location("recovery_bench", ROOT / "benchmarks/recovery.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_summary_counts_coverage():
    bench = _bench()
    rng = np.random.default_rng(0)
    records = []
    flags = rng.random((7, 2, 2)) < 0.7  # mock x parameter x level
    for i in range(7):
        params = {}
        for j, name in enumerate(["a", V.GCE_PS_FRACTION]):
            params[name] = {"quantiles": [0, 0, 0.5 + 0.1 * i, 0, 0], "in68": bool(flags[i, j, 0]),
                            "in95": bool(flags[i, j, 0] or flags[i, j, 1])}
        records.append({"mock": i, "truth": {"a": 1.0}, "f_ps_truth": 0.5,
                        "fits": {"svi": {"info": {"wall_s": 1.0}, "params": params}}})
    s = bench.summarise(records, ("svi", "nuts"))
    assert set(s) == {"svi"} and s["svi"]["n_mocks"] == 7
    assert s["svi"]["coverage"]["a"]["68"] == pytest.approx(flags[:, 0, 0].mean())
    assert s["svi"]["coverage"]["a"]["95"] == pytest.approx((flags[:, 0, 0] | flags[:, 0, 1]).mean())
    assert s["svi"]["pooled_parameters"]["68"]["n"] == 7  # f_ps is not pooled
    assert s["svi"]["f_ps_bias"]["mean"] == pytest.approx(0.3)
    text = bench.table(records, s, ("svi",), "fixed")
    assert V.GCE_PS_FRACTION in text and "SVI 68%" in text
    json.dumps(s)


def _fake_run(seeds, settings, flags):
    """A result file's content: one record per seed, parameter "a" in68 = flags[i]."""
    records = []
    for i, (sd, f) in enumerate(zip(seeds, flags)):
        params = {n: {"quantiles": [0, 0, 0.4 + 0.1 * sd, 0, 0], "in68": bool(f), "in95": True}
                  for n in ("a", V.GCE_PS_FRACTION)}
        records.append({"mock": i, "seed": sd, "truth": {"a": 1.0}, "f_ps_truth": 0.5,
                        "fits": {"nuts": {"info": {"wall_s": 2.0}, "params": params}}})
    return {"meta": {}, "settings": settings, "config": {}, "records": records,
            "summary": {"nuts": {}}}


def test_benchmark_merge(tmp_path):
    """--merge joins runs with other seeds into the summary of all their mocks; it refuses
    other settings and a mock seed present twice."""
    bench = _bench()
    s0 = {"nside": 32, "truth": "fixed", "seed": 0}
    a = _fake_run([0, 1, 2], s0, [True, False, True])
    b = _fake_run([3, 4], dict(s0, seed=3), [True, True])
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    pa.write_text(json.dumps(b))  # order of the files does not matter
    pb.write_text(json.dumps(a))
    assert bench.main(["--merge", str(pa), str(pb), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert [r["seed"] for r in m["records"]] == [0, 1, 2, 3, 4]
    assert [r["mock"] for r in m["records"]] == [0, 1, 2, 3, 4]
    assert m["settings"] == s0
    s = m["summary"]["nuts"]
    assert s["n_mocks"] == 5 and s["coverage"]["a"]["68"] == pytest.approx(0.8)
    assert s["f_ps_bias"]["mean"] == pytest.approx(np.mean([0.4 + 0.1 * sd - 0.5 for sd in range(5)]))
    pb.write_text(json.dumps(_fake_run([3], dict(s0, seed=3), [True])))  # seed 3 twice
    with pytest.raises(SystemExit, match="seed 3"):
        bench.main(["--merge", str(pa), str(pb), "--out", str(out)])
    pb.write_text(json.dumps(_fake_run([0], dict(s0, nside=16), [True])))
    with pytest.raises(SystemExit, match="nside"):
        bench.main(["--merge", str(pa), str(pb), "--out", str(out)])


def test_benchmark_arguments():
    bench = _bench()
    a = bench.parse_args(["--quick"])
    assert (a.mocks, a.nside, a.svi_steps) == (2, 16, 300)
    a = bench.parse_args(["--mocks", "5", "--methods", "nuts"])
    assert a.mocks == 5 and a.methods == ("nuts",) and a.nside == 32
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "mcmc"])
