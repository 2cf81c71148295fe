"""The parts of `lazy`: its mask, touched ids, row masks and checks.

Every check raises an error naming the leaf path; they inspect static shapes,
dtypes and tree structures only, so they cost nothing in a compiled step.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax import _sparse
from lookahead_optax import _tree

_KeyPath = tuple


def leaves_with_path(tree: Any) -> list:
  """(key path, leaf) pairs of `tree`, with `optax.MaskedNode` as a leaf."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_tree.is_masked_node)[0]


def mask_structure_error(mask_tree: Any, params: Any) -> ValueError:
  """A ValueError naming the first path where `mask_tree` and params differ."""
  mask_paths = [tuple(p) for p, _ in leaves_with_path(mask_tree)]
  param_paths = [tuple(p) for p, _ in leaves_with_path(params)]

  def covers(prefix, path):
    return path[:len(prefix)] == prefix

  detail = None
  for path in mask_paths:
    if not any(covers(path, p) for p in param_paths):
      detail = f"the mask has {_tree.path_str(path)}, the params do not"
      break
  if detail is None:
    for path in param_paths:
      if not any(covers(m, path) for m in mask_paths):
        detail = f"the params have {_tree.path_str(path)}, the mask does not"
        break
  if detail is None:
    detail = (f"{jax.tree.structure(mask_tree)} vs "
              f"{jax.tree.structure(params)}")
  return ValueError(
      "`mask` must have the tree structure of the params (or be a prefix of "
      f"it): {detail}.")


def as_bool(path: _KeyPath, value: Any) -> bool:
  if _checks.is_traced(value):
    raise TypeError(
        f"`mask` leaf {_tree.path_str(path)} is a traced value: the mask must be "
        "static (Python bools), e.g. computed from the params' shapes.")
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and (
      value.dtype == bool):
    return bool(value)
  raise TypeError(
      f"`mask` leaf {_tree.path_str(path)} must be a bool, got {value!r}.")


def default_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def broadcast_mask(mask_tree: Any, params: Any) -> list:
  """(path, mask leaf) for each params leaf.

  The mask is a prefix of the params' structure, or names the params leaves
  by path (a plain dict for the `nnx.State` of an NNX model), covering each
  of them.
  """
  def broadcast(m, sub):
    return jax.tree.map(lambda _: m, sub, is_leaf=_tree.is_masked_node)

  param_leaves = leaves_with_path(params)
  try:
    full_leaves = leaves_with_path(jax.tree.map(broadcast, mask_tree, params))
    if len(full_leaves) == len(param_leaves):
      return full_leaves
  except (ValueError, TypeError):
    pass
  per_param, unused = _tree.by_path_prefix(mask_tree, params)
  if unused or any(m is None and not _tree.is_masked_node(p)
                   for m, (_, p) in zip(per_param, param_leaves)):
    raise mask_structure_error(mask_tree, params)
  return [(path, optax.MaskedNode() if m is None else m[1])
          for m, (path, _) in zip(per_param, param_leaves)]


def resolve_mask(mask: Any, params: Any) -> list:
  """One Python bool per leaf of `params` (flattened with MaskedNode leaves).

  Raises:
    ValueError: if the mask does not match the params or selects a scalar.
    TypeError: if a mask leaf is not a static bool.
  """
  if mask is None:
    mask_tree = default_mask(params)
  elif callable(mask):
    mask_tree = mask(params)
  else:
    mask_tree = mask

  full_leaves = broadcast_mask(mask_tree, params)
  param_leaves = leaves_with_path(params)
  flags = []
  for (path, m), (_, p) in zip(full_leaves, param_leaves):
    if _tree.is_masked_node(p) or _tree.is_masked_node(m):
      flags.append(False)
      continue
    flag = as_bool(path, m)
    if flag and jnp.ndim(p) == 0:
      raise ValueError(
          f"`mask` selects leaf {_tree.path_str(path)}, which has ndim 0: lazy "
          "updates need rows (slices along axis 0) of a leaf with ndim >= 1."
      )
    flags.append(flag)
  return flags


