"""Exactness tests of `lookahead_optax.lookahead`.

The library is checked against an independent NumPy implementation of the
paper's two nested loops (`tests/reference.py`), against `optax.lookahead`,
and against hand-worked trajectories whose values are exact in binary floating
point.
"""

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
from tests._helpers import assert_tree_within_ulps
from tests._helpers import assert_tree_bitwise
from tests._helpers import bits
from tests._helpers import sync_invariant_run
from tests._helpers import trajectory
from tests._helpers import x64_if

SHAPES = {"w": (3, 4), "b": (4,), "c": ()}
NUM_STEPS = 20
LAM = 0.5  # grads = noise_t + LAM * params: a random quadratic problem.


def make_problem(seed, num_steps=NUM_STEPS, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params0 = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
  noise = [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
           for _ in range(num_steps)]
  return params0, noise


def ref_grad_fn(noise):
  def grad_fn(t, fast):
    return {k: noise[t][k].astype(np.float64) + LAM * fast[k] for k in fast}
  return grad_fn


def _grads(params, noise_t):
  return jax.tree.map(lambda n, p: n + LAM * p, noise_t, params)


def make_step(tx):
  def step(params, state, noise_t):
    updates, state = tx.update(_grads(params, noise_t), state, params)
    return optax.apply_updates(params, updates), state
  return step


def run_library(tx, params0, noise, jit=True):
  """Params and states after every step (the gradients inside the step)."""
  return trajectory(tx, params0, _grads, data=noise, jit=jit)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6, msg=""):
  for key in expected:
    np.testing.assert_allclose(
        np.asarray(actual[key], np.float64), expected[key],
        rtol=rtol, atol=atol, err_msg=f"{msg} leaf {key!r}")


# ---------------------------------------------------------------------------
# 1. The NumPy reference of the paper's algorithm.

ADAMW_WD = 0.1
INNERS = {
    "sgd": (lambda: optax.sgd(0.1), lambda: ref.SGD(0.1)),
    "momentum": (lambda: optax.sgd(0.1, momentum=0.9),
                 lambda: ref.SGD(0.1, momentum=0.9)),
    "adam": (lambda: optax.adam(0.05), lambda: ref.Adam(0.05)),
    "adamw": (lambda: optax.adamw(0.05, weight_decay=ADAMW_WD),
              lambda: ref.Adam(0.05, weight_decay=ADAMW_WD)),
    "radam": (lambda: optax.radam(0.05), lambda: ref.RAdam(0.05)),
    "clip_adamw": (
        lambda: optax.chain(optax.clip_by_global_norm(2.0),
                            optax.adamw(0.05, weight_decay=ADAMW_WD)),
        lambda: ref.ClipByGlobalNorm(2.0, ref.Adam(0.05,
                                                   weight_decay=ADAMW_WD))),
}
# (k, alpha): k = 1 syncs at every step; alpha = 0 returns to theta_0 at every
# sync (up to the rounding of params + (theta_0 - params): the params must land
# on the slow weights bitwise), alpha = 1 is the inner optimizer alone; k = 3 leaves a cut-short cycle
# at the end of the 20 steps.
K_ALPHAS = [(1, 0.5), (3, 0.5), (5, 0.8), (4, 0.0), (4, 1.0)]


