"""Streaming DiLoCo: fragments, compressed means, error feedback, overlap.

The reference is `reference.run_streaming_diloco`, a NumPy simulation of 8
replicas (each with its own NumPy Adam state) written from the paper; the
library runs under `jax.pmap` on the 8 host CPU devices of conftest.py.
"""

import functools
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks import communication
from tests import _helpers
from tests import reference
from tests._helpers import assert_bitwise
from tests._helpers import batch_reaches_collective
from tests._helpers import orbax_round_trip
from tests._helpers import quadratic_grad
from tests._helpers import quadratic_problem
from tests._helpers import shard_map_run
from tests._helpers import whole_step_jaxpr
from tests._helpers import assert_tree_bitwise

N = 8  # replicas
AXIS = "r"
LR, MU = 0.7, 0.9
SHAPES = {"a": (4, 3), "b": (6,), "c": (2, 3), "d": (5,), "e": (3,)}
# The balanced split (largest leaf first, to the least loaded fragment):
# sizes a 12, b 6, c 6, d 5, e 3.
SPLITS = {1: dict(a=0, b=0, c=0, d=0, e=0),
          2: dict(a=0, b=1, c=1, d=0, e=1),
          4: dict(a=0, b=1, c=2, d=3, e=3)}

pytestmark = pytest.mark.skipif(
    jax.device_count() < N, reason="needs 8 devices (see conftest.py)")


def problem(steps, seed=0):
  """Params, and per replica a quadratic pull towards its own target."""
  return quadratic_problem(SHAPES, N, steps, seed)


grad = quadratic_grad


def inner_tx():
  return optax.adam(0.05, b1=0.8, b2=0.95)


@functools.cache
def diloco(k, **kwargs):
  """`lo.diloco(inner_tx(), k, AXIS, **kwargs)`, one object a configuration.

  The tests that run one configuration share its compiled step (the replica
  harness compiles one per transformation).
  """
  return lo.diloco(inner_tx(), k, AXIS, **kwargs)


def replicate(tree):
  return _helpers.replicate(tree, N)


def _grads(params, c, t, z):
  return jax.tree.map(grad, params, c, t, z)


def run(tx, steps, seed=0, start=None):
  """`(params, state)` after every step, as NumPy copies."""
  params0, curv, target, noise = problem(steps, seed)
  first = 0 if start is None else start[1]
  inputs = [(curv, target, {k: v[t] for k, v in noise.items()})
            for t in range(first, steps)]
  return _helpers.replica_run(tx, _grads, AXIS, inputs, params=params0, n=N,
                              start=None if start is None else start[0])


def simulate(steps, fragment_of, *, sync_period=4, seed=0, **kwargs):
  params0, curv, target, noise = problem(steps, seed)

  def grad_fn(t, r, p):
    return {k: grad(p[k], curv[k][r], target[k][r], noise[k][t, r])
            for k in p}

  return reference.run_streaming_diloco(
      reference.Adam(0.05, b1=0.8, b2=0.95), params0, grad_fn, N,
      sync_period, fragment_of, steps, LR, MU, **kwargs)


def assert_same_on_all_replicas(tree, msg=""):
  for k, a in tree.items():
    assert_bitwise(a, np.broadcast_to(a[0], a.shape), f"{msg} {k}")


def first_replica(tree):
  return {k: v[0] for k, v in tree.items()}


def assert_matches(history, ref, atol, params=True):
  """Every step's slow weights (one value on all replicas), the params."""
  for t, (_, state) in enumerate(history):
    assert_same_on_all_replicas(state.slow_params, f"step {t + 1}")
    for key in SHAPES:
      np.testing.assert_allclose(state.slow_params[key][0],
                                 ref["slow_history"][t][key], rtol=0,
                                 atol=atol, err_msg=f"{key} step {t + 1}")
  for r in range(N if params else 0):
    for key in SHAPES:
      np.testing.assert_allclose(history[-1][0][key][r],
                                 ref["params"][r][key], rtol=0, atol=atol,
                                 err_msg=f"{key} replica {r}")


# ---------------------------------------------------------------------------
# The schedule and the split.
# ---------------------------------------------------------------------------


