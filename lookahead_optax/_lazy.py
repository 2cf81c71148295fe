"""Lazy (row-sparse) updates for embedding tables, for any inner optimizer."""

import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _catch_up
from lookahead_optax import _checks
from lookahead_optax import _lazy_args
from lookahead_optax import _sparse
from lookahead_optax import _tree


class LazyState(NamedTuple):
  """State of the transformation returned by `lazy`.

  Attributes:
    inner_state: the state of the inner optimizer. With `freeze_state=True`
      the rows of its parameter-shaped leaves (e.g. Adam's moments) change
      only in the steps where the row is touched; its other leaves (e.g. step
      counts) advance at every step. Its structure and shapes are those of
      `inner.init(params)`, whether the gradients are dense or `SparseRows`.
    catch_up: None, or with `catch_up=True` a `CatchUpState`: the step
      count and the step of each row's last update, per masked table.
  """

  inner_state: optax.OptState
  catch_up: Optional[_catch_up.CatchUpState] = None


_COPY_WARNING_MIN_SIZE = 1 << 20
_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"
_warned_cpu_copies = []


_LIBRARY_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (jax, optax))
_OWN_DIR = os.path.dirname(__file__) + os.sep


def _user_stacklevel() -> int:
  """The `stacklevel` of the first caller outside this package, optax, JAX.

  So that a warning names the user's line (their `tx.update`, or the call of
  their jitted step), however deep the optax wrappers and the tracing are.
  """
  frame, level = sys._getframe(1), 1  # pylint: disable=protected-access
  while frame is not None and (
      frame.f_code.co_filename.startswith(_LIBRARY_DIRS + (_OWN_DIR,))
      or "/flax/" in frame.f_code.co_filename):
    frame, level = frame.f_back, level + 1
  return level


def _maybe_warn_cpu_copies(leaves: list) -> None:
  """Warns once when XLA:CPU will likely copy the moment tables every step.

  Whether the step donates its state cannot be read through a public JAX
  API, so the warning fires for every jitted dense step with a large table
  and says that it matters for donated steps only (the compiler option
  barely helps without donation: 488 -> 412 ms on a 1M-row table, against
  362 -> 44 ms donated).
  """
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
      "jitted lazy update with dense gradients that donates its state "
      "(often 4-5x a dense adam step), unless the step is compiled with "
      "region analysis: "
      "`jax.jit(step, donate_argnums=..., compiler_options="
      "{'xla_cpu_copy_insertion_use_region_analysis': True})` or "
      "XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true. Faster "
      "still: row-sparse gradients (`lo.sparse_value_and_grad`), whose cost "
      "follows the rows looked up. See docs/lazy.md. (Shown once, for any "
      "jitted step with a large table: JAX has no public way to tell whether "
      "a step donates. If yours does not, or already passes the compiler "
      "option, ignore it with "
      "`warnings.filterwarnings('ignore', message='lazy: XLA:CPU')`.)",
      RuntimeWarning, stacklevel=_user_stacklevel())


def _run_inner(inner: Any, grads: Any, state: LazyState, inner_state: Any,
               params: Any, extra_args: dict, touched: list,
               catch_up: Any) -> tuple[Any, Any, Any]:
  """`inner.update`; with `catch_up` (an analyser) the touched rows first
  take the zero-gradient steps they missed (`_catch_up.update`).

  Returns:
    (updates, new inner state, new `CatchUpState` or None).
  """
  if catch_up is None:
    return (*inner.update(grads, inner_state, params, **extra_args), None)
  return _catch_up.update(inner, catch_up, grads, inner_state, params,
                          extra_args, state.catch_up, touched)


def _touched(sparse: list, rows: list) -> list:
  """Per leaf: `("rows", unique ids)`, `("mask", rows)` or None."""
  return [("rows", s.ids) if s is not None else
          ("mask", r) if r is not None else None
          for s, r in zip(sparse, rows)]


