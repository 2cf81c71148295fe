"""Helpers shared by the test suite: bitwise comparison, float64 mode, ulps.

One bitwise-equality helper for every test: it compares the raw bits of the
arrays, so that 0.0 and -0.0 differ, NaN equals a NaN with the same payload,
and the dtypes must agree. `np.testing.assert_array_equal` does neither (it
treats 0.0 == -0.0 and any NaN == NaN).
"""

import contextlib
from typing import Any, Optional

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import lookahead_optax as lo


def bits(x: Any) -> np.ndarray:
  """The raw bits of an array (as unsigned integers of the same width)."""
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_bitwise(actual: Any, expected: Any, msg: str = "") -> None:
  """Asserts that two arrays have the same dtype, shape and bits."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype, (
      f"{msg} dtype {actual.dtype} != {expected.dtype}")
  assert actual.shape == expected.shape, (
      f"{msg} shape {actual.shape} != {expected.shape}")
  np.testing.assert_array_equal(bits(actual), bits(expected), err_msg=msg)


def assert_tree_bitwise(actual: Any, expected: Any, msg: str = "") -> None:
  """Asserts that two pytrees have the same structure and leaf bits."""
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  for i, (a, e) in enumerate(zip(flat_a, flat_e)):
    assert_bitwise(a, e, f"{msg} leaf {i}")


def same_bits(a: Any, b: Any) -> bool:
  """Whether two arrays are bitwise equal (same dtype, shape and bits)."""
  a, b = np.asarray(a), np.asarray(b)
  return (a.dtype == b.dtype and a.shape == b.shape
          and np.array_equal(bits(a), bits(b)))


def x64_if(dtype: Any):
  """`jax.enable_x64(True)` for float64, else a no-op context."""
  if jnp.dtype(dtype) == jnp.float64:
    return jax.enable_x64(True)
  return contextlib.nullcontext()


def ulp(x: Any, dtype: Any) -> np.ndarray:
  """The spacing of `dtype` floats at magnitude |x|, as float64."""
  finfo = jnp.finfo(dtype)
  x = np.maximum(np.abs(np.asarray(x, np.float64)), float(finfo.tiny))
  return 2.0 ** (np.floor(np.log2(x)) - finfo.nmant)


def _float_leaves(tree: Any) -> list:
  """`(path, kind, array)` of every leaf, `kind` its last named field."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path, _kind(path), np.asarray(x)) for path, x in flat]


def _kind(path: Any) -> str:
  """The last named field on a leaf's path (`mu`, `slow_params`), or ""."""
  names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else ""


ULP_SCALES = ("element", "leaf", "kind")


