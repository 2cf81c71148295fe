"""One `update` of `lookahead`: grads -> inner update -> sync -> updates.

`update` reads top to bottom as the data path, one stage a line:

1. `begin`: the argument checks, the inner update, and the one flag
   `is_sync` (this step syncs);
2. the sync, compiled as the formulation asks (`_formulation`): the outer
   step on the pseudo-gradient, the landing of the params on the new slow
   weights, the store of the slow weights, and the inner-state policy
   (`fused_sync` for `"select"` and `"cond"`, and for `"loop"` whose outer
   step is not looped; `looped_outer_sync` for the looped outer step);
   with streaming options (`fragments`, `communication_dtype`, ...), the
   fragments' syncs of `streaming_sync` (see `_streaming`) instead;
3. the rollback of a non-finite step (`_policies.rollback`, then
   `rolled_back_slow`);
4. the row-sparse tables (`sparse_tables`, see `_rows`);
5. the new state.

The arithmetic of the sync is in `_sync`, the policies in `_policies`, the
compiler steering of the `"loop"` formulation in `_steering`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _arguments
from lookahead_optax import _formulation
from lookahead_optax import _policies
from lookahead_optax import _rows
from lookahead_optax import _sparse
from lookahead_optax import _steering
from lookahead_optax import _streaming
from lookahead_optax import _sync
from lookahead_optax._types import LookaheadState
from lookahead_optax._types import PullbackState


class Options(NamedTuple):
  """`lookahead`'s arguments, checked and resolved (static)."""

  inner: optax.GradientTransformationExtraArgs
  outer: Optional[optax.GradientTransformation]
  sync_period: Any
  slow_step_size: Any  # None with `outer`
  inner_state: str
  on_nonfinite: str
  axis_name: Optional[str]
  slow_dtype: Any
  sync: str  # as asked for: "auto", "select", "cond" or "loop"
  counts_syncs: bool
  sparse_options: Optional[str]
  streaming: Any = None  # `_streaming.StreamingOptions`, or None
  # Resolved when the step is traced (`resolve`):
  formulation: str = ""  # "select", "cond" or "loop"
  recompute: bool = False  # may the loops compute the inner update again?


def resolve(opts: Options, grads: Any, current: Any, params: Any,
            extra_args: dict) -> Options:
  """`opts` with the formulation for the step being traced (`_formulation`)."""
  formulation = _formulation.resolve(
      opts.sync, axis_name=opts.axis_name,
      default_options=(opts.inner_state == "keep" and opts.outer is None
                       and opts.on_nonfinite == "propagate"))
  recompute = (formulation == "loop" and (
      opts.on_nonfinite == "rollback" or opts.outer is not None)
               and _formulation.recompute_is_cheap(
                   opts.inner, grads, current, params, extra_args))
  return opts._replace(formulation=formulation, recompute=recompute)


class Step(NamedTuple):
  """What the stages of one update share."""

  params: Any
  grads: Any
  extra_args: dict
  current: Any  # the inner state before this step
  synced: Any  # its copy at the last sync ("pullback"), else None
  inner_updates: Any
  new_inner: Any  # the inner state the inner step left
  is_sync: jax.Array  # the one flag: this step syncs
  bad: Optional[jax.Array]  # rollback: the inner step is not finite
  param_shaped: Optional[_policies.ParamShaped]
  inner_init: Any
  sparse: list  # per params leaf: its inner update is a `SparseRows`


class Out(NamedTuple):
  """What the stages after `begin` produce (the dense leaves, then all)."""

  updates: Any
  slow: Any
  outer_state: Any
  inner_state: Any
  synced_inner: Any


def sync_fn(opts: Options, s: Step, params: Any):
  """The sync as a map of `SyncCarry`: outer step, landing, policy."""

  def apply(carry):
    alpha = _sync.alpha_of(opts, carry.outer_state)
    targets, outer_state = _sync.slow_targets(
        params, carry.updates, carry.slow, carry.outer_state,
        outer=opts.outer, alpha=alpha, axis_name=opts.axis_name)
    if opts.counts_syncs:
      outer_state = optax.ScaleByScheduleState(
          optax.safe_increment(outer_state.count))
    updates = _sync.sync_updates(params, carry.updates, carry.slow, targets)
    inner_state, synced = _policies.at_sync(
        opts.inner_state, s.param_shaped, carry.inner_state,
        carry.synced_inner, s.inner_init, alpha)
    return _sync.SyncCarry(updates, targets, outer_state, inner_state, synced)

  return apply