# float32 tolerances: the library runs in float32 and the reference in
# float64, so they differ by the inner optimizer's own float32 rounding (about
# 5e-6 after 20 Adam steps, the same with or without Lookahead). optax.radam
# computes rho_t = rho_inf - 2 t b2^t / (1 - b2^t) in float32, a cancellation
# that costs it about 1e-4 on its own: it gets a looser float32 tolerance and
# is checked tightly in float64 below.
F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
F32_TOL_RADAM = {"rtol": 3e-4, "atol": 3e-4}
F64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def check_against_reference(tx, ref_inner, k, alpha, inner_state="keep",
                            seed=0, tol=None, dtype="float32"):
  tol = tol or F32_TOL
  with x64_if(dtype):
    params0, noise = make_problem(seed, dtype=np.dtype(dtype))
    expected_fast, expected_slow, expected_states = ref.run_lookahead(
        ref_inner, params0, ref_grad_fn(noise), k, alpha, NUM_STEPS,
        inner_state=inner_state)
    got = run_library(tx, params0, noise)
    assert len(got) == len(expected_fast) == NUM_STEPS
    for t, (params, state) in enumerate(got):
      msg = f"step {t + 1}"
      assert int(state.step) == t + 1
      chex.assert_trees_all_equal_dtypes(params, params0)
      assert_trees_close(params, expected_fast[t], msg=msg + " fast params",
                         **tol)
      assert_trees_close(lo.slow_params(state), expected_slow[t],
                         msg=msg + " slow params", **tol)
  return got, expected_states


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_matches_numpy_reference(inner):
  """Every (k, alpha) of K_ALPHAS, through one compiled step per inner.

  k and alpha are traced arguments of the jitted step (a lookahead built
  inside it), so the matrix costs one compilation per inner optimizer; the
  static-argument path is checked by the float64 test and the hand-worked
  trajectories below.
  """
  make_tx, make_ref = INNERS[inner]
  tol = F32_TOL_RADAM if inner == "radam" else F32_TOL

  @jax.jit
  def step(params, state, noise_t, k, alpha):
    tx = lo.lookahead(make_tx(), sync_period=k, slow_step_size=alpha)
    return make_step(tx)(params, state, noise_t)

  for k, alpha in K_ALPHAS:
    params0, noise = make_problem(k)
    expected_fast, expected_slow, _ = ref.run_lookahead(
        make_ref(), params0, ref_grad_fn(noise), k, alpha, NUM_STEPS)
    params = jax.tree.map(jnp.asarray, params0)
    state = lo.lookahead(make_tx(), k, alpha).init(params)
    for t, noise_t in enumerate(noise):
      params, state = step(params, state, noise_t, jnp.int32(k),
                           jnp.float32(alpha))
      msg = f"k={k} alpha={alpha} step {t + 1}"
      assert int(state.step) == t + 1
      assert_trees_close(params, expected_fast[t], msg=msg + " fast", **tol)
      assert_trees_close(lo.slow_params(state), expected_slow[t],
                         msg=msg + " slow", **tol)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_matches_numpy_reference_float64(inner):
  """In float64 the library follows the reference to 1e-12."""
  make_tx, make_ref = INNERS[inner]
  with x64_if("float64"):
    tx = lo.lookahead(make_tx(), sync_period=3, slow_step_size=0.6)
    check_against_reference(tx, make_ref(), 3, 0.6, tol=F64_TOL,
                            dtype="float64")


def test_matches_numpy_reference_static_arguments():
  # k and alpha static (Python numbers), on the default formulation; every
  # formulation agrees with it step by step (tests/test_formulations.py).
  tx = lo.lookahead(optax.adamw(0.05, weight_decay=ADAMW_WD), 3, 0.6)
  check_against_reference(tx, ref.Adam(0.05, weight_decay=ADAMW_WD), 3, 0.6)


@pytest.mark.parametrize("inner_state", ["reset", "pullback"])
@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_inner_state_policies_match_numpy_reference(inner, inner_state):
  make_tx, make_ref = INNERS[inner]
  tx = lo.lookahead(make_tx(), 3, 0.6, inner_state=inner_state)
  got, expected_states = check_against_reference(
      tx, make_ref(), 3, 0.6, inner_state=inner_state)
  for t, (_, state) in enumerate(got):
    inner = state.inner_state
    if inner_state == "pullback":
      inner = inner.inner_state
    if "trace" in expected_states[t]:
      assert_trees_close(inner[0].trace, expected_states[t]["trace"],
                         **F32_TOL)
    else:
      assert int(inner[0].count) == expected_states[t]["count"] == t + 1
      assert_trees_close(inner[0].mu, expected_states[t]["mu"], **F32_TOL)
      assert_trees_close(inner[0].nu, expected_states[t]["nu"], **F32_TOL)


# ---------------------------------------------------------------------------
# 2. Parity with optax.lookahead (slow weights in `LookaheadParams`).