def assert_tree_within_ulps(actual: Any, expected: Any, n: int,
                            scale: str = "element", floor: Any = 0.0,
                            msg: str = "") -> None:
  """Asserts leafwise |actual - expected| <= n ulps, at an explicit scale.

  The one ulp comparison of the tests: two programs that round the same
  arithmetic differently (an FMA in one, a multiply and an add in the other)
  differ by a rounding of an operand, a fraction of an ulp at the scale of
  the operands, but many ulps of a result that cancels (a moment whose
  gradient changed sign, a pseudo-gradient `slow - fast`, a weight crossing
  zero). The ulps are of `expected`'s dtype, at the magnitude `scale` names:

  - "element": each element's own, max(|actual|, |expected|);
  - "leaf": the largest finite |actual| or |expected| of the leaf (and at
    least each element's own);
  - "kind": the largest |expected| among the leaves of the same kind (the
    last named field on a leaf's path: the params have none; `slow_params`,
    `mu`, `nu` of an optimizer state);

  and at least `floor`: a number (the weights' scale) or a tree like
  `expected` (the values before the step, an operand of the step),
  elementwise. Non-finite elements must be equal (NaN where NaN), non-float
  leaves bitwise, dtypes and shapes the same.
  """
  assert scale in ULP_SCALES, scale
  leaves_a, tree_a = jax.tree.flatten(actual)
  leaves_e = _float_leaves(expected)
  tree_e = jax.tree.structure(expected)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  if isinstance(floor, (int, float, np.number)) or (
      isinstance(floor, (np.ndarray, jax.Array)) and not np.ndim(floor)):
    floors = [floor] * len(leaves_e)
  else:
    floors = tree_e.flatten_up_to(floor)
  kinds = {}
  for _, kind, e in leaves_e:
    if jnp.issubdtype(e.dtype, jnp.inexact) and e.size:
      kinds[kind] = max(kinds.get(kind, 0.0),
                        float(np.max(np.abs(e.astype(np.float64)))))
  for a, (path, kind, e), f in zip(leaves_a, leaves_e, floors):
    a = np.asarray(a)
    where = f"{msg} {jax.tree_util.keystr(path)}"
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      assert_bitwise(a, e, where)
      continue
    assert a.dtype == e.dtype, f"{where} dtype {a.dtype} != {e.dtype}"
    assert a.shape == e.shape, f"{where} shape {a.shape} != {e.shape}"
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(e64)
    np.testing.assert_array_equal(a64[~finite], e64[~finite], err_msg=where)
    at = np.broadcast_to(np.abs(np.asarray(f, np.float64)), e.shape)[finite]
    a64, e64 = a64[finite], e64[finite]
    if scale == "kind":
      at = np.maximum(at, kinds.get(kind, 0.0))
    else:
      at = np.maximum(at, np.maximum(np.abs(a64), np.abs(e64)))
      if scale == "leaf":
        top = max(float(np.max(np.abs(x), initial=0.0)) for x in (a64, e64))
        at = np.maximum(at, top)
    diff = np.abs(a64 - e64)
    bound = n * ulp(at, e.dtype)
    assert (diff <= bound).all(), (
        f"{where}: {np.max(diff / bound) * n:.1f} ulps > {n} ({scale} scale)")


# The jitted steps of `trajectory`, one per transformation and configuration,
# so that a test (or a module) that runs one `tx` several times compiles its
# step once. Keyed on the identity of `tx` (and of the gradient function of a
# `data` run): the entry holds them, so an id is not reused while cached.
_STEPS: dict = {}


def jitted_step(tx: Any, grad_fn: Any = None, donate: bool = False):
  """`step(params, state, x)` of `tx` under `jax.jit`, one per configuration.

  `x` is the gradient tree, or with `grad_fn` the input of
  `grad_fn(params, x)`, computed inside the step. `donate` donates the params
  and the state. The same `(tx, grad_fn, donate)` gets the same jitted
  function (one compilation per input shapes and dtypes).
  """
  key = (id(tx), id(grad_fn), donate)
  entry = _STEPS.get(key)
  if entry is None or entry[0] is not tx or entry[1] is not grad_fn:
    def step(p, s, x):
      g = grad_fn(p, x) if grad_fn is not None else x
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s
    entry = (tx, grad_fn, jax.jit(step, donate_argnums=(0, 1) if donate
                                  else ()))
    _STEPS[key] = entry
  return entry[2]


def trajectory(tx: Any, params: Any, grads: Any, steps: Optional[int] = None,
               *, data: Any = None, jit: bool = False, donate: bool = False,
               state: Any = None) -> list:
  """`(params, state)` after each step of `tx` (update, then apply_updates).

  The one training loop of the tests. `grads` is a sequence of gradient
  trees (one a step); or a function `grads(params, t)` of the params before
  step `t`, called outside the step (then `steps` steps); or, with `data`
  (one entry a step), a function `grads(params, data_t)` computed inside the
  step (in the same compiled program as the update). `jit` compiles the step
  (one program for the whole run, shared by every run of the same `tx` and
  gradient function: `jitted_step`), `donate` donates params and state to it
  and copies each step's results to the host (their buffers are reused). The
  run starts from copies of `params` and from `state`, or `tx.init`.
  """
  grad_fn = grads if data is not None else None
  if jit:
    step = jitted_step(tx, grad_fn, donate)
  else:
    def step(p, s, x):
      g = grad_fn(p, x) if grad_fn is not None else x
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s
  params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  state = tx.init(params) if state is None else state
  if data is not None:
    inputs = lambda p, t: data[t]  # pylint: disable=unnecessary-lambda-assignment
    steps = len(data)
  elif callable(grads):
    inputs = grads
  else:
    inputs = lambda p, t: grads[t]  # pylint: disable=unnecessary-lambda-assignment
    steps = len(grads) if steps is None else steps
  out = []
  for t in range(steps):
    params, state = step(params, state, inputs(params, t))
    out.append(jax.device_get((params, state)) if donate else (params, state))
  return out


