"""Analysis of a posterior: truth tables, flux fractions, corner plots, residual maps.

All functions take a `Posterior` (and, where maps are needed, the `SkyModel` and
`Observation` it was fitted to); nothing here runs inference.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


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


def corner_plot(
    posteriors,
    path: str | pathlib.Path | None = None,
    *,
    names: Sequence[str] | None = None,
    truth: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    bins: int = 40,
):
    """Corner plot of one or several posteriors overlaid (e.g. SVI vs NUTS).

    posteriors: a Posterior or a sequence of them. Returns the matplotlib Figure.
    """
    import matplotlib

    matplotlib.use(matplotlib.get_backend())
    import matplotlib.pyplot as plt

    if not isinstance(posteriors, (list, tuple)):
        posteriors = [posteriors]
    names = list(names or posteriors[0].names)
    flats = [_flat(p, names) for p in posteriors]
    cols = flats[0][0]
    d = len(cols)
    fig, axes = plt.subplots(d, d, figsize=(1.9 * d + 1, 1.9 * d + 1), squeeze=False)
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
                    cum = np.cumsum(hs) / hs.sum()
                    levels = sorted({hs[np.searchsorted(cum, q)] for q in (0.95, 0.68)})
                    if len(levels) >= 1 and hs.sum() > 0:
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
        handles = [plt.Line2D([], [], color=colors[k % 4], label=l) for k, l in enumerate(labels)]
        fig.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def posterior_mean_counts(posterior, sky, roi, num: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Posterior-mean expected counts per component on the analysis pixels (averaged over
    `num` random posterior samples)."""
    import jax

    rng = np.random.default_rng(seed)
    idx = rng.choice(posterior.num_samples, size=min(num, posterior.num_samples), replace=False)

    @jax.jit
    def counts_at(values):
        return sky.with_values(values, check=False).expected_counts(roi)

    total: dict[str, np.ndarray] = {}
    for i in idx:
        vals = {k: posterior[k][i] for k in posterior.names}
        out = counts_at(vals)
        for k, v in out.items():
            total[k] = total.get(k, 0.0) + np.asarray(v)
    return {k: v / len(idx) for k, v in total.items()}


def flux_fractions(posterior, sky, roi, mask=None, num: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    """Samples of each component's fraction of the total expected counts in the analysis
    pixels (or in the subset `mask`, a boolean array over analysis pixels)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    idx = rng.choice(posterior.num_samples, size=min(num, posterior.num_samples), replace=False)
    sel = jnp.ones(roi.n_pixels, bool) if mask is None else jnp.asarray(mask)

    @jax.jit
    def fractions(values):
        ec = sky.with_values(values, check=False).expected_counts(roi)
        sums = {k: jnp.sum(jnp.where(sel, v, 0.0)) for k, v in ec.items()}
        tot = sum(sums.values())
        return {k: s / tot for k, s in sums.items()}

    out: dict[str, list] = {}
    for i in idx:
        fr = fractions({k: posterior[k][i] for k in posterior.names})
        for k, v in fr.items():
            out.setdefault(k, []).append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


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
    """Data, model and (data - model) maps of the ROI in a Cartesian view (Galactic),
    smoothed with a Gaussian of `smooth_deg` for display. Returns the Figure."""
    import healpy as hp
    import matplotlib.pyplot as plt

    data_sky = roi.to_sky(np.asarray(counts), fill=0.0)
    model_sky = roi.to_sky(np.asarray(model_counts), fill=0.0)
    in_roi = roi.to_sky(np.ones(roi.n_pixels), fill=0.0)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    maps = []
    for m in (data_sky, model_sky, data_sky - model_sky):
        if smooth_deg > 0:
            sm = hp.smoothing(m, fwhm=np.radians(smooth_deg))
            norm = hp.smoothing(in_roi, fwhm=np.radians(smooth_deg))
            m = np.where(in_roi > 0, sm / np.maximum(norm, 1e-3), np.nan)
        else:
            m = np.where(in_roi > 0, m, np.nan)
        maps.append(m)
    proj = hp.projector.CartesianProj(lonra=list(lon_range), latra=list(lat_range), xsize=400, ysize=400)
    nside = roi.nside
    f = lambda x, y, z: hp.vec2pix(nside, x, y, z)  # noqa: E731
    imgs = [proj.projmap(m, f) for m in maps]
    vmax = np.nanpercentile(imgs[0], 99)
    titles = ["data (counts/pixel)", "model (posterior mean)", "residual: data - model"]
    for ax, img, title in zip(axes, imgs, titles):
        if title.startswith("residual"):
            r = np.nanpercentile(np.abs(img), 99)
            im = ax.imshow(img, origin="lower", extent=[lon_range[1], lon_range[0], *lat_range], cmap="RdBu_r", vmin=-r, vmax=r)
        else:
            im = ax.imshow(img, origin="lower", extent=[lon_range[1], lon_range[0], *lat_range], cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("l [deg]")
        ax.set_ylabel("b [deg]")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


__all__ = [
    "corner_plot",
    "flux_fractions",
    "posterior_mean_counts",
    "residual_map_plot",
    "truth_table",
]
