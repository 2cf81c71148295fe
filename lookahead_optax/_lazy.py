"""Lazy (row-sparse) updates for embedding tables, for any inner optimizer."""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax import _tree

_KeyPath = tuple


class LazyState(NamedTuple):
  """State of the transformation returned by `lazy`.

  Attributes:
    inner_state: the state of the inner optimizer. With ``freeze_state=True``
      the rows of its parameter-shaped leaves (e.g. Adam's moments) change
      only in the steps where the row is touched; its other leaves (e.g. step
      counts) advance at every step.
  """

  inner_state: optax.OptState


def _leaves_with_path(tree: Any) -> list:
  """(key path, leaf) pairs of `tree`, with `optax.MaskedNode` as a leaf."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_tree.is_masked_node)[0]


def _mask_structure_error(mask_tree: Any, params: Any) -> ValueError:
  """A ValueError naming the first path where `mask_tree` and params differ."""
  mask_paths = [tuple(p) for p, _ in _leaves_with_path(mask_tree)]
  param_paths = [tuple(p) for p, _ in _leaves_with_path(params)]

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


def _as_bool(path: _KeyPath, value: Any) -> bool:
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


def _default_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _resolve_mask(mask: Any, params: Any) -> list:
  """One Python bool per leaf of `params` (flattened with MaskedNode leaves).

  Raises:
    ValueError: if the mask does not match the params or selects a scalar.
    TypeError: if a mask leaf is not a static bool.
  """
  if mask is None:
    mask_tree = _default_mask(params)
  elif callable(mask):
    mask_tree = mask(params)
  else:
    mask_tree = mask

  def broadcast(m, sub):
    return jax.tree.map(lambda _: m, sub, is_leaf=_tree.is_masked_node)

  try:
    full = jax.tree.map(broadcast, mask_tree, params)
    full_leaves = _leaves_with_path(full)
  except (ValueError, TypeError) as e:
    raise _mask_structure_error(mask_tree, params) from e
  param_leaves = _leaves_with_path(params)
  if len(full_leaves) != len(param_leaves):
    raise _mask_structure_error(mask_tree, params)
  flags = []
  for (path, m), (_, p) in zip(full_leaves, param_leaves):
    if _tree.is_masked_node(p) or _tree.is_masked_node(m):
      flags.append(False)
      continue
    flag = _as_bool(path, m)
    if flag and jnp.ndim(p) == 0:
      raise ValueError(
          f"`mask` selects leaf {_tree.path_str(path)}, which has ndim 0: lazy "
          "updates need rows (slices along axis 0) of a leaf with ndim >= 1."
      )
    flags.append(flag)
  return flags


def _touched_ids(touched_rows: Any, params: Any, flags: list) -> list:
  """The ids given for each params leaf (None where none), checked.

  Raises:
    ValueError: if a leaf of `touched_rows` has no parameter leaf at its path,
      belongs to a leaf outside the mask, or (when concrete) holds ids out of
      range.
    TypeError: if the ids are not integers.
  """
  param_leaves = _leaves_with_path(params)
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


def _row_mask(grad: jax.Array, ids: Optional[jax.Array]) -> jax.Array:
  """Bool vector, True for the rows (slices along axis 0) that are touched."""
  if grad.ndim > 1:
    touched = jnp.max(jnp.abs(grad), axis=tuple(range(1, grad.ndim))) != 0
  else:
    touched = grad != 0
  if ids is not None:
    ids = jnp.ravel(ids)
    num_rows = grad.shape[0]
    # Traced ids cannot be checked: ids out of range are dropped.
    ids = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows)
    touched = touched.at[ids].set(True, mode="drop")
  return touched


def _broadcast_rows(rows: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(rows, rows.shape + (1,) * (jnp.ndim(like) - 1))


def lazy(
    inner: optax.GradientTransformation,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    freeze_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Lazy updates: only the rows of a table touched in a step move.

  Large embedding tables see only a few rows per batch. A dense optimizer keeps
  moving every row with stale momentum (and weight decay); ``lazy(inner)``
  updates only the touched rows, like TF Addons' LazyAdam and
  `torch.optim.SparseAdam`, for any inner optimizer.

  A row is a slice along axis 0 of a masked leaf. It is touched in a step when
  its gradient row has a non-zero entry (NaN counts), or when its id is among
  the `touched_rows` passed to `update`, so that a row that was looked up but
  got an exactly-zero gradient still counts as touched. `inner` runs densely
  and the result is masked row by row:

  * touched rows get exactly the update `inner` gives (same state, same
    arithmetic);
  * untouched rows get an update of exactly zero, so weight decay (e.g.
    ``optax.adamw``) does not move them either; with ``freeze_state=True``
    every parameter-shaped leaf of the inner state keeps their rows bitwise
    (LazyAdam/SparseAdam semantics), while scalar state such as step counts
    advances at every step, so bias corrections use the global step as
    SparseAdam does. With ``freeze_state=False`` the inner state is updated
    for all rows and only the move of the params is masked (the Keras
    LazyOptimizer variant);
  * leaves outside the mask get exactly what `inner` gives.

  Pass the ids looked up in a step as an extra argument,
  ``tx.update(grads, state, params, touched_rows={"embed": ids})``: a pytree
  whose leaves are integer arrays (any shape; duplicates are fine) at the
  paths of masked leaves. It passes through `lookahead`, `optax.chain` and
  `optax.partition`. Concrete ids are checked; traced ids (under `jax.jit`)
  cannot raise, and ids out of range are then ignored.

  On CPU with ``freeze_state=True`` and donated state, compile the step with
  ``jax.jit(step, donate_argnums=(0, 1), compiler_options={
  "xla_cpu_copy_insertion_use_region_analysis": True})`` (or start JAX with
  ``XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true``): without
  it XLA:CPU copies the inner state's tables at every step, which makes the
  step several times slower (docs/lazy.md).

  Args:
    inner: the optimizer to run, any optax gradient transformation (e.g.
      ``optax.adam``, ``optax.adamw``, a chain). Extra keyword arguments of
      `update` (including `touched_rows`) are passed on to it.
    mask: which leaves are updated lazily, as in `optax.masked`: a pytree of
      bools with the params' structure (or a prefix of it), or a callable that
      returns one given the params (or the updates when `update` is called
      without params). The mask must be static. None (default) selects every
      leaf with ndim >= 2.
    freeze_state: whether the rows of the inner state's parameter-shaped
      leaves are kept unchanged when the row is untouched (default True).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `LazyState`.

  Raises:
    TypeError: if `inner` is not a gradient transformation, `freeze_state` is
      not a bool, a mask leaf is not a static bool, or the ids of
      `touched_rows` are not integers.
    ValueError: naming the leaf path, if the mask does not match the params'
      structure, the mask selects a leaf with ndim 0, or `touched_rows` has a
      leaf outside the mask, at no parameter, or (when concrete) with ids out
      of range.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.lazy(optax.sgd(1.0, momentum=0.5))
    >>> table = jnp.zeros((3, 2))
    >>> state = tx.init(table)
    >>> grads = jnp.array([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    >>> updates, state = tx.update(grads, state, table)
    >>> print(updates)  # rows 0 and 1 touched
    [[-1. -1.]
     [-2. -2.]
     [ 0.  0.]]
    >>> grads = jnp.zeros((3, 2))  # row 0 looked up, with a zero gradient
    >>> ids = jnp.array([0])
    >>> updates, state = tx.update(grads, state, table, touched_rows=ids)
    >>> print(updates)  # row 0 moves with its momentum, row 1 stays
    [[-0.5 -0.5]
     [ 0.   0. ]
     [ 0.   0. ]]
    >>> print(state.inner_state[0].trace)  # row 1's momentum is kept
    [[0.5 0.5]
     [2.  2. ]
     [0.  0. ]]

  References:
    Kingma, Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015 (LazyAdam applies it to the
    rows present in a sparse gradient).
  """
  _checks.check_transformation("inner", inner)
  if not isinstance(freeze_state, (bool, np.bool_)):
    raise TypeError(
        f"`freeze_state` must be a bool, got {freeze_state!r}.")
  freeze_state = bool(freeze_state)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _resolve_mask(mask, params)
    return LazyState(inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, LazyState):
      raise TypeError(
          f"`state` must be a LazyState, got {type(state).__name__}.")
    like = updates if params is None else params
    flags = _resolve_mask(mask, like)
    touched_rows = extra_args.get("touched_rows")
    if touched_rows is not None:
      ids = _touched_ids(touched_rows, like, flags)
    else:
      ids = [None] * len(flags)

    inner_updates, new_inner = inner.update(
        updates, state.inner_state, params, **extra_args)

    grad_leaves = jax.tree.leaves(updates, is_leaf=_tree.is_masked_node)
    rows = []
    for flag, grad, leaf_ids in zip(flags, grad_leaves, ids):
      if flag and not _tree.is_masked_node(grad):
        rows.append(_row_mask(jnp.asarray(grad), leaf_ids))
      else:
        rows.append(None)

    update_leaves, treedef = jax.tree.flatten(
        inner_updates, is_leaf=_tree.is_masked_node)
    new_updates = jax.tree.unflatten(treedef, [
        u if r is None else jnp.where(
            _broadcast_rows(r, u), u, jnp.zeros((), jnp.result_type(u)))
        for r, u in zip(rows, update_leaves)])

    if freeze_state:
      def freeze(r, new, old):
        return jnp.where(_broadcast_rows(r, new), new, old).astype(
            jnp.result_type(new))
      new_inner = _tree.map_param_shaped(
          freeze, rows, like, new_inner, state.inner_state)
    return new_updates, LazyState(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