def touched_ids(touched_rows: Any, params: Any, flags: list) -> list:
  """The ids given for each params leaf (None where none), checked.

  Raises:
    ValueError: if a leaf of `touched_rows` has no parameter leaf at its path,
      belongs to a leaf outside the mask, or (when concrete) holds ids out of
      range.
    TypeError: if the ids are not integers.
  """
  param_leaves = leaves_with_path(params)
  index = {tuple(path): i for i, (path, _) in enumerate(param_leaves)}
  ids = [None] * len(param_leaves)
  for path, value in jax.tree_util.tree_flatten_with_path(touched_rows)[0]:
    path = tuple(path)
    where = _tree.path_str(path)
    i = index.get(path)
    if i is None:
      hint = ""
      if any(path[:len(p)] == p for p in index):
        hint = " (the ids of a leaf must be one integer array)"
      raise ValueError(
          f"`touched_rows` leaf {where} does not match any parameter leaf"
          f"{hint}.")
    param = param_leaves[i][1]
    if _tree.is_masked_node(param):
      continue  # A leaf handled by another transformation (a partition).
    if not flags[i]:
      raise ValueError(
          f"`touched_rows` has ids for leaf {where}, which is outside the "
          "mask of `lazy`: only masked leaves take touched rows.")
    if not hasattr(value, "dtype"):
      value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(
          f"`touched_rows` leaf {where} must hold integer row ids, got dtype "
          f"{value.dtype}.")
    num_rows = jnp.shape(param)[0]
    if not _checks.is_traced(value):
      concrete = np.asarray(value)
      bad = concrete[(concrete < 0) | (concrete >= num_rows)]
      if bad.size:
        raise ValueError(
            f"`touched_rows` leaf {where} has id {int(bad.ravel()[0])} out of "
            f"range: ids must be in [0, {num_rows}), the rows of the "
            "parameter.")
    ids[i] = value
  return ids


def is_grad_leaf(x: Any) -> bool:
  return _tree.is_masked_node(x) or isinstance(x, _sparse.SparseRows)


def check_sparse_free(name: str, tree: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_grad_leaf)[0]:
    if isinstance(leaf, _sparse.SparseRows):
      raise TypeError(
          f"`{name}` leaf {_tree.path_str(path)} is a `SparseRows`: only "
          "gradients and updates can be row-sparse, the params are dense.")


def check_no_lookahead_inside(inner_state: Any) -> None:
  """Raises if the inner optimizer contains a `lookahead`."""

  def is_lookahead(x):
    return (type(x).__name__ == "LookaheadState"
            and type(x).__module__.startswith("lookahead_optax"))

  for path, leaf in jax.tree_util.tree_flatten_with_path(
      inner_state, is_leaf=is_lookahead)[0]:
    if is_lookahead(leaf):
      raise ValueError(
          "`inner` of `lazy` contains a `lookahead` (its state has a "
          f"LookaheadState at {_tree.path_str(path)}): lookahead goes outside "
          "lazy, `lo.lookahead(lo.lazy(inner))`, so that its slow weights see "
          "the lazy updates and untouched rows stay bitwise unchanged.")


def check_updates(updates: Any, params: Any) -> list:
  """The leaves of `updates` (SparseRows and MaskedNode as leaves), checked.

  Raises:
    ValueError: naming the leaf, if `updates` lacks a leaf of `params`, has
      one `params` lacks, or has a dense leaf of another shape.
  """
  grads = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_grad_leaf)
  grad_leaves = [g for _, g in grads[0]]
  if params is None:
    return grad_leaves
  check_sparse_free("params", params)
  param_items = leaves_with_path(params)
  grad_paths = [tuple(p) for p, _ in grads[0]]
  param_paths = [tuple(p) for p, _ in param_items]
  if grad_paths != param_paths:
    missing = [p for p in param_paths if p not in set(grad_paths)]
    extra = [p for p in grad_paths if p not in set(param_paths)]
    if missing:
      detail = f"the params have leaf {_tree.path_str(missing[0])}, the " \
               "gradients do not"
    elif extra:
      detail = f"the gradients have leaf {_tree.path_str(extra[0])}, the " \
               "params do not"
    else:
      detail = (f"{jax.tree.structure(updates, is_leaf=is_grad_leaf)} vs "
                f"{jax.tree.structure(params, is_leaf=_tree.is_masked_node)}")
    raise ValueError(
        "`updates` must have the tree structure of the params: "
        f"{detail}.")
  for (path, g), (_, p) in zip(grads[0], param_items):
    if _tree.is_masked_node(g) or _tree.is_masked_node(p):
      continue
    if isinstance(g, _sparse.SparseRows):
      g.check_table(p, _tree.path_str(path))
      continue
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"`updates` leaf {_tree.path_str(path)} has shape "
          f"{tuple(jnp.shape(g))}, but the parameter has shape "
          f"{tuple(jnp.shape(p))}.")
  return grad_leaves


