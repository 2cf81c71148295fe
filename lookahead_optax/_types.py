"""The states of `lookahead`."""

from typing import Any, NamedTuple

import jax
import optax


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
      `slow_step_size` is a schedule, else `optax.EmptyState()`. For
      `diloco`, a `StreamingState` holding one outer state per fragment.
    cycle_rows: with `rows_per_step`, a `CycleRows` per row-sparse table
      (the rows it was updated in during this cycle; `optax.MaskedNode()` at
      other leaves), else None.
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


class CycleRows(NamedTuple):
  """The rows a row-sparse table was updated in during the current cycle.

  Kept by `lookahead(..., rows_per_step=)` for each such table, so that a sync
  touches only these rows. A row's slot is where its id was last written
  this cycle: with `owner`, a sync finds each distinct row once (the slots
  `i` with `owner[ids[i]] == i`) in O(sync_period * N), with no sort.

  Attributes:
    ids: `(sync_period * N,)` int32, the ids each step of the cycle brought
      (step `j` of the cycle writes slots `j * N` to `j * N + N - 1`); the
      table's row count V (out of range, ignored) where a step brought an
      out-of-range id and before the first cycle is complete.
    owner: `(V,)` int32, for each row the slot of `ids` it was last written
      to (only read for rows written in this cycle; -1 for rows never
      written).
  """

  ids: jax.Array
  owner: jax.Array


class StreamingState(NamedTuple):
  """The `outer_state` of `diloco` (one fragment, or Streaming DiLoCo's P).

  Attributes:
    outer_states: one outer state per fragment (a tuple of P, one with
      `fragments=None`): the outer transformation's state initialised on
      that fragment's slow weights alone (`optax.MaskedNode()` at the other
      leaves). A fragment's state moves only at its own syncs. With
      `fragments="slices"`, a 1-tuple: the outer state of each of the
      `sync_period` slices (initialised on the slice's values, leaves of
      shape `(m,)`), stacked along a leading axis of `sync_period`.
    residuals: with `error_feedback=True`, per params leaf the part of this
      replica's pseudo-gradient that encoding dropped at the fragment's last
      sync (float32, or the slow weights' compute dtype), added to its next
      pseudo-gradient; else None.
    counts: a `ReplicaCounts`: the syncs skipped for want of a quorum and
      the replicas that sat out (see `diloco`'s `weight`).
  """

  outer_states: tuple
  residuals: Any = None
  counts: Any = None
