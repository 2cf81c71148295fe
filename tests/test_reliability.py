"""Tests of the reliability features of `lookahead`.

Non-finite rollback, high-precision slow weights (`slow_dtype`), gradient
accumulation with `optax.MultiSteps`, `optax.apply_if_finite`, the semantics of
`inner_state="reset"` and the errors raised for mismatched trees. Expected
values are worked by hand in the comments (all numbers are dyadic, so float32
arithmetic on them is exact) or come from running the inner optimizer alone.
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bitwise
from tests._helpers import assert_no_shared_buffers
from tests._helpers import assert_tree_within_ulps
from tests._helpers import assert_tree_bitwise
from tests._helpers import check_nan_on_a_sync_step
from tests._helpers import check_rollback_hand_worked
from tests._helpers import jitted_step
from tests._helpers import trajectory

# Features are tested on the default formulation; every formulation keeps
# these promises in tests/test_formulations.py.
BF16 = jnp.bfloat16


def run(tx, params, grads_seq, state=None, jit=False):
  """Applies `tx` to `grads_seq`; returns the params and states after each."""
  return trajectory(tx, params, list(grads_seq), jit=jit, state=state)


# Two compiled programs (e.g. lookahead with and without rollback, or inside
# optax.apply_if_finite) may contract multiply-adds into FMAs differently, so
# they agree to a few ulps, not bitwise. One Adam step (compared from the same
# params and state) rounds the moments, the update and its addition to the
# params once each, a sync adds the blend's subtraction and addition (its
# products, alpha = 0.5, are exact): 4 ulps.
STEP_ULPS = 4
# A whole run adds up such roundings, far below what a rolled-back step or a
# sync on another step moves (about 0.1 here).
RUN_TOL = {"rtol": 1e-5, "atol": 1e-6}


def assert_runs_close(actual, expected, msg=""):
  """Two runs' params and states agree to RUN_TOL (integer leaves exactly)."""
  jax.tree.map(functools.partial(np.testing.assert_allclose, err_msg=msg,
                                 **RUN_TOL), actual, expected)


# ---------------------------------------------------------------------------
# on_nonfinite="rollback"
# ---------------------------------------------------------------------------


def test_rollback_nan_gradient_mid_cycle_and_overflow_hand_worked():
  # Eagerly on the default formulation; the same body on each formulation
  # under jit: tests/test_formulations.py. sgd(lr=0.5, momentum=0.5), k=4,
  # alpha=0.75, params 8: a NaN on step 3 rolls back to the slow weights and
  # resets the momentum, the sync on step 4 starts from there (the values
  # are worked out in the body); a finite update whose fast params overflow
  # to inf also rolls back.
  check_rollback_hand_worked()


@pytest.mark.parametrize("inner_state", ("keep", "reset", "pullback"))
def test_rollback_on_sync_step_skips_the_sync(inner_state):
  # k=2: a NaN on step 2 (a sync step) does no sync; the next one is step 4.
  tx = lo.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.75,
                    inner_state=inner_state, on_nonfinite="rollback")
  params = {"a": jnp.array([4.0]), "b": jnp.array(2.0, jnp.float32)}
  grads = [
      {"a": jnp.array([1.0]), "b": jnp.array(1.0)},
      {"a": jnp.array([1.0]), "b": jnp.array(np.inf)},
      {"a": jnp.array([2.0]), "b": jnp.array(0.0)},
      {"a": jnp.array([2.0]), "b": jnp.array(0.0)},
  ]
  hist = run(tx, params, grads, jit=True)
  # Step 2 rolls back to the initial params; slow untouched.
  assert_tree_bitwise(hist[1][0], params)
  assert_tree_bitwise(lo.slow_params(hist[1][1]), params)
  # Steps 3, 4: a 4 -> 2 -> 0, b stays 2; sync: a = 4 + 0.75 (0 - 4) = 1.
  expected = {"a": jnp.array([1.0]), "b": jnp.array(2.0)}
  assert_tree_bitwise(hist[3][0], expected)
  assert_tree_bitwise(lo.slow_params(hist[3][1]), expected)


