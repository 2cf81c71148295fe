"""`lookahead` over row-sparse updates (`SparseRows`, `rows_per_step`).

The row-sparse sync and the dense one are two programs (even eagerly: the
row-sparse sync runs in a `jax.lax.cond`, which is compiled), which XLA may
round differently (a multiply-add contracted into an FMA in one and not in the
other): they are compared one step at a time from the same params and state,
to an ulp or two, and along a run at a tolerance that still tells a wrong sync
apart. Within one program, the params land on the slow weights bitwise at a
sync, and rows never touched keep their bits.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bitwise
from tests._helpers import assert_tree_bitwise
from tests._helpers import assert_tree_within_ulps
from tests._helpers import bits

V, D, N, K = 40, 3, 5, 3


def _assert_step_within_ulps(actual, expected, before, n, msg=""):
  """(params, lookahead state) of one step of two programs from `before`.

  The params and slow weights at the weights' scale, each inner state element
  at its own or its value before the step; the step count equal. The row
  buffers (`cycle_rows`) are the row-sparse run's alone and not compared.
  """
  (p_a, s_a), (p_e, s_e) = actual, expected
  weights = max(float(np.max(np.abs(np.asarray(x, np.float64))))
                for x in jax.tree.leaves((p_e, s_e.slow_params)))
  assert_tree_within_ulps(p_a, p_e, n, "leaf", weights, f"{msg} params")
  assert_tree_within_ulps(s_a.slow_params, s_e.slow_params, n, "leaf", weights,
                          f"{msg} slow")
  assert_tree_within_ulps(s_a.inner_state, s_e.inner_state, n,
                          "leaf", before[1].inner_state,
                          f"{msg} inner state")
  assert_bitwise(s_a.step, s_e.step, f"{msg} step")


def _dense_state(state):
  """A row-sparse run's lookahead state, for the dense step (no row buffers)."""
  return state._replace(cycle_rows=None)


def _assert_trees_close(actual, expected, atol, msg=""):
  for i, (a, e) in enumerate(zip(jax.tree.leaves(actual),
                                 jax.tree.leaves(expected))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0,
                               atol=atol, err_msg=f"{msg} leaf {i}")


def make_tx(sparse, alpha=0.3):
  inner = lo.lazy(optax.adam(0.1), mask={"embed": True, "w": False})
  return lo.lookahead(inner, K, alpha,
                      rows_per_step={"embed": N} if sparse else None)


def batches(steps, seed=0, high=12):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    ids = jnp.asarray(rng.integers(0, high, size=N), jnp.int32)  # duplicates
    vals = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    yield lo.SparseRows(ids, vals)


def init_params(seed=1):
  rng = np.random.default_rng(seed)
  return {"embed": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
          "w": jnp.asarray([1.0, -0.5], jnp.float32)}


def copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_sparse_sync_matches_dense_lazy_lookahead_eagerly():
  params0 = init_params()
  txs, txd = make_tx(True), make_tx(False)
  ps, pd = copy(params0), copy(params0)
  ss, sd = txs.init(ps), txd.init(pd)
  for t, g in enumerate(batches(2 * K + 1)):
    gs = {"embed": g, "w": jnp.array([0.3, -0.2])}
    gd = {"embed": g.todense(V), "w": gs["w"]}
    # The dense step from the row-sparse run's params and state.
    before = (ps, ss)
    u, same_s = txd.update(gd, _dense_state(ss), ps)
    same_p = optax.apply_updates(ps, u)
    u, ss = txs.update(gs, ss, ps)
    ps = optax.apply_updates(ps, u)
    # n = 2: a step is a few roundings of elementwise arithmetic; with the
    # row-sparse side's `cond` compiled with FMA and the dense side without
    # (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2) they differed by at most 1 ulp at
    # these scales.
    _assert_step_within_ulps((ps, ss), (same_p, same_s), before, 2,
                             f"step {t + 1}")
    if (t + 1) % K == 0:  # the row-sparse step lands on its own slow weights
      assert_tree_bitwise(ps, lo.slow_params(ss), f"step {t + 1}")
    # The dense run on its own: 3e-8 apart at most (measured); a sync moves
    # the touched rows by ~0.1 and an Adam step by ~0.1.
    u, sd = txd.update(gd, sd, pd)
    pd = optax.apply_updates(pd, u)
    _assert_trees_close((ps, lo.slow_params(ss)), (pd, lo.slow_params(sd)),
                        1e-6, f"step {t + 1}")