# One pmap harness for the replica tests (DiLoCo, streaming): the pmapped
# step and init, one per transformation and gradient function, as above.
_PMAPPED: dict = {}


def _pmapped(tx: Any, grad_fn: Any, axis_name: str, donate: bool):
  key = (id(tx), id(grad_fn), axis_name, donate)
  entry = _PMAPPED.get(key)
  if entry is None or entry[0] is not tx or entry[1] is not grad_fn:
    def step(params, state, *inputs):
      grads = grad_fn(params, *inputs)  # this replica's own: no pmean
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    entry = (tx, grad_fn, jax.pmap(step, axis_name=axis_name,
                                   donate_argnums=(0, 1) if donate else ()),
             jax.pmap(tx.init))
    _PMAPPED[key] = entry
  return entry


def pmapped_step(tx: Any, grad_fn: Any, axis_name: str,
                 donate: bool = True):
  """`step(params, state, *inputs)` of `tx` on every replica (`jax.pmap`).

  Each replica's gradients are `grad_fn(params, *inputs)` of its own inputs
  (a leading replica axis on everything). One pmapped function per `(tx,
  grad_fn, axis_name, donate)`, so a `tx` run by several tests compiles once.
  """
  return _pmapped(tx, grad_fn, axis_name, donate)[2]


def replicate(tree: Any, n: int) -> Any:
  """`tree` with a leading axis of `n` identical replicas."""
  return jax.tree.map(
      lambda a: jnp.broadcast_to(jnp.asarray(a), (n,) + np.shape(a)), tree)


def on_replicas(tree: Any, axis_name: str) -> Any:
  """`tree` (a leading replica axis) placed as `jax.pmap` places its outputs.

  `jax.pmap` compiles one program per placement of its inputs: a step first
  called on one device's arrays, then on its own outputs, compiles twice.
  Arrays already placed so are not copied.
  """
  n = jax.tree.leaves(tree)[0].shape[0]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), (axis_name,))
  return jax.device_put(tree, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(axis_name)))


def to_numpy(tree: Any) -> Any:
  """NumPy copies of every leaf (nothing aliases a device buffer)."""
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def replica_run(tx: Any, grad_fn: Any, axis_name: str, inputs: Any, *,
                params: Any = None, n: int = 8, start: Any = None) -> list:
  """`(params, state)` after each step of `tx` on `n` replicas, as NumPy.

  `inputs` holds one tuple of per-replica inputs a step (see
  `pmapped_step`). The run starts from `params` (one replica's, replicated;
  the state from the pmapped `tx.init`) or from `start`, a stacked
  `(params, state)`, which it donates. Both are placed first as the step
  places its outputs (`on_replicas`), so a run compiles one step. Every
  step's result is a NumPy copy, so no test can change what another one
  reads (or what the next step donates).
  """
  _, _, step, init = _pmapped(tx, grad_fn, axis_name, True)
  if start is None:
    stacked = on_replicas(jax.tree.map(
        lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a)), params),
                          axis_name)
    state = on_replicas(init(stacked), axis_name)
  else:
    stacked, state = on_replicas(start, axis_name)
  history = []
  for x in inputs:
    stacked, state = step(stacked, state, *x)
    history.append(to_numpy((stacked, state)))
  return history


def buffer_pointers(tree: Any) -> list:
  """The device buffer addresses of every array leaf (one per shard)."""
  out = []
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      out.extend(s.data.unsafe_buffer_pointer()
                 for s in leaf.addressable_shards)
  return out


