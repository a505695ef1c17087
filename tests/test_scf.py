"""skymodel.scf against mpmath quadrature over S (independent of the incomplete-gamma
formulas), plus structural identities. PSF tables are (f, w) with w = Delta f rho(f) / f as
NPTFit tabulates them, so the PSF measure is Delta f rho = w f. Shapes are kept few (nf = 2, m_max = 100) so the
jitted kernel compiles only a handful of times."""

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from skymodel.scf import BrokenPowerLaw, generating_terms, population_terms

mp.mp.dps = 20
M = 100
M_CHECK = [1, 2, 3, 4, 6, 10, 20, 40, 70, 100]


def _mp_dnds(A, ns, bs):
    ns = [mp.mpf(x) for x in ns]
    bs = [mp.mpf(x) for x in bs]

    def dnds(S):
        if S >= bs[0]:
            return A * (S / bs[0]) ** (-ns[0])
        v, P = mp.mpf(1), bs[0]
        for j in range(1, len(bs)):
            if S >= bs[j]:
                return A * v * (S / P) ** (-ns[j])
            v, P = v * (bs[j] / P) ** (-ns[j]), bs[j]
        return A * v * (S / P) ** (-ns[-1])

    return dnds


def _ref(A, ns, bs, f, w, ms):
    """x_m (m in ms) and x_total by mpmath quadrature in S, split at the breaks and at the
    peak of the Poisson kernel (PSF measure w f)."""
    dnds = _mp_dnds(A, ns, bs)
    bs_mp = [mp.mpf(b) for b in bs]
    xs = []
    for m in ms:
        tot = 0
        for fi, wi in zip(f, w):
            fi = mp.mpf(fi)
            g = lambda S: dnds(S) * mp.exp(  # noqa: E731
                m * mp.log(fi * S) - fi * S - mp.loggamma(m + 1)
            )
            pts = sorted({mp.mpf(0), *bs_mp, m / fi}, key=float)
            tot += wi * fi * mp.quad(g, [*pts, mp.inf])
        xs.append(tot)
    tot = 0
    for fi, wi in zip(f, w):
        fi = mp.mpf(fi)
        g = lambda S: dnds(S) * (-mp.expm1(-fi * S)) if S > 0 else mp.mpf(0)  # noqa: E731
        pts = sorted({mp.mpf(0), *bs_mp, 1 / fi}, key=float)
        tot += wi * fi * mp.quad(g, [*pts, mp.inf])
    return np.array([float(x) for x in xs]), float(tot)


def _ref_gammainc(A, ns, bs, f, w, ms):
    """x_m from the per-segment closed form with mpmath's arbitrary-precision incomplete
    gamma function (any real order): a second, independent implementation for the
    near-singular edge cases where quadrature over S does not converge (n -> 2)."""
    ns = [mp.mpf(x) for x in ns]
    bs = [mp.mpf(x) for x in bs]
    lower, upper, piv = bs + [mp.mpf(0)], [mp.inf] + bs, [bs[0]] + bs
    logv = [mp.mpf(0), mp.mpf(0)]
    for j in range(1, len(bs)):
        logv.append(logv[-1] - ns[j] * (mp.log(bs[j]) - mp.log(bs[j - 1])))
    out = []
    for m in ms:
        tot = 0
        for fi, wi in zip(f, w):
            c = mp.mpf(fi)
            for j in range(len(ns)):
                I = mp.gammainc(m + 1 - ns[j], c * lower[j], c * upper[j])
                tot += wi * c * mp.e ** logv[j] * piv[j] * (c * piv[j]) ** (ns[j] - 1) * I
        out.append(float(A * tot / mp.factorial(m)))
    return np.array(out)


