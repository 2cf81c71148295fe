"""Checkpoints: exact resume in a fresh process, structure checks, migration.

The lookahead state is a plain pytree of arrays, so orbax-checkpoint saves
and restores it as it is. A run interrupted mid-cycle and resumed in another
Python process must follow the uninterrupted trajectory bitwise, for the
default, `inner_state="pullback"`, `lazy` and mesh-sharded states.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bitwise
from tests._helpers import assert_tree_within_ulps

HERE = pathlib.Path(__file__).resolve().parent
WORKER_PATH = HERE / "checkpoint_worker.py"
TIMEOUT_S = 240


def _load_worker():
  spec = importlib.util.spec_from_file_location(
      "checkpoint_worker", WORKER_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()


def _available_cases():
  cases = list(worker.CASES)
  if not hasattr(lo, "lazy"):
    cases.remove("lazy")
  if jax.device_count() < 8:
    cases.remove("sharded")
  return cases


def _save(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Per case: the state saved mid-run, the uninterrupted end, the resumed end.

  All cases resume in one subprocess, to pay for one Python start.
  """
  ckpt_dir = tmp_path_factory.mktemp("checkpoints")
  out_dir = tmp_path_factory.mktemp("resumed")
  results = {}
  cases = _available_cases()
  for name in cases:
    params, state, step_fn, batch_fn = worker.init(name)
    params, state = worker.train(
        params, state, step_fn, batch_fn, 0, worker.SAVE_AT)
    _save(ckpt_dir / name, {"params": params, "opt_state": state})
    saved = worker.flat({"params": params, "opt_state": state})
    params, state = worker.train(
        params, state, step_fn, batch_fn, worker.SAVE_AT, worker.TOTAL)
    results[name] = {
        "saved": saved,
        "uninterrupted": worker.flat({"params": params, "opt_state": state}),
    }
  proc = subprocess.Popen(
      [sys.executable, str(WORKER_PATH), "--ckpt-dir", str(ckpt_dir),
       "--out", str(out_dir), *cases],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      cwd=str(HERE.parent))
  try:
    log, _ = proc.communicate(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, log[-5000:]
  for name in cases:
    results[name]["resumed"] = dict(np.load(out_dir / f"{name}.npz"))
  return results


@pytest.mark.parametrize("case", worker.CASES)
def test_resumed_run_is_bitwise_identical(runs, case):
  if case not in runs:
    pytest.skip(f"case {case!r} needs lo.lazy / 8 devices")
  result = runs[case]
  resumed = {k: v for k, v in result["resumed"].items()
             if not k.startswith("__")}
  uninterrupted = result["uninterrupted"]
  assert sorted(resumed) == sorted(uninterrupted)
  for key, value in uninterrupted.items():
    assert_bitwise(resumed[key], value, key)
  assert str(result["resumed"]["__state_type__"]) == "LookaheadState"
  # TOTAL = 12 is a sync step: the params landed on the slow weights.
  for key, value in uninterrupted.items():
    if key.startswith("['params']"):
      slow_key = key.replace("['params']", "['opt_state'].slow_params", 1)
      assert_bitwise(uninterrupted[slow_key], value, key)


@pytest.mark.parametrize("case", worker.CASES)
def test_checkpoint_was_taken_mid_cycle(runs, case):
  if case not in runs:
    pytest.skip(f"case {case!r} needs lo.lazy / 8 devices")
  saved = runs[case]["saved"]
  assert int(saved["['opt_state'].step"]) == worker.SAVE_AT
  assert worker.SAVE_AT % worker.SYNC_PERIOD != 0
  # Two steps after the sync at step 4, the fast params have left the slow
  # weights: resuming needs both.
  first_param = next(k for k in saved if k.startswith("['params']"))
  slow_key = first_param.replace(
      "['params']", "['opt_state'].slow_params", 1)
  assert not np.array_equal(saved[first_param], saved[slow_key])


def test_pullback_checkpoint_holds_the_synced_inner_state(runs):
  saved = runs["pullback"]["saved"]
  trace = saved["['opt_state'].inner_state.inner_state[0].trace['w1']"]
  synced = saved[
      "['opt_state'].inner_state.synced_inner_state[0].trace['w1']"]
  assert trace.shape == synced.shape == (8, 16)
  assert not np.array_equal(trace, synced)


def test_lazy_rows_never_looked_up_stay_exact(runs):
  if "lazy" not in runs:
    pytest.skip("needs lo.lazy")
  _, host_params, _, _, _ = worker.make_case("lazy")
  for result in (runs["lazy"]["uninterrupted"], runs["lazy"]["resumed"]):
    # Rows 12..31 are never looked up: params, slow weights and Adam moments
    # keep their initial values bitwise through save, restore and syncs.
    assert_bitwise(
        result["['params']['embed']"][12:], host_params["embed"][12:])
    assert_bitwise(
        result["['opt_state'].slow_params['embed']"][12:],
        host_params["embed"][12:])
    mu = next(v for k, v in result.items() if k.endswith(".mu['embed']"))
    assert_bitwise(mu[12:], np.zeros_like(mu[12:]))
    assert np.any(mu[:12] != 0.0)
  assert not np.array_equal(
      runs["lazy"]["uninterrupted"]["['params']['embed']"][:12],
      host_params["embed"][:12])


def test_sharded_state_is_restored_onto_the_mesh(runs):
  if "sharded" not in runs:
    pytest.skip("needs 8 devices")
  assert bool(runs["sharded"]["resumed"]["__shardings_ok__"])


# --------------------------------------------------------------------------
# Restoring into the wrong optimizer: a clear error.


def _params():
  return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def _abstract(tx, params):
  return {"params": jax.eval_shape(lambda p: p, params),
          "opt_state": jax.eval_shape(tx.init, params)}


def _saved_metadata(tmp_path, tx, params):
  path = tmp_path / "ckpt"
  _save(path, {"params": params, "opt_state": tx.init(params)})
  return ocp.StandardCheckpointer().metadata(path)


def test_check_passes_on_matching_checkpoint(tmp_path):
  params = _params()
  tx = optax.chain(optax.clip(1.0),
                   lo.lookahead(optax.adam(1e-3), inner_state="pullback"))
  metadata = _saved_metadata(tmp_path, tx, params)
  lo.check_state_structure(metadata, _abstract(tx, params))  # no error
  lo.check_state_structure(metadata.item_metadata, _abstract(tx, params))


def test_checkpoint_saved_without_lookahead(tmp_path):
  params = _params()
  metadata = _saved_metadata(tmp_path, optax.adam(1e-3), params)
  target = _abstract(lo.lookahead(optax.adam(1e-3)), params)
  with pytest.raises(ValueError) as info:
    lo.check_state_structure(metadata, target, name="checkpoint")
  message = str(info.value)
  assert message.startswith(
      "`checkpoint` does not match the expected structure: it has no leaf "
      "opt_state.inner_state[0].count (expected int32[]), and an unexpected "
      "leaf opt_state[0].count (int32[]).")
  assert "It holds no slow weights: was it saved without lookahead?" in (
      message)
  assert "migrate_optax_state" in message


def test_checkpoint_with_another_inner_optimizer(tmp_path):
  params = _params()
  metadata = _saved_metadata(
      tmp_path, lo.lookahead(optax.sgd(0.1, momentum=0.9)), params)
  target = _abstract(lo.lookahead(optax.adam(1e-3)), params)
  with pytest.raises(ValueError, match=(
      r"it has no leaf opt_state\.inner_state\[0\]\.count \(expected "
      r"int32\[\]\), and an unexpected leaf "
      r"opt_state\.inner_state\[0\]\.trace\.b \(float32\[3\]\)")):
    lo.check_state_structure(metadata, target)
  # Orbax alone also refuses, with its own message.
  with pytest.raises(ValueError):
    ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)


