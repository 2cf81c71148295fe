"""Row-sparse training as users write it: mistakes, shapes and warnings.

Every mistake with `SparseRows` gradients that reaches this library's code
fails with an error that names `lazy` and says where to put the
transformation; lookups of shape (B, L) are flattened; the lazy path's CPU
warning names the user's line and fires for donated steps only.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from lookahead_optax import _lazy
from tests._helpers import assert_tree_bitwise

V, D = 10, 3
IDS = jnp.array([[1, 2], [2, 7]])  # a batch of 2 sequences of length 2


def _params():
  return {"embed": jnp.arange(V * D, dtype=jnp.float32).reshape(V, D) / 10,
          "w": jnp.array([0.5, -1.0, 2.0])}


def _loss(p, ids=IDS):
  return jnp.sum(jnp.tanh(p["embed"][ids]) * p["w"])


def _sparse_grads(params, ids=IDS):
  return lo.sparse_value_and_grad(lambda p: _loss(p, ids))(params)[1]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rows", [None, {"embed": 4}])
def test_lookahead_without_lazy_names_lazy(jit, rows):
  tx = lo.lookahead(optax.adam(1e-3), 3, rows_per_step=rows)
  params = _params()
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=(
      r"gradient of leaf \['embed'\] is a `SparseRows`.*no "
      r"`lookahead_optax.lazy`.*`lookahead\(lazy\(inner\), \.\.\.\)`.*"
      r"go inside `lazy`.*optax.clip_by_global_norm")):
    update(_sparse_grads(params), tx.init(params), params)


def test_clipping_inside_lazy_is_the_dense_global_norm():
  # The recipe the errors give: transformations that read the gradient go
  # inside lazy, which hands them the deduplicated rows.
  params = _params()
  inner = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0))
  sparse = lo.lazy(inner)
  updates, _ = sparse.update(_sparse_grads(params), sparse.init(params),
                             params)
  dense_updates, _ = inner.update(jax.grad(_loss)(params),
                                  inner.init(params), params)
  touched = np.array([1, 2, 7])
  np.testing.assert_allclose(updates["embed"].todense(V)[touched],
                             dense_updates["embed"][touched], rtol=1e-6)
  np.testing.assert_allclose(updates["w"], dense_updates["w"], rtol=1e-6)
  norm = optax.tree.norm(dense_updates)
  np.testing.assert_allclose(norm, 0.05, rtol=1e-5)  # clipping was active


def test_two_dimensional_ids_are_flattened():
  params = _params()
  grads = _sparse_grads(params)
  table = grads["embed"]
  two_d = lo.SparseRows(table.ids.reshape(2, 2),
                        table.values.reshape(2, 2, D))
  assert two_d.flat().ids.shape == (4,)
  assert_tree_bitwise(two_d.flat().values, table.values)
  tx = lo.lookahead(lo.lazy(optax.adam(0.1)), 2, 0.3,
                    rows_per_step={"embed": 4})
  state_1d = state_2d = tx.init(params)
  p_1d = p_2d = params
  for _ in range(4):  # two cycles, eagerly: the same ops, bitwise
    u, state_1d = tx.update(dict(grads), state_1d, p_1d)
    p_1d = optax.apply_updates(p_1d, u)
    u, state_2d = tx.update(dict(grads, embed=two_d), state_2d, p_2d)
    p_2d = optax.apply_updates(p_2d, u)
  assert_tree_bitwise(p_2d, p_1d)
  assert not np.array_equal(p_1d["embed"][1], params["embed"][1])
  np.testing.assert_array_equal(p_1d["embed"][0], params["embed"][0])


def _warning_setup(monkeypatch):
  monkeypatch.setattr(_lazy, "_warned_cpu_copies", [])
  monkeypatch.setattr(_lazy, "_COPY_WARNING_MIN_SIZE", V * D)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  tx = lo.lazy(optax.adam(0.1))
  params = jnp.ones((V, D))
  return tx, params, tx.init(params)


def test_cpu_copy_warning_does_not_guess_donation(monkeypatch):
  # JAX has no public way to tell whether the step being traced donates, so
  # an undonated jitted step warns too, once, and the message says when the
  # copies happen and how to silence it.
  tx, params, state = _warning_setup(monkeypatch)
  with pytest.warns(RuntimeWarning, match=r"lazy: XLA:CPU copies .* that "
                    r"donates its state.*no public way to tell whether a step "
                    r"donates.*message='lazy: XLA:CPU'"):
    jax.jit(tx.update)(params, state, params)
  assert _lazy._warned_cpu_copies  # pylint: disable=protected-access
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(tx.update)(params * 2, state, params)  # Once.


def test_cpu_copy_warning_names_the_users_line(monkeypatch):
  tx, params, state = _warning_setup(monkeypatch)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)  # the line the warning names
    return optax.apply_updates(p, updates), s

  with pytest.warns(RuntimeWarning, match="lazy: XLA:CPU copies") as seen:
    jax.jit(step, donate_argnums=(0, 1))(params, state, params * 2)
  assert seen[0].filename == __file__, seen[0].filename


@pytest.mark.parametrize("kwargs,named", [
    (dict(inner_state="reset"), r"`inner_state='reset'`"),
    (dict(inner_state="pullback"), r"`inner_state='pullback'`"),
    (dict(on_nonfinite="rollback"), r"`on_nonfinite='rollback'`"),
    (dict(outer=optax.sgd(0.5)), r"`outer`"),
    (dict(outer=optax.sgd(0.5), inner_state="reset"),
     r"`outer`, `inner_state='reset'`"),
])
def test_rows_per_step_with_other_options_is_rejected_when_built(kwargs,
                                                                 named):
  with pytest.raises(ValueError, match=(
      r"`rows_per_step` cannot combine with " + named + r": row-sparse syncs "
      r"support the default options only")):
    lo.lookahead(lo.lazy(optax.adam(0.1)), 3, rows_per_step={"embed": 4},
                 **kwargs)
