"""Checks for data-parallel replicas: the same values on every replica.

`check_replicas_agree` reads stacked arrays on the host (before training);
`replicas_agree` runs inside the mapped step, from fingerprints of the bits.
"""

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lookahead_optax import _tree


def check_replicas_agree(tree: Any, name: str = "params") -> None:
  """Raises unless every replica holds bitwise the same values.

  DiLoCo (`diloco`) needs the initial params to be
  identical on all replicas: each replica's slow weights start as its own
  initial params and move by the averaged pseudo-gradient, so replicas that
  start apart (e.g. `jax.pmap(init)(keys)` with one key per device) stay
  apart, silently. Call this on the params (or the optimizer state) before
  training, outside any transformation. It reads the arrays to the host.

  Args:
    tree: a pytree whose leaves carry the replicas along axis 0: the inputs
      or outputs of a `jax.pmap`, or arrays sharded along the replica axis
      of a mesh (their global value).
    name: what `tree` is, for the message.

  Raises:
    ValueError: naming the first leaf whose replicas differ, and the first
      replica that differs from replica 0.

  Example:
    >>> import jax.numpy as jnp
    >>> import lookahead_optax as lo
    >>> lo.check_replicas_agree({"w": jnp.ones((8, 3))})  # 8 replicas
    >>> lo.check_replicas_agree({"w": jnp.arange(8.0)[:, None]})
    Traceback (most recent call last):
    ...
    ValueError: `params` leaf ['w'] differs between replicas 0 and 1: ...
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_tree.is_masked_node)[0]:
    if _tree.is_masked_node(leaf):
      continue
    value = np.asarray(leaf)
    if value.ndim == 0:
      raise ValueError(
          f"`{name}` leaf {_tree.path_str(path)} is a scalar: expected a "
          "leading axis of replicas (the arrays of a `jax.pmap`, or sharded "
          "along the replica axis).")
    bits = value.view(f"u{value.dtype.itemsize}") if value.dtype.kind in (
        "f", "c") else value
    for r in range(1, value.shape[0]):
      if not np.array_equal(bits[r], bits[0]):
        raise ValueError(
            f"`{name}` leaf {_tree.path_str(path)} differs between replicas "
            f"0 and {r}: DiLoCo needs the same initial params "
            "on every replica (initialise once and replicate, e.g. "
            "`jax.tree.map(lambda a: jnp.stack([a] * n), init)`, not "
            "`jax.pmap(init)(keys)` with one key per replica).")


# How `fingerprint` sums on XLA:CPU. It emits an integer reduction of more
# than 32 values as a chain of `reduce-window` that fuses nothing it reads:
# the words are written out first, ~10x the time of a float32 `jnp.sum`.
# Instead the body's `_SLICES` slices are added elementwise (contiguous
# vector loads) and each `_ROW` of those sums reduced, in one fusion that
# reads the leaf once: ~0.7x a float32 `jnp.sum` at 10M values. With 16
# slices XLA writes the words out again.
_SLICES = 8
_ROW = 32
# Knuth's multiplicative hashing constant (a prime near 2^32 over the golden
# ratio): odd, so multiplying by it is a bijection modulo 2^32.
_MIX = np.uint32(0x9E3779B1)


def _as_uint32(leaf: jax.Array) -> jax.Array:
  """The bits of `leaf`'s values as a flat uint32 vector (no value cast)."""
  x = jnp.ravel(jnp.asarray(leaf))
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.concatenate([jnp.real(x), jnp.imag(x)])
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width == 8:
    return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mixed(words: jax.Array) -> jax.Array:
  """$(w \\oplus (w \\gg 16)) \\cdot$ `_MIX`: a bijection of uint32 words.

  The shift is its own inverse (a shift of half the width) and an odd
  multiplier has one modulo $2^{32}$. It moves the high bits (sign,
  exponent) down, so that `fingerprint` sees swapped values that differ in
  those bits alone.
  """
  return (words ^ (words >> np.uint32(16))) * _MIX


def _terms(words: jax.Array, start: int) -> jax.Array:
  """`_mixed(words)` times the odd weights $2p + 1$ of their positions $p$.

  `words` are consecutive flat words, the first at position `start`.
  """
  position = np.uint32(start % 2**32) + jax.lax.iota(jnp.uint32,
                                                     words.shape[0])
  return _mixed(words) * ((position << np.uint32(1)) | np.uint32(1))


def fingerprint(leaf: jax.Array) -> jax.Array:
  """One uint32 word of `leaf`'s bits: $\\sum_p m(w_p) (2p + 1) \\bmod 2^{32}$.

  $w_p$ is the $p$-th uint32 word of the flat bits (one per value of 1, 2
  or 4 bytes, zero-extended; two per 8-byte value; a bool is 0 or 1) and
  $m$ is `_mixed`, a bijection. What it promises:

  * a change to any one word (any flipped bit of a value, or any other
    value of up to 4 bytes in its place) always changes it: $m(w_p)$
    changes, and a nonzero difference times the odd weight $2p + 1$ is
    nonzero modulo $2^{32}$. An XOR fold of the words (the second word
    this function had) adds nothing to that, so one word is sent;
  * a swap of two different words $a, b$ at positions $p \\neq q$ changes
    it by $(m(a) - m(b)) \\, 2 (p - q)$: never missed when
    $|p - q| < 2^{16}$, unless $a \\oplus b$ is one 16-bit pattern in both
    halves. Without $m$ a swap of $x$ and $-x$ (words $2^{31}$ apart) would
    be missed at any distance, of $x$ and $2x$ at 256 apart;
  * any other difference: missed with a chance of about $2^{-32}$.

  The sum wraps, so it is exact in any order: XLA may split it as it
  likes, and every replica and process gets the same word from the same
  bits. It sums in the order that XLA:CPU runs fast (`_SLICES`, `_ROW`):
  the body in `_SLICES` slices added elementwise, their sums by rows of
  `_ROW` kept apart (`optimization_barrier`: XLA would merge the two
  reductions into one long one), then the rows and the tail.
  """
  words = _as_uint32(leaf)
  body = words.shape[0] - words.shape[0] % (_SLICES * _ROW)
  size = body // _SLICES
  slices = words[:body].reshape(_SLICES, size)
  added = functools.reduce(operator.add, [
      _terms(slices[i], i * size) for i in range(_SLICES)])
  row_sums = jnp.sum(added.reshape(-1, _ROW), axis=1, dtype=jnp.uint32)
  row_sums = jax.lax.optimization_barrier(row_sums)
  tail = jnp.sum(_terms(words[body:], body), dtype=jnp.uint32)
  return jnp.sum(row_sums, dtype=jnp.uint32) + tail


