"""The `"loop"` formulation: policies and outer step in loops run once.

`sync="loop"` (what `sync="auto"` picks on a single CPU device for options
other than the defaults) computes the same sync as `"select"` but moves two
pieces into loops that run once on the steps that need them and not at all
on the others, updating the state in place:

* the inner-state policy (and the rollback's reset), after the params' pass
  (`in_place`);
* with `outer`, when the inner update is cheap to compute again
  (`_formulation.recompute_is_cheap`), the outer step (`loop_outer_step`),
  which leaves the targets in the slow weights' buffers; the inner state is
  then taken from a second pass of the inner update (`loop_inner_state`).

It was tuned for XLA:CPU, which has no multi-output fusion, copies what a
conditional carries, and makes a select copy the old state; its loops are
ordered after the params' pass by reading one element of the new params, a
scalar all-reduce when the params are sharded over devices. This is the only
module that uses `_steering`'s dependences (see there for what keeps them
working, and the test that fails when XLA stops honouring them).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _policies
from lookahead_optax import _steering
from lookahead_optax import _sync


def _identity(x: Any) -> Any:
  return x


class Loop:
  """`"loop"`: the select, with the policies and outer step in loops.

  Chosen once per trace by `_formulation.choose`, which decides whether the
  inner update may be computed again (`recompute`).
  """

  name = "loop"

  def __init__(self, opts: Any, select: Any, *, recompute: bool, state: Any):
    self._opts = opts
    self._select = select
    self.recompute = recompute
    self.needs_param_shaped = opts.outer is not None and recompute
    self.outer_looped = (
        opts.outer is not None and recompute
        and targets_fit(state.slow_params)
        and outer_keeps_types(opts.outer, state.outer_state,
                              state.slow_params))

  def inner_step(self, opts: Any, grads: Any, current: Any, params: Any,
                 extra_args: dict) -> tuple[Any, Any, Optional[jax.Array]]:
    """The inner step; with `recompute`, checked first by a pass of its own.

    The check (`nonfinite_step`) then fuses each leaf's inner update into
    its reduction, and the inner step's passes follow it
    (`_steering.after`), as the check reads the old inner state.
    """
    if opts.on_nonfinite != "rollback" or not self.recompute:
      return self._select.inner_step(opts, grads, current, params,
                                     extra_args)
    bad = nonfinite_step(opts.inner, grads, current, params, extra_args)
    return (*opts.inner.update(_steering.after(bad, grads), current, params,
                               **extra_args), bad)

  def sync(self, s: Any, pieces: Any, carry: _sync.Carry) -> _sync.Carry:
    """The sync where `s.is_sync`, the rollback and the policy in loops."""
    if self.outer_looped:
      return self._looped_outer(s, pieces, carry)
    out = self._select.sync(
        s, pieces._replace(policy=_identity, reset=_identity), carry)
    if s.param_shaped is None:  # keep, no rollback: nothing changes
      return pieces.policy(out)
    # In place, after the params' pass, which reads the inner state as the
    # inner step left it (see `_steering.never`).
    inner_state, synced = in_place(
        self._opts.inner_state, s.param_shaped, s.is_sync, s.bad,
        _steering.never(s.params, out.updates), s.new_inner, s.synced,
        s.inner_init, _sync.alpha_of(self._opts, carry.outer_state))
    return out._replace(inner_state=inner_state, synced_inner=synced)

  def _looped_outer(self, s: Any, pieces: Any,
                    carry: _sync.Carry) -> _sync.Carry:
    """The sync with the outer step in its loop (`loop_outer_step`)."""
    updates, held, outer_state = loop_outer_step(
        self._opts, s, carry.slow, carry.outer_state)
    updates = pieces.rollback(updates)
    slow = _sync.tree_select(s.is_sync, pieces.store(updates, held, held),
                             held)
    return _sync.Carry(updates, slow, outer_state,
                       loop_inner_state(self._opts, s, updates), s.synced)


def nonfinite_step(inner: Any, grads: Any, state: Any, params: Any,
                   extra_args: dict) -> jax.Array:
  """Whether `inner`'s step from `state` is not finite (`is_nonfinite`).

  The step is computed here for the check alone (the caller computes it
  again, `_steering.after` the check): XLA then fuses each leaf's inner
  update into the reduction that reads it, instead of keeping every leaf's
  update in a temporary buffer until the whole tree is checked (a fresh,
  page-faulted buffer as large as the params at every step).
  """
  updates, _ = inner.update(grads, state, params, **extra_args)
  return _policies.is_nonfinite(params, updates)


def in_place(policy: str, param_shaped: Any, is_sync: jax.Array,
             bad: Optional[jax.Array], order: jax.Array, inner_state: Any,
             synced: Any, init: Any, alpha: Optional[jax.Array]
             ) -> tuple[Any, Any]:
  """The inner state (and its synced copy) after the policies, in place.

  A loop that runs once on steps where the policy changes the state (a
  sync with "reset" or "pullback", a rolled-back step) and not at all on
  the others, so that those cost nothing; `order` (always False, see
  `_steering.never`) makes XLA run it after the pass that computes the new
  params, which reads `inner_state`, so it needs no copy of it.
  """
  changes = bad if bad is not None else jnp.zeros([], bool)
  if policy != "keep":
    changes = changes | is_sync

  def body(c, init):
    state, synced_ = c
    out, synced_out = _policies.at_sync(policy, param_shaped, state, synced_,
                                        init, alpha)
    if policy == "pullback":
      out, synced_out = _steering.twin(out)
    if bad is not None:
      if policy != "keep":
        out = _sync.tree_select(is_sync, out, state)
        if synced_ is not None:
          synced_out = _sync.tree_select(is_sync, synced_out, synced_)
      out = _policies.reset_where(bad, param_shaped, out, init)
    return out, synced_out

  def run(i, c):
    fresh = None if init is None else param_shaped.map(
        lambda x, v: _steering.fresh(x, v, i), c[0], init)
    return _same_types(body(c, fresh), c)

  return jax.lax.fori_loop(0, (changes | order).astype(jnp.int32), run,
                           (inner_state, synced))


def loop_outer_step(opts: Any, s: Any, slow: Any, outer_state: Any
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
                              outer=opts.outer, alpha=None)

  held, outer_state = loop_targets(s.is_sync, targets_fn, slow, outer_state)
  updates = jax.tree.map(
      lambda p, u, t: jnp.where(s.is_sync, _sync.landing_update(p, u, t, t),
                                u),
      s.params, s.inner_updates, held)
  return updates, held, outer_state


def loop_inner_state(opts: Any, s: Any, updates: Any) -> Any:
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


def targets_fit(slow: Any) -> bool:
  """Whether the slow weights' buffers can hold the targets (compute dtype)."""
  return all(jnp.result_type(s) == _sync.compute_dtype(s)
             for s in jax.tree.leaves(slow))


