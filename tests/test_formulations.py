"""The sync formulations agree: `loop` (in-place loops for the policies and
the outer step, what `auto` picks on a single-device CPU), `select` and `cond`,
under jit with donation.

They are three compiled programs of the same arithmetic, and XLA:CPU may round
it differently in each (a multiply-add contracted into an FMA in one and not in
another, depending on the CPU's vector ISA): one step of each is compared from
the same params and state, to a few ulps, and the three runs, each on its own,
stay close. What each program promises on its own (the params on the slow
weights after a sync or a rollback, a reset's zero moments) is bitwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bf16_lands_on_slow_weights
from tests._helpers import assert_bitwise
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_no_shared_buffers
from tests._helpers import assert_tree_within_ulps
from tests._helpers import check_nan_on_a_sync_step
from tests._helpers import check_rollback_hand_worked
from tests._helpers import sync_invariant_run
from tests._helpers import trajectory
from tests._helpers import ulp
from tests._helpers import x64_if
from tests.test_properties import _long_runs
from tests.test_properties import check_long_runs_50000_steps

SNOO = optax.sgd(0.68, momentum=0.37, nesterov=True)
CONFIGS = {
    "keep": dict(slow_step_size=0.3),  # the default options
    "reset": dict(inner_state="reset", slow_step_size=0.3),
    "pullback": dict(inner_state="pullback", slow_step_size=0.8),
    "rollback": dict(on_nonfinite="rollback", slow_step_size=0.3),
    "snoo": dict(outer=SNOO),
    "snoo-reset": dict(outer=SNOO, inner_state="reset"),
    "snoo-reset-rollback": dict(outer=SNOO, inner_state="reset",
                                on_nonfinite="rollback"),
    "pullback-rollback": dict(inner_state="pullback", on_nonfinite="rollback",
                              slow_step_size=0.3),
    "slow_dtype": dict(slow_dtype=jnp.float32, slow_step_size=0.8),
}
# With rollback, a NaN on step 2 (index 1, mid-cycle) and on step 6 (index
# 5, a sync slot).
K, STEPS, BAD_STEPS = 3, 9, (1, 5)
SYNCS = ("loop", "select", "cond")


def _weights_scale(params):
  return max(float(np.max(np.abs(np.asarray(x, np.float64))))
             for x in jax.tree.leaves(params))


def assert_step_within_ulps(actual, expected, before, n, msg, slow_in=None):
  """One step's (params, state) of two formulations from the same `before`.

  The params, slow weights and outer state at the weights' scale (the outer
  step sees `slow - fast`, a difference of weights), each inner state element
  at its own or its value before the step. `slow_in`: a dtype, to compare
  the slow weights in its ulps instead of their own.
  """
  (p_a, s_a), (p_e, s_e) = actual, expected
  weights = _weights_scale((p_e, s_e.slow_params))
  assert_tree_within_ulps(p_a, p_e, n, "leaf", weights, f"{msg} params")
  if slow_in is None:
    assert_tree_within_ulps(s_a.slow_params, s_e.slow_params, n, "leaf",
                            weights, f"{msg} slow")
  else:
    for a, e in zip(jax.tree.leaves(s_a.slow_params),
                    jax.tree.leaves(s_e.slow_params)):
      assert a.dtype == e.dtype, msg
      diff = np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))
      assert (diff <= n * ulp(weights, slow_in)).all(), f"{msg} slow"
  assert_tree_within_ulps(s_a.outer_state, s_e.outer_state, n, "leaf", weights,
                          f"{msg} outer state")
  assert_tree_within_ulps(s_a.inner_state, s_e.inner_state, n,
                          "leaf", before[1].inner_state,
                          f"{msg} inner state")
  assert_bitwise(s_a.step, s_e.step, f"{msg} step")


def params_and_grads(kwargs):
  """Float32 params and grads; bfloat16 ones under a float32 `slow_dtype`."""
  dtype = jnp.bfloat16 if "slow_dtype" in kwargs else jnp.float32
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(5, 3)), dtype),
            "b": jnp.asarray(rng.normal(size=(7,)), dtype)}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                              dtype), params)
           for _ in range(STEPS)]
  if kwargs.get("on_nonfinite") == "rollback":
    for bad in BAD_STEPS:
      grads[bad] = {"a": grads[bad]["a"].at[0, 0].set(jnp.nan),
                    "b": grads[bad]["b"]}
  return params, grads


def make_tx(kwargs, sync):
  return lo.lookahead(optax.adam(0.1), K, sync=sync, **kwargs)


def _step(kwargs, sync):
  tx = make_tx(kwargs, sync)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1))


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def check_own_invariants(kwargs, t, p, s, msg):
  """Within one program: what a sync, a reset and a rollback promise bitwise."""
  rollback = kwargs.get("on_nonfinite") == "rollback"
  if "slow_dtype" in kwargs:
    assert jax.tree.map(lambda x: x.dtype, lo.slow_params(s)) == {
        "a": jnp.float32, "b": jnp.float32}
    s = s._replace(slow_params=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                            s.slow_params))
  if (t + 1) % K == 0 and not (rollback and t in BAD_STEPS):
    assert_tree_bitwise(p, lo.slow_params(s), f"{msg} step {t + 1}")
    if kwargs.get("inner_state") == "reset":
      for leaf in jax.tree.leaves(s.inner_state[0].mu):
        assert_bitwise(leaf, np.zeros_like(leaf), f"{msg} reset")
  if rollback and t in BAD_STEPS:
    # Rolled back onto the slow weights, which the bad step left alone.
    assert_tree_bitwise(p, lo.slow_params(s), f"{msg} rollback")


# `cond` computes a float32 `slow_dtype` sync of bfloat16 params otherwise
# than `loop` and `select` do: its slow weights differ from theirs by up to
# 704 float32 ulps after a sync (measured; less than a bfloat16 ulp, and the
# params agree to 2 bfloat16 ulps). Compared in the params' ulps until the
# formulations compute that sync alike.
SLOW_IN = {("slow_dtype", "cond"): jnp.bfloat16}
# Each formulation's own run, 9 steps (measured in float32: the per-step
# roundings add up to 4.8e-7 at most; one Adam step here is ~0.1 and the
# syncs move the weights by ~0.1 too, so a wrong sync stands out). With
# bfloat16 params (and float32 slow weights): the params agreed bitwise and
# the slow weights to 1.7e-4 (`cond`, above), under the 7.8e-3 of one
# bfloat16 ulp at 1.
RUN_ATOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-3}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loop_agrees_with_select_and_cond(name):
  kwargs = CONFIGS[name]
  params, grads = params_and_grads(kwargs)
  steps = {sync: _step(kwargs, sync) for sync in SYNCS}
  runs = {sync: (_copy(params), make_tx(kwargs, sync).init(_copy(params)))
          for sync in SYNCS}
  for t, g in enumerate(grads):
    # `select` and `cond` take one step from the loop run's params and state
    # (copies: the steps donate them).
    before = jax.device_get(runs["loop"])
    same = {other: jax.device_get(steps[other](*_copy(runs["loop"]), g))
            for other in ("select", "cond")}
    runs = {sync: steps[sync](*runs[sync], g) for sync in SYNCS}
    for sync in SYNCS:  # the next step can donate them
      assert_no_shared_buffers(*runs[sync])
    want = jax.device_get(runs["loop"])
    for other in ("select", "cond"):
      # n = 2: a step is a few roundings of elementwise arithmetic. With one
      # side compiled without FMA (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2) and
      # the other with it they differed by at most 1 ulp at these scales
      # (the runs below, by up to 176 ulps of a cancelling element's own).
      assert_step_within_ulps(same[other], want, before, 2,
                               f"{name} {other} step {t + 1}",
                               SLOW_IN.get((name, other)))
    for sync, (p, s) in runs.items():
      check_own_invariants(kwargs, t, *jax.device_get((p, s)),
                            f"{name} {sync}")
    for other in ("select", "cond"):
      for a, b in zip(jax.tree.leaves(want),
                      jax.tree.leaves(jax.device_get(runs[other]))):
        np.testing.assert_allclose(
            a, b, rtol=0, atol=RUN_ATOL.get(np.dtype(params["a"].dtype)),
            err_msg=f"{name} {other} step {t + 1}")


def _auto(**kw):
  from lookahead_optax import _formulation  # pylint: disable=g-import-not-at-top
  return _formulation.resolve("auto", default_options=not kw)


def test_auto_picks_per_option_on_a_multi_device_cpu():
  assert _auto() == "select"
  # conftest gives 8 host devices: no loop (its ordering read of the new
  # params would be an all-reduce for sharded params).
  assert jax.device_count() == 8
  for kw in (dict(inner_state="reset"), dict(inner_state="pullback"),
             dict(on_nonfinite="rollback"), dict(outer=SNOO)):
    assert _auto(**kw) == "select", kw


def test_auto_never_picks_the_cpu_loop_off_cpu(monkeypatch):
  from lookahead_optax import _formulation  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_formulation.jax, "device_count", lambda: 1)
  assert _auto(inner_state="reset") == "loop"
  monkeypatch.setattr(_formulation.jax, "default_backend", lambda: "gpu")
  for kw in (dict(inner_state="reset"), dict(on_nonfinite="rollback"),
             dict(outer=SNOO)):
    assert _auto(**kw) == "select", kw
  assert _auto() == "select"


# What `sync="auto"` gives on one CPU device (the default there): "loop" for
# options other than the defaults. conftest.py gives this process 8 devices,
# so tests/one_device_worker.py runs it in a process of its own, started
# without the device-count flag, together with the other single-device work.
# With the default options (slow_dtype is one of them) `loop` has no policy
# to loop over: its program is `select`'s.
ONE_DEVICE_PICKS = {"defaults": ["loop", "select"],
                    "slow_dtype": ["loop", "select"],
                    "reset": ["loop"], "pullback": ["loop"],
                    "rollback": ["loop"], "snoo": ["loop"],
                    "slow_dtype-reset": ["loop"]}


def test_auto_on_one_cpu_device_is_loop_and_matches_select():
  import json, os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(__file__))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
      [sys.executable, os.path.join(root, "tests", "one_device_worker.py")],
      capture_output=True, text=True, env=env, timeout=600, check=False,
      cwd=root)
  assert out.returncode == 0, out.stderr[-5000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  # Building every option (15 of them) started no backend: the process
  # could still start jax.distributed (one process, one CPU device).
  assert (result["built"], result["processes"], result["devices"]) == (
      15, 1, 1), result
  # Which formulation auto picked: its program is that one's, no other's.
  assert result["picked"] == ONE_DEVICE_PICKS, result["picked"]
  # And every step of each run matched select's from the same state (the
  # worker asserts that): all of them were taken.
  assert result["steps"] == {name: STEPS for name in ONE_DEVICE_PICKS}


@pytest.mark.parametrize("name,most", [("reset", 0.01), ("pullback", 0.01),
                                       ("rollback", 0.3), ("snoo", 1.1)])
def test_loop_keeps_no_update_sized_temporary(name, most):
  # XLA:CPU allocates a step's temporaries afresh (page faults) at every
  # call: the loop's policies work in place, and rollback's check fuses the
  # inner update into its reduction (a mask of one byte a weight, not the
  # inner updates of every leaf, 1.25x the params, as it once kept). SNOO
  # keeps one params-sized temporary (its pseudo-gradient; 2.5x under
  # "select"). This is the test that fails if XLA stops honouring
  # `_steering`'s dependences (the values would not change).
  params = {"a": jnp.ones((256, 64)), "b": jnp.ones((512, 32)),
            "c": jnp.ones((128,))}
  tx = lo.lookahead(optax.adam(0.1), K, sync="loop", **CONFIGS[name])

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= most * param_bytes, (name, temp, param_bytes)


# ---------------------------------------------------------------------------
# Each formulation's own promises in the edge cases that the feature tests
# (tests/test_reliability.py, tests/test_outer.py, tests/test_lookahead.py,
# tests/test_properties.py) check on the default formulation. Jitted: one
# program each, so bitwise is within that program (or exact: the hand-worked
# values are dyadic).
# ---------------------------------------------------------------------------

BF16 = jnp.bfloat16
POLICIES = ("keep", "reset", "pullback")


def _run(tx, params, grads, state=None):
  return trajectory(tx, params, list(grads), jit=True, state=state)


@pytest.mark.parametrize("sync", SYNCS)
def test_rollback_mid_cycle_and_overflow_hand_worked(sync):
  # The body of tests/test_reliability.py's hand-worked rollback (there
  # eagerly, on the default formulation): a NaN on step 3 rolls back to the
  # slow weights and resets the momentum, the sync on step 4 starts from
  # there; an overflow rolls back too.
  check_rollback_hand_worked(sync, jit=True)


@pytest.mark.parametrize("sync", SYNCS)
def test_rollback_lands_on_slow_weights_when_the_weight_moved_far(sync):
  # As in tests/test_outer.py: the first weight moves from 0.0123456 across
  # zero (more than 2x), so `p + (slow - p)` rounds; the slow weights store
  # where the params land, and the params equal them bitwise. The third
  # weight moved within 2x: bitwise its slow value.
  tx = lo.lookahead(optax.adam(0.5), 2, 0.0, on_nonfinite="rollback",
                    sync=sync)
  p0 = jnp.array([0.0123456, 1e-3, 7.0], jnp.float32)
  hist = _run(tx, p0, [jnp.ones(3), jnp.array([np.nan, 1.0, 1.0])])
  p1, (p2, s2) = hist[0][0], hist[1]
  slow = lo.slow_params(s2)
  assert_bitwise(p2, slow)
  np.testing.assert_allclose(slow, p0, rtol=0, atol=float(jnp.finfo(
      jnp.float32).eps))
  assert float(slow[0]) != float(p0[0])  # the rounding case did happen
  assert_bitwise(slow[2], p0[2])
  assert float(p1[0]) < 0  # it did move far, across zero


@pytest.mark.parametrize("sync", SYNCS)
def test_slow_dtype_on_every_formulation(sync):
  # bf16 params at 1; two sgd steps of +2**-7 (one bf16 ulp) a cycle, alpha
  # 0.25 (tests/test_reliability.py works the values out): float32 slow
  # weights keep the quarter steps that bf16 ones round away.
  tx = lo.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.25,
                    sync=sync, slow_dtype=jnp.float32)
  hist = _run(tx, jnp.ones([1], BF16), [jnp.full([1], -(2.0 ** -7), BF16)] * 12)
  expected_slow, s = [], 1.0
  for _ in range(6):
    p = float(jnp.asarray(s, jnp.float32).astype(BF16))
    s = s + 0.25 * (p + 2 * 2.0 ** -7 - s)
    expected_slow.append(s)
  got = [(h[0], lo.slow_params(h[1])) for h in hist[1::2]]
  np.testing.assert_array_equal([float(s[0]) for _, s in got], expected_slow)
  for params, slow in got:
    assert slow.dtype == jnp.float32 and params.dtype == BF16
    assert_bitwise(params, slow.astype(BF16))
  # A sync that moves a weight by more than 2x: k=1, alpha=0.999, bf16
  # params 1, fast 0; the update bf16(bf16(0.001) - 1) rounds to -1, so the
  # params land on 0, and the slow weights store that, not the target.
  tx = lo.lookahead(optax.sgd(1.0), sync_period=1, slow_step_size=0.999,
                    sync=sync, slow_dtype=jnp.float32)
  [(params, state)] = _run(tx, jnp.ones([1], BF16), [jnp.ones([1], BF16)])
  assert_bitwise(params, jnp.zeros([1], BF16))
  assert_bitwise(lo.slow_params(state), jnp.zeros([1], jnp.float32))


@pytest.mark.parametrize("sync", SYNCS)
def test_reset_keeps_dtypes_and_counts_and_clears_nans(sync):
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
  inner = optax.apply_if_finite(optax.adam(schedule), max_consecutive_errors=5)
  tx = lo.lookahead(inner, sync_period=2, inner_state="reset", sync=sync)
  params = {"w": jnp.ones(3), "h": jnp.ones(2, BF16)}
  g = {"w": jnp.ones(3), "h": jnp.ones(2, BF16)}
  [(params, state)] = _run(tx, params, [g])
  # Poison a moment: a multiplicative reset (0 * NaN) would keep the NaN.
  adam = state.inner_state.inner_state[0]
  adam = adam._replace(mu={"w": jnp.full(3, np.nan, jnp.float32),
                           "h": adam.mu["h"]})
  state = state._replace(inner_state=state.inner_state._replace(
      inner_state=(adam,) + tuple(state.inner_state.inner_state[1:])))
  before = jax.tree.map(lambda x: x.dtype, state)
  [(_, state)] = _run(tx, params, [g], state=state)  # step 2: a sync
  assert jax.tree.map(lambda x: x.dtype, state) == before
  assert state.inner_state.last_finite.dtype == jnp.bool_
  adam = state.inner_state.inner_state[0]
  assert int(adam.count) == 2  # the schedule goes on from step 2
  for leaf in jax.tree.leaves((adam.mu, adam.nu)):
    assert_bitwise(leaf, jnp.zeros_like(leaf))
  assert adam.mu["h"].dtype == BF16


@pytest.mark.parametrize("sync", SYNCS)
@pytest.mark.parametrize("inner_state", POLICIES)
def test_nan_on_a_sync_step_with_stateful_inner(inner_state, sync):
  # The body of tests/test_reliability.py's (adam, k = 3, alpha = 0.8): a
  # NaN on step 3, a sync step, rolls back to theta_0, zeroes the moments,
  # skips the sync and keeps the last-synced copy (pullback); the next cycle
  # is that of a fresh lookahead from theta_0 with the count going on, in
  # this program. Under jit on the default formulation: the "select" case
  # (what "auto" picks here, test_auto_picks_per_option_on_a_multi_device_cpu).
  check_nan_on_a_sync_step("adam", inner_state, sync, jit=True)


@pytest.mark.parametrize("slow_dtype", (None, jnp.float32))
@pytest.mark.parametrize("sync", SYNCS)
def test_bf16_invariant_under_jit_fused_and_separate(sync, slow_dtype):
  # As in tests/test_properties.py: bf16 weights over 8 orders of magnitude,
  # syncs that move some by large factors; the update applied inside the
  # jitted step (excess precision) and outside it both land on the slow
  # weights bitwise.
  assert_bf16_lands_on_slow_weights(
      lo.lookahead(optax.adam(0.5), 3, 0.37, sync=sync, slow_dtype=slow_dtype),
      3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_params_equal_slow_weights_bitwise_in_every_dtype(dtype):
  """After every sync the params are the slow weights, in every program.

  The body of tests/test_lookahead.py's (there eagerly, on the default
  formulation; "select" here is the default's program under jit). The
  formulations compute the same sync, but not always to the last bit
  (XLA:CPU contracts multiply-adds into FMAs differently in each): their
  trajectories stay within a few ulps of each other.
  """
  with x64_if(dtype):
    runs = {sync: sync_invariant_run(jnp.dtype(dtype), sync, jit=True,
                                     steps=9)[1] for sync in SYNCS}
    tol = 8 * float(jnp.finfo(dtype).eps)
    for sync in ("select", "cond"):
      for t, ((p_l, s_l), (p_o, s_o)) in enumerate(zip(runs["loop"],
                                                       runs[sync])):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(  # pylint: disable=g-long-lambda,cell-var-from-loop
                np.asarray(a, np.float64), np.asarray(b, np.float64),
                rtol=tol, atol=tol, err_msg=f"loop vs {sync} step {t + 1}"),
            (p_l, s_l.slow_params, s_l.inner_state),
            (p_o, s_o.slow_params, s_o.inner_state))


def test_every_formulation_builds_the_same_state():
  # One state layout for every formulation (a checkpoint of one restores
  # into another): the inner state, the slow weights and an int32 step.
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3, BF16)}
  for kwargs in [{}] + [CONFIGS[name] for name in sorted(CONFIGS)]:
    shapes = {sync: jax.eval_shape(make_tx(kwargs, sync).init, params)
              for sync in SYNCS}
    for sync in ("select", "cond"):
      assert shapes[sync] == shapes["loop"], (kwargs, sync)
    for sync in SYNCS:
      state = make_tx(kwargs, sync).init(params)
      assert_no_shared_buffers(params, state)


# Long runs (tests/test_properties.py on the default formulation): no drift
# between the invariant and the state over 5000 float32 steps, and 50000 in
# low precision.
OTHERS = ("loop", "cond")


def test_long_run_5000_steps_no_drift():
  # The other formulations' runs in one scanned program.
  runs = _long_runs(5000, [(jnp.float32, None, sync) for sync in OTHERS])
  for sync, (p, state, mismatches, target) in zip(OTHERS, runs):
    assert mismatches == 0, sync
    assert int(state.step) == 5000, sync
    assert_tree_bitwise(lo.eval_params(state, p), p, sync)  # a sync step
    np.testing.assert_allclose(p, target, atol=0.05, err_msg=sync)


@pytest.mark.slow
def test_long_run_50000_steps_no_drift():
  # As before, "cond" (loop: the 5000 steps); every precision in one program.
  check_long_runs_50000_steps("cond")


# --- the formulation seam ---


POLICY_CONFIGS = {
    "keep": dict(slow_step_size=0.3),
    "reset": dict(inner_state="reset", slow_step_size=0.3),
    "pullback-schedule": dict(inner_state="pullback",
                              slow_step_size=optax.linear_schedule(0.2, 0.8,
                                                                   4)),
    "reset-rollback": dict(inner_state="reset", on_nonfinite="rollback",
                           slow_step_size=0.3),
    "pullback-rollback": CONFIGS["pullback-rollback"],
    "snoo-reset": dict(outer=SNOO, inner_state="reset"),
    "snoo-reset-rollback": CONFIGS["snoo-reset-rollback"],
}


@pytest.mark.parametrize("sync", SYNCS)
@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_inner_state_policy_is_applied_once_per_update(monkeypatch, name,
                                                       sync):
  # Every formulation traces the policy once per update ("loop" once traced
  # it two or three times and threw all but the last result away).
  from lookahead_optax import _policies  # pylint: disable=g-import-not-at-top
  calls = []
  at_sync = _policies.at_sync

  def counting(*args, **kwargs):
    calls.append(args[0])
    return at_sync(*args, **kwargs)

  monkeypatch.setattr(_policies, "at_sync", counting)
  params, grads = params_and_grads({})
  tx = lo.lookahead(optax.adam(0.1), K, sync=sync, **POLICY_CONFIGS[name])
  jax.make_jaxpr(tx.update)(grads[0], tx.init(params), params)
  assert len(calls) == 1, (name, sync, calls)


def test_only_the_loop_formulation_imports_the_steering_helpers():
  import pathlib, re  # pylint: disable=g-import-not-at-top,multiple-imports
  package = pathlib.Path(lo.__file__).parent
  importers = sorted(
      path.name for path in package.glob("*.py")
      if re.search(r"^from lookahead_optax import _steering$",
                   path.read_text(), re.MULTILINE))
  assert importers == ["_loop.py"]
