"""The `skymodel` command (also `python -m skymodel`).

  skymodel demo [--out DIR] [--steps N]        simulate a sky with known truth, fit it, report
  skymodel fit --config FILE|NAME [--out DIR] [--method svi|nuts|map|nested] [--steps N] [--resume]
               [--guide iaf|bnaf|mvn|normal] [--beta0 B --temper-steps N] [--neutra RUN_DIR] ...
  skymodel fit --out RUN_DIR --resume          continue an interrupted SVI or nested run
  skymodel report RUN_DIR [--compare OTHER]    plots and summary.txt of a saved run
  skymodel configs                             list the packaged configs
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


_OVERRIDES = {
    # CLI attribute -> [inference] key
    "steps": "num_steps",
    "samples": "num_samples",
    "guide": "guide",
    "seed": "seed",
    "lr": "learning_rate",
    "lr_schedule": "lr_schedule",
    "particles": "num_particles",
    "flows": "num_flows",
    "beta0": "beta0",
    "temper_steps": "temper_steps",
    "temper_schedule": "temper_schedule",
    "checkpoint_every": "checkpoint_every",
    "warmup": "num_warmup",
    "nuts_samples": "nuts_samples",
    "chains": "num_chains",
    "target_accept": "target_accept",
    "chain_method": "chain_method",
    "nlive": "nlive",
    "dlogz": "dlogz",
    "nested_backend": "nested_backend",
    "maxcall": "maxcall",
}


def _overrides(args) -> dict:
    out = {key: getattr(args, attr) for attr, key in _OVERRIDES.items()
           if getattr(args, attr, None) is not None}
    if getattr(args, "hidden", None) is not None:
        try:
            sizes = [int(h) for h in args.hidden.split(",")]
        except ValueError:
            raise ValueError(f"--hidden must be comma-separated integers, got {args.hidden!r}") from None
        # the guide decides which one it uses (iaf: hidden_dims, bnaf: hidden_factors)
        out["hidden_dims"] = out["hidden_factors"] = sizes
    return out


def cmd_demo(args) -> int:
    import numpy as np

    from skymodel import analysis
    from skymodel import config as C
    from skymodel.demo import demo_dataset
    from skymodel.runs import run_fit

    out = pathlib.Path(args.out)
    cfg = C.load_config(args.config)
    t0 = time.perf_counter()
    print(f"[skymodel demo] simulating a mock sky (nside {cfg['data'].get('nside', 128)}) from known truth ...", flush=True)
    built, posterior = run_fit(cfg, out, progress=not args.no_progress, **_overrides(args))
    truth = {k: v for k, v in cfg.get("truth", {}).items()}
    table = analysis.truth_table(posterior, truth)
    print("\nTrue vs recovered (posterior median and 68% interval):")
    print(table)
    (out / "truth_vs_recovered.txt").write_text(table + "\n")
    names = [n for n in posterior.names if posterior[n].ndim == 1]
    analysis.corner_plot(posterior, out / "corner.png", names=names, truth=truth)
    mean_counts = analysis.posterior_mean_counts(posterior, built.sky, built.roi, num=100)
    model = sum(mean_counts.values())
    analysis.residual_map_plot(built.roi, np.asarray(built.observation.counts), model, out / "residuals.png")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s (fit {posterior.wall_time:.0f} s); "
          f"wrote {out}/corner.png, {out}/residuals.png, {out}/posterior, {out}/summary.txt")
    return 0


def cmd_fit(args) -> int:
    from skymodel.runs import run_fit

    if args.config is None and not args.resume:
        print("error: --config is required (or --resume with --out RUN_DIR)", file=sys.stderr)
        return 2
    if args.config is None and args.out is None:
        print("error: --resume without --config needs --out RUN_DIR", file=sys.stderr)
        return 2
    stem = pathlib.Path(str(args.config)).stem if args.config else "run"
    out = args.out or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[skymodel fit] run directory {out}", flush=True)
    built, posterior = run_fit(
        args.config, out, method=args.method, resume=args.resume, progress=not args.no_progress,
        neutra=args.neutra, **_overrides(args)
    )
    print(posterior.summary())
    print(f"\nposterior saved in {out}/posterior (wall time {posterior.wall_time:.1f} s); "
          f"analyse it with: skymodel report {out}")
    return 0


def cmd_report(args) -> int:
    from skymodel.analysis import report

    rep = report(args.run_dir, out=args.out, compare=args.compare, num=args.num, seed=args.seed,
                 smooth_deg=args.smooth, progress=True)
    print(rep.text)
    where = args.out or f"{args.run_dir}/report"
    print(f"wrote {len(rep.files)} files to {where}")
    return 0


def cmd_configs(args) -> int:
    from skymodel.config import CONFIG_DIR, packaged_configs

    for name in packaged_configs():
        print(f"{name:24s} {CONFIG_DIR / (name + '.toml')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skymodel", description="Differentiable gamma-ray sky inference.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate a sky with known truth, fit it, report recovered vs true")
    d.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    d.add_argument("--config", default="demo", help="demo config (default: the packaged 'demo')")
    d.add_argument("--steps", type=int, default=None, help="SVI steps (default: the config's)")
    d.add_argument("--samples", type=int, default=None, help="posterior samples to draw")
    d.add_argument("--guide", choices=["iaf", "bnaf", "mvn", "normal"], default=None)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser(
        "fit", help="fit a model described by a TOML config",
        description="Fit a model described by a TOML config. Options override the config's "
                    "[inference] table. Ctrl-C saves a checkpoint; --resume continues it.",
    )
    f.add_argument("--config", default=None,
                   help="path to a TOML config or a packaged config name (optional with --resume)")
    f.add_argument("--out", default=None, help="run directory (default: runs/<config>-<time>)")
    f.add_argument("--method", choices=["svi", "nuts", "map", "nested"], default=None)
    f.add_argument("--resume", action="store_true",
                   help="continue the SVI or nested-sampling run in --out from its checkpoint")
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--no-progress", action="store_true")
    g = f.add_argument_group("SVI")
    g.add_argument("--guide", choices=["iaf", "bnaf", "mvn", "normal"], default=None)
    g.add_argument("--steps", type=int, default=None, help="optimisation steps")
    g.add_argument("--samples", type=int, default=None, help="posterior draws from the guide (default 50000)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None)
    g.add_argument("--particles", type=int, default=None, help="ELBO particles")
    g.add_argument("--flows", type=int, default=None, help="number of flows (iaf, bnaf)")
    g.add_argument("--hidden", default=None,
                   help="comma-separated hidden sizes (iaf: units, e.g. 128,128; bnaf: factors, e.g. 8,8)")
    g.add_argument("--beta0", type=float, default=None,
                   help="initial likelihood temperature for tempering (0 < beta0 <= 1)")
    g.add_argument("--temper-steps", type=int, default=None,
                   help="steps over which the temperature rises from beta0 to 1 (0: no tempering)")
    g.add_argument("--temper-schedule", choices=["geometric", "linear"], default=None)
    g.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    n = f.add_argument_group("NUTS")
    n.add_argument("--neutra", default=None, metavar="RUN_DIR",
                   help="NeuTra: reparameterise NUTS with the guide of this SVI run")
    n.add_argument("--warmup", type=int, default=None)
    n.add_argument("--nuts-samples", type=int, default=None, help="samples per chain")
    n.add_argument("--chains", type=int, default=None)
    n.add_argument("--target-accept", type=float, default=None)
    n.add_argument("--chain-method", choices=["sequential", "parallel", "vectorized"], default=None)
    ns = f.add_argument_group("nested sampling")
    ns.add_argument("--nlive", type=int, default=None, help="live points (default 500)")
    ns.add_argument("--dlogz", type=float, default=None, help="stopping tolerance on ln Z (default 0.1)")
    ns.add_argument("--nested-backend", choices=["auto", "dynesty", "multinest"], default=None)
    ns.add_argument("--maxcall", type=int, default=None, help="cap on likelihood calls")
    f.set_defaults(func=cmd_fit)

    r = sub.add_parser("report", help="analyse a saved run: plots and summary.txt")
    r.add_argument("run_dir")
    r.add_argument("--compare", default=None, metavar="OTHER_RUN",
                   help="another run of the same model to overlay (e.g. NUTS vs SVI)")
    r.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    r.add_argument("--num", type=int, default=500, help="posterior samples used for fluxes, maps, bands")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--smooth", type=float, default=1.0, help="map smoothing FWHM in degrees (0: none)")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("configs", help="list packaged configs")
    c.set_defaults(func=cmd_configs)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoints and saved results are kept; rerun with --resume", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # NonFiniteLossError
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
