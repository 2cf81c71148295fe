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
from tests._helpers import assert_bitwise
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_tree_within_ulps
from tests._helpers import ulp

SNOO = optax.sgd(0.68, momentum=0.37, nesterov=True)
CONFIGS = {
    "reset": dict(inner_state="reset", slow_step_size=0.3),
    "pullback": dict(inner_state="pullback", slow_step_size=0.8),
    "rollback": dict(on_nonfinite="rollback", slow_step_size=0.3),
    "snoo": dict(outer=SNOO),
    "snoo-reset-rollback": dict(outer=SNOO, inner_state="reset",
                                on_nonfinite="rollback"),
    "pullback-rollback": dict(inner_state="pullback", on_nonfinite="rollback",
                              slow_step_size=0.3),
}
K, STEPS, BAD_STEP = 3, 9, 5  # step 6 (index 5) is a sync slot with a NaN
SYNCS = ("loop", "select", "cond")


def _weights_scale(params):
  return max(float(np.max(np.abs(np.asarray(x, np.float64))))
             for x in jax.tree.leaves(params))


def _assert_step_within_ulps(actual, expected, before, n, msg):
  """One step's (params, state) of two formulations from the same `before`.

  The params, slow weights and outer state at the weights' scale (the outer
  step sees `slow - fast`, a difference of weights), each inner state element
  at its own or its value before the step.
  """
  (p_a, s_a), (p_e, s_e) = actual, expected
  weights = _weights_scale((p_e, s_e.slow_params))
  assert_tree_within_ulps(p_a, p_e, n, "leaf", weights, f"{msg} params")
  assert_tree_within_ulps(s_a.slow_params, s_e.slow_params, n, "leaf", weights,
                          f"{msg} slow")
  assert_tree_within_ulps(s_a.outer_state, s_e.outer_state, n, "leaf", weights,
                          f"{msg} outer state")
  assert_tree_within_ulps(s_a.inner_state, s_e.inner_state, n,
                          "leaf", before[1].inner_state, f"{msg} inner state")
  assert_bitwise(s_a.step, s_e.step, f"{msg} step")


def _problem(kwargs):
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                              jnp.float32), params)
           for _ in range(STEPS)]
  if kwargs.get("on_nonfinite") == "rollback":
    grads[BAD_STEP] = {"a": grads[BAD_STEP]["a"].at[0, 0].set(jnp.nan),
                       "b": grads[BAD_STEP]["b"]}
  return params, grads


def _tx(kwargs, sync):
  return lo.lookahead(optax.adam(0.1), K, sync=sync, **kwargs)


def _step(kwargs, sync):
  tx = _tx(kwargs, sync)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1))


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _check_own_invariants(kwargs, t, p, s, msg):
  """Within one program: what a sync, a reset and a rollback promise bitwise."""
  if (t + 1) % K == 0 and t != BAD_STEP:
    assert_tree_bitwise(p, lo.slow_params(s), f"{msg} step {t + 1}")
    if kwargs.get("inner_state") == "reset":
      for leaf in jax.tree.leaves(s.inner_state[0].mu):
        assert_bitwise(leaf, np.zeros_like(leaf), f"{msg} reset")
  if t == BAD_STEP and kwargs.get("on_nonfinite") == "rollback":
    # Rolled back onto the slow weights, which the bad step left alone.
    assert_tree_bitwise(p, lo.slow_params(s), f"{msg} rollback")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loop_agrees_with_select_and_cond(name):
  kwargs = CONFIGS[name]
  params, grads = _problem(kwargs)
  steps = {sync: _step(kwargs, sync) for sync in SYNCS}
  runs = {sync: (_copy(params), _tx(kwargs, sync).init(_copy(params)))
          for sync in SYNCS}
  for t, g in enumerate(grads):
    # `select` and `cond` take one step from the loop run's params and state
    # (copies: the steps donate them).
    before = jax.device_get(runs["loop"])
    same = {other: jax.device_get(steps[other](*_copy(runs["loop"]), g))
            for other in ("select", "cond")}
    runs = {sync: steps[sync](*runs[sync], g) for sync in SYNCS}
    want = jax.device_get(runs["loop"])
    for other in ("select", "cond"):
      # n = 2: a step is a few roundings of elementwise arithmetic. With one
      # side compiled without FMA (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2) and
      # the other with it they differed by at most 1 ulp at these scales
      # (the runs below, by up to 176 ulps of a cancelling element's own).
      _assert_step_within_ulps(same[other], want, before, 2,
                               f"{name} {other} step {t + 1}")
    for sync, (p, s) in runs.items():
      _check_own_invariants(kwargs, t, *jax.device_get((p, s)),
                            f"{name} {sync}")
    # Each formulation's own run: the per-step roundings add up to 4.8e-7 at
    # most over the 9 steps (measured); one Adam step here is ~0.1 and the
    # syncs move the weights by ~0.1 too, so a wrong sync stands out.
    for other in ("select", "cond"):
      for a, b in zip(jax.tree.leaves(want),
                      jax.tree.leaves(jax.device_get(runs[other]))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5,
                                   err_msg=f"{name} {other} step {t + 1}")


def _auto(**kw):
  from lookahead_optax import _formulation  # pylint: disable=g-import-not-at-top
  return _formulation.resolve("auto", axis_name=kw.get("axis_name"),
                              default_options=not kw)


def test_auto_picks_per_option_on_a_multi_device_cpu():
  assert _auto() == "select"
  # conftest gives 8 host devices: no loop (its ordering read of the new
  # params would be an all-reduce for sharded params).
  assert jax.device_count() == 8
  for kw in (dict(inner_state="reset"), dict(inner_state="pullback"),
             dict(on_nonfinite="rollback"), dict(outer=SNOO)):
    assert _auto(**kw) == "select", kw
  assert _auto(outer=SNOO, axis_name="data") == "cond"


def test_auto_never_picks_the_cpu_loop_off_cpu(monkeypatch):
  from lookahead_optax import _formulation  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_formulation.jax, "device_count", lambda: 1)
  assert _auto(inner_state="reset") == "loop"
  monkeypatch.setattr(_formulation.jax, "default_backend", lambda: "gpu")
  for kw in (dict(inner_state="reset"), dict(on_nonfinite="rollback"),
             dict(outer=SNOO)):
    assert _auto(**kw) == "select", kw
  assert _auto() == "select"
  assert _auto(outer=SNOO, axis_name="data") == "cond"


def test_loop_with_axis_name_raises():
  with pytest.raises(ValueError, match="`sync='loop'` cannot combine"):
    lo.lookahead(optax.sgd(0.1), 3, sync="loop", axis_name="data")


def test_auto_picks_loop_on_a_single_cpu_device():
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  script = (
      "from lookahead_optax import _formulation as f\n"
      "print(f.resolve('auto', axis_name=None, default_options=False),"
      " f.resolve('auto', axis_name=None, default_options=True))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, env=env, timeout=120, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.split() == ["loop", "select"]


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
