"""Poisson and non-Poissonian template-fitting (NPTF) log-likelihoods.

Everything here is float64 (the recursion needs it) and pure: the functions take arrays and
source-count functions and return per-pixel log-likelihoods, so a model sums them.

Per pixel the count distribution has generating function

    P(z) = sum_k p_k z^k = exp( mu (z - 1) + sum_{m>=1} x_m (z^m - 1) ),

with mu the Poisson mean and x_m >= 0 the point-source terms (see SCIENCE.md). With
x'_1 = mu + x_1 and x'_j = x_j (j >= 2),

    p_0 = exp(-mu - sum_m x_m),     p_k = (1/k) sum_{j=1}^{k} j x'_j p_{k-j}.

Numerics:
- *Scaled recursion.* The recursion is linear in p, so the history is kept relative to a
  running scale (normally the newest value, r_j = p_{k-j} / p_k) and its log scale is
  accumulated; nothing overflows and all terms are positive. A rescale never pushes a
  history entry that still has a non-zero weight in a later step (x_l > 0 for some lag
  l it will be used at) above `_RATIO_CAP` (1e250): the scale is then raised above the
  newest value instead, so the newest is stored below 1. Entries with no future weight
  are clamped at the cap (they can no longer change any p_k). The values are therefore
  exact to rounding unless the entries that still matter span more than ~1e550 (e.g.
  x_1 < 1e-550 beside x_2 = 1), where the newest value underflows.
- *Work proportional to sum_p k_p^2, k_max sequential steps.* A `CountPlan` (built once,
  outside jit, from the observed counts) sorts pixels by count into a few static groups,
  K_1 < ... < K_G, laid out one after another. The recursion runs in phases: phase g
  takes steps K_{g-1}+1..K_g for the pixels of groups g..G (history of K_g + 1 rows),
  after which group g is finished and leaves. Phase g computes the weights of the orders
  it adds, K_{g-1}+1..K_g, for all its pixels at once (one matrix product in
  `nptf_loglike`) and keeps the earlier orders' from the phase before. Sequential steps:
  k_max in all; a pixel costs about k_p^2 history updates.
- *Cheap exact gradient* (`jax.custom_vjp`): d log p_k / d x_m = p_{k-m}/p_k (m <= k, from
  the recursion) and -1 through p_0; d log p_k / d mu = p_{k-1}/p_k - 1. The forward pass
  ends holding exactly these ratios, so the backward pass is O(n_pix k) and stores no scan
  residuals.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from skymodel._tracing import is_traced
from skymodel._types import Array, ArrayLike, Float, Int, Real

_RATIO_CAP = 1e250
_HI = 1e100
_LO = 1e-100
# Cost model for choosing the count groups (phases of the recursion): one update per pixel,
# history entry and step, plus _PHASE_OVERHEAD updates per phase (its start-up and, mostly,
# its share of the compile time).
_PHASE_OVERHEAD = 100_000.0
_MAX_GROUPS = 6


# --------------------------------------------------------------------------------------
# validation helpers


def _check(x, bad, msg: str):
    """Raise ValueError(msg) now if `bad` is concrete and true anywhere; under jit attach an
    `eqx.error_if` to `x` instead. Returns x."""
    return _validate(x, [(bad, msg)])


def _validate(x, conditions):
    """Several checks at once: conditions = [(bad, msg), ...]. Concrete: raise ValueError
    with the first failing message. Traced: one `eqx.branched_error_if` attached to x
    (one runtime check instead of many)."""
    if not is_traced(x, *[b for b, _ in conditions]):
        for bad, msg in conditions:
            if bool(np.any(np.asarray(bad))):
                raise ValueError(msg)
        return x
    flags = jnp.stack([jnp.any(b) for b, _ in conditions])
    return eqx.branched_error_if(x, jnp.any(flags), jnp.argmax(flags), [m for _, m in conditions])


def _check_counts_concrete(counts) -> np.ndarray:
    k = np.asarray(counts)
    if k.ndim != 1:
        raise ValueError(f"counts must be a 1-d array (npix,), got shape {k.shape}")
    if not (np.issubdtype(k.dtype, np.integer) or np.issubdtype(k.dtype, np.floating)):
        raise ValueError(f"counts must be a numeric array, got dtype {k.dtype}")
    if np.issubdtype(k.dtype, np.floating):
        if not np.all(np.isfinite(k)):
            raise ValueError("counts contain non-finite values")
        if np.any(k != np.round(k)):
            raise ValueError("counts must be integers (got non-integer values)")
    if np.any(k < 0):
        raise ValueError(f"counts must be non-negative (min is {k.min()})")
    return k.astype(np.int64)


# --------------------------------------------------------------------------------------
# Poisson


def poisson_loglike(counts: Real[ArrayLike, " npix"], mu: Float[ArrayLike, " npix"]) -> Float[Array, " npix"]:
    """Per-pixel Poisson log-pmf k log mu - mu - log k! (float64).

    Uses xlogy, so k = 0, mu = 0 gives 0 (not NaN); k > 0 with mu = 0 gives -inf.
    counts: (npix,) non-negative integers; mu: (npix,) expected counts >= 0.
    """
    counts = jnp.asarray(counts)
    mu = jnp.asarray(mu, dtype=jnp.float64)
    if counts.shape != mu.shape:
        raise ValueError(f"counts has shape {counts.shape} but mu has shape {mu.shape}")
    k = counts.astype(jnp.float64)
    k = _check(k, (k < 0) | ~jnp.isfinite(k) | (k != jnp.round(k)),
               "counts must be finite non-negative integers")
    mu = _check(mu, (mu < 0) | ~jnp.isfinite(mu), "mu must be finite and >= 0")
    return jax.scipy.special.xlogy(k, mu) - mu - jax.scipy.special.gammaln(k + 1.0)


# --------------------------------------------------------------------------------------
# Count plan


class CountPlan(eqx.Module):
    """Static grouping of pixels by observed count, built once by `count_plan`.

    The pixels are taken in `order` (ascending count), which lays the groups out one after
    another: group g is order[start_g : start_g + n_g]. The likelihood gathers its inputs
    into this order once, so every group and phase is a contiguous slice (no per-group
    gathers and scatters), and puts the result back with `inverse`.

    Attributes:
      n_pixels: number of pixels (static).
      k_max: largest count (static); the SCF terms are needed for m = 1..k_max.
      group_kmax: recursion length of each group (static, ascending; 0 = no recursion).
      group_sizes: number of pixels of each group (static).
      order: (n_pixels,) pixel positions sorted by count.
      inverse: (n_pixels,) the position of each pixel in `order`.
      sorted_counts: (n_pixels,) the counts in `order`.
    """

    n_pixels: int = eqx.field(static=True)
    k_max: int = eqx.field(static=True)
    group_kmax: tuple[int, ...] = eqx.field(static=True)
    group_sizes: tuple[int, ...] = eqx.field(static=True)
    order: Int[Array, " npix"]
    inverse: Int[Array, " npix"]
    sorted_counts: Int[Array, " npix"]

    @property
    def group_starts(self) -> tuple[int, ...]:
        """Position of each group's first pixel in `order` (static)."""
        return _starts(self.group_sizes)

    @property
    def index(self) -> tuple[Int[Array, " _"], ...]:
        """Per group, (n_g,) positions of its pixels."""
        return tuple(self.order[s:s + n] for s, n in zip(self.group_starts, self.group_sizes))

    @property
    def counts(self) -> tuple[Int[Array, " _"], ...]:
        """Per group, (n_g,) counts of its pixels (<= its group_kmax)."""
        return tuple(
            self.sorted_counts[s:s + n] for s, n in zip(self.group_starts, self.group_sizes)
        )

    @property
    def cost(self) -> int:
        """Number of history-entry updates of one evaluation of the phased recursion:
        sum_g N_g R_g (K_g - K_{g-1}), N_g the pixels with count > K_{g-1}, R_g the
        history rows (`_history_rows(K_g)`)."""
        n = self.group_sizes
        k_prev = (0,) + self.group_kmax[:-1]
        return int(sum(
            _phase_work(sum(n[g:]), K, k_prev[g]) for g, K in enumerate(self.group_kmax)
        ))