def assert_no_shared_buffers(*trees: Any) -> None:
  """Asserts no two array leaves of `trees` share a device buffer.

  A state that aliases the params (or one of its own leaves) cannot be donated
  with them: XLA refuses to donate one buffer twice.
  """
  pointers = buffer_pointers(trees)
  assert len(pointers) == len(set(pointers)), "two leaves share a buffer"


def skip_unless_float16_converts() -> None:
  """Skips the test where XLA:CPU cannot convert float16 to float32.

  Built for an ISA without F16C (`XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`),
  XLA:CPU's JIT calls the runtime function `__extendhfsf2`, which it does
  not find: every float16 program fails to load, in any library.
  """
  try:
    jax.jit(lambda x: x.astype(jnp.float32))(
        jnp.zeros(1, jnp.float16)).block_until_ready()
  except jax.errors.JaxRuntimeError as e:
    pytest.skip(f"XLA:CPU cannot convert float16 on this ISA: {e}")


def _wide_bf16(rng: np.random.Generator, n: int) -> jax.Array:
  """bfloat16 values spread over 8 orders of magnitude."""
  scale = rng.choice([1e-4, 1e-2, 1.0, 1e2, 1e4], size=n)
  return jnp.asarray(scale * rng.normal(size=n), jnp.bfloat16)


def assert_bf16_lands_on_slow_weights(tx: Any, k: int) -> None:
  """bfloat16 params land on the slow weights bitwise at every sync of `tx`.

  Weights over 8 orders of magnitude and `tx`'s large learning rate, so that
  syncs move some weights by large factors (checked). The update is applied
  both inside the jitted step (where XLA may keep excess precision) and
  outside it, over 4 cycles of `k` steps.
  """
  rng = np.random.default_rng(0)
  params = _wide_bf16(rng, 512)
  fused = jitted_step(tx)
  separate = jax.jit(tx.update)
  pa, sa = params, tx.init(params)
  pb, sb = params, tx.init(params)
  for t in range(1, 4 * k + 1):
    g = _wide_bf16(rng, 512)
    pa, sa = fused(pa, sa, g)
    updates, sb = separate(g, sb, pb)
    pb = optax.apply_updates(pb, updates)
    if t % k == 0:
      for p, s in ((pa, sa), (pb, sb)):
        assert_tree_bitwise(lo.slow_params(s).astype(jnp.bfloat16), p)
  ratio = np.abs(np.asarray(pa, np.float32) / np.asarray(params, np.float32))
  assert (ratio > 4).any()


# ---------------------------------------------------------------------------
# Bodies shared by a feature test (on the default formulation) and
# tests/test_formulations.py (on each formulation): one copy of each check.
# ---------------------------------------------------------------------------


