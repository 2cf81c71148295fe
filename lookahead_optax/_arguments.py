"""Argument checks shared by the factories, and those of `update`'s arguments.

Every check raises a `TypeError` or `ValueError` that names the argument (and
the leaf path, for trees) at the first wrong call; those on `update` inspect
static shapes, dtypes and structures only, so they cost nothing compiled.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax import _compress
from lookahead_optax import _sparse
from lookahead_optax import _tree
from lookahead_optax._types import LookaheadState

def copy(x: jax.Array) -> jax.Array:
  """A copy of `x` in a fresh buffer (so params and state can be donated)."""
  return jnp.array(x, copy=True)


def has_state(tree: Any, state_type: type) -> bool:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, state_type))
  return any(isinstance(x, state_type) for x in leaves)


def is_multisteps(inner: Any) -> bool:
  return isinstance(inner, optax.MultiSteps) or isinstance(
      getattr(inner.update, "__self__", None), optax.MultiSteps)


MULTISTEPS_ERROR = (
    "lookahead would count micro-steps. Wrap lookahead instead: "
    "optax.MultiSteps(lookahead(inner, ...), every_k_schedule=n).")


def check_inner(inner: Any) -> None:
  """`inner` is a gradient transformation, and not an `optax.MultiSteps`."""
  _checks.check_transformation("inner", inner)
  if is_multisteps(inner):
    raise ValueError(f"`inner` must not be an optax.MultiSteps: "
                     f"{MULTISTEPS_ERROR}")


def check_slow_dtype(slow_dtype: Any) -> Any:
  if slow_dtype is None:
    return None
  try:
    dtype = jnp.dtype(slow_dtype)
  except TypeError as e:
    raise TypeError(
        f"`slow_dtype` must be a floating dtype or None, got {slow_dtype!r}."
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`slow_dtype` must be a floating dtype or None, got {slow_dtype!r}.")
  return dtype


def check_outer(outer: Any, slow_step_size: Any, inner_state: str) -> None:
  if outer is None:
    return
  _checks.check_transformation("outer", outer)
  if slow_step_size is not None:
    raise ValueError(
        "`slow_step_size` and `outer` cannot both be given: with `outer`, the "
        "outer transformation's own learning rate sets the slow weights' step "
        "(`outer=optax.sgd(a)` is `slow_step_size=a`).")
  if inner_state == "pullback":
    raise ValueError(
        "`inner_state='pullback'` interpolates the inner state with "
        "`slow_step_size` and cannot combine with `outer`; use 'keep' or "
        "'reset'.")


def check_bool(name: str, value: Any) -> bool:
  """`value` as a bool, or a TypeError naming `name`."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)


def check_replica_axis(axis_name: Any, owner: str = "") -> str:
  """`axis_name` of `diloco` or `replica_mean` (`owner`), checked."""
  if not isinstance(axis_name, str) or not axis_name:
    of = f" of `{owner}`" if owner else ""
    raise TypeError(
        f"`axis_name`{of} must be a non-empty string (the mapped axis of the "
        f"replicas), got {axis_name!r}.")
  return axis_name


def check_wire(communication_dtype: Any, error_feedback: Any
               ) -> tuple[Optional[str], bool]:
  """The format name of `communication_dtype` and `error_feedback`, checked.

  Raises:
    TypeError, ValueError: naming the argument.
  """
  fmt = _compress.format_name(communication_dtype)
  error_feedback = check_bool("error_feedback", error_feedback)
  if error_feedback and fmt is None:
    raise ValueError(
        "`error_feedback=True` needs a low-precision `communication_dtype` "
        "(in float32 nothing is dropped to feed back).")
  return fmt, error_feedback


def check_axis_bound(axis_name: Optional[str]) -> None:
  """A clear error, at trace time, when `axis_name` is not a mapped axis."""
  if axis_name is None:
    return
  try:
    jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"`axis_name` {axis_name!r} is not the name of a mapped axis here: "
        "call the step under `jax.pmap(..., axis_name=...)` or `shard_map` "
        "with that axis.") from e


def check_state(state: Any) -> None:
  if isinstance(state, LookaheadState):
    return
  if isinstance(state, optax.LookaheadState):
    raise TypeError(
        "`state` must be a LookaheadState of lookahead_optax, got the state of "
        "optax's own lookahead (optax.LookaheadState): build the state with "
        "this optimizer's `tx.init(params)` on plain params (no "
        "optax.LookaheadParams); a checkpointed optax.lookahead run can be "
        "continued from its fast params and inner state with "
        "`lookahead_optax.migrate_optax_state(tx, state.fast_state, "
        "params.fast)`.")
  raise TypeError(
      f"`state` must be a LookaheadState of lookahead_optax, got "
      f"{type(state).__name__}.")


def names_own_leaf(touched_rows: Any, params: Any) -> bool:
  """Whether `touched_rows` has ids for a (non-masked) leaf of `params`."""
  own = {tuple(path) for path, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]
         if not _tree.is_masked_node(leaf)}
  return any(tuple(path) in own for path, _ in
             jax.tree_util.tree_flatten_with_path(touched_rows)[0])


