"""`diloco`'s replica weights and quorum, against a NumPy simulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bitwise
from tests._helpers import equations

N = 8  # replicas
K = 2  # sync period
AXIS = "data"
LR, OUTER_LR, MU = 0.25, 0.8, 0.6
DIM = 300  # two int8 blocks of 256 values

pytestmark = pytest.mark.skipif(
    jax.device_count() < N, reason="needs 8 devices (see conftest.py)")


START = 3.0  # weights far from 0 move by less than 2x: exact landings


def targets(seed):
  rng = np.random.default_rng(seed)
  return (START + rng.normal(size=(N, DIM))).astype(np.float32)


@functools.cache
def program(fmt, min_replicas):
  dtype = {"bfloat16": jnp.bfloat16, "float8_e4m3fn": jnp.float8_e4m3fn,
           "int8": jnp.int8}.get(fmt, fmt)
  tx = lo.diloco(optax.sgd(LR), K, AXIS, OUTER_LR, MU,
                 communication_dtype=dtype, min_replicas=min_replicas)

  def step(p, s, target, w):
    u, s = tx.update(p - target, s, p, weight=w)  # loss 0.5 (p - target)**2
    return optax.apply_updates(p, u), s

  return tx, jax.pmap(step, axis_name=AXIS)


def run(fmt, min_replicas, weights, seed=0, syncs=2):
  """`syncs` cycles with per-sync `weights` (syncs, N); NumPy results."""
  tx, step = program(fmt, min_replicas)
  params = jnp.full((N, DIM), START, jnp.float32)
  state = jax.pmap(tx.init)(params)
  tgt = targets(seed)
  history = []
  for c in range(syncs):
    for _ in range(K):
      params, state = step(params, state, tgt, jnp.asarray(weights[c]))
    history.append(jax.tree.map(np.asarray, (params, state)))
  return history


def simulate(weights, min_replicas, seed=0, syncs=2):
  """DiLoCo by hand: weighted mean, Nesterov outer step, quorum."""
  tgt = targets(seed).astype(np.float64)
  slow, b = np.full(DIM, START), np.zeros(DIM)
  out = []
  skipped = sat_out = 0
  for c in range(syncs):
    fast = np.broadcast_to(slow, (N, DIM)).copy()
    for _ in range(K):
      fast = fast - LR * (fast - tgt)
    w = np.asarray(weights[c], np.float64)
    use = w > 0
    sat_out += N - use.sum()
    bound = 0.0
    if use.sum() >= min_replicas:
      sent = w[:, None] * (slow - fast)
      delta = sent.sum(0) / w.sum()
      # Each message within QUANTUM * amax of its block, the mean too.
      bound = (np.abs(sent).max(1).sum() / w.sum()
               + np.abs(delta).max()) * OUTER_LR * (1 + MU)
      b = MU * b + delta
      slow = slow - OUTER_LR * (MU * b + delta)
    else:
      skipped += 1
    out.append(dict(slow=slow.copy(), b=b.copy(), skipped=skipped,
                    sat_out=sat_out, last=N - use.sum(), bound=bound))
  return out


WEIGHTS = {
    "tokens": [[3.0, 0.0, 1.0, 7.5, 2.0, 0.0, 4.0, 1.0],
               [1.0, 2.0, 0.0, 0.0, 0.0, 5.0, 0.5, 3.0]],
    "one_left": [[0.0] * 7 + [2.0], [1.0] * 8],
    "none": [[0.0] * 8, [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]],
}


# Per encoding, a value's error over its block's max |x|.
QUANTUM = {None: 0.0, "bfloat16": 2**-8, "float8_e4m3fn": 2**-4,
           "int8": 1 / 252, "int4": 1 / 12}


@pytest.mark.parametrize("fmt", sorted(QUANTUM, key=str))
@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_weighted_mean_matches_simulation(fmt, case):
  weights = np.float32(WEIGHTS[case])
  history = run(fmt, 1, weights)
  ref = simulate(weights, 1)
  bound = 0.0
  for c, (params, state) in enumerate(history):
    bound += QUANTUM[fmt] * ref[c]["bound"]  # the syncs' errors add up
    atol = 2e-6 + bound
    slow = state.slow_params
    assert_bitwise(slow, np.broadcast_to(slow[0], slow.shape))  # agree
    assert_bitwise(params, slow)  # every replica lands, sat out or not
    np.testing.assert_allclose(slow[0], ref[c]["slow"], rtol=0, atol=atol)
    counts = state.outer_state.counts
    np.testing.assert_array_equal(counts.skipped_syncs, ref[c]["skipped"])
    np.testing.assert_array_equal(counts.sat_out, ref[c]["sat_out"])
    np.testing.assert_array_equal(counts.sat_out_last, ref[c]["last"])
  if case == "tokens":  # the weights matter: the plain mean is elsewhere
    plain = simulate(np.ones((2, N)), 1)
    assert np.max(np.abs(plain[0]["slow"] - ref[0]["slow"])) > 0.05


def test_shard_map_matches_pmap_with_weights():
  """The weights' all-gather under `shard_map`, against the pmapped run."""
  weights = np.float32(WEIGHTS["tokens"])
  expected = run("int8", 2, weights)[-1]
  tx, _ = program("int8", 2)
  mesh = jax.make_mesh((N,), (AXIS,))
  shard = lambda tree: jax.device_put(  # pylint: disable=unnecessary-lambda-assignment
      tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))

  def block(p, s, target, w):
    p, s, target, w = jax.tree.map(lambda a: a[0], (p, s, target, w))
    u, s = tx.update(p - target, s, p, weight=w)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  step = jax.jit(jax.shard_map(block, mesh=mesh,
                               in_specs=jax.sharding.PartitionSpec(AXIS),
                               out_specs=jax.sharding.PartitionSpec(AXIS)))
  params = jnp.full((N, DIM), START, jnp.float32)
  state = shard(jax.pmap(tx.init)(params))
  params = shard(params)
  tgt = shard(jnp.asarray(targets(0)))
  for c in range(2):
    for _ in range(K):
      params, state = step(params, state, tgt, shard(jnp.asarray(weights[c])))
  slow = np.asarray(state.slow_params)
  assert_bitwise(slow, np.broadcast_to(slow[0], slow.shape))
  np.testing.assert_allclose(slow, expected[1].slow_params, rtol=0,
                             atol=1e-5)
  np.testing.assert_array_equal(state.outer_state.counts.sat_out,
                                expected[1].outer_state.counts.sat_out)
  np.testing.assert_array_equal(state.outer_state.counts.sat_out, 5)