def _check(A, ns, bs, f, w, rtol=1e-10, quad=True):
    x, xt = generating_terms(A, ns, bs, f, w, M)
    got = np.asarray(x)[np.array(M_CHECK) - 1]
    if quad:
        rx, rt = _ref(A, ns, bs, f, w, M_CHECK)
        assert float(xt) == pytest.approx(rt, rel=rtol)
    else:
        rx = _ref_gammainc(A, ns, bs, f, w, M_CHECK)
    ok = rx > 1e-280
    np.testing.assert_allclose(got[ok], rx[ok], rtol=rtol)


EDGE_CASES = [
    # (indices, breaks, f, quadrature converges)   one break
    ([3.0, 1.5], [10.0], [1.0, 0.3], True),  # integer n1
    ([2.001, 1.999], [1000.0], [1.0, 1e-5], False),  # n1 -> 2+, last -> 2-, f S_b = 0.01
    ([10.0, 1.0], [0.1], [0.1, 1.0], False),  # steep, last index exactly 1, faint
    ([5.5, 0.5], [30.0], [1.0, 0.5], True),
    ([2.05, -3.0], [2.0], [1.0, 0.2], True),
    ([30.0, 1.2], [0.5], [1.0, 0.02], False),  # n1 = 30 (NPTFit example prior edge)
]
EDGE_CASES_2 = [
    ([5.5, 0.5, -3.0], [20.0, 5.0], [0.01, 1.0]),
    ([3.0, 1.0, -1.0], [100.0, 0.1], [1.0, 0.4]),
    ([2.05, 1.999, 1.5], [300.0, 10.0], [1.0, 0.05]),
]


@pytest.mark.parametrize("ns,bs,f,quad", EDGE_CASES)
def test_one_break_vs_quadrature(ns, bs, f, quad):
    _check(1.7, ns, bs, f, [0.6, 1.3], quad=quad)


@pytest.mark.parametrize("ns,bs,f", EDGE_CASES_2)
def test_two_breaks_vs_quadrature(ns, bs, f):
    _check(0.9, ns, bs, f, [1.0, 0.5])


@pytest.mark.slow
def test_three_breaks_vs_quadrature():
    _check(2.0, [2.05, 1.2, 3.0, -1.0], [500.0, 30.0, 2.0], [1.0, 0.3], [1.0, 0.25])


@settings(max_examples=6, deadline=None)
@given(
    n1=st.floats(2.01, 10.0),
    n2=st.floats(-3.0, 1.99),
    sb=st.floats(-1.0, 3.0, allow_subnormal=False),
    f=st.floats(-2.0, 0.0, allow_subnormal=False),
)
def test_random_one_break_vs_quadrature(n1, n2, sb, f):
    _check(1.0, [n1, n2], [10**sb], [10**f, 1.0], [0.7, 0.3], quad=False)


# steep rising segments (index < 0): x_total's Gamma(1 - n) above Y_SPLIT by P (hi <= 1 - n),
# by Q (lo > 1 - n) and by both (lo <= 1 - n < hi); Q climbs up to 20 orders below m = 1
STEEP_CASES = [
    ([3.0, -8.0], [6.0], [1.0, 0.6]),
    ([3.0, -8.0, 1.5], [40.0, 20.0], [1.0, 0.3]),
    ([4.0, 0.5, -20.0], [30.0, 25.0], [1.0, 0.5]),
]


@pytest.mark.parametrize("ns,bs,f", STEEP_CASES)
def test_steep_negative_index_vs_quadrature(ns, bs, f):
    _check(1.1, ns, bs, f, [0.9, 0.4])


def test_index_bounds_give_the_same_terms():
    """Concrete indices (bounds read from the values), traced indices with the default
    bounds, and traced indices with tight static bounds: one answer."""
    ns, bs, f, w = [4.0, 0.5, -20.0], [30.0, 25.0], [1.0, 0.5], [0.9, 0.4]
    x0, t0 = generating_terms(1.1, ns, bs, f, w, M)
    for bounds in [{}, {"max_index": 5.0, "min_index": -20.0}]:
        fn = jax.jit(lambda n: generating_terms(1.1, n, bs, f, w, M, **bounds))  # noqa: B023
        x1, t1 = fn(jnp.array(ns))
        np.testing.assert_allclose(np.asarray(x1), np.asarray(x0), rtol=1e-13)
        assert float(t1) == pytest.approx(float(t0), rel=1e-13)


