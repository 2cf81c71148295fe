"""`replicas_agree`: the in-step check that replicas hold the same bits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lookahead_optax as lo
from lookahead_optax import _replicas
from benchmarks.communication import COLLECTIVE
from benchmarks.communication import operand_bytes
from benchmarks.communication import parse_hlo
from benchmarks.communication import reachable

N = 8  # replicas
AXIS = "r"
TRIALS = 1000

pytestmark = pytest.mark.skipif(
    jax.device_count() < N, reason="needs 8 devices (see conftest.py)")


def tree_of_kinds(rng):
  """One replica's tree: float32, bfloat16, int32, bool and uint8 leaves."""
  return {
      "w": rng.normal(size=(3, 4)).astype(np.float32),
      "h": rng.normal(size=(5,)).astype(jnp.bfloat16),
      "n": rng.integers(-9, 9, size=(2,)).astype(np.int32),
      "m": rng.random(3) > 0.5,
      "u": rng.integers(0, 255, size=(4,)).astype(np.uint8),
  }


def stacked(tree, replicas=N):
  return jax.tree.map(lambda a: np.stack([a] * replicas), tree)


@functools.cache
def trial_check():
  """`replicas_agree` over replicas (vmap with the axis) and trials."""
  check = jax.vmap(lambda t: lo.replicas_agree(t, AXIS), axis_name=AXIS)
  return jax.jit(jax.vmap(check))


def flip_bit(array, index, bit):
  """`array` with one bit of one element flipped (any dtype)."""
  out = np.array(array)
  raw = out.reshape(-1).view(f"u{out.dtype.itemsize}") if out.dtype != bool \
      else None
  if raw is None:
    out.reshape(-1)[index] = ~out.reshape(-1)[index]
  else:
    raw[index] ^= raw.dtype.type(1 << (bit % (8 * out.dtype.itemsize)))
  return out


def test_identical_replicas_agree_under_pmap():
  tree = stacked(tree_of_kinds(np.random.default_rng(0)))
  agree, first = jax.pmap(lambda t: lo.replicas_agree(t, AXIS),
                          axis_name=AXIS)(tree)
  np.testing.assert_array_equal(agree, np.ones(N, bool))
  np.testing.assert_array_equal(first, np.full(N, -1, np.int32))


def test_one_flipped_bit_is_found_and_named_on_every_replica():
  """1,000 random single-bit flips (leaf, element, bit, replica): all seen."""
  rng = np.random.default_rng(1)
  base = tree_of_kinds(rng)
  leaves, treedef = jax.tree.flatten(stacked(base))
  trials = [np.stack([a] * TRIALS) for a in leaves]  # (trials, N, ...)
  expected = np.empty(TRIALS, np.int32)
  for t in range(TRIALS):
    leaf = int(rng.integers(len(leaves)))
    replica = int(rng.integers(1, N)) if t % 2 else 0  # replica 0 too
    size = leaves[leaf][0].size
    trials[leaf][t, replica] = flip_bit(
        trials[leaf][t, replica], int(rng.integers(size)),
        int(rng.integers(32)))
    expected[t] = leaf
  agree, first = trial_check()(jax.tree.unflatten(treedef, trials))
  assert not np.any(agree)
  np.testing.assert_array_equal(first, np.broadcast_to(expected[:, None],
                                                       (TRIALS, N)))


def test_no_false_alarm_over_random_trees():
  rng = np.random.default_rng(2)
  trees = [stacked(tree_of_kinds(rng)) for _ in range(TRIALS)]
  batch = jax.tree.map(lambda *a: np.stack(a), *trees)
  agree, first = trial_check()(batch)
  assert np.all(agree)
  np.testing.assert_array_equal(first, -1)


def test_swapped_values_and_signed_zeros_are_found():
  w = np.arange(12, dtype=np.float32).reshape(3, 4)
  swapped = w.copy()
  swapped[0, 1], swapped[0, 2] = w[0, 2], w[0, 1]  # same XOR, same sum
  zeros = np.zeros(3, np.float32)
  tree = {"w": np.stack([w] * N), "z": np.stack([zeros] * N)}
  tree["w"][6] = swapped
  tree["z"][2, 1] = -0.0  # equal as floats, not as bits
  agree, first = jax.pmap(lambda t: lo.replicas_agree(t, AXIS),
                          axis_name=AXIS)(tree)
  np.testing.assert_array_equal(agree, np.zeros(N, bool))
  np.testing.assert_array_equal(first, np.zeros(N, np.int32))  # "w" first
  del tree["w"]
  agree, first = jax.pmap(lambda t: lo.replicas_agree(t, AXIS),
                          axis_name=AXIS)(tree)
  np.testing.assert_array_equal(first, np.zeros(N, np.int32))  # now "z"
  assert not np.any(agree)


