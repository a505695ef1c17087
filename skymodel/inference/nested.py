"""Nested sampling: the evidence Z = integral of L(theta) pi(theta) and equal-weight
posterior samples, with MultiNest (pymultinest) or dynesty.

    post = run_nested(sky, obs, nlive=500)         # backend="auto"
    post.log_evidence, post.log_evidence_err       # ln Z (natural log) and its error
    post.diagnostics["n_likelihood_evals"]

Backends
- "multinest": MultiNest (Feroz, Hobson & Bridges 2009) through pymultinest. Used when
  pymultinest imports AND the MultiNest shared library loads (checked by loading it);
  install with `pip install "skymodel[multinest]"` plus the library (conda-forge
  `multinest`, or build github.com/JohannesBuchner/MultiNest and put its lib/ on
  LD_LIBRARY_PATH).
- "dynesty": dynesty's static nested sampler (a PyPI dependency) with multi-ellipsoid
  bounds (`bound="multi"`, MultiNest's bounding algorithm), new points drawn uniformly
  inside the ellipsoids ("unif", MultiNest's method; default below 10 dimensions) or by
  random walks from a live point ("rwalk"; default from 10 dimensions on).
- "auto": MultiNest when it loads, else dynesty; the choice and the reason are logged
  (logger "skymodel.inference.nested") and kept in the Posterior's diagnostics.

How the problem is posed. Both samplers explore the unit hypercube [0, 1]^ndim. The
prior transform (`prior_transform(sky)`) maps a point u of the cube to the free
parameters, one block of coordinates per parameter in `SkyModel.free_parameters()` order:
each prior's `from_unit` (inverse CDF; Dirichlet weights by the gamma transform), or, for a
prior whose `from_unit` is not implemented, the inverse CDF `icdf` of its NumPyro
distribution. The sampler's log-likelihood of u is the jitted
`sky.with_values(T(u)).log_likelihood(obs)` (NPTFit's convention: log of the normalised
pmf, including -log k!), so ln Z is comparable with NPTFit's / MultiNest's.

Batches. The likelihood is vmapped over batches of `batch_size` points. dynesty proposes
`queue_size = batch_size` new points at a time; they run in threads that meet at every
likelihood call, and each round of calls is one vmapped evaluation (padded to the batch
size, so it compiles once). On a GPU a batch costs about as much as one point. On a CPU
the default is one point per call, evaluated without vmap (vmapped, the NPTF recursion's
rarely taken rescaling branch would run at every step: 3x the cost). MultiNest calls the
likelihood one point at a time.

Long runs: `progress=True` prints the sampler's progress line; with `checkpoint_path`
dynesty saves its state every `checkpoint_every` seconds and at the end (MultiNest keeps
its own resume files under that directory); `resume=True` continues from there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from skymodel._types import Array, Float
from skymodel.inference.posterior import Posterior
from skymodel.model import SkyModel
from skymodel.observation import Observation
from skymodel.priors import AbstractPrior, Dirichlet

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "multinest", "dynesty")
DYNESTY_SAMPLES = ("auto", "unif", "rwalk", "slice", "rslice")

MULTINEST_INSTALL = (
    "MultiNest needs the Python wrapper and the compiled library: "
    "`pip install \"skymodel[multinest]\"` (or `pip install pymultinest`), plus the MultiNest "
    "shared library, e.g. `conda install -c conda-forge multinest`, or build it from "
    "https://github.com/JohannesBuchner/MultiNest (cmake .. && make) and add its lib/ "
    "directory to LD_LIBRARY_PATH (DYLD_LIBRARY_PATH on macOS). backend=\"dynesty\" needs "
    "nothing extra."
)

#: unit-cube coordinates are kept in [U_EPS, 1 - U_EPS] (an inverse CDF is infinite at
#: 0 and 1; the prior mass cut off is U_EPS per end, e.g. a Normal beyond 7.6 sigma)
U_EPS = 1e-14


class BackendUnavailableError(RuntimeError):
    """The requested nested-sampling backend cannot run here; the message says how to
    install it."""


class NonFiniteLikelihoodError(FloatingPointError):
    """The log-likelihood was NaN or +inf at a point of the prior (a bug in the model or
    the data; -inf, zero likelihood, is allowed)."""


# ---------------------------------------------------------------------- prior transform


def _interval_bounds(d: dist.Distribution) -> tuple[Any, Any] | None:
    """(low, high) of a NumPyro interval support, or None."""
    s = d.support
    while hasattr(s, "base_constraint"):  # independent(interval, n)
        s = s.base_constraint
    lo, hi = getattr(s, "lower_bound", None), getattr(s, "upper_bound", None)
    if lo is None or hi is None:
        return None
    return lo, hi


def _icdf_transform(d: dist.Distribution, where: str) -> tuple[Callable, int, tuple[int, ...]]:
    """(u -> value, unit_dim, value shape) from a NumPyro distribution's inverse CDF."""
    if isinstance(d, dist.Dirichlet):
        conc = tuple(float(c) for c in np.asarray(d.concentration).reshape(-1))
        if np.shape(d.concentration) != (len(conc),):
            raise ValueError(f"{where}: only an unbatched Dirichlet is supported, got {d}")
        p = Dirichlet(conc)
        return p.from_unit, p.unit_dim, p.shape
    base = d
    shape = tuple(d.batch_shape) + tuple(d.event_shape)
    if isinstance(d, dist.Independent):
        base = d.base_dist
    if tuple(base.event_shape) != ():
        raise ValueError(
            f"{where}: nested sampling maps the unit cube through an inverse CDF, which "
            f"needs independent scalar entries; {type(d).__name__} has event shape "
            f"{tuple(d.event_shape)}. Give the prior a `from_unit` method."
        )
    if getattr(base.support, "is_discrete", False):
        raise ValueError(f"{where}: {type(base).__name__} is discrete; nested sampling needs a continuous prior")
    try:
        probe = base.icdf(jnp.full(tuple(base.batch_shape), 0.5))
    except (NotImplementedError, ImportError) as e:
        raise ValueError(
            f"{where}: {type(base).__name__} has no usable inverse CDF (icdf: "
            f"{type(e).__name__}: {e or 'not implemented'}); nested sampling needs the prior's "
            "`from_unit` or its NumPyro distribution's `icdf`"
        ) from e
    if not np.all(np.isfinite(np.asarray(probe))):
        raise ValueError(f"{where}: icdf(0.5) of {type(base).__name__} is not finite")
    n = int(np.prod(shape, dtype=int))

    def transform(u):
        return base.icdf(jnp.reshape(u, shape))

    return transform, n, shape


