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

  def map_per_param(self, fn: Any, per_param: list, state: Any,
                    *others: Any) -> Any:
    """`fn(a, x, *ys)` on each parameter-shaped leaf `x`, `a` from its param.

    `per_param` holds one entry per params leaf; None leaves the leaves of
    that param as they are.
    """
    return _tree.map_param_shaped(fn, per_param, self._params, state,
                                  *others, probe=self._probe)


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


def _any(mask: jax.Array) -> jax.Array:
  """`jnp.any(mask)`, as a max over int8 (XLA:CPU reduces it faster)."""
  return jnp.max(mask.astype(jnp.int8), initial=0) > 0


def is_nonfinite(params: Any, inner_updates: Any) -> jax.Array:
  """Whether the inner update, or the fast params it gives, is not finite.

  One reduction over the floating leaves; False when there are none. For
  floating params the fast params alone tell: a non-finite update makes
  them non-finite too.
  """
  flags = []
  for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(inner_updates)):
    if not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
      continue
    fast = jnp.asarray(p + u).astype(jnp.result_type(p))
    if jnp.issubdtype(jnp.result_type(p), jnp.floating):
      flags.append(_any(~jnp.isfinite(fast)))
    else:
      flags.append(_any(~jnp.isfinite(u) | ~jnp.isfinite(fast)))
  if not flags:
    return jnp.zeros([], bool)
  return jnp.any(jnp.stack(flags))


def _rollback_update(p: jax.Array, u: jax.Array, s: jax.Array) -> jax.Array:
  """The update that sends `p` back to the slow weights `s`."""
  if not jnp.issubdtype(jnp.result_type(p), jnp.number):
    return jnp.zeros_like(u)  # bool leaves: no arithmetic, stay as they are
  return jnp.asarray(s.astype(jnp.result_type(p)) - p).astype(
      jnp.result_type(u))


def reset_where(flag: jax.Array, param_shaped: ParamShaped, state: Any,
                init: Any) -> Any:
  """Where `flag`, the parameter-shaped leaves back to `init`'s values."""
  return param_shaped.map(
      lambda x, i: jnp.where(flag, jnp.asarray(i, dtype=x.dtype), x),
      state, init)


def reset_where_per_param(flags: list, param_shaped: ParamShaped,
                          state: Any, init: Any) -> Any:
  """Each param's leaves back to `init`'s values where its flag is set."""
  return param_shaped.map_per_param(
      lambda flag, x, i: jnp.where(flag, jnp.asarray(i, dtype=x.dtype), x),
      flags, state, init)


def rollback(bad: jax.Array, params: Any, inner_updates: Any, slow: Any,
             updates: Any) -> Any:
  """Where `bad`, the updates that send the params back to the slow weights.

  The inner state's part of the rollback (`reset_where`) is the inner-state
  policy's (see `_formulation.Pieces`).
  """
  back = jax.tree.map(_rollback_update, params, inner_updates, slow)
  return jax.tree.map(lambda b, u: jnp.where(bad, b, u), back, updates)


def checked_step(inner: Any, grads: Any, current: Any, params: Any,
                 extra_args: dict, rollback: bool
                 ) -> tuple[Any, Any, Optional[jax.Array]]:
  """The inner update, its new state and (`rollback`) whether it is not finite.

  The check reads the inner updates, which XLA keeps in a buffer for it
  (the `"loop"` formulation may check by a pass of its own instead, see
  `_loop.Loop.inner_step`); a costly inner update is never computed twice.
  """
  inner_updates, new_inner = inner.update(grads, current, params,
                                          **extra_args)
  if not rollback:
    return inner_updates, new_inner, None
  return inner_updates, new_inner, is_nonfinite(params, inner_updates)
