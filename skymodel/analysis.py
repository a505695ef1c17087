"""Analysis of a posterior: flux fractions, the GCE split, SCF bands, corner plots, maps,
and the one-page report of a saved run.

Everything takes a `Posterior` and, where maps are needed, the `SkyModel` and `ROI` it was
fitted to; nothing here runs inference. Conventions:

- Flux of a component in a region = sum over the region's analysis pixels of
  expected counts / exposure (ph cm^-2 s^-1); flux fractions are ratios of these (the
  NPTFit convention: fractions of intensity, not of counts). `weighting="counts"` gives
  fractions of expected counts instead. Point-source populations enter with their mean
  counts (template x integral S dN/dS x exposure-region ratio).
- SCF bands: S^2 dN/dS of a population at each S, with S in photon counts at the ROI's
  mean exposure (the likelihood's convention), per square degree of the ROI:
  dN/dS [per unit template] x mean template over the analysis pixels / pixel area.
  In flux units F = S / mean exposure: F^2 dN/dF = S^2 dN/dS / mean exposure
  (ph cm^-2 s^-1 deg^-2). Quantile bands over posterior samples.

`report(run_dir)` (also `skymodel report RUN_DIR [--compare OTHER]`) writes corner plots,
SCF bands, flux fractions, data / model / residual maps and `summary.txt`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from skymodel._types import Bool, Float

QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)


# ----------------------------------------------------------------------------- samples


def _sample_indices(n_total: int, num: int | None, seed: int) -> np.ndarray:
    """`num` distinct sample indices (all of them, in order, when num >= n_total)."""
    if num is None or num >= n_total:
        return np.arange(n_total)
    if num < 1:
        raise ValueError(f"num must be a positive number of samples, got {num}")
    return np.sort(np.random.default_rng(seed).choice(n_total, size=int(num), replace=False))


def _check_sites(posterior, sky) -> None:
    free = list(sky.free_parameters())
    missing = [k for k in free if k not in posterior.names]
    extra = [k for k in posterior.names if k not in free]
    if missing or extra:
        raise ValueError(
            f"the posterior does not match the sky model: model parameters without samples "
            f"{missing}, samples of unknown parameters {extra}"
        )


def _stacked(posterior, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: posterior[k][idx] for k in posterior.names}


def _map_samples(fn, values: Mapping[str, np.ndarray], batch: int):
    """jit(lax.map(fn)) over the leading axis of `values`, `batch` samples at a time."""
    import jax
    import jax.numpy as jnp

    vals = {k: jnp.asarray(v, jnp.float64) for k, v in values.items()}
    run = jax.jit(lambda v: jax.lax.map(fn, v, batch_size=int(batch)))
    return jax.tree_util.tree_map(np.asarray, run(vals))


def _flat(posterior, names=None) -> tuple[list[str], np.ndarray]:
    """(labels, (n, d) array) with vector-valued sites split into components."""
    labels, cols = [], []
    for name in names or posterior.names:
        v = posterior[name]
        if v.ndim == 1:
            labels.append(name)
            cols.append(v)
        else:
            flat = v.reshape(v.shape[0], -1)
            for j in range(flat.shape[1]):
                labels.append(f"{name}[{j}]")
                cols.append(flat[:, j])
    return labels, np.stack(cols, axis=1)


def truth_table(posterior, truth: Mapping[str, float]) -> str:
    """Text table: true value, posterior median and 68% interval, and whether the truth
    lies inside the 68% / 95% intervals."""
    rows = ["parameter                                   truth      median     68% interval             in68  in95"]
    for name in posterior.names:
        if name not in truth:
            continue
        v = posterior[name]
        t = np.asarray(truth[name], dtype=float)
        if v.ndim > 1:
            continue
        q = np.percentile(v, [2.5, 16, 50, 84, 97.5])
        in68 = q[1] <= t <= q[3]
        in95 = q[0] <= t <= q[4]
        rows.append(
            f"{name:42s} {float(t):9.4g} {q[2]:10.4g}  [{q[1]:9.4g}, {q[3]:9.4g}]   "
            f"{'yes' if in68 else 'no':>4s}  {'yes' if in95 else 'no':>4s}"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------- regions


def inner_mask(roi, radius_deg: float = 10.0) -> Bool[np.ndarray, " npix"]:
    """Boolean mask over the ROI's analysis pixels: angular distance from the Galactic
    Center below `radius_deg` (pixel centres)."""
    if not (np.isfinite(radius_deg) and radius_deg > 0):
        raise ValueError(f"radius_deg must be positive, got {radius_deg}")
    idx = np.asarray(roi.analysis_index)
    l, b = np.asarray(roi.l)[idx], np.asarray(roi.b)[idx]
    r = np.degrees(np.arccos(np.clip(np.cos(l) * np.cos(b), -1.0, 1.0)))
    return r < radius_deg


def _region_masks(roi, regions) -> dict[str, np.ndarray]:
    if regions is None:
        regions = {"ROI": None}
    out = {}
    for name, m in regions.items():
        if m is None:
            out[name] = np.ones(roi.n_pixels, bool)
            continue
        m = np.asarray(m)
        if m.shape != (roi.n_pixels,) or m.dtype != bool:
            raise ValueError(
                f"region {name!r} must be a boolean mask over the {roi.n_pixels} analysis pixels, "
                f"got shape {m.shape} dtype {m.dtype}"
            )
        if not m.any():
            raise ValueError(f"region {name!r} contains no analysis pixels")
        out[name] = m
    return out


# ----------------------------------------------------------------------------- fluxes


def component_fluxes(
    posterior,
    sky,
    roi,
    regions: Mapping[str, np.ndarray | None] | None = None,
    *,
    num: int | None = 500,
    seed: int = 0,
    weighting: str = "flux",
    batch: int = 25,
) -> dict[str, dict[str, Float[np.ndarray, " nsamp"]]]:
    """Per posterior sample, each component's flux in each region.

    regions: name -> boolean mask over analysis pixels (None = all); default {"ROI": None}.
    weighting: "flux" (sum of expected counts / exposure, ph cm^-2 s^-1) or "counts"
    (sum of expected counts). num: number of random posterior samples (None = all).
    Returns region -> component -> (num,) array.
    """
    import jax.numpy as jnp

    if weighting not in ("flux", "counts"):
        raise ValueError(f"weighting must be 'flux' or 'counts', got {weighting!r}")
    _check_sites(posterior, sky)
    masks = _region_masks(roi, regions)
    idx = _sample_indices(posterior.num_samples, num, seed)
    w = 1.0 / np.asarray(roi.analysis_exposure) if weighting == "flux" else np.ones(roi.n_pixels)
    W = jnp.asarray(np.stack([np.where(m, w, 0.0) for m in masks.values()]))  # (nregion, npix)
    names = [c.name for c in sky.components]

    def one(values):
        ec = sky.with_values(values, check=False).expected_counts(roi)
        return jnp.stack([W @ ec[n] for n in names], axis=1)  # (nregion, ncomp)

    out = _map_samples(one, _stacked(posterior, idx), batch)  # (num, nregion, ncomp)
    return {
        r: {n: out[:, i, j] for j, n in enumerate(names)} for i, r in enumerate(masks)
    }


def fractions(fluxes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Component -> flux / total flux (per sample), from one region's `component_fluxes`."""
    total = sum(np.asarray(v) for v in fluxes.values())
    return {k: np.asarray(v) / total for k, v in fluxes.items()}


