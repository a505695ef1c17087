"""Where skymodel keeps what it computes once: reprojected maps, PSF-correction tables and
compiled XLA programs.

The directory is $SKYMODEL_CACHE, else ~/.cache/skymodel. `enable_compilation_cache()`
turns on JAX's persistent compilation cache under it (subdirectory `jax/`): the first fit
of a model compiles its likelihood and gradient (tens of seconds to minutes on a CPU for
NPTF models); later processes fitting a model of the same structure and shapes load the
compiled program from disk instead. The `skymodel` command enables it; set
SKYMODEL_NO_COMPILATION_CACHE=1 to turn that off.
"""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """$SKYMODEL_CACHE or ~/.cache/skymodel (not created here)."""
    env = os.environ.get("SKYMODEL_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "skymodel"


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_time_s: float = 1.0) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache (default: cache_dir() / "jax").

    Programs that took at least `min_compile_time_s` to compile are stored. Returns the
    directory, or None when SKYMODEL_NO_COMPILATION_CACHE=1 (nothing is changed then).
    Affects the whole process (it is a JAX setting), like skymodel's float64 default.
    """
    if os.environ.get("SKYMODEL_NO_COMPILATION_CACHE", "0") not in ("", "0"):
        return None
    import jax

    target = pathlib.Path(path) if path is not None else cache_dir() / "jax"
    target.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target


__all__ = ["cache_dir", "enable_compilation_cache"]