def test_quorum_skips_the_sync_and_lands_back():
  weights = np.float32([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0]])
  history = run(None, 5, weights)
  ref = simulate(weights, 5)
  (p1, s1), (p2, s2) = history
  np.testing.assert_array_equal(s1.slow_params, START)  # no move at sync 1
  np.testing.assert_array_equal(p1, START)  # every replica back on them
  momentum = s1.outer_state.outer_states[0][0].trace
  np.testing.assert_array_equal(momentum, 0.0)  # the outer state stays
  np.testing.assert_array_equal(s1.outer_state.counts.skipped_syncs, 1)
  np.testing.assert_allclose(s2.slow_params[0], ref[1]["slow"], atol=2e-6)
  np.testing.assert_array_equal(s2.outer_state.counts.skipped_syncs, 1)
  np.testing.assert_array_equal(s2.outer_state.counts.sat_out_last, 2)
  assert_bitwise(p2, s2.slow_params)


def test_without_weight_the_program_is_plain_diloco():
  tx = lo.diloco(optax.sgd(LR), K, AXIS, OUTER_LR, MU)
  params = jnp.zeros((2, DIM))
  state = jax.eval_shape(jax.vmap(tx.init), params)

  def plain(p, s, g):
    return tx.update(g, s, p)

  def none(p, s, g):
    return tx.update(g, s, p, weight=None)
  a = jax.make_jaxpr(jax.vmap(plain, axis_name=AXIS))(params, state, params)
  b = jax.make_jaxpr(jax.vmap(none, axis_name=AXIS))(params, state, params)
  assert str(a) == str(b)
  assert str(a).count("psum[") == 1  # the pmean of the pseudo-gradient
  weighted = jax.make_jaxpr(jax.vmap(
      lambda p, s, g: tx.update(g, s, p, weight=jnp.float32(1.0)),
      axis_name=AXIS))(params, state, params)
  # The weights: one float32 scalar per replica, all-gathered.
  assert str(weighted).count("psum[") == 1
  # (Under `vmap` an all-gather is no collective: look under `pmap`.)
  pmapped = jax.make_jaxpr(jax.pmap(
      lambda p, s, g: tx.update(g, s, p, weight=jnp.float32(1.0)),
      axis_name=AXIS, devices=jax.devices()[:2]))(params, state, params)
  assert [(v.aval.shape, v.aval.dtype) for e in equations(
      pmapped.jaxpr, "all_gather") for v in e.invars] == [((), jnp.float32)]
  assert len([v for e in equations(pmapped.jaxpr, "psum")
              for v in e.invars]) == 1  # the pseudo-gradient


