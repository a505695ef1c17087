"""Whether a value is traced: the one test skymodel uses to choose between work done once
with numpy on concrete values (input checks, tabulated geometry, count plans) and work that
stays inside the compiled graph (values that are JAX tracers under jit, grad or vmap)."""

import jax


def is_traced(*trees) -> bool:
    """True when any leaf of `trees` (arrays, scalars or pytrees of them) is a JAX tracer."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))
