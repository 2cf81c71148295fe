"""Helpers shared by the test suite: bitwise comparison, float64 mode, ulps.

One bitwise-equality helper for every test: it compares the raw bits of the
arrays, so that 0.0 and -0.0 differ, NaN equals a NaN with the same payload,
and the dtypes must agree. `np.testing.assert_array_equal` does neither (it
treats 0.0 == -0.0 and any NaN == NaN).
"""

import contextlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def assert_tree_within_ulps(actual: Any, expected: Any, n: int,
                            msg: str = "") -> None:
  """Asserts leafwise |actual - expected| <= n ulps of `expected`'s dtype."""
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  for i, (a, e) in enumerate(zip(flat_a, flat_e)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype, f"{msg} leaf {i} dtype {a.dtype} != {e.dtype}"
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      np.testing.assert_array_equal(a, e, err_msg=f"{msg} leaf {i}")
      continue
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(e64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - e64))
    bound = n * ulp(np.maximum(np.abs(a64), np.abs(e64)), e.dtype)
    assert (diff <= bound).all(), (
        f"{msg} leaf {i}: max {np.max(diff / bound) * n:.1f} ulps > {n}")


def _kind(path: Any) -> str:
  """The last named field on a leaf's path (`mu`, `slow_params`), or ""."""
  names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else ""


def assert_tree_within_ulps_at_scale(actual, expected, n, msg=""):
  """Asserts leafwise |actual - expected| <= n ulps at its kind's scale.

  A leaf's kind is the last named field on its path (the params have none;
  `slow_params`, `mu`, `nu` of an optimizer state) and the scale the largest
  |expected| among the leaves of that kind: the bound is n ulps of that,
  where `assert_tree_within_ulps` takes each element's own. Two compiled
  programs that round the same elementwise arithmetic differently (a
  multiply-add fused into an FMA in one and not the other) agree to an ulp
  or so of the operands; where a result cancels (a weight crossing zero, a
  moment whose gradient changed sign) that is many ulps of the result
  itself. Integer leaves must be equal.
  """
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  flat_a, tree_a = jax.tree.flatten(actual)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  scales = {}
  for path, e in flat_e:
    e = np.asarray(e)
    if jnp.issubdtype(e.dtype, jnp.inexact) and e.size:
      kind = _kind(path)
      scales[kind] = max(scales.get(kind, 0.0),
                         float(np.max(np.abs(e.astype(np.float64)))))
  for (path, e), a in zip(flat_e, flat_a):
    a, e = np.asarray(a), np.asarray(e)
    where = f"{msg} {jax.tree_util.keystr(path)}"
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      assert_bitwise(a, e, where)
      continue
    assert a.dtype == e.dtype, f"{where} dtype {a.dtype} != {e.dtype}"
    bound = n * ulp(scales.get(_kind(path), 0.0), e.dtype)
    diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
    assert (diff <= bound).all(), (
        f"{where}: max {np.max(diff) / bound * n:.1f} ulps of "
        f"{scales.get(_kind(path), 0.0):.3g} > {n}")


def assert_tree_within_ulps_at(actual: Any, expected: Any, n: int,
                               scale: Any = 0.0, msg: str = "") -> None:
  """Leafwise |actual - expected| <= n ulps at the magnitude of the operands.

  Two programs that round the same arithmetic differently (an FMA in one, a
  multiply and an add in the other) differ by a rounding of an operand: a
  fraction of an ulp at the scale of the operands, but many ulps of a result
  that cancels (a moment whose gradient changed sign, a pseudo-gradient
  `slow - fast`, a weight crossing zero). The ulps are taken at the largest
  of |actual|, |expected|, the largest magnitude in the leaf, and `scale`: a
  number (the weights' scale), or a tree like `expected` (the values before
  the step, an operand of a moment's update), elementwise. Non-float leaves
  must be equal.
  """
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  if isinstance(scale, (int, float)):
    scales = [scale] * len(flat_e)
  else:
    scales = jax.tree.leaves(scale)
    assert len(scales) == len(flat_e), f"{msg} scale structure"
  for i, (a, e, s) in enumerate(zip(flat_a, flat_e, scales)):
    a, e = np.asarray(a), np.asarray(e)
    where = f"{msg} leaf {i}"
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      assert_bitwise(a, e, where)
      continue
    assert a.dtype == e.dtype and a.shape == e.shape, where
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(e64)
    np.testing.assert_array_equal(a64[~finite], e64[~finite], err_msg=where)
    s = np.broadcast_to(np.abs(np.asarray(s, np.float64)), e.shape)[finite]
    a64, e64 = a64[finite], e64[finite]
    top = max(float(np.max(np.abs(x), initial=0.0)) for x in (a64, e64))
    at = np.maximum(np.maximum(np.abs(a64), np.abs(e64)), np.maximum(s, top))
    diff = np.abs(a64 - e64)
    bound = n * ulp(at, e.dtype)
    assert (diff <= bound).all(), (
        f"{where}: {np.max(diff / bound) * n:.1f} ulps > {n}")


def assert_step_within_ulps(actual: Any, expected: Any, before: Any, n: int,
                            msg: str = "") -> None:
  """Leafwise |actual - expected| <= n ulps at the scale of one step.

  The scale is the largest of |actual|, |expected| and |before| (the leaf
  before the step, the inputs' scale): where a step cancels (`p + u` or
  `b1 * mu + (1 - b1) * g` near 0), one rounding of its operands is many
  ulps of its result, but n ulps of its inputs. Integer leaves must be equal.
  """
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  flat_b = tree_e.flatten_up_to(before)
  for i, (a, e, b) in enumerate(zip(flat_a, flat_e, flat_b)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype, f"{msg} leaf {i} dtype {a.dtype} != {e.dtype}"
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      np.testing.assert_array_equal(a, e, err_msg=f"{msg} leaf {i}")
      continue
    dtype = e.dtype
    a, e, b = (np.asarray(x, np.float64) for x in (a, e, b))
    diff = np.where(np.isnan(a) & np.isnan(e), 0.0, np.abs(a - e))
    scale = np.maximum(np.maximum(np.abs(a), np.abs(e)), np.abs(b))
    bound = n * ulp(scale, dtype)
    assert (diff <= bound).all(), (
        f"{msg} leaf {i}: {np.max(diff / bound) * n:.1f} ulps > {n}")


def trajectory(tx: Any, params: Any, grads: Any, steps: Optional[int] = None,
               *, data: Any = None, jit: bool = False, donate: bool = False,
               state: Any = None) -> list:
  """`(params, state)` after each step of `tx` (update, then apply_updates).

  The one training loop of the tests. `grads` is a sequence of gradient
  trees (one a step); or a function `grads(params, t)` of the params before
  step `t`, called outside the step (then `steps` steps); or, with `data`
  (one entry a step), a function `grads(params, data_t)` computed inside the
  step (in the same compiled program as the update). `jit` compiles the step
  (one program for the whole run), `donate` donates params and state to it
  and copies each step's results to the host (their buffers are reused). The
  run starts from copies of `params` and from `state`, or `tx.init`.
  """
  def step(p, s, x):
    g = grads(p, x) if data is not None else x
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s
  if jit:
    step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
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