def test_untouched_rows_bitwise_and_params_land_on_slow_jit_donated():
  params0 = init_params()
  tx = make_tx(True, alpha=0.8)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g):
    u, s = tx.update({"embed": g, "w": jnp.array([0.3, -0.2])}, s, p)
    return optax.apply_updates(p, u), s

  p, s = copy(params0), tx.init(copy(params0))
  for t, g in enumerate(batches(4 * K, high=12)):
    p, s = step(p, s, g)
    table, slow = np.asarray(p["embed"]), np.asarray(lo.slow_params(s)["embed"])
    # Rows 12.. are never looked up: bitwise their initial values.
    np.testing.assert_array_equal(bits(table[12:]),
                                  bits(np.asarray(params0["embed"])[12:]))
    np.testing.assert_array_equal(bits(slow[12:]),
                                  bits(np.asarray(params0["embed"])[12:]))
    if (t + 1) % K == 0:
      np.testing.assert_array_equal(bits(table), bits(slow))
    assert s.cycle_rows["embed"].ids.shape == (K * N,)
    assert s.cycle_rows["embed"].owner.shape == (params0["embed"].shape[0],)


def test_sync_interpolates_cycle_rows_by_hand():
  # SGD(1) lazy on a 4-row table, k = 2, alpha = 0.3: row 1 touched at step
  # 1 (grad 2), row 3 at step 2 (grad -1); both move, then the sync.
  params = {"embed": jnp.zeros((4, 1)), "w": jnp.zeros(1)}
  inner = lo.lazy(optax.sgd(1.0), mask={"embed": True, "w": False})
  tx = lo.lookahead(inner, 2, 0.3, rows_per_step={"embed": 1})
  s = tx.init(params)
  for ids, val in (([1], 2.0), ([3], -1.0)):
    g = {"embed": lo.SparseRows(jnp.array(ids), jnp.full((1, 1), val)),
         "w": jnp.zeros(1)}
    u, s = tx.update(g, s, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_allclose(params["embed"][:, 0], [0.0, -0.6, 0.0, 0.3],
                             rtol=1e-6)
  np.testing.assert_array_equal(bits(params["embed"]),
                                bits(lo.slow_params(s)["embed"]))


def test_step_does_not_pass_over_the_table():
  big = 200_000
  params = {"embed": jnp.zeros((big, 8)), "w": jnp.zeros(2)}
  inner = lo.lazy(optax.adam(0.1), mask={"embed": True, "w": False})
  tx = lo.lookahead(inner, 4, 0.5, rows_per_step={"embed": 64})
  state = tx.init(params)
  g = {"embed": lo.SparseRows(jnp.arange(64), jnp.ones((64, 8))),
       "w": jnp.ones(2)}

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, g).compile()
  table_bytes = big * 8 * 4
  # No temporary of the table's size: the table and its moments are updated
  # in place, row by row.
  assert compiled.memory_analysis().temp_size_in_bytes < table_bytes // 10


def test_sparse_update_without_rows_per_step_raises():
  params = init_params()
  tx = make_tx(False)
  state = tx.init(params)
  g = {"embed": next(batches(1)), "w": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"leaf \['embed'\].*`rows_per_step`"):
    tx.update(g, state, params)


def test_wrong_number_of_ids_raises():
  params = init_params()
  tx = make_tx(True)
  state = tx.init(params)
  g = {"embed": lo.SparseRows(jnp.arange(N + 1), jnp.ones((N + 1, D))),
       "w": jnp.zeros(2)}
  with pytest.raises(ValueError, match=f"has {N + 1} ids but `rows_per_step` "
                     f"declared {N}"):
    tx.update(g, state, params)


def test_sparse_tables_need_default_options():
  inner = lo.lazy(optax.adam(0.1), mask={"embed": True, "w": False})
  with pytest.raises(ValueError, match="default options only"):
    lo.lookahead(inner, K, inner_state="reset", rows_per_step={"embed": N})


