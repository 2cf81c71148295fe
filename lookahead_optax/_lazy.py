"""Lazy (row-sparse) updates for embedding tables, for any inner optimizer."""

import os
from typing import Any, Callable, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax import _sparse
from lookahead_optax import _tree

_KeyPath = tuple


class LazyState(NamedTuple):
  """State of the transformation returned by `lazy`.

  Attributes:
    inner_state: the state of the inner optimizer. With `freeze_state=True`
      the rows of its parameter-shaped leaves (e.g. Adam's moments) change
      only in the steps where the row is touched; its other leaves (e.g. step
      counts) advance at every step. Its structure and shapes are those of
      `inner.init(params)`, whether the gradients are dense or `SparseRows`.
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


def _merge_state_leaf(aux: tuple, new: jax.Array, old: jax.Array) -> jax.Array:
  """A new parameter-shaped state leaf: scattered rows or frozen rows."""
  kind, value = aux
  if kind == "rows":  # `new` holds the rows `value` (unique ids).
    return _sparse.scatter_rows(old, value, new)
  return jnp.where(_broadcast_rows(value, new), new, old).astype(
      jnp.result_type(new))


def _is_grad_leaf(x: Any) -> bool:
  return _tree.is_masked_node(x) or isinstance(x, _sparse.SparseRows)


def _check_sparse_free(name: str, tree: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_grad_leaf)[0]:
    if isinstance(leaf, _sparse.SparseRows):
      raise TypeError(
          f"`{name}` leaf {_tree.path_str(path)} is a `SparseRows`: only "
          "gradients and updates can be row-sparse, the params are dense.")


def _check_no_lookahead_inside(inner_state: Any) -> None:
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


def _check_updates(updates: Any, params: Any) -> list:
  """The leaves of `updates` (SparseRows and MaskedNode as leaves), checked.

  Raises:
    ValueError: naming the leaf, if `updates` lacks a leaf of `params`, has
      one `params` lacks, or has a dense leaf of another shape.
  """
  grads = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_grad_leaf)
  grad_leaves = [g for _, g in grads[0]]
  if params is None:
    return grad_leaves
  _check_sparse_free("params", params)
  param_items = _leaves_with_path(params)
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
      detail = (f"{jax.tree.structure(updates, is_leaf=_is_grad_leaf)} vs "
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


def _sparse_leaves(grad_leaves: list, param_leaves: list, flags: list,
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


def _check_row_state(inner: Any, row_state: Any, row_params: Any) -> None:
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
_COPY_WARNING_MIN_SIZE = 1 << 20
_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"
_warned_cpu_copies = []


def _maybe_warn_cpu_copies(leaves: list) -> None:
  """Warns once when XLA:CPU will likely copy the moment tables every step."""
  if _warned_cpu_copies:
    return
  big = [x for x in leaves
         if _checks.is_traced(x) and np.size(x) >= _COPY_WARNING_MIN_SIZE]
  if not big or _REGION_ANALYSIS in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    if jax.default_backend() != "cpu":
      return
  except RuntimeError:
    return
  _warned_cpu_copies.append(True)
  warnings.warn(
      "lazy: XLA:CPU copies the inner state's tables at every step of a "
      "jitted lazy update with dense gradients (often 4-5x a dense adam "
      "step), unless the step is compiled with region analysis: "
      "`jax.jit(step, donate_argnums=..., compiler_options="
      "{'xla_cpu_copy_insertion_use_region_analysis': True})` or "
      "XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true. Faster "
      "still: row-sparse gradients (`lo.sparse_value_and_grad`), whose cost "
      "follows the rows looked up. See docs/lazy.md. (Shown once; if you "
      "already pass the compiler option, ignore it with "
      "`warnings.filterwarnings('ignore', message='lazy: XLA:CPU')`.)",
      RuntimeWarning, stacklevel=3)


def lazy(
    inner: optax.GradientTransformation,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    freeze_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Lazy updates: only the rows of a table touched in a step move.

  Large embedding tables see only a few rows per batch. A dense optimizer keeps
  moving every row with stale momentum (and weight decay); `lazy(inner)`
  updates only the touched rows, like TF Addons' LazyAdam and
  `torch.optim.SparseAdam`, for any inner optimizer.

  A row is a slice along axis 0 of a masked leaf. The gradient of a masked
  leaf can be given in two forms:

  * **Row-sparse**, a `lo.SparseRows(ids, values)` (e.g. from
    `lo.sparse_value_and_grad`): the rows `ids` are touched (a looked-up row
    with an exactly-zero gradient too). `lazy` sums duplicate ids, gathers
    those rows of the params and of the inner state's parameter-shaped
    leaves, runs `inner` on the rows only, scatters the state rows back and
    returns a `SparseRows` update, which `optax.apply_updates` writes into
    the touched rows. The work is $O(N)$ for $N$ ids, independent of the
    table size, with no table-sized temporary; ids out of range raise when
    concrete and are dropped when traced, and the fill id $V$ (the number of
    rows) marks padding, which is ignored.
  * **Dense**, the $(V, \\ldots)$ array `jax.grad` gives: a row is touched
    when its gradient row has a non-zero entry (NaN counts), or when its id
    is among the `touched_rows` passed to `update`. `inner` runs on the whole
    table and the result is selected row by row.

  Both forms give the same results:

  * touched rows get exactly the update `inner` gives (same state, same
    arithmetic);
  * untouched rows get an update of exactly zero, so weight decay (e.g.
    `optax.adamw`) does not move them either; with `freeze_state=True`
    every parameter-shaped leaf of the inner state keeps their rows bitwise
    (LazyAdam/SparseAdam semantics), while scalar state such as step counts
    advances at every step, so bias corrections use the global step as
    SparseAdam does. With `freeze_state=False` (dense gradients only) the
    inner state is updated for all rows and only the move of the params is
    masked (the Keras LazyOptimizer variant);
  * leaves outside the mask get exactly what `inner` gives.

  Transformations that need the whole gradient, such as
  `optax.clip_by_global_norm`, go inside `lazy` (in `inner`): on a
  `SparseRows` they see the deduplicated rows, whose norm is the norm of the
  dense gradient. A transformation outside `lazy` that receives a
  `SparseRows` raises.

  With dense gradients, pass the ids looked up in a step as an extra
  argument, `tx.update(grads, state, params, touched_rows={"embed": ids})`:
  a pytree whose leaves are integer arrays (any shape; duplicates are fine)
  at the paths of masked leaves. It passes through `lookahead`, `optax.chain`
  and `optax.partition`. Concrete ids are checked; traced ids (under
  `jax.jit`) cannot raise, and ids out of range are then ignored. With a
  `SparseRows` gradient, `touched_rows` adds rows with a zero gradient.

  On CPU with dense gradients, `freeze_state=True` and donated state, compile
  the step with `jax.jit(step, donate_argnums=(0, 1), compiler_options={
  "xla_cpu_copy_insertion_use_region_analysis": True})` (or start JAX with
  `XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true`): without it
  XLA:CPU copies the inner state's tables at every step, which makes the
  step several times slower; `lazy` warns once when it sees such a step
  (docs/lazy.md). The row-sparse form needs no option.

  Args:
    inner: the optimizer to run, any optax gradient transformation (e.g.
      `optax.adam`, `optax.adamw`, a chain). With `SparseRows` gradients its
      state must be per-element (not Adafactor's factored moments). It must
      not contain a `lookahead`: lookahead goes outside, as
      `lookahead(lazy(inner))`. Extra keyword arguments of
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
      not a bool, a mask leaf is not a static bool, the ids of
      `touched_rows` or of a `SparseRows` are not integers, or a params leaf
      is a `SparseRows`.
    ValueError: naming the leaf path, if the mask does not match the params'
      structure, the mask selects a leaf with ndim 0, the gradients miss a
      leaf of the params, have an extra one or one of another shape,
      `touched_rows` has a leaf outside the mask, at no parameter, or (when
      concrete) with ids out of range, a `SparseRows` is at a leaf outside
      the mask or at a scalar, has rows of another shape than the table's or
      (when concrete) ids out of range, comes without `params` or with
      `freeze_state=False`, or `inner` contains a `lookahead` (at `init`).

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
    >>> grads = lo.SparseRows(jnp.array([2, 2]), jnp.ones((2, 2)))  # row-sparse
    >>> updates, state = tx.update(grads, state, table)
    >>> print(updates.ids, updates.values[0])  # only row 2 is computed
    [2 3] [-2. -2.]
    >>> print(optax.apply_updates(table, updates))
    [[ 0.  0.]
     [ 0.  0.]
     [-2. -2.]]

  References:
    Kingma, Ba, [Adam: A Method for Stochastic Optimization](
    https://arxiv.org/abs/1412.6980), 2015 (LazyAdam applies it to the
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
    _check_sparse_free("params", params)
    inner_state = inner.init(params)
    _check_no_lookahead_inside(inner_state)
    return LazyState(inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, LazyState):
      raise TypeError(
          f"`state` must be a LazyState, got {type(state).__name__}.")
    grad_leaves = _check_updates(updates, params)
    has_sparse = any(isinstance(g, _sparse.SparseRows) for g in grad_leaves)
    if has_sparse and params is None:
      raise ValueError(
          "`lazy` needs `params` in `update` when a gradient is a "
          "`SparseRows`: it updates the rows of the params it gathers.")
    like = updates if params is None else params
    flags = _resolve_mask(mask, like)
    touched_rows = extra_args.get("touched_rows")
    if touched_rows is not None:
      ids = _touched_ids(touched_rows, like, flags)
    else:
      ids = [None] * len(flags)

    if not has_sparse:
      inner_updates, new_inner = inner.update(
          updates, state.inner_state, params, **extra_args)
      row_params = like
    else:
      if not freeze_state:
        raise ValueError(
            "`lazy(..., freeze_state=False)` updates the inner state of every "
            "row at every step, which needs the dense gradient: a "
            "`SparseRows` gradient needs `freeze_state=True`.")
      param_leaves, param_def = jax.tree.flatten(
          params, is_leaf=_tree.is_masked_node)
      sparse = _sparse_leaves(grad_leaves, param_leaves, flags, ids,
                              _leaves_with_path(params))
      row_params = jax.tree.unflatten(param_def, [
          p if s is None else _sparse.gather_rows(p, s.ids)
          for s, p in zip(sparse, param_leaves)])
      row_grads = jax.tree.unflatten(param_def, [
          g if s is None else s.values for s, g in zip(sparse, grad_leaves)])
      sparse_ids = [None if s is None else s.ids for s in sparse]
      row_state = _tree.map_param_shaped(
          lambda i, x: _sparse.gather_rows(x, i), sparse_ids, params,
          state.inner_state)
      _check_row_state(inner, row_state, row_params)
      inner_updates, new_inner = inner.update(
          row_grads, row_state, row_params, **extra_args)

    if freeze_state:
      _maybe_warn_cpu_copies([
          g for flag, g in zip(flags, grad_leaves)
          if flag and not _is_grad_leaf(g)])

    rows = []
    for flag, grad, leaf_ids in zip(flags, grad_leaves, ids):
      if (flag and not _tree.is_masked_node(grad)
          and not isinstance(grad, _sparse.SparseRows)):
        rows.append(_row_mask(jnp.asarray(grad), leaf_ids))
      else:
        rows.append(None)

    update_leaves, treedef = jax.tree.flatten(
        inner_updates, is_leaf=_tree.is_masked_node)
    if has_sparse:
      update_leaves = [
          u if s is None else _sparse.SparseRows._make(s.ids, u)  # pylint: disable=protected-access
          for s, u in zip(sparse, update_leaves)]
    new_updates = jax.tree.unflatten(treedef, [
        u if r is None else jnp.where(
            _broadcast_rows(r, u), u, jnp.zeros((), jnp.result_type(u)))
        for r, u in zip(rows, update_leaves)])

    if has_sparse or freeze_state:
      per_leaf = []
      for i, r in enumerate(rows):
        if has_sparse and sparse[i] is not None:
          per_leaf.append(("rows", sparse[i].ids))
        elif r is not None and freeze_state:
          per_leaf.append(("mask", r))
        else:
          per_leaf.append(None)
      new_inner = _tree.map_param_shaped(
          _merge_state_leaf, per_leaf, row_params, new_inner,
          state.inner_state)
    return new_updates, LazyState(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
