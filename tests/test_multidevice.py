"""Lookahead on several devices: pmap, jit with NamedSharding, shard_map.

The root conftest.py asks XLA for 8 host CPU devices before JAX starts, so these
tests run anywhere (CI has no accelerator).
"""

import functools

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks.communication import COLLECTIVE
from tests._helpers import assert_bitwise
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_tree_within_ulps

N_DEVICES = 8
# HLO instructions that move data between devices (`COLLECTIVE`). Async
# pairs are counted once, by their `-start` half.


@pytest.fixture(autouse=True, scope="module")
def _need_devices():
  if jax.device_count() < N_DEVICES:
    pytest.skip(
        f"needs {N_DEVICES} devices (XLA_FLAGS="
        f"--xla_force_host_platform_device_count={N_DEVICES}), "
        f"got {jax.device_count()}"
    )


def count_collectives(hlo_text):
  """{op: count} of the collective ops in compiled HLO text."""
  counts = {}
  for match in COLLECTIVE.finditer(hlo_text):
    counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts


def init_mlp(seed=0, d_in=16, d_hidden=32, d_out=8):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {
      "w1": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
      "b1": jnp.zeros(d_hidden),
      "w2": jax.random.normal(k2, (d_hidden, d_out)) / np.sqrt(d_hidden),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def make_batches(n_steps, batch=64, d_in=16, d_out=8, seed=1):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  xs = jax.random.normal(kx, (n_steps, batch, d_in))
  ys = jnp.sin(xs[..., :d_out]) + 0.1 * jax.random.normal(
      ky, (n_steps, batch, d_out))
  return xs, ys


def single_device_run(tx, params, xs, ys):
  """The reference: one device, the full batch at every step."""

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for x, y in zip(xs, ys):
    params, state = step(params, state, x, y)
  return params, state


def assert_trees_close(actual, expected, atol):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a), np.asarray(e), rtol=0, atol=atol),
      actual, expected)


# --------------------------------------------------------------------------
# jax.pmap data parallelism.


@pytest.mark.parametrize("inner_state", ["keep", "pullback"])
def test_pmap_data_parallel_matches_single_device(inner_state):
  tx = lo.lookahead(optax.adam(0.05), sync_period=3, slow_step_size=0.5,
                    inner_state=inner_state)
  params = init_mlp()
  xs, ys = make_batches(n_steps=8)  # 2 syncs, and 2 steps into a third cycle

  @functools.partial(jax.pmap, axis_name="data")
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    # Equal-sized shards: the mean of the shard means is the full-batch mean.
    grads = jax.lax.pmean(grads, axis_name="data")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # pmap splits its inputs along their leading axis: stack 8 copies.
  replicate = lambda tree: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (N_DEVICES,) + a.shape), tree)
  p_params = replicate(params)
  p_state = jax.pmap(tx.init)(p_params)
  shard = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
  for x, y in zip(xs, ys):
    p_params, p_state = step(p_params, p_state, shard(x), shard(y))

  ref_params, ref_state = single_device_run(tx, params, xs, ys)
  # Every replica holds the same params and state, bitwise.
  for tree in (p_params, p_state):
    jax.tree.map(
        lambda a: assert_bitwise(
            a, np.broadcast_to(np.asarray(a)[0], a.shape)),
        tree)
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  assert_trees_close(first(p_params), ref_params, atol=1e-5)
  assert_trees_close(
      lo.slow_params(first(p_state)), lo.slow_params(ref_state), atol=1e-5)
  assert int(first(p_state).step) == 8
  # The trajectory moved (a loose check that the test checks something).
  assert float(jnp.max(jnp.abs(ref_params["w1"] - params["w1"]))) > 1e-2
  # 8 = 2 * 3 + 2: the last sync was at step 6, and the slow weights are
  # the fast weights of that moment, so they differ from the params now.
  assert not np.allclose(
      np.asarray(lo.slow_params(ref_state)["w1"]),
      np.asarray(ref_params["w1"]))


# --------------------------------------------------------------------------
# jax.jit with NamedSharding: FSDP and tensor parallelism.