def test_rows_per_step_errors():
  params = init_params()
  with pytest.raises(ValueError, match="does not match any parameter"):
    make = lo.lookahead(optax.sgd(0.1), K, rows_per_step={"table": 4})
    make.init(params)
  with pytest.raises(TypeError, match="`sync_period` must be a Python int"):
    lo.lookahead(optax.sgd(0.1), jnp.array(3), rows_per_step={"embed": 4})


def test_pmap_data_parallel_combines_rows_by_all_gather():
  # Each of 8 devices looks up its own ids. Data parallelism averages the
  # gradients: for row-sparse ones, gather every device's (ids, values / 8)
  # into one SparseRows of 8 N ids (duplicates sum), the same on all devices.
  devices = 8
  params0 = init_params()
  inner = lo.lazy(optax.adam(0.1), mask={"embed": True, "w": False})
  tx = lo.lookahead(inner, K, 0.3, rows_per_step={"embed": devices * N})
  batches_ = list(batches(2 * K * devices, seed=3))

  def combine(g):
    ids = jax.lax.all_gather(g.ids, "d", tiled=True)
    values = jax.lax.all_gather(g.values / devices, "d", tiled=True)
    return lo.SparseRows(ids, values)

  def step(p, s, ids, values):
    g = {"embed": combine(lo.SparseRows(ids, values)),
         "w": jax.lax.pmean(jnp.array([0.3, -0.2]), "d")}
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, g

  pstep = jax.pmap(step, axis_name="d")
  p = jax.tree.map(lambda x: jnp.stack([x] * devices), params0)
  s = jax.pmap(tx.init)(p)
  # The reference: one device (jitted, another program than the pmapped
  # step), the 8 devices' rows concatenated.
  ref_tx = lo.lookahead(inner, K, 0.3, rows_per_step={"embed": devices * N})
  ref_update = jax.jit(ref_tx.update)
  rp, rs = copy(params0), ref_tx.init(copy(params0))
  # Device 0's copy and the stacked batches as NumPy (no eager slicing or
  # stacking programs to compile).
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], tree)  # pylint: disable=unnecessary-lambda-assignment
  for t in range(2 * K):
    chunk = batches_[t * devices:(t + 1) * devices]
    ids = np.stack([np.asarray(b.ids) for b in chunk])
    values = np.stack([np.asarray(b.values) for b in chunk])
    before = first((p, s))
    p, s, used = pstep(p, s, ids, values)
    table = np.asarray(p["embed"])
    assert (table == table[0]).all()  # every device holds the same params
    # The gathered gradient is the devices' rows concatenated (/ 8 is exact).
    g = {"embed": lo.SparseRows(ids.reshape(-1),
                                values.reshape(-1, D) / devices),
         "w": jnp.array([0.3, -0.2])}
    used = first(used)
    assert_bitwise(used["embed"].ids, g["embed"].ids)
    assert_bitwise(used["embed"].values, g["embed"].values)
    # One reference step from device 0's params and state, with the very
    # gradient it used (`pmean` may round the dense one): n = 2 as in the
    # eager test above.
    u, same_s = ref_update(used, before[1], before[0])
    _assert_step_within_ulps(
        first((p, s)), (optax.apply_updates(before[0], u), same_s), before,
        2, f"step {t + 1}")
    # The reference run on its own; an Adam step here moves a weight by ~0.1
    # (the runs drift apart by a few 1e-7 at most).
    u, rs = ref_update(g, rs, rp)
    rp = optax.apply_updates(rp, u)
    np.testing.assert_allclose(table[0], rp["embed"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(lo.slow_params(s)["embed"])[0], np.asarray(p["embed"])[0])


def test_duplicate_stale_and_out_of_range_ids_by_hand():
  # SGD(1) lazy on a 5-row table, k = 2, N = 2, alpha = 0.25. Cycle 1: row 1
  # twice in one step (grads 1 and 2 sum), then row 3 and the padding id 7.
  # Cycle 2: rows 3 and 0, then row 2 twice; row 1 (synced in cycle 1, its
  # slot now reused by row 0) must not move again.
  params = {"embed": jnp.zeros((5, 1)), "w": jnp.zeros(1)}
  inner = lo.lazy(optax.sgd(1.0), mask={"embed": True, "w": False})
  tx = lo.lookahead(inner, 2, 0.25, rows_per_step={"embed": 2})
  step = jax.jit(functools.partial(_apply, tx), donate_argnums=(0, 1))
  s = tx.init(params)
  expected_after = {2: [0.0, -0.75, 0.0, 0.25, 0.0],
                    4: [1.0, -0.75, -0.5, -0.25, 0.0]}
  batches_ = (([1, 1], [1.0, 2.0]), ([3, 7], [-1.0, 5.0]),
              ([3, 0], [2.0, -4.0]), ([2, 2], [1.0, 1.0]))
  for t, (ids, vals) in enumerate(batches_, start=1):
    g = {"embed": lo.SparseRows(jnp.array(ids), jnp.array(vals)[:, None]),
         "w": jnp.zeros(1)}
    params, s = step(params, s, g)
    if t in expected_after:
      np.testing.assert_array_equal(params["embed"][:, 0], expected_after[t])
      np.testing.assert_array_equal(bits(params["embed"]),
                                    bits(lo.slow_params(s)["embed"]))


def _apply(tx, p, s, g):
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s


@hypothesis.settings(deadline=None, max_examples=10, derandomize=True)
@hypothesis.given(
    k=st.integers(1, 4), n=st.integers(1, 4),
    alpha=st.floats(0.05, 0.95), seed=st.integers(0, 2**16),
    low=st.sampled_from([0, -2]))
def test_sparse_sync_matches_dense_lazy_jit_donated_property(k, n, alpha,
                                                              seed, low):
  # Random ids with duplicates, and (low = -2, high = V + 2) out-of-range
  # ones, over several cycles: the row-sparse path under jit with donation
  # against the dense lazy path (another program: each step from the same
  # params and state to an ulp or two, and the dense run on its own close);
  # within the row-sparse program the params land on the slow weights
  # bitwise.
  rows = 6
  rng = np.random.default_rng(seed)
  params0 = {"embed": jnp.asarray(rng.normal(size=(rows, 2)), jnp.float32),
             "w": jnp.asarray([0.5], jnp.float32)}
  inner = lo.lazy(optax.adam(0.1), mask={"embed": True, "w": False})
  txs = lo.lookahead(inner, k, alpha, rows_per_step={"embed": n})
  txd = lo.lookahead(inner, k, alpha)
  steps = {name: jax.jit(functools.partial(_apply, tx), donate_argnums=(0, 1))
           for name, tx in (("sparse", txs), ("dense", txd))}
  ps, pd = copy(params0), copy(params0)
  ss, sd = txs.init(ps), txd.init(pd)
  high = rows + 2 if low < 0 else rows
  for t in range(3 * k + 1):
    ids = jnp.asarray(rng.integers(low, high, size=n), jnp.int32)
    g = lo.SparseRows(ids, jnp.asarray(rng.normal(size=(n, 2)), jnp.float32))
    w = jnp.asarray([rng.normal()], jnp.float32)
    gd = {"embed": g.todense(rows), "w": w}
    # The dense step from the row-sparse run's params and state (copies: the
    # steps donate them).
    before = jax.device_get((ps, ss))
    same = jax.device_get(steps["dense"](*copy((ps, _dense_state(ss))), gd))
    ps, ss = steps["sparse"](ps, ss, {"embed": g, "w": w})
    pd, sd = steps["dense"](pd, sd, gd)
    # n = 2: as in the eager test (at most 1 ulp over 12 random cases with
    # one side compiled without FMA).
    _assert_step_within_ulps(jax.device_get((ps, ss)), same, before, 2,
                             f"step {t + 1}")
    # The dense run on its own: 2.4e-7 apart at most over 30 random cases
    # (measured); an Adam step and a sync here move a weight by ~0.1.
    _assert_trees_close((ps, lo.slow_params(ss)), (pd, lo.slow_params(sd)),
                        1e-5, f"step {t + 1}")
    if (t + 1) % k == 0:
      np.testing.assert_array_equal(bits(ps["embed"]),
                                    bits(lo.slow_params(ss)["embed"]))
