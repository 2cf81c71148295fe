"""The Lookahead optimizer as a drop-in optax gradient transformation."""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _checks
from lookahead_optax import _tree

_INNER_STATE_POLICIES = ("keep", "reset", "pullback")
_SYNC_MODES = ("auto", "select", "cond")
_NONFINITE_POLICIES = ("propagate", "rollback")


class LookaheadState(NamedTuple):
  """State of the transformation returned by `lookahead`.

  Attributes:
    inner_state: the state of the inner (fast) optimizer. With
      `inner_state="pullback"` it is a `PullbackState` that holds the inner
      state and its value at the last sync.
    slow_params: the slow weights, a pytree with the structure and shapes of
      the params (and their dtypes, unless `slow_dtype` was given). They start
      as a copy of the initial params and move only at a sync.
    step: the number of `update` calls so far (int32). A sync happens on the
      call that brings `step` to a multiple of `sync_period`.
  """

  inner_state: optax.OptState
  slow_params: optax.Params
  step: jax.Array


class PullbackState(NamedTuple):
  """Inner state kept by `lookahead(..., inner_state="pullback")`.

  Attributes:
    inner_state: the inner optimizer's current state.
    synced_inner_state: the inner state as it was after the last sync (the
      inner optimizer's initial state before the first sync). Its
      parameter-shaped leaves cost one more copy of each of them.
  """

  inner_state: optax.OptState
  synced_inner_state: optax.OptState


def _resolve_sync_mode(sync: str, inner_state: str) -> str:
  if sync != "auto":
    return sync
  # Measured on CPU (docs/benchmarks.md): with inner_state="keep" the
  # branchless select fuses with the inner update into one pass (1.05x adam)
  # where a conditional costs 1.6-2.9x. With "reset"/"pullback" the select
  # also rewrites the inner state every step and XLA copies the moments
  # (4.4x/7.5x adam), so the conditional (1.6x/1.7x) wins. Other backends
  # keep the design's `lax.cond`, which skips the slow-weight pass on k-1 of
  # every k steps (not measured here: run the benchmarks on your hardware).
  if jax.default_backend() == "cpu" and inner_state == "keep":
    return "select"
  return "cond"


def _copy(x: jax.Array) -> jax.Array:
  """A copy of `x` in a fresh buffer (so params and state can be donated)."""
  return jnp.array(x, copy=True)


def _find_multisteps(tree: Any) -> bool:
  leaves = jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, optax.MultiStepsState)
  )
  return any(isinstance(x, optax.MultiStepsState) for x in leaves)


