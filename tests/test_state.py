"""`slow_params` and `eval_params` find the slow weights in any optax state.

Every case uses sgd(0.5) on 0.5 * x**2 (grad = x): from x = 4 one step gives
fast weights 2 while the slow weights are still 4; with k = 2 the second step
gives fast 1 and syncs the slow weights to 4 + 0.75 (1 - 4) = 1.75 (alpha =
0.75, not 0.5, so that a sync written with 1 - alpha cannot pass).
"""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_tree_bitwise
from tests._helpers import skip_unless_float16_converts
from tests._helpers import trajectory


def _la(sync_period=2):
  return lo.lookahead(optax.sgd(0.5), sync_period=sync_period,
                      slow_step_size=0.75)


def _run(tx, params, num_steps):
  """The params and state after `num_steps` steps on the loss 0.5 p**2."""
  return trajectory(tx, params, lambda p, t: p, num_steps)[-1]


PARAMS = {"a": jnp.array([4.0]), "b": jnp.array([-8.0, 2.0])}


def test_plain_lookahead_state():
  params, state = _run(_la(), PARAMS, 1)
  assert_tree_bitwise(params, {"a": jnp.array([2.0]),
                                       "b": jnp.array([-4.0, 1.0])})
  assert_tree_bitwise(lo.slow_params(state), PARAMS)
  assert_tree_bitwise(lo.eval_params(state, params), PARAMS)
  params, state = _run(_la(), PARAMS, 2)
  # a: 4 + 0.75 (1 - 4); b: -8 + 0.75 (-2 + 8), 2 + 0.75 (0.5 - 2).
  expected = {"a": jnp.array([1.75]), "b": jnp.array([-3.5, 0.875])}
  assert_tree_bitwise(lo.slow_params(state), expected)
  assert_tree_bitwise(lo.eval_params(state, params), expected)


def test_inside_chain():
  tx = optax.chain(optax.clip(100.0), _la())
  params, state = _run(tx, PARAMS, 1)
  assert_tree_bitwise(lo.slow_params(state), PARAMS)
  assert isinstance(state[1], lo.LookaheadState)
  _, state = _run(tx, PARAMS, 2)
  assert_tree_bitwise(
      lo.slow_params(state),
      {"a": jnp.array([1.75]), "b": jnp.array([-3.5, 0.875])})


def test_masked_keeps_masked_out_leaves_from_params():
  tx = optax.masked(_la(), {"a": True, "b": False})
  params, state = _run(tx, PARAMS, 1)
  slow = lo.slow_params(state)
  assert_tree_bitwise(slow["a"], PARAMS["a"])
  assert isinstance(slow["b"], optax.MaskedNode)
  # optax.masked passes the masked-out grads through: b moved to -8 + -8.
  assert_tree_bitwise(params["b"], jnp.array([-16.0, 4.0]))
  evaluated = lo.eval_params(state, params)
  assert_tree_bitwise(evaluated, {"a": PARAMS["a"], "b": params["b"]})


def test_multi_transform_groups_are_merged():
  params = {"x": jnp.array([4.0]), "y": jnp.array([4.0])}
  tx = optax.multi_transform(
      {"k2": _la(sync_period=2), "k3": _la(sync_period=3)},
      param_labels={"x": "k2", "y": "k3"})
  new_params, state = _run(tx, params, 2)
  # x synced at step 2 (slow 1.75); y has not synced yet (slow 4, fast 1).
  assert_tree_bitwise(
      lo.slow_params(state), {"x": jnp.array([1.75]), "y": jnp.array([4.0])})
  assert_tree_bitwise(new_params,
                      {"x": jnp.array([1.75]), "y": jnp.array([1.0])})
  assert_tree_bitwise(
      lo.eval_params(state, new_params),
      {"x": jnp.array([1.75]), "y": jnp.array([4.0])})


def test_inject_hyperparams():
  tx = optax.inject_hyperparams(lo.lookahead)(
      optax.sgd(0.5), sync_period=2, slow_step_size=0.75)
  params, state = _run(tx, PARAMS, 1)
  assert_tree_bitwise(lo.slow_params(state), PARAMS)
  assert_tree_bitwise(lo.eval_params(state, params), PARAMS)
  params, state = _run(tx, PARAMS, 2)
  expected = {"a": jnp.array([1.75]), "b": jnp.array([-3.5, 0.875])}
  assert_tree_bitwise(lo.slow_params(state), expected)
  assert_tree_bitwise(lo.eval_params(state, params), expected)


def test_multisteps_counts_applied_steps():
  tx = optax.MultiSteps(_la(), every_k_schedule=2)
  x = jnp.array([4.0])
  state = tx.init(x)
  # Four micro-steps with the same gradient 4: two applied steps of the
  # averaged gradient; the second applied step syncs.
  for _ in range(4):
    updates, state = tx.update(jnp.array([4.0]), state, x)
    x = optax.apply_updates(x, updates)
  assert int(state.inner_opt_state.step) == 2
  # Applied steps: 4 - 2 = 2, then fast 2 - 2 = 0, sync 4 + 0.75 (0 - 4) = 1.
  assert_tree_bitwise(x, jnp.array([1.0]))
  assert_tree_bitwise(lo.slow_params(state), jnp.array([1.0]))


class _TrainState(NamedTuple):
  """Stands for a Flax TrainState: the optimizer state is `opt_state`."""
  params: Any
  opt_state: Any


