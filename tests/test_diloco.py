"""DiLoCo: `lo.diloco` over 8 replicas.

Each replica runs AdamW on its own data with its own inner state; every
`k` steps the pseudo-gradients `slow - fast` are averaged over the replica
axis and the slow weights take one outer step (Nesterov SGD, the DiLoCo
paper's `lr = 0.7, momentum = 0.9`). The reference is a plain simulation of
the 8 replicas written here: a Python loop over replicas, `optax.adamw` on
each, and the outer step by hand in NumPy. The 8 replicas are the 8 host CPU
devices that conftest.py asks for.
"""

import functools
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks.communication import collectives
from benchmarks.communication import parse_hlo
from benchmarks.communication import reachable
from tests import _multiprocess
from tests import _helpers
from tests._helpers import assert_bitwise
from tests._helpers import to_numpy

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "diloco_worker.py"
N = 8  # replicas
K = 3  # sync period
STEPS = 8  # syncs after steps 3 and 6, then 2 steps into the third cycle
SYNC_STEPS = (3, 6)
OUTER_LR, OUTER_MU = 0.7, 0.9  # the DiLoCo paper's outer Nesterov SGD
AXIS = "data"
ATOL = 5e-7  # 2 ulps of float32 weights in [0.5, 2] (measured: <= 1 ulp)

pytestmark = pytest.mark.skipif(
    jax.device_count() < N, reason="needs 8 devices (see conftest.py)")


