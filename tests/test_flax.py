"""Flax integration: linen `TrainState` and NNX `nnx.Optimizer` with lookahead."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import linen as nn
from flax import nnx
from flax.training import train_state

import lookahead_optax as lo
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_tree_within_ulps


def _assert_trees_close(actual, expected, atol):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a), np.asarray(e), rtol=0, atol=atol),
      actual, expected)


def _data(n=32, d=4, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, d))
  y = jnp.tanh(x @ jax.random.normal(kw, (d, 1)))
  return x, y


# ----------------------------------------------------------------- linen --


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))


def _linen_state(tx):
  model = _LinenMLP()
  x, _ = _data()
  params = model.init(jax.random.key(1), x)["params"]
  return train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    pred = state.apply_fn({"params": params}, x)
    return jnp.mean((pred - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def test_linen_hand_worked_sgd():
  # kernel 1 -> 0.5 -> 0 (fast), then the sync: 1 + 0.75 * (0 - 1) = 0.25.
  model = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones)
  state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=model.init(jax.random.key(0), jnp.ones((1, 1)))["params"],
      tx=lo.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.75))
  grads = {"kernel": jnp.array([[0.5]])}
  apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  seen = []
  for _ in range(4):
    state = apply(state, grads)
    seen.append((float(state.params["kernel"][0, 0]),
                 float(lo.eval_train_state(state).params["kernel"][0, 0])))
  # (fast, slow) after each step; the second cycle: 0.25 -> -0.25 -> -0.75,
  # sync 0.25 + 0.75 * (-0.75 - 0.25) = -0.5.
  assert seen == [(0.5, 1.0), (0.25, 0.25), (-0.25, 0.25), (-0.5, -0.5)]
  assert int(state.step) == 4


def test_linen_trainstate_matches_functional_loop_to_ulps():
  """`apply_gradients` takes the functional loop's steps, to an ulp or two.

  `apply` (a jitted `apply_gradients`) and `functional_step` are two compiled
  programs of the same arithmetic, free to round it differently (a fused
  multiply-add or not), so they are compared one step at a time from the
  same params, state and gradients; a functional loop run on its own is
  checked along the way at a tolerance that still tells a wrong
  `slow_step_size` or a missed sync apart.
  """
  tx = lo.lookahead(optax.adamw(5e-2), sync_period=3, slow_step_size=0.8)
  state = _linen_state(tx)
  params, opt_state = state.params, tx.init(state.params)
  x, y = _data()

  @jax.jit
  def loss_and_grad(params):
    def loss_fn(p):
      return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

    return jax.value_and_grad(loss_fn)(params)

  @jax.jit
  def functional_step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  losses = []
  for i in range(12):
    loss, grads = loss_and_grad(state.params)
    # One functional step from the TrainState's own params, state and grads.
    want_params, want_opt_state = functional_step(
        state.params, state.opt_state, grads)
    state = apply(state, grads)
    losses.append(float(loss))
    # n = 2: each output is a few roundings of elementwise arithmetic; with
    # `functional_step` compiled without FMA (XLA_FLAGS=
    # --xla_cpu_max_isa=SSE4_2) and `apply` with it, they differed by at
    # most 1 ulp at this scale (up to 175 of a cancelling element's own).
    assert_tree_within_ulps(state.params, want_params, 2,
                            scale="kind", msg=f"params, step {i + 1}")
    assert_tree_within_ulps(state.opt_state, want_opt_state, 2,
                            scale="kind", msg=f"state, step {i + 1}")
    assert int(state.step) == i + 1
    # The functional loop on its own (its own gradients too): 2.4e-7 at most
    # in the measurement above; slow_step_size 0.81 instead of 0.8 moves the
    # weights by 1.4e-3 after the first sync.
    _, functional_grads = loss_and_grad(params)
    params, opt_state = functional_step(params, opt_state, functional_grads)
    _assert_trees_close(state.params, params, atol=1e-6)
    _assert_trees_close(lo.slow_params(state), lo.slow_params(opt_state),
                        atol=1e-6)
    if (i + 1) % 3 == 0:  # a sync, within one program: fast == slow bitwise
      assert_tree_bitwise(lo.eval_train_state(state).params, state.params)
      assert_tree_bitwise(lo.slow_params(opt_state), params)
    else:  # between syncs the slow weights stay behind
      assert not np.array_equal(lo.slow_params(state)["Dense_0"]["kernel"],
                                state.params["Dense_0"]["kernel"])
  assert losses[-1] < 0.5 * losses[0]


def test_linen_eval_train_state_under_jit():
  tx = lo.lookahead(optax.sgd(0.1), sync_period=4, slow_step_size=0.5)
  state = _linen_state(tx)
  x, y = _data()
  for _ in range(2):
    state, _ = _linen_step(state, x, y)

  @jax.jit
  def eval_loss(state):
    s = lo.eval_train_state(state)
    return jnp.mean((s.apply_fn({"params": s.params}, x) - y) ** 2), s

  loss, slow_state = eval_loss(state)
  initial = _linen_state(tx)  # no sync yet: the slow weights are theta_0
  assert_tree_bitwise(slow_state.params, initial.params)
  want = jnp.mean((initial.apply_fn({"params": initial.params}, x) - y) ** 2)
  # `want` runs op by op, `loss` in one jitted program: a mean of squares
  # (no cancellation), 0 ulps apart even with one side compiled without FMA.
  assert_tree_within_ulps(loss, want, 4)
  assert int(slow_state.step) == 2
  assert_tree_bitwise(slow_state.opt_state, state.opt_state)
  # The training state is untouched (fast weights differ from theta_0).
  assert not np.array_equal(state.params["Dense_0"]["kernel"],
                            initial.params["Dense_0"]["kernel"])


def test_linen_partial_lookahead_keeps_fast_leaves():
  labels = {"Dense_0": {"bias": "la", "kernel": "la"},
            "Dense_1": {"bias": "plain", "kernel": "plain"}}
  tx = optax.multi_transform(
      {"la": lo.lookahead(optax.sgd(0.1), sync_period=5),
       "plain": optax.sgd(0.1)}, labels)
  state = _linen_state(tx)
  start = state.params
  x, y = _data()
  state, _ = _linen_step(state, x, y)
  slow = lo.eval_train_state(state).params
  assert_tree_bitwise(slow["Dense_0"], start["Dense_0"])
  assert_tree_bitwise(slow["Dense_1"], state.params["Dense_1"])


def test_eval_train_state_errors():
  with pytest.raises(TypeError, match="`state` must be a Flax TrainState"):
    lo.eval_train_state({"params": 1})
  state = _linen_state(optax.sgd(0.1))
  with pytest.raises(ValueError, match="No LookaheadState"):
    lo.eval_train_state(state)


# ------------------------------------------------------------------- nnx --


class _NNXMLP(nnx.Module):

  def __init__(self, rngs, batch_norm=False):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs) if batch_norm else None
    self.l2 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    h = self.l1(x)
    if self.bn is not None:
      h = self.bn(h)
    return self.l2(jnp.tanh(h))


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _pure(state):
  return nnx.to_pure_dict(state)


def _values(tree):
  """`tree` with each NNX variable replaced by its value (any Flax >= 0.12.2)."""
  return jax.tree.map(
      lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _functional_opt_state(optimizer, like):
  """The `nnx.Optimizer`'s state as the optax state `like` (plain dicts)."""
  leaves = jax.tree.leaves(_values(optimizer.opt_state))
  assert [np.shape(a) for a in leaves] == [
      np.shape(a) for a in jax.tree.leaves(like)]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def test_nnx_optimizer_matches_functional_loop_to_ulps():
  """`nnx.Optimizer.update` takes the functional loop's steps, to an ulp or two.

  The `nnx.jit` step and the `jax.jit` functional step are two compiled
  programs of the same arithmetic, free to round it differently (a fused
  multiply-add or not), so they are compared one step at a time from the
  same params, state and gradients; a functional loop run on its own is
  checked along the way at a tolerance that still tells a wrong
  `slow_step_size` or a missed sync apart.
  """
  tx = lo.lookahead(optax.adamw(5e-2), sync_period=3, slow_step_size=0.3)
  model = _NNXMLP(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  params = _pure(params0)
  opt_state = tx.init(params)
  # The functional view of the optimizer's state is the optax state.
  assert_tree_bitwise(_functional_opt_state(optimizer, opt_state), opt_state)

  @nnx.jit
  def nnx_step(model, optimizer):  # `_nnx_step`, returning the gradients
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  @jax.jit
  def functional_update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def functional_step(params, opt_state):
    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      return jnp.mean((m(x) - y) ** 2)

    return functional_update(params, opt_state, jax.grad(loss_fn)(params))

  losses = []
  for i in range(12):
    before = (_pure(nnx.state(model, nnx.Param)),
              _functional_opt_state(optimizer, opt_state))
    loss, grads = nnx_step(model, optimizer)
    losses.append(float(loss))
    fast = _pure(nnx.state(model, nnx.Param))
    slow = lo.slow_params(optimizer)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(slow))
    # One functional step from the same params, state and gradients. n = 2:
    # each output is a few roundings of elementwise arithmetic; with
    # `functional_update` compiled without FMA (XLA_FLAGS=
    # --xla_cpu_max_isa=SSE4_2) and `nnx_step` with it, they differed by at
    # most 1 ulp at this scale (up to 64 of a cancelling element's own).
    want_params, want_opt_state = functional_update(*before, _pure(grads))
    assert_tree_within_ulps(fast, want_params, 2,
                            scale="kind", msg=f"params, step {i + 1}")
    assert_tree_within_ulps(
        _functional_opt_state(optimizer, opt_state), want_opt_state, 2,
        scale="kind", msg=f"state, step {i + 1}")
    # The functional loop on its own (its own gradients too): 2.4e-7 at most
    # in the measurement above; slow_step_size 0.31 instead of 0.3 moves the
    # weights by 1.5e-3 after the first sync.
    params, opt_state = functional_step(params, opt_state)
    _assert_trees_close(fast, params, atol=1e-6)
    _assert_trees_close(_pure(slow), lo.slow_params(opt_state), atol=1e-6)
    if (i + 1) % 3 == 0:  # a sync, within one program: fast == slow bitwise
      assert_tree_bitwise(_pure(slow), fast)
      assert_tree_bitwise(lo.slow_params(opt_state), params)
    else:  # between syncs the slow weights stay behind
      assert not np.array_equal(_pure(slow)["l1"]["kernel"],
                                fast["l1"]["kernel"])
  assert int(optimizer.step[...]) == 12
  assert losses[-1] < 0.5 * losses[0]