def check_rollback_hand_worked(sync: str = "auto", jit: bool = False) -> None:
  """A NaN mid-cycle and an overflow roll back, worked out by hand.

  sgd(lr=0.5, momentum=0.5), k=4, alpha=0.75, params (8, -4); all values
  dyadic, so exact in float32 in any program.
  """
  tx = lo.lookahead(optax.sgd(0.5, momentum=0.5), sync_period=4,
                    slow_step_size=0.75, sync=sync, on_nonfinite="rollback")
  g = lambda *v: jnp.array(v)  # pylint: disable=unnecessary-lambda-assignment
  hist = trajectory(tx, jnp.array([8.0, -4.0]),
                    [g(2.0, -2.0), g(2.0, -2.0), g(np.nan, 1.0),
                     g(2.0, -2.0)], jit=jit)
  # Step 1: trace 2, update -1 -> 7. Step 2: trace 2 + 1 = 3 -> 5.5.
  assert_bitwise(hist[0][0], jnp.array([7.0, -3.0]))
  assert_bitwise(hist[1][0], jnp.array([5.5, -1.5]))
  # Step 3: NaN in one leaf element: the whole step rolls back to the slow
  # weights (8, -4), resets the momentum, leaves the slow weights.
  p3, s3 = hist[2]
  assert_bitwise(p3, jnp.array([8.0, -4.0]))
  assert_bitwise(s3.inner_state[0].trace, jnp.array([0.0, 0.0]))
  assert_bitwise(lo.slow_params(s3), jnp.array([8.0, -4.0]))
  assert int(s3.step) == 3
  # Step 4 (sync): fresh momentum, trace (2, -2) -> fast (7, -3); slow
  # 8 + 0.75 (7 - 8) = 7.25 and -4 + 0.75 (-3 + 4) = -3.25.
  p4, s4 = hist[3]
  assert_bitwise(p4, jnp.array([7.25, -3.25]))
  assert_bitwise(lo.slow_params(s4), p4)
  assert_bitwise(s4.inner_state[0].trace, jnp.array([2.0, -2.0]))
  # A finite update whose fast params overflow to inf also rolls back.
  big = np.float32(3e38)
  tx = lo.lookahead(optax.sgd(1.0), sync_period=3, sync=sync,
                    on_nonfinite="rollback")
  params = jnp.array([big, 1.0])
  hist = trajectory(tx, params, [jnp.array([1.0, 0.0]),
                                 jnp.array([-big, 0.0])], jit=jit)
  np.testing.assert_array_equal(hist[0][0], [big - 1.0, 1.0])
  assert_bitwise(hist[1][0], params)


STATEFUL_INNERS = {
    "momentum": lambda: optax.sgd(0.25, momentum=0.5),
    "adam": lambda: optax.adam(0.25),
}


def check_nan_on_a_sync_step(inner: str, inner_state: str, sync: str = "auto",
                             jit: bool = False) -> None:
  """A NaN gradient on a sync step with a stateful inner optimizer.

  k = 3, alpha = 0.8; two good steps, then a NaN gradient on step 3 (a sync
  step). The step must roll back to the slow weights (theta_0), reset the
  moments to zero, skip the sync, keep the last-synced copy of the inner
  state (pullback) untouched and finite, and the next cycle must be that of
  a fresh lookahead started from theta_0 with the inner counts going on
  (under jit: in the same compiled program).
  """
  k = 3
  tx = lo.lookahead(STATEFUL_INNERS[inner](), k, 0.8, sync=sync,
                    inner_state=inner_state, on_nonfinite="rollback")
  # float32, not weak-typed Python scalars: one compiled step for the run.
  params = {"w": jnp.array([1.5, -2.0, 0.75]),
            "b": jnp.array(0.5, jnp.float32)}
  rng = np.random.default_rng(4)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                              jnp.float32), params)
           for _ in range(2 * k)]
  grads[k - 1] = {"w": jnp.array([1.0, np.nan, 1.0]),
                  "b": jnp.array(1.0, jnp.float32)}
  hist = trajectory(tx, params, grads, jit=jit)
  p3, s3 = hist[k - 1]
  assert_tree_bitwise(p3, params)
  assert_tree_bitwise(lo.slow_params(s3), params)
  assert int(s3.step) == k
  if inner_state == "pullback":
    live, synced = s3.inner_state.inner_state, s3.inner_state.synced_inner_state
  else:
    live, synced = s3.inner_state, None
  fresh = STATEFUL_INNERS[inner]().init(params)
  moments = ("trace",) if inner == "momentum" else ("mu", "nu")
  for name in moments:
    assert_tree_bitwise(getattr(live[0], name), getattr(fresh[0], name))
  if inner == "adam":
    assert int(live[0].count) == k  # Schedules and bias correction go on.
  if synced is not None:
    # Nothing synced yet: the last-synced copy is still the initial state.
    assert_tree_bitwise(synced, fresh)
  # Steps k+1 .. 2k: a fresh cycle from theta_0 (the same state as a fresh
  # lookahead's, but for the counts), ending in a sync.
  start = tx.init(params)
  if inner == "adam":
    with_count = lambda st: (st[0]._replace(count=jnp.asarray(k, jnp.int32)),  # pylint: disable=g-long-lambda,unnecessary-lambda-assignment
                             ) + tuple(st[1:])
    if inner_state == "pullback":
      start = start._replace(inner_state=lo.PullbackState(
          with_count(start.inner_state.inner_state),
          start.inner_state.synced_inner_state))
    else:
      start = start._replace(inner_state=with_count(start.inner_state))
  start = start._replace(step=jnp.asarray(k, jnp.int32))
  assert_tree_bitwise(s3, start)
  # The same `tx`: under jit the same compiled step as the run above.
  expected = trajectory(tx, params, grads[k:], state=start, jit=jit)
  for (p, st), (p_ref, st_ref) in zip(hist[k:], expected):
    assert_tree_bitwise((p, st), (p_ref, st_ref))
  p6, s6 = hist[-1]
  assert_tree_bitwise(lo.slow_params(s6), p6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(s6))
  # The sync moved the slow weights: 0.8 of the way to the fast weights.
  assert not np.array_equal(np.asarray(p6["w"]), np.asarray(params["w"]))