def flux_fractions(
    posterior, sky, roi, mask=None, num: int | None = 500, seed: int = 0, weighting: str = "flux"
) -> dict[str, np.ndarray]:
    """Samples of each component's fraction of the total flux in the analysis pixels (or
    in the subset `mask`, a boolean array over analysis pixels). See `component_fluxes`."""
    fl = component_fluxes(posterior, sky, roi, {"region": mask}, num=num, seed=seed, weighting=weighting)
    return fractions(fl["region"])


def gce_components(sky) -> tuple[list[str], list[str]]:
    """(smooth, point-source) components of the GCE, recognised by names starting with
    "gce" (the configs' convention: "gce" and "gce_ps")."""
    from skymodel.components.base import AbstractPointSourcePopulation

    smooth = [c.name for c in sky.components
              if c.name.startswith("gce") and not isinstance(c, AbstractPointSourcePopulation)]
    ps = [c.name for c in sky.components
          if c.name.startswith("gce") and isinstance(c, AbstractPointSourcePopulation)]
    return smooth, ps


def gce_split(
    fluxes: Mapping[str, np.ndarray], smooth: Sequence[str], point_sources: Sequence[str]
) -> Float[np.ndarray, " nsamp"]:
    """Per sample, the point-source share of the GCE flux, PS / (smooth + PS), from one
    region's `component_fluxes`."""
    missing = [n for n in [*smooth, *point_sources] if n not in fluxes]
    if missing or not smooth or not point_sources:
        raise ValueError(
            f"gce_split needs smooth and point-source GCE components among {list(fluxes)}; "
            f"got smooth={list(smooth)}, point_sources={list(point_sources)}"
        )
    s = sum(np.asarray(fluxes[n]) for n in smooth)
    p = sum(np.asarray(fluxes[n]) for n in point_sources)
    return p / (s + p)