def test_check_sends_at_most_16_bytes_per_leaf():
  tree = stacked(tree_of_kinds(np.random.default_rng(3)))
  text = jax.pmap(lambda t: lo.replicas_agree(t, AXIS), axis_name=AXIS).lower(
      tree).compile().as_text()
  computations, entry = parse_hlo(text)
  lines = [l for c in reachable(computations, entry)
           for l in computations[c] if COLLECTIVE.search(l)]
  assert len(lines) == 1 and "all-gather" in lines[0], lines
  assert operand_bytes(lines[0]) <= 16 * len(jax.tree.leaves(tree))


def reference_fingerprint(words):
  """`fingerprint` in NumPy: sum_p m(w_p) (2p + 1) mod 2^32, uint32 words."""
  w = np.asarray(words, np.uint64)
  mixed = ((w ^ (w >> 16)) * 0x9E3779B1) % 2**32
  weights = 2 * np.arange(w.size, dtype=np.uint64) + 1
  return int(np.sum(mixed * weights % 2**32) % 2**32)


FINGERPRINTED = {  # 300 values: a body of 256 words and a tail of 44
    "float32": (np.float32, 4086135180),
    "bfloat16": (jnp.bfloat16, 2046917004),
    "int32": (np.int32, 1492717288),
    "bool": (bool, 1141933263),
}


@pytest.mark.parametrize("kind", list(FINGERPRINTED))
def test_fingerprint_is_its_formula(kind):
  dtype, expected = FINGERPRINTED[kind]
  values = np.arange(300) - 150
  values = values > 0 if dtype is bool else values.astype(dtype)
  got = int(jax.jit(_replicas.fingerprint)(values))
  assert got == expected
  assert got == reference_fingerprint(_replicas._as_uint32(values))
  # The flat words alone count: the same values as a matrix, the same word.
  assert int(_replicas.fingerprint(values.reshape(20, 15))) == expected
  words = (0x3F800000 ^ 0x3F80) * 0x9E3779B1 % 2**32  # 1.0 at position 0
  assert int(_replicas.fingerprint(np.float32(1.0))) == words == 707749760
  rng = np.random.default_rng(4)
  for n in (0, 1, 255, 256, 257, 1000, 4099):  # bodies and tails
    x = rng.normal(size=n).astype(np.float32)
    assert int(jax.jit(_replicas.fingerprint)(x)) == reference_fingerprint(
        x.view(np.uint32))


def all_single_flips(values, index):
  """Every copy of `values` with one bit of `values[index]` flipped."""
  if values.dtype == bool:
    return [flip_bit(values, index, 0)]
  return [flip_bit(values, index, bit)
          for bit in range(8 * values.dtype.itemsize)]


@pytest.mark.parametrize("kind", list(FINGERPRINTED))
def test_fingerprint_sees_every_single_flipped_bit(kind):
  """Each bit of values in the body and in the tail: the word changes."""
  dtype, _ = FINGERPRINTED[kind]
  rng = np.random.default_rng(5)
  values = rng.normal(size=300) * 100
  values = values > 0 if dtype is bool else values.astype(dtype)
  fingerprints = jax.jit(jax.vmap(_replicas.fingerprint))
  base = int(_replicas.fingerprint(values))
  for index in (0, 33, 255, 256, 299):  # in the body's slices; the tail
    flips = all_single_flips(values, index)
    got = np.asarray(fingerprints(np.stack(flips)))
    assert np.all(got != base), (index, np.flatnonzero(got == base))


def test_fingerprint_sees_swapped_values():
  """Swaps of two different values; the blind spot the docstring names."""
  fingerprint = jax.jit(_replicas.fingerprint)
  x = np.random.default_rng(6).normal(size=70_000).astype(np.float32)

  def swapped(p, q, a, b):
    out = x.copy()
    out[p], out[q] = a, b
    other = out.copy()
    other[p], other[q] = b, a
    return int(fingerprint(out)), int(fingerprint(other))

  pairs = [(1.0, 2.0), (1.5, -1.5), (0.0, -0.0), (1.0, np.nextafter(
      np.float32(1), np.float32(2))), (x[0], x[1])]
  for a, b in pairs:
    for p, q in [(0, 1), (5, 7), (3, 259), (10, 4106), (0, 65535),
                 (40, 69_999)]:
      one, other = swapped(p, q, np.float32(a), np.float32(b))
      assert one != other, (a, b, p, q)
  # Words 2^31 apart (x and -x), 2^16 positions apart: the same word.
  one, other = swapped(7, 7 + 2**16, np.float32(1.5), np.float32(-1.5))
  assert one == other


def test_outside_a_mapped_axis_names_axis_name():
  with pytest.raises(ValueError, match=r"`axis_name` 'r' is not the name of "
                     r"a mapped axis"):
    jax.jit(lambda t: lo.replicas_agree(t, AXIS))({"w": jnp.ones(3)})


def test_empty_tree_agrees():
  agree, first = jax.pmap(lambda t: lo.replicas_agree(t, AXIS),
                          axis_name=AXIS)({"w": None, "x": jnp.ones((N, 0))})
  np.testing.assert_array_equal(agree, np.ones(N, bool))
  np.testing.assert_array_equal(first, np.full(N, -1, np.int32))
