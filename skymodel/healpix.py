"""HEALPix pixel geometry and masks (numpy + healpy, load-time only).

Conventions (the data files' and NPTFit's):
- maps are full-sky, RING ordering, Galactic coordinates, length 12 nside^2;
- longitude l in (-pi, pi], latitude b in [-pi/2, pi/2], radians, unless a name ends in
  `_deg`;
- a mask is a boolean full-sky map with True = MASKED (excluded from the analysis);
- a pixel belongs to a region when its *centre* does (as healpy's `query_disc` /
  `query_strip` with `inclusive=False`).
"""

from __future__ import annotations

import functools

import healpy as hp
import numpy as np
from scipy.spatial import cKDTree

from skymodel._types import ArrayLike, Bool, Float

NsideLike = int | np.integer
SkyMask = Bool[np.ndarray, " nsky"]


def check_nside(nside) -> int:
    """Return `nside` as an int, or raise ValueError unless it is a positive power of 2."""
    if isinstance(nside, bool) or not isinstance(nside, (int, np.integer)):
        raise ValueError(f"nside must be an integer power of 2, got {nside!r}")
    if not hp.isnsideok(int(nside), nest=True):
        raise ValueError(f"nside must be a positive power of 2, got {nside!r}")
    return int(nside)


def npix_to_nside(npix: int, name: str = "map") -> int:
    """nside of a full-sky map with `npix` pixels; ValueError (naming `name`) if none."""
    if npix < 12 or not hp.isnpixok(npix) or not hp.isnsideok(hp.npix2nside(npix), nest=True):
        raise ValueError(
            f"{name} has {npix} pixels, which is not 12*nside**2 for any power-of-2 nside "
            "(expected a full-sky HEALPix map)"
        )
    return int(hp.npix2nside(npix))


def _pixels(nside: int, pixels) -> np.ndarray:
    npix = hp.nside2npix(nside)
    if pixels is None:
        return np.arange(npix)
    p = np.asarray(pixels)
    if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"pixels must be a 1-D integer array, got shape {p.shape} dtype {p.dtype}")
    if p.size and (p.min() < 0 or p.max() >= npix):
        raise ValueError(f"pixels must lie in [0, {npix}) for nside {nside}")
    return p


def pixel_lb(
    nside: NsideLike, pixels: ArrayLike | None = None
) -> tuple[Float[np.ndarray, " n"], Float[np.ndarray, " n"]]:
    """Galactic (l, b) of pixel centres, radians; l in (-pi, pi]. RING ordering.

    pixels: (n,) pixel indices; None = all 12 nside^2 pixels.
    """
    nside = check_nside(nside)
    theta, phi = hp.pix2ang(nside, _pixels(nside, pixels))
    b = np.pi / 2 - theta
    l = np.where(phi > np.pi, phi - 2 * np.pi, phi)
    return np.asarray(l, dtype=np.float64), np.asarray(b, dtype=np.float64)


def _lb_vec(l_rad, b_rad) -> np.ndarray:
    """Unit vectors (..., 3) of Galactic directions (healpy's x, y, z convention)."""
    cb = np.cos(b_rad)
    return np.stack([cb * np.cos(l_rad), cb * np.sin(l_rad), np.sin(b_rad)], axis=-1)


def angular_distance(
    nside: NsideLike, l0: float, b0: float, pixels: ArrayLike | None = None
) -> Float[np.ndarray, " n"]:
    """Great-circle distance (radians, in [0, pi]) from pixel centres to (l0, b0) (radians).

    Uses atan2(|v x v0|, v . v0), accurate at all separations.
    """
    nside = check_nside(nside)
    if not (np.isfinite(l0) and np.isfinite(b0)) or abs(b0) > np.pi / 2 + 1e-12:
        raise ValueError(f"need finite l0 and |b0| <= pi/2 (radians), got l0={l0}, b0={b0}")
    v = np.stack(hp.pix2vec(nside, _pixels(nside, pixels)), axis=-1)
    v0 = _lb_vec(float(l0), float(b0))
    cross = np.linalg.norm(np.cross(v, v0), axis=-1)
    return np.arctan2(cross, v @ v0).astype(np.float64)