def test_sync_slots_follow_the_formula():
  from lookahead_optax import _streaming  # pylint: disable=import-outside-toplevel
  assert _streaming.sync_slots(1, 4) == [0]
  assert _streaming.sync_slots(2, 4) == [2, 0]
  assert _streaming.sync_slots(4, 8) == [2, 4, 6, 0]
  assert _streaming.sync_slots(3, 6) == [2, 4, 0]
  for p, k in [(1, 4), (2, 4), (4, 8), (3, 6), (8, 8)]:
    assert (_streaming.sync_slots(p, k)
            == reference.streaming_sync_slots(p, k))


@pytest.mark.parametrize("num", [2, 4])
def test_each_leaf_syncs_at_its_fragments_steps(num):
  """Which leaf's slow weights move at which step: the split and schedule."""
  k, steps = 8 if num == 4 else 4, 8 if num == 4 else 8
  history = run(diloco(k, fragments=num), steps)
  slots = reference.streaming_sync_slots(num, k)
  before = problem(steps)[0]
  entering = replicate(before)
  for t, (params, state) in enumerate(history, start=1):
    slow = first_replica(state.slow_params)
    for key, f in SPLITS[num].items():
      moved = not np.array_equal(slow[key], before[key])
      assert moved == (t % k == slots[f]), (t, key)
      if moved:
        # The fragment's params land on its slow weights, bitwise where
        # `p + (slow - p)` is exact (p within a factor of 2 of slow).
        ratio = np.asarray(entering[key]) / slow[key]
        exact = (ratio >= 0.5) & (ratio <= 2)
        assert exact.mean() > 0.8
        assert_bitwise(params[key][exact],
                       np.broadcast_to(slow[key], exact.shape)[exact])
        np.testing.assert_allclose(params[key], np.broadcast_to(
            slow[key], exact.shape), rtol=0, atol=1e-6)
      else:  # the others' params went on apart
        assert np.max(np.abs(params[key] - params[key][0])) > 0, (t, key)
    before, entering = slow, params
  assert len(state.outer_state.outer_states) == num


# ---------------------------------------------------------------------------
# Against the NumPy simulation of 8 replicas.
# ---------------------------------------------------------------------------

