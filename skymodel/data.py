"""Dataset: counts, exposure, templates and masks, loaded from disk and validated once.

Map files hold one full-sky HEALPix map each (length 12 nside^2, Galactic coordinates):
- `.npy`: assumed RING ordering (a .npy file carries no header to say otherwise);
- `.fits` / `.fits.gz` / `.fit`: read with healpy.read_map (first column); a header saying
  ORDERING = NESTED or a non-Galactic COORDSYS is refused.
Masks use True / 1 = MASKED (excluded), as the data files and NPTFit do.

Cartesian (CAR, Galactic) FITS images, such as the stellar-bulge maps of the GCE
literature, are imported onto HEALPix with the `reproject` package (`car_to_healpix`);
HEALPix pixels whose centre lies outside the image footprint are set to 0. Reprojected
maps are cached under $SKYMODEL_CACHE (default ~/.cache/skymodel).

Every validation failure raises ValueError (FileNotFoundError for missing files) naming the
file (or argument) and the problem.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import healpy as hp
import numpy as np

from skymodel._types import Bool, Float
from skymodel.cache import cache_dir  # reprojected maps are cached there
from skymodel.healpix import (
    band_mask,
    check_nside,
    combine_masks,
    fiducial_mask,
    npix_to_nside,
    ring_mask,
    validate_mask,
)
from skymodel.roi import ROI

PathLike = str | os.PathLike
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_CACHE_VERSION = "1"


# ---------------------------------------------------------------------------------------
# reading and validating single maps


def _is_fits(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(_FITS_SUFFIXES)


def _map_stem(path: pathlib.Path) -> str:
    name = path.name
    for suffix in (".npy",) + _FITS_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_healpix_header(path: pathlib.Path) -> None:
    """Refuse HEALPix FITS files whose header says NESTED or a non-Galactic frame."""
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            headers = [h.header for h in hdul]
    except OSError as e:
        raise ValueError(f"{path}: cannot read as FITS ({e})") from e
    for header in headers:
        ordering = str(header.get("ORDERING", "")).strip().upper()
        if ordering.startswith("NEST"):
            raise ValueError(
                f"{path}: HEALPix map in NESTED ordering; skymodel expects RING "
                "(convert with healpy.reorder(m, n2r=True))"
            )
        coordsys = str(header.get("COORDSYS", "")).strip().upper()
        if coordsys and coordsys[0] in ("C", "E", "Q"):
            raise ValueError(
                f"{path}: COORDSYS = {coordsys!r}; skymodel expects Galactic maps ('G')"
            )


def read_map(path: PathLike) -> np.ndarray:
    """Read one full-sky HEALPix map from a .npy or HEALPix FITS file (values unchecked
    beyond shape; see `Dataset.load` for the checks)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if _is_fits(path):
        _check_healpix_header(path)
        try:
            m = hp.read_map(str(path), field=0, nest=None, dtype=np.float64)
        except Exception as e:  # healpy raises several types on non-HEALPix FITS
            raise ValueError(
                f"{path}: not a HEALPix FITS map ({type(e).__name__}: {e}); for a Cartesian "
                "image use skymodel.data.car_to_healpix"
            ) from e
        m = np.asarray(m)
        if (m == hp.UNSEEN).any():
            raise ValueError(
                f"{path}: {int((m == hp.UNSEEN).sum())} pixels are UNSEEN (missing values)"
            )
    elif path.name.lower().endswith(".npy"):
        try:
            m = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as .npy ({e})") from e
    else:
        raise ValueError(f"{path}: unknown map format (expected .npy or .fits)")
    if m.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D full-sky map, got shape {m.shape}")
    return m


def _check_numeric(m: np.ndarray, label: str) -> None:
    if not (m.dtype == bool or np.issubdtype(m.dtype, np.integer)
            or np.issubdtype(m.dtype, np.floating)):
        raise ValueError(f"{label}: expected numeric values, got dtype {m.dtype}")


def _check_finite(m: np.ndarray, label: str) -> None:
    bad = ~np.isfinite(m)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{label}: {int(bad.sum())} non-finite values (NaN/inf); first at pixel {first}"
        )