def test_rollback_resets_adam_moments_and_keeps_count():
  tx = lo.lookahead(optax.adam(0.1), sync_period=5, on_nonfinite="rollback")
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  ok = {"w": jnp.ones(3), "b": jnp.ones(2)}
  bad = {"w": jnp.array([1.0, np.nan, 1.0]), "b": jnp.ones(2)}
  hist = run(tx, params, [ok, ok, bad])
  p, state = hist[-1]
  assert_tree_bitwise(p, params)
  adam_state = state.inner_state[0]
  assert int(adam_state.count) == 3  # Schedules do not restart.
  for leaf in jax.tree.leaves((adam_state.mu, adam_state.nu)):
    assert_bitwise(leaf, jnp.zeros_like(leaf))


def test_rollback_all_finite_matches_propagate():
  # With finite gradients, rollback changes nothing (adam, 3 cycles, jit).
  # The two modes compile to different programs (rollback adds the check and
  # its selects): each rollback step equals the propagate step from the same
  # params and state to STEP_ULPS, and the two runs agree to RUN_TOL.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
           for _ in range(9)]
  make = lambda mode: lo.lookahead(optax.adam(0.1), 3, 0.5,
                                   on_nonfinite=mode)
  a = run(make("rollback"), params, grads, jit=True)
  b = run(make("propagate"), params, grads, jit=True)
  propagate = jax.jit(make("propagate").update)
  before = (params, make("rollback").init(params))
  for t, (g, after) in enumerate(zip(grads, a)):
    updates, state = propagate(g, before[1], before[0])
    expected = (optax.apply_updates(before[0], updates), state)
    assert_tree_within_ulps(after, expected, STEP_ULPS, "element", before,
                            f"step {t + 1}")
    if (t + 1) % 3 == 0:  # a sync, not rolled back
      assert_tree_bitwise(lo.slow_params(after[1]), after[0])
    before = after
  for t, (run_a, run_b) in enumerate(zip(a, b)):
    assert_runs_close(run_a, run_b, f"step {t + 1}")


def test_propagate_is_default_and_nan_spreads():
  tx = lo.lookahead(optax.sgd(0.1), sync_period=2)
  hist = run(tx, jnp.array([1.0]), [jnp.array([np.nan]), jnp.array([1.0])])
  assert np.isnan(hist[0][0]).all()
  assert np.isnan(lo.slow_params(hist[1][1])).all()  # The sync spread it.


def test_rollback_cannot_repair_nonfinite_params():
  # Documented limit: an additive update cannot turn NaN params finite.
  tx = lo.lookahead(optax.sgd(0.1), sync_period=2, on_nonfinite="rollback")
  state = tx.init(jnp.array([1.0]))
  updates, state = tx.update(jnp.array([1.0]), state, jnp.array([np.nan]))
  assert np.isnan(updates).all()
  np.testing.assert_array_equal(lo.slow_params(state), [1.0])


def test_rollback_training_goes_on_and_converges():
  # Least squares with adam, 300 jitted steps in a scan; NaN gradients at
  # steps 7, 8 (mid-cycle) and 50 (a sync step). Converges to the solution;
  # "propagate" ends in NaN.
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  x_star = jnp.asarray([1.0, -2.0, 0.5, 3.0])
  b = a @ x_star
  loss = lambda x: 0.5 * jnp.mean((a @ x - b) ** 2)

  def train(mode):
    tx = lo.lookahead(optax.adam(0.05), sync_period=5, on_nonfinite=mode)
    x0 = jnp.zeros(4)

    def step(carry, t):
      x, state = carry
      g = jax.grad(loss)(x)
      g = jnp.where((t == 7) | (t == 8) | (t == 50), jnp.nan, g)
      updates, state = tx.update(g, state, x)
      return (optax.apply_updates(x, updates), state), None

    (x, state), _ = jax.lax.scan(step, (x0, tx.init(x0)), jnp.arange(300))
    return x, state

  x, state = jax.jit(train, static_argnums=0)("rollback")
  np.testing.assert_allclose(x, x_star, atol=1e-3)
  np.testing.assert_allclose(lo.slow_params(state), x_star, atol=1e-3)
  assert int(state.step) == 300
  x_bad, _ = jax.jit(train, static_argnums=0)("propagate")
  assert np.isnan(x_bad).all()


