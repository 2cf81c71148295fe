"""Steering XLA:CPU's scheduling with data dependences that change nothing.

Used by the `"loop"` formulation only (`_loop`, the only module that imports
this one), which `sync="auto"` picks on a single CPU device and nowhere else.

The mechanism, once. XLA:CPU has no multi-output fusion: each output of a
step is a fusion of its own that recomputes the cheap elementwise work it
needs. Copy insertion orders the passes of a step by their data dependences
alone, so when a donated buffer (the old inner state) is read by one pass and
overwritten in place by another, XLA must either run the reader first, which
it knows only if the writer depends on the reader's result, or copy the old
state. A loop body that reads only loop-invariant values is hoisted out of
the loop and runs on every step. Each helper here adds a dependence that XLA
does not see through and that changes no value: a flag that is always False
but is computed from the data, `(x != x) & (x == x)` on one element, or a
loop index compared with 0 (`i < 0`, never true), selected with `jnp.where`
so the values stay bitwise the same. `(x != x) & (x == x)` is False for
every float, NaN included (a NaN makes the first term True and the second
False), so a simplifier is free to fold it to False; nothing in IEEE
semantics keeps it. What keeps it is that XLA's algebraic simplifier does not
fold it today (nor `i < 0` on a loop index), and the test named below,
which notices when it starts to.

* `never(params, updates)`: False, after every new params leaf: a pass
  that depends on it runs after the params' pass (`_loop.in_place`).
* `after(flag, tree)`: `tree`, after the scalar `flag`: the inner step's
  passes run after the rollback's finiteness check, which reads the old
  state (`_loop.Loop.inner_step`).
* `reread(...)`: the inner state again, after the new params: a second
  inner pass for the state only, ordered after the params' pass
  (`_loop.loop_inner_state`).
* `loop_variant(tree, i)` and `fresh(x, value, i)`: loop-variant copies, so
  that what a one-trip loop computes is computed in it, not hoisted out
  (`_loop.loop_outer_step`, `_loop.in_place`).
* `twin(tree)`: a second copy of a tree in buffers of its own without a
  copy instruction (XLA:CPU's copies of large arrays map fresh buffers).

What fails if XLA stops honouring them (it would simplify a flag, reorder,
or hoist): on CPU, `tests/test_formulations.py::
test_loop_keeps_no_update_sized_temporary`, which bounds the temporary
memory of a compiled `"loop"` step for reset, pullback, rollback and SNOO
(the copies and buffers these helpers avoid are params-sized); the values
never change, so no other test can notice. On GPU and TPU none of this is
used: `auto` picks `"select"` or `"cond"` there.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp


def _never(landed: jax.Array) -> Optional[jax.Array]:
  """A flag that is always False but that XLA must read `landed` to get."""
  if not jnp.issubdtype(jnp.result_type(landed), jnp.inexact) or (
      jnp.size(landed) == 0):
    return None
  first = jnp.ravel(landed)[0]
  return (first != first) & (first == first)


def never(params: Any, updates: Any) -> jax.Array:
  """Always False, but XLA must compute every new params leaf to get it."""
  flags = [_never(jnp.asarray(p + u).astype(jnp.result_type(p)))
           for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates))]
  flags = [f for f in flags if f is not None]
  if not flags:
    return jnp.zeros([], bool)
  return jnp.any(jnp.stack(flags))


def twin(tree: Any) -> tuple[Any, Any]:
  """`(tree, tree)`, the second one in buffers of its own, without a copy."""
  def again(x):
    if not isinstance(x, jax.Array) or jnp.size(x) == 0 or not jnp.issubdtype(
        jnp.result_type(x), jnp.inexact):
      return x
    return jnp.where(_never(x), jnp.zeros_like(x), x)
  return tree, jax.tree.map(again, tree)


def _depend_on(off: jax.Array, tree: Any) -> Any:
  """`tree` with its floating leaves made to depend on `off` (always False)."""
  def vary(x):
    if not isinstance(x, jax.Array) or not jnp.issubdtype(
        jnp.result_type(x), jnp.inexact):
      return x
    return jnp.where(off, jnp.zeros_like(x), x)
  return jax.tree.map(vary, tree)


def loop_variant(tree: Any, i: jax.Array) -> Any:
  """`tree`, its floating leaves made to depend on a loop index `i` >= 0."""
  return _depend_on(i < 0, tree)


def fresh(x: jax.Array, value: Any, i: jax.Array) -> jax.Array:
  """`value` in `x`'s dtype, written by a pass that depends on `x` and `i`.

  So that XLA writes each initial value into its buffer in a fused pass
  inside the loop instead of copying one shared hoisted constant.
  """
  return jnp.where(i < 0, x, jnp.asarray(value, dtype=x.dtype))


def after(flag: jax.Array, tree: Any) -> Any:
  """`tree`, its floating leaves made to depend on the scalar `flag`."""
  f = flag.astype(jnp.float32)
  return _depend_on((f != f) & (f == f), tree)


def reread(param_shaped: Any, state: Any, params: Any, updates: Any) -> Any:
  """`state` again, its parameter-shaped leaves made to follow the new params.

  The value is `state`'s (bitwise); to XLA each parameter-shaped leaf
  depends on one element of the new params `params + updates` of its param.
  """
  landed = jax.tree.map(
      lambda p, u: jnp.asarray(p + u).astype(jnp.result_type(p)),
      params, updates)
  nevers = [_never(x) for x in jax.tree.leaves(landed)]
  return param_shaped.map_per_param(
      lambda nv, x: jnp.where(nv, jnp.zeros_like(x), x), nevers, state)
