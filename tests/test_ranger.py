"""`lookahead_optax.ranger` against a NumPy reference of Ranger 20.4.11."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference as ref
from tests._helpers import assert_tree_bitwise

SHAPES = {"conv": (2, 3, 2), "w": (4, 3), "b": (3,)}
NUM_STEPS = 30  # past the SMA threshold (step 6) and five syncs of k = 6.


def _n_sma(step, b2=0.999):
  n_sma_max = 2 / (1 - b2) - 1
  b2t = b2**step
  return n_sma_max - 2 * step * b2t / (1 - b2t)


def test_reference_crosses_the_sma_threshold():
  """The 30 steps cover both branches of the RAdam rectification."""
  assert _n_sma(5) < 5 < _n_sma(6)


def make_problem(seed):
  rng = np.random.default_rng(seed)
  params0 = {k: rng.normal(size=s).astype(np.float32)
             for k, s in SHAPES.items()}
  # Gradients with a per-row offset, so that centralization changes them.
  noise = [{k: (rng.normal(size=s) + 0.5 * np.arange(s[0]).reshape(
      (-1,) + (1,) * (len(s) - 1))).astype(np.float32)
            for k, s in SHAPES.items()} for _ in range(NUM_STEPS)]
  return params0, noise


@pytest.mark.parametrize("weight_decay,centralize", [
    (0.0, False), (0.1, False), (0.0, True), (0.1, True)])
def test_ranger_matches_reference(weight_decay, centralize):
  lr = 1e-2  # larger than the default 1e-3 so the params move visibly.
  params0, noise = make_problem(0)
  lam = 0.5

  def grad_fn(t, params):
    return {k: noise[t][k].astype(np.float64) + lam * params[k]
            for k in params}

  expected, expected_slow = ref.run_ranger(
      params0, grad_fn, NUM_STEPS, lr=lr, weight_decay=weight_decay,
      use_gc=centralize)

  tx = lo.ranger(lr, weight_decay=weight_decay, centralize=centralize)

  @jax.jit
  def step(params, state, noise_t):
    grads = jax.tree.map(lambda n, p: n + lam * p, noise_t, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  for t in range(NUM_STEPS):
    params, state = step(params, state, noise[t])
    for key in SHAPES:
      msg = f"step {t + 1} leaf {key}"
      np.testing.assert_allclose(np.asarray(params[key], np.float64),
                                 expected[t][key], rtol=1e-5, atol=1e-6,
                                 err_msg=msg)
      np.testing.assert_allclose(
          np.asarray(lo.slow_params(state)[key], np.float64),
          expected_slow[t][key], rtol=1e-5, atol=1e-6, err_msg=msg)
  # The trajectory moved well beyond the tolerance.
  assert np.max(np.abs(expected[-1]["w"] - params0["w"])) > 0.02


def test_ranger_defaults():
  tx = lo.ranger(1e-3)
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  # Lookahead with k = 6: the 6th update is a sync.
  for t in range(6):
    updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    params = optax.apply_updates(params, updates)
  assert int(state.step) == 6
  chex.assert_trees_all_equal(params, lo.slow_params(state))
  # Five steps of bias-corrected momentum (N_sma <= 5), then one rectified
  # step; with a constant gradient g = 1 and b1 = 0.95 the momentum step is
  # exactly lr per step, the slow weights move half-way: 1 - 0.5 * dist.
  b1, b2, eps, lr = 0.95, 0.999, 1e-5, 1e-3
  n_sma_max = 2 / (1 - b2) - 1
  n6 = _n_sma(6)
  b2t = b2**6
  step6 = math.sqrt((1 - b2t) * (n6 - 4) / (n_sma_max - 4) * (n6 - 2) / n6
                    * n_sma_max / (n_sma_max - 2)) / (1 - b1**6)
  m6, v6 = 1 - b1**6, 1 - b2**6
  fast = 1 - 5 * lr - step6 * lr * m6 / (math.sqrt(v6) + eps)
  expected = 1 + 0.5 * (fast - 1)
  np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-6)


def test_scale_by_ranger_radam_first_step():
  tx = lo.scale_by_ranger_radam()
  state = tx.init(jnp.zeros(2))
  updates, state = tx.update(jnp.array([1.0, -2.0]), state)
  # N_sma < 5: bias-corrected momentum, (1 - b1) g / (1 - b1) = g.
  np.testing.assert_allclose(np.asarray(updates), [1.0, -2.0], rtol=1e-6)
  assert int(state.count) == 1


WD = "`weight_decay` must be a finite float >= 0, got "
LR = ("`learning_rate` must be a finite float >= 0 or a schedule (a callable "
      "of the step count), got ")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"weight_decay": -0.1}, ValueError, WD + "-0.1."),
    ({"weight_decay": math.inf}, ValueError, WD + "inf."),
    ({"weight_decay": math.nan}, ValueError, WD + "nan."),
    ({"weight_decay": "0.1"}, TypeError, WD + "'0.1'."),
    ({"weight_decay": None}, TypeError, WD + "None."),
    ({"weight_decay": jnp.array(-0.1)}, ValueError, WD + "Array(-0.1"),
    ({"weight_decay": jnp.array(jnp.inf)}, ValueError, WD + "Array(inf"),
    ({"weight_decay": jnp.ones(2)}, TypeError, WD + "Array([1., 1.]"),
    ({"learning_rate": None}, TypeError, LR + "None."),
    ({"learning_rate": "a"}, TypeError, LR + "'a'."),
    ({"learning_rate": -1e-3}, ValueError, LR + "-0.001."),
    ({"learning_rate": math.inf}, ValueError, LR + "inf."),
    ({"learning_rate": math.nan}, ValueError, LR + "nan."),
    ({"learning_rate": jnp.ones(2)}, TypeError, LR + "Array([1., 1.]"),
    ({"sync_period": 0}, ValueError,
     "`sync_period` must be an integer >= 1, got 0."),
    ({"slow_step_size": 1.5}, ValueError,
     "`slow_step_size` must be a float in [0, 1]"),
    ({"b2": 1.0}, ValueError, "`b2` must be a finite float in [0, 1), got 1.0."),
    ({"b1": 1.0}, ValueError, "`b1` must be a finite float in [0, 1), got 1.0."),
    ({"b1": -0.5}, ValueError, "`b1` must be a finite float in [0, 1), got -0.5."),
    ({"b2": 1.5}, ValueError, "`b2` must be a finite float in [0, 1), got 1.5."),
    ({"b2": math.nan}, ValueError, "`b2` must be a finite float in [0, 1), got nan."),
    ({"b1": "0.9"}, TypeError, "`b1` must be a finite float in [0, 1), got '0.9'."),
    ({"eps": -1e-5}, ValueError, "`eps` must be a finite float >= 0, got -1e-05."),
    ({"eps": math.inf}, ValueError, "`eps` must be a finite float >= 0, got inf."),
    ({"eps": None}, TypeError, "`eps` must be a finite float >= 0, got None."),
    ({"centralize": "yes"}, TypeError,
     "`centralize` must be a bool, got 'yes'."),
])
def test_ranger_bad_arguments(kwargs, error, message):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  with pytest.raises(error, match=re.escape(message)):
    lo.ranger(**kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"threshold": 3.0}, ValueError,
     "`threshold` must be a finite float >= 4, got 3.0."),
    ({"threshold": math.inf}, ValueError,
     "`threshold` must be a finite float >= 4, got inf."),
    ({"eps": math.nan}, ValueError,
     "`eps` must be a finite float >= 0, got nan."),
    ({"b1": 1.0}, ValueError,
     "`b1` must be a finite float in [0, 1), got 1.0."),
])
def test_scale_by_ranger_radam_bad_arguments(kwargs, error, message):
  with pytest.raises(error, match=re.escape(message)):
    lo.scale_by_ranger_radam(**kwargs)


def test_ranger_learning_rate_schedule_and_zero_are_accepted():
  params = {"w": jnp.ones((2, 2))}
  grads = {"w": jnp.full((2, 2), 0.5)}
  # A zero learning rate leaves the params where they are (not ascent): the
  # update is -0 * step, i.e. -0.0.
  tx = lo.ranger(0.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert_tree_bitwise(updates, {"w": jnp.full((2, 2), -0.0)})
  assert_tree_bitwise(optax.apply_updates(params, updates), params)
  # A schedule is evaluated on the inner step count: lr(0) = 0.25 at step 1,
  # where the update is bias-corrected momentum, i.e. the gradient: -0.125.
  tx = lo.ranger(optax.linear_schedule(0.25, 0.0, 10))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], np.full((2, 2), -0.125),
                             rtol=1e-6)


@pytest.mark.parametrize("b2", [0.999, 0.99, 0.9999])
def test_rectified_step_size_is_accurate(b2):
  """The step size of each step matches its float64 value to 1e-6.

  The direct float32 formula for the SMA length loses ~0.5% where it crosses
  the threshold (a cancellation between two numbers near 2 / (1 - b2)).
  """
  b1, eps = 0.95, 1e-5
  tx = lo.scale_by_ranger_radam(b1=b1, b2=b2, eps=eps)
  update = jax.jit(tx.update)
  g = jnp.array([1.0, -3.0])
  state = tx.init(g)
  m = v = np.zeros(2)
  n_sma_max = 2 / (1 - b2) - 1
  for step in range(1, 41):
    updates, state = update(g, state)
    m = b1 * m + (1 - b1) * np.asarray(g, np.float64)
    v = b2 * v + (1 - b2) * np.asarray(g, np.float64) ** 2
    n_sma = _n_sma(step, b2)
    if n_sma > 5:
      b2t = b2**step
      size = math.sqrt((1 - b2t) * (n_sma - 4) / (n_sma_max - 4)
                       * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2))
      expected = size / (1 - b1**step) * m / (np.sqrt(v) + eps)
    else:
      expected = m / (1 - b1**step)
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-6,
                               err_msg=f"step {step}")


def test_ranger_with_inject_hyperparams():
  """All numeric arguments may be injected (traced under jit)."""
  params0 = {"w": jnp.arange(6.0).reshape(2, 3) / 6}
  runs = []
  for tx in (
      optax.inject_hyperparams(lo.ranger)(1e-2, weight_decay=0.1, b2=0.99),
      lo.ranger(1e-2, weight_decay=0.1, b2=0.99),
  ):
    step = jax.jit(lambda p, s, tx=tx: tx.update(p, s, p))
    params, state = params0, tx.init(params0)
    for _ in range(8):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
    runs.append(params)
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-6)
  assert float(jnp.max(jnp.abs(runs[1]["w"] - params0["w"]))) > 0.01
