"""skymodel._special against mpmath / scipy (independent arbitrary-precision references)."""

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
import scipy.stats
from jax.test_util import check_grads

from skymodel._special import (
    gamma_interval,
    gamma_ppf,
    gamma_upper,
    one_minus_exp_interval,
    power_interval,
)

mp.mp.dps = 40

A_GRID = [-29.5, -8.3, -3.0, -1.0, -1e-6, 0.0, 1e-8, 0.5, 1.0, 2.7, 50.0, 500.0]
Y_GRID = [1e-3, 0.01, 0.1, 1.0, 3.0, 30.0, 300.0, 1000.0]


def _ref_upper(a, y, log_scale):
    return mp.gammainc(a, y) / mp.exp(log_scale)


def test_gamma_upper_grid_vs_mpmath():
    aa, yy = np.meshgrid(A_GRID, Y_GRID, indexing="ij")
    aa, yy = aa.ravel(), yy.ravel()
    # large a: compare Gamma(a, y) / Gamma(a) (Gamma(500) overflows float64)
    ls = np.array([float(mp.loggamma(a)) if a > 100 else 0.0 for a in aa])
    got = np.asarray(jax.jit(gamma_interval)(aa, yy, np.full_like(yy, np.inf), ls))
    n_checked = 0
    for a, y, s, g in zip(aa, yy, ls, got):
        ref = _ref_upper(a, y, s)
        if ref < mp.mpf("1e-280"):  # underflows in float64
            continue
        n_checked += 1
        assert abs(g / float(ref) - 1) < 1e-12, (a, y, g, float(ref))
    assert n_checked > 80
    # unscaled wrapper agrees for moderate a
    np.testing.assert_allclose(
        float(gamma_upper(-3.0, 0.1)), float(mp.gammainc(-3, 0.1)), rtol=1e-13
    )


@pytest.mark.parametrize(
    "lo,hi",
    [(1e-3, 1e-2), (0.5, 2.0), (1.0, 4.0), (2.9, 3.1), (0.01, 100.0), (10.0, 20.0), (0.0, 0.5),
     (0.0, 5.0), (0.0, 1000.0), (0.095, 0.1)],
)
def test_gamma_interval_vs_mpmath(lo, hi):
    for a in A_GRID:
        if lo == 0 and a <= 0:
            continue
        s = float(mp.loggamma(a)) if a > 100 else 0.0
        ref = mp.gammainc(a, lo, hi) / mp.exp(s)
        if ref < mp.mpf("1e-280"):
            continue
        got = float(gamma_interval(a, lo, hi, s))
        assert abs(got / float(ref) - 1) < 1e-12, (a, lo, hi, got, float(ref))


def test_power_interval():
    for b in [-5.0, -1.0, -1e-9, 0.0, 1e-12, 0.3, 2.0]:
        for lo, hi in [(0.1, 0.2), (1.0, 50.0), (0.999, 1.001)]:
            ref = mp.quad(lambda t: t ** (b - 1), [lo, hi])
            got = float(power_interval(b, lo, hi))
            assert abs(got / float(ref) - 1) < 1e-13, (b, lo, hi)
    assert float(power_interval(0.5, 0.0, 4.0)) == pytest.approx(4.0, rel=1e-15)
    assert float(power_interval(-2.0, 2.0, np.inf)) == pytest.approx(0.125, rel=1e-15)
    assert np.isinf(float(power_interval(0.0, 0.0, 1.0)))
    assert float(power_interval(0.5, 0.0, 0.0)) == 0.0  # the empty interval [0, 0]
    assert np.isinf(float(power_interval(0.5, 1.0, np.inf)))


def _ref_one_minus_exp(n, lo, hi):
    # substitute t = e^u (removes the endpoint singularity at 0 for mpmath)
    g = lambda u: mp.exp((1 - n) * u) * (-mp.expm1(-mp.exp(u)))  # noqa: E731
    ulo = -mp.inf if lo == 0 else mp.log(lo)
    uhi = mp.inf if np.isinf(hi) else mp.log(hi)
    tail = mp.mpf(0)
    if uhi == mp.inf:
        # beyond t = 300, 1 - e^-t = 1 to 1e-130: the tail is the analytic integral of
        # t^-n (mpmath's quadrature would otherwise evaluate exp(exp(u)) at huge u)
        cut = max(ulo, mp.log(300))
        tail = mp.exp((1 - n) * cut) / (n - 1)
        uhi = cut
    if ulo == uhi:
        return tail
    pts = sorted({ulo, uhi, *(p for p in (mp.mpf(0), mp.log(3)) if ulo < p < uhi)})
    return mp.quad(g, pts) + tail