@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_parity_with_optax_lookahead(inner):
  make_tx, _ = INNERS[inner]
  k, alpha = 3, 0.8
  params0, noise = make_problem(1, num_steps=12)
  ours = run_library(lo.lookahead(make_tx(), k, alpha), params0, noise)

  theirs_tx = optax.lookahead(make_tx(), k, alpha, reset_state=False)

  @jax.jit
  def theirs_step(params, state, noise_t):
    grads = jax.tree.map(lambda n, p: n + LAM * p, noise_t, params.fast)
    updates, state = theirs_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = optax.LookaheadParams.init_synced(
      jax.tree.map(jnp.asarray, params0))
  state = theirs_tx.init(params)
  for t, noise_t in enumerate(noise):
    params, state = theirs_step(params, state, noise_t)
    our_params, our_state = ours[t]
    expected_fast = jax.tree.map(np.float64, params.fast)
    expected_slow = jax.tree.map(np.float64, params.slow)
    assert_trees_close(our_params, expected_fast, rtol=2e-6, atol=1e-6,
                       msg=f"step {t + 1} fast")
    assert_trees_close(lo.slow_params(our_state), expected_slow, rtol=2e-6,
                       atol=1e-6, msg=f"step {t + 1} slow")


# ---------------------------------------------------------------------------
# 3. Hand-worked trajectories: sgd(0.5) on 0.5 * x**2 (grad = x) from x = 4.


def sgd_quadratic(tx, num_steps, x0=4.0, jit=False):
  """The params and slow weights after each step."""
  def step(x, state):
    updates, state = tx.update(x, state, x)
    return optax.apply_updates(x, updates), state
  if jit:
    step = jax.jit(step)
  x = jnp.array(x0, jnp.float32)
  state = tx.init(x)
  xs, slows = [], []
  for _ in range(num_steps):
    x, state = step(x, state)
    xs.append(float(x))
    slows.append(float(lo.slow_params(state)))
  return xs, slows


# The hand-worked cases use alpha = 0.75 or 0.25 (not 0.5, where alpha and
# 1 - alpha agree, so a sync written with 1 - alpha would pass): asymmetric,
# and dyadic, so that every value below is exact in float32.


@pytest.mark.parametrize("jit", [False, True])
def test_hand_worked_k2_alpha_three_quarters(jit):
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.75)
  xs, slows = sgd_quadratic(tx, 6, jit=jit)
  # 4 -> 2 -> (fast 1, slow 4 + 0.75 (1 - 4)) 1.75 -> 0.875 -> (fast
  # 0.4375, slow 1.75 + 0.75 (0.4375 - 1.75)) 0.765625 -> 0.3828125 ->
  # (fast 0.19140625) 0.765625 + 0.75 (0.19140625 - 0.765625) = 0.3349609375.
  assert xs == [2.0, 1.75, 0.875, 0.765625, 0.3828125, 0.3349609375]
  assert slows == [4.0, 1.75, 1.75, 0.765625, 0.765625, 0.3349609375]


def test_hand_worked_k2_alpha_point_three():
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.3)
  xs, slows = sgd_quadratic(tx, 6)
  # 4 -> 2 -> (fast 1) 4 + 0.3 (1 - 4) = 3.1 -> 1.55 -> (fast 0.775)
  # 3.1 + 0.3 (0.775 - 3.1) = 2.4025 -> 1.20125 -> (fast 0.600625)
  # 2.4025 + 0.3 (0.600625 - 2.4025) = 1.8619375 (to float32 rounding).
  np.testing.assert_allclose(xs, [2.0, 3.1, 1.55, 2.4025, 1.20125, 1.8619375],
                             rtol=1e-6)
  np.testing.assert_allclose(slows, [4.0, 3.1, 3.1, 2.4025, 2.4025,
                                     1.8619375], rtol=1e-6)


def test_hand_worked_k1():
  tx = lo.lookahead(optax.sgd(0.5), sync_period=1, slow_step_size=0.25)
  xs, slows = sgd_quadratic(tx, 4)
  # Every step: fast = x / 2, then x <- x + 0.25 (x / 2 - x) = 0.875 x.
  assert xs == [3.5, 3.0625, 2.6796875, 2.3447265625]
  assert slows == xs


def test_hand_worked_alpha_zero_returns_to_x0():
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.0)
  xs, slows = sgd_quadratic(tx, 6)
  assert xs == [2.0, 4.0, 2.0, 4.0, 2.0, 4.0]
  assert slows == [4.0] * 6


