"""Scratch study: other ways to compile the sync, measured against the library.

Run ``python -m benchmarks.formulations [--n 10000000] [--rounds 9]``.

Every formulation implements ``lookahead(adam, k, alpha)`` with
``inner_state="keep"`` for float32 params and must land the params on the
slow weights bitwise at every sync; the script checks that before timing and
reports how far its trajectory is from the library's select mode (see
`exactness` for why formulations differ in the last bit). The findings are
summarised in docs/benchmarks.md ("Why select on CPU").

Formulations:

* ``lib select``: the library's branch-free select (fuses with the update).
* ``lib cond``: the library's `lax.cond` over the sync of (updates, slow).
* ``cond whole step``: `lax.cond` over the *whole* step, each branch running
  the inner update itself (so each branch fuses on its own; the updates are
  still materialised for `apply_updates` outside the conditional).
* ``select updates + cond slow``: the returned updates are selected
  branch-free (fused), only the slow-weight write is in a `lax.cond`.
* ``select updates + fori slow``: the slow-weight write is a
  `lax.fori_loop` with 0 or 1 trips (while loops update their carry in place).
* ``reset: lib select`` / ``reset: lib cond``: the library's
  ``inner_state="reset"``.
* ``reset: deferred (select)``: the reset of a sync is applied on the way into
  the next update instead (the step counter says a sync just happened), so it
  fuses into the moment update; params and slow weights are bitwise those of
  the library, only the inner state stored right after a sync differs (it is
  reset one call later).
"""

import argparse
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo
from benchmarks import common

K = 5
ALPHA = 0.5


class State(NamedTuple):
  inner_state: optax.OptState
  slow_params: optax.Params
  step: jax.Array


def _sync_leaf(p, u, s, alpha):
  # The library's blend (exact at alpha = 0 and 1), for a Python float alpha.
  fast = p + u
  if ALPHA < 0.5:
    target = s + alpha * (fast - s)
  else:
    target = fast + (alpha - 1) * (fast - s)
  new_u = target - p
  return new_u, p + new_u


def _param_shaped(x, params) -> bool:
  """Adam's moments: float leaves shaped like the (one-leaf) params."""
  leaves = jax.tree.leaves(params)
  return (len(leaves) == 1 and jnp.shape(x) == jnp.shape(leaves[0])
          and jnp.issubdtype(jnp.result_type(x), jnp.floating))


def _make(inner: optax.GradientTransformation, mode: str):
  """A lookahead(inner, K, ALPHA) compiled the way `mode` says."""

  def init(params):
    return State(inner.init(params),
                 jax.tree.map(lambda p: jnp.array(p, copy=True), params),
                 jnp.zeros([], jnp.int32))

  def update(grads, state, params):
    step = optax.safe_increment(state.step)
    flag = step % K == 0
    alpha = jnp.asarray(ALPHA, jnp.float32)

    if mode == "cond_whole":
      def plain(ops):
        g, inner_state, p, slow = ops
        u, new_inner = inner.update(g, inner_state, p)
        return u, new_inner, slow

      def sync(ops):
        g, inner_state, p, slow = ops
        u, new_inner = inner.update(g, inner_state, p)
        pairs = jax.tree.map(lambda a, b, c: _sync_leaf(a, b, c, alpha),
                             p, u, slow)
        new_u = jax.tree.map(lambda _, x: x[0], p, pairs)
        new_s = jax.tree.map(lambda _, x: x[1], p, pairs)
        return new_u, new_inner, new_s

      u, new_inner, new_slow = jax.lax.cond(
          flag, sync, plain,
          (grads, state.inner_state, params, state.slow_params))
      return u, State(new_inner, new_slow, step)

    inner_state = state.inner_state
    if mode == "deferred_reset":
      # inner_state="reset", deferred: the state stored after a sync still
      # holds the un-reset moments; the reset is applied on the way into the
      # next update (the step counter says a sync just happened), where it
      # fuses into the moment update instead of forcing copies.
      pending = (state.step % K == 0) & (state.step > 0)
      init_state = inner.init(params)
      inner_state = jax.tree.map(
          lambda x, i: jnp.where(pending, i.astype(x.dtype), x)
          if _param_shaped(x, params) else x, inner_state, init_state)
    u, new_inner = inner.update(grads, inner_state, params)
    pairs = jax.tree.map(lambda a, b, c: _sync_leaf(a, b, c, alpha),
                         params, u, state.slow_params)
    sync_u = jax.tree.map(lambda _, x: x[0], params, pairs)
    new_u = jax.tree.map(lambda a, b: jnp.where(flag, a, b), sync_u, u)
    if mode == "select_cond_slow":
      new_slow = jax.lax.cond(
          flag,
          lambda ops: jax.tree.map(lambda p, v: p + v, ops[0], ops[1]),
          lambda ops: ops[2],
          (params, new_u, state.slow_params))
    elif mode == "deferred_reset":
      # As the library: the slow weights are written from the selected update.
      new_slow = jax.tree.map(lambda p, v, s: jnp.where(flag, p + v, s),
                              params, new_u, state.slow_params)
    elif mode == "select_fori_slow":
      def body(_, slow):
        return jax.tree.map(lambda p, v, s: p + v, params, new_u, slow)
      new_slow = jax.lax.fori_loop(
          0, flag.astype(jnp.int32), body, state.slow_params)
    else:
      raise ValueError(mode)
    return new_u, State(new_inner, new_slow, step)

  return optax.GradientTransformation(init, update)


