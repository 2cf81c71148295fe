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
      ids: integer row ids, shape (N,). Ids of shape (B, L) with values of
        shape (B, L, *row) (the lookups of a batch of sequences) are
        accepted too: `lo.lazy` and `lo.lookahead` flatten them to (B * L,)
        (`flat`); under `jax.pmap` the leading axis is the devices' axis.
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

  def flat(self) -> "SparseRows":
    """The same rows with one-dimensional ids.

    Lookups of shape (B, L) give ids of shape (B, L) and values of shape
    (B, L, *row); this is the same array with ids of shape (B * L,) and
    values of shape (B * L, *row). `lo.lazy` and `lo.lookahead` flatten the
    ids they get this way.
    """
    if jnp.ndim(self.ids) <= 1:
      return self
    id_shape = tuple(jnp.shape(self.ids))
    row = tuple(jnp.shape(self.values))[len(id_shape):]
    return SparseRows._make(jnp.reshape(self.ids, (-1,)),
                            jnp.reshape(self.values, (-1,) + row))

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


def flat_ids(tree: Any) -> Any:
  """`tree` with each `SparseRows` given one-dimensional ids (`flat`)."""
  return jax.tree.map(lambda x: x.flat() if is_sparse_rows(x) else x, tree,
                      is_leaf=is_sparse_rows)


def is_sparse_rows(x: Any) -> bool:
  """Whether `x` is a `SparseRows` (use as `is_leaf` to stop at them)."""
  return isinstance(x, SparseRows)