def test_hand_worked_alpha_one_is_plain_sgd():
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=1.0)
  xs, slows = sgd_quadratic(tx, 6)
  x, sgd, plain = jnp.array(4.0), optax.sgd(0.5), []
  sgd_state = sgd.init(x)
  for _ in range(6):
    updates, sgd_state = sgd.update(x, sgd_state, x)
    x = optax.apply_updates(x, updates)
    plain.append(float(x))
  assert xs == plain == [2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
  assert slows == [4.0, 1.0, 1.0, 0.25, 0.25, 0.0625]


def test_alpha_one_follows_inner_optimizer():
  params0, noise = make_problem(2)
  got = run_library(lo.lookahead(optax.adam(0.05), 4, 1.0), params0, noise)
  plain = run_library(optax.adam(0.05), params0, noise)
  for (params, _), (plain_params, _) in zip(got, plain):
    chex.assert_trees_all_close(params, plain_params, rtol=1e-6, atol=1e-7)


def test_update_is_a_plain_pytree_update():
  """Drop-in: the update, applied with apply_updates, moves plain params."""
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.75)
  params = {"a": jnp.array([4.0]), "b": jnp.array([-2.0])}
  state = tx.init(params)
  updates, state = tx.update(params, state, params)
  assert_tree_bitwise(
      updates, {"a": jnp.array([-2.0]), "b": jnp.array([1.0])})
  params = optax.apply_updates(params, updates)
  updates, state = tx.update(params, state, params)
  # Fast weights {1, -0.5}; slow {4 + 0.75 (1 - 4), -2 + 0.75 (-0.5 + 2)} =
  # {1.75, -0.875}; update = slow - params = {1.75 - 2, -0.875 + 1}.
  assert_tree_bitwise(
      updates, {"a": jnp.array([-0.25]), "b": jnp.array([0.125])})


# ---------------------------------------------------------------------------
# 4. Bitwise: params == slow weights after every sync.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_params_equal_slow_weights_bitwise_after_sync(dtype):
  """After every sync the params are the slow weights, bit for bit.

  On the default formulation, eagerly. Under jit, the default's program (the
  select's, test_auto_sync_is_select_on_cpu) and every other formulation's,
  with the same body and problem, and how close their runs stay:
  tests/test_formulations.py.
  """
  with x64_if(dtype):
    sync_invariant_run(jnp.dtype(dtype), jit=False, steps=6)


def test_auto_sync_is_select_on_cpu():
  assert jax.default_backend() == "cpu"
  params0, noise = make_problem(4, num_steps=6)
  auto_tx = lo.lookahead(optax.adam(0.05), 3, 0.7)
  select_tx = lo.lookahead(optax.adam(0.05), 3, 0.7, sync="select")
  # "auto" lowers to the very program "select" does, so their runs are
  # bitwise equal on any CPU (two programs could differ in FMAs).
  params = jax.tree.map(jnp.asarray, params0)
  auto_hlo, select_hlo = (
      jax.jit(make_step(tx)).lower(params, tx.init(params), noise[0]).as_text()
      for tx in (auto_tx, select_tx))
  assert auto_hlo == select_hlo
  auto = run_library(auto_tx, params0, noise)
  select = run_library(select_tx, params0, noise)
  assert_tree_bitwise(auto, select)


# ---------------------------------------------------------------------------
# 5. jit: one trace, donation, inject_hyperparams.


def test_one_trace_over_many_steps():
  tx = lo.lookahead(optax.adam(0.05), sync_period=3, slow_step_size=0.5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, noise_t):
    return make_step(tx)(params, state, noise_t)

  params0, noise = make_problem(5, num_steps=12)
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  for noise_t in noise:
    params, state = step(params, state, noise_t)
  assert int(state.step) == 12
  assert_tree_bitwise(params, lo.slow_params(state))
  chex.clear_trace_counter()


def test_donated_params_and_state():
  tx = lo.lookahead(optax.adam(0.05), sync_period=3, slow_step_size=0.5)
  params0, noise = make_problem(6, num_steps=12)
  expected = run_library(tx, params0, noise)

  step = jax.jit(make_step(tx), donate_argnums=(0, 1))
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  # init must not alias the params: the slow weights are fresh buffers.
  for p, s in zip(jax.tree.leaves(params),
                  jax.tree.leaves(state.slow_params)):
    assert p.unsafe_buffer_pointer() != s.unsafe_buffer_pointer()
  first_params = params
  for t, noise_t in enumerate(noise):
    params, state = step(params, state, noise_t)
    assert_tree_bitwise(params, expected[t][0], f"step {t + 1}")
    assert_tree_bitwise(state, expected[t][1], f"step {t + 1}")
  assert all(x.is_deleted() for x in jax.tree.leaves(first_params))


