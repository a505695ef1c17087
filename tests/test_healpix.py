"""Pixel geometry and masks, against healpy's own queries (query_disc / query_strip with
inclusive=False), astropy's angular separations, and brute force."""

import healpy as hp
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from hypothesis import given, settings
from hypothesis import strategies as st

from skymodel import healpix as H

NSIDE = 16
NPIX = hp.nside2npix(NSIDE)
EDGE = 1e-9  # radians: pixel centres this close to a boundary may go either way

lons = st.floats(-180.0, 180.0, allow_nan=False, allow_subnormal=False)
lats = st.floats(-90.0, 90.0, allow_nan=False, allow_subnormal=False)
radii = st.floats(0.5, 179.0, allow_nan=False)
fast = settings(max_examples=40, deadline=None)


def _from_pixels(pixels, npix=NPIX):
    m = np.zeros(npix, dtype=bool)
    m[pixels] = True
    return m


def _dist_deg(l0, b0, nside=NSIDE):
    """Independent distances: astropy SkyCoord.separation (Vincenty formula)."""
    lon, lat = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), lonlat=True)
    c = SkyCoord(lon * u.deg, lat * u.deg, frame="galactic")
    return c.separation(SkyCoord(l0 * u.deg, b0 * u.deg, frame="galactic")).deg


def _agree_off_edge(a, b, dist, edge):
    """a == b except where |dist - edge| < EDGE (pixels on the boundary)."""
    off = np.abs(np.radians(dist - edge)) > EDGE
    np.testing.assert_array_equal(a[off], b[off])


# --- geometry ----------------------------------------------------------------------------


def test_pixel_lb_matches_healpy_lonlat():
    l, b = H.pixel_lb(NSIDE)
    lon, lat = hp.pix2ang(NSIDE, np.arange(NPIX), lonlat=True)  # lon in [0, 360)
    assert l.shape == b.shape == (NPIX,)
    assert np.all(l > -np.pi) and np.all(l <= np.pi)
    np.testing.assert_allclose(np.mod(np.degrees(l), 360.0), lon, atol=1e-10)
    np.testing.assert_allclose(np.degrees(b), lat, atol=1e-10)
    sub = np.array([0, 5, NPIX - 1])
    ls, bs = H.pixel_lb(NSIDE, sub)
    np.testing.assert_array_equal(ls, l[sub])
    np.testing.assert_array_equal(bs, b[sub])


@fast
@given(lons, lats)
def test_angular_distance_matches_astropy(l0, b0):
    d = H.angular_distance(NSIDE, np.radians(l0), np.radians(b0))
    np.testing.assert_allclose(np.degrees(d), _dist_deg(l0, b0), atol=1e-9)


def test_angular_distance_small_angles_accurate():
    # a pixel centre and a point 1e-7 rad away: arccos(dot) would lose all digits here
    l, b = H.pixel_lb(NSIDE, np.array([100]))
    d = H.angular_distance(NSIDE, l[0], b[0] + 1e-7, np.array([100]))
    np.testing.assert_allclose(d, 1e-7, rtol=1e-6)


# --- masks against healpy ----------------------------------------------------------------


@fast
@given(lons, lats, radii)
def test_ring_mask_disc_matches_query_disc(l0, b0, r):
    vec = hp.ang2vec(l0, b0, lonlat=True)
    kept = _from_pixels(hp.query_disc(NSIDE, vec, np.radians(r), inclusive=False))
    mask = H.ring_mask(NSIDE, r, l_deg=l0, b_deg=b0)
    assert mask.dtype == bool and mask.shape == (NPIX,)
    _agree_off_edge(mask, ~kept, _dist_deg(l0, b0), r)


@fast
@given(lons, lats, radii, st.floats(0.0, 1.0, allow_subnormal=False))
def test_ring_mask_annulus_matches_query_disc(l0, b0, r_out, frac):
    r_in = frac * r_out
    vec = hp.ang2vec(l0, b0, lonlat=True)
    outer = _from_pixels(hp.query_disc(NSIDE, vec, np.radians(r_out), inclusive=False))
    inner = _from_pixels(hp.query_disc(NSIDE, vec, np.radians(r_in), inclusive=False))
    mask = H.ring_mask(NSIDE, r_out, r_in, l0, b0)
    dist = _dist_deg(l0, b0)
    off = (np.abs(np.radians(dist - r_out)) > EDGE) & (np.abs(np.radians(dist - r_in)) > EDGE)
    np.testing.assert_array_equal(mask[off], ~(outer & ~inner)[off])


def test_band_mask_zero_masks_nothing():
    assert not H.band_mask(NSIDE, 0.0).any()
    assert H.band_mask(NSIDE, 90.0).all()  # no pixel centre lies on a pole


