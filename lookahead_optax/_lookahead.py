"""The Lookahead optimizer as a drop-in optax gradient transformation."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _checks
from lookahead_optax import _policies
from lookahead_optax import _rows
from lookahead_optax import _sparse
from lookahead_optax import _sync
from lookahead_optax import _tree

_SYNC_MODES = ("auto", "select", "cond")
_DEFAULT_SLOW_STEP_SIZE = 0.5


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
    outer_state: the state of the outer step: the `outer` transformation's
      state (initialised from the initial params), or, without `outer`, the
      number of syncs done (`optax.ScaleByScheduleState`) when
      `slow_step_size` is a schedule, else `optax.EmptyState()`.
    cycle_rows: with `rows_per_step`, the ids of the rows each row-sparse
      table was updated in during this cycle (a `(sync_period * N,)` int32
      buffer per table, `optax.MaskedNode()` at other leaves), else None.
  """

  inner_state: optax.OptState
  slow_params: optax.Params
  step: jax.Array
  outer_state: optax.OptState = optax.EmptyState()
  cycle_rows: Any = None


class PullbackState(NamedTuple):
  """Inner state kept by `lookahead(..., inner_state="pullback")`.

  Attributes:
    inner_state: the inner optimizer's current state.
    synced_inner_state: the inner state as it was after the last sync (the
      inner optimizer's initial state before the first sync). Its
      parameter-shaped leaves cost one more copy of each of them; it must not
      share buffers with `inner_state` (build it with a copy).
  """

  inner_state: optax.OptState
  synced_inner_state: optax.OptState


def _resolve_formulation(sync: str, inner_state: str, on_nonfinite: str,
                         axis_name: Optional[str],
                         outer: Optional[Any] = None) -> str:
  """`"select"`, `"cond"` or `"loop"` (see `lookahead`'s `sync`).

  `"loop"` (internal, only from `"auto"`): the parts of a sync that XLA:CPU
  cannot fuse into the inner update without copying the old state (the outer
  transformation's step, the inner-state policies) run in loops that run
  once on the steps that need them and not at all on the others, updating
  the state in place; the rest is the branch-free select.
  """
  if sync != "auto":
    return sync
  if axis_name is not None:
    return "cond"  # the collective must run on sync steps only
  # Measured on CPU (benchmarks/policies.py, 10M params in 100 leaves): the
  # select fuses the default sync with the inner update into one pass where
  # a conditional copies every buffer it carries; with a policy or an outer
  # transformation, selecting would make XLA copy the old state (each state
  # output is its own loop fusion that recomputes the inner step from it).
  if jax.default_backend() == "cpu":
    if inner_state == "keep" and on_nonfinite == "propagate" and outer is None:
      return "select"
    return "loop"
  return "cond"


def _copy(x: jax.Array) -> jax.Array:
  """A copy of `x` in a fresh buffer (so params and state can be donated)."""
  return jnp.array(x, copy=True)


def _has_state(tree: Any, state_type: type) -> bool:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, state_type))
  return any(isinstance(x, state_type) for x in leaves)


def _is_multisteps(inner: Any) -> bool:
  return isinstance(inner, optax.MultiSteps) or isinstance(
      getattr(inner.update, "__self__", None), optax.MultiSteps)


_MULTISTEPS_ERROR = (
    "lookahead would count micro-steps. Wrap lookahead instead: "
    "optax.MultiSteps(lookahead(inner, ...), every_k_schedule=n).")