def check_touched_rows(extra_args: dict, inner_state: Any,
                        params: Any) -> None:
  """`touched_rows` for our leaves without a `lazy` inside would be ignored."""
  from lookahead_optax._lazy import LazyState  # pylint: disable=g-import-not-at-top
  touched_rows = extra_args.get("touched_rows")
  if (touched_rows is not None and names_own_leaf(touched_rows, params)
      and not has_state(inner_state, LazyState)):
    raise ValueError(
        "`touched_rows` was passed but the inner optimizer has no "
        "`lookahead_optax.lazy`: the ids would be ignored. Wrap the embedding "
        "optimizer in `lazy(...)` or drop `touched_rows`.")


SPARSE_RECIPE = (
    "Transformations that read the gradients (clipping, weight decay, "
    "scaling) go inside `lazy`, which gives them the looked-up rows: "
    "`lookahead(lazy(optax.chain(optax.clip_by_global_norm(1.0), "
    "optax.adamw(1e-3))))`, not `optax.chain(optax.clip_by_global_norm(1.0), "
    "lookahead(lazy(...)))`.")


def check_sparse_grads_have_lazy(grads: Any, inner_state: Any) -> None:
  """`SparseRows` gradients need a `lazy` inside lookahead to apply them."""
  from lookahead_optax._lazy import LazyState  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(
      grads, is_leaf=_sparse.is_sparse_rows)[0]
  sparse = [path for path, g in flat if _sparse.is_sparse_rows(g)]
  if sparse and not has_state(inner_state, LazyState):
    raise ValueError(
        f"The gradient of leaf {_tree.path_str(sparse[0])} is a `SparseRows` "
        "(row-sparse, e.g. from `sparse_value_and_grad`), but the inner "
        "optimizer has no `lookahead_optax.lazy` to apply it: use "
        f"`lookahead(lazy(inner), ...)`. {SPARSE_RECIPE}")


def check_rows_per_step_options(rows_per_step: Any, outer: Any,
                                inner_state: str, on_nonfinite: str) -> None:
  """`rows_per_step` syncs row-sparse tables with the default options only."""
  if rows_per_step is None:
    return
  given = ["`outer`"] if outer is not None else []
  given += [f"`{name}={value!r}`" for name, value, default in (
      ("inner_state", inner_state, "keep"),
      ("on_nonfinite", on_nonfinite, "propagate")) if value != default]
  if given:
    raise ValueError(
        f"`rows_per_step` cannot combine with {', '.join(given)}: row-sparse "
        "syncs support the default options only (no `outer`, "
        "`inner_state='keep'`, `on_nonfinite='propagate'`).")


def dense_like(updates: Any, slow: Any) -> Any:
  """`updates` with each `SparseRows` checked and shown as its table's shape."""
  def view(path, u, s):
    if not _sparse.is_sparse_rows(u):
      return u
    u.check_table(s, _tree.path_str(path))
    return jax.ShapeDtypeStruct(jnp.shape(s), jnp.result_type(u.values))
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      updates, is_leaf=_sparse.is_sparse_rows)
  if treedef != jax.tree.structure(slow):
    return updates  # check_same_tree names the difference
  return jax.tree.unflatten(treedef, [
      view(path, u, s) for (path, u), s in zip(flat, jax.tree.leaves(slow))])


def check_update_args(updates: Any, state: Any, params: Any,
                       slow_dtype: Any) -> tuple[Any, Any]:
  """Checks `update`'s arguments; returns params and updates as arrays."""
  if params is None:
    raise ValueError(
        "`params` is required: lookahead's update needs the current params "
        "to compute the sync, call `tx.update(grads, state, params)`.")
  check_state(state)
  check_step_is_scalar(state.step)
  params = jax.tree.map(jnp.asarray, params)
  updates = jax.tree.map(jnp.asarray, updates)
  _checks.check_same_tree(
      "params", params, state.slow_params, check_dtypes=slow_dtype is None,
      reference_name="the slow params")
  if slow_dtype is not None:
    check_param_kinds(params, state.slow_params)
  _checks.check_same_tree(
      "updates", dense_like(updates, state.slow_params), state.slow_params,
      reference_name="the slow params")
  return params, updates


def check_step_is_scalar(step: Any) -> None:
  """The step counter is a scalar (a `shard_map` block keeps a size-1 axis)."""
  shape = jnp.shape(step)
  if shape != ():
    raise ValueError(
        f"The state's step counter has shape {shape}, not (): the state "
        "still has a mapped axis. Inside `shard_map` each replica's block "
        "keeps the replica axis with size 1: squeeze it before `update` "
        "(`jax.tree.map(lambda x: x[0], state)`, and the params and "
        "gradients likewise) and add it back after, or step under "
        "`jax.pmap`, which removes it.")


def check_param_kinds(params: Any, slow: Any) -> None:
  """With `slow_dtype`: floating params for floating slow weights, else equal.

  The state does not record the params' own float dtype, so a float param
  of another width cannot be told from the right one.
  """
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(slow)):
    pdtype, sdtype = jnp.result_type(p), jnp.result_type(s)
    same_kind = (jnp.issubdtype(pdtype, jnp.floating)
                 if jnp.issubdtype(sdtype, jnp.floating) else pdtype == sdtype)
    if not same_kind:
      raise ValueError(
          f"`params` leaf {_tree.path_str(path)} has dtype {pdtype}, which "
          f"does not match the slow params' {sdtype}.")


def check_snoo_args(learning_rate: Any, momentum: Any) -> None:
  _checks.check_scalar("momentum", momentum, low=0.0, high=1.0,
                       high_open=True)
  _checks.check_scalar("learning_rate", learning_rate, low=0.0,
                       allow_schedule=True)