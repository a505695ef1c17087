"""Tests of skymodel.likelihood against independent computations: scipy (Poisson), mpmath
(compound-Poisson sums over the number of sources, 50 digits), a plain-autodiff reference
recursion (gradients), the ungrouped table (grouping), finite differences."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import mpmath as mp
import numpy as np
import pytest
import scipy.stats
from hypothesis import example, given, settings
from jax.test_util import check_grads

from skymodel.likelihood import (
    CountPlan,
    count_plan,
    nptf_loglike,
    nptf_loglike_from_terms,
    pk_table,
    poisson_loglike,
)
from skymodel.psf import PSFCorrection
from skymodel.scf import BrokenPowerLaw

# ----------------------------------------------------------------------------- helpers


def mp_logpk(mu: float, x: np.ndarray, x_total: float, k: int) -> mp.mpf:
    """log p_k by summing over the number N of sources (compound Poisson), in mpmath:
    p_k = sum_N Pois(N; x_total) sum_s Pois(k - s; mu) [q^{*N}]_s, q_m = x_m / x_total.
    Each source gives >= 1 photon in this representation, so N <= k."""
    mp.mp.dps = 50
    mu = mp.mpf(float(mu))
    lam = mp.mpf(float(x_total))
    xs = [mp.mpf(float(v)) for v in x[:k]] + [mp.mpf(0)] * max(0, k - len(x))
    # single-source count distribution (unnormalised by lam), orders 0..k
    q = [mp.mpf(0)] + xs[:k]
    conv = [mp.mpf(1)] + [mp.mpf(0)] * k  # q^{*0}, multiplied by lam^N / N! on the fly
    ps_dist = [mp.mpf(0)] * (k + 1)  # sum_N e^-lam (q^{*N} with x, not q) / N!
    for N in range(0, k + 1):
        for s in range(k + 1):
            ps_dist[s] += conv[s] / mp.factorial(N)
        new = [mp.mpf(0)] * (k + 1)
        for s in range(k + 1):
            if conv[s] == 0:
                continue
            for m in range(1, k + 1 - s):
                new[s + m] += conv[s] * q[m]
        conv = new
    total = mp.mpf(0)
    for s in range(k + 1):
        total += ps_dist[s] * mp.e ** (-mu) * mu ** (k - s) / mp.factorial(k - s)
    return mp.log(total * mp.e ** (-lam)) if total > 0 else -mp.inf


def x_from_scfs(T, scfs, f, w, region, ratios, m_max):
    """x_{p,m} and x_total assembled in numpy from per-region generating terms."""
    n = T.shape[1]
    x = np.zeros((n, m_max))
    xt = np.zeros(n)
    for i, s in enumerate(scfs):
        for r, rr in enumerate(ratios):
            xm, tot = s.generating_terms(f, w, m_max, float(rr))
            sel = region == r
            x[sel] += T[i, sel, None] * np.asarray(xm)[None, :]
            xt[sel] += T[i, sel] * float(tot)
    return x, xt


def reference_logp_autodiff(mu, x, x_total, k, K):
    """Plain jnp recursion (no scaling, no custom_vjp), for gradients on small cases."""
    xp = x.at[:, 0].add(mu)
    p = [jnp.exp(-mu - x_total)]
    for kk in range(1, K + 1):
        p.append(sum(j * xp[:, j - 1] * p[kk - j] for j in range(1, kk + 1)) / kk)
    P = jnp.stack(p, axis=1)
    return jnp.log(jnp.take_along_axis(P, k[:, None], axis=1)[:, 0])


SCF1 = BrokenPowerLaw(0.6, [12.0, 1.6], [9.0])
SCF2 = BrokenPowerLaw(0.15, [4.0, 1.9, -0.7], [25.0, 3.0])
PSF_TABLE = PSFCorrection.from_arrays(
    np.array([0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9]),
    np.array([3.0, 2.0, 1.2, 0.8, 0.5, 0.3, 0.15, 0.05]),
)


def _setup(n=24, kmax=25, seed=0, npop=2, nreg=3):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, kmax + 1, n)
    mu = rng.uniform(0.2, 8.0, n)
    T = rng.uniform(0.3, 2.5, (npop, n))
    region = rng.integers(0, nreg, n)
    ratios = np.linspace(0.7, 1.4, nreg)
    return counts, mu, T, region, ratios


# ----------------------------------------------------------------------------- Poisson


@settings(max_examples=40, deadline=None)
@given(
    k=st.lists(st.integers(0, 2000), min_size=8, max_size=8),
    mu=st.floats(1e-10, 1e4),
)
def test_poisson_matches_scipy(k, mu):
    k = np.array(k)
    mus = np.full(k.shape, mu)
    got = np.asarray(poisson_loglike(jnp.asarray(k), jnp.asarray(mus)))
    np.testing.assert_allclose(got, scipy.stats.poisson.logpmf(k, mus), rtol=1e-12, atol=1e-10)


def test_poisson_zero_mean():
    got = np.asarray(poisson_loglike(jnp.array([0, 3]), jnp.array([0.0, 0.0])))
    assert got[0] == 0.0 and got[1] == -np.inf


def test_no_populations_equals_poisson():
    counts, mu, *_ = _setup()
    got = nptf_loglike(counts, mu, jnp.zeros((0, counts.size)), [])
    np.testing.assert_allclose(got, scipy.stats.poisson.logpmf(counts, mu), rtol=1e-12)
    # the recursion with all x = 0 too
    got2 = nptf_loglike_from_terms(counts, mu, jnp.zeros((counts.size, 30)), jnp.zeros(counts.size))
    np.testing.assert_allclose(got2, scipy.stats.poisson.logpmf(counts, mu), rtol=1e-12)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("psf", [None, PSF_TABLE], ids=["delta", "table"])
def test_matches_mpmath_compound_poisson(psf):
    counts, mu, T, region, ratios = _setup(n=14, kmax=22, seed=3)
    scfs = [SCF1, SCF2]
    got = np.asarray(nptf_loglike(counts, mu, T, scfs, psf, (region, ratios)))
    p = psf or PSFCorrection.delta()
    x, xt = x_from_scfs(T, scfs, np.asarray(p.f), np.asarray(p.weights), region, ratios, 22)
    assert np.all(x > 0)
    ref = np.array([float(mp_logpk(mu[i], x[i], xt[i], int(counts[i]))) for i in range(counts.size)])
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_populations_and_regions_in_one_kernel_equal_one_by_one():
    """Broken power laws of any structures are evaluated in one kernel (populations'
    segments and regions' PSF bins side by side, widest static index bounds); it equals
    generating_terms population by population and region by region, each with its own
    bounds."""
    import skymodel.likelihood as L

    ratios = np.array([0.7, 1.0, 1.6])
    scfs = [BrokenPowerLaw(0.3, [9.0, 1.5, -1.0], [12.0, 3.0], max_index=10.0),
            BrokenPowerLaw(0.2, [6.0, 0.5, -2.0], [8.0, 2.0], max_index=12.0, min_index=-3.0),
            SCF1]
    f, w = np.asarray(PSF_TABLE.f), np.asarray(PSF_TABLE.weights)
    x, xt = L._all_population_terms(scfs, f, w, 25, jnp.asarray(ratios))
    assert x.shape == (3, 3, 25) and xt.shape == (3, 3)
    for p, s in enumerate(scfs):
        for r, rr in enumerate(ratios):
            xm, tot = s.generating_terms(f, w, 25, float(rr))
            np.testing.assert_allclose(x[p, r], xm, rtol=1e-13)
            np.testing.assert_allclose(xt[p, r], tot, rtol=1e-13)


def test_from_terms_matches_mpmath_random_x():
    rng = np.random.default_rng(7)
    n, M = 12, 30
    mu = rng.uniform(0, 3, n)
    x = rng.uniform(0, 1, (n, M)) * np.exp(-np.arange(M) / 4.0)
    x[:, 5] = 0.0  # exact zeros are allowed
    xt = x.sum(1) + rng.uniform(0, 2, n)  # orders beyond M
    counts = rng.integers(0, M, n)
    got = np.asarray(nptf_loglike_from_terms(counts, mu, x, xt))
    ref = np.array([float(mp_logpk(mu[i], x[i], xt[i], int(counts[i]))) for i in range(n)])
    np.testing.assert_allclose(got, ref, rtol=1e-10)


# Terms span the whole normal float range, so neighbouring terms can be ~300 orders of
# magnitude apart (hypothesis once found mu = 1e-270 beside x_2 = 1 losing mass through a
# ratio cap that the rescaling now avoids).
_term = st.floats(0.0, 30.0, allow_subnormal=False)


@settings(max_examples=30, deadline=None)
@given(
    mu=_term,
    xs=st.lists(_term.map(lambda v: min(v, 3.0)), min_size=1, max_size=6),
)
@example(mu=1.06e-270, xs=[0.0, 1.0])
@example(mu=0.0, xs=[1e-300, 0.0, 0.0, 2.5])
def test_pk_table_normalised_and_mean(mu, xs):
    """Finite-support x: sum_k p_k = 1 and sum_k k p_k = mu + sum_m m x_m."""
    x = np.array(xs + [0.0] * (6 - len(xs)))
    K = 400
    tab = np.asarray(pk_table(jnp.array([mu]), jnp.asarray(x[None, :]), jnp.array([x.sum()]), K))[0]
    assert np.all(np.isfinite(tab)) and np.all(tab >= 0)
    np.testing.assert_allclose(tab.sum(), 1.0, rtol=1e-10)
    mean = mu + np.sum(np.arange(1, x.size + 1) * x)
    np.testing.assert_allclose(np.sum(np.arange(K + 1) * tab), mean, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mu", [1.06e-270, 1e-200, 1e-120])
def test_far_apart_terms_match_convolution(mu):
    """mu tiny beside x_2 = 1: p_k = sum_{a + 2b = k} Pois(a; mu) Pois(b; 1) (brute force in
    log space); both the table and the grouped recursion, odd and even k."""
    K = 60
    x = np.array([0.0, 1.0])
    tab = np.asarray(pk_table(jnp.array([mu]), jnp.asarray(x[None, :]), jnp.array([1.0]), K, log=True))[0]
    ref = np.array([
        float(mp.log(mp.fsum(mp.exp(-mp.mpf(mu)) * mp.mpf(mu) ** (k - 2 * b) / mp.factorial(k - 2 * b)
                             * mp.exp(-1) / mp.factorial(b) for b in range(k // 2 + 1))))
        for k in range(K + 1)
    ])
    np.testing.assert_allclose(tab, ref, rtol=1e-12)
    ks = np.arange(K + 1)
    # one phase (the default plan for so few pixels) and several: rescales carry across phases
    for plan in (count_plan(ks), count_plan(ks, max_groups=6, phase_overhead=0.0)):
        got = np.asarray(nptf_loglike_from_terms(ks, np.full(K + 1, mu), np.tile(x, (K + 1, 1)),
                                                 np.ones(K + 1), plan=plan))
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_pk_table_log_matches_grouped_and_scipy():
    counts, mu, T, region, ratios = _setup(n=40, kmax=60, seed=5)
    x, xt = x_from_scfs(T, [SCF1, SCF2], np.ones(1), np.ones(1), region, ratios, 60)
    tab = np.asarray(pk_table(mu, x, xt, 60, log=True))
    got = np.asarray(nptf_loglike_from_terms(counts, mu, x, xt))
    np.testing.assert_allclose(got, tab[np.arange(40), counts], rtol=1e-12)
    pois = np.asarray(pk_table(mu, np.zeros((40, 0)), np.zeros(40), 60))
    np.testing.assert_allclose(pois, scipy.stats.poisson.pmf(np.arange(61)[None, :], mu[:, None]),
                               rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("groups", [1, 2, 3, 8])
def test_grouping_independent_of_plan(groups):
    rng = np.random.default_rng(11)
    counts = np.concatenate([rng.poisson(5, 300), rng.poisson(40, 50), [0, 0, 97, 120]])
    n = counts.size
    mu = rng.uniform(0.5, 60, n)
    x = rng.uniform(0, 0.3, (n, 120)) / np.arange(1, 121) ** 1.5
    xt = x.sum(1) * 1.1
    plan = count_plan(counts, max_groups=groups)
    assert len(plan.group_kmax) <= groups
    got = np.asarray(nptf_loglike_from_terms(counts, mu, x, xt, plan=plan))
    tab = np.asarray(pk_table(mu, x, xt, 120, log=True))[np.arange(n), counts]
    np.testing.assert_allclose(got, tab, rtol=1e-12)
    # each pixel sits in a group whose length covers its count; work is below n * kmax^2
    for idx, kp, K in zip(plan.index, plan.counts, plan.group_kmax):
        assert np.all(np.asarray(kp) <= K)
        np.testing.assert_array_equal(counts[np.asarray(idx)], kp)
    assert sum(int(i.shape[0]) for i in plan.index) == n
    if groups > 1:
        assert plan.cost < n * 120 * 121


# ----------------------------------------------------------------------------- stability


@pytest.mark.parametrize(
    "mu,k,x_scale",
    [(1000.0, 0, 0.0), (1000.0, 1000, 0.0), (1e-8, 1000, 0.0), (1e-8, 1000, 1e-3),
     (1000.0, 1000, 5.0), (0.5, 1000, 1e4), (1e-8, 0, 1e6), (3.0, 500, 1e-30)],
)
def test_stable_extremes(mu, k, x_scale):
    M = max(k, 1)
    x = x_scale * np.ones((1, M)) / np.arange(1, M + 1) ** 2
    xt = x.sum(1)
    f = lambda m, xx, t: nptf_loglike_from_terms(np.array([k]), m, xx, t).sum()
    val, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(jnp.array([mu]), jnp.asarray(x), jnp.asarray(xt))
    assert np.isfinite(val)
    assert all(np.all(np.isfinite(g)) for g in grads)
    if x_scale == 0.0:
        np.testing.assert_allclose(val, scipy.stats.poisson.logpmf(k, mu), rtol=1e-12)
    # same value from the ungrouped table
    tab = pk_table(jnp.array([mu]), jnp.asarray(x), jnp.asarray(xt), k, log=True)[0, k]
    np.testing.assert_allclose(val, tab, rtol=1e-12)


def test_stable_real_scf_bright_pixels():
    counts = np.array([0, 1, 50, 200, 1000, 1000])
    mu = np.array([1e-8, 1000.0, 1e-8, 500.0, 1e-8, 1000.0])
    T = np.ones((1, 6)) * 3.0
    out = nptf_loglike(counts, mu, T, [SCF2], PSF_TABLE)
    assert np.all(np.isfinite(np.asarray(out)))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("groups", [1, 4])
def test_custom_vjp_matches_plain_autodiff(groups):
    rng = np.random.default_rng(2)
    n, K = 30, 18
    mu = jnp.asarray(rng.uniform(0.1, 10, n))
    x = jnp.asarray(rng.uniform(0.01, 0.5, (n, K)))
    xt = x.sum(1) + 0.3
    k = jnp.asarray(rng.integers(0, K + 1, n))
    plan = count_plan(np.asarray(k), max_groups=groups, phase_overhead=0.0)
    assert len(plan.group_kmax) == groups
    wts = jnp.asarray(rng.normal(size=n))
    ours = jax.grad(lambda *a: (wts * nptf_loglike_from_terms(k, *a, plan=plan)).sum(), argnums=(0, 1, 2))
    ref = jax.grad(lambda *a: (wts * reference_logp_autodiff(*a, k, K)).sum(), argnums=(0, 1, 2))
    for a, b in zip(ours(mu, x, xt), ref(mu, x, xt)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("psf", [None, PSF_TABLE], ids=["delta", "table"])
def test_check_grads_full(psf):
    counts, mu, T, region, ratios = _setup(n=20, kmax=30, seed=9)
    plan = count_plan(counts)
    wts = jnp.asarray(np.random.default_rng(0).normal(size=20))

    def f(mu, T, A1, n1, b1, A2, n2, b2):
        scfs = [BrokenPowerLaw(A1, n1, b1), BrokenPowerLaw(A2, n2, b2)]
        return jnp.sum(wts * nptf_loglike(counts, mu, T, scfs, psf, (region, ratios), plan=plan))

    args = (jnp.asarray(mu), jnp.asarray(T), SCF1.A, SCF1.indices, SCF1.breaks,
            SCF2.A, SCF2.indices, SCF2.breaks)
    check_grads(f, args, order=1, modes=["rev"], eps=1e-5, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- jit, retrace, errors


def test_jit_equals_eager_and_no_retrace():
    counts, mu, T, region, ratios = _setup(n=30, kmax=40, seed=4)
    plan = count_plan(counts)
    counts_j = jnp.asarray(counts)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(counts, mu, T, A, plan):
        scfs = [BrokenPowerLaw(A, SCF1.indices, SCF1.breaks), SCF2]
        return nptf_loglike(counts, mu, T, scfs, PSF_TABLE, (region, ratios), plan=plan)

    eager = nptf_loglike(counts, mu, T, [SCF1, SCF2], PSF_TABLE, (region, ratios))
    np.testing.assert_allclose(f(counts_j, jnp.asarray(mu), jnp.asarray(T), SCF1.A, plan), eager,
                               rtol=1e-13)
    for s in (0.5, 2.0, 3.0):
        out = f(counts_j, jnp.asarray(mu * s), jnp.asarray(T / s), SCF1.A * s, plan)
        assert np.all(np.isfinite(np.asarray(out)))


def test_bad_inputs_raise():
    counts, mu, T, region, ratios = _setup(n=10, kmax=10)
    with pytest.raises(ValueError, match="non-negative"):
        count_plan(np.array([1, -2, 3]))
    with pytest.raises(ValueError, match="integers"):
        count_plan(np.array([1.0, 2.5]))
    with pytest.raises(ValueError, match="non-finite"):
        count_plan(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="mu must be finite"):
        nptf_loglike(counts, -mu, T, [SCF1, SCF2])
    with pytest.raises(ValueError, match="ps_templates"):
        nptf_loglike(counts, mu, -T, [SCF1, SCF2])
    with pytest.raises(ValueError, match="SCFs"):
        nptf_loglike(counts, mu, T, [SCF1])
    # (with the test-suite's jaxtyping import hook the annotation check fires first)
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="shape|npix"):
        nptf_loglike(counts, mu[:-1], T, [SCF1, SCF2])
    with pytest.raises(ValueError, match="CountPlan"):
        nptf_loglike(counts, mu, T, [SCF1, SCF2], plan=count_plan(counts + 1))
    with pytest.raises(ValueError, match="count_plan"):
        jax.jit(lambda c: nptf_loglike(c, mu, T, [SCF1, SCF2]))(jnp.asarray(counts))
    # under jit, a bad value raises (never a silent NaN)
    plan = count_plan(counts)
    g = jax.jit(lambda m: nptf_loglike(counts, m, T, [SCF1, SCF2], plan=plan))
    assert np.all(np.isfinite(np.asarray(g(jnp.asarray(mu)))))
    with pytest.raises(Exception, match="mu must be finite"):
        g(jnp.asarray(mu).at[0].set(jnp.nan)).block_until_ready()
    h = jax.jit(lambda c: nptf_loglike(c, mu, T, [SCF1, SCF2], plan=plan))
    with pytest.raises(Exception, match="CountPlan"):
        h(jnp.asarray(counts + 1)).block_until_ready()


def test_plan_is_pytree_and_static_config():
    plan = count_plan(np.array([0, 3, 3, 7, 100]))
    assert isinstance(plan, CountPlan)
    leaves = jax.tree_util.tree_leaves(plan)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert plan.k_max == 100 and plan.n_pixels == 5


# ----------------------------------------------------------------------------- real data


def test_real_counts(fermi_dir):
    import healpy as hp

    counts = np.load(fermi_dir / "counts.npy")
    psc = np.load(fermi_dir / "mask_psc_3fgl_0p8deg.npy").astype(bool)
    nside = hp.npix2nside(counts.size)
    theta, phi = hp.pix2ang(nside, np.arange(counts.size))
    b = np.pi / 2 - theta
    r = np.degrees(np.arccos(np.cos(b) * np.cos(phi)))
    keep = (r < 25) & (np.abs(np.degrees(b)) > 2) & ~psc
    k = counts[keep].astype(np.int64)
    assert 6000 < k.size < 8000 and k.max() > 50
    n = k.size
    mu = np.maximum(k, 1) * 0.8
    T = np.ones((1, n))
    out = np.asarray(nptf_loglike(k, mu, T, [SCF1], PSF_TABLE))
    assert np.all(np.isfinite(out))
    x, xt = x_from_scfs(T, [SCF1], np.asarray(PSF_TABLE.f), np.asarray(PSF_TABLE.weights),
                        np.zeros(n, int), [1.0], int(k.max()))
    tab = np.asarray(pk_table(mu, x, xt, int(k.max()), log=True))[np.arange(n), k]
    np.testing.assert_allclose(out, tab, rtol=1e-11)
