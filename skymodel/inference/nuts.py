"""Hamiltonian Monte Carlo with the No-U-Turn sampler (NumPyro NUTS)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import numpy as np
from numpyro.diagnostics import summary as numpyro_summary
from numpyro.infer import MCMC, NUTS
from numpyro.infer.initialization import init_to_value

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
) -> Posterior:
    """Sample p(params | counts) with NUTS.

    init: "median" (prior medians), "map" (a `run_map` fit of `map_steps` steps), "values"
    (the model's current values) or a dict site -> value. chain_method: None picks
    `default_chain_method(num_chains)`; "vectorized" is also accepted.
    The Posterior's diagnostics hold per-site "r_hat" and "ess" (numpyro.diagnostics, split
    chains), "divergences" (total and "divergences_per_chain"), "accept_prob" (mean),
    "num_chains", "num_warmup", "chain_method".
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
    if isinstance(init, str) and init == "map":
        from skymodel.inference.map import run_map

        strategy = init_to_value(values=run_map(sky, obs, num_steps=map_steps, seed=seed).values)
    else:
        strategy = init_strategy(init, sky)
    kernel = NUTS(model, target_accept_prob=float(target_accept), dense_mass=dense_mass,
                  init_strategy=strategy, max_tree_depth=int(max_tree_depth))
    mcmc = MCMC(kernel, num_warmup=int(num_warmup), num_samples=int(num_samples),
                num_chains=int(num_chains), chain_method=chain_method, progress_bar=progress)
    mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging", "accept_prob"))
    names = list(sky.free_parameters())
    grouped = {k: np.asarray(v, dtype=np.float64)
               for k, v in mcmc.get_samples(group_by_chain=True).items() if k in names}
    stats = numpyro_summary(grouped, group_by_chain=True)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    div = np.asarray(extra["diverging"]).reshape(int(num_chains), -1)
    diagnostics = {
        "r_hat": {k: np.asarray(stats[k]["r_hat"]) for k in names},
        "ess": {k: np.asarray(stats[k]["n_eff"]) for k in names},
        "divergences": int(div.sum()),
        "divergences_per_chain": div.sum(axis=1).astype(int).tolist(),
        "accept_prob": float(np.mean(extra["accept_prob"])),
        "num_chains": int(num_chains),
        "num_warmup": int(num_warmup),
        "chain_method": chain_method,
    }
    samples = {k: v.reshape((-1,) + v.shape[2:]) for k, v in grouped.items()}
    return Posterior(
        samples={k: samples[k] for k in names},
        method="nuts",
        wall_time=time.perf_counter() - t0,
        diagnostics=diagnostics,
        metadata={"target_accept": float(target_accept), "dense_mass": bool(dense_mass),
                  "seed": int(seed), "num_samples": int(num_samples)},
    )


__all__ = ["default_chain_method", "run_nuts"]
