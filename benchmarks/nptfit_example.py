"""The classic NPTFit Galactic Center example (skymodel/configs/nptfit_example.toml) with
nested sampling, SVI and NUTS: posterior medians and 68% intervals, point-source and
smooth-GCE intensities, the log-evidence, and wall times.

What is computed (NPTFit's dnds_analysis conventions, on the analysis pixels p of the ROI,
exposure eps_p in cm^2 s, HEALPix pixel solid angle Omega = 4 pi / (12 nside^2) sr):

  PS intensity   I_PS  = mean_p[T_p / (eps_p Omega)] x integral S dN/dS dS
                 T_p: the population's template as used in the likelihood (gce or dsk map
                 divided by exposure / full-sky mean exposure), dN/dS per unit template.
                 "exact": the integral analytic over 0 < S < inf (BrokenPowerLaw.mean_counts);
                 "nptfit_sum": NPTFit's sum over 10^4 log-spaced S in [0.01, 10^4] with
                 forward-difference widths (dnds_analysis.return_intensity_arrays_non_poiss).
  smooth GCE     I_GCE = A_gce x mean_p[t_p / (eps_p Omega)], t_p the gce counts template.
  units          ph cm^-2 s^-1 sr^-1 (NPTFit prints these as "ph/cm^2/s"; they are per sr);
                 x Omega_ROI gives the flux from the ROI in ph cm^-2 s^-1 (also reported).
  ln Z           natural log of the evidence with the log-likelihood the log of the
                 normalised pmf, including -log k! (NPTFit's convention).

NPTFit's published example (docs Example 9, MultiNest, nlive = 100, dif norm fixed at
14.67, 824 posterior samples) reports: GCE PS intensity 7.04 (+1.43 / -1.76) e-8, disk PS
intensity 7.24 (+1.86 / -1.64) e-8, smooth GCE 2.66 (+4.20 / -1.93) e-9, ln Z =
-29454.08 +- 0.40. This config fixes dif at 12.85 (--dif-norm 14.67 reproduces the
notebook's choice).

    python benchmarks/nptfit_example.py --quick         # minutes, unconverged
    python benchmarks/nptfit_example.py                  # nlive 400, dlogz 0.1 (hours on CPU)

Writes benchmarks/results/nptfit_example.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
POPULATIONS = ("gce_ps", "dsk_ps")
PUBLISHED = {
    "source": "NPTFit documentation, Example 9 (Analysis), MultiNest nlive=100, dif fixed at 14.67",
    "gce_ps_intensity_q16_50_84": [5.28070247e-08, 7.04436858e-08, 8.46625293e-08],
    "dsk_ps_intensity_q16_50_84": [5.60536598e-08, 7.24397347e-08, 9.10432724e-08],
    "gce_smooth_intensity_q16_50_84": [7.32822801e-10, 2.65734863e-09, 6.85672788e-09],
    "log_evidence": -29454.0842087,
    "log_evidence_err": 0.404338419447,
}


def build(dif_norm: float | None):
    """The Built model of configs/nptfit_example.toml (dif norm optionally replaced)."""
    from skymodel import config as C

    cfg = C.load_config("nptfit_example")
    if dif_norm is not None:
        for comp in cfg["components"]:
            if comp["name"] == "dif":
                comp["norm"] = float(dif_norm)
    return C.build(cfg)


# ---------------------------------------------------------------------- intensities


def intensity_factors(built) -> dict[str, float]:
    """Per-component mean_p[template_p / (eps_p Omega)] (cm^-2 s^-1 sr^-1 per count of
    mean S / per unit norm), and the ROI solid angle."""
    roi, sky = built.roi, built.sky
    omega = 4.0 * math.pi / (12 * roi.nside**2)
    eps = np.asarray(roi.analysis_exposure)
    out = {"omega_pixel_sr": omega, "omega_roi_sr": omega * roi.n_pixels}
    for name in POPULATIONS:
        t = np.asarray(sky.component(name).source_template(roi))
        out[name] = float(np.mean(t / eps) / omega)
    gce = sky.with_values({"gce.norm": 1.0}).component("gce").expected_counts(roi)
    out["gce"] = float(np.mean(np.asarray(gce) / eps) / omega)
    return out


def _nptfit_grid(smin=0.01, smax=1e4, nsteps=10_000):
    s = 10 ** np.linspace(np.log10(smin), np.log10(smax), nsteps)
    ds = np.diff(s)
    return s, np.append(ds, ds[-1])


def posterior_intensities(post, built) -> dict[str, np.ndarray]:
    """Per-sample intensities (ph cm^-2 s^-1 sr^-1): "<pop>_exact", "<pop>_nptfit_sum",
    "gce_smooth"."""
    sky, roi = built.sky, built.roi
    f = intensity_factors(built)
    s_grid, ds = (jnp.asarray(a) for a in _nptfit_grid())

    def per_sample(values):
        m = sky.with_values(values, check=False)
        out = {}
        for name in POPULATIONS:
            scf = m.component(name).source_count_function(roi)
            out[f"{name}_exact"] = scf.mean_counts()
            out[f"{name}_nptfit_sum"] = jnp.sum(scf.dnds(s_grid) * s_grid * ds)
        return out

    fn = jax.jit(jax.vmap(per_sample))
    n = post.num_samples
    chunks = []
    for i in range(0, n, 2000):
        chunks.append(jax.tree_util.tree_map(np.asarray, fn({k: jnp.asarray(v[i:i + 2000]) for k, v in post.samples.items()})))
    mean_s = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    res = {}
    for name in POPULATIONS:
        res[f"{name}_exact"] = f[name] * mean_s[f"{name}_exact"]
        res[f"{name}_nptfit_sum"] = f[name] * mean_s[f"{name}_nptfit_sum"]
    res["gce_smooth"] = f["gce"] * post["gce.norm"]
    return res


def q3(x) -> list[float]:
    return [float(v) for v in np.quantile(np.asarray(x), [0.16, 0.5, 0.84])]


# ---------------------------------------------------------------------- runs


def run(method: str, built, a):
    from skymodel.inference import run_nested, run_nuts, run_svi

    sky, obs = built.sky, built.observation
    t0 = time.perf_counter()
    if method == "nested":
        post = run_nested(sky, obs, backend=a.backend, nlive=a.nlive, dlogz=a.dlogz, seed=a.seed,
                          progress=a.progress, sample=a.sample, batch_size=a.batch_size, maxcall=a.maxcall,
                          checkpoint_path=a.checkpoint, resume=a.resume)
    elif method == "svi":
        res = run_svi(sky, obs, guide="iaf", num_steps=a.svi_steps, learning_rate=a.svi_lr,
                      num_particles=a.svi_particles, seed=a.seed, progress=a.progress)
        post = res.posterior(a.svi_samples, seed=a.seed + 1)
    elif method == "nuts":
        post = run_nuts(sky, obs, num_warmup=a.nuts_warmup, num_samples=a.nuts_samples, num_chains=1,
                        seed=a.seed, progress=a.progress, max_tree_depth=a.nuts_max_tree_depth)
    else:
        raise ValueError(method)
    return post, time.perf_counter() - t0


def report(results: dict, published: dict) -> str:
    lines = []
    methods = list(results)
    names = list(next(iter(results.values()))["parameters"]) if results else []
    w = max([len(n) for n in names] + [30])
    lines.append("posterior median [16%, 84%]")
    lines.append(f"{'parameter':<{w}}" + "".join(f"{m:>34}" for m in methods))
    for n in names:
        cells = []
        for m in methods:
            q = results[m]["parameters"][n]
            cells.append(f"{q[1]:.4g} [{q[0]:.4g}, {q[2]:.4g}]")
        lines.append(f"{n:<{w}}" + "".join(f"{c:>34}" for c in cells))
    lines.append("")
    lines.append("intensities, ph cm^-2 s^-1 sr^-1: median [16%, 84%]")
    keys = ["gce_ps_exact", "gce_ps_nptfit_sum", "dsk_ps_exact", "dsk_ps_nptfit_sum", "gce_smooth"]
    pub = {"gce_ps_nptfit_sum": published["gce_ps_intensity_q16_50_84"],
           "dsk_ps_nptfit_sum": published["dsk_ps_intensity_q16_50_84"],
           "gce_smooth": published["gce_smooth_intensity_q16_50_84"]}
    lines.append(f"{'quantity':<{w}}" + "".join(f"{m:>34}" for m in methods) + f"{'NPTFit (published)':>34}")
    for k in keys:
        cells = []
        for m in methods:
            q = results[m]["intensities"][k]
            cells.append(f"{q[1]:.3e} [{q[0]:.2e}, {q[2]:.2e}]")
        p = pub.get(k)
        cells.append("-" if p is None else f"{p[1]:.3e} [{p[0]:.2e}, {p[2]:.2e}]")
        lines.append(f"{k:<{w}}" + "".join(f"{c:>34}" for c in cells))
    lines.append("")
    for m in methods:
        r = results[m]
        lz = "" if r.get("log_evidence") is None else (
            f", ln Z = {r['log_evidence']:.2f} +- {r['log_evidence_err']:.2f}"
            f" (converged: {r.get('converged')})")
        lines.append(f"{m}: wall time {r['wall_time_s']:.1f} s, {r['num_samples']} samples{lz}")
    lines.append(f"NPTFit published: ln Z = {published['log_evidence']:.2f} +- {published['log_evidence_err']:.2f} "
                 f"({published['source']})")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="nlive 40, maxcall 20000, SVI 300 steps, NUTS 30+30")
    p.add_argument("--methods", default="nested,svi,nuts")
    p.add_argument("--dif-norm", type=float, default=None, help="override the fixed dif norm (config: 12.85)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--nlive", type=int, default=400)
    p.add_argument("--dlogz", type=float, default=0.1)
    p.add_argument("--sample", default="auto")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--maxcall", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="nested-sampling checkpoint file (dynesty) / directory (MultiNest)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--svi-steps", type=int, default=5000)
    p.add_argument("--svi-lr", type=float, default=3e-3)
    p.add_argument("--svi-particles", type=int, default=4)
    p.add_argument("--svi-samples", type=int, default=20_000)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-max-tree-depth", type=int, default=10)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "nptfit_example.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.nlive, a.dlogz = 40, 0.5
        a.maxcall = a.maxcall or 20_000
        a.svi_steps, a.svi_particles, a.svi_samples = 300, 1, 5000
        a.nuts_warmup, a.nuts_samples, a.nuts_max_tree_depth = 30, 30, 6
    if a.batch_size != "auto":
        a.batch_size = int(a.batch_size)
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in ("nested", "svi", "nuts")]
    if bad:
        p.error(f"unknown methods {bad}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if not os.environ.get("SKYMODEL_DATA"):
        print("set SKYMODEL_DATA to the data directory (it holds nptfit-example/)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    built = build(a.dif_norm)
    factors = intensity_factors(built)
    dif = float(built.sky.component("dif").norm.value)
    print(f"NPTFit example: {built.roi.n_pixels} pixels, {int(np.sum(built.observation.counts))} photons, "
          f"{len(built.sky.free_parameters())} free parameters, dif norm {dif}; built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    results = {}
    for method in a.methods:
        post, wall = run(method, built, a)
        inten = posterior_intensities(post, built)
        r = {
            "wall_time_s": wall,
            "num_samples": post.num_samples,
            "parameters": {k: q3(v) for k, v in post.samples.items()},
            "intensities": {k: q3(v) for k, v in inten.items()},
            "flux_roi_ph_cm2_s": {k: [x * factors["omega_roi_sr"] for x in q3(v)] for k, v in inten.items()},
        }
        if method == "nested":
            d = post.diagnostics
            r.update(log_evidence=post.log_evidence, log_evidence_err=post.log_evidence_err,
                     n_likelihood_evals=d["n_likelihood_evals"], converged=d["converged"],
                     backend=d["backend"], nlive=d["nlive"], niter=d.get("niter"), kish_ess=d["kish_ess"])
        else:
            r["diagnostics"] = {k: v for k, v in post.diagnostics.items() if k in
                                ("final_loss", "num_steps", "divergences", "accept_prob")}
        results[method] = r
        print(f"{method}: {wall:.1f} s", flush=True)
    text = report(results, PUBLISHED)
    print()
    print(text)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "dif_norm": dif,
        "n_pixels": built.roi.n_pixels,
        "intensity_factors": factors,
        "machine": {"platform": platform.platform(), "jax": jax.__version__, "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count()},
        "results": results,
        "published": PUBLISHED,
        "table": text,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