def posterior_mean_counts(posterior, sky, roi, num: int | None = 200, seed: int = 0,
                          batch: int = 25) -> dict[str, np.ndarray]:
    """Posterior-mean expected counts per component on the analysis pixels, name ->
    (npix,), averaged over `num` random posterior samples."""
    _check_sites(posterior, sky)
    idx = _sample_indices(posterior.num_samples, num, seed)

    def one(values):
        return sky.with_values(values, check=False).expected_counts(roi)

    out = _map_samples(one, _stacked(posterior, idx), batch)
    return {k: v.mean(axis=0) for k, v in out.items()}


# ----------------------------------------------------------------------------- SCF bands


@dataclasses.dataclass(frozen=True)
class SCFBand:
    """Quantile band of S^2 dN/dS of one point-source population.

    S: (nS,) photon counts at the mean exposure; flux: (nS,) F = S / mean_exposure in
    ph cm^-2 s^-1; quantiles: (nq,); s2dnds: (nq, nS) S^2 dN/dS in counts deg^-2;
    f2dndf: (nq, nS) F^2 dN/dF in ph cm^-2 s^-1 deg^-2; mean_exposure: cm^2 s.
    """

    name: str
    S: np.ndarray
    flux: np.ndarray
    quantiles: np.ndarray
    s2dnds: np.ndarray
    f2dndf: np.ndarray
    mean_exposure: float

    def at(self, q: float, units: str = "counts") -> np.ndarray:
        """The band's curve at quantile q (one of `quantiles`)."""
        i = np.flatnonzero(np.isclose(self.quantiles, q))
        if i.size == 0:
            raise ValueError(f"quantile {q} not in the band's {self.quantiles.tolist()}")
        return (self.s2dnds if units == "counts" else self.f2dndf)[i[0]]


def pixel_area_deg2(nside: int) -> float:
    """Area of one HEALPix pixel in square degrees."""
    return 4.0 * math.pi * (180.0 / math.pi) ** 2 / (12 * int(nside) ** 2)


