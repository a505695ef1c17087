"""Convenience constructors of `PoissonComponent`s and of the GCE morphology."""

from __future__ import annotations

from collections.abc import Sequence

from skymodel.components.base import AbstractMorphology, Param
from skymodel.components.morphology import (
    Blend,
    ExposureWeighted,
    HarmonicModulation,
    Mixture,
    NFWSquared,
    TemplateMap,
)
from skymodel.components.poisson import PoissonComponent
from skymodel.priors import AbstractPrior, Dirichlet, Uniform
from skymodel.roi import ROI


def template_component(
    name: str,
    sky_map,
    roi: ROI,
    prior: AbstractPrior | None = Uniform(1e-3, 5.0),
    value=None,
    normalise: bool = True,
) -> PoissonComponent:
    """A fixed full-sky counts template with a free norm (isotropic, bubbles, 3FGL, ...).

    prior=None fixes the norm at `value` (default 1)."""
    if prior is None and value is None:
        value = 1.0
    return PoissonComponent(
        name=name,
        morphology=TemplateMap.from_sky(sky_map, roi, label=name),
        norm=Param(value, prior),
        normalise=normalise,
    )


def mixture_component(
    name: str,
    sky_maps: Sequence,
    roi: ROI,
    norm_prior: AbstractPrior | None = Uniform(1e-3, 14.0),
    concentration: float = 1.0 / 3.0,
    modulation_lmax: int = 0,
    labels: Sequence[str] | None = None,
) -> PoissonComponent:
    """norm x normalise(Σ_i w_i normalise(map_i) [x (1 + Σ a_lm Re Y_lm)]).

    Dirichlet(concentration) weights (e.g. the O/A/F diffuse models); with
    modulation_lmax > 0 the mixture is modulated by real harmonics l = 1..lmax with
    a_lm ~ U(-0.05, 0.05), then renormalised by the component."""
    sky_maps = list(sky_maps)
    if len(sky_maps) < 2:
        raise ValueError(f"mixture_component {name!r} needs at least 2 maps, got {len(sky_maps)}")
    if labels is None:
        labels = [f"{name}[{i}]" for i in range(len(sky_maps))]
    if len(labels) != len(sky_maps):
        raise ValueError(f"mixture_component {name!r}: {len(labels)} labels for {len(sky_maps)} maps")
    parts = tuple(TemplateMap.from_sky(m, roi, label=lab) for m, lab in zip(sky_maps, labels))
    morph: AbstractMorphology = Mixture(
        parts, Param(None, Dirichlet.symmetric(len(parts), concentration))
    )
    if modulation_lmax < 0:
        raise ValueError(f"modulation_lmax must be >= 0, got {modulation_lmax}")
    if modulation_lmax > 0:
        morph = HarmonicModulation(morph, lmax=int(modulation_lmax))
    return PoissonComponent(name=name, morphology=morph, norm=Param(None, norm_prior))


def gce_morphology(
    roi: ROI,
    bulge_maps: Sequence = (),
    gamma_prior: AbstractPrior | None = Uniform(0.2, 2.0),
    fraction_prior: AbstractPrior | None = Uniform(0.0, 1.0),
    exposure_weighted: bool = True,
    concentration: float = 1.0,
    gamma_value=None,
    fraction_value=None,
    r_sun: float | None = None,
) -> AbstractMorphology:
    """GCE shape f_bulge x Σ_i w_i bulge_i + (1 - f_bulge) x NFW^2(gamma).

    bulge_maps: full-sky *intensity-like* maps (stellar bulge models); none gives plain
    NFW^2. exposure_weighted=True multiplies every leaf by the exposure (a counts shape for
    the smooth GCE); False keeps source-density shapes (point-source templates). Bulge
    weights have a Dirichlet(concentration) prior when there are 2 or more maps. A prior of
    None fixes the parameter at its value (defaults gamma 1.2, f_bulge 0.5)."""
    kw = {} if r_sun is None else {"r_sun": r_sun}
    if gamma_prior is None and gamma_value is None:
        gamma_value = 1.2
    if fraction_prior is None and fraction_value is None:
        fraction_value = 0.5
    nfw: AbstractMorphology = NFWSquared(Param(gamma_value, gamma_prior), **kw)

    def wrap(m: AbstractMorphology) -> AbstractMorphology:
        return ExposureWeighted(m) if exposure_weighted else m

    bulge_maps = list(bulge_maps)
    if not bulge_maps:
        return wrap(nfw)
    parts = tuple(
        wrap(TemplateMap.from_sky(m, roi, label=f"bulge[{i}]")) for i, m in enumerate(bulge_maps)
    )
    if len(parts) == 1:
        bulge = parts[0]
    else:
        bulge = Mixture(parts, Param(None, Dirichlet.symmetric(len(parts), concentration)))
    return Blend(bulge, wrap(nfw), Param(fraction_value, fraction_prior))


__all__ = ["gce_morphology", "mixture_component", "template_component"]
