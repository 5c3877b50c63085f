"""Trace-time dependence analysis: which inputs of a function can its outputs depend on.

Walks the jaxpr of the function, propagating for every variable the set of input indices it
can depend on. Exact through calls whose body is a jaxpr (jit, custom_jvp/vjp calls, remat);
conservative elsewhere (every output of an equation depends on all its inputs), so a reported
dependence may be spurious while a missing one is certain independence.

`jaxdnn.estimators.check_reparameterizable` uses it to find parameters on which a density
depends but its (reparameterized) samples do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def jaxpr_output_dependence(jaxpr, in_deps: list[frozenset[int]]) -> list[frozenset[int]]:
    """Which inputs (by index set) each output of `jaxpr` can depend on, given the index set
    `in_deps[i]` of its i-th input variable.

    Non-float values get no dependence: in a tangent (JVP) program, tangents are
    floats and never decide an index or a branch.
    """
    deps: dict[Any, frozenset[int]] = dict(zip(jaxpr.invars, in_deps, strict=True))

    def dep(v):
        return frozenset() if isinstance(v, jex_core.Literal) else deps.get(v, frozenset())

    for eqn in jaxpr.eqns:
        ins = [dep(v) for v in eqn.invars]
        sub = None
        for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            cand = eqn.params.get(name)
            cand = getattr(cand, "jaxpr", cand)  # ClosedJaxpr -> Jaxpr
            if (isinstance(cand, jex_core.Jaxpr) and len(cand.invars) == len(ins)
                    and len(cand.outvars) == len(eqn.outvars)):
                sub = cand
                break
        if sub is not None:
            outs = jaxpr_output_dependence(sub, ins)
        else:
            outs = [frozenset().union(*ins)] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outs, strict=True):
            floating = jnp.issubdtype(getattr(v.aval, "dtype", jnp.float32), jnp.inexact)
            deps[v] = d if floating else frozenset()
    return [dep(v) for v in jaxpr.outvars]


def dependent_inputs(fn: Callable[..., jax.Array], num_inputs: int, args: list[jax.Array]) -> set[int]:
    """Indices i < num_inputs of `args` that the output of `fn(*args)` can depend on.

    Conservative: a returned index may be spurious, a missing index is certain independence.
    Costs one trace of `fn` (jax.make_jaxpr); nothing is compiled or run.
    """
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    outs = jaxpr_output_dependence(jaxpr, [frozenset([i]) for i in range(len(jaxpr.invars))])
    return {i for d in outs for i in d if i < num_inputs}