# ---------------------------------------------------------------------------
# slow_dtype
# ---------------------------------------------------------------------------


def _creep(slow_dtype, cycles):
  """bf16 params at 1; two sgd steps of +2**-7 (one bf16 ulp) per cycle."""
  tx = lo.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.25,
                    slow_dtype=slow_dtype)
  grads = [jnp.full([1], -(2.0 ** -7), BF16)] * (2 * cycles)
  hist = run(tx, jnp.ones([1], BF16), grads, jit=True)
  return [(h[0], lo.slow_params(h[1])) for h in hist[1::2]]


def test_slow_dtype_float32_accumulates_small_moves():
  # Each cycle the fast weights go 1 ulp, 2 ulps up from bf16(slow); the sync
  # moves the slow weights a quarter of the way: in bf16 that is half an ulp
  # (1 + 2**-8), which rounds back to 1 (ties to even) every cycle, for ever.
  for params, slow in _creep(None, cycles=6):
    assert_bitwise(params, jnp.ones([1], BF16))
    assert_bitwise(slow, jnp.ones([1], BF16))
  # Float32 slow weights keep the quarter steps:
  # s1 = 1 + 2**-8 (params round to 1), s2 = s1 + (1 + 2**-6 - s1) / 4
  # = 1 + 1.75 * 2**-8 (params round up to 1 + 2**-7), and so on.
  expected_slow, s = [], 1.0
  for _ in range(6):
    p = float(jnp.asarray(s, jnp.float32).astype(BF16))
    s = s + 0.25 * (p + 2 * 2.0 ** -7 - s)
    expected_slow.append(s)
  got = _creep(jnp.float32, cycles=6)
  np.testing.assert_array_equal([float(s[0]) for _, s in got], expected_slow)
  np.testing.assert_array_equal(expected_slow[:2],
                                [1 + 2.0 ** -8, 1 + 1.75 * 2.0 ** -8])
  for params, slow in got:
    assert slow.dtype == jnp.float32 and params.dtype == BF16
    assert_bitwise(params, slow.astype(BF16))
  assert float(got[-1][0][0]) > 1.0


def test_slow_dtype_large_move_keeps_params_equal_to_slow():
  # k=1, alpha=0.999, bf16 params 1, fast 0: the float32 target is 0.001,
  # bf16(0.001) = 0.00100708; the bf16 update bf16(0.00100708 - 1) rounds to
  # -1, so the params land on 0, not on bf16(target). The slow weights must
  # store what the params became (0), not the target.
  tx = lo.lookahead(optax.sgd(1.0), sync_period=1, slow_step_size=0.999,
                    slow_dtype=jnp.float32)
  for jit in (False, True):
    [(params, state)] = run(tx, jnp.ones([1], BF16),
                            [jnp.ones([1], BF16)], jit=jit)
    assert_bitwise(params, jnp.zeros([1], BF16))
    assert_bitwise(lo.slow_params(state), jnp.zeros([1], jnp.float32))


def test_slow_dtype_leaves_non_float_params_and_eval_params():
  tx = lo.lookahead(optax.sgd(1.0), sync_period=1, slow_dtype=jnp.float32)
  params = {"w": jnp.ones(2, BF16), "n": jnp.arange(2)}
  state = tx.init(params)
  assert state.slow_params["w"].dtype == jnp.float32
  assert state.slow_params["n"].dtype == params["n"].dtype
  ev = lo.eval_params(state, params)
  assert ev["w"].dtype == BF16


