"""Property-based tests of `lookahead` (hypothesis) and a long-run drift test.

Over random small pytrees, dtypes (float32, bfloat16, float64), sync periods
k in 1..8, slow step sizes alpha in [0, 1], several inner optimizers, every
inner-state policy (keep, reset, pullback) and both non-finite policies
(propagate, rollback), on the default sync formulation (every formulation
keeps the same promises: tests/test_formulations.py):

* after each sync the params equal the slow weights bitwise (under
  `jax.jit`; eagerly in tests/test_lookahead.py);
* alpha = 1 gives the inner optimizer's trajectory bitwise when run eagerly
  (with `inner_state="keep"`, the policy that leaves the inner state alone);
  under jit each step matches the inner optimizer's step to a few ulps (XLA
  contracts multiply-adds into FMAs differently in different programs);
* alpha = 0 returns to the initial params at every sync (bitwise where the
  fast weights stayed within a factor 2 of them, else to one rounding);
* the slow weights are the exponential moving average of the end-of-cycle
  fast weights (checked against a float64 NumPy EMA, to rounding).

The properties run under `jax.jit`, one program an example (a whole step,
compiled once, costs less than compiling its every primitive eagerly); the
promise about eager execution (alpha = 1 is the inner optimizer bitwise) runs
eagerly.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bf16_lands_on_slow_weights
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_tree_within_ulps
from tests._helpers import jitted_step
from tests._helpers import trajectory
from tests._helpers import ulp as _ulp
from tests._helpers import x64_if

hypothesis.settings.register_profile(
    "lookahead_optax", deadline=None, max_examples=20, derandomize=True,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
SETTINGS = hypothesis.settings.get_profile("lookahead_optax")
# Costlier examples (jitted: a compilation each; a NaN step): fewer of them.
FEW_SETTINGS = hypothesis.settings(SETTINGS, max_examples=8)

POLICIES = ("keep", "reset", "pullback")
NONFINITE = ("propagate", "rollback")

DTYPES = ("float32", "bfloat16", "float64")
INNERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.1),
    "rmsprop": lambda: optax.rmsprop(0.05),
    "adamw_schedule": lambda: optax.adamw(
        optax.linear_schedule(0.1, 0.01, 20), weight_decay=0.1),
}
SHAPES = ((), (1,), (3,), (2, 3))


OUTERS = {
    "sgd": lambda: optax.sgd(0.6),
    "nesterov": lambda: optax.sgd(0.7, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(0.05),
}


@st.composite
def problems(draw, alpha=None, inner_state=None, outer=False):
  """A random problem: tree, dtype, k, alpha, inner, modes, seed, cycles.

  With `outer`, an outer transformation (or None) is drawn too; with one,
  `alpha` is unused and the policy is "keep" or "reset" (pullback needs
  `alpha`).
  """
  n_leaves = draw(st.integers(1, 3))
  shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n_leaves)]
  container = draw(st.sampled_from(("dict", "list", "nested")))
  if container == "dict":
    shape_tree = {f"p{i}": s for i, s in enumerate(shapes)}
  elif container == "list":
    shape_tree = list(shapes)
  else:
    shape_tree = {"a": shapes[:1], "b": {"c": tuple(shapes[1:])}}
  return dict(
      shape_tree=shape_tree,
      dtype=draw(st.sampled_from(DTYPES)),
      k=draw(st.integers(1, 8)),
      alpha=draw(st.floats(0.0, 1.0)) if alpha is None else alpha,
      inner=draw(st.sampled_from(sorted(INNERS))),
      seed=draw(st.integers(0, 2**16)),
      cycles=draw(st.integers(1, 3)),
      inner_state=(draw(st.sampled_from(POLICIES)) if inner_state is None
                   else inner_state),
      on_nonfinite=draw(st.sampled_from(NONFINITE)),
      outer=draw(st.sampled_from((None,) + tuple(sorted(OUTERS))))
      if outer else None,
  )


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _arrays(rng, shape_tree, dtype, scale=1.0):
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.normal(size=s), dtype),
      shape_tree, is_leaf=_is_shape)


def _make_tx(problem, alpha=None):
  if problem.get("outer") is not None:
    inner_state = "reset" if problem["inner_state"] == "reset" else "keep"
    return _lookahead(problem["inner"], problem["k"], None, inner_state,
                      problem["on_nonfinite"], problem["outer"])
  return _lookahead(problem["inner"], problem["k"],
                    problem["alpha"] if alpha is None else alpha,
                    problem["inner_state"], problem["on_nonfinite"], None)


# One `tx` per configuration: examples that differ only in their data (seed,
# cycles, tree) share its jitted step (`jitted_step`, one compilation per
# shapes and dtype), as do the examples' inner steps below.
@functools.lru_cache(maxsize=None)
def _lookahead(inner, k, alpha, inner_state, on_nonfinite, outer):
  if outer is not None:
    return lo.lookahead(INNERS[inner](), k, outer=OUTERS[outer](),
                        inner_state=inner_state, on_nonfinite=on_nonfinite)
  return lo.lookahead(INNERS[inner](), k, alpha, inner_state=inner_state,
                      on_nonfinite=on_nonfinite)


@functools.lru_cache(maxsize=None)
def _outer_sgd_lookahead(inner, k, a, inner_state):
  return lo.lookahead(INNERS[inner](), k, outer=optax.sgd(a),
                      inner_state=inner_state)


@functools.lru_cache(maxsize=None)
def _jitted_inner_step(inner):
  inner = INNERS[inner]()

  @jax.jit
  def inner_step(g, inner_state, params):
    updates, inner_state = inner.update(g, inner_state, params)
    return optax.apply_updates(params, updates), inner_state

  return inner_step


def _trajectory(problem, alpha=None, tx=None, jit=True):
  """Runs lookahead; returns params, states and grads of every step."""
  rng = np.random.default_rng(problem["seed"])
  params = _arrays(rng, problem["shape_tree"], problem["dtype"])
  n_steps = problem["k"] * problem["cycles"]
  grads = [_arrays(rng, problem["shape_tree"], problem["dtype"])
           for _ in range(n_steps)]
  if tx is None:
    tx = _make_tx(problem, alpha)
  history = trajectory(tx, params, grads, jit=jit)
  return ([params] + [p for p, _ in history],
          [tx.init(params)] + [s for _, s in history], grads)


@FEW_SETTINGS
@hypothesis.given(problems(outer=True), st.data())
def test_rollback_returns_to_slow_weights_on_a_nonfinite_step(problem, data):
  # A NaN in one gradient element at a random step (a sync step or not):
  # that step lands the params on the slow weights bitwise and moves no slow
  # weight; the invariant holds at every sync; nothing non-finite remains.
  problem = dict(problem, on_nonfinite="rollback")
  n_steps = problem["k"] * problem["cycles"]
  bad = data.draw(st.integers(0, n_steps - 1), label="nan step")
  with x64_if(problem["dtype"]):
    rng = np.random.default_rng(problem["seed"])
    params = _arrays(rng, problem["shape_tree"], problem["dtype"])
    grads = [_arrays(rng, problem["shape_tree"], problem["dtype"])
             for _ in range(n_steps)]
    leaves, treedef = jax.tree.flatten(grads[bad])
    leaves[0] = jnp.full_like(leaves[0], jnp.nan)
    grads[bad] = jax.tree.unflatten(treedef, leaves)
    tx = _make_tx(problem)
    step = jitted_step(tx)
    state = tx.init(params)
    k = problem["k"]
    for t, g in enumerate(grads, start=1):
      before, fast_before = lo.slow_params(state), params
      params, state = step(params, state, g)
      if t == bad + 1:
        # Back on the slow weights bitwise; the slow weights moved at most
        # by the rounding of `p + (slow - p)` (one ulp at the scale of the
        # larger of the two), and only where that addition is not exact.
        assert_tree_bitwise(params, lo.slow_params(state))
        for new, old, p in zip(jax.tree.leaves(lo.slow_params(state)),
                               jax.tree.leaves(before),
                               jax.tree.leaves(fast_before)):
          new, old, p = (np.asarray(x, np.float64) for x in (new, old, p))
          scale = _ulp(np.maximum(np.abs(old), np.abs(p)), problem["dtype"])
          assert (np.abs(new - old) <= 2 * scale).all()
          # Sterbenz: within a factor of two the landing is exact.
          exact = (p * old > 0) & (np.abs(p) >= np.abs(old) / 2) & (
              np.abs(p) <= 2 * np.abs(old))
          np.testing.assert_array_equal(new[exact], old[exact])
      elif t % k == 0:
        assert_tree_bitwise(lo.slow_params(state), params)
      assert all(np.isfinite(np.asarray(x, np.float64)).all()
                 for x in jax.tree.leaves((params, state)))


def _live_inner(state):
  """The inner optimizer's current state inside a LookaheadState."""
  inner = state.inner_state
  return inner.inner_state if isinstance(inner, lo.PullbackState) else inner


