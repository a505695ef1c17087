"""Analysis (skymodel.analysis): fluxes and flux fractions against hand-computed template
sums, the GCE split, SCF bands against S^2 dN/dS written out by hand from the broken
power-law formula, the Cartesian view against skymodel.healpix, and the report of a tiny
saved run (also with --compare)."""

from __future__ import annotations

import math

import healpy as hp
import matplotlib
import numpy as np
import pytest

from skymodel import analysis as A
from skymodel.components.base import Param
from skymodel.components.morphology import TemplateMap
from skymodel.components.point_sources import NPTFitSCF, PointSourcePopulation, TotalCountsSCF
from skymodel.components.poisson import PoissonComponent
from skymodel.data import Dataset
from skymodel.healpix import cartesian_view
from skymodel.inference import Posterior
from skymodel.model import SkyModel
from skymodel.priors import Uniform

matplotlib.use("Agg")

NSIDE = 16


def _maps():
    npix = hp.nside2npix(NSIDE)
    l, b = hp.pix2ang(NSIDE, np.arange(npix), lonlat=True)
    l = np.where(l > 180, l - 360, l)
    exposure = 2e11 * (1 + 0.3 * np.sin(np.radians(b)) + 0.1 * np.cos(np.radians(2 * l)))
    t_dif = np.exp(-np.abs(b) / 10.0) + 0.2
    t_gce = 1.0 / (1.0 + (l**2 + b**2) / 25.0)
    t_ps = 1.0 / (1.0 + (l**2 + b**2) / 50.0)
    src = np.zeros(npix, bool)
    src[hp.ang2pix(NSIDE, [4.0, -7.0, 12.0], [6.0, -3.0, 10.0], lonlat=True)] = True
    return exposure, {"dif": t_dif, "gce": t_gce, "ps": t_ps}, src


def _setup(scf="nptfit"):
    exposure, t, src = _maps()
    data = Dataset.from_arrays(np.zeros_like(exposure), exposure, templates=t)
    roi = data.roi(25.0, 2.0, source_mask=src, n_exposure_regions=3)
    if scf == "nptfit":
        scf_params = NPTFitSCF(Param(None, Uniform(0.0, 2.0)), [3.0, 1.5], [10.0])
    else:
        scf_params = TotalCountsSCF(Param(None, Uniform(0.0, 4.0)), [5.0, 1.0, -1.0], 20.0, [0.3])
    sky = SkyModel([
        PoissonComponent("dif", TemplateMap.from_sky(t["dif"], roi), Param(None, Uniform(0.1, 10.0))),
        PoissonComponent("gce", TemplateMap.from_sky(t["gce"], roi), Param(None, Uniform(0.0, 3.0))),
        PointSourcePopulation("gce_ps", TemplateMap.from_sky(t["ps"], roi), scf_params),
    ])
    return roi, sky, exposure, t, src


def _independent_regions(src):
    """(analysis, normalisation, inner 10 deg) boolean full-sky masks from vectors."""
    npix = hp.nside2npix(NSIDE)
    v = np.stack(hp.pix2vec(NSIDE, np.arange(npix)), axis=1)
    cos_r = v @ np.array([1.0, 0.0, 0.0])
    b = np.degrees(np.arcsin(v[:, 2]))
    norm = (cos_r > np.cos(np.radians(25.0))) & (np.abs(b) >= 2.0)
    return norm & ~src, norm, cos_r > np.cos(np.radians(10.0))


def test_inner_mask_and_regions():
    roi, _, _, _, src = _setup()
    analysis, _, inner = _independent_regions(src)
    pix = np.asarray(roi.pixels)
    np.testing.assert_array_equal(np.sort(pix), np.flatnonzero(analysis))
    np.testing.assert_array_equal(A.inner_mask(roi, 10.0), inner[pix])
    with pytest.raises(ValueError, match="radius_deg"):
        A.inner_mask(roi, -1.0)


