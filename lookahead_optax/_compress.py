"""Compressed averages over a mapped axis: the wire formats of Streaming DiLoCo.

`mean` averages a fragment's pseudo-gradient (float32 leaves) over the
replicas of `axis_name`. In float32 (`communication_dtype=None`) it is one
`jax.lax.pmean`. In a low-precision format the values travel encoded and the
mean is taken in float32 from the decoded values, in two collectives:

1. each replica flattens its pseudo-gradient into one vector, pads it to
   `M * BLOCK`-value blocks (M replicas) and encodes it;
2. `all_to_all`: replica j receives shard j of every replica's vector;
3. it decodes them, sums them in float32 (in replica order) and divides by
   M: shard j of the mean, computed on replica j alone;
4. it encodes that shard again and `all_gather` hands every shard to every
   replica, which decode the same bytes: the mean is bitwise the same on all
   replicas, so the slow weights stay so.

Formats (`FORMATS`): `jnp.bfloat16` (values rounded to bfloat16, no
scale); `jnp.float8_e4m3fn`, `jnp.int8` and `"int4"` carry one float32 scale
per block of `BLOCK` = 256 consecutive values of the flattened vector
(`max |x| / 448`, `/ 127`, `/ 7`), the values rounded to nearest after
dividing by it; `"int4"` packs two 4-bit values (in [-7, 7]) per byte, so
the wire carries half a byte per value. bfloat16 and float8 values travel as
their bits (uint16, uint8): a backend without collectives in those types
(XLA:CPU widens them to float32 and float16) still sends their width, and no
backend does arithmetic on them in transit. With M replicas the bytes sent per
value are `b * (1 + 1/M)` plus the scales' `4 / 256 * (1 + 1/M)`, for `b` =
2, 1, 1 and 0.5 bytes.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 256  # values per float32 scale
FORMATS = ("bfloat16", "float8_e4m3fn", "int8", "int4")
_LIMITS = {"float8_e4m3fn": 448.0, "int8": 127.0, "int4": 7.0}


def format_name(communication_dtype: Any) -> Optional[str]:
  """The name in `FORMATS` of a `communication_dtype`, None for float32.

  Raises:
    ValueError: for any other dtype.
  """
  if communication_dtype is None:
    return None
  if isinstance(communication_dtype, str) and communication_dtype == "int4":
    return "int4"
  try:
    name = jnp.dtype(communication_dtype).name
  except TypeError:
    name = None
  if name == "float32":
    return None
  if name in FORMATS:
    return name
  raise ValueError(
      "`communication_dtype` must be None (float32), jnp.bfloat16, "
      "jnp.float8_e4m3fn, jnp.int8 or 'int4', got "
      f"{communication_dtype!r}.")


def _bits(x: jax.Array, dtype: Any) -> jax.Array:
  """`x`'s bits as `dtype` (of the same width)."""
  return jax.lax.bitcast_convert_type(x, dtype)


class Encoded(NamedTuple):
  """Encoded blocks: `values` (..., BLOCK) or packed, and their `scales`."""

  values: jax.Array
  scales: Optional[jax.Array]  # (...,) float32; None for bfloat16


def encode(x: jax.Array, fmt: str) -> Encoded:
  """Encodes float32 blocks `x` of shape (..., BLOCK)."""
  if fmt == "bfloat16":
    return Encoded(_bits(x.astype(jnp.bfloat16), jnp.uint16), None)
  limit = _LIMITS[fmt]
  amax = jnp.max(jnp.abs(x), axis=-1)
  scales = jnp.where(amax > 0, amax / limit, 1.0).astype(jnp.float32)
  y = jnp.clip(x / scales[..., None], -limit, limit)
  if fmt == "float8_e4m3fn":
    return Encoded(_bits(y.astype(jnp.float8_e4m3fn), jnp.uint8), scales)
  q = jnp.round(y).astype(jnp.int8)
  if fmt == "int8":
    return Encoded(q, scales)
  nibbles = (q + 8).astype(jnp.uint8)  # [1, 15]
  return Encoded(nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scales)


def decode(e: Encoded, fmt: str) -> jax.Array:
  """The float32 values of encoded blocks."""
  if fmt == "bfloat16":
    return _bits(e.values, jnp.bfloat16).astype(jnp.float32)
  if fmt == "int4":
    low = (e.values & 15).astype(jnp.int8) - 8
    high = (e.values >> 4).astype(jnp.int8) - 8
    values = jnp.stack([low, high], axis=-1).reshape(
        e.values.shape[:-1] + (2 * e.values.shape[-1],))
  elif fmt == "float8_e4m3fn":
    values = _bits(e.values, jnp.float8_e4m3fn)
  else:
    values = e.values
  return values.astype(jnp.float32) * e.scales[..., None]


def _flatten(leaves: list, replicas: int) -> tuple[jax.Array, int]:
  """One float32 vector of the leaves, as (replicas, blocks, BLOCK)."""
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  n = flat.shape[0]
  chunk = replicas * BLOCK
  padded = -(-max(n, 1) // chunk) * chunk
  flat = jnp.pad(flat, (0, padded - n))
  return flat.reshape(replicas, padded // chunk, BLOCK), n


def _unflatten(flat: jax.Array, n: int, like: list) -> list:
  """The leaves of the shapes of `like` from the first `n` values of `flat`."""
  flat = flat.reshape(-1)[:n]
  sizes = [int(np.prod(jnp.shape(x))) for x in like]
  parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(like) > 1 else [flat]
  return [p.reshape(jnp.shape(x)) for p, x in zip(parts, like)]


def mean(leaves: list, axis_name: str, fmt: Optional[str]
         ) -> tuple[list, Optional[list]]:
  """The mean over `axis_name` of float32 `leaves`, and what encoding dropped.

  Returns the mean leaves (bitwise equal on every replica) and, for a
  low-precision `fmt`, each leaf minus its decoded encoding on this replica
  (what `error_feedback` keeps), else None.
  """
  if fmt is None:
    return list(jax.lax.pmean(leaves, axis_name)), None
  replicas = jax.lax.axis_size(axis_name)
  blocks, n = _flatten(leaves, replicas)
  sent = encode(blocks, fmt)
  received = jax.tree.map(
      lambda a: jax.lax.all_to_all(a, axis_name, 0, 0), sent)
  shard = jnp.sum(decode(received, fmt), axis=0) / replicas
  shard_sent = encode(shard, fmt)
  gathered = jax.tree.map(
      lambda a: jax.lax.all_gather(a, axis_name), shard_sent)
  # What this replica's encodings dropped: of its own vector, and (the
  # shard it averaged) of the mean, which its next message makes up for
  # (times `replicas`, as the mean divides it so).
  own = jnp.arange(replicas) == jax.lax.axis_index(axis_name)
  dropped = blocks - decode(sent, fmt) + jnp.where(
      own[:, None, None], replicas * (shard - decode(shard_sent, fmt)), 0.0)
  return (_unflatten(decode(gathered, fmt), n, leaves),
          _unflatten(dropped, n, leaves))
