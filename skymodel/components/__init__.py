"""Sky components: morphologies, Poisson components and point-source populations."""

from skymodel.components.base import (
    AbstractComponent as AbstractComponent,
    AbstractMorphology as AbstractMorphology,
    AbstractPointSourcePopulation as AbstractPointSourcePopulation,
    Param as Param,
)
from skymodel.components.morphology import (
    Blend as Blend,
    ExposureWeighted as ExposureWeighted,
    HarmonicModulation as HarmonicModulation,
    LorimerDisk as LorimerDisk,
    Mixture as Mixture,
    NFWSquared as NFWSquared,
    TemplateMap as TemplateMap,
)
from skymodel.components.point_sources import (
    AbstractSCFParameters as AbstractSCFParameters,
    NPTFitSCF as NPTFitSCF,
    PointSourcePopulation as PointSourcePopulation,
    TotalCountsSCF as TotalCountsSCF,
)
from skymodel.components.poisson import PoissonComponent as PoissonComponent
from skymodel.components.templates import (
    gce_morphology as gce_morphology,
    mixture_component as mixture_component,
    template_component as template_component,
)
