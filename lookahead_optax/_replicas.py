"""Checks for data-parallel replicas: the same values on every replica.

`check_replicas_agree` reads stacked arrays on the host (before training);
`replicas_agree` runs inside the mapped step, from fingerprints of the bits.
"""

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


# An odd multiplier (Knuth's): position weights that differ in every bit.
_POSITION_MULTIPLIER = np.uint32(2654435761)


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


def fingerprint(leaf: jax.Array) -> jax.Array:
  """Two uint32 words of `leaf`'s bits: a position-weighted sum, an XOR.

  Both wrap modulo $2^{32}$. The XOR fold changes with any single flipped
  bit; the weighted sum with values that swap places.
  """
  bits = _as_uint32(leaf)
  weights = (jnp.arange(bits.shape[0], dtype=jnp.uint32)
             * _POSITION_MULTIPLIER + np.uint32(1))
  weighted = jnp.sum(bits * weights, dtype=jnp.uint32)
  folded = jax.lax.reduce(bits, np.uint32(0), jax.lax.bitwise_xor, (0,))
  return jnp.stack([weighted, folded])


def replicas_agree(tree: Any, axis_name: str) -> tuple[jax.Array, jax.Array]:
  """Whether every replica holds bitwise the same `tree`, checked in a step.

  Call it inside the mapped step (`jax.pmap`, `shard_map`, several
  processes under `jax.distributed`): each replica fingerprints each leaf
  (`fingerprint`: two uint32 words of its bits, so 8 bytes per leaf
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
  """Every replica's fingerprints of `leaves`: (replicas, leaves, 2)."""
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
  differs = jnp.any(gathered != gathered[0], axis=(0, 2))
  agree = ~jnp.any(differs)
  first = jnp.where(agree, -1, jnp.argmax(differs)).astype(jnp.int32)
  if not repair:
    return tree, agree, first, jnp.zeros([], jnp.int32)
  same = jnp.all(gathered[:, None] == gathered[None, :], axis=-1)
  source = jnp.argmax(jnp.sum(same, axis=1), axis=0)  # (leaves,)
  fixed = [jax.lax.cond(differs[i],
                        lambda x, i=i: _take_from(x, source[i], axis_name),
                        lambda x: x, leaf)
           for i, leaf in enumerate(leaves)]
  return (jax.tree.unflatten(treedef, fixed), agree, first,
          jnp.sum(differs).astype(jnp.int32))