def unit_transform(prior, where: str = "prior") -> tuple[Callable, int, tuple[int, ...]]:
    """The unit-cube map of one prior: (u -> value, unit_dim, value shape).

    prior: a skymodel `AbstractPrior` (its `from_unit`; if that raises
    NotImplementedError, the `icdf` of `prior.to_numpyro()`), or a NumPyro distribution
    with an `icdf` (scalar entries, batched or `.to_event`), or a NumPyro Dirichlet (gamma
    transform). The returned function takes u of shape (unit_dim,) in [0, 1] and is
    jit/vmap-able; values are clipped into a bounded support (round-off at u = 0, 1).
    An inverse CDF may be infinite at u = 0 or 1; `PriorTransform` keeps u in
    [U_EPS, 1 - U_EPS] for that reason.
    Raises ValueError naming `where` for a prior without either.
    """
    if isinstance(prior, AbstractPrior):
        try:
            prior.from_unit(jnp.full((prior.unit_dim,), 0.5))
        except NotImplementedError:
            fn, n, shape = _icdf_transform(prior.to_numpyro(), where)
            if shape != tuple(prior.shape):
                raise ValueError(f"{where}: icdf gives shape {shape}, the prior has {tuple(prior.shape)}")
        else:
            fn, n, shape = prior.from_unit, prior.unit_dim, tuple(prior.shape)
        d = prior.to_numpyro()
    elif isinstance(prior, dist.Distribution):
        fn, n, shape = _icdf_transform(prior, where)
        d = prior
    else:
        raise ValueError(
            f"{where}: expected a skymodel prior or a NumPyro distribution, got {type(prior).__name__}"
        )
    bounds = None if isinstance(d, dist.Dirichlet) else _interval_bounds(d)

    def transform(u):
        v = jnp.reshape(fn(jnp.reshape(u, (n,))), shape)
        if bounds is not None:
            v = jnp.clip(v, bounds[0], bounds[1])
        return v

    return transform, n, shape