def test_slow_dtype_must_be_floating():
  with pytest.raises(TypeError, match="`slow_dtype` must be a floating"):
    lo.lookahead(optax.sgd(1.0), slow_dtype=jnp.int32)


# ---------------------------------------------------------------------------
# Gradient accumulation with optax.MultiSteps
# ---------------------------------------------------------------------------


def _multisteps_vs_mean_grads(inner, inner_state, seed):
  """(MultiSteps(lookahead) history at applied steps, reference history)."""
  n_micro, k, applied = 2, 2, 6
  rng = np.random.default_rng(seed)
  # Micro-batch gradients are multiples of 1/8, two per applied step, so their
  # mean (MultiSteps' running mean) is exact.
  params = {"w": jnp.asarray(rng.integers(-8, 9, size=(2, 3)) / 4, jnp.float32),
            "b": jnp.asarray(rng.integers(-8, 9, size=3) / 4, jnp.float32)}
  micro = [jax.tree.map(lambda p: jnp.asarray(
      rng.integers(-16, 17, size=p.shape) / 8, jnp.float32), params)
           for _ in range(n_micro * applied)]
  make = lambda: lo.lookahead(inner, k, 0.5, inner_state=inner_state)
  hist = run(optax.MultiSteps(make(), every_k_schedule=n_micro), params,
             micro, jit=True)
  means = [jax.tree.map(lambda x, y: (x + y) / 2, *micro[2 * i:2 * i + 2])
           for i in range(applied)]
  ref = run(make(), params, means, jit=True)
  # Between applied steps the params do not move.
  for i in range(applied):
    assert_tree_bitwise(hist[2 * i][0], hist[2 * i - 1][0] if i else params)
  return hist[1::2], ref


@pytest.mark.parametrize("inner_state", ("keep", "reset"))
def test_multisteps_of_lookahead_equals_lookahead_on_mean_grads(inner_state):
  # sgd(0.5, momentum=0.5) on dyadic numbers: every operation is exact, so
  # the two runs must agree bitwise.
  hist, ref = _multisteps_vs_mean_grads(
      optax.sgd(0.5, momentum=0.5), inner_state, seed=2)
  for i, ((p, state), (p_ref, s_ref)) in enumerate(zip(hist, ref)):
    assert_tree_bitwise(p, p_ref)
    assert_tree_bitwise(state.inner_opt_state, s_ref)
    # The lookahead step counts applied steps, not micro-steps; after the
    # syncs (applied steps 2, 4, 6) the params equal the slow weights.
    assert int(state.inner_opt_state.step) == i + 1
    if (i + 1) % 2 == 0:
      assert_tree_bitwise(lo.slow_params(state), p)


def test_multisteps_of_lookahead_adam_matches_to_rounding():
  # With adam, XLA compiles the two programs differently (e.g. fused
  # multiply-adds), so the runs agree to a few ulps, as plain adam does.
  hist, ref = _multisteps_vs_mean_grads(optax.adam(0.1), "keep", seed=3)
  for (p, state), (p_ref, s_ref) in zip(hist, ref):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 (p, lo.slow_params(state)), (p_ref, lo.slow_params(s_ref)))
    assert int(state.inner_opt_state.step) == int(s_ref.step)


@pytest.mark.parametrize("wrap", [
    lambda m: m,
    lambda m: m.gradient_transformation(),
    lambda m: optax.chain(optax.clip(1.0), m.gradient_transformation()),
])
def test_lookahead_of_multisteps_raises(wrap):
  inner = wrap(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=4))
  with pytest.raises(ValueError, match=r"must not be an optax\.MultiSteps|"
                     r"contains an optax\.MultiSteps") as info:
    tx = lo.lookahead(inner, sync_period=5)
    tx.init(jnp.ones(2))
  assert "optax.MultiSteps(lookahead(inner, ...), every_k_schedule=n)" in str(
      info.value)


