"""`sparse_value_and_grad`: row-sparse gradients of a loss with embedding lookups.

The loss is traced once; table leaves that are used only through row lookups
are found in its jaxpr, and the loss is differentiated with respect to the
gathered rows instead of the tables, so the dense (V, D) gradient of a table
is never built.
"""

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lookahead_optax import _sparse


# Sparse gradients of a loss with embedding lookups.


class _TableRef:
  """Stands for a table leaf inside the interpreted jaxpr."""

  __slots__ = ("index",)

  def __init__(self, index: int):
    self.index = index


def _sub_jaxpr(eqn: Any) -> Optional[Tuple[Any, list]]:
  """(jaxpr, consts) of a call-like equation we can inline, else None."""
  name = eqn.primitive.name
  params = eqn.params
  if name in ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
              "remat", "checkpoint", "remat2"):
    for key in ("jaxpr", "call_jaxpr"):
      sub = params.get(key)
      if sub is None:
        continue
      if hasattr(sub, "jaxpr"):  # A ClosedJaxpr.
        return sub.jaxpr, list(sub.consts)
      return sub, []
  return None


def _row_gather(eqn: Any, table_aval: Any) -> bool:
  """Whether `eqn` gathers whole rows (slices along axis 0) of its operand."""
  if eqn.primitive.name != "gather":
    return False
  dims = eqn.params["dimension_numbers"]
  shape = tuple(table_aval.shape)
  rank = len(shape)
  out_rank = len(eqn.outvars[0].aval.shape)
  return (tuple(dims.start_index_map) == (0,)
          and tuple(dims.collapsed_slice_dims) == (0,)
          and not tuple(getattr(dims, "operand_batching_dims", ()))
          and tuple(eqn.params["slice_sizes"]) == (1,) + shape[1:]
          and tuple(dims.offset_dims) == tuple(
              range(out_rank - rank + 1, out_rank)))


def _scan_uses(jaxpr: Any, tracked: dict, gathers: list, dense: set) -> None:
  """Finds how the tracked table variables of `jaxpr` are used.

  Args:
    jaxpr: a `Jaxpr`.
    tracked: variable -> table index, for the table variables of `jaxpr`.
    gathers: appended with (table index, gather output aval), in the order
      `_interpret` meets them.
    dense: gets the indices of tables used other than by row gathers.
  """
  for eqn in jaxpr.eqns:
    hits = [(pos, tracked[v]) for pos, v in enumerate(eqn.invars)
            if not hasattr(v, "val") and v in tracked]
    if not hits:
      continue
    sub = _sub_jaxpr(eqn)
    if eqn.primitive.name == "gather" and all(pos == 0 for pos, _ in hits):
      index = hits[0][1]
      if _row_gather(eqn, eqn.invars[0].aval):
        gathers.append((index, eqn.outvars[0].aval))
        continue
    if sub is not None:
      inner_jaxpr, _ = sub
      inner_tracked = {inner_jaxpr.invars[pos]: index for pos, index in hits}
      _scan_uses(inner_jaxpr, inner_tracked, gathers, dense)
      continue
    dense.update(index for _, index in hits)
  for v in jaxpr.outvars:
    if not hasattr(v, "val") and v in tracked:
      dense.add(tracked[v])