def sync_invariant_run(dtype: Any, sync: str = "auto", jit: bool = False,
                       steps: int = 9) -> tuple:
  """`lookahead(adam(0.05), 3, 0.7)` in `dtype`; checks each sync's bits.

  After every sync (k = 3) the params are the slow weights bitwise, and the
  sync moved them; between syncs the slow weights keep their bits; params
  and slow weights keep the params' dtypes. Returns the initial params and
  the run (`trajectory`'s list), for comparisons across runs.
  """
  k = 3
  rng = np.random.default_rng(3)
  shapes = {"w": (3, 4), "b": (4,), "c": ()}
  params0 = {n: jnp.asarray(rng.normal(size=s), dtype)
             for n, s in shapes.items()}
  grads = [{n: jnp.asarray(rng.normal(size=s), dtype)
            for n, s in shapes.items()} for _ in range(steps)]
  got = trajectory(lo.lookahead(optax.adam(0.05), k, 0.7, sync=sync),
                   params0, grads, jit=jit)
  dtypes = jax.tree.map(lambda x: x.dtype, params0)
  prev_slow = params0
  for t, (params, state) in enumerate(got):
    slow = lo.slow_params(state)
    msg = f"{sync} jit={jit} step {t + 1}"
    assert jax.tree.map(lambda x: x.dtype, (params, slow)) == (
        dtypes, dtypes), msg
    if (t + 1) % k == 0:
      assert_tree_bitwise(params, slow, msg)
      # The sync moved the slow weights (alpha = 0.7).
      assert not np.array_equal(bits(slow["w"]), bits(prev_slow["w"])), msg
    else:
      assert_tree_bitwise(slow, prev_slow, msg)
    prev_slow = slow
  return params0, got


def quadratic_problem(shapes: dict, replicas: int, steps: int,
                      seed: int = 0) -> tuple:
  """Params, and per replica a quadratic pull towards its own target.

  Returns `(params0, curvatures, targets, noise)`: the params of `shapes`
  in [0.5, 1.5], and per replica (leading axis) curvatures in [0.5, 2],
  targets and, per step, gradient noise (see `quadratic_grad`).
  """
  rng = np.random.default_rng(seed)
  params0 = {k: rng.uniform(0.5, 1.5, s).astype(np.float32)
             for k, s in shapes.items()}
  curv = {k: rng.uniform(0.5, 2.0, (replicas,) + s).astype(np.float32)
          for k, s in shapes.items()}
  target = {k: rng.normal(0, 1, (replicas,) + s).astype(np.float32)
            for k, s in shapes.items()}
  noise = {k: rng.normal(0, 0.3, (steps, replicas) + s).astype(np.float32)
           for k, s in shapes.items()}
  return params0, curv, target, noise


def quadratic_grad(p: Any, c: Any, t: Any, z: Any) -> Any:
  """The gradient of `0.5 c (p - t)**2` plus the noise `z`."""
  return c * (p - t) + z