@fast
@given(st.floats(0.01, 90.0))  # query_strip(theta, theta) is not an empty strip
def test_band_mask_matches_query_strip(bd):
    theta1, theta2 = np.radians(90 - bd), np.radians(90 + bd)
    strip = _from_pixels(hp.query_strip(NSIDE, theta1, theta2, inclusive=False))
    lat = hp.pix2ang(NSIDE, np.arange(NPIX), lonlat=True)[1]
    _agree_off_edge(H.band_mask(NSIDE, bd), strip, np.abs(lat), bd)


@fast
@given(lats, st.floats(0.01, 180.0))
def test_lat_mask_matches_query_strip(b1, width):
    lo, hi = b1, min(b1 + width, 90.0)
    if hi - lo < 0.01:
        return
    strip = _from_pixels(
        hp.query_strip(NSIDE, np.radians(90 - hi), np.radians(90 - lo), inclusive=False)
    )
    lat = hp.pix2ang(NSIDE, np.arange(NPIX), lonlat=True)[1]
    mask = H.lat_mask(NSIDE, lo, hi)
    off = (np.abs(np.radians(lat - lo)) > EDGE) & (np.abs(np.radians(lat - hi)) > EDGE)
    np.testing.assert_array_equal(mask[off], ~strip[off])


@fast
@given(lons, st.floats(0.0, 400.0, allow_subnormal=False))
def test_lon_mask_brute_force(lo, width):
    hi = lo + width
    lon = hp.pix2ang(NSIDE, np.arange(NPIX), lonlat=True)[0]  # [0, 360)
    # brute force: is any of lon + 360 k (k = -2..2) inside [lo, hi]?
    shifted = lon[:, None] + 360.0 * np.arange(-2, 3)[None, :]
    inside = ((shifted >= lo) & (shifted <= hi)).any(axis=1)
    mask = H.lon_mask(NSIDE, lo, hi)
    dist = np.minimum(np.abs(np.mod(lon - lo + 180, 360) - 180), np.abs(np.mod(lon - hi + 180, 360) - 180))
    off = np.radians(dist) > EDGE
    np.testing.assert_array_equal(mask[off], ~inside[off])


def test_lon_mask_wraps():
    np.testing.assert_array_equal(H.lon_mask(NSIDE, -30, 30), H.lon_mask(NSIDE, 330, 390))
    assert not H.lon_mask(NSIDE, -180, 180).any()
    assert H.lon_mask(NSIDE, 10, 20).sum() > 0.9 * NPIX


@fast
@given(
    st.lists(st.tuples(lons, lats, st.floats(0.5, 30.0)), min_size=1, max_size=6),
)
def test_point_mask_is_union_of_query_discs(points):
    l, b, r = (np.array(x) for x in zip(*points))
    mask = H.point_mask(NSIDE, l, b, r)
    expected = np.zeros(NPIX, dtype=bool)
    off = np.ones(NPIX, dtype=bool)
    for li, bi, ri in points:
        vec = hp.ang2vec(li, bi, lonlat=True)
        expected[hp.query_disc(NSIDE, vec, np.radians(ri), inclusive=False)] = True
        off &= np.abs(np.radians(_dist_deg(li, bi) - ri)) > EDGE
    np.testing.assert_array_equal(mask[off], expected[off])


def test_point_mask_scalar_radius_broadcasts_and_empty():
    l, b = np.array([0.0, 40.0]), np.array([10.0, -20.0])
    np.testing.assert_array_equal(
        H.point_mask(NSIDE, l, b, 5.0), H.point_mask(NSIDE, l, b, np.array([5.0, 5.0]))
    )
    assert not H.point_mask(NSIDE, np.array([]), np.array([]), 1.0).any()
    assert H.point_mask(NSIDE, 0.0, 0.0, 180.0).all()


@fast
@given(lons, lats, radii)
def test_ring_is_complement_of_point_disc(l0, b0, r):
    ring = H.ring_mask(NSIDE, r, l_deg=l0, b_deg=b0)
    disc = H.point_mask(NSIDE, l0, b0, r)
    _agree_off_edge(ring, ~disc, _dist_deg(l0, b0), r)


# --- mask algebra ------------------------------------------------------------------------

masks = st.builds(
    lambda seed, p: np.random.default_rng(seed).random(NPIX) < p,
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 1.0, allow_subnormal=False),
)


@fast
@given(masks, masks, masks)
def test_combine_masks_algebra(a, b, c):
    ab_c = H.combine_masks(H.combine_masks(a, b), c)
    np.testing.assert_array_equal(ab_c, H.combine_masks(a, H.combine_masks(b, c)))
    np.testing.assert_array_equal(ab_c, H.combine_masks(a, b, c))
    np.testing.assert_array_equal(H.combine_masks(a, b), H.combine_masks(b, a))
    np.testing.assert_array_equal(H.combine_masks(a, a), a)
    # monotone: combining never unmasks a pixel
    assert np.all(H.combine_masks(a, b)[a]) and np.all(H.combine_masks(a, b)[b])
    # 0/1 integer masks combine like booleans
    np.testing.assert_array_equal(H.combine_masks(a.astype(int), b.astype(np.uint8)), a | b)


