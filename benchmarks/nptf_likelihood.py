"""Benchmark of the NPTF likelihood on the real Fermi data (SKYMODEL_DATA/fermi-gc).

ROI: r < 25 deg from the GC, |b| > 2 deg, 3FGL sources masked (0.8 deg). Cases: 1 and 2
populations, one and two breaks, delta and King PSF, 1 and 7 exposure regions. For each:
compile time (first call), value time and value+grad time per evaluation (median and
minimum of --repeats calls, block_until_ready), with the data (counts, count plan, exposure
regions, PSF table) constants of the compiled function as in a fit. A straightforward
REFERENCE is measured in the same run, right after ours. Calls of the same implementation
take turns in --rounds rounds (value, value+grad, value, ...), so that both see the same
phases of this machine's varying speed: x_m by numerical S-grid integration (1,000 log-spaced points in S
in [0.1, 100]) and the p_k recursion unrolled in Python up to k_max, jitted (as the paper's
code does).

Usage: SKYMODEL_DATA=/path/to/data python benchmarks/nptf_likelihood.py [--out FILE]
       [--repeats N] [--rounds R] [--quick] [--cpus N]

--cpus 1 pins the run to one core: on a shared virtual machine whose second core comes and
goes, that gives steady numbers (the work, without the parallel speed-up).
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from skymodel.likelihood import count_plan, nptf_loglike  # noqa: E402
from skymodel.psf import DoubleKingPSF, PSFCorrection  # noqa: E402
from skymodel.roi import ROI  # noqa: E402
from skymodel.scf import BrokenPowerLaw  # noqa: E402


def load(data: pathlib.Path, n_regions: int):
    d = data / "fermi-gc"
    counts = np.load(d / "counts.npy")
    exposure = np.load(d / "exposure.npy")
    psc = np.load(d / "mask_psc_3fgl_0p8deg.npy").astype(bool)
    nside = hp.npix2nside(counts.size)
    theta, phi = hp.pix2ang(nside, np.arange(counts.size))
    b = np.pi / 2 - theta
    r = np.degrees(np.arccos(np.cos(b) * np.cos(phi)))
    mask = (r >= 25) | (np.abs(np.degrees(b)) <= 2) | psc
    roi = ROI.from_masks(nside, mask, exposure=exposure, n_exposure_regions=n_regions)
    k = np.asarray(roi.restrict(counts)).astype(np.int64)
    dif = np.asarray(roi.restrict(np.load(d / "template_dif.npy")))
    iso = np.asarray(roi.restrict(np.load(d / "template_iso.npy")))
    mu = 0.75 * k.sum() * dif / dif.sum() + 0.1 * k.sum() * iso / iso.sum()
    gce = np.asarray(roi.restrict(np.load(d / "template_nfw_g1p2.npy")))
    dsk = np.asarray(roi.restrict(np.load(d / "template_dsk_z1p0.npy")))
    T = np.stack([gce / gce.mean(), dsk / dsk.mean()])
    return roi, k, mu, T, nside


def scf_params(n_breaks: int):
    if n_breaks == 1:
        return [(0.05, [10.0, 1.5], [12.0]), (0.03, [8.0, 1.2], [8.0])]
    return [(0.05, [10.0, 1.9, -1.0], [20.0, 5.0]), (0.03, [8.0, 1.5, -2.0], [15.0, 3.0])]


def first_call(fn, args):
    """Seconds of the first call (trace + compile + one evaluation)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def interleaved(entries, rounds):
    """Per entry (fn, args, calls per round): (median, min) seconds per call over all its
    calls, the entries taking turns round by round. This machine's speed changes by up to
    ~2x for seconds to minutes at a time; taking turns exposes the entries (value and
    value+gradient) to the same mix of fast and slow phases."""
    samples = [[] for _ in entries]
    for _ in range(rounds):
        for s, (fn, args, calls) in zip(samples, entries):
            for _ in range(calls):
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                s.append(time.perf_counter() - t)
    return [(float(np.median(s)), float(np.min(s))) for s in samples]


# ----------------------------------------------------------------------------- reference


