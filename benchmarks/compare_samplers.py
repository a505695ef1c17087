"""SVI vs NUTS vs nested sampling on a ladder of models of growing dimension (real data).

Models (built from skymodel/configs/fermi_poisson.toml and fiducial.toml, data in
$SKYMODEL_DATA/fermi-gc):
  poisson    fermi_poisson.toml: O/A/F mixtures (pi0, ICS), iso, bub, psc, smooth GCE (NFW^2, gamma)
  +gce_ps    + GCE point sources (NFW^2 source density with its own gamma; fiducial two-break
             SCF, total-counts parameterisation), Fermi 2 GeV King PSF, 1 exposure region
  +dsk_ps    + disk point sources (Lorimer disk, fiducial SCF)
  fiducial   fiducial.toml as is (harmonic modulation, bulge mixtures, 7 exposure regions)

For each model and method it reports wall time, likelihood evaluations (SVI: steps x
particles, NUTS: leapfrog steps of warmup + sampling, both value+gradient; nested:
likelihood values), time per evaluation, effective samples per second (NUTS: smallest
per-parameter ESS; nested: Kish ESS of the weights; SVI draws are i.i.d. from an
approximate posterior, so no ESS), the log-evidence (nested), and the agreement of
posterior quantiles between methods: max over parameters and q in {16, 50, 84}% of
|q_A - q_B| / ((q84 - q16) / 2 of B), B = NUTS where NUTS ran, else nested.
The cost of one likelihood value and one value+gradient (jitted, after compilation) is
measured separately.

    python benchmarks/compare_samplers.py --quick          # minutes, unconverged NPTF runs
    python benchmarks/compare_samplers.py --svi-steps 10000 --nuts-warmup 500 \\
        --nuts-samples 1000 --nuts-chains 4 --nlive 500 --dlogz 0.1   # the full run

Writes benchmarks/results/compare_samplers.json and compare_samplers.png. Runs of one
model can be split over processes (--methods) and joined with --merge A.json B.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
MODELS = ("poisson", "+gce_ps", "+dsk_ps", "fiducial")
METHODS = ("svi", "nuts", "nested")
QUANTILES = (0.16, 0.5, 0.84)


# ---------------------------------------------------------------------- models


def model_configs() -> dict[str, dict]:
    """The ladder as config dicts (see the module doc)."""
    from skymodel import config as C

    pois = C.load_config("fermi_poisson")
    fid = C.load_config("fiducial")
    by_name = {c["name"]: c for c in fid["components"]}
    gce_ps = copy.deepcopy(by_name["gce_ps"])
    gce_ps["morphology"] = {"kind": "gce", "gamma": {"uniform": [0.2, 2.0]}}
    dsk_ps = copy.deepcopy(by_name["dsk_ps"])
    r2 = copy.deepcopy(pois)
    r2["psf"] = copy.deepcopy(fid["psf"])
    r2["components"] = r2["components"] + [gce_ps]
    r3 = copy.deepcopy(r2)
    r3["components"] = r3["components"] + [dsk_ps]
    return {"poisson": copy.deepcopy(pois), "+gce_ps": r2, "+dsk_ps": r3, "fiducial": copy.deepcopy(fid)}


def build_model(name: str, cfg: dict):
    """(Built, note). A fiducial bulge map that is zero on the normalisation region makes
    the config unbuildable; it is then dropped and the note says so."""
    from skymodel import config as C

    try:
        return C.build(cfg), ""
    except ValueError as e:
        msg = str(e)
        if "zero everywhere in the normalisation region" not in msg or name != "fiducial":
            raise
        bad = msg.split("'")[1]
        cfg = copy.deepcopy(cfg)
        for comp in cfg["components"]:
            for spec in (comp, comp.get("morphology", {})):
                if bad in spec.get("bulges", []):
                    spec["bulges"] = [b for b in spec["bulges"] if b != bad]
        note = f"fiducial.toml does not build ({msg}); ran without bulge map {bad!r}"
        print(f"[{name}] NOTE: {note}", flush=True)
        return C.build(cfg), note


def likelihood_costs(sky, obs, repeats: int = 3) -> dict:
    """Compile and run time of one log-likelihood value and one value+gradient (s)."""
    from skymodel.inference.nested import prior_transform

    t = prior_transform(sky)
    values = t(jnp.full((t.ndim,), 0.5))

    def loglike(v):
        return sky.with_values(v, check=False).log_likelihood(obs)

    out = {}
    for label, fn in (("value", jax.jit(loglike)), ("value_and_grad", jax.jit(jax.value_and_grad(loglike)))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(values))
        out[f"compile_{label}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(values))
        out[f"{label}_s"] = (time.perf_counter() - t0) / repeats
    return out


# ---------------------------------------------------------------------- NUTS instrumentation


class _LeapfrogCount:
    total = 0


def _counting_mcmc():
    """An MCMC that runs warmup and sampling separately, collecting NUTS's num_steps
    (leapfrog steps = value+gradient evaluations) in both; otherwise NumPyro's MCMC."""
    from numpyro.infer import MCMC

    class CountingMCMC(MCMC):
        def run(self, rng_key, *args, extra_fields=(), init_params=None, **kwargs):
            if getattr(self, "_in_warmup", False):  # MCMC.warmup calls run
                return super().run(rng_key, *args, extra_fields=extra_fields, init_params=init_params, **kwargs)
            _LeapfrogCount.total = 0
            if self.num_warmup > 0:
                self._in_warmup = True
                try:
                    self.warmup(rng_key, *args, extra_fields=("num_steps",), collect_warmup=True,
                                init_params=init_params, **kwargs)
                finally:
                    self._in_warmup = False
                _LeapfrogCount.total += int(np.sum(np.asarray(self.get_extra_fields()["num_steps"])))
                rng_key = self.post_warmup_state.rng_key
            super().run(rng_key, *args, extra_fields=tuple(extra_fields) + ("num_steps",),
                        init_params=init_params, **kwargs)
            _LeapfrogCount.total += int(np.sum(np.asarray(self.get_extra_fields()["num_steps"])))

    return CountingMCMC


