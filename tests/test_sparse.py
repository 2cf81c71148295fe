"""Tests of `SparseRows` and its row helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from lookahead_optax import _sparse

V, D = 7, 3


def _rows(rng, n, dim=D):
  return rng.standard_normal((n, dim)).astype(np.float32)


def test_todense_sums_duplicates_and_drops_out_of_range():
  values = np.arange(15, dtype=np.float32).reshape(5, 3) + 0.5
  sparse = lo.SparseRows(jnp.array([4, 1, 4, -1, 7]), jnp.asarray(values))
  expected = np.zeros((V, D), np.float32)
  expected[4] = values[0] + values[2]
  expected[1] = values[1]  # -1 does not wrap to row 6; 7 is out of range.
  np.testing.assert_array_equal(sparse.todense(V), expected)
  assert sparse.todense(V, jnp.bfloat16).dtype == jnp.bfloat16


def test_apply_updates_writes_only_the_rows_jit_and_donated():
  rng = np.random.default_rng(0)
  table = _rows(rng, V)
  values = _rows(rng, 4)
  ids = np.array([2, 5, 2, 0], np.int32)
  update = lo.SparseRows(jnp.asarray(ids), jnp.asarray(values))
  expected = table.copy()
  np.add.at(expected, ids, values)
  params = {"emb": jnp.asarray(table), "b": jnp.ones(2)}
  updates = {"emb": update, "b": jnp.full(2, 0.25)}
  eager = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(eager["emb"], expected)
  np.testing.assert_array_equal(eager["b"], [1.25, 1.25])
  step = jax.jit(optax.apply_updates, donate_argnums=0)
  donated = {"emb": jnp.asarray(table), "b": jnp.ones(2)}
  out = step(donated, updates)
  np.testing.assert_array_equal(out["emb"], expected)
  assert donated["emb"].is_deleted()
  # The compiled step is a scatter on the table, no (V, D) temporary.
  hlo = step.lower(params, updates).as_text()
  assert "scatter" in hlo


def test_apply_updates_casts_to_the_param_dtype():
  table = jnp.zeros((V, D), jnp.bfloat16)
  update = lo.SparseRows(jnp.array([3]), jnp.full((1, D), 1.5, jnp.float32))
  out = optax.apply_updates(table, update)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32)[3], [1.5] * D)


def test_numpy_and_jax_params_plus_sparse():
  update = lo.SparseRows(np.array([1]), np.ones((1, D), np.float32))
  for table in (np.zeros((V, D), np.float32), jnp.zeros((V, D))):
    out = table + update
    np.testing.assert_array_equal(np.asarray(out)[1], np.ones(D))
    assert float(np.asarray(out).sum()) == D


def test_dedupe_sorted_padded_and_summed():
  values = np.array([[1.0], [2.0], [4.0], [8.0], [16.0], [32.0]], np.float32)
  sparse = lo.SparseRows(jnp.array([5, 2, 5, 9, -3, 2]), jnp.asarray(values))
  unique = jax.jit(lambda s: s.dedupe(V))(sparse)
  np.testing.assert_array_equal(unique.ids, [2, 5, V, V, V, V])
  np.testing.assert_array_equal(unique.values[:, 0], [34, 5, 0, 0, 0, 0])
  # The dense array is unchanged by deduping.
  np.testing.assert_array_equal(unique.todense(V), sparse.todense(V))
  ids, none = _sparse.dedupe_ids(jnp.array([3, 3, 1]), None, V)
  np.testing.assert_array_equal(ids, [1, 3, V])
  assert none is None


def test_gather_scatter_and_add_rows():
  rng = np.random.default_rng(1)
  table = jnp.asarray(_rows(rng, V))
  ids = jnp.array([6, 0, V, -1])
  got = _sparse.gather_rows(table, ids)
  np.testing.assert_array_equal(got[:2], np.asarray(table)[[6, 0]])
  np.testing.assert_array_equal(got[2:], np.zeros((2, D)))  # Fill, no wrap.
  rows = jnp.asarray(_rows(rng, 4))
  out = np.asarray(_sparse.scatter_rows(table, ids, rows))
  expected = np.asarray(table).copy()
  expected[[6, 0]] = np.asarray(rows)[:2]
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(
      lo.SparseRows(ids, rows).gather(table), got)
  added = _sparse.add_rows(table, jnp.array([1, 1]), jnp.ones((2, D)))
  np.testing.assert_array_equal(np.asarray(added)[1],
                                (np.asarray(table)[1] + 1) + 1)


def test_pytree_children_and_key_paths():
  sparse = lo.SparseRows(jnp.array([1, 2]), jnp.ones((2, D)))
  leaves = jax.tree_util.tree_flatten_with_path({"emb": sparse})[0]
  assert [jax.tree_util.keystr(p) for p, _ in leaves] == [
      "['emb'].ids", "['emb'].values"]
  doubled = jax.tree.map(lambda x: x * 2, sparse)
  np.testing.assert_array_equal(doubled.ids, [2, 4])  # Integer ops allowed.
  assert doubled.row_shape == (D,) and doubled.num_ids == 2
  out = jax.jit(lambda s: s.with_values(s.values + 1))(sparse)
  np.testing.assert_array_equal(out.values, np.full((2, D), 2.0))
  scanned = jax.lax.scan(lambda c, s: (c, s), 0,
                         jax.tree.map(lambda x: jnp.stack([x, x]), sparse))[1]
  assert scanned.ids.shape == (2, 2)


def test_stacked_ids_are_kept_and_rejected_when_applied():
  ids = jnp.array([[1, 2, 3], [3, 4, 5]])  # E.g. one row per device.
  sparse = lo.SparseRows(ids, jnp.ones((2, 3, D)))
  assert sparse.ids.shape == (2, 3) and sparse.values.shape == (2, 3, D)
  with pytest.raises(ValueError, match=r"must have `ids` of shape \(N,\), got "
                     r"shape \(2, 3\)"):
    optax.apply_updates(jnp.zeros((V, D)), sparse)


def test_sparse_plus_sparse_concatenates():
  a = lo.SparseRows(jnp.array([1]), jnp.ones((1, D)))
  b = lo.SparseRows(jnp.array([1, 4]), 2 * jnp.ones((2, D)))
  c = a + b
  np.testing.assert_array_equal(c.ids, [1, 1, 4])
  np.testing.assert_array_equal(c.todense(V)[1], [3, 3, 3])
  assert sum([a, b]).num_ids == 3


def test_pmap():
  n = jax.local_device_count()
  ids = jnp.arange(n * 2).reshape(n, 2) % V
  values = jnp.ones((n, 2, D))
  stacked = lo.SparseRows._make(ids, values)  # pylint: disable=protected-access
  tables = jnp.zeros((n, V, D))
  out = jax.pmap(lambda t, s: t + s)(tables, stacked)
  for d in range(n):
    expected = np.zeros((V, D))
    np.add.at(expected, np.asarray(ids[d]), 1.0)
    np.testing.assert_array_equal(out[d], expected)


# Errors.


def test_non_integer_ids_raise():
  with pytest.raises(TypeError, match=r"`ids` of a `SparseRows` must be "
                     r"integers, got dtype float32"):
    lo.SparseRows(jnp.array([1.0]), jnp.ones((1, D)))


def test_values_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r"`values` of a `SparseRows` must have "
                     r"shape `ids.shape \+ row`, got ids of shape \(3,\) and "
                     r"values of shape \(2, 3\)"):
    lo.SparseRows(jnp.array([1, 2, 3]), jnp.ones((2, D)))


def test_row_shape_mismatch_with_table_raises():
  update = lo.SparseRows(jnp.array([1]), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match=r"has values of shape \(1, 4\), but the "
                     r"table has shape \(7, 3\): values must have shape "
                     r"\(N, \*row\) = \(1, 3\)"):
    optax.apply_updates(jnp.zeros((V, D)), update)
  with pytest.raises(ValueError, match="update of a scalar"):
    optax.apply_updates(jnp.zeros(()), update)


@pytest.mark.parametrize("op", [
    lambda s: s * 2.0, lambda s: 0.5 * s, lambda s: -s, lambda s: s - s,
    lambda s: s / 2.0, lambda s: np.asarray(s), lambda s: 1.0 + s])
def test_dense_arithmetic_raises(op):
  sparse = lo.SparseRows(jnp.array([1]), jnp.ones((1, D)))
  with pytest.raises(TypeError, match=r"`SparseRows` does not support .* put "
                     "it inside `lazy`"):
    op(sparse)


@pytest.mark.parametrize("tx", [
    optax.scale(-0.5), optax.clip(1.0), optax.sgd(0.1)])
def test_elementwise_transformation_outside_lazy_raises(tx):
  params = {"emb": jnp.zeros((V, D))}
  grads = {"emb": lo.SparseRows(jnp.array([1, 2]), jnp.ones((2, D)))}
  with pytest.raises(TypeError, match=r"The `ids` of a `SparseRows` became "
                     r"non-integer \(dtype float32\).*outside `lo.lazy`"):
    tx.update(grads, tx.init(params), params)


# `sparse_value_and_grad`.


def _dense_equal(sparse, dense):
  np.testing.assert_array_equal(sparse.todense(dense.shape[0]), dense)


def test_sparse_grad_plain_function_two_lookups_and_dense_leaf():
  rng = np.random.default_rng(2)
  params = {"emb": jnp.asarray(_rows(rng, V)), "w": jnp.asarray(_rows(rng, D))}

  def loss(p, ids, other):
    h = jnp.tanh(p["emb"][ids] @ p["w"])  # (B, D)
    return jnp.sum(h ** 2) + 0.3 * jnp.sum(jnp.take(p["emb"], other, axis=0))

  ids = jnp.array([4, 1, 4])
  other = jnp.array([[6, 4]])
  value, grads = lo.sparse_value_and_grad(loss)(params, ids, other)
  want_value, want = jax.value_and_grad(loss)(params, ids, other)
  assert value == want_value
  assert isinstance(grads["emb"], lo.SparseRows)
  np.testing.assert_array_equal(grads["emb"].ids, [4, 1, 4, 6, 4])
  np.testing.assert_allclose(grads["emb"].todense(V), want["emb"], rtol=1e-6)
  np.testing.assert_array_equal(grads["w"], want["w"])


def test_sparse_grad_linen_model_jit_and_lazy_train_state():
  nn = pytest.importorskip("flax.linen")
  train_state = pytest.importorskip("flax.training.train_state")

  class Model(nn.Module):

    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(V, D, name="embed")(ids)
      return nn.Dense(2)(x).mean()

  model = Model()
  ids = jnp.array([[1, 2, 2], [6, 0, 1]])
  params = model.init(jax.random.key(0), ids)["params"]

  def loss(p, ids):
    return model.apply({"params": p}, ids)

  value, grads = jax.jit(lo.sparse_value_and_grad(loss))(params, ids)
  want_value, want = jax.value_and_grad(loss)(params, ids)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  table = grads["embed"]["embedding"]
  assert isinstance(table, lo.SparseRows) and table.ids.shape == (6,)
  np.testing.assert_allclose(table.todense(V), want["embed"]["embedding"],
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(grads["Dense_0"]["kernel"],
                             want["Dense_0"]["kernel"], rtol=1e-6)
  # TrainState.apply_gradients takes the sparse gradients unchanged.
  tx = lo.lazy(optax.adam(0.1))
  sparse_ts = train_state.TrainState.create(apply_fn=model.apply,
                                            params=params, tx=tx)
  dense_params, dense_state = params, tx.init(params)
  for _ in range(2):
    _, grads = lo.sparse_value_and_grad(loss)(sparse_ts.params, ids)
    sparse_ts = sparse_ts.apply_gradients(grads=grads)
    want = jax.grad(loss)(dense_params, ids)
    u, dense_state = tx.update(want, dense_state, dense_params,
                               touched_rows={"embed": {"embedding": ids}})
    dense_params = optax.apply_updates(dense_params, u)
  np.testing.assert_allclose(sparse_ts.params["embed"]["embedding"],
                             dense_params["embed"]["embedding"], rtol=1e-6)
  untouched = np.setdiff1d(np.arange(V), np.asarray(ids))
  np.testing.assert_array_equal(
      np.asarray(sparse_ts.params["embed"]["embedding"])[untouched],
      np.asarray(params["embed"]["embedding"])[untouched])


def test_sparse_grad_nnx_model_and_nnx_optimizer():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(V, D, rngs=rngs)
      self.out = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, ids):
      return jnp.mean(self.out(self.embed(ids)) ** 2)

  model = Model(nnx.Rngs(0))
  ids = jnp.array([3, 5, 3, 0])
  before = np.asarray(model.embed.embedding[...])
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, ids):
    return nnx.merge(graphdef, params)(ids)

  _, grads = lo.sparse_value_and_grad(loss)(params, ids)
  want = jax.grad(loss)(params, ids)
  sparse_table = grads["embed"]["embedding"][...]
  assert isinstance(sparse_table, lo.SparseRows)
  np.testing.assert_allclose(sparse_table.todense(V),
                             want["embed"]["embedding"][...], rtol=1e-6)
  optimizer = nnx.Optimizer(model, lo.lazy(optax.sgd(0.5)), wrt=nnx.Param)
  optimizer.update(model, grads)
  after = np.asarray(model.embed.embedding[...])
  expected = before.copy()
  np.add.at(expected, np.asarray(ids), -0.5 * np.asarray(
      sparse_table.values))
  np.testing.assert_allclose(after, expected, rtol=1e-6)
  np.testing.assert_array_equal(after[[1, 2, 4, 6]], before[[1, 2, 4, 6]])


def test_sparse_grad_tied_table_is_dense_or_raises():
  params = {"emb": jnp.ones((V, D))}

  def tied(p, ids):
    h = p["emb"][ids]
    return jnp.sum(h @ p["emb"].T)  # The output layer reuses the table.

  ids = jnp.array([1, 2])
  _, grads = lo.sparse_value_and_grad(tied)(params, ids)
  assert not isinstance(grads["emb"], lo.SparseRows)
  np.testing.assert_array_equal(grads["emb"], jax.grad(tied)(params, ids)["emb"])
  with pytest.raises(ValueError, match=r"`tables` selects leaf \['emb'\], but "
                     "the loss uses it other than through row lookups"):
    lo.sparse_value_and_grad(tied, tables={"emb": True})(params, ids)
  with pytest.raises(ValueError, match=r"`tables` selects leaf \['b'\], but "
                     "the loss never looks up its rows"):
    lo.sparse_value_and_grad(lambda p: jnp.sum(p["a"]), tables=lambda p: {
        "a": False, "b": True})({"a": jnp.ones(2), "b": jnp.ones((3, 2))})


def test_sparse_grad_padding_and_out_of_range_ids():
  params = jnp.asarray(np.arange(V * D, dtype=np.float32).reshape(V, D))
  pad = 0

  def loss(p, ids):
    return jnp.sum(jnp.take(p, ids, axis=0) * 2.0)

  ids = jnp.array([pad, 3, pad])
  _, grad = lo.sparse_value_and_grad(loss, padding_id=pad)(params, ids)
  np.testing.assert_array_equal(grad.ids, [V, 3, V])  # The fill id.
  tx = lo.lazy(optax.adam(0.1))
  u, _ = tx.update(grad, tx.init(params), params)
  new = optax.apply_updates(params, u)
  np.testing.assert_array_equal(new[pad], params[pad])
  assert np.all(np.asarray(new[3]) != np.asarray(params[3]))
  # jnp.take fills out-of-range lookups: the id is kept, lazy raises.
  _, grad = lo.sparse_value_and_grad(loss)(params, jnp.array([2, V + 3]))
  np.testing.assert_array_equal(grad.ids, [2, V + 3])
  with pytest.raises(ValueError, match=r"leaf <root> is a `SparseRows` with "
                     rf"id {V + 3} out of range"):
    tx.update(grad, tx.init(params), params)
  # Plain indexing clamps the rows read, but its dense gradient drops them.
  index = lambda p, ids: jnp.sum(p[ids] * 2.0)
  _, grad = lo.sparse_value_and_grad(index)(params, jnp.array([2, V + 3]))
  np.testing.assert_array_equal(grad.ids, [2, V + 3])
  _dense_equal(grad, jax.grad(index)(params, jnp.array([2, V + 3])))
  # mode="clip": the gradient goes to the clamped row, as the dense one.
  clip = lambda p, ids: jnp.sum(p.at[ids].get(mode="clip") * 2.0)
  _, grad = lo.sparse_value_and_grad(clip)(params, jnp.array([2, V + 3]))
  np.testing.assert_array_equal(grad.ids, [2, V - 1])
  _dense_equal(grad, jax.grad(clip)(params, jnp.array([2, V + 3])))


def test_sparse_grad_has_aux_and_no_table_sized_gradient():
  big_v = 200_000
  params = {"emb": jnp.zeros((big_v, 8)), "w": jnp.ones((8,))}

  def loss(p, ids):
    out = p["emb"][ids] @ p["w"] + 1.0
    return jnp.sum(out ** 2), out.shape[0]

  fn = jax.jit(lo.sparse_value_and_grad(loss, has_aux=True))
  ids = jnp.arange(64) * 7
  (value, aux), grads = fn(params, ids)
  assert float(value) == 64.0 and int(aux) == 64
  np.testing.assert_array_equal(grads["emb"].values, 2.0 * np.ones((64, 8)))
  memory = fn.lower(params, ids).compile().memory_analysis()
  assert memory.temp_size_in_bytes + memory.output_size_in_bytes < 100_000
  dense = jax.jit(jax.grad(lambda p, i: loss(p, i)[0]))
  assert dense.lower(params, ids).compile().memory_analysis(
  ).output_size_in_bytes >= big_v * 8 * 4