def store_fn(opts: Options, params: Any):
  """The slow weights to store from the updates returned and the targets."""

  def store(updates, targets, slow):
    return jax.tree.map(
        lambda p, u, t, s: _sync.stored_slow(
            p, u, t, s, keep_target=opts.axis_name is not None),
        params, updates, targets, slow)

  return store


def inner_step(opts: Options, grads: Any, current: Any, params: Any,
               extra_args: dict) -> tuple[Any, Any, Optional[jax.Array]]:
  """The inner update, and (rollback) whether it is not finite."""
  if opts.on_nonfinite != "rollback":
    return (*opts.inner.update(grads, current, params, **extra_args), None)
  if opts.recompute:
    # Checked first, by a pass of its own (see `nonfinite_step`).
    bad = _policies.nonfinite_step(opts.inner, grads, current, params,
                                   extra_args)
    return (*opts.inner.update(_steering.after(bad, grads), current, params,
                               **extra_args), bad)
  # From the inner updates, which XLA keeps in a buffer for it: with
  # "select" and "cond", the passes that read the old inner state are not
  # ordered after the check, so a pass of its own would make XLA copy it;
  # and a costly inner update is never computed twice.
  inner_updates, new_inner = opts.inner.update(grads, current, params,
                                               **extra_args)
  return inner_updates, new_inner, _policies.is_nonfinite(params,
                                                          inner_updates)


def begin(opts: Options, grads: Any, state: LookaheadState, params: Any,
          extra_args: dict) -> tuple[Options, Step, jax.Array]:
  """Checks, the inner step, and the flags.

  Returns the options resolved for this trace, the `Step` and the new step
  count.
  """
  grads = _sparse.flat_ids(grads)
  params, grads = _arguments.check_update_args(grads, state, params,
                                               opts.slow_dtype)
  _arguments.check_axis_bound(opts.axis_name)
  if opts.inner_state == "pullback":
    current, synced = state.inner_state
  else:
    current, synced = state.inner_state, None
  _arguments.check_touched_rows(extra_args, current, params)
  _arguments.check_sparse_grads_have_lazy(grads, current)
  opts = resolve(opts, grads, current, params, extra_args)
  inner_updates, new_inner, bad = inner_step(opts, grads, current, params,
                                             extra_args)
  step = optax.safe_increment(state.step)
  is_sync = step % opts.sync_period == 0
  needs_init = opts.inner_state == "reset" or opts.on_nonfinite == "rollback"
  needs_leaves = needs_init or opts.inner_state == "pullback" or (
      opts.formulation == "loop" and opts.outer is not None and opts.recompute)
  if bad is not None:
    is_sync = is_sync & ~bad
  sparse = _rows.sparse_flags(inner_updates)
  if any(sparse):
    _rows.check_sparse_leaves(sparse, state.cycle_rows, params,
                              opts.sparse_options)
  return opts, Step(
      params, grads, extra_args, current, synced, inner_updates, new_inner,
      is_sync, bad,
      _policies.ParamShaped(opts.inner.init, params) if needs_leaves else None,
      opts.inner.init(params) if needs_init else None, sparse), step


def outer_in_loop(opts: Options, s: Step, state: LookaheadState) -> bool:
  """Whether the outer step runs in the in-place loop ("loop" formulation)."""
  return (opts.formulation == "loop" and opts.outer is not None
          and opts.recompute
          and not any(s.sparse) and _sync.targets_fit(state.slow_params)
          and _sync.outer_keeps_types(opts.outer, state.outer_state,
                                      state.slow_params))


