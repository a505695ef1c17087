"""Run configurations (TOML): data, ROI, PSF, components with priors, inference settings.

A config fully defines a run, so a saved run can be reproduced, resumed and analysed.
`build(config)` turns it into a `SkyModel` and an `Observation`; the CLI and the notebooks
use the same function. Parameter specs accept:

    12.85                       fixed value
    { value = 12.85 }           fixed value
    { uniform = [low, high] }   U(low, high)          (optional: init = x)
    { loguniform = [low, high] }
    { normal = [loc, scale] }

Point-source morphologies of kind "template" may set `divide_by_exposure = true`
(template / (exposure / mean exposure), NPTFit's PS templates) with `exposure_mean =
"roi"` (default: mean over the analysis pixels) or "sky" (full-sky mean, as NPTFit's
examples do). Components take `normalise = false` to use a template as given (no
rescaling to mean 1). The [psf] table takes model = "none" | "gaussian" (sigma_deg) |
"fermi_2gev" | "irf", and the PSF-correction settings n_sources, n_points, num_f_bins,
f_trunc, seed, binning ("log" | "linear") and renormalise (see `PSFCorrection.compute`).

See `skymodel/configs/*.toml` for complete examples.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import tomllib
from collections.abc import Mapping
from typing import Any

import numpy as np

from skymodel import priors as P
from skymodel.components.base import Param

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file is malformed; the message names the key."""


# ----------------------------------------------------------------------------- loading


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config(path_or_name: str | os.PathLike) -> dict:
    """Read a TOML config from a path, or by name from the packaged configs."""
    p = pathlib.Path(path_or_name)
    if not p.exists():
        cand = CONFIG_DIR / f"{path_or_name}.toml"
        if cand.exists():
            p = cand
        else:
            raise FileNotFoundError(
                f"config {str(path_or_name)!r} not found (packaged configs: {packaged_configs()})"
            )
    with open(p, "rb") as fh:
        try:
            cfg = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
    cfg.setdefault("_source", str(p))
    with open(p, encoding="utf-8") as fh:
        cfg.setdefault("_text", fh.read())
    return cfg


def _require(table: Mapping, key: str, where: str):
    if key not in table:
        raise ConfigError(f"{where}: missing key {key!r}")
    return table[key]


def _expand(path: str) -> pathlib.Path:
    return pathlib.Path(os.path.expandvars(os.path.expanduser(path)))


# ----------------------------------------------------------------------------- parameters


def parse_param(spec: Any, where: str, *, shape: tuple[int, ...] = ()) -> Param:
    """A parameter spec (see module doc) -> Param."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Param(float(spec))
    if isinstance(spec, list):
        return Param(np.asarray(spec, dtype=float))
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a number or a table like {{ uniform = [lo, hi] }}, got {spec!r}")
    kinds = [k for k in ("value", "uniform", "loguniform", "normal") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: give exactly one of value / uniform / loguniform / normal, got {sorted(spec)}"
        )
    kind = kinds[0]
    if kind == "value":
        return Param(np.asarray(spec["value"], dtype=float))
    args = spec[kind]
    if not (isinstance(args, list) and len(args) == 2):
        raise ConfigError(f"{where}: {kind} needs a pair [a, b], got {args!r}")
    try:
        if kind == "uniform":
            prior = P.Uniform(*args) if shape == () else P.UniformVector(*args, size=shape[0])
        elif kind == "loguniform":
            prior = P.LogUniform(*args)
        else:
            prior = P.Normal(*args)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    init = spec.get("init")
    if init is not None and not prior.contains(init):
        raise ConfigError(f"{where}: init {init} lies outside the prior {prior}")
    return Param(init, prior) if init is not None else Param(prior=prior)


def _dirichlet_weights(n: int, concentration, where: str) -> Param:
    if n == 1:
        return Param(np.ones(1))
    if isinstance(concentration, (int, float)):
        prior = P.Dirichlet.symmetric(n, float(concentration))
    else:
        if len(concentration) != n:
            raise ConfigError(f"{where}: {n} templates but {len(concentration)} concentrations")
        prior = P.Dirichlet(tuple(concentration))
    return Param(prior=prior)


# ----------------------------------------------------------------------------- data


def load_dataset(cfg: Mapping):
    """The Dataset named by the config's [data] table (a directory, or the demo sky)."""
    from skymodel.data import Dataset

    data = _require(cfg, "data", "config")
    if data.get("demo"):
        from skymodel.demo import demo_dataset

        return demo_dataset(cfg)[0]
    directory = data.get("directory") or os.environ.get("SKYMODEL_DATA_DIR")
    if not directory:
        raise ConfigError("[data]: set directory = '...' (environment variables are expanded)")
    d = _expand(str(directory))
    if not d.is_dir():
        raise FileNotFoundError(f"[data] directory {d} does not exist")
    kwargs = {k: data[k] for k in ("counts", "exposure") if k in data}
    if "templates" in data:
        kwargs["templates"] = dict(data["templates"])
    if "masks" in data:
        kwargs["masks"] = dict(data["masks"])
    return Dataset.load(d, **kwargs)


