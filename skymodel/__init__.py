"""skymodel: differentiable inference on the gamma-ray sky.

The flat public API. Data flow: Dataset -> ROI -> components -> SkyModel -> likelihood ->
inference -> Posterior (see the README).
"""

import jax as _jax

# The NPTF likelihood needs float64 (p_k recursion, incomplete gamma functions of the SCF
# integrals); skymodel enables it on import.
_jax.config.update("jax_enable_x64", True)

from skymodel import analysis as analysis  # noqa: E402
from skymodel import healpix as healpix  # noqa: E402
from skymodel import priors as priors  # noqa: E402
from skymodel import psf as psf  # noqa: E402
from skymodel import scf as scf  # noqa: E402
from skymodel.components import (  # noqa: E402
    AbstractComponent as AbstractComponent,
    AbstractMorphology as AbstractMorphology,
    AbstractPointSourcePopulation as AbstractPointSourcePopulation,
    AbstractSCFParameters as AbstractSCFParameters,
    Blend as Blend,
    ExposureWeighted as ExposureWeighted,
    HarmonicModulation as HarmonicModulation,
    LorimerDisk as LorimerDisk,
    Mixture as Mixture,
    NFWSquared as NFWSquared,
    NPTFitSCF as NPTFitSCF,
    Param as Param,
    PointSourcePopulation as PointSourcePopulation,
    PoissonComponent as PoissonComponent,
    TemplateMap as TemplateMap,
    TotalCountsSCF as TotalCountsSCF,
    gce_morphology as gce_morphology,
    mixture_component as mixture_component,
    template_component as template_component,
)
from skymodel.config import build as build_from_config, load_config as load_config  # noqa: E402
from skymodel.data import Dataset as Dataset, car_to_healpix as car_to_healpix  # noqa: E402
from skymodel.inference import (  # noqa: E402
    Posterior as Posterior,
    run_map as run_map,
    run_nuts as run_nuts,
    run_svi as run_svi,
)
from skymodel.likelihood import (  # noqa: E402
    count_plan as count_plan,
    nptf_loglike as nptf_loglike,
    poisson_loglike as poisson_loglike,
)
from skymodel.model import SkyModel as SkyModel, numpyro_model as numpyro_model  # noqa: E402
from skymodel.observation import Observation as Observation  # noqa: E402
from skymodel.priors import (  # noqa: E402
    Dirichlet as Dirichlet,
    LogUniform as LogUniform,
    Normal as Normal,
    Uniform as Uniform,
    UniformVector as UniformVector,
)
from skymodel.psf import (  # noqa: E402
    DoubleKingPSF as DoubleKingPSF,
    GaussianPSF as GaussianPSF,
    KingPSF as KingPSF,
    PSFCorrection as PSFCorrection,
    RadialPSF as RadialPSF,
)
from skymodel.roi import ROI as ROI  # noqa: E402
from skymodel.runs import run_fit as run_fit  # noqa: E402
from skymodel.scf import BrokenPowerLaw as BrokenPowerLaw  # noqa: E402
from skymodel.simulate import simulate as simulate, simulate_population as simulate_population  # noqa: E402

__version__ = "0.1.0"