@SETTINGS
@hypothesis.given(problems(outer=True))
def test_params_equal_slow_weights_after_each_sync_jit(problem):
  with x64_if(problem["dtype"]):
    params_seq, states, _ = _trajectory(problem)
    k = problem["k"]
    for t in range(k, len(params_seq), k):
      assert_tree_bitwise(lo.slow_params(states[t]), params_seq[t])
      # Between syncs the slow weights do not move.
      for u in range(t - k + 1, t):
        assert_tree_bitwise(lo.slow_params(states[u]),
                            lo.slow_params(states[t - k]))



@SETTINGS
@hypothesis.given(problems(alpha=1.0, inner_state="keep"))
def test_alpha_one_equals_inner_optimizer(problem):
  # Eagerly, bitwise: the whole trajectory and the inner state.
  with x64_if(problem["dtype"]):
    params_seq, states, grads = _trajectory(problem, jit=False)
    inner = INNERS[problem["inner"]]()
    params = params_seq[0]
    inner_state = inner.init(params)
    for t, g in enumerate(grads, start=1):
      updates, inner_state = inner.update(g, inner_state, params)
      params = optax.apply_updates(params, updates)
      assert_tree_bitwise(params_seq[t], params)
      assert_tree_bitwise(states[t].inner_state, inner_state)


