"""Recovery on mocks: a fiducial-like model, mocks with known truth, and coverage.

A recovery test fits many mock skies whose true parameters are known and asks how often the
truth lies inside the posterior's credible intervals (coverage) and how far the posterior
median of a derived quantity (the GCE point-source fraction) sits from its true value.

Pieces:
- statistics (numpy only): `central_interval`, `interval_contains`, `coverage`,
  `binomial_interval` (exact Clopper-Pearson), `bias_summary`;
- the fiducial-like model: `fiducial_like_config` (a config dict in the TOML schema of
  `skymodel.config`) and `MockSetup` (dataset, ROI, SkyModel, PSF built once; `truth` and
  `mock` draw a truth and a mock sky from it);
- derived quantities: `component_fraction`, `gce_ps_fraction` (expected counts of the
  GCE point sources / (point sources + smooth GCE) on the analysis pixels), and
  `count_pmf` (the likelihood's per-pixel count distribution p_k, for one-point plots).

The fiducial-like model (SCIENCE.md, reduced so that it runs on a CPU): diffuse pi0+brems
and ICS (one template each), isotropic, bubbles, smooth GCE (NFW^2 with free gamma,
exposure-weighted), GCE point sources (NFW^2 source density with gamma = 1.2, one-break
SCF) and disk point sources (Lorimer disk z_s = 0.3 kpc, C = 5, one-break SCF), with the
paper's priors (n2 ~ U(-2, 1.9) as in the demo, since there is one break). Templates are
skymodel's own analytic ones (`analytic_templates`, synthetic exposure) or, with
`templates="fermi"`, the real Model-O pi0/ICS, isotropic and bubbles templates and the
real exposure from `$SKYMODEL_DATA/fermi-gc` (3FGL sources masked), at any nside <= 128.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np

from skymodel._types import Array, Float, Real

#: True parameter values of the fiducial-like mocks in "fixed" truth mode (site names).
FIDUCIAL_LIKE_TRUTH: dict[str, float] = {
    "pib.norm": 9.0,
    "ics.norm": 4.0,
    "iso.norm": 0.6,
    "bub.norm": 0.8,
    "gce.norm": 0.5,
    "gce.morphology.base.gamma": 1.2,
    "gce_ps.scf_parameters.total_counts": 0.8,
    "gce_ps.scf_parameters.indices.0": 6.0,
    "gce_ps.scf_parameters.indices.1": -0.5,
    "gce_ps.scf_parameters.first_break": 20.0,
    "dsk_ps.scf_parameters.total_counts": 0.4,
    "dsk_ps.scf_parameters.indices.0": 5.0,
    "dsk_ps.scf_parameters.indices.1": 0.5,
    "dsk_ps.scf_parameters.first_break": 15.0,
}

#: the statistic added to the parameters in recovery tables
GCE_PS_FRACTION = "f_ps(gce)"
#: Mocks: sources below this many counts are simulated as a smooth map where the SCF has
#: infinitely many faint sources (`Setup.mock`).
FAINT_CUT = 0.01


# ======================================================================================
# Statistics
# ======================================================================================


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"credible level must lie in (0, 1), got {level}")
    return level


def central_interval(
    samples: Real[np.ndarray, "n ..."] | Sequence[float | int], level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed credible interval of `samples` along axis 0: the (1 - level)/2 and
    (1 + level)/2 quantiles (numpy's linear interpolation), each of shape samples.shape[1:]."""
    level = _check_level(level)
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples along axis 0, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or inf")
    lo, hi = np.quantile(x, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    return np.asarray(lo), np.asarray(hi)


def interval_contains(
    samples: Real[np.ndarray, "n ..."] | Sequence[float | int], truth, level: float
) -> np.ndarray:
    """Whether `truth` (shape samples.shape[1:], or broadcastable) lies in the closed
    equal-tailed `level` interval of `samples` (axis 0). Returns a bool array."""
    lo, hi = central_interval(samples, level)
    t = np.asarray(truth, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise ValueError(f"truth must be finite, got {truth}")
    return np.asarray((lo <= t) & (t <= hi))


def coverage(
    samples: Sequence[np.ndarray] | Real[np.ndarray, "nmock n"],
    truths: Sequence[float | int] | Real[np.ndarray, " nmock"],
    levels: Sequence[float | int] = (0.68, 0.95),
) -> dict[float, float]:
    """Fraction of mocks whose truth lies in the equal-tailed credible interval.

    samples: per mock, 1-d posterior samples of one scalar quantity (mocks may have
    different sample counts); truths: (nmock,) true values. Returns level -> fraction.
    """
    samples = [np.asarray(s, dtype=np.float64) for s in samples]
    t = np.asarray(truths, dtype=np.float64)
    if t.ndim != 1 or t.shape[0] != len(samples) or len(samples) == 0:
        raise ValueError(
            f"need one truth per mock: got {len(samples)} sample sets and truths of shape {t.shape}"
        )
    for i, s in enumerate(samples):
        if s.ndim != 1:
            raise ValueError(f"mock {i}: samples must be 1-d, got shape {s.shape}")
    return {
        float(lv): float(np.mean([bool(interval_contains(s, ti, lv)) for s, ti in zip(samples, t)]))
        for lv in levels
    }


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) `confidence` interval for a binomial proportion, k of n.

    Used to say whether an observed coverage k/n is compatible with the nominal level."""
    from scipy import stats

    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer))):
        raise ValueError(f"k and n must be integers, got k={k!r}, n={n!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    alpha = 1.0 - _check_level(confidence)
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def bias_summary(
    estimates: Sequence[float | int] | np.ndarray, truths: Sequence[float | int] | np.ndarray
) -> dict[str, float]:
    """Bias of point estimates over mocks: mean, std (ddof=1; nan for one mock) and
    standard error of the mean of (estimate - truth), and the number of mocks."""
    e = np.asarray(estimates, dtype=np.float64)
    t = np.asarray(truths, dtype=np.float64)
    if e.shape != t.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"estimates {e.shape} and truths {t.shape} must be equal 1-d, non-empty")
    d = e - t
    std = float(np.std(d, ddof=1)) if d.size > 1 else math.nan
    return {"mean": float(d.mean()), "std": std, "sem": std / math.sqrt(d.size), "n": int(d.size)}


# ======================================================================================
# The fiducial-like model
# ======================================================================================


def _uniform(lo: float, hi: float) -> dict:
    return {"uniform": [float(lo), float(hi)]}


def _one_break_scf() -> dict:
    return {
        "total_counts": _uniform(1e-5, 4.0),
        "indices": [_uniform(2.1, 8.0), _uniform(-2.0, 1.9)],
        "first_break": _uniform(5.0, 40.0),
    }


def fiducial_like_config(
    nside: int = 32,
    *,
    templates: str = "analytic",
    data_dir: str | os.PathLike | None = None,
    radius: float = 25.0,
    band: float = 2.0,
    exposure_regions: int = 4,
    psf: str = "fermi_2gev",
    free_gamma: bool = True,
    disk: bool = True,
) -> dict:
    """Config dict (schema of `skymodel.config`, incl. a [truth] table) of the
    fiducial-like recovery model; see the module docstring.

    nside: HEALPix resolution of the mocks (<= 128 for `templates="fermi"`; the real maps
    are averaged down). templates: "analytic" (no data needed) or "fermi" (real templates
    and exposure from `data_dir`, default `$SKYMODEL_DATA/fermi-gc`). psf: "fermi_2gev"
    (two-King PSF) or "none". free_gamma: the smooth GCE's NFW inner slope is free
    (U(0.2, 2)), else fixed at 1.2. disk: include the disk point-source population.
    """
    if not isinstance(nside, (int, np.integer)) or not hp.isnsideok(int(nside), nest=True):
        raise ValueError(f"nside must be a power of 2, got {nside!r}")
    if templates not in ("analytic", "fermi"):
        raise ValueError(f'templates must be "analytic" or "fermi", got {templates!r}')
    if psf not in ("fermi_2gev", "none"):
        raise ValueError(f'psf must be "fermi_2gev" or "none", got {psf!r}')
    if templates == "fermi":
        if data_dir is None:
            root = os.environ.get("SKYMODEL_DATA")
            if not root:
                raise ValueError('templates="fermi" needs data_dir or $SKYMODEL_DATA')
            data_dir = pathlib.Path(root) / "fermi-gc"
        if int(nside) > 128:
            raise ValueError(f"the Fermi maps have nside 128; got nside={nside}")
        data = {"directory": str(data_dir), "nside": int(nside)}
        roi = {"radius": radius, "band": band, "source_mask": "psc_3fgl_0p8deg"}
    else:
        data = {"demo": True, "nside": int(nside)}
        roi = {"radius": radius, "band": band}
    roi["exposure_regions"] = int(exposure_regions)
    components = [
        {"name": "pib", "kind": "template", "template": "pib", "norm": _uniform(1e-3, 14.0)},
        {"name": "ics", "kind": "template", "template": "ics", "norm": _uniform(1e-3, 14.0)},
        {"name": "iso", "kind": "template", "template": "iso", "norm": _uniform(1e-3, 5.0)},
        {"name": "bub", "kind": "template", "template": "bub", "norm": _uniform(1e-3, 5.0)},
        {"name": "gce", "kind": "gce", "norm": _uniform(1e-5, 4.0),
         "gamma": _uniform(0.2, 2.0) if free_gamma else 1.2},
        {"name": "gce_ps", "kind": "point_sources", "morphology": {"kind": "gce", "gamma": 1.2},
         "scf": _one_break_scf()},
    ]
    if disk:
        components.append(
            {"name": "dsk_ps", "kind": "point_sources",
             "morphology": {"kind": "disk", "z_s": 0.3, "C": 5.0}, "scf": _one_break_scf()}
        )
    names = {c["name"] for c in components}
    truth = {
        k: v for k, v in FIDUCIAL_LIKE_TRUTH.items()
        if k.split(".")[0] in names and (free_gamma or "gamma" not in k)
    }
    return {
        "data": data,
        "roi": roi,
        "psf": {"model": psf},
        "components": components,
        "truth": truth,
    }


_FERMI_FILES = {
    "pib": "template_Opi.npy",
    "ics": "template_Oic.npy",
    "iso": "template_iso.npy",
    "bub": "template_bub.npy",
}


def _mock_dataset(cfg: Mapping):
    """Dataset (zero counts) with the templates and exposure the config names."""
    from skymodel.data import Dataset

    data = cfg["data"]
    nside = int(data["nside"])
    npix = hp.nside2npix(nside)
    if data.get("demo"):
        from skymodel.demo import synthetic_exposure
        from skymodel.morphology_numerics import analytic_templates

        exposure = synthetic_exposure(nside)
        return Dataset.from_arrays(np.zeros(npix), exposure, templates=analytic_templates(nside, exposure))
    d = pathlib.Path(os.path.expandvars(str(data["directory"])))
    missing = [f for f in [*_FERMI_FILES.values(), "exposure.npy", "mask_psc_3fgl_0p8deg.npy"]
               if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing} (expected the fermi-gc data set)")

    def grade(m):
        m = np.asarray(m, dtype=np.float64)
        return m if hp.npix2nside(m.size) == nside else hp.ud_grade(m, nside, order_in="RING")

    exposure = grade(np.load(d / "exposure.npy"))
    tmpl = {k: grade(np.load(d / f)) for k, f in _FERMI_FILES.items()}
    # a low-resolution pixel is masked when any of its high-resolution pixels is
    mask = grade(np.load(d / "mask_psc_3fgl_0p8deg.npy").astype(np.float64)) > 0
    return Dataset.from_arrays(np.zeros(npix), exposure, templates=tmpl, masks={"psc_3fgl_0p8deg": mask})


@dataclasses.dataclass(frozen=True)
class Mock:
    """One mock sky: the Observation to fit, the simulator's output, and the truth
    (site name -> value) it was drawn from."""

    observation: Any
    simulation: Any
    truth: dict[str, float]
    seed: int


@dataclasses.dataclass(frozen=True)
class MockSetup:
    """Everything fixed across the mocks of one recovery test, built once from a config.

    config: the config dict; dataset: templates and exposure (counts are zero); roi;
    sky: the SkyModel with its priors; psf_model: PSF used to scatter simulated photons
    (None: no PSF); psf_correction: the matching PSFCorrection for the likelihood.
    """

    config: dict
    dataset: Any
    roi: Any
    sky: Any
    psf_model: Any
    psf_correction: Any

    @classmethod
    def from_config(cls, cfg: Mapping) -> MockSetup:
        """Build from a config such as `fiducial_like_config(...)`: [data] with
        `demo = true` (analytic templates) or `directory` (fermi-gc files) and `nside`."""
        from skymodel import config as C
        from skymodel.model import SkyModel

        cfg = copy.deepcopy(dict(cfg))
        for key in ("data", "components"):
            if key not in cfg:
                raise C.ConfigError(f"config: missing [{key}]")
        if "nside" not in cfg["data"]:
            raise C.ConfigError("[data]: a mock setup needs nside")
        dataset = _mock_dataset(cfg)
        roi = C.build_roi(cfg, dataset)
        comps = tuple(C.build_component(c, dataset, roi, i) for i, c in enumerate(cfg["components"]))
        sky = SkyModel(comps)
        psf_model, corr = C.build_psf(cfg, roi.nside)
        truth = dict(cfg.get("truth", {}))
        free = sky.free_parameters()
        unknown = [k for k in truth if k not in free]
        if unknown:
            raise C.ConfigError(f"[truth] names unknown parameters {unknown}; free: {list(free)}")
        return cls(cfg, dataset, roi, sky, psf_model, corr)

    def truth(self, mode: str = "fixed", key: Array | None = None) -> dict[str, float]:
        """True values of every free parameter: "fixed" = the config's [truth] table,
        "prior" = one draw from the model's priors (needs `key`)."""
        free = self.sky.free_parameters()
        if mode == "fixed":
            t = dict(self.config.get("truth", {}))
            missing = [k for k in free if k not in t]
            if missing:
                raise ValueError(f"[truth] lacks values for {missing}")
            return {k: float(t[k]) for k in free}
        if mode == "prior":
            if key is None:
                raise ValueError('truth mode "prior" needs a PRNG key')
            draw = self.sky.sample_prior(key, 1)
            for k, v in draw.items():
                if np.asarray(v).shape != (1,):
                    raise ValueError(f"parameter {k!r} is not scalar; prior-draw truths need scalars")
            return {k: float(np.asarray(v)[0]) for k, v in draw.items()}
        raise ValueError(f'truth mode must be "fixed" or "prior", got {mode!r}')

    def mock(self, truth: Mapping[str, float], seed: int, faint_cut: float = FAINT_CUT) -> Mock:
        """Simulate a mock sky at `truth` with PRNG seed `seed` (photons of point sources
        scattered by the PSF, exposure per pixel) and wrap its counts in an Observation.

        A population whose lowest SCF index is >= 1 has infinitely many faint sources: its
        sources below `faint_cut` counts are then added as a smooth Poisson map of their
        mean counts (`simulate(..., faint_as_smooth=True)`; the approximation is that such a
        source gives at most one photon, P(>= 2 photons) = 5e-5 at S = 0.01). Populations
        with a finite source number are simulated down to S = 0."""
        from skymodel.components.base import AbstractPointSourcePopulation
        from skymodel.observation import Observation
        from skymodel.simulate import finite_source_number, simulate

        sky_true = self.sky.with_values({k: float(v) for k, v in truth.items()})
        cuts = {
            c.name: 0.0 if finite_source_number(c.source_count_function(self.roi)) else float(faint_cut)
            for c in sky_true.components if isinstance(c, AbstractPointSourcePopulation)
        }
        sim = simulate(jax.random.PRNGKey(int(seed)), sky_true, self.roi, self.psf_model,
                       s_min=cuts, faint_as_smooth=True)
        obs = Observation(self.roi, np.asarray(sim.counts, dtype=np.float64), psf=self.psf_correction)
        return Mock(obs, sim, {k: float(v) for k, v in truth.items()}, int(seed))


# ======================================================================================
# Derived quantities
# ======================================================================================


def _values_batch(values: Mapping[str, Any]) -> tuple[dict[str, jnp.ndarray], int]:
    vals = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in values.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in vals.items()}
    if any(s is None for s in sizes.values()) or len(set(sizes.values())) != 1:
        raise ValueError(f"values need one common leading sample axis, got shapes "
                         f"{ {k: tuple(v.shape) for k, v in vals.items()} }")
    return vals, next(iter(sizes.values()))