# name -> (make the transformation from the inner one, the library reference
# to compare with as lookahead kwargs).
_SELECT = dict(sync="select")
_RESET = dict(sync="select", inner_state="reset")
FORMULATIONS = {
    "lib select": lambda inner: lo.lookahead(inner, K, ALPHA, sync="select"),
    "lib cond": lambda inner: lo.lookahead(inner, K, ALPHA, sync="cond"),
    "cond whole step": lambda inner: _make(inner, "cond_whole"),
    "select updates + cond slow": lambda inner: _make(
        inner, "select_cond_slow"),
    "select updates + fori slow": lambda inner: _make(
        inner, "select_fori_slow"),
    "reset: lib select": lambda inner: lo.lookahead(inner, K, ALPHA, **_RESET),
    "reset: lib cond": lambda inner: lo.lookahead(
        inner, K, ALPHA, sync="cond", inner_state="reset"),
    "reset: deferred (select)": lambda inner: _make(inner, "deferred_reset"),
}
REFERENCES = {name: (_RESET if name.startswith("reset") else _SELECT)
              for name in FORMULATIONS}


def _trajectory(tx, jit: bool, n: int = 4099, steps: int = 3 * K + 2):
  params = common.one_leaf_params(n, seed=3)
  state = tx.init(params)
  f = common.optimizer_step(tx)
  f = jax.jit(f) if jit else f
  out = []
  for i in range(steps):
    g = common.one_leaf_params(n, seed=100 + i)
    params, state = f(params, state, g)
    out.append([np.asarray(x) for x in
                jax.tree.leaves((params, state.slow_params,
                                 state.inner_state))])
  return out


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for s, t in zip(a, b) for x, y in zip(s, t))


def _max_rel_diff(a, b) -> float:
  """max |a - b| relative to max |b| (0 for equal arrays)."""
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
  return diff / scale if scale else diff


def exactness(make_tx: Callable, reference: Optional[dict] = None) -> str:
  """Checks the exact sync and compares with the library.

  Asserts that, under jit, the params equal the slow weights bitwise after
  every sync. Then compares the whole trajectory (params, slow weights, inner
  state) with the library's jitted ``lookahead(..., **reference)`` (default
  ``sync="select"``): bitwise, or else the largest relative difference.
  Trajectories of different formulations may differ in the last bit because
  XLA on CPU contracts a multiply and an add into one FMA inside a fusion
  (e.g. ``p + x * (-lr)`` when the inner update fuses with
  `optax.apply_updates`, or Adam's moment updates), and where the fusions end
  depends on the formulation: a conditional ends them.

  Returns:
    "bitwise"; "params, slow bitwise; inner state differs after syncs only"
    (for the deferred reset, whose stored state is reset one call later); or
    the largest difference relative to each array's largest magnitude.
  """
  got = _trajectory(make_tx(optax.adam(1e-2)), jit=True)
  for t in range(K - 1, len(got), K):
    np.testing.assert_array_equal(got[t][0], got[t][1])
  ref = _trajectory(
      lo.lookahead(optax.adam(1e-2), K, ALPHA, **(reference or _SELECT)),
      jit=True)
  if _same(got, ref):
    return "bitwise"
  if (_same([s[:2] for s in got], [t[:2] for t in ref])
      and _same([s for i, s in enumerate(got) if (i + 1) % K],
                [t for i, t in enumerate(ref) if (i + 1) % K])):
    return "params, slow bitwise; inner state differs after syncs only"
  rel = max(_max_rel_diff(x, y) for s, t in zip(got, ref)
            for x, y in zip(s, t) if x.dtype == np.float32)
  return f"max rel. diff {rel:.1e}"


def run(n: int = 10_000_000, rounds: int = 9, layout: str = "leaf",
        donate: bool = True, log=print) -> list:
  """Times adam and every formulation; returns rows (dicts)."""
  variants = []
  grads = common.make_params(layout, n, seed=1)

  def variant(name, tx):
    def init():
      params = common.make_params(layout, n, seed=0)
      return params, tx.init(params), grads
    return common.Variant(name, common.optimizer_step(tx), init, donate)

  variants.append(variant("adam", optax.adam(1e-3)))
  exact = {"adam": "-"}
  for name, make in FORMULATIONS.items():
    matches = exact[name] = exactness(make, REFERENCES[name])
    log(f"  {name}: exact sync; vs library: {matches}")
    variants.append(variant(name, make(optax.adam(1e-3))))
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=K, warmup_steps=2 * K,
      baseline="adam", min_block_s=0.1)
  rows = []
  for t in timings:
    rows.append(dict(name=t.name, median_ms=t.median_s * 1e3, ratio=t.ratio,
                     temp=t.memory.get("temp"), exact=exact[t.name],
                     layout=layout,
                     n=common.tree_size(grads), donate=donate))
    log(f"  {t.name:30s} {t.median_s * 1e3:8.2f} ms  x{t.ratio:.3f}  "
        f"temp {common.fmt_mb(t.memory.get('temp'))} MB")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000_000)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--layout", default="leaf", choices=("leaf", "tree"))
  parser.add_argument("--no-donate", action="store_true")
  args = parser.parse_args()
  run(args.n, args.rounds, args.layout, not args.no_donate)


if __name__ == "__main__":
  main()
