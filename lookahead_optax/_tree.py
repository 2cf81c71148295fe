"""Pytree helpers: finding the parameter-shaped leaves of an optimizer state."""

from typing import Any

import jax
import jax.numpy as jnp
import optax


def is_masked_node(x: Any) -> bool:
  """Whether `x` is an `optax.MaskedNode` (a hole left by a mask)."""
  return isinstance(x, optax.MaskedNode)


def path_str(path: Any) -> str:
  """A key path as text for error messages (`<root>` for the root)."""
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _matches_params(node: Any, params: Any) -> bool:
  """Whether `node` is a copy of the params tree (MaskedNode for holes)."""
  node_leaves, node_def = jax.tree.flatten(node, is_leaf=is_masked_node)
  param_leaves, param_def = jax.tree.flatten(params, is_leaf=is_masked_node)
  if node_def != param_def or not node_leaves:
    return False
  for leaf, param in zip(node_leaves, param_leaves):
    if is_masked_node(leaf) or is_masked_node(param):
      continue
    if not hasattr(leaf, "shape") or jnp.shape(leaf) != jnp.shape(param):
      return False
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      return False
  return True


def map_param_shaped(fn: Any, per_param: Any, params: Any, state: Any,
                     *others: Any) -> Any:
  """Maps `fn` over the parameter-shaped leaves of an optimizer state.

  Parameter-shaped leaves hold one value per parameter (e.g. Adam's first and
  second moments, a momentum trace); counters, flags and hyperparameters are
  not. A subtree of `state` counts as a copy of the params when it has the
  params' tree structure (with `optax.MaskedNode` standing in for masked-out
  leaves, as in `optax.masked` and `optax.multi_transform` states) and its
  leaves have the params' shapes and a floating dtype.

  Finds those subtrees and replaces each leaf `x` of such a subtree with
  `fn(aux, x, *ys)`, where `aux` is the leaf of `per_param` for the same
  parameter and `ys` are the matching leaves of `others` (trees with the
  structure of `state`, e.g. the previous state). When `aux` is None the leaf
  is kept as it is. Every other leaf of `state` (counters, flags, MaskedNode
  holes) is kept as it is.

  Args:
    fn: `fn(aux, x, *ys) -> new x`.
    per_param: a list with one entry per leaf of `params` (flattened with
      `optax.MaskedNode` as a leaf), e.g. a row mask or None.
    params: the parameters (or their shapes) the state was initialised with.
    state: an optimizer state.
    *others: trees with the structure of `state`.

  Returns:
    A tree with the structure of `state`.
  """

  def visit(node, *other_nodes):
    if _matches_params(node, params):
      leaves, treedef = jax.tree.flatten(node, is_leaf=is_masked_node)
      other_leaves = [jax.tree.leaves(o, is_leaf=is_masked_node)
                      for o in other_nodes]
      out = []
      for i, (aux, leaf) in enumerate(zip(per_param, leaves)):
        if aux is None or is_masked_node(leaf):
          out.append(leaf)
        else:
          out.append(fn(aux, leaf, *(o[i] for o in other_leaves)))
      return jax.tree.unflatten(treedef, out)
    children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
      return node  # A leaf that is not param-shaped.
    other_children = [treedef.flatten_up_to(o) for o in other_nodes]
    return jax.tree.unflatten(treedef, [
        visit(c, *(oc[i] for oc in other_children))
        for i, c in enumerate(children)])

  return visit(state, *others)