def reference_loglike_factory(k, T, region, ratios, f, w, k_max, npop):
    """x_m on a 1,000-point S grid and the recursion unrolled in Python (jitted)."""
    S = jnp.geomspace(0.1, 100.0, 1000)
    m = jnp.arange(1, k_max + 1, dtype=jnp.float64)
    from jax.scipy.special import gammaln

    def dnds(A, idx, brk, S):
        # broken power law, highest break first (NPTFit convention)
        out = A * (S / brk[0]) ** (-idx[0])
        scale = A
        for j in range(brk.shape[0]):
            lo = brk[j + 1] if j + 1 < brk.shape[0] else 0.0
            seg = scale * (S / brk[j]) ** (-idx[j + 1])
            out = jnp.where((S < brk[j]) & (S >= lo), seg, out)
            if j + 1 < brk.shape[0]:
                scale = scale * (brk[j + 1] / brk[j]) ** (-idx[j + 1])
        return out

    def x_terms(A, idx, brk, ratio):
        Sr = S  # counts in this region; the SCF is rescaled
        dn = dnds(A / ratio, idx, brk * ratio, Sr)  # (nS,)
        fs = f[:, None] * Sr[None, :]  # (nf, nS)
        logk = m[:, None, None] * jnp.log(fs)[None] - fs[None] - gammaln(m + 1)[:, None, None]
        integrand = jnp.einsum("mfs,f->ms", jnp.exp(logk), w) * dn[None, :]
        xm = jnp.trapezoid(integrand, Sr, axis=1)
        tot = jnp.trapezoid(jnp.einsum("fs,f->s", 1 - jnp.exp(-fs), w) * dn, Sr)
        return xm, tot

    def loglike(mu, T, params):
        x = jnp.zeros((k.shape[0], k_max))
        xt = jnp.zeros(k.shape[0])
        for p in range(npop):
            A, idx, brk = params[p]
            xm, tot = jax.vmap(lambda r: x_terms(A, idx, brk, r))(ratios)
            x = x + T[p][:, None] * xm[region]
            xt = xt + T[p] * tot[region]
        xp = x.at[:, 0].add(mu)
        ps = [jnp.exp(-mu - xt)]
        for kk in range(1, k_max + 1):
            hist = jnp.stack(ps[::-1], axis=1)  # p_{kk-1} .. p_0
            ps.append(jnp.sum(xp[:, :kk] * jnp.arange(1, kk + 1) * hist, axis=1) / kk)
        P = jnp.stack(ps, axis=1)
        return jnp.sum(jnp.log(jnp.take_along_axis(P, k[:, None], axis=1)[:, 0]))

    return loglike


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/nptf_likelihood.json")
    ap.add_argument("--repeats", type=int, default=20, help="calls of each of ours per case")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds in which the functions take turns (the reference: one call each)")
    ap.add_argument("--quick", action="store_true", help="only the target case")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--cpus", type=int, default=None,
                    help="run on the first N CPUs only (pinned before JAX starts its threads)")
    args = ap.parse_args(argv)
    if args.cpus is not None:
        n_avail = len(os.sched_getaffinity(0))
        if not 1 <= args.cpus <= n_avail:
            ap.error(f"--cpus must be between 1 and {n_avail}, got {args.cpus}")
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
    data = os.environ.get("SKYMODEL_DATA")
    if not data or not pathlib.Path(data, "fermi-gc").is_dir():
        print("SKYMODEL_DATA/fermi-gc not found; nothing to benchmark")
        return 1
    data = pathlib.Path(data)

    king = PSFCorrection.compute(DoubleKingPSF.fermi_2gev(), 128)
    psfs = {"delta": None, "king": king}
    cases = [(1, 1, "delta", 1), (2, 1, "delta", 1), (2, 2, "delta", 1), (2, 2, "king", 1),
             (1, 1, "king", 7), (2, 2, "king", 7)]
    if args.quick:
        cases = [(2, 2, "king", 7)]
    rows = []
    cache = {}
    for npop, nb, psf_name, nreg in cases:
        if nreg not in cache:
            cache[nreg] = load(data, nreg)
        roi, k, mu, T, nside = cache[nreg]
        T = T[:npop]
        plan = count_plan(k)
        region, ratios = roi.region, roi.region_ratio
        psf = psfs[psf_name]
        pars = scf_params(nb)[:npop]
        params = tuple((jnp.asarray(A), jnp.asarray(i), jnp.asarray(b)) for A, i, b in pars)
        kj = jnp.asarray(k)

        # The data (counts, count plan, exposure regions, PSF table) are constants of the
        # compiled function, as in a fit (SkyModel's NumPyro model closes over the
        # Observation); the parameters and everything computed from them are arguments.
        # Static index bounds as the point-source components set them from the priors'
        # edges (fiducial analysis: n1 <= 8, n3 >= -8; here 10 and -8).
        def total(mu, T, params):
            scfs = [BrokenPowerLaw(A, i, b, max_index=10.0, min_index=-8.0) for A, i, b in params]
            return jnp.sum(nptf_loglike(kj, mu, T, scfs, psf, (region, ratios), plan=plan))

        val = jax.jit(total)
        vg = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))
        a = (jnp.asarray(mu), jnp.asarray(T), params)
        c_v, c_g = first_call(val, a), first_call(vg, a)
        per_round = max(1, args.repeats // args.rounds)
        (t_v, tmin_v), (t_g, tmin_g) = interleaved([(val, a, per_round), (vg, a, per_round)],
                                                   args.rounds)
        # The reference is timed after ours, not in the same rounds: in a run that mixed
        # them, ours took about twice as long as in runs that did not (the reference's
        # value+gradient allocates hundreds of megabytes per call).
        with_ref = not args.no_reference and (npop, nb, psf_name, nreg) == (2, 2, "king", 7)
        if with_ref:
            f = jnp.asarray(king.f)
            w = jnp.asarray(king.weights * king.f)  # PSF measure df rho = w f
            ref = reference_loglike_factory(kj, jnp.asarray(T), region, ratios, f, w, int(k.max()), npop)
            rv = jax.jit(ref)
            rg = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))
            rc_v, rc_g = first_call(rv, a), first_call(rg, a)
            (rt_v, _), (rt_g, _) = interleaved([(rv, a, 1), (rg, a, 1)], args.rounds)
        row = dict(npop=npop, n_breaks=nb, psf=psf_name, n_regions=nreg, n_pixels=int(k.size),
                   k_max=int(k.max()), groups=list(plan.group_kmax), value=float(val(*a)),
                   compile_value_s=c_v, compile_grad_s=c_g, value_ms=t_v * 1e3,
                   value_min_ms=tmin_v * 1e3, value_grad_ms=t_g * 1e3, value_grad_min_ms=tmin_g * 1e3,
                   calls=per_round * args.rounds)
        if with_ref:
            row.update(ref_value=float(rv(*a)), ref_compile_value_s=rc_v, ref_compile_grad_s=rc_g,
                       ref_value_ms=rt_v * 1e3, ref_value_grad_ms=rt_g * 1e3,
                       ref_calls=args.rounds, speedup_value=rt_v / t_v, speedup_value_grad=rt_g / t_g)
        rows.append(row)
        print(_fmt(row), flush=True)

    meta = dict(jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                cpus_used=len(os.sched_getaffinity(0)),
                platform=platform.platform(), load_avg=os.getloadavg(), repeats=args.repeats,
                rounds=args.rounds, king_psf_table=len(king.f))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


def _fmt(r):
    s = (f"npop={r['npop']} breaks={r['n_breaks']} psf={r['psf']:5s} regions={r['n_regions']} | "
         f"compile v/vg {r['compile_value_s']:.2f}/{r['compile_grad_s']:.2f} s | "
         f"value {r['value_ms']:.2f} ms (min {r['value_min_ms']:.2f}) | "
         f"value+grad {r['value_grad_ms']:.2f} ms (min {r['value_grad_min_ms']:.2f})")
    if "ref_value_ms" in r:
        s += (f"\n   reference: compile v/vg {r['ref_compile_value_s']:.1f}/{r['ref_compile_grad_s']:.1f} s, "
              f"value {r['ref_value_ms']:.1f} ms, value+grad {r['ref_value_grad_ms']:.1f} ms; "
              f"speed-up value {r['speedup_value']:.1f}x, value+grad {r['speedup_value_grad']:.1f}x; "
              f"loglike ours {r['value']:.3f} vs ref {r['ref_value']:.3f}")
    return s


if __name__ == "__main__":
    sys.exit(main())