@dataclasses.dataclass(frozen=True, eq=False)
class PriorTransform:
    """Unit cube -> free parameters of a SkyModel.

    names: site names (SkyModel.free_parameters() order); shapes: each value's shape;
    unit_dims: cube coordinates each consumes (a Dirichlet of K weights takes K); `ndim`:
    their sum. Calling it maps u (ndim,) to a dict site -> value (jit/vmap-able); `batch`
    maps (n, ndim) to site -> (n, *shape) numpy arrays.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    unit_dims: tuple[int, ...]
    maps: tuple[Callable, ...]

    @property
    def ndim(self) -> int:
        return int(sum(self.unit_dims))

    def labels(self) -> list[str]:
        """One label per cube coordinate, e.g. "pi0.weights[1]"."""
        out = []
        for name, n in zip(self.names, self.unit_dims):
            out += [name] if n == 1 else [f"{name}[{i}]" for i in range(n)]
        return out

    def __call__(self, u: Float[Array, " ndim"]) -> dict[str, Array]:
        u = jnp.clip(jnp.asarray(u, jnp.float64), U_EPS, 1.0 - U_EPS)
        out, start = {}, 0
        for name, n, fn in zip(self.names, self.unit_dims, self.maps):
            out[name] = fn(u[start:start + n])
            start += n
        return out

    def _batched(self) -> Callable:
        f = self.__dict__.get("_batched_fn")
        if f is None:
            f = jax.jit(jax.vmap(self))
            object.__setattr__(self, "_batched_fn", f)
        return f

    def batch(self, u) -> dict[str, np.ndarray]:
        """(n, ndim) cube points -> site -> (n, *shape) float64 numpy arrays."""
        u = np.asarray(u, dtype=np.float64)
        if u.ndim != 2 or u.shape[1] != self.ndim:
            raise ValueError(f"expected cube points of shape (n, {self.ndim}), got {u.shape}")
        f = self._batched()
        out: dict[str, list] = {k: [] for k in self.names}
        for i in range(0, u.shape[0], 4096):
            for k, v in f(jnp.asarray(u[i:i + 4096])).items():
                out[k].append(np.asarray(v, dtype=np.float64))
        return {k: np.concatenate(v) if v else np.zeros((0,) + s) for (k, v), s in zip(out.items(), self.shapes)}


def prior_transform(sky: SkyModel) -> PriorTransform:
    """The unit-cube transform of `sky`'s free parameters (see `PriorTransform`)."""
    params = sky.free_parameters()
    if not params:
        raise ValueError("the SkyModel has no free parameters (no Param with a prior)")
    names, shapes, dims, maps = [], [], [], []
    for name, p in params.items():
        fn, n, shape = unit_transform(p.prior, where=f"parameter {name!r}")
        if shape != tuple(p.value.shape):
            raise ValueError(f"parameter {name!r}: prior transform gives shape {shape}, value has {tuple(p.value.shape)}")
        names.append(name)
        shapes.append(shape)
        dims.append(n)
        maps.append(fn)
    return PriorTransform(tuple(names), tuple(shapes), tuple(dims), tuple(maps))


# ---------------------------------------------------------------------- backends


def _multinest_library_names() -> list[str]:
    names = []
    found = ctypes.util.find_library("multinest")
    if found:
        names.append(found)
    names.append("libmultinest.dylib" if sys.platform == "darwin" else "libmultinest.so")
    return names