def test_nnx_hand_worked_sgd():
  # As the linen case: kernel 1, gradient 0.5, sgd(1.0), k = 2, alpha = 0.75.
  model = nnx.Linear(1, 1, use_bias=False,
                     kernel_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, lo.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.75),
      wrt=nnx.Param)
  grads = nnx.State({"kernel": nnx.Param(jnp.array([[0.5]]))})

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, grads)
    return model.kernel[...], lo.eval_model(model, optimizer).kernel[...]

  seen = [tuple(float(v[0, 0]) for v in step(model, optimizer))
          for _ in range(4)]
  assert seen == [(0.5, 1.0), (0.25, 0.25), (-0.25, 0.25), (-0.5, -0.5)]


def test_nnx_eval_params_keeps_variable_types():
  model = _NNXMLP(nnx.Rngs(0))
  params0 = _pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(
      model, lo.lookahead(optax.sgd(0.1), sync_period=5), wrt=nnx.Param)
  x, y = _data()
  _nnx_step(model, optimizer, x, y)
  fast = nnx.state(model, nnx.Param)
  slow = lo.eval_params(optimizer, fast)
  assert jax.tree.structure(slow) == jax.tree.structure(fast)
  assert isinstance(slow["l1"]["kernel"], nnx.Param)
  assert_tree_bitwise(_pure(slow), params0)
  # Putting them into a model with nnx.update gives theta_0 back.
  nnx.update(model, slow)
  assert_tree_bitwise(_pure(nnx.state(model, nnx.Param)), params0)