def _check_slow_dtype(slow_dtype: Any) -> Any:
  if slow_dtype is None:
    return None
  try:
    dtype = jnp.dtype(slow_dtype)
  except TypeError as e:
    raise TypeError(
        f"`slow_dtype` must be a floating dtype or None, got {slow_dtype!r}."
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`slow_dtype` must be a floating dtype or None, got {slow_dtype!r}.")
  return dtype


def _check_outer(outer: Any, slow_step_size: Any, inner_state: str) -> None:
  if outer is None:
    return
  _checks.check_transformation("outer", outer)
  if slow_step_size is not None:
    raise ValueError(
        "`slow_step_size` and `outer` cannot both be given: with `outer`, the "
        "outer transformation's own learning rate sets the slow weights' step "
        "(`outer=optax.sgd(a)` is `slow_step_size=a`).")
  if inner_state == "pullback":
    raise ValueError(
        "`inner_state='pullback'` interpolates the inner state with "
        "`slow_step_size` and cannot combine with `outer`; use 'keep' or "
        "'reset'.")


def _check_axis_name(axis_name: Any, sync: str, on_nonfinite: str) -> None:
  if axis_name is None:
    return
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError(
        f"`axis_name` must be a non-empty string or None, got {axis_name!r}.")
  if sync == "select":
    raise ValueError(
        "`sync='select'` cannot combine with `axis_name`: the average over "
        "replicas must run on sync steps only; use 'cond' or 'auto'.")
  if on_nonfinite == "rollback":
    raise ValueError(
        "`on_nonfinite='rollback'` cannot combine with `axis_name`: a replica "
        "that rolls back a sync step would skip the average that the other "
        "replicas wait in. Skip non-finite steps before the optimizer (e.g. "
        "`optax.apply_if_finite` inside) instead.")


def _check_axis_bound(axis_name: Optional[str]) -> None:
  """A clear error, at trace time, when `axis_name` is not a mapped axis."""
  if axis_name is None:
    return
  try:
    jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"`axis_name` {axis_name!r} is not the name of a mapped axis here: "
        "call the step under `jax.pmap(..., axis_name=...)` or `shard_map` "
        "with that axis, or leave `axis_name=None`.") from e


def _check_state(state: Any) -> None:
  if isinstance(state, LookaheadState):
    return
  if isinstance(state, optax.LookaheadState):
    raise TypeError(
        "`state` must be a LookaheadState of lookahead_optax, got the state of "
        "optax's own lookahead (optax.LookaheadState): build the state with "
        "this optimizer's `tx.init(params)` on plain params (no "
        "optax.LookaheadParams); a checkpointed optax.lookahead run can be "
        "continued from its fast params and inner state with "
        "`lookahead_optax.migrate_optax_state(tx, state.fast_state, "
        "params.fast)`.")
  raise TypeError(
      f"`state` must be a LookaheadState of lookahead_optax, got "
      f"{type(state).__name__}.")


def _names_own_leaf(touched_rows: Any, params: Any) -> bool:
  """Whether `touched_rows` has ids for a (non-masked) leaf of `params`."""
  own = {tuple(path) for path, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]
         if not _tree.is_masked_node(leaf)}
  return any(tuple(path) in own for path, _ in
             jax.tree_util.tree_flatten_with_path(touched_rows)[0])


def _check_touched_rows(extra_args: dict, inner_state: Any,
                        params: Any) -> None:
  """`touched_rows` for our leaves without a `lazy` inside would be ignored."""
  from lookahead_optax._lazy import LazyState  # pylint: disable=g-import-not-at-top
  touched_rows = extra_args.get("touched_rows")
  if (touched_rows is not None and _names_own_leaf(touched_rows, params)
      and not _has_state(inner_state, LazyState)):
    raise ValueError(
        "`touched_rows` was passed but the inner optimizer has no "
        "`lookahead_optax.lazy`: the ids would be ignored. Wrap the embedding "
        "optimizer in `lazy(...)` or drop `touched_rows`.")


