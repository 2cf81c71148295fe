"""Pytree helpers: finding the parameter-shaped leaves of an optimizer state."""

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _matches_params(node: Any, params: Any) -> bool:
  """Whether `node` is a copy of the params tree (MaskedNode for holes)."""
  node_leaves, node_def = jax.tree.flatten(node, is_leaf=_is_masked_node)
  param_leaves, param_def = jax.tree.flatten(params, is_leaf=_is_masked_node)
  if node_def != param_def or not node_leaves:
    return False
  for leaf, param in zip(node_leaves, param_leaves):
    if _is_masked_node(leaf) or _is_masked_node(param):
      continue
    if not hasattr(leaf, "shape") or jnp.shape(leaf) != jnp.shape(param):
      return False
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      return False
  return True


def param_shaped_mask(state: Any, params: Any) -> Any:
  """Marks the leaves of `state` that sit in a copy of the params tree.

  These are the leaves that hold one value per parameter (e.g. Adam's first and
  second moments, a momentum trace). Counters, flags and hyperparameters are not
  marked. A subtree counts as a copy of the params when it has the params' tree
  structure (with `optax.MaskedNode` standing in for masked-out leaves, as in
  `optax.masked` and `optax.multi_transform` states) and its leaves have the
  params' shapes and a floating dtype.

  Args:
    state: an optimizer state.
    params: the parameters the state was initialised with (or their shapes).

  Returns:
    A pytree with the structure of `state` and a Python bool at every leaf.
  """

  def visit(node):
    if _matches_params(node, params):
      return jax.tree.map(lambda _: True, node)
    children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
      return False  # `node` is a leaf that is not param-shaped.
    return jax.tree.unflatten(treedef, [visit(c) for c in children])

  return visit(state)