def test_nnx_eval_model_under_jit_copies_other_state():
  model = _NNXMLP(nnx.Rngs(0), batch_norm=True)
  params0 = _pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(
      model, lo.lookahead(optax.sgd(0.1), sync_period=5), wrt=nnx.Param)
  x, y = _data()
  for _ in range(2):
    _nnx_step(model, optimizer, x, y)
  fast = _pure(nnx.state(model, nnx.Param))
  stats = _pure(nnx.state(model, nnx.BatchStat))
  assert not np.array_equal(stats["bn"]["mean"], np.zeros(8))

  @nnx.jit
  def eval_fn(model, optimizer, x):
    slow = lo.eval_model(model, optimizer)
    slow.eval()
    return slow(x), nnx.state(slow, nnx.Param), nnx.state(slow, nnx.BatchStat)

  pred, slow_params, slow_stats = eval_fn(model, optimizer, x)
  assert_tree_bitwise(_pure(slow_params), params0)  # no sync yet: theta_0
  assert_tree_bitwise(_pure(slow_stats), stats)  # batch stats copied
  # Reference: the model with theta_0 and the current batch statistics.
  ref = nnx.clone(model)
  nnx.update(ref, params0)
  ref.eval()
  # `pred` comes from one `nnx.jit` program, `ref(x)` op by op: n = 4 at the
  # scale of the outputs (2 with one side compiled without FMA; 160 of the
  # smallest output's own ulps, a dot product that nearly cancels).
  assert_tree_within_ulps(pred, ref(x), 4, scale="kind")
  # The trained model is untouched and still in training mode.
  assert_tree_bitwise(_pure(nnx.state(model, nnx.Param)), fast)
  assert model.bn.use_running_average is False

  # The copy does not alias the model's variables.
  slow_model = lo.eval_model(model, optimizer)
  slow_model.bn.mean[...] = jnp.full((8,), 7.0)
  assert_tree_bitwise(_pure(nnx.state(model, nnx.BatchStat)), stats)