def loop_outer_step(opts: Options, s: Step, state: LookaheadState
                    ) -> tuple[Any, Any, Any]:
  """The outer step in a loop run once on sync steps, never otherwise.

  It leaves the targets in the slow weights' buffers; the inner update is
  recomputed in it (see `_steering.loop_variant`). Returns (updates,
  targets or old slow weights, outer state).
  """

  def targets_fn(i, slow_c, outer_c):
    vary = lambda tree: _steering.loop_variant(tree, i)  # pylint: disable=unnecessary-lambda-assignment
    u_in, _ = opts.inner.update(vary(s.grads), vary(s.current),
                                vary(s.params), **s.extra_args)
    return _sync.slow_targets(vary(s.params), u_in, slow_c, outer_c,
                              outer=opts.outer, alpha=None, axis_name=None)

  held, outer_state = _sync.loop_targets(
      s.is_sync, targets_fn, state.slow_params, state.outer_state)
  updates = jax.tree.map(
      lambda p, u, t: jnp.where(s.is_sync, _sync.landing_update(p, u, t, t),
                                u),
      s.params, s.inner_updates, held)
  return updates, held, outer_state


def loop_inner_state(opts: Options, s: Step, updates: Any) -> Any:
  """After `loop_outer_step`: the inner state from a second pass.

  Ordered after the params' pass (see `_steering.reread`), as the loop reads
  the old inner state.
  """
  _, again = opts.inner.update(
      s.grads, _steering.reread(s.param_shaped, s.current, s.params, updates),
      s.params, **s.extra_args)
  new_inner, _ = _policies.at_sync(opts.inner_state, s.param_shaped, again,
                                   None, s.inner_init, None)
  new_inner = _sync.tree_select(s.is_sync, new_inner, again)
  if s.bad is not None:
    new_inner = _policies.reset_where(s.bad, s.param_shaped, new_inner,
                                      s.inner_init)
  return new_inner


def rolled_back_slow(s: Step, state: LookaheadState, updates: Any,
                     slow: Any) -> Any:
  """Where the step was rolled back, the slow weights where the params land.

  They are the old slow weights except where `params + (slow - params)`
  rounds (a weight that moved by more than a factor of two since the last
  sync), so that the params equal the slow weights bitwise after a rollback
  as after a sync. Non-finite params (which no additive update repairs)
  never reach the slow weights.
  """
  def leaf(p, u, old, current):
    landed = _sync.stored_slow(p, u, old.astype(_sync.compute_dtype(old)),
                               old, keep_target=False)
    take = s.bad
    if jnp.issubdtype(jnp.result_type(landed), jnp.inexact):
      take = take & jnp.isfinite(landed)
    return jnp.where(take, landed, current)
  return jax.tree.map(leaf, s.params, updates, state.slow_params, slow)


def sparse_tables(opts: Options, s: Step, state: LookaheadState, out: Out
                  ) -> tuple[Out, Any]:
  """The row-sparse tables' step (see `_rows`), merged with the dense.

  Returns `out` with the tables' updates and slow weights, and the new
  `cycle_rows`.
  """
  def leaves(tree):
    return jax.tree.leaves(tree, is_leaf=_rows.is_hole_or_rows)
  slot = state.step % opts.sync_period
  alpha = _sync.alpha_of(opts, state.outer_state)
  results = [None] * len(s.sparse)
  buffers = leaves(state.cycle_rows)
  for i, (p, u, slow) in enumerate(zip(leaves(s.params),
                                       leaves(s.inner_updates),
                                       leaves(state.slow_params))):
    if s.sparse[i]:
      results[i] = _rows.sync_table(s.is_sync, slot, p, u, slow, buffers[i],
                                    alpha, opts.sync_period)
  pick = lambda j: [None if r is None else r[j] for r in results]  # pylint: disable=unnecessary-lambda-assignment
  updates = _rows.merge(out.updates, s.inner_updates, pick(0))
  slow = _rows.merge(out.slow, state.slow_params, pick(1))
  cycle_rows = _rows.merge(state.cycle_rows, state.cycle_rows, pick(2))
  return out._replace(updates=updates, slow=slow), cycle_rows