@pytest.mark.parametrize("weight,error,match", [
    (-1.0, ValueError, r"`weight` must be a finite number >= 0"),
    (float("nan"), ValueError, r"`weight` must be a finite number >= 0"),
    (float("inf"), ValueError, r"`weight` must be a finite number >= 0"),
    (np.ones(2, np.float32), TypeError, r"`weight` must be a real scalar"),
    ("3", TypeError, r"`weight` must be a real scalar"),
    (True, TypeError, r"`weight` must be a real scalar"),
])
def test_bad_weight_is_named(weight, error, match):
  tx = lo.diloco(optax.sgd(LR), K, AXIS)
  params = jnp.zeros((2, 3))
  state = jax.vmap(tx.init)(params)
  with pytest.raises(error, match=match):
    jax.vmap(lambda p, s: tx.update(p, s, p, weight=weight),
             axis_name=AXIS)(params, state)


def test_traced_weight_of_the_wrong_shape_is_named():
  tx = lo.diloco(optax.sgd(LR), K, AXIS)
  params = jnp.zeros((2, 3))
  state = jax.vmap(tx.init)(params)
  with pytest.raises(TypeError, match=r"`weight` must be a real scalar per "
                     r"replica .* got float32\[2\]"):
    jax.vmap(lambda p, s, w: tx.update(p, s, p, weight=w),
             axis_name=AXIS)(params, state, jnp.ones((2, 2)))


@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError),
                                         (1.5, TypeError), (True, TypeError),
                                         ("2", TypeError)])
def test_bad_min_replicas_at_construction(value, error):
  with pytest.raises(error, match=r"`min_replicas` must be an integer >= 1"):
    lo.diloco(optax.sgd(LR), K, AXIS, min_replicas=value)


def test_min_replicas_above_the_replicas_at_the_first_update():
  tx = lo.diloco(optax.sgd(LR), K, AXIS, min_replicas=3)
  params = jnp.zeros((2, 3))
  state = jax.vmap(tx.init)(params)
  with pytest.raises(ValueError, match=r"`min_replicas=3` is more than the 2 "
                     r"replicas of axis 'data'"):
    jax.vmap(lambda p, s: tx.update(p, s, p), axis_name=AXIS)(params, state)


# ---------------------------------------------------------------------------
# on_nonfinite="rollback": a replica that goes wrong heals on its own.
# ---------------------------------------------------------------------------

MOMENTUM = 0.5  # the inner SGD's: a state that the rollback resets
# (step t, replica, value): NaN off a sync, Inf on one, two at the last.
FAULTS = [(0, 3, np.nan), (3, 5, np.inf), (5, 1, np.nan), (5, 2, -np.inf)]