def _bind_params(eqn: Any) -> dict:
  """The keyword arguments to re-bind `eqn` (JAX versions differ here)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # Older JAX: (subfuns, params).
    subfuns, params = params
    if subfuns:
      raise NotImplementedError(
          f"`sparse_value_and_grad` cannot re-run `{eqn.primitive.name}`.")
  return params


def _interpret(jaxpr: Any, consts: list, args: list, tables: list,
               deltas: list, counter: list, recorded: list) -> list:
  """Evaluates `jaxpr`, replacing row gathers of `_TableRef` tables.

  A row gather of table `i` becomes `gather(stop_gradient(tables[i])) +
  deltas[k]` (k counts the gathers), and its indices are appended to
  `recorded`, so the gradient with respect to `deltas[k]` is the gradient of
  the loss with respect to the gathered rows.
  """
  env = {}

  def read(v):
    return v.val if hasattr(v, "val") else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, _TableRef) for x in invals):
      if eqn.primitive.name == "gather" and isinstance(invals[0], _TableRef):
        table = jax.lax.stop_gradient(tables[invals[0].index])
        params = _bind_params(eqn)
        rows = eqn.primitive.bind(table, invals[1], **params)
        k = counter[0]
        counter[0] += 1
        recorded.append((invals[1], params["mode"]))
        outvals = [rows + deltas[k].astype(rows.dtype)]
      else:
        inner_jaxpr, inner_consts = _sub_jaxpr(eqn)
        outvals = _interpret(inner_jaxpr, inner_consts, invals, tables,
                             deltas, counter, recorded)
    else:
      out = eqn.primitive.bind(*invals, **_bind_params(eqn))
      outvals = out if eqn.primitive.multiple_results else [out]
    for v, x in zip(eqn.outvars, outvals):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _recorded_ids(indices: jax.Array, mode: Any, num_rows: int) -> jax.Array:
  """The row ids of a row gather's indices, as the dense gradient sees them."""
  ids = jnp.reshape(indices[..., 0], (-1,))
  if str(mode).endswith("CLIP"):
    return jnp.clip(ids, 0, num_rows - 1)  # Its gradient goes to the edge.
  return ids  # Out of range: no gradient (dropped, or raises if concrete).


def _leaf_name(paths: list, i: int) -> str:
  """The key path of flat leaf `i`, as the error messages name it."""
  return jax.tree_util.keystr(tuple(paths[i])) or "<root>"


def _trace(fun: Any, treedef: Any, leaves: list, args: tuple,
           kwargs: dict) -> Tuple[Any, Any]:
  """The closed jaxpr of `fun` on the flat params, and its output's shape."""

  def flat_fun(flat):
    return fun(jax.tree.unflatten(treedef, flat), *args, **kwargs)

  return jax.make_jaxpr(flat_fun, return_shape=True)(leaves)


def _chosen_leaves(tables: Any, params: Any, paths: list) -> Optional[set]:
  """The flat indices of the leaves `tables` selects (None: find them)."""
  if tables is None:
    return None
  mask_tree = tables(params) if callable(tables) else tables
  chosen = set()
  try:
    flags = jax.tree.leaves(jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub), mask_tree, params))
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`tables` must have the tree structure of the params (or be a "
        f"prefix of it): {e}") from None
  for i, flag in enumerate(flags):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(
          f"`tables` leaf {_leaf_name(paths, i)} must be a bool, got {flag!r}.")
    if flag:
      chosen.add(i)
  return chosen


def _candidates(jaxpr: Any, leaves: list, chosen: Optional[set],
                paths: list) -> dict:
  """Input variable -> leaf index, for the leaves that may be tables."""
  candidates = {}
  for i, (v, x) in enumerate(zip(jaxpr.invars, leaves)):
    ok = (jnp.ndim(x) >= 1 if chosen is not None else jnp.ndim(x) >= 2) and (
        jnp.issubdtype(jnp.result_type(x), jnp.inexact))
    if chosen is not None and i in chosen and not ok:
      raise ValueError(
          f"`tables` selects leaf {_leaf_name(paths, i)}, which is not a "
          "floating table with rows (ndim >= 1).")
    if ok and (chosen is None or i in chosen):
      candidates[v] = i
  return candidates


def _check_chosen(chosen: set, dense: set, looked_up: set,
                  paths: list) -> None:
  """Raises naming the first leaf `tables` selects that cannot be sparse."""
  for i in sorted(chosen):
    if i in dense:
      raise ValueError(
          f"`tables` selects leaf {_leaf_name(paths, i)}, but the loss uses it "
          "other than through row lookups (e.g. an output layer tied to the "
          "embedding, or a slice), so its gradient is dense: leave it out "
          "of `tables`.")
    if i not in looked_up:
      raise ValueError(
          f"`tables` selects leaf {_leaf_name(paths, i)}, but the loss never "
          "looks up its rows.")