def test_index_bound_errors():
    with pytest.raises(ValueError, match="min_index"):
        generating_terms(1.0, [3.0, -12.0], [5.0], [1.0], [1.0], M, min_index=-10.0)
    with pytest.raises(ValueError, match="max_index"):
        generating_terms(1.0, [13.0, 1.0], [5.0], [1.0], [1.0], M, max_index=10.0)
    fn = jax.jit(lambda n: generating_terms(1.0, n, [5.0], [1.0], [1.0], M, min_index=-10.0)[1])
    assert np.isfinite(float(fn(jnp.array([3.0, -9.5]))))
    with pytest.raises(Exception, match="min_index"):
        fn(jnp.array([3.0, -10.5])).block_until_ready()


def test_sum_of_xm_is_total_for_faint_sources():
    # n1 = 8: the tail m > M is below 1e-13 of the total
    x, xt = generating_terms(3.0, [8.0, 1.5], [2.0], [1.0, 0.5], [0.5, 0.5], M)
    assert float(jnp.sum(x)) == pytest.approx(float(xt), rel=1e-12)


def test_irrelevant_break_matches_one_break():
    x1, t1 = generating_terms(1.3, [3.5, 1.2], [15.0], [1.0, 0.4], [1.0, 0.2], M)
    # extra break at 4 with equal indices on both sides: same SCF
    x2, t2 = generating_terms(1.3, [3.5, 1.2, 1.2], [15.0, 4.0], [1.0, 0.4], [1.0, 0.2], M)
    np.testing.assert_allclose(np.asarray(x2), np.asarray(x1), rtol=1e-12)
    assert float(t2) == pytest.approx(float(t1), rel=1e-12)
    # and an upper break above which the index is unchanged (A is defined at S_b1, so it
    # carries the factor (15/40)^3.5)
    A3 = 1.3 * (15.0 / 40.0) ** 3.5
    x3, _ = generating_terms(A3, [3.5, 3.5, 1.2], [40.0, 15.0], [1.0, 0.4], [1.0, 0.2], M)
    np.testing.assert_allclose(np.asarray(x3), np.asarray(x1), rtol=1e-12)


def test_rescaled_matches_ratio():
    scf = BrokenPowerLaw(2.0, [4.0, 0.8, -1.0], [25.0, 6.0])
    f, w = [1.0, 0.3], [0.8, 0.6]
    xa, ta = scf.generating_terms(f, w, M, ratio=1.7)
    xb, tb = scf.rescaled(1.7).generating_terms(f, w, M)
    np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), rtol=1e-12)
    assert float(ta) == pytest.approx(float(tb), rel=1e-12)
    # delta PSF == PSF table with f = 1 split in two halves of weight
    xc, tc = scf.generating_terms([1.0, 1.0], [0.5, 0.5], M)
    xd, td = scf.generating_terms([1.0, 1e-3], [1.0, 0.0], M)
    np.testing.assert_allclose(np.asarray(xc), np.asarray(xd), rtol=1e-13)
    # the rescaled SCF has the same number of sources and ratio x the counts
    assert float(scf.rescaled(1.7).mean_counts()) == pytest.approx(1.7 * float(scf.mean_counts()))
    assert float(scf.rescaled(1.7).number_of_sources(1.7 * 3.0)) == pytest.approx(
        float(scf.number_of_sources(3.0))
    )