def _finite_deg(name: str, value) -> float:
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def ring_mask(
    nside: NsideLike,
    outer_deg: float,
    inner_deg: float = 0.0,
    l_deg: float = 0.0,
    b_deg: float = 0.0,
) -> SkyMask:
    """Mask everything OUTSIDE the annulus inner_deg <= r <= outer_deg around (l, b).

    With the defaults this keeps the disc r <= outer_deg around the Galactic Centre.
    A radius >= 180 deg masks nothing.
    """
    nside = check_nside(nside)
    outer = _finite_deg("outer_deg", outer_deg)
    inner = _finite_deg("inner_deg", inner_deg)
    if inner < 0 or outer < inner:
        raise ValueError(f"need 0 <= inner_deg <= outer_deg, got inner={inner}, outer={outer}")
    b = _finite_deg("b_deg", b_deg)
    if abs(b) > 90:
        raise ValueError(f"b_deg must lie in [-90, 90], got {b}")
    r = np.degrees(angular_distance(nside, np.radians(_finite_deg("l_deg", l_deg)), np.radians(b)))
    return (r > outer) | (r < inner)


def band_mask(nside: NsideLike, b_deg: float) -> SkyMask:
    """Mask the Galactic plane band |b| < b_deg (b_deg >= 0; 0 masks nothing)."""
    nside = check_nside(nside)
    bd = _finite_deg("b_deg", b_deg)
    if bd < 0:
        raise ValueError(f"b_deg must be >= 0, got {bd}")
    _, b = pixel_lb(nside)
    return np.abs(np.degrees(b)) < bd


def lat_mask(nside: NsideLike, b_min_deg: float, b_max_deg: float) -> SkyMask:
    """Mask every pixel whose latitude lies outside [b_min_deg, b_max_deg]."""
    nside = check_nside(nside)
    lo = _finite_deg("b_min_deg", b_min_deg)
    hi = _finite_deg("b_max_deg", b_max_deg)
    if not -90 <= lo <= hi <= 90:
        raise ValueError(f"need -90 <= b_min_deg <= b_max_deg <= 90, got {lo}, {hi}")
    _, b = pixel_lb(nside)
    b = np.degrees(b)
    return (b < lo) | (b > hi)


def lon_mask(nside: NsideLike, l_min_deg: float, l_max_deg: float) -> SkyMask:
    """Mask every pixel whose longitude lies outside [l_min_deg, l_max_deg].

    Longitudes are taken modulo 360, so (-30, 30) and (330, 390) are the same range;
    a range of width >= 360 masks nothing. Needs l_min_deg <= l_max_deg.
    """
    nside = check_nside(nside)
    lo = _finite_deg("l_min_deg", l_min_deg)
    hi = _finite_deg("l_max_deg", l_max_deg)
    if hi < lo:
        raise ValueError(f"need l_min_deg <= l_max_deg, got {lo}, {hi}")
    if hi - lo >= 360:
        return np.zeros(hp.nside2npix(nside), dtype=bool)
    l, _ = pixel_lb(nside)
    offset = np.mod(np.degrees(l) - lo, 360.0)
    return offset > hi - lo


@functools.lru_cache(maxsize=4)
def _pixel_tree(nside: int) -> cKDTree:
    return cKDTree(np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))), axis=-1))


def point_mask(
    nside: NsideLike, l_deg: ArrayLike, b_deg: ArrayLike, radius_deg: ArrayLike
) -> SkyMask:
    """Mask discs of radius `radius_deg` around the points (l_deg, b_deg).

    l_deg, b_deg: scalars or (n,) arrays (degrees); radius_deg: scalar or (n,) array,
    broadcast against them. A pixel is masked when its centre is within a radius of any
    point (a KD-tree on pixel-centre unit vectors, chord distance 2 sin(r/2)).
    """
    nside = check_nside(nside)
    l, b, r = np.broadcast_arrays(
        np.atleast_1d(np.asarray(l_deg, dtype=np.float64)),
        np.atleast_1d(np.asarray(b_deg, dtype=np.float64)),
        np.atleast_1d(np.asarray(radius_deg, dtype=np.float64)),
    )
    if l.ndim != 1:
        raise ValueError(f"l_deg, b_deg, radius_deg must be scalars or 1-D, got shape {l.shape}")
    if not (np.isfinite(l).all() and np.isfinite(b).all() and np.isfinite(r).all()):
        raise ValueError("point_mask: l_deg, b_deg and radius_deg must be finite")
    if (np.abs(b) > 90).any():
        raise ValueError("point_mask: b_deg must lie in [-90, 90]")
    if (r < 0).any():
        raise ValueError("point_mask: radius_deg must be >= 0")
    mask = np.zeros(hp.nside2npix(nside), dtype=bool)
    if l.size == 0:
        return mask
    centres = _lb_vec(np.radians(l), np.radians(b))
    chord = 2 * np.sin(np.radians(np.minimum(r, 180.0)) / 2)
    hits = _pixel_tree(nside).query_ball_point(centres, chord, return_sorted=False)
    idx = [np.asarray(h, dtype=np.int64) for h in hits if len(h)]
    if idx:
        mask[np.concatenate(idx)] = True
    return mask


