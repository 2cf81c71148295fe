"""The outer step (`outer=`, `snoo`), sync counting, and core edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import bits
from tests._helpers import trajectory



def quad_grads(p, t):
  del t
  return jax.tree.map(lambda x: 1.5 * x - 0.25, p)


def snoo_reference(w0, lr_in, k, lr_out, mu, steps):
  """SNOO by hand: SGD inner on grad 1.5 w - 0.25, Nesterov outer."""
  w = np.asarray(w0, np.float64)
  fast, b, out = w.copy(), np.zeros_like(w), []
  for t in range(1, steps + 1):
    fast = fast - lr_in * (1.5 * fast - 0.25)
    if t % k == 0:
      s = w - fast
      b = mu * b + s
      w = w - lr_out * (mu * b + s)
      fast = w.copy()
    out.append((fast.copy(), w.copy()))
  return out


@pytest.mark.parametrize("jit", [False, True])
def test_snoo_matches_the_papers_equations(jit):
  w0 = {"w": jnp.array([2.0, -1.0, 0.5])}
  tx = lo.snoo(optax.sgd(0.3), sync_period=3, learning_rate=0.6, momentum=0.3)
  got = trajectory(tx, w0, quad_grads, 10, jit=jit, donate=jit)
  ref = snoo_reference(w0["w"], 0.3, 3, 0.6, 0.3, 10)
  for t, ((p, s), (fast, slow)) in enumerate(zip(got, ref)):
    np.testing.assert_allclose(p["w"], fast, rtol=1e-6, atol=1e-7,
                               err_msg=f"step {t + 1}")
    np.testing.assert_allclose(lo.slow_params(s)["w"], slow, rtol=1e-6,
                               atol=1e-7, err_msg=f"step {t + 1}")


def test_snoo_momentum_buffer_lives_in_outer_state():
  w0 = {"w": jnp.array([2.0])}
  tx = lo.snoo(optax.sgd(0.5), sync_period=2, learning_rate=0.5, momentum=0.5)
  (p1, s1), (p2, s2) = trajectory(tx, w0, lambda p, t: p, 2)
  trace = s1.outer_state[0].trace["w"]
  np.testing.assert_array_equal(trace, [0.0])  # no sync yet
  # Fast 2 -> 1 -> 0.5: s = 1.5, b = 1.5, w = 2 - 0.5 (0.75 + 1.5) = 0.875.
  np.testing.assert_array_equal(s2.outer_state[0].trace["w"], [1.5])
  np.testing.assert_array_equal(p2["w"], [0.875])
  np.testing.assert_array_equal(bits(p2["w"]), bits(lo.slow_params(s2)["w"]))


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_outer_sgd_is_slow_step_size(alpha):
  params = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.7)}
  plain = lo.lookahead(optax.adam(0.05), 3, alpha)
  outer = lo.lookahead(optax.adam(0.05), 3, outer=optax.sgd(alpha))
  for (pp, sp), (po, so) in zip(trajectory(plain, params, quad_grads, 9),
                                trajectory(outer, params, quad_grads, 9)):
    for key in params:
      np.testing.assert_allclose(po[key], pp[key], rtol=2e-6, atol=1e-7)
      np.testing.assert_allclose(lo.slow_params(so)[key],
                                 lo.slow_params(sp)[key], rtol=2e-6, atol=1e-7)


def test_outer_params_land_on_slow_bitwise_jit_donated():
  # Every formulation: tests/test_formulations.py ("snoo-reset").
  params = {"a": jnp.linspace(-1.0, 2.0, 7), "b": jnp.ones((2, 3))}
  tx = lo.lookahead(optax.adamw(0.1), 3, inner_state="reset",
                    outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
  for t, (p, s) in enumerate(trajectory(tx, params, quad_grads, 9,
                                        jit=True, donate=True)):
    if (t + 1) % 3 == 0:
      for key in params:
        np.testing.assert_array_equal(bits(p[key]),
                                      bits(lo.slow_params(s)[key]))


def test_schedule_counts_syncs_not_rolled_back_slots():
  # alpha = 0.3 for the first sync done, 0.8 for the second.
  sched = lambda n: jnp.where(n == 0, 0.3, 0.8)  # pylint: disable=unnecessary-lambda-assignment
  tx = lo.lookahead(optax.sgd(1.0), 2, sched, on_nonfinite="rollback")
  params = {"w": jnp.array([10.0])}
  grads = [1.0, np.nan, 1.0, 1.0, 2.0, 2.0]  # step 2 (a sync slot) is bad
  hist = trajectory(tx, params, lambda p, t: {"w": jnp.array([grads[t]])}, 6)
  # Step 2 rolled back to 10; steps 3, 4: 9, 8 and the first real sync
  # (alpha 0.3): 10 + 0.3 * (8 - 10) = 9.4. Steps 5, 6: 7.4, 5.4, sync with
  # alpha 0.8: 9.4 + 0.8 * (5.4 - 9.4) = 6.2.
  np.testing.assert_allclose(hist[1][0]["w"], [10.0])
  np.testing.assert_allclose(hist[3][0]["w"], [9.4], rtol=1e-6)
  np.testing.assert_allclose(hist[5][0]["w"], [6.2], rtol=1e-6)
  assert int(hist[5][1].outer_state.count) == 2


def test_scalar_params_keep_injected_hyperparameters_at_reset():
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.25,
                                              momentum=0.5)
  tx = lo.lookahead(inner, 2, 0.3, inner_state="reset")
  hist = trajectory(tx, jnp.array(4.0), lambda p, t: p, 4, jit=True)
  hyper = hist[-1][1].inner_state.hyperparams
  assert float(hyper["learning_rate"]) == 0.25
  assert float(hyper["momentum"]) == 0.5
  trace = hist[1][1].inner_state.inner_state[0].trace
  assert float(trace) == 0.0  # the momentum (param-shaped) was reset


def test_scalar_params_reduce_on_plateau_reduces_under_reset():
  inner = optax.chain(
      optax.sgd(0.1),
      optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0,
                                      accumulation_size=1))
  tx = lo.lookahead(inner, 2, 0.3, inner_state="reset")
  params = jnp.array(1.0)
  state = tx.init(params)
  for _ in range(6):
    updates, state = tx.update(params, state, params, value=jnp.array(5.0))
    params = optax.apply_updates(params, updates)
  assert float(state.inner_state[1].scale) < 1.0


def test_rollback_with_bool_and_int_params():
  params = {"w": jnp.array([1.0, 2.0]), "flag": jnp.array([True, False]),
            "n": jnp.array([3, 4])}
  tx = lo.lookahead(optax.sgd(0.5), 2, 0.3, on_nonfinite="rollback")
  def grads(p, t):
    w = jnp.where(t == 1, jnp.array([np.nan, 1.0]), jnp.ones(2))
    return {"w": w, "flag": jnp.zeros(2, bool), "n": jnp.zeros(2, jnp.int32)}
  hist = trajectory(tx, params, grads, 3, jit=True)
  p, _ = hist[1]
  np.testing.assert_array_equal(p["w"], [1.0, 2.0])  # back to the slow weights
  np.testing.assert_array_equal(p["flag"], [True, False])
  np.testing.assert_array_equal(p["n"], [3, 4])


def test_python_float_params_eager():
  tx = lo.lookahead(optax.sgd(0.5), 2, 0.3)
  hist = trajectory(tx, {"a": 4.0}, lambda p, t: {"a": 4.0}, 2)
  # 4 -> 2 -> 0; sync: 4 + 0.3 * (0 - 4) = 2.8.
  np.testing.assert_allclose(hist[1][0]["a"], 2.8, rtol=1e-6)


def test_optax_lookahead_state_is_named():
  tx = lo.lookahead(optax.sgd(0.1))
  params = jnp.ones(2)
  theirs = optax.lookahead(optax.sgd(0.1), 5, 0.5).init(
      optax.LookaheadParams(params, jnp.ones(2)))
  with pytest.raises(TypeError, match="optax.LookaheadState"):
    tx.update(params, theirs, params)


def test_touched_rows_without_lazy_raises():
  tx = lo.lookahead(optax.adam(0.1))
  params = {"embed": jnp.ones((4, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError, match="`touched_rows`.*lazy"):
    tx.update(params, state, params, touched_rows={"embed": jnp.array([1])})


def test_touched_rows_for_a_lazy_partition_is_fine():
  params = {"embed": jnp.ones((4, 2)), "w": jnp.ones(2)}
  tx = optax.partition(
      {"e": lo.lazy(optax.adam(0.1), mask=lambda p: True),
       "d": lo.lookahead(optax.adam(0.1))},
      {"embed": "e", "w": "d"})
  state = tx.init(params)
  tx.update(params, state, params, touched_rows={"embed": jnp.array([1])})


def test_slow_dtype_rejects_params_of_another_kind():
  tx = lo.lookahead(optax.sgd(0.1), slow_dtype=jnp.float32)
  state = tx.init({"w": jnp.ones(2, jnp.bfloat16), "n": jnp.ones(2, jnp.int32)})
  bad = {"w": jnp.ones(2, jnp.bfloat16), "n": jnp.ones(2, jnp.float32)}
  with pytest.raises(ValueError, match=r"`params` leaf \['n'\] has dtype"):
    tx.update(bad, state, bad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(outer="sgd"), TypeError, "`outer` must be an optax"),
    (dict(outer=optax.sgd(0.5), slow_step_size=0.5), ValueError,
     "`slow_step_size` and `outer`"),
    (dict(outer=optax.sgd(0.5), inner_state="pullback"), ValueError,
     "`inner_state='pullback'`"),
    (dict(axis_name="data"), TypeError,
     "`lookahead` runs on one device and takes no `axis_name`"),
    (dict(rows_per_step={"w": 0}), ValueError, "`rows_per_step` leaf"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    tx = lo.lookahead(optax.sgd(0.1), 3, **kwargs)
    tx.init({"w": jnp.ones((3, 2))})


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=1.0), "`momentum` must be"),
    (dict(momentum=-0.1), "`momentum` must be"),
    (dict(learning_rate=-1.0), "`learning_rate` must be"),
    (dict(learning_rate=float("nan")), "`learning_rate` must be"),
])
def test_snoo_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lo.snoo(optax.sgd(0.1), **kwargs)


def test_snoo_refuses_outer():
  with pytest.raises(TypeError, match="unexpected keyword argument 'outer'"):
    lo.snoo(optax.sgd(0.1), outer=optax.sgd(0.1))  # pylint: disable=unexpected-keyword-arg


def test_axis_name_outside_a_mapped_axis_raises_at_trace_time():
  tx = lo.diloco(optax.sgd(0.1), 3, "data")
  params = jnp.ones(2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="`axis_name` 'data' is not the name"):
    jax.jit(tx.update)(params, state, params)


def test_schedule_under_inject_hyperparams_is_evaluated_on_update_calls():
  # Documented: optax evaluates an injected schedule on its own count (the
  # number of update calls), so the first sync (step 2) uses sched(1); given
  # to lookahead directly, the first sync uses sched(0).
  sched = lambda n: jnp.where(n == 1, 0.8, 0.3)  # pylint: disable=unnecessary-lambda-assignment
  injected = optax.inject_hyperparams(lo.lookahead)(
      optax.sgd(1.0), sync_period=2, slow_step_size=sched)
  direct = lo.lookahead(optax.sgd(1.0), 2, sched)
  grads = lambda p, t: {"w": jnp.array([1.0])}  # pylint: disable=unnecessary-lambda-assignment
  params = {"w": jnp.array([10.0])}
  # Fast 10 -> 9 -> 8; sync: 10 + alpha * (8 - 10).
  np.testing.assert_allclose(
      trajectory(injected, params, grads, 2)[1][0]["w"], [8.4], rtol=1e-6)
  np.testing.assert_allclose(
      trajectory(direct, params, grads, 2)[1][0]["w"], [9.4], rtol=1e-6)


def test_rollback_lands_on_slow_weights_when_the_weight_moved_far():
  # The first weight moves from 0.0123456 to about -0.4877 (more than 2x,
  # across zero), so `p + (slow - p)` rounds: the slow weights then store
  # where the params land (1.2e-8 away, one rounding at the fast weight's
  # scale), and the params equal them bitwise. Every formulation:
  # tests/test_formulations.py.
  tx = lo.lookahead(optax.adam(0.5), 2, 0.0, on_nonfinite="rollback")
  p0 = jnp.array([0.0123456, 1e-3, 7.0], jnp.float32)
  grads = jnp.stack([jnp.ones(3), jnp.array([np.nan, 1.0, 1.0])])
  hist = trajectory(tx, p0, lambda p, t: grads[t], 2, jit=True)
  p1, (p2, s2) = hist[0][0], hist[1]
  slow = lo.slow_params(s2)
  np.testing.assert_array_equal(bits(p2), bits(slow))
  np.testing.assert_allclose(slow, p0, rtol=0, atol=float(jnp.finfo(
      jnp.float32).eps))
  assert float(slow[0]) != float(p0[0])  # the rounding case did happen
  # The third weight moved by 0.5 only (within 2x): bitwise its slow value.
  np.testing.assert_array_equal(bits(slow[2]), bits(p0[2]))
  assert float(p1[0]) < 0  # it did move far, across zero
