"""How a sync is compiled: the one place where `sync="auto"` is decided.

`lookahead(..., sync=)` names one of three formulations of the same sync:

* `"select"`: computed branch-free at every step and selected on sync steps.
  The default options fuse into the inner update's pass over the params, on
  every backend; nothing is recomputed.
* `"cond"`: the sync in a `jax.lax.cond`, the only place a collective may sit
  (`axis_name`), so that the other `sync_period - 1` steps communicate
  nothing.
* `"loop"`: the inner-state policy and the outer step in loops that run once
  on the steps that need them and not at all on the others, updating the
  state in place. It was tuned for XLA:CPU, which copies what a conditional
  carries and makes the select copy the old state; its loops are ordered
  after the params' pass by reading one element of the new params, a scalar
  all-reduce when the params are sharded over devices.

`"auto"` is resolved when the step is traced, never when the optimizer is
built (building it must not start the JAX backend, so that a multi-host
program can build its optimizer before `jax.distributed.initialize()`):

* `axis_name` -> `"cond"`;
* the default options (keep, propagate, no `outer`) -> `"select"`;
* otherwise `"loop"` on a single CPU device, `"select"` elsewhere (several
  devices, and every accelerator: `"loop"` was timed on XLA:CPU only; the
  select is what XLA's cost analysis gives the least memory traffic off CPU,
  `docs/benchmarks.md`).

Under `"loop"` two stages may compute the inner update a second time, which
XLA then fuses into the pass that needs it instead of keeping a params-sized
buffer: the rollback's finiteness check and the outer step's loop. That pays
for an elementwise inner optimizer (Adam: a few cheap passes) and doubles
the cost of one built on matrix products (Muon). `recompute_is_cheap` decides
it from the inner update's own jaxpr: only when it has no matrix product,
convolution, decomposition, loop or callback; an inner optimizer it cannot
inspect is computed once.
"""

from typing import Any, Optional

import jax
import jax.extend
import jax.numpy as jnp

SYNC_MODES = ("auto", "select", "cond", "loop")

# Primitives whose cost is not a few elementwise passes over their operands.
_COSTLY_PRIMITIVES = frozenset({
    "dot_general", "conv_general_dilated", "fft", "cholesky",
    "triangular_solve", "eig", "eigh", "svd", "qr", "lu", "lu_pivots_to_permutation",
    "householder_product", "schur", "hessenberg", "tridiagonal",
    "tridiagonal_solve", "while", "scan", "pure_callback", "io_callback",
    "callback", "custom_call", "ragged_dot", "ragged_dot_general",
})


def resolve(sync: str, *, default_options: bool,
            axis_name: Optional[str]) -> str:
  """The formulation of `sync` for the step being traced (see module doc)."""
  if sync != "auto":
    return sync
  if axis_name is not None:
    return "cond"  # the collective must run on sync steps only
  if default_options:
    return "select"
  single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  return "loop" if single_cpu else "select"


def _sub_jaxprs(eqn: Any) -> list:
  """The jaxprs nested in an equation's parameters (cond branches, calls)."""
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jax.extend.core.Jaxpr):
        found.append(item)
  return found


def _has_costly(jaxpr: Any) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _COSTLY_PRIMITIVES:
      return True
    if any(_has_costly(sub) for sub in _sub_jaxprs(eqn)):
      return True
  return False


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def recompute_is_cheap(inner: Any, grads: Any, state: Any, params: Any,
                       extra_args: dict) -> bool:
  """Whether computing `inner.update` twice costs only elementwise passes.

  Traces `inner.update` on the step's shapes (tracing only: nothing is
  computed) and looks for a costly primitive in its jaxpr, nested jaxprs
  (conditionals, calls, custom derivatives) included.
  """
  closed = jax.make_jaxpr(
      lambda g, s, p: inner.update(g, s, p, **extra_args))(
          *_abstract((grads, state, params)))
  return not _has_costly(closed.jaxpr)