def component_fraction(
    sky,
    roi,
    values: Mapping[str, Any],
    numerator: Sequence[str],
    denominator: Sequence[str],
    *,
    batch_size: int = 256,
) -> Float[np.ndarray, " n"]:
    """Per sample: sum of the expected counts of the `numerator` components over the
    analysis pixels / the same for the `denominator` components.

    values: site name -> (n, *shape) parameter samples (parameters not given keep the
    model's current values). Returns (n,) float64.
    """
    numerator, denominator = list(numerator), list(denominator)
    names = [c.name for c in sky.components]
    unknown = [n for n in numerator + denominator if n not in names]
    if unknown:
        raise KeyError(f"unknown component(s) {unknown}; components: {names}")
    if not denominator:
        raise ValueError("the denominator needs at least one component")
    vals, _ = _values_batch(values)

    def one(v):
        s = sky.with_values(v, check=False)
        tot = {c.name: jnp.sum(c.expected_counts(roi)) for c in s.components
               if c.name in numerator or c.name in denominator}
        return sum(tot[n] for n in numerator) / sum(tot[n] for n in denominator)

    out = jax.lax.map(one, vals, batch_size=int(batch_size))
    return np.asarray(out, dtype=np.float64)


def gce_ps_fraction(
    sky, roi, values: Mapping[str, Any], *, ps: str = "gce_ps", smooth: str = "gce",
    batch_size: int = 256,
) -> Float[np.ndarray, " n"]:
    """GCE point-source fraction per sample: expected point-source counts / (point-source
    + smooth GCE counts), summed over the analysis pixels. values: site -> (n, ...)."""
    return component_fraction(sky, roi, values, [ps], [ps, smooth], batch_size=batch_size)


