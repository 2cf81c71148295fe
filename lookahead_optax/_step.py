"""One `update` of `lookahead`: grads -> inner update -> sync -> updates.

`update` reads top to bottom as the data path, one stage a line:

1. `begin`: the argument checks, the formulation for this trace
   (`_formulation.choose`), the inner update, and the one flag `is_sync`
   (this step syncs);
2. the sync (`dense_sync`): the pieces of a sync (`pieces`: the outer step
   and landing, the inner-state policy, the rollback and the store of the
   slow weights, each applied once) placed by the formulation; with
   streaming options (`fragments`, `communication_dtype`, ...), the
   fragments' syncs of `streaming_sync` (see `_streaming`) instead;
3. the slow weights of a rolled-back step (`rolled_back_slow`);
4. the row-sparse tables (`sparse_tables`, see `_rows`);
5. the new state.

The arithmetic of the sync is in `_sync`, the policies in `_policies`, the
formulations in `_formulation` (and `"loop"` in `_loop`).
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _arguments
from lookahead_optax import _formulation
from lookahead_optax import _participation
from lookahead_optax import _policies
from lookahead_optax import _rows
from lookahead_optax import _slices
from lookahead_optax import _sparse
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
  streaming: Any = None  # `diloco`'s `_diloco.DilocoConfig`, else None


def sparse_conflict(opts: Options) -> Optional[str]:
  """Why row-sparse tables cannot be synced with these options, or None."""
  if (opts.outer is None and opts.axis_name is None
      and opts.inner_state == "keep" and opts.on_nonfinite == "propagate"):
    return None
  return ("no `outer`, no `axis_name`, `inner_state='keep'`, "
          "`on_nonfinite='propagate'`")


def init(opts: Options, rows_per_step: Any,
          params: optax.Params) -> LookaheadState:
  """The `init_fn` of `lookahead` and `diloco`: the slow weights are copies."""
  inner_init = opts.inner.init(params)
  if _arguments.has_state(inner_init, optax.MultiStepsState):
    raise ValueError(f"`inner` contains an optax.MultiSteps: "
                     f"{_arguments.MULTISTEPS_ERROR}")
  if opts.inner_state == "pullback":
    inner_init = PullbackState(inner_init,
                               jax.tree.map(_arguments.copy, inner_init))

  def slow_copy(p):
    dtype = jnp.result_type(p)
    if opts.slow_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      dtype = opts.slow_dtype
    return jnp.array(p, dtype=dtype, copy=True)

  slow = jax.tree.map(slow_copy, params)
  if opts.streaming is not None:
    outer_state = _fragments_of(opts).init_state(opts.streaming, opts.outer,
                                                 slow)
  elif opts.outer is not None:
    outer_state = opts.outer.init(_sync.in_compute_dtype(slow))
  elif opts.counts_syncs:
    outer_state = optax.ScaleByScheduleState(jnp.zeros([], jnp.int32))
  else:
    outer_state = optax.EmptyState()
  cycle_rows = None
  if rows_per_step is not None:
    counts = _rows.resolve_rows_per_step(rows_per_step, params)
    cycle_rows = _rows.init_cycle_rows(counts, params, opts.sync_period)
  return LookaheadState(inner_init, slow, jnp.zeros([], jnp.int32),
                        outer_state, cycle_rows)


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


def outer_fn(opts: Options, params: Any):
  """The outer step and the landing, as a map of `Carry` (targets set)."""

  def apply(carry):
    alpha = _sync.alpha_of(opts, carry.outer_state)
    targets, outer_state = _sync.slow_targets(
        params, carry.updates, carry.slow, carry.outer_state,
        outer=opts.outer, alpha=alpha)
    if opts.counts_syncs:
      outer_state = optax.ScaleByScheduleState(
          optax.safe_increment(outer_state.count))
    updates = _sync.sync_updates(params, carry.updates, carry.slow, targets)
    return carry._replace(updates=updates, outer_state=outer_state,
                          targets=targets)

  return apply


def policy_fn(opts: Options, s: Step, outer_state: Any):
  """The inner-state policy at a sync, as a map of `Carry`.

  Its interpolation step is the sync's (from the outer state before it).
  """

  def apply(carry):
    alpha = (_sync.alpha_of(opts, outer_state)
             if opts.inner_state == "pullback" else None)
    inner_state, synced = _policies.at_sync(
        opts.inner_state, s.param_shaped, carry.inner_state,
        carry.synced_inner, s.inner_init, alpha)
    return carry._replace(inner_state=inner_state, synced_inner=synced)

  return apply


def pieces(opts: Options, s: Step, state: LookaheadState,
           dense_params: Any) -> _formulation.Pieces:
  """The pieces of this step's sync (see `_formulation.Pieces`)."""
  identity = lambda x: x  # pylint: disable=unnecessary-lambda-assignment
  rollback, reset = identity, identity
  if s.bad is not None:
    rollback = lambda updates: _policies.rollback(  # pylint: disable=unnecessary-lambda-assignment
        s.bad, s.params, s.inner_updates, state.slow_params, updates)
    reset = lambda inner: _policies.reset_where(  # pylint: disable=unnecessary-lambda-assignment
        s.bad, s.param_shaped, inner, s.inner_init)
  store = lambda updates, targets, slow: _sync.store(  # pylint: disable=unnecessary-lambda-assignment
      dense_params, updates, targets, slow)
  return _formulation.Pieces(outer_fn(opts, dense_params),
                             policy_fn(opts, s, state.outer_state), rollback,
                             reset, store)


