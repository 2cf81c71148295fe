"""Evaluating Flax models on the slow weights.

Flax is not a dependency of lookahead_optax: it is imported inside the
functions that need it. `lookahead` itself needs no adapter to train a Flax
model (it is a plain optax transformation whose params stay a plain pytree);
these helpers only save the few lines it takes to evaluate on the slow weights.
"""

from typing import Any

from lookahead_optax import _checks
from lookahead_optax._state import eval_params


def eval_train_state(state: Any) -> Any:
  """Returns a Flax linen `TrainState` whose params are the slow weights.

  The rest of the state (`step`, `apply_fn`, `tx`, `opt_state` and any custom
  fields such as batch statistics) is shared, not copied; the training state
  is left as it was. Use the result to evaluate, keep training with `state`.
  Works under `jax.jit`.

  Args:
    state: a `flax.training.train_state.TrainState` (or any Flax
      `struct.dataclass` with `params`, `opt_state` and `replace`) whose `tx`
      contains a `lookahead`.

  Returns:
    `state.replace(params=lookahead_optax.eval_params(state, state.params))`.

  Raises:
    TypeError: if `state` has no `params`, `opt_state` or `replace`.
    ValueError: if its `opt_state` holds no `LookaheadState`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import linen as nn
    >>> from flax.training import train_state
    >>> import lookahead_optax as lo
    >>> model = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones)
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.key(0), jnp.ones((1, 1)))["params"],
    ...     tx=lo.lookahead(optax.sgd(1.0), sync_period=2))
    >>> grads = {"kernel": jnp.array([[0.5]])}
    >>> state = state.apply_gradients(grads=grads)  # fast: 1 -> 0.5
    >>> slow = lo.eval_train_state(state)
    >>> print(state.params["kernel"], slow.params["kernel"])
    [[0.5]] [[1.]]
    >>> print(slow.apply_fn({"params": slow.params}, jnp.array([[3.0]])))
    [[3.]]
  """
  for name in ("params", "opt_state", "replace"):
    if not hasattr(state, name):
      raise TypeError(
          "`state` must be a Flax TrainState (with `params`, `opt_state` and "
          f"`replace`), got {type(state).__name__} without `{name}`."
      )
  return state.replace(params=eval_params(state.opt_state, state.params))


def eval_model(model: Any, optimizer: Any) -> Any:
  """Returns a copy of a Flax NNX model that holds the slow weights.

  The variables that `optimizer` updates (its `wrt` filter, e.g. `nnx.Param`)
  take the slow weights of its `lookahead` state, cast to their dtypes; all
  other variables (batch statistics, RNG state, ...) are copied from `model`.
  `model` and `optimizer` are left as they were, so training goes on from the
  fast weights. Works inside `nnx.jit`.

  Args:
    model: the NNX module being trained.
    optimizer: the `nnx.Optimizer` that trains it, built with a `lookahead`.

  Returns:
    A new module of the same type as `model`, on the slow weights.

  Raises:
    TypeError: if `model` is not an NNX module or `optimizer` has no
      `opt_state`.
    ValueError: if the optimizer state holds no `LookaheadState`, or its slow
      weights do not have the structure of the model's params.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import nnx
    >>> import lookahead_optax as lo
    >>> model = nnx.Linear(1, 1, use_bias=False,
    ...                    kernel_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, lo.lookahead(optax.sgd(1.0), sync_period=2), wrt=nnx.Param)
    >>> grads = nnx.State({"kernel": nnx.Param(jnp.array([[0.5]]))})
    >>> _ = optimizer.update(model, grads)  # fast: 1 -> 0.5
    >>> slow = lo.eval_model(model, optimizer)
    >>> print(model.kernel[...], slow.kernel[...])
    [[0.5]] [[1.]]
    >>> print(slow(jnp.array([[3.0]])))
    [[3.]]

  References:
    Zhang, Lucas, Hinton, Ba, [Lookahead Optimizer: k steps forward, 1 step
    back](https://arxiv.org/abs/1907.08610), NeurIPS 2019 (evaluates on the
    slow weights).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"`model` must be a Flax NNX Module, got {type(model).__name__}."
    )
  if not hasattr(optimizer, "opt_state"):
    raise TypeError(
        "`optimizer` must be an nnx.Optimizer (with `opt_state`), got "
        f"{type(optimizer).__name__}."
    )
  wrt = getattr(optimizer, "wrt", nnx.Param)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  try:
    slow = eval_params(optimizer, params)
  except _checks.WordedError:
    raise  # no lookahead in the optimizer, said as such
  except ValueError as e:
    raise ValueError(
        "`model` is not the model `optimizer` trains: its params do not "
        f"match the optimizer's slow weights. {e}"
    ) from e
  return nnx.merge(graphdef, slow, rest, copy=True)