def fused_sync(opts: Options, s: Step, state: LookaheadState) -> Out:
  """The sync as `"select"` or `"cond"` (`_sync.run_sync`), rollback included.

  Under `"loop"` (whose outer step is not looped) the sync is the select,
  and the inner-state policy runs in place afterwards (`_policies.in_place`).
  """
  dense_params = _rows.split(s.params, s.sparse) if any(s.sparse) else (
      s.params)
  carry0 = _sync.SyncCarry(
      _rows.split(s.inner_updates, s.sparse),
      _rows.split(state.slow_params, s.sparse), state.outer_state,
      s.new_inner, s.synced)
  carry = _sync.run_sync(
      "select" if opts.formulation == "loop" else opts.formulation,
      s.is_sync, sync_fn(opts, s, dense_params),
      store_fn(opts, dense_params), carry0)
  updates, new_inner = rollback_updates(s, state, carry.updates,
                                        carry.inner_state)
  slow, synced = carry.slow, carry.synced_inner
  if s.bad is not None and opts.formulation != "cond":
    # The slow weights from the updates returned (a sync step is never
    # rolled back), which XLA reads from the new params.
    targets = sync_fn(opts, s, dense_params)(carry0).slow
    slow = _sync.tree_select(
        s.is_sync, store_fn(opts, dense_params)(updates, targets,
                                                carry0.slow), carry0.slow)
  if opts.formulation == "loop" and s.param_shaped is not None:
    # In place, after the params' pass, which reads the inner state as the
    # inner step left it (see `_steering.never`).
    new_inner, synced = _policies.in_place(
        opts.inner_state, s.param_shaped, s.is_sync, s.bad,
        _steering.never(s.params, updates), s.new_inner, s.synced,
        s.inner_init, _sync.alpha_of(opts, state.outer_state))
  return Out(updates, slow, carry.outer_state, new_inner, synced)


def looped_outer_sync(opts: Options, s: Step, state: LookaheadState) -> Out:
  """The sync with the outer step in its loop (`loop_outer_step`)."""
  updates, held, outer_state = loop_outer_step(opts, s, state)
  updates, _ = rollback_updates(s, state, updates, s.new_inner)
  slow = jax.tree.map(
      lambda p, u, t: jnp.where(
          s.is_sync, _sync.stored_slow(p, u, t, t, keep_target=False), t),
      s.params, updates, held)
  return Out(updates, slow, outer_state, loop_inner_state(opts, s, updates),
             s.synced)


def streaming_sync(opts: Options, s: Step, state: LookaheadState,
                   step: jax.Array) -> Out:
  """The fragments' syncs (`_streaming`), and the inner state's policy."""
  updates, slow, outer_state, flags = _streaming.sync(
      opts, s.params, s.inner_updates, state.slow_params, state.outer_state,
      step)
  inner_state = s.new_inner
  if opts.inner_state == "reset":
    inner_state = _policies.reset_where_per_param(
        flags, s.param_shaped, inner_state, s.inner_init)
  return Out(updates, slow, outer_state, inner_state, None)


def rollback_updates(s: Step, state: LookaheadState, updates: Any,
                     inner_state: Any) -> tuple[Any, Any]:
  """Where the step is rolled back, the updates back to the slow weights."""
  if s.bad is None:
    return updates, inner_state
  return _policies.rollback(s.bad, s.params, s.inner_updates,
                            state.slow_params, updates, inner_state,
                            s.param_shaped, s.inner_init)


def new_state(opts: Options, out: Out, step: jax.Array,
              cycle_rows: Any) -> LookaheadState:
  inner_state = out.inner_state
  if opts.inner_state == "pullback":
    inner_state = PullbackState(inner_state, out.synced_inner)
  return LookaheadState(inner_state, out.slow, step, out.outer_state,
                        cycle_rows)


def update(opts: Options, grads: Any, state: Any, params: Any,
           extra_args: dict) -> tuple[Any, LookaheadState]:
  """`lookahead`'s `update_fn`: see the module docstring."""
  if isinstance(state, LookaheadState):  # containers may rebuild CycleRows
    state = state._replace(
        cycle_rows=_rows.restore_cycle_rows(state.cycle_rows))
  opts, s, step = begin(opts, grads, state, params, extra_args)
  if opts.streaming is not None:
    out = streaming_sync(opts, s, state, step)
  else:
    sync = looped_outer_sync if outer_in_loop(opts, s, state) else fused_sync
    out = sync(opts, s, state)
  if s.bad is not None:
    out = out._replace(slow=rolled_back_slow(s, state, out.updates, out.slow))
  cycle_rows = state.cycle_rows
  if any(s.sparse):
    out, cycle_rows = sparse_tables(opts, s, state, out)
  return out.updates, new_state(opts, out, step, cycle_rows)
