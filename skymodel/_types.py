"""Shape aliases used across skymodel (jaxtyping).

Dimension names:
  npix     pixels of the ROI's analysis region (the pixels the likelihood sums over)
  nmodel   pixels on which morphologies are evaluated (analysis + normalisation region)
  nsky     all pixels of a HEALPix map (12 nside^2)
  npop     point-source populations
  nregion  exposure regions
  nf       entries of a PSF-correction table
  nm       generating-function orders m = 1..m_max
"""

from jaxtyping import Array, ArrayLike, Bool, Float, Int, Real

SkyMap = Float[Array, " nsky"]
PixelValues = Float[Array, " npix"]
ModelPixelValues = Float[Array, " nmodel"]
Counts = Real[Array, " npix"]
Scalar = Float[Array, ""]

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Counts",
    "Float",
    "Int",
    "ModelPixelValues",
    "PixelValues",
    "Real",
    "Scalar",
    "SkyMap",
]
