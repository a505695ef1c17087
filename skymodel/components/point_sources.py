"""Unresolved point-source populations: a spatial source-density template and a
source-count function (SCF).

The SCF follows NPTFit's convention (`skymodel.scf.BrokenPowerLaw`): S in photon counts at
the ROI's mean exposure, A multiplies the per-pixel template, breaks highest first. Two
parameterisations of it are offered as priors on top of the same SCF:

- `NPTFitSCF`: A (or log10 A), indices n_1..n_{B+1}, breaks S_b1 > ... > S_bB;
- `TotalCountsSCF` (the paper's): total point-source counts S_ps (mean counts per pixel of
  the normalisation region, for a template normalised to mean 1 there), indices, the first
  break S_b1 and break ratios lambda_i = S_b(i+1)/S_b(i) in (0, 1). A is derived.
"""

from __future__ import annotations

import abc
import typing

import equinox as eqx
import jax.numpy as jnp

from skymodel._types import Array, Float
from skymodel.components.base import (
    AbstractMorphology,
    AbstractPointSourcePopulation,
    Param,
    normalise_on,
    param_value,
)
from skymodel.scf import BrokenPowerLaw


class AbstractSCFParameters(eqx.Module):
    """Parameters that define a BrokenPowerLaw (a prior choice, not a second SCF)."""

    @abc.abstractmethod
    def scf(self) -> BrokenPowerLaw:
        """The source-count function, for a template normalised to mean 1."""


def _index_bounds(indices: tuple[Param, ...]) -> tuple[float | None, float | None]:
    """Static (lower, upper) bounds on the SCF indices: fixed values and the edges of
    bounded priors (None on a side where a prior is unbounded or a value is traced)."""
    lows, highs = [], []
    for p in indices:
        if p.prior is None:
            try:
                value = float(p.value)
            except Exception:  # traced fixed value
                return None, None
            lows.append(value)
            highs.append(value)
        else:
            lows.append(getattr(p.prior, "low", None))
            highs.append(getattr(p.prior, "high", None))
    low = None if any(b is None for b in lows) else float(min(lows))
    high = None if any(b is None for b in highs) else float(max(highs))
    return low, high


def _params(values, what: str) -> tuple[Param, ...]:
    out = tuple(v if isinstance(v, Param) else Param(v) for v in values)
    if not out:
        raise ValueError(f"{what} must not be empty")
    return out


@typing.final
class NPTFitSCF(AbstractSCFParameters):
    """NPTFit parameters: amplitude A (or log10 A when `log10_amplitude=True`), indices
    (n_1 first) and breaks (S_b1 first, counts)."""

    amplitude: Param
    indices: tuple[Param, ...]
    breaks: tuple[Param, ...]
    log10_amplitude: bool = eqx.field(static=True, default=False)

    def __init__(self, amplitude, indices, breaks, log10_amplitude: bool = False):
        self.amplitude = amplitude if isinstance(amplitude, Param) else Param(amplitude)
        self.indices = _params(indices, "indices")
        self.breaks = _params(breaks, "breaks")
        self.log10_amplitude = log10_amplitude
        if len(self.indices) != len(self.breaks) + 1:
            raise ValueError(
                f"an SCF with {len(self.breaks)} breaks needs {len(self.breaks) + 1} indices, "
                f"got {len(self.indices)}"
            )

    def scf(self) -> BrokenPowerLaw:
        a = param_value(self.amplitude)
        A = 10.0**a if self.log10_amplitude else a
        low, high = _index_bounds(self.indices)
        return BrokenPowerLaw(
            A,
            jnp.stack([param_value(p) for p in self.indices]),
            jnp.stack([param_value(p) for p in self.breaks]),
            max_index=high,
            min_index=low,
        )


@typing.final
class TotalCountsSCF(AbstractSCFParameters):
    """The paper's parameterisation: total counts S_ps (mean point-source counts per pixel
    of the normalisation region), indices, first break S_b1 and break ratios
    lambda_i = S_b(i+1) / S_b(i)."""

    total_counts: Param
    indices: tuple[Param, ...]
    first_break: Param
    break_ratios: tuple[Param, ...]

    def __init__(self, total_counts, indices, first_break, break_ratios=()):
        self.total_counts = total_counts if isinstance(total_counts, Param) else Param(total_counts)
        self.indices = _params(indices, "indices")
        self.first_break = first_break if isinstance(first_break, Param) else Param(first_break)
        self.break_ratios = tuple(
            r if isinstance(r, Param) else Param(r) for r in break_ratios
        )
        if len(self.indices) != len(self.break_ratios) + 2:
            raise ValueError(
                f"{len(self.break_ratios) + 1} breaks need {len(self.break_ratios) + 2} indices, "
                f"got {len(self.indices)}"
            )
        for r in self.break_ratios:
            if r.prior is None and not (0.0 < float(r.value) < 1.0):
                raise ValueError(f"break ratios must lie in (0, 1), got {float(r.value)}")

    def scf(self) -> BrokenPowerLaw:
        breaks = [param_value(self.first_break)]
        for r in self.break_ratios:
            breaks.append(breaks[-1] * param_value(r))
        indices = jnp.stack([param_value(p) for p in self.indices])
        breaks = jnp.stack(breaks)
        unit = BrokenPowerLaw(jnp.asarray(1.0), indices, breaks)
        A = param_value(self.total_counts) / unit.mean_counts()
        low, high = _index_bounds(self.indices)
        return BrokenPowerLaw(A, indices, breaks, max_index=high, min_index=low)


@typing.final
class PointSourcePopulation(AbstractPointSourcePopulation):
    """A point-source population: source density `morphology` (NOT exposure-weighted:
    exposure enters through the source counts) and SCF parameters.

    With `normalise=True` the template is scaled to mean 1 on the normalisation pixels
    (the paper); with `normalise=False` it is used as given (NPTFit's examples, where the
    template is divided by exposure / mean exposure).
    """

    name: str = eqx.field(static=True)
    morphology: AbstractMorphology
    scf_parameters: AbstractSCFParameters
    normalise: bool = eqx.field(static=True, default=True)

    def source_template(self, roi) -> Float[Array, " npix"]:
        values = self.morphology.evaluate(roi)
        if self.normalise:
            values = normalise_on(values, roi)
        return values[roi.analysis_index]

    def source_count_function(self, roi=None) -> BrokenPowerLaw:
        return self.scf_parameters.scf()

    def expected_counts(self, roi) -> Float[Array, " npix"]:
        """Mean point-source counts per analysis pixel (template x mean counts per source
        density x the exposure ratio of the pixel's exposure region)."""
        scf = self.source_count_function(roi)
        return self.source_template(roi) * scf.mean_counts() * roi.region_ratio[roi.region]


__all__ = [
    "AbstractSCFParameters",
    "NPTFitSCF",
    "PointSourcePopulation",
    "TotalCountsSCF",
]