def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int = 5,
    slow_step_size: optax.ScalarOrSchedule = 0.5,
    *,
    inner_state: str = "keep",
    sync: str = "auto",
    on_nonfinite: str = "propagate",
    slow_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lookahead: k steps forward with `inner`, then one step back.

  Runs the inner optimizer on the (fast) params at every step. Every
  `sync_period` steps the slow weights :math:`\phi` move towards the fast
  weights :math:`\theta`,

  .. math::
    \phi \leftarrow \phi + \alpha (\theta - \phi),

  and the returned update sends the fast params to the new slow weights. The
  slow weights start as a copy of the initial params and live in the optimizer
  state, so the params stay a plain pytree: `lookahead` drops into
  `optax.apply_updates`, a Flax `TrainState` or an `nnx.Optimizer` with no other
  change. Use `slow_params` or `eval_params` to evaluate on the slow weights.

  The sync update is computed first and the slow weights are stored as
  ``params + update`` with the arithmetic of `optax.apply_updates`, so after a
  sync the params equal the slow weights bitwise (in any float dtype).

  Lookahead must be the last transformation that changes the updates, e.g.
  ``optax.chain(optax.clip_by_global_norm(1.0), lookahead(optax.adamw(1e-3)))``;
  a transformation after it would move the params away from the slow weights.
  For gradient accumulation wrap it, ``optax.MultiSteps(lookahead(...), n)``,
  so that syncs count applied steps; ``lookahead(optax.MultiSteps(...))`` is
  rejected.

  Args:
    inner: the inner (fast) optimizer, any optax gradient transformation.
      Extra keyword arguments of `update` are passed on to it.
    sync_period: `k`, the number of inner steps between syncs; an integer >= 1.
      May be a traced integer (e.g. under `optax.inject_hyperparams`).
    slow_step_size: `alpha`, the slow weights' step size: a float in [0, 1], a
      scalar array (may be traced), or a schedule evaluated on the number of
      syncs done before the current one. `alpha = 1` reduces to `inner`
      (bitwise), `alpha = 0` returns to the initial params at every sync (up
      to one rounding where a weight moved by more than a factor of two).
    inner_state: what happens to the inner optimizer's state at a sync.
      ``"keep"`` (the paper's default) leaves it alone. ``"reset"`` resets its
      parameter-shaped leaves (e.g. Adam moments) to their initial values,
      keeping step counts (schedules go on), dtypes, and clearing NaNs.
      ``"pullback"`` interpolates the parameter-shaped leaves between their
      value at the last sync and now with the same `alpha`, as the paper
      authors' code does for momentum; it stores one more copy of those
      leaves.
    sync: how the sync is compiled. ``"select"`` computes the sync update
      branch-free at every step and selects it on sync steps (fuses with the
      inner update into one pass; fastest on CPU). ``"cond"`` runs the sync in
      a `jax.lax.cond`. ``"auto"`` (default) picks ``"select"`` on CPU with
      ``inner_state="keep"`` and ``"cond"`` otherwise (the fastest measured;
      docs/benchmarks.md). Both compute the same sync; they may differ in
      the last bit of a few elements because XLA fuses multiply-adds (FMA)
      differently in the two (on CPU), while the params equal the slow
      weights bitwise after a sync in both.
    on_nonfinite: ``"propagate"`` (default) applies non-finite updates as
      they are. ``"rollback"``: when the inner update or the fast params it
      would produce has a non-finite value, the step returns the update that
      sends the params back to the slow weights, resets the parameter-shaped
      inner state, and leaves the slow weights untouched (no sync on that
      step). Params that are already non-finite cannot be repaired by an
      additive update.
    slow_dtype: if given, a floating dtype in which to keep the slow weights of
      floating params (e.g. ``jnp.float32`` for bfloat16 params), so that small
      updates accumulate in the slow weights instead of rounding away. After a
      sync the params equal ``slow.astype(params.dtype)`` bitwise.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`.

  Raises:
    TypeError: if `inner` is not a gradient transformation, or `sync_period`
      or `slow_step_size` has the wrong type.
    ValueError: if `sync_period` < 1, `slow_step_size` is outside [0, 1] or
      NaN, a string option is not one of its values, `inner` is an
      `optax.MultiSteps`, or `update` is called without params or with params
      or updates whose structure, shapes or dtypes differ from the state.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.5)
    >>> params = jnp.array([4.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = params  # gradient of 0.5 * params**2
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params, lo.slow_params(state))
    [2.5] [2.5]

    The fast params went 4 -> 2 -> 1, then the sync moved the slow weights
    half-way from 4 to 1, to 2.5, and sent the params there.

  References:
    Zhang, Lucas, Hinton, Ba, `Lookahead Optimizer: k steps forward, 1 step
    back <https://arxiv.org/abs/1907.08610>`_, NeurIPS 2019.
  """
  _checks.check_transformation("inner", inner)
  if isinstance(inner, optax.MultiSteps) or isinstance(
      getattr(inner.update, "__self__", None), optax.MultiSteps
  ):
    raise ValueError(
        "`inner` must not be an optax.MultiSteps: lookahead would count "
        "micro-steps. Wrap lookahead instead: "
        "optax.MultiSteps(lookahead(inner, ...), every_k_schedule=n)."
    )
  _checks.check_sync_period(sync_period)
  _checks.check_unit_interval(
      "slow_step_size", slow_step_size, allow_schedule=True
  )
  _checks.check_choice("inner_state", inner_state, _INNER_STATE_POLICIES)
  _checks.check_choice("sync", sync, _SYNC_MODES)
  _checks.check_choice("on_nonfinite", on_nonfinite, _NONFINITE_POLICIES)
  if slow_dtype is not None:
    try:
      slow_dtype = jnp.dtype(slow_dtype)
    except TypeError as e:
      raise TypeError(
          f"`slow_dtype` must be a floating dtype or None, got {slow_dtype!r}."
      ) from e
    if not jnp.issubdtype(slow_dtype, jnp.floating):
      raise TypeError(
          f"`slow_dtype` must be a floating dtype or None, got {slow_dtype!r}."
      )
  inner = optax.with_extra_args_support(inner)

  def slow_leaf_dtype(param):
    dtype = jnp.result_type(param)
    if slow_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      return slow_dtype
    return dtype

  def init_fn(params):
    inner_init = inner.init(params)
    if _find_multisteps(inner_init):
      raise ValueError(
          "`inner` contains an optax.MultiSteps: lookahead would count "
          "micro-steps. Wrap lookahead instead: "
          "optax.MultiSteps(lookahead(inner, ...), every_k_schedule=n)."
      )
    if inner_state == "pullback":
      inner_init = PullbackState(inner_init, jax.tree.map(_copy, inner_init))
    slow = jax.tree.map(
        lambda p: jnp.asarray(p, dtype=slow_leaf_dtype(p), copy=True), params
    )
    return LookaheadState(
        inner_state=inner_init,
        slow_params=slow,
        step=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "`params` is required: lookahead's update needs the current params "
          "to compute the sync, call `tx.update(grads, state, params)`."
      )
    if not isinstance(state, LookaheadState):
      raise TypeError(
          f"`state` must be a LookaheadState, got {type(state).__name__}."
      )
    _checks.check_same_tree(
        "params", params, state.slow_params,
        check_dtypes=slow_dtype is None, reference_name="the slow params",
    )
    _checks.check_same_tree(
        "updates", updates, state.slow_params,
        reference_name="the slow params",
    )

    if inner_state == "pullback":
      current, synced = state.inner_state
    else:
      current, synced = state.inner_state, None
    inner_updates, new_inner = inner.update(
        updates, current, params, **extra_args
    )

    step = optax.safe_increment(state.step)
    is_sync = step % sync_period == 0
    if callable(slow_step_size):
      alpha = slow_step_size(state.step // sync_period)
    else:
      alpha = slow_step_size
    alpha = jnp.asarray(alpha)

    num_params = len(jax.tree.leaves(
        params, is_leaf=_tree.is_masked_node))

    def map_param_shaped(fn, tree, *others):
      """`fn` over the parameter-shaped leaves of an inner state `tree`."""
      return _tree.map_param_shaped(
          lambda _, x, *ys: fn(x, *ys), [True] * num_params, params, tree,
          *others)

    if on_nonfinite == "rollback":
      fast = optax.apply_updates(params, inner_updates)
      finite = [jnp.all(jnp.isfinite(x)) for x in
                jax.tree.leaves((inner_updates, fast))
                if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
      bad = jnp.logical_not(jnp.all(jnp.stack(finite))) if finite else False
    else:
      bad = None

    def leaf_sync(flag, p, u, s):
      """Returns (update, slow weights) of one leaf; a sync where `flag`.

      The slow weights are written as ``params + update`` from the *selected*
      update, the very expression `optax.apply_updates` computes, so XLA
      fuses both into one pass and the params land on the slow weights
      bitwise.
      """
      pdtype, sdtype = jnp.result_type(p), jnp.result_type(s)
      udtype = jnp.result_type(u)
      # Low-precision slow weights are blended in float32 and rounded once.
      cdtype = jnp.promote_types(sdtype, jnp.float32)
      # The fast weights enter the blend unrounded, in at least `cdtype`: XLA
      # drops a bfloat16/float16 rounding of `p + u` under jit (excess
      # precision) anyway, so this is what a jitted step computes, and now an
      # eager one too.
      adtype = jnp.promote_types(jnp.result_type(p, u), cdtype)
      fast_c = (p.astype(adtype) + u.astype(adtype)).astype(cdtype)
      s_c = s.astype(cdtype)
      # An exact lerp at both ends: `alpha = 0` gives `s` and `alpha = 1`
      # gives the fast weights bitwise (`s + 1 * (fast - s)` need not).
      alpha_c = alpha.astype(cdtype)
      low = alpha_c < 0.5
      target = jnp.where(low, s_c, fast_c) + jnp.where(
          low, alpha_c, alpha_c - 1) * (fast_c - s_c)
      if sdtype == pdtype:
        new_u = jnp.where(flag, jnp.asarray(target - p).astype(udtype), u)
        landed = jnp.asarray(p + new_u).astype(pdtype)
        return new_u, jnp.where(flag, landed, s)
      # Slow weights kept in another dtype: keep the precise target unless
      # the addition in the params' dtype misses its rounding (rare: a weight
      # that moves by more than a factor of two), in which case store what
      # the params actually become, so they still equal
      # `slow.astype(params.dtype)` bitwise.
      target = target.astype(sdtype)
      target_p = target.astype(pdtype)
      new_u = jnp.where(flag, jnp.asarray(target_p - p).astype(udtype), u)
      landed = jnp.asarray(p + new_u).astype(pdtype)
      stored = jnp.where(landed == target_p, target, landed.astype(sdtype))
      return new_u, jnp.where(flag, stored, s)

    def sync_tree(flag, inner_updates, slow):
      pairs = jax.tree.map(
          lambda p, u, s: leaf_sync(flag, p, u, s),
          params, inner_updates, slow)
      # `params` leads the maps so each (update, slow) pair is one leaf.
      new_updates = jax.tree.map(lambda _, pair: pair[0], params, pairs)
      new_slow = jax.tree.map(lambda _, pair: pair[1], params, pairs)
      return new_updates, new_slow

    def rollback_update(p, u, s):
      return jnp.asarray(s.astype(jnp.result_type(p)) - p).astype(
          jnp.result_type(u))

    def sync_inner(new_inner, synced):
      """The inner state (and last-synced copy) after a sync."""
      if inner_state == "reset":
        init = inner.init(params)
        return (map_param_shaped(
            lambda x, i: jnp.asarray(i, dtype=x.dtype), new_inner, init),
                synced)
      if inner_state == "pullback":
        pulled = map_param_shaped(
            lambda x, c: (c + alpha.astype(x.dtype) * (x - c)).astype(x.dtype),
            new_inner, synced)
        return pulled, pulled
      return new_inner, synced

    def select(flag, a, b):
      return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)

    do_sync = is_sync if bad is None else is_sync & ~bad
    if _resolve_sync_mode(sync, inner_state) == "select":
      new_updates, new_slow = sync_tree(
          do_sync, inner_updates, state.slow_params)
      if inner_state != "keep":
        synced_inner, synced_copy = sync_inner(new_inner, synced)
        new_inner = select(do_sync, synced_inner, new_inner)
        if synced is not None:
          synced = select(do_sync, synced_copy, synced)
    else:
      def sync_branch(operands):
        inner_updates, slow, new_inner, synced = operands
        new_updates, new_slow = sync_tree(True, inner_updates, slow)
        new_inner, synced = sync_inner(new_inner, synced)
        return new_updates, new_slow, new_inner, synced

      new_updates, new_slow, new_inner, synced = jax.lax.cond(
          do_sync, sync_branch, lambda operands: operands,
          (inner_updates, state.slow_params, new_inner, synced))

    if bad is not None:
      rollback = jax.tree.map(
          rollback_update, params, inner_updates, state.slow_params)
      new_updates = select(bad, rollback, new_updates)
      init = inner.init(params)
      new_inner = map_param_shaped(
          lambda x, i: jnp.where(bad, jnp.asarray(i, dtype=x.dtype), x),
          new_inner, init)

    if inner_state == "pullback":
      new_inner = PullbackState(new_inner, synced)
    return new_updates, LookaheadState(
        inner_state=new_inner, slow_params=new_slow, step=step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
