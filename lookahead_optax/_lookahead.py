"""The Lookahead optimizer as a drop-in optax gradient transformation."""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _arguments
from lookahead_optax import _checks
from lookahead_optax import _formulation
from lookahead_optax import _policies
from lookahead_optax import _rows
from lookahead_optax import _step
from lookahead_optax import _streaming
from lookahead_optax import _streaming_args
from lookahead_optax import _sync
from lookahead_optax._types import LookaheadState
from lookahead_optax._types import PullbackState
from lookahead_optax._types import StreamingState

__all__ = ("LookaheadState", "PullbackState", "StreamingState", "lookahead")

_DEFAULT_SLOW_STEP_SIZE = 0.5


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
    fragments: Optional[Any] = None,
    communication_dtype: Optional[Any] = None,
    error_feedback: bool = False,
    overlap: bool = False,
    mix: Optional[float] = None,
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
      `optax.inject_hyperparams`). A sync happens on the step that brings
      the global step count to a multiple of `k`, so changing `k` mid-run
      does not start a new cycle: going from 5 to 3 right after the sync at
      step 10 syncs next at step 12 (a 2-step cycle), then every 3 steps.
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
      collectives, inside a `jax.lax.cond`, so the other `sync_period - 1`
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
      into one pass). `"cond"` runs it in a `jax.lax.cond`. `"loop"` runs
      the inner-state policy and the outer step in loops that run once on
      the steps that need them and not at all on the others, updating the
      state in place (XLA:CPU copies what a conditional carries, and the
      select makes it copy the old state); it reads one element of the new
      params to order them, a scalar all-reduce when params are sharded over
      devices. `"auto"` (default), resolved when the step is traced: the
      cond with `axis_name`, the select for the default options, otherwise
      the loop on a single CPU device and the select elsewhere (several
      devices, accelerators). An inner optimizer with matrix products (e.g.
      Muon) is computed once per step under every formulation; see "How the
      sync is compiled" in docs/how_it_works.md. All compute the same
      sync; they may differ in the last bit of a few elements, as XLA
      contracts multiply-adds (FMA) differently in different programs,
      while the params equal the slow weights bitwise after a sync in each.
    on_nonfinite: `"propagate"` (default) applies non-finite updates as they
      are. `"rollback"`: when the inner update or the fast params it would
      produce has a non-finite value, the step returns the update that sends
      the params back to the slow weights, resets the parameter-shaped inner
      state, and leaves the outer state and the slow weights as they were
      (no sync on that step), except that where `params + (slow - params)`
      rounds (a weight that moved by more than a factor of two since the
      last sync) the slow weights store where the params land, so that the
      params equal them bitwise, as after a sync. Params that are already
      non-finite cannot be repaired by an additive update. With
      `sync="loop"` (what `"auto"` picks on one CPU device) and an
      elementwise inner optimizer (no matrix products in its update),
      `inner.update` is computed twice, once for the check alone (XLA then
      fuses it into the check instead of buffering every update); a
      `jax.debug.print` in it prints twice.
    slow_dtype: if given, a floating dtype in which to keep the slow weights of
      floating params (e.g. `jnp.float32` for bfloat16 params), so that small
      updates accumulate in the slow weights instead of rounding away. After a
      sync the params equal `slow.astype(params.dtype)` bitwise.
    rows_per_step: for row-sparse embedding training (`lazy` on
      `SparseRows` gradients): a pytree with the params' structure (or a
      prefix of it) holding, at each table whose updates are `SparseRows`,
      the number N of ids each step brings, and None elsewhere. Each step,
      sync steps included, then costs O(`sync_period` * N) rows for that
      table, never a pass over it: the state keeps the ids of the cycle
      (`CycleRows`, which also holds one int32 per table row) and a sync
      interpolates only those rows (the others already equal their slow
      weights). Needs a concrete `sync_period` and the default options
      (no `outer`, `axis_name`, `inner_state="keep"`,
      `on_nonfinite="propagate"`).
    fragments: Streaming DiLoCo (with `axis_name` only): None (one
      fragment), an int P, or a pytree prefix of the params (matched by
      path, like `rows_per_step`) whose leaves are fragment numbers 0 to
      P - 1. Fragment f syncs after the steps t with `t % sync_period ==
      ((f + 1) * sync_period // P) % sync_period`, so each fragment syncs
      every `sync_period` steps and one fragment every `sync_period / P`
      steps, and a step's collective carries one fragment. At its sync only
      the fragment's pseudo-gradient is averaged and `outer` steps on that
      fragment alone, with its own state (`StreamingState`); the other
      fragments take the inner update. An int splits the leaves by size:
      largest leaf first, each to the fragment with the fewest values so far
      (ties: the lower fragment number). A leaf is never split, so a
      stacked (scanned) layer of shape `(L, ...)` is one leaf in one
      fragment; pass a prefix tree or unstack it to split layers.
      `sync_period` must be a Python int, a multiple of P.
    communication_dtype: with `axis_name`, how the pseudo-gradient travels:
      None (float32, one all-reduce), `jnp.bfloat16`, `jnp.float8_e4m3fn`,
      `jnp.int8` or `"int4"` (two values per byte). The low-precision
      formats carry a float32 scale per block of 256 values; the mean is
      taken in float32 from the decoded values (all-to-all, decode and sum,
      encode, all-gather), so it is bitwise the same on every replica.
      See docs/diloco.md for the bytes.
    error_feedback: with a low-precision `communication_dtype`: each
      replica keeps what encoding dropped of its pseudo-gradient (and of
      its shard of the mean) in one params-sized float32 buffer
      (`StreamingState.residuals`) and adds it to its next pseudo-gradient
      of that fragment.
    overlap: with `axis_name`: the pseudo-gradient of a fragment that syncs
      at step t is taken from the params as they enter step t, so its
      collective depends on nothing the step computes (it can overlap the
      forward and backward pass where the backend schedules it so). Needs
      `sync_period >= 2`.
    mix: with `axis_name`, in [0, 1], default 0: after a fragment's outer
      step its params become `mix * fast + (1 - mix) * slow`, with `fast`
      the fast weights after this step's inner update; 0 lands them on the
      new slow weights (bitwise, as without it).

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
      state (with `slow_dtype`, only whether a params leaf is floating is
      checked: the state does not record the params' float width), or with
      `touched_rows` for leaves that no `lazy` handles; for the streaming
      arguments (`fragments`, `communication_dtype`, `error_feedback`,
      `overlap`, `mix`): given without `axis_name`, `sync_period` not a
      multiple of the number of fragments, a fragment with no leaves, `mix`
      outside [0, 1], an unsupported `communication_dtype`, `error_feedback`
      without one, `overlap=True` with `sync_period=1`, or with
      `inner_state="pullback"` (a `TypeError` for a wrong type).

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

    Douillard et al., [Streaming DiLoCo with overlapping communication:
    Towards a Distributed Free Lunch](https://arxiv.org/abs/2501.18512),
    2025.
  """
  _checks.check_transformation("inner", inner)
  if _arguments.is_multisteps(inner):
    raise ValueError(f"`inner` must not be an optax.MultiSteps: "
                     f"{_arguments.MULTISTEPS_ERROR}")
  _checks.check_sync_period(sync_period)
  if slow_step_size is not None:
    _checks.check_unit_interval(
        "slow_step_size", slow_step_size, allow_schedule=True)
  _checks.check_choice("inner_state", inner_state,
                       _policies.INNER_STATE_POLICIES)
  _checks.check_choice("sync", sync, _formulation.SYNC_MODES)
  _checks.check_choice("on_nonfinite", on_nonfinite,
                       _policies.NONFINITE_POLICIES)
  _arguments.check_outer(outer, slow_step_size, inner_state)
  _arguments.check_axis_name(axis_name, sync, on_nonfinite)
  if rows_per_step is not None and not isinstance(sync_period, int):
    raise TypeError(
        "`sync_period` must be a Python int when `rows_per_step` is given "
        f"(it sizes the id buffer), got {sync_period!r}.")
  _arguments.check_rows_per_step_options(
      rows_per_step, outer, axis_name, inner_state, on_nonfinite)
  streaming = _streaming_args.check_args(
      axis_name=axis_name, sync_period=sync_period, inner_state=inner_state,
      fragments=fragments, communication_dtype=communication_dtype,
      error_feedback=error_feedback, overlap=overlap, mix=mix)
  if outer is None and slow_step_size is None:
    slow_step_size = _DEFAULT_SLOW_STEP_SIZE
  opts = _step.Options(
      inner=optax.with_extra_args_support(inner), outer=outer,
      sync_period=sync_period, slow_step_size=slow_step_size,
      inner_state=inner_state, on_nonfinite=on_nonfinite,
      axis_name=axis_name, slow_dtype=_arguments.check_slow_dtype(slow_dtype),
      sync=sync,
      counts_syncs=outer is None and callable(slow_step_size),
      sparse_options=_arguments.sparse_options_conflict(
          outer, axis_name, inner_state, on_nonfinite),
      streaming=streaming)

  def init_fn(params):
    return _init(opts, rows_per_step, params)

  def update_fn(updates, state, params=None, **extra_args):
    return _step.update(opts, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _init(opts: _step.Options, rows_per_step: Any,
          params: optax.Params) -> LookaheadState:
  """`lookahead`'s `init_fn`: slow weights are copies of the params."""
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
    outer_state = _streaming.init_state(opts.streaming, opts.outer,
                                        opts.counts_syncs, slow)
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