def _load_worker():
  spec = importlib.util.spec_from_file_location("diloco_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()  # the data, params and the shard_map run are shared


def inner_tx():
  return optax.adamw(0.03, b1=0.8, b2=0.95, weight_decay=0.05)


@functools.cache
def diloco_tx(**kwargs):
  """`lo.diloco`, one object a configuration (one compiled step)."""
  if "outer" not in kwargs:
    kwargs.update(learning_rate=OUTER_LR, momentum=OUTER_MU)
  return lo.diloco(inner_tx(), K, AXIS, **kwargs)


def outer_momentum(state):
  """The Nesterov buffer of the (one) fragment's outer SGD."""
  return state.outer_state.outer_states[0][0].trace


def loss_fn(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def assert_same_on_all_replicas(stacked, msg=""):
  """Every replica's copy (leading axis) equals replica 0's, bitwise."""
  stacked = np.asarray(stacked)
  assert_bitwise(stacked, np.broadcast_to(stacked[0], stacked.shape), msg)


# ---------------------------------------------------------------------------
# The reference: 8 replicas simulated one after the other.
# ---------------------------------------------------------------------------


def simulate(xs, ys, params0, steps, *, alpha=None, reset=False):
  """DiLoCo by hand: a loop over replicas and NumPy syncs.

  Args:
    xs, ys: every replica's batches, `(N, steps, batch, ...)`.
    params0: the initial params (NumPy float32), the same on all replicas.
    steps: the number of steps.
    alpha: None: the outer step is Nesterov SGD on the mean pseudo-gradient.
      A float: the Lookahead interpolation towards the mean fast weights.
    reset: reset every replica's Adam moments (not its count) at a sync.

  Returns:
    A dict: `params` (stacked over replicas), `slow`, `momentum`, the
    `history` of the slow weights after each sync, the replicas' fast
    weights `fast_before_sync` at each sync, and the `states`.
  """
  inner = inner_tx()
  update = jax.jit(inner.update)  # the same function for every replica
  grad = jax.jit(jax.grad(loss_fn))
  params = [dict(params0) for _ in range(N)]
  states = [inner.init(params0) for _ in range(N)]
  slow = {k: v.copy() for k, v in params0.items()}
  momentum = {k: np.zeros_like(v) for k, v in params0.items()}
  lr, mu = np.float32(OUTER_LR), np.float32(OUTER_MU)
  history, fast_before_sync = [], []
  for t in range(steps):
    for i in range(N):
      g = grad(params[i], xs[i, t], ys[i, t])
      u, states[i] = update(g, states[i], params[i])
      params[i] = to_numpy(optax.apply_updates(params[i], u))
    if (t + 1) % K:
      continue
    fast_before_sync.append(
        {k: np.stack([p[k] for p in params]) for k in slow})
    for k in slow:
      fast = np.stack([p[k] for p in params])
      if alpha is None:
        d = np.mean(slow[k][None] - fast, axis=0)  # mean pseudo-gradient
        momentum[k] = mu * momentum[k] + d  # b = mu b + d
        slow[k] = slow[k] - lr * (mu * momentum[k] + d)  # w -= lr (mu b + d)
      else:
        mean = np.mean(fast, axis=0)
        slow[k] = slow[k] + np.float32(alpha) * (mean - slow[k])
      assert slow[k].dtype == np.float32
    params = [{k: v.copy() for k, v in slow.items()} for _ in range(N)]
    if reset:
      states = [(s[0]._replace(mu=jax.tree.map(jnp.zeros_like, s[0].mu),
                               nu=jax.tree.map(jnp.zeros_like, s[0].nu)),)
                + tuple(s[1:]) for s in states]
    history.append({k: v.copy() for k, v in slow.items()})
  return dict(params={k: np.stack([p[k] for p in params]) for k in slow},
              slow=slow, momentum=momentum, history=history,
              fast_before_sync=fast_before_sync, states=states)


# ---------------------------------------------------------------------------
# The library under jax.pmap.
# ---------------------------------------------------------------------------


def replicate(tree):
  return _helpers.replicate(tree, N)


def _grads(params, x, y):
  return jax.grad(loss_fn)(params, x, y)  # this replica's own: no pmean


def pmap_step(tx, donate=True):
  """The shared replica harness's step of `tx` on its own batches."""
  return _helpers.pmapped_step(tx, _grads, AXIS, donate)


def run_pmap(tx, xs, ys, params0, steps):
  """Returns the (params, state) after every step, as NumPy copies."""
  return _helpers.replica_run(
      tx, _grads, AXIS, [(xs[:, t], ys[:, t]) for t in range(steps)],
      params=params0, n=N)


@pytest.fixture(scope="module")
def data():
  xs, ys = worker.make_data(STEPS)
  return xs, ys, worker.init_params()


@pytest.fixture(scope="module")
def nesterov_runs(data):
  xs, ys, params0 = data
  return (run_pmap(diloco_tx(), xs, ys, params0, STEPS),
          simulate(xs, ys, params0, STEPS))


def assert_close(actual, expected, atol=ATOL):
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=atol,
                               err_msg=k)


def test_pmap_matches_simulation_of_8_replicas(nesterov_runs, data):
  history, ref = nesterov_runs
  params, state = history[-1]
  assert_close(params, ref["params"])
  for k in ref["slow"]:
    assert_same_on_all_replicas(state.slow_params[k], k)
  assert_close(jax.tree.map(lambda a: a[0], state.slow_params), ref["slow"])
  assert_close(jax.tree.map(lambda a: a[0], outer_momentum(state)),
               ref["momentum"])
  for t, expected in zip(SYNC_STEPS, ref["history"]):
    slow = history[t - 1][1].slow_params
    assert_close(jax.tree.map(lambda a: a[0], slow), expected)
  np.testing.assert_array_equal(state.step, np.full(N, STEPS, np.int32))
  # The test can tell the formulas apart: within a cycle the replicas drift
  # apart (their data differ), the outer step moved the slow weights far
  # more than the tolerance, and the momentum is not the last mean delta.
  fast = ref["fast_before_sync"][0]["w"]
  assert np.max(np.abs(fast - fast[0])) > 1e-2
  w0 = data[2]["w"]
  assert np.max(np.abs(ref["slow"]["w"] - w0)) > 0.1
  assert np.max(np.abs(ref["momentum"]["w"])) > 1e-2
  # A data-parallel average of the weights would not pass: the slow weights
  # are not the mean of the replicas' fast weights.
  assert np.max(np.abs(ref["history"][0]["w"] - fast.mean(0))) > 1e-3


def test_pmap_interpolation_averages_fast_weights(data):
  """`outer=optax.sgd(0.3)`: the slow weights move 0.3 of the way."""
  xs, ys, params0 = data
  tx = diloco_tx(outer=optax.sgd(0.3))
  history = run_pmap(tx, xs, ys, params0, STEPS)
  ref = simulate(xs, ys, params0, STEPS, alpha=0.3)
  params, state = history[-1]
  assert_close(params, ref["params"])
  for t, expected in zip(SYNC_STEPS, ref["history"]):
    slow = history[t - 1][1].slow_params
    for k in expected:
      assert_same_on_all_replicas(slow[k], k)
    assert_close(jax.tree.map(lambda a: a[0], slow), expected)
  # First sync by hand from the simulated fast weights: 0.3, not 0.7.
  fast = ref["fast_before_sync"][0]
  for k in fast:
    expected = params0[k] + 0.3 * (fast[k].mean(0) - params0[k])
    np.testing.assert_allclose(ref["history"][0][k], expected, atol=1e-6)
    assert np.max(np.abs(ref["history"][0][k] - fast[k].mean(0))) > 1e-3


def test_pmap_inner_state_reset(data):
  xs, ys, params0 = data
  history = run_pmap(diloco_tx(inner_state="reset"), xs, ys, params0, STEPS)
  ref = simulate(xs, ys, params0, STEPS, reset=True)
  params, state = history[-1]
  assert_close(params, ref["params"])
  assert_close(jax.tree.map(lambda a: a[0], state.slow_params), ref["slow"])
  # Right after a sync the moments are zero and the count goes on.
  adam = history[SYNC_STEPS[1] - 1][1].inner_state[0]
  for k in params0:
    np.testing.assert_array_equal(adam.mu[k], 0.0)
    np.testing.assert_array_equal(adam.nu[k], 0.0)
  np.testing.assert_array_equal(adam.count, np.full(N, 6, np.int32))
  # And it differs from keeping the moments.
  keep = simulate(xs, ys, params0, STEPS)
  assert np.max(np.abs(keep["params"]["w"] - ref["params"]["w"])) > 1e-3


def test_shard_map_matches_simulation_and_pmap(data):
  steps = worker.STEPS  # 7
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  params, slow, momentum, step = worker.train(mesh, steps)
  xs, ys, params0 = data
  ref = simulate(xs[:, :steps], ys[:, :steps], params0, steps)
  assert_close(params, ref["params"])
  for k in slow:
    assert_same_on_all_replicas(slow[k], k)
  assert_close(jax.tree.map(lambda a: a[0], slow), ref["slow"])
  assert_close(jax.tree.map(lambda a: a[0], momentum), ref["momentum"])
  np.testing.assert_array_equal(step, np.full(N, steps, np.int32))
  # pmap compiles another program of the same arithmetic: the same numbers,
  # to an ulp or two.
  p_params, p_state = run_pmap(diloco_tx(), xs, ys, params0, steps)[-1]
  assert_close(params, p_params, atol=5e-7)
  assert_close(slow, p_state.slow_params, atol=5e-7)


def test_nesterov_by_its_settings_is_that_outer(nesterov_runs, data):
  """`learning_rate`, `momentum` build the very `outer` SGD they name."""
  xs, ys, params0 = data
  tx = lo.diloco(inner_tx(), K, AXIS, outer=optax.sgd(
      OUTER_LR, momentum=OUTER_MU, nesterov=True))
  # The two steps lower to one and the same program, so they are compared
  # bitwise (two different programs could round differently).
  args = _args(tx)
  assert (pmap_step(tx).lower(*args).as_text()
          == pmap_step(diloco_tx()).lower(*args).as_text())
  params, state = run_pmap(tx, xs, ys, params0, STEPS)[-1]
  expected_params, expected_state = nesterov_runs[0][-1]
  for a, e in zip(jax.tree.leaves((params, state)),
                  jax.tree.leaves((expected_params, expected_state))):
    assert_bitwise(a, e)


# ---------------------------------------------------------------------------
# What a sync guarantees on every replica.
# ---------------------------------------------------------------------------


def test_after_each_sync_slow_identical_and_params_land_on_it(nesterov_runs):
  history, _ = nesterov_runs
  for t in SYNC_STEPS:
    params, state = history[t - 1]
    for k in params:
      slow = state.slow_params[k]
      assert_same_on_all_replicas(slow, f"slow {k} after step {t}")
      # The weights stay in [0.5, 3]: no weight moves by 2x in a cycle, so
      # the params land on the slow weights exactly.
      assert_bitwise(params[k], slow, f"params {k} after step {t}")
      assert_same_on_all_replicas(outer_momentum(state)[k], k)
    # Each replica keeps its own inner state: the Adam moments differ.
    adam = state.inner_state[0]
    for k in params:
      assert np.max(np.abs(adam.mu[k] - adam.mu[k][0])) > 1e-4, k
      assert np.max(np.abs(adam.nu[k] - adam.nu[k][0])) > 1e-5, k
    np.testing.assert_array_equal(adam.count, np.full(N, t, np.int32))
  # Between syncs the replicas' params go their own ways while the slow
  # weights stay put.
  params, state = history[SYNC_STEPS[0]]  # one step after the first sync
  assert np.max(np.abs(params["w"] - params["w"][0])) > 1e-3
  assert_bitwise(state.slow_params["w"],
                 history[SYNC_STEPS[0] - 1][1].slow_params["w"])


def test_landing_not_exact_when_a_weight_moves_by_more_than_2x():
  """The documented rare case: params one rounding off, slow still equal.

  Inner SGD(1) on hand-made gradients, k = 2: step 1 sends every weight from
  1 to p = 1 - g1 in [16, 21], step 2 to the fast weights p - g2, and the
  outer step lands near 1 - 1.33 d, far from p. The update `target - p`
  rounds at the scale of p, so `p + update` misses the target by up to one
  ulp of p; the slow weights store the target itself, identical everywhere.
  """
  rng = np.random.default_rng(11)
  size = 64
  g1 = -rng.uniform(15.0, 20.0, size=(N, size)).astype(np.float32)
  g2 = rng.uniform(14.0, 19.0, size=(N, size)).astype(np.float32)
  outer = optax.sgd(OUTER_LR, momentum=OUTER_MU, nesterov=True)
  tx = lo.diloco(optax.sgd(1.0), 2, AXIS, outer=outer)

  @functools.partial(jax.pmap, axis_name=AXIS)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = replicate(np.ones(size, np.float32))
  state = jax.pmap(tx.init)(params)
  before, _ = step(params, state, g1)  # p, before the sync step
  params, state = step(*step(params, state, g1), g2)
  params, slow = np.asarray(params), np.asarray(state.slow_params)

  assert_same_on_all_replicas(slow)
  before = np.asarray(before, np.float64)
  fast = before - np.asarray(g2, np.float64)
  d = np.mean(1.0 - fast, axis=0)
  target = 1.0 - OUTER_LR * (OUTER_MU * d + d)
  np.testing.assert_allclose(slow[0], target, rtol=0, atol=2e-6)
  assert np.all(np.abs(target) < before / 2)  # moved by more than 2x
  off = params != slow
  assert off.any()  # some params did not land exactly ...
  assert np.all(np.abs(params - slow) <= np.spacing(
      before.astype(np.float32)))  # ... but to within one ulp of p
  # On one device (`lookahead`) the stored slow weights are `p + update` instead, so
  # there the params land bitwise even in this case.
  single = lo.lookahead(optax.sgd(1.0), 2, outer=outer)
  p0 = jnp.ones(size, jnp.float32)
  s0 = single.init(p0)
  for g in (g1[0], g2[0]):
    u, s0 = single.update(jnp.asarray(g), s0, p0)
    p0 = optax.apply_updates(p0, u)
  assert_bitwise(p0, s0.slow_params)


# ---------------------------------------------------------------------------
# The compiled step: the only collective sits in the sync branch.
# ---------------------------------------------------------------------------

def sync_branches(computations, entry):
  """The (false, true) branch computations of the entry's one conditional."""
  conds = [l for l in computations[entry] if " conditional(" in l]
  assert len(conds) == 1, conds
  (cond,) = conds
  true = re.search(r"true_computation=%?([\w.\-]+)", cond)
  if true:
    false = re.search(r"false_computation=%?([\w.\-]+)", cond)
    return false.group(1), true.group(1)
  # An integer index: lax.cond's branch 0 is the false branch.
  names = re.search(r"branch_computations=\{([^}]*)\}", cond).group(1)
  false, true = (n.strip().lstrip("%") for n in names.split(","))
  return false, true


def assert_collectives_only_in_sync_branch(text):
  computations, entry = parse_hlo(text)
  false, true = sync_branches(computations, entry)
  in_true = collectives(computations, reachable(computations, true))
  assert [op for op, _ in in_true] == ["all-reduce"], in_true
  outside = reachable(computations, entry, skip={true})
  assert false in outside
  assert collectives(computations, outside) == []
  assert collectives(computations, reachable(computations, false)) == []
  # The one all-reduce carries every leaf (a tuple all-reduce).
  (line,) = [l for l in computations[in_true[0][1]] if " all-reduce(" in l]
  return line


def _args(tx):
  params = replicate(worker.init_params())
  state = jax.pmap(tx.init)(params)
  xs, ys = worker.make_data(1)
  return params, state, xs[:, 0], ys[:, 0]


@pytest.mark.parametrize("kind", ["nesterov", "interpolation", "reset"])
def test_pmap_hlo_one_all_reduce_inside_the_sync_cond(kind):
  tx = {"nesterov": diloco_tx(),
        "interpolation": diloco_tx(outer=optax.sgd(0.3)),
        "reset": diloco_tx(inner_state="reset")}[kind]
  text = pmap_step(tx).lower(*_args(tx)).compile().as_text()
  line = assert_collectives_only_in_sync_branch(text)
  # Both leaves, w (4, 3) and b (3,), in the one all-reduce, over 8 devices.
  assert "f32[4,3]" in line and "f32[3]" in line, line
  assert "{0,1,2,3,4,5,6,7}" in line, line


def test_shard_map_hlo_one_all_reduce_inside_the_sync_cond():
  tx = diloco_tx()
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)
  expand = lambda tree: jax.tree.map(lambda a: a[None], tree)

  def block(params, state, x, y):
    params, state, x, y = squeeze((params, state, x, y))
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return expand((optax.apply_updates(params, updates), state))

  step = jax.jit(jax.shard_map(block, mesh=mesh, in_specs=P(AXIS),
                               out_specs=P(AXIS)))
  text = step.lower(*_args(tx)).compile().as_text()
  line = assert_collectives_only_in_sync_branch(text)
  assert "f32[4,3]" in line and "f32[3]" in line, line


