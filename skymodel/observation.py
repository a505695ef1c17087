"""Observation: the data one fit sees (ROI, photon counts on its analysis pixels, PSF
correction for the NPTF likelihood, and a static count plan built once from the counts)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import healpy as hp
import jax.numpy as jnp
import numpy as np

from skymodel._tracing import is_traced
from skymodel._types import Array, Float
from skymodel.roi import ROI


def _build_plan(counts: np.ndarray):
    """A CountPlan from concrete counts when the likelihood module offers one, else None."""
    try:
        from skymodel.likelihood import count_plan
    except ImportError:
        return None
    return count_plan(counts)


class Observation(eqx.Module):
    """Photon counts on the analysis pixels of an ROI.

    Attributes:
      roi: the region of interest.
      counts: (npix,) float64 photon counts per analysis pixel (integer-valued, >= 0).
      psf: PSF correction table for the NPTF likelihood (None = no PSF smearing).
      plan: count plan for the NPTF likelihood (grouping of pixels by count), built from the
        concrete counts; None when the likelihood module offers none.
    """

    roi: ROI
    counts: Float[Array, " npix"]
    psf: Any = None
    plan: Any = None

    def __init__(self, roi: ROI, counts, psf=None, plan=None, *, build_plan: bool = True):
        self.roi = roi
        self.counts = jnp.asarray(counts, dtype=jnp.float64)
        self.psf = psf
        if plan is None and build_plan and not is_traced(counts):
            plan = _build_plan(np.asarray(counts, dtype=np.float64))
        self.plan = plan

    def __check_init__(self):
        if self.counts.shape != (self.roi.n_pixels,):
            raise ValueError(
                f"counts have shape {self.counts.shape}, expected ({self.roi.n_pixels},) "
                "(one entry per analysis pixel of the ROI)"
            )

    @classmethod
    def from_sky_counts(cls, roi: ROI, counts_map, psf=None) -> "Observation":
        """Validate a counts map and restrict it to the ROI's analysis pixels.

        counts_map: full-sky HEALPix map (12 nside^2,) in RING order, or the counts on the
        analysis pixels already (roi.n_pixels,). Values must be finite, non-negative and
        integer-valued (ValueError naming the problem otherwise; checked on the pixels
        used).
        """
        m = np.asarray(counts_map)
        if m.ndim != 1:
            raise ValueError(f"counts map must be one-dimensional, got shape {m.shape}")
        nsky = hp.nside2npix(roi.nside)
        if m.shape[0] == nsky:
            values = m[np.asarray(roi.pixels)]
        elif m.shape[0] == roi.n_pixels:
            values = m
        else:
            raise ValueError(
                f"counts map has {m.shape[0]} entries, expected {nsky} (full sky, nside "
                f"{roi.nside}) or {roi.n_pixels} (the ROI's analysis pixels)"
            )
        if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
                or values.dtype == bool):
            raise ValueError(f"counts must be numeric, got dtype {values.dtype}")
        values = values.astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"counts must be finite; {int(bad.sum())} analysis pixels are not")
        if (values < 0).any():
            raise ValueError(
                f"counts must be non-negative; {int((values < 0).sum())} analysis pixels are "
                f"negative (min {values.min()})"
            )
        if (values != np.round(values)).any():
            raise ValueError(
                f"counts must be integer-valued; {int((values != np.round(values)).sum())} "
                "analysis pixels are not"
            )
        return cls(roi, values, psf=psf)

    @property
    def n_pixels(self) -> int:
        return int(self.counts.shape[0])


__all__ = ["Observation"]