def test_checkpoint_with_other_shapes_or_dtypes(tmp_path):
  params = _params()
  tx = lo.lookahead(optax.adam(1e-3))
  metadata = _saved_metadata(tmp_path, tx, params)
  wider = {"w": jnp.zeros((2, 4)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=(
      r"`state` leaf opt_state\.inner_state\[0\]\.mu\.w has shape \(2, 3\), "
      r"expected \(2, 4\)\.")):
    lo.check_state_structure(metadata, _abstract(tx, wider))
  f32_slow = lo.lookahead(optax.adam(1e-3), slow_dtype=jnp.float32)
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  bf16_metadata = _saved_metadata(tmp_path / "bf16", tx, bf16)
  with pytest.raises(ValueError, match=(
      r"leaf opt_state\.slow_params\.b has dtype bfloat16, expected "
      r"float32\.")):
    lo.check_state_structure(bf16_metadata, _abstract(f32_slow, bf16))


# --------------------------------------------------------------------------
# Migrating a plain-optax checkpoint to lookahead.


def test_migrate_plain_adam_checkpoint_and_continue(tmp_path):
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grad_fn = jax.grad(lambda p: jnp.sum((p["w"] - 0.5) ** 2))
  adam = optax.adam(0.1)

  @jax.jit
  def plain_step(params, state):
    updates, state = adam.update(grad_fn(params), state)
    return optax.apply_updates(params, updates), state

  state = adam.init(params)
  for _ in range(3):
    params, state = plain_step(params, state)
  _save(tmp_path / "plain", {"params": params, "opt_state": state})

  # Restore with the plain optimizer's target, then migrate.
  restored = ocp.StandardCheckpointer().restore(
      tmp_path / "plain", _abstract(adam, params))
  tx = lo.lookahead(optax.adam(0.1), sync_period=3, slow_step_size=0.8)
  with pytest.raises(ValueError, match="saved without lookahead"):
    lo.check_state_structure(restored, _abstract(tx, params))
  la_state = lo.migrate_optax_state(
      tx, restored["opt_state"], restored["params"])
  assert isinstance(la_state, lo.LookaheadState)
  assert int(la_state.step) == 0
  assert int(la_state.inner_state[0].count) == 3  # Adam's count goes on
  np.testing.assert_array_equal(
      la_state.inner_state[0].nu["w"], state[0].nu["w"])
  np.testing.assert_array_equal(la_state.slow_params["w"], params["w"])
  lo.check_state_structure(la_state, jax.eval_shape(tx.init, params))

  @jax.jit
  def la_step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  # `la_step` and `plain_step` are two programs, which XLA may round
  # differently (an FMA in one and not in the other): each step is compared
  # from the same params and Adam state, to an ulp or two (n = 2: one adam
  # step of elementwise arithmetic on weights and moments that do not cancel
  # here; with one side compiled without FMA, XLA_FLAGS=
  # --xla_cpu_max_isa=SSE4_2, they differed by 1 ulp at most), and the plain
  # run on its own at a tolerance.
  p_la, s_la = restored["params"], la_state
  p_plain, s_plain = params, state
  for i in range(3):
    fast, fast_state = plain_step(p_la, s_la.inner_state)
    p_la, s_la = la_step(p_la, s_la)
    p_plain, s_plain = plain_step(p_plain, s_plain)
    if i < 2:  # Before the first sync lookahead is the inner optimizer.
      assert_tree_within_ulps(p_la, fast, 2, msg=f"step {i + 1}")
      assert_tree_within_ulps(s_la.inner_state, fast_state, 2,
                              msg=f"step {i + 1}")
      np.testing.assert_allclose(p_la["w"], p_plain["w"], rtol=0, atol=1e-6)
  # Step 3 syncs: 0.8 of the way from the params at migration to the fast
  # params (alpha = float32(0.8), in float64; the sync rounds a blend, n = 2).
  alpha = float(np.float32(0.8))
  slow0, fast = (np.asarray(x, np.float64) for x in (params["w"], fast["w"]))
  assert_tree_within_ulps(
      p_la["w"], (slow0 + alpha * (fast - slow0)).astype(np.float32), 2)
  # The plain run on its own: a wrong alpha (or no sync) is off by > 1e-3.
  np.testing.assert_allclose(
      p_la["w"], params["w"] + 0.8 * (p_plain["w"] - params["w"]),
      rtol=0, atol=1e-5)
  assert_bitwise(p_la["w"], s_la.slow_params["w"])  # Within one program.


def test_migrate_nested_pullback_and_slow_dtype():
  params = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "b": jnp.zeros(
      (), jnp.bfloat16)}
  plain = optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9))
  plain_state = plain.init(params)
  _, plain_state = plain.update(
      {"w": jnp.array([1.0, -1.0], jnp.bfloat16),
       "b": jnp.ones((), jnp.bfloat16)}, plain_state, params)
  tx = optax.chain(optax.clip(1.0), lo.lookahead(
      optax.sgd(0.1, momentum=0.9), inner_state="pullback",
      slow_dtype=jnp.float32))
  state = lo.migrate_optax_state(tx, plain_state, params, step=2)
  la_state = state[1]
  assert isinstance(la_state.inner_state, lo.PullbackState)
  assert int(la_state.step) == 2
  for tree in (la_state.inner_state.inner_state,
               la_state.inner_state.synced_inner_state):
    np.testing.assert_array_equal(
        tree[0].trace["w"], plain_state[1][0].trace["w"])
  assert la_state.slow_params["w"].dtype == jnp.float32
  np.testing.assert_array_equal(la_state.slow_params["w"], [1.0, 2.0])
  lo.check_state_structure(state, jax.eval_shape(tx.init, params))
  # The result is a usable state.
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert updates["w"].dtype == jnp.bfloat16


