"""A check for data-parallel replicas: the same values on every replica."""

from typing import Any

import jax
import numpy as np

from lookahead_optax import _tree


def check_replicas_agree(tree: Any, name: str = "params") -> None:
  """Raises unless every replica holds bitwise the same values.

  DiLoCo (`lookahead(..., axis_name=)`) needs the initial params to be
  identical on all replicas: each replica's slow weights start as its own
  initial params and move by the averaged pseudo-gradient, so replicas that
  start apart (e.g. `jax.pmap(init)(keys)` with one key per device) stay
  apart, silently. Call this on the params (or the optimizer state) before
  training, outside any transformation. It reads the arrays to the host.

  Args:
    tree: a pytree whose leaves carry the replicas along axis 0: the inputs
      or outputs of a `jax.pmap`, or arrays sharded along the replica axis
      of a mesh (their global value).
    name: what `tree` is, for the message.

  Raises:
    ValueError: naming the first leaf whose replicas differ, and the first
      replica that differs from replica 0.

  Example:
    >>> import jax.numpy as jnp
    >>> import lookahead_optax as lo
    >>> lo.check_replicas_agree({"w": jnp.ones((8, 3))})  # 8 replicas
    >>> lo.check_replicas_agree({"w": jnp.arange(8.0)[:, None]})
    Traceback (most recent call last):
    ...
    ValueError: `params` leaf ['w'] differs between replicas 0 and 1: ...
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_tree.is_masked_node)[0]:
    if _tree.is_masked_node(leaf):
      continue
    value = np.asarray(leaf)
    if value.ndim == 0:
      raise ValueError(
          f"`{name}` leaf {_tree.path_str(path)} is a scalar: expected a "
          "leading axis of replicas (the arrays of a `jax.pmap`, or sharded "
          "along the replica axis).")
    bits = value.view(f"u{value.dtype.itemsize}") if value.dtype.kind in (
        "f", "c") else value
    for r in range(1, value.shape[0]):
      if not np.array_equal(bits[r], bits[0]):
        raise ValueError(
            f"`{name}` leaf {_tree.path_str(path)} differs between replicas "
            f"0 and {r}: DiLoCo (`axis_name`) needs the same initial params "
            "on every replica (initialise once and replicate, e.g. "
            "`jax.tree.map(lambda a: jnp.stack([a] * n), init)`, not "
            "`jax.pmap(init)(keys)` with one key per replica).")
