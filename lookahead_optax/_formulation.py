"""How a sync is compiled: the formulations, and where `sync="auto"` is decided.

`lookahead(..., sync=)` names one of three formulations of the same sync.
A formulation is an object chosen once per trace (`choose`); `_step` hands
it the pieces of a sync (`Pieces`: the outer step, the inner-state policy,
the rollback and the store, each per-leaf arithmetic of `_sync` and
`_policies`) and it decides where each runs:

* `"select"` (`Select`): computed branch-free at every step and selected on
  sync steps. The default options fuse into the inner update's pass over
  the params, on every backend; nothing is recomputed.
* `"cond"` (`Cond`): the sync in a `jax.lax.cond`, computed on sync steps
  only. (`diloco`'s collectives sit in conditionals of their own, see
  `_streaming`; its inner step takes this formulation.)
* `"loop"` (`_loop.Loop`): the inner-state policy and the outer step in
  loops that run once on the steps that need them and not at all on the
  others, updating the state in place; tuned for XLA:CPU. Everything it
  needs to steer XLA is in `_loop` (and its helpers in `_steering`).

Every formulation applies the outer step and the inner-state policy once
per update (traced once), and stores the slow weights with `_sync.store`.

`"auto"` is resolved when the step is traced, never when the optimizer is
built (building it must not start the JAX backend, so that a multi-host
program can build its optimizer before `jax.distributed.initialize()`):

* the default options (keep, propagate, no `outer`) -> `"select"`;
* otherwise `"loop"` on a single CPU device, `"select"` elsewhere (several
  devices, and every accelerator: `"loop"` was timed on XLA:CPU only; the
  select is what XLA's cost analysis gives the least memory traffic off CPU,
  `docs/benchmarks.md`).

Under `"loop"` two stages may compute the inner update a second time, which
XLA then fuses into the pass that needs it instead of keeping a params-sized
buffer: the rollback's finiteness check and the outer step's loop. That pays
for an elementwise inner optimizer (Adam: a few cheap passes) and doubles
the cost of one built on matrix products (Muon). `recompute_is_cheap` decides
it from the inner update's own jaxpr: only when it has no matrix product,
convolution, decomposition, loop or callback; an inner optimizer it cannot
inspect is computed once.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.extend
import jax.numpy as jnp

from lookahead_optax import _loop
from lookahead_optax import _policies
from lookahead_optax import _sync

SYNC_MODES = ("auto", "select", "cond", "loop")

# Primitives whose cost is not a few elementwise passes over their operands.
_COSTLY_PRIMITIVES = frozenset({
    "dot_general", "conv_general_dilated", "fft", "cholesky",
    "triangular_solve", "eig", "eigh", "svd", "qr", "lu", "lu_pivots_to_permutation",
    "householder_product", "schur", "hessenberg", "tridiagonal",
    "tridiagonal_solve", "while", "scan", "pure_callback", "io_callback",
    "callback", "custom_call", "ragged_dot", "ragged_dot_general",
})


def resolve(sync: str, *, default_options: bool) -> str:
  """The formulation of `sync` for the step being traced (see module doc)."""
  if sync != "auto":
    return sync
  if default_options:
    return "select"
  single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  return "loop" if single_cpu else "select"


def _sub_jaxprs(eqn: Any) -> list:
  """The jaxprs nested in an equation's parameters (cond branches, calls)."""
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jax.extend.core.Jaxpr):
        found.append(item)
  return found


def _has_costly(jaxpr: Any) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _COSTLY_PRIMITIVES:
      return True
    if any(_has_costly(sub) for sub in _sub_jaxprs(eqn)):
      return True
  return False


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def recompute_is_cheap(inner: Any, grads: Any, state: Any, params: Any,
                       extra_args: dict) -> bool:
  """Whether computing `inner.update` twice costs only elementwise passes.

  Traces `inner.update` on the step's shapes (tracing only: nothing is
  computed) and looks for a costly primitive in its jaxpr, nested jaxprs
  (conditionals, calls, custom derivatives) included.
  """
  closed = jax.make_jaxpr(
      lambda g, s, p: inner.update(g, s, p, **extra_args))(
          *_abstract((grads, state, params)))
  return not _has_costly(closed.jaxpr)