@functools.cache
def rollback_program(fmt):
  tx = lo.diloco(optax.sgd(LR, momentum=MOMENTUM), K, AXIS, OUTER_LR, MU,
                 communication_dtype=None if fmt is None else jnp.int8,
                 on_nonfinite="rollback")

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return tx, jax.pmap(step, axis_name=AXIS)


def faulty_grads(params, tgt, t):
  grads = np.asarray(params) - tgt
  for when, replica, value in FAULTS:
    if when == t:
      grads[replica, 7] = value
  return grads


def simulate_rollback(steps, seed=0):
  tgt = targets(seed).astype(np.float64)
  slow, b = np.full(DIM, START), np.zeros(DIM)
  fast = np.broadcast_to(slow, (N, DIM)).copy()
  trace = np.zeros((N, DIM))
  out = []
  for t in range(steps):
    grads = faulty_grads(fast, tgt, t)
    bad = ~np.all(np.isfinite(grads), axis=1)
    trace = np.where(bad[:, None], 0.0, MOMENTUM * trace + grads)
    fast = np.where(bad[:, None], slow, fast - LR * trace)
    if (t + 1) % K == 0:
      use = ~bad
      delta = (slow - fast)[use].sum(0) / use.sum()
      b = MU * b + delta
      slow = slow - OUTER_LR * (MU * b + delta)
      fast = np.broadcast_to(slow, (N, DIM)).copy()
      out.append(dict(slow=slow.copy(), sat_out=N - use.sum()))
  return out, trace


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_rollback_replicas_heal_and_match_simulation(fmt):
  tx, step = rollback_program(fmt)
  params = jnp.full((N, DIM), START, jnp.float32)
  state = jax.pmap(tx.init)(params)
  tgt = targets(0)
  steps = 3 * K
  ref, _ = simulate_rollback(steps)
  syncs = 0
  for t in range(steps):
    params, state = step(params, state, faulty_grads(params, tgt, t))
    p, slow = np.asarray(params), np.asarray(state.slow_params)
    trace = np.asarray(state.inner_state[0].trace)
    assert np.all(np.isfinite(p)), t
    for when, replica, _ in FAULTS:
      if when == t:  # back on the slow weights, its momentum reset
        np.testing.assert_array_equal(trace[replica], 0.0)
        if (t + 1) % K:
          assert_bitwise(p[replica], slow[replica])
    if (t + 1) % K == 0:
      assert_bitwise(slow, np.broadcast_to(slow[0], slow.shape))
      assert_bitwise(p, slow)  # every replica, the faulty ones too
      atol = 2e-6 if fmt is None else 0.02
      np.testing.assert_allclose(slow[0], ref[syncs]["slow"], rtol=0,
                                 atol=atol)
      np.testing.assert_array_equal(
          state.outer_state.counts.sat_out_last, ref[syncs]["sat_out"])
      syncs += 1
  # The faults mattered: the healthy-only mean is not the plain one.
  assert ref[1]["sat_out"] == 1 and ref[2]["sat_out"] == 2


def test_rollback_without_faults_is_plain_diloco():
  tx, step = rollback_program(None)
  plain = lo.diloco(optax.sgd(LR, momentum=MOMENTUM), K, AXIS, OUTER_LR, MU)
  plain_step = jax.pmap(lambda p, s, g: (lambda u_s: (
      optax.apply_updates(p, u_s[0]), u_s[1]))(plain.update(g, s, p)),
                        axis_name=AXIS)
  tgt = targets(1)
  runs = []
  for t_x, st in ((tx, step), (plain, plain_step)):
    params = jnp.full((N, DIM), START, jnp.float32)
    state = jax.pmap(t_x.init)(params)
    for _ in range(2 * K):
      params, state = st(params, state, np.asarray(params) - tgt)
    runs.append(np.asarray(state.slow_params))
  # Two programs (a weighted mean of all-ones weights): to rounding.
  np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------
# check_replicas: replicas that drifted apart are seen, and repaired.
# ---------------------------------------------------------------------------