def replicas_agree(tree: Any, axis_name: str) -> tuple[jax.Array, jax.Array]:
  """Whether every replica holds bitwise the same `tree`, checked in a step.

  Call it inside the mapped step (`jax.pmap`, `shard_map`, several
  processes under `jax.distributed`): each replica fingerprints each leaf
  (`fingerprint`: one uint32 word of its bits, so 4 bytes per leaf
  travel), one `all_gather` hands every replica all of them, and every
  replica compares them the same way, so both results are the same on
  every replica.

  Args:
    tree: a pytree of arrays, this replica's copy (no replica axis), e.g.
      `lo.slow_params(state)` or the outer state.
    axis_name: the mapped axis of the replicas.

  Returns:
    `(agree, first)`: a bool scalar, True when every leaf's fingerprint is
    the same on every replica, and the index (in `jax.tree.leaves` order)
    of the first leaf that differs, -1 when none does (int32).

  Raises:
    ValueError: when `axis_name` is not a mapped axis where it is called.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lookahead_optax as lo
    >>> tree = {"a": jnp.zeros((2, 3)), "b": jnp.stack([jnp.ones(3),
    ...                                                   jnp.ones(3) + 1e-7])}
    >>> check = jax.pmap(lambda t: lo.replicas_agree(t, "r"), axis_name="r",
    ...                  devices=jax.devices()[:2])
    >>> agree, first = check(tree)
    >>> print(agree, first)  # leaf 1 ("b") differs, on both replicas
    [False False] [1 1]
  """
  from lookahead_optax import _arguments  # pylint: disable=g-import-not-at-top
  _arguments.check_axis_bound(axis_name)
  _, agree, first, _ = majority(tree, axis_name, repair=False)
  return agree, first


def _gathered_prints(leaves: list, axis_name: str) -> jax.Array:
  """Every replica's fingerprints of `leaves`: (replicas, leaves)."""
  prints = jnp.stack([fingerprint(x) for x in leaves])
  return jax.lax.all_gather(prints, axis_name)


def _take_from(leaf: jax.Array, source: jax.Array, axis_name: str
               ) -> jax.Array:
  """Replica `source`'s copy of `leaf`, bit for bit, on every replica.

  One all-reduce of the leaf's bits as unsigned integers, zero on every
  other replica: integer sums with zeros are exact (a float sum would turn
  -0.0 into +0.0). Or-ed with this replica's zeros, the result has the
  per-replica type of the leaf it replaces (under `shard_map`, a `psum` is
  typed as the same on every replica, and a conditional's branches must
  agree).
  """
  x = jnp.asarray(leaf)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint8)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32,
                8: jnp.uint64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
  mine = jax.lax.axis_index(axis_name) == source
  zeros = bits & jnp.zeros_like(bits)  # this replica's: typed per replica
  bits = jax.lax.psum(jnp.where(mine, bits, zeros), axis_name) | zeros
  if x.dtype == jnp.bool_:
    return bits.astype(jnp.bool_)
  return jax.lax.bitcast_convert_type(bits, x.dtype)


def majority(tree: Any, axis_name: str, repair: bool
             ) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
  """`tree` checked across the replicas and, with `repair`, made to agree.

  Each leaf whose fingerprint differs between replicas takes, on every
  replica, the value held by the most replicas (ties: the lowest replica
  index), moved by one collective of that leaf alone, in a conditional
  that the other leaves skip. Returns the tree, whether the replicas
  agreed, the first leaf that differed (-1) and the number repaired.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    zero = jnp.zeros([], jnp.int32)
    return tree, jnp.asarray(True), zero - 1, zero
  gathered = _gathered_prints(leaves, axis_name)
  differs = jnp.any(gathered != gathered[0], axis=0)
  agree = ~jnp.any(differs)
  first = jnp.where(agree, -1, jnp.argmax(differs)).astype(jnp.int32)
  if not repair:
    return tree, agree, first, jnp.zeros([], jnp.int32)
  same = gathered[:, None] == gathered[None, :]
  source = jnp.argmax(jnp.sum(same, axis=1), axis=0)  # (leaves,)
  fixed = [jax.lax.cond(differs[i],
                        lambda x, i=i: _take_from(x, source[i], axis_name),
                        lambda x: x, leaf)
           for i, leaf in enumerate(leaves)]
  return (jax.tree.unflatten(treedef, fixed), agree, first,
          jnp.sum(differs).astype(jnp.int32))
