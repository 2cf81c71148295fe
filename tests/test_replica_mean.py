"""`replica_mean`: the gradients' mean over replicas, compressed or not.

Runs under `jax.pmap` (and `jax.shard_map`) on the 8 host CPU devices of
conftest.py. Every wire format, with and without error feedback, runs in one
pmapped program (`_all_formats`, compiled once) beside float32's `pmean`;
`reference.compressed_mean` is a NumPy simulation of the two-stage scheme.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks import communication
from tests import _helpers
from tests import reference
from tests._helpers import assert_bitwise

N = 8  # replicas
AXIS = "data"
FORMATS = {"bfloat16": jnp.bfloat16, "float8_e4m3fn": jnp.float8_e4m3fn,
           "int8": jnp.int8, "int4": "int4"}
# Per format, the largest error of one encoding of a finite value over the
# largest finite |x| of its block of 256 (rounding to nearest); the mean
# encodes twice.
QUANTUM = {"bfloat16": 2.0**-8, "float8_e4m3fn": 2.0**-4, "int8": 1 / 252,
           "int4": 1 / 12}
FLOATS = ("a", "b", "c")  # "d" is int32: passed through

pytestmark = pytest.mark.skipif(
    jax.device_count() < N, reason="needs 8 devices (see conftest.py)")


def gradients(seed):
  """Per replica: `a` is blocks 0-3 of the flattened vector (each row one
  block of 256, at its own scale), `b` blocks 4-7, `c` bfloat16 in block 8,
  `d` int32."""
  rng = np.random.default_rng(seed)
  scales = np.array([0.3, 2.5, 1.0, 7.0], np.float32)[:, None]
  return {"a": (rng.normal(size=(N, 4, 256)) * scales).astype(np.float32),
          "b": rng.normal(0.5, 1.5, size=(N, 1024)).astype(np.float32),
          "c": rng.normal(size=(N, 3)).astype(jnp.bfloat16),
          "d": np.arange(3, 3 + 2 * N, dtype=np.int32).reshape(N, 2)}


def flat(tree):
  """Per replica, the float leaves as one float32 vector (wire order)."""
  return np.concatenate([np.asarray(tree[k], np.float32).reshape(N, -1)
                         for k in FLOATS], axis=1)


TXS = {name + ef * "+ef": lo.replica_mean(AXIS, dtype, error_feedback=ef)
       for name, dtype in FORMATS.items() for ef in (False, True)}


def _means(grads, residuals):
  """Each format's mean (and new residuals), and float32's pmean."""
  out = {"float32": jax.lax.pmean(
      {k: grads[k].astype(jnp.float32) for k in FLOATS}, AXIS)}
  new = {}
  for key, tx in TXS.items():
    out[key], state = tx.update(grads, lo.ReplicaMeanState(residuals.get(key)))
    if state.residuals is not None:
      new[key] = state.residuals
  return out, new


_all_formats = jax.pmap(_means, axis_name=AXIS)


def run_two_steps(g1, g2):
  """Two steps of every format, error feedback carried: NumPy results."""
  zeros = {key: _helpers.replicate(tx.init(jax.tree.map(lambda x: x[0], g1))
                                   .residuals, N)
           for key, tx in TXS.items() if key.endswith("+ef")}
  out1, r1 = _helpers.to_numpy(_all_formats(g1, zeros))
  out2, r2 = _helpers.to_numpy(_all_formats(g2, r1))
  return (out1, r1), (out2, r2)


@pytest.fixture(scope="module")
def healthy():
  g1, g2 = gradients(1), gradients(2)
  return (g1, g2), run_two_steps(g1, g2)


def bound(sent, fmt):
  """Per position of the flat vector: the compressed mean's error bound.

  Two encodings, each within a quantum of the largest finite |x| over the
  replicas of its block of 256 (`sent`: the flat vectors, one a replica).
  """
  n = sent.shape[1]
  padded = np.pad(np.where(np.isfinite(sent), np.abs(sent), 0.0),
                  ((0, 0), (0, -n % 256)))
  amax = padded.reshape(N, -1, 256).max(axis=(0, 2))
  return np.repeat(2.02 * QUANTUM[fmt] * amax, 256)[:n]


def assert_all_replicas_equal(tree, msg):
  """Every float leaf (`d` differs: passed through) is one value, bitwise."""
  tree = {k: v for k, v in tree.items() if k != "d"}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for r in range(1, N):
      assert_bitwise(x[r], x[0], f"{msg} {jax.tree_util.keystr(path)} "
                     f"replica {r}")


def test_float32_is_pmean_bitwise_under_pmap_and_shard_map():
  tx = lo.replica_mean(AXIS)
  g = gradients(0)

  def both(grads):
    mean, state = tx.update(grads, tx.init(grads))
    assert state == lo.ReplicaMeanState(None)
    floats = {k: grads[k] for k in FLOATS}
    return mean, jax.lax.pmean(floats, AXIS)

  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  squeeze = lambda t: jax.tree.map(lambda a: a[0], t)  # pylint: disable=unnecessary-lambda-assignment
  expand = lambda t: jax.tree.map(lambda a: a[None], t)  # pylint: disable=unnecessary-lambda-assignment
  sharded = jax.jit(jax.shard_map(lambda x: expand(both(squeeze(x))),
                                  mesh=mesh, in_specs=P(AXIS),
                                  out_specs=P(AXIS)))
  for run in (jax.pmap(both, axis_name=AXIS), sharded):
    mean, expected = _helpers.to_numpy(run(g))
    for k in FLOATS:  # bfloat16 `c` too, in its own dtype
      assert_bitwise(mean[k], expected[k], k)
    assert_bitwise(mean["d"], g["d"], "d")  # int32: passed through
    assert not (mean["a"][0] == g["a"][0]).all()


def test_formats_within_quantization_of_float32_and_same_on_replicas(
    healthy):
  (g1, g2), steps = healthy
  for g, (out, _) in zip((g1, g2), steps):
    exact = flat(out["float32"])
    for key in TXS:
      assert_all_replicas_equal(out[key], key)
      assert out[key]["c"].dtype == jnp.bfloat16, key
      assert_bitwise(out[key]["d"], g["d"], key)
      if key.endswith("+ef"):
        continue  # its input has the residual: see the simulation test
      most = bound(flat(g), key)
      # `c` is cast back to bfloat16: one more rounding.
      most[-3:] += 2.0**-8 * np.abs(exact[0, -3:])
      error = np.abs(flat(out[key])[0] - exact[0])
      assert (error <= most).all(), (key, np.max(error / most))
      assert error.max() > 0, key


def test_error_feedback_keeps_what_encoding_dropped(healthy):
  """Two steps against `reference.compressed_mean`, residual carried."""
  (g1, g2), steps = healthy
  for fmt in FORMATS:
    key = fmt + "+ef"
    residual = np.zeros_like(flat(g1))
    for g, (out, new) in zip((g1, g2), steps):
      sent = flat(g) + residual
      mean, dropped = reference.compressed_mean(list(sent), fmt)
      residual = np.stack(dropped)
      scale = np.max(np.abs(sent))
      actual = flat(new[key])
      np.testing.assert_allclose(actual, residual, rtol=0,
                                 atol=1e-6 * scale, err_msg=key)
      assert np.abs(residual).max() > 1e-3 * scale, key
      np.testing.assert_allclose(flat(out[key])[0, :-3], mean[:-3], rtol=0,
                                 atol=1e-6 * scale, err_msg=key)
      np.testing.assert_array_equal(new[key]["d"], 0.0)
    # Each replica keeps its own.
    assert not np.array_equal(actual[1], actual[0]), key


@pytest.fixture(scope="module")
def injected():
  """NaN, +Inf and -Inf, each from one replica, into `a` (blocks 0-3)."""
  g1 = gradients(3)
  a = g1["a"]
  a[2, 0, 3] = np.nan
  a[5, 0, 10] = np.inf
  a[7, 0, 20] = -np.inf
  a[1, 0, 30], a[6, 0, 30] = np.inf, -np.inf  # a NaN in the mean
  a[4, 1] = np.tile(np.float32([np.nan, np.inf, -np.inf, -np.inf]), 64)
  a[:, 2] = 0.0  # an all-zero block
  return g1, run_two_steps(g1, gradients(4))


def test_non_finite_values_reach_every_replica_as_in_float32(injected):
  g, ((out, residuals), (out2, residuals2)) = injected
  exact = out["float32"]["a"][0]
  expected = np.full((256,), np.nan, np.float32)
  expected[1::4], expected[2::4], expected[3::4] = np.inf, -np.inf, -np.inf
  np.testing.assert_array_equal(exact[1], expected)  # an all-non-finite block
  np.testing.assert_array_equal(exact[0, [3, 10, 20, 30]],
                                [np.nan, np.inf, -np.inf, np.nan])
  finite = np.isfinite(flat(out["float32"])[0])
  assert finite.sum() == flat(g).shape[1] - 256 - 4
  for key in TXS:
    mean = out[key]
    assert_all_replicas_equal(mean, key)
    np.testing.assert_array_equal(mean["a"][0, :2][~np.isfinite(exact[:2])],
                                  exact[:2][~np.isfinite(exact[:2])],
                                  err_msg=key)
    assert_bitwise(mean["a"][:, 2], np.zeros((N, 256), np.float32), key)
    # The rest of the blocks, block 0 included, keep their scale.
    fmt = key.removesuffix("+ef")
    error = np.abs(flat(mean)[0][finite] - flat(out["float32"])[0][finite])
    most = bound(flat(g), fmt)[finite]
    most[-3:] += 2.0**-8 * np.abs(flat(out["float32"])[0, -3:])
    assert (error <= most).all(), (key, np.max(error / most))
    if key.endswith("+ef"):
      r = residuals[key]["a"]
      for leaf in jax.tree.leaves(residuals[key]):
        assert np.isfinite(leaf).all(), key
      for replica, row, col in ((2, 0, 3), (5, 0, 10), (7, 0, 20),
                                (1, 0, 30), (6, 0, 30)):
        assert r[replica, row, col] == 0, (key, replica, col)
      np.testing.assert_array_equal(r[4, 1], 0.0, err_msg=key)
      # The next step's mean is finite: no NaN is fed back.
      for leaf in jax.tree.leaves(out2[key]):
        assert np.isfinite(np.asarray(leaf, np.float32)).all(), key


def test_passing_the_defaults_gives_the_same_state_and_program():
  g = {"w": jnp.ones((2, 3)), "n": jnp.arange(2)}

  def program(tx):
    state = tx.init(g)
    jaxpr = jax.make_jaxpr(tx.update, axis_env=[(AXIS, N)])(g, state)
    return jax.tree.structure(state), str(jaxpr)

  base = program(lo.replica_mean(AXIS))
  for tx in (lo.replica_mean(AXIS, None), lo.replica_mean(AXIS, jnp.float32),
             lo.replica_mean(AXIS, error_feedback=False),
             lo.replica_mean(AXIS, communication_dtype=None,
                             error_feedback=False)):
    assert program(tx) == base
  assert (program(lo.replica_mean(AXIS, jnp.int8, False))
          == program(lo.replica_mean(AXIS, jnp.int8)))
  assert program(lo.replica_mean(AXIS, jnp.int8)) != base


def test_chains_with_adamw_under_jit_of_pmap_with_donation():
  """Against NumPy AdamW on float32's mean of the replicas' gradients."""
  rng = np.random.default_rng(5)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": np.float32([0.25, -0.75])}
  xs = rng.normal(size=(3, N, 16, 3)).astype(np.float32)
  ys = rng.normal(size=(3, N, 16, 2)).astype(np.float32)

  def loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  tx = optax.chain(lo.replica_mean(AXIS, jnp.int8, error_feedback=True),
                   optax.adamw(0.05, weight_decay=0.1))

  def step(p, s, x, y):
    updates, s = tx.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  jitted = jax.jit(jax.pmap(step, axis_name=AXIS), donate_argnums=(0, 1))
  # Placed as the step places its outputs: one compilation for the 3 steps.
  p = _helpers.on_replicas(_helpers.replicate(params, N), AXIS)
  s = _helpers.on_replicas(jax.pmap(tx.init)(p), AXIS)
  adamw = reference.Adam(0.05, weight_decay=0.1)
  expected, adam_state = reference.tree_copy(params), adamw.init(params)
  for x, y in zip(xs, ys):
    p, s = jitted(p, s, x, y)
    error = x @ expected["w"] + expected["b"] - y  # (N, 16, 2)
    mean = {"w": np.mean(2 * np.swapaxes(x, 1, 2) @ error, 0) / error[0].size,
            "b": np.mean(2 * error.sum(1), 0) / error[0].size}
    updates, adam_state = adamw.update(mean, adam_state, expected)
    expected = reference.tree_map(lambda a, u: a + u, expected, updates)
  p, s = _helpers.to_numpy((p, s))
  assert_all_replicas_equal(p, "params")
  assert isinstance(s[0], lo.ReplicaMeanState)
  assert s[0].residuals["w"].shape == (N, 3, 2)
  for k in params:  # 3 Adam steps of 0.05; int8 kept each mean's sign
    assert np.max(np.abs(p[k][0] - expected[k])) < 0.01, k
    assert np.max(np.abs(p[k][0] - params[k])) > 0.1, k


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(axis_name=""), TypeError, "`axis_name` must be a non-empty str"),
    (dict(axis_name=("data",)), TypeError, "`axis_name` must be a non-empty"),
    (dict(axis_name=AXIS, communication_dtype=jnp.float16), ValueError,
     "`communication_dtype` must be None .* got <class"),
    (dict(axis_name=AXIS, communication_dtype="int2"), ValueError,
     "`communication_dtype` must be None .* got 'int2'"),
    (dict(axis_name=AXIS, error_feedback=True), ValueError,
     r"`error_feedback=True` needs a low-precision `communication_dtype`"),
    (dict(axis_name=AXIS, communication_dtype=jnp.float32,
          error_feedback=True), ValueError, "`error_feedback=True` needs"),
    (dict(axis_name=AXIS, communication_dtype=jnp.int8, error_feedback=1),
     TypeError, "`error_feedback` must be True or False, got 1"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    lo.replica_mean(**kwargs)


def test_update_outside_the_axis_names_axis_name():
  tx = lo.replica_mean(AXIS, "int4", error_feedback=True)
  g = {"w": jnp.ones((2, 3))}
  state = tx.init(g)
  message = "`axis_name` 'data' is not the name of a mapped axis here"
  with pytest.raises(ValueError, match=message):
    tx.update(g, state)
  with pytest.raises(ValueError, match=message):
    jax.jit(tx.update)(g, state)
  with pytest.raises(ValueError, match=message):
    jax.make_jaxpr(tx.update, axis_env=[("other", 2)])(g, state)
  with pytest.raises(ValueError, match=r"`updates` leaf \['z'\] is complex"):
    jax.make_jaxpr(tx.update, axis_env=[(AXIS, 2)])(
        {"w": g["w"], "z": jnp.ones(2, jnp.complex64)},
        tx.init({"w": g["w"], "z": jnp.ones(2)}))


def test_hlo_bytes_of_int8_and_int4_against_float32_pmean():
  params = {f"w{i}": jnp.zeros((64, 64)) for i in range(4)}  # 16,384 values
  rows = {r["name"]: r for r in communication.replica_mean_rows(
      params, names=("float32", "int8", "int4"))}
  n = 4 * 64 * 64
  base = rows["float32"]["operand"]
  assert base == 4 * n
  # Values and a float32 scale per 256 of them, to all_to_all and (1/8 of
  # them) to all_gather.
  assert rows["int8"]["operand"] == (n + n // 64) * 9 // 8
  assert rows["int4"]["operand"] == (n // 2 + n // 64) * 9 // 8
  assert rows["int8"]["operand"] <= 0.3 * base
  assert rows["int4"]["operand"] <= 0.16 * base
  # What a ring sends: 2 (M - 1) / M of the all-reduce; (M - 1) / M of the
  # encoded vector to each of all_to_all and all_gather.
  assert rows["int8"]["ring"] / rows["float32"]["ring"] == pytest.approx(
      (1 + 1 / 64) / 4)