def _adam_fast_weights(params0, noise, num_steps):
  """Plain Adam's params after `num_steps` (before any Lookahead sync)."""
  return run_library(optax.adam(1e-2), params0, noise[:num_steps])[-1][0]


# Two compiled programs (e.g. the injected lookahead, whose alpha or k is read
# from the state, and a plain one with constants) may contract multiply-adds
# into FMAs differently: they agree to a few ulps per step, not bitwise. Each
# step is compared from the same params and state: one Adam step rounds the
# moments, the update and its addition to the params once each, a sync adds
# the blend's subtraction and addition (its products, alpha = 0.25 or 0.5,
# are exact): 4 ulps.
ONE_STEP_ULPS = 4


def test_inject_hyperparams_static_sync_period():
  make = optax.inject_hyperparams(lo.lookahead, static_args=("sync_period",))
  tx = make(optax.adam(1e-2), sync_period=3, slow_step_size=0.5)
  params0, noise = make_problem(7, num_steps=6)
  step = jax.jit(make_step(tx))
  # A lookahead built with alpha = 0.25.
  plain_step = jax.jit(make_step(lo.lookahead(optax.adam(1e-2), 3, 0.25)))
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  for t, noise_t in enumerate(noise[:3]):
    if t == 2:
      # Change alpha at run time, before the first sync.
      state.hyperparams["slow_step_size"] = jnp.asarray(0.25, jnp.float32)
    # The same step as the plain lookahead's, from the same params and state.
    before = (params, state.inner_state)
    expected = plain_step(*before, noise_t)
    params, state = step(params, state, noise_t)
    assert_tree_within_ulps((params, state.inner_state), expected,
                            ONE_STEP_ULPS, "element", before, f"step {t + 1}")
  fast = _adam_fast_weights(params0, noise, 3)
  expected = jax.tree.map(lambda s, f: s + 0.25 * (f - s), params0, fast)
  chex.assert_trees_all_close(lo.slow_params(state), expected, rtol=1e-6,
                              atol=1e-7)
  assert_tree_bitwise(params, lo.slow_params(state))  # one program


def test_inject_hyperparams_traced_sync_period():
  tx = optax.inject_hyperparams(lo.lookahead)(
      optax.adam(1e-2), sync_period=3, slow_step_size=0.5)
  params0, noise = make_problem(8, num_steps=6)
  step = jax.jit(make_step(tx))
  static_step = jax.jit(make_step(lo.lookahead(optax.adam(1e-2), 3, 0.5)))
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  for t, noise_t in enumerate(noise):
    # The static lookahead's step from the same params and state; it syncs
    # on the same steps, 3 and 6.
    before = (params, state.inner_state)
    expected = static_step(*before, noise_t)
    params, state = step(params, state, noise_t)
    assert_tree_within_ulps((params, state.inner_state), expected,
                            ONE_STEP_ULPS, "element", before, f"step {t + 1}")
    if (t + 1) % 3 == 0:
      assert_tree_bitwise(params, lo.slow_params(state), f"step {t + 1}")
  # The whole run against the static one's: their roundings add up over the
  # steps, far below what a sync on another step moves (about 1e-2).
  static = run_library(lo.lookahead(optax.adam(1e-2), 3, 0.5), params0, noise)
  chex.assert_trees_all_close((params, lo.slow_params(state)),
                              (static[-1][0], lo.slow_params(static[-1][1])),
                              rtol=1e-5, atol=1e-6)
  # Change k at run time (no retrace: the same weakly typed int32 as the
  # one inject_hyperparams stored): with k = 2 the 8th step syncs.
  state.hyperparams["sync_period"] = jnp.asarray(2)
  params7, state7 = step(params, state, noise[0])
  assert not np.array_equal(bits(params7["w"]),
                            bits(lo.slow_params(state7)["w"]))
  params8, state8 = step(params7, state7, noise[1])
  assert_tree_bitwise(params8, lo.slow_params(state8))
  assert not np.array_equal(bits(lo.slow_params(state8)["w"]),
                            bits(lo.slow_params(state7)["w"]))


