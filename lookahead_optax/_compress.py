"""Compressed averages over a mapped axis: the wire formats of DiLoCo.

`mean` averages float32 leaves (a fragment's pseudo-gradient, or the
gradients of `replica_mean`) over the replicas of `axis_name`. In float32
(`communication_dtype=None`) it is one `jax.lax.pmean`. In a low-precision
format the values travel encoded and the mean is taken in float32 from the
decoded values, in two collectives:

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
per block of `BLOCK` = 256 consecutive values of the flattened vector, the
values rounded to nearest after dividing by it; `"int4"` packs two 4-bit
values per byte, so the wire carries half a byte per value. bfloat16 and
float8 values travel as their bits (uint16, uint8): a backend without
collectives in those types (XLA:CPU widens them to float32 and float16) still
sends their width, and no backend does arithmetic on them in transit. With M
replicas the bytes sent per value are `b * (1 + 1/M)` plus the scales'
`4 / 256 * (1 + 1/M)`, for `b` = 2, 1, 1 and 0.5 bytes.

Non-finite values travel as float32 `pmean` carries them: a NaN, +Inf or
-Inf on any replica reaches the mean on every replica (and +Inf with -Inf
makes a NaN), and it does not corrupt the rest of its block. bfloat16 has
them natively. The scaled formats keep one code each for NaN, +Inf and
-Inf, out of the range of the finite values, and take the block's scale
from its finite values alone (`max |x|` over them, divided by the largest
finite code):

| format | finite values | NaN | +Inf | -Inf |
|---|---|---|---|---|
| `float8_e4m3fn` | [-416, 416] | `0x7F` | `0x7E` (448) | `0xFE` (-448) |
| `int8` | [-126, 126] | -128 | 127 | -127 |
| `"int4"` | [-6, 6], as nibbles `v + 8` | 0 | 15 | 1 |

(float8_e4m3fn has no infinities: its largest finite values, +-448, stand
for them.) No finite value takes these codes, so decoding maps them back to
NaN and Inf with a select and no flag, and the float32 sum of the shards
does NaN and Inf arithmetic as float32 does; the shard of the mean is
encoded again by the same rule. Encoding and decoding are branch-free
elementwise passes (one reduction for the scales), which XLA fuses with the
flattening, the sum and the unflattening around them.

Rounding to nearest, a finite value is off by at most `max |x| / 252`
(int8), `/ 12` (int4), `2**-4 max |x|` (float8) or `2**-8 |x|` (bfloat16)
of its block per encoding. What encoding dropped (`mean`'s second result,
the error-feedback residual) is 0 where a value or the mean is not finite,
so no NaN or Inf is fed back. (Without the codes, a NaN made its block's
`max |x|` NaN, the scale fell back to 1 and the NaN encoded as 0: dropped,
and the block's other values averaged with a wrong scale.)
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 256  # values per float32 scale
FORMATS = ("bfloat16", "float8_e4m3fn", "int8", "int4")
# The largest finite code of each scaled format, and its codes of
# (NaN, +Inf, -Inf) (int4: the nibbles, before packing).
_LIMITS = {"float8_e4m3fn": 416.0, "int8": 126.0, "int4": 6.0}
_CODES = {"float8_e4m3fn": (0x7F, 0x7E, 0xFE), "int8": (-128, 127, -127),
          "int4": (0, 15, 1)}


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


def _mark(codes: jax.Array, x: jax.Array, fmt: str) -> jax.Array:
  """`codes`, with the format's code for NaN, +Inf, -Inf where `x` is one."""
  nan, pos, neg = _CODES[fmt]
  special = jnp.where(jnp.isnan(x), nan, jnp.where(x > 0, pos, neg))
  return jnp.where(jnp.isfinite(x), codes, special.astype(codes.dtype))


def _unmark(values: jax.Array, codes: jax.Array, fmt: str) -> jax.Array:
  """`values`, with NaN, +Inf, -Inf where `codes` is the format's code."""
  nan, pos, neg = _CODES[fmt]
  # Nested selects: `jnp.select` stacks its conditions and reduces them
  # (a variadic reduce XLA:CPU runs as a scalar loop).
  special = jnp.where(codes == pos, jnp.inf, -jnp.inf)
  special = jnp.where(codes == nan, jnp.nan, special)
  return jnp.where((codes == nan) | (codes == pos) | (codes == neg),
                   special, values)


def _codes(y: jax.Array, fmt: str) -> jax.Array:
  """The codes of values `y` already scaled into the format's range."""
  if fmt == "float8_e4m3fn":
    return _bits(y.astype(jnp.float8_e4m3fn), jnp.uint8)
  codes = jnp.round(y).astype(jnp.int8)
  if fmt == "int4":
    return (codes + 8).astype(jnp.uint8)  # [2, 14]
  return codes


def _pack(codes: jax.Array, fmt: str) -> jax.Array:
  if fmt == "int4":
    return codes[..., 0::2] | (codes[..., 1::2] << 4)
  return codes


def _finite_amax(x: jax.Array) -> jax.Array:
  """Per block, `max |x|` over the finite values (0 when there are none).

  A float max (which XLA:CPU runs vectorised; its integer max is a scalar
  loop) of values made finite first: XLA:CPU's float max may drop a NaN,
  so none may reach it. The codes see the NaNs, value by value.
  """
  return jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), axis=-1)