def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int = 5,
    slow_step_size: Optional[optax.ScalarOrSchedule] = None,
    *,
    outer: Optional[optax.GradientTransformation] = None,
    axis_name: Optional[str] = None,
    inner_state: str = "keep",
    sync: str = "auto",
    on_nonfinite: str = "propagate",
    slow_dtype: Optional[Any] = None,
    rows_per_step: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lookahead: k steps forward with `inner`, then one step back.

  Runs the inner optimizer on the (fast) params $\theta$ at every step. Every
  `sync_period` steps the slow weights $\phi$ take one *outer step* on the
  pseudo-gradient $\Delta = \phi - \theta$ and the params are sent to them.
  By default the outer step is the paper's interpolation
  $\phi \leftarrow \phi + \alpha (\theta - \phi)$, i.e. SGD with step
  $\alpha$ on $\Delta$; `outer` makes it any optax transformation (SNOO:
  SGD with Nesterov momentum, see `snoo`). With `axis_name`, replicas run
  their inner steps on their own gradients and average $\Delta$ only at a
  sync (DiLoCo).

  The slow weights start as a copy of the initial params and live in the
  optimizer state, so the params stay a plain pytree: `lookahead` drops into
  `optax.apply_updates`, a Flax `TrainState` or an `nnx.Optimizer` with no
  other change. Use `slow_params` or `eval_params` to evaluate on the slow
  weights. After a sync the params equal the slow weights bitwise (in any
  float dtype): the slow weights are stored as `params + update` with the
  arithmetic of `optax.apply_updates`.

  Lookahead must be the last transformation that changes the updates, e.g.
  `optax.chain(optax.clip_by_global_norm(1.0), lookahead(optax.adamw(1e-3)))`;
  a transformation after it would move the params away from the slow weights.
  For gradient accumulation wrap it, `optax.MultiSteps(lookahead(...), n)`,
  so that syncs count applied steps; `lookahead(optax.MultiSteps(...))` is
  rejected.

  Args:
    inner: the inner (fast) optimizer, any optax gradient transformation.
      Extra keyword arguments of `update` are passed on to it.
    sync_period: `k`, the number of inner steps between syncs; an integer in
      [1, 2**31 - 1]. May be a traced integer (e.g. under
      `optax.inject_hyperparams`).
    slow_step_size: $\alpha$, the step of the default interpolation: a float
      in [0, 1], a scalar array (may be traced), or a schedule evaluated on
      the number of syncs done before this one (a rolled-back step is not a
      sync). None (default) means 0.5. Under `optax.inject_hyperparams` optax
      evaluates a schedule itself, on the number of `update` calls. `alpha = 1`
      gives `inner`'s trajectory (bitwise eagerly; under `jax.jit` to within
      a few ulps, as XLA contracts multiply-adds differently in different
      programs). `alpha = 0` returns to the initial params at every sync,
      exactly where a weight stayed within a factor of two of its slow value
      and otherwise up to one rounding at the scale of the fast weights.
      Cannot be combined with `outer`.
    outer: an optax transformation for the outer step, or None for the
      interpolation above. At a sync it receives the pseudo-gradient
      $\phi - \theta$ (in float32 or wider) with the slow weights as params,
      and the slow weights move by its update. Its state lives in
      `LookaheadState.outer_state`, initialised from the initial params.
      `outer=optax.sgd(a)` equals `slow_step_size=a` up to rounding.
    axis_name: the name of a `jax.pmap` / `shard_map` axis of data-parallel
      replicas (DiLoCo). Each replica runs `inner` on its own gradients with
      its own inner state (do not average the gradients in your step); at a
      sync the pseudo-gradients are averaged over the axis (the step's only
      collective, inside a `jax.lax.cond`, so the other `sync_period - 1`
      steps communicate nothing) before the outer step, and the slow weights
      stay bitwise identical on every replica. The params land on them
      except where a weight moved by more than a factor of two in the cycle
      (one rounding at the scale of the fast weights). Requires the initial
      params to be identical on all replicas.
    inner_state: what happens to the inner optimizer's state at a sync.
      `"keep"` (the paper's default) leaves it alone. `"reset"` resets its
      parameter-shaped leaves (e.g. Adam moments) to their initial values,
      keeping step counts (schedules go on), hyperparameters, dtypes, and
      clearing NaNs. `"pullback"` interpolates the parameter-shaped leaves
      between their value at the last sync and now with the same $\alpha$,
      as the paper authors' code does for momentum; it stores one more copy
      of those leaves and cannot combine with `outer`.
    sync: how the sync is compiled. `"select"` computes it branch-free at
      every step and selects it on sync steps (fuses with the inner update
      into one pass). `"cond"` runs it in a `jax.lax.cond`. `"auto"`
      (default) picks by backend and options (docs/benchmarks.md). Both
      compute the same sync; they may differ in the last bit of a few
      elements, as XLA contracts multiply-adds (FMA) differently in the two,
      while the params equal the slow weights bitwise after a sync in both.
    on_nonfinite: `"propagate"` (default) applies non-finite updates as they
      are. `"rollback"`: when the inner update or the fast params it would
      produce has a non-finite value, the step returns the update that sends
      the params back to the slow weights, resets the parameter-shaped inner
      state, and leaves the slow weights and the outer state untouched (no
      sync on that step). Params that are already non-finite cannot be
      repaired by an additive update.
    slow_dtype: if given, a floating dtype in which to keep the slow weights of
      floating params (e.g. `jnp.float32` for bfloat16 params), so that small
      updates accumulate in the slow weights instead of rounding away. After a
      sync the params equal `slow.astype(params.dtype)` bitwise.
    rows_per_step: for row-sparse embedding training (`lazy` on
      `SparseRows` gradients): a pytree with the params' structure (or a
      prefix of it) holding, at each table whose updates are `SparseRows`,
      the number N of ids each step brings, and None elsewhere. Each step,
      sync steps included, then costs O(`sync_period` * N) rows for that
      table, never a pass over it: the state keeps the ids of the cycle and a
      sync interpolates only those rows (the others already equal their slow
      weights). Needs a concrete `sync_period` and the default options
      (no `outer`, `axis_name`, `inner_state="keep"`,
      `on_nonfinite="propagate"`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`.

  Raises:
    TypeError: if `inner` or `outer` is not a gradient transformation,
      `sync_period`, `slow_step_size`, `axis_name` or `slow_dtype` has the
      wrong type, or `update` gets a state that is not a `LookaheadState`.
    ValueError: if `sync_period` is out of range, `slow_step_size` is outside
      [0, 1] or NaN, a string option is not one of its values, `inner` is an
      `optax.MultiSteps`, `outer` is combined with `slow_step_size` or
      `inner_state="pullback"`, `axis_name` with `sync="select"` or used
      outside a mapped axis, or `update` is called without params, with
      params or updates whose structure, shapes or dtypes differ from the
      state, or with `touched_rows` for leaves that no `lazy` handles.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.75)
    >>> params = jnp.array([4.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = params  # gradient of 0.5 * params**2
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params, lo.slow_params(state))
    [1.75] [1.75]

    The fast params went 4 -> 2 -> 1, then the sync moved the slow weights
    three quarters of the way from 4 to 1, to 1.75, and sent the params there.

  References:
    Zhang, Lucas, Hinton, Ba, [Lookahead Optimizer: k steps forward, 1 step
    back](https://arxiv.org/abs/1907.08610), NeurIPS 2019.

    Douillard et al., [DiLoCo: Distributed Low-Communication Training of
    Language Models](https://arxiv.org/abs/2311.08105), 2023.
  """
  _checks.check_transformation("inner", inner)
  if _is_multisteps(inner):
    raise ValueError(f"`inner` must not be an optax.MultiSteps: "
                     f"{_MULTISTEPS_ERROR}")
  _checks.check_sync_period(sync_period)
  if slow_step_size is not None:
    _checks.check_unit_interval(
        "slow_step_size", slow_step_size, allow_schedule=True)
  _checks.check_choice("inner_state", inner_state,
                       _policies.INNER_STATE_POLICIES)
  _checks.check_choice("sync", sync, _SYNC_MODES)
  _checks.check_choice("on_nonfinite", on_nonfinite,
                       _policies.NONFINITE_POLICIES)
  _check_outer(outer, slow_step_size, inner_state)
  _check_axis_name(axis_name, sync, on_nonfinite)
  slow_dtype = _check_slow_dtype(slow_dtype)
  sparse_options = _sparse_options_conflict(
      outer, axis_name, inner_state, on_nonfinite)
  if rows_per_step is not None and not isinstance(sync_period, int):
    raise TypeError(
        "`sync_period` must be a Python int when `rows_per_step` is given "
        f"(it sizes the id buffer), got {sync_period!r}.")
  if outer is None and slow_step_size is None:
    slow_step_size = _DEFAULT_SLOW_STEP_SIZE
  counts_syncs = outer is None and callable(slow_step_size)
  formulation = _resolve_formulation(sync, inner_state, on_nonfinite, axis_name,
                                     outer)
  inner = optax.with_extra_args_support(inner)

  def slow_copy(p):
    dtype = jnp.result_type(p)
    if slow_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      dtype = slow_dtype
    return jnp.array(p, dtype=dtype, copy=True)

  def init_fn(params):
    inner_init = inner.init(params)
    if _has_state(inner_init, optax.MultiStepsState):
      raise ValueError(f"`inner` contains an optax.MultiSteps: "
                       f"{_MULTISTEPS_ERROR}")
    if inner_state == "pullback":
      inner_init = PullbackState(inner_init, jax.tree.map(_copy, inner_init))
    slow = jax.tree.map(slow_copy, params)
    if outer is not None:
      outer_state = outer.init(_sync.in_compute_dtype(slow))
    elif counts_syncs:
      outer_state = optax.ScaleByScheduleState(jnp.zeros([], jnp.int32))
    else:
      outer_state = optax.EmptyState()
    cycle_rows = None
    if rows_per_step is not None:
      counts = _rows.resolve_rows_per_step(rows_per_step, params)
      cycle_rows = _rows.init_cycle_rows(counts, params, sync_period)
    return LookaheadState(inner_init, slow, jnp.zeros([], jnp.int32),
                          outer_state, cycle_rows)

  def alpha_of(outer_state):
    """The interpolation step of this sync (None with `outer`)."""
    if outer is not None:
      return None
    if counts_syncs:
      return jnp.asarray(slow_step_size(outer_state.count))
    return jnp.asarray(slow_step_size)

  def sync_fn(params, param_shaped, inner_init):
    """The sync as a map of `SyncCarry`: outer step, landing, policy."""

    def apply(carry):
      alpha = alpha_of(carry.outer_state)
      targets, outer_state = _sync.slow_targets(
          params, carry.updates, carry.slow, carry.outer_state,
          outer=outer, alpha=alpha, axis_name=axis_name)
      if counts_syncs:
        outer_state = optax.ScaleByScheduleState(
            optax.safe_increment(outer_state.count))
      updates = _sync.sync_updates(params, carry.updates, carry.slow, targets)
      inner_state_, synced = _policies.at_sync(
          inner_state, param_shaped, carry.inner_state, carry.synced_inner,
          inner_init, alpha)
      return _sync.SyncCarry(updates, targets, outer_state, inner_state_,
                             synced)

    return apply

  def store_fn(params):
    """The slow weights to store from the updates returned and the targets."""

    def store(updates, targets, slow):
      return jax.tree.map(
          lambda p, u, t, s: _sync.stored_slow(
              p, u, t, s, keep_target=axis_name is not None),
          params, updates, targets, slow)

    return store

  def update_fn(updates, state, params=None, **extra_args):
    params, updates = _check_update_args(updates, state, params, slow_dtype)
    _check_axis_bound(axis_name)
    if inner_state == "pullback":
      current, synced = state.inner_state
    else:
      current, synced = state.inner_state, None
    _check_touched_rows(extra_args, current, params)
    inner_updates, new_inner = inner.update(
        updates, current, params, **extra_args)
    new_inner_raw = new_inner

    step = optax.safe_increment(state.step)
    is_sync = step % sync_period == 0
    needs_init = inner_state == "reset" or on_nonfinite == "rollback"
    inner_init = inner.init(params) if needs_init else None
    param_shaped = (_policies.ParamShaped(inner.init, params)
                    if needs_init or inner_state == "pullback"
                    or (formulation == "loop" and outer is not None)
                    else None)
    bad = None
    if on_nonfinite == "rollback":
      bad = _policies.is_nonfinite(params, inner_updates)
      is_sync = is_sync & ~bad

    sparse = _rows.sparse_flags(inner_updates)
    if any(sparse):
      _rows.check_sparse_leaves(sparse, state.cycle_rows, params,
                                sparse_options)
    dense_params = _rows.split(params, sparse) if any(sparse) else params
    carry = _sync.SyncCarry(
        _rows.split(inner_updates, sparse), _rows.split(state.slow_params,
                                                        sparse),
        state.outer_state, new_inner, synced)
    carry0 = carry
    slow_loop = (formulation == "loop" and outer is not None
                 and not any(sparse) and _sync.targets_fit(state.slow_params)
                 and _sync.outer_keeps_types(outer, state.outer_state,
                                             state.slow_params))
    if slow_loop:
      # The outer step in a loop run once on sync steps, never otherwise,
      # that leaves the targets in the slow weights' buffers; the inner
      # update is recomputed in it (see `_policies.loop_variant`).
      def targets_fn(i, slow_c, outer_c):
        vary = lambda tree: _policies.loop_variant(tree, i)  # pylint: disable=unnecessary-lambda-assignment
        u_in, _ = inner.update(vary(updates), vary(current), vary(params),
                               **extra_args)
        return _sync.slow_targets(vary(params), u_in, slow_c, outer_c,
                                  outer=outer, alpha=None, axis_name=None)
      held, outer_out = _sync.loop_targets(
          is_sync, targets_fn, state.slow_params, state.outer_state)
      new_updates = jax.tree.map(
          lambda p, u, t: jnp.where(is_sync, _sync.landing_update(p, u, t, t),
                                    u),
          params, inner_updates, held)
      carry = carry._replace(updates=new_updates, outer_state=outer_out)
    else:
      carry = _sync.run_sync("select" if formulation == "loop" else
                             formulation, is_sync,
                             sync_fn(dense_params, param_shaped, inner_init),
                             store_fn(dense_params), carry)
    new_updates, new_inner, synced_out = (
        carry.updates, carry.inner_state, carry.synced_inner)
    if bad is not None:
      new_updates, new_inner = _policies.rollback(
          bad, params, inner_updates, state.slow_params, new_updates,
          new_inner, param_shaped, inner_init)
    if slow_loop:
      carry = carry._replace(slow=jax.tree.map(
          lambda p, u, t: jnp.where(
              is_sync, _sync.stored_slow(p, u, t, t, keep_target=False), t),
          params, new_updates, held))
    elif bad is not None and formulation != "cond":
      # The slow weights from the updates returned (a sync step is never
      # rolled back), which XLA reads from the new params.
      targets = sync_fn(dense_params, param_shaped, inner_init)(carry0).slow
      carry = carry._replace(slow=_sync.tree_select(
          is_sync, store_fn(dense_params)(new_updates, targets, carry0.slow),
          carry0.slow))
    if slow_loop:
      # The inner state from a second pass, ordered after the params' (see
      # `_policies.reread`), as the loop above reads the old one.
      _, again = inner.update(
          updates, _policies.reread(param_shaped, current, params,
                                    new_updates),
          params, **extra_args)
      new_inner, _ = _policies.at_sync(inner_state, param_shaped, again,
                                       None, inner_init, None)
      new_inner = _sync.tree_select(is_sync, new_inner, again)
      if bad is not None:
        new_inner = param_shaped.map(
            lambda x, i: jnp.where(bad, jnp.asarray(i, dtype=x.dtype), x),
            new_inner, inner_init)
    elif formulation == "loop" and param_shaped is not None:
      # The policy applied in place by a loop that runs on sync (or
      # rolled-back) steps only, ordered after the params' pass, which reads
      # the inner state as the inner step left it (see `_policies.never`).
      new_inner, synced_out = _policies.in_place(
          inner_state, param_shaped, is_sync, bad,
          _policies.never(params, new_updates), new_inner_raw, synced,
          inner_init, alpha_of(state.outer_state))
    new_slow, cycle_rows = carry.slow, state.cycle_rows
    if any(sparse):
      new_updates, new_slow, cycle_rows = _sparse_tables(
          sparse, is_sync, state, params, inner_updates, new_updates,
          new_slow, alpha_of(state.outer_state))
    if inner_state == "pullback":
      new_inner = PullbackState(new_inner, synced_out)
    return new_updates, LookaheadState(new_inner, new_slow, step,
                                       carry.outer_state, cycle_rows)

  def _sparse_tables(sparse, is_sync, state, params, inner_updates,
                     dense_updates, dense_slow, alpha):
    """The row-sparse tables' step (see `_rows`), merged with the dense."""
    def leaves(tree):
      return jax.tree.leaves(tree, is_leaf=_rows.is_hole_or_rows)
    slot = state.step % sync_period
    results = [None] * len(sparse)
    buffers = leaves(state.cycle_rows)
    for i, (p, u, s) in enumerate(zip(leaves(params), leaves(inner_updates),
                                      leaves(state.slow_params))):
      if sparse[i]:
        results[i] = _rows.sync_table(is_sync, slot, p, u, s, buffers[i],
                                      alpha, sync_period)
    pick = lambda j: [None if r is None else r[j] for r in results]  # pylint: disable=unnecessary-lambda-assignment
    updates = _rows.merge(dense_updates, inner_updates, pick(0))
    slow = _rows.merge(dense_slow, state.slow_params, pick(1))
    cycle_rows = _rows.merge(state.cycle_rows, state.cycle_rows, pick(2))
    return updates, slow, cycle_rows

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _sparse_options_conflict(outer: Any, axis_name: Any, inner_state: str,
                             on_nonfinite: str) -> Optional[str]:
  """Why row-sparse tables cannot be synced with these options, or None."""
  if (outer is None and axis_name is None and inner_state == "keep"
      and on_nonfinite == "propagate"):
    return None
  return ("no `outer`, no `axis_name`, `inner_state='keep'`, "
          "`on_nonfinite='propagate'`")


def _dense_like(updates: Any, slow: Any) -> Any:
  """`updates` with each `SparseRows` checked and shown as its table's shape."""
  def view(path, u, s):
    if not _sparse.is_sparse_rows(u):
      return u
    u.check_table(s, _tree.path_str(path))
    return jax.ShapeDtypeStruct(jnp.shape(s), jnp.result_type(u.values))
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      updates, is_leaf=_sparse.is_sparse_rows)
  if treedef != jax.tree.structure(slow):
    return updates  # check_same_tree names the difference
  return jax.tree.unflatten(treedef, [
      view(path, u, s) for (path, u), s in zip(flat, jax.tree.leaves(slow))])


def _check_update_args(updates: Any, state: Any, params: Any,
                       slow_dtype: Any) -> tuple[Any, Any]:
  """Checks `update`'s arguments; returns params and updates as arrays."""
  if params is None:
    raise ValueError(
        "`params` is required: lookahead's update needs the current params "
        "to compute the sync, call `tx.update(grads, state, params)`.")
  _check_state(state)
  params = jax.tree.map(jnp.asarray, params)
  updates = jax.tree.map(jnp.asarray, updates)
  _checks.check_same_tree(
      "params", params, state.slow_params, check_dtypes=slow_dtype is None,
      reference_name="the slow params")
  if slow_dtype is not None:
    _check_param_kinds(params, state.slow_params)
  _checks.check_same_tree(
      "updates", _dense_like(updates, state.slow_params), state.slow_params,
      reference_name="the slow params")
  return params, updates


def _check_param_kinds(params: Any, slow: Any) -> None:
  """With `slow_dtype`: floating params for floating slow weights, else equal.

  The state does not record the params' own float dtype, so a float param
  of another width cannot be told from the right one.
  """
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(slow)):
    pdtype, sdtype = jnp.result_type(p), jnp.result_type(s)
    same_kind = (jnp.issubdtype(pdtype, jnp.floating)
                 if jnp.issubdtype(sdtype, jnp.floating) else pdtype == sdtype)
    if not same_kind:
      raise ValueError(
          f"`params` leaf {_tree.path_str(path)} has dtype {pdtype}, which "
          f"does not match the slow params' {sdtype}.")


def _check_snoo_args(learning_rate: Any, momentum: Any) -> None:
  if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or (
      not 0.0 <= momentum < 1.0):
    raise ValueError(f"`momentum` must be a float in [0, 1), got {momentum!r}.")
  if callable(learning_rate):
    return
  if isinstance(learning_rate, bool) or not isinstance(
      learning_rate, (int, float)) or not 0.0 <= learning_rate < float("inf"):
    raise ValueError(
        "`learning_rate` must be a finite float >= 0 or a schedule, got "
        f"{learning_rate!r}.")


def snoo(
    inner: optax.GradientTransformation,
    sync_period: int = 28,
    learning_rate: optax.ScalarOrSchedule = 0.68,
    momentum: float = 0.37,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""SNOO: Lookahead whose outer step is SGD with Nesterov momentum.

  Every `sync_period` inner steps, the slow weights $w$ take a Nesterov
  momentum step on the pseudo-gradient $s = w - \tilde w$ (slow minus fast):

  $$b \leftarrow \mu b + s, \qquad w \leftarrow w - \eta (\mu b + s),$$

  with the momentum buffer $b$ starting at zero, and the params restart from
  the new $w$. This is `lookahead(inner, sync_period,
  outer=optax.sgd(learning_rate, momentum=momentum, nesterov=True))`; with
  `momentum=0` it is Lookahead with `slow_step_size=learning_rate`. The
  defaults are the settings of the authors' public reference run (GPT-2
  medium speedrun: $\eta = 0.68$, $\mu = 0.37$, $K = 28$, inner state kept);
  the paper tunes them per model scale, so treat them as a starting point.

  Args:
    inner: the inner optimizer (e.g. `optax.adamw`, Muon).
    sync_period: `K`, inner steps between outer steps.
    learning_rate: the outer learning rate $\eta$ (a float or a schedule of
      the number of outer steps).
    momentum: the outer Nesterov momentum $\mu$, in [0, 1).
    **kwargs: passed on to `lookahead` (e.g. `axis_name`, `inner_state`,
      `slow_dtype`); not `outer` or `slow_step_size`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`; `outer_state` holds the momentum buffer.

  Raises:
    ValueError: if `momentum` is outside [0, 1) or `learning_rate` is not a
      finite number >= 0, and as `lookahead`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.snoo(optax.sgd(0.5), sync_period=2, learning_rate=0.5,
    ...              momentum=0.5)
    >>> params = jnp.array([4.0])
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update(params, state, params)  # loss 0.5 p**2
    ...   params = optax.apply_updates(params, updates)
    >>> print(params)
    [0.390625]

    First cycle: the fast params go 4 -> 2 -> 1, so $s = 3$, $b = 3$ and
    $w = 4 - 0.5 (0.5 \cdot 3 + 3) = 1.75$. Second cycle: 1.75 -> 0.875 ->
    0.4375, so $s = 1.3125$, $b = 0.5 \cdot 3 + 1.3125 = 2.8125$ and
    $w = 1.75 - 0.5 (0.5 \cdot 2.8125 + 1.3125) = 0.390625$.

  References:
    Kallusky, Rao, Nandavanam, Shi, [SNOO: Step-K Nesterov Outer Optimizer -
    The Surprising Effectiveness of Nesterov Momentum Applied to
    Pseudo-Gradients](https://arxiv.org/abs/2510.15830), 2025.
  """
  for name in ("outer", "slow_step_size"):
    if name in kwargs:
      raise TypeError(f"`snoo` sets `{name}` itself; use `lookahead` to pass "
                      "your own.")
  _check_snoo_args(learning_rate, momentum)
  outer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return lookahead(inner, sync_period, outer=outer, **kwargs)
