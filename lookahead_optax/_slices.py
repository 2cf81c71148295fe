"""`diloco(..., fragments="slices")`: a slice of every leaf syncs every step.

With $k$ = `sync_period`, each params leaf of $n$ values is viewed as a
$(k, m)$ array, $m = \\lceil n / k \\rceil$: its values flattened (C order),
padded with zeros at the end to $k m$ and reshaped (`view`). Row $j$ is
slice $j$ of the leaf. A leaf with fewer than $k$ values has slices that
are all padding (a leaf of 2 values and $k = 4$: slices 2 and 3); their
syncs move nothing.

Slice $j$ of every leaf syncs after the inner steps $t$ (the step counter
after the step, as every `diloco` sync counts it) with
$t \\bmod k = (j + 1) \\bmod k$, i.e. $j = (t - 1) \\bmod k$: the first step
syncs slice 0, step $k$ slice $k - 1$, and every value syncs once every $k$
steps. This is the schedule of `fragments=k` (fragment $f$ at the slot
$(f + 1) k / P \\bmod k$), with the $k$ fragments cut across every leaf
instead of by leaves. At that sync, as for a fragment (`_streaming.
outer_step`): the slice's pseudo-gradient (slow minus fast weights, or with
`overlap` slow weights minus the params entering the step) is averaged over
the replicas (`_compress.mean`, every leaf's slice in one call), the outer
step runs on the slices with slice $j$'s own outer state, and the slice's
params land on $\\text{mix}(\\theta + u) + (1 - \\text{mix}) \\phi'$.

There is no conditional: $j$ is traced, and row $j$ is picked with
`jax.lax.dynamic_index_in_dim` and written back with
`jax.lax.dynamic_update_index_in_dim`, so the collectives have static
shapes and sit in the entry computation of the compiled step, every step
sending $1 / k$ of the model (padding aside). The step's updates are the
inner updates except at slice $j$'s positions (an iota compare, fused
into the landing's elementwise pass), where they land.

The state (`StreamingState`): the slow weights stay params-shaped (so
`slow_params` works); `outer_states` is a 1-tuple of `outer.init` of each
slice's tree (leaves of shape $(m,)$), stacked along a leading axis of
$k$, so any optax outer works with per-slice counts; the error-feedback
buffers are params-shaped and sliced like the slow weights.

Overlap: with `overlap=True` the collectives' operands are the params
entering the step and the state (tested on the jaxpr of a whole step).
Nothing forces their order against the step's compute: XLA's
latency-hiding scheduler may overlap an asynchronous collective with
independent compute of the same computation (on GPU), which no conditional
now hides. JAX 0.10.2 ships `jax.experimental.control_deps.control_dep`
(experimental, a side-effecting FFI custom call; earlier versions were not
checked); it is not used: ordering the whole collective before the
compute would make the step wait for it, not overlap it, and data
independence is what lets the scheduler start it early.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _participation
from lookahead_optax import _streaming
from lookahead_optax import _sync
from lookahead_optax._types import StreamingState


def slice_size(n: int, sync_period: int) -> int:
  """$m = \\lceil n / k \\rceil$: the values of one slice of an n-value leaf."""
  return -(-n // sync_period)


def view(x: jax.Array, sync_period: int) -> jax.Array:
  """`x` flattened, zero-padded to `sync_period * m` values, as (k, m)."""
  flat = jnp.ravel(x)
  m = slice_size(flat.shape[0], sync_period)
  return jnp.pad(flat, (0, sync_period * m - flat.shape[0])).reshape(
      sync_period, m)


def unview(v: jax.Array, like: jax.Array) -> jax.Array:
  """The leaf of the shape of `like` from its (k, m) view `v`."""
  n = int(np.prod(jnp.shape(like)))
  return v.reshape(-1)[:n].reshape(jnp.shape(like))


def row(x: jax.Array, j: jax.Array, sync_period: int) -> jax.Array:
  """Slice `j` (traced) of the leaf `x`: shape (m,)."""
  return jax.lax.dynamic_index_in_dim(view(x, sync_period), j,
                                      keepdims=False)


def written(x: jax.Array, value: jax.Array, j: jax.Array,
            sync_period: int) -> jax.Array:
  """The leaf `x` with slice `j` replaced by `value` (in `x`'s dtype)."""
  v = jax.lax.dynamic_update_index_in_dim(
      view(x, sync_period), value.astype(x.dtype), j, 0)
  return unview(v, x)


def in_slice(x: jax.Array, j: jax.Array, sync_period: int) -> jax.Array:
  """Whether each position of the leaf `x` is in slice `j` (bool, x's shape)."""
  n = int(np.prod(jnp.shape(x)))
  m = slice_size(n, sync_period)
  index = jnp.arange(n, dtype=jnp.int32).reshape(jnp.shape(x))
  start = j.astype(jnp.int32) * m
  return (index >= start) & (index < start + m)


def init_state(config: Any, outer: optax.GradientTransformation,
               slow: Any) -> StreamingState:
  """The outer state of every slice, stacked; the error-feedback buffers."""
  k = config.sync_period
  slow_c = _sync.in_compute_dtype(slow)
  stacked = jax.vmap(outer.init)(jax.tree.map(lambda s: view(s, k), slow_c))
  residuals = (jax.tree.map(jnp.zeros_like, slow_c)
               if config.error_feedback else None)
  return StreamingState((stacked,), residuals, _participation.init_counts())


def sync(opts: Any, params: Any, inner_updates: Any, slow: Any, state: Any,
         step: jax.Array, weight: Optional[jax.Array] = None
         ) -> tuple[Any, Any, Any, None]:
  """This step's slice sync: slice `(step - 1) % sync_period` of every leaf.

  Returns the updates, the slow weights, the `StreamingState` and None
  (no per-leaf flags: `inner_state="reset"` is rejected with slices).
  """
  k, mix = opts.sync_period, opts.streaming.mix
  j = ((step - 1) % k).astype(jnp.int32)
  p, treedef = jax.tree.flatten(params)
  u, s = treedef.flatten_up_to(inner_updates), treedef.flatten_up_to(slow)
  res = (None if state.residuals is None
         else treedef.flatten_up_to(state.residuals))
  rows = lambda leaves: [row(x, j, k) for x in leaves]  # pylint: disable=unnecessary-lambda-assignment
  (stacked,) = state.outer_states
  outer_j = jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), stacked)
  frag = _streaming.Fragment(list(range(len(p))), treedef, len(p))
  new_rows, outer_j, res_rows, counts = _streaming.outer_step(
      opts, frag, rows(s), rows(p),
      None if opts.streaming.overlap else rows(u), outer_j,
      None if res is None else rows(res), weight, state.counts)
  stacked = jax.tree.map(
      lambda x, y: jax.lax.dynamic_update_index_in_dim(
          x, jnp.asarray(y).astype(x.dtype), j, 0), stacked, outer_j)
  new_slow = [written(x, r, j, k) for x, r in zip(s, new_rows)]
  updates = [
      jnp.where(in_slice(a, j, k),
                _streaming.landing(a, b, n, old, mix), b)
      for a, b, n, old in zip(p, u, new_slow, s)]
  if res is not None:
    res = treedef.unflatten(
        [written(x, r, j, k) for x, r in zip(res, res_rows)])
  return (treedef.unflatten(updates), treedef.unflatten(new_slow),
          StreamingState((stacked,), res, counts), None)