# ---------------------------------------------------------------------------
# optax.apply_if_finite
# ---------------------------------------------------------------------------


def test_apply_if_finite_skips_steps_without_touching_lookahead_state():
  make = lambda: lo.lookahead(optax.adam(0.1), sync_period=2)
  tx = optax.apply_if_finite(make(), max_consecutive_errors=3)
  params = jnp.array([1.0, 2.0])
  gs = [jnp.array([1.0, -1.0]), jnp.array([0.5, 0.25]),
        jnp.array([-1.0, 2.0]), jnp.array([0.25, 0.5])]
  nan = jnp.array([np.nan, 1.0])
  hist = run(tx, params, [gs[0], nan, gs[1], gs[2], nan, gs[3]], jit=True)
  ref = run(make(), params, gs, jit=True)
  # A skipped step leaves params and the whole lookahead state as they were.
  for skipped in (1, 4):
    assert_tree_bitwise(hist[skipped][0], hist[skipped - 1][0])
    assert_tree_bitwise(hist[skipped][1].inner_state,
                        hist[skipped - 1][1].inner_state)
  # The other steps are those of lookahead without the NaN steps: the sync
  # counts applied steps. apply_if_finite(lookahead) and lookahead are two
  # programs: each applied step equals lookahead's step from the same params
  # and state to STEP_ULPS, and the runs agree to RUN_TOL, with the same
  # step counts.
  update = jax.jit(make().update)
  before = (params, make().init(params))
  for i, g in zip([0, 2, 3, 5], gs):
    updates, state = update(g, before[1], before[0])
    expected = (optax.apply_updates(before[0], updates), state)
    after = (hist[i][0], hist[i][1].inner_state)
    assert_tree_within_ulps(after, expected, STEP_ULPS, "element", before,
                            f"step {i + 1}")
    before = after
  for h, r in zip([hist[0], hist[2], hist[3], hist[5]], ref):
    assert_runs_close((h[0], h[1].inner_state), r)
  assert int(hist[-1][1].total_notfinite) == 2


# ---------------------------------------------------------------------------
# inner_state="reset"
# ---------------------------------------------------------------------------


def test_reset_keeps_dtypes_and_counts_and_clears_nans():
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
  inner = optax.apply_if_finite(optax.adam(schedule), max_consecutive_errors=5)
  tx = lo.lookahead(inner, sync_period=2, inner_state="reset")
  params = {"w": jnp.ones(3), "h": jnp.ones(2, BF16)}
  state = tx.init(params)
  g = {"w": jnp.ones(3), "h": jnp.ones(2, BF16)}
  updates, state = tx.update(g, state, params)
  params = optax.apply_updates(params, updates)
  # Poison a moment: a multiplicative reset (0 * NaN) would keep the NaN.
  adam = state.inner_state.inner_state[0]
  adam = adam._replace(mu={"w": jnp.full(3, np.nan), "h": adam.mu["h"]})
  inner_state = state.inner_state._replace(
      inner_state=(adam,) + tuple(state.inner_state.inner_state[1:]))
  state = state._replace(inner_state=inner_state)
  before = jax.tree.map(lambda x: x.dtype, state)
  _, state = jax.jit(tx.update)(g, state, params)  # Step 2: a sync.
  assert jax.tree.map(lambda x: x.dtype, state) == before
  finite_state = state.inner_state
  assert finite_state.last_finite.dtype == jnp.bool_  # bool stays bool.
  adam = finite_state.inner_state[0]
  assert int(adam.count) == 2  # The schedule goes on from step 2.
  for leaf in jax.tree.leaves((adam.mu, adam.nu)):
    assert_bitwise(leaf, jnp.zeros_like(leaf))
  assert adam.mu["h"].dtype == BF16


# ---------------------------------------------------------------------------
# Errors for mismatched trees
# ---------------------------------------------------------------------------


