"""Spatial morphologies: fixed maps, NFW^2, Lorimer disk, and their combinations.

Every class is a final `AbstractMorphology`: `evaluate(roi)` gives the (unnormalised)
value on the ROI's model pixels, shape (roi.n_model,). Free quantities are `Param`s;
the numerics live in `skymodel.morphology_numerics`.
"""

from __future__ import annotations

import typing

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from skymodel import morphology_numerics as mn
from skymodel._types import Array, Float
from skymodel.components.base import AbstractMorphology, Param, normalise_on
from skymodel.priors import Dirichlet, Uniform, UniformVector
from skymodel.roi import ROI


def _check_model_shape(what: str, values: Array, roi: ROI) -> None:
    if values.shape != (roi.n_model,):
        raise ValueError(
            f"{what} has {values.shape[0]} model-pixel values but the ROI has {roi.n_model} "
            "model pixels (was it built for a different ROI?)"
        )


def _as_param(x, prior=None) -> Param:
    return x if isinstance(x, Param) else Param(x, prior)


@typing.final
class TemplateMap(AbstractMorphology):
    """A fixed map, stored on the model pixels of the ROI it was built for."""

    values: Float[Array, " nmodel"]
    label: str = eqx.field(static=True, default="template")

    def __init__(self, values, label: str = "template"):
        v = jnp.asarray(values, dtype=jnp.float64)
        if v.ndim != 1:
            raise ValueError(f"template {label!r}: values must be 1-d, got shape {v.shape}")
        self.values = v
        self.label = label

    @classmethod
    def from_sky(cls, sky_map, roi: ROI, label: str = "template") -> "TemplateMap":
        """Validate a full-sky map (12 nside^2 values, finite, >= 0, not all zero in the
        normalisation region) and keep its model-pixel values."""
        m = np.asarray(sky_map, dtype=np.float64)
        npix = 12 * roi.nside**2
        if m.shape != (npix,):
            raise ValueError(
                f"template {label!r} has shape {m.shape}, expected ({npix},) for nside {roi.nside}"
            )
        model = np.asarray(roi.model_pixels)
        vals = m[model]
        if not np.all(np.isfinite(vals)):
            raise ValueError(
                f"template {label!r} has {int((~np.isfinite(vals)).sum())} non-finite values in the ROI"
            )
        if np.any(vals < 0):
            raise ValueError(
                f"template {label!r} has {int((vals < 0).sum())} negative values in the ROI "
                f"(min {vals.min():.3g})"
            )
        if not np.any(vals[np.asarray(roi.norm_index)] > 0):
            raise ValueError(f"template {label!r} is zero everywhere in the normalisation region")
        return cls(vals, label=label)

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        _check_model_shape(f"template {self.label!r}", self.values, roi)
        return self.values


@typing.final
class NFWSquared(AbstractMorphology):
    """Line-of-sight integral of the squared generalised NFW profile (kpc, rho_s = 1).

    gamma: inner slope, free (default prior U(0.2, 2)); r_s, r_sun in kpc (static).
    The package default r_sun = 8.224 kpc is the paper's; NPTFit-era templates use 8.5.
    """

    gamma: Param
    r_s: float = eqx.field(static=True, default=20.0)
    r_sun: float = eqx.field(static=True, default=mn.R_SUN)
    n_nodes: int = eqx.field(static=True, default=mn.NFW_NODES)

    def __init__(self, gamma=None, r_s: float = 20.0, r_sun: float = mn.R_SUN, n_nodes: int = mn.NFW_NODES):
        self.gamma = Param(None, Uniform(0.2, 2.0)) if gamma is None else _as_param(gamma)
        self.r_s = float(r_s)
        self.r_sun = float(r_sun)
        self.n_nodes = int(n_nodes)

    def __check_init__(self):
        if self.gamma.value.shape != ():
            raise ValueError(f"NFWSquared gamma must be a scalar, got shape {self.gamma.value.shape}")
        if not (self.r_s > 0 and self.r_sun > 0):
            raise ValueError(f"NFWSquared needs r_s, r_sun > 0, got {self.r_s}, {self.r_sun}")

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        return mn.nfw_squared_los(
            roi.l, roi.b, self.gamma.value, r_s=self.r_s, r_sun=self.r_sun, n_nodes=self.n_nodes
        )


@typing.final
class LorimerDisk(AbstractMorphology):
    """Line-of-sight integral of rho = (R/r_sun)^B exp(-C (R - r_sun)/r_sun) exp(-|z|/z_s).

    z_s (kpc) and C free (defaults: priors U(0.1, 2.5), U(0.05, 8)); B fixed at the
    Lorimer et al. (2006) value 1.9 unless given as a free Param. (The shipped Fermi
    `template_dsk_*` maps are B = 0, C = r_sun / 5 kpc with r_sun = 8.5, times exposure.)
    """

    z_s: Param
    C: Param
    B: Param
    r_sun: float = eqx.field(static=True, default=mn.R_SUN)
    s_max: float = eqx.field(static=True, default=mn.DISK_S_MAX)

    def __init__(self, z_s=None, C=None, B=None, r_sun: float = mn.R_SUN, s_max: float = mn.DISK_S_MAX):
        self.z_s = Param(None, Uniform(0.1, 2.5)) if z_s is None else _as_param(z_s)
        self.C = Param(None, Uniform(0.05, 8.0)) if C is None else _as_param(C)
        self.B = Param(mn.LORIMER_B) if B is None else _as_param(B)
        self.r_sun = float(r_sun)
        self.s_max = float(s_max)

    def __check_init__(self):
        for name in ("z_s", "C", "B"):
            p = getattr(self, name)
            if p.value.shape != ():
                raise ValueError(f"LorimerDisk {name} must be a scalar, got shape {p.value.shape}")
        if not (self.r_sun > 0 and self.s_max > 0):
            raise ValueError(f"LorimerDisk needs r_sun, s_max > 0, got {self.r_sun}, {self.s_max}")

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        return mn.lorimer_disk_los(
            roi.l, roi.b, self.z_s.value, self.C.value, self.B.value, r_sun=self.r_sun, s_max=self.s_max
        )


