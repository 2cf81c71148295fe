"""`SparseRows`: a gradient or update that is zero except for some rows."""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _is_array_like(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_int_dtype(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.integer)


def in_range(ids: jax.Array, num_rows: int) -> jax.Array:
  """Bool array, True where `ids` is in `[0, num_rows)`."""
  return (ids >= 0) & (ids < num_rows)


def safe_ids(ids: jax.Array, num_rows: int) -> jax.Array:
  """`ids` with every id outside `[0, num_rows)` replaced by `num_rows`.

  `num_rows` is out of range for a table of `num_rows` rows, so scatters with
  `mode="drop"` skip it and gathers with `mode="fill"` read the fill value.
  Negative ids do not wrap around (unlike NumPy indexing).
  """
  ids = jnp.asarray(ids)
  return jnp.where(in_range(ids, num_rows), ids,
                   jnp.asarray(num_rows, ids.dtype))


def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows `table[ids]`, shape `ids.shape + table.shape[1:]`.

  Ids outside `[0, len(table))` (negative ones included) read zeros.
  """
  num_rows = jnp.shape(table)[0]
  return jnp.asarray(table).at[safe_ids(ids, num_rows)].get(
      mode="fill", fill_value=0)


def scatter_rows(table: jax.Array, ids: jax.Array,
                 rows: jax.Array) -> jax.Array:
  """`table` with `table[ids] = rows`; ids out of range are dropped.

  With duplicate ids one of the rows is written (which one is unspecified);
  use unique ids (e.g. from `dedupe_ids`). Under `jax.jit` with `table`
  donated the write is in place.
  """
  table = jnp.asarray(table)
  num_rows = table.shape[0]
  return table.at[safe_ids(ids, num_rows)].set(
      jnp.asarray(rows).astype(table.dtype), mode="drop")


def add_rows(table: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
  """`table` with `values` added at rows `ids` (duplicates sum).

  Ids out of range are dropped; `values` is cast to the table's dtype first.
  Under `jax.jit` with `table` donated the write is in place.
  """
  table = jnp.asarray(table)
  num_rows = table.shape[0]
  return table.at[safe_ids(ids, num_rows)].add(
      jnp.asarray(values).astype(table.dtype), mode="drop")


def dedupe_ids(ids: jax.Array, values: Optional[jax.Array],
               num_rows: int) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Unique ids padded to the input length, with the values of each id summed.

  Args:
    ids: integer ids, shape (N,).
    values: rows, shape (N, *row), or None.
    num_rows: the number of rows V of the table.

  Returns:
    `(unique, summed)`: `unique` has shape (N,) and the ids' dtype, holds the
    distinct ids in `[0, V)` in increasing order, then the fill id V (out of
    range) in the remaining slots; `summed[j]` is the sum of the `values`
    whose id is `unique[j]` (zeros at fill slots; None when `values` is
    None). Ids out of range (negative ones included) are dropped.
  """
  ids = jnp.asarray(ids)
  n = ids.shape[0]
  fill = jnp.asarray(num_rows, ids.dtype)
  ids = safe_ids(ids, num_rows)
  if n == 0:
    return ids, values
  # One single-operand sort (fast on every backend, unlike a sort that
  # carries a permutation), then each id finds its slot by binary search.
  sorted_ids = jax.lax.sort(ids)
  first = jnp.concatenate(
      [jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
  slot = jnp.cumsum(first.astype(jnp.int32)) - 1
  unique = jnp.full((n,), fill, ids.dtype).at[slot].set(sorted_ids)
  if values is None:
    return unique, None
  inverse = slot[jnp.searchsorted(sorted_ids, ids, side="left",
                                  method="scan_unrolled")]
  values = jnp.asarray(values)
  summed = jax.ops.segment_sum(values, inverse, num_segments=n)
  keep = jnp.reshape(unique < num_rows, (n,) + (1,) * (values.ndim - 1))
  summed = jnp.where(keep, summed, jnp.zeros((), summed.dtype))
  return unique, summed


def _unsupported(op: str):
  def method(self, *args, **kwargs):
    del self, args, kwargs
    raise TypeError(
        f"`SparseRows` does not support `{op}`: only `params + sparse_rows` "
        "(what `optax.apply_updates` does) is defined. A `SparseRows` reached "
        "an operation that expects a dense array, e.g. an optax "
        "transformation placed outside `lo.lazy`: put it inside `lazy` "
        "(`lo.lazy(optax.chain(..., optax.adam(...)))`), which works on the "
        "rows, or call `.todense(num_rows)`.")
  method.__name__ = op
  return method


@jax.tree_util.register_pytree_with_keys_class
class SparseRows:
  """A gradient or update of a table that is zero except for some rows.

  `SparseRows(ids, values)` stands for the array of shape $(V, \\ldots)$
  (a table of $V$ rows) that is zero except at rows `ids`, where it holds
  `values`: its dense form is `zeros((V, *row)).at[ids].add(values)`. Ids may
  repeat; the values of a repeated id sum (as the gradient of a lookup of
  that row twice does). The table size $V$ is not stored: it is the number
  of rows of the parameter the `SparseRows` sits next to.

  It is a pytree with two children, `ids` then `values`, so it passes
  through `jax.jit`, `jax.pmap`, `jax.lax.scan` and checkpointing. Use it in
  place of the gradient of an embedding table (see
  `lo.sparse_value_and_grad`); `lo.lazy` then updates only those rows and
  returns a `SparseRows` update, which `optax.apply_updates` applies by
  writing only those rows: `params + sparse` is
  `params.at[ids].add(values.astype(params.dtype))`, in place when the params
  are donated to `jax.jit`.

  Ids outside $[0, V)$ (negative ones included: they do not wrap around) are
  dropped when the rows are applied or gathered; `lo.lazy` raises for
  concrete out-of-range ids and drops traced ones. The id $V$ itself is the
  fill id: it pads the unique ids of `dedupe` and marks padding lookups,
  and `lo.lazy` accepts it and ignores it.

  Other arithmetic (`sparse * 2`, `-sparse`, `jnp.asarray(sparse)`) raises a
  `TypeError`: an optax transformation that reaches a `SparseRows` outside
  `lo.lazy` must fail, not compute on the ids. Put such transformations
  inside `lazy`.

  Attributes:
    ids: integer row ids, shape (N,).
    values: the rows, shape (N, *row); `row` is the shape of one row of the
      table.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> table = jnp.zeros((4, 2))
    >>> grad = lo.SparseRows(jnp.array([2, 0, 2]),
    ...                      jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    >>> print(grad.todense(4))  # the ids 2 sum
    [[2. 2.]
     [0. 0.]
     [4. 4.]
     [0. 0.]]
    >>> print(optax.apply_updates(table, grad))
    [[2. 2.]
     [0. 0.]
     [4. 4.]
     [0. 0.]]
    >>> unique = grad.dedupe(4)  # sorted, padded with the fill id 4
    >>> print(unique.ids, unique.values[:, 0])
    [0 2 4] [2. 4. 0.]
  """

  __slots__ = ("ids", "values")
  __array_priority__ = 1000  # NumPy defers `ndarray + SparseRows` to us.

  def __init__(self, ids: Any, values: Any):
    """Makes a `SparseRows`, checking the shapes and dtype of concrete input.

    Args:
      ids: integer row ids, shape (N,). (A leading axis more, (M, N) with
        values of shape (M, N, *row), is accepted for stacking, e.g. one
        `SparseRows` per device for `jax.pmap`; flatten lookups of shape
        (B, L) to (B * L,) yourself.)
      values: the rows, shape (N, *row).

    Raises:
      TypeError: if `ids` are not integers.
      ValueError: if `values` does not start with the shape of `ids`.
    """
    if _is_array_like(ids) or isinstance(ids, (list, tuple)):
      if not _is_array_like(ids):
        ids = np.asarray(ids)
      if not _is_int_dtype(ids.dtype):
        raise TypeError(
            f"`ids` of a `SparseRows` must be integers, got dtype {ids.dtype}.")
      if not _is_array_like(values):
        values = jnp.asarray(values)
      id_shape = tuple(ids.shape)
      if tuple(values.shape[:len(id_shape)]) != id_shape:
        raise ValueError(
            "`values` of a `SparseRows` must have shape `ids.shape + row`, got "
            f"ids of shape {id_shape} and values of shape "
            f"{tuple(values.shape)}.")
    self.ids = ids
    self.values = values

  # Pytree protocol.
  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("ids"), self.ids),
            (jax.tree_util.GetAttrKey("values"), self.values)), None

  def tree_flatten(self):
    return (self.ids, self.values), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    ids, values = children
    dtype = getattr(ids, "dtype", None)
    if (dtype is not None and not _is_int_dtype(dtype)
        and dtype != jax.dtypes.float0):
      raise TypeError(
          "The `ids` of a `SparseRows` became non-integer (dtype "
          f"{dtype}): a transformation computed on them, e.g. an optax "
          "transformation placed outside `lo.lazy` (`optax.scale`, "
          "`optax.clip_by_global_norm`, ...). Put it inside `lazy`, which "
          "applies it to the rows.")
    obj = object.__new__(cls)
    obj.ids = ids
    obj.values = values
    return obj

  # Shape information.
  @property
  def num_ids(self) -> int:
    """N, the number of ids (with repeats and padding)."""
    return int(jnp.shape(self.ids)[0])

  @property
  def row_shape(self) -> tuple:
    """The shape of one row, `values.shape[1:]`."""
    return tuple(jnp.shape(self.values)[1:])

  @property
  def dtype(self):
    """The dtype of the values."""
    return jnp.result_type(self.values)

  def __repr__(self) -> str:
    return f"SparseRows(ids={self.ids!r}, values={self.values!r})"

  # Conversions and row helpers.
  def todense(self, num_rows: int, dtype: Any = None) -> jax.Array:
    """The dense array of shape `(num_rows, *row)` (repeated ids summed).

    Ids out of range are dropped. `dtype` defaults to the values' dtype.
    """
    dtype = self.dtype if dtype is None else dtype
    zeros = jnp.zeros((num_rows,) + self.row_shape, dtype)
    return add_rows(zeros, self.ids, self.values)

  def dedupe(self, num_rows: int) -> "SparseRows":
    """The same array with unique ids: see `dedupe_ids`.

    The result has the same N: the distinct ids in $[0, V)$ in increasing
    order, then the fill id `num_rows` (out of range, so dropped when
    applied) with zero values. Ids out of range are dropped.
    """
    ids, values = dedupe_ids(self.ids, self.values, num_rows)
    return SparseRows._make(ids, values)

  def gather(self, table: jax.Array) -> jax.Array:
    """The rows of `table` at `self.ids` (zeros for ids out of range)."""
    return gather_rows(table, self.ids)

  def with_values(self, values: jax.Array) -> "SparseRows":
    """A `SparseRows` with the same ids and new values (shape (N, *row))."""
    return SparseRows._make(self.ids, values)

  @classmethod
  def _make(cls, ids, values) -> "SparseRows":
    """Builds one without the checks of `__init__` (for traced internals)."""
    obj = object.__new__(cls)
    obj.ids = ids
    obj.values = values
    return obj

  def check_table(self, table: Any, where: str = "") -> None:
    """Raises if these rows cannot be rows of `table`.

    Args:
      table: the parameter (array or anything with `shape`/`dtype`).
      where: the leaf path, for the message.

    Raises:
      TypeError: if the ids are not integers.
      ValueError: if `table` has ndim 0, or its row shape differs from the
        values' row shape, or the ids are not one-dimensional.
    """
    at = f" at leaf {where}" if where else ""
    ids_dtype = jnp.result_type(self.ids)
    if not _is_int_dtype(ids_dtype):
      raise TypeError(
          f"`SparseRows`{at} must have integer `ids`, got dtype {ids_dtype}.")
    if jnp.ndim(self.ids) != 1:
      raise ValueError(
          f"`SparseRows`{at} must have `ids` of shape (N,), got shape "
          f"{tuple(jnp.shape(self.ids))}.")
    shape = tuple(jnp.shape(table))
    if not shape:
      raise ValueError(
          f"`SparseRows`{at} is the update of a scalar (shape ()): only "
          "tables (ndim >= 1) have rows.")
    if tuple(jnp.shape(self.values)) != (self.num_ids,) + shape[1:]:
      raise ValueError(
          f"`SparseRows`{at} has values of shape "
          f"{tuple(jnp.shape(self.values))}, but the table has shape {shape}: "
          f"values must have shape (N, *row) = {(self.num_ids,) + shape[1:]}.")

  def __getitem__(self, index: Any) -> "SparseRows":
    # `x[...]` is how Flax NNX reads a Variable's value.
    if index is Ellipsis:
      return self
    raise TypeError(
        f"`SparseRows` supports only `sparse[...]` (itself), got index "
        f"{index!r}: use `.ids` and `.values`.")

  # Arithmetic: only `dense + sparse` (what `optax.apply_updates` does).
  def __radd__(self, other: Any) -> Any:
    if isinstance(other, SparseRows):
      return self.__add__(other)
    if not _is_array_like(other):
      if isinstance(other, (int, float)) and other == 0:
        return self  # sum([...]) starts from 0.
      return _unsupported("scalar + SparseRows")(self)
    self.check_table(other)
    return add_rows(other, self.ids, self.values)

  def __add__(self, other: Any) -> Any:
    if isinstance(other, SparseRows):
      values = jnp.concatenate(
          [jnp.asarray(self.values),
           jnp.asarray(other.values).astype(self.dtype)])
      return SparseRows._make(jnp.concatenate([self.ids, other.ids]), values)
    return self.__radd__(other)

  __sub__ = _unsupported("-")
  __rsub__ = _unsupported("-")
  __mul__ = _unsupported("*")
  __rmul__ = _unsupported("*")
  __truediv__ = _unsupported("/")
  __rtruediv__ = _unsupported("/")
  __pow__ = _unsupported("**")
  __neg__ = _unsupported("unary -")
  __matmul__ = _unsupported("@")
  __rmatmul__ = _unsupported("@")
  __array__ = _unsupported("conversion to a NumPy array")


def is_sparse_rows(x: Any) -> bool:
  """Whether `x` is a `SparseRows` (use as `is_leaf` to stop at them)."""
  return isinstance(x, SparseRows)


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

    def flat_fun(flat):
      return fun(jax.tree.unflatten(treedef, flat), *args, **kwargs)

    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(leaves)
    jaxpr = closed.jaxpr

    def where(i):
      return jax.tree_util.keystr(tuple(paths[i])) or "<root>"

    if tables is None:
      chosen = None
    else:
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
              f"`tables` leaf {where(i)} must be a bool, got {flag!r}.")
        if flag:
          chosen.add(i)
    candidates = {}
    for i, (v, x) in enumerate(zip(jaxpr.invars, leaves)):
      ok = (jnp.ndim(x) >= 1 if chosen is not None else jnp.ndim(x) >= 2) and (
          jnp.issubdtype(jnp.result_type(x), jnp.inexact))
      if chosen is not None and i in chosen and not ok:
        raise ValueError(
            f"`tables` selects leaf {where(i)}, which is not a floating "
            "table with rows (ndim >= 1).")
      if ok and (chosen is None or i in chosen):
        candidates[v] = i
    gathers, dense = [], set()
    _scan_uses(jaxpr, candidates, gathers, dense)
    looked_up = {i for i, _ in gathers}
    if chosen is not None:
      for i in sorted(chosen):
        if i in dense:
          raise ValueError(
              f"`tables` selects leaf {where(i)}, but the loss uses it other "
              "than through row lookups (e.g. an output layer tied to the "
              "embedding, or a slice), so its gradient is dense: leave it out "
              "of `tables`.")
        if i not in looked_up:
          raise ValueError(
              f"`tables` selects leaf {where(i)}, but the loss never looks "
              "up its rows.")
    sparse = sorted(looked_up - dense)
    gathers = [(i, aval) for i, aval in gathers if i in sparse]
    sparse_set = set(sparse)
    deltas = [jnp.zeros(aval.shape, aval.dtype) for _, aval in gathers]
    diff_leaves = [None if i in sparse_set else x for i, x in enumerate(leaves)]

    def inner(diff, deltas):
      args_in = [_TableRef(i) if i in sparse_set else diff[i]
                 for i in range(len(leaves))]
      recorded = []
      outs = _interpret(jaxpr, list(closed.consts), args_in, leaves, deltas,
                        [0], recorded)
      out = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
      if has_aux:
        value, aux = out
        return value, (aux, recorded)
      return out, (None, recorded)

    (value, (aux, recorded)), (g_diff, g_deltas) = jax.value_and_grad(
        inner, argnums=(0, 1), has_aux=True)(diff_leaves, deltas)
    per_table = {i: ([], []) for i in sparse}
    for (i, _), (indices, mode), g in zip(gathers, recorded, g_deltas):
      num_rows = jnp.shape(leaves[i])[0]
      ids = _recorded_ids(indices, mode, num_rows)
      if padding_id is not None:
        ids = jnp.where(ids == padding_id, jnp.asarray(num_rows, ids.dtype),
                        ids)
      per_table[i][0].append(ids)
      per_table[i][1].append(
          jnp.reshape(g, (-1,) + tuple(jnp.shape(leaves[i])[1:])))
    grads = []
    for i in range(len(leaves)):
      if i in sparse_set:
        ids, values = per_table[i]
        grads.append(SparseRows._make(  # pylint: disable=protected-access
            jnp.concatenate(ids) if len(ids) > 1 else ids[0],
            jnp.concatenate(values) if len(values) > 1 else values[0]))
      else:
        grads.append(g_diff[i])
    grads = jax.tree.unflatten(treedef, grads)
    if has_aux:
      return (value, aux), grads
    return value, grads

  return wrapped
