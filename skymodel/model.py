"""SkyModel: a tuple of components, its likelihood, its free parameters, and the NumPyro
model generated from them.

Free parameters are the `Param`s with a prior anywhere in the components' pytrees. Their
NumPyro site names are generated from the component name and the field path, e.g.
"iso.norm", "gce.morphology.gamma", "pi0.weights" (tuple entries and dict keys become path
parts too), so they are never maintained by hand.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from skymodel._tracing import is_traced
from skymodel._types import Array, Float, Scalar
from skymodel.components.base import (
    AbstractComponent,
    AbstractPointSourcePopulation,
    Param,
    is_param,
)
from skymodel.observation import Observation
from skymodel.roi import ROI


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _poisson_loglike_fallback(counts, mu):
    # Used only if skymodel.likelihood is unavailable; same formula (xlogy, gammaln).
    return jax.scipy.special.xlogy(counts, mu) - mu - jax.scipy.special.gammaln(counts + 1.0)


@typing.final
class SkyModel(eqx.Module):
    """A model of the sky: a tuple of uniquely named components.

    Point-source populations (`AbstractPointSourcePopulation`) enter the likelihood through
    the NPTF generating function; every other component adds to the Poisson mean.
    """

    components: tuple[AbstractComponent, ...]

    def __init__(self, components):
        self.components = tuple(components)

    def __check_init__(self):
        if len(self.components) == 0:
            raise ValueError("SkyModel needs at least one component")
        for c in self.components:
            if not isinstance(c, AbstractComponent):
                raise ValueError(
                    f"SkyModel components must be AbstractComponent instances, got {type(c).__name__}"
                )
        names = [c.name for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"component names must be unique; duplicated: {dup}")
        for n in names:
            if not isinstance(n, str) or not n or "." in n:
                raise ValueError(f"component names must be non-empty strings without '.', got {n!r}")
        _ = self._param_paths()  # raises on clashing site names

    # ------------------------------------------------------------------ structure

    def component(self, name: str) -> AbstractComponent:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r}; components: {[c.name for c in self.components]}")

    @property
    def point_sources(self) -> tuple[AbstractPointSourcePopulation, ...]:
        return tuple(c for c in self.components if isinstance(c, AbstractPointSourcePopulation))

    @property
    def poisson_components(self) -> tuple[AbstractComponent, ...]:
        return tuple(c for c in self.components if not isinstance(c, AbstractPointSourcePopulation))

    def _param_paths(self) -> dict[str, tuple[int, Param]]:
        """site name -> (leaf index in the is_param flattening, Param), free Params only."""
        leaves, _ = jax.tree_util.tree_flatten_with_path(self, is_leaf=is_param)
        out: dict[str, tuple[int, Param]] = {}
        for i, (path, leaf) in enumerate(leaves):
            if not (is_param(leaf) and leaf.free):
                continue
            # path = (GetAttrKey('components'), SequenceKey(k), *rest)
            comp = self.components[path[1].idx]
            name = ".".join([comp.name] + [_key_name(k) for k in path[2:]])
            if name in out:
                raise ValueError(f"two free parameters map to the same site name {name!r}")
            out[name] = (i, leaf)
        return out

    def free_parameters(self) -> dict[str, Param]:
        """Ordered dict site name -> free Param (those with a prior)."""
        return {k: p for k, (_, p) in self._param_paths().items()}

    def parameter_values(self) -> dict[str, Array]:
        """Current values of the free parameters, site name -> array."""
        return {k: p.value for k, p in self.free_parameters().items()}

    def with_values(self, values: Mapping[str, Any], *, check: bool = True) -> "SkyModel":
        """A copy with the named free parameters set to `values` (site name -> array).

        Unknown names raise KeyError (listing the valid ones); wrong shapes ValueError;
        with `check=True`, concrete values outside the prior's support raise ValueError.
        """
        paths = self._param_paths()
        unknown = [k for k in values if k not in paths]
        if unknown:
            raise KeyError(f"unknown parameter(s) {unknown}; valid names: {list(paths)}")
        leaves, treedef = jax.tree_util.tree_flatten(self, is_leaf=is_param)
        for name, v in values.items():
            i, p = paths[name]
            v = jnp.asarray(v, dtype=jnp.float64)
            if v.shape != p.value.shape:
                raise ValueError(
                    f"parameter {name!r} needs shape {tuple(p.value.shape)}, got {tuple(v.shape)}"
                )
            if check and not is_traced(v) and not p.prior.contains(np.asarray(v)):
                raise ValueError(
                    f"value {np.asarray(v)} of parameter {name!r} is outside the support of "
                    f"its prior {p.prior!r}"
                )
            leaves[i] = Param(v, p.prior)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    # ------------------------------------------------------------------ priors

    def log_prior(self, values: Mapping[str, Any] | None = None) -> Scalar:
        """Sum of the free parameters' prior log densities at `values` (default: the
        current values). `values` must name every free parameter."""
        params = self.free_parameters()
        if values is None:
            values = {k: p.value for k, p in params.items()}
        missing = [k for k in params if k not in values]
        if missing:
            raise KeyError(f"log_prior needs every free parameter; missing {missing}")
        unknown = [k for k in values if k not in params]
        if unknown:
            raise KeyError(f"unknown parameter(s) {unknown}; valid names: {list(params)}")
        total = jnp.zeros((), dtype=jnp.float64)
        for k, p in params.items():
            total = total + jnp.sum(p.prior.to_numpyro().log_prob(jnp.asarray(values[k], jnp.float64)))
        return total

    def sample_prior(self, key, n: int) -> dict[str, Array]:
        """`n` independent prior draws: site name -> (n, *shape) array."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        params = self.free_parameters()
        keys = jax.random.split(key, max(len(params), 1))
        return {
            k: jnp.asarray(p.prior.to_numpyro().sample(kk, (int(n),)), jnp.float64)
            for kk, (k, p) in zip(keys, params.items())
        }

    # ------------------------------------------------------------------ predictions

    def poisson_mean(self, roi: ROI) -> Float[Array, " npix"]:
        """Sum of the expected counts of all non-point-source components, (npix,)."""
        mu = jnp.zeros((roi.n_pixels,), dtype=jnp.float64)
        for c in self.poisson_components:
            mu = mu + c.expected_counts(roi)
        return mu

    def point_source_terms(self, roi: ROI) -> tuple[Float[Array, "npop npix"], tuple]:
        """Source templates (npop, npix) and the populations' source-count functions."""
        ps = self.point_sources
        if not ps:
            return jnp.zeros((0, roi.n_pixels), dtype=jnp.float64), ()
        templates = jnp.stack([c.source_template(roi) for c in ps])
        scfs = tuple(c.source_count_function(roi) for c in ps)
        return templates, scfs

    def expected_counts(self, roi: ROI) -> dict[str, Float[Array, " npix"]]:
        """Expected counts per analysis pixel of each component, name -> (npix,)."""
        return {c.name: c.expected_counts(roi) for c in self.components}

    def total_expected_counts(self, roi: ROI) -> Float[Array, " npix"]:
        """Sum over all components (point sources at their mean), (npix,)."""
        return sum(self.expected_counts(roi).values())

    # ------------------------------------------------------------------ likelihood

    def pixel_log_likelihood(self, obs: Observation) -> Float[Array, " npix"]:
        """log P(counts_p | model) per analysis pixel, (npix,)."""
        roi = obs.roi
        mu = self.poisson_mean(roi)
        if not self.point_sources:
            try:
                from skymodel.likelihood import poisson_loglike
            except ImportError:
                poisson_loglike = _poisson_loglike_fallback
            return poisson_loglike(obs.counts, mu)
        from skymodel.likelihood import nptf_loglike

        templates, scfs = self.point_source_terms(roi)
        return nptf_loglike(
            obs.counts,
            mu,
            templates,
            scfs,
            psf=obs.psf,
            exposure_regions=(roi.region, roi.region_ratio),
            plan=obs.plan,
        )

    def log_likelihood(self, obs: Observation) -> Scalar:
        """Total log-likelihood, summed over analysis pixels."""
        return jnp.sum(self.pixel_log_likelihood(obs))


def numpyro_model(sky: SkyModel, obs: Observation) -> None:
    """NumPyro model: every free Param is a sample site (named as in
    `SkyModel.free_parameters`) with its prior; the log-likelihood enters as the factor
    "loglike". Fixed Params are not sampled."""
    values = {
        name: numpyro.sample(name, p.prior.to_numpyro())
        for name, p in sky.free_parameters().items()
    }
    numpyro.factor("loglike", _log_likelihood_at(sky, values, obs))


def _log_likelihood_at(sky: SkyModel, values: dict, obs: Observation):
    """log L at `values`. Traced inside a sampler's jit, the model and the data stay
    constants of that compiled function (so the morphologies reuse their tabulated
    line-of-sight geometry: a nested jit would see them as traced arguments); where
    NumPyro evaluates the model eagerly (initialisation), one compiled call."""
    if is_traced(values):
        return sky.with_values(values, check=False).log_likelihood(obs)
    return _log_likelihood_compiled(sky, values, obs)


@eqx.filter_jit
def _log_likelihood_compiled(sky: SkyModel, values: dict, obs: Observation):
    return sky.with_values(values, check=False).log_likelihood(obs)


__all__ = ["SkyModel", "numpyro_model"]