def test_bfloat16_params_average_in_float32():
  """bf16 params: the pseudo-gradient is all-reduced in float32."""
  tx = diloco_tx(slow_dtype=jnp.float32)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                        replicate(worker.init_params()))
  state = jax.pmap(tx.init)(params)
  xs, ys = worker.make_data(STEPS)
  step = pmap_step(tx, donate=False)
  text = step.lower(params, state, xs[:, 0], ys[:, 0]).compile().as_text()
  line = assert_collectives_only_in_sync_branch(text)
  assert "f32[4,3]" in line and "f32[3]" in line and "bf16" not in line, line
  for t in range(K):
    params, state = step(params, state, xs[:, t], ys[:, t])
  for k in params:
    slow = np.asarray(state.slow_params[k])
    assert slow.dtype == np.float32
    assert_same_on_all_replicas(slow, k)
    # The params are the float32 slow weights rounded to bfloat16.
    assert_bitwise(np.asarray(params[k]),
                   np.asarray(jnp.asarray(slow).astype(jnp.bfloat16)), k)
  # The float32 slow weights keep more than bfloat16 holds.
  assert not np.array_equal(
      np.asarray(state.slow_params["w"]),
      np.asarray(params["w"].astype(jnp.float32)))


def test_bfloat16_slow_weights_with_a_momentum_outer():
  tx = diloco_tx()
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                        replicate(worker.init_params()))
  state = jax.pmap(tx.init)(params)
  dtypes = [a.dtype for a in jax.tree.leaves(state)]
  xs, ys = worker.make_data(STEPS)
  step = pmap_step(tx, donate=False)
  for t in range(K):
    params, state = step(params, state, xs[:, t], ys[:, t])
    assert [a.dtype for a in jax.tree.leaves(state)] == dtypes
  for k in params:
    assert_same_on_all_replicas(state.slow_params[k], k)
    assert_bitwise(params[k], state.slow_params[k], k)