class Pieces(NamedTuple):
  """The pieces of one sync, each applied once; a formulation places them.

  Attributes:
    outer: `Carry -> Carry`, the outer step and the landing: the updates
      that send the params to the new slow weights, in `targets`.
    policy: `Carry -> Carry`, the inner-state policy at a sync.
    rollback: `updates -> updates`, back to the slow weights where the step
      is not finite (identity without `on_nonfinite="rollback"`).
    reset: `inner_state -> inner_state`, the inner state reset where the
      step is not finite (identity without rollback).
    store: `(updates, targets, slow) -> slow`, the slow weights to store
      from the updates the step returns (`_sync.store`).
  """

  outer: Callable[[_sync.Carry], _sync.Carry]
  policy: Callable[[_sync.Carry], _sync.Carry]
  rollback: Callable[[Any], Any]
  reset: Callable[[Any], Any]
  store: Callable[[Any, Any, Any], Any]


def _rolled_back(pieces: Pieces, carry: _sync.Carry) -> _sync.Carry:
  return carry._replace(updates=pieces.rollback(carry.updates),
                        inner_state=pieces.reset(carry.inner_state))


class _Formulation:
  """What the formulations share: the inner step, checked once."""

  name = ""
  needs_param_shaped = False  # no leaves of the inner state of their own

  def inner_step(self, opts: Any, grads: Any, current: Any, params: Any,
                 extra_args: dict) -> tuple[Any, Any, Optional[jax.Array]]:
    """The inner update, its state and the rollback's flag (or None)."""
    return _policies.checked_step(opts.inner, grads, current, params,
                                  extra_args, opts.on_nonfinite == "rollback")


class Select(_Formulation):
  """`"select"`: the sync at every step, chosen where it syncs (no branch)."""

  name = "select"

  def sync(self, s: Any, pieces: Pieces, carry: _sync.Carry) -> _sync.Carry:
    """The sync where `s.is_sync`, the rollback, then the store.

    The slow weights are stored from the updates returned, which XLA reads
    from the new params, so that the store follows the params' pass.
    """
    out = pieces.policy(pieces.outer(carry))
    chosen = _sync.tree_select(s.is_sync, out._replace(slow=carry.slow,
                                                       targets=None), carry)
    chosen = _rolled_back(pieces, chosen)
    return chosen._replace(slow=_sync.tree_select(
        s.is_sync, pieces.store(chosen.updates, out.targets, carry.slow),
        carry.slow))


class Cond(_Formulation):
  """`"cond"`: the sync, stored, in a `jax.lax.cond` (skipped elsewhere)."""

  name = "cond"

  def sync(self, s: Any, pieces: Pieces, carry: _sync.Carry) -> _sync.Carry:
    """The sync where `s.is_sync`, in a conditional, then the rollback."""
    def synced(c):
      out = pieces.policy(pieces.outer(c))
      return out._replace(slow=pieces.store(out.updates, out.targets, c.slow),
                          targets=None)
    return _rolled_back(
        pieces, jax.lax.cond(s.is_sync, synced, lambda c: c, carry))


def choose(opts: Any, grads: Any, current: Any, params: Any,
           extra_args: dict, state: Any) -> Any:
  """The formulation object for the step being traced (see module doc)."""
  name = resolve(opts.sync,
                 default_options=(opts.inner_state == "keep"
                                  and opts.outer is None
                                  and opts.on_nonfinite == "propagate"))
  if name == "select":
    return Select()
  if name == "cond":
    return Cond()
  recompute = ((opts.on_nonfinite == "rollback" or opts.outer is not None)
               and recompute_is_cheap(opts.inner, grads, current, params,
                                      extra_args))
  return _loop.Loop(opts, Select(), recompute=recompute, state=state)