def test_moments_vs_quadrature():
    ns, bs = [5.5, 1.3, -2.0], [20.0, 4.0]
    scf = BrokenPowerLaw(1.5, ns, bs)
    dnds = _mp_dnds(1.5, ns, bs)
    pts = [-mp.inf, mp.log(4), mp.log(20), mp.inf]
    mean = mp.quad(lambda u: dnds(mp.e**u) * mp.e ** (2 * u), pts)
    assert float(scf.mean_counts()) == pytest.approx(float(mean), rel=1e-12)
    nsrc = mp.quad(lambda u: dnds(mp.e**u) * mp.e**u, [mp.log(0.5), mp.log(4), mp.log(20), mp.inf])
    assert float(scf.number_of_sources(0.5)) == pytest.approx(float(nsrc), rel=1e-12)
    assert np.isinf(float(BrokenPowerLaw(1.0, [3.0, 1.0], [5.0]).number_of_sources()))
    assert np.isfinite(float(scf.number_of_sources()))
    # amplitude for a target mean
    A = scf.amplitude_for_mean_counts(0.37)
    assert float(scf.with_mean_counts(0.37).mean_counts()) == pytest.approx(0.37, rel=1e-13)
    assert float(A) == pytest.approx(0.37 / float(mean) * 1.5, rel=1e-12)
    # dN/dS continuous at the breaks, and the stated values
    eps = 1e-9
    for b in bs:
        lo, hi = scf.dnds(jnp.array([b * (1 - eps), b * (1 + eps)]))
        assert float(lo) == pytest.approx(float(hi), rel=1e-6)
    assert float(scf.dnds(40.0)) == pytest.approx(1.5 * 2.0**-5.5)
    assert float(scf.dnds(1.0)) == pytest.approx(1.5 * (4 / 20) ** -1.3 * (1 / 4) ** 2.0)


def test_validation_errors():
    with pytest.raises(ValueError, match="n1 > 2"):
        BrokenPowerLaw(1.0, [2.0, 1.0], [5.0])
    with pytest.raises(ValueError, match="last"):
        BrokenPowerLaw(1.0, [3.0, 2.0], [5.0])
    with pytest.raises(ValueError, match="decreasing"):
        BrokenPowerLaw(1.0, [3.0, 1.0, 0.0], [5.0, 6.0])
    with pytest.raises(ValueError, match="positive"):
        BrokenPowerLaw(1.0, [3.0, 1.0], [-5.0])
    with pytest.raises(ValueError, match="A >= 0"):
        BrokenPowerLaw(-1.0, [3.0, 1.0], [5.0])
    with pytest.raises(ValueError, match="len\\(indices\\)"):
        BrokenPowerLaw(1.0, [3.0, 1.0, 0.5], [5.0])
    with pytest.raises(ValueError, match="at least one break"):
        BrokenPowerLaw(1.0, [3.0], [])
    with pytest.raises(ValueError, match="f must be positive"):
        generating_terms(1.0, [3.0, 1.0], [5.0], [0.0, 1.0], [1.0, 1.0], M)
    with pytest.raises(ValueError, match="ratio"):
        generating_terms(1.0, [3.0, 1.0], [5.0], [0.5, 1.0], [1.0, 1.0], M, ratio=-1.0)
    scf = BrokenPowerLaw(1.0, [3.0, 1.0], [5.0])
    with pytest.raises(ValueError, match="exposure ratio must be positive"):
        population_terms([scf], [1.0], [1.0], M, [1.0, 0.0])
    # wrong types: the annotations' checker (tests run with it) or the function's own check
    with pytest.raises((TypeError, ValueError)):
        population_terms([scf], [1.0], [1.0], M, np.ones((2, 1)))
    with pytest.raises((TypeError, ValueError)):
        population_terms([scf, (1.0, [3.0, 1.0], [5.0])], [1.0], [1.0], M)
    with pytest.raises(ValueError, match="at least one"):
        population_terms([], [1.0], [1.0], M)


def test_invalid_under_jit_errors():
    fn = jax.jit(lambda n1: generating_terms(1.0, jnp.stack([n1, 1.0]), [5.0], [1.0, 0.5],
                                             [1.0, 1.0], M)[1])
    assert np.isfinite(float(fn(3.0)))
    with pytest.raises(Exception, match="n1 > 2"):
        fn(1.5).block_until_ready()


