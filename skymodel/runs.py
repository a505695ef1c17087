"""Runs: a config in, a run directory out (config copy, checkpoints, posterior, summary).

    run_fit("demo", "runs/demo")                    # from Python
    skymodel fit --config demo --out runs/demo      # the same from the command line
    skymodel fit --out runs/demo --resume           # continue it (config taken from the run)

A run directory holds everything needed to reproduce, resume or analyse the run:
  config.toml        the config text used (command-line overrides noted at the end)
  run.json           method, effective [inference] settings and overrides, status
                     ("running", "interrupted", "failed", "done"), times; wall_time is
                     the total over all sessions (a resume adds to it)
  checkpoint.npz     SVI state, saved every `checkpoint_every` steps, at the end and on Ctrl-C
  losses.npy         SVI loss per step (negative ELBO, nats; tempered while annealing)
  guide_params.npz   the fitted guide (skymodel.inference.svi.load_guide rebuilds it)
  posterior/         samples + metadata (skymodel.inference.Posterior.save)
  diagnostics.json   NUTS: R-hat, ESS, divergences, acceptance (also in the posterior)
  summary.txt        parameter table (median, 68% and 95% intervals; R-hat, ESS for NUTS)

The [inference] table of a config (all keys optional):
  method            "svi" (default), "nuts", "map" or "nested"
  seed              PRNG seed (default 0)
  SVI: guide ("iaf", "bnaf", "mvn", "normal"), num_steps, learning_rate, lr_schedule
    ("constant" or "cosine"), clip_norm, num_particles, num_flows, hidden_dims (iaf),
    hidden_factors (bnaf), beta0 / temper_steps / temper_schedule (likelihood tempering,
    see skymodel.inference.svi), checkpoint_every, chunk_size, num_samples (posterior
    draws from the guide, default 50,000)
  NUTS: num_warmup, nuts_samples (per chain), num_chains, target_accept, dense_mass,
    max_tree_depth, chain_method, init ("median" or "map"), map_steps
  nested sampling (skymodel.inference.nested): nlive, dlogz, nested_backend ("auto",
    "dynesty", "multinest"), nested_sample ("auto", "unif", "rwalk", ...), maxcall; the
    sampler's state is checkpointed to nested_checkpoint.pkl (dynesty) or nested_multinest/
    and `resume` continues it
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import re
import time
import tomllib
from collections.abc import Mapping
from typing import Any

import numpy as np

from skymodel import config as C

RUN_FORMAT = "skymodel-run/1"

SVI_KEYS = (
    "guide", "num_steps", "learning_rate", "lr_schedule", "clip_norm", "num_particles",
    "num_flows", "hidden_dims", "hidden_factors", "beta0", "temper_steps", "temper_schedule",
    "checkpoint_every", "chunk_size", "num_samples",
)
NUTS_KEYS = (
    "num_warmup", "nuts_samples", "num_samples_nuts", "num_chains", "target_accept", "dense_mass",
    "max_tree_depth", "chain_method", "init", "map_steps",
)
NESTED_KEYS = ("nlive", "dlogz", "nested_backend", "nested_sample", "maxcall")
INFERENCE_KEYS = ("method", "seed") + SVI_KEYS + NUTS_KEYS + NESTED_KEYS
METHODS = ("svi", "nuts", "map", "nested")

DEFAULTS: dict[str, Any] = {
    "method": "svi",
    "seed": 0,
    "guide": "iaf",
    "num_steps": 10_000,
    "learning_rate": 3e-4,
    "lr_schedule": "constant",
    "clip_norm": 10.0,
    "num_particles": 1,
    "num_flows": 5,
    "hidden_dims": [128, 128],
    "hidden_factors": [8, 8],
    "beta0": 1.0,
    "temper_steps": 0,
    "temper_schedule": "geometric",
    "checkpoint_every": 1000,
    "chunk_size": 100,
    "num_samples": 50_000,
    "num_warmup": 500,
    "nuts_samples": 1000,
    "num_chains": 4,
    "target_accept": 0.8,
    "dense_mass": False,
    "max_tree_depth": 10,
    "chain_method": None,
    "init": "median",
    "map_steps": 2000,
    "nlive": 500,
    "dlogz": 0.1,
    "nested_backend": "auto",
    "nested_sample": "auto",
    "maxcall": None,
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch: "$" would accept a trailing newline


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_string(k)


def _toml_value(v, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(x, f'{where}.{k}')}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_toml_value(x, f"{where}[]") for x in list(v)) + "]"
    raise TypeError(f"config value {where} = {v!r} cannot be written as TOML")


def config_to_toml(cfg: Mapping) -> str:
    """TOML text of a config dict (keys starting with "_" are skipped): top-level values,
    then [tables], then [[arrays of tables]]; deeper tables are written inline."""
    items = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    lines = []
    for k, v in items.items():
        if not isinstance(v, Mapping) and not (isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v)):
            lines.append(f"{_toml_key(k)} = {_toml_value(v, k)}")
    for k, v in items.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{_toml_key(k)}]"]
            lines += [f"{_toml_key(str(kk))} = {_toml_value(x, f'{k}.{kk}')}" for kk, x in v.items()]
    for k, v in items.items():
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for i, entry in enumerate(v):
                lines += ["", f"[[{_toml_key(k)}]]"]
                lines += [f"{_toml_key(str(kk))} = {_toml_value(x, f'{k}[{i}].{kk}')}" for kk, x in entry.items()]
    return "\n".join(lines) + "\n"


def _config_text(cfg: Mapping) -> str:
    """The config's own text when it still describes `cfg` (comments kept), else `cfg`
    written out (a config dict edited in Python)."""
    text = cfg.get("_text")
    plain = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    if text:
        try:
            if tomllib.loads(text) == plain:
                return text
        except tomllib.TOMLDecodeError:
            pass
    return "# written by skymodel from a config dict (edited in Python or built in code)\n" + config_to_toml(plain)


def _write_config(cfg: Mapping, out: pathlib.Path, overrides: Mapping[str, Any]) -> None:
    text = _config_text(cfg)
    if overrides:
        text += "\n# command-line overrides of [inference]:\n# " + json.dumps(dict(overrides)) + "\n"
    (out / "config.toml").write_text(text)


def inference_settings(cfg: Mapping, overrides: Mapping[str, Any] | None = None) -> dict:
    """The effective [inference] settings: package defaults < config < overrides (None
    values in `overrides` are ignored). Unknown keys raise ConfigError naming them."""
    table = dict(cfg.get("inference", {}))
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(table) - set(INFERENCE_KEYS))
    if unknown:
        raise C.ConfigError(f"[inference]: unknown key(s) {unknown}; known keys: {list(INFERENCE_KEYS)}")
    unknown = sorted(set(over) - set(INFERENCE_KEYS))
    if unknown:
        raise ValueError(f"unknown inference override(s) {unknown}; known keys: {list(INFERENCE_KEYS)}")
    inf = dict(DEFAULTS)
    for source in (table, over):  # the older spelling num_samples_nuts = nuts_samples
        if "num_samples_nuts" in source:
            source = dict(source)
            inf["nuts_samples"] = source.pop("num_samples_nuts")
        inf.update({k: v for k, v in source.items() if k != "num_samples_nuts"})
    if inf["method"] not in METHODS:
        raise C.ConfigError(f"[inference].method must be one of {METHODS}, got {inf['method']!r}")
    if inf["lr_schedule"] not in ("constant", "cosine"):
        raise C.ConfigError(f"[inference].lr_schedule must be 'constant' or 'cosine', got {inf['lr_schedule']!r}")
    return inf


def read_run(run_dir: str | os.PathLike) -> dict:
    """The run.json of a run directory (FileNotFoundError if it is not a run)."""
    p = pathlib.Path(run_dir) / "run.json"
    if not p.exists():
        raise FileNotFoundError(f"{run_dir} is not a skymodel run directory (no run.json)")
    info = json.loads(p.read_text())
    if info.get("format") != RUN_FORMAT:
        raise ValueError(f"{p} is not a skymodel run description")
    return info


def _update_run(out: pathlib.Path, **fields) -> None:
    p = out / "run.json"
    info = json.loads(p.read_text()) if p.exists() else {"format": RUN_FORMAT}
    info.update(fields)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, p)


def _learning_rate(inf: Mapping):
    lr = float(inf["learning_rate"])
    if inf["lr_schedule"] == "cosine":
        import optax

        return optax.cosine_decay_schedule(lr, int(inf["num_steps"]), alpha=0.01)
    return lr


def _svi(built, inf: Mapping, out: pathlib.Path, resume: bool, progress: bool, callback=None):
    from skymodel.inference.svi import run_svi, save_guide_params

    seed = int(inf["seed"])
    result = run_svi(
        built.sky,
        built.observation,
        guide=inf["guide"],
        num_steps=int(inf["num_steps"]),
        learning_rate=_learning_rate(inf),
        clip_norm=None if inf["clip_norm"] is None else float(inf["clip_norm"]),
        num_particles=int(inf["num_particles"]),
        seed=seed,
        progress=progress,
        checkpoint_path=out / "checkpoint.npz",
        checkpoint_every=int(inf["checkpoint_every"]),
        resume=resume,
        chunk_size=int(inf["chunk_size"]),
        num_flows=int(inf["num_flows"]),
        hidden_dims=tuple(int(h) for h in inf["hidden_dims"]),
        hidden_factors=tuple(int(h) for h in inf["hidden_factors"]),
        beta0=float(inf["beta0"]),
        temper_steps=int(inf["temper_steps"]),
        temper_schedule=str(inf["temper_schedule"]),
        callback=callback,
    )
    np.save(out / "losses.npy", result.losses)
    save_guide_params(out / "guide_params.npz", result)
    n = int(inf["num_samples"])
    if progress:
        print(f"drawing {n} posterior samples from the guide ...", flush=True)
    posterior = result.posterior(n, seed=seed + 1)
    posterior.diagnostics.update({"guide": result.guide_name, "beta0": float(inf["beta0"]),
                                  "temper_steps": int(inf["temper_steps"])})
    return posterior


def _neutra_guide(built, neutra):
    from skymodel.inference.svi import load_guide

    p = pathlib.Path(neutra)
    path = p / "guide_params.npz" if p.is_dir() else p
    if not path.exists():
        raise FileNotFoundError(
            f"--neutra {neutra}: no fitted guide there (expected an SVI run directory with "
            "guide_params.npz, or such a file)"
        )
    guide, params, _ = load_guide(built.sky, built.observation, path)
    return guide, params


def _nuts(built, inf: Mapping, out: pathlib.Path, progress: bool, neutra):
    from skymodel.inference.nuts import format_diagnostics, run_nuts
    from skymodel.inference.posterior import _to_json

    posterior = run_nuts(
        built.sky,
        built.observation,
        num_warmup=int(inf["num_warmup"]),
        num_samples=int(inf["nuts_samples"]),
        num_chains=int(inf["num_chains"]),
        seed=int(inf["seed"]),
        progress=progress,
        init=inf["init"] if neutra is None else "median",
        target_accept=float(inf["target_accept"]),
        dense_mass=bool(inf["dense_mass"]),
        max_tree_depth=int(inf["max_tree_depth"]),
        chain_method=inf["chain_method"],
        map_steps=int(inf["map_steps"]),
        neutra=None if neutra is None else _neutra_guide(built, neutra),
    )
    text = format_diagnostics(posterior.diagnostics)
    (out / "diagnostics.json").write_text(json.dumps(_to_json(posterior.diagnostics), indent=1))
    (out / "diagnostics.txt").write_text(text + "\n")
    if progress:
        print(text, flush=True)
    return posterior


def _map(built, inf: Mapping):
    from skymodel.inference import Posterior, run_map

    res = run_map(built.sky, built.observation, num_steps=int(inf["num_steps"]), seed=int(inf["seed"]))
    return Posterior(samples={k: np.asarray(v)[None] for k, v in res.values.items()}, method="map",
                     diagnostics={"final_loss": float(res.losses[-1])})


def _nested(built, inf: Mapping, out: pathlib.Path, resume: bool, progress: bool):
    from skymodel.inference.nested import run_nested

    backend = str(inf["nested_backend"])
    checkpoint = out / ("nested_multinest" if backend == "multinest" else "nested_checkpoint.pkl")
    return run_nested(
        built.sky,
        built.observation,
        backend=backend,
        nlive=int(inf["nlive"]),
        dlogz=float(inf["dlogz"]),
        seed=int(inf["seed"]),
        progress=progress,
        checkpoint_path=checkpoint,
        resume=resume,
        sample=str(inf["nested_sample"]),
        maxcall=None if inf["maxcall"] is None else int(inf["maxcall"]),
    )


def run_fit(
    config,
    out_dir: str | os.PathLike,
    *,
    method: str | None = None,
    resume: bool = False,
    progress: bool = True,
    neutra: str | os.PathLike | None = None,
    callback=None,
    **overrides,
):
    """Build the model from `config`, fit it, save everything in `out_dir`.

    config: a config dict, a TOML path or a packaged config name; None with `resume=True`
      reuses the run directory's config.toml and its recorded overrides.
    method: "svi", "nuts", "map" or "nested" (default: the config's [inference].method).
    resume: continue an SVI run from `out_dir`/checkpoint.npz, or a nested-sampling run
      from its sampler checkpoint (NUTS runs restart).
    neutra: for NUTS, an SVI run directory (or guide_params.npz) whose guide
      reparameterises the sampler (NeuTra).
    callback: SVI only, `callback(step, chunk_losses)` after each jitted chunk.
    overrides: any [inference] key (see the module docstring), e.g. num_steps=500.
    Returns (built, posterior). On Ctrl-C the SVI state is checkpointed, run.json says
    "interrupted" and KeyboardInterrupt propagates.
    """
    out = pathlib.Path(out_dir)
    if config is None:
        if not resume:
            raise ValueError("a config is needed unless resuming a run directory")
        info = read_run(out)
        cfg = C.load_config(out / "config.toml")
        overrides = {**info.get("overrides", {}), **{k: v for k, v in overrides.items() if v is not None}}
        method = method or info.get("method")
    else:
        cfg = C.load_config(config) if not isinstance(config, Mapping) else dict(config)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    inf = inference_settings(cfg, overrides)
    method = method or inf["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} {METHODS}")
    if neutra is not None and method != "nuts":
        raise ValueError(f"neutra reparameterises NUTS; it cannot be used with method {method!r}")
    if resume and method not in ("svi", "nested"):
        raise ValueError(f"resume applies to SVI and nested-sampling runs (checkpoints); method is {method!r}")
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        _write_config(cfg, out, {**overrides, "method": method})
    # wall_time in run.json is the total over all sessions of this run: a resume adds to it
    before = float(read_run(out).get("wall_time") or 0.0) if resume and (out / "run.json").exists() else 0.0
    _update_run(
        out, format=RUN_FORMAT, method=method, inference=inf, overrides=overrides,
        config_source=cfg.get("_source", "<dict>"), neutra=None if neutra is None else str(neutra),
        status="running", finished=None, **({"resumed": _now()} if before else {"started": _now()}),
    )
    t0 = time.perf_counter()

    def elapsed():
        return before + time.perf_counter() - t0

    try:
        built = C.build(cfg)
        if method == "svi":
            posterior = _svi(built, inf, out, resume, progress, callback)
        elif method == "nuts":
            posterior = _nuts(built, inf, out, progress, neutra)
        elif method == "nested":
            posterior = _nested(built, inf, out, resume, progress)
        else:
            posterior = _map(built, inf)
    except KeyboardInterrupt:
        _update_run(out, status="interrupted", finished=_now(), wall_time=elapsed())
        raise
    except BaseException as e:
        _update_run(out, status="failed", error=f"{type(e).__name__}: {e}", finished=_now(),
                    wall_time=elapsed())
        raise
    posterior.wall_time = elapsed()
    posterior.metadata.update({"config": _config_text(cfg), "method": method, "inference": inf,
                               "run_dir": str(out)})
    posterior.save(out / "posterior")
    (out / "summary.txt").write_text(posterior.summary() + "\n")
    _update_run(out, status="done", finished=_now(), wall_time=posterior.wall_time)
    return built, posterior


__all__ = ["DEFAULTS", "INFERENCE_KEYS", "config_to_toml", "inference_settings", "read_run", "run_fit"]
