"""The `skymodel` command: option parsing, fit -> report through `cli.main`, error
messages and exit codes, and (slow) Ctrl-C of a real `skymodel fit` process followed by
`--resume`, and NeuTra NUTS from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from skymodel import cli
from skymodel.runs import read_run
from test_runs import write_config


def test_fit_options_become_inference_overrides():
    args = cli.build_parser().parse_args([
        "fit", "--config", "demo", "--guide", "bnaf", "--steps", "7", "--samples", "9", "--lr", "0.01",
        "--particles", "3", "--flows", "2", "--hidden", "4,6", "--beta0", "0.01", "--temper-steps", "50",
        "--temper-schedule", "linear", "--checkpoint-every", "5", "--warmup", "11", "--nuts-samples", "12",
        "--chains", "2", "--lr-schedule", "cosine",
    ])
    assert cli._overrides(args) == {
        "guide": "bnaf", "num_steps": 7, "num_samples": 9, "learning_rate": 0.01, "num_particles": 3,
        "num_flows": 2, "hidden_dims": [4, 6], "hidden_factors": [4, 6], "beta0": 0.01,
        "temper_steps": 50, "temper_schedule": "linear", "checkpoint_every": 5, "num_warmup": 11,
        "nuts_samples": 12, "num_chains": 2, "lr_schedule": "cosine",
    }
    assert cli._overrides(cli.build_parser().parse_args(["fit", "--config", "x"])) == {}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "--guide", "maf"])


def test_fit_then_report(tmp_path, capsys):
    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["fit", "--config", str(cfg), "--out", str(out), "--steps", "150", "--samples", "500",
                   "--beta0", "0.1", "--temper-steps", "50", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "svi-normal: 500 samples" in text and f"skymodel report {out}" in text
    info = read_run(out)
    assert info["status"] == "done" and info["inference"]["beta0"] == 0.1
    with np.load(out / "checkpoint.npz") as z:
        meta = json.loads(str(z["meta"]))
    assert meta["temper_steps"] == 50 and meta["step"] == 150
    rc = cli.main(["report", str(out), "--num", "100", "--smooth", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Flux fractions" in text and "wrote" in text
    for name in ("summary.txt", "flux_fractions.png", "residuals.png", "loss.png", "corner_overview.png"):
        assert (out / "report" / name).exists(), name


def test_errors_name_the_problem(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no saved posterior" in capsys.readouterr().err
    assert cli.main(["fit", "--steps", "3"]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert cli.main(["fit", "--config", "no-such-config"]) == 2
    assert "not found" in capsys.readouterr().err
    cfg = write_config(tmp_path, inference="num_step = 3")
    assert cli.main(["fit", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "unknown key(s) ['num_step']" in capsys.readouterr().err
    assert cli.main(["fit", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "not a skymodel run directory" in capsys.readouterr().err


def _skymodel(*args, env=None):
    return [sys.executable, "-m", "skymodel", *args]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_continues(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen(
        _skymodel("fit", "--config", str(cfg), "--out", str(out), "--steps", "200000",
                  "--checkpoint-every", "100", "--no-progress"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        t0 = time.time()
        while not (out / "checkpoint.npz").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 300, "no checkpoint after 300 s"
            time.sleep(0.5)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert read_run(out)["status"] == "interrupted"
    with np.load(out / "checkpoint.npz") as z:
        step = json.loads(str(z["meta"]))["step"]
        first = np.array(z["losses"])
    assert step >= 100 and first.shape == (step,)
    # resume with fewer total steps than planned: continue to step + 200 and finish
    res = subprocess.run(_skymodel("fit", "--out", str(out), "--resume", "--steps", str(step + 200),
                                   "--samples", "300", "--no-progress"),
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    losses = np.load(out / "losses.npy")
    assert losses.shape == (step + 200,)
    np.testing.assert_array_equal(losses[:step], first)
    assert read_run(out)["status"] == "done"


@pytest.mark.slow
def test_nuts_neutra_from_the_command_line(tmp_path, capsys):
    cfg = write_config(tmp_path)
    svi = tmp_path / "svi"
    assert cli.main(["fit", "--config", str(cfg), "--out", str(svi), "--guide", "mvn", "--steps", "300",
                     "--no-progress"]) == 0
    nuts = tmp_path / "nuts"
    assert cli.main(["fit", "--config", str(cfg), "--out", str(nuts), "--method", "nuts", "--neutra", str(svi),
                     "--warmup", "150", "--nuts-samples", "200", "--chains", "2"]) == 0
    out = capsys.readouterr().out
    assert "NeuTra" in out and "divergences" in out and "r_hat" in out
    assert (nuts / "diagnostics.txt").exists()
    assert cli.main(["report", str(nuts), "--compare", str(svi), "--num", "100"]) == 0
    assert "Comparison with" in (nuts / "report" / "summary.txt").read_text()