def sparse_leaves(grad_leaves: list, param_leaves: list, flags: list,
                   ids: list, param_items: list) -> list:
  """Per leaf: the deduplicated `SparseRows` gradient, or None (dense leaf).

  Ids given in `touched_rows` for a sparse leaf join it with zero rows.

  Raises:
    ValueError: naming the leaf, if a `SparseRows` is at a leaf outside the
      mask or (when concrete) has ids out of range.
  """
  out = []
  for i, g in enumerate(grad_leaves):
    if not isinstance(g, _sparse.SparseRows):
      out.append(None)
      continue
    where = _tree.path_str(param_items[i][0])
    if not flags[i]:
      raise ValueError(
          f"`updates` leaf {where} is a `SparseRows`, but the leaf is outside "
          "the mask of `lazy`: only masked leaves (tables updated lazily) take "
          "row-sparse gradients.")
    num_rows = jnp.shape(param_leaves[i])[0]
    if not _checks.is_traced(g.ids):
      concrete = np.asarray(g.ids)
      bad = concrete[(concrete < 0) | (concrete > num_rows)]
      if bad.size:
        raise ValueError(
            f"`updates` leaf {where} is a `SparseRows` with id "
            f"{int(bad.ravel()[0])} out of range: ids must be in "
            f"[0, {num_rows}), the rows of the parameter, or be the fill id "
            f"{num_rows} (padding, ignored).")
    g_ids, values = g.ids, jnp.asarray(g.values)
    if ids[i] is not None:
      extra = jnp.ravel(jnp.asarray(ids[i])).astype(jnp.result_type(g_ids))
      g_ids = jnp.concatenate([g_ids, extra])
      values = jnp.concatenate(
          [values, jnp.zeros((extra.shape[0],) + values.shape[1:],
                             values.dtype)])
    unique, summed = _sparse.dedupe_ids(g_ids, values, num_rows)
    out.append(_sparse.SparseRows._make(unique, summed))  # pylint: disable=protected-access
  return out


def check_row_state(inner: Any, row_state: Any, row_params: Any) -> None:
  """Raises if the gathered inner state is not what `inner` has for rows.

  An inner state leaf with one entry per row that is not parameter-shaped
  (e.g. Adafactor's factored second moments) cannot be gathered.
  """
  expected = jax.eval_shape(inner.init, row_params)
  got_leaves, got_def = jax.tree.flatten(row_state,
                                         is_leaf=_tree.is_masked_node)
  want_leaves, want_def = jax.tree.flatten(expected,
                                           is_leaf=_tree.is_masked_node)
  same = got_def == want_def and all(
      _tree.is_masked_node(a) or jnp.shape(a) == jnp.shape(b)
      for a, b in zip(got_leaves, want_leaves))
  if not same:
    raise ValueError(
        "`lazy` cannot run `inner` on the rows of a `SparseRows` gradient: "
        "the inner state has leaves that depend on the table size but are not "
        "parameter-shaped (e.g. Adafactor's factored moments). Use a dense "
        "gradient for this table, or an inner optimizer with per-element "
        "state (adam, adamw, sgd, ...).")


# Dense masked leaves at least this large trigger the CPU copy warning.
