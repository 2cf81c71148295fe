"""Finding the slow weights inside any optimizer state."""

import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _checks
from lookahead_optax import _tree
from lookahead_optax._lookahead import LookaheadState


def _is_lookahead_state(x: Any) -> bool:
  return isinstance(x, LookaheadState)


def _unwrap_container(state: Any) -> Any:
  """The optimizer state held by a training-state object, else `state`."""
  # A linen `TrainState` and an `nnx.Optimizer` keep theirs in `opt_state`.
  if not isinstance(state, tuple) and hasattr(state, "opt_state"):
    return state.opt_state
  return state


def _is_nnx_variable(x: Any) -> bool:
  """Whether `x` is a Flax NNX `Variable` (without importing Flax)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def _is_hole_or_variable(x: Any) -> bool:
  return _tree.is_masked_node(x) or _is_nnx_variable(x)


def _unwrap_leaf(x: Any) -> Any:
  """The array inside a Flax NNX variable, else `x`."""
  return x.get_value() if _is_nnx_variable(x) else x


def _outermost_lookahead_states(state: Any) -> list[LookaheadState]:
  leaves = jax.tree.leaves(
      _unwrap_container(state), is_leaf=_is_lookahead_state
  )
  return [x for x in leaves if _is_lookahead_state(x)]


def _merge(a: Any, b: Any) -> Any:
  """Merges two slow-param trees that hold disjoint leaves (MaskedNode holes)."""

  def pick(x, y):
    x_hole, y_hole = _tree.is_masked_node(x), _tree.is_masked_node(y)
    if x_hole:
      return y
    if y_hole:
      return x
    raise _checks.WordedError(
        "Several lookahead states hold slow weights for the same parameter; "
        "call `slow_params` on the state of the one you want."
    )

  try:
    return jax.tree.map(pick, a, b, is_leaf=_tree.is_masked_node)
  except _checks.WordedError:
    raise
  except ValueError as e:
    raise ValueError(
        "Several lookahead states with slow weights of different structures; "
        "call `slow_params` on the state of the one you want."
    ) from e


def slow_params(state: Any) -> optax.Params:
  """Returns the slow weights held in an optimizer state.

  Searches any nested optax state (`optax.chain`, `optax.masked`,
  `optax.multi_transform`, `optax.inject_hyperparams`, `optax.MultiSteps`,
  ...), and also accepts an object that keeps its optimizer state in an
  `opt_state` attribute (a Flax linen `TrainState`, an `nnx.Optimizer`). With
  nested lookaheads it returns the outermost one's slow weights. When several
  lookaheads each handle a part of the params (e.g. in different groups of
  `optax.multi_transform`), their slow weights are merged into one tree.
  Params that no lookahead handles are `optax.MaskedNode()` in the result.
  From an `nnx.Optimizer`, whose state holds NNX variables, the result holds
  their plain arrays.

  Args:
    state: an optimizer state, or a training-state object with `opt_state`.

  Returns:
    The slow weights, a pytree with the structure of the params.

  Raises:
    ValueError: if `state` holds no `LookaheadState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = optax.chain(optax.clip(1.0), lo.lookahead(optax.sgd(0.1)))
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> lo.slow_params(state)
    {'w': Array([1., 1.], dtype=float32)}
  """
  found = _outermost_lookahead_states(state)
  if not found:
    raise _checks.WordedError(
        "No LookaheadState found in the given optimizer state of type "
        f"{type(state).__name__}: was the optimizer built with "
        "`lookahead_optax.lookahead`?"
    )
  slow = found[0].slow_params
  for other in found[1:]:
    slow = _merge(slow, other.slow_params)
  # An `nnx.Optimizer` holds its state in NNX variables: return their arrays.
  return jax.tree.map(_unwrap_leaf, slow, is_leaf=_is_hole_or_variable)


def eval_params(state: Any, params: optax.Params) -> optax.Params:
  """Returns `params` with the slow weights substituted where lookahead applies.

  This is what to evaluate (the paper recommends evaluating on the slow
  weights). Leaves that no lookahead handles (e.g. masked out) keep their
  value from `params`; slow weights kept in a higher precision (`slow_dtype`)
  are cast back to the params' dtypes.
  `params` may be an NNX state such as `nnx.state(model, nnx.Param)`: the
  result then holds variables of the same types, ready for `nnx.update`.

  Args:
    state: an optimizer state, or a training-state object with `opt_state`.
    params: the current (fast) params.

  Returns:
    A pytree like `params`, with the slow weights where lookahead applies.

  Raises:
    ValueError: if `state` holds no `LookaheadState`, or its slow weights do
      not have the structure and shapes of `params` (naming the first leaf
      that differs).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.lookahead(optax.sgd(1.0), sync_period=3)
    >>> params = {"w": jnp.array([1.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.5])}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params, lo.eval_params(state, params)
    ({'w': Array([0.5], dtype=float32)}, {'w': Array([1.], dtype=float32)})
  """
  slow = slow_params(state)
  slow_def = jax.tree.structure(slow, is_leaf=_tree.is_masked_node)
  try:
    param_leaves = slow_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "The slow weights do not have the structure of `params`: "
        f"{slow_def} vs {jax.tree.structure(params)}."
    ) from e
  slow_leaves = jax.tree_util.tree_flatten_with_path(
      slow, is_leaf=_tree.is_masked_node)[0]

  def substitute(path, s, p):
    if _tree.is_masked_node(s):
      return p
    p_value = _unwrap_leaf(p)
    if jnp.shape(s) != jnp.shape(p_value):
      raise ValueError(
          f"`params` leaf {_tree.path_str(path)} has shape "
          f"{jnp.shape(p_value)}, but its slow weights have shape "
          f"{jnp.shape(s)}: are these the params this optimizer trains?"
      )
    value = jnp.asarray(s).astype(jnp.result_type(p_value))
    if _is_nnx_variable(p):
      # e.g. `nnx.state(model, nnx.Param)`: keep the variable type.
      return p.replace(value=value)
    return value

  return slow_def.unflatten([
      substitute(path, s, p)
      for (path, s), p in zip(slow_leaves, param_leaves)])