def _starts(sizes) -> tuple[int, ...]:
    """Where each of consecutive blocks of the given sizes begins: (0, s_0, s_0 + s_1, ...)."""
    return tuple(int(s) for s in np.cumsum((0,) + tuple(sizes[:-1])))


def _phase_work(n_pixels, K: int, k_prev):
    """History updates of one phase: steps k_prev+1..K for n_pixels pixels, each over
    `_history_rows(K)` rows (broadcasts over n_pixels and k_prev)."""
    return n_pixels * _history_rows(K) * (K - k_prev)


def _choose_groups(values: np.ndarray, hist: np.ndarray, max_groups: int, overhead: float):
    """Optimal contiguous split of the sorted distinct counts `values` (with multiplicities
    `hist`) into at most `max_groups` groups for the phased recursion, minimising
    sum_g [N_g R_g (K_g - K_{g-1}) + overhead], N_g the number of pixels with count >
    K_{g-1} and R_g = `_history_rows(K_g)` (dynamic programming). Returns the last value
    of each group (ascending)."""
    u = len(values)
    cum = np.concatenate([[0], np.cumsum(hist)])
    k_prev = np.concatenate([[0.0], values.astype(float)])  # K_{g-1} if a group starts at i
    inf = np.inf
    # best[g][j]: minimal cost covering values[:j] with g groups; arg for back-tracking
    best = np.full((max_groups + 1, u + 1), inf)
    arg = np.zeros((max_groups + 1, u + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, u + 1):
            i = np.arange(0, j)
            work = _phase_work(cum[u] - cum[i], int(values[j - 1]), k_prev[i])
            c = best[g - 1, i] + work + overhead
            t = int(np.argmin(c))
            best[g, j] = c[t]
            arg[g, j] = t
    g = int(np.argmin(best[1:, u])) + 1
    ends = []
    j = u
    while g > 0:
        ends.append(int(values[j - 1]))
        j = int(arg[g, j])
        g -= 1
    return sorted(ends)


def count_plan(
    counts: Real[ArrayLike, " npix"],
    *,
    max_groups: int = _MAX_GROUPS,
    phase_overhead: float = _PHASE_OVERHEAD,
) -> CountPlan:
    """Group pixels by count for the NPTF recursion (call outside jit, on concrete counts).

    Group g holds the pixels with K_{g-1} < count <= K_g; the recursion runs in phases,
    phase g taking steps K_{g-1}+1..K_g for every pixel with count > K_{g-1}. The K_g are
    chosen to minimise sum_g [N_g R_g (K_g - K_{g-1}) + phase_overhead] (N_g the pixels in
    phase g, R_g ~ K_g + 1 its history rows), i.e. the history updates plus a cost per
    phase, with at most `max_groups` groups.
    """
    if is_traced(counts):
        raise ValueError(
            "count_plan needs concrete counts, got a traced array: build "
            "`plan = count_plan(counts)` outside jit and pass it in"
        )
    if not isinstance(max_groups, int) or max_groups < 1:
        raise ValueError(f"max_groups must be a positive int, got {max_groups!r}")
    k = _check_counts_concrete(counts)
    n = k.shape[0]
    order = np.argsort(k, kind="stable")
    ks = k[order]
    kmaxes, sizes = [], []
    if n:
        values, hist = np.unique(k, return_counts=True)
        lo = -1
        for e in _choose_groups(values, hist, max_groups, float(phase_overhead)):
            size = int(np.count_nonzero((ks > lo) & (ks <= e)))
            if size:
                kmaxes.append(int(e))
                sizes.append(size)
            lo = e
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n)
    return CountPlan(
        n_pixels=int(n),
        k_max=int(k.max()) if n else 0,
        group_kmax=tuple(kmaxes),
        group_sizes=tuple(sizes),
        order=jnp.asarray(order),
        inverse=jnp.asarray(inverse),
        sorted_counts=jnp.asarray(ks),
    )