# ---------------------------------------------------------------------- runs


#: --quick settings per model: (svi_steps, nuts_warmup, nuts_samples, nuts_max_tree_depth,
#: nested maxcall); SVI uses 1 particle and 5000 draws, nested sampling dlogz = 0.5.
QUICK = {
    "poisson": (300, 30, 30, 5, None),
    "+gce_ps": (150, 15, 15, 4, 1500),
    "+dsk_ps": (150, 15, 15, 4, 1500),
    "fiducial": (100, 10, 10, 3, 500),
}


def settings_for(model: str, ndim: int, args) -> argparse.Namespace:
    """The run settings of one model: the command line, or QUICK[model] with --quick
    (explicit --maxcall / --nlive still win)."""
    s = argparse.Namespace(**vars(args))
    if args.quick:
        steps, warm, samples, depth, maxcall = QUICK[model]
        s.svi_steps, s.svi_particles, s.svi_samples = steps, 1, 5000
        s.nuts_warmup, s.nuts_samples, s.nuts_max_tree_depth = warm, samples, depth
        s.dlogz = 0.5
        s.maxcall = args.maxcall if args.maxcall is not None else maxcall
        s.nlive = args.nlive if args.nlive is not None else max(50, 2 * ndim + 2)
    elif s.nlive is None:
        s.nlive = 500
    return s


def run_method(method: str, built, args) -> tuple[object, dict]:
    from skymodel.inference import run_nested, run_nuts, run_svi

    sky, obs = built.sky, built.observation
    if method == "svi":
        t0 = time.perf_counter()
        res = run_svi(sky, obs, guide=args.guide, num_steps=args.svi_steps, learning_rate=args.svi_lr,
                      num_particles=args.svi_particles, seed=args.seed, progress=args.progress)
        post = res.posterior(args.svi_samples, seed=args.seed + 1)
        wall = time.perf_counter() - t0
        return post, {"wall_time_s": wall, "n_likelihood_evals": args.svi_steps * args.svi_particles,
                      "eval_kind": "value+grad", "ess": None, "final_loss": float(res.losses[-1])}
    if method == "nuts":
        import skymodel.inference.nuts as nuts_mod

        original = nuts_mod.MCMC
        nuts_mod.MCMC = _counting_mcmc()
        try:
            t0 = time.perf_counter()
            post = run_nuts(sky, obs, num_warmup=args.nuts_warmup, num_samples=args.nuts_samples,
                            num_chains=args.nuts_chains, seed=args.seed, progress=args.progress,
                            max_tree_depth=args.nuts_max_tree_depth, init=args.nuts_init)
            wall = time.perf_counter() - t0
        finally:
            nuts_mod.MCMC = original
        ess = min(float(np.min(v)) for v in post.diagnostics["ess"].values())
        rhat = max(float(np.max(v)) for v in post.diagnostics["r_hat"].values())
        return post, {"wall_time_s": wall, "n_likelihood_evals": int(_LeapfrogCount.total),
                      "eval_kind": "value+grad", "ess": ess, "max_r_hat": rhat,
                      "divergences": post.diagnostics["divergences"]}
    if method == "nested":
        post = run_nested(sky, obs, backend=args.nested_backend, nlive=args.nlive, dlogz=args.dlogz,
                          seed=args.seed, progress=args.progress, sample=args.nested_sample,
                          batch_size=args.batch_size, maxcall=args.maxcall)
        d = post.diagnostics
        return post, {"wall_time_s": d["wall_time"], "n_likelihood_evals": d["n_likelihood_evals"],
                      "eval_kind": "value", "ess": d["kish_ess"], "log_evidence": post.log_evidence,
                      "log_evidence_err": post.log_evidence_err, "converged": d["converged"],
                      "backend": d["backend"], "nlive": d["nlive"], "niter": d.get("niter")}
    raise ValueError(method)


