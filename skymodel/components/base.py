"""The component architecture: parameters with priors, morphologies, components.

- `Param`: a value and its prior travel together. A Param without a prior is fixed.
- `AbstractMorphology`: a spatial shape evaluated on the ROI's model pixels
  (analysis + normalisation pixels), in arbitrary units.
- `AbstractComponent`: a named piece of the sky. It returns expected counts per analysis
  pixel. Point-source populations subclass `AbstractPointSourcePopulation`, which adds
  the per-pixel source-density template and the source-count function the NPTF
  likelihood needs.

Implementing a component (checklist):
  1. Subclass `AbstractComponent` (or `AbstractMorphology` for a new spatial shape, which
     then plugs into the existing `PoissonComponent` / `PointSourcePopulation`).
  2. Declare `name: str = eqx.field(static=True)` and every free quantity as a `Param`.
  3. Implement `expected_counts(self, roi)` returning a float array of shape
     (roi.n_pixels,), pure JAX, no Python loops over pixels.
  4. Mark the class `typing.final` (users subclass abstract classes only).
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from skymodel._types import Array, Float
from skymodel.priors import AbstractPrior


class Param(eqx.Module):
    """A parameter value and its prior. `prior=None` means the parameter is fixed.

    `value` is a float64 array (scalar or vector, as the prior's shape says).
    """

    value: Float[Array, "..."]
    prior: AbstractPrior | None = eqx.field(static=True, default=None)

    def __init__(self, value=None, prior: AbstractPrior | None = None):
        if value is None:
            if prior is None:
                raise ValueError("Param needs a value or a prior (got neither)")
            value = prior.initial()
        self.value = jnp.asarray(value, dtype=jnp.float64)
        self.prior = prior

    def __check_init__(self):
        if self.prior is not None and tuple(self.value.shape) != tuple(self.prior.shape):
            raise ValueError(
                f"Param value has shape {tuple(self.value.shape)} but its prior "
                f"{self.prior!r} has shape {tuple(self.prior.shape)}"
            )

    @property
    def free(self) -> bool:
        return self.prior is not None


def is_param(x: Any) -> bool:
    return isinstance(x, Param)


def param_value(x) -> Array:
    """The value of a Param, or the array itself (lets fields be Params or raw arrays)."""
    return x.value if isinstance(x, Param) else jnp.asarray(x)


class AbstractMorphology(eqx.Module):
    """A spatial shape. `evaluate(roi)` gives its (unnormalised) value on
    `roi.model_pixels`, shape (roi.n_model,)."""

    @abc.abstractmethod
    def evaluate(self, roi) -> Float[Array, " nmodel"]: ...


class AbstractComponent(eqx.Module):
    """A named component of the sky model."""

    name: eqx.AbstractVar[str]

    @abc.abstractmethod
    def expected_counts(self, roi) -> Float[Array, " npix"]:
        """Expected photon counts per analysis pixel of `roi`."""


class AbstractPointSourcePopulation(AbstractComponent):
    """An unresolved point-source population: a source-density template and an SCF.

    `expected_counts` is the mean point-source counts per pixel (template x mean counts
    per unit template), so flux fractions treat populations like any other component.
    """

    @abc.abstractmethod
    def source_template(self, roi) -> Float[Array, " npix"]:
        """The per-pixel map that multiplies the SCF amplitude A (NPTFit convention)."""

    @abc.abstractmethod
    def source_count_function(self, roi):
        """The `skymodel.scf.BrokenPowerLaw` (counts at the mean exposure)."""


def normalise_on(values: Float[Array, " nmodel"], roi) -> Float[Array, " nmodel"]:
    """Scale `values` to mean 1 over the ROI's normalisation pixels."""
    return values / jnp.mean(values[roi.norm_index])


__all__ = [
    "AbstractComponent",
    "AbstractMorphology",
    "AbstractPointSourcePopulation",
    "Param",
    "is_param",
    "normalise_on",
    "param_value",
]
