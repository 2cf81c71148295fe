"""Inner-state policies at a sync, and the policy for a non-finite step.

The inner optimizer's state holds parameter-shaped leaves (e.g. Adam's
moments) and others (step counts, hyperparameters, flags). At a sync,
`inner_state="keep"` leaves it alone, `"reset"` sends the parameter-shaped
leaves back to their initial values and `"pullback"` interpolates them
towards their value at the last sync. `on_nonfinite="rollback"` turns a step
whose update is not finite into a return to the slow weights.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _tree

INNER_STATE_POLICIES = ("keep", "reset", "pullback")
NONFINITE_POLICIES = ("propagate", "rollback")


class ParamShaped:
  """The parameter-shaped leaves of an inner optimizer's state.

  Found by structure: a leaf is parameter-shaped when the inner optimizer's
  `init` builds it from a parameter (it has the parameter's shape there, and
  follows it when the parameter's shape changes; see `_tree.probe_state`).
  """

  def __init__(self, init_fn: Any, params: Any):
    self._params = params
    self._num_params = len(jax.tree.leaves(
        params, is_leaf=_tree.is_masked_node))
    self._probe = _tree.probe_state(init_fn, params)

  def map(self, fn: Any, state: Any, *others: Any) -> Any:
    """`fn(x, *ys)` on each parameter-shaped leaf `x` of `state`."""
    return _tree.map_param_shaped(
        lambda _, x, *ys: fn(x, *ys), [True] * self._num_params,
        self._params, state, *others, probe=self._probe)


def reset(param_shaped: ParamShaped, state: Any, init: Any) -> Any:
  """The parameter-shaped leaves back to `init`'s values, dtypes kept."""
  return param_shaped.map(
      lambda x, i: jnp.asarray(i, dtype=x.dtype), state, init)


def pullback(param_shaped: ParamShaped, state: Any, synced: Any,
             alpha: jax.Array) -> Any:
  """$s + \\alpha (x - s)$ on each parameter-shaped leaf `x` (`s`: synced)."""
  return param_shaped.map(
      lambda x, s: (s + alpha.astype(x.dtype) * (x - s)).astype(x.dtype),
      state, synced)


def at_sync(policy: str, param_shaped: Optional[ParamShaped], inner_state: Any,
            synced: Any, init: Any, alpha: Optional[jax.Array]
            ) -> tuple[Any, Any]:
  """The inner state, and its last-synced copy, after a sync."""
  if policy == "reset":
    return reset(param_shaped, inner_state, init), synced
  if policy == "pullback":
    pulled = pullback(param_shaped, inner_state, synced, alpha)
    return pulled, pulled
  return inner_state, synced


def is_nonfinite(params: Any, inner_updates: Any) -> jax.Array:
  """Whether the inner update, or the fast params it gives, is not finite.

  One reduction over the floating leaves; False when there are none.
  """
  flags = []
  for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(inner_updates)):
    if not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
      continue
    fast = jnp.asarray(p + u).astype(jnp.result_type(p))
    flags.append(jnp.any(~jnp.isfinite(u) | ~jnp.isfinite(fast)))
  if not flags:
    return jnp.zeros([], bool)
  return jnp.any(jnp.stack(flags))


def _rollback_update(p: jax.Array, u: jax.Array, s: jax.Array) -> jax.Array:
  """The update that sends `p` back to the slow weights `s`."""
  if not jnp.issubdtype(jnp.result_type(p), jnp.number):
    return jnp.zeros_like(u)  # bool leaves: no arithmetic, stay as they are
  return jnp.asarray(s.astype(jnp.result_type(p)) - p).astype(
      jnp.result_type(u))


def rollback(bad: jax.Array, params: Any, inner_updates: Any, slow: Any,
             updates: Any, inner_state: Any, param_shaped: ParamShaped,
             init: Any) -> tuple[Any, Any]:
  """Where `bad`: updates back to the slow weights, inner state reset."""
  back = jax.tree.map(_rollback_update, params, inner_updates, slow)
  updates = jax.tree.map(lambda b, u: jnp.where(bad, b, u), back, updates)
  inner_state = param_shaped.map(
      lambda x, i: jnp.where(bad, jnp.asarray(i, dtype=x.dtype), x),
      inner_state, init)
  return updates, inner_state