@pytest.mark.parametrize("n", [2.001, 3.0, 10.0, 1.999, 1.5, 1.0, 0.5, -1.0, -3.0])
def test_one_minus_exp_interval_vs_mpmath(n):
    for lo, hi in [(0.01, np.inf), (3.0, np.inf), (0.5, 2.0), (0.0, 0.5), (0.0, 5.0),
                   (0.0, 100.0), (1e-3, 2e-3), (5.0, 50.0)]:
        if lo == 0 and n >= 2:
            continue
        if np.isinf(hi) and n <= 1:
            continue
        ref = _ref_one_minus_exp(n, lo, hi)
        got = float(one_minus_exp_interval(n, lo, hi))
        assert abs(got / float(ref) - 1) < 1e-12, (n, lo, hi, got, float(ref))


def test_gamma_interval_grads():
    f = jax.jit(gamma_interval)
    for a, lo, hi in [(-2.5, 0.05, 2.0), (0.3, 0.2, 7.0), (-0.7, 4.0, 9.0), (7.5, 1.0, 6.0),
                      (3.2, 8.0, 20.0)]:
        # eps 1e-6: the default step's truncation error (~eps^2 f''') exceeds rtol where the
        # derivative is large
        check_grads(f, (a, lo, hi), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6, eps=1e-6)
    # integer order and exact zero: gradients finite
    g = jax.grad(lambda a: gamma_interval(a, 0.5, jnp.inf))(0.0)
    assert np.isfinite(float(g))
    ref = mp.diff(lambda a: mp.gammainc(a, 0.5), 0)
    assert float(g) == pytest.approx(float(ref), rel=1e-9)


def test_continued_fraction_partials_vs_mpmath_and_autodiff():
    """The continued fraction's custom JVP (partials carried through the loop) gives the
    derivatives of Gamma(a, y) (mpmath) and of the truncated fraction itself (autodiff of
    the loop written out), and is differentiable again."""
    from skymodel._special import CF_TERMS, _cf_upper

    a = jnp.array([-6.5, -1.0, -0.3, 0.0, 0.45, 1.0])
    y = jnp.array([3.0, 4.2, 7.5, 12.0, 40.0, 3.5])

    def written_out(a, y):
        t = jnp.zeros_like(a)
        for k in range(CF_TERMS, 0, -1):
            t = k * (k - a) / (y + 2.0 * k + 1.0 - a - t)
        return jnp.exp(a * jnp.log(y) - y) / (y + 1.0 - a - t)

    for fn in (lambda a, y: jnp.sum(_cf_upper(a, y)), lambda a, y: jnp.sum(written_out(a, y))):
        ga, gy = jax.grad(fn, argnums=(0, 1))(a, y)
        for i in range(a.shape[0]):
            ai, yi = float(a[i]), float(y[i])
            ref_a = mp.diff(lambda s: mp.gammainc(s, yi), ai)
            assert float(ga[i]) == pytest.approx(float(ref_a), rel=1e-10, abs=1e-300)
            assert float(gy[i]) == pytest.approx(-yi ** (ai - 1) * np.exp(-yi), rel=1e-12)
    check_grads(lambda a, y: _cf_upper(a, y), (a, y), order=2, modes=("fwd", "rev"))
    # y = inf gives Gamma(a, inf) = 0 with zero, finite gradients
    g = jax.grad(lambda a: _cf_upper(a, jnp.inf))(0.5)
    assert float(g) == 0.0


def test_gamma_ppf_vs_scipy():
    u = np.array([1e-8, 0.01, 0.1, 0.37, 0.5, 0.9, 0.999, 1 - 1e-9])
    for alpha in [1 / 3, 0.05, 1.0, 2.5, 30.0]:
        got = np.asarray(jax.jit(gamma_ppf)(u, np.full_like(u, alpha)))
        ref = scipy.stats.gamma.ppf(u, alpha)
        np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert float(gamma_ppf(0.0, 1.0)) == 0.0
    # derivative d x / d u = 1 / pdf(x)
    x = float(gamma_ppf(0.3, 2.0))
    du = float(jax.grad(gamma_ppf)(0.3, 2.0))
    assert du == pytest.approx(1 / scipy.stats.gamma.pdf(x, 2.0), rel=1e-8)


def test_gamma_ppf_domain_errors():
    with pytest.raises(ValueError, match="alpha"):
        gamma_ppf(0.5, -1.0)
    with pytest.raises(ValueError, match="u in"):
        gamma_ppf(1.5, 1.0)
    with pytest.raises(Exception, match="alpha"):
        jax.jit(gamma_ppf)(0.5, -1.0).block_until_ready()