def fsdp_layout():
  """Params sharded on their first axis over all 8 devices, batch too."""
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  specs = {"w1": P("data", None), "b1": P("data"), "w2": P("data", None)}
  return mesh, specs, P("data")


def tp_layout():
  """Megatron-style: w1 column-, w2 row-sharded on `model`; batch on `data`."""
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
  return mesh, specs, P("data")


LAYOUTS = {"fsdp": fsdp_layout, "tensor_parallel": tp_layout}


def place(layout):
  mesh, specs, batch_spec = LAYOUTS[layout]()
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  params = jax.device_put(init_mlp(), shardings)
  return mesh, shardings, params, NamedSharding(mesh, batch_spec)


def assert_same_shardings(tree, shardings):
  for name, sharding in shardings.items():
    leaf = tree[name]
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
        name, leaf.sharding, sharding)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("inner_state", ["keep", "pullback", "snoo"])
def test_init_under_jit_shards_slow_params_like_params(layout, inner_state):
  mesh, shardings, params, _ = place(layout)
  if inner_state == "snoo":
    tx = lo.snoo(optax.adamw(1e-3), sync_period=4)
  else:
    tx = lo.lookahead(optax.adamw(1e-3), inner_state=inner_state)
  state = jax.jit(tx.init)(params)
  assert_same_shardings(state.slow_params, shardings)
  # optax's own init leaves Adam's moments replicated here (zeros_like under
  # jit); `optax.tree_utils.tree_map_params` shards every param-shaped leaf
  # of the state, the slow weights included, like the params.
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  sharded = jax.jit(tx.init, out_shardings=state_shardings)(params)
  adam_state = (sharded.inner_state.inner_state if inner_state == "pullback"
                else sharded.inner_state)[0]
  if inner_state == "snoo":  # the outer momentum, too
    assert_same_shardings(sharded.outer_state[0].trace, shardings)
  assert_same_shardings(sharded.slow_params, shardings)
  assert_same_shardings(adam_state.mu, shardings)
  assert_same_shardings(adam_state.nu, shardings)
  if inner_state == "pullback":
    assert_same_shardings(
        sharded.inner_state.synced_inner_state[0].mu, shardings)
  assert_tree_bitwise(sharded, state)
  assert_tree_bitwise(state.slow_params, params)
  # Each device holds only its shard of the slow weights: w1 is (16, 32).
  w1 = state.slow_params["w1"]
  expected = (2, 32) if layout == "fsdp" else (16, 8)
  assert {s.data.shape for s in w1.addressable_shards} == {expected}


def compile_train_step(tx, params, state, batch_sharding):
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  x = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=batch_sharding)
  y = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=batch_sharding)
  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, x, y).compile()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lookahead_adds_no_collectives(layout):
  _, shardings, params, batch_sharding = place(layout)
  adamw = optax.adamw(1e-3)
  base = count_collectives(compile_train_step(
      adamw, params, jax.jit(adamw.init)(params), batch_sharding).as_text())
  # The sharded model needs collectives of its own: the count is not vacuous.
  if layout == "fsdp":
    assert base.get("all-gather", 0) > 0, base
  else:
    assert base.get("all-reduce", 0) > 0, base
  snoo = optax.sgd(0.7, momentum=0.9, nesterov=True)
  for kwargs in (dict(sync="select"), dict(sync="cond"),
                 dict(inner_state="reset"), dict(inner_state="pullback"),
                 dict(outer=snoo, sync="select"), dict(outer=snoo)):
    tx = lo.lookahead(adamw, sync_period=4, **kwargs)
    state = jax.jit(tx.init)(params)
    compiled = compile_train_step(tx, params, state, batch_sharding)
    counts = count_collectives(compiled.as_text())
    for op, n in counts.items():
      assert n <= base.get(op, 0), (kwargs, op, counts, base)
    # The state comes out of the step sharded as it went in.
    out_params, out_state = compiled.output_shardings
    for name, sharding in shardings.items():
      assert out_params[name].is_equivalent_to(sharding, 2 - (name == "b1"))
      assert out_state.slow_params[name].is_equivalent_to(
          sharding, 2 - (name == "b1"))
      if "outer" in kwargs:  # SNOO's momentum is sharded like the params
        assert out_state.outer_state[0].trace[name].is_equivalent_to(
            sharding, 2 - (name == "b1"))
  # A positive control: the counter does see an added collective. Rollback
  # must know whether any element is non-finite, a scalar all-reduce.
  tx = lo.lookahead(adamw, sync_period=4, on_nonfinite="rollback",
                    sync="select")
  counts = count_collectives(compile_train_step(
      tx, params, jax.jit(tx.init)(params), batch_sharding).as_text())
  assert counts["all-reduce"] == base.get("all-reduce", 0) + 1, (counts, base)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_training_matches_single_device(layout):
  _, shardings, params, batch_sharding = place(layout)
  tx = lo.lookahead(optax.adamw(0.05), sync_period=3, slow_step_size=0.5)
  xs, ys = make_batches(n_steps=7)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p, state = params, jax.jit(tx.init)(params)
  for x, y in zip(xs, ys):
    x, y = jax.device_put((x, y), batch_sharding)
    p, state = step(p, state, x, y)
  assert_same_shardings(p, shardings)
  assert_same_shardings(state.slow_params, shardings)
  ref_params, ref_state = single_device_run(tx, init_mlp(), xs, ys)
  assert_trees_close(p, ref_params, atol=1e-5)
  assert_trees_close(
      state.slow_params, ref_state.slow_params, atol=1e-5)


