"""Special functions for the source-count-function integrals (pure JAX, float64).

The NPTF generating terms need integrals of t^(a-1) e^(-t) over an interval, with a any
real number (negative, zero, integer or not), and the interval [lo, hi] with 0 <= lo < hi
<= inf. jax.scipy.special only has the regularised functions for a > 0, so this module adds

- `gamma_interval(a, lo, hi, log_scale)`: the integral of t^(a-1) e^(-t) over [lo, hi]
  divided by exp(log_scale), for any real a (a > 0 when lo = 0, a < ... when hi = inf
  nothing: the exponential makes it finite);
- `gamma_upper(a, y)`: Gamma(a, y), any real a, y > 0;
- `power_interval(b, lo, hi)`: the integral of t^(b-1) over [lo, hi], stable at b -> 0;
- `one_minus_exp_interval(n, lo, hi)`: the integral of t^(-n) (1 - e^(-t)) over [lo, hi];
- `gamma_ppf(u, alpha)`: inverse CDF of the Gamma(alpha, 1) distribution.

Method, for a <= 1 (where the regularised functions do not apply or lose accuracy):
  * t >= Y_SPLIT: Legendre's continued fraction for Gamma(a, y), evaluated backwards with a
    fixed number of terms (valid for all real a <= 1; ~1e-16 at y = Y_SPLIT);
  * t < Y_SPLIT: the series e^-t = sum_k (-t)^k / k! integrated term by term,
    sum_k (-1)^k / k! * integral of t^(a+k-1) over [u, v], each term computed stably with
    expm1 (no poles at a + k = 0, no cancellation between the ends).
For a > 1 the regularised jax.scipy.special.gammainc / gammaincc are used (differences of
P when hi < a, of Q otherwise), times exp(lgamma(a) - log_scale).
Every branch selection uses the double-where trick, so gradients (w.r.t. a, lo, hi) are
free of NaN. All loops have fixed trip counts (reverse-mode differentiable).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammainc, gammaincc, gammaln

from skymodel._tracing import is_traced
from skymodel._types import Array, ArrayLike, Float

#: split point between the power series (t < Y_SPLIT) and the continued fraction
Y_SPLIT = 3.0
#: terms of the continued fraction (relative error ~1e-16 at y = Y_SPLIT, a <= 1)
CF_TERMS = 36
#: terms of the power series on [0, Y_SPLIT] (Y_SPLIT^k / k! < 1e-20 at the last one)
SERIES_TERMS = 34
#: a <= A_CUT uses the series / continued fraction; a > A_CUT the regularised functions
A_CUT = 1.0


def _log_factorial(m) -> np.ndarray:
    """log m! of a static integer array (float64 numpy constant)."""
    return np.vectorize(lambda v: math.lgamma(v + 1.0))(np.asarray(m, dtype=np.float64))


def _h(ab, L):
    """(1 - e^(-ab L)) / ab for ab >= 0, L >= 0 (-> L at ab = 0), smooth in ab.

    Callers pass ab = +b or -b with the sign fixed by their branch (not jnp.abs, whose
    derivative at 0 would not match the branch taken there). Taylor series in x = ab L for
    x < 0.1 (no cancellation in value or gradient).
    """
    x = ab * L
    small = x < 0.1
    # series branch: L * sum_j (-x)^j / (j+1)!
    xs = jnp.where(small, x, 0.0)
    poly = jnp.zeros_like(xs)
    for j in range(12, -1, -1):
        poly = poly * (-xs) + 1.0 / math.factorial(j + 1)
    ser = L * poly
    abs_safe = jnp.where(small, 1.0, ab)
    xl = jnp.where(small, 1.0, x)
    big = -jnp.expm1(-xl) / abs_safe
    return jnp.where(small, ser, big)


def _power_interval(b, lo, hi, logs=None):
    """Integral of t^(b-1) over [lo, hi], 0 <= lo <= hi <= inf (broadcasting).

    lo = 0 needs b > 0, hi = inf needs b < 0 (otherwise +inf is returned).
    logs: optional (log lo, log hi), any finite value where lo = 0 or hi = inf, computed
    by the caller once for many b.
    """
    b, lo, hi = jnp.broadcast_arrays(b, lo, hi)
    lo_zero = lo <= 0.0
    hi_inf = jnp.isinf(hi)
    pos = b > 0
    # divergent cases
    diverge = (lo_zero & ~pos) | (hi_inf & (b >= 0))
    # the endpoint whose power is the larger term: hi when b > 0, lo when b < 0
    base = jnp.where(pos, hi, lo)
    base_ok = jnp.where(diverge | (base <= 0) | jnp.isinf(base), 1.0, base)
    special = lo_zero | hi_inf
    if logs is None:
        logs = [jnp.log(jnp.where((e > 0.0) & ~jnp.isinf(e), e, 1.0)) for e in (lo, hi)]
    log_lo, log_hi = logs
    L = jnp.where(special | diverge, 1.0, log_hi - log_lo)
    log_base = jnp.where(base_ok == 1.0, 0.0, jnp.where(pos, log_hi, log_lo))
    b_ok = jnp.where(diverge, 1.0, b)
    power = jnp.exp(b_ok * log_base)  # base^b
    generic = power * _h(jnp.where(pos, b_ok, -b_ok), L)
    # lo = 0 (b > 0): hi^b / b ; hi = inf (b < 0): lo^b / (-b)
    b_sp = jnp.where(diverge | ~special, 1.0, jnp.abs(b))
    b_sp = jnp.where(b_sp == 0, 1.0, b_sp)
    closed = power / b_sp
    out = jnp.where(special, closed, generic)
    out = jnp.where(lo_zero & (hi <= 0.0), 0.0, out)  # the empty interval [0, 0]
    return jnp.where(diverge, jnp.inf, out)


def _computed_once(x):
    """x: (..., n) as a matrix product with the identity: unchanged where finite (exactly),
    0 where not (inf * 0 would spread a non-finite entry along the last axis; callers
    mask those entries, the arguments of lgamma they come from being placeholders).

    XLA:CPU fuses the cheap tail of an elementwise function (lgamma's, ~15 operations)
    into every consumer that broadcasts its result, recomputing it for each element of the
    broadcast; a dot is never fused into its consumers, so x is computed once per element
    of its own shape. (`lax.optimization_barrier` does not prevent that fusion on CPU.)
    """
    if x.ndim == 0:
        return x
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    finite = jnp.where(jnp.isfinite(x), x, 0.0)
    return jnp.dot(finite.reshape(-1, x.shape[-1]), eye).reshape(x.shape)


def _series_interval(a, u, v, k0: int):
    """sum_{k >= k0} (-1)^k / k! * integral of t^(a+k-1) over [u, v], 0 <= u <= v <= Y_SPLIT."""
    k = np.arange(k0, SERIES_TERMS)
    sign = np.where(k % 2 == 0, 1.0, -1.0)
    inv_fact = np.exp(-_log_factorial(k))
    # the logs of the endpoints once per interval, not once per term (XLA would
    # recompute them in the per-term kernel)
    logs = [_computed_once(jnp.log(jnp.where(e > 0.0, e, 1.0)))[..., None] for e in (u, v)]
    terms = _power_interval(a[..., None] + k, u[..., None], v[..., None], logs)
    # empty intervals give 0 exactly; sum from the small terms up
    return jnp.sum((sign * inv_fact * terms)[..., ::-1], axis=-1)


def _cf_loop(a, y, with_partials: bool):
    """Legendre's continued fraction for Gamma(a, y), y finite, CF_TERMS terms evaluated
    backwards; with `with_partials` also d/da and d/dy of the same truncated fraction,
    carried through the loop (forward mode)."""
    a, y = jnp.broadcast_arrays(jnp.asarray(a, jnp.float64), jnp.asarray(y, jnp.float64))

    def term(i, carry):  # k = CF_TERMS - i, from the tail of the fraction inwards
        t = carry[0]
        k = (CF_TERMS - i).astype(jnp.float64)
        inv_d = 1.0 / (y + (2.0 * k + 1.0) - a - t)
        q = k * (k - a) * inv_d
        if not with_partials:
            return (q,)
        _, t_a, t_y = carry
        return q, (q * (1.0 + t_a) - k) * inv_d, -q * (1.0 - t_y) * inv_d

    # a loop, not unrolled: the unrolled fraction dominated compile time
    init = (jnp.zeros_like(a),) * (3 if with_partials else 1)
    out = jax.lax.fori_loop(0, CF_TERMS, term, init)
    t = out[0]
    inv_b = 1.0 / (y + 1.0 - a - t)
    logy = jnp.log(y)
    val = jnp.exp(a * logy - y) * inv_b
    if not with_partials:
        return val, None, None
    _, t_a, t_y = out
    return val, val * (logy + (1.0 + t_a) * inv_b), val * (a / y - 1.0 - (1.0 - t_y) * inv_b)


@jax.custom_jvp
def _cf_finite(a, y):
    return _cf_loop(a, y, False)[0]


@_cf_finite.defjvp
def _cf_finite_jvp(primals, tangents):
    # The derivative of the loop is carried forward in the same loop: reverse mode then
    # keeps two arrays instead of every iteration's state (which cost more than the
    # fraction itself in a value+gradient).
    a, y = primals
    da, dy = tangents
    val, d_a, d_y = _cf_loop(a, y, True)
    return val, d_a * da + d_y * dy


def _cf_upper(a, y):
    """Gamma(a, y) for y >= Y_SPLIT (y = inf gives 0) and a <= A_CUT: Legendre continued
    fraction, CF_TERMS terms, evaluated backwards."""
    y_inf = jnp.isinf(y)
    ys = jnp.where(y_inf, Y_SPLIT, y)
    return jnp.where(y_inf, 0.0, _cf_finite(*jnp.broadcast_arrays(a, ys)))


def _cf_upper_many(*pairs):
    """`_cf_upper` of several (a, y) pairs (each broadcast) in one loop: a list of results."""
    shapes = [jnp.broadcast_shapes(jnp.shape(a), jnp.shape(y)) for a, y in pairs]
    a = jnp.concatenate([jnp.broadcast_to(a, s).ravel() for (a, _), s in zip(pairs, shapes)])
    y = jnp.concatenate([jnp.broadcast_to(y, s).ravel() for (_, y), s in zip(pairs, shapes)])
    out = _cf_upper(a, y)
    ends = np.cumsum([math.prod(s) for s in shapes])[:-1]
    return [part.reshape(s) for part, s in zip(jnp.split(out, ends), shapes)]


def _interval_small_a(a, lo, hi):
    """Integral of t^(a-1) e^(-t) over [lo, hi] for a <= A_CUT (lo > 0 unless a > 0)."""
    u = jnp.minimum(lo, Y_SPLIT)
    v = jnp.minimum(hi, Y_SPLIT)
    series = _series_interval(a, u, v, 0)
    lo2 = jnp.maximum(lo, Y_SPLIT)
    hi2 = jnp.maximum(hi, Y_SPLIT)
    upper = _cf_upper(a, lo2) - _cf_upper(a, hi2)
    return series + upper


def _interval_large_a(a, lo, hi, log_scale):
    """exp(-log_scale) * integral of t^(a-1) e^(-t) over [lo, hi] for a > A_CUT, by
    regularised incomplete gamma functions (P-differences below the mode, Q above)."""
    lo_zero = lo <= 0.0
    hi_inf = jnp.isinf(hi)
    lo_s = jnp.where(lo_zero, 1.0, lo)
    hi_s = jnp.where(hi_inf, 1.0, hi)
    use_p = (~hi_inf) & (hi < a)
    # one call each for P and Q at both ends (halves compile time)
    a2 = jnp.stack([a, a])
    y2 = jnp.stack([lo_s, hi_s])
    p2 = gammainc(a2, y2)
    q2 = gammaincc(a2, y2)
    # P branch: P(a, hi) - P(a, lo);  Q branch: Q(a, lo) - Q(a, hi)
    p_hi = p2[1]
    p_lo = jnp.where(lo_zero, 0.0, p2[0])
    q_lo = jnp.where(lo_zero, 1.0, q2[0])
    q_hi = jnp.where(hi_inf, 0.0, q2[1])
    diff = jnp.where(use_p, p_hi - p_lo, q_lo - q_hi)
    return jnp.exp(gammaln(a) - log_scale) * diff


def _gamma_interval(a, lo, hi, log_scale):
    a, lo, hi, log_scale = jnp.broadcast_arrays(a, lo, hi, log_scale)
    small = a <= A_CUT
    a_small = jnp.where(small, a, A_CUT)
    a_large = jnp.where(small, A_CUT + 1.0, a)
    # small-a branch is only valid with lo > 0 or a > 0
    lo_small = jnp.where(small, lo, 1.0)
    hi_small = jnp.where(small, hi, 2.0)
    val_small = _interval_small_a(a_small, lo_small, hi_small) * jnp.exp(-log_scale)
    val_large = _interval_large_a(a_large, lo, hi, log_scale)
    return jnp.where(small, val_small, val_large)


def gamma_interval(
    a: Float[ArrayLike, "*shape"],
    lo: Float[ArrayLike, "*shape"],
    hi: Float[ArrayLike, "*shape"],
    log_scale: Float[ArrayLike, "*shape"] | float = 0.0,
) -> Float[Array, "*shape"]:
    """exp(-log_scale) * integral_lo^hi t^(a-1) e^(-t) dt, broadcasting, any real a.

    0 <= lo <= hi <= inf; lo = 0 needs a > 0. `log_scale` (e.g. lgamma(m + 1)) keeps the
    result in range when a is large. Differentiable in a, lo, hi.
    """
    a = jnp.asarray(a, dtype=jnp.float64)
    lo = jnp.asarray(lo, dtype=jnp.float64)
    hi = jnp.asarray(hi, dtype=jnp.float64)
    log_scale = jnp.asarray(log_scale, dtype=jnp.float64)
    return _gamma_interval(a, lo, hi, log_scale)


def gamma_upper(
    a: Float[ArrayLike, "*shape"], y: Float[ArrayLike, "*shape"]
) -> Float[Array, "*shape"]:
    """Upper incomplete gamma function Gamma(a, y) (not regularised), any real a, y > 0."""
    y = jnp.asarray(y, dtype=jnp.float64)
    return gamma_interval(a, y, jnp.full_like(y, jnp.inf))


def power_interval(
    b: Float[ArrayLike, "*shape"],
    lo: Float[ArrayLike, "*shape"],
    hi: Float[ArrayLike, "*shape"],
) -> Float[Array, "*shape"]:
    """integral_lo^hi t^(b-1) dt = (hi^b - lo^b)/b, stable at b -> 0 (-> log(hi/lo)).

    0 <= lo <= hi <= inf; divergent cases (lo = 0 with b <= 0, hi = inf with b >= 0)
    give +inf.
    """
    return _power_interval(
        jnp.asarray(b, dtype=jnp.float64),
        jnp.asarray(lo, dtype=jnp.float64),
        jnp.asarray(hi, dtype=jnp.float64),
    )


def _one_minus_exp_interval(n, lo, hi):
    n, lo, hi = jnp.broadcast_arrays(n, lo, hi)
    a = 1.0 - n
    # [u, v] inside [0, Y_SPLIT]: sum_{k>=1} (-1)^(k+1)/k! * int t^(a+k-1)
    u = jnp.minimum(lo, Y_SPLIT)
    v = jnp.minimum(hi, Y_SPLIT)
    series = -_series_interval(a, u, v, 1)
    # [lo2, hi2] above Y_SPLIT: int t^(a-1) - int t^(a-1) e^-t
    lo2 = jnp.maximum(lo, Y_SPLIT)
    hi2 = jnp.maximum(hi, Y_SPLIT)
    empty = hi2 <= lo2
    hi2s = jnp.where(empty, lo2 + 1.0, hi2)
    a_s = jnp.where(empty & (a >= 0), -1.0, a)
    upper = _power_interval(a_s, lo2, hi2s) - _gamma_interval(a_s, lo2, hi2s, jnp.zeros_like(a))
    return series + jnp.where(empty, 0.0, upper)


def one_minus_exp_interval(
    n: Float[ArrayLike, "*shape"],
    lo: Float[ArrayLike, "*shape"],
    hi: Float[ArrayLike, "*shape"],
) -> Float[Array, "*shape"]:
    """integral_lo^hi t^(-n) (1 - e^(-t)) dt, 0 <= lo <= hi <= inf (lo = 0 needs n < 2,
    hi = inf needs n > 1). Finite where the number of sources diverges."""
    return _one_minus_exp_interval(
        jnp.asarray(n, dtype=jnp.float64),
        jnp.asarray(lo, dtype=jnp.float64),
        jnp.asarray(hi, dtype=jnp.float64),
    )


# ----------------------------------------------------------------------------------------
# Gamma distribution inverse CDF


_PPF_BISECT = 90
_PPF_NEWTON = 4


def _gamma_ppf(u, alpha):
    lgam = gammaln(alpha)
    # bracket in t = log x
    t_lo = jnp.full_like(u, -700.0)
    t_hi = jnp.log(2.0 * alpha + 100.0)

    def bisect(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        below = gammainc(alpha, jnp.exp(mid)) < u
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    t_lo, t_hi = jax.lax.fori_loop(0, _PPF_BISECT, bisect, (t_lo, t_hi))
    t = jax.lax.stop_gradient(0.5 * (t_lo + t_hi))

    # Newton in log x (restores the gradient dx/du, dx/dalpha through the last steps)
    def newton(_, t):
        x = jnp.exp(t)
        xpdf = jnp.exp(alpha * t - x - lgam)  # x * density
        # P(a, x) - u, as (1 - u) - Q(a, x) in the upper half (1 - u is exact there, so the
        # residual keeps full relative precision as u -> 1)
        resid = jnp.where(u > 0.5, (1.0 - u) - gammaincc(alpha, x), gammainc(alpha, x) - u)
        step = resid / jnp.where(xpdf > 0, xpdf, 1.0)
        step = jnp.where(xpdf > 0, step, 0.0)
        return t - jnp.clip(step, -1.0, 1.0)

    t = jax.lax.fori_loop(0, _PPF_NEWTON, newton, t)
    x = jnp.exp(t)
    x = jnp.where(u <= 0.0, 0.0, x)
    return jnp.where(u >= 1.0, jnp.inf, x)


def gamma_ppf(
    u: Float[ArrayLike, "*shape"], alpha: Float[ArrayLike, "*shape"]
) -> Float[Array, "*shape"]:
    """Inverse CDF of the Gamma(alpha, rate 1) distribution at u in [0, 1] (broadcasting).

    Bisection in log x (fixed 90 steps) then 4 Newton steps; jit-able. u = 0 -> 0,
    u = 1 -> inf. Raises ValueError (concrete) / errors under jit for alpha <= 0 or u
    outside [0, 1].
    """
    import equinox as eqx

    u = jnp.asarray(u, dtype=jnp.float64)
    alpha = jnp.asarray(alpha, dtype=jnp.float64)
    u, alpha = jnp.broadcast_arrays(u, alpha)
    if not is_traced(u, alpha):
        if np.any(np.asarray(alpha) <= 0) or np.any(~np.isfinite(np.asarray(alpha))):
            raise ValueError(f"gamma_ppf needs alpha > 0, got {np.asarray(alpha)}")
        if np.any((np.asarray(u) < 0) | (np.asarray(u) > 1)) or np.any(np.isnan(np.asarray(u))):
            raise ValueError(f"gamma_ppf needs u in [0, 1], got {np.asarray(u)}")
    u = eqx.error_if(u, (u < 0) | (u > 1) | jnp.isnan(u), "gamma_ppf needs u in [0, 1]")
    alpha = eqx.error_if(alpha, ~(alpha > 0), "gamma_ppf needs alpha > 0")
    return _gamma_ppf(u, alpha)


__all__ = [
    "gamma_interval",
    "gamma_ppf",
    "gamma_upper",
    "one_minus_exp_interval",
    "power_interval",
]
