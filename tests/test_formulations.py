"""The sync formulations agree: `loop` (in-place loops for the policies and
the outer step, what `auto` picks on a single-device CPU), `select` and `cond`,
under jit with donation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_tree_bitwise

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


def _trajectory(kwargs, sync):
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                              jnp.float32), params)
           for _ in range(STEPS)]
  if kwargs.get("on_nonfinite") == "rollback":
    grads[BAD_STEP] = {"a": grads[BAD_STEP]["a"].at[0, 0].set(jnp.nan),
                       "b": grads[BAD_STEP]["b"]}
  tx = lo.lookahead(optax.adam(0.1), K, sync=sync, **kwargs)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  p = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  s = tx.init(p)
  out = []
  for g in grads:
    p, s = step(p, s, g)
    out.append(jax.device_get((p, s)))
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loop_agrees_with_select_and_cond(name):
  kwargs = CONFIGS[name]
  runs = {sync: _trajectory(kwargs, sync) for sync in ("loop", "select",
                                                       "cond")}
  for t, (p, s) in enumerate(runs["loop"]):
    if (t + 1) % K == 0 and t != BAD_STEP:
      assert_tree_bitwise(p, lo.slow_params(s), f"{name} step {t + 1}")
      if kwargs.get("inner_state") == "reset":
        for leaf in jax.tree.leaves(s.inner_state[0].mu):
          np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    if t == BAD_STEP and kwargs.get("on_nonfinite") == "rollback":
      # Rolled back onto the slow weights, which the bad step left alone.
      assert_tree_bitwise(p, lo.slow_params(s), f"{name} rollback")
    for other in ("select", "cond"):
      for a, b in zip(jax.tree.leaves((p, s)),
                      jax.tree.leaves(runs[other][t])):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-7,
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
                                       ("rollback", 0.3)])
def test_loop_keeps_no_update_sized_temporary(name, most):
  # XLA:CPU allocates a step's temporaries afresh (page faults) at every
  # call: the loop's policies work in place, and rollback's check fuses the
  # inner update into its reduction (a mask of one byte a weight, not the
  # inner updates of every leaf, 1.25x the params, as it once kept).
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
