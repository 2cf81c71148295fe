"""DiLoCo: replicas that train apart and average pseudo-gradients at a sync.

`diloco` checks its arguments once, in `configure` (the one place where the
rules of what combines live), and runs every step through `_step.update`
with the sync of `_streaming` (one fragment is the paper's DiLoCo), or with
`fragments="slices"` that of `_slices` (a slice of every leaf every step).
"""

import dataclasses
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _arguments
from lookahead_optax import _checks
from lookahead_optax import _participation
from lookahead_optax import _policies
from lookahead_optax import _step
from lookahead_optax import _streaming

__all__ = ("diloco",)

# The outer Nesterov step when neither `outer` nor these are given.
DEFAULT_LEARNING_RATE = 0.7
DEFAULT_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class DilocoConfig:
  """`diloco`'s arguments, checked and resolved (static).

  `_streaming` reads `fragments`, `num_fragments`, `fmt`, `error_feedback`,
  `overlap` and `mix`; `slices` sends every sync through `_slices` instead
  (`fragments="slices"`, `num_fragments` is then `sync_period`).
  """

  sync_period: Any
  axis_name: str
  outer: optax.GradientTransformation
  fragments: Any  # None, an int P, or a prefix tree of fragment numbers
  num_fragments: int
  fmt: Optional[str]  # a name in `_compress.FORMATS`, None for float32
  error_feedback: bool
  overlap: bool
  mix: Any  # a float in [0, 1], or a traced scalar
  inner_state: str
  on_nonfinite: str
  slow_dtype: Any
  min_replicas: Any  # an int >= 1, or a traced integer
  check_replicas: Optional[str]  # None, "detect" or "repair"

  @property
  def slices(self) -> bool:
    """`fragments="slices"`: a slice of every leaf every step."""
    return is_slices(self.fragments)


SLICES = "slices"


def is_slices(fragments: Any) -> bool:
  """Whether `fragments` asks for a slice of every leaf every step."""
  return isinstance(fragments, str) and fragments == SLICES


def _check_slices(sync_period: Any, inner_state: Any) -> int:
  """`fragments="slices"`: the number of slices, `sync_period` (checked)."""
  if not isinstance(sync_period, int) or isinstance(sync_period, bool):
    raise TypeError(
        "`sync_period` must be a Python int with `fragments='slices'` (the "
        f"number of slices of every leaf), got {sync_period!r}.")
  if inner_state == "reset":
    raise ValueError(
        "`inner_state='reset'` cannot be combined with `fragments='slices'`: "
        "a slice of every leaf syncs at every step, so resetting the inner "
        "state at a sync would reset it at every step. Use "
        "`inner_state='keep'`, or an int or a tree of `fragments`.")
  return sync_period


def _count_fragments(fragments: Any) -> int:
  """P for None, an int or a prefix tree of fragment numbers (checked)."""
  if fragments is None:
    return 1
  if isinstance(fragments, str):
    raise ValueError(
        "`fragments` must be None, an integer >= 1, 'slices', or a pytree of "
        f"fragment numbers, got {fragments!r}.")
  if _streaming.is_fragment_number(fragments):
    if int(fragments) < 1:
      raise ValueError(
          f"`fragments` must be an integer >= 1, got {fragments!r}.")
    return int(fragments)
  leaves = jax.tree.leaves(fragments)
  bad = [x for x in leaves
         if not _streaming.is_fragment_number(x) or int(x) < 0]
  if not leaves or bad:
    raise TypeError(
        "`fragments` must be None, an integer >= 1, or a pytree (a prefix of "
        "the params) whose leaves are fragment numbers, integers >= 0; got "
        f"{bad[0] if bad else fragments!r}.")
  count = max(int(x) for x in leaves) + 1
  empty = sorted(set(range(count)) - {int(x) for x in leaves})
  if empty:
    raise ValueError(
        f"`fragments` numbers fragments 0 to {count - 1}, but fragment "
        f"{empty[0]} has no leaves: number them 0, 1, ..., P - 1.")
  return count