def count_pmf(sky, obs, k_max: int, *, log: bool = False) -> Float[Array, "npix kp1"]:
    """The NPTF likelihood's count distribution per analysis pixel, p_0..p_{k_max}
    (shape (npix, k_max + 1); log p with `log=True`), at the model's current values.

    x_{p,m} = sum_pop T[pop, p] x_m(pop, region_p) with each SCF's exact generating terms
    at the pixel's exposure-region ratio and the observation's PSF correction, then
    `skymodel.likelihood.pk_table`. Column k_p of the log table equals
    `sky.pixel_log_likelihood(obs)` (up to the count plan's rounding).
    """
    from skymodel.likelihood import pk_table

    if not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be a positive int, got {k_max!r}")
    roi = obs.roi
    mu = sky.poisson_mean(roi)
    templates, scfs = sky.point_source_terms(roi)
    n = roi.n_pixels
    if obs.psf is None:
        f, w = jnp.ones(1), jnp.ones(1)
    else:
        f, w = jnp.asarray(obs.psf.f), jnp.asarray(obs.psf.weights)
    x_pix = jnp.zeros((n, int(k_max)), jnp.float64)
    x_tot = jnp.zeros(n, jnp.float64)
    region = roi.region
    for T, scf in zip(templates, scfs):
        per_region = [scf.generating_terms(f, w, int(k_max), r) for r in np.asarray(roi.region_ratio)]
        xm = jnp.stack([x for x, _ in per_region])  # (nregion, k_max)
        xt = jnp.stack([t for _, t in per_region])  # (nregion,)
        x_pix = x_pix + T[:, None] * xm[region]
        x_tot = x_tot + T * xt[region]
    return pk_table(mu, x_pix, x_tot, int(k_max), log=log)


__all__ = [
    "FIDUCIAL_LIKE_TRUTH",
    "GCE_PS_FRACTION",
    "Mock",
    "MockSetup",
    "bias_summary",
    "binomial_interval",
    "central_interval",
    "component_fraction",
    "count_pmf",
    "coverage",
    "fiducial_like_config",
    "gce_ps_fraction",
    "interval_contains",
]