def build_roi(cfg: Mapping, dataset):
    roi = dict(cfg.get("roi", {}))
    return dataset.roi(
        radius_deg=float(roi.get("radius", 25.0)),
        band_deg=float(roi.get("band", 2.0)),
        source_mask=roi.get("source_mask"),
        n_exposure_regions=int(roi.get("exposure_regions", 1)),
    )


def build_psf(cfg: Mapping, nside: int, *, data_dir: pathlib.Path | None = None):
    """PSFCorrection from the [psf] table (None means a delta PSF)."""
    from skymodel import psf as psfmod

    spec = cfg.get("psf")
    if not spec or spec.get("model", "none") == "none":
        return None, None
    model = spec["model"]
    if model == "gaussian":
        psf_model = psfmod.GaussianPSF.from_degrees(float(_require(spec, "sigma_deg", "[psf]")))
    elif model == "fermi_2gev":
        psf_model = psfmod.DoubleKingPSF.fermi_2gev()
    elif model == "irf":
        path = _expand(str(_require(spec, "file", "[psf]")))
        if not path.is_absolute() and data_dir is not None:
            path = data_dir / path
        psf_model = psfmod.DoubleKingPSF.from_irf_fits(
            path, event_type=int(spec.get("event_type", 3)), energy_mev=float(spec.get("energy_mev", 2000.0))
        )
    else:
        raise ConfigError(f"[psf]: unknown model {model!r} (none, gaussian, fermi_2gev, irf)")
    binning = str(spec.get("binning", "log"))
    if binning not in ("log", "linear"):
        raise ConfigError(f"[psf]: binning must be 'log' or 'linear', got {binning!r}")
    corr = psfmod.PSFCorrection.compute(
        psf_model,
        nside,
        n_sources=int(spec.get("n_sources", 10_000)),
        n_points=int(spec.get("n_points", 1024)),
        num_f_bins=int(spec.get("num_f_bins", 10)),
        f_trunc=float(spec.get("f_trunc", 0.01)),
        seed=int(spec.get("seed", 0)),
        binning=binning,
        renormalise=bool(spec.get("renormalise", False)),
    )
    return psf_model, corr


# ----------------------------------------------------------------------------- components


def _template(dataset, name: str, where: str):
    if name not in dataset.templates:
        raise ConfigError(
            f"{where}: unknown template {name!r}; the data has {sorted(dataset.templates)}"
        )
    return dataset.templates[name]


def _bulge_maps(dataset, names, where: str):
    if not names:
        return []
    maps = dataset.bulge_templates(list(names))
    return [maps[n] for n in names]