def test_explicit_sharding_mode():
  """Meshes with `AxisType.Explicit` axes (the default of `jax.make_mesh`)."""
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(4, 16),
                                  P(None, "model"))}
    tx = lo.lookahead(optax.sgd(0.5), sync_period=2, slow_step_size=0.75)
    state = jax.jit(tx.init)(params)
    assert jax.typeof(state.slow_params["w"]).sharding.spec == P(
        None, "model")

    @jax.jit
    def step(params, state):
      grads = params  # gradient of 0.5 * |w|^2
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    p = params
    for _ in range(2):
      p, state = step(p, state)
  # w -> w/2 -> w/4, then the sync lands 0.75 of the way from w to w/4:
  # w + 0.75 (w/4 - w) = 7w/16.
  expected = np.arange(64.0, dtype=np.float32).reshape(4, 16) * 0.4375
  assert_bitwise(p["w"], expected)
  assert_bitwise(state.slow_params["w"], expected)
  assert jax.typeof(p["w"]).sharding.spec == P(None, "model")


# --------------------------------------------------------------------------
# Abstract init and shard_map.


def test_eval_shape_init_allocates_nothing():
  # 2**34 float32s (64 GiB): only an abstract init can handle it here.
  params = {
      "embed": jax.ShapeDtypeStruct((2**24, 2**10), jnp.bfloat16),
      "bias": jax.ShapeDtypeStruct((2**10,), jnp.float32),
  }
  tx = lo.lookahead(optax.adamw(1e-3), inner_state="pullback",
                    slow_dtype=jnp.float32)
  abstract = jax.eval_shape(tx.init, params)
  assert isinstance(abstract, lo.LookaheadState)
  slow = abstract.slow_params
  assert slow["embed"].shape == (2**24, 2**10)
  assert slow["embed"].dtype == jnp.float32  # slow_dtype
  assert slow["bias"].dtype == jnp.float32
  assert abstract.step.shape == () and abstract.step.dtype == jnp.int32
  adam = abstract.inner_state.synced_inner_state[0]
  assert adam.mu["embed"].shape == (2**24, 2**10)
  assert adam.mu["embed"].dtype == jnp.bfloat16
  # The abstract state feeds `jit(..., out_shardings=...)` and checkpoint
  # restore targets; here, on a small model, the result matches `init`.
  small = init_mlp()
  abstract = jax.eval_shape(tx.init, small)
  state = tx.init(small)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert (a.shape, a.dtype) == (s.shape, s.dtype)


