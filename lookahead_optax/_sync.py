"""The sync: one outer-optimizer step on the pseudo-gradient, landed exactly.

At a sync the fast weights are $\\theta = p + u$ (the params after this step's
inner update $u$) and the slow weights $\\phi$ take one outer step on the
pseudo-gradient $\\Delta = \\phi - \\theta$:

* Lookahead (no outer transformation): $\\phi \\leftarrow \\phi + \\alpha
  (\\theta - \\phi)$, an exact interpolation;
* any optax transformation `outer` (e.g. SNOO's Nesterov SGD): $\\phi
  \\leftarrow \\phi + \\text{outer}(\\Delta)$.

The params are then sent to the new slow weights by the update
$\\phi' - p$. Everything here is per leaf and elementwise except the outer
transformation itself, so that the sync fuses with the inner update.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class Carry(NamedTuple):
  """What a step's sync and policies may change; the one carrier of `_step`.

  Attributes:
    updates: the updates this step returns (the inner updates unless synced).
    slow: the stored slow weights (their own dtypes).
    outer_state: the outer transformation's state (or the sync count).
    inner_state: the inner optimizer's state.
    synced_inner: the inner state at the last sync ("pullback"), else None.
    targets: the new slow weights in their compute dtypes, between the outer
      step that computes them and `store`; None where they are stored.
  """

  updates: Any
  slow: Any
  outer_state: Any
  inner_state: Any
  synced_inner: Any
  targets: Any = None


def compute_dtype(slow_leaf: jax.Array) -> Any:
  """Low-precision slow weights are blended in float32 and rounded once."""
  return jnp.promote_types(jnp.result_type(slow_leaf), jnp.float32)


def in_compute_dtype(slow: Any) -> Any:
  """The slow weights in their compute dtypes (what `outer` sees as params)."""
  return jax.tree.map(lambda s: s.astype(compute_dtype(s)), slow)


def fast_weights(p: jax.Array, u: jax.Array, cdtype: Any) -> jax.Array:
  """The fast weights `p + u`, unrounded, in at least `cdtype`.

  XLA drops a bfloat16/float16 rounding of `p + u` under jit (excess
  precision) anyway, so this is what a jitted step computes, and an eager one
  too.
  """
  adtype = jnp.promote_types(jnp.result_type(p, u), cdtype)
  return (p.astype(adtype) + u.astype(adtype)).astype(cdtype)


def interpolate(slow: jax.Array, fast: jax.Array, alpha: jax.Array) -> jax.Array:
  """$\\phi + \\alpha (\\theta - \\phi)$, exact at both ends.

  `alpha = 0` gives `slow` and `alpha = 1` gives `fast` bitwise (the naive
  `slow + 1 * (fast - slow)` need not).
  """
  low = alpha < 0.5
  return jnp.where(low, slow, fast) + jnp.where(
      low, alpha, alpha - 1) * (fast - slow)


def landing_update(p: jax.Array, u: jax.Array, target: jax.Array,
                   slow: jax.Array) -> jax.Array:
  """The update that sends the params leaf `p` to `target` (compute dtype).

  `u` (the inner update) gives the update's dtype, `slow` (the old slow
  weights) the slow weights' dtype. `target` is rounded to the slow weights'
  dtype and then to the params' first, so that where `p + (target - p)` is
  exact (a weight within a factor of two of its target) the params land on
  the rounded target itself, as replicas that store it must (`diloco`).
  """
  pdtype, sdtype = jnp.result_type(p), jnp.result_type(slow)
  if jnp.issubdtype(pdtype, jnp.number):  # bool params: no bool arithmetic
    target = target.astype(sdtype).astype(pdtype)
  return jnp.asarray(target - p).astype(jnp.result_type(u))


def stored_slow(p: jax.Array, update: Optional[jax.Array], target: jax.Array,
                slow: jax.Array, *, keep_target: bool) -> jax.Array:
  """The slow weights to store, given the `update` the step returns.

  Every path that moves the slow weights stores them here (`store`, the
  rollback, the row-sparse tables, Streaming DiLoCo's fragments).

  They are `p + update` with the arithmetic of `optax.apply_updates`, so the
  params land on them bitwise; only where that addition rounds (a weight that
  moved by more than a factor of two in the cycle) do they differ from
  `target`, by one rounding at the scale of the fast weights. With
  `keep_target` (replicas that must agree bitwise, see `diloco`) they are
  `target` itself (`update` is then not read and may be None). Slow
  weights in another dtype (`slow_dtype`) keep the precise target unless the
  params did not land on it.
  """
  sdtype = jnp.result_type(slow)
  if keep_target:
    return target.astype(sdtype)
  pdtype = jnp.result_type(p)
  landed = jnp.asarray(p + update).astype(pdtype)
  if sdtype == pdtype:
    return landed
  target = target.astype(sdtype)
  return jnp.where(same_value_and_sign(landed, target.astype(pdtype)), target,
                   landed.astype(sdtype))


def same_value_and_sign(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a == b`, except that `0.0` and `-0.0` differ (as their bits do).

  A target that rounds to `-0.0` in the params' dtype must not be stored
  where the params landed on `+0.0` (`x + (-x)` is `+0.0`): its rounding
  would then differ from the params in the sign bit.
  """
  return (a == b) & (jnp.signbit(a) == jnp.signbit(b))


def slow_targets(params: Any, inner_updates: Any, slow: Any, outer_state: Any,
                 *, outer: Optional[optax.GradientTransformation],
                 alpha: Optional[jax.Array]) -> tuple[Any, Any]:
  """The outer step: new slow weights (compute dtype) and outer state."""
  cdtypes = jax.tree.map(compute_dtype, slow)
  fast = jax.tree.map(fast_weights, params, inner_updates, cdtypes)
  slow_c = jax.tree.map(lambda s, c: s.astype(c), slow, cdtypes)
  if outer is None:
    targets = jax.tree.map(
        lambda s, f: interpolate(s, f, alpha.astype(s.dtype)), slow_c, fast)
    return targets, outer_state
  delta = jax.tree.map(jnp.subtract, slow_c, fast)
  return apply_outer(outer, delta, outer_state, slow_c)


def alpha_of(opts: Any, outer_state: Any) -> Optional[jax.Array]:
  """The interpolation step of a sync (None with `opts.outer`).

  `opts` holds `lookahead`'s `outer`, `counts_syncs` and `slow_step_size`;
  a schedule is evaluated on the sync count in `outer_state`.
  """
  if opts.outer is not None:
    return None
  if opts.counts_syncs:
    return jnp.asarray(opts.slow_step_size(outer_state.count))
  return jnp.asarray(opts.slow_step_size)


def apply_outer(outer: optax.GradientTransformation, delta: Any,
                outer_state: Any, slow_c: Any) -> tuple[Any, Any]:
  """`outer`'s step on the pseudo-gradient: the targets and its new state.

  `slow_c` are the slow weights in their compute dtypes (`outer`'s params).
  """
  outer_updates, outer_state = outer.update(delta, outer_state, slow_c)
  targets = jax.tree.map(
      lambda s, o: s + jnp.asarray(o).astype(s.dtype), slow_c, outer_updates)
  return targets, outer_state


def sync_updates(params: Any, inner_updates: Any, slow: Any,
                 targets: Any) -> Any:
  """The updates that send the params to the new slow weights `targets`."""
  return jax.tree.map(landing_update, params, inner_updates, targets, slow)


def tree_select(flag: jax.Array, on_true: Any, on_false: Any) -> Any:
  """`jnp.where(flag, a, b)` leaf by leaf (a branch-free choice)."""
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), on_true, on_false)


def store(params: Any, updates: Any, targets: Any, slow: Any) -> Any:
  """The slow weights to store (`stored_slow`, leaf by leaf)."""
  return jax.tree.map(
      lambda p, u, t, s: stored_slow(p, u, t, s, keep_target=False),
      params, updates, targets, slow)
