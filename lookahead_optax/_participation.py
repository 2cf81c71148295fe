"""Replicas that sit out a sync: weighted means and a quorum (`diloco`).

`tx.update(grads, state, params, weight=w)` gives this replica a weight for
the coming sync (a float32 scalar, e.g. the tokens it trained on since the
last one; read at sync steps only). A fragment's sync then averages
$\\sum_m w_m \\Delta_m / \\sum_m w_m$ instead of the plain mean (`vote`:
one float32 scalar per replica all-gathered, then the pseudo-gradients times
their weights through the usual wire format, divided by the weights' sum). A
replica with weight 0 (or a negative or non-finite weight) sits out: it
sends zeros, keeps its error-feedback buffer, and lands on the new slow
weights with the others. With fewer than `min_replicas` replicas of nonzero
weight the sync is skipped (`settle`): the slow weights, the outer state and
the buffers stay, and every replica lands back on the slow weights.
`ReplicaCounts` in the state counts both.

Without `weight`, none of this is traced: the program is plain DiLoCo's.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lookahead_optax import _checks
from lookahead_optax import _policies
from lookahead_optax import _replicas


class ReplicaCounts(NamedTuple):
  """What happened at `diloco`'s syncs, for a training loop to log.

  The same on every replica; they move only at syncs of steps given a
  `weight` (without weights every replica counts and no sync is skipped).

  Attributes:
    skipped_syncs: int32, the fragment syncs skipped because fewer than
      `min_replicas` replicas had a nonzero weight.
    sat_out: int32, the replicas that sat out (weight 0), summed over the
      fragment syncs so far.
    sat_out_last: int32, the replicas that sat out the last fragment sync.
    disagreed: int32, with `check_replicas`: the fragment syncs after which
      the replicas' slow weights or outer state differed (before repair).
    repaired: int32, with `check_replicas="repair"`: the leaves repaired,
      summed over the syncs.
  """

  skipped_syncs: jax.Array
  sat_out: jax.Array
  sat_out_last: jax.Array
  disagreed: jax.Array
  repaired: jax.Array


def init_counts() -> ReplicaCounts:
  zero = lambda: jnp.zeros([], jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
  return ReplicaCounts(zero(), zero(), zero(), zero(), zero())


class Vote(NamedTuple):
  """One sync's participation, from the replicas' weights."""

  use: jax.Array  # bool: this replica's pseudo-gradient counts
  weight: jax.Array  # float32: its weight, 0 where it sits out
  total: jax.Array  # float32: the weights' sum over the replicas
  count: jax.Array  # int32: the replicas with a nonzero weight
  ok: jax.Array  # bool: a quorum (count >= min_replicas)


def check_weight(weight: Any) -> jax.Array:
  """`weight` as a float32 scalar; concrete values must be finite and >= 0.

  Raises:
    TypeError, ValueError: naming `weight`.
  """
  if _checks.is_traced(weight):
    if weight.ndim or not jnp.issubdtype(weight.dtype, jnp.number):
      raise TypeError(
          "`weight` must be a real scalar per replica (a float32 weight for "
          f"the coming sync), got {weight.dtype}{list(weight.shape)}.")
    return weight.astype(jnp.float32)
  array = np.asarray(weight)
  if array.ndim or not (np.issubdtype(array.dtype, np.number)
                        and not np.iscomplexobj(array)) or array.dtype == bool:
    raise TypeError(
        "`weight` must be a real scalar per replica (a float32 weight for the "
        f"coming sync), got {weight!r}.")
  if not np.isfinite(array) or array < 0:
    raise ValueError(
        f"`weight` must be a finite number >= 0 (0: sit out the sync), got "
        f"{weight!r}.")
  return jnp.asarray(array, jnp.float32)


def rolled_back(bad: jax.Array, params: Any, inner_updates: Any, slow: Any,
                weight: Optional[jax.Array]) -> tuple[Any, jax.Array]:
  """`on_nonfinite="rollback"` on a replica: back to the slow weights.

  Where this replica's inner step is not finite (`bad`), its update sends
  the params back to the slow weights (so its fast weights are the slow
  weights, and its pseudo-gradient is finite) and it sits out a sync of
  this step (weight 0); the other replicas are not touched. Returns the
  updates and the weight.
  """
  updates = _policies.rollback(bad, params, inner_updates, slow,
                               inner_updates)
  weight = jnp.ones([], jnp.float32) if weight is None else weight
  return updates, jnp.where(bad, jnp.zeros([], jnp.float32), weight)


def check_min_replicas(min_replicas: int, axis_name: str) -> None:
  """At the first update: `min_replicas` <= the number of replicas."""
  replicas = jax.lax.axis_size(axis_name)
  if min_replicas > replicas:
    raise ValueError(
        f"`min_replicas={min_replicas}` is more than the {replicas} replicas "
        f"of axis {axis_name!r}: no sync could ever take place. Use a number "
        f"in [1, {replicas}].")


def vote(weight: jax.Array, axis_name: str, min_replicas: int) -> Vote:
  """The participation of a sync: one float32 scalar per replica gathered.

  Every replica sums the same gathered weights in the same order and counts
  the nonzero ones, so `total` and `count` are bitwise the same on all of
  them. A traced weight that is negative or not finite sits out.
  """
  use = jnp.isfinite(weight) & (weight > 0)
  weight = jnp.where(use, weight, 0.0)
  weights = jax.lax.all_gather(weight, axis_name)  # (replicas,)
  count = jnp.sum(weights > 0).astype(jnp.int32)
  return Vote(use, weight, jnp.sum(weights), count, count >= min_replicas)


def messages(delta: list, residual: Optional[list], v: Vote) -> list:
  """What this replica sends: `w * delta` (plus its buffer), or zeros."""
  def message(d, r):
    sent = v.weight.astype(d.dtype) * d + (0 if r is None else r)
    return jnp.where(v.use, sent, jnp.zeros((), d.dtype))
  return [message(d, None if residual is None else r)
          for d, r in zip(delta, residual or [None] * len(delta))]


def settle(v: Vote, synced: tuple, kept: tuple, residual: Optional[list],
           dropped: Optional[list]) -> tuple:
  """The sync's results where there was a quorum, else the old ones.

  `synced` and `kept` are `(slow weights, outer state)`; the buffers
  become what encoding dropped only on a replica that sent.
  """
  pick = lambda a, b: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda x, y: jnp.where(v.ok, x, y), a, b)
  slow, outer_state = pick(synced, kept)
  if residual is not None:
    residual = [jnp.where(v.ok & v.use, d, r)
                for d, r in zip(dropped, residual)]
  return slow, outer_state, residual


def counted(counts: ReplicaCounts, v: Vote, axis_name: str) -> ReplicaCounts:
  """`counts` after one fragment sync of this vote."""
  sat_out = (jax.lax.axis_size(axis_name) - v.count).astype(jnp.int32)
  # Typed per replica like the count it replaces (`shard_map`): + 0 * old.
  sat_out = sat_out + 0 * counts.sat_out_last
  return counts._replace(
      skipped_syncs=counts.skipped_syncs + (~v.ok).astype(jnp.int32),
      sat_out=counts.sat_out + sat_out, sat_out_last=sat_out)


def checked(tree: Any, counts: ReplicaCounts, axis_name: str, mode: str
            ) -> tuple[Any, ReplicaCounts]:
  """`check_replicas`: `tree` checked (and with "repair", made to agree)."""
  tree, agree, _, repaired = _replicas.majority(tree, axis_name,
                                                mode == "repair")
  return tree, counts._replace(
      disagreed=counts.disagreed + (~agree).astype(jnp.int32),
      repaired=counts.repaired + repaired)
