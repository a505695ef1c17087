"""Stochastic variational inference (NumPyro SVI) with checkpointing and resume.

The optimisation runs in jitted chunks (`lax.scan` over `svi.update`), so Python only
sees the loop once per chunk: to update the progress bar, write checkpoints, check for a
non-finite loss and call the user's callback.

A checkpoint is one `.npz` file (written atomically) holding every leaf of the SVI state
(guide parameters, optimiser state, PRNG key), the step reached, the loss history and a
JSON description of the run; `resume=True` continues it to `num_steps`. Because the state
carries the PRNG key and the chunks are aligned to the checkpoint interval, a resumed run
gives the same result as an uninterrupted one with the same seed.

Guides: "iaf" (inverse autoregressive flow, the paper's), "bnaf" (block neural
autoregressive flow), "mvn", "normal", "delta". Tempering: the likelihood factor of the
model ("loglike") is scaled by a temperature beta that rises from `beta0` to 1 over the
first `temper_steps` steps (`temperature_schedule`), so the early optimisation sees a
flattened posterior; the prior and the guide entropy are not scaled. Losses recorded during
the annealing are those of the tempered objective.

The fitted guide's parameters are saved by `save_guide_params` and rebuilt, on the same
model, by `load_guide` (e.g. for NeuTra-reparameterised NUTS, `run_nuts(neutra=...)`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.optim
import optax
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoBNAFNormal,
    AutoContinuous,
    AutoDelta,
    AutoGuide,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.initialization import init_to_median, init_to_value
from numpyro.primitives import Messenger

from skymodel._io import atomic_write
from skymodel.inference._progress import format_loss, progress_bar
from skymodel.inference.posterior import Posterior
from skymodel.model import SkyModel, numpyro_model
from skymodel.observation import Observation

_CHECKPOINT_FORMAT = "skymodel-svi-checkpoint/1"
_GUIDE_FORMAT = "skymodel-guide-params/1"
LIKELIHOOD_SITE = "loglike"  # the factor through which numpyro_model adds log L


class NonFiniteLossError(FloatingPointError):
    """The SVI loss became NaN or infinite; the last good state is kept (and saved)."""


# ---------------------------------------------------------------------- helpers


def _prior_model(sky: SkyModel) -> Callable[..., None]:
    """A NumPyro model with the same latent sites as `numpyro_model` (same names, priors and
    order) and no likelihood; extra arguments are ignored.

    Guides are set up (prototype trace, initial locations) and SVI states initialised on
    it: NumPyro would otherwise evaluate the likelihood and its gradient eagerly there,
    which compiles it a second time besides the jitted training loop (minutes for NPTF
    models on a CPU)."""
    priors = [(k, p.prior.to_numpyro()) for k, p in sky.free_parameters().items()]

    def prior_model(*args, **kwargs):
        for name, d in priors:
            numpyro.sample(name, d)

    return prior_model


def _model_fn(sky: SkyModel, obs: Observation) -> Callable[[], None]:
    if not sky.free_parameters():
        raise ValueError("the SkyModel has no free parameters (no Param with a prior)")
    return functools.partial(numpyro_model, sky, obs)


class _ScaleSite(Messenger):
    """Multiply the log-density of one named site by `scale` (leaves every other site)."""

    def __init__(self, fn=None, *, site: str, scale, seen: list | None = None):
        self.site = site
        self.scale = scale
        self.seen = seen
        super().__init__(fn)

    def process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = self.scale if msg.get("scale") is None else self.scale * msg["scale"]
            if self.seen is not None:
                self.seen.append(True)


def tempered_model(model: Callable[[], None], site: str = LIKELIHOOD_SITE):
    """`model` as a function of the likelihood temperature: `tempered(beta)` runs `model()`
    with the log-density of `site` (the likelihood factor) multiplied by beta.

    The returned function has an attribute `seen` (a list) that records, at trace time,
    that the site was found, so a renamed likelihood site cannot go unnoticed."""
    seen: list = []

    def tempered(beta=1.0):
        with _ScaleSite(site=site, scale=beta, seen=seen):
            model()

    tempered.seen = seen
    return tempered


_SCHEDULES = ("geometric", "linear")


def temperature_schedule(
    steps, beta0: float, temper_steps: int, kind: str = "geometric"
) -> np.ndarray:
    """Likelihood temperature at 0-based optimisation `steps` (int array, any shape).

    beta = beta0 at step 0, rising to 1 at step `temper_steps` and 1 afterwards:
    "geometric": beta0^(1 - s/N) (log-linear; natural for beta0 << 1);
    "linear": beta0 + (1 - beta0) s/N. `temper_steps = 0` means no tempering (all 1).
    """
    if kind not in _SCHEDULES:
        raise ValueError(f"temper_schedule must be one of {_SCHEDULES}, got {kind!r}")
    if not (isinstance(beta0, (int, float, np.floating)) and 0.0 < float(beta0) <= 1.0):
        raise ValueError(f"beta0 must lie in (0, 1], got {beta0!r}")
    if not isinstance(temper_steps, (int, np.integer)) or temper_steps < 0:
        raise ValueError(f"temper_steps must be a non-negative int, got {temper_steps!r}")
    s = np.asarray(steps, dtype=np.float64)
    if temper_steps == 0:
        return np.ones_like(s)
    t = np.clip(s / float(temper_steps), 0.0, 1.0)
    if kind == "geometric":
        return np.asarray(np.exp((1.0 - t) * np.log(float(beta0))))
    return np.asarray(float(beta0) + (1.0 - float(beta0)) * t)


def init_strategy(init, sky: SkyModel):
    """NumPyro init strategy from "median", "prior" (current Param values) or a dict of
    values (site name -> array)."""
    if isinstance(init, str):
        if init == "median":
            return init_to_median(num_samples=15)
        if init == "values":
            return init_to_value(values=sky.parameter_values())
        raise ValueError(f"init must be 'median', 'values' or a dict of values, got {init!r}")
    if isinstance(init, Mapping):
        params = sky.free_parameters()
        unknown = [k for k in init if k not in params]
        if unknown:
            raise KeyError(f"unknown parameter(s) {unknown} in init; valid names: {list(params)}")
        return init_to_value(values={k: jnp.asarray(v, jnp.float64) for k, v in init.items()})
    raise ValueError(f"init must be 'median', 'values' or a dict of values, got {init!r}")


def make_guide(
    model,
    guide: str | AutoGuide,
    *,
    init_loc_fn=None,
    num_flows: int = 5,
    hidden_dims=(128, 128),
    hidden_factors=(8, 8),
) -> AutoGuide:
    """An autoguide: "normal" (AutoNormal), "mvn" (AutoMultivariateNormal), "iaf"
    (AutoIAFNormal with `num_flows` flows of `hidden_dims`), "bnaf" (AutoBNAFNormal with
    `num_flows` flows of `hidden_factors` hidden units per latent dimension), "delta"
    (AutoDelta, MAP), or an AutoGuide instance (returned as is)."""
    if isinstance(guide, AutoGuide):
        return guide
    kw = {} if init_loc_fn is None else {"init_loc_fn": init_loc_fn}
    if guide == "normal":
        return AutoNormal(model, **kw)
    if guide == "mvn":
        return AutoMultivariateNormal(model, **kw)
    if guide == "iaf":
        return AutoIAFNormal(model, num_flows=int(num_flows), hidden_dims=list(hidden_dims), **kw)
    if guide == "bnaf":
        return AutoBNAFNormal(model, num_flows=int(num_flows), hidden_factors=[int(h) for h in hidden_factors], **kw)
    if guide == "delta":
        return AutoDelta(model, **kw)
    raise ValueError(
        f"guide must be 'iaf', 'bnaf', 'normal', 'mvn', 'delta' or an AutoGuide, got {guide!r}"
    )


GUIDES = ("iaf", "bnaf", "mvn", "normal", "delta")


def _optimizer(learning_rate, clip_norm: float | None):
    if not callable(learning_rate):
        if not (isinstance(learning_rate, (int, float, np.floating)) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number or an optax schedule, got {learning_rate!r}")
        learning_rate = float(learning_rate)
    parts = []
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
        parts.append(optax.clip_by_global_norm(float(clip_norm)))
    parts.append(optax.adam(learning_rate))
    return numpyro.optim.optax_to_numpyro(optax.chain(*parts))


def _chunk_runner(svi: SVI, tempered: bool = False):
    """jitted (state, n, betas) -> (state, losses): n SVI steps; with `tempered` the model
    takes the temperature as its argument and step i of the chunk uses betas[i]."""

    @functools.partial(jax.jit, static_argnums=1)
    def run(state, n, betas):
        if tempered:
            return jax.lax.scan(lambda s, beta: svi.update(s, beta), state, betas)
        return jax.lax.scan(lambda s, _: svi.update(s), state, None, length=n)

    return run


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state, step: int, losses: np.ndarray, meta: dict) -> None:
    """Write the SVI state, step and losses to `path` (.npz) atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]
    meta = dict(meta, format=_CHECKPOINT_FORMAT, step=int(step), n_leaves=len(leaves))
    arrays = {f"leaf_{i}": x for i, x in enumerate(leaves)}
    arrays["losses"] = np.asarray(losses, dtype=np.float64)
    arrays["meta"] = np.asarray(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path, template_state, expect: dict | None = None):
    """Read a checkpoint written by `save_checkpoint` into the structure of
    `template_state`. Returns (state, step, losses, meta)."""
    with np.load(pathlib.Path(path), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a skymodel SVI checkpoint")
        for k, v in (expect or {}).items():
            if meta.get(k) != v:
                raise ValueError(
                    f"checkpoint {path} was written with {k}={meta.get(k)!r}, this run has {v!r}"
                )
        leaves, treedef = jax.tree_util.tree_flatten(template_state)
        if meta["n_leaves"] != len(leaves):
            raise ValueError(
                f"checkpoint {path} has {meta['n_leaves']} state arrays, this run's SVI state "
                f"has {len(leaves)} (different guide or model?)"
            )
        new = []
        for i, ref in enumerate(leaves):
            x = z[f"leaf_{i}"]
            if x.shape != np.shape(ref):
                raise ValueError(
                    f"checkpoint {path}: state array {i} has shape {x.shape}, expected {np.shape(ref)}"
                )
            new.append(jnp.asarray(x, dtype=jnp.asarray(ref).dtype))
        losses = np.array(z["losses"])
    return jax.tree_util.tree_unflatten(treedef, new), int(meta["step"]), losses, meta


# ---------------------------------------------------------------------- the loop


def _optimise(
    svi: SVI,
    state,
    *,
    num_steps: int,
    start: int,
    losses: np.ndarray,
    chunk_size: int,
    checkpoint_every: int | None,
    save: Callable[[Any, int, np.ndarray], None] | None,
    progress: bool,
    desc: str,
    callback: Callable[[int, np.ndarray], None] | None,
    temperature: Callable[[np.ndarray], np.ndarray] | None = None,
):
    """Run `svi` from `state` (at step `start`) to `num_steps` in jitted chunks.

    temperature: None (the model takes no argument), or a function from 0-based step
    numbers to likelihood temperatures passed to the model (see `tempered_model`)."""
    run = _chunk_runner(svi, tempered=temperature is not None)
    history = [np.asarray(losses, dtype=np.float64)]
    step = start
    bar = progress_bar(num_steps, initial=start, desc=desc, enabled=progress)

    def all_losses():
        return np.concatenate(history)

    try:
        while step < num_steps:
            # chunks on a fixed grid, so interrupted + resumed runs repeat the same chunks
            n = min(chunk_size - step % chunk_size, num_steps - step)
            if checkpoint_every:
                n = min(n, checkpoint_every - step % checkpoint_every)
            try:
                betas = None
                if temperature is not None:
                    betas = jnp.asarray(temperature(np.arange(step, step + n)), jnp.float64)
                new_state, chunk = run(state, n, betas)
                chunk = np.asarray(chunk, dtype=np.float64)
            except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as e:
                # a runtime check in the model (eqx.error_if, e.g. a NaN expected count)
                where = ""
                if save is not None:
                    save(state, step, all_losses())
                    where = f"; the last good state (step {step}) is in the checkpoint"
                raise NonFiniteLossError(
                    f"the model failed a runtime check between steps {step + 1} and {step + n}"
                    f"{where}: {str(e).splitlines()[-1] if str(e) else e!r}"
                ) from e
            bad = np.flatnonzero(~np.isfinite(chunk))
            if bad.size:
                where = ""
                if save is not None:
                    save(state, step, all_losses())
                    where = f"; the last good state (step {step}) is in the checkpoint"
                raise NonFiniteLossError(
                    f"SVI loss became {chunk[bad[0]]} at step {step + int(bad[0]) + 1}{where}. "
                    "Try a smaller learning_rate, a tighter clip_norm or another init."
                )
            state, step = new_state, step + n
            history.append(chunk)
            bar.update(n)
            post = format_loss(float(chunk[-1]))
            if temperature is not None:
                beta = float(temperature(np.asarray(step - 1)))
                if beta < 1.0:
                    post += f" beta={beta:.3g}"
            bar.set_postfix_str(post)
            if save is not None and checkpoint_every and step % checkpoint_every == 0:
                save(state, step, all_losses())
            if callback is not None:
                callback(step, chunk)
    except KeyboardInterrupt:
        if save is not None:
            save(state, step, all_losses())
        raise
    finally:
        bar.close()
    if save is not None:
        save(state, step, all_losses())
    return state, all_losses()


# ---------------------------------------------------------------------- sampling a guide


def _draw_function(guide: AutoGuide, params: dict, sky: SkyModel):
    """jit-able (key, n) -> dict site -> (n, *shape) constrained draws from the guide.

    Transforms the guide's unconstrained draws with `biject_to(prior.support)` directly
    (NumPyro's own `sample_posterior` re-runs the model, i.e. the likelihood, per draw)."""
    priors = {k: p.prior.to_numpyro() for k, p in sky.free_parameters().items()}

    if isinstance(guide, AutoNormal):
        def draw(key, n):
            keys = jax.random.split(key, len(priors))
            out = {}
            for kk, (k, d) in zip(keys, priors.items()):
                loc = params[f"{k}_{guide.prefix}_loc"]
                scale = params[f"{k}_{guide.prefix}_scale"]
                u = loc + scale * jax.random.normal(kk, (n,) + jnp.shape(loc))
                out[k] = biject_to(d.support)(u)
            return out
    elif isinstance(guide, AutoContinuous):
        def draw(key, n):
            latent = handlers.substitute(handlers.seed(guide._sample_latent, key), params)(
                sample_shape=(n,)
            )
            unpacked = jax.vmap(guide._unpack_latent)(latent)
            return {k: biject_to(d.support)(unpacked[k]) for k, d in priors.items()}
    elif isinstance(guide, AutoDelta):
        def draw(key, n):
            return {
                k: jnp.broadcast_to(params[f"{k}_{guide.prefix}_loc"], (n,) + d.event_shape)
                for k, d in priors.items()
            }
    else:
        def draw(key, n):
            s = guide.sample_posterior(key, params, sample_shape=(n,))
            return {k: s[k] for k in priors}

    return jax.jit(draw, static_argnums=1)


def sample_guide(guide, params, sky: SkyModel, num_samples: int, seed: int = 0, batch_size: int = 10_000):
    """Draw `num_samples` constrained samples from a fitted guide, in batches."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    draw = _draw_function(guide, params, sky)
    key = jax.random.PRNGKey(seed)
    out: dict[str, list] = {}
    done = 0
    while done < num_samples:
        n = min(batch_size, num_samples - done)
        key, sub = jax.random.split(key)
        for k, v in draw(sub, n).items():
            out.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
        done += n
    return {k: np.concatenate(out[k]) for k in sky.free_parameters()}


# ---------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class SVIResult:
    """Result of `run_svi`: the fitted guide and its parameters, and the loss history.

    losses: (num_steps,) negative ELBO per step (nats). params: guide parameters
    (constrained), site-param name -> numpy array.
    """

    guide_name: str
    guide: AutoGuide
    params: dict
    losses: np.ndarray
    sky: SkyModel
    wall_time: float
    config: dict

    def posterior(self, num_samples: int = 10_000, seed: int = 0, batch_size: int = 10_000) -> Posterior:
        """Draw `num_samples` from the fitted guide as a Posterior."""
        samples = sample_guide(self.guide, self.params, self.sky, num_samples, seed, batch_size)
        return Posterior(
            samples=samples,
            method=f"svi-{self.guide_name}",
            wall_time=self.wall_time,
            diagnostics={"final_loss": float(self.losses[-1]) if self.losses.size else float("nan"),
                         "num_steps": int(self.losses.size)},
            metadata=dict(self.config),
        )


def run_svi(
    sky: SkyModel,
    obs: Observation,
    *,
    guide: str | AutoGuide = "iaf",
    num_steps: int = 10_000,
    learning_rate: float | Callable = 3e-4,
    clip_norm: float | None = 10.0,
    num_particles: int = 1,
    seed: int = 0,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    chunk_size: int = 100,
    num_flows: int = 5,
    hidden_dims=(128, 128),
    hidden_factors=(8, 8),
    beta0: float = 1.0,
    temper_steps: int = 0,
    temper_schedule: str = "geometric",
    init: str | Mapping = "median",
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> SVIResult:
    """Fit a variational guide to p(params | counts) by maximising the ELBO.

    guide: "iaf" (AutoIAFNormal, `num_flows` flows, `hidden_dims`), "bnaf"
    (AutoBNAFNormal, `num_flows` flows, `hidden_factors`), "normal" (mean-field
    AutoNormal), "mvn" (AutoMultivariateNormal) or an AutoGuide built on
    `functools.partial(numpyro_model, sky, obs)` (without tempering) or on
    `tempered_model(...)` of it (with tempering). Optimiser: Adam(`learning_rate`: a
    number or an optax schedule) after clipping the global gradient norm to `clip_norm`.
    `num_particles` ELBO particles (vectorised).

    Tempering: with `temper_steps` > 0 the likelihood is raised to the power
    beta = `temperature_schedule(step, beta0, temper_steps, temper_schedule)`, from
    `beta0` at step 0 to 1 at step `temper_steps` (and 1 afterwards).

    Steps run in jitted chunks of `chunk_size`; with `checkpoint_path` (.npz) the state
    is saved atomically every `checkpoint_every` steps, at the end and on
    KeyboardInterrupt; `resume=True` continues from it to `num_steps` (the checkpoint
    must come from the same guide, optimiser, tempering, particles and seed).
    `callback(step, chunk_losses)` runs after each chunk. A NaN loss raises
    NonFiniteLossError.
    """
    for name, v in (("num_steps", num_steps), ("chunk_size", chunk_size), ("num_particles", num_particles)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if checkpoint_path is not None and (not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    temperature_schedule(0, float(beta0), temper_steps, temper_schedule)  # validates the three
    tempering = int(temper_steps) > 0 and float(beta0) < 1.0
    if isinstance(guide, str) and guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES} or an AutoGuide, got {guide!r}")
    t0 = time.perf_counter()
    base = _model_fn(sky, obs)
    model = tempered_model(base) if tempering else base
    prior_only = _prior_model(sky)
    g = make_guide(prior_only, guide, init_loc_fn=init_strategy(init, sky), num_flows=num_flows,
                   hidden_dims=hidden_dims, hidden_factors=hidden_factors)
    guide_name = guide if isinstance(guide, str) else type(guide).__name__
    # initialise on the prior-only model (same sites; the state holds guide parameters
    # only), then train on the real one: the likelihood is compiled once, in the loop
    svi = SVI(prior_only, g, _optimizer(learning_rate, clip_norm), Trace_ELBO(num_particles=int(num_particles)))
    state = svi.init(jax.random.PRNGKey(seed), *((1.0,) if tempering else ()))
    svi.model = model

    user_callback = callback

    def callback(step, chunk):
        if tempering and not model.seen:
            raise RuntimeError(
                f"tempering needs the likelihood factor {LIKELIHOOD_SITE!r} in the model, but "
                "the model has no such site (has skymodel.model.numpyro_model renamed it?)"
            )
        if user_callback is not None:
            user_callback(step, chunk)
    config = {
        "method": "svi",
        "guide": guide_name,
        "sites": list(sky.free_parameters()),
        "learning_rate": "schedule" if callable(learning_rate) else float(learning_rate),
        "clip_norm": None if clip_norm is None else float(clip_norm),
        "num_particles": int(num_particles),
        "seed": int(seed),
        "num_flows": int(num_flows) if guide_name in ("iaf", "bnaf") else None,
        "hidden_dims": [int(h) for h in hidden_dims] if guide_name == "iaf" else None,
        "hidden_factors": [int(h) for h in hidden_factors] if guide_name == "bnaf" else None,
        "beta0": float(beta0) if tempering else 1.0,
        "temper_steps": int(temper_steps) if tempering else 0,
        "temper_schedule": str(temper_schedule) if tempering else None,
    }
    start, losses = 0, np.zeros(0)
    if resume and pathlib.Path(checkpoint_path).exists():
        expect = {k: config[k] for k in ("guide", "sites", "learning_rate", "clip_norm", "num_particles",
                                          "seed", "num_flows", "hidden_dims", "hidden_factors",
                                          "beta0", "temper_steps", "temper_schedule")}
        state, start, losses, _ = load_checkpoint(checkpoint_path, state, expect)
    save = None
    if checkpoint_path is not None:
        def save(s, step, ls):
            save_checkpoint(checkpoint_path, s, step, ls, dict(config, num_steps=int(num_steps)))

    temperature = None
    if tempering:
        def temperature(steps):
            return temperature_schedule(steps, float(beta0), int(temper_steps), str(temper_schedule))

    state, losses = _optimise(
        svi, state, num_steps=int(num_steps), start=start, losses=losses, chunk_size=int(chunk_size),
        checkpoint_every=int(checkpoint_every) if checkpoint_path is not None else None,
        save=save, progress=progress, desc=f"SVI ({guide_name})", callback=callback,
        temperature=temperature,
    )
    params = jax.tree_util.tree_map(np.asarray, svi.get_params(state))
    return SVIResult(
        guide_name=guide_name, guide=g, params=params, losses=losses, sky=sky,
        wall_time=time.perf_counter() - t0, config=config,
    )


# ---------------------------------------------------------------------- saved guides


def save_guide_params(path, result: SVIResult) -> pathlib.Path:
    """Save a fitted guide's parameters and its description (guide kind, flows, sites)
    to `path` (.npz, atomically), for `load_guide`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat, _ = jax.tree_util.tree_flatten_with_path(result.params)
    names = [jax.tree_util.keystr(k) for k, _ in flat]
    meta = dict(result.config, format=_GUIDE_FORMAT, names=names,
                shapes=[list(np.shape(v)) for _, v in flat])
    arrays = {f"p{i}": np.asarray(v) for i, (_, v) in enumerate(flat)}
    arrays["meta"] = np.asarray(json.dumps(meta))
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_guide(sky: SkyModel, obs: Observation, path, seed: int = 0):
    """Rebuild a guide saved by `save_guide_params` on the model of (`sky`, `obs`).

    Returns (guide, params, meta). The sky model must have the same free parameters
    (site names) as the one the guide was fitted to (ValueError otherwise). `obs` is
    not evaluated (the guide is traced on the prior-only version of the model).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved guide parameters at {path}")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != _GUIDE_FORMAT:
            raise ValueError(f"{path} is not a skymodel guide-parameter file")
        arrays = [np.array(z[f"p{i}"]) for i in range(len(meta["names"]))]
    sites = list(sky.free_parameters())
    if meta["sites"] != sites:
        raise ValueError(
            f"the guide in {path} was fitted to sites {meta['sites']}, this model has {sites}"
        )
    if meta["guide"] not in GUIDES:
        raise ValueError(f"{path}: cannot rebuild a guide of kind {meta['guide']!r}")
    g = make_guide(_prior_model(sky), meta["guide"], init_loc_fn=init_to_median(num_samples=15),
                   num_flows=meta.get("num_flows") or 5, hidden_dims=meta.get("hidden_dims") or (128, 128),
                   hidden_factors=meta.get("hidden_factors") or (8, 8))
    tr = handlers.trace(handlers.seed(g, jax.random.PRNGKey(seed))).get_trace()
    template = {k: v["value"] for k, v in tr.items() if v["type"] == "param"}
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(k) for k, _ in flat]
    if names != meta["names"]:
        raise ValueError(f"{path}: saved guide parameters {meta['names']} do not match the rebuilt guide's {names}")
    for n, (_, ref), a in zip(names, flat, arrays):
        if np.shape(ref) != a.shape:
            raise ValueError(f"{path}: guide parameter {n} has shape {a.shape}, expected {np.shape(ref)}")
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])
    return g, params, meta


__all__ = [
    "GUIDES",
    "LIKELIHOOD_SITE",
    "NonFiniteLossError",
    "SVIResult",
    "load_guide",
    "save_guide_params",
    "tempered_model",
    "temperature_schedule",
    "load_checkpoint",
    "make_guide",
    "run_svi",
    "sample_guide",
    "save_checkpoint",
]