def _update_rows(inner: Any, grad_leaves: list, state: LazyState,
                 params: Any, flags: list, ids: list, extra_args: dict,
                 rows: list, catch_up: Any
                 ) -> tuple[Any, Any, Any, list, Any]:
  """Runs `inner` on the gathered rows of the `SparseRows` leaves.

  Returns:
    (updates, new inner state) on the rows, the params with the rows
    gathered, per leaf the deduplicated `SparseRows` (None if dense), and
    the new `CatchUpState` (None without `catch_up`).
  """
  inner_state = state.inner_state
  param_leaves, param_def = jax.tree.flatten(
      params, is_leaf=_tree.is_masked_node)
  sparse = _lazy_args.sparse_leaves(grad_leaves, param_leaves, flags, ids,
                                    _lazy_args.leaves_with_path(params))
  row_params = jax.tree.unflatten(param_def, [
      p if s is None else _sparse.gather_rows(p, s.ids)
      for s, p in zip(sparse, param_leaves)])
  row_grads = jax.tree.unflatten(param_def, [
      g if s is None else s.values for s, g in zip(sparse, grad_leaves)])
  sparse_ids = [None if s is None else s.ids for s in sparse]
  row_state = _tree.map_param_shaped(
      lambda i, x: _sparse.gather_rows(x, i), sparse_ids, params, inner_state)
  _lazy_args.check_row_state(inner, row_state, row_params)
  inner_updates, new_inner, new_catch_up = _run_inner(
      inner, row_grads, state, row_state, row_params, extra_args,
      _touched(sparse, rows), catch_up)
  return inner_updates, new_inner, row_params, sparse, new_catch_up


def _check_state(state: Any) -> None:
  """Raises unless `state` is a `LazyState`."""
  if not isinstance(state, LazyState):
    raise TypeError(
        f"`state` must be a LazyState, got {type(state).__name__}.")


def _has_sparse(grad_leaves: list, params: Any) -> bool:
  """Whether a gradient is a `SparseRows` (raises if `params` is missing)."""
  has_sparse = any(isinstance(g, _sparse.SparseRows) for g in grad_leaves)
  if has_sparse and params is None:
    raise ValueError(
        "`lazy` needs `params` in `update` when a gradient is a "
        "`SparseRows`: it updates the rows of the params it gathers.")
  return has_sparse


def _touched_ids(extra_args: dict, like: Any, flags: list) -> list:
  """Per leaf the ids of `touched_rows` in `extra_args` (None if not given)."""
  touched_rows = extra_args.get("touched_rows")
  if touched_rows is not None:
    return _lazy_args.touched_ids(touched_rows, like, flags)
  return [None] * len(flags)


def _check_sparse_freezes(freeze_state: bool) -> None:
  """Raises unless `freeze_state`, which a `SparseRows` gradient needs."""
  if not freeze_state:
    raise ValueError(
        "`lazy(..., freeze_state=False)` updates the inner state of every "
        "row at every step, which needs the dense gradient: a "
        "`SparseRows` gradient needs `freeze_state=True`.")


def row_mask(grad: jax.Array, ids: Optional[jax.Array]) -> jax.Array:
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


