"""`replica_mean`: the gradients' mean over replicas, optionally compressed.

The data-parallel counterpart of DiLoCo's compressed pseudo-gradients: the
same code (`_compress.mean`), applied to the gradients at every step.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _arguments
from lookahead_optax import _checks
from lookahead_optax import _compress
from lookahead_optax import _tree


class ReplicaMeanState(NamedTuple):
  """The state of `replica_mean`.

  Attributes:
    residuals: with `error_feedback`, what encoding dropped of this
      replica's updates at the last step (and of its shard of the mean),
      added to the next step's before encoding: a float32 tree shaped like
      the params, zeros at `init` (each replica keeps its own). None
      without `error_feedback`.
  """

  residuals: Optional[optax.Updates]


def _averaged(x: Any) -> bool:
  """Whether `replica_mean` averages the leaf `x` (floating, not complex)."""
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _check_not_complex(updates: Any) -> None:
  """The compressed formats encode real values only."""
  for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
    if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
      raise ValueError(
          f"`updates` leaf {_tree.path_str(path)} is complex "
          f"({jnp.result_type(x)}): a low-precision `communication_dtype` "
          "encodes real values only; average it in float32 "
          "(`communication_dtype=None`).")


def _mean(leaves: list, residuals: Optional[list], axis_name: str,
          fmt: Optional[str]) -> tuple[list, Optional[list]]:
  """Each floating leaf's mean over `axis_name`, in its dtype.

  Returns the leaves with the floating ones replaced by their means (of the
  leaf plus its residual, with error feedback), and the residuals with
  theirs replaced by what encoding dropped.
  """
  mine = [i for i, x in enumerate(leaves) if _averaged(x)]
  if not mine:
    return leaves, residuals
  sent = [leaves[i] for i in mine]
  if fmt is not None:
    sent = [x.astype(jnp.float32) for x in sent]
  if residuals is not None:
    sent = [x + residuals[i] for x, i in zip(sent, mine)]
  mean, dropped = _compress.mean(sent, axis_name, fmt)
  leaves = list(leaves)
  for j, i in enumerate(mine):
    leaves[i] = mean[j].astype(leaves[i].dtype)
  if residuals is not None:
    residuals = list(residuals)
    for j, i in enumerate(mine):
      residuals[i] = dropped[j]
  return leaves, residuals


def replica_mean(
    axis_name: str,
    communication_dtype: Optional[Any] = None,
    error_feedback: bool = False,
) -> optax.GradientTransformation:
  r"""The mean of the updates over the replicas of a mapped axis.

  Replaces `jax.lax.pmean(grads, axis_name)` in a data-parallel step: put it
  first in a chain, `optax.chain(lo.replica_mean("data", jnp.int8,
  error_feedback=True), optax.adamw(3e-4))`, and give the step each
  replica's own gradients, under `jax.pmap(..., axis_name="data")` or
  `jax.shard_map` over a mesh axis of that name. The update of each
  floating leaf is its mean over the axis, cast back to the leaf's dtype;
  leaves that are not floating (integer or boolean updates) pass through
  unchanged.

  With `communication_dtype=None` it is one `jax.lax.pmean` of the floating
  leaves (bitwise the same). With a low-precision format the updates travel
  encoded, as DiLoCo's pseudo-gradients do: each replica flattens them into
  one float32 vector and encodes it in blocks of 256 values (a float32 scale
  per block, except bfloat16); an all-to-all hands replica $j$ shard $j$ of
  every replica's vector, which it decodes and averages in float32, encodes
  again, and an all-gather hands every shard to every replica. Every
  replica decodes the same bytes, so the mean is bitwise the same on all of
  them and data-parallel replicas stay identical. With $M$ replicas a
  replica's collectives carry $b (1 + 1/M)$ bytes per value plus the
  scales' $4/256 \cdot (1 + 1/M)$, for $b$ = 2 (bfloat16), 1 (float8, int8)
  or 0.5 (int4), against 4 for float32's all-reduce. A NaN or an Inf on any
  replica reaches every replica's mean as in float32 (each format keeps
  codes for them), and the rest of its block is not disturbed.

  Rounding to nearest, a value of a block whose largest finite $|x|$ is
  $a$ is off by at most $a / 252$ (int8), $a / 12$ (int4), $2^{-4} a$
  (float8_e4m3fn) or $2^{-8} |x|$ (bfloat16), once on each replica and once
  more for the mean. `error_feedback` keeps what was dropped and adds it to
  the next step's updates, so the errors do not accumulate.

  Args:
    axis_name: the mapped axis of the replicas (`jax.pmap`'s `axis_name`,
      or a mesh axis under `jax.shard_map`).
    communication_dtype: how the updates travel: None or `jnp.float32`
      (float32, one all-reduce), `jnp.bfloat16`, `jnp.float8_e4m3fn`,
      `jnp.int8` or `"int4"` (two values per byte).
    error_feedback: with a low-precision `communication_dtype`: each
      replica keeps what encoding dropped of its updates (and, times the
      number of replicas, of the shard of the mean it encoded) in
      `ReplicaMeanState.residuals`, and adds it to its next updates. 0
      where a value or the mean was not finite.

  Returns:
    An `optax.GradientTransformation` whose state is a `ReplicaMeanState`.

  Raises:
    TypeError: if `axis_name` is not a non-empty string or `error_feedback`
      is not a bool.
    ValueError: for an unsupported `communication_dtype`, for
      `error_feedback=True` in float32, and at the first update outside a
      mapped axis named `axis_name`.

  Example:
    Two replicas, one gradient each: the update is their mean on both.

    >>> import jax, jax.numpy as jnp, optax
    >>> import lookahead_optax as lo
    >>> tx = lo.replica_mean("data")
    >>> def mean(grads):
    ...   updates, _ = tx.update(grads, tx.init(grads))
    ...   return updates
    >>> grads = jnp.array([[1.0], [3.0]])  # replica 0's, replica 1's
    >>> print(jax.pmap(mean, axis_name="data", devices=jax.devices()[:2])(
    ...     grads))
    [[2.]
     [2.]]

    In int8 with error feedback, first in a chain. The mean of $[1, -0.5]$
    and $[3, 0.25]$ is $[2, -0.125]$. Replica 1 sends $0.25$ on its block's
    scale $3 / 126$ as $10 \cdot 3 / 126$, and the mean's block (scale
    $2 / 126$) rounds the average, $-0.1310$, to $-8 \cdot 2 / 126$: both
    replicas step by $[2, -0.12698]$.

    >>> tx = optax.chain(lo.replica_mean("data", jnp.int8,
    ...                                  error_feedback=True), optax.sgd(1.0))
    >>> def step(params, state, grads):
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> step = jax.pmap(step, axis_name="data", devices=jax.devices()[:2])
    >>> params = jnp.zeros((2, 2))
    >>> state = jax.pmap(tx.init, devices=jax.devices()[:2])(params)
    >>> grads = jnp.array([[1.0, -0.5], [3.0, 0.25]])
    >>> params, state = step(params, state, grads)
    >>> print(jnp.round(params, 5))  # to rounding (XLA may fuse the sum)
    [[-2.       0.12698]
     [-2.       0.12698]]
    >>> print(state[0].residuals[:, 1])
    [-0.0079  0.0119]

    Each replica keeps what its encoding dropped: replica 1,
    $0.25 - 10 \cdot 3 / 126$; replica 0, which averaged this shard, twice
    (2 replicas) $-0.1310 + 8 \cdot 2 / 126$. Both go into the next step's
    mean.
  """
  _arguments.check_replica_axis(axis_name)
  fmt, error_feedback = _arguments.check_wire(communication_dtype,
                                              error_feedback)

  def init_fn(params: optax.Params) -> ReplicaMeanState:
    if not error_feedback:
      return ReplicaMeanState(None)
    return ReplicaMeanState(jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

  def update_fn(updates: optax.Updates, state: ReplicaMeanState,
                params: Optional[optax.Params] = None
                ) -> tuple[optax.Updates, ReplicaMeanState]:
    del params
    _arguments.check_axis_bound(axis_name)
    if fmt is not None:
      _check_not_complex(updates)
    residuals = None
    if error_feedback:
      _checks.check_same_tree("updates", updates, state.residuals,
                              reference_name="the params given to `init`")
      residuals = jax.tree.leaves(state.residuals)
    leaves, treedef = jax.tree.flatten(updates)
    leaves, residuals = _mean(leaves, residuals, axis_name, fmt)
    if residuals is not None:
      state = ReplicaMeanState(jax.tree.unflatten(
          jax.tree.structure(state.residuals), residuals))
    return jax.tree.unflatten(treedef, leaves), state

  return optax.GradientTransformation(init_fn, update_fn)