def _encode_codes(x: jax.Array, fmt: str) -> Encoded:
  """`encode`, with one code per value (int4's not packed yet)."""
  limit = _LIMITS[fmt]
  amax = _finite_amax(x)
  scales = jnp.where(amax > 0, amax / limit, 1.0).astype(jnp.float32)
  y = jnp.clip(x / scales[..., None], -limit, limit)
  y = jnp.where(jnp.isfinite(x), y, 0.0)  # coded by `_mark`
  return Encoded(_mark(_codes(y, fmt), x, fmt), scales)


def _packed(e: Encoded, fmt: str) -> Encoded:
  return Encoded(_pack(e.values, fmt), e.scales)


def encode(x: jax.Array, fmt: str) -> Encoded:
  """Encodes float32 blocks `x` of shape (..., BLOCK).

  One pass for the scales, one for the codes, with no conditional: the
  scale is the block's largest finite `|x|` over the format's largest
  finite code, and a NaN, +Inf or -Inf gets its own code (which no finite
  value takes, so `decode` needs no flag to find it).
  """
  if fmt == "bfloat16":
    return Encoded(_bits(x.astype(jnp.bfloat16), jnp.uint16), None)
  return _packed(_encode_codes(x, fmt), fmt)


def _unpacked(e: Encoded, fmt: str) -> Encoded:
  """`e` with one code per value (int4's nibbles apart)."""
  if fmt != "int4":
    return e
  codes = jnp.stack([e.values & 15, e.values >> 4], axis=-1).reshape(
      e.values.shape[:-1] + (2 * e.values.shape[-1],))
  return Encoded(codes, e.scales)


def _decode_codes(e: Encoded, fmt: str) -> jax.Array:
  """The float32 values of one code per value (NaN and Inf where coded)."""
  codes = e.values
  if fmt == "int4":
    values = codes.astype(jnp.int8) - 8
  elif fmt == "float8_e4m3fn":
    values = _bits(codes, jnp.float8_e4m3fn)
  else:
    values = codes
  values = values.astype(jnp.float32) * e.scales[..., None]
  return _unmark(values, codes, fmt)


def decode(e: Encoded, fmt: str) -> jax.Array:
  """The float32 values of encoded blocks (NaN and Inf where coded)."""
  if fmt == "bfloat16":
    return _bits(e.values, jnp.bfloat16).astype(jnp.float32)
  return _decode_codes(_unpacked(e, fmt), fmt)


def _encoded(x: jax.Array, fmt: str) -> tuple[Encoded, jax.Array]:
  """`encode(x, fmt)`, and `x` minus its decoding; 0 where not finite.

  The difference is taken from the codes before int4 packs them, so that
  error feedback does not unpack what was just packed.
  """
  if fmt == "bfloat16":
    e = encode(x, fmt)
    d = x - decode(e, fmt)
  else:
    codes = _encode_codes(x, fmt)
    e, d = _packed(codes, fmt), x - _decode_codes(codes, fmt)
  return e, jnp.where(jnp.isfinite(d), d, 0.0)


def _sum_in_order(x: jax.Array) -> jax.Array:
  """`x[0] + x[1] + ...`, in that order, over the (static) leading axis.

  Written out rather than `jnp.sum(x, axis=0)`: XLA:CPU emits that
  reduction over the major axis, fused with the decoding before it, as a
  scalar loop, 20-30x slower than the adds of the slices (which also fix
  the order of the float32 sum).
  """
  total = x[0]
  for row in range(1, x.shape[0]):
    total = total + x[row]
  return total


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


def mean(leaves: list, axis_name: str, fmt: Optional[str],
         total: Optional[jax.Array] = None
         ) -> tuple[list, Optional[list]]:
  """The mean over `axis_name` of float32 `leaves`, and what encoding dropped.

  With `total` (a float32 scalar, the same on every replica), the leaves are
  summed over the axis and divided by `total` instead of the number of
  replicas: a weighted mean, when each replica sends its leaves times its
  weight and `total` is the sum of the weights.

  Returns the mean leaves (bitwise equal on every replica) and, for a
  low-precision `fmt`, each leaf minus its decoded encoding on this replica
  (what `error_feedback` keeps; 0 where not finite), else None.
  """
  replicas = jax.lax.axis_size(axis_name)
  if fmt is None:
    if total is None:
      return list(jax.lax.pmean(leaves, axis_name)), None
    return [x / total for x in jax.lax.psum(leaves, axis_name)], None
  divisor = replicas if total is None else total
  blocks, n = _flatten(leaves, replicas)
  sent, dropped_own = _encoded(blocks, fmt)
  received = jax.tree.map(
      lambda a: jax.lax.all_to_all(a, axis_name, 0, 0), sent)
  shard = _sum_in_order(decode(received, fmt)) / divisor
  shard_sent, dropped_shard = _encoded(shard, fmt)
  gathered = jax.tree.map(
      lambda a: jax.lax.all_gather(a, axis_name), shard_sent)
  # What this replica's encodings dropped: of its own vector, and (the
  # shard it averaged) of the mean, which its next message makes up for
  # (times the divisor, as the mean divides it so).
  # (Added to this replica's row in place: a select over every row would
  # let XLA fuse the shard's decoding and sum into each row's pass.)
  dropped = dropped_own.at[jax.lax.axis_index(axis_name)].add(
      divisor * dropped_shard)
  return (_unflatten(decode(gathered, fmt), n, leaves),
          _unflatten(dropped, n, leaves))
