"""`diloco(..., fragments="slices")`: a slice of every leaf syncs every step.

The reference is `simulate`, a float64 NumPy simulation of 8 replicas
written from the schedule (slice j of every leaf syncs after the steps t
with `t % k == (j + 1) % k`); the library runs under `jax.pmap` on the 8
host CPU devices of conftest.py. The leaves' sizes (15, 7, 2) do not divide
`sync_period = 4`: slices of 4, 2 and 1 values, padded, and leaf `c` has
two slices of padding alone.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks import communication
from tests import reference
from tests._helpers import assert_bitwise
from tests._helpers import batch_reaches_collective
from tests._helpers import equations
from tests._helpers import orbax_round_trip
from tests._helpers import quadratic_grad
from tests._helpers import quadratic_problem
from tests._helpers import assert_tree_bitwise
from tests._helpers import replicate
from tests._helpers import shard_map_run
from tests._helpers import whole_step_jaxpr

N = 8  # replicas
AXIS = "r"
K = 4  # sync_period: 4 slices of every leaf
LR, MU, MIX = 0.7, 0.6, 0.3
SHAPES = {"a": (3, 5), "b": (7,), "c": (2,)}
SIZES = {k: int(np.prod(s)) for k, s in SHAPES.items()}
INNER_LR, MOMENTUM = 0.1, 0.5  # the rollback runs' SGD
# Per encoding, a value's error over its block's max |x|.
QUANTUM = {"bfloat16": 2**-8, "float8_e4m3fn": 2**-4, "int8": 1 / 252,
           "int4": 1 / 12}
DTYPES = {"bfloat16": jnp.bfloat16, "float8_e4m3fn": jnp.float8_e4m3fn,
          "int8": jnp.int8, "int4": "int4"}

pytestmark = pytest.mark.skipif(
    jax.device_count() < N, reason="needs 8 devices (see conftest.py)")


def problem(steps, seed=0):
  """Params, and per replica a quadratic pull towards its own target."""
  return quadratic_problem(SHAPES, N, steps, seed)


grad = quadratic_grad


def _inner(sgd):
  if sgd:
    return optax.sgd(INNER_LR, momentum=MOMENTUM)
  return optax.adam(0.05, b1=0.8, b2=0.95)


@functools.cache
def program(k=K, weighted=False, sgd=False, **kwargs):
  """`(tx, pmapped step, pmapped init)`, compiled once a configuration."""
  kwargs.setdefault("mix", MIX)
  tx = lo.diloco(_inner(sgd), k, AXIS, LR, MU, fragments="slices", **kwargs)

  def step(p, s, c, t, z, w):
    updates, s = tx.update(jax.tree.map(grad, p, c, t, z), s, p,
                           **({"weight": w} if weighted else {}))
    return optax.apply_updates(p, updates), s

  return tx, jax.pmap(step, axis_name=AXIS), jax.pmap(tx.init)


def run(steps, *, weights=None, noise=None, start=None, seed=0, **kwargs):
  """`(params, state)` after every step, as NumPy copies."""
  _, step, init = program(weighted=weights is not None, **kwargs)
  params0, curv, target, noise0 = problem(steps, seed)
  noise = noise0 if noise is None else noise
  if start is None:
    params, first = replicate(params0, N), 0
    state = init(params)
  else:
    (params, state), first = start
  history = []
  for t in range(first, steps):
    w = np.ones(N, np.float32) if weights is None else weights[t]
    params, state = step(params, state, curv, target,
                         {k: v[t] for k, v in noise.items()}, w)
    history.append(jax.tree.map(lambda a: np.array(a, copy=True),
                                (params, state)))
  return history


def simulate(steps, *, k=K, overlap=False, mix=MIX, weights=None,
             min_replicas=1, sgd=False, noise=None, seed=0):
  """The slice schedule over 8 NumPy replicas (float64, flattened leaves).

  Returns per step the slow weights, the outer momentum, each replica's
  slice pseudo-gradients (one vector, as sent) and their mean, and at the
  end every replica's params and the participation counts.
  """
  params0, curv, target, noise0 = problem(steps, seed)
  noise = noise0 if noise is None else noise
  inner = (reference.SGD(INNER_LR, MOMENTUM) if sgd
           else reference.Adam(0.05, b1=0.8, b2=0.95))
  flat = lambda tree: {key: np.asarray(v, np.float64).ravel()  # pylint: disable=unnecessary-lambda-assignment
                       for key, v in tree.items()}
  params = [flat(params0) for _ in range(N)]
  states = [inner.init(params[0]) for _ in range(N)]
  slow, b = flat(params0), {key: np.zeros(n) for key, n in SIZES.items()}
  out = dict(slow=[], momentum=[], sent=[], mean=[], skipped=0, sat_out=[])
  for t in range(1, steps + 1):
    entering = [dict(p) for p in params]
    bad = np.zeros(N, bool)
    for r in range(N):
      g = {key: (curv[key][r].ravel() * (params[r][key]
                                         - target[key][r].ravel())
                 + noise[key][t - 1, r].ravel()) for key in SIZES}
      u, states[r] = inner.update(g, states[r], params[r])
      bad[r] = not all(np.all(np.isfinite(x)) for x in u.values())
      if bad[r]:  # rollback: back to the slow weights, moments reset
        states[r] = {key: (v if key == "count" else
                           {kk: np.zeros_like(vv) for kk, vv in v.items()})
                     for key, v in states[r].items()}
        params[r] = {key: slow[key].copy() for key in SIZES}
      else:
        params[r] = {key: params[r][key] + u[key] for key in SIZES}
    w = np.ones(N) if weights is None else np.asarray(weights[t - 1],
                                                      np.float64)
    w = np.where(bad, 0.0, w)
    use = w > 0
    ok = use.sum() >= min_replicas
    out["skipped"] += int(not ok)
    out["sat_out"].append(int(N - use.sum()))
    j = (t - 1) % k
    source = entering if overlap else params
    sent, means = [], []
    for key, n in SIZES.items():
      m = -(-n // k)
      pos = slice(j * m, min(j * m + m, n))
      d = np.stack([slow[key][pos] - s[key][pos] for s in source])
      sent.append(np.where(use[:, None], w[:, None] * d, 0.0))
      if ok:
        mean = sent[-1].sum(0) / w.sum()
        means.append(mean)
        b[key][pos] = MU * b[key][pos] + mean
        slow[key][pos] = slow[key][pos] - LR * (MU * b[key][pos] + mean)
      for p in params:
        p[key][pos] = mix * p[key][pos] + (1 - mix) * slow[key][pos]
    out["sent"].append(np.concatenate(sent, axis=1))
    out["mean"].append(np.concatenate(means) if means else np.zeros(0))
    out["slow"].append({key: v.copy() for key, v in slow.items()})
    out["momentum"].append({key: v.copy() for key, v in b.items()})
  out["params"] = params
  return out


def flat_slow(state, replica=0):
  return {key: state.slow_params[key][replica].ravel() for key in SIZES}


def assert_agree(state, msg=""):
  """The replicas' slow weights, bitwise the same."""
  for key, a in state.slow_params.items():
    assert_bitwise(a, np.broadcast_to(a[0], a.shape), f"{msg} {key}")


