"""Recovery on mocks: fit K mock skies with known truth by SVI and NUTS; report coverage.

Model: the fiducial-like model of `skymodel.validation.fiducial_like_config` (pi0 and ICS
diffuse, isotropic, bubbles, smooth GCE with free NFW gamma, GCE point sources, disk point
sources; one-break SCFs with the paper's priors, two-King Fermi PSF, 4 exposure regions),
with skymodel's analytic templates (default) or the real Fermi templates and exposure
(`--templates fermi`, needs SKYMODEL_DATA), at a reduced nside.

Truth: `--truth fixed` (default) uses the same true parameters for every mock
(`skymodel.validation.FIDUCIAL_LIKE_TRUTH`), mocks differ only by the simulation seed;
`--truth prior` draws each mock's truth from the model's priors.

For every mock and method the script records, per parameter, the posterior quantiles
(2.5, 16, 50, 84, 97.5%) and whether the truth lies inside the central 68% and 95%
intervals, plus the GCE point-source fraction f_ps = PS counts / (PS + smooth GCE counts)
(expected counts on the analysis pixels; posterior quantiles and truth). The summary is
the coverage per parameter (fraction of mocks with the truth inside) and the bias of the
f_ps posterior median (mean and std over mocks). Results are written to JSON after every
fit (atomically), so a crash loses at most the fit in progress; `--resume` skips fits
already in the file (the settings must match).

Usage:
  python benchmarks/recovery.py --quick                       # smoke run, ~ minutes
  python benchmarks/recovery.py --mocks 10 --svi-steps 3000 --nuts-samples 500
  python benchmarks/recovery.py --mocks 20 --resume           # add mocks to a finished run
  python benchmarks/recovery.py --merge a.json b.json --out c.json  # runs with other --seed
                                   # (e.g. run in parallel), same settings: one summary
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from skymodel import validation as V  # noqa: E402
from skymodel._io import atomic_write  # noqa: E402
from skymodel.inference import run_nuts, run_svi  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)
LEVELS = (0.68, 0.95)
METHODS = ("svi", "nuts")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mocks", type=int, default=None, help="number of mocks K (default 10; quick: 2)")
    p.add_argument("--svi-steps", type=int, default=None, help="SVI steps (default 3000; quick: 300)")
    p.add_argument("--nuts-samples", type=int, default=None,
                   help="NUTS samples per chain, also the warmup length (default 500; quick: 100)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: nside 16, no disk population, 2 mocks, short fits")
    p.add_argument("--resume", action="store_true", help="skip fits already in --out")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks/results/recovery.json")
    p.add_argument("--nside", type=int, default=None, help="HEALPix nside (default 32; quick: 16)")
    p.add_argument("--templates", choices=("analytic", "fermi"), default="analytic")
    p.add_argument("--truth", choices=("fixed", "prior"), default="fixed")
    p.add_argument("--methods", default="svi,nuts", help="comma-separated subset of svi,nuts")
    p.add_argument("--guide", default="iaf", choices=("iaf", "mvn", "normal"))
    p.add_argument("--num-flows", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32, help="IAF hidden layer width (two layers)")
    p.add_argument("--learning-rate", type=float, default=3e-3,
                   help="peak Adam learning rate (cosine decay to 5%% of it)")
    p.add_argument("--particles", type=int, default=4, help="ELBO particles")
    p.add_argument("--svi-samples", type=int, default=4000, help="posterior draws from the guide")
    p.add_argument("--nuts-chains", type=int, default=1)
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="mock i uses seed + i")
    p.add_argument("--progress", action="store_true", help="show the samplers' progress bars")
    p.add_argument("--merge", type=pathlib.Path, nargs="+", metavar="JSON",
                   help="combine result files of runs that differ only in --seed into --out "
                        "(no fitting)")
    a = p.parse_args(argv)
    defaults = dict(mocks=10, svi_steps=3000, nuts_samples=500, nside=32)
    quick = dict(mocks=2, svi_steps=300, nuts_samples=100, nside=16)
    for k, v in (quick if a.quick else defaults).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in a.methods if m not in METHODS]
    if bad or not a.methods:
        p.error(f"--methods must be a comma-separated subset of {METHODS}, got {bad or a.methods}")
    for name in ("mocks", "svi_steps", "nuts_samples", "svi_samples", "nuts_chains", "particles"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def settings_of(a) -> dict:
    """Everything that defines the results except the number of mocks (a resumed run may
    add mocks)."""
    return {
        "nside": a.nside, "templates": a.templates, "truth": a.truth, "quick": a.quick,
        "svi": {"steps": a.svi_steps, "guide": a.guide, "num_flows": a.num_flows,
                "hidden": [a.hidden, a.hidden], "learning_rate": a.learning_rate,
                "schedule": "cosine decay to 5%", "particles": a.particles,
                "clip_norm": 10.0, "samples": a.svi_samples},
        "nuts": {"warmup": a.nuts_samples, "samples": a.nuts_samples, "chains": a.nuts_chains,
                 "dense_mass": True, "target_accept": 0.8, "max_tree_depth": a.max_tree_depth,
                 "init": "SVI posterior median (prior median without SVI)"},
        "seed": a.seed,
    }


def git_commit(path: str) -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %ad", "--date=iso", "--", path],
                             cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: pathlib.Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


# ----------------------------------------------------------------------------- one fit


def posterior_record(samples: dict, truth: dict, f_ps: np.ndarray, f_ps_truth: float) -> dict:
    """Quantiles and in-interval flags of every parameter and of f_ps."""
    params = {}
    for k, t in list(truth.items()) + [(V.GCE_PS_FRACTION, f_ps_truth)]:
        x = f_ps if k == V.GCE_PS_FRACTION else np.asarray(samples[k])
        params[k] = {
            "quantiles": np.quantile(x, QUANTILES).tolist(),
            "mean": float(np.mean(x)),
            "std": float(np.std(x)),
            **{f"in{int(lv * 100)}": bool(V.interval_contains(x, t, lv)) for lv in LEVELS},
        }
    return params


def f_ps_samples(setup, samples: dict, n: int = 1000, seed: int = 0) -> np.ndarray:
    size = len(next(iter(samples.values())))
    idx = np.random.default_rng(seed).choice(size, size=min(n, size), replace=False)
    return V.gce_ps_fraction(setup.sky, setup.roi, {k: np.asarray(v)[idx] for k, v in samples.items()})


def fit_svi(setup, mock, a, seed: int) -> tuple[dict, dict]:
    n = a.svi_steps
    sched = optax.cosine_decay_schedule(a.learning_rate, n, alpha=0.05)
    t0 = time.perf_counter()
    res = run_svi(setup.sky, mock.observation, guide=a.guide, num_steps=n, learning_rate=sched,
                  clip_norm=10.0, num_particles=a.particles, seed=seed, progress=a.progress,
                  num_flows=a.num_flows, hidden_dims=(a.hidden, a.hidden),
                  chunk_size=max(1, min(500, n // 4)))
    post = res.posterior(a.svi_samples, seed=seed)
    wall = time.perf_counter() - t0
    tail = res.losses[-min(100, res.losses.size):]
    info = {"wall_s": wall, "final_loss": float(np.mean(tail)), "loss_std_last100": float(np.std(tail))}
    return post.samples, info


def fit_nuts(setup, mock, a, seed: int, init) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    post = run_nuts(setup.sky, mock.observation, num_warmup=a.nuts_samples,
                    num_samples=a.nuts_samples, num_chains=a.nuts_chains, seed=seed,
                    progress=a.progress, init=init, dense_mass=True,
                    max_tree_depth=a.max_tree_depth)
    wall = time.perf_counter() - t0
    d = post.diagnostics
    rhat = {k: float(np.max(v)) for k, v in d["r_hat"].items()}
    ess = {k: float(np.min(v)) for k, v in d["ess"].items()}
    info = {"wall_s": wall, "divergences": int(d["divergences"]),
            "accept_prob": float(d["accept_prob"]),
            "r_hat_max": float(np.nanmax(list(rhat.values()))) if a.nuts_chains > 1 else None,
            "ess_min": float(np.nanmin(list(ess.values())))}
    return post.samples, info


# ----------------------------------------------------------------------------- summary


def summarise(records: list[dict], methods) -> dict:
    out = {}
    for m in methods:
        done = [r for r in records if m in r.get("fits", {})]
        if not done:
            continue
        names = list(done[0]["fits"][m]["params"])
        cov = {}
        for k in names:
            flags = {lv: [r["fits"][m]["params"][k][f"in{int(lv * 100)}"] for r in done] for lv in LEVELS}
            cov[k] = {f"{int(lv * 100)}": float(np.mean(f)) for lv, f in flags.items()}
        pooled = {}
        for lv in LEVELS:
            flags = [r["fits"][m]["params"][k][f"in{int(lv * 100)}"] for r in done for k in names
                     if k != V.GCE_PS_FRACTION]
            lo, hi = V.binomial_interval(int(np.sum(flags)), len(flags))
            pooled[f"{int(lv * 100)}"] = {"coverage": float(np.mean(flags)), "n": len(flags),
                                         "clopper_pearson_95": [lo, hi]}
        med = [r["fits"][m]["params"][V.GCE_PS_FRACTION]["quantiles"][2] for r in done]
        tru = [r["f_ps_truth"] for r in done]
        out[m] = {
            "n_mocks": len(done),
            "coverage": cov,
            "pooled_parameters": pooled,
            "f_ps_bias": V.bias_summary(med, tru),
            "wall_s_mean": float(np.mean([r["fits"][m]["info"]["wall_s"] for r in done])),
        }
    return out


def table(records: list[dict], summary: dict, methods, truth_mode: str) -> str:
    methods = [m for m in methods if m in summary]
    if not methods:
        return "(no fits yet)"
    names = list(summary[methods[0]]["coverage"])
    width = max(len(n) for n in names) + 2
    head = f"{'parameter':<{width}}{'truth':>9}" + "".join(
        f"{m.upper() + ' ' + lv:>10}" for m in methods for lv in ("68%", "95%"))
    lines = [head, "-" * len(head)]
    for k in names:
        if truth_mode == "fixed":
            t = records[0]["f_ps_truth"] if k == V.GCE_PS_FRACTION else records[0]["truth"][k]
            ts = f"{t:9.4g}"
        else:
            ts = f"{'prior':>9}"
        cells = "".join(f"{summary[m]['coverage'][k][lv]:>10.2f}" for m in methods for lv in ("68", "95"))
        lines.append(f"{k:<{width}}{ts}{cells}")
    lines.append("-" * len(head))
    for m in methods:
        s = summary[m]
        p68, p95 = s["pooled_parameters"]["68"], s["pooled_parameters"]["95"]
        b = s["f_ps_bias"]
        lines.append(
            f"{m.upper()}: {s['n_mocks']} mocks; all parameters pooled: 68% -> {p68['coverage']:.2f} "
            f"[{p68['clopper_pearson_95'][0]:.2f}, {p68['clopper_pearson_95'][1]:.2f}], 95% -> "
            f"{p95['coverage']:.2f} [{p95['clopper_pearson_95'][0]:.2f}, {p95['clopper_pearson_95'][1]:.2f}] "
            f"(n = {p68['n']}, exact 95% binomial intervals); f_ps median - truth: mean "
            f"{b['mean']:+.4f}, std {b['std']:.4f} (sem {b['sem']:.4f}); mean wall {s['wall_s_mean']:.0f} s/fit"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def settings_diff(a: dict, b: dict) -> list[str]:
    """The settings keys whose values differ between two runs."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def merge(paths, out: pathlib.Path) -> int:
    """One result file from several runs with the same settings except the seed: records
    keyed by their mock seed (a seed in two files is an error), summary recomputed."""
    runs = [json.loads(pathlib.Path(q).read_text()) for q in paths]
    base = {k: v for k, v in runs[0]["settings"].items() if k != "seed"}
    by_seed = {}
    for q, run in zip(paths, runs):
        diff = [k for k in settings_diff(base, run["settings"]) if k != "seed"]
        if diff:
            raise SystemExit(f"--merge: {q} has other settings than {paths[0]} (differ in {diff})")
        for r in run["records"]:
            if r["seed"] in by_seed:
                raise SystemExit(f"--merge: mock seed {r['seed']} is in more than one file")
            by_seed[r["seed"]] = r
    records = [dict(by_seed[sd], mock=i) for i, sd in enumerate(sorted(by_seed))]
    methods = tuple(m for m in METHODS if any(m in run["summary"] for run in runs))
    settings = dict(base, seed=sorted(by_seed)[0] if by_seed else 0)
    meta = {"merged_from": [str(q) for q in paths], "runs_meta": [run["meta"] for run in runs]}
    summary = summarise(records, methods)
    write_json(out, {"meta": meta, "settings": settings, "config": runs[0]["config"],
                     "records": records, "summary": summary})
    print(table(records, summary, methods, base["truth"]))
    print(f"\nwrote {out} ({len(records)} mocks from {len(paths)} files)")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    settings = settings_of(a)
    cfg = V.fiducial_like_config(a.nside, templates=a.templates, disk=not a.quick)
    records: list[dict] = []
    if a.resume and a.out.exists():
        old = json.loads(a.out.read_text())
        diff = settings_diff(settings, old.get("settings", {}))
        if diff:
            raise SystemExit(f"--resume: {a.out} was written with other settings (differ in {diff}); "
                             "use another --out or the same flags")
        records = old.get("records", [])
        log(f"resuming {a.out}: {len(records)} mock records")
    elif a.out.exists():
        log(f"overwriting {a.out} (use --resume to continue it)")
    meta = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if argv is None else argv,
        "jax": jax.__version__, "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "scf.py": git_commit("skymodel/scf.py"),
        "likelihood.py": git_commit("skymodel/likelihood.py"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    t0 = time.perf_counter()
    setup = V.MockSetup.from_config(cfg)
    log(f"setup: nside {a.nside}, {setup.roi.n_pixels} analysis pixels, "
        f"{len(setup.sky.free_parameters())} free parameters, templates {a.templates}, "
        f"truth {a.truth} ({time.perf_counter() - t0:.1f} s)")
    by_index = {r["mock"]: r for r in records}

    def save():
        recs = [by_index[i] for i in sorted(by_index)]
        write_json(a.out, {"meta": meta, "settings": settings, "config": cfg, "records": recs,
                           "summary": summarise(recs, a.methods)})

    for i in range(a.mocks):
        rec = by_index.get(i)
        todo = [m for m in a.methods if rec is None or m not in rec.get("fits", {})]
        if not todo:
            log(f"mock {i + 1}/{a.mocks}: done before, skipped")
            continue
        seed = a.seed + i
        tt = time.perf_counter()
        truth = setup.truth(a.truth, jax.random.PRNGKey(10_000 + seed) if a.truth == "prior" else None)
        mock = setup.mock(truth, seed)
        sim = mock.simulation
        f_true = float(V.gce_ps_fraction(setup.sky, setup.roi, {k: [v] for k, v in truth.items()})[0])
        cc = {k: int(np.sum(np.asarray(v))) for k, v in sim.component_counts.items()}
        f_real = cc["gce_ps"] / max(cc["gce_ps"] + cc["gce"], 1)
        if rec is None:
            rec = {"mock": i, "seed": seed, "truth": truth, "f_ps_truth": f_true,
                   "f_ps_realised": f_real, "component_counts": cc,
                   "n_sources": {k: int(p.sources.n) for k, p in sim.populations.items()},
                   "k_max": int(np.max(np.asarray(mock.observation.counts))), "fits": {}}
            by_index[i] = rec
        log(f"mock {i + 1}/{a.mocks} (seed {seed}): {int(np.sum(np.asarray(sim.counts)))} photons, "
            f"k_max {rec['k_max']}, sources {rec['n_sources']}, f_ps truth {f_true:.3f} "
            f"(realised {f_real:.3f}) [{time.perf_counter() - tt:.1f} s]")
        for m in todo:
            tm = time.perf_counter()
            try:
                if m == "svi":
                    samples, info = fit_svi(setup, mock, a, seed)
                else:
                    init = "median"
                    if "svi" in rec["fits"]:
                        init = {k: v["quantiles"][2] for k, v in rec["fits"]["svi"]["params"].items()
                                if k != V.GCE_PS_FRACTION}
                    samples, info = fit_nuts(setup, mock, a, seed, init)
                fps = f_ps_samples(setup, samples, seed=seed)
            except Exception as e:  # record the failure, keep going with the other fits
                rec.setdefault("failures", {})[m] = f"{type(e).__name__}: {e}"[:500]
                log(f"  {m}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                save()
                continue
            rec["fits"][m] = {"info": info, "params": posterior_record(samples, truth, fps, f_true)}
            rec.get("failures", {}).pop(m, None)
            save()
            p = rec["fits"][m]["params"]
            n68 = sum(v["in68"] for k, v in p.items() if k != V.GCE_PS_FRACTION)
            n95 = sum(v["in95"] for k, v in p.items() if k != V.GCE_PS_FRACTION)
            q = p[V.GCE_PS_FRACTION]["quantiles"]
            extra = "".join(f", {k} {v:.3g}" for k, v in info.items()
                            if k not in ("wall_s",) and v is not None)
            log(f"  {m}: {time.perf_counter() - tm:.0f} s; truth in 68%: {n68}/{len(p) - 1}, "
                f"in 95%: {n95}/{len(p) - 1}; f_ps {q[2]:.3f} [{q[1]:.3f}, {q[3]:.3f}]{extra}")
    recs = [by_index[i] for i in sorted(by_index)]
    summary = summarise(recs, a.methods)
    save()
    print()
    print(f"Recovery on {len(recs)} mocks (truth: {a.truth}; nside {a.nside}, {a.templates} templates); "
          f"fraction of mocks with the truth inside the central interval:")
    print(table(recs, summary, a.methods, a.truth))
    print(f"\nwrote {a.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
