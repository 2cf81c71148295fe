"""Lookahead over row-sparse updates (`SparseRows`): syncs that cost O(rows).

A table whose updates arrive as `SparseRows` changes only in the rows a step
touches, so after a sync every row untouched since then still equals its slow
weights and the next sync needs only the rows touched in the cycle. Their ids
are kept in a buffer of `sync_period * N` ids (`CycleRows`, N ids a step),
with a (V,) table of the slot each row was last written to, so that a sync
finds the distinct rows without sorting; at a sync they are gathered from the
params and slow weights, interpolated, and written back: no pass over the
table, at any step.
"""

from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _sparse
from lookahead_optax import _sync
from lookahead_optax import _tree
from lookahead_optax._types import CycleRows

HOLE = optax.MaskedNode()


def is_hole_or_rows(x: Any) -> bool:
  """Leaves of the trees here: holes, `SparseRows` and `CycleRows` nodes."""
  return (_tree.is_masked_node(x) or _sparse.is_sparse_rows(x)
          or isinstance(x, CycleRows))


def _is_cycle_rows_mapping(x: Any) -> bool:
  return isinstance(x, Mapping) and set(x.keys()) == set(CycleRows._fields)


def restore_cycle_rows(cycle_rows: Any) -> Any:
  """`cycle_rows` with each mapping `{"ids", "owner"}` made a `CycleRows`.

  Containers that rebuild an optimizer state from its leaves may hand back a
  `CycleRows` as a mapping of its fields: an `nnx.Optimizer` stores the
  state's table leaves in NNX variables, and each `CycleRows` comes back from
  its first `update` as an `nnx.State({"ids", "owner"})`.
  """
  if cycle_rows is None:
    return None

  def restore(x):
    if _is_cycle_rows_mapping(x):
      return CycleRows(x["ids"], x["owner"])
    return x
  return jax.tree.map(
      restore, cycle_rows,
      is_leaf=lambda x: is_hole_or_rows(x) or _is_cycle_rows_mapping(x))


def resolve_rows_per_step(rows_per_step: Any, params: Any) -> list:
  """One entry per params leaf: the ids per step (int) or None.

  `rows_per_step` names tables by their path in the params: a dict such as
  `{"embed": 8192}` (leaves it does not name get None), a nested dict, or a
  tree with the params' structure (or a prefix of it).

  Raises:
    ValueError: if it names no parameter, names a leaf with ndim 0, or a count
      is not an integer >= 1.
  """
  param_leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]
  if rows_per_step is None:
    return [None] * len(param_leaves)
  for path, n in jax.tree_util.tree_flatten_with_path(rows_per_step)[0]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(
          f"`rows_per_step` leaf {_tree.path_str(path)} must be an integer "
          ">= 1 (the number of ids of each step's SparseRows) or None, got "
          f"{n!r}.")
  per_param, unused = _tree.by_path_prefix(rows_per_step, params)
  if unused:
    raise ValueError(f"`rows_per_step` leaf {_tree.path_str(unused[0])} does "
                     "not match any parameter.")
  out = []
  for named, (p_path, p) in zip(per_param, param_leaves):
    if named is None or _tree.is_masked_node(p):
      out.append(None)
      continue
    if jnp.ndim(p) == 0:
      raise ValueError(
          f"`rows_per_step` names leaf {_tree.path_str(p_path)}, which has "
          "ndim 0: only tables (ndim >= 1) have rows.")
    out.append(named[1])
  return out


def init_cycle_rows(counts: list, params: Any, sync_period: int) -> Any:
  """The params' tree with a `CycleRows` at each table, holes elsewhere."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=_tree.is_masked_node)
  return jax.tree.unflatten(treedef, [
      HOLE if n is None else CycleRows(
          jnp.full((sync_period * n,), jnp.shape(p)[0], jnp.int32),
          jnp.full((jnp.shape(p)[0],), -1, jnp.int32))
      for n, p in zip(counts, leaves)])


def split(tree: Any, sparse: list) -> Any:
  """`tree` with the leaves at sparse tables replaced by holes."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_hole_or_rows)
  return jax.tree.unflatten(
      treedef, [HOLE if s else x for s, x in zip(sparse, leaves)])


def merge(dense: Any, full: Any, sparse_values: list) -> Any:
  """`dense` (holes at sparse tables) with `sparse_values` put in the holes."""
  treedef = jax.tree.structure(full, is_leaf=is_hole_or_rows)
  dense_leaves = treedef.flatten_up_to(dense)
  return jax.tree.unflatten(treedef, [
      v if v is not None else d for d, v in zip(dense_leaves, sparse_values)])


def _slots(owner: jax.Array, ids: jax.Array, size: int) -> jax.Array:
  """The slot `owner` holds for each id; `size` (out of range) for the others.

  `ids` are in range or equal to V (`_sparse.safe_ids`).
  """
  slot = owner.at[ids].get(mode="fill", fill_value=-1)
  return jnp.where(slot < 0, size, slot)