def _outer_of(outer: Any, learning_rate: Any, momentum: Any
              ) -> optax.GradientTransformation:
  """`outer`, or the Nesterov SGD of `learning_rate` and `momentum`."""
  if outer is not None:
    _checks.check_transformation("outer", outer)
    given = [n for n, v in (("learning_rate", learning_rate),
                            ("momentum", momentum)) if v is not None]
    if given:
      raise ValueError(
          f"`{given[0]}` and `outer` cannot both be given: `learning_rate` "
          "and `momentum` set the default outer step (SGD with Nesterov "
          "momentum); with `outer`, its own settings do.")
    return outer
  learning_rate = (DEFAULT_LEARNING_RATE if learning_rate is None
                   else learning_rate)
  momentum = DEFAULT_MOMENTUM if momentum is None else momentum
  _arguments.check_snoo_args(learning_rate, momentum)
  return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def _check_schedule(sync_period: Any, num: int, overlap: bool) -> None:
  """`sync_period` against the fragments and `overlap`."""
  if (num > 1 or overlap) and not isinstance(sync_period, numbers.Integral):
    raise TypeError(
        "`sync_period` must be a Python int with `fragments` or `overlap` "
        f"(it sets the schedule), got {sync_period!r}.")
  if num > 1 and int(sync_period) % num:
    raise ValueError(
        f"`sync_period` must be a multiple of the number of fragments P = "
        f"{num} (each fragment syncs every `sync_period` steps, one every "
        f"`sync_period / P`), got {sync_period!r}.")
  if overlap and int(sync_period) == 1:
    raise ValueError(
        "`overlap=True` needs `sync_period` >= 2: it takes the pseudo-"
        "gradient from the params before a step's inner update, and with "
        "`sync_period=1` that is the slow weights themselves.")


def _check_min_replicas(min_replicas: Any) -> Any:
  """An integer >= 1 (None: 1); a traced integer scalar is taken as is."""
  if min_replicas is None:
    return 1
  if _checks.is_traced(min_replicas):
    if min_replicas.ndim or not jnp.issubdtype(min_replicas.dtype,
                                               jnp.integer):
      raise TypeError(
          "`min_replicas` must be an integer >= 1, got a traced "
          f"{min_replicas.dtype}{list(min_replicas.shape)}.")
    return min_replicas
  if not _streaming.is_fragment_number(min_replicas):
    raise TypeError("`min_replicas` must be an integer >= 1 (at most the "
                    f"number of replicas), got {min_replicas!r}.")
  if int(min_replicas) < 1:
    raise ValueError("`min_replicas` must be an integer >= 1 (at most the "
                     f"number of replicas), got {min_replicas!r}.")
  return int(min_replicas)


def _check_replicas_mode(mode: Any) -> Optional[str]:
  if mode is None:
    return None
  return _checks.check_choice("check_replicas", mode, ("detect", "repair"))


def configure(*, inner: Any, sync_period: Any, axis_name: Any,
              learning_rate: Any, momentum: Any, outer: Any, fragments: Any,
              communication_dtype: Any, error_feedback: Any, overlap: Any,
              mix: Any, inner_state: Any, on_nonfinite: Any,
              slow_dtype: Any, min_replicas: Any,
              check_replicas: Any) -> DilocoConfig:
  """`diloco`'s arguments, checked: every rule of what combines.

  Raises:
    TypeError, ValueError: naming the argument.
  """
  _arguments.check_inner(inner)
  _checks.check_sync_period(sync_period)
  _arguments.check_replica_axis(axis_name, "diloco")
  outer = _outer_of(outer, learning_rate, momentum)
  num = (_check_slices(sync_period, inner_state) if is_slices(fragments)
         else _count_fragments(fragments))
  fmt, error_feedback = _arguments.check_wire(communication_dtype,
                                              error_feedback)
  overlap = _arguments.check_bool("overlap", overlap)
  mix = 0.0 if mix is None else _checks.check_unit_interval(
      "mix", mix, allow_schedule=False)
  _check_schedule(sync_period, num, overlap)
  _checks.check_choice("inner_state", inner_state, ("keep", "reset"))
  _checks.check_choice("on_nonfinite", on_nonfinite,
                       _policies.NONFINITE_POLICIES)
  return DilocoConfig(sync_period, axis_name, outer, fragments, num, fmt,
                      error_feedback, overlap, mix, inner_state, on_nonfinite,
                      _arguments.check_slow_dtype(slow_dtype),
                      _check_min_replicas(min_replicas),
                      _check_replicas_mode(check_replicas))


def step_options(inner: Any, config: DilocoConfig) -> _step.Options:
  """The options of `_step.update` for a checked configuration."""
  return _step.Options(
      inner=optax.with_extra_args_support(inner), outer=config.outer,
      sync_period=config.sync_period, slow_step_size=None,
      inner_state=config.inner_state, on_nonfinite=config.on_nonfinite,
      axis_name=config.axis_name, slow_dtype=config.slow_dtype, sync="cond",
      counts_syncs=False, streaming=config)


