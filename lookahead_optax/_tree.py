"""Pytree helpers: finding the parameter-shaped leaves of an optimizer state."""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax


def is_masked_node(x: Any) -> bool:
  """Whether `x` is an `optax.MaskedNode` (a hole left by a mask)."""
  return isinstance(x, optax.MaskedNode)


def path_str(path: Any) -> str:
  """A key path as text for error messages (`<root>` for the root)."""
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def by_path_prefix(tree: Any, params: Any) -> tuple[list, list]:
  """Matches the leaves of `tree` to the params leaves they name by path.

  A leaf of `tree` at path P names every params leaf whose path starts
  with P, so a plain dict names the leaves of an `nnx.State` (whose leaves'
  paths end in `.value`) as it names those of a dict.

  Returns:
    `(per_param, unused)`: for each params leaf (flattened with MaskedNode
    leaves), the `(path, leaf)` of `tree` that names it, or None; and the
    paths of the leaves of `tree` that name no params leaf.
  """
  param_paths = [tuple(path) for path, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=is_masked_node)[0]]
  per_param, unused = [None] * len(param_paths), []
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_masked_node)[0]:
    path = tuple(path)
    hits = [i for i, p in enumerate(param_paths) if p[:len(path)] == path]
    if not hits:
      unused.append(path)
    for i in hits:
      per_param[i] = (path, leaf)
  return per_param, unused


def _probe_shape(shape: tuple) -> tuple:
  """A shape that differs from `shape` in every leaf (for `probe_state`)."""
  if not shape:
    return (1,)
  return (2 * shape[0] + 1,) + tuple(shape[1:])


def probe_state(init_fn: Callable[[Any], Any], params: Any) -> Optional[Any]:
  """The shapes of `init_fn`'s state for params of other shapes, or None.

  A leaf of an optimizer state is built from the params (one value per
  parameter, e.g. Adam's moments) exactly when its shape follows the params'
  shapes. `init_fn` is traced (`jax.eval_shape`, no computation) on params
  whose every leaf has another shape; the leaves of the result that changed
  shape with their parameter are the parameter-shaped ones. This tells a
  hyperparameter (a scalar the state holds, e.g. from
  `optax.inject_hyperparams`) from the moment of a scalar parameter.

  Returns:
    The state of `init_fn` for the probe params (`jax.ShapeDtypeStruct`
    leaves), or None when `init_fn` cannot be traced on them (e.g. it builds
    a different state for other shapes); callers then rely on the shapes and
    tree structure alone.
  """

  def probe(p):
    if is_masked_node(p):
      return p
    return jax.ShapeDtypeStruct(_probe_shape(jnp.shape(p)), jnp.result_type(p))

  probe_params = jax.tree.map(probe, params, is_leaf=is_masked_node)
  try:
    return jax.eval_shape(init_fn, probe_params)
  except Exception:  # pylint: disable=broad-except
    return None


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


def _follows_probe(leaf: Any, probe_leaf: Any, param: Any) -> bool:
  """Whether a state leaf changed shape with its parameter in the probe."""
  return (hasattr(probe_leaf, "shape")
          and tuple(probe_leaf.shape) == _probe_shape(jnp.shape(param))
          and jnp.shape(leaf) == jnp.shape(param))


def _same_structure(a: Any, b: Any) -> bool:
  return (jax.tree.structure(a, is_leaf=is_masked_node)
          == jax.tree.structure(b, is_leaf=is_masked_node))


def map_param_shaped(fn: Any, per_param: Any, params: Any, state: Any,
                     *others: Any, probe: Optional[Any] = None) -> Any:
  """Maps `fn` over the parameter-shaped leaves of an optimizer state.

  Parameter-shaped leaves hold one value per parameter (e.g. Adam's first and
  second moments, a momentum trace); counters, flags and hyperparameters are
  not. A subtree of `state` counts as a copy of the params when it has the
  params' tree structure (with `optax.MaskedNode` standing in for masked-out
  leaves, as in `optax.masked` and `optax.multi_transform` states) and its
  leaves have the params' shapes and a floating dtype. When `probe` (from
  `probe_state`) is given, a leaf counts only if it also changed shape with
  its parameter there, so that a scalar hyperparameter is never mistaken for
  the state of a scalar parameter.

  Replaces each such leaf `x` with `fn(aux, x, *ys)`, where `aux` is the leaf
  of `per_param` for the same parameter and `ys` are the matching leaves of
  `others` (trees with the structure of `state`, e.g. the previous state).
  When `aux` is None the leaf is kept as it is, and so is every other leaf of
  `state` (counters, flags, MaskedNode holes).

  Args:
    fn: `fn(aux, x, *ys) -> new x`.
    per_param: a list with one entry per leaf of `params` (flattened with
      `optax.MaskedNode` as a leaf), e.g. a row mask or None.
    params: the parameters (or their shapes) the state was initialised with.
    state: an optimizer state.
    *others: trees with the structure of `state`.
    probe: optional, `probe_state(init, params)` for the `init` that built
      `state`; ignored when it does not have the structure of `state`.

  Returns:
    A tree with the structure of `state`.
  """
  if probe is not None and not _same_structure(probe, state):
    probe = None
  param_leaves = jax.tree.leaves(params, is_leaf=is_masked_node)

  def visit(node, probe_node, *other_nodes):
    if _matches_params(node, params):
      leaves, treedef = jax.tree.flatten(node, is_leaf=is_masked_node)
      probe_leaves = (None if probe_node is None else
                      jax.tree.leaves(probe_node, is_leaf=is_masked_node))
      other_leaves = [jax.tree.leaves(o, is_leaf=is_masked_node)
                      for o in other_nodes]
      out = []
      for i, (aux, leaf) in enumerate(zip(per_param, leaves)):
        skip = aux is None or is_masked_node(leaf) or (
            probe_leaves is not None and
            not _follows_probe(leaf, probe_leaves[i], param_leaves[i]))
        out.append(leaf if skip else
                   fn(aux, leaf, *(o[i] for o in other_leaves)))
      return jax.tree.unflatten(treedef, out)
    children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
      return node  # A leaf that is not param-shaped.
    probe_children = ([None] * len(children) if probe_node is None
                      else treedef.flatten_up_to(probe_node))
    other_children = [treedef.flatten_up_to(o) for o in other_nodes]
    return jax.tree.unflatten(treedef, [
        visit(c, probe_children[i], *(oc[i] for oc in other_children))
        for i, c in enumerate(children)])

  return visit(state, probe, *others)