def outer_keeps_types(outer: optax.GradientTransformation, outer_state: Any,
                      slow: Any) -> bool:
  """Whether `outer.update` on a pseudo-gradient keeps its state's types.

  Traced on the shapes only; an `outer` that fails here fails in the real
  step with the same arguments.
  """
  delta = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(jnp.shape(s), _sync.compute_dtype(s)),
      slow)
  _, new = jax.eval_shape(outer.update, delta, outer_state, delta)
  old = jax.eval_shape(lambda x: x, outer_state)
  return jax.tree.structure(new) == jax.tree.structure(old) and all(
      a.shape == b.shape and a.dtype == b.dtype
      for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


def _same_types(new: Any, old: Any) -> Any:
  return jax.tree.map(
      lambda n, o: jax.lax.convert_element_type(n, jnp.result_type(o)),
      new, old)


def loop_targets(flag: jax.Array, targets_fn: Callable[..., Any], slow: Any,
                 outer_state: Any) -> tuple[Any, Any]:
  """The targets and new outer state where `flag`, else `slow` and its state.

  A loop that runs once where `flag` and not at all otherwise: it updates
  the slow weights' and the outer state's buffers in place (XLA:CPU copies
  what a conditional carries), so a step without a sync does no sync work.
  `targets_fn(i, slow, outer_state)` gets the loop index to make what it
  recomputes loop-variant.
  """
  def body(i, c):
    targets, new_outer = targets_fn(i, *c)
    return _same_types(targets, c[0]), _same_types(new_outer, c[1])
  return jax.lax.fori_loop(0, flag.astype(jnp.int32), body,
                           (slow, outer_state))