def test_migrate_errors():
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="`tx` holds no lookahead"):
    lo.migrate_optax_state(optax.adam(1e-3), optax.adam(1e-3).init(params),
                           params)
  tx = lo.lookahead(optax.adam(1e-3))
  with pytest.raises(ValueError, match=(
      r"`opt_state` does not match the expected structure: it has no leaf "
      r"\[0\]\.count")):
    lo.migrate_optax_state(tx, optax.sgd(0.1, momentum=0.9).init(params),
                           params)
  with pytest.raises(ValueError, match="container types"):
    # Same leaves, but dicts and lists where optax has NamedTuples (what
    # orbax returns when restoring without a target).
    raw = [{"count": jnp.zeros([], jnp.int32), "mu": {"w": jnp.zeros(3)},
            "nu": {"w": jnp.zeros(3)}}, None]
    lo.migrate_optax_state(tx, raw, params)


def test_migrate_keeps_shardings():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  params = {"w": jax.device_put(jnp.arange(16.0), sharding)}
  adam = optax.adam(0.1)
  adam_state = jax.jit(adam.init, out_shardings=(optax.ScaleByAdamState(
      NamedSharding(mesh, P()), {"w": sharding}, {"w": sharding}),
                                                 optax.EmptyState()))(params)
  tx = lo.lookahead(optax.adam(0.1), inner_state="pullback")
  state = lo.migrate_optax_state(tx, adam_state, params)
  for leaf in (state.slow_params["w"],
               state.inner_state.inner_state[0].mu["w"],
               state.inner_state.synced_inner_state[0].nu["w"]):
    assert leaf.sharding.is_equivalent_to(sharding, 1)
  np.testing.assert_array_equal(state.slow_params["w"], np.arange(16.0))


