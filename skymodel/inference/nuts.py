"""Hamiltonian Monte Carlo with the No-U-Turn sampler (NumPyro NUTS), optionally
NeuTra-reparameterised by a fitted flow guide.

NeuTra (Hoffman et al. 2019): NUTS samples the guide's base variable z ~ N(0, I), and the
model sees x = T(z) with T the guide's (flow) transform, so a guide close to the posterior
leaves NUTS a nearly isotropic Gaussian to explore. The samples are mapped back to the
model's parameters; R-hat and ESS are computed on those.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.diagnostics import summary as numpyro_summary
from numpyro.infer import MCMC, NUTS
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_sample, init_to_value
from numpyro.infer.reparam import NeuTraReparam

from skymodel.inference.posterior import Posterior
from skymodel.inference.svi import _model_fn, init_strategy
from skymodel.model import SkyModel
from skymodel.observation import Observation


def default_chain_method(num_chains: int) -> str:
    """"parallel" when there is one device per chain (e.g. several GPUs), else
    "sequential" (one CPU or one GPU: chains run one after the other)."""
    return "parallel" if num_chains > 1 and jax.local_device_count() >= num_chains else "sequential"


def run_nuts(
    sky: SkyModel,
    obs: Observation,
    *,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    seed: int = 0,
    progress: bool = True,
    init: str | Mapping = "median",
    target_accept: float = 0.8,
    dense_mass: bool = False,
    max_tree_depth: int = 10,
    chain_method: str | None = None,
    map_steps: int = 2000,
    neutra=None,
) -> Posterior:
    """Sample p(params | counts) with NUTS.

    init: "median" (prior medians), "map" (a `run_map` fit of `map_steps` steps), "values"
    (the model's current values) or a dict site -> value. chain_method: None picks
    `default_chain_method(num_chains)`; "vectorized" is also accepted.
    neutra: None, or (guide, params) of a fitted AutoContinuous guide (e.g. from
    `SVIResult` or `svi.load_guide`): NeuTra reparameterisation; the chains then start at
    independent draws from the guide and `init` must be left at "median".
    The Posterior's diagnostics hold per-site "r_hat" and "ess" (numpyro.diagnostics, split
    chains), "divergences" (total and "divergences_per_chain"), "accept_prob" (mean),
    "mean_tree_size" (leapfrog steps per sample), "step_size" (adapted, per chain),
    "num_chains", "num_warmup", "chain_method", "neutra".
    """
    for name, v in (("num_warmup", num_warmup), ("num_samples", num_samples), ("num_chains", num_chains)):
        if not isinstance(v, (int, np.integer)) or v < (0 if name == "num_warmup" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'num_warmup' else 'positive'} int, got {v!r}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
    if chain_method is None:
        chain_method = default_chain_method(num_chains)
    if chain_method not in ("sequential", "parallel", "vectorized"):
        raise ValueError(f"chain_method must be sequential, parallel or vectorized, got {chain_method!r}")
    t0 = time.perf_counter()
    model = _model_fn(sky, obs)
    names = list(sky.free_parameters())
    reparam = None
    if neutra is not None:
        if not (isinstance(neutra, tuple) and len(neutra) == 2):
            raise ValueError("neutra must be a (guide, params) pair of a fitted AutoContinuous guide")
        guide, params = neutra
        if not isinstance(guide, AutoContinuous):
            raise ValueError(
                f"NeuTra needs a flow or Gaussian guide over all parameters (iaf, bnaf, mvn: "
                f"an AutoContinuous), got {type(guide).__name__}"
            )
        if not (isinstance(init, str) and init == "median"):
            raise ValueError("init cannot be set with neutra: the chains start at draws from the guide")
        if guide.prototype_trace is None:
            raise ValueError("the NeuTra guide has not been fitted or traced yet")
        missing = [k for k in names if k not in guide.prototype_trace]
        if missing:
            raise ValueError(f"the NeuTra guide was built for another model: it lacks sites {missing}")
        reparam = NeuTraReparam(guide, params)
        model = reparam.reparam(model)
        strategy = init_to_sample
    elif isinstance(init, str) and init == "map":
        from skymodel.inference.map import run_map

        strategy = init_to_value(values=run_map(sky, obs, num_steps=map_steps, seed=seed).values)
    else:
        strategy = init_strategy(init, sky)
    kernel = NUTS(model, target_accept_prob=float(target_accept), dense_mass=dense_mass,
                  init_strategy=strategy, max_tree_depth=int(max_tree_depth))
    mcmc = MCMC(kernel, num_warmup=int(num_warmup), num_samples=int(num_samples),
                num_chains=int(num_chains), chain_method=chain_method, progress_bar=progress)
    mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging", "accept_prob", "num_steps"))
    raw = mcmc.get_samples(group_by_chain=True)
    if reparam is not None:
        latent = raw[f"{reparam.guide.prefix}_shared_latent"]
        raw = reparam.transform_sample(jnp.asarray(latent))
    grouped = {k: np.asarray(raw[k], dtype=np.float64) for k in names}
    stats = numpyro_summary(grouped, group_by_chain=True)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    div = np.asarray(extra["diverging"]).reshape(int(num_chains), -1)
    step_size = np.ravel(np.asarray(mcmc.last_state.adapt_state.step_size, dtype=np.float64))
    diagnostics = {
        "r_hat": {k: np.asarray(stats[k]["r_hat"]) for k in names},
        "ess": {k: np.asarray(stats[k]["n_eff"]) for k in names},
        "divergences": int(div.sum()),
        "divergences_per_chain": div.sum(axis=1).astype(int).tolist(),
        "accept_prob": float(np.mean(extra["accept_prob"])),
        "mean_tree_size": float(np.mean(extra["num_steps"])),
        "step_size": step_size.tolist(),
        "num_chains": int(num_chains),
        "num_warmup": int(num_warmup),
        "chain_method": chain_method,
        "neutra": reparam is not None,
    }
    samples = {k: v.reshape((-1,) + v.shape[2:]) for k, v in grouped.items()}
    return Posterior(
        samples={k: samples[k] for k in names},
        method="nuts-neutra" if reparam is not None else "nuts",
        wall_time=time.perf_counter() - t0,
        diagnostics=diagnostics,
        metadata={"target_accept": float(target_accept), "dense_mass": bool(dense_mass),
                  "seed": int(seed), "num_samples": int(num_samples)},
    )


def format_diagnostics(diagnostics: Mapping) -> str:
    """A few lines on a NUTS run: divergences, acceptance, tree size, worst R-hat and ESS."""
    d = diagnostics
    lines = [
        f"NUTS: {d.get('num_chains', '?')} chain(s) ({d.get('chain_method', '?')}), "
        f"{d.get('num_warmup', '?')} warmup steps" + (", NeuTra" if d.get("neutra") else ""),
        f"divergences: {d.get('divergences', '?')} (per chain {d.get('divergences_per_chain', '?')})",
        f"mean acceptance {d.get('accept_prob', float('nan')):.3f}, mean leapfrog steps per sample "
        f"{d.get('mean_tree_size', float('nan')):.1f}",
    ]
    rhat = {k: np.max(np.asarray(v, dtype=float)) for k, v in d.get("r_hat", {}).items()}
    ess = {k: np.min(np.asarray(v, dtype=float)) for k, v in d.get("ess", {}).items()}
    if rhat:
        worst = max(rhat, key=lambda k: np.nan_to_num(rhat[k], nan=np.inf))
        lines.append(f"max R-hat {rhat[worst]:.4f} ({worst})" + (
            "  WARNING: R-hat > 1.01, chains disagree" if not rhat[worst] <= 1.01 else ""))
    if ess:
        low = min(ess, key=lambda k: np.nan_to_num(ess[k], nan=-np.inf))
        lines.append(f"min ESS {ess[low]:.0f} ({low})")
    return "\n".join(lines)


__all__ = ["default_chain_method", "format_diagnostics", "run_nuts"]