def _sparse_tables(jaxpr: Any, candidates: dict, chosen: Optional[set],
                   paths: list) -> Tuple[list, list]:
  """The sparse tables (sorted leaf indices) and their gathers, in order."""
  gathers, dense = [], set()
  _scan_uses(jaxpr, candidates, gathers, dense)
  looked_up = {i for i, _ in gathers}
  if chosen is not None:
    _check_chosen(chosen, dense, looked_up, paths)
  sparse = sorted(looked_up - dense)
  return sparse, [(i, aval) for i, aval in gathers if i in sparse]


def _row_loss(closed: Any, out_shape: Any, leaves: list, sparse_set: set,
              has_aux: bool, diff: list, deltas: list) -> Tuple[Any, Any]:
  """`(loss, (aux, gathers' (indices, mode)))` at dense leaves, row deltas."""
  args_in = [_TableRef(i) if i in sparse_set else diff[i]
             for i in range(len(leaves))]
  recorded = []
  outs = _interpret(closed.jaxpr, list(closed.consts), args_in, leaves, deltas,
                    [0], recorded)
  out = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  if has_aux:
    value, aux = out
    return value, (aux, recorded)
  return out, (None, recorded)


def _differentiate(closed: Any, out_shape: Any, leaves: list, sparse: list,
                   gathers: list, has_aux: bool) -> tuple:
  """(value, aux, recorded, dense leaves' grads, gathered rows' grads)."""
  sparse_set = set(sparse)
  deltas = [jnp.zeros(aval.shape, aval.dtype) for _, aval in gathers]
  diff_leaves = [None if i in sparse_set else x for i, x in enumerate(leaves)]
  loss = functools.partial(_row_loss, closed, out_shape, leaves, sparse_set,
                           has_aux)
  (value, (aux, recorded)), (g_diff, g_deltas) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(diff_leaves, deltas)
  return value, aux, recorded, g_diff, g_deltas


def _gather_ids(indices: jax.Array, mode: Any, num_rows: int,
                padding_id: Optional[int]) -> jax.Array:
  """A gather's row ids, with `padding_id` mapped to the fill id `num_rows`."""
  ids = _recorded_ids(indices, mode, num_rows)
  if padding_id is not None:
    ids = jnp.where(ids == padding_id, jnp.asarray(num_rows, ids.dtype), ids)
  return ids


def _sparse_grads(leaves: list, sparse: list, gathers: list, recorded: list,
                  g_deltas: list, padding_id: Optional[int]) -> dict:
  """Leaf index -> the `SparseRows` gradient of each sparse table."""
  per_table = {i: ([], []) for i in sparse}
  for (i, _), (indices, mode), g in zip(gathers, recorded, g_deltas):
    num_rows = jnp.shape(leaves[i])[0]
    per_table[i][0].append(_gather_ids(indices, mode, num_rows, padding_id))
    per_table[i][1].append(
        jnp.reshape(g, (-1,) + tuple(jnp.shape(leaves[i])[1:])))
  return {
      i: _sparse.SparseRows._make(  # pylint: disable=protected-access
          jnp.concatenate(ids) if len(ids) > 1 else ids[0],
          jnp.concatenate(values) if len(values) > 1 else values[0])
      for i, (ids, values) in per_table.items()}