@FEW_SETTINGS
@hypothesis.given(problems(alpha=1.0, inner_state="keep"))
def test_alpha_one_equals_inner_optimizer_jit_to_ulps(problem):
  # Under jit, XLA fuses the lookahead step and the plain inner step into
  # different programs and may contract a multiply-add into an FMA in one and
  # not the other: each step (from the same params and inner state) agrees
  # to a few ulps, not bitwise, at the scale of the step's operands (where
  # `p + u` cancels, one rounding of them is many ulps of the result). One
  # step at a time, so errors do not compound.
  with x64_if(problem["dtype"]):
    params_seq, states, grads = _trajectory(problem)
    inner_step = _jitted_inner_step(problem["inner"])
    for t, g in enumerate(grads, start=1):
      params, inner_state = inner_step(g, states[t - 1].inner_state,
                                       params_seq[t - 1])
      assert_tree_within_ulps(
          (params_seq[t], states[t].inner_state), (params, inner_state), 4,
          "element", (params_seq[t - 1], states[t - 1].inner_state),
          f"step {t}")


@SETTINGS
@hypothesis.given(problems(alpha=0.0))
def test_alpha_zero_returns_to_initial_params_at_every_sync(problem):
  # The sync target is the previous slow weights exactly; the params reach it
  # with one additive update `fl(slow - p)`. That lands exactly whenever the
  # subtraction is exact (Sterbenz: p and slow of one sign, within a factor
  # 2 of each other); otherwise the params, and the slow weights that must
  # equal them, land within one rounding of the target (an update cannot
  # always reach it: from p = 1, no float32 u gives fl(1 + u) = 1e-9).
  with x64_if(problem["dtype"]):
    params_seq, states, _ = _trajectory(problem)
    k = problem["k"]
    for t in range(k, len(params_seq), k):
      slow = jax.tree.leaves(lo.slow_params(states[t]))
      assert_tree_bitwise(slow, jax.tree.leaves(params_seq[t]))
      prev = jax.tree.leaves(lo.slow_params(states[t - k]))
      before = jax.tree.leaves(params_seq[t - 1])
      for s, s_prev, p in zip(slow, prev, before):
        s, s_prev, p = (np.asarray(x, np.float64) for x in (s, s_prev, p))
        exact = (s_prev / 2 <= p) & (p <= 2 * s_prev) | (
            (s_prev / 2 >= p) & (p >= 2 * s_prev))
        np.testing.assert_array_equal(s[exact], s_prev[exact])
        # fl(s_prev - p) and fl(p + update): two roundings at most.
        bound = 2 * _ulp(np.maximum(np.abs(p), np.abs(s_prev)),
                         problem["dtype"])
        assert (np.abs(s - s_prev) <= bound).all()