def validate_mask(mask: ArrayLike, nside: NsideLike, name: str = "mask") -> SkyMask:
    """Return `mask` as a boolean full-sky map, or raise ValueError naming `name`.

    Accepts bool or numeric arrays holding only 0/1 (1 = masked).
    """
    nside = check_nside(nside)
    m = np.asarray(mask)
    npix = hp.nside2npix(nside)
    if m.shape != (npix,):
        raise ValueError(
            f"{name} has shape {m.shape}, expected ({npix},) (full sky, nside {nside})"
        )
    if m.dtype == bool:
        return m.copy()
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or 0/1, got dtype {m.dtype}")
    bad = ~np.isin(m, (0, 1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must contain only 0/1 (1 = masked); {int(bad.sum())} pixels hold other "
            f"values (first: pixel {first} = {m[first]!r})"
        )
    return m.astype(bool)


def combine_masks(*masks: ArrayLike) -> SkyMask:
    """Logical OR of full-sky masks (a pixel masked in any is masked)."""
    if not masks:
        raise ValueError("combine_masks needs at least one mask")
    first = np.asarray(masks[0])
    npix = first.shape[0] if first.ndim == 1 else -1
    nside = npix_to_nside(npix, "mask 0") if npix > 0 else None
    if nside is None:
        raise ValueError(f"mask 0 must be a 1-D full-sky map, got shape {first.shape}")
    out = np.zeros(npix, dtype=bool)
    for i, m in enumerate(masks):
        out |= validate_mask(m, nside, f"mask {i}")
    return out


def fiducial_mask(
    nside: NsideLike,
    source_mask: ArrayLike | None = None,
    radius_deg: float = 25.0,
    band_deg: float = 2.0,
) -> SkyMask:
    """The paper's analysis mask: outside r <= radius_deg of the GC, |b| < band_deg, and
    `source_mask` (full-sky, True = masked) when given."""
    nside = check_nside(nside)
    parts = [ring_mask(nside, radius_deg), band_mask(nside, band_deg)]
    if source_mask is not None:
        parts.append(validate_mask(source_mask, nside, "source_mask"))
    return combine_masks(*parts)


def cartesian_view(
    sky_map: ArrayLike,
    lon_range: tuple[float, float] = (30.0, -30.0),
    lat_range: tuple[float, float] = (-30.0, 30.0),
    npix: int | tuple[int, int] = 200,
    interpolate: bool = False,
) -> Float[np.ndarray, "nlat nlon"]:
    """Cartesian (plate carree) image of a region of a full-sky RING map, for plots.

    lon_range, lat_range: (first, last) edges in degrees; the image's column j samples
    longitude linearly from lon_range[0] to lon_range[1] at pixel centres, row i latitude
    from lat_range[0] to lat_range[1] (the default lon_range runs from +30 to -30, the
    sky-as-seen convention; show with `imshow(img, origin="lower", extent=lon_range +
    lat_range)`). npix: image size, int (square) or (nlon, nlat). interpolate: bilinear
    (hp.get_interp_val) instead of the value of the pixel containing each point.
    Returns (nlat, nlon) float64.
    """
    m = np.asarray(sky_map, dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"sky_map must be a 1-D full-sky map, got shape {m.shape}")
    nside = npix_to_nside(m.shape[0], "sky_map")
    nlon, nlat = (npix, npix) if isinstance(npix, (int, np.integer)) else npix
    if nlon < 1 or nlat < 1:
        raise ValueError(f"npix must be positive, got {npix!r}")
    (l0, l1), (b0, b1) = lon_range, lat_range
    if not -90 <= min(b0, b1) <= max(b0, b1) <= 90:
        raise ValueError(f"lat_range must lie in [-90, 90], got {lat_range}")
    lon = l0 + (np.arange(nlon) + 0.5) * (l1 - l0) / nlon
    lat = b0 + (np.arange(nlat) + 0.5) * (b1 - b0) / nlat
    L, B = np.meshgrid(lon, lat)
    if interpolate:
        return hp.get_interp_val(m, L, B, lonlat=True).astype(np.float64)
    return m[hp.ang2pix(nside, L, B, lonlat=True)]


__all__ = [
    "angular_distance",
    "band_mask",
    "cartesian_view",
    "check_nside",
    "combine_masks",
    "fiducial_mask",
    "lat_mask",
    "lon_mask",
    "npix_to_nside",
    "pixel_lb",
    "point_mask",
    "ring_mask",
    "validate_mask",
]