class _Optimizer:
  """Stands for an `nnx.Optimizer`: a plain object with `opt_state`."""

  def __init__(self, opt_state):
    self.opt_state = opt_state


def test_object_with_opt_state():
  params, state = _run(_la(), PARAMS, 1)
  for holder in (_Optimizer(state), _TrainState(params, state)):
    assert_tree_bitwise(lo.slow_params(holder), PARAMS)
    assert_tree_bitwise(lo.eval_params(holder, params), PARAMS)


def test_flax_train_state():
  train_state = pytest.importorskip("flax.training.train_state")
  ts = train_state.TrainState.create(
      apply_fn=lambda *a: None, params=PARAMS, tx=_la())
  ts = ts.apply_gradients(grads=PARAMS)
  assert_tree_bitwise(ts.params["a"], jnp.array([2.0]))
  assert_tree_bitwise(lo.eval_params(ts, ts.params), PARAMS)


def test_slow_dtype_cast_back_to_params_dtype():
  params = {"w": jnp.array([4.0], jnp.bfloat16)}
  tx = lo.lookahead(optax.sgd(0.5), 2, 0.75, slow_dtype=jnp.float32)
  params, state = _run(tx, params, 2)
  assert lo.slow_params(state)["w"].dtype == jnp.float32
  evaluated = lo.eval_params(state, params)
  assert evaluated["w"].dtype == jnp.bfloat16
  assert_tree_bitwise(evaluated, {"w": jnp.array([1.75], jnp.bfloat16)})


@pytest.mark.parametrize("jit", [False, True])
def test_slow_dtype_target_rounding_to_minus_zero_keeps_the_sign(jit):
  # Fast weights 0.75 and slow weights -0.25 - 2**-25 (float32) sync with
  # alpha = 0.25 to the target s + 0.25 (0.75 - s) = -2**-25 (0.75 - s
  # rounds to 1), which float16 rounds to -0.0, while the params land on
  # 0.75 + (-0.75) = +0.0. Where the params landed on the rounded target the
  # precise target is kept; -0.0 == +0.0 must not count: the stored float32
  # weights must round to the params' +0.0, sign bit included (seen after
  # 29,204 steps of a jitted float16 run with AVX512-FP16).
  skip_unless_float16_converts()
  tx = lo.lookahead(optax.sgd(1.0), 1, 0.25, slow_dtype=jnp.float32)
  params = jnp.array([0.75], jnp.float16)
  state = tx.init(params)
  state = state._replace(
      slow_params=jnp.array([-0.25 - 2.0**-25], jnp.float32))
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(jnp.zeros_like(params), state, params)
  params = optax.apply_updates(params, updates)
  assert_tree_bitwise(params, jnp.array([0.0], jnp.float16))
  assert_tree_bitwise(lo.eval_params(state, params), params)
  assert_tree_bitwise(lo.slow_params(state), jnp.array([0.0], jnp.float32))


@pytest.mark.parametrize("state", [
    optax.adam(0.1).init(PARAMS),
    optax.chain(optax.sgd(0.1)).init(PARAMS),
    (),
])
def test_no_lookahead_state_raises(state):
  with pytest.raises(ValueError, match=re.escape(
      "No LookaheadState found in the given optimizer state of type "
      f"{type(state).__name__}: was the optimizer built with "
      "`lookahead_optax.lookahead`?")):
    lo.slow_params(state)
  with pytest.raises(ValueError, match="No LookaheadState found"):
    lo.eval_params(state, PARAMS)


def test_two_lookaheads_on_the_same_params_raise():
  tx = optax.chain(_la(), _la())
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=re.escape(
      "Several lookahead states hold slow weights for the same parameter")):
    lo.slow_params(state)


def test_eval_params_structure_mismatch_raises():
  state = _la().init(PARAMS)
  with pytest.raises(ValueError, match=re.escape(
      "The slow weights do not have the structure of `params`")):
    lo.eval_params(state, {"a": jnp.array([1.0])})


def test_works_under_jit():
  params, state = _run(_la(), PARAMS, 1)
  evaluated = jax.jit(lo.eval_params)(state, params)
  assert_tree_bitwise(evaluated, PARAMS)


@pytest.mark.parametrize("jit", [False, True])
def test_eval_params_of_another_shape_raises_naming_the_leaf(jit):
  # Same structure, other shapes: the old slow weights must not be returned.
  state = _la().init(PARAMS)
  other = {"a": jnp.array([1.0]), "b": jnp.array([1.0, 2.0, 3.0])}
  eval_params = jax.jit(lo.eval_params) if jit else lo.eval_params
  with pytest.raises(ValueError, match=re.escape(
      "`params` leaf ['b'] has shape (3,), but its slow weights have shape "
      "(2,): are these the params this optimizer trains?")):
    eval_params(state, other)


def test_eval_params_shape_check_skips_masked_out_leaves():
  # A masked-out leaf has no slow weights: its shape is not checked.
  tx = optax.masked(_la(), {"a": True, "b": False})
  params, state = _run(tx, PARAMS, 1)
  evaluated = lo.eval_params(state, params)
  assert_tree_bitwise(evaluated, {"a": PARAMS["a"], "b": params["b"]})
  with pytest.raises(ValueError, match=re.escape("`params` leaf ['a']")):
    lo.eval_params(state, {"a": jnp.ones(2), "b": params["b"]})