def _as_float_map(m: Any, label: str, nside: int | None) -> tuple[np.ndarray, int]:
    m = np.asarray(m)
    if m.ndim != 1:
        raise ValueError(f"{label}: expected a 1-D full-sky map, got shape {m.shape}")
    _check_numeric(m, label)
    this = npix_to_nside(m.shape[0], label)
    if nside is not None and this != nside:
        raise ValueError(
            f"{label}: nside mismatch, the map has nside {this} ({m.shape[0]} pixels) but "
            f"the counts have nside {nside}"
        )
    m = m.astype(np.float64)
    _check_finite(m, label)
    return m, this


def _validate_counts(m: Any, label: str) -> tuple[np.ndarray, int]:
    m, nside = _as_float_map(m, label, None)
    neg = m < 0
    if neg.any():
        raise ValueError(
            f"{label}: counts must be non-negative; {int(neg.sum())} pixels are negative "
            f"(min {m.min()})"
        )
    frac = m != np.round(m)
    if frac.any():
        first = int(np.flatnonzero(frac)[0])
        raise ValueError(
            f"{label}: counts must be integers; {int(frac.sum())} pixels are not (first: "
            f"pixel {first} = {m[first]!r})"
        )
    return m, nside


def _validate_mask_map(m: Any, label: str, nside: int) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 1:
        raise ValueError(f"{label}: expected a 1-D full-sky map, got shape {m.shape}")
    _check_numeric(m, label)
    this = npix_to_nside(m.shape[0], label)
    if this != nside:
        raise ValueError(
            f"{label}: nside mismatch, the mask has nside {this} ({m.shape[0]} pixels) but "
            f"the counts have nside {nside}"
        )
    if m.dtype != bool:
        _check_finite(m.astype(np.float64), label)
    return validate_mask(m, nside, label)


def _readonly(m: np.ndarray) -> np.ndarray:
    m = np.ascontiguousarray(m)
    m.setflags(write=False)
    return m


# ---------------------------------------------------------------------------------------
# Cartesian FITS -> HEALPix


def _car_image(path_or_hdu: Any) -> tuple[np.ndarray, Any, str]:
    """(data, header, label) of a 2-D Galactic image from a path, HDUList or image HDU."""
    from astropy.io import fits

    if isinstance(path_or_hdu, (str, os.PathLike)):
        path = pathlib.Path(path_or_hdu)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        label = str(path)
        with fits.open(path) as hdul:
            hdus = [h for h in hdul if h.is_image and h.data is not None]
            if not hdus:
                raise ValueError(f"{label}: no image HDU with data")
            data, header = np.array(hdus[0].data), hdus[0].header.copy()
    elif isinstance(path_or_hdu, fits.HDUList):
        label = "HDUList"
        hdus = [h for h in path_or_hdu if h.is_image and h.data is not None]
        if not hdus:
            raise ValueError(f"{label}: no image HDU with data")
        data, header = np.array(hdus[0].data), hdus[0].header
    elif isinstance(path_or_hdu, (fits.PrimaryHDU, fits.ImageHDU)):
        label = "image HDU"
        if path_or_hdu.data is None:
            raise ValueError(f"{label}: no data")
        data, header = np.array(path_or_hdu.data), path_or_hdu.header
    else:
        raise ValueError(
            f"car_to_healpix needs a FITS path, HDUList or image HDU, got {type(path_or_hdu)}"
        )
    data = np.squeeze(data)
    if data.ndim != 2:
        raise ValueError(f"{label}: expected a 2-D image, got shape {data.shape}")
    ctype = (str(header.get("CTYPE1", "")).upper(), str(header.get("CTYPE2", "")).upper())
    if not (ctype[0].startswith("GLON") and ctype[1].startswith("GLAT")):
        raise ValueError(
            f"{label}: expected Galactic axes CTYPE1 = GLON-*, CTYPE2 = GLAT-*, got {ctype}"
        )
    data = data.astype(np.float64)
    _check_finite(data, label)
    return data, header, label


