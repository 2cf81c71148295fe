"""Argument and pytree checks shared by the transformations.

Every public factory validates its arguments once, when it is called, and
raises a `ValueError` or `TypeError` whose message names the argument and the
value received. Values that are traced (e.g. hyperparameters injected by
`optax.inject_hyperparams`) cannot be inspected and are accepted as they are.
"""

import math
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lookahead_optax import _tree

# The largest step count an int32 counter holds.
MAX_INT32 = 2**31 - 1


class WordedError(ValueError):
  """A `ValueError` already worded for the user, which callers pass on.

  Code that catches JAX's own `ValueError`s to explain them catches this
  first and re-raises it as it is, instead of telling the two apart by the
  text of the message.
  """


def is_traced(value: Any) -> bool:
  """Returns True if `value` is an abstract (traced) JAX value."""
  return isinstance(value, jax.core.Tracer)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """Checks that `value` is one of the strings in `choices`."""
  if not isinstance(value, str) or value not in choices:
    valid = ", ".join(f"'{c}'" for c in choices)
    raise ValueError(f"`{name}` must be one of {valid}, got {value!r}.")
  return value


def check_sync_period(sync_period: Any) -> Any:
  """Checks that `sync_period` is an integer >= 1 (when concrete)."""
  if is_traced(sync_period):
    if not jnp.issubdtype(sync_period.dtype, jnp.integer) or sync_period.ndim:
      raise TypeError(
          "`sync_period` must be an integer >= 1, got a traced value of type "
          f"{sync_period.dtype}{list(sync_period.shape)}."
      )
    return sync_period
  if isinstance(sync_period, (bool, np.bool_)):
    raise TypeError(f"`sync_period` must be an integer >= 1, got {sync_period!r}.")
  if isinstance(sync_period, (jax.Array, np.ndarray)):
    if sync_period.ndim or not jnp.issubdtype(sync_period.dtype, jnp.integer):
      raise TypeError(
          "`sync_period` must be an integer >= 1, got an array of type "
          f"{sync_period.dtype}{list(sync_period.shape)}."
      )
    value = int(sync_period)
  elif isinstance(sync_period, numbers.Integral):
    value = int(sync_period)
  else:
    raise TypeError(f"`sync_period` must be an integer >= 1, got {sync_period!r}.")
  if value < 1:
    raise ValueError(f"`sync_period` must be an integer >= 1, got {value!r}.")
  if value > MAX_INT32:
    raise ValueError(
        f"`sync_period` must be an integer <= {MAX_INT32} (the step counter "
        f"is an int32), got {value!r}."
    )
  return sync_period


def check_step(name: str, value: Any) -> int:
  """Checks a concrete step count: an integer in [0, 2**31 - 1]."""
  expected = f"an integer in [0, {MAX_INT32}]"
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.ndim or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(
          f"`{name}` must be {expected}, got an array of type "
          f"{value.dtype}{list(value.shape)}."
      )
    value = int(value)
  elif isinstance(value, (bool, np.bool_)) or not isinstance(
      value, numbers.Integral):
    raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
  if not 0 <= int(value) <= MAX_INT32:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
  return int(value)


def _static_number(name: str, value: Any, expected: str,
                   allow_schedule: bool) -> Optional[float]:
  """The float value of a real scalar, or None if it cannot be inspected.

  None for a traced scalar (e.g. a hyperparameter injected by
  `optax.inject_hyperparams`) and, with `allow_schedule`, for a callable.

  Raises:
    TypeError: for anything else that is not a real scalar (or scalar array).
  """
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
    if allow_schedule:
      return None
    raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
  if is_traced(value):
    if value.ndim:
      raise TypeError(f"`{name}` must be {expected}, got shape {value.shape}.")
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, jax.Array, np.ndarray)
  ):
    raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
  array = np.asarray(value)
  if array.ndim or not (
      np.issubdtype(array.dtype, np.floating)
      or np.issubdtype(array.dtype, np.integer)
      or array.dtype == jnp.bfloat16
  ):
    raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
  return float(array)


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    high_open: bool = False,
    allow_schedule: bool = False,
) -> Any:
  """Checks a finite real number (or scalar array) in `[low, high]`.

  With `high_open=True` the interval is `[low, high)`. Traced scalars are
  accepted as they are (e.g. hyperparameters injected by
  `optax.inject_hyperparams`); with `allow_schedule=True` so is a callable.
  """
  interval = (f">= {low:g}" if high == math.inf else
              f"in [{low:g}, {high:g}{')' if high_open else ']'}")
  expected = f"a finite float {interval}" + (
      " or a schedule (a callable of the step count)" if allow_schedule
      else "")
  number = _static_number(name, value, expected, allow_schedule)
  if number is None:
    return value
  in_range = low <= number and (number < high if high_open else number <= high)
  if not math.isfinite(number) or not in_range:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
  return value


def check_unit_interval(name: str, value: Any, *, allow_schedule: bool) -> Any:
  """Checks a float in [0, 1], a scalar array, or (optionally) a schedule."""
  expected = "a float in [0, 1], a scalar array" + (
      " or a schedule (a callable of the sync count)" if allow_schedule else ""
  )
  number = _static_number(name, value, expected, allow_schedule)
  if number is not None and (math.isnan(number) or not 0.0 <= number <= 1.0):
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
  return value


def is_transformation(value: Any) -> bool:
  """Whether `value` looks like an optax gradient transformation."""
  return (callable(getattr(value, "init", None))
          and callable(getattr(value, "update", None)))


def check_transformation(name: str, value: Any) -> None:
  """Checks that `value` looks like an optax gradient transformation."""
  if not is_transformation(value):
    raise TypeError(
        f"`{name}` must be an optax GradientTransformation (an object with "
        f"`init` and `update`), got {value!r}."
    )


def check_same_tree(
    name: str, tree: Any, reference: Any, *, check_dtypes: bool = False,
    reference_name: str = "the optimizer state",
) -> None:
  """Checks that `tree` has the structure and leaf shapes of `reference`.

  Runs at trace time on static shapes, so it costs nothing in a compiled step.

  Raises:
    ValueError: naming the first path where `tree` and `reference` differ.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  ref_leaves, ref_treedef = jax.tree_util.tree_flatten_with_path(reference)
  if treedef != ref_treedef:
    paths = {jax.tree_util.keystr(p) for p, _ in leaves}
    ref_paths = {jax.tree_util.keystr(p) for p, _ in ref_leaves}
    missing = sorted(ref_paths - paths)
    extra = sorted(paths - ref_paths)
    detail = []
    if missing:
      detail.append(f"missing {missing[0]!s}")
    if extra:
      detail.append(f"unexpected {extra[0]!s}")
    if not detail:
      detail.append(f"{treedef} vs {ref_treedef}")
    raise ValueError(
        f"`{name}` does not have the tree structure of {reference_name} "
        f"({'; '.join(detail)})."
    )
  for (path, leaf), (_, ref) in zip(leaves, ref_leaves):
    shape, ref_shape = jnp.shape(leaf), jnp.shape(ref)
    if shape != ref_shape:
      raise ValueError(
          f"`{name}` leaf {_tree.path_str(path)} has shape "
          f"{shape}, expected {ref_shape} as in {reference_name}."
      )
    if check_dtypes:
      dtype, ref_dtype = jnp.result_type(leaf), jnp.result_type(ref)
      if dtype != ref_dtype:
        raise ValueError(
            f"`{name}` leaf {_tree.path_str(path)} has dtype "
            f"{dtype}, expected {ref_dtype} as in {reference_name}."
        )