def stacked_momentum(state, key, replica=0):
  """Slice-stacked Nesterov trace (k, m) of `key`, flattened to the leaf."""
  trace = state.outer_state.outer_states[0][0].trace[key][replica]
  return trace.reshape(-1)[:SIZES[key]]


# ---------------------------------------------------------------------------
# Against the NumPy simulation of 8 replicas.
# ---------------------------------------------------------------------------


def test_each_step_moves_one_slice_of_every_leaf():
  history = run(2 * K)
  before = problem(1)[0]
  for t, (_, state) in enumerate(history, start=1):
    j = (t - 1) % K
    for key, n in SIZES.items():
      m = -(-n // K)
      moved = flat_slow(state)[key] != before[key].ravel()
      expected = np.zeros(n, bool)
      expected[j * m:j * m + m] = True
      np.testing.assert_array_equal(moved, expected, err_msg=f"{t} {key}")
    before = {key: state.slow_params[key][0] for key in SIZES}
  # Leaf c (2 values) has slices 0 and 1; slices 2 and 3 are padding.
  assert stacked_momentum(state, "c").shape == (2,)
  assert state.outer_state.outer_states[0][0].trace["c"].shape == (N, K, 1)


@pytest.mark.parametrize("overlap", [False, True])
def test_matches_simulation_of_8_replicas(overlap):
  steps = 3 * K
  history = run(steps, overlap=overlap)
  ref = simulate(steps, overlap=overlap)
  for t, (_, state) in enumerate(history):
    assert_agree(state, f"step {t + 1}")
    for key in SIZES:
      np.testing.assert_allclose(flat_slow(state)[key], ref["slow"][t][key],
                                 rtol=0, atol=3e-6, err_msg=f"{key} {t + 1}")
      np.testing.assert_allclose(stacked_momentum(state, key),
                                 ref["momentum"][t][key], rtol=0, atol=3e-6)
  params = history[-1][0]
  for r in range(N):
    for key in SIZES:
      np.testing.assert_allclose(params[key][r].ravel(),
                                 ref["params"][r][key], rtol=0, atol=3e-6)
  # The replicas drift apart between a value's syncs; overlap matters.
  assert np.max(np.abs(params["a"] - params["a"][0])) > 1e-2
  other = simulate(steps, overlap=not overlap)
  assert np.max(np.abs(other["slow"][-1]["a"] - ref["slow"][-1]["a"])) > 1e-3


def test_sync_period_one_is_plain_diloco():
  """One slice, the whole leaf, every step: DiLoCo with `sync_period=1`."""
  steps = 3
  sliced = run(steps, k=1, mix=0.0)
  tx = lo.diloco(_inner(False), 1, AXIS, LR, MU)
  params0, curv, target, noise = problem(steps)

  def step(p, s, c, t, z):
    updates, s = tx.update(jax.tree.map(grad, p, c, t, z), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.pmap(step, axis_name=AXIS)
  params = replicate(params0, N)
  state = jax.pmap(tx.init)(params)
  for t in range(steps):
    params, state = step(params, state, curv, target,
                         {k: v[t] for k, v in noise.items()})
    for key in SIZES:
      np.testing.assert_allclose(sliced[t][1].slow_params[key],
                                 state.slow_params[key], rtol=0, atol=1e-6)
      np.testing.assert_allclose(sliced[t][0][key], params[key], rtol=0,
                                 atol=1e-6)


# ---------------------------------------------------------------------------
# Wire formats, error feedback, weights, rollback.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(QUANTUM))
def test_compressed_slices_within_quantization(fmt):
  """One period: each slice's first sync is off the float64 mean by at
  most a quantum of each replica's block and one of the mean's, times the
  outer step `lr (1 + mu)` (the problem is elementwise: no other slice's
  error reaches it within the period)."""
  history = run(K, communication_dtype=DTYPES[fmt])
  ref = simulate(K)
  errors = []
  for t, (_, state) in enumerate(history):
    assert_agree(state, f"step {t + 1}")
    j, sent, mean = t, ref["sent"][t], ref["mean"][t]
    bound = (LR * (1 + MU) * QUANTUM[fmt] * 1.01
             * (np.abs(sent).max() + np.abs(mean).max()) + 3e-6)
    for key, n in SIZES.items():
      m = -(-n // K)
      pos = slice(j * m, j * m + m)
      error = np.abs(flat_slow(history[-1][1])[key][pos]
                     - ref["slow"][-1][key][pos])
      assert np.all(error <= bound), (fmt, t, key, error.max(), bound)
      errors.append(error.max(initial=0.0))
  assert max(errors) > 3e-6, fmt  # the format rounded something


def test_error_feedback_stays_closer_to_float32():
  steps = 10 * K
  exact = run(steps)
  plain = run(steps, communication_dtype="int4")
  fed = run(steps, communication_dtype="int4", error_feedback=True)

  def distance(history):
    return np.mean([sum(np.sum((h[1].slow_params[k][0]
                                - e[1].slow_params[k][0]) ** 2)
                        for k in SIZES) ** 0.5
                    for h, e in zip(history, exact)])

  assert distance(fed) < 0.75 * distance(plain), (distance(fed),
                                                 distance(plain))
  for t in range(1, steps):
    residuals = fed[t][1].outer_state.residuals
    before = fed[t - 1][1].outer_state.residuals
    assert residuals["a"].shape == (N, 3, 5)  # params-shaped
    j = t % K  # step t + 1 syncs slice t % K
    for key, n in SIZES.items():
      m = -(-n // K)
      changed = (residuals[key] != before[key]).reshape(N, n)
      changed[:, j * m:j * m + m] = False
      assert not changed.any(), (t, key)  # only slice j's buffers move
  residual = fed[-1][1].outer_state.residuals["a"]
  assert np.max(np.abs(residual - residual[0])) > 0  # each replica its own


WEIGHTS = np.float32([
    [3.0, 0.0, 1.0, 7.5, 2.0, 0.0, 4.0, 1.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0],  # 2 < min_replicas: skipped
    [1.0, 2.0, 0.0, 0.5, 1.0, 5.0, 0.5, 3.0],
    [1.0] * 8,
] * 2)


def test_weights_and_quorum_match_simulation():
  steps = len(WEIGHTS)
  history = run(steps, weights=WEIGHTS, min_replicas=3)
  ref = simulate(steps, weights=WEIGHTS, min_replicas=3)
  for t, (_, state) in enumerate(history):
    assert_agree(state, f"step {t + 1}")
    for key in SIZES:
      np.testing.assert_allclose(flat_slow(state)[key], ref["slow"][t][key],
                                 rtol=0, atol=3e-6, err_msg=f"{key} {t + 1}")
    counts = state.outer_state.counts
    np.testing.assert_array_equal(counts.sat_out_last, ref["sat_out"][t])
  counts = history[-1][1].outer_state.counts
  np.testing.assert_array_equal(counts.skipped_syncs, 2)
  np.testing.assert_array_equal(counts.sat_out, sum(ref["sat_out"]))
  assert ref["skipped"] == 2
  # The weights matter: the plain mean is elsewhere.
  plain = simulate(steps)
  assert np.max(np.abs(plain["slow"][-1]["a"] - ref["slow"][-1]["a"])) > 1e-2


# (step t, replica, entry of leaf a, value): NaN, Inf, two at once.
FAULTS = [(1, 3, 4, np.nan), (4, 5, 0, np.inf), (6, 1, 9, np.nan),
          (6, 2, 1, -np.inf)]


def test_rollback_heals_and_matches_simulation():
  steps = 2 * K
  noise = problem(steps)[3]
  for t, r, i, value in FAULTS:
    noise["a"][t, r].reshape(-1)[i] = value
  history = run(steps, sgd=True, noise=noise, on_nonfinite="rollback")
  ref = simulate(steps, sgd=True, noise=noise)
  for t, (params, state) in enumerate(history):
    assert all(np.all(np.isfinite(p)) for p in params.values()), t
    assert_agree(state, f"step {t + 1}")
    for key in SIZES:
      np.testing.assert_allclose(flat_slow(state)[key], ref["slow"][t][key],
                                 rtol=0, atol=3e-6, err_msg=f"{key} {t + 1}")
    np.testing.assert_array_equal(state.outer_state.counts.sat_out_last,
                                  ref["sat_out"][t])
    for when, replica, _, _ in FAULTS:
      if when == t:  # its momentum reset
        np.testing.assert_array_equal(
            state.inner_state[0].trace["a"][replica], 0.0)
  assert ref["sat_out"][6] == 2
  for r in range(N):
    np.testing.assert_allclose(history[-1][0]["a"][r].ravel(),
                               ref["params"][r]["a"], rtol=0, atol=3e-6)


def test_check_replicas_on_the_slice():
  history = run(K, check_replicas="repair")
  plain = run(K)
  assert_tree_bitwise(history[-1][0], plain[-1][0])
  counts = history[-1][1].outer_state.counts
  np.testing.assert_array_equal(counts.disagreed, 0)
  np.testing.assert_array_equal(counts.repaired, 0)


# ---------------------------------------------------------------------------
# The compiled step: no conditional, 1/k of the model a step.
# ---------------------------------------------------------------------------


def _step_bytes(**kwargs):
  """`(bytes per conditional, bytes outside any)` of a compiled step."""
  tx = lo.diloco(optax.adamw(1e-3), communication.SYNC_PERIOD,
                 communication.AXIS, **kwargs)
  text = communication.compiled_step_text(tx, communication.model_params(
      64, 4))
  assert " conditional(" not in text or "fragments" not in kwargs
  return communication.bytes_by_conditional(text)


@pytest.mark.parametrize("fmt", [None, jnp.int8])
def test_hlo_collectives_carry_a_slice_in_the_entry(fmt):
  per_cond, outside = _step_bytes(fragments="slices",
                                  communication_dtype=fmt)
  assert not per_cond and outside > 0  # every step sends, unconditionally
  whole, whole_outside = _step_bytes(communication_dtype=fmt)
  assert len(whole) == 1 and whole_outside == 0
  # Four 64 x 64 leaves in 8 slices of 512 values: exactly 1/8.
  assert outside * communication.SYNC_PERIOD == whole[0], (outside, whole)


def test_hlo_bytes_with_padding():
  """Leaves that do not divide k: the slices' padding, and no more."""
  _, step, init = program(weighted=False)
  params0, curv, target, noise = problem(1)
  params = replicate(params0, N)
  state = init(params)
  text = step.lower(params, state, curv, target,
                    {k: v[0] for k, v in noise.items()},
                    jnp.ones(N)).compile().as_text()
  per_cond, outside = communication.bytes_by_conditional(text)
  assert not per_cond
  assert outside == 4 * sum(-(-n // K) for n in SIZES.values())  # 4+2+1


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_collectives_do_not_depend_on_the_batch(overlap):
  tx = lo.diloco(_inner(False), K, AXIS, fragments="slices", overlap=overlap,
                 communication_dtype=jnp.int8)
  jaxpr, batch = whole_step_jaxpr(tx, SHAPES, AXIS, N)
  assert not equations(jaxpr, "cond")
  found = batch_reaches_collective(jaxpr, batch)
  assert len(found) >= 2  # all-to-all and all-gather
  if overlap:
    assert not any(found), found
  else:
    assert all(found), found


# ---------------------------------------------------------------------------
# Checkpoint, jit with donation under shard_map.
# ---------------------------------------------------------------------------

EF = dict(communication_dtype=jnp.int8, error_feedback=True)


def test_orbax_resume_mid_period_is_bitwise(tmp_path):
  full = run(2 * K, **EF)
  params, state = full[1]  # after step 2: slices 0 and 1 synced, not 2, 3
  restored = orbax_round_trip(tmp_path, (params, state))
  assert isinstance(restored[1].outer_state, lo.StreamingState)
  resumed = run(2 * K, start=(restored, 2), **EF)
  assert_tree_bitwise(resumed[-1], full[-1])
  assert np.max(np.abs(state.outer_state.residuals["a"])) > 0


def test_jitted_shard_map_with_donation_matches_pmap():
  kwargs = dict(communication_dtype="int4", error_feedback=True,
                overlap=True)
  steps = K + 2
  expected = run(steps, **kwargs)[-1]
  tx = program(**kwargs)[0]
  params, state = shard_map_run(tx, problem(steps), steps, AXIS,
                                donate=(0, 1))
  for key in SIZES:
    slow = np.asarray(state.slow_params[key])
    assert_bitwise(slow, np.broadcast_to(slow[0], slow.shape), key)
    np.testing.assert_allclose(slow, expected[1].slow_params[key], atol=1e-6)
    np.testing.assert_allclose(params[key], expected[0][key], atol=1e-6)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(fragments="slices", inner_state="reset"), ValueError,
     r"`inner_state='reset'` cannot be combined with `fragments='slices'`"),
    (dict(fragments="slice"), ValueError,
     r"`fragments` must be None, an integer >= 1, 'slices', or a pytree"),
    (dict(fragments="slices", sync_period=jnp.array(4)), TypeError,
     r"`sync_period` must be a Python int with `fragments='slices'`"),
    (dict(fragments="slices", sync_period=1, overlap=True), ValueError,
     r"`overlap=True` needs `sync_period` >= 2"),
    (dict(fragments="slices", sync_period=0), ValueError, r"`sync_period`"),
])
def test_bad_slices_arguments(kwargs, error, message):
  kwargs.setdefault("sync_period", K)
  with pytest.raises(error, match=message):
    lo.diloco(optax.sgd(0.1), axis_name=AXIS, **kwargs)


def test_slices_state_has_the_slow_weights_params_shaped():
  tx = lo.diloco(optax.sgd(0.1), K, AXIS, fragments="slices")
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  assert jax.tree.map(jnp.shape, lo.slow_params(state)) == SHAPES
  (stacked,) = state.outer_state.outer_states
  assert jax.tree.map(jnp.shape, stacked[0].trace) == {
      "a": (K, 4), "b": (K, 2), "c": (K, 1)}
  assert re.search("slices", lo.diloco.__doc__)