def test_bfloat16_params_land_on_the_slow_weights():
  tx = diloco_tx(outer=optax.sgd(0.3))
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                        replicate(worker.init_params()))
  state = jax.pmap(tx.init)(params)
  xs, ys = worker.make_data(STEPS)
  step = pmap_step(tx, donate=False)
  for t in range(2 * K):
    params, state = step(params, state, xs[:, t], ys[:, t])
    if (t + 1) % K == 0:
      for k in params:
        slow = np.asarray(state.slow_params[k].astype(jnp.float32))
        assert_same_on_all_replicas(slow, k)
        # Weights in [1, 2] that move by < 0.2: the landing must be exact.
        assert np.all((slow > 0.5) & (slow < 3.0))
        assert_bitwise(np.asarray(params[k].astype(jnp.float32)), slow,
                       f"params {k} after step {t + 1}")


def test_hlo_checker_sees_a_collective_outside_the_cond():
  """The checker is not vacuous: a step that pmeans its grads fails it."""
  tx = diloco_tx()

  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), AXIS)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  text = jax.pmap(step, axis_name=AXIS).lower(*_args(tx)).compile().as_text()
  with pytest.raises(AssertionError):
    assert_collectives_only_in_sync_branch(text)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_axis_name_outside_a_mapped_axis_raises_at_trace_time():
  tx = diloco_tx()
  params = worker.init_params()
  state = tx.init(params)
  grads = jax.tree.map(np.ones_like, params)
  message = r"`axis_name` 'data' is not the name of a mapped axis"
  traced = []

  @jax.jit
  def step(grads, state, params):
    traced.append(True)
    return tx.update(grads, state, params)

  with pytest.raises(ValueError, match=message):
    step(grads, state, params)
  assert traced == [True]  # raised while tracing
  with pytest.raises(ValueError, match=message):
    tx.update(grads, state, params)  # eagerly
  with pytest.raises(ValueError, match=message):  # a pmap axis of another name
    jax.pmap(lambda g, s, p: tx.update(g, s, p), axis_name="batch")(
        *replicate((grads, state, params)))