def _gce_morphology(spec: Mapping, dataset, roi, where: str, *, exposure_weighted: bool):
    """f_bulge x sum_i w_i bulge_i + (1 - f_bulge) x NFW^2(gamma); every leaf is multiplied
    by the exposure first when `exposure_weighted` (a counts shape for the smooth GCE)."""
    from skymodel.components import morphology as M

    def wrap(m):
        return M.ExposureWeighted(m) if exposure_weighted else m

    kw = {"r_sun": float(spec["r_sun"])} if "r_sun" in spec else {}
    nfw = wrap(
        M.NFWSquared(gamma=parse_param(spec.get("gamma", {"uniform": [0.2, 2.0]}), f"{where}.gamma"), **kw)
    )
    names = list(spec.get("bulges", []))
    if not names:
        return nfw
    parts = tuple(wrap(M.TemplateMap.from_sky(b, roi, label=n)) for n, b in zip(names, _bulge_maps(dataset, names, where)))
    if len(parts) == 1:
        bulge = parts[0]
    else:
        bulge = M.Mixture(parts, _dirichlet_weights(len(parts), spec.get("bulge_concentration", 1.0), where))
    fraction = parse_param(spec.get("f_bulge", {"uniform": [0.0, 1.0]}), f"{where}.f_bulge")
    return M.Blend(bulge, nfw, fraction)


def _exposure_rescale(dataset, roi, mean: str, where: str) -> np.ndarray:
    """exposure / mean exposure, full sky (12 nside^2,), dimensionless.

    mean = "roi": mean over the ROI's analysis pixels; "sky": mean over the full sky
    (NPTFit's examples: `rescale = fermi_exposure / np.mean(fermi_exposure)`).
    """
    exp = np.asarray(dataset.exposure, dtype=float)
    if mean == "roi":
        ref = np.mean(exp[np.asarray(roi.pixels)])
    elif mean == "sky":
        ref = np.mean(exp)
    else:
        raise ConfigError(f"{where}: exposure_mean must be 'roi' or 'sky', got {mean!r}")
    return exp / ref


def _ps_morphology(spec: Mapping, dataset, roi, where: str):
    from skymodel.components import morphology as M

    kind = _require(spec, "kind", where)
    if kind == "gce":
        return _gce_morphology(spec, dataset, roi, where, exposure_weighted=False)
    if kind == "disk":
        return M.LorimerDisk(
            z_s=parse_param(spec.get("z_s", {"uniform": [0.1, 2.5]}), f"{where}.z_s"),
            C=parse_param(spec.get("C", {"uniform": [0.05, 8.0]}), f"{where}.C"),
        )
    if kind == "template":
        sky = np.asarray(_template(dataset, _require(spec, "template", where), where), dtype=float)
        if spec.get("divide_by_exposure", False):
            sky = sky / _exposure_rescale(dataset, roi, spec.get("exposure_mean", "roi"), where)
        elif "exposure_mean" in spec:
            raise ConfigError(f"{where}: exposure_mean is only used with divide_by_exposure = true")
        return M.TemplateMap.from_sky(sky, roi)
    if kind == "isotropic":
        return M.TemplateMap.from_sky(np.ones_like(np.asarray(dataset.exposure, dtype=float)), roi)
    raise ConfigError(f"{where}: unknown morphology kind {kind!r} (gce, disk, template, isotropic)")


def _scf_parameters(spec: Mapping, where: str):
    from skymodel.components.point_sources import NPTFitSCF, TotalCountsSCF

    idx = _require(spec, "indices", where)
    indices = [parse_param(s, f"{where}.indices[{i}]") for i, s in enumerate(idx)]
    if "total_counts" in spec:
        ratios = [parse_param(s, f"{where}.break_ratios[{i}]") for i, s in enumerate(spec.get("break_ratios", []))]
        return TotalCountsSCF(
            parse_param(spec["total_counts"], f"{where}.total_counts"),
            indices,
            parse_param(_require(spec, "first_break", where), f"{where}.first_break"),
            ratios,
        )
    breaks = [parse_param(s, f"{where}.breaks[{i}]") for i, s in enumerate(_require(spec, "breaks", where))]
    if "log10_amplitude" in spec:
        return NPTFitSCF(parse_param(spec["log10_amplitude"], f"{where}.log10_amplitude"), indices, breaks, log10_amplitude=True)
    return NPTFitSCF(parse_param(_require(spec, "amplitude", where), f"{where}.amplitude"), indices, breaks)