# --------------------------------------------------------------------------
# Flax NNX: the state of an `nnx.Optimizer` and its orbax checkpoint.


def _nnx_optimizer(features=3):
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(2, features, rngs=nnx.Rngs(0))
  tx = lo.lookahead(optax.adam(1e-3), sync_period=3, slow_step_size=0.8)
  return nnx, model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def test_check_passes_on_nnx_optimizer_checkpoint(tmp_path):
  # Orbax saves the tuple index of `opt_state.inner_state[0]` as the key "0":
  # a valid checkpoint must not be rejected for `.0` vs `[0]`.
  nnx, model, optimizer = _nnx_optimizer()
  _save(tmp_path / "nnx", nnx.state(optimizer))
  metadata = ocp.StandardCheckpointer().metadata(tmp_path / "nnx")
  lo.check_state_structure(metadata, nnx.state(optimizer))
  abstract = nnx.state(nnx.eval_shape(lambda: _nnx_optimizer()[2]))
  lo.check_state_structure(metadata, abstract)
  # A pure-dict checkpoint (`nnx.to_pure_dict`) has no `.value` level.
  pure = nnx.to_pure_dict(nnx.state(optimizer))
  _save(tmp_path / "pure", pure)
  lo.check_state_structure(
      ocp.StandardCheckpointer().metadata(tmp_path / "pure"),
      nnx.state(optimizer))
  lo.check_state_structure(pure, nnx.state(optimizer))
  # The optimizer state alone matches the plain optax state of the params.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lo.check_state_structure(
      nnx.state(optimizer)["opt_state"],
      jax.eval_shape(optimizer.tx.init, params))
  # And the restored state trains on: restore into an abstract optimizer.
  restored = ocp.StandardCheckpointer().restore(tmp_path / "nnx", abstract)
  lo.check_state_structure(restored, nnx.state(optimizer))


def test_check_rejects_nnx_checkpoint_of_another_model(tmp_path):
  nnx, _, optimizer = _nnx_optimizer(features=3)
  _save(tmp_path / "nnx", nnx.state(optimizer))
  metadata = ocp.StandardCheckpointer().metadata(tmp_path / "nnx")
  other = nnx.state(_nnx_optimizer(features=4)[2])
  with pytest.raises(ValueError, match=re.escape(
      "`state` leaf opt_state.inner_state[0].mu.bias.value has shape (3,), "
      "expected (4,).")):
    lo.check_state_structure(metadata, other)


