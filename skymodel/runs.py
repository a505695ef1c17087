"""Runs: a config in, a run directory out (config copy, checkpoints, posterior, summary).

    run_fit("demo", "runs/demo")            # from Python
    skymodel fit --config demo --out runs/demo   # the same from the command line

A run directory holds everything needed to reproduce, resume or analyse the run:
  config.toml       the exact config used (with command-line overrides applied)
  checkpoint.npz    SVI state, saved every `checkpoint_every` steps and on Ctrl-C
  posterior/        samples + metadata (skymodel.inference.Posterior.save)
  summary.txt       parameter table (median, 68% and 95% intervals)
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from skymodel import config as C


def _write_config(cfg: Mapping, out: pathlib.Path, overrides: Mapping[str, Any]) -> None:
    text = cfg.get("_text", "")
    if overrides:
        text += "\n# command-line overrides of [inference]:\n# " + json.dumps(dict(overrides)) + "\n"
    (out / "config.toml").write_text(text)


def inference_settings(cfg: Mapping, overrides: Mapping[str, Any] | None = None) -> dict:
    inf = dict(cfg.get("inference", {}))
    inf.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return inf


def run_fit(
    config,
    out_dir: str | os.PathLike,
    *,
    method: str | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides,
):
    """Build the model from `config`, fit it, save the posterior in `out_dir`.

    method: "svi", "nuts" or "map" (default: the config's [inference].method).
    overrides: any [inference] key, e.g. num_steps=500, num_samples=2000.
    Returns (built, posterior).
    """
    from skymodel.inference import run_map, run_nuts, run_svi

    cfg = C.load_config(config) if not isinstance(config, Mapping) else dict(config)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inf = inference_settings(cfg, overrides)
    method = method or inf.get("method", "svi")
    _write_config(cfg, out, {**overrides, "method": method})
    built = C.build(cfg)
    seed = int(inf.get("seed", 0))
    t0 = time.perf_counter()
    if method == "svi":
        result = run_svi(
            built.sky,
            built.observation,
            guide=inf.get("guide", "iaf"),
            num_steps=int(inf.get("num_steps", 10_000)),
            learning_rate=float(inf.get("learning_rate", 3e-4)),
            clip_norm=inf.get("clip_norm", 10.0),
            num_particles=int(inf.get("num_particles", 1)),
            seed=seed,
            progress=progress,
            checkpoint_path=out / "checkpoint.npz",
            checkpoint_every=int(inf.get("checkpoint_every", 1000)),
            resume=resume,
        )
        posterior = result.posterior(int(inf.get("num_samples", 50_000)), seed=seed + 1)
    elif method == "nuts":
        posterior = run_nuts(
            built.sky,
            built.observation,
            num_warmup=int(inf.get("num_warmup", 500)),
            num_samples=int(inf.get("num_samples_nuts", inf.get("nuts_samples", 1000))),
            num_chains=int(inf.get("num_chains", 1)),
            seed=seed,
            progress=progress,
        )
    elif method == "map":
        res = run_map(
            built.sky,
            built.observation,
            num_steps=int(inf.get("num_steps", 2000)),
            learning_rate=float(inf.get("learning_rate", 1e-2)),
            seed=seed,
        )
        from skymodel.inference import Posterior
        import numpy as np

        posterior = Posterior(
            samples={k: np.asarray(v)[None] for k, v in res.values.items()}, method="map"
        )
    else:
        raise ValueError(f"unknown method {method!r} (svi, nuts, map)")
    posterior.wall_time = time.perf_counter() - t0
    posterior.metadata.update({"config": cfg.get("_text", ""), "method": method})
    posterior.save(out / "posterior")
    (out / "summary.txt").write_text(posterior.summary() + "\n")
    return built, posterior