@pytest.fixture(name="setup")
def _setup():
  tx = lo.lookahead(optax.adam(0.1), sync_period=2)
  params = {"b": jnp.zeros(2), "w": jnp.ones((2, 3))}
  return tx, params, tx.init(params)


@pytest.mark.parametrize("jit", (False, True))
@pytest.mark.parametrize("which, bad, message", [
    ("params", {"w": jnp.ones((2, 3))},
     r"`params` does not have the tree structure of the slow params "
     r"\(missing \['b'\]\)\."),
    ("params", {"b": jnp.zeros(2), "w": jnp.ones((2, 3)), "z": jnp.ones(1)},
     r"`params` does not have the tree structure of the slow params "
     r"\(unexpected \['z'\]\)\."),
    ("params", {"b": jnp.zeros(2), "w": jnp.ones((3, 2))},
     r"`params` leaf \['w'\] has shape \(3, 2\), expected \(2, 3\) as in "
     r"the slow params\."),
    ("params", {"b": jnp.zeros(2, BF16), "w": jnp.ones((2, 3))},
     r"`params` leaf \['b'\] has dtype bfloat16, expected float32 as in "
     r"the slow params\."),
    ("updates", {"b": jnp.zeros(3), "w": jnp.ones((2, 3))},
     r"`updates` leaf \['b'\] has shape \(3,\), expected \(2,\) as in "
     r"the slow params\."),
    ("updates", [jnp.zeros(2), jnp.ones((2, 3))],
     r"`updates` does not have the tree structure of the slow params"),
])
def test_mismatched_trees_raise_naming_the_path(setup, jit, which, bad,
                                                message):
  tx, params, state = setup
  grads = params
  if which == "params":
    params = bad
  else:
    grads = bad
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=message):
    update(grads, state, params)


def test_missing_params_raises(setup):
  tx, params, state = setup
  with pytest.raises(ValueError, match="`params` is required"):
    tx.update(params, state)


def test_wrong_state_type_raises(setup):
  tx, params, _ = setup
  with pytest.raises(TypeError, match="`state` must be a LookaheadState"):
    tx.update(params, optax.EmptyState(), params)


def test_mismatch_error_names_nested_path():
  tx = lo.lookahead(optax.sgd(0.1))
  params = {"enc": {"layers": [jnp.ones(2), jnp.ones(3)]}}
  state = tx.init(params)
  bad = {"enc": {"layers": [jnp.ones(2), jnp.ones(4)]}}
  with pytest.raises(ValueError,
                     match=r"leaf \['enc'\]\['layers'\]\[1\] has shape"):
    tx.update(params, state, bad)


# ---------------------------------------------------------------------------
# A NaN on a sync step with a stateful inner optimizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("inner_state", ("keep", "reset", "pullback"))
@pytest.mark.parametrize("inner,jit", [
    ("adam", False), ("momentum", False),
    # The same program shapes as adam under jit: kept for the full run.
    pytest.param("momentum", True, marks=pytest.mark.slow),
])
def test_nan_on_a_sync_step_with_stateful_inner(inner, inner_state, jit):
  # k = 3, alpha = 0.8; two good steps, then a NaN gradient on step 3 (a
  # sync step): a rollback to theta_0, zero moments, no sync, the last-synced
  # copy (pullback) untouched, then a fresh cycle from theta_0 with the inner
  # counts going on (the body is tests/_helpers.py's). Adam under jit on the
  # default formulation is the "select" case of the same body in
  # tests/test_formulations.py ("auto" picks it there).
  check_nan_on_a_sync_step(inner, inner_state, jit=jit)


# ---------------------------------------------------------------------------
# Donation: every state the library builds can be donated with the params
# ---------------------------------------------------------------------------