@pytest.mark.parametrize("leaf,shown", [
    ("a", "str 'a'"), (b"x", "bytes b'x'"), (object, "type <class 'object'>"),
])
def test_check_rejects_leaves_that_are_not_arrays(leaf, shown):
  expected = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(TypeError, match=re.escape(
      "`state` leaf w is not an array (nor anything with `shape` and "
      f"`dtype`): got {shown}.")):
    lo.check_state_structure({"w": leaf}, expected)


def test_check_names_a_bad_leaf_of_expected():
  with pytest.raises(TypeError, match=re.escape(
      "`expected` leaf [1] is not an array")):
    lo.check_state_structure([jnp.ones(2), jnp.ones(2)], [jnp.ones(2), "b"])


def test_check_accepts_python_and_numpy_scalars():
  lo.check_state_structure({"n": 3, "x": np.float32(1.0)},
                           {"n": jnp.int32(0), "x": jnp.float32(0.0)})


STEP_EXPECTED = "`step` must be an integer in [0, 2147483647], got "


@pytest.mark.parametrize("step,error,shown", [
    (-1, ValueError, "-1"),
    (2**31, ValueError, "2147483648"),
    (2.5, TypeError, "2.5"),
    ("3", TypeError, "'3'"),
    (True, TypeError, "True"),
    (None, TypeError, "None"),
    (jnp.array([1, 2]), TypeError, "an array of type int32[2]"),
    (jnp.array(1.0), TypeError, "an array of type float32[]"),
])
def test_migrate_rejects_bad_step(step, error, shown):
  params = {"w": jnp.ones(3)}
  tx = lo.lookahead(optax.adam(1e-3))
  with pytest.raises(error, match=re.escape(STEP_EXPECTED + shown + ".")):
    lo.migrate_optax_state(tx, optax.adam(1e-3).init(params), params,
                           step=step)


@pytest.mark.parametrize("step", [3, np.int64(3), jnp.array(3, jnp.int32)])
def test_migrate_accepts_integer_steps(step):
  params = {"w": jnp.ones(3)}
  tx = lo.lookahead(optax.adam(1e-3), sync_period=4)
  state = lo.migrate_optax_state(tx, optax.adam(1e-3).init(params), params,
                                 step=step)
  assert state.step.dtype == jnp.int32 and int(state.step) == 3
  # The first sync comes one step later (step 4).
  updates, state = tx.update({"w": jnp.ones(3)}, state, params)
  assert int(state.step) == 4
  np.testing.assert_array_equal(
      optax.apply_updates(params, updates)["w"], state.slow_params["w"])


@pytest.mark.parametrize("tx", [None, optax.adam, "adam"])
def test_migrate_rejects_a_tx_that_is_not_a_transformation(tx):
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match=re.escape(
      "`tx` must be an optax GradientTransformation (an object with `init` "
      f"and `update`), got {tx!r}.")):
    lo.migrate_optax_state(tx, optax.adam(1e-3).init(params), params)


def test_migrate_blames_params_of_another_shape():
  # The optimizer state is right; the params come from another model.
  params = {"b": jnp.ones(2), "w": jnp.ones((2, 3))}
  adam_state = optax.adam(1e-3).init(params)
  tx = lo.lookahead(optax.adam(1e-3))
  with pytest.raises(ValueError, match=re.escape(
      "`params` leaf ['w'] has shape (3, 2), but `opt_state` holds state of "
      "shape (2, 3) for it: are the params from the same checkpoint as the "
      "optimizer state?")):
    lo.migrate_optax_state(
        tx, adam_state, {"b": jnp.ones(2), "w": jnp.ones((3, 2))})
  # A single-array params tree: the int32 count is not taken for a moment.
  with pytest.raises(ValueError, match=re.escape(
      "`params` leaf <root> has shape (4,), but `opt_state` holds state of "
      "shape (3,) for it")):
    lo.migrate_optax_state(tx, optax.adam(1e-3).init(jnp.ones(3)),
                           jnp.ones(4))
  # When the optimizer state disagrees with itself, it is what is blamed.
  bad_nu = adam_state[0]._replace(
      nu={"b": jnp.ones(2), "w": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match=re.escape(
      "`opt_state` leaf [0].nu.w has shape (3, 2), expected (2, 3).")):
    lo.migrate_optax_state(tx, (bad_nu,) + adam_state[1:], params)