def car_to_healpix(
    path_or_hdu: Any, nside: int | np.integer, *, order: str = "bilinear"
) -> Float[np.ndarray, " nsky"]:
    """Reproject a Cartesian (e.g. CAR) Galactic FITS image onto a HEALPix RING map.

    Uses reproject.reproject_to_healpix (interpolation of the image at each HEALPix pixel
    centre, `order` = 'nearest-neighbor' | 'bilinear' | 'biquadratic' | 'bicubic'); values
    keep the image's units (e.g. intensity per sr). It samples, it does not average: an
    image much finer than the HEALPix pixels is point-sampled. Pixels whose centre lies
    outside the image footprint are 0. Returns (12 nside^2,) float64.
    """
    from reproject import reproject_to_healpix

    nside = check_nside(nside)
    data, header, label = _car_image(path_or_hdu)
    values, footprint = reproject_to_healpix(
        (data, header), "galactic", nside=nside, nested=False, order=order
    )
    values = np.asarray(values, dtype=np.float64)
    inside = (np.asarray(footprint) > 0) & np.isfinite(values)
    return np.where(inside, values, 0.0)


def load_car_map(
    path: PathLike, nside: int | np.integer, *, order: str = "bilinear", cache: bool = True
) -> Float[np.ndarray, " nsky"]:
    """`car_to_healpix` of a FITS file, cached on disk (see `cache_dir`).

    The cache key is the file's SHA-256, nside and interpolation order, so an edited file
    is reprojected again.
    """
    path = pathlib.Path(path)
    nside = check_nside(nside)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if not cache:
        return car_to_healpix(path, nside, order=order)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"car_{_map_stem(path)}_n{nside}_{order}_v{_CACHE_VERSION}_{digest}.npy"
    if target.is_file():
        try:
            m = np.load(target, allow_pickle=False)
            if m.shape == (hp.nside2npix(nside),) and np.isfinite(m).all():
                return m.astype(np.float64)
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute
    m = car_to_healpix(path, nside, order=order)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, m)
        os.replace(tmp, target)
    except OSError as e:
        warnings.warn(f"could not cache reprojected map at {target}: {e}", stacklevel=2)
    return m


# ---------------------------------------------------------------------------------------
# Dataset


def _resolve(directory: pathlib.Path, name: PathLike) -> pathlib.Path:
    return directory / pathlib.Path(name)


def _glob_maps(directory: pathlib.Path, prefix: str) -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    for p in sorted(directory.iterdir()):
        if not p.is_file() or not p.name.startswith(prefix):
            continue
        if not (p.name.lower().endswith(".npy") or _is_fits(p)):
            continue
        name = _map_stem(p)[len(prefix):]
        if name in found:
            raise ValueError(f"{directory}: two files for {prefix}{name}: {found[name].name}, {p.name}")
        found[name] = p
    return found


