"""Priors: small, hashable descriptions of a parameter's prior distribution.

A prior is static configuration (it lives in `eqx.field(static=True)`), so it is a frozen
dataclass of Python floats. Each prior can

- build the equivalent NumPyro distribution (`to_numpyro`),
- map a point of the unit hypercube to the parameter (`from_unit`, for nested sampling),
- tell whether a value lies in its support (`contains`), and
- give a typical starting value (`initial`).
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist


class AbstractPrior(abc.ABC):
    """Base class of priors. Subclasses are frozen dataclasses (hashable)."""

    #: shape of one draw; () for scalars
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    def unit_dim(self) -> int:
        """Number of unit-cube coordinates `from_unit` consumes."""
        return int(np.prod(self.shape, dtype=int))

    @abc.abstractmethod
    def to_numpyro(self) -> dist.Distribution: ...

    @abc.abstractmethod
    def from_unit(self, u):
        """Map u in [0, 1]^unit_dim to a parameter value (inverse CDF or equivalent)."""

    @abc.abstractmethod
    def contains(self, value) -> bool:
        """True where `value` is inside the support (concrete values only)."""

    @abc.abstractmethod
    def initial(self):
        """A central value inside the support (e.g. the median)."""


def _check_interval(name: str, low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} prior needs finite bounds, got low={low}, high={high}")
    if not low < high:
        raise ValueError(f"{name} prior needs low < high, got low={low}, high={high}")


@dataclasses.dataclass(frozen=True)
class Uniform(AbstractPrior):
    """U(low, high)."""

    low: float
    high: float

    def __post_init__(self):
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        _check_interval("Uniform", self.low, self.high)

    @property
    def shape(self):
        return ()

    def to_numpyro(self):
        return dist.Uniform(self.low, self.high)

    def from_unit(self, u):
        return self.low + (self.high - self.low) * jnp.reshape(u, ())

    def contains(self, value):
        v = np.asarray(value)
        return bool(np.all((v >= self.low) & (v <= self.high)))

    def initial(self):
        return 0.5 * (self.low + self.high)


@dataclasses.dataclass(frozen=True)
class LogUniform(AbstractPrior):
    """Log-uniform on [low, high] (uniform in log10 of the value), low > 0."""

    low: float
    high: float

    def __post_init__(self):
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        _check_interval("LogUniform", self.low, self.high)
        if self.low <= 0:
            raise ValueError(f"LogUniform prior needs low > 0, got low={self.low}")

    @property
    def shape(self):
        return ()

    def to_numpyro(self):
        return dist.LogUniform(self.low, self.high)

    def from_unit(self, u):
        lo, hi = math.log(self.low), math.log(self.high)
        return jnp.exp(lo + (hi - lo) * jnp.reshape(u, ()))

    def contains(self, value):
        v = np.asarray(value)
        return bool(np.all((v >= self.low) & (v <= self.high)))

    def initial(self):
        return math.sqrt(self.low * self.high)


@dataclasses.dataclass(frozen=True)
class Normal(AbstractPrior):
    """Normal(loc, scale)."""

    loc: float
    scale: float

    def __post_init__(self):
        object.__setattr__(self, "loc", float(self.loc))
        object.__setattr__(self, "scale", float(self.scale))
        if not self.scale > 0:
            raise ValueError(f"Normal prior needs scale > 0, got scale={self.scale}")

    @property
    def shape(self):
        return ()

    def to_numpyro(self):
        return dist.Normal(self.loc, self.scale)

    def from_unit(self, u):
        from jax.scipy.special import ndtri

        return self.loc + self.scale * ndtri(jnp.reshape(u, ()))

    def contains(self, value):
        return bool(np.all(np.isfinite(np.asarray(value))))

    def initial(self):
        return self.loc


@dataclasses.dataclass(frozen=True)
class UniformVector(AbstractPrior):
    """Independent U(low, high) for each of `size` entries (e.g. harmonic coefficients)."""

    low: float
    high: float
    size: int

    def __post_init__(self):
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        _check_interval("UniformVector", self.low, self.high)
        if self.size < 1:
            raise ValueError(f"UniformVector needs size >= 1, got {self.size}")

    @property
    def shape(self):
        return (self.size,)

    def to_numpyro(self):
        return dist.Uniform(self.low * jnp.ones(self.size), self.high * jnp.ones(self.size)).to_event(1)

    def from_unit(self, u):
        return self.low + (self.high - self.low) * jnp.reshape(u, (self.size,))

    def contains(self, value):
        v = np.asarray(value)
        return v.shape == (self.size,) and bool(np.all((v >= self.low) & (v <= self.high)))

    def initial(self):
        return np.full(self.size, 0.5 * (self.low + self.high))


@dataclasses.dataclass(frozen=True)
class Dirichlet(AbstractPrior):
    """Dirichlet(concentration) on the simplex of `len(concentration)` weights."""

    concentration: tuple[float, ...]

    def __post_init__(self):
        conc = tuple(float(c) for c in self.concentration)
        object.__setattr__(self, "concentration", conc)
        if len(conc) < 2:
            raise ValueError(f"Dirichlet prior needs at least 2 weights, got {len(conc)}")
        if not all(c > 0 and math.isfinite(c) for c in conc):
            raise ValueError(f"Dirichlet concentrations must be positive, got {conc}")

    @classmethod
    def symmetric(cls, n: int, alpha: float) -> "Dirichlet":
        return cls((alpha,) * n)

    @property
    def shape(self):
        return (len(self.concentration),)

    @property
    def unit_dim(self):
        return len(self.concentration)

    def to_numpyro(self):
        return dist.Dirichlet(jnp.asarray(self.concentration))

    def from_unit(self, u):
        """Gamma transform: w_i = G_i / sum G, G_i = Gamma(alpha_i) inverse CDF of u_i."""
        from skymodel._special import gamma_ppf

        g = gamma_ppf(jnp.reshape(u, (len(self.concentration),)), jnp.asarray(self.concentration))
        return g / jnp.sum(g)

    def contains(self, value):
        v = np.asarray(value)
        return (
            v.shape == self.shape
            and bool(np.all(v >= 0))
            and abs(float(np.sum(v)) - 1.0) < 1e-6
        )

    def initial(self):
        c = np.asarray(self.concentration)
        return c / c.sum()


__all__ = ["AbstractPrior", "Dirichlet", "LogUniform", "Normal", "Uniform", "UniformVector"]