def test_fluxes_and_fractions_match_hand_sums():
    roi, sky, exposure, t, src = _setup()
    analysis, norm, inner = _independent_regions(src)
    rng = np.random.default_rng(0)
    n = 7
    samples = {"dif.norm": rng.uniform(1, 5, n), "gce.norm": rng.uniform(0.1, 1, n),
               "gce_ps.scf_parameters.amplitude": rng.uniform(0.01, 0.2, n)}
    post = Posterior(samples=samples, method="test")
    regions = {"ROI": None, "inner": A.inner_mask(roi, 10.0)}
    for weighting in ("flux", "counts"):
        fl = A.component_fluxes(post, sky, roi, regions, num=None, weighting=weighting)
        pix = np.asarray(roi.pixels)
        region_ratio = np.asarray(roi.region_ratio)[np.asarray(roi.region)]  # per analysis pixel
        # the SCF's mean counts per unit template: A [S_b^2/(n1-2) + S_b^2/(2-n2)]
        unit_mean = 10.0**2 / (3.0 - 2.0) + 10.0**2 / (2.0 - 1.5)
        for reg, sel in (("ROI", np.ones(pix.size, bool)), ("inner", inner[pix])):
            w = 1.0 / exposure[pix] if weighting == "flux" else np.ones(pix.size)
            for i in range(n):
                want = {
                    "dif": samples["dif.norm"][i] * t["dif"][pix] / t["dif"][norm].mean(),
                    "gce": samples["gce.norm"][i] * t["gce"][pix] / t["gce"][norm].mean(),
                    "gce_ps": t["ps"][pix] / t["ps"][norm].mean()
                    * samples["gce_ps.scf_parameters.amplitude"][i] * unit_mean * region_ratio,
                }
                for c, mu in want.items():
                    np.testing.assert_allclose(fl[reg][c][i], np.sum((mu * w)[sel]), rtol=1e-10)
            fr = A.fractions(fl[reg])
            np.testing.assert_allclose(sum(fr.values()), 1.0, rtol=1e-12)
    # flux_fractions = the ROI fractions
    ff = A.flux_fractions(post, sky, roi, num=None)
    fl = A.component_fluxes(post, sky, roi, num=None)
    for c in ff:
        np.testing.assert_allclose(ff[c], fl["ROI"][c] / sum(fl["ROI"].values()), rtol=1e-12)


def test_gce_split_and_components():
    roi, sky, _, _, _ = _setup()
    assert A.gce_components(sky) == (["gce"], ["gce_ps"])
    fl = {"dif": np.array([5.0, 5.0]), "gce": np.array([1.0, 3.0]), "gce_ps": np.array([1.0, 1.0])}
    np.testing.assert_allclose(A.gce_split(fl, ["gce"], ["gce_ps"]), [0.5, 0.25])
    with pytest.raises(ValueError, match="gce_split"):
        A.gce_split(fl, ["gce"], [])


def test_fluxes_reject_mismatched_posterior_and_bad_regions():
    roi, sky, _, _, _ = _setup()
    post = Posterior(samples={"dif.norm": np.ones(3)}, method="x")
    with pytest.raises(ValueError, match="without samples"):
        A.component_fluxes(post, sky, roi)
    post = Posterior(samples={k: np.full(3, 0.5) for k in sky.free_parameters()}, method="x")
    with pytest.raises(ValueError, match="boolean mask"):
        A.component_fluxes(post, sky, roi, {"bad": np.ones(5, bool)})
    with pytest.raises(ValueError, match="weighting"):
        A.component_fluxes(post, sky, roi, weighting="intensity")


def _hand_dnds(A_, n, breaks, S):
    """dN/dS written out as in SCIENCE.md: A (S/Sb1)^-n1 above Sb1, A (S/Sb1)^-n2 between
    Sb2 and Sb1, A (Sb2/Sb1)^-n2 (S/Sb2)^-n3 below Sb2."""
    n1, n2, n3 = n
    b1, b2 = breaks
    return np.where(S >= b1, A_ * (S / b1) ** -n1,
                    np.where(S >= b2, A_ * (S / b1) ** -n2, A_ * (b2 / b1) ** -n2 * (S / b2) ** -n3))


