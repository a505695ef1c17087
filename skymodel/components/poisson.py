"""The Poisson (smooth) component: a norm times a normalised morphology."""

from __future__ import annotations

import typing

import equinox as eqx

from skymodel._types import Array, Float
from skymodel.components.base import AbstractComponent, AbstractMorphology, Param, normalise_on
from skymodel.roi import ROI


@typing.final
class PoissonComponent(AbstractComponent):
    """Expected counts = norm x normalise_on(morphology.evaluate(roi))[analysis pixels].

    With `normalise=True` (default) the morphology is scaled to mean 1 over the ROI's
    normalisation pixels, so `norm` is the mean counts per pixel there. With
    `normalise=False` the raw morphology values (already counts) are multiplied by norm.
    Serves fixed templates, O/A/F mixtures, modulated pi0 and the smooth GCE.
    """

    name: str = eqx.field(static=True)
    morphology: AbstractMorphology
    norm: Param
    normalise: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PoissonComponent name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.morphology, AbstractMorphology):
            raise ValueError(
                f"PoissonComponent {self.name!r}: morphology must be an AbstractMorphology, "
                f"got {type(self.morphology).__name__}"
            )
        if not isinstance(self.norm, Param) or self.norm.value.shape != ():
            raise ValueError(f"PoissonComponent {self.name!r}: norm must be a scalar Param")

    def expected_counts(self, roi: ROI) -> Float[Array, " npix"]:
        values = self.morphology.evaluate(roi)
        if self.normalise:
            values = normalise_on(values, roi)
        return self.norm.value * values[roi.analysis_index]


__all__ = ["PoissonComponent"]