# ---------------------------------------------------------------------------
# 6. slow_step_size as a schedule of the sync count, or as a scalar array.


def test_schedule_is_evaluated_on_the_number_of_syncs():
  # alpha = 0.5 at the 1st sync, 0.25 at the 2nd, 1.0 from the 3rd on.
  schedule = optax.piecewise_constant_schedule(0.5, {1: 0.5, 2: 4.0})
  seen = []

  def recording_schedule(count):
    seen.append(int(count))
    return schedule(count)

  tx = lo.lookahead(optax.sgd(0.5), sync_period=2,
                    slow_step_size=recording_schedule)
  xs, slows = sgd_quadratic(tx, 6)
  # Syncs: 4 + 0.5 (1 - 4) = 2.5; 2.5 + 0.25 (0.625 - 2.5) = 2.03125; then
  # alpha = 1: the fast weights 0.5078125.
  assert xs == [2.0, 2.5, 1.25, 2.03125, 1.015625, 0.5078125]
  assert slows == [4.0, 2.5, 2.5, 2.03125, 2.03125, 0.5078125]
  assert seen == [0, 0, 1, 1, 2, 2]

  jitted, _ = sgd_quadratic(
      lo.lookahead(optax.sgd(0.5), 2, schedule), 6, jit=True)
  assert jitted == xs


@pytest.mark.parametrize("alpha", [jnp.array(0.75), np.float32(0.75),
                                   jnp.array(0.75, jnp.bfloat16)])
def test_slow_step_size_scalar_array(alpha):
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=alpha)
  for jit in (False, True):
    xs, _ = sgd_quadratic(tx, 4, jit=jit)
    assert xs == [2.0, 1.75, 0.875, 0.765625]  # as in the k = 2 case above


# ---------------------------------------------------------------------------
# 7. inner_state policies.


def test_inner_state_reset_keeps_counts():
  lr = optax.linear_schedule(0.1, 0.01, 100)
  b1, b2, eps = 0.9, 0.999, 1e-8
  tx = lo.lookahead(optax.adam(lr, b1=b1, b2=b2, eps=eps), sync_period=3,
                    slow_step_size=0.5, inner_state="reset")
  g = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  params = {"a": jnp.array([0.3, 0.4]), "b": jnp.array(1.0)}
  state = tx.init(params)
  init_dtypes = jax.tree.map(lambda x: x.dtype, state)
  for t in range(1, 4):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    adam_state, schedule_state = state.inner_state
    # Counts go on through the sync: bias correction and schedule continue.
    assert int(adam_state.count) == t
    assert int(schedule_state.count) == t
  # Right after the sync the moments are back to zero.
  chex.assert_trees_all_equal(adam_state.mu, jax.tree.map(jnp.zeros_like, g))
  chex.assert_trees_all_equal(adam_state.nu, jax.tree.map(jnp.zeros_like, g))
  assert jax.tree.map(lambda x: x.dtype, state) == init_dtypes
  # Step 4: fresh moments with bias correction at count 4, lr(3).
  updates, state = tx.update(g, state, params)
  assert int(state.inner_state[0].count) == 4
  assert int(state.inner_state[1].count) == 4
  lr3 = 0.1 + (0.01 - 0.1) * 3 / 100

  def expected_update(g):
    g = np.float64(g)
    m_hat = (1 - b1) * g / (1 - b1**4)
    v_hat = (1 - b2) * g * g / (1 - b2**4)
    return -lr3 * m_hat / (np.sqrt(v_hat) + eps)

  assert_trees_close(updates, jax.tree.map(expected_update, g), rtol=1e-6)


def _momentum_quadratic(inner_state, num_steps=4):
  tx = lo.lookahead(optax.sgd(0.1, momentum=0.9), sync_period=2,
                    slow_step_size=0.8, inner_state=inner_state)
  x = jnp.array(4.0)
  state = tx.init(x)
  out = []
  for _ in range(num_steps):
    updates, state = tx.update(x, state, x)  # grad of 0.5 * x**2
    x = optax.apply_updates(x, updates)
    out.append((float(x), state))
  return out