@functools.cache
def checked_program(mode):
  tx = lo.diloco(optax.sgd(LR), K, AXIS, OUTER_LR, MU, check_replicas=mode)

  def step(p, s, target):
    g = jax.tree.map(lambda x, t: x - t, p, target)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return tx, jax.pmap(step, axis_name=AXIS)


def flipped(array, replica, index, bit):
  out = np.array(array)
  out[replica].reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
  return out


def checked_run(mode, corrupt):
  """Two steps (one sync); before the sync, optionally corrupt replicas."""
  tx, step = checked_program(mode)
  params = {"a": jnp.full((N, DIM), START), "b": jnp.full((N, 3), START)}
  tgt = {"a": targets(2), "b": targets(3)[:, :3]}
  state = jax.pmap(tx.init)(params)
  params, state = step(params, state, tgt)
  if corrupt:
    slow = dict(state.slow_params, a=flipped(state.slow_params["a"], 3, 5, 3))
    outer = state.outer_state
    (trace, rest), = outer.outer_states  # the one fragment's Nesterov SGD
    # The momentum is still 0 before the first sync: a low bit flipped
    # there would round away at the sync, bit 30 makes it 2.0.
    trace = trace._replace(trace=dict(
        trace.trace, b=flipped(trace.trace["b"], 6, 1, 30)))
    state = state._replace(slow_params=slow, outer_state=outer._replace(
        outer_states=((trace, rest),)))
  params, state = step(params, state, tgt)
  return jax.tree.map(np.asarray, (params, state))


def test_check_replicas_detects_and_repairs_a_flipped_bit():
  clean = checked_run("repair", corrupt=False)
  np.testing.assert_array_equal(clean[1].outer_state.counts.disagreed, 0)
  detected = checked_run("detect", corrupt=True)
  counts = detected[1].outer_state.counts
  np.testing.assert_array_equal(counts.disagreed, 1)
  np.testing.assert_array_equal(counts.repaired, 0)
  slow_a = detected[1].slow_params["a"]
  assert not np.array_equal(slow_a[3], slow_a[0])  # seen, left as it is
  repaired = checked_run("repair", corrupt=True)
  counts = repaired[1].outer_state.counts
  np.testing.assert_array_equal(counts.disagreed, 1)
  # Slow "a"; momentum "b", and the slow "b" its Nesterov step moved.
  np.testing.assert_array_equal(counts.repaired, 3)
  # Every replica now holds the majority's values bitwise, params (landed
  # after the repair) included: those the healthy replicas computed (the
  # corrupted slow weight also moved the mean, so not the clean run's).
  for got, seen in zip(jax.tree.leaves(repaired), jax.tree.leaves(detected)):
    assert_bitwise(got, np.broadcast_to(got[0], got.shape))
    if got.dtype == np.float32:
      np.testing.assert_allclose(got[0], seen[0], rtol=1e-6)
  assert np.abs(repaired[1].slow_params["a"][3, 5] - slow_a[3, 5]) > 0


def test_majority_takes_the_most_held_value_lowest_index_on_ties():
  from lookahead_optax import _replicas  # pylint: disable=import-outside-toplevel
  values = np.float32([1, 1, 2, 2, 2, 3, 3, 3])[:, None]  # 2 and 3: 3 each
  ties = np.float32([5, 6, 5, 6, 7, 7, 8, 9])[:, None]  # 5, 6, 7: 2 each
  zeros = np.float32([0, 0, -0.0, -0.0, -0.0, 0, 0, 0])[:, None]
  fix = jax.pmap(lambda t: _replicas.majority(t, AXIS, True), axis_name=AXIS)
  tree, agree, first, repaired = fix({"v": values, "t": ties, "z": zeros})
  np.testing.assert_array_equal(tree["v"], 2.0)  # replica 2's, before 3's
  np.testing.assert_array_equal(tree["t"], 5.0)
  assert_bitwise(tree["z"], np.zeros((N, 1), np.float32))  # +0.0: 5 of 8
  assert not np.any(agree)
  np.testing.assert_array_equal(first, 0)  # "t" is leaf 0
  np.testing.assert_array_equal(repaired, 3)