CASES = {
    "P1": dict(fragments=1),
    "P2": dict(fragments=2),
    "P4": dict(fragments=4),
    "P2-overlap": dict(fragments=2, overlap=True),
    "P4-overlap-mix": dict(fragments=4, overlap=True, mix=0.3),
    "P2-mix": dict(fragments=2, mix=0.6),
    "P1-overlap": dict(fragments=1, overlap=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_simulation_of_8_replicas(case):
  kwargs = CASES[case]
  num, steps = kwargs["fragments"], 12
  history = run(diloco(4, **kwargs), steps)
  ref = simulate(steps, SPLITS[num], overlap=kwargs.get("overlap", False),
                 mix=kwargs.get("mix", 0.0))
  assert len(ref["syncs"]) == 3 * num
  assert_matches(history, ref, 2e-6)
  state = history[-1][1]
  momenta = state.outer_state.outer_states
  for key, f in SPLITS[num].items():
    np.testing.assert_allclose(momenta[f][0].trace[key][0],
                               ref["momentum"][key], rtol=0, atol=2e-6)
  # The replicas drift apart between syncs, and the options change the run.
  spread = max(np.max(np.abs(h[0][k] - h[0][k][0])) for h in history
               for k in SHAPES)
  assert spread > 1e-2
  plain = simulate(steps, SPLITS[1])
  assert case == "P1" or max(np.max(np.abs(ref["slow"][k] - plain["slow"][k]))
                             for k in SHAPES) > 1e-3


@hypothesis.settings(deadline=None, max_examples=5, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(num=st.sampled_from([1, 2, 4]), periods=st.integers(1, 2),
                  overlap=st.booleans(), mix=st.sampled_from([0.0, 0.25, 1.0]),
                  interpolate=st.booleans(), seed=st.integers(0, 3))
def test_every_mode_matches_simulation(num, periods, overlap, mix,
                                       interpolate, seed):
  k = max(num * periods, 2 if overlap else 1)
  steps = 2 * k + 1
  kwargs = dict(fragments=num, overlap=overlap, mix=mix)
  if interpolate:  # plain SGD: slow <- slow - 0.3 mean(delta)
    tx = lo.diloco(inner_tx(), k, AXIS, outer=optax.sgd(0.3), **kwargs)
  else:
    tx = diloco(k, **kwargs)
  history = run(tx, steps, seed=seed)
  ref = simulate(steps, SPLITS[num], sync_period=k, seed=seed,
                 overlap=overlap, mix=mix, alpha=0.3 if interpolate else None)
  assert_matches(history, ref, 3e-6)


def test_interpolation_outer_per_fragment_schedule():
  """An outer schedule: each fragment's own sync count drives its step."""
  alphas = lambda n: 0.3 + 0.2 * n  # pylint: disable=unnecessary-lambda-assignment
  tx = lo.diloco(inner_tx(), 4, AXIS, outer=optax.sgd(alphas), fragments=2)
  history = run(tx, 9)
  counts = [int(s[-1].count[0])
            for s in history[-1][1].outer_state.outer_states]
  assert counts == [2, 2]  # fragment 0 synced at 2 and 6, 1 at 4 and 8
  # 0.3 at each fragment's first sync, 0.5 at its second.
  assert_matches(history, simulate(9, SPLITS[2], alpha=alphas), 2e-6)
  wrong = simulate(9, SPLITS[2], alpha=0.3)  # a count shared or not moved
  assert np.max(np.abs(history[-1][1].slow_params["a"][0]
                       - wrong["slow"]["a"])) > 1e-3


def test_reset_resets_only_the_syncing_fragment():
  tx = diloco(4, fragments=2, inner_state="reset")
  history = run(tx, 4)
  adam = lambda t: history[t][1].inner_state[0]  # pylint: disable=unnecessary-lambda-assignment
  for key, f in SPLITS[2].items():
    # Fragment 0 syncs after step 2, fragment 1 after step 4.
    zero_after = 2 if f == 0 else 4
    for t in (2, 4):
      mu = adam(t - 1).mu[key]
      assert np.all(mu == 0) == (t == zero_after), (key, t)
  np.testing.assert_array_equal(adam(3).count, np.full(N, 4, np.int32))


# ---------------------------------------------------------------------------
# Compressed communication.
# ---------------------------------------------------------------------------

# Per encoding, the largest error of one value over the block's max |x|
# (rounding to nearest), for one pass; the mean passes twice.
QUANTUM = {jnp.bfloat16: 2.0**-9, jnp.float8_e4m3fn: 2.0**-4,
           jnp.int8: 0.5 / 126, "int4": 0.5 / 6}


@pytest.fixture(scope="module")
def float32_run():
  return run(diloco(4, fragments=2), 4)


@pytest.mark.parametrize("dtype", list(QUANTUM), ids=str)
def test_compressed_mean_is_one_value_within_quantization(dtype, float32_run):
  history = run(diloco(4, fragments=2,
                          communication_dtype=dtype), 4)
  for t, (_, state) in enumerate(history):
    assert_same_on_all_replicas(state.slow_params, f"step {t + 1}")
  # After each fragment's first sync: the slow weights moved by
  # lr (1 + mu) times the mean pseudo-gradient, whose error is at most two
  # quanta of the largest |delta| of the fragment.
  params0 = problem(4)[0]
  slow = first_replica(history[-1][1].slow_params)
  exact = first_replica(float32_run[-1][1].slow_params)
  for f in (0, 1):
    keys = [k for k, g in SPLITS[2].items() if g == f]
    amax = max(np.max(np.abs(exact[k] - params0[k])) for k in keys) / (
        LR * (1 + MU))
    bound = LR * (1 + MU) * 2 * QUANTUM[dtype] * amax * 1.01 + 1e-6
    error = max(np.max(np.abs(slow[k] - exact[k])) for k in keys)
    assert 0 < error <= bound, (f, error, bound)


def test_error_feedback_stays_closer_to_float32_over_20_cycles():
  steps = 40
  exact = run(diloco(2), steps)
  plain = run(diloco(2, communication_dtype="int4"),
              steps)
  fed = run(diloco(2, communication_dtype="int4",
                      error_feedback=True), steps)

  def distance(history):
    return np.mean([
        sum(np.sum((h[1].slow_params[k][0] - e[1].slow_params[k][0]) ** 2)
            for k in SHAPES) ** 0.5 for h, e in zip(history, exact)])

  assert distance(fed) < 0.6 * distance(plain), (distance(fed),
                                                 distance(plain))
  residuals = fed[-1][1].outer_state.residuals
  assert set(residuals) == set(SHAPES)
  assert residuals["a"].shape == (N, 4, 3)
  # Each replica keeps its own residual.
  assert np.max(np.abs(residuals["a"] - residuals["a"][0])) > 0


def test_codecs_round_trip():
  from lookahead_optax import _compress  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
  x[1] = 0.0  # an all-zero block
  x[2] = np.tile([np.nan, np.inf, -np.inf, -np.inf], 64)  # none finite
  x[3, [5, 77, 200]] = [np.nan, -np.inf, np.inf]  # and 253 finite
  finite = np.isfinite(x)
  amax = np.max(np.abs(np.where(finite, x, 0.0)), axis=1, keepdims=True)
  for fmt in _compress.FORMATS:
    e = jax.jit(_compress.encode, static_argnums=1)(jnp.asarray(x), fmt)
    y = np.asarray(jax.jit(_compress.decode, static_argnums=1)(e, fmt))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert_bitwise(y[1], x[1])  # +0.0, bitwise
    np.testing.assert_array_equal(y[~finite], x[~finite])  # NaN where NaN
    assert np.isfinite(y[finite]).all(), fmt
    q = {"bfloat16": 2.0**-8, "float8_e4m3fn": 2.0**-4, "int8": 0.5 / 126,
         "int4": 0.5 / 6}[fmt]
    # The non-finite values do not change the scale of the finite ones.
    error = np.abs(np.where(finite, y, 0.0) - np.where(finite, x, 0.0))
    assert np.all(error <= q * amax), fmt
    assert np.all(error.max(axis=1)[[0, 3]] > q * amax[[0, 3], 0] / 4), fmt
  packed = _compress.encode(jnp.asarray(x), "int4").values
  assert packed.dtype == jnp.uint8 and packed.shape == (4, 128)
  # NaN, +Inf, -Inf, -Inf: nibbles 0, 15, 1, 1, two to a byte, low first.
  np.testing.assert_array_equal(np.asarray(packed[2, :2]), [0xF0, 0x11])
  grid = jnp.arange(-6.0, 7.0)
  block = jnp.tile(grid, 256 // 13 + 1)[:256].at[0].set(6.0)[None]
  back = _compress.decode(_compress.encode(block, "int4"), "int4")
  assert_bitwise(np.asarray(back), np.asarray(block))


@pytest.mark.parametrize("fmt,codes", [
    ("int8", [-128, 127, -127]), ("float8_e4m3fn", [0x7F, 0x7E, 0xFE])])
def test_codecs_reserve_codes_for_nan_and_inf(fmt, codes):
  from lookahead_optax import _compress  # pylint: disable=import-outside-toplevel
  x = np.full((1, 256), -0.75, np.float32)
  x[0, :4] = [np.nan, np.inf, -np.inf, 3.0]
  values = np.asarray(_compress.encode(jnp.asarray(x), fmt).values)
  np.testing.assert_array_equal(values[0, :3],
                                np.asarray(codes).astype(values.dtype))
  # The largest finite value takes the largest finite code, not a reserved
  # one: 126, or 0x7D (416) in float8_e4m3fn.
  assert values[0, 3] == {"int8": 126, "float8_e4m3fn": 0x7D}[fmt]


# ---------------------------------------------------------------------------
# The compiled step: bytes and where the collectives sit.
# ---------------------------------------------------------------------------


BYTE_CONFIGS = ("DiLoCo, float32", "streaming, P = 4", "bfloat16",
                "float8 e4m3", "int8", "int4")


@pytest.fixture(scope="module")
def byte_rows():
  return {r["name"]: r for r in communication.run(names=BYTE_CONFIGS)}


def test_hlo_bytes_meet_the_targets(byte_rows):
  base = byte_rows["DiLoCo, float32"]
  assert base["peak"] == 4 * 4 * 128 * 128  # the whole model in float32
  for r in byte_rows.values():
    assert r["outside"] == 0, r  # a step that syncs nothing sends nothing
  p4 = byte_rows["streaming, P = 4"]
  assert p4["conditionals"] == 4
  assert p4["peak"] <= 0.27 * base["peak"]
  assert p4["period"] == base["period"]
  for name, most in [("int8", 0.3), ("int4", 0.16), ("bfloat16", 0.6),
                     ("float8 e4m3", 0.3)]:
    assert byte_rows[name]["period"] <= most * base["period"], name
  # int4 really carries half a byte per value: values (1 + 1/8) / 2 bytes,
  # and a float32 scale per 256 values.
  n = 4 * 128 * 128
  assert byte_rows["int4"]["period"] == (n // 2 + n // 256 * 4) * 9 // 8
  # What a ring sends: float32's all-reduce 2 * 7/8 of the model; int8's
  # all-to-all 7/8 of its vector and its all-gather 7 shards of 1/8.
  assert base["ring_period"] == 2 * 7 * (4 * n) // 8
  int8_vector = n + n // 256 * 4
  assert byte_rows["int8"]["ring_period"] == 2 * 7 * int8_vector // 8
  assert 0.2539 < (byte_rows["int8"]["ring_period"]
                   / base["ring_period"]) < 0.2540


def test_non_overlapping_syncs_stay_in_their_conditionals():
  tx = lo.diloco(inner_tx(), 4, communication.AXIS, fragments=4,
                 communication_dtype=jnp.int8)
  text = communication.compiled_step_text(tx, communication.model_params(
      64, 4))
  computations, _ = communication.parse_hlo(text)
  per_cond, outside = communication.bytes_by_conditional(text)
  assert len(per_cond) == 4 and outside == 0
  ops = sorted({op for op, _ in communication.collectives(
      computations, computations)})
  assert ops == ["all-gather", "all-to-all"]



@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_collective_does_not_depend_on_the_batch(overlap):
  """The jaxpr of a whole step (loss, grad, update): with `overlap` the
  collectives' operands depend on params and state alone, not the batch."""
  tx = diloco(4, fragments=2, overlap=overlap, communication_dtype=jnp.int8)
  jaxpr, batch = whole_step_jaxpr(tx, SHAPES, AXIS, N)
  found = batch_reaches_collective(jaxpr, batch)
  assert len(found) >= 2 * 2  # two fragments, all-to-all and all-gather
  if overlap:
    assert not any(found), found
  else:
    assert all(found), found  # the checker sees the dependence


# ---------------------------------------------------------------------------
# Checkpoint, shard_map.
# ---------------------------------------------------------------------------


def test_orbax_resume_mid_cycle_is_bitwise(tmp_path):
  tx = diloco(4, fragments=2,
                 communication_dtype=jnp.int8, error_feedback=True)
  full = run(tx, 7)
  params, state = full[2]  # after step 3: fragment 0 synced, 1 not yet
  restored = orbax_round_trip(tmp_path, (params, state))
  assert isinstance(restored[1].outer_state, lo.StreamingState)
  resumed = run(tx, 7, start=(restored, 3))
  assert_tree_bitwise(resumed[-1], full[-1])
  assert np.max(np.abs(state.outer_state.residuals["a"])) > 0


def test_shard_map_matches_pmap():
  tx = diloco(4, fragments=2, communication_dtype="int4",
                 error_feedback=True, overlap=True)
  steps = 6
  expected = run(tx, steps)[-1]
  params, state = shard_map_run(tx, problem(steps), steps, AXIS)
  for key in SHAPES:
    assert_same_on_all_replicas({key: np.asarray(state.slow_params[key])})
    np.testing.assert_allclose(state.slow_params[key], expected[1]
                               .slow_params[key], atol=1e-5)
    np.testing.assert_allclose(params[key], expected[0][key], atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input, at construction.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [
    ("fragments", 2), ("communication_dtype", jnp.int8),
    ("error_feedback", True), ("overlap", True), ("mix", 0.5)])
def test_streaming_options_are_diloco_s(name, value):
  with pytest.raises(TypeError, match=rf"`lookahead` runs on one device and "
                     rf"takes no `{name}`: .* Write `lo.diloco\("):
    lo.lookahead(optax.sgd(0.1), 4, **{name: value})


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(fragments=3), ValueError,
     r"`sync_period` must be a multiple of the number of fragments P = 3"),
    (dict(fragments=0), ValueError, r"`fragments` must be an integer >= 1"),
    (dict(fragments=-2), ValueError, r"`fragments` must be an integer >= 1"),
    (dict(fragments=2.0), TypeError, r"`fragments` must be None, an integer"),
    (dict(fragments=True), TypeError, r"`fragments` must be None, an integer"),
    (dict(fragments={"a": 0, "b": 2}), ValueError,
     r"fragment 1 has no leaves"),
    (dict(fragments={"a": -1}), TypeError, r"fragment numbers, integers >= 0"),
    (dict(mix=1.5), ValueError, r"`mix` must be a float in \[0, 1\]"),
    (dict(mix=-0.1), ValueError, r"`mix` must be a float in \[0, 1\]"),
    (dict(mix=float("nan")), ValueError, r"`mix` must be a float in \[0, 1\]"),
    (dict(mix="0.5"), TypeError, r"`mix` must be a float in \[0, 1\]"),
    (dict(communication_dtype=jnp.float16), ValueError,
     r"`communication_dtype` must be None \(float32\), jnp.bfloat16, "
     r"jnp.float8_e4m3fn, jnp.int8 or 'int4', got"),
    (dict(communication_dtype="int3"), ValueError,
     r"`communication_dtype` must be None"),
    (dict(error_feedback=True), ValueError,
     r"`error_feedback=True` needs a low-precision `communication_dtype`"),
    (dict(error_feedback=1), TypeError, r"`error_feedback` must be True or "
     r"False, got 1"),
    (dict(overlap="yes"), TypeError, r"`overlap` must be True or False"),
    (dict(fragments=2, inner_state="pullback"), ValueError,
     r"`inner_state` must be one of 'keep', 'reset', got 'pullback'"),
])
def test_bad_streaming_arguments(kwargs, error, message):
  with pytest.raises(error, match=message):
    lo.diloco(optax.sgd(0.1), 4, AXIS, **kwargs)


def test_overlap_needs_two_steps_per_sync():
  with pytest.raises(ValueError, match=r"`overlap=True` needs `sync_period` "
                     r">= 2"):
    lo.diloco(optax.sgd(0.1), 1, AXIS, overlap=True)


def test_fragments_need_a_python_int_sync_period():
  with pytest.raises(TypeError, match=r"`sync_period` must be a Python int "
                     r"with `fragments` or `overlap`"):
    lo.diloco(optax.sgd(0.1), jnp.array(4), AXIS, fragments=2)


def test_fragment_without_leaves_at_init():
  tx = lo.diloco(optax.sgd(0.1), 8, AXIS, fragments=8)
  with pytest.raises(ValueError, match=re.escape(
      "`fragments=8`, but the params have 5 leaves: each fragment needs at "
      "least one.")):
    tx.init({k: jnp.ones(s) for k, s in SHAPES.items()})
  tx = lo.diloco(optax.sgd(0.1), 4, AXIS, fragments={"a": 0, "z": 1})
  with pytest.raises(ValueError, match=r"`fragments` gives no fragment for "
                     r"params leaf \['b'\]"):
    tx.init({k: jnp.ones(s) for k, s in SHAPES.items()})


def test_fragments_as_a_prefix_tree():
  fragments = {"a": 1, "b": 0, "c": 0, "d": 1, "e": 1}
  history = run(lo.diloco(inner_tx(), 4, AXIS, fragments=fragments), 4)
  assert_matches(history, simulate(4, fragments), 2e-6)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8", "int4"])
def test_codecs_see_a_nan_that_a_float_max_drops(fmt):
  """XLA:CPU's max of a block may drop a NaN (at its last position it even
  gave -inf here): the encoder must still mark it, and scale the rest."""
  from lookahead_optax import _compress  # pylint: disable=import-outside-toplevel
  codec = jax.jit(lambda v: _compress.decode(_compress.encode(v, fmt), fmt))
  bound = {"float8_e4m3fn": 2**-4, "int8": 1 / 252, "int4": 1 / 12}[fmt]
  rng = np.random.default_rng(5)
  for where, value in ((0, np.nan), (100, np.nan), (255, np.nan),
                       (128, np.inf)):
    # 16 blocks: XLA vectorises the max across them, and drops the NaN.
    x = rng.normal(size=(16, 256)).astype(np.float32)  # one value a call
    x[5, where] = value
    back = np.asarray(codec(x))
    np.testing.assert_array_equal(back[5, where], value, err_msg=where)
    finite = np.isfinite(x)
    amax = np.max(np.where(finite, np.abs(x), 0), axis=1, keepdims=True)
    np.testing.assert_array_less(
        np.abs(back - x)[finite],
        np.broadcast_to(1.0001 * bound * amax, x.shape)[finite])