def sparse_value_and_grad(
    fun: Any,
    tables: Any = None,
    *,
    has_aux: bool = False,
    padding_id: Optional[int] = None,
) -> Any:
  """`jax.value_and_grad` with row-sparse gradients for embedding tables.

  `jax.grad` of a loss that looks up rows of a $(V, D)$ table builds the
  dense $(V, D)$ gradient: a zero table with the rows' gradients added in,
  which costs $O(V D)$ time and memory at every step. This helper
  differentiates with respect to the looked-up rows instead and returns a
  `SparseRows(ids, values)` at each table leaf; the $(V, D)$ gradient is
  never built. Give it to `lo.lazy`, which updates only those rows.

  It traces `fun` once (`jax.make_jaxpr`) and finds the leaves of `params`
  that `fun` uses only through row lookups (`table[ids]`, `jnp.take(table,
  ids, axis=0)`, `flax.linen.Embed`, `flax.nnx.Embed`, also inside nested
  `jax.jit`/`jax.checkpoint` calls), then evaluates `fun` with each lookup's
  rows as an input. Every other leaf gets its ordinary dense gradient. A
  table looked up several times gets all the lookups' ids in one
  `SparseRows` (duplicates sum, like the dense gradient).

  Ids out of range: the dense gradient of a lookup drops them (the forward
  pass reads NaN rows with `jnp.take`'s default mode, as in Flax's `Embed`,
  and clamped rows with `table[ids]`). Their ids are kept as they are, so
  `lo.lazy` raises naming the leaf when the ids are concrete and drops them
  under `jax.jit`. A lookup with `mode="clip"` gets the clamped id, as its
  dense gradient does. Negative ids wrap around as in NumPy indexing, before
  the lookup.

  Padding ids: a row looked up for padding still counts as touched (its Adam
  moments decay, and a row with momentum moves). With `padding_id=p` the ids
  equal to `p` become the fill id $V$, which `lo.lazy` and
  `optax.apply_updates` ignore: the padding row then never changes.

  Args:
    fun: the loss, `fun(params, *args, **kwargs)`, returning a scalar (or
      `(scalar, aux)` with `has_aux=True`). Differentiated with respect to
      its first argument.
    tables: which leaves of `params` get `SparseRows` gradients: a pytree of
      bools with the structure of `params` (or a prefix of it), a callable
      returning one given the params, or None (default) for every floating
      leaf with ndim >= 2 that `fun` uses only through row lookups. A
      selected leaf used any other way (e.g. an output layer tied to the
      embedding) raises a `ValueError` naming it.
    has_aux: whether `fun` returns `(loss, aux)`.
    padding_id: an id whose lookups touch nothing (see above), or None.

  Returns:
    A function with the signature of `fun` that returns `(loss, grads)` (or
    `((loss, aux), grads)`), where `grads` has the structure of `params` with
    a `SparseRows` at each table leaf.

  Raises:
    ValueError: naming the leaf, if a leaf selected by `tables` is used other
      than through row lookups, or is not looked up at all.

  Example:
    >>> import jax.numpy as jnp
    >>> import lookahead_optax as lo
    >>> params = {"embed": jnp.ones((1000, 4)), "w": jnp.ones((4,))}
    >>> def loss(params, ids):
    ...   return jnp.sum(params["embed"][ids] @ params["w"])
    >>> value, grads = lo.sparse_value_and_grad(loss)(params, jnp.array([3, 7, 3]))
    >>> print(value, grads["embed"].ids, grads["embed"].values.shape)
    12.0 [3 7 3] (3, 4)
    >>> print(grads["w"])
    [3. 3. 3. 3.]
  """
  if not callable(fun):
    raise TypeError(f"`fun` must be callable, got {fun!r}.")
  if padding_id is not None and not isinstance(padding_id, (int, np.integer)):
    raise TypeError(f"`padding_id` must be an int or None, got {padding_id!r}.")

  def wrapped(params, *args, **kwargs):
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [p for p, _ in leaves_with_path]
    leaves = [x for _, x in leaves_with_path]
    closed, out_shape = _trace(fun, treedef, leaves, args, kwargs)
    chosen = _chosen_leaves(tables, params, paths)
    candidates = _candidates(closed.jaxpr, leaves, chosen, paths)
    sparse, gathers = _sparse_tables(closed.jaxpr, candidates, chosen, paths)
    value, aux, recorded, g_diff, g_deltas = _differentiate(
        closed, out_shape, leaves, sparse, gathers, has_aux)
    rows = _sparse_grads(leaves, sparse, gathers, recorded, g_deltas,
                         padding_id)
    grads = jax.tree.unflatten(treedef, [
        rows[i] if i in rows else g_diff[i] for i in range(len(leaves))])
    if has_aux:
      return (value, aux), grads
    return value, grads

  return wrapped