def orbax_round_trip(path: Any, tree: Any) -> Any:
  """`tree` saved with orbax under `path` and restored into NumPy targets.

  (Restored into NumPy, the leaves come back uncommitted, so a `jax.pmap`
  step takes them as it took the originals.)
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "ckpt", tree)
  checkpointer.wait_until_finished()
  target = jax.tree.map(np.zeros_like, tree)
  restored = ocp.StandardCheckpointer().restore(path / "ckpt", target)
  return jax.tree.map(jnp.asarray, restored)


def equations(jaxpr: Any, primitive: str) -> list:
  """Every `primitive` equation of `jaxpr`, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.append(eqn)
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
          found += equations(inner, primitive)
  return found


def batch_reaches_collective(jaxpr: Any, tainted: Any) -> list:
  """Whether a collective's operands depend on the `tainted` variables."""
  found = []
  collectives = {"psum", "pmean", "all_to_all", "all_gather", "ppermute",
                 "psum_scatter", "reduce_scatter", "all_gather_invariant"}

  def visit(jaxpr, tainted):
    tainted = set(tainted)
    for eqn in jaxpr.eqns:
      ins = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
      hit = any(v in tainted for v in ins)
      if eqn.primitive.name in collectives:
        found.append(hit)
      subs = [p for p in eqn.params.values()
              if isinstance(p, (jex_core.ClosedJaxpr, jex_core.Jaxpr))]
      branches = eqn.params.get("branches", ())
      for sub in list(subs) + list(branches):
        inner = sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub
        args = eqn.invars[1:] if branches else eqn.invars
        visit(inner, [iv for iv, v in zip(inner.invars, args)
                      if not isinstance(v, jex_core.Literal) and v in tainted])
      if hit:
        tainted.update(eqn.outvars)

  visit(jaxpr, tainted)
  return found


def whole_step_jaxpr(tx: Any, shapes: dict, axis_name: str,
                     replicas: int) -> tuple:
  """The jaxpr of a whole step of `tx` (loss, grad, update), and its batch.

  Returns the jaxpr (traced with `axis_name` of `replicas`) and its input
  variables that are the batch `(x, y)`.
  """
  params = {k: jnp.ones(s) for k, s in shapes.items()}
  state = tx.init(params)

  def step(params, state, x, y):
    grads = jax.grad(lambda p: sum(jnp.sum((p[k] * x[k] - y[k]) ** 2)
                                   for k in p))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  closed = jax.make_jaxpr(step, axis_env=[(axis_name, replicas)])(
      params, state, params, params)
  n_state = len(jax.tree.leaves((params, state)))
  return closed.jaxpr, closed.jaxpr.invars[n_state:]


def shard_map_run(tx: Any, data: tuple, steps: int, axis_name: str,
                  donate: tuple = ()) -> tuple:
  """`steps` of `tx` on `data` (`problem`'s) in a jitted `shard_map`.

  Returns the params and the state, sharded over the replicas.
  """
  params0, curv, target, noise = data
  replicas = curv[next(iter(curv))].shape[0]
  mesh = jax.make_mesh((replicas,), (axis_name,))
  spec = P(axis_name)
  shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, spec))  # pylint: disable=unnecessary-lambda-assignment
  start = replicate(params0, replicas)
  params = shard(start)
  state = shard(jax.pmap(tx.init)(start))
  curv, target = shard(curv), shard(target)

  def block(params, state, c, t, z):
    squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)  # pylint: disable=unnecessary-lambda-assignment
    p, s, c, t, z = squeeze((params, state, c, t, z))
    updates, s = tx.update(jax.tree.map(quadratic_grad, p, c, t, z), s, p)
    out = (optax.apply_updates(p, updates), s)
    return jax.tree.map(lambda a: a[None], out)

  step = jax.jit(jax.shard_map(block, mesh=mesh, in_specs=spec,
                               out_specs=spec), donate_argnums=donate)
  for t in range(steps):
    params, state = step(params, state, curv, target,
                         shard({k: v[t] for k, v in noise.items()}))
  return params, state