# --------------------------------------------------------------------------------------
# The scaled recursion


def _last_weighted_lag(w, axis: int):
    """Largest lag j (1-based along `axis`) with w_j > 0, 0 if none: a history entry that
    will next be used at a lag beyond it no longer changes any p_k."""
    lags = jnp.expand_dims(jnp.arange(1, w.shape[axis] + 1), 1 - axis)
    return jnp.max(jnp.where(w > 0, lags, 0), axis=axis, initial=0)


def _sum_rows(a):
    """Sum over the leading axis as written-out row additions (folding 8 blocks at a time
    beyond 16 rows). XLA:CPU vectorises row-wise adds across the pixels but not a reduce
    over a leading axis, which is about 2x slower here."""
    while a.shape[0] > 16:
        pad = -a.shape[0] % 8
        if pad:
            a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
        a = a.reshape((8, -1) + a.shape[1:])
        a = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7]
    acc = a[0]
    for i in range(1, a.shape[0]):
        acc = acc + a[i]
    return acc


def _history_rows(K: int) -> int:
    """Rows of a phase's history for steps up to K: K + 1, rounded up to a multiple of 8
    beyond 16 so that `_sum_rows` folds it without padding."""
    return K + 1 if K + 1 <= 16 else -(-(K + 1) // 8) * 8


def _weights(mu, x, k_lo: int = 0):
    """Recursion weights j x'_j (x'_1 = mu + x_1) for the orders j = k_lo+1..k_lo+J, shape
    (J, c), from mu: (c,) and x: (J, c) = x_j of those orders."""
    j = jnp.arange(k_lo + 1, k_lo + x.shape[0] + 1, dtype=x.dtype)[:, None]
    # elementwise, not x.at[0].add(mu) (a scatter: one more kernel and copy per group)
    return (x + jnp.where(j == 1, mu[None, :], 0.0)) * j


def _phase_scan(h, logc, rw, kp, last, k_lo: int, K: int):
    """Recursion steps k = k_lo+1..K for the pixels (columns) of one phase.

    h: (R, c) history (R = `_history_rows(K)`), p_j = h[j] exp(logc) for the rows j < k
    filled so far (later rows 0); logc, kp, last: (c,); rw: (K + R, c) the weights
    (`_weights`) reversed, then R rows of zeros: rw[K - k + i] = w_{k-i}, so that the
    step-k weights are one slice.
    Pixel i stops after kp[i] steps. The history is rescaled only when the newest value
    leaves [1e-100, 1e100], which real data almost never triggers: divided by the newest
    value, or by max/1e250 of the entries that still have a future weight where that is
    larger (module docstring).
    """
    dt = rw.dtype
    R = h.shape[0]

    def step(carry, k):
        h, logc = carry
        u = lax.dynamic_slice_in_dim(rw, K - k, R, axis=0)
        active = k <= kp
        v = jnp.where(active, _sum_rows(u * h) / k.astype(dt), 0.0)
        h = lax.dynamic_update_slice_in_dim(h, v[None], k, axis=0)
        out_of_range = active & ((v > _HI) | ((v > 0) & (v < _LO)))

        def rescale(args):
            h, logc = args
            # entry i still has a weight in some step after k iff k + 1 - i <= last
            # (an iota here, not a hoisted arange: one kernel less per phase to compile)
            rows = lax.broadcasted_iota(last.dtype, h.shape, 0)
            live = rows >= k + 1 - last[None, :]
            top = jnp.max(jnp.where(live, h, 0.0), axis=0, initial=0.0)
            d = jnp.where(out_of_range, jnp.maximum(v, top / _RATIO_CAP), 1.0)
            return jnp.minimum(h / d, _RATIO_CAP), logc + jnp.log(d)

        h, logc = lax.cond(jnp.any(out_of_range), rescale, lambda a: a, (h, logc))
        return (h, logc), None

    (h, logc), _ = lax.scan(step, (h, logc), jnp.arange(k_lo + 1, K + 1))
    return h, logc


def _finish(h, logc, kp, K: int, with_ratio: bool):
    """log p_kp (c,) from the history h: (R, c), R > K >= kp, and, with `with_ratio`,
    ratio (K, c) = p_{kp-m}/p_kp, m = 1..K (0 for m > kp)."""
    hk = jnp.take_along_axis(h, kp[None, :], axis=0)[0]
    pos = hk > 0
    hk_safe = jnp.where(pos, hk, 1.0)
    logp = jnp.where(pos, logc + jnp.log(hk_safe), -jnp.inf)
    if not with_ratio:
        return logp, None
    src = kp[None, :] - jnp.arange(1, K + 1)[:, None]  # (K, c): index of p_{k-m}
    hkm = jnp.take_along_axis(h, jnp.maximum(src, 0), axis=0)
    ratio = jnp.where((src >= 0) & pos[None, :], hkm / hk_safe[None, :], 0.0)
    return logp, jnp.minimum(ratio, _RATIO_CAP)


def _phased(mu, xs, xtot, kp, sizes: tuple[int, ...], with_ratio: bool):
    """log p_kp (n,) of pixels in plan order (and, with `with_ratio`, the ratios of
    `_finish` per group) by one recursion in phases.

    mu, xtot, kp: (n,), pixels sorted by count (kp >= 1), group g the `sizes[g]` pixels
    from start_g on, recursion lengths K_1 < ... < K_G; xs[g]: (K_g - K_{g-1}, n - start_g)
    the orders phase g adds, x_m for m = K_{g-1}+1..K_g of the pixels from group g on.
    Phase g runs steps K_{g-1}+1..K_g on those pixels with a history of K_g + 1 rows (a few
    more beyond 16, `_history_rows`) and weights of orders 1..K_g: the new ones on top of
    the previous phase's, which are kept for the pixels still there; group g is then done
    and leaves (the first n_g columns). A pixel costs about kp^2 history updates, there are
    only K_G sequential steps in all, and each order's weight is computed once.
    """
    starts = _starts(sizes)
    n_all = mu.shape[0]
    k_lo, ws = 0, []
    for x, s in zip(xs, starts):
        ws.append(_weights(mu[s:], x, k_lo))
        k_lo += x.shape[0]
    # largest lag with a non-zero weight, per pixel, over the pixel's whole recursion (the
    # blocks of the phases it takes part in)
    k_lo, last = 0, jnp.zeros(n_all, jnp.int32)
    for w in ws:
        lag = _last_weighted_lag(w, axis=0)
        lag = jnp.where(lag > 0, lag + k_lo, 0).astype(jnp.int32)
        last = jnp.maximum(last, jnp.pad(lag, (n_all - lag.shape[0], 0)))
        k_lo += w.shape[0]
    logc = -mu - xtot
    h = jnp.ones((1, n_all), logc.dtype)
    k_lo, out, rw_prev, n_prev = 0, [], None, 0
    for w, s, n in zip(ws, starts, sizes):
        K = k_lo + w.shape[0]
        R = _history_rows(K)
        c = n_all - s
        # reversed weights: this phase's orders, then the earlier ones (reversed already)
        # of the pixels still here, then R zero rows
        older = [rw_prev[:k_lo, n_prev:]] if k_lo else []
        rw = jnp.concatenate([w[::-1]] + older + [jnp.zeros((R, c), w.dtype)], axis=0)
        h = jnp.pad(h, ((0, R - h.shape[0]), (0, 0)))
        h, logc = _phase_scan(h, logc, rw, kp[s:], last[s:], k_lo, K)
        out.append(_finish(h[:, :n], logc[:n], kp[s:s + n], K, with_ratio))
        h, logc = h[:, n:], logc[n:]
        k_lo, rw_prev, n_prev = K, rw, n
    logp = jnp.concatenate([o[0] for o in out])
    return (logp, tuple(o[1] for o in out)) if with_ratio else logp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sorted_logp(mu, xs, xtot, kp, sizes):
    """log p_kp (n,) of pixels in plan order (arguments as `_phased`)."""
    return _phased(mu, xs, xtot, kp, sizes, False)


def _sorted_logp_fwd(mu, xs, xtot, kp, sizes):
    return _phased(mu, xs, xtot, kp, sizes, True)


def _sorted_logp_bwd(sizes, ratios, g):
    # ratios[h]: (K_h, n_h) = d log p / d x_m of group h's pixels; block b of xs holds
    # the orders K_{b-1}+1..K_b of the pixels of groups b..G
    gs = [g[s:s + n] for s, n in zip(_starts(sizes), sizes)]
    d_mu = jnp.concatenate([gi * (r[0] - 1.0) for gi, r in zip(gs, ratios)])
    bounds = [0] + [r.shape[0] for r in ratios]
    d_xs = tuple(
        jnp.concatenate([gi[None, :] * r[bounds[b]:bounds[b + 1]]
                         for gi, r in zip(gs[b:], ratios[b:])], axis=1)
        for b in range(len(ratios))
    )
    return d_mu, d_xs, -g, None


_sorted_logp.defvjp(_sorted_logp_fwd, _sorted_logp_bwd)


def _assemble(plan: CountPlan, mu_s, xtot_s, phase_terms) -> Float[Array, " npix"]:
    """Per-pixel log p (pixel order) from inputs in plan order: mu_s, xtot_s (n,) and
    phase_terms(start, k_lo, K) -> (K - k_lo, n - start), x_m (m = k_lo+1..K) of the
    pixels from position `start` of the plan order on (orders first: the recursion's
    layout)."""
    kmax, sizes = plan.group_kmax, plan.group_sizes
    z = sizes[0] if kmax and kmax[0] == 0 else 0  # count 0: log p_0 = -mu - sum_m x_m
    parts = [-mu_s[:z] - xtot_s[:z]] if z else []
    rec = slice(1 if z else 0, None)  # the groups with a recursion
    if kmax[rec]:
        starts = plan.group_starts[rec]
        xs = tuple(phase_terms(s, k_lo, K)
                   for s, k_lo, K in zip(starts, (0,) + kmax[rec][:-1], kmax[rec]))
        parts.append(_sorted_logp(mu_s[z:], xs, xtot_s[z:], plan.sorted_counts[z:], sizes[rec]))
    if not parts:
        return jnp.zeros(0, jnp.float64)
    return jnp.concatenate(parts)[plan.inverse]


# --------------------------------------------------------------------------------------
# Public: NPTF log-likelihood from generating terms


def _resolve_plan(counts, plan: CountPlan | None) -> CountPlan:
    if plan is None:
        if is_traced(counts):
            raise ValueError(
                "nptf_loglike got traced counts and no plan: build `plan = count_plan(counts)` "
                "outside jit (counts are data, so once) and pass `plan=plan`"
            )
        return count_plan(counts)
    if not isinstance(plan, CountPlan):
        raise ValueError(f"plan must be a CountPlan (from count_plan), got {type(plan).__name__}")
    return plan


def nptf_loglike_from_terms(
    counts: Real[ArrayLike, " npix"],
    mu: Float[ArrayLike, " npix"],
    x_pix: Float[ArrayLike, "npix nm"],
    x_total: Float[ArrayLike, " npix"],
    *,
    plan: CountPlan | None = None,
) -> Float[Array, " npix"]:
    """Per-pixel log p_{k_p} (float64, -log k! included) from the generating terms.

    counts: (npix,) observed counts; mu: (npix,) Poisson mean; x_pix: (npix, nm) with
    x_pix[p, m-1] = x_{p,m} (nm >= max count; terms beyond nm are taken as 0 in the
    recursion); x_total: (npix,) sum over all m of x_{p,m} (enters p_0 only).
    `plan`: `count_plan(counts)`; built here if omitted and counts are concrete.
    """
    plan = _resolve_plan(counts, plan)
    counts = jnp.asarray(counts)
    mu = jnp.asarray(mu, dtype=jnp.float64)
    x_pix = jnp.asarray(x_pix, dtype=jnp.float64)
    x_total = jnp.asarray(x_total, dtype=jnp.float64)
    n = plan.n_pixels
    if counts.shape != (n,):
        raise ValueError(f"counts has shape {counts.shape}, the plan is for ({n},) pixels")
    if mu.shape != (n,):
        raise ValueError(f"mu has shape {mu.shape}, expected ({n},)")
    if x_pix.ndim != 2 or x_pix.shape[0] != n:
        raise ValueError(f"x_pix has shape {x_pix.shape}, expected ({n}, nm)")
    if x_total.shape != (n,):
        raise ValueError(f"x_total has shape {x_total.shape}, expected ({n},)")
    mu = _validate(mu, [
        ((mu < 0) | ~jnp.isfinite(mu), "mu must be finite and >= 0"),
        ((x_pix < 0) | ~jnp.isfinite(x_pix), "point-source terms x_m must be finite and >= 0"),
        ((x_total < 0) | ~jnp.isfinite(x_total),
         "point-source total sum_m x_m must be finite and >= 0"),
    ] + _plan_conditions(counts, plan))
    nm = x_pix.shape[1]
    if nm < plan.k_max:
        x_pix = jnp.pad(x_pix, ((0, 0), (0, plan.k_max - nm)))
    order = plan.order
    x_s = x_pix[order, :plan.k_max]
    return _assemble(plan, mu[order], x_total[order], lambda s, k_lo, K: x_s[s:, k_lo:K].T)


_PLAN_MISMATCH = "counts do not match the CountPlan (was it built from other counts?)"


def _plan_conditions(counts, plan: CountPlan):
    """Validation conditions: the plan's counts equal `counts` (checked now when concrete)."""
    if not is_traced(counts, plan.order, plan.sorted_counts):
        if not np.array_equal(np.asarray(counts)[np.asarray(plan.order)],
                              np.asarray(plan.sorted_counts)):
            raise ValueError(_PLAN_MISMATCH)
        return []
    return [(counts[plan.order] != plan.sorted_counts, _PLAN_MISMATCH)]


# --------------------------------------------------------------------------------------
# Public: NPTF log-likelihood from templates and SCFs


def _delta_psf():
    return jnp.ones(1, jnp.float64), jnp.ones(1, jnp.float64)


def _population_terms(scf, f, weights, m_max: int, ratios):
    """(nregion, m_max) x_m per unit template and (nregion,) totals for one population."""

    def one(ratio):
        xm, tot = scf.generating_terms(f, weights, m_max, ratio)
        return jnp.asarray(xm, jnp.float64), jnp.asarray(tot, jnp.float64)

    return jax.vmap(one)(ratios)


def _all_population_terms(scfs, f, weights, m_max: int, ratios):
    """x_m (npop, nregion, m_max) and totals (npop, nregion). Broken power laws are
    evaluated together, all populations and regions in one kernel
    (`skymodel.scf.population_terms`); other SCF types (subclasses with their own
    `generating_terms`) one by one."""
    from skymodel.scf import BrokenPowerLaw, population_terms

    if all(type(s) is BrokenPowerLaw for s in scfs):
        return population_terms(scfs, f, weights, m_max, ratios)
    terms = [_population_terms(scf, f, weights, m_max, ratios) for scf in scfs]
    return jnp.stack([t[0] for t in terms]), jnp.stack([t[1] for t in terms])


def nptf_loglike(
    counts: Real[ArrayLike, " npix"],
    mu: Float[ArrayLike, " npix"],
    ps_templates: Float[ArrayLike, "npop npix"],
    scfs: Sequence,
    psf=None,
    exposure_regions: tuple[Int[ArrayLike, " npix"], Float[ArrayLike, " nregion"]] | None = None,
    *,
    plan: CountPlan | None = None,
) -> Float[Array, " npix"]:
    """Per-pixel NPTF log-likelihood log p_{k_p} (float64; normalised pmf, -log k! included).

    counts: (npix,) observed counts (non-negative integers).
    mu: (npix,) Poisson mean (expected counts of all smooth components).
    ps_templates: (npop, npix) source-density template of each population (multiplies A).
    scfs: npop `skymodel.scf.BrokenPowerLaw` (S in counts at the mean exposure).
    psf: `skymodel.psf.PSFCorrection` (fields f, weights); None = delta PSF (f = 1).
    exposure_regions: (region (npix,) ints, ratio (nregion,) = region exposure / mean);
      None = one region with ratio 1.
    plan: `count_plan(counts)`; required under jit (counts traced), else built here.

    x_{p,m} = sum_pop T[pop, p] X[pop, region_p, m], X from each SCF's generating terms at
    the region's exposure ratio. With npop = 0 this equals `poisson_loglike`.
    """
    counts = jnp.asarray(counts)
    mu = jnp.asarray(mu, dtype=jnp.float64)
    ps_templates = jnp.asarray(ps_templates, dtype=jnp.float64)
    scfs = tuple(scfs)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-d (npix,), got shape {counts.shape}")
    n = counts.shape[0]
    if mu.shape != (n,):
        raise ValueError(f"mu has shape {mu.shape}, expected ({n},) like counts")
    if ps_templates.ndim != 2 or ps_templates.shape[1] != n:
        raise ValueError(f"ps_templates has shape {ps_templates.shape}, expected (npop, {n})")
    npop = ps_templates.shape[0]
    if len(scfs) != npop:
        raise ValueError(f"got {len(scfs)} SCFs for {npop} point-source templates")
    if npop == 0:
        return poisson_loglike(counts, mu)
    plan = _resolve_plan(counts, plan)
    if plan.n_pixels != n:
        raise ValueError(f"the plan is for {plan.n_pixels} pixels, counts have {n}")
    if psf is None:
        f, weights = _delta_psf()
    else:
        f = jnp.asarray(psf.f, jnp.float64)
        weights = jnp.asarray(psf.weights, jnp.float64)
    if exposure_regions is None:
        region = jnp.zeros(n, jnp.int32)
        ratios = jnp.ones(1, jnp.float64)
    else:
        region, ratios = exposure_regions
        region = jnp.asarray(region)
        ratios = jnp.asarray(ratios, jnp.float64)
        if region.shape != (n,):
            raise ValueError(f"exposure region index has shape {region.shape}, expected ({n},)")
        if ratios.ndim != 1 or ratios.shape[0] == 0:
            raise ValueError(f"exposure ratios must be a non-empty 1-d array, got {ratios.shape}")
        if not jnp.issubdtype(region.dtype, jnp.integer):
            raise ValueError(f"exposure region index must be integers, got {region.dtype}")
        region = _check(region, (region < 0) | (region >= ratios.shape[0]),
                        f"exposure region index out of range [0, {ratios.shape[0]})")
    m_max = max(plan.k_max, 1)
    X, Xtot = _all_population_terms(scfs, f, weights, m_max, ratios)  # (npop, nregion, m_max), (npop, nregion)
    mu = _validate(mu, [
        ((mu < 0) | ~jnp.isfinite(mu), "mu must be finite and >= 0"),
        ((ps_templates < 0) | ~jnp.isfinite(ps_templates), "ps_templates must be finite and >= 0"),
        ((ratios <= 0) | ~jnp.isfinite(ratios), "exposure ratios must be finite and > 0"),
        ((X < 0) | ~jnp.isfinite(X),
         "SCF generating terms x_m are negative or not finite (check the SCF parameters)"),
        ((Xtot < 0) | ~jnp.isfinite(Xtot),
         "SCF total sum_m x_m is negative or not finite (check the SCF parameters)"),
    ] + _plan_conditions(counts, plan))

    # template of each population in each region, zero outside it, in plan order:
    # (npix, npop, nregion), so that the orders a phase adds are one matrix product over
    # (population, region) in the recursion's layout (orders first), not a per-pixel
    # gather and a transpose (and in the gradient a scatter-add). Pixels first: the
    # products' gradients come out in this layout, so adding the phases' contributions
    # needs no transpose (pixels last cost +5% value+gradient run time).
    order = plan.order
    in_region = region[order][:, None] == jnp.arange(ratios.shape[0])[None, :]
    TR = jnp.where(in_region[:, None, :], ps_templates.T[order][:, :, None], 0.0)
    xtot_s = jnp.einsum("pr,ipr->i", Xtot, TR)

    def phase_terms(s, k_lo, K):
        return jnp.einsum("prm,ipr->mi", X[:, :, k_lo:K], TR[s:])

    return _assemble(plan, mu[order], xtot_s, phase_terms)


# --------------------------------------------------------------------------------------
# Public: the full table p_0..p_kmax


def pk_table(
    mu: Float[ArrayLike, " npix"],
    x_pix: Float[ArrayLike, "npix nm"],
    x_total: Float[ArrayLike, " npix"],
    k_max: int,
    *,
    log: bool = False,
) -> Float[Array, "npix kp1"]:
    """p_0..p_{k_max} per pixel, shape (npix, k_max + 1) (log p with `log=True`), float64.

    x_pix[p, m-1] = x_{p,m}; terms beyond its width are taken as 0. x_total: sum_m x_{p,m}.
    Runs the scaled recursion for all pixels to k_max (no grouping; for simulations,
    closure tests and plots).
    """
    if not isinstance(k_max, (int, np.integer)) or k_max < 0:
        raise ValueError(f"k_max must be a non-negative int, got {k_max!r}")
    k_max = int(k_max)
    mu = jnp.asarray(mu, jnp.float64)
    x_pix = jnp.asarray(x_pix, jnp.float64)
    x_total = jnp.asarray(x_total, jnp.float64)
    n = mu.shape[0]
    if mu.ndim != 1 or x_pix.ndim != 2 or x_pix.shape[0] != n or x_total.shape != (n,):
        raise ValueError(
            f"shapes mu {mu.shape}, x_pix {x_pix.shape}, x_total {x_total.shape} are not "
            "(npix,), (npix, nm), (npix,)"
        )
    mu = _check(mu, (mu < 0) | ~jnp.isfinite(mu), "mu must be finite and >= 0")
    x_pix = _check(x_pix, (x_pix < 0) | ~jnp.isfinite(x_pix), "x_pix must be finite and >= 0")
    x_total = _check(x_total, (x_total < 0) | ~jnp.isfinite(x_total),
                     "x_total must be finite and >= 0")
    nm = x_pix.shape[1]
    K = k_max
    x = jnp.pad(x_pix, ((0, 0), (0, max(0, K - nm))))[:, :K]
    w = x.at[:, 0].add(mu) * jnp.arange(1, K + 1, dtype=jnp.float64) if K else x
    r0 = jnp.zeros((n, K + 1), jnp.float64).at[:, 0].set(1.0)
    logc0 = -mu - x_total
    # r[:, j] = p_{k-j} / scale. Entry j moves to j + 1 and is next used with weight
    # w_{j+2}, then w_{j+3}, ...: it still matters iff some w_l, l >= j + 2, is > 0.
    live = jnp.arange(K)[None, :] + 2 <= _last_weighted_lag(w, axis=1)[:, None]

    def step(carry, k):
        r, logc = carry
        v = jnp.sum(w * r[:, :K], axis=1) / k
        pos = v > 0
        top = jnp.max(jnp.where(live, r[:, :K], 0.0), axis=1, initial=0.0)
        d = jnp.where(pos, jnp.maximum(v, top / _RATIO_CAP), 1.0)
        head = jnp.where(pos, v / d, 0.0)
        tail = jnp.minimum(r[:, :K] / d[:, None], _RATIO_CAP)
        r = jnp.concatenate([head[:, None], tail], axis=1)
        logc = logc + jnp.log(d)
        return (r, logc), jnp.where(head > 0, logc + jnp.log(jnp.where(head > 0, head, 1.0)), -jnp.inf)

    (_, _), logs = lax.scan(step, (r0, logc0), jnp.arange(1, K + 1, dtype=jnp.float64))
    out = jnp.concatenate([logc0[:, None], logs.T], axis=1)
    return out if log else jnp.exp(out)


__all__ = [
    "CountPlan",
    "count_plan",
    "nptf_loglike",
    "nptf_loglike_from_terms",
    "pk_table",
    "poisson_loglike",
]