def diloco(
    inner: optax.GradientTransformation,
    sync_period: int,
    axis_name: str,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    momentum: Optional[float] = None,
    *,
    outer: Optional[optax.GradientTransformation] = None,
    fragments: Optional[Any] = None,
    communication_dtype: Optional[Any] = None,
    error_feedback: bool = False,
    overlap: bool = False,
    mix: Optional[float] = None,
    inner_state: str = "keep",
    on_nonfinite: str = "propagate",
    slow_dtype: Optional[Any] = None,
    min_replicas: Optional[int] = None,
    check_replicas: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: replicas train apart and average the pseudo-gradient at a sync.

  Each replica of the mapped axis `axis_name` (`jax.pmap`, `shard_map`)
  runs `inner` on its own gradients with its own inner state (do not average
  the gradients in your step); every `sync_period` steps the
  pseudo-gradients $\Delta_m = \phi - \theta_m$ are averaged over the axis
  (the step's only collectives, inside a `jax.lax.cond`, so the other
  `sync_period - 1` steps communicate nothing) and the slow weights take an
  outer step on the mean, by default SGD with Nesterov momentum:

  $$\Delta = \tfrac{1}{M} \textstyle\sum_m \Delta_m, \qquad
  b \leftarrow \mu b + \Delta, \qquad
  \phi \leftarrow \phi - \eta (\mu b + \Delta).$$

  The params then land on the new slow weights, which stay bitwise identical
  on every replica (they land exactly except where a weight moved by more
  than a factor of two in the cycle: one rounding at the scale of the fast
  weights). The initial params must be the same on every replica
  (`check_replicas_agree`). With `fragments`, the params are split into P
  fragments that sync at staggered steps (Streaming DiLoCo); one fragment is
  the paper's DiLoCo, on the same code path. With `fragments="slices"`, a
  slice of every leaf syncs at every step, outside any conditional.

  The state is a `LookaheadState` (so `slow_params`, `eval_params` and the
  Flax helpers work) whose `outer_state` is a `StreamingState`: one outer
  state per fragment and the error-feedback buffers. Its structure depends on
  the arguments' values only: passing a default is the same as omitting it.

  Under `optax.inject_hyperparams`, pass `static_args=("sync_period",
  "axis_name")` (and any dtype argument): `learning_rate`, `momentum` and
  `mix` may then be injected.

  Args:
    inner: the inner optimizer (the paper: AdamW). Extra keyword arguments
      of `update` are passed on to it.
    sync_period: $H$, inner steps between syncs of each fragment; an integer
      in [1, 2**31 - 1] (a Python int with `fragments` or `overlap`).
    axis_name: the mapped axis of the replicas, a non-empty string.
    learning_rate: the outer learning rate $\eta$ (a float or a schedule of
      the number of outer steps). None: 0.7.
    momentum: the outer Nesterov momentum $\mu$, in [0, 1). None:
      0.9.
    outer: any optax transformation for the outer step instead of the
      Nesterov SGD (e.g. `optax.sgd(1.0)`, plain averaging). At a sync it
      receives the mean pseudo-gradient of each fragment (float32 or wider)
      with the slow weights as params. Cannot be combined with
      `learning_rate` or `momentum`.
    fragments: Streaming DiLoCo: None (one fragment), an int P, or a pytree
      prefix of the params (matched by path) whose leaves are fragment
      numbers 0 to P - 1. Fragment f syncs after the steps t with
      `t % sync_period == ((f + 1) * sync_period // P) % sync_period`, so
      each fragment syncs every `sync_period` steps and one fragment every
      `sync_period / P` steps, and a step's collective carries one fragment.
      At its sync only the fragment's pseudo-gradient is averaged and the
      outer step runs on that fragment alone, with its own state; the other
      fragments take the inner update. An int splits the leaves by size:
      largest leaf first, each to the fragment with the fewest values so far
      (ties: the lower fragment number). A leaf is never split, so a stacked
      (scanned) layer of shape `(L, ...)` is one leaf in one fragment; pass
      a prefix tree or unstack it to split layers. `sync_period` must be a
      multiple of P.

      `"slices"`: a slice of every leaf syncs at every step, with no
      conditional. Each leaf of n values is cut into `sync_period` slices
      of $m = \lceil n / \text{sync\_period} \rceil$ consecutive values
      of its flattened values (zero-padded at the end; a leaf with fewer
      than `sync_period` values has slices of padding alone, whose syncs
      move nothing), and slice j of every leaf syncs after the steps t with
      `t % sync_period == (j + 1) % sync_period` (the schedule of
      `fragments=sync_period`): step 1 syncs slice 0, step `sync_period`
      the last. Every step's collectives carry 1/`sync_period` of the
      model (padding aside), at static shapes outside any conditional, and
      every value syncs once every `sync_period` steps; each slice has its
      own outer state (stacked on a leading axis of `sync_period` in
      `StreamingState.outer_states[0]`). Works with every wire format,
      `error_feedback`, `overlap`, `mix`, `weight`, `min_replicas`,
      `on_nonfinite` and `check_replicas` (on the synced slices and their
      outer state); not with `inner_state="reset"`. `sync_period` must be
      a Python int; 1 is plain DiLoCo syncing every step.
    communication_dtype: how the pseudo-gradient travels: None (float32,
      one all-reduce), `jnp.bfloat16`, `jnp.float8_e4m3fn`, `jnp.int8` or
      `"int4"` (two values per byte). The low-precision formats carry a
      float32 scale per block of 256 values; the mean is taken in float32
      from the decoded values, so it is bitwise the same on every replica,
      and non-finite values reach it as in float32 (see `replica_mean`).
    error_feedback: with a low-precision `communication_dtype`: each replica
      keeps what encoding dropped of its pseudo-gradient (and of its shard
      of the mean) in one params-sized float32 buffer
      (`StreamingState.residuals`) and adds it to its next pseudo-gradient
      of that fragment.
    overlap: the pseudo-gradient of a fragment that syncs at step t is taken
      from the params as they enter step t, so its collective depends on
      nothing the step computes. Needs `sync_period >= 2`. Nothing orders
      the collective against the step's compute: whether it runs during
      the forward and backward pass is the scheduler's choice (XLA's
      latency-hiding scheduler on GPU), possible only with
      `fragments="slices"`, whose collectives sit in no conditional.
    mix: in [0, 1], None meaning 0: after a fragment's outer step its params
      become `mix * fast + (1 - mix) * slow`, with `fast` the fast weights
      after this step's inner update; 0 lands them on the new slow weights.
    inner_state: `"keep"` (default) leaves the inner state alone at a sync;
      `"reset"` resets the parameter-shaped leaves of the syncing fragment
      (e.g. Adam moments) to their initial values, keeping step counts.
    on_nonfinite: `"propagate"` (default) applies non-finite updates as
      they are (a NaN on one replica reaches every replica's slow weights at
      the next sync). `"rollback"`: a replica whose inner update, or the
      fast params it would give, is not finite goes back to the slow
      weights at once (the step's update sends its params there) and resets
      the parameter-shaped leaves of its inner state (keeping step counts),
      as `lookahead`'s rollback does on one device; the other replicas are
      not touched. On a step with a sync it sits that sync out (weight 0)
      and lands on the new slow weights like the others, so every replica
      ends every sync on the same slow weights with finite params. Its slow
      weights are never moved by a rollback (they must agree across
      replicas), so where a weight moved by more than a factor of two since
      the last sync its params are one rounding off them.
    slow_dtype: a floating dtype in which to keep the slow weights of
      floating params (e.g. `jnp.float32` for bfloat16 params), or None.
    min_replicas: the quorum of a sync given weights (see below): with
      fewer replicas of nonzero weight, the sync is skipped (the slow
      weights and the outer state stay, every replica lands back on the
      slow weights). An integer in [1, the number of replicas] (may be
      traced); None means 1.
    check_replicas: None (default), `"detect"` or `"repair"`: after each
      fragment sync, check that every replica holds bitwise the same slow
      weights and outer state of the fragment (`replicas_agree`: 8 bytes
      per leaf in one all-gather) and count the syncs where they did not
      (`ReplicaCounts.disagreed`); with `"repair"`, every leaf that differs
      takes on every replica the value held by the most replicas (ties: the
      lowest replica index), moved by one collective of that leaf alone
      (`ReplicaCounts.repaired` counts them).

  `update` takes one more keyword argument, `weight`: this replica's weight
  for the coming sync (a real scalar per replica, e.g. the tokens it
  trained on since the last sync; read at sync steps, ignored at others).
  The mean pseudo-gradient is then $\sum_m w_m \Delta_m / \sum_m w_m$, in
  every wire format (the weights travel as float32, one scalar per replica
  all-gathered per sync). A replica with weight 0 sits out: its pseudo-gradient
  does not count, and it lands on the new slow weights like the others, so
  it heals. A concrete negative or non-finite weight is an error; a traced
  one sits out. `StreamingState.counts` (a `ReplicaCounts`) counts the
  skipped syncs and the replicas that sat out. Without `weight` none of
  this is traced.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState` with a `StreamingState` as `outer_state`.

  Raises:
    TypeError: if `inner` or `outer` is not a gradient transformation,
      `axis_name` is not a non-empty string, `learning_rate` or `momentum`
      is not a real number (a schedule is fine for `learning_rate`),
      `fragments` is not None, an int, `"slices"` or a tree of ints, a
      boolean option is not a bool, `sync_period` is not a Python int with
      `fragments` or `overlap`, or `slow_dtype` is not a floating dtype.
    ValueError: if `sync_period` is out of range or not a multiple of P,
      `momentum` is outside [0, 1), `learning_rate` is not a finite number
      >= 0, `outer` is combined with `learning_rate` or `momentum`, a
      fragment has no leaves, `mix` is outside [0, 1], `communication_dtype`
      is not supported, `error_feedback` is given without a low-precision
      `communication_dtype`, `overlap=True` with `sync_period=1`, or
      `inner_state` is not 'keep' or 'reset' (or is 'reset' with
      `fragments="slices"`), or `min_replicas` is not an
      integer >= 1; at `update`, when `axis_name` is not a mapped axis
      there, `min_replicas` exceeds the number of replicas, `weight` is
      not a real scalar or (concretely) negative or not finite, or the
      state's step counter is not a scalar (a `shard_map` block that kept
      the replica axis).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lookahead_optax as lo
    >>> tx = lo.diloco(optax.sgd(0.5), sync_period=2, axis_name="r",
    ...                learning_rate=0.7, momentum=0.9)
    >>> params = jnp.stack([jnp.array([4.0])] * 2)  # 2 replicas, one start
    >>> state = jax.pmap(tx.init, devices=jax.devices()[:2])(params)
    >>> def step(p, s, target):
    ...   u, s = tx.update(p - target, s, p)  # loss 0.5 (p - target)**2
    ...   return optax.apply_updates(p, u), s
    >>> step = jax.pmap(step, axis_name="r", devices=jax.devices()[:2])
    >>> targets = jnp.array([[0.0], [2.0]])  # each replica its own data
    >>> for _ in range(2):
    ...   params, state = step(params, state, targets)
    >>> print(params[:, 0])
    [1.0075 1.0075]

    The fast weights went 4 -> 2 -> 1 and 4 -> 3 -> 2.5, so
    $\Delta = (3 + 1.5) / 2 = 2.25$, $b = 2.25$ and
    $\phi = 4 - 0.7 (0.9 \cdot 2.25 + 2.25) = 1.0075$, on both replicas.

    Streaming: two fragments (`{"a": 0, "b": 1}`) of a 4-step cycle sync
    after steps 2 and 4; fragment `a` moved at step 2, `b` not yet:

    >>> tx = lo.diloco(optax.sgd(0.5), 4, "r", 0.7, 0.9,
    ...                fragments={"a": 0, "b": 1})
    >>> def step(p, s, target):
    ...   u, s = tx.update(jax.tree.map(lambda x: x - target, p), s, p)
    ...   return optax.apply_updates(p, u), s
    >>> step = jax.pmap(step, axis_name="r", devices=jax.devices()[:2])
    >>> params = {"a": jnp.full((2, 1), 4.0), "b": jnp.full((2, 1), 4.0)}
    >>> state = jax.pmap(tx.init, devices=jax.devices()[:2])(params)
    >>> for _ in range(2):
    ...   params, state = step(params, state, targets)
    >>> print(params["a"][:, 0], params["b"][:, 0])
    [1.0075 1.0075] [1.  2.5]

  References:
    Douillard et al., [DiLoCo: Distributed Low-Communication Training of
    Language Models](https://arxiv.org/abs/2311.08105), 2023.

    Douillard et al., [Streaming DiLoCo with overlapping communication:
    Towards a Distributed Free Lunch](https://arxiv.org/abs/2501.18512),
    2025.
  """
  config = configure(
      inner=inner, sync_period=sync_period, axis_name=axis_name,
      learning_rate=learning_rate, momentum=momentum, outer=outer,
      fragments=fragments, communication_dtype=communication_dtype,
      error_feedback=error_feedback, overlap=overlap, mix=mix,
      inner_state=inner_state, on_nonfinite=on_nonfinite,
      slow_dtype=slow_dtype, min_replicas=min_replicas,
      check_replicas=check_replicas)
  opts = step_options(inner, config)

  def init_fn(params):
    return _step.init(opts, None, params)

  def update_fn(updates, state, params=None, weight=None, **extra_args):
    if not _checks.is_traced(config.min_replicas) and config.min_replicas > 1:
      _arguments.check_axis_bound(config.axis_name)
      _participation.check_min_replicas(config.min_replicas,
                                        config.axis_name)
    if weight is not None:
      weight = _participation.check_weight(weight)
    return _step.update(opts, updates, state, params, extra_args, weight)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