@typing.final
class Mixture(AbstractMorphology):
    """sum_i w_i normalise(part_i): each part scaled to mean 1 on the normalisation
    pixels, then mixed with weights w (default prior Dirichlet(1/3, ..., 1/3))."""

    parts: tuple[AbstractMorphology, ...]
    weights: Param

    def __init__(self, parts, weights=None, concentration: float = 1.0 / 3.0):
        parts = tuple(parts)
        if weights is None:
            if len(parts) < 2:
                raise ValueError(f"Mixture needs at least 2 parts for a Dirichlet prior, got {len(parts)}")
            weights = Param(None, Dirichlet.symmetric(len(parts), concentration))
        self.parts = parts
        self.weights = _as_param(weights)

    def __check_init__(self):
        if len(self.parts) == 0:
            raise ValueError("Mixture needs at least one part")
        if not all(isinstance(p, AbstractMorphology) for p in self.parts):
            raise ValueError("Mixture parts must all be AbstractMorphology instances")
        if self.weights.value.shape != (len(self.parts),):
            raise ValueError(
                f"Mixture has {len(self.parts)} parts but weights of shape {self.weights.value.shape}"
            )

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        stacked = jnp.stack([normalise_on(p.evaluate(roi), roi) for p in self.parts])
        return jnp.tensordot(self.weights.value, stacked, axes=1)


@typing.final
class Blend(AbstractMorphology):
    """f normalise(first) + (1 - f) normalise(second); f default prior U(0, 1).
    The GCE: f_bulge x bulge mixture + (1 - f_bulge) x NFW^2(gamma)."""

    first: AbstractMorphology
    second: AbstractMorphology
    fraction: Param

    def __init__(self, first: AbstractMorphology, second: AbstractMorphology, fraction=None):
        self.first = first
        self.second = second
        self.fraction = Param(None, Uniform(0.0, 1.0)) if fraction is None else _as_param(fraction)

    def __check_init__(self):
        if self.fraction.value.shape != ():
            raise ValueError(f"Blend fraction must be a scalar, got shape {self.fraction.value.shape}")

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        f = self.fraction.value
        return f * normalise_on(self.first.evaluate(roi), roi) + (1.0 - f) * normalise_on(
            self.second.evaluate(roi), roi
        )


@typing.final
class HarmonicModulation(AbstractMorphology):
    """base x (1 + sum_{l=1..lmax, m=0..l} a_lm Re Y_lm(l, b)).

    coefficients: (lmax (lmax + 3) / 2,) ordered as `morphology_numerics.harmonic_indices`,
    default prior UniformVector(-0.05, 0.05). Not renormalised here (the component does).
    """

    base: AbstractMorphology
    coefficients: Param
    lmax: int = eqx.field(static=True)

    def __init__(self, base: AbstractMorphology, coefficients=None, lmax: int = 2):
        if not isinstance(lmax, (int, np.integer)) or lmax < 1:
            raise ValueError(f"HarmonicModulation lmax must be an int >= 1, got {lmax!r}")
        n = mn.n_harmonic_coefficients(int(lmax))
        self.base = base
        self.lmax = int(lmax)
        self.coefficients = (
            Param(None, UniformVector(-0.05, 0.05, n)) if coefficients is None else _as_param(coefficients)
        )

    def __check_init__(self):
        n = mn.n_harmonic_coefficients(self.lmax)
        if self.coefficients.value.shape != (n,):
            raise ValueError(
                f"HarmonicModulation with lmax={self.lmax} needs {n} coefficients, got shape "
                f"{self.coefficients.value.shape}"
            )

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        ylm = mn.real_spherical_harmonics(roi.l, roi.b, self.lmax)
        return self.base.evaluate(roi) * (1.0 + self.coefficients.value @ ylm)


@typing.final
class ExposureWeighted(AbstractMorphology):
    """base x exposure: turns an intensity-like shape (NFW^2, bulge) into a counts shape.
    Not for point-source density templates (there exposure enters via the SCF)."""

    base: AbstractMorphology

    def evaluate(self, roi: ROI) -> Float[Array, " nmodel"]:
        return self.base.evaluate(roi) * roi.exposure


__all__ = [
    "Blend",
    "ExposureWeighted",
    "HarmonicModulation",
    "LorimerDisk",
    "Mixture",
    "NFWSquared",
    "TemplateMap",
]