def begin(opts: Options, grads: Any, state: LookaheadState, params: Any,
          extra_args: dict) -> tuple[Any, Step, jax.Array]:
  """Checks, the inner step, and the flags.

  Returns the formulation chosen for this trace, the `Step` and the new
  step count.
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
  form = _formulation.choose(opts, grads, current, params, extra_args, state)
  inner_updates, new_inner, bad = form.inner_step(opts, grads, current,
                                                  params, extra_args)
  step = optax.safe_increment(state.step)
  is_sync = step % opts.sync_period == 0
  needs_init = opts.inner_state == "reset" or opts.on_nonfinite == "rollback"
  needs_leaves = (needs_init or opts.inner_state == "pullback"
                  or form.needs_param_shaped)
  if bad is not None:
    is_sync = is_sync & ~bad
  sparse = _rows.sparse_flags(inner_updates)
  if any(sparse):
    _rows.check_sparse_leaves(sparse, state.cycle_rows, params,
                              sparse_conflict(opts))
  return form, Step(
      params, grads, extra_args, current, synced, inner_updates, new_inner,
      is_sync, bad,
      _policies.ParamShaped(opts.inner.init, params) if needs_leaves else None,
      opts.inner.init(params) if needs_init else None, sparse), step


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


def sparse_tables(opts: Options, s: Step, state: LookaheadState,
                  out: _sync.Carry) -> tuple[_sync.Carry, Any]:
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


def dense_sync(opts: Options, form: Any, s: Step,
               state: LookaheadState) -> _sync.Carry:
  """The sync of the dense leaves, placed by the formulation `form`."""
  dense_params = _rows.split(s.params, s.sparse) if any(s.sparse) else (
      s.params)
  carry = _sync.Carry(
      _rows.split(s.inner_updates, s.sparse),
      _rows.split(state.slow_params, s.sparse), state.outer_state,
      s.new_inner, s.synced)
  return form.sync(s, pieces(opts, s, state, dense_params), carry)


def _fragments_of(opts: Options) -> Any:
  """The module of `diloco`'s syncs: `_slices` or `_streaming`.

  Both have `init_state(config, outer, slow)` and `sync(opts, params,
  inner_updates, slow, state, step, weight)`.
  """
  return _slices if opts.streaming.slices else _streaming


def streaming_sync(opts: Options, s: Step, state: LookaheadState,
                   step: jax.Array, weight: Any) -> _sync.Carry:
  """The fragments' syncs (`_streaming`, or with `fragments="slices"`
  `_slices`), and the inner state's policy.

  With `on_nonfinite="rollback"`, a replica whose inner step is not finite
  goes back to the slow weights and sits out a sync of this step
  (`_participation.rolled_back`), its inner state reset.
  """
  inner_updates, inner_state = s.inner_updates, s.new_inner
  if s.bad is not None:
    inner_updates, weight = _participation.rolled_back(
        s.bad, s.params, inner_updates, state.slow_params, weight)
    inner_state = _policies.reset_where(s.bad, s.param_shaped, inner_state,
                                        s.inner_init)
  updates, slow, outer_state, flags = _fragments_of(opts).sync(
      opts, s.params, inner_updates, state.slow_params, state.outer_state,
      step, weight)
  if opts.inner_state == "reset":
    inner_state = _policies.reset_where_per_param(
        flags, s.param_shaped, inner_state, s.inner_init)
  return _sync.Carry(updates, slow, outer_state, inner_state, None)


def new_state(opts: Options, out: _sync.Carry, step: jax.Array,
              cycle_rows: Any) -> LookaheadState:
  inner_state = out.inner_state
  if opts.inner_state == "pullback":
    inner_state = PullbackState(inner_state, out.synced_inner)
  return LookaheadState(inner_state, out.slow, step, out.outer_state,
                        cycle_rows)


def update(opts: Options, grads: Any, state: Any, params: Any,
           extra_args: dict, weight: Any = None
           ) -> tuple[Any, LookaheadState]:
  """`update_fn` of `lookahead` and `diloco`: see the module docstring.

  `weight`: `diloco`'s replica weight for the coming sync (or None).
  """
  if isinstance(state, LookaheadState):  # containers may rebuild CycleRows
    state = state._replace(
        cycle_rows=_rows.restore_cycle_rows(state.cycle_rows))
  form, s, step = begin(opts, grads, state, params, extra_args)
  if opts.streaming is not None:
    out = streaming_sync(opts, s, state, step, weight)
  else:
    out = dense_sync(opts, form, s, state)
  if s.bad is not None and opts.streaming is None:
    out = out._replace(slow=rolled_back_slow(s, state, out.updates, out.slow))
  cycle_rows = state.cycle_rows
  if any(s.sparse):
    out, cycle_rows = sparse_tables(opts, s, state, out)
  return out.updates, new_state(opts, out, step, cycle_rows)