def flat_quantiles(post) -> dict[str, np.ndarray]:
    """label -> (3,) quantiles 16/50/84 of every scalar entry."""
    out = {}
    for k, v in post.samples.items():
        q = np.quantile(v, QUANTILES, axis=0)
        if v.ndim == 1:
            out[k] = q
        else:
            for idx in np.ndindex(*v.shape[1:]):
                out[f"{k}[{','.join(map(str, idx))}]"] = q[(slice(None),) + idx]
    return out


def agreement(qa: dict, qb: dict) -> tuple[float | None, str]:
    """max |q_A - q_B| / ((q84 - q16)/2 of B) and the parameter where it occurs."""
    worst, where = 0.0, ""
    for k in qb:
        width = 0.5 * (qb[k][2] - qb[k][0])
        if not width > 0:
            return None, f"{k} (zero posterior width in B)"
        d = float(np.max(np.abs(qa[k] - qb[k])) / width)
        if d > worst:
            worst, where = d, k
    return worst, where


# ---------------------------------------------------------------------- output


def _fmt(x, spec):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def table(rows: list[dict], agree: list[dict]) -> str:
    head = (f"{'model':<9} {'dim':>4} {'method':<7} {'wall[s]':>9} {'evals':>9} {'s/eval':>9} "
            f"{'ESS':>8} {'ESS/s':>8} {'ln Z':>14} {'conv':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<9} {r.get('n_params', 0):>4} {r['method']:<7} FAILED: {r['error']}")
            continue
        lnz = "-" if r.get("log_evidence") is None else f"{r['log_evidence']:.1f}+-{r['log_evidence_err']:.1f}"
        ess = r.get("ess")
        lines.append(
            f"{r['model']:<9} {r['n_params']:>4} {r['method']:<7} {r['wall_time_s']:>9.1f} "
            f"{r['n_likelihood_evals']:>9d} {r['time_per_eval_s']:>9.4f} {_fmt(ess, '8.0f'):>8} "
            f"{_fmt(None if ess is None else ess / r['wall_time_s'], '8.2f'):>8} {lnz:>14} "
            f"{r.get('converged', '-')!s:>5}"
        )
    lines.append("")
    lines.append("likelihood cost per call after compilation (compile time): value | value+grad")
    seen = set()
    for r in rows:
        if r["model"] in seen or "value_s" not in r:
            continue
        seen.add(r["model"])
        lines.append(f"  {r['model']:<9} {r['value_s'] * 1e3:8.1f} ms ({r['compile_value_s']:5.1f} s) | "
                     f"{r['value_and_grad_s'] * 1e3:8.1f} ms ({r['compile_value_and_grad_s']:5.1f} s)")
    lines.append("")
    lines.append("posterior agreement: max |dq| / ((q84-q16)/2 of B), q in 16/50/84%")
    for a in agree:
        lines.append(f"  {a['model']:<9} {a['a']:>6} vs {a['b']:<6} {_fmt(a['max_dq_over_width'], '8.3f'):>8}  "
                     f"({a['parameter']})")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in zip(METHODS, ("C0", "C1", "C2")):
        rs = sorted((r for r in rows if r["method"] == method and "error" not in r), key=lambda r: r["n_params"])
        if not rs:
            continue
        x = [r["n_params"] for r in rs]
        axes[0].plot(x, [r["wall_time_s"] for r in rs], "-", color=color, label=method)
        axes[1].plot(x, [r["time_per_eval_s"] for r in rs], "-", color=color, label=method)
        for r in rs:
            filled = r.get("converged", True) is not False
            for ax, key in ((axes[0], "wall_time_s"), (axes[1], "time_per_eval_s")):
                ax.plot(r["n_params"], r[key], "o", color=color, mfc=color if filled else "white")
    axes[0].set(xlabel="free parameters", ylabel="wall time [s]", yscale="log", title="time vs dimension")
    axes[1].set(xlabel="free parameters", ylabel="wall time / likelihood evaluation [s]", yscale="log",
                title="time per evaluation")
    axes[0].legend(title="open: nested stopped at maxcall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="few steps / live points per model (QUICK table; NPTF runs are not converged)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guide", default="iaf")
    p.add_argument("--svi-steps", type=int, default=10_000)
    p.add_argument("--svi-lr", type=float, default=3e-3)
    p.add_argument("--svi-particles", type=int, default=4)
    p.add_argument("--svi-samples", type=int, default=20_000)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-chains", type=int, default=1)
    p.add_argument("--nuts-max-tree-depth", type=int, default=10)
    p.add_argument("--nuts-init", default="median", help="median | map")
    p.add_argument("--nlive", type=int, default=None, help="default 500 (quick: max(50, 2 ndim + 2))")
    p.add_argument("--dlogz", type=float, default=0.1)
    p.add_argument("--nested-backend", default="auto")
    p.add_argument("--nested-sample", default="auto")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--maxcall", type=int, default=None, help="cap on nested-sampling likelihood calls")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--render", default=None, metavar="JSON", help="only print the table of a saved result and redraw its plot")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="join the results of separate runs (one model-method pair per file at most) "
                        "into --out, with the agreement recomputed from their saved quantiles")
    p.add_argument("--out", default=str(HERE / "results" / "compare_samplers.json"))
    p.add_argument("--plot", default=str(HERE / "results" / "compare_samplers.png"))
    a = p.parse_args(argv)
    if a.batch_size != "auto":
        a.batch_size = int(a.batch_size)
    a.models = [m for m in a.models.split(",") if m]
    a.methods = [m for m in a.methods.split(",") if m]
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {MODELS}")
    for m in a.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    return a