def _donation_cases():
  """(name, tx, params, state builder) for every way to build a state."""
  params = lambda: {"w": jnp.arange(6.0).reshape(2, 3) / 8,
                    "b": jnp.array([0.5, -0.25, 1.0]),
                    "s": jnp.array(0.75, jnp.float32)}
  cases = []
  # One `tx` per configuration: the states built otherwise (migrated) go
  # through the same compiled steps (`jitted_step`).
  policy_tx = {policy: lo.lookahead(optax.adam(0.1), 3, 0.8,
                                    inner_state=policy)
               for policy in ("keep", "reset", "pullback")}
  # Every formulation's init state: tests/test_formulations.py.
  for policy, tx in policy_tx.items():
    cases.append((f"init-{policy}", tx, params, tx.init))
  tx = lo.lookahead(optax.adam(0.1), 3, 0.8, on_nonfinite="rollback")
  cases.append(("rollback", tx, params, tx.init))
  bf16 = lambda: jax.tree.map(lambda p: p.astype(BF16), params())
  tx = lo.lookahead(optax.adam(0.1), 3, 0.8, slow_dtype=jnp.float32)
  cases.append(("slow_dtype", tx, bf16, tx.init))
  # slow_dtype equal to the params' dtype: the slow weights must still be
  # copies, not the params' own buffers.
  tx = lo.lookahead(optax.adam(0.1), 3, 0.8, slow_dtype=jnp.float32)
  cases.append(("slow_dtype-same", tx, params, tx.init))
  tx = lo.lookahead(lo.lazy(optax.adam(0.1)), 3, 0.8, inner_state="pullback")
  cases.append(("lazy-pullback", tx, params, tx.init))
  # lo.lazy(lo.lookahead(...)) is rejected at init (tests/test_lazy.py).
  for policy in ("keep", "pullback"):
    tx = policy_tx[policy]
    plain = optax.adam(0.1)
    migrate = lambda p, tx=tx, plain=plain: lo.migrate_optax_state(
        tx, plain.init(p), p, step=1)
    cases.append((f"migrate-{policy}", tx, params, migrate))
  tx = optax.chain(optax.clip(1.0), lo.lookahead(
      optax.sgd(0.1, momentum=0.9), 3, 0.8, inner_state="pullback"))
  cases.append(("chain-pullback", tx, params, tx.init))
  return cases


DONATION_CASES = _donation_cases()


@pytest.mark.parametrize("case", DONATION_CASES, ids=[c[0] for c in
                                                      DONATION_CASES])
def test_every_state_can_be_donated_with_the_params(case):
  _, tx, make_params, build = case
  rng = np.random.default_rng(5)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), p.dtype), make_params()) for _ in range(7)]

  # Reference: the same steps without donation.
  expected = []
  params = make_params()
  state = build(params)
  for g in grads:
    params, state = jitted_step(tx)(params, state, g)
    expected.append((params, state))

  params = make_params()
  state = build(params)
  # No leaf of the state may share a buffer with the params or with another
  # leaf (e.g. a pullback copy aliasing the live inner state): XLA refuses to
  # donate one buffer twice.
  assert_no_shared_buffers(params, state)
  donated = jitted_step(tx, donate=True)
  first = (params, state)
  for t, g in enumerate(grads):
    params, state = donated(params, state, g)
    assert_no_shared_buffers(params, state)
    assert_tree_bitwise((params, state), expected[t], f"step {t + 1}")
  assert all(x.is_deleted() for x in jax.tree.leaves(first))


def test_bitwise_helper_tells_signed_zeros_and_dtypes_apart():
  # The shared helper every bitwise test uses: 0.0 != -0.0 (a sign flip
  # `assert_array_equal` misses), NaN == NaN of the same bits, dtypes match.
  with pytest.raises(AssertionError):
    assert_bitwise(jnp.array([0.0]), jnp.array([-0.0]))
  with pytest.raises(AssertionError):
    assert_bitwise(jnp.array([1.0], BF16), jnp.array([1.0]))
  with pytest.raises(AssertionError):
    assert_tree_bitwise({"a": jnp.zeros(2)}, [jnp.zeros(2)])
  assert_bitwise(jnp.array([np.nan, -0.0]), jnp.array([np.nan, -0.0]))