def test_inner_state_pullback_hand_worked():
  out = _momentum_quadratic("pullback")
  # alpha = 0.8. Step 1: trace = 4, x = 3.6.  Step 2: trace = 3.6 + 0.9 * 4
  # = 7.2, fast = 2.88, slow = 4 + 0.8 (2.88 - 4) = 3.104; the trace is
  # pulled back to c + 0.8 (7.2 - c) with c = 0 (its value at the last
  # sync): 5.76.  Step 3: trace = 3.104 + 0.9 * 5.76 = 8.288, x = 2.2752.
  # Step 4: trace = 2.2752 + 0.9 * 8.288 = 9.7344, fast = 1.30176,
  # slow = 3.104 + 0.8 (1.30176 - 3.104) = 1.662208, trace = 5.76 +
  # 0.8 (9.7344 - 5.76) = 8.93952.
  xs = [x for x, _ in out]
  np.testing.assert_allclose(xs, [3.6, 3.104, 2.2752, 1.662208], rtol=1e-6)
  traces = [float(s.inner_state.inner_state[0].trace) for _, s in out]
  np.testing.assert_allclose(traces, [4.0, 5.76, 8.288, 8.93952], rtol=1e-6)
  synced = [float(s.inner_state.synced_inner_state[0].trace) for _, s in out]
  np.testing.assert_allclose(synced, [0.0, 5.76, 5.76, 8.93952], rtol=1e-6)
  assert isinstance(out[0][1].inner_state, lo.PullbackState)


def test_inner_state_keep_hand_worked():
  out = _momentum_quadratic("keep")
  # As above but the trace is untouched by the sync: step 3 trace =
  # 3.104 + 0.9 * 7.2 = 9.584, x = 2.1456; step 4 trace = 2.1456 + 0.9 *
  # 9.584 = 10.7712, fast = 1.06848, slow = 3.104 + 0.8 (1.06848 - 3.104) =
  # 1.475584.
  xs = [x for x, _ in out]
  np.testing.assert_allclose(xs, [3.6, 3.104, 2.1456, 1.475584], rtol=1e-6)
  traces = [float(s.inner_state[0].trace) for _, s in out]
  np.testing.assert_allclose(traces, [4.0, 7.2, 9.584, 10.7712], rtol=1e-6)


# ---------------------------------------------------------------------------
# 8. Extra arguments reach the inner optimizer.


