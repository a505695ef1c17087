"""Test configuration: float64, strict dtype promotion off-by-default checks, runtime
shape checking of skymodel's annotated functions (jaxtyping + beartype), data fixtures."""

import os
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

from jaxtyping import install_import_hook  # noqa: E402

# PEP 484's numeric tower: an int is a valid `float` argument (Uniform(0, 2)), as every
# static type checker treats it; beartype needs to be told.
with install_import_hook(
    "skymodel", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
):
    import skymodel  # noqa: F401,E402

import pytest  # noqa: E402


def _data_root() -> pathlib.Path | None:
    root = os.environ.get("SKYMODEL_DATA")
    if not root:
        return None
    p = pathlib.Path(root)
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    root = _data_root()
    if root is None:
        pytest.skip("Fermi data not available: set SKYMODEL_DATA to the shared data directory")
    return root


@pytest.fixture(scope="session")
def fermi_dir(data_root) -> pathlib.Path:
    d = data_root / "fermi-gc"
    if not d.is_dir():
        pytest.skip(f"{d} not found (SKYMODEL_DATA={data_root})")
    return d


@pytest.fixture(scope="session")
def nptfit_dir(data_root) -> pathlib.Path:
    d = data_root / "nptfit-example"
    if not d.is_dir():
        pytest.skip(f"{d} not found (SKYMODEL_DATA={data_root})")
    return d