def _named_files(
    directory: pathlib.Path, spec: Any, prefix: str
) -> dict[str, pathlib.Path]:
    """name -> path from None (glob prefix*), a mapping name -> file, or a list of names."""
    if spec is None:
        return _glob_maps(directory, prefix)
    if isinstance(spec, Mapping):
        return {str(k): _resolve(directory, v) for k, v in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        out = {}
        for name in spec:
            cands = [directory / f"{prefix}{name}{s}" for s in (".npy",) + _FITS_SUFFIXES]
            hit = [c for c in cands if c.is_file()]
            out[str(name)] = hit[0] if hit else cands[0]
        return out
    raise ValueError(f"expected None, a mapping name -> file or a list of names, got {spec!r}")


class Dataset(eqx.Module):
    """Full-sky data of one analysis (HEALPix RING, Galactic), validated on construction.

    Attributes:
      nside: HEALPix nside (static).
      counts: (12 nside^2,) photon counts (float64, integer-valued, >= 0).
      exposure: (12 nside^2,) exposure in cm^2 s (finite; > 0 checked on the ROI's pixels).
      templates: name -> (12 nside^2,) float64 map (finite). Poisson templates are counts
        maps (exposure applied); reprojected bulge maps keep their FITS units.
      masks: name -> (12 nside^2,) bool map, True = masked.
      sources: (key, file) pairs saying where each map came from (static; for messages).
      bulge_dir: directory of Cartesian bulge FITS maps, or None (static).
    Arrays are read-only numpy arrays (this is load-time data, not a jit argument).
    """

    nside: int = eqx.field(static=True)
    counts: Float[np.ndarray, " nsky"]
    exposure: Float[np.ndarray, " nsky"]
    templates: dict[str, Float[np.ndarray, " nsky"]]
    masks: dict[str, Bool[np.ndarray, " nsky"]]
    sources: tuple[tuple[str, str], ...] = eqx.field(static=True, default=())
    bulge_dir: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        npix = hp.nside2npix(check_nside(self.nside))
        maps = [("counts", self.counts), ("exposure", self.exposure)]
        maps += [(f"template {k!r}", v) for k, v in self.templates.items()]
        maps += [(f"mask {k!r}", v) for k, v in self.masks.items()]
        for label, m in maps:
            if np.shape(m) != (npix,):
                raise ValueError(
                    f"{label} has shape {np.shape(m)}, expected ({npix},) for nside {self.nside}"
                )

    # -- construction --------------------------------------------------------------------

    @classmethod
    def _build(cls, counts, exposure, templates, masks, labels, bulge_dir=None) -> "Dataset":
        counts, nside = _validate_counts(counts, labels["counts"])
        exposure, _ = _as_float_map(exposure, labels["exposure"], nside)
        tmpl = {
            name: _readonly(_as_float_map(m, labels[f"template:{name}"], nside)[0])
            for name, m in templates.items()
        }
        msk = {
            name: _readonly(_validate_mask_map(m, labels[f"mask:{name}"], nside))
            for name, m in masks.items()
        }
        return cls(
            nside=nside,
            counts=_readonly(counts),
            exposure=_readonly(exposure),
            templates=tmpl,
            masks=msk,
            sources=tuple(sorted(labels.items())),
            bulge_dir=None if bulge_dir is None else str(bulge_dir),
        )

    @classmethod
    def from_arrays(
        cls,
        counts: Any,
        exposure: Any,
        templates: Mapping[str, Any] | None = None,
        masks: Mapping[str, Any] | None = None,
    ) -> "Dataset":
        """Dataset from in-memory full-sky maps (RING), with the same checks as `load`."""
        templates = dict(templates or {})
        masks = dict(masks or {})
        labels = {"counts": "counts", "exposure": "exposure"}
        labels.update({f"template:{k}": f"template {k!r}" for k in templates})
        labels.update({f"mask:{k}": f"mask {k!r}" for k in masks})
        return cls._build(counts, exposure, templates, masks, labels)

    @classmethod
    def load(
        cls,
        directory: PathLike,
        *,
        counts: PathLike = "counts.npy",
        exposure: PathLike = "exposure.npy",
        templates: Mapping[str, PathLike] | Sequence[str] | None = None,
        masks: Mapping[str, PathLike] | Sequence[str] | None = None,
        bulge_dir: PathLike | None = "bulge_fits",
        bulges: bool = False,
    ) -> "Dataset":
        """Load and validate a data directory.

        counts, exposure: file names (relative to `directory`, or absolute).
        templates / masks: None = every `template_{name}.npy|.fits` / `mask_{name}...` in
        the directory; a mapping name -> file; or a list of names.
        bulge_dir: sub-directory of Cartesian bulge FITS maps (ignored when absent).
        bulges: also reproject every bulge map now and add it to `templates` under its
        file stem (otherwise use `bulge_templates()` when needed).

        Example (NPTFit's example data):
            Dataset.load(d, counts="fermidata_counts.npy",
                         exposure="fermidata_exposure.npy",
                         masks={"psc": "fermidata_pscmask.npy"},
                         templates={"dif": "template_dif.npy", ...,
                                    "pibrem": "ModelO_r25_q1_pibrem.npy"})
        """
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: data directory not found")
        counts_path = _resolve(directory, counts)
        exposure_path = _resolve(directory, exposure)
        tpaths = _named_files(directory, templates, "template_")
        mpaths = _named_files(directory, masks, "mask_")
        labels = {"counts": str(counts_path), "exposure": str(exposure_path)}
        labels.update({f"template:{k}": str(p) for k, p in tpaths.items()})
        labels.update({f"mask:{k}": str(p) for k, p in mpaths.items()})
        bdir = None
        if bulge_dir is not None:
            cand = _resolve(directory, bulge_dir)
            if cand.is_dir():
                bdir = cand
            elif bulges:
                raise FileNotFoundError(f"{cand}: bulge directory not found")
        data = cls._build(
            read_map(counts_path),
            read_map(exposure_path),
            {k: read_map(p) for k, p in tpaths.items()},
            {k: read_map(p) for k, p in mpaths.items()},
            labels,
            bulge_dir=bdir,
        )
        if bulges:
            extra = data.bulge_templates()
            clash = set(extra) & set(data.templates)
            if clash:
                raise ValueError(f"bulge map names clash with templates: {sorted(clash)}")
            data = eqx.tree_at(lambda d: d.templates, data, {**data.templates, **extra})
        return data

    # -- helpers --------------------------------------------------------------------------

    def source(self, key: str) -> str:
        """Where a map came from: key 'counts', 'exposure', 'template:NAME' or 'mask:NAME'."""
        return dict(self.sources).get(key, key)

    @property
    def npix(self) -> int:
        return hp.nside2npix(self.nside)

    def _mask(self, name: str) -> np.ndarray:
        if name not in self.masks:
            raise ValueError(
                f"no mask named {name!r}; available masks: {sorted(self.masks) or 'none'}"
            )
        return self.masks[name]

    def bulge_names(self) -> list[str]:
        """Stems of the Cartesian FITS maps in `bulge_dir` (empty without one)."""
        if self.bulge_dir is None:
            return []
        d = pathlib.Path(self.bulge_dir)
        return sorted(_map_stem(p) for p in d.iterdir() if p.is_file() and _is_fits(p))

    def bulge_templates(
        self, names: Sequence[str] | None = None, *, order: str = "bilinear", cache: bool = True
    ) -> dict[str, Float[np.ndarray, " nsky"]]:
        """Reproject bulge FITS maps (CAR, Galactic) onto this dataset's HEALPix grid.

        names: file stems (default: all in `bulge_dir`). Pixels outside a map's footprint
        are 0; values keep the FITS units. Results are cached on disk (`load_car_map`).
        """
        if self.bulge_dir is None:
            raise FileNotFoundError("this Dataset has no bulge directory (bulge_dir)")
        available = self.bulge_names()
        names = available if names is None else list(names)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown bulge maps {unknown}; available: {available}")
        d = pathlib.Path(self.bulge_dir)
        files = {_map_stem(p): p for p in d.iterdir() if p.is_file() and _is_fits(p)}
        return {
            n: _readonly(load_car_map(files[n], self.nside, order=order, cache=cache))
            for n in names
        }

    # -- regions of interest ---------------------------------------------------------------

    def roi(
        self,
        radius_deg: float = 25.0,
        band_deg: float = 2.0,
        source_mask: str | Any | None = "psc_3fgl_0p8deg",
        n_exposure_regions: int = 1,
        norm_radius_deg: float | None = None,
        norm_band_deg: float | None = None,
    ) -> ROI:
        """ROI of the paper's kind: analysis pixels r <= radius_deg from the GC, |b| >=
        band_deg, outside `source_mask` (a mask name, a full-sky bool array, or None);
        normalisation pixels r <= norm_radius_deg, |b| >= norm_band_deg (default: the same
        radius and band) with no source mask. Carries this dataset's exposure, which must
        be > 0 on all those pixels.
        """
        if isinstance(source_mask, str):
            src = self._mask(source_mask)
        elif source_mask is None:
            src = None
        else:
            src = validate_mask(source_mask, self.nside, "source_mask")
        analysis = fiducial_mask(self.nside, src, radius_deg, band_deg)
        nr = radius_deg if norm_radius_deg is None else norm_radius_deg
        nb = band_deg if norm_band_deg is None else norm_band_deg
        norm = combine_masks(ring_mask(self.nside, nr), band_mask(self.nside, nb))
        used = ~(analysis & norm)
        bad = used & ~(self.exposure > 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{self.source('exposure')}: exposure must be > 0 on the ROI's pixels; "
                f"{int(bad.sum())} are not (first: pixel {first} = {self.exposure[first]!r})"
            )
        return ROI.from_masks(
            self.nside, analysis, norm, exposure=self.exposure,
            n_exposure_regions=n_exposure_regions,
        )

    def observation(self, roi: ROI, psf: Any = None):
        """skymodel.observation.Observation of this dataset's counts on `roi`."""
        from skymodel.observation import Observation

        if roi.nside != self.nside:
            raise ValueError(f"roi has nside {roi.nside}, the dataset {self.nside}")
        return Observation.from_sky_counts(roi, self.counts, psf=psf)


__all__ = ["Dataset", "cache_dir", "car_to_healpix", "load_car_map", "read_map"]
