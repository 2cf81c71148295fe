"""The Lookahead optimizer as a drop-in optax gradient transformation."""

import functools
import inspect
from typing import Any, Callable, Optional

import optax

from lookahead_optax import _arguments
from lookahead_optax import _checks
from lookahead_optax import _formulation
from lookahead_optax import _policies
from lookahead_optax import _step
from lookahead_optax._types import LookaheadState
from lookahead_optax._types import PullbackState
from lookahead_optax._types import StreamingState

__all__ = ("LookaheadState", "PullbackState", "StreamingState", "lookahead")

_DEFAULT_SLOW_STEP_SIZE = 0.5

# The arguments of `diloco` that apply to replicas only.
DILOCO_ONLY = ("axis_name", "fragments", "communication_dtype",
               "error_feedback", "overlap", "mix")


def _shown(value: Any) -> str:
  """`value` as it would be written in a call."""
  name = getattr(value, "__name__", None)
  if isinstance(value, type) and name:
    return f"jnp.{name}"
  if _checks.is_transformation(value):
    return "outer"
  text = repr(value)
  return text if len(text) <= 40 else "..."


def diloco_call(factory: str, kwargs: dict) -> str:
  """The error for an argument of `diloco` given to a one-device `factory`.

  It shows the `lo.diloco` call to write from the arguments given.
  """
  moved = [n for n in DILOCO_ONLY if n in kwargs]
  if factory == "snoo":
    outer = [f"learning_rate={_shown(kwargs.get('learning_rate', 0.68))}",
             f"momentum={_shown(kwargs.get('momentum', 0.37))}"]
  elif kwargs.get("outer") is not None:
    outer = ["outer=outer"]
  else:
    outer = [f"outer=optax.sgd("
             f"{_shown(kwargs.get('slow_step_size') or 0.5)})"]
  rest = [f"{n}={_shown(kwargs[n])}" for n in DILOCO_ONLY + (
      "inner_state", "slow_dtype") if n in kwargs and n != "axis_name"]
  axis = _shown(kwargs.get("axis_name", "replicas"))
  call = ", ".join(["inner", "sync_period", f"axis_name={axis}"] + outer
                   + rest)
  return (
      f"`{factory}` runs on one device and takes no `{moved[0]}`: replicas "
      "that average their pseudo-gradients over a mapped axis (and "
      "Streaming DiLoCo's options) are `lo.diloco`'s. Write "
      f"`lo.diloco({call})`" + (
          "; lookahead's interpolation with step a is "
          "`outer=optax.sgd(a)`, or leave `outer` out for DiLoCo's Nesterov "
          "step (`learning_rate`, `momentum`)." if factory == "lookahead"
          else "."))


def redirects_replica_arguments(factory: Callable) -> Callable:
  """`factory`, raising a `TypeError` that shows the `diloco` call to write.

  Python would reject those arguments anyway (the factory does not list
  them); this names where they went. The signature is `factory`'s own.
  """
  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def wrapper(*args, **kwargs):
    if any(n in kwargs for n in DILOCO_ONLY):
      own = {k: v for k, v in kwargs.items() if k in signature.parameters}
      try:
        given = signature.bind_partial(*args, **own).arguments
      except TypeError:
        given = own
      raise TypeError(diloco_call(factory.__name__, {**kwargs, **given}))
    return factory(*args, **kwargs)
  return wrapper


@redirects_replica_arguments
def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int = 5,
    slow_step_size: Optional[optax.ScalarOrSchedule] = None,
    *,
    outer: Optional[optax.GradientTransformation] = None,
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
  SGD with Nesterov momentum, see `snoo`). For replicas that average
  $\Delta$ over a mapped axis at a sync, use `diloco`.

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
      select for the default options, otherwise
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
      (no `outer`, `inner_state="keep"`, `on_nonfinite="propagate"`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`.

  Raises:
    TypeError: if `inner` or `outer` is not a gradient transformation,
      `sync_period`, `slow_step_size` or `slow_dtype` has the wrong type,
      an argument of `diloco` (`axis_name`, `fragments`, ...) is passed (the
      message shows the `diloco` call to write), or `update` gets a state
      that is not a `LookaheadState`.
    ValueError: if `sync_period` is out of range, `slow_step_size` is outside
      [0, 1] or NaN, a string option is not one of its values, `inner` is an
      `optax.MultiSteps`, `outer` is combined with `slow_step_size` or
      `inner_state="pullback"`, `rows_per_step` with options other than the
      defaults, or `update` is called without params, with params or updates
      whose structure, shapes or dtypes differ from the state (with
      `slow_dtype`, only whether a params leaf is floating is checked: the
      state does not record the params' float width), with a step counter
      that is not a scalar, or with `touched_rows` for leaves that no `lazy`
      handles.

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
  """
  opts = options(inner, sync_period, slow_step_size, outer=outer,
                 inner_state=inner_state, sync=sync,
                 on_nonfinite=on_nonfinite, slow_dtype=slow_dtype,
                 rows_per_step=rows_per_step)

  def init_fn(params):
    return _step.init(opts, rows_per_step, params)

  def update_fn(updates, state, params=None, **extra_args):
    return _step.update(opts, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def options(inner: Any, sync_period: Any, slow_step_size: Any, *, outer: Any,
            inner_state: Any, sync: Any, on_nonfinite: Any, slow_dtype: Any,
            rows_per_step: Any) -> _step.Options:
  """`lookahead`'s arguments, checked: every rule of what combines.

  Raises:
    TypeError, ValueError: naming the argument.
  """
  _arguments.check_inner(inner)
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
  if rows_per_step is not None and not isinstance(sync_period, int):
    raise TypeError(
        "`sync_period` must be a Python int when `rows_per_step` is given "
        f"(it sizes the id buffer), got {sync_period!r}.")
  _arguments.check_rows_per_step_options(
      rows_per_step, outer, inner_state, on_nonfinite)
  if outer is None and slow_step_size is None:
    slow_step_size = _DEFAULT_SLOW_STEP_SIZE
  return _step.Options(
      inner=optax.with_extra_args_support(inner), outer=outer,
      sync_period=sync_period, slow_step_size=slow_step_size,
      inner_state=inner_state, on_nonfinite=on_nonfinite, axis_name=None,
      slow_dtype=_arguments.check_slow_dtype(slow_dtype), sync=sync,
      counts_syncs=outer is None and callable(slow_step_size))