@SETTINGS
@hypothesis.given(problems())
def test_slow_weights_are_ema_of_end_of_cycle_fast_weights(problem):
  # Eagerly: the float64 reference takes the inner step eagerly, and under
  # jit a float64 run with the adamw schedule was 1e-7 (relative) off it.
  with x64_if(problem["dtype"]):
    params_seq, states, grads = _trajectory(problem, jit=False)
    k, alpha = problem["k"], problem["alpha"]
    inner = INNERS[problem["inner"]]()
    # The end-of-cycle fast weights: the inner step from the params before
    # each sync step, with the inner state held there.
    ema = [np.asarray(x, np.float64) for x in jax.tree.leaves(params_seq[0])]
    n_syncs = 0
    for t in range(k, len(params_seq), k):
      updates, _ = inner.update(grads[t - 1], _live_inner(states[t - 1]),
                                params_seq[t - 1])
      fast = optax.apply_updates(params_seq[t - 1], updates)
      ema = [e + alpha * (np.asarray(f, np.float64) - e)
             for e, f in zip(ema, jax.tree.leaves(fast))]
      n_syncs += 1
      slow = jax.tree.leaves(lo.slow_params(states[t]))
      eps = float(jnp.finfo(problem["dtype"]).eps)
      for s, e in zip(slow, ema):
        # Each sync rounds once (the blend and the landing on the params);
        # the fast weights themselves round once per inner step.
        tol = 4 * (n_syncs + 1) * eps * (1.0 + np.abs(e).max(initial=0.0))
        np.testing.assert_allclose(np.asarray(s, np.float64), e, rtol=0,
                                   atol=tol)


# ---------------------------------------------------------------------------
# Jitted, low precision: no excess precision may break the invariant.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("slow_dtype", (None, jnp.float32))
def test_bf16_invariant_under_jit_fused_and_separate(slow_dtype):
  # Weights spread over 8 orders of magnitude and a large learning rate, so
  # that syncs move some weights by large factors. The update is applied
  # both inside the jitted step (where XLA may keep excess precision) and
  # outside it; both must land on the slow weights bitwise.
  assert_bf16_lands_on_slow_weights(
      lo.lookahead(optax.adam(0.5), 3, 0.37, slow_dtype=slow_dtype), 3)


# ---------------------------------------------------------------------------
# Long runs: no drift between the invariant and the state.
# ---------------------------------------------------------------------------


def _long_runs(n_steps, configs, n=64, k=5):
  """Scans `n_steps` jitted steps of each `(dtype, slow_dtype, sync)` run.

  The runs are independent (each its own `tx`, params and state) but share
  one compiled scan and each step's noise, drawn once for all of them. Each
  returns `(params, state, mismatches, target)`, `mismatches` the number of
  sync steps where the params differ from the slow weights.
  """
  key = jax.random.PRNGKey(0)
  target = jax.random.normal(key, (n,))
  txs = []
  for dtype, slow_dtype, sync in configs:
    # adam's default eps (1e-8) underflows in float16 and its moments give
    # NaN.
    eps = 1e-3 if dtype == jnp.float16 else 1e-8
    txs.append(lo.lookahead(optax.adam(1e-2, eps=eps), k, 0.5, sync=sync,
                            slow_dtype=slow_dtype))

  def step(carry, t):
    noise = jax.random.normal(jax.random.fold_in(key, t), (n,))
    out = []
    for tx, (dtype, _, _), (p, state, mismatches) in zip(txs, configs, carry):
      uint = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
      g = (p.astype(jnp.float32) - target + 0.1 * noise).astype(dtype)
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
      slow = state.slow_params.astype(dtype)
      differ = jnp.any(jax.lax.bitcast_convert_type(slow, uint)
                       != jax.lax.bitcast_convert_type(p, uint))
      mismatches += jnp.where(state.step % k == 0, differ, False)
      out.append((p, state, mismatches))
    return tuple(out), None

  init = tuple((jnp.zeros(n, dtype), tx.init(jnp.zeros(n, dtype)),
                jnp.zeros([], jnp.int32))
               for tx, (dtype, _, _) in zip(txs, configs))
  run = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(n_steps))[0])
  return [(p, state, int(mismatches), target)
          for p, state, mismatches in run(init)]