@pytest.mark.parametrize("factory", ["lookahead", "snoo"])
@pytest.mark.parametrize("kwargs,shown", [
    (dict(axis_name=AXIS), "lo.diloco(inner, sync_period, axis_name='data', "),
    (dict(axis_name=AXIS, fragments=2, communication_dtype=jnp.int8),
     "fragments=2, communication_dtype=jnp.int8)"),
    (dict(error_feedback=True), "axis_name='replicas'"),
    (dict(overlap=True, mix=0.25), "overlap=True, mix=0.25)"),
])
def test_one_device_factories_point_replica_arguments_to_diloco(
    factory, kwargs, shown):
  make = getattr(lo, factory)
  first = next(iter(kwargs))
  with pytest.raises(TypeError) as info:
    make(inner_tx(), K, **kwargs)
  message = str(info.value)
  assert f"`{factory}` runs on one device and takes no `{first}`" in message
  assert shown in message, message
  if factory == "lookahead":
    assert "outer=optax.sgd(0.5)" in message  # lookahead's default alpha
  else:
    assert "learning_rate=0.68, momentum=0.37" in message


def test_lookahead_step_size_shows_as_the_outer_sgd():
  with pytest.raises(TypeError, match=re.escape(
      "lo.diloco(inner, sync_period, axis_name='data', "
      "outer=optax.sgd(0.3))")):
    lo.lookahead(inner_tx(), K, 0.3, axis_name=AXIS)
  with pytest.raises(TypeError, match=re.escape("outer=outer, fragments=2")):
    lo.lookahead(inner_tx(), K, outer=optax.sgd(0.1), axis_name=AXIS,
                 fragments=2)


# ---------------------------------------------------------------------------
# Checkpoint and resume.
# ---------------------------------------------------------------------------


def test_checkpoint_resume_is_bitwise(tmp_path, data):
  xs, ys, params0 = data
  tx = diloco_tx()
  step = pmap_step(tx)  # donates params and state
  params = replicate(params0)
  state = jax.pmap(tx.init)(params)
  for t in range(4):  # one sync, then one step into the second cycle
    params, state = step(params, state, xs[:, t], ys[:, t])
  leaves, treedef = jax.tree.flatten((params, state))
  np.savez(tmp_path / "ckpt.npz", *[np.asarray(a) for a in leaves])
  assert np.max(np.abs(np.asarray(outer_momentum(state)["w"]))) > 1e-2
  for t in range(4, STEPS):
    params, state = step(params, state, xs[:, t], ys[:, t])
  expected = to_numpy((params, state))

  with np.load(tmp_path / "ckpt.npz") as f:
    restored = jax.tree.unflatten(
        treedef, [f[f"arr_{i}"] for i in range(len(leaves))])
  params, state = jax.tree.map(jnp.asarray, restored)
  assert isinstance(state, lo.LookaheadState)
  for t in range(4, STEPS):
    params, state = step(params, state, xs[:, t], ys[:, t])
  for a, e in zip(jax.tree.leaves((params, state)), jax.tree.leaves(expected)):
    assert_bitwise(a, e)
  np.testing.assert_array_equal(state.step, np.full(N, STEPS, np.int32))


# ---------------------------------------------------------------------------
# Two processes joined by jax.distributed.
# ---------------------------------------------------------------------------

NUM_PROCESSES = _multiprocess.NUM_PROCESSES
DEVICES_PER_PROCESS = _multiprocess.DEVICES_PER_PROCESS


@pytest.fixture(scope="module")
def multiprocess_results(tmp_path_factory):
  return _multiprocess.run_workers(
      WORKER, tmp_path_factory.mktemp("diloco_multiprocess"))


