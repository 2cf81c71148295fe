"""`nnx.Optimizer` with every state type lookahead and lazy put in a state.

An `nnx.Optimizer` stores the optimizer state's leaves in NNX variables and
rebuilds the state from them after each `update`; a node that sits where a
params leaf sits (a `CycleRows`) comes back as an `nnx.State` mapping. Each
case runs several steps across syncs, eagerly and under `nnx.jit`, and is
compared step by step with `tx.update` on plain pytrees from the same inputs:
bitwise eagerly (the same ops), within a few ulps under jit (two programs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

import lookahead_optax as lo
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_tree_within_ulps

V, D, K = 12, 3, 3
IDS = [jnp.array([1, 4, 4]), jnp.array([0, 11, 7]), jnp.array([4, 2, 9])]


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.out = nnx.Linear(D, 1, rngs=rngs)

  def __call__(self, ids):
    return jnp.mean((self.out(self.embed(ids)) - 1.0) ** 2)


_ROWS = {"embed": {"embedding": 3}}
_LAZY_MASK = {"embed": {"embedding": True},
              "out": {"bias": False, "kernel": False}}

CASES = {
    # name: (tx, row-sparse gradients?)
    "cycle_rows": (lambda: lo.lookahead(
        lo.lazy(optax.adam(0.1)), K, 0.3, rows_per_step=_ROWS), True),
    "lazy_state": (lambda: lo.lookahead(
        lo.lazy(optax.adam(0.1), mask=_LAZY_MASK), K, 0.3), False),
    "pullback": (lambda: lo.lookahead(
        optax.sgd(0.1, momentum=0.9), K, 0.3, inner_state="pullback"), False),
    "reset": (lambda: lo.lookahead(
        optax.adam(0.1), K, 0.7, inner_state="reset"), False),
    "snoo": (lambda: lo.snoo(optax.adam(0.1), K, learning_rate=0.6,
                             momentum=0.4), False),
    "schedule_slow_dtype": (lambda: lo.lookahead(
        optax.adam(0.1), K, optax.linear_schedule(0.2, 0.9, 2),
        slow_dtype=jnp.float64 if jax.config.jax_enable_x64 else None),
        False),
    "rollback": (lambda: lo.lookahead(
        optax.adam(0.1), K, 0.3, on_nonfinite="rollback"), False),
}


def _values(tree):
  """`tree` with each NNX variable replaced by its value (any Flax >= 0.12.2)."""
  return jax.tree.map(
      lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _grads(graphdef, params, ids, sparse):
  def loss(p):
    return nnx.merge(graphdef, p)(ids)
  if sparse:
    return lo.sparse_value_and_grad(loss)(params)[1]
  return jax.grad(loss)(params)


def _nnx_step(model, optimizer, ids, sparse):
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer.update(model, _grads(graphdef, params, ids, sparse))


def _plain_step(tx, graphdef, params, opt_state, ids, sparse):
  grads = _grads(graphdef, params, ids, sparse)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx_jit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_nnx_optimizer_every_state_type_across_syncs(name, jit):
  make_tx, sparse = CASES[name]
  tx = make_tx()
  model = _Model(nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx_step = nnx.jit(_nnx_step, static_argnums=3) if jit else _nnx_step
  plain_step = jax.jit(_plain_step, static_argnums=(0, 1, 5)) if jit else (
      _plain_step)
  for i in range(3 * K):
    params = _values(nnx.state(model, nnx.Param))
    opt_state = _values(optimizer.opt_state)
    want_params, want_state = plain_step(tx, graphdef, params, opt_state,
                                         IDS[i % 3], sparse)
    nnx_step(model, optimizer, IDS[i % 3], sparse)
    got_params = _values(nnx.state(model, nnx.Param))
    got_state = _values(optimizer.opt_state)
    # The same leaves in the same order; nnx rebuilds the CycleRows as
    # mappings, so the leaves are compared in the plain state's structure.
    want = (want_params, want_state)
    got = jax.tree.unflatten(jax.tree.structure(want),
                             jax.tree.leaves((got_params, got_state)))
    if jit:
      # One step of two programs (nnx.jit, jax.jit): XLA may contract
      # multiply-adds differently in each, a rounding or two of the operands
      # (at the scale of each kind of leaf, as a result may cancel).
      assert_tree_within_ulps(got, want, 2, scale="kind",
                              msg=f"{name} step {i + 1}")
    else:
      assert_tree_bitwise(jax.tree.leaves(got), jax.tree.leaves(want),
                          f"{name} step {i + 1}")
    if (i + 1) % K == 0:  # a sync, within one program: fast == slow bitwise
      slow = jax.tree.map(lambda s, p: s.astype(p.dtype),
                          lo.slow_params(optimizer), got_params)
      assert_tree_bitwise(slow, got_params, f"{name} sync {i + 1}")
  assert int(optimizer.step[...]) == 3 * K
  assert int(_values(optimizer.opt_state).step) == 3 * K


def test_nnx_row_sparse_lookahead_hand_checked_rows():
  """The rows a cycle touched move to their interpolation; the others stay."""
  model = _Model(nnx.Rngs(0))
  before = np.asarray(model.embed.embedding[...])
  optimizer = nnx.Optimizer(
      model, lo.lookahead(lo.lazy(optax.sgd(0.5)), 2, 0.25,
                          rows_per_step=_ROWS), wrt=nnx.Param)
  fast = before.copy()
  for ids in IDS[:2]:
    graphdef, params = nnx.split(model, nnx.Param)
    grads = _grads(graphdef, params, ids, True)
    table = grads["embed"]["embedding"][...]
    np.add.at(fast, np.asarray(table.ids), -0.5 * np.asarray(table.values))
    optimizer.update(model, grads)
  after = np.asarray(model.embed.embedding[...])
  touched = [0, 1, 4, 7, 11]
  np.testing.assert_allclose(after[touched], (
      before + 0.25 * (fast - before))[touched], rtol=1e-6, atol=1e-7)
  untouched = [2, 3, 5, 6, 8, 9, 10]
  np.testing.assert_array_equal(after[untouched], before[untouched])
  np.testing.assert_array_equal(
      lo.slow_params(optimizer)["embed"]["embedding"], after)
