"""Runs (skymodel.runs) and the inference options they drive: effective settings, the run
directory, interrupt + resume, saved guides, likelihood tempering, BNAF guides, NeuTra NUTS.

The runs use a tiny data directory written here (nside 16, ~140 analysis pixels; Poisson
templates with known norms), so they compile and run in seconds. `make_tiny_data` and
`tiny_config` are also used by test_cli.py and test_analysis.py.
"""

from __future__ import annotations

import json
import pathlib
import tomllib

import healpy as hp
import jax
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.stats
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoDelta

from skymodel import config as C
from skymodel.components.base import Param
from skymodel.components.morphology import TemplateMap
from skymodel.components.poisson import PoissonComponent
from skymodel.inference import svi as S
from skymodel.model import SkyModel
from skymodel.observation import Observation
from skymodel.priors import Uniform
from skymodel.roi import ROI
from skymodel.runs import config_to_toml, inference_settings, read_run, run_fit

TINY_NSIDE = 16
TINY_TRUTH = {"dif.norm": 3.0, "iso.norm": 0.5, "gce.norm": 0.3}


def make_tiny_data(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write a small data directory (nside 16): exposure, templates dif / iso / blob
    (smooth GCE-like) / ps (a source-density template), a one-pixel source mask, and counts
    drawn from TINY_TRUTH. Templates have mean 1 over r < 25 deg, |b| > 2 deg."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    npix = hp.nside2npix(TINY_NSIDE)
    l, b = hp.pix2ang(TINY_NSIDE, np.arange(npix), lonlat=True)
    l = np.where(l > 180, l - 360, l)
    exposure = 3e11 * (1 + 0.1 * np.sin(np.radians(b)) + 0.05 * np.cos(np.radians(l)))
    expo = exposure / exposure.mean()
    r = np.degrees(np.arccos(np.cos(np.radians(l)) * np.cos(np.radians(b))))
    region = (r < 25) & (np.abs(b) > 2)
    density = np.maximum(r, 1.0) ** -2.4
    maps = {
        "iso": expo,
        "dif": np.exp(-np.abs(b) / 8.0) * (1 + np.exp(-np.abs(l) / 20)) * expo,
        "blob": density * expo,
        "ps": density,
    }
    maps = {k: m / m[region].mean() for k, m in maps.items()}
    for k, m in maps.items():
        np.save(directory / f"template_{k}.npy", m)
    np.save(directory / "exposure.npy", exposure)
    mu = sum(TINY_TRUTH[f"{k}.norm"] * maps[t] for k, t in (("dif", "dif"), ("iso", "iso"), ("gce", "blob")))
    np.save(directory / "counts.npy", np.random.default_rng(seed).poisson(mu).astype(float))
    mask = np.zeros(npix, bool)
    mask[hp.ang2pix(TINY_NSIDE, 5.0, 3.0, lonlat=True)] = True
    np.save(directory / "mask_src.npy", mask)
    return directory


_PS = """
[[components]]
name = "gce_ps"
kind = "point_sources"
morphology = { kind = "template", template = "ps" }
scf = { log10_amplitude = { uniform = [-3.0, 1.0] }, indices = [{ uniform = [2.1, 5.0] }, { uniform = [-1.0, 1.9] }], breaks = [{ uniform = [2.0, 20.0] }] }
"""


def tiny_config(data_dir: pathlib.Path, *, point_sources: bool = False, inference: str = "") -> str:
    """Config text for the tiny data: dif, iso, a smooth GCE ("gce") and optionally a GCE
    point-source population ("gce_ps", NPTFit SCF with one break)."""
    return f"""
[data]
directory = "{data_dir}"

[roi]
radius = 25.0
band = 2.0
source_mask = "src"
exposure_regions = 2

[[components]]
name = "dif"
kind = "template"
template = "dif"
norm = {{ uniform = [0.1, 10.0] }}

[[components]]
name = "iso"
kind = "template"
template = "iso"
norm = {{ uniform = [0.01, 3.0] }}

[[components]]
name = "gce"
kind = "template"
template = "blob"
norm = {{ uniform = [0.001, 2.0] }}
{_PS if point_sources else ""}
[inference]
guide = "normal"
num_steps = 200
learning_rate = 0.02
num_particles = 2
num_samples = 1000
checkpoint_every = 100
{inference}
"""


def write_config(tmp: pathlib.Path, **kw) -> pathlib.Path:
    data = make_tiny_data(tmp / "data")
    path = tmp / "tiny.toml"
    path.write_text(tiny_config(data, **kw))
    return path


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> pathlib.Path:
    return write_config(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------- settings


def test_inference_settings_precedence_and_errors():
    cfg = {"inference": {"num_steps": 10, "guide": "mvn", "num_samples_nuts": 77}}
    inf = inference_settings(cfg, {"guide": "bnaf", "seed": None})
    assert inf["num_steps"] == 10 and inf["guide"] == "bnaf"  # config < override
    assert inf["seed"] == 0 and inf["num_samples"] == 50_000  # package defaults
    assert inf["nuts_samples"] == 77 and "num_samples_nuts" not in inf  # old spelling
    with pytest.raises(C.ConfigError, match="num_step"):
        inference_settings({"inference": {"num_step": 10}})
    with pytest.raises(ValueError, match="unknown inference override"):
        inference_settings({}, {"temperature": 0.1})
    with pytest.raises(C.ConfigError, match="method"):
        inference_settings({"inference": {"method": "hmc"}})


def test_fiducial_config_inference_keys_are_known():
    inf = inference_settings(C.load_config("fiducial"))
    assert inf["num_samples"] == 50_000 and inf["guide"] == "iaf" and inf["num_particles"] == 8


# ----------------------------------------------------------------------------- config text


def test_packaged_configs_round_trip_through_toml_writer():
    for name in C.packaged_configs():
        cfg = C.load_config(name)
        plain = {k: v for k, v in cfg.items() if not k.startswith("_")}
        assert tomllib.loads(config_to_toml(cfg)) == plain, name


_scalars = st.one_of(
    st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.booleans(), st.text(max_size=8),
)
_values = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
_tables = st.dictionaries(st.text(max_size=6), _values, max_size=4)


@given(
    top=st.dictionaries(st.sampled_from(["a", "b c", "d.e"]), _scalars, max_size=3),
    tables=st.dictionaries(st.sampled_from(["data", "roi", "truth"]), _tables, max_size=3),
    arrays=st.lists(_tables, max_size=3),
)
@example(top={}, tables={}, arrays=[{"0\n": []}])  # a key ending in a newline (found by hypothesis)
@settings(max_examples=60, deadline=None)
def test_toml_writer_round_trips(top, tables, arrays):
    cfg = {**top, **tables}
    if arrays:
        cfg["components"] = arrays
    assert tomllib.loads(config_to_toml(cfg)) == cfg


def test_run_directory_config_is_the_config_used(tiny_cfg, tmp_path):
    # a config edited in Python is written out as edited, so the run can be rebuilt
    cfg = C.load_config(tiny_cfg)
    cfg["components"] = cfg["components"][:2]
    cfg["inference"]["num_steps"] = 20
    run_fit(cfg, tmp_path / "edited", progress=False)
    written = C.load_config(tmp_path / "edited" / "config.toml")
    assert [c["name"] for c in written["components"]] == ["dif", "iso"]
    assert written["_text"].startswith("# written by skymodel")
    # an unedited config keeps its own text (comments included)
    run_fit(tiny_cfg, tmp_path / "plain", progress=False, num_steps=20)
    assert (tmp_path / "plain" / "config.toml").read_text().startswith(tiny_cfg.read_text())


# ----------------------------------------------------------------------------- run dirs


@pytest.fixture(scope="module")
def svi_run(tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "svi"
    built, post = run_fit(tiny_cfg, out, progress=False, num_steps=200)
    return out, built, post


def test_svi_run_directory_holds_everything(svi_run):
    out, built, post = svi_run
    for name in ("config.toml", "run.json", "checkpoint.npz", "losses.npy", "guide_params.npz",
                 "posterior", "summary.txt"):
        assert (out / name).exists(), name
    info = read_run(out)
    assert info["status"] == "done" and info["method"] == "svi" and info["inference"]["num_steps"] == 200
    assert info["overrides"] == {"num_steps": 200}
    losses = np.load(out / "losses.npy")
    with np.load(out / "checkpoint.npz") as z:
        np.testing.assert_array_equal(z["losses"], losses)
    assert losses.shape == (200,) and np.all(np.isfinite(losses))
    assert post.num_samples == 1000 and post.method == "svi-normal"
    assert "# command-line overrides" in (out / "config.toml").read_text()
    # the saved guide rebuilds the same posterior draws (same seed -> identical samples)
    guide, params, meta = S.load_guide(built.sky, built.observation, out / "guide_params.npz")
    again = S.sample_guide(guide, params, built.sky, 1000, seed=1)
    for k in post.names:
        np.testing.assert_allclose(again[k], post[k], rtol=1e-12)
    assert meta["guide"] == "normal" and meta["sites"] == list(built.sky.free_parameters())
    # posterior near the truth the counts were drawn from (generous: 200 steps, 4 sigma)
    for k, t in TINY_TRUTH.items():
        m, s = post[k].mean(), post[k].std()
        assert abs(m - t) < 4 * s + 0.05 * t, (k, m, s, t)


def test_load_guide_refuses_another_model(svi_run, tmp_path):
    out, built, _ = svi_run
    other = SkyModel(built.sky.components[:2])
    obs = built.observation
    with pytest.raises(ValueError, match="fitted to sites"):
        S.load_guide(other, obs, out / "guide_params.npz")
    with pytest.raises(FileNotFoundError):
        S.load_guide(built.sky, obs, tmp_path / "nothing.npz")


def test_interrupt_then_resume_from_run_dir(tiny_cfg, tmp_path):
    out = tmp_path / "run"

    def interrupt(step, losses):
        if step == 100:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fit(tiny_cfg, out, progress=False, num_steps=300, callback=interrupt)
    assert read_run(out)["status"] == "interrupted"
    with np.load(out / "checkpoint.npz") as z:
        first = np.array(z["losses"])
        assert json.loads(str(z["meta"]))["step"] == 100
    assert first.shape == (100,)
    spent = read_run(out)["wall_time"]
    assert spent > 0
    # resume from the directory alone: config and overrides (num_steps=300) come from it
    _, post = run_fit(None, out, resume=True, progress=False)
    losses = np.load(out / "losses.npy")
    assert losses.shape == (300,)
    np.testing.assert_array_equal(losses[:100], first)
    assert read_run(out)["status"] == "done" and post.num_samples == 1000
    # the run's wall time is the total of both sessions
    assert read_run(out)["wall_time"] == pytest.approx(post.wall_time) and post.wall_time > spent


def test_run_fit_argument_errors(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="config is needed"):
        run_fit(None, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a skymodel run"):
        run_fit(None, tmp_path / "x", resume=True)
    with pytest.raises(ValueError, match="neutra"):
        run_fit(tiny_cfg, tmp_path / "y", method="svi", neutra=tmp_path)
    with pytest.raises(ValueError, match="resume applies to SVI and nested"):
        run_fit(tiny_cfg, tmp_path / "y", method="nuts", resume=True)
    with pytest.raises(ValueError, match="unknown method"):
        run_fit(tiny_cfg, tmp_path / "y", method="hmc")


# ----------------------------------------------------------------------------- tempering


def test_temperature_schedule_values():
    s = np.array([0, 50, 100, 150])
    np.testing.assert_allclose(S.temperature_schedule(s, 0.01, 100, "geometric"), [0.01, 0.1, 1, 1])
    np.testing.assert_allclose(S.temperature_schedule(s, 0.2, 100, "linear"), [0.2, 0.6, 1, 1])
    np.testing.assert_array_equal(S.temperature_schedule(s, 0.2, 0), np.ones(4))
    with pytest.raises(ValueError, match="beta0"):
        S.temperature_schedule(s, 0.0, 10)
    with pytest.raises(ValueError, match="beta0"):
        S.temperature_schedule(s, 1.5, 10)
    with pytest.raises(ValueError, match="temper_steps"):
        S.temperature_schedule(s, 0.5, -1)
    with pytest.raises(ValueError, match="temper_schedule"):
        S.temperature_schedule(s, 0.5, 10, "cubic")


def _small_problem(seed=0):
    nside = 8
    roi = ROI.from_masks(nside, np.zeros(12 * nside**2, bool))
    b = np.asarray(roi.b)
    t = np.stack([np.ones_like(b), np.exp(-np.abs(b) / 0.3)])
    comps = [PoissonComponent(n, TemplateMap(ti), Param(None, Uniform(0.01, 20.0)), normalise=False)
             for n, ti in zip(("iso", "disk"), t)]
    sky = SkyModel(comps)
    truth = np.array([2.0, 3.0])
    counts = np.random.default_rng(seed).poisson(truth @ t).astype(float)
    return sky, Observation(roi, counts), t, counts


def test_tempering_scales_only_the_likelihood():
    sky, obs, t, counts = _small_problem()
    model = S.tempered_model(S._model_fn(sky, obs))
    guide = AutoDelta(model, init_loc_fn=S.init_strategy({"iso.norm": 1.7, "disk.norm": 2.5}, sky))
    svi = SVI(model, guide, S._optimizer(1e-3, None), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), 1.0)
    assert model.seen  # the likelihood site was found
    values = np.array([1.7, 2.5])
    loglike = scipy.stats.poisson.logpmf(counts, values @ t).sum()  # independent
    l1 = float(svi.evaluate(state, 1.0))
    for beta in (0.5, 0.01):
        lb = float(svi.evaluate(state, beta))
        # -ELBO(beta) - (-ELBO(1)) = (1 - beta) log L; priors and guide unchanged
        np.testing.assert_allclose(lb - l1, (1 - beta) * loglike, rtol=1e-9)


@pytest.mark.slow
def test_tempered_fit_reaches_the_untempered_optimum():
    sky, obs, t, counts = _small_problem(1)
    n = 800
    kw = dict(guide="normal", num_steps=n, num_particles=4, progress=False, seed=3,
              learning_rate=optax.cosine_decay_schedule(0.05, n, alpha=0.02))
    plain = S.run_svi(sky, obs, **kw)
    temp = S.run_svi(sky, obs, beta0=1e-3, temper_steps=300, **kw)
    assert temp.config["temper_steps"] == 300 and temp.config["beta0"] == 1e-3
    # during tempering the loss (-tempered ELBO) is far below the final one
    assert temp.losses[0] < 0.1 * temp.losses[-1]
    mle = scipy.optimize.minimize(lambda x: -scipy.stats.poisson.logpmf(counts, x @ t).sum(),
                                  [1.0, 1.0], bounds=[(0.01, 20)] * 2).x
    for res in (plain, temp):
        post = res.posterior(4000, seed=0)
        got = np.array([post["iso.norm"].mean(), post["disk.norm"].mean()])
        sd = np.array([post["iso.norm"].std(), post["disk.norm"].std()])
        assert np.all(np.abs(got - mle) < 0.3 * sd), (got, mle, sd)


def test_tempering_checkpoint_refuses_other_schedule(tmp_path):
    sky, obs, _, _ = _small_problem()
    kw = dict(guide="normal", num_steps=100, progress=False, checkpoint_path=tmp_path / "c.npz",
              checkpoint_every=50, learning_rate=0.01)
    S.run_svi(sky, obs, beta0=0.1, temper_steps=50, **kw)
    with pytest.raises(ValueError, match="beta0"):
        S.run_svi(sky, obs, beta0=0.2, temper_steps=50, resume=True, **kw)


# ----------------------------------------------------------------------------- guides


def _bnaf_fit(steps):
    sky, obs, t, counts = _small_problem(2)
    res = S.run_svi(sky, obs, guide="bnaf", num_flows=1, hidden_factors=(4, 4), num_steps=steps,
                    learning_rate=0.01, num_particles=2, progress=False, seed=1)
    return sky, obs, t, counts, res


@pytest.mark.slow
def test_bnaf_guide_fits():
    sky, obs, t, counts, res = _bnaf_fit(600)
    post = res.posterior(3000, seed=2)
    mle, sig = _laplace(t, counts)
    got = np.array([np.median(post["iso.norm"]), np.median(post["disk.norm"])])
    sd = np.array([post["iso.norm"].std(), post["disk.norm"].std()])
    assert np.all(np.abs(got - mle) < 1.0 * sig), (got, mle, sig)
    np.testing.assert_allclose(sd, sig, rtol=0.3)


def test_make_guide_bnaf():
    sky, obs, _, _ = _small_problem()
    g = S.make_guide(S._model_fn(sky, obs), "bnaf", num_flows=2, hidden_factors=(3, 5))
    assert isinstance(g, AutoBNAFNormal) and g.num_flows == 2 and list(g._hidden_factors) == [3, 5]


@pytest.mark.slow
def test_bnaf_guide_round_trips(tmp_path):
    sky, obs, t, counts, res = _bnaf_fit(50)
    assert isinstance(res.guide, AutoBNAFNormal)
    assert res.config["hidden_factors"] == [4, 4] and res.config["hidden_dims"] is None
    post = res.posterior(3000, seed=2)
    path = S.save_guide_params(tmp_path / "g.npz", res)
    g, params, meta = S.load_guide(sky, obs, path)
    assert isinstance(g, AutoBNAFNormal) and meta["hidden_factors"] == [4, 4]
    again = S.sample_guide(g, params, sky, 3000, seed=2)
    for k in post.names:
        np.testing.assert_allclose(again[k], post[k], rtol=1e-10)


def test_make_guide_rejects_unknown():
    sky, obs, _, _ = _small_problem()
    with pytest.raises(ValueError, match="bnaf"):
        S.make_guide(S._model_fn(sky, obs), "maf")


# ----------------------------------------------------------------------------- NeuTra


def _laplace(t, counts):
    def nll(x):
        return -scipy.stats.poisson.logpmf(counts, x @ t).sum()

    x = scipy.optimize.minimize(nll, [1.0, 1.0], bounds=[(0.01, 20)] * 2).x
    mu = x @ t
    hess = (t * (counts / mu**2)) @ t.T
    return x, np.sqrt(np.diag(np.linalg.inv(hess)))


def test_neutra_nuts_matches_laplace():
    from skymodel.inference.nuts import format_diagnostics, run_nuts

    sky, obs, t, counts = _small_problem(3)
    res = S.run_svi(sky, obs, guide="mvn", num_steps=400, num_particles=4, progress=False, seed=0,
                    learning_rate=optax.cosine_decay_schedule(0.05, 400, alpha=0.02))
    post = run_nuts(sky, obs, num_warmup=150, num_samples=300, num_chains=2, progress=False,
                    neutra=(res.guide, res.params), seed=1)
    assert post.method == "nuts-neutra" and post.diagnostics["neutra"] is True
    x = np.stack([post["iso.norm"], post["disk.norm"]], axis=1)
    mle, sig = _laplace(t, counts)
    assert np.all(np.abs(x.mean(0) - mle) < 0.3 * sig), (x.mean(0), mle, sig)
    np.testing.assert_allclose(x.std(0), sig, rtol=0.25)
    d = post.diagnostics
    assert d["divergences"] == 0 and all(float(v) < 1.05 for v in d["r_hat"].values())
    text = format_diagnostics(d)
    assert "NeuTra" in text and "max R-hat" in text and "divergences: 0" in text
    with pytest.raises(ValueError, match="init"):
        run_nuts(sky, obs, num_warmup=5, num_samples=5, neutra=(res.guide, res.params), init="map")
    normal = S.run_svi(sky, obs, guide="normal", num_steps=10, progress=False)
    with pytest.raises(ValueError, match="AutoContinuous"):
        run_nuts(sky, obs, num_warmup=5, num_samples=5, neutra=(normal.guide, normal.params))


@pytest.mark.slow
def test_nuts_neutra_run_from_svi_run_dir(svi_run, tiny_cfg, tmp_path):
    # the fixture's run used the mean-field guide, which NeuTra cannot use; fit an mvn one
    src = tmp_path / "svi_mvn"
    run_fit(tiny_cfg, src, progress=False, guide="mvn", num_steps=300)
    _, post = run_fit(tiny_cfg, tmp_path / "nuts", method="nuts", neutra=src, progress=False,
                      num_warmup=150, nuts_samples=200, num_chains=2)
    d = json.loads((tmp_path / "nuts" / "diagnostics.json").read_text())
    assert d["neutra"] is True and d["divergences"] == 0
    assert "r_hat" in (tmp_path / "nuts" / "summary.txt").read_text()
    assert post.num_samples == 400
    with pytest.raises(ValueError, match="AutoContinuous"):
        run_fit(tiny_cfg, tmp_path / "nuts2", method="nuts", neutra=svi_run[0], progress=False,
                num_warmup=5, nuts_samples=5, num_chains=1)


def test_nested_run_directory_agrees_with_nuts(tiny_cfg, tmp_path):
    """method = "nested" from a config: posterior + evidence saved in the run directory; the
    medians agree with an independent NUTS run of the same config within the posterior
    widths; a finished run resumed from its checkpoint gives the same evidence."""
    _, post = run_fit(tiny_cfg, tmp_path / "ns", method="nested", progress=False, nlive=60,
                      dlogz=0.5, nested_backend="dynesty")
    assert (tmp_path / "ns" / "nested_checkpoint.pkl").exists()
    assert json.loads((tmp_path / "ns" / "run.json").read_text())["status"] == "done"
    assert np.isfinite(post.log_evidence) and post.log_evidence_err > 0
    _, ref = run_fit(tiny_cfg, tmp_path / "nuts", method="nuts", progress=False,
                     num_warmup=200, nuts_samples=400, num_chains=1)
    for k, v in ref.samples.items():
        v = np.asarray(v)
        width = np.percentile(v, 84) - np.percentile(v, 16)
        assert abs(np.median(post.samples[k]) - np.median(v)) < 0.5 * width, k
    _, again = run_fit(None, tmp_path / "ns", resume=True, progress=False)
    assert again.log_evidence == pytest.approx(post.log_evidence, abs=3 * post.log_evidence_err)


@pytest.mark.slow
def test_nptf_run_and_report(tmp_path):
    from skymodel.analysis import report

    cfg = write_config(tmp_path, point_sources=True)
    out = tmp_path / "run"
    _, post = run_fit(cfg, out, progress=False, guide="mvn", num_steps=200)
    assert np.all(np.isfinite(np.load(out / "losses.npy")))
    rep = report(out, num=100)
    assert "gce_ps" in rep.bands and rep.gce_ps_share is not None
    assert (out / "report" / "scf_gce_ps.png").exists()


@pytest.mark.slow
@pytest.mark.data
def test_fiducial_run_starts_and_checkpoints(tmp_path, fermi_dir, monkeypatch):
    monkeypatch.setenv("SKYMODEL_DATA", str(fermi_dir.parent))
    out = tmp_path / "fiducial"
    seen = []
    run_fit("fiducial", out, progress=False, num_steps=4, checkpoint_every=2, chunk_size=2,
            num_particles=1, num_samples=100, callback=lambda step, l: seen.append(step))
    assert seen == [2, 4]
    with np.load(out / "checkpoint.npz") as z:
        assert json.loads(str(z["meta"]))["step"] == 4
    assert read_run(out)["status"] == "done"
