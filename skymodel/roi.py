"""Region of interest: which pixels are analysed, which normalise templates, and the
exposure regions used by the NPTF likelihood.

Two pixel sets matter:
- analysis pixels: where the likelihood is evaluated (`n_pixels` of them);
- normalisation pixels: where templates are scaled to mean 1 (the paper: r < 25 deg,
  |b| > 2 deg without the source mask).
Morphologies are evaluated once on their union, the *model pixels*; `analysis_index` and
`norm_index` point into it.
"""

from __future__ import annotations

import equinox as eqx
import healpy as hp
import jax.numpy as jnp
import numpy as np

from skymodel._types import Array, Float, Int


def _as_mask(name: str, mask, npix: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != (npix,):
        raise ValueError(f"{name} has shape {m.shape}, expected ({npix},) for this nside")
    if m.dtype != bool:
        if not np.all(np.isin(m, (0, 1))):
            raise ValueError(f"{name} must be boolean or 0/1 (1 = masked)")
        m = m.astype(bool)
    return m


class ROI(eqx.Module):
    """Pixels of an analysis on a HEALPix (RING, Galactic) map.

    Attributes (model pixels = union of analysis and normalisation pixels):
      nside: HEALPix nside (static).
      model_pixels: (nmodel,) HEALPix RING indices.
      l, b: (nmodel,) Galactic longitude in (-pi, pi] and latitude, radians.
      exposure: (nmodel,) exposure in cm^2 s (ones when none was given).
      analysis_index: (npix,) positions of the analysis pixels in `model_pixels`.
      norm_index: (nnorm,) positions of the normalisation pixels in `model_pixels`.
      region: (npix,) exposure region of each analysis pixel, 0..nregion-1.
      region_ratio: (nregion,) mean exposure of each region / mean over analysis pixels.
    """

    nside: int = eqx.field(static=True)
    model_pixels: Int[Array, " nmodel"]
    l: Float[Array, " nmodel"]
    b: Float[Array, " nmodel"]
    exposure: Float[Array, " nmodel"]
    analysis_index: Int[Array, " npix"]
    norm_index: Int[Array, " nnorm"]
    region: Int[Array, " npix"]
    region_ratio: Float[Array, " nregion"]

    @classmethod
    def from_masks(
        cls,
        nside: int,
        mask,
        norm_mask=None,
        exposure=None,
        n_exposure_regions: int = 1,
    ) -> "ROI":
        """Build an ROI from full-sky boolean masks (True = masked, i.e. excluded).

        mask: excluded pixels of the analysis; norm_mask: excluded pixels of the
        normalisation region (default: same as `mask`); exposure: full-sky exposure map
        (cm^2 s), needed for exposure regions and exposure-weighted morphologies.
        """
        if not isinstance(nside, (int, np.integer)) or not hp.isnsideok(int(nside), nest=True):
            raise ValueError(f"nside must be a power of 2, got {nside!r}")
        nside = int(nside)
        npix = hp.nside2npix(nside)
        mask = _as_mask("mask", mask, npix)
        norm_mask = mask if norm_mask is None else _as_mask("norm_mask", norm_mask, npix)
        analysis = np.flatnonzero(~mask)
        norm = np.flatnonzero(~norm_mask)
        if analysis.size == 0:
            raise ValueError("the mask leaves no analysis pixels")
        if norm.size == 0:
            raise ValueError("the normalisation mask leaves no pixels")
        if exposure is None:
            exposure = np.ones(npix)
        exposure = np.asarray(exposure, dtype=np.float64)
        if exposure.shape != (npix,):
            raise ValueError(
                f"exposure has shape {exposure.shape}, expected ({npix},) for nside {nside}"
            )
        model = np.union1d(analysis, norm)
        bad = ~np.isfinite(exposure[model]) | (exposure[model] <= 0)
        if bad.any():
            raise ValueError(
                f"exposure must be finite and positive in the ROI; {int(bad.sum())} "
                f"pixels are not (first: {int(model[bad][0])})"
            )
        if not isinstance(n_exposure_regions, (int, np.integer)) or n_exposure_regions < 1:
            raise ValueError(f"n_exposure_regions must be a positive int, got {n_exposure_regions!r}")
        if n_exposure_regions > analysis.size:
            raise ValueError(
                f"n_exposure_regions={n_exposure_regions} exceeds the {analysis.size} analysis pixels"
            )
        theta, phi = hp.pix2ang(nside, model)
        b = np.pi / 2 - theta
        l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
        analysis_index = np.searchsorted(model, analysis)
        norm_index = np.searchsorted(model, norm)
        region, ratio = exposure_regions(exposure[analysis], n_exposure_regions)
        return cls(
            nside=nside,
            model_pixels=jnp.asarray(model),
            l=jnp.asarray(l),
            b=jnp.asarray(b),
            exposure=jnp.asarray(exposure[model]),
            analysis_index=jnp.asarray(analysis_index),
            norm_index=jnp.asarray(norm_index),
            region=jnp.asarray(region),
            region_ratio=jnp.asarray(ratio),
        )

    @property
    def n_pixels(self) -> int:
        return int(self.analysis_index.shape[0])

    @property
    def n_model(self) -> int:
        return int(self.model_pixels.shape[0])

    @property
    def n_regions(self) -> int:
        return int(self.region_ratio.shape[0])

    @property
    def pixels(self) -> Int[Array, " npix"]:
        """HEALPix indices of the analysis pixels."""
        return self.model_pixels[self.analysis_index]

    @property
    def analysis_exposure(self) -> Float[Array, " npix"]:
        return self.exposure[self.analysis_index]

    def restrict(self, sky_map) -> Float[Array, " npix"]:
        """Values of a full-sky map on the analysis pixels."""
        m = np.asarray(sky_map)
        npix = hp.nside2npix(self.nside)
        if m.shape[-1] != npix:
            raise ValueError(f"map has {m.shape[-1]} pixels, expected {npix} (nside {self.nside})")
        return jnp.asarray(m[..., np.asarray(self.pixels)])

    def restrict_model(self, sky_map) -> Float[Array, " nmodel"]:
        """Values of a full-sky map on the model pixels."""
        m = np.asarray(sky_map)
        npix = hp.nside2npix(self.nside)
        if m.shape[-1] != npix:
            raise ValueError(f"map has {m.shape[-1]} pixels, expected {npix} (nside {self.nside})")
        return jnp.asarray(m[..., np.asarray(self.model_pixels)])

    def to_sky(self, values, fill: float = np.nan) -> np.ndarray:
        """Scatter analysis-pixel values into a full-sky map (other pixels = fill)."""
        v = np.asarray(values)
        if v.shape[-1] != self.n_pixels:
            raise ValueError(f"values have {v.shape[-1]} entries, expected {self.n_pixels}")
        out = np.full(v.shape[:-1] + (hp.nside2npix(self.nside),), fill, dtype=np.float64)
        out[..., np.asarray(self.pixels)] = v
        return out


def exposure_regions(exposure: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Split pixels into `n_regions` groups of near-equal size by sorted exposure.

    Returns (region index per pixel, mean exposure of each region / mean exposure of all
    pixels), as NPTFit does.
    """
    exposure = np.asarray(exposure, dtype=np.float64)
    order = np.argsort(exposure, kind="stable")
    region = np.empty(exposure.size, dtype=np.int64)
    for r, chunk in enumerate(np.array_split(order, n_regions)):
        region[chunk] = r
    mean_all = exposure.mean()
    ratio = np.array([exposure[region == r].mean() / mean_all for r in range(n_regions)])
    return region, ratio


__all__ = ["ROI", "exposure_regions"]