def test_two_processes_match_one_process(multiprocess_results):
  first, second = multiprocess_results
  for i, result in enumerate(multiprocess_results):
    assert int(result["process_count"]) == NUM_PROCESSES, i
    assert int(result["device_count"]) == N, i
    assert int(result["local_device_count"]) == DEVICES_PER_PROCESS, i
    np.testing.assert_array_equal(result["step"],
                                  np.full(N, worker.STEPS, np.int32))
  # Both processes gathered the same global arrays, bitwise.
  assert sorted(first) == sorted(second)
  for key in first:
    assert_bitwise(first[key], second[key], key)
  # The slow weights are one value on all 8 replicas, across the processes.
  for key in ("slow/w", "slow/b", "momentum/w", "momentum/b"):
    assert_same_on_all_replicas(first[key], key)

  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  params, slow, momentum, _ = worker.train(mesh)
  for k in params:
    # Bitwise equal on the machines we ran it on (a max difference of 0),
    # but gloo's cross-process all-reduce is free to sum in another order
    # than the in-process one: asserted to within float32 rounding.
    np.testing.assert_allclose(first[f"slow/{k}"], slow[k], rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(first[f"momentum/{k}"], momentum[k], rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(first[f"params/{k}"], params[k], rtol=0,
                               atol=1e-6)
  # 7 = 2 * 3 + 1: the replicas took one step of their own from the slow
  # weights, on different data.
  assert np.max(np.abs(first["params/w"] - first["params/w"][0])) > 1e-3


def test_two_processes_streaming_int8_match_one_process(multiprocess_results):
  """int8 pseudo-gradients (all-to-all and all-gather across processes)."""
  first, _ = multiprocess_results
  for key in ("streaming_slow/w", "streaming_slow/b"):
    assert_same_on_all_replicas(first[key], key)
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  params, slow, momentum, _ = worker.train(mesh, streaming=True)
  for k in params:
    # The collectives move int8 and float32 scales, summed in float32 on
    # one replica per shard: the same values across processes, to rounding.
    np.testing.assert_allclose(first[f"streaming_slow/{k}"], slow[k],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(first[f"streaming_momentum/{k}"],
                               momentum[k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(first[f"streaming_params/{k}"], params[k],
                               rtol=0, atol=1e-6)
  # And int8 is not float32: the slow weights differ from the plain run's.
  assert np.max(np.abs(first["streaming_slow/w"] - first["slow/w"])) > 1e-5


def test_two_processes_slices_match_one_process(multiprocess_results):
  """fragments="slices": collectives at every step, across processes."""
  first, second = multiprocess_results
  for key in ("slices_slow/w", "slices_slow/b"):
    assert_same_on_all_replicas(first[key], key)
    assert_bitwise(first[key], second[key], key)
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  params, slow, momentum, _ = worker.train(mesh, slices=True)
  for k in params:  # as one process with 8 devices, to float32 rounding
    np.testing.assert_allclose(first[f"slices_slow/{k}"], slow[k], rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(first[f"slices_momentum/{k}"], momentum[k],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(first[f"slices_params/{k}"], params[k],
                               rtol=0, atol=1e-6)
  # A slice a step is not the whole model every 3 steps.
  assert np.max(np.abs(first["slices_slow/w"] - first["slow/w"])) > 1e-4


def test_two_processes_heal_replicas_that_go_wrong(multiprocess_results):
  """A replica started apart is repaired, a NaN rolled back, across hosts."""
  first, second = multiprocess_results
  for key in ("faults_slow/w", "faults_slow/b"):
    assert_same_on_all_replicas(first[key], key)  # healed: one value
  for key in ("faults_slow/w", "faults_slow/b", "faults_params/w",
              "faults_params/b"):  # params: a step past the sync, apart
    assert_bitwise(first[key], second[key], key)
    assert np.all(np.isfinite(first[key])), key
  counts = {k.split("/")[1]: first[k] for k in first
            if k.startswith("faults_counts/")}
  np.testing.assert_array_equal(counts["disagreed"], 1)  # replica 5, sync 1
  assert np.all(counts["repaired"] >= 1)
  np.testing.assert_array_equal(counts["sat_out"], 1)  # replica 2, sync 2
  np.testing.assert_array_equal(counts["skipped_syncs"], 0)
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  params, slow, _, _, one = worker.train(mesh, faults=True)
  for k in params:  # as one process with 8 devices, to float32 rounding
    np.testing.assert_allclose(first[f"faults_slow/{k}"], slow[k], rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(first[f"faults_params/{k}"], params[k],
                               rtol=0, atol=1e-6)
  for k, v in one.items():
    np.testing.assert_array_equal(counts[k], v, err_msg=k)


def test_check_replicas_agree_names_the_leaf_and_replica():
  same = {"w": jnp.stack([jnp.arange(3.0)] * 4), "b": jnp.zeros((4, 2))}
  lo.check_replicas_agree(same)
  apart = dict(same, b=same["b"].at[2, 1].set(1e-30))
  with pytest.raises(ValueError, match=r"`params` leaf \['b'\] differs "
                     r"between replicas 0 and 2: DiLoCo .*jax.pmap\(init\)"):
    lo.check_replicas_agree(apart)
  signed = dict(same, b=same["b"].at[3, 0].set(-0.0))  # bitwise, not ==
  with pytest.raises(ValueError, match="between replicas 0 and 3"):
    lo.check_replicas_agree(signed)
  keys = jax.random.split(jax.random.key(0), 4)
  per_device = jax.vmap(lambda k: {"w": jax.random.normal(k, (3,))})(keys)
  with pytest.raises(ValueError, match=r"\['w'\] differs between replicas"):
    lo.check_replicas_agree(per_device)
  with pytest.raises(ValueError, match="is a scalar: expected a leading"):
    lo.check_replicas_agree({"s": jnp.ones(())}, name="state")


def test_diloco_default_outer_is_nesterov_with_the_default_settings():
  inner = optax.adamw(0.03)
  params = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
  rep = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  devices = jax.devices()[:2]

  def lowered(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    state = jax.pmap(tx.init, devices=devices)(rep)
    return jax.pmap(step, axis_name="data", devices=devices).lower(
        rep, state, rep).as_text()

  from lookahead_optax import _diloco  # pylint: disable=import-outside-toplevel
  explicit = lo.diloco(inner, 7, "data", inner_state="reset",
                       outer=optax.sgd(_diloco.DEFAULT_LEARNING_RATE,
                                       momentum=_diloco.DEFAULT_MOMENTUM,
                                       nesterov=True))
  preset = lo.diloco(inner, 7, "data", inner_state="reset")
  strip = lambda t: re.sub(r"loc\(.*?\)", "", t)  # pylint: disable=unnecessary-lambda-assignment
  assert strip(lowered(preset)) == strip(lowered(explicit))
  other = lo.diloco(inner, 7, "data", learning_rate=0.5, momentum=0.8)
  assert strip(lowered(other)) != strip(lowered(explicit))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(axis_name=None), TypeError, "`axis_name` of `diloco` must be a "
     "non-empty string"),
    (dict(axis_name=3), TypeError, "`axis_name` of `diloco` must be a "
     "non-empty string .* got 3"),
    (dict(outer=optax.sgd(1.0), learning_rate=0.5), ValueError,
     "`learning_rate` and `outer` cannot both be given"),
    (dict(outer=optax.sgd(1.0), momentum=0.5), ValueError,
     "`momentum` and `outer` cannot both be given"),
    (dict(outer=3), TypeError, "`outer` must be an optax"),
    (dict(slow_step_size=0.5), TypeError, "slow_step_size"),
    (dict(on_nonfinite="skip"), ValueError,
     "`on_nonfinite` must be one of 'propagate', 'rollback', got 'skip'"),
    (dict(sync="select"), TypeError, "sync"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(learning_rate=-0.1), ValueError, "learning_rate"),
    (dict(inner_state="pullback"), ValueError,
     "`inner_state` must be one of 'keep', 'reset', got 'pullback'"),
    (dict(slow_dtype=jnp.int32), TypeError, "`slow_dtype` must be a floating"),
    (dict(sync_period=0), ValueError, "sync_period"),
    (dict(check_replicas="fix"), ValueError,
     "`check_replicas` must be one of 'detect', 'repair', got 'fix'"),
])
def test_diloco_bad_arguments(kwargs, error, match):
  args = dict(axis_name="data", sync_period=5)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    lo.diloco(optax.adamw(0.1), **args)


# ---------------------------------------------------------------------------
# The program depends on the values of the arguments only.
# ---------------------------------------------------------------------------


def _jaxpr_and_structure(tx, replicas=2):
  """The jaxpr of one vmapped replica step, and the state's structure."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.arange(3.0)}
  rep = jax.tree.map(lambda a: jnp.stack([a] * replicas), params)
  state = jax.eval_shape(jax.vmap(tx.init), rep)

  def step(p, s, g):
    return tx.update(g, s, p)
  jaxpr = jax.make_jaxpr(jax.vmap(step, axis_name=AXIS))(rep, state, rep)
  return str(jaxpr), jax.tree.structure(state)


@pytest.mark.parametrize("name,default", [
    ("learning_rate", None), ("momentum", None), ("outer", None),
    ("fragments", None), ("fragments", 1), ("communication_dtype", None),
    ("communication_dtype", jnp.float32), ("error_feedback", False),
    ("overlap", False), ("mix", None), ("mix", 0.0), ("mix", 0),
    ("inner_state", "keep"), ("on_nonfinite", "propagate"),
    ("slow_dtype", None), ("min_replicas", None),
    ("min_replicas", 1), ("check_replicas", None),
])
def test_passing_a_default_is_omitting_it(name, default):
  omitted = _jaxpr_and_structure(lo.diloco(optax.adam(0.1), 4, AXIS))
  passed = _jaxpr_and_structure(
      lo.diloco(optax.adam(0.1), 4, AXIS, **{name: default}))
  assert passed[1] == omitted[1]
  assert passed[0] == omitted[0]


def test_default_outer_values_passed_are_the_default():
  from lookahead_optax import _diloco  # pylint: disable=import-outside-toplevel
  omitted = _jaxpr_and_structure(lo.diloco(optax.adam(0.1), 4, AXIS))
  passed = _jaxpr_and_structure(lo.diloco(
      optax.adam(0.1), 4, AXIS, _diloco.DEFAULT_LEARNING_RATE,
      _diloco.DEFAULT_MOMENTUM))
  assert passed == omitted
  # And a value that is not the default gives another program.
  other = _jaxpr_and_structure(lo.diloco(optax.adam(0.1), 4, AXIS, 0.5))
  assert other[0] != omitted[0]


def test_one_fragment_state_is_a_streaming_state():
  tx = lo.diloco(optax.adam(0.1), 4, AXIS)
  state = tx.init({"w": jnp.ones(3)})
  assert isinstance(state.outer_state, lo.StreamingState)
  assert len(state.outer_state.outer_states) == 1
  assert state.outer_state.residuals is None


def test_help_lists_every_argument():
  import inspect  # pylint: disable=import-outside-toplevel
  names = list(inspect.signature(lo.diloco).parameters)
  assert names == [
      "inner", "sync_period", "axis_name", "learning_rate", "momentum",
      "outer", "fragments", "communication_dtype", "error_feedback",
      "overlap", "mix", "inner_state", "on_nonfinite", "slow_dtype",
      "min_replicas", "check_replicas"]
  assert not any(p.kind == p.VAR_KEYWORD for p in
                 inspect.signature(lo.diloco).parameters.values())
  assert len(inspect.signature(lo.lookahead).parameters) <= 9
  for name in names:
    assert f"    {name}:" in lo.diloco.__doc__, name
  assert list(inspect.signature(lo.snoo).parameters) == [
      "inner", "sync_period", "learning_rate", "momentum", "inner_state",
      "sync", "on_nonfinite", "slow_dtype"]


# ---------------------------------------------------------------------------
# Composition: inject_hyperparams, shard_map blocks.
# ---------------------------------------------------------------------------


def test_inject_hyperparams_diloco_matches_the_plain_one(data):
  xs, ys, params0 = data
  injected = optax.inject_hyperparams(
      lo.diloco, static_args=("sync_period", "axis_name"))(
          inner_tx(), K, AXIS, learning_rate=OUTER_LR, momentum=OUTER_MU)
  params, state = run_pmap(injected, xs, ys, params0, 2 * K)[-1]
  hyper = state.hyperparams
  np.testing.assert_allclose(hyper["learning_rate"], OUTER_LR)
  np.testing.assert_allclose(hyper["momentum"], OUTER_MU)
  ref = simulate(xs, ys, params0, 2 * K)
  assert_close(params, ref["params"])
  assert_close(jax.tree.map(lambda a: a[0], lo.slow_params(state.inner_state)),
               ref["slow"])


def test_inject_hyperparams_snoo_matches_the_plain_one():
  inner = optax.sgd(0.5)
  injected = optax.inject_hyperparams(lo.snoo)(inner, 2, 0.5, 0.5)
  plain = lo.snoo(inner, 2, learning_rate=0.5, momentum=0.5)
  step = jax.jit(lambda tx_update, g, s, p: tx_update(g, s, p),
                 static_argnums=0)
  results = []
  for tx in (injected, plain):
    params = jnp.array([4.0])
    state = tx.init(params)
    for _ in range(4):
      updates, state = step(tx.update, params, state, params)
      params = optax.apply_updates(params, updates)
    results.append(params)
  # The docstring's hand-worked value of `snoo`: 0.390625.
  np.testing.assert_allclose(results[0], [0.390625], rtol=1e-6)
  np.testing.assert_allclose(results[1], [0.390625], rtol=1e-6)


def test_shard_map_block_with_its_replica_axis_names_the_squeeze():
  tx = diloco_tx()
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  params = replicate(worker.init_params())
  state = jax.jit(jax.shard_map(
      lambda p: jax.tree.map(lambda a: a[None], tx.init(
          jax.tree.map(lambda a: a[0], p))),
      mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))(params)

  def unsqueezed(p, s, g):  # forgot to drop the block's leading axis
    return tx.update(g, s, p)

  step = jax.jit(jax.shard_map(unsqueezed, mesh=mesh, in_specs=P(AXIS),
                               out_specs=P(AXIS)))
  with pytest.raises(ValueError, match=r"step counter has shape \(1,\), not "
                     r"\(\): .* `shard_map` .* squeeze it"):
    step(params, state, params)


def test_apply_if_finite_inside_diloco_keeps_every_replica_in_step():
  """The documented recipe: a NaN step is skipped, every replica syncs."""
  tx = lo.diloco(optax.apply_if_finite(optax.sgd(0.5), 3), 2, AXIS,
                 learning_rate=1.0, momentum=0.0)
  params = replicate(jnp.array([4.0, -2.0]))
  state = jax.pmap(tx.init)(params)

  @functools.partial(jax.pmap, axis_name=AXIS)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  grads = np.tile(np.float32([1.0, -1.0]), (N, 1))
  bad = grads.copy()
  bad[3, 0] = np.nan  # replica 3's first step is not finite
  params, state = step(params, state, bad)
  params, state = step(params, state, grads)
  np.testing.assert_array_equal(state.step, np.full(N, 2, np.int32))
  # Plain averaging: replica 3 moved once (by 0.5), the others twice.
  mean_move = (7 * 1.0 + 0.5) / 8
  expected = np.float32([4.0 - mean_move, -2.0 + mean_move])
  slow = np.asarray(lo.slow_params(state))
  assert_same_on_all_replicas(slow)
  np.testing.assert_allclose(slow[0], expected, rtol=1e-6)
  assert_bitwise(np.asarray(params), slow)
