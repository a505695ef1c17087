"""skymodel: differentiable inference on the gamma-ray sky."""

import jax as _jax

# The likelihood needs float64 (see skymodel.likelihood); enable it on import.
_jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