def _long_run(n_steps, dtype, slow_dtype, n=64, k=5, sync="auto"):
  """One run of `_long_runs`."""
  [run] = _long_runs(n_steps, [(dtype, slow_dtype, sync)], n=n, k=k)
  return run


def test_long_run_5000_steps_no_drift():
  p, state, mismatches, target = _long_run(5000, jnp.float32, None)
  assert mismatches == 0
  assert int(state.step) == 5000
  assert_tree_bitwise(lo.eval_params(state, p), p)  # 5000 is a sync step.
  np.testing.assert_allclose(p, target, atol=0.05)


# The precisions of the 50000-step runs: (params dtype, slow_dtype).
LONG_RUN_PRECISIONS = ((jnp.float32, None), (jnp.bfloat16, None),
                       (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32))


def check_long_runs_50000_steps(sync):
  """The 50000-step runs of every precision under `sync`, in one program."""
  runs = _long_runs(50_000, [(dtype, slow_dtype, sync) for dtype, slow_dtype
                             in LONG_RUN_PRECISIONS], n=1024)
  for (dtype, slow_dtype), (p, state, mismatches, target) in zip(
      LONG_RUN_PRECISIONS, runs):
    msg = f"{jnp.dtype(dtype).name} slow_dtype={slow_dtype} sync={sync}"
    assert mismatches == 0, msg
    assert int(state.step) == 50_000, msg
    assert_tree_bitwise(lo.eval_params(state, p), p, msg)
    # Low-precision fast weights stall near the optimum (adam's steps fall
    # below half an ulp), so only check that training got most of the way.
    error = np.abs(np.asarray(p, np.float32) - np.asarray(target))
    assert error.mean() < 0.2 * np.abs(np.asarray(target)).mean(), msg


@pytest.mark.slow
def test_long_run_50000_steps_no_drift():
  # Every precision in one scanned program (one compilation; once parametrized
  # by precision, four programs).
  check_long_runs_50000_steps("auto")


@SETTINGS
@hypothesis.given(problems(), st.floats(0.05, 1.0))
def test_outer_sgd_equals_the_interpolation(problem, a):
  # `outer=optax.sgd(a)` is `slow_step_size=a` up to rounding: the outer
  # step moves the slow weights by -a (slow - fast) instead of blending.
  policy = "keep" if problem["inner_state"] == "pullback" else (
      problem["inner_state"])
  problem = dict(problem, inner_state=policy, on_nonfinite="propagate")
  with x64_if(problem["dtype"]):
    blended, _, _ = _trajectory(problem, alpha=a)
    outer = _outer_sgd_lookahead(problem["inner"], problem["k"], a, policy)
    stepped, _, _ = _trajectory(problem, tx=outer)
    eps = float(jnp.finfo(problem["dtype"]).eps)
    for t in range(len(blended)):
      syncs = t // problem["k"]
      for x, y in zip(jax.tree.leaves(stepped[t]), jax.tree.leaves(blended[t])):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        # Each sync rounds a few times in either form; the inner steps after
        # it carry the difference along (Lipschitz, small steps here).
        tol = 8 * (syncs + 1) * eps * (1.0 + np.abs(y).max(initial=0.0)) * (
            1 + t)
        np.testing.assert_allclose(x, y, rtol=0, atol=tol,
                                   err_msg=f"step {t}")