def test_nnx_chain_clip_then_lookahead():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   lo.lookahead(optax.sgd(0.05), sync_period=2))
  model = _NNXMLP(nnx.Rngs(3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()
  for _ in range(4):
    _nnx_step(model, optimizer, x, y)
  assert_tree_bitwise(_pure(lo.slow_params(optimizer)),
                      _pure(nnx.state(model, nnx.Param)))
  assert_tree_bitwise(_pure(nnx.state(lo.eval_model(model, optimizer),
                                      nnx.Param)),
                      _pure(nnx.state(model, nnx.Param)))


def test_eval_model_errors():
  model = _NNXMLP(nnx.Rngs(0))
  plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match="No LookaheadState"):
    lo.eval_model(model, plain)
  with pytest.raises(TypeError, match="`model` must be a Flax NNX Module"):
    lo.eval_model({"w": 1}, plain)
  with pytest.raises(TypeError, match="`optimizer` must be an nnx.Optimizer"):
    lo.eval_model(model, optax.sgd(0.1))


def test_eval_model_of_another_model_raises():
  # A model of the same type and structure but other shapes: the optimizer's
  # slow weights must not be put into it.
  model = _NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, lo.lookahead(optax.sgd(0.1), sync_period=5), wrt=nnx.Param)
  other = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=re.escape(
      "`model` is not the model `optimizer` trains: its params do not match "
      "the optimizer's slow weights.")):
    lo.eval_model(other, optimizer)
  wider = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
  small = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  small_opt = nnx.Optimizer(small, lo.lookahead(optax.sgd(0.1)),
                            wrt=nnx.Param)
  with pytest.raises(ValueError, match=re.escape(
      "`params` leaf ['bias'] has shape (8,), but its slow weights have "
      "shape (3,)")):
    lo.eval_model(wider, small_opt)
  # The model it trains still works.
  slow = lo.eval_model(small, small_opt)
  assert_tree_bitwise(_pure(nnx.state(slow, nnx.Param)),
                      _pure(nnx.state(small, nnx.Param)))