def _hand_unit_mean(n, breaks):
    n1, n2, n3 = n
    b1, b2 = breaks
    seg1 = b1**2 / (n1 - 2)
    seg2 = b1**n2 * (b1 ** (2 - n2) - b2 ** (2 - n2)) / (2 - n2)
    seg3 = (b2 / b1) ** -n2 * b2**2 / (2 - n3)
    return seg1 + seg2 + seg3


def test_scf_band_of_repeated_sample_equals_hand_formula():
    roi, sky, exposure, t, src = _setup("total")
    analysis, norm, _ = _independent_regions(src)
    s_ps = 0.7
    post = Posterior(samples={"dif.norm": np.full(20, 2.0), "gce.norm": np.full(20, 0.5),
                              "gce_ps.scf_parameters.total_counts": np.full(20, s_ps)}, method="x")
    S = np.logspace(-1, 2.5, 57)
    band = A.scf_band(post, sky, roi, "gce_ps", S=S)
    n, breaks = (5.0, 1.0, -1.0), (20.0, 6.0)
    amp = s_ps / _hand_unit_mean(n, breaks)
    t_mean = np.mean(t["ps"][analysis] / t["ps"][norm].mean())
    area = 4 * math.pi * (180 / math.pi) ** 2 / (12 * NSIDE**2)
    want = S**2 * _hand_dnds(amp, n, breaks, S) * t_mean / area
    assert band.s2dnds.shape == (5, S.size)
    for row in band.s2dnds:
        np.testing.assert_allclose(row, want, rtol=1e-10)
    eps = exposure[analysis].mean()
    np.testing.assert_allclose(band.mean_exposure, eps, rtol=1e-12)
    np.testing.assert_allclose(band.flux, S / eps, rtol=1e-12)
    np.testing.assert_allclose(band.f2dndf, band.s2dnds / eps, rtol=1e-12)
    np.testing.assert_allclose(band.at(0.5, "flux"), want / eps, rtol=1e-10)


def test_scf_band_median_tracks_median_amplitude():
    # S^2 dN/dS is proportional to S_ps at fixed shape, so the band's median is the curve of
    # the median S_ps, and its 16% / 84% curves those of the 16% / 84% quantiles
    roi, sky, _, _, _ = _setup("total")
    rng = np.random.default_rng(1)
    s_ps = rng.uniform(0.2, 2.0, 101)
    post = Posterior(samples={"dif.norm": np.full(101, 2.0), "gce.norm": np.full(101, 0.5),
                              "gce_ps.scf_parameters.total_counts": s_ps}, method="x")
    S = np.logspace(-1, 2, 11)
    band = A.scf_band(post, sky, roi, "gce_ps", S=S, quantiles=(0.16, 0.5, 0.84), num=None)
    one = Posterior(samples={"dif.norm": np.array([2.0]), "gce.norm": np.array([0.5]),
                             "gce_ps.scf_parameters.total_counts": np.array([1.0])}, method="x")
    unit = A.scf_band(one, sky, roi, "gce_ps", S=S, quantiles=(0.5,)).s2dnds[0]
    for q, row in zip((0.16, 0.5, 0.84), band.s2dnds):
        np.testing.assert_allclose(row, np.quantile(s_ps, q) * unit, rtol=1e-10)
    with pytest.raises(ValueError, match="not a point-source population"):
        A.scf_band(post, sky, roi, "gce")