GRAD_CASES = [([3.0, 1.5], [10.0]), ([6.3, 1.0], [3.0]), ([2.2, -1.5], [40.0])]


@pytest.mark.parametrize(
    "cases", [GRAD_CASES[:1], pytest.param(GRAD_CASES[1:], marks=pytest.mark.slow)]
)
def test_grads(cases):
    """Gradients vs finite differences, incl. integer indices (n1 = 3, last index 1) where
    the small-order block switches."""
    f = jnp.array([1.0, 0.3])
    w = jnp.array([0.7, 0.4])

    def fn(A, ns, bs, r):
        x, xt = generating_terms(A, ns, bs, f, w, M, r)
        return jnp.sum(jnp.log(x[:40])) + xt

    fn = jax.jit(fn)
    for ns, bs in cases:
        check_grads(fn, (1.2, jnp.array(ns), jnp.array(bs), 1.3), order=1,
                    modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(1,), (7,), (3, 5), (4, 1, 6)]),
       reverse=st.booleans())
def test_kernel_helpers_exact(seed, shape, reverse):
    """The SCF kernel's layout helpers against numpy: `_computed_once` returns its input
    bit for bit (values over 600 orders of magnitude, both signs) and 0 for a non-finite
    entry without touching the others, `_cumsum_rows` equals
    np.cumsum (forward and reverse) to rounding, for row counts that are and are not
    multiples of its block."""
    from skymodel._special import _computed_once
    from skymodel.scf import _cumsum_rows

    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], size=shape) * 10.0 ** rng.uniform(-300, 300, size=shape)
    assert np.array_equal(np.asarray(jax.jit(_computed_once)(jnp.asarray(x))), x)
    # a non-finite entry becomes 0 and does not spread to its neighbours
    bad = x.copy()
    bad.flat[int(rng.integers(bad.size))] = rng.choice([np.inf, -np.inf, np.nan])
    got = np.asarray(jax.jit(_computed_once)(jnp.asarray(bad)))
    np.testing.assert_array_equal(got, np.where(np.isfinite(bad), bad, 0.0))
    rows = int(rng.integers(1, 40))
    y = rng.uniform(0.0, 1.0, size=(rows,) + shape)
    ref = np.cumsum(y[::-1], axis=0)[::-1] if reverse else np.cumsum(y, axis=0)
    got = np.asarray(jax.jit(lambda v: _cumsum_rows(v, reverse=reverse))(jnp.asarray(y)))
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_p_series_vs_mpmath(seed):
    """The P-series of the SCF kernel (one exp per block of terms, products between)
    equals the regularised lower incomplete gamma function P(a, y) from mpmath (50
    digits) to 5e-13 relative wherever it is used (y <= a), for a from 1.05 to 115 (the
    orders of a 103-count pixel) and y from 0.03 a to a (P down to ~1e-130). The exp of
    log-densities of size ~100 limits both this and one exp per term to ~1e-13."""
    from skymodel.scf import _p_series, _tail_terms

    rng = np.random.default_rng(seed)
    a = 1.05 + rng.uniform(0.0, 1.0, 24) ** 2 * 114.0
    y = a * 10.0 ** rng.uniform(-1.5, 0.0, 24)
    fn = jax.jit(lambda a, y: _p_series(a, y, jnp.log(y), jnp.ones_like(y, bool), _tail_terms(116.0)))
    got = np.asarray(fn(jnp.asarray(a), jnp.asarray(y)))
    with mp.workdps(50):
        ref = np.array([float(mp.gammainc(mp.mpf(ai), 0, mp.mpf(yi), regularized=True))
                        for ai, yi in zip(a, y)])
    np.testing.assert_allclose(got, ref, rtol=5e-13, atol=0.0)