def scf_band(
    posterior,
    sky,
    roi,
    name: str,
    S=None,
    quantiles: Sequence[float] = QUANTILES,
    *,
    num: int | None = 1000,
    seed: int = 0,
    batch: int = 50,
) -> SCFBand:
    """Quantile band over posterior samples of S^2 dN/dS of the population `name`.

    Per sample: the population's SCF (`source_count_function(roi)`,
    `skymodel.scf.BrokenPowerLaw.dnds`) and source template at the sample's parameters;
    S^2 dN/dS x mean template over the analysis pixels / pixel area (deg^2).
    S: grid of counts (default 200 log-spaced values from 0.05 to 500).
    """
    import jax.numpy as jnp

    from skymodel.components.base import AbstractPointSourcePopulation

    comp = sky.component(name)
    if not isinstance(comp, AbstractPointSourcePopulation):
        raise ValueError(f"component {name!r} is not a point-source population")
    _check_sites(posterior, sky)
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or np.any((q < 0) | (q > 1)):
        raise ValueError(f"quantiles must be a 1-d sequence in [0, 1], got {quantiles}")
    S = np.logspace(np.log10(0.05), np.log10(500.0), 200) if S is None else np.asarray(S, np.float64)
    if S.ndim != 1 or np.any(~(S > 0)):
        raise ValueError("S must be a 1-d grid of positive counts")
    idx = _sample_indices(posterior.num_samples, num, seed)
    area = pixel_area_deg2(roi.nside)
    S_j = jnp.asarray(S)

    def one(values):
        c = sky.with_values(values, check=False).component(name)
        t_mean = jnp.mean(c.source_template(roi))
        return S_j**2 * c.source_count_function(roi).dnds(S_j) * t_mean / area

    curves = _map_samples(one, _stacked(posterior, idx), batch)  # (num, nS)
    band = np.quantile(curves, q, axis=0)
    eps = float(np.mean(np.asarray(roi.analysis_exposure)))
    return SCFBand(name=name, S=S, flux=S / eps, quantiles=q, s2dnds=band, f2dndf=band / eps,
                   mean_exposure=eps)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def corner_plot(
    posteriors,
    path: str | pathlib.Path | None = None,
    *,
    names: Sequence[str] | None = None,
    truth: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    bins: int = 40,
):
    """Corner plot of one or several posteriors overlaid (e.g. SVI vs NUTS): 1-d
    histograms on the diagonal, 68% and 95% highest-density contours below.

    posteriors: a Posterior or a sequence of them (all must hold `names`). Returns the
    matplotlib Figure.
    """
    plt = _pyplot()
    if not isinstance(posteriors, (list, tuple)):
        posteriors = [posteriors]
    names = list(names or posteriors[0].names)
    flats = [_flat(p, names) for p in posteriors]
    cols = flats[0][0]
    d = len(cols)
    size = min(1.9 * d + 1, 30.0)
    fig, axes = plt.subplots(d, d, figsize=(size, size), squeeze=False)
    colors = ["C0", "C1", "C2", "C3"]
    tvals = None
    if truth is not None:
        tvals = []
        for c in cols:
            base = c.split("[")[0]
            if base in truth:
                tv = np.ravel(np.asarray(truth[base], dtype=float))
                j = int(c.split("[")[1][:-1]) if "[" in c else 0
                tvals.append(tv[j])
            else:
                tvals.append(None)
    ranges = []
    for i in range(d):
        allv = np.concatenate([f[1][:, i] for f in flats])
        lo, hi = np.percentile(allv, [0.5, 99.5])
        if tvals is not None and tvals[i] is not None:
            lo, hi = min(lo, tvals[i]), max(hi, tvals[i])
        pad = 0.05 * (hi - lo + 1e-12)
        ranges.append((lo - pad, hi + pad))
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            for k, (_, x) in enumerate(flats):
                if i == j:
                    ax.hist(x[:, i], bins=bins, range=ranges[i], histtype="step", density=True, color=colors[k % 4])
                else:
                    h, xe, ye = np.histogram2d(x[:, j], x[:, i], bins=bins // 2, range=[ranges[j], ranges[i]])
                    h = h.T
                    hs = np.sort(h.ravel())[::-1]
                    if hs.sum() <= 0:
                        continue
                    cum = np.cumsum(hs) / hs.sum()
                    levels = sorted({hs[min(np.searchsorted(cum, q), hs.size - 1)] for q in (0.95, 0.68)})
                    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
                    try:
                        ax.contour(xc, yc, h, levels=levels + [hs[0] + 1], colors=colors[k % 4], linewidths=0.8)
                    except ValueError:
                        pass
            if tvals is not None:
                if tvals[j] is not None:
                    ax.axvline(tvals[j], color="k", lw=0.7, ls="--")
                if i != j and tvals[i] is not None:
                    ax.axhline(tvals[i], color="k", lw=0.7, ls="--")
            ax.set_xlim(ranges[j])
            if i != j:
                ax.set_ylim(ranges[i])
            if i == d - 1:
                ax.set_xlabel(cols[j], fontsize=7, rotation=20)
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(cols[i], fontsize=7)
            else:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=6)
    if labels:
        handles = [plt.Line2D([], [], color=colors[k % 4], label=lab) for k, lab in enumerate(labels)]
        fig.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def scf_band_plot(
    bands: Sequence[SCFBand],
    path: str | pathlib.Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    truth: Sequence[SCFBand | None] | None = None,
):
    """Two panels: S^2 dN/dS vs S (counts) and F^2 dN/dF vs F (ph cm^-2 s^-1), median and
    68% / 95% bands of each band (e.g. one per population, or SVI vs NUTS). `truth`: bands
    (one quantile is enough) drawn as dashed lines. Returns the Figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(labels) if labels else [b.name for b in bands]
    for k, (band, lab) in enumerate(zip(bands, labels)):
        col = f"C{k % 10}"
        for ax, x, y in ((axes[0], band.S, band.s2dnds), (axes[1], band.flux, band.f2dndf)):
            q = band.quantiles
            if np.any(np.isclose(q, 0.025)) and np.any(np.isclose(q, 0.975)):
                ax.fill_between(x, y[np.argmin(abs(q - 0.025))], y[np.argmin(abs(q - 0.975))], color=col, alpha=0.15, lw=0)
            if np.any(np.isclose(q, 0.16)) and np.any(np.isclose(q, 0.84)):
                ax.fill_between(x, y[np.argmin(abs(q - 0.16))], y[np.argmin(abs(q - 0.84))], color=col, alpha=0.3, lw=0)
            ax.plot(x, y[np.argmin(abs(q - 0.5))], color=col, label=lab)
    for k, t in enumerate(truth or []):
        if t is None:
            continue
        axes[0].plot(t.S, t.s2dnds[0], color=f"C{k % 10}", ls="--", lw=1, label="truth" if k == 0 else None)
        axes[1].plot(t.flux, t.f2dndf[0], color=f"C{k % 10}", ls="--", lw=1)
    axes[0].set_xlabel("S [counts at the mean exposure]")
    axes[0].set_ylabel(r"$S^2\,dN/dS$ [counts deg$^{-2}$]")
    axes[1].set_xlabel(r"F [ph cm$^{-2}$ s$^{-1}$]")
    axes[1].set_ylabel(r"$F^2\,dN/dF$ [ph cm$^{-2}$ s$^{-1}$ deg$^{-2}$]")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        lines = [ln for ln in ax.get_lines() if len(ln.get_ydata())]
        ymax = max((np.nanmax(ln.get_ydata()) for ln in lines), default=1.0)
        if ymax > 0 and np.isfinite(ymax):
            ax.set_ylim(ymax * 1e-4, ymax * 3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def cartesian_image(roi, values, *, lon_range=(-25.0, 25.0), lat_range=(-25.0, 25.0), xsize: int = 400,
                    smooth_deg: float = 0.0) -> Float[np.ndarray, "ny nx"]:
    """Cartesian image (healpy.cartview) of analysis-pixel `values` (npix,); pixels outside
    the ROI are NaN. Row 0 is the lowest latitude, column 0 the largest longitude
    (show with imshow(origin="lower", extent=[lon_max, lon_min, lat_min, lat_max])).
    smooth_deg > 0: Gaussian smoothing (FWHM, deg) normalised by the smoothed ROI
    indicator, so the mask edge does not darken the map."""
    import healpy as hp

    plt = _pyplot()
    sky = roi.to_sky(np.asarray(values, dtype=np.float64), fill=0.0)
    inside = roi.to_sky(np.ones(roi.n_pixels), fill=0.0) > 0
    if smooth_deg > 0:
        sm = hp.smoothing(sky, fwhm=np.radians(smooth_deg))
        norm = hp.smoothing(inside.astype(float), fwhm=np.radians(smooth_deg))
        sky = sm / np.maximum(norm, 1e-3)
    sky = np.where(inside, sky, hp.UNSEEN)
    fignum = max(plt.get_fignums(), default=0) + 1000  # a fresh figure for healpy to draw in
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)  # healpy's colormap calls
            img = hp.cartview(sky, fig=fignum, lonra=list(lon_range), latra=list(lat_range),
                              xsize=int(xsize), return_projected_map=True)
    finally:
        plt.close(fignum)
    return np.ma.filled(np.ma.masked_equal(np.ma.asarray(img, dtype=np.float64), hp.UNSEEN), np.nan)


def residual_map_plot(
    roi,
    counts,
    model_counts,
    path: str | pathlib.Path | None = None,
    *,
    lon_range=(-25, 25),
    lat_range=(-25, 25),
    smooth_deg: float = 1.0,
):
    """Data, model and (data - model) maps of the ROI (counts per pixel) in a Cartesian
    view (Galactic, healpy.cartview), smoothed with a Gaussian of FWHM `smooth_deg` for
    display. Returns the Figure."""
    plt = _pyplot()
    counts = np.asarray(counts, dtype=np.float64)
    model_counts = np.asarray(model_counts, dtype=np.float64)
    imgs = [cartesian_image(roi, v, lon_range=lon_range, lat_range=lat_range, smooth_deg=smooth_deg)
            for v in (counts, model_counts, counts - model_counts)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    vmax = np.nanpercentile(imgs[0], 99)
    extent = [lon_range[1], lon_range[0], lat_range[0], lat_range[1]]
    titles = ["data (counts/pixel)", "model (posterior mean)", "residual: data - model"]
    for ax, img, title in zip(axes, imgs, titles):
        if title.startswith("residual"):
            r = np.nanpercentile(np.abs(img), 99)
            im = ax.imshow(img, origin="lower", extent=extent, cmap="RdBu_r", vmin=-r, vmax=r)
        else:
            im = ax.imshow(img, origin="lower", extent=extent, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(title + (f", {smooth_deg:g} deg smoothing" if smooth_deg > 0 and title.startswith("data") else ""),
                     fontsize=9)
        ax.set_xlabel("l [deg]")
        ax.set_ylabel("b [deg]")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def flux_fraction_plot(fracs, path=None, *, labels=None):
    """Median and 68% interval of each component's flux fraction, one group of bars per
    region. fracs: region -> component -> samples (or a list of such for overlays with
    `labels`). Returns the Figure."""
    plt = _pyplot()
    sets = fracs if isinstance(fracs, (list, tuple)) else [fracs]
    labels = list(labels) if labels else [None] * len(sets)
    regions = list(sets[0])
    comps = list(sets[0][regions[0]])
    fig, axes = plt.subplots(1, len(regions), figsize=(5.5 * len(regions), 3.8), squeeze=False)
    for ax, reg in zip(axes[0], regions):
        for k, (fs, lab) in enumerate(zip(sets, labels)):
            y = np.arange(len(comps)) + 0.15 * (k - (len(sets) - 1) / 2)
            q = np.array([np.quantile(100 * fs[reg][c], [0.16, 0.5, 0.84]) for c in comps])
            ax.errorbar(q[:, 1], y, xerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], fmt="o", ms=4,
                        color=f"C{k}", label=lab)
        ax.set_yticks(np.arange(len(comps)), comps)
        ax.set_xlabel("flux fraction [%]")
        ax.set_title(reg)
        ax.invert_yaxis()
        if labels[0] is not None:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def loss_plot(losses, path=None, *, temper_steps: int = 0):
    """SVI loss (negative ELBO) per step, with a running median; the tempering phase is
    shaded. Returns the Figure."""
    plt = _pyplot()
    losses = np.asarray(losses, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    steps = np.arange(1, losses.size + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.5, color="C0")
    w = max(1, losses.size // 100)
    if losses.size > 2 * w:
        med = np.array([np.median(losses[max(0, i - w):i + w]) for i in range(losses.size)])
        ax.plot(steps, med, color="C1", lw=1.2, label=f"running median ({2 * w} steps)")
        ax.legend(fontsize=8)
    if temper_steps:
        ax.axvspan(1, temper_steps, color="0.9", zorder=0)
        ax.text(temper_steps, 0.98, " end of tempering", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
    finite = losses[np.isfinite(losses)]
    if finite.size > 10:
        tail = finite[finite.size // 10:]
        ax.set_ylim(np.percentile(tail, 0.5) - 0.05 * np.ptp(tail), np.percentile(finite, 99))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (-ELBO) [nats]")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ----------------------------------------------------------------------------- report


def _interval(x) -> str:
    lo, med, hi = np.quantile(np.asarray(x), [0.16, 0.5, 0.84])
    return f"{med:8.4g} [{lo:8.4g}, {hi:8.4g}]"


def _pct(x) -> str:
    lo, med, hi = 100 * np.quantile(np.asarray(x), [0.16, 0.5, 0.84])
    return f"{med:6.2f}% [{lo:6.2f}, {hi:6.2f}]"


def compare_table(a, b, labels=("run", "other")) -> str:
    """Scalar parameters common to two posteriors: medians, 68% widths and the shift of
    the medians in units of the combined 68% half-width."""
    rows = [f"{'parameter':42s} {labels[0]:>28s} {labels[1]:>28s}  shift/sigma"]
    la, xa = _flat(a, [n for n in a.names if n in b.names])
    _, xb = _flat(b, [n for n in a.names if n in b.names])
    for j, name in enumerate(la):
        qa = np.quantile(xa[:, j], [0.16, 0.5, 0.84])
        qb = np.quantile(xb[:, j], [0.16, 0.5, 0.84])
        sig = math.hypot((qa[2] - qa[0]) / 2, (qb[2] - qb[0]) / 2)
        shift = (qb[1] - qa[1]) / sig if sig > 0 else float("nan")
        rows.append(f"{name:42s} {_interval(xa[:, j]):>28s} {_interval(xb[:, j]):>28s}  {shift:+8.2f}")
    return "\n".join(rows)


@dataclasses.dataclass
class Report:
    """What `report` computed: the posterior(s), fluxes and fractions per region (region
    -> component -> samples), the GCE point-source share per region (or None), SCF bands
    per population, the text summary and the files written."""

    posterior: object
    fluxes: dict
    fractions: dict
    gce_ps_share: dict | None
    bands: dict
    text: str
    files: list
    compare: object = None


def _corner_groups(posterior) -> dict[str, list[str]]:
    """"overview" (every norm / total_counts / amplitude) and one group per component
    with at least two parameters not all in the overview."""
    overview = [n for n in posterior.names if n.endswith(".norm") or n.endswith(".total_counts")
                or n.endswith(".amplitude")]
    per: dict[str, list[str]] = {}
    for n in posterior.names:
        per.setdefault(n.split(".")[0], []).append(n)
    groups = {"overview": overview} if overview else {}
    for comp, names in per.items():
        if len(names) >= 2 or not set(names) <= set(overview):
            groups[comp] = names
    return groups


def report(
    run_dir: str | pathlib.Path,
    *,
    out: str | pathlib.Path | None = None,
    compare: str | pathlib.Path | None = None,
    num: int = 500,
    seed: int = 0,
    inner_radius_deg: float = 10.0,
    smooth_deg: float = 1.0,
    progress: bool = False,
) -> Report:
    """Analyse a saved run: corner plots (overlaid with `compare`, another run of the same
    model, e.g. NUTS vs SVI), flux fractions in the ROI and within `inner_radius_deg` of
    the GC, the GCE split, SCF bands (counts and flux units), data / model / residual maps,
    the SVI loss curve and `summary.txt`, all written to `out` (default RUN_DIR/report).

    The model is rebuilt from RUN_DIR/config.toml (so the data must be reachable as when
    the run was made). `num` posterior samples are used for fluxes, maps and bands.
    """
    from skymodel import config as C
    from skymodel.inference import Posterior

    run = pathlib.Path(run_dir)
    if not (run / "posterior").exists():
        raise FileNotFoundError(f"{run} has no saved posterior (expected {run}/posterior)")
    if not (run / "config.toml").exists():
        raise FileNotFoundError(f"{run} has no config.toml (not a skymodel run directory?)")
    out = run / "report" if out is None else pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    post = Posterior.load(run / "posterior")
    other = None
    if compare is not None:
        if not (pathlib.Path(compare) / "posterior").exists():
            raise FileNotFoundError(f"--compare {compare}: no saved posterior there")
        other = Posterior.load(pathlib.Path(compare) / "posterior")

    def say(msg):
        if progress:
            print(msg, flush=True)

    say(f"[report] rebuilding the model from {run / 'config.toml'} ...")
    cfg = C.load_config(run / "config.toml")
    built = C.build(cfg)
    sky, roi = built.sky, built.roi
    _check_sites(post, sky)
    truth = dict(cfg.get("truth", {}))
    files = []
    plt = _pyplot()
    labels = [post.method, other.method if other is not None else None]
    if other is not None and labels[0] == labels[1]:
        labels = [f"{post.method} ({run.name})", f"{other.method} ({pathlib.Path(compare).name})"]

    # corner plots, one per component (+ an overview of the norms)
    say("[report] corner plots ...")
    for group, names in _corner_groups(post).items():
        if other is not None:
            names_o = [n for n in names if n in other.names]
            if not names_o:
                continue
            fig = corner_plot([post, other], names=names_o, truth=truth or None, labels=labels)
        else:
            fig = corner_plot(post, names=names, truth=truth or None)
        p = out / f"corner_{group}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        files.append(p)

    # fluxes, fractions, GCE split
    say("[report] flux fractions ...")
    regions = {"ROI": None, f"r < {inner_radius_deg:g} deg": inner_mask(roi, inner_radius_deg)}
    fluxes = component_fluxes(post, sky, roi, regions, num=num, seed=seed)
    fracs = {r: fractions(f) for r, f in fluxes.items()}
    smooth, ps = gce_components(sky)
    share = {r: gce_split(f, smooth, ps) for r, f in fluxes.items()} if smooth and ps else None
    fracs_o = None
    if other is not None:
        fracs_o = {r: fractions(f) for r, f in component_fluxes(other, sky, roi, regions, num=num, seed=seed).items()}
        fig = flux_fraction_plot([fracs, fracs_o], labels=labels)
    else:
        fig = flux_fraction_plot(fracs)
    p = out / "flux_fractions.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    # SCF bands
    say("[report] source-count function bands ...")
    bands = {}
    for c in sky.point_sources:
        bands[c.name] = scf_band(post, sky, roi, c.name, num=min(num, 1000), seed=seed)
        show, lab = [bands[c.name]], [labels[0]]
        if other is not None:
            show.append(scf_band(other, sky, roi, c.name, num=min(num, 1000), seed=seed))
            lab.append(labels[1])
        tband = None
        free = sky.free_parameters()
        if truth and all(k in truth for k in free):
            from skymodel.inference import Posterior as _P

            tpost = _P(samples={k: np.asarray(truth[k], dtype=float)[None] for k in free}, method="truth")
            tband = scf_band(tpost, sky, roi, c.name, S=bands[c.name].S, quantiles=(0.5,))
        fig = scf_band_plot(show, labels=lab, truth=[tband] if tband is not None else None)
        fig.suptitle(f"source-count function: {c.name}", fontsize=10)
        fig.subplots_adjust(top=0.9)
        p = out / f"scf_{c.name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    # maps
    say("[report] data / model / residual maps ...")
    mean_counts = posterior_mean_counts(post, sky, roi, num=min(num, 200), seed=seed)
    model = sum(mean_counts.values())
    fig = residual_map_plot(roi, np.asarray(built.observation.counts), model, smooth_deg=smooth_deg)
    p = out / "residuals.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    losses_path = run / "losses.npy"
    if losses_path.exists():
        temper = int(post.diagnostics.get("temper_steps", 0) or 0)
        fig = loss_plot(np.load(losses_path), temper_steps=temper)
        p = out / "loss.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    # the text
    lines = [
        f"skymodel report: {run}",
        f"method {post.method}, {post.num_samples} samples, wall time {post.wall_time:.1f} s; "
        f"{roi.n_pixels} analysis pixels (nside {roi.nside}), {roi.n_regions} exposure region(s)",
    ]
    d = post.diagnostics or {}
    if "divergences" in d:
        from skymodel.inference.nuts import format_diagnostics

        lines.append(format_diagnostics(d))
    if "final_loss" in d:
        lines.append(f"SVI final loss {d['final_loss']:.6g} after {d.get('num_steps', '?')} steps")
    lines += ["", "Parameters (median, 16-84%, 2.5-97.5%):", post.summary()]
    if truth:
        lines += ["", "Truth vs recovered:", truth_table(post, truth)]
    lines += ["", f"Flux fractions (flux = sum of expected counts / exposure; median [16%, 84%]; "
                  f"{len(next(iter(next(iter(fluxes.values())).values())))} samples):"]
    head = f"{'component':16s}" + "".join(f"{r:>30s}" for r in fracs)
    lines.append(head)
    for c in fracs["ROI"]:
        lines.append(f"{c:16s}" + "".join(f"{_pct(fracs[r][c]):>30s}" for r in fracs))
    for r in fluxes:
        lo, med, hi = np.quantile(sum(fluxes[r].values()), [0.16, 0.5, 0.84])
        lines.append(f"total flux in {r}: {med:.4g} [{lo:.4g}, {hi:.4g}] ph cm^-2 s^-1")
    if share is not None:
        lines += ["", f"GCE split (point sources {ps} / (smooth {smooth} + point sources)):"]
        for r, s in share.items():
            lines.append(f"  {r:16s} PS share {_pct(s)}")
    if bands:
        lines += ["", "Source-count functions (median S^2 dN/dS peak, counts deg^-2):"]
        for n, b in bands.items():
            med = b.at(0.5)
            i = int(np.argmax(med))
            lines.append(f"  {n:14s} peak {med[i]:.3g} at S = {b.S[i]:.3g} counts "
                         f"(F = {b.flux[i]:.3g} ph cm^-2 s^-1; mean exposure {b.mean_exposure:.4g} cm^2 s)")
    if other is not None:
        lines += ["", f"Comparison with {compare} ({other.method}):", compare_table(post, other, labels)]
        lines.append("flux fractions (other run):")
        for c in fracs_o["ROI"]:
            lines.append(f"{c:16s}" + "".join(f"{_pct(fracs_o[r][c]):>30s}" for r in fracs_o))
    lines += ["", "Files: " + ", ".join(p.name for p in files)]
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    files.append(out / "summary.txt")
    return Report(posterior=post, fluxes=fluxes, fractions=fracs, gce_ps_share=share, bands=bands,
                  text=text, files=files, compare=other)


__all__ = [
    "QUANTILES",
    "Report",
    "SCFBand",
    "cartesian_image",
    "compare_table",
    "component_fluxes",
    "corner_plot",
    "flux_fraction_plot",
    "flux_fractions",
    "fractions",
    "gce_components",
    "gce_split",
    "inner_mask",
    "loss_plot",
    "pixel_area_deg2",
    "posterior_mean_counts",
    "report",
    "residual_map_plot",
    "scf_band",
    "scf_band_plot",
    "truth_table",
]