def test_cartesian_image_matches_skymodel_cartesian_view():
    roi, _, _, _, _ = _setup()
    l, b = np.asarray(roi.l)[np.asarray(roi.analysis_index)], np.asarray(roi.b)[np.asarray(roi.analysis_index)]
    values = 3.0 + np.degrees(l) + 0.1 * np.degrees(b)
    img = A.cartesian_image(roi, values, xsize=100)
    ref = cartesian_view(roi.to_sky(values), lon_range=(25.0, -25.0), lat_range=(-25.0, 25.0), npix=100)
    both = np.isfinite(img) & np.isfinite(ref)
    assert both.mean() > 0.4
    # the two sample the image grid at slightly different points: pixel-edge mismatches only
    assert np.mean(np.isclose(img[both], ref[both])) > 0.9
    # orientation: longitude decreases to the right, latitude increases upwards
    assert np.nanmean(img[:, :10]) > np.nanmean(img[:, -10:])
    # outside the ROI (the |b| < 2 deg band, beyond 25 deg, the source mask) both are NaN
    assert np.mean(np.isnan(img) == np.isnan(ref)) > 0.9


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Two 'runs' of the tiny model with a point-source population: config + posteriors
    (samples scattered around known values), no fit needed."""
    from test_runs import make_tiny_data, tiny_config

    tmp = tmp_path_factory.mktemp("report")
    data = make_tiny_data(tmp / "data")
    runs = []
    for k, (method, scale) in enumerate((("svi-iaf", 1.0), ("nuts", 1.3))):
        run = tmp / f"run{k}"
        run.mkdir()
        (run / "config.toml").write_text(tiny_config(data, point_sources=True))
        rng = np.random.default_rng(k)
        n = 400
        samples = {
            "dif.norm": 3.0 + 0.2 * scale * rng.normal(size=n),
            "iso.norm": np.abs(0.5 + 0.1 * scale * rng.normal(size=n)),
            "gce.norm": np.abs(0.3 + 0.05 * scale * rng.normal(size=n)),
            "gce_ps.scf_parameters.amplitude": -1.5 + 0.3 * rng.normal(size=n),
            "gce_ps.scf_parameters.indices.0": rng.uniform(2.5, 4.0, n),
            "gce_ps.scf_parameters.indices.1": rng.uniform(-0.5, 1.5, n),
            "gce_ps.scf_parameters.breaks.0": rng.uniform(4.0, 12.0, n),
        }
        Posterior(samples=samples, method=method, wall_time=1.0).save(run / "posterior")
        np.save(run / "losses.npy", np.linspace(100, 10, 50))
        runs.append(run)
    return runs


def test_report_of_a_saved_run(saved_runs):
    run, other = saved_runs
    rep = A.report(run, num=150)
    out = run / "report"
    for name in ("corner_overview.png", "corner_gce_ps.png", "flux_fractions.png", "scf_gce_ps.png",
                 "residuals.png", "loss.png", "summary.txt"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    text = (out / "summary.txt").read_text()
    assert rep.text == text
    for reg, fl in rep.fluxes.items():
        np.testing.assert_allclose(sum(A.fractions(fl).values()), 1.0, rtol=1e-12)
        # the GCE split is PS / (smooth + PS) of the same fluxes
        np.testing.assert_allclose(rep.gce_ps_share[reg], fl["gce_ps"] / (fl["gce"] + fl["gce_ps"]))
    med = 100 * np.median(rep.fractions["ROI"]["dif"])
    assert f"{med:6.2f}%" in text
    assert "GCE split" in text and "r < 10 deg" in text and "Source-count functions" in text
    assert rep.bands["gce_ps"].s2dnds.shape[0] == 5


def test_report_compare(saved_runs, tmp_path):
    run, other = saved_runs
    rep = A.report(run, compare=other, out=tmp_path / "cmp", num=100)
    text = (tmp_path / "cmp" / "summary.txt").read_text()
    assert "Comparison with" in text and "shift/sigma" in text and rep.compare.method == "nuts"
    table = A.compare_table(rep.posterior, rep.compare)
    row = [ln for ln in table.splitlines() if ln.startswith("dif.norm")][0]
    a, b = rep.posterior["dif.norm"], rep.compare["dif.norm"]
    qa, qb = np.quantile(a, [0.16, 0.5, 0.84]), np.quantile(b, [0.16, 0.5, 0.84])
    shift = (qb[1] - qa[1]) / math.hypot((qa[2] - qa[0]) / 2, (qb[2] - qb[0]) / 2)
    assert row.split()[-1] == f"{shift:+.2f}"


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved posterior"):
        A.report(tmp_path)
