"""Where skymodel keeps what it computes once (reprojected bulge maps, PSF-correction
tables): $SKYMODEL_CACHE, else ~/.cache/skymodel.

(JAX's persistent compilation cache would not help here yet: XLA programs that contain
host callbacks are not cached, and the likelihood's runtime input checks,
`equinox.error_if`, are host callbacks.)
"""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """$SKYMODEL_CACHE or ~/.cache/skymodel (not created here)."""
    env = os.environ.get("SKYMODEL_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "skymodel"


__all__ = ["cache_dir"]