def _scaled_sgd():
  """An inner transformation that consumes an extra keyword argument."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, scale, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda g: -scale * g, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@pytest.mark.parametrize("jit", [False, True])
def test_extra_args_are_passed_to_inner(jit):
  tx = lo.lookahead(_scaled_sgd(), sync_period=2, slow_step_size=0.75)

  def step(x, state, scale):
    updates, state = tx.update(x, state, x, scale=scale, unused=1)
    return optax.apply_updates(x, updates), state

  if jit:
    step = jax.jit(step)
  x = jnp.array([4.0])
  state = tx.init(x)
  x, state = step(x, state, 0.25)   # 4 - 0.25 * 4 = 3
  assert float(x[0]) == 3.0
  x, state = step(x, state, 0.5)    # fast 1.5, slow 4 + 0.75 (1.5 - 4)
  assert float(x[0]) == 2.125


def test_extra_args_ignored_by_plain_inner():
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2)
  x = jnp.array([4.0])
  updates, _ = tx.update(x, tx.init(x), x, loss=jnp.array(1.0))
  assert float(updates[0]) == -2.0


# ---------------------------------------------------------------------------
# 9. Error paths.

ALPHA_EXPECTED = re.escape(
    "`slow_step_size` must be a float in [0, 1], a scalar array or a "
    "schedule (a callable of the sync count), got ")


@pytest.mark.parametrize("value,error,shown", [
    (0, ValueError, "0"),
    (-1, ValueError, "-1"),
    (2.5, TypeError, "2.5"),
    ("5", TypeError, "'5'"),
    (True, TypeError, "True"),
])
def test_bad_sync_period(value, error, shown):
  with pytest.raises(error, match=re.escape(
      f"`sync_period` must be an integer >= 1, got {shown}.")):
    lo.lookahead(optax.sgd(0.1), sync_period=value)


@pytest.mark.parametrize("value", [2**31, np.int64(2**40), 10**30])
def test_sync_period_beyond_int32_is_rejected(value):
  # The step counter is an int32: a larger k would overflow at `update`.
  with pytest.raises(ValueError, match=re.escape(
      "`sync_period` must be an integer <= 2147483647 (the step counter is "
      f"an int32), got {int(value)}.")):
    lo.lookahead(optax.sgd(0.1), sync_period=value)


@pytest.mark.parametrize("jit", [False, True])
def test_sync_period_int32_max_is_accepted(jit):
  tx = lo.lookahead(optax.sgd(0.5), sync_period=2**31 - 1)
  update = jax.jit(tx.update) if jit else tx.update
  x = jnp.array([4.0])
  updates, state = update(x, tx.init(x), x)
  assert float(updates[0]) == -2.0 and int(state.step) == 1


@pytest.mark.parametrize("value,error,shown", [
    (-0.1, ValueError, "-0.1"),
    (1.5, ValueError, "1.5"),
    (math.nan, ValueError, "nan"),
    ("0.5", TypeError, "'0.5'"),
])
def test_bad_slow_step_size(value, error, shown):
  with pytest.raises(error, match=ALPHA_EXPECTED + re.escape(f"{shown}.")):
    lo.lookahead(optax.sgd(0.1), slow_step_size=value)


@pytest.mark.parametrize("inner", [optax.adam, 3, None])
def test_inner_not_a_transformation(inner):
  with pytest.raises(TypeError, match=re.escape(
      "`inner` must be an optax GradientTransformation (an object with "
      f"`init` and `update`), got {inner!r}.")):
    lo.lookahead(inner)


def test_inner_multisteps_rejected():
  with pytest.raises(ValueError, match=re.escape(
      "`inner` must not be an optax.MultiSteps: lookahead would count "
      "micro-steps.")):
    lo.lookahead(optax.MultiSteps(optax.sgd(0.1), 2))


@pytest.mark.parametrize("name,choices", [
    ("inner_state", "'keep', 'reset', 'pullback'"),
    ("sync", "'auto', 'select', 'cond', 'loop'"),
    ("on_nonfinite", "'propagate', 'rollback'"),
])
def test_bad_string_options(name, choices):
  with pytest.raises(ValueError, match=re.escape(
      f"`{name}` must be one of {choices}, got 'sometimes'.")):
    lo.lookahead(optax.sgd(0.1), **{name: "sometimes"})


def test_update_without_params():
  tx = lo.lookahead(optax.sgd(0.1))
  state = tx.init(jnp.ones(2))
  with pytest.raises(ValueError, match=re.escape(
      "`params` is required: lookahead's update needs the current params")):
    tx.update(jnp.ones(2), state)


def test_update_with_params_of_another_shape():
  tx = lo.lookahead(optax.sgd(0.1))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=re.escape(
      "`params` leaf ['w'] has shape (3,), expected (2,) as in the slow "
      "params.")):
    tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})


# ---------------------------------------------------------------------------
# 10. Nested lookahead.


def test_nested_lookahead():
  inner = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.75)
  tx = lo.lookahead(inner, sync_period=3, slow_step_size=0.25)
  xs, slows = sgd_quadratic(tx, 6)
  # Inner syncs (alpha 0.75) on steps 2, 4, 6; outer (alpha 0.25) on 3, 6.
  # Step 2: inner slow 4 + 0.75 (1 - 4) = 1.75. Step 3: fast 0.875, outer
  # slow 4 + 0.25 (0.875 - 4) = 3.21875. Step 4: fast 1.609375, inner slow
  # 1.75 + 0.75 (1.609375 - 1.75) = 1.64453125. Step 5: 0.822265625.
  # Step 6: fast 0.4111328125, inner slow 1.64453125 + 0.75 (0.4111328125 -
  # 1.64453125) = 0.719482421875, outer slow 3.21875 + 0.25 (0.719482421875
  # - 3.21875) = 2.59393310546875.
  assert xs == [2.0, 1.75, 3.21875, 1.64453125, 0.822265625,
                2.59393310546875]
  assert slows == [4.0, 4.0, 3.21875, 3.21875, 3.21875, 2.59393310546875]
  state = tx.init(jnp.array(4.0))
  assert isinstance(state.inner_state, lo.LookaheadState)