def render(path: pathlib.Path, plot_path: pathlib.Path) -> int:
    """Print the table of a saved JSON result and redraw its plot."""
    payload = json.loads(pathlib.Path(path).read_text())
    print(table(payload["rows"], payload["agreement"]))
    for k, v in payload.get("notes", {}).items():
        print(f"note [{k}]: {v}")
    plot(payload["rows"], plot_path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(pathlib.Path(args.render), pathlib.Path(args.plot))
    if args.merge:
        return merge(args.merge, pathlib.Path(args.out), pathlib.Path(args.plot))
    if not os.environ.get("SKYMODEL_DATA"):
        print("set SKYMODEL_DATA to the data directory (it holds fermi-gc/)", file=sys.stderr)
        return 2
    cfgs = model_configs()
    rows, agree, notes = [], [], {}
    for name in args.models:
        t0 = time.perf_counter()
        built, note = build_model(name, cfgs[name])
        if note:
            notes[name] = note
        sky = built.sky
        n_params = int(sum(np.size(p.value) for p in sky.free_parameters().values()))
        from skymodel.inference.nested import prior_transform

        ndim = prior_transform(sky).ndim
        costs = likelihood_costs(sky, built.observation)
        print(f"[{name}] {n_params} parameters ({ndim} cube dims), {built.roi.n_pixels} pixels, built in "
              f"{time.perf_counter() - t0:.1f} s; log-likelihood {costs['value_s'] * 1e3:.1f} ms, "
              f"value+grad {costs['value_and_grad_s'] * 1e3:.1f} ms", flush=True)
        quants = {}
        run_args = settings_for(name, ndim, args)
        for method in args.methods:
            keys = {"svi": ("guide", "svi_steps", "svi_particles", "svi_lr", "svi_samples"),
                    "nuts": ("nuts_warmup", "nuts_samples", "nuts_chains", "nuts_max_tree_depth", "nuts_init"),
                    "nested": ("nested_backend", "nlive", "dlogz", "nested_sample", "batch_size", "maxcall")}[method]
            base = {"model": name, "method": method, "n_params": n_params, "ndim_cube": ndim,
                    "n_pixels": built.roi.n_pixels, "settings": {k: getattr(run_args, k) for k in keys},
                    **costs}
            try:
                post, info = run_method(method, built, run_args)
            except Exception as e:  # noqa: BLE001  (one failing run should not lose the others)
                traceback.print_exc()
                rows.append({**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                continue
            info["time_per_eval_s"] = info["wall_time_s"] / max(info["n_likelihood_evals"], 1)
            info["ess_per_s"] = None if info["ess"] is None else info["ess"] / info["wall_time_s"]
            quants[method] = flat_quantiles(post)
            rows.append({**base, **info, "quantiles": {k: v.tolist() for k, v in quants[method].items()}})
            print(f"[{name}] {method}: {info['wall_time_s']:.1f} s, {info['n_likelihood_evals']} evaluations"
                  + (f", ln Z = {post.log_evidence:.2f} +- {post.log_evidence_err:.2f}" if method == "nested" else ""),
                  flush=True)
        agree.extend(agreements(name, quants))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    if args.quick:
        settings["quick_per_model"] = {m: dict(zip(("svi_steps", "nuts_warmup", "nuts_samples",
                                                    "nuts_max_tree_depth", "nested_maxcall"), QUICK[m]))
                                       for m in args.models}
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "jax": jax.__version__, "backend": jax.default_backend(),
               "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count()}
    write(rows, agree, notes, settings, machine, pathlib.Path(args.out), pathlib.Path(args.plot))
    return 0


def agreements(model: str, quants: dict[str, dict]) -> list[dict]:
    """Quantile agreement of one model's runs: every method against NUTS where it ran
    (else nested sampling), and SVI against nested sampling as well."""
    ref = "nuts" if "nuts" in quants else ("nested" if "nested" in quants else None)
    pairs = [(a, ref) for a in quants if a != ref] if ref else []
    if ref == "nuts" and "svi" in quants and "nested" in quants:
        pairs.append(("svi", "nested"))
    out = []
    for a, b in pairs:
        d, where = agreement(quants[a], quants[b])
        out.append({"model": model, "a": a, "b": b, "max_dq_over_width": d, "parameter": where})
    return out


def write(rows, agree, notes, settings, machine, out: pathlib.Path, plot_path: pathlib.Path) -> None:
    """Print the table and write the JSON and the plot."""
    text = table(rows, agree)
    print()
    print(text)
    for k, v in notes.items():
        print(f"note [{k}]: {v}")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "machine": machine, "notes": notes, "rows": rows,
               "agreement": agree, "table": text}
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    plot(rows, plot_path)
    print(f"\nwrote {out} and {plot_path}")


def merge(paths: list[str], out: pathlib.Path, plot_path: pathlib.Path) -> int:
    """Join results of separate runs (e.g. one process per method) into one table: the
    rows of all files (a model-method pair at most once) and the quantile agreement
    recomputed from their saved quantiles."""
    rows, notes, settings, machines, saved_agree, seen = [], {}, {}, {}, [], {}
    for path in paths:
        payload = json.loads(pathlib.Path(path).read_text())
        for r in payload["rows"]:
            key = (r["model"], r["method"])
            if key in seen:
                raise SystemExit(f"{r['model']} / {r['method']} is in both {seen[key]} and {path}")
            seen[key] = path
            rows.append(r)
        notes.update(payload.get("notes", {}))
        settings[str(path)] = payload["settings"]
        machines[str(path)] = payload["machine"]
        saved_agree.extend(payload.get("agreement", []))
    agree = []
    for model in MODELS:
        ran = [r for r in rows if r["model"] == model and "error" not in r]
        if all("quantiles" in r for r in ran):
            agree.extend(agreements(model, {r["method"]: {k: np.asarray(v) for k, v in r["quantiles"].items()}
                                            for r in ran}))
        else:  # files written before quantiles were saved: keep the agreement they computed
            print(f"[{model}] no saved quantiles in some runs: the files' own agreement is kept",
                  file=sys.stderr)
            agree.extend(a for a in saved_agree if a["model"] == model)
    rows.sort(key=lambda r: (MODELS.index(r["model"]), METHODS.index(r["method"])))
    unique = {json.dumps(m, sort_keys=True) for m in machines.values()}
    backends = {m.get("backend") for m in machines.values()}
    machine = (next(iter(machines.values())) if len(unique) == 1 else
               {"backend": backends.pop() if len(backends) == 1 else "mixed", "per_file": machines})
    write(rows, agree, notes, {"merged": settings}, machine, out, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