def multinest_status() -> tuple[bool, str]:
    """(available, reason): whether pymultinest imports and libmultinest loads.

    Loads the library with ctypes first (pymultinest calls sys.exit when it cannot), then
    imports pymultinest.
    """
    if importlib.util.find_spec("pymultinest") is None:
        return False, "pymultinest is not installed"
    errors = []
    for name in _multinest_library_names():
        try:
            ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(f"{name}: {e}")
    else:
        return False, "the MultiNest shared library does not load (" + "; ".join(errors) + ")"
    try:
        importlib.import_module("pymultinest")
    except (ImportError, OSError, SystemExit) as e:
        return False, f"pymultinest does not import ({type(e).__name__}: {e})"
    return True, "pymultinest imports and the MultiNest library loads"


def select_backend(backend: str) -> tuple[str, str]:
    """(backend, reason) for "auto" | "multinest" | "dynesty".

    "multinest" raises BackendUnavailableError (with install instructions) when it cannot
    run; "auto" falls back to dynesty then.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dynesty":
        return "dynesty", "requested"
    ok, why = multinest_status()
    if backend == "multinest":
        if not ok:
            raise BackendUnavailableError(f"backend='multinest' is unavailable: {why}. {MULTINEST_INSTALL}")
        return "multinest", "requested"
    if ok:
        return "multinest", f"auto: {why}"
    return "dynesty", f"auto: MultiNest unavailable ({why}); using dynesty (bound='multi')"


# ---------------------------------------------------------------------- the likelihood on the cube


def cube_log_likelihood(sky: SkyModel, obs: Observation, transform: PriorTransform) -> Callable:
    """jitted (n, ndim) cube points -> (n,) log-likelihoods (vmapped over the points; a
    batch of one point is evaluated unbatched).

    The model and the data are constants of the compiled function, as in SVI and NUTS:
    the morphologies then reuse their tabulated line-of-sight geometry and the likelihood
    its count plan. A single point is not vmapped because under vmap the recursion's
    rarely taken rescaling branch (`lax.cond`) runs at every step."""

    def one(ui):
        return sky.with_values(transform(ui), check=False).log_likelihood(obs)

    @jax.jit
    def f(u):
        if u.shape[0] == 1:
            return one(u[0])[None]
        return jax.vmap(one)(u)

    return f


class _Evaluator:
    """Evaluates the cube log-likelihood in padded batches of `batch_size`, counts the
    evaluations, refuses NaN / +inf, and batches the calls of `lockstep` threads."""

    def __init__(self, fn: Callable, batch_size: int, ndim: int, transform: PriorTransform):
        self.fn = fn
        self.batch_size = int(batch_size)
        self.ndim = int(ndim)
        self.transform = transform
        self.n_evals = 0
        self._cond = threading.Condition()
        self._pending: list[list] = []
        self._active = 0
        self._local = threading.local()

    def evaluate(self, u) -> np.ndarray:
        u = np.atleast_2d(np.asarray(u, dtype=np.float64))
        n, B = u.shape[0], self.batch_size
        out = np.empty(n)
        for i in range(0, n, B):
            chunk = u[i:i + B]
            m = chunk.shape[0]
            if m < B:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], B - m, axis=0)])
            out[i:i + m] = np.asarray(self.fn(jnp.asarray(chunk)), dtype=np.float64)[:m]
        self.n_evals += n
        bad = np.isnan(out) | (out == np.inf)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            values = {k: np.asarray(v).tolist() for k, v in self.transform(jnp.asarray(u[j])).items()}
            raise NonFiniteLikelihoodError(
                f"the log-likelihood is {out[j]} at {values} ({int(bad.sum())} of {n} points in "
                "this batch); nested sampling needs a finite value or -inf everywhere in the prior"
            )
        return out

    # -- one point (what the samplers call) ------------------------------------------

    def __call__(self, u) -> float:
        if not getattr(self._local, "lockstep", False):
            return float(self.evaluate(np.asarray(u)[None])[0])
        slot = [np.asarray(u, dtype=np.float64), None, None, False]  # u, value, error, done
        with self._cond:
            self._pending.append(slot)
            self._flush_if_all_waiting()
            while not slot[3]:
                self._cond.wait()
        if slot[2] is not None:
            raise slot[2]
        return slot[1]

    def _flush_if_all_waiting(self) -> None:
        # called with the lock held: when every active thread waits, evaluate them together
        if not self._pending or len(self._pending) < self._active:
            return
        batch, self._pending = self._pending, []
        try:
            values = self.evaluate(np.stack([s[0] for s in batch]))
            for s, v in zip(batch, values):
                s[1], s[3] = float(v), True
        except BaseException as e:  # noqa: BLE001  (handed to every waiting thread)
            for s in batch:
                s[2], s[3] = e, True
        self._cond.notify_all()

    # -- the dynesty pool ------------------------------------------------------------

    def map(self, func: Callable, iterable) -> list:
        """Run func over the items in threads whose likelihood calls are batched."""
        items = list(iterable)
        if len(items) <= 1 or self.batch_size == 1:
            return [func(x) for x in items]
        results: list = [None] * len(items)
        errors: list = [None] * len(items)
        with self._cond:
            self._pending, self._active = [], len(items)

        def work(i):
            self._local.lockstep = True
            try:
                results[i] = func(items[i])
            except BaseException as e:  # noqa: BLE001
                errors[i] = e
            finally:
                with self._cond:
                    self._active -= 1
                    self._flush_if_all_waiting()

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:
            if e is not None:
                raise e
        return results


class _Pool:
    """A picklable dynesty pool (`map`, `size`) over an `_Evaluator` (dropped when
    pickled; a restored sampler gets a fresh pool)."""

    def __init__(self, evaluator: _Evaluator | None):
        self._evaluator = evaluator
        self.size = evaluator.batch_size if evaluator is not None else 1

    def map(self, func, iterable):
        if self._evaluator is None:
            return list(map(func, iterable))
        return self._evaluator.map(func, iterable)

    def __getstate__(self):
        return {"size": self.size}

    def __setstate__(self, state):
        self._evaluator = None
        self.size = state["size"]


class _CubeLogLike:
    """What dynesty calls and pickles: u (ndim,) -> log-likelihood. Pickles only the
    model fingerprint and the evaluation count; `attach` re-binds an evaluator."""

    def __init__(self, evaluator: _Evaluator, fingerprint: str):
        self._evaluator = evaluator
        self.fingerprint = fingerprint
        self.n_evals_before = 0

    def __call__(self, u) -> float:
        if self._evaluator is None:
            raise RuntimeError("a restored nested-sampling checkpoint must be attached to a model first")
        return self._evaluator(u)

    @property
    def n_evals(self) -> int:
        return self.n_evals_before + (self._evaluator.n_evals if self._evaluator is not None else 0)

    def attach(self, evaluator: _Evaluator) -> None:
        self._evaluator = evaluator

    def __getstate__(self):
        return {"fingerprint": self.fingerprint, "n_evals_before": self.n_evals}

    def __setstate__(self, state):
        self._evaluator = None
        self.fingerprint = state["fingerprint"]
        self.n_evals_before = int(state["n_evals_before"])


def _identity(u):
    """dynesty's prior transform: the sampler works on the cube; the likelihood applies
    the model's prior transform itself."""
    return u