def test_shard_map_update_on_parameter_shards():
  """The update is elementwise: each device updates its own param shard."""
  mesh, specs, batch_spec = fsdp_layout()
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = lo.lookahead(optax.adam(0.05), sync_period=2, slow_step_size=0.5,
                    inner_state="pullback")
  params = init_mlp()
  xs, ys = make_batches(n_steps=5)
  state = tx.init(params)
  # The state's PartitionSpecs: param-shaped leaves sharded like the params,
  # the step counts replicated.
  state_specs = optax.tree_utils.tree_map_params(
      tx, lambda _, spec: spec, state, specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P))
  assert state_specs.slow_params == specs
  assert state_specs.inner_state.synced_inner_state[0].nu == specs
  assert state_specs.step == P()

  sharded_update = jax.jit(jax.shard_map(
      tx.update, mesh=mesh,
      in_specs=(specs, state_specs, specs),
      out_specs=(specs, state_specs)))

  @functools.partial(jax.jit, out_shardings=shardings)
  def grad_fn(params, x, y):
    return jax.grad(loss_fn)(params, x, y)

  p = jax.device_put(params, shardings)
  s = jax.device_put(state, jax.tree.map(
      lambda spec: NamedSharding(mesh, spec), state_specs))
  ref_p, ref_s = params, state
  ref_update = jax.jit(tx.update)
  for t, (x, y) in enumerate(zip(xs, ys)):
    grads = grad_fn(p, x, y)
    # The same update on one device from the same gradients, state and
    # params: another compiled program (whole leaves, not one device's
    # shard, so other loop bounds and vector remainders), so to an ulp or
    # two, not bitwise. n = 2: with the single-device update compiled without
    # FMA (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2) and the sharded one with it,
    # they differed by at most 1 ulp at this scale (up to 128 of a cancelling
    # element's own).
    host_grads, host_s, host_p = jax.device_get((grads, s, p))
    want_updates, want_s = ref_update(host_grads, host_s, host_p)
    want_p = optax.apply_updates(host_p, want_updates)
    updates, s = sharded_update(grads, s, p)
    p = optax.apply_updates(p, updates)
    assert_tree_within_ulps(p, want_p, 2, scale="kind",
                            msg=f"params, step {t + 1}")
    assert_tree_within_ulps(s, want_s, 2, scale="kind",
                            msg=f"state, step {t + 1}")
    if (t + 1) % 2 == 0:  # a sync: the slow weights are `p + update`, one
      assert_tree_bitwise(p, s.slow_params)  # add, as in apply_updates
    # And the single-device loop on its own, fed the same gradients.
    ref_updates, ref_s = ref_update(host_grads, ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, ref_updates)
  assert_same_shardings(p, shardings)
  assert_same_shardings(s.slow_params, shardings)
  # The loop on its own: 6e-8 apart at most in the measurement above.
  assert_trees_close(p, ref_p, atol=1e-6)
  assert_trees_close(s.slow_params, ref_s.slow_params, atol=1e-6)
  assert int(s.step) == 5


def test_shard_map_data_parallel_step():
  """Replicated params, batch split over `data`, gradients averaged."""
  mesh, _, batch_spec = fsdp_layout()
  tx = lo.lookahead(optax.sgd(0.1, momentum=0.9), sync_period=3,
                    slow_step_size=0.5)
  params = init_mlp()
  xs, ys = make_batches(n_steps=7)

  def local_step(params, state, x, y):
    # The params are replicated (unvarying over `data`): differentiating the
    # mean over devices of the local losses gives the full-batch gradient,
    # replicated (shard_map's transpose inserts the psum).
    global_loss = lambda p: jax.lax.pmean(loss_fn(p, x, y), "data")
    grads = jax.grad(global_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(
      local_step, mesh=mesh,
      in_specs=(P(), P(), batch_spec, batch_spec), out_specs=(P(), P())))
  p, state = params, tx.init(params)
  for x, y in zip(xs, ys):
    p, state = step(p, state, x, y)
  ref_params, ref_state = single_device_run(tx, params, xs, ys)
  assert_trees_close(p, ref_params, atol=1e-5)
  assert_trees_close(state.slow_params, ref_state.slow_params, atol=1e-5)


# --------------------------------------------------------------------------
