"""Inference: SVI (flow guides), NUTS, MAP, and the Posterior they return."""

from skymodel.inference.map import MAPResult as MAPResult, run_map as run_map
from skymodel.inference.nuts import run_nuts as run_nuts
from skymodel.inference.posterior import Posterior as Posterior
from skymodel.inference.svi import (
    NonFiniteLossError as NonFiniteLossError,
    SVIResult as SVIResult,
    make_guide as make_guide,
    run_svi as run_svi,
)

__all__ = ["MAPResult", "NonFiniteLossError", "Posterior", "SVIResult", "make_guide", "run_map", "run_nuts", "run_svi"]
