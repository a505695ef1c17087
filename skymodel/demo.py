"""The demo sky: skymodel's own analytic templates, a synthetic exposure, and a mock drawn
from known parameters ([truth] in the config), so a fit can be checked against truth with no
external data."""

from __future__ import annotations

from collections.abc import Mapping

import healpy as hp
import jax
import numpy as np


def synthetic_exposure(nside: int) -> np.ndarray:
    """A smooth, Fermi-like full-sky exposure (cm^2 s): ~3e11 with +-20% large-scale
    variation (more exposure towards the north and the Galactic Center), so exposure
    regions matter."""
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)))
    b = np.pi / 2 - theta
    l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
    return 3.0e11 * (1.0 + 0.15 * np.sin(b) + 0.08 * np.cos(l) + 0.05 * np.cos(2 * b))


def demo_dataset(cfg: Mapping):
    """(Dataset with simulated counts, truth dict, Simulation) for a config whose [data]
    table has `demo = true` (nside, seed) and whose [truth] table gives the true values of
    every free parameter by site name."""
    from skymodel import config as C
    from skymodel.data import Dataset
    from skymodel.model import SkyModel
    from skymodel.morphology_numerics import analytic_templates
    from skymodel.simulate import simulate

    data = cfg.get("data", {})
    nside = int(data.get("nside", 128))
    seed = int(data.get("seed", 0))
    truth = dict(cfg.get("truth", {}))
    exposure = synthetic_exposure(nside)
    templates = analytic_templates(nside, exposure)
    empty = Dataset.from_arrays(np.zeros(hp.nside2npix(nside)), exposure, templates=templates)
    roi = C.build_roi(cfg, empty)
    sky = SkyModel(
        tuple(C.build_component(c, empty, roi, i) for i, c in enumerate(cfg["components"]))
    )
    free = sky.free_parameters()
    missing = [k for k in free if k not in truth]
    if missing:
        raise C.ConfigError(f"[truth] lacks values for {missing}")
    sky_true = sky.with_values({k: truth[k] for k in free})
    psf_model, _ = C.build_psf(cfg, nside)
    sim = simulate(jax.random.PRNGKey(seed), sky_true, roi, psf_model)
    counts = np.zeros(hp.nside2npix(nside))
    pix = np.asarray(roi.pixels)
    counts[pix] = np.asarray(sim.counts)
    dataset = Dataset.from_arrays(counts, exposure, templates=templates)
    return dataset, {k: truth[k] for k in free}, sim
