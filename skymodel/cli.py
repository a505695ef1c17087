"""The `skymodel` command (also `python -m skymodel`).

  skymodel demo [--out DIR] [--steps N]        simulate a sky with known truth, fit it, report
  skymodel fit --config FILE|NAME [--out DIR] [--method svi|nuts|map] [--steps N] [--resume]
  skymodel report RUN_DIR                      summary and plots of a saved run
  skymodel configs                             list the packaged configs
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


def _overrides(args) -> dict:
    out = {}
    if getattr(args, "steps", None) is not None:
        out["num_steps"] = args.steps
    if getattr(args, "samples", None) is not None:
        out["num_samples"] = args.samples
    if getattr(args, "guide", None) is not None:
        out["guide"] = args.guide
    if getattr(args, "seed", None) is not None:
        out["seed"] = args.seed
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

    out = args.out or f"runs/{pathlib.Path(str(args.config)).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    built, posterior = run_fit(
        args.config, out, method=args.method, resume=args.resume, progress=not args.no_progress, **_overrides(args)
    )
    print(posterior.summary())
    print(f"\nposterior saved in {out}/posterior (wall time {posterior.wall_time:.1f} s)")
    return 0


def cmd_report(args) -> int:
    from skymodel.inference import Posterior

    run = pathlib.Path(args.run_dir)
    if not (run / "posterior").exists():
        print(f"error: {run} has no saved posterior (expected {run}/posterior)", file=sys.stderr)
        return 2
    post = Posterior.load(run / "posterior")
    print(post.summary())
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
    d.add_argument("--guide", default=None, help="iaf | mvn | normal")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fit", help="fit a model described by a TOML config")
    f.add_argument("--config", required=True, help="path to a TOML config or a packaged config name")
    f.add_argument("--out", default=None, help="run directory (default: runs/<config>-<time>)")
    f.add_argument("--method", choices=["svi", "nuts", "map"], default=None)
    f.add_argument("--steps", type=int, default=None)
    f.add_argument("--samples", type=int, default=None)
    f.add_argument("--guide", default=None)
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=cmd_fit)

    r = sub.add_parser("report", help="summarise a saved run")
    r.add_argument("run_dir")
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
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
