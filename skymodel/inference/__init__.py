"""Inference: SVI (flow guides), NUTS, MAP, nested sampling, and the Posterior they return."""

from skymodel.inference.map import MAPResult as MAPResult, run_map as run_map
from skymodel.inference.nested import (
    BackendUnavailableError as BackendUnavailableError,
    NonFiniteLikelihoodError as NonFiniteLikelihoodError,
    PriorTransform as PriorTransform,
    multinest_status as multinest_status,
    prior_transform as prior_transform,
    run_nested as run_nested,
)
from skymodel.inference.nuts import run_nuts as run_nuts
from skymodel.inference.posterior import Posterior as Posterior
from skymodel.inference.svi import (
    NonFiniteLossError as NonFiniteLossError,
    SVIResult as SVIResult,
    make_guide as make_guide,
    run_svi as run_svi,
)

__all__ = [
    "BackendUnavailableError",
    "MAPResult",
    "NonFiniteLikelihoodError",
    "NonFiniteLossError",
    "Posterior",
    "PriorTransform",
    "SVIResult",
    "make_guide",
    "multinest_status",
    "prior_transform",
    "run_map",
    "run_nested",
    "run_nuts",
    "run_svi",
]
