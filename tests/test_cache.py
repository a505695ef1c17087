"""The persistent compilation cache (skymodel.cache): run in subprocesses, because it is a
process-wide JAX setting."""

import os
import pathlib
import subprocess
import sys

SCRIPT = """
import sys, jax, jax.numpy as jnp
import skymodel
d = skymodel.enable_compilation_cache(sys.argv[1], min_compile_time_s=0.0)
print("DIR", d)
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) ** 2) + jnp.prod(jnp.cos(x)))
print(float(f(jnp.arange(5.0))))
"""


def _run(cache: pathlib.Path, **env):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_compilation_cache_stores_programs(tmp_path):
    out = _run(tmp_path / "jax")
    assert out.returncode == 0, out.stderr
    assert f"DIR {tmp_path / 'jax'}" in out.stdout
    assert any((tmp_path / "jax").iterdir()), "no compiled program was stored"


def test_compilation_cache_can_be_turned_off(tmp_path):
    out = _run(tmp_path / "jax", SKYMODEL_NO_COMPILATION_CACHE="1")
    assert out.returncode == 0, out.stderr
    assert "DIR None" in out.stdout
    assert not (tmp_path / "jax").exists()