def build_component(spec: Mapping, dataset, roi, index: int):
    from skymodel.components import morphology as M
    from skymodel.components.point_sources import PointSourcePopulation
    from skymodel.components.poisson import PoissonComponent

    name = _require(spec, "name", f"components[{index}]")
    where = f"component {name!r}"
    kind = _require(spec, "kind", where)
    normalise = bool(spec.get("normalise", True))
    if kind == "template":
        morph = M.TemplateMap.from_sky(_template(dataset, _require(spec, "template", where), where), roi)
        if spec.get("exposure_weighted", False):
            morph = M.ExposureWeighted(morph)
        return PoissonComponent(name, morph, parse_param(_require(spec, "norm", where), f"{where}.norm"), normalise=normalise)
    if kind == "mixture":
        names = _require(spec, "templates", where)
        parts = tuple(M.TemplateMap.from_sky(_template(dataset, t, where), roi) for t in names)
        morph = M.Mixture(parts, _dirichlet_weights(len(parts), spec.get("concentration", 1.0 / 3.0), where))
        lmax = int(spec.get("modulation_lmax", 0))
        if lmax > 0:
            n_coeff = sum(l + 1 for l in range(1, lmax + 1))
            coeff = parse_param(spec.get("modulation", {"uniform": [-0.05, 0.05]}), f"{where}.modulation", shape=(n_coeff,))
            morph = M.HarmonicModulation(morph, coeff, lmax)
        return PoissonComponent(name, morph, parse_param(_require(spec, "norm", where), f"{where}.norm"), normalise=normalise)
    if kind == "gce":
        morph = _gce_morphology(spec, dataset, roi, where, exposure_weighted=True)
        return PoissonComponent(name, morph, parse_param(_require(spec, "norm", where), f"{where}.norm"), normalise=normalise)
    if kind == "point_sources":
        morph = _ps_morphology(_require(spec, "morphology", where), dataset, roi, f"{where}.morphology")
        scf = _scf_parameters(_require(spec, "scf", where), f"{where}.scf")
        return PointSourcePopulation(name, morph, scf, normalise=normalise)
    raise ConfigError(f"{where}: unknown kind {kind!r} (template, mixture, gce, point_sources)")


@dataclasses.dataclass
class Built:
    """Everything a run needs, built from a config."""

    config: dict
    dataset: Any
    roi: Any
    sky: Any
    observation: Any
    psf_model: Any


def build(cfg: Mapping | str | os.PathLike) -> Built:
    """Config (dict, path or packaged name) -> dataset, ROI, SkyModel, Observation."""
    from skymodel.model import SkyModel
    from skymodel.observation import Observation

    if not isinstance(cfg, Mapping):
        cfg = load_config(cfg)
    cfg = copy.deepcopy(dict(cfg))
    dataset = load_dataset(cfg)
    roi = build_roi(cfg, dataset)
    comps = _require(cfg, "components", "config")
    if not comps:
        raise ConfigError("config: [[components]] is empty")
    components = tuple(build_component(c, dataset, roi, i) for i, c in enumerate(comps))
    sky = SkyModel(components)
    data_dir = None
    if cfg.get("data", {}).get("directory"):
        data_dir = _expand(str(cfg["data"]["directory"]))
    psf_model, corr = build_psf(cfg, roi.nside, data_dir=data_dir)
    obs = Observation.from_sky_counts(roi, dataset.counts, psf=corr)
    return Built(cfg, dataset, roi, sky, obs, psf_model)