def _fingerprint(sky: SkyModel, obs: Observation, transform: PriorTransform) -> str:
    """A short hash of what a checkpoint must match: sites, priors, data."""
    h = hashlib.sha256()
    for name, p in sky.free_parameters().items():
        h.update(f"{name}|{p.prior!r}|".encode())
    h.update(np.asarray(obs.counts, dtype=np.float64).tobytes())
    h.update(np.asarray(obs.roi.pixels).astype(np.int64).tobytes())
    h.update(str(transform.unit_dims).encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------- validation


def _check_positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _resolve_batch_size(batch_size) -> int:
    if batch_size == "auto":
        return 1 if jax.default_backend() == "cpu" else 16
    return _check_positive_int("batch_size", batch_size)


# ---------------------------------------------------------------------- dynesty


def _run_dynesty(
    evaluator: _Evaluator, transform: PriorTransform, fingerprint: str, *, nlive: int, dlogz: float,
    seed: int, progress: bool, checkpoint_path, resume: bool, checkpoint_every: float,
    sample: str, maxiter, maxcall, dynesty_kwargs: Mapping,
):
    import dynesty

    ndim = transform.ndim
    path = None if checkpoint_path is None else str(checkpoint_path)
    sampler = None
    if resume and path is not None and os.path.exists(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # queue-size notice: the pool is re-attached below
            sampler = dynesty.NestedSampler.restore(path)
        loglike = sampler.loglikelihood.loglikelihood.func
        if not isinstance(loglike, _CubeLogLike):
            raise ValueError(f"checkpoint {path} was not written by skymodel.run_nested")
        if loglike.fingerprint != fingerprint:
            raise ValueError(
                f"checkpoint {path} was made for a different model or data (fingerprint "
                f"{loglike.fingerprint} != {fingerprint}); remove it or use another checkpoint_path"
            )
        if sampler.nlive != nlive:
            logger.info("resuming with the checkpoint's nlive=%d (requested %d)", sampler.nlive, nlive)
        queue = int(getattr(sampler, "queue_size", 1))
        if queue != evaluator.batch_size:
            logger.info("resuming with the checkpoint's batch size %d (requested %d)", queue, evaluator.batch_size)
            evaluator.batch_size = queue
        loglike.attach(evaluator)
        pool = _Pool(evaluator) if queue > 1 else None
        for s in [sampler]:
            s.pool = pool
            s.mapper = pool.map if pool is not None else map
        logger.info("resumed dynesty from %s at iteration %d", path, sampler.it)
        finished = bool(getattr(sampler, "added_live", False))
    else:
        if sample == "auto":
            sample = "unif" if ndim < 10 else "rwalk"
        rng = np.random.default_rng(seed)
        loglike = _CubeLogLike(evaluator, fingerprint)
        # initial live points: uniform on the cube, evaluated in batches
        live_u = rng.uniform(size=(nlive, ndim))
        live_logl = evaluator.evaluate(live_u)
        if not np.any(np.isfinite(live_logl)):
            raise NonFiniteLikelihoodError(
                f"the log-likelihood is -inf at all {nlive} initial points drawn from the prior"
            )
        B = evaluator.batch_size
        pool = _Pool(evaluator) if B > 1 else None
        kwargs = dict(
            nlive=nlive, bound="multi", sample=sample, rstate=rng,
            live_points=[live_u, live_u.copy(), live_logl],
            queue_size=B if B > 1 else None, pool=pool,
            use_pool={"prior_transform": False, "loglikelihood": False, "propose_point": True,
                      "update_bound": False},
        )
        kwargs.update(dynesty_kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*initial likelihood values are the same.*")
            sampler = dynesty.NestedSampler(loglike, _identity, ndim, **kwargs)
        finished = False
    run_kwargs = dict(dlogz=dlogz, print_progress=progress, resume=resume and sampler.it > 1)
    if maxiter is not None:
        run_kwargs["maxiter"] = maxiter
    if maxcall is not None:
        run_kwargs["maxcall"] = maxcall
    if path is not None:
        run_kwargs.update(checkpoint_file=path, checkpoint_every=float(checkpoint_every))
    if finished:
        logger.info("the checkpoint holds a finished run; returning its result")
    else:
        sampler.run_nested(**run_kwargs)
    res = sampler.results
    logwt = np.asarray(res["logwt"], dtype=np.float64)
    logz = float(res["logz"][-1])
    w = np.exp(logwt - logz)
    w = w / w.sum()
    u_eq = dynesty.utils.resample_equal(np.asarray(res["samples_u"]), w, rstate=np.random.default_rng(seed + 1))
    converged = maxiter is None and maxcall is None
    if not converged:
        # a capped run: converged only if the stopping rule was met before the cap
        converged = bool(res["niter"] < (maxiter or np.inf) and np.sum(res["ncall"]) < (maxcall or np.inf))
    info = {
        "log_evidence": logz,
        "log_evidence_err": float(res["logzerr"][-1]),
        "niter": int(res["niter"]),
        "information": float(res["information"][-1]),
        "efficiency_percent": float(res["eff"]),
        "kish_ess": float(1.0 / np.sum(w**2)),
        "n_likelihood_evals": int(loglike.n_evals),
        "sample": sampler.internal_sampler.__class__.__name__,
        "nlive": int(sampler.nlive),
        "batch_size": int(evaluator.batch_size),
        "converged": converged,
    }
    return u_eq, info


# ---------------------------------------------------------------------- MultiNest


def _run_multinest(
    evaluator: _Evaluator, transform: PriorTransform, *, nlive: int, dlogz: float, seed: int,
    progress: bool, checkpoint_path, resume: bool, maxiter, multinest_kwargs: Mapping,
):
    import pymultinest

    ndim = transform.ndim
    errors: list[BaseException] = []

    def loglike(cube, ndim_, nparams, lnew):
        u = np.array([cube[i] for i in range(ndim)], dtype=np.float64)
        try:
            return float(evaluator(u))
        except BaseException as e:  # noqa: BLE001  (an exception cannot cross the C callback)
            errors.append(e)
            return -1e300

    tmp = None
    if checkpoint_path is None:
        tmp = tempfile.mkdtemp(prefix="skymodel-multinest-")
        base = os.path.join(tmp, "mn-")
    else:
        pathlib.Path(checkpoint_path).mkdir(parents=True, exist_ok=True)
        base = os.path.join(str(checkpoint_path), "mn-")
    options = dict(
        n_live_points=nlive, evidence_tolerance=dlogz, sampling_efficiency=0.3,
        importance_nested_sampling=False, multimodal=True, const_efficiency_mode=False,
        outputfiles_basename=base, resume=bool(resume), verbose=bool(progress),
        seed=int(seed) % (2**31 - 1), max_iter=int(maxiter or 0),
    )
    options.update(multinest_kwargs)
    try:
        pymultinest.run(loglike, None, ndim, **options)
        if errors:
            raise errors[0]
        analyzer = pymultinest.Analyzer(n_params=ndim, outputfiles_basename=base, verbose=False)
        stats = analyzer.get_stats()
        post = np.atleast_2d(np.asarray(analyzer.get_equal_weighted_posterior(), dtype=np.float64))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "log_evidence": float(stats["nested sampling global log-evidence"]),
        "log_evidence_err": float(stats["nested sampling global log-evidence error"]),
        "n_likelihood_evals": int(evaluator.n_evals),
        "nlive": int(nlive),
        "batch_size": 1,
        "converged": not maxiter,
        "kish_ess": float(post.shape[0]),
    }
    return post[:, :ndim], info


# ---------------------------------------------------------------------- public entry


def run_nested(
    sky: SkyModel,
    obs: Observation,
    *,
    backend: str = "auto",
    nlive: int = 500,
    dlogz: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: float = 60.0,
    sample: str = "auto",
    batch_size: int | str = "auto",
    maxiter: int | None = None,
    maxcall: int | None = None,
    dynesty_kwargs: Mapping | None = None,
    multinest_kwargs: Mapping | None = None,
) -> Posterior:
    """Nested sampling of p(params | counts): evidence and equal-weight posterior samples.

    backend: "auto" (MultiNest if it loads, else dynesty; logged), "multinest", "dynesty".
    nlive: live points (> 2 x ndim, ndim = unit-cube dimensions). dlogz: stop when the
    estimated remaining evidence is below dlogz (nats; MultiNest's evidence_tolerance).
    sample: dynesty's proposal inside the multi-ellipsoid bounds: "unif" (MultiNest's),
    "rwalk", "slice", "rslice", or "auto" (unif below 10 dimensions, else rwalk).
    batch_size: points per vmapped likelihood call (dynesty queue_size); "auto" = 1 on
    CPU, 16 on an accelerator. maxiter / maxcall: optional caps (a capped run is marked
    diagnostics["converged"] = False). checkpoint_path: dynesty state file (pickle),
    saved every `checkpoint_every` seconds and at the end; for MultiNest a directory for
    its output files. resume=True continues from it (a missing file starts afresh).
    dynesty_kwargs / multinest_kwargs: passed on to dynesty.NestedSampler /
    pymultinest.run.

    Returns a Posterior (method "nested-dynesty" or "nested-multinest") with
    log_evidence, log_evidence_err (natural log) and diagnostics: log_evidence,
    log_evidence_err, n_likelihood_evals, wall_time (s), backend, backend_reason, nlive,
    niter, kish_ess (Kish effective sample size of the weighted samples), converged, ...
    """
    t0 = time.perf_counter()
    if not isinstance(sky, SkyModel):
        raise ValueError(f"sky must be a SkyModel, got {type(sky).__name__}")
    if not isinstance(obs, Observation):
        raise ValueError(f"obs must be an Observation, got {type(obs).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    transform = prior_transform(sky)
    ndim = transform.ndim
    nlive = _check_positive_int("nlive", nlive)
    if nlive <= 2 * ndim:
        raise ValueError(
            f"nlive={nlive} is too small for {ndim} unit-cube dimensions: multi-ellipsoid "
            f"nested sampling needs nlive > 2 x ndim = {2 * ndim} (a few hundred is typical)"
        )
    if isinstance(dlogz, bool) or not isinstance(dlogz, (int, float, np.floating)) or not (
        math.isfinite(dlogz) and dlogz > 0
    ):
        raise ValueError(f"dlogz must be a positive finite number, got {dlogz!r}")
    seed = _check_positive_int("seed", seed, minimum=0)
    if sample not in DYNESTY_SAMPLES:
        raise ValueError(f"sample must be one of {DYNESTY_SAMPLES}, got {sample!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    if not (isinstance(checkpoint_every, (int, float)) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {checkpoint_every!r}")
    maxiter = None if maxiter is None else _check_positive_int("maxiter", maxiter)
    maxcall = None if maxcall is None else _check_positive_int("maxcall", maxcall)
    B = _resolve_batch_size(batch_size)

    name, reason = select_backend(backend)
    if name == "multinest" and sample != "auto":
        raise ValueError(f"sample={sample!r} applies to the dynesty backend only")
    if name == "multinest" and maxcall is not None:
        raise ValueError("maxcall applies to the dynesty backend only (MultiNest: maxiter)")
    logger.info("nested sampling with %s (%s): %d dimensions, nlive=%d, dlogz=%g", name, reason, ndim, nlive, dlogz)

    evaluator = _Evaluator(cube_log_likelihood(sky, obs, transform), B if name == "dynesty" else 1, ndim, transform)
    fingerprint = _fingerprint(sky, obs, transform)
    if name == "dynesty":
        u_eq, info = _run_dynesty(
            evaluator, transform, fingerprint, nlive=nlive, dlogz=float(dlogz), seed=seed,
            progress=progress, checkpoint_path=checkpoint_path, resume=resume,
            checkpoint_every=checkpoint_every, sample=sample, maxiter=maxiter, maxcall=maxcall,
            dynesty_kwargs=dict(dynesty_kwargs or {}),
        )
    else:
        u_eq, info = _run_multinest(
            evaluator, transform, nlive=nlive, dlogz=float(dlogz), seed=seed, progress=progress,
            checkpoint_path=checkpoint_path, resume=resume, maxiter=maxiter,
            multinest_kwargs=dict(multinest_kwargs or {}),
        )
    samples = transform.batch(u_eq)
    wall = time.perf_counter() - t0
    info.update(backend=name, backend_reason=reason, dlogz=float(dlogz), ndim=ndim, wall_time=wall)
    return Posterior(
        samples=samples,
        method=f"nested-{name}",
        wall_time=wall,
        diagnostics=info,
        log_evidence=info["log_evidence"],
        log_evidence_err=info["log_evidence_err"],
        metadata={"seed": seed, "nlive": nlive, "dlogz": float(dlogz), "backend": name,
                  "sites": list(transform.names), "unit_dims": list(transform.unit_dims)},
    )


__all__ = [
    "BACKENDS",
    "MULTINEST_INSTALL",
    "BackendUnavailableError",
    "NonFiniteLikelihoodError",
    "PriorTransform",
    "cube_log_likelihood",
    "multinest_status",
    "prior_transform",
    "run_nested",
    "select_backend",
    "unit_transform",
]