def _rows_of(update: _sparse.SparseRows, ids: jax.Array, owner: jax.Array,
             size: int) -> jax.Array:
  """The rows of `update` (duplicates summed) at the slots of their ids."""
  zeros = jnp.zeros((size,) + update.row_shape, update.values.dtype)
  return zeros.at[_slots(owner, ids, size)].add(update.values, mode="drop")


def sync_table(flag: jax.Array, slot: jax.Array, p: jax.Array,
               update: _sparse.SparseRows, slow: jax.Array, cycle: CycleRows,
               alpha: jax.Array, sync_period: int
               ) -> tuple[Any, jax.Array, CycleRows]:
  """One step of one table: (update to return, slow weights, `CycleRows`).

  Records the step's ids in `cycle`; where `flag` (a sync), interpolates the
  distinct rows of the cycle and returns the update that lands the params on
  them; otherwise returns `update` unchanged. O(`sync_period * N`) work.
  """
  num_rows, n = jnp.shape(p)[0], update.num_ids
  buffer = cycle.ids
  if buffer.shape[0] != sync_period * n:
    raise ValueError(
        f"A `SparseRows` update has {n} ids but `rows_per_step` declared "
        f"{buffer.shape[0] // sync_period}: each step must bring the declared "
        "number of ids (pad with an out-of-range id, which is ignored).")
  ids = _sparse.safe_ids(update.ids, num_rows).astype(jnp.int32)
  start = (slot * n).astype(jnp.int32)
  buffer = jax.lax.dynamic_update_slice(buffer, ids, (start,))
  # Each row's last slot this cycle (of duplicates within a step, any one).
  owner = cycle.owner.at[ids].set(start + jnp.arange(n, dtype=jnp.int32),
                                  mode="drop")
  cdtype = _sync.compute_dtype(slow)
  size = buffer.shape[0]

  def synced(_):
    # Each distinct row of the cycle once, at its owner slot; V elsewhere.
    mine = _slots(owner, buffer, size) == jnp.arange(size, dtype=jnp.int32)
    cycle = jnp.where(mine, buffer, num_rows)
    p_rows = _sparse.gather_rows(p, cycle)
    s_rows = _sparse.gather_rows(slow, cycle)
    u_rows = _rows_of(update, ids, owner, size)
    target = _sync.interpolate(
        s_rows.astype(cdtype), _sync.fast_weights(p_rows, u_rows, cdtype),
        alpha.astype(cdtype))
    landing = _sync.landing_update(p_rows, u_rows, target, s_rows)
    return cycle, landing, _sync.stored_slow(p_rows, landing, target, s_rows,
                                             keep_target=False)

  def not_synced(_):
    rows = (buffer.shape[0],) + update.row_shape
    return (jnp.full(buffer.shape, num_rows, buffer.dtype),
            jnp.zeros(rows, update.values.dtype), jnp.zeros(rows, slow.dtype))

  # Only the (sync_period * N)-row work sits in the conditional, so that it
  # runs on sync steps alone; the tables are only read there.
  cycle, landing, new_rows = jax.lax.cond(flag, synced, not_synced, None)
  slow = _sparse.scatter_rows(slow, cycle, new_rows)
  kept_ids = jnp.where(flag, num_rows, update.ids)
  kept = jnp.where(flag, jnp.zeros((), update.values.dtype), update.values)
  out = _sparse.SparseRows._make(  # pylint: disable=protected-access
      jnp.concatenate([kept_ids.astype(cycle.dtype), cycle]),
      jnp.concatenate([kept, landing.astype(kept.dtype)]))
  return out, slow, CycleRows(buffer, owner)


def sparse_flags(inner_updates: Any) -> list:
  """Per params leaf: whether its inner update is a `SparseRows`."""
  return [_sparse.is_sparse_rows(x) for x in
          jax.tree.leaves(inner_updates, is_leaf=is_hole_or_rows)]


def check_sparse_leaves(sparse: list, cycle_rows: Any, params: Any,
                        options_ok: Optional[str]) -> None:
  """Each `SparseRows` update needs a declared buffer and the default options."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]]
  if cycle_rows is None:
    buffers = [HOLE] * len(paths)
  else:
    buffers = jax.tree.leaves(
        jax.tree.map(lambda _, b: b, params, cycle_rows,
                     is_leaf=_tree.is_masked_node),
        is_leaf=is_hole_or_rows)
  for path, is_sparse, buf in zip(paths, sparse, buffers):
    if not is_sparse:
      continue
    where = _tree.path_str(path)
    if options_ok is not None:
      raise ValueError(
          f"The inner update of leaf {where} is a `SparseRows`: row-sparse "
          f"syncs support the default options only ({options_ok}).")
    if _tree.is_masked_node(buf):
      raise ValueError(
          f"The inner update of leaf {where} is a `SparseRows` but "
          "`rows_per_step` declares no ids for it: pass `rows_per_step` with "
          "the number of ids each step brings for that table.")