@fast
@given(lons, lats, st.floats(180.0, 1000.0))
def test_huge_ring_masks_nothing(l0, b0, r):
    assert not H.ring_mask(NSIDE, r, l_deg=l0, b_deg=b0).any()


@fast
@given(lons, lats, radii, radii)
def test_ring_monotone_in_radius(l0, b0, r1, r2):
    small, big = min(r1, r2), max(r1, r2)
    # the larger disc masks a subset of what the smaller masks
    assert not np.any(H.ring_mask(NSIDE, big, l_deg=l0, b_deg=b0) & ~H.ring_mask(NSIDE, small, l_deg=l0, b_deg=b0))


def test_fiducial_mask_parts_and_count():
    nside = 128
    src = H.point_mask(nside, np.array([5.0, -10.0]), np.array([5.0, 10.0]), 1.0)
    fid = H.fiducial_mask(nside, src)
    np.testing.assert_array_equal(
        fid, H.ring_mask(nside, 25) | H.band_mask(nside, 2) | src
    )
    # the ring+band part from healpy's queries
    disc = _from_pixels(hp.query_disc(nside, hp.ang2vec(0, 0, lonlat=True), np.radians(25)), hp.nside2npix(nside))
    strip = _from_pixels(hp.query_strip(nside, np.radians(88), np.radians(92)), hp.nside2npix(nside))
    np.testing.assert_array_equal(H.fiducial_mask(nside), ~(disc & ~strip))


# --- validation ----------------------------------------------------------------------------


def test_validate_mask_accepts_and_rejects():
    m = np.zeros(NPIX, dtype=int)
    m[3] = 1
    out = H.validate_mask(m, NSIDE, "m")
    assert out.dtype == bool and out.sum() == 1
    with pytest.raises(ValueError, match=r"psc.*shape"):
        H.validate_mask(np.zeros(10), NSIDE, "psc")
    bad = m.copy()
    bad[7] = 2
    with pytest.raises(ValueError, match=r"psc.*0/1.*pixel 7"):
        H.validate_mask(bad, NSIDE, "psc")
    nan = m.astype(float)
    nan[0] = np.nan
    with pytest.raises(ValueError, match="0/1"):
        H.validate_mask(nan, NSIDE, "psc")
    with pytest.raises(ValueError, match="nside"):
        H.validate_mask(m, 3, "psc")
    with pytest.raises(ValueError, match="mask 1"):
        H.combine_masks(m, np.zeros(NPIX + 1))
    with pytest.raises(ValueError, match="at least one"):
        H.combine_masks()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: H.ring_mask(NSIDE, 10, 20), "inner_deg <= outer_deg"),
        (lambda: H.ring_mask(NSIDE, np.nan), "finite"),
        (lambda: H.ring_mask(NSIDE, 10, b_deg=95), "b_deg"),
        (lambda: H.band_mask(NSIDE, -1), ">= 0"),
        (lambda: H.lat_mask(NSIDE, 10, -10), "b_min_deg <= b_max_deg"),
        (lambda: H.lon_mask(NSIDE, 10, -10), "l_min_deg <= l_max_deg"),
        (lambda: H.point_mask(NSIDE, 0.0, 0.0, -1.0), "radius_deg"),
        (lambda: H.point_mask(NSIDE, 0.0, 91.0, 1.0), "b_deg"),
        (lambda: H.point_mask(NSIDE, np.zeros(2), np.zeros(3), 1.0), "shape|broadcast"),
        (lambda: H.pixel_lb(12), "power of 2"),
        (lambda: H.pixel_lb(NSIDE, np.array([NPIX])), r"\[0, "),
        (lambda: H.cartesian_view(np.zeros(100)), "12\\*nside"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- Cartesian views ----------------------------------------------------------------------


def test_cartesian_view_samples_analytic_map():
    nside = 64
    lon, lat = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), lonlat=True)
    lon = np.where(lon > 180, lon - 360, lon)

    def f(lo, la):
        return np.exp(-((lo - 5) ** 2 + 2 * (la + 3) ** 2) / (2 * 8.0**2)) + 0.01 * lo

    m = f(lon, lat)
    img = H.cartesian_view(m, (20.0, -20.0), (-10.0, 10.0), (40, 20))
    assert img.shape == (20, 40)
    # image pixel centres: lon from +19.5 down to -19.5, lat from -9.5 up to 9.5
    L, B = np.meshgrid(20 - (np.arange(40) + 0.5), -10 + (np.arange(20) + 0.5))
    truth = f(L, B)
    pix = hp.nside2resol(nside, arcmin=True) / 60  # ~0.92 deg
    grad = 0.02 + 1 / 8.0  # bound on |grad f| per degree
    assert np.max(np.abs(img - truth)) < grad * pix
    interp = H.cartesian_view(m, (20.0, -20.0), (-10.0, 10.0), (40, 20), interpolate=True)
    assert np.max(np.abs(interp - truth)) < np.max(np.abs(img - truth))
    assert np.max(np.abs(interp - truth)) < 0.02
