"""Benchmark of the point-source simulator: a full-sky HEALPix map with ~10^5 sources.

One population on the whole sky (uniform source density, nside 128), a one-break SCF
(n1 = 10, n2 = -1, S_b = 5 counts; finitely many sources down to S = 0) scaled so that the
expected number of sources is N_exp; every source gets its counts drawn and its photons
scattered by the PSF (delta, Gaussian sigma = 0.1812 deg, or the two-King Fermi PSF at
2 GeV). For each case: the first call (includes compilation), and the median and minimum
of the warm calls with new keys; the number of sources and photons drawn.

    python benchmarks/simulate.py [--nside 128] [--sources 1e5] [--repeats 5] [--out FILE]

Writes benchmarks/results/simulate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import healpy as hp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from skymodel.psf import DoubleKingPSF, GaussianPSF  # noqa: E402
from skymodel.scf import BrokenPowerLaw  # noqa: E402
from skymodel.simulate import simulate_population  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nside", type=int, default=128)
    ap.add_argument("--sources", type=float, default=1e5, help="expected number of sources")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/simulate.json")
    a = ap.parse_args(argv)
    npix = hp.nside2npix(a.nside)
    template = np.ones(npix)
    shape = BrokenPowerLaw(1.0, [10.0, -1.0], [5.0])
    A = a.sources / (float(shape.number_of_sources()) * npix)
    scf = BrokenPowerLaw(A, [10.0, -1.0], [5.0])
    psfs = {"delta": None, "gauss": GaussianPSF.from_degrees(0.1812),
            "king": DoubleKingPSF.fermi_2gev()}
    rows = []
    print(f"{'psf':6s} {'sources':>8s} {'photons':>9s} {'first call':>11s} {'warm median':>12s} {'warm min':>9s}")
    for name, psf in psfs.items():
        def run(seed):
            t = time.perf_counter()
            out = simulate_population(jax.random.PRNGKey(seed), template, scf, a.nside, psf)
            jax.block_until_ready(out.counts_sky)
            return time.perf_counter() - t, out

        first, out = run(0)
        warm = []
        for r in range(a.repeats):
            dt, out = run(r + 1)
            warm.append(dt)
        n_src = int(out.sources.n)
        n_ph = int(np.sum(np.asarray(out.counts_sky)))
        if n_ph != int(np.sum(np.asarray(out.sources.photons))):
            raise RuntimeError("photons lost in scattering")  # every photon lands in a pixel
        row = dict(psf=name, nside=a.nside, expected_sources=a.sources, sources=n_src,
                   photons=n_ph, first_call_s=first, warm_median_s=float(np.median(warm)),
                   warm_min_s=float(np.min(warm)))
        rows.append(row)
        print(f"{name:6s} {n_src:8d} {n_ph:9d} {first:10.2f}s {row['warm_median_s']:11.2f}s "
              f"{row['warm_min_s']:8.2f}s", flush=True)
    meta = dict(jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                platform=platform.platform(), scf=dict(indices=[10.0, -1.0], breaks=[5.0], A=A))
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