def broadcast_rows(rows: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(rows, rows.shape + (1,) * (jnp.ndim(like) - 1))


def merge_state_leaf(aux: tuple, new: jax.Array, old: jax.Array) -> jax.Array:
  """A new parameter-shaped state leaf: scattered rows or frozen rows."""
  kind, value = aux
  if kind == "rows":  # `new` holds the rows `value` (unique ids).
    return _sparse.scatter_rows(old, value, new)
  return jnp.where(broadcast_rows(value, new), new, old).astype(
      jnp.result_type(new))



def _dense_tables(flags: list, grad_leaves: list) -> list:
  """The masked gradients that are arrays (not `SparseRows`, not masked)."""
  return [g for flag, g in zip(flags, grad_leaves)
          if flag and not _lazy_args.is_grad_leaf(g)]


def _touched_rows(flags: list, grad_leaves: list, ids: list) -> list:
  """Per leaf the touched-row mask of a masked dense gradient, else None."""
  rows = []
  for flag, grad, leaf_ids in zip(flags, grad_leaves, ids):
    if (flag and not _tree.is_masked_node(grad)
        and not isinstance(grad, _sparse.SparseRows)):
      rows.append(row_mask(jnp.asarray(grad), leaf_ids))
    else:
      rows.append(None)
  return rows


def _masked_updates(inner_updates: Any, sparse: list, rows: list) -> Any:
  """`inner`'s updates, as `SparseRows` on sparse leaves, zero off `rows`."""
  update_leaves, treedef = jax.tree.flatten(
      inner_updates, is_leaf=_tree.is_masked_node)
  update_leaves = [
      u if s is None else _sparse.SparseRows._make(s.ids, u)  # pylint: disable=protected-access
      for s, u in zip(sparse, update_leaves)]
  return jax.tree.unflatten(treedef, [
      u if r is None else jnp.where(broadcast_rows(r, u), u,
                                    jnp.zeros((), jnp.result_type(u)))
      for r, u in zip(rows, update_leaves)])


def _merge_inner_state(rows: list, sparse: list, freeze_state: bool,
                       row_params: Any, new_inner: Any, old_inner: Any) -> Any:
  """The new inner state, with the untouched rows kept (or rows scattered)."""
  per_leaf = []
  for i, r in enumerate(rows):
    if sparse[i] is not None:
      per_leaf.append(("rows", sparse[i].ids))
    elif r is not None and freeze_state:
      per_leaf.append(("mask", r))
    else:
      per_leaf.append(None)
  return _tree.map_param_shaped(
      merge_state_leaf, per_leaf, row_params, new_inner, old_inner)


def lazy(
    inner: optax.GradientTransformation,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    freeze_state: bool = True,
    catch_up: bool = False,
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

  Both forms give the same results (bitwise eagerly; under `jax.jit`, where
  the two forms are two different programs, within a rounding of each
  other, as XLA may contract multiply-adds differently in each):

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

  With `catch_up=True` an idle row is brought, when it is touched again, to
  what the dense optimizer (whose gradient rows are zero while the row is
  idle) would have left, before `inner` runs on it: `lazy` keeps the step
  of each row's last update (`CatchUpState`, one integer per row of each
  masked table) and, for a row idle $\\Delta$ steps,

  * multiplies each parameter-shaped state leaf by $f^\\Delta$, where $f$ is
    what one zero-gradient step of `inner` multiplies it by (Adam's and
    AdamW's $\\beta_1$, $\\beta_2$, a momentum's decay, RMSProp's decay,
    Lion's $\\beta_2$; read by running such a step on two probe rows);
  * multiplies the row's params by $d^\\Delta$, $d = 1 - \\eta_t \\lambda$,
    the decoupled weight decay of `inner` (`optax.add_decayed_weights`, as in
    `optax.adamw`), exact at a constant learning rate; under a schedule the
    decay of the current step $t$ stands for the idle steps $s$, a relative
    error of at most $\\exp(\\lambda \\sum_s |\\eta_s - \\eta_t| /
    (1 - \\lambda \\max \\eta)) - 1$;
  * adds the idle updates of a momentum to the params where the
    zero-gradient update is linear in a single state leaf (SGD with
    momentum, `optax.trace`): $c\\,s\\,(d^\\Delta - f^\\Delta)/(d - f)$.

  Not caught up: the zero-gradient update of Adam-like and sign-based
  optimizers, nonlinear in the state. Dense Adam keeps moving an idle row
  by $\\eta \\hat m / (\\sqrt{\\hat v} + \\epsilon)$ with $m$ decaying as
  $\\beta_1^k$ and $\\sqrt v$ as $\\beta_2^{k/2}$: in all at most
  $\\eta\\,|\\hat m| / \\sqrt{\\hat v}\\,/(1 - \\beta_1/\\sqrt{\\beta_2})$ (about
  10 steps' worth at the default betas); Lion keeps moving it by $\\eta$
  per idle step until its momentum's sign flips, which it never does at a
  zero gradient. The caught-up move of the params is part of the returned
  update. See docs/lazy.md.

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
    catch_up: whether a row touched after idle steps first takes the
      zero-gradient steps of the dense optimizer it missed (see above;
      default False, today's LazyAdam semantics). Needs
      `freeze_state=True` and `params` in `update`. `inner` qualifies
      when one zero-gradient step multiplies each parameter-shaped state
      leaf by a constant factor and the params by one (checked at `init`
      on probe rows over two steps): `adam`, `adamw`, `nadam`, `radam`,
      `sgd` (momentum, Nesterov), `rmsprop`, `lion`, `adagrad`, `yogi`,
      `adadelta` and chains of them with `add_decayed_weights` after the
      moments; `adafactor`, `amsgrad`, `adamax`, `adabelief`, `sm3` and
      weight decay before a momentum are rejected. Optimizers that couple
      the rows of a table (`lamb`, `lars`: a trust ratio over the table)
      are not lazy-friendly with or without it. The step counter is int32
      (int64 with `jax_enable_x64`): an eager update past $2^{31} - 1$
      steps raises; a jitted one makes the caught-up rows NaN, never a
      wrong factor. The gap is a float32 exponent (exact to $2^{24}$
      steps, and $f^\\Delta$ is 0 or 1 to float32 long before that).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `LazyState`.

  Raises:
    TypeError: if `inner` is not a gradient transformation, `freeze_state` or
      `catch_up` is not a bool, a mask leaf is not a static bool, the ids of
      `touched_rows` or of a `SparseRows` are not integers, or a params leaf
      is a `SparseRows`.
    ValueError: naming the leaf path, if the mask does not match the params'
      structure, the mask selects a leaf with ndim 0, the gradients miss a
      leaf of the params, have an extra one or one of another shape,
      `touched_rows` has a leaf outside the mask, at no parameter, or (when
      concrete) with ids out of range, a `SparseRows` is at a leaf outside
      the mask or at a scalar, has rows of another shape than the table's or
      (when concrete) ids out of range, comes without `params` or with
      `freeze_state=False`, or `inner` contains a `lookahead` (at `init`);
      `catch_up=True` with `freeze_state=False` (here), with an `inner`
      that cannot be caught up (at `init`, naming the table and why), or
      without `params` or past its counter's limit (at `update`).

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

    With `catch_up=True`, row 1, idle for two steps, first takes the two
    zero-gradient steps of momentum SGD it missed (momentum 1 -> 0.25, the
    params move by -0.5 - 0.25), then its own step:

    >>> tx = lo.lazy(optax.sgd(1.0, momentum=0.5), catch_up=True)
    >>> table = jnp.zeros((2, 1))
    >>> state = tx.init(table)
    >>> updates, state = tx.update(jnp.ones((2, 1)), state, table)
    >>> table = optax.apply_updates(table, updates)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([[1.0], [0.0]]), state, table)
    ...   table = optax.apply_updates(table, updates)
    >>> updates, state = tx.update(jnp.array([[0.0], [2.0]]), state, table)
    >>> print(optax.apply_updates(table, updates)[1], state.inner_state[0].trace[1])
    [-3.875] [2.125]
    >>> print(state.catch_up.count, state.catch_up.last_step)
    4 [3 4]

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
  catch_up = _catch_up.check_argument(catch_up, freeze_state)
  inner = optax.with_extra_args_support(inner)
  analyse = _catch_up.analyser(inner) if catch_up else None

  def init_fn(params):
    flags = _lazy_args.resolve_mask(mask, params)
    _lazy_args.check_sparse_free("params", params)
    inner_state = inner.init(params)
    _lazy_args.check_no_lookahead_inside(inner_state)
    if not catch_up:
      return LazyState(inner_state=inner_state)
    analyse(params, flags)
    return LazyState(inner_state, _catch_up.init_state(params, flags))

  def update_fn(updates, state, params=None, **extra_args):
    _check_state(state)
    updates = _sparse.flat_ids(updates)
    grad_leaves = _lazy_args.check_updates(updates, params)
    has_sparse = _has_sparse(grad_leaves, params)
    like = updates if params is None else params
    flags = _lazy_args.resolve_mask(mask, like)
    ids = _touched_ids(extra_args, like, flags)
    rows = _touched_rows(flags, grad_leaves, ids)
    if has_sparse:
      _check_sparse_freezes(freeze_state)
      inner_updates, new_inner, row_params, sparse, new_catch_up = (
          _update_rows(inner, grad_leaves, state, params, flags, ids,
                       extra_args, rows, analyse))
    else:
      row_params, sparse = like, [None] * len(flags)
      inner_updates, new_inner, new_catch_up = _run_inner(
          inner, updates, state, state.inner_state, params, extra_args,
          _touched(sparse, rows), analyse)
    if freeze_state:
      _maybe_warn_cpu_copies(_dense_tables(flags, grad_leaves))
    new_updates = _masked_updates(inner_updates, sparse, rows)
    if has_sparse or freeze_state:
      new_inner = _merge_inner_state(rows, sparse, freeze_state, row_params,
                                     new_inner, state.inner_state)
    return new_updates, LazyState(new_inner, new_catch_up)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
