"""Tests of `lazy`: lazy (row-sparse) updates for embedding tables.

Two differently compiled programs (`lazy` under `jax.jit` and a jitted
reference, a dense and a `SparseRows` step, `pmap` and one device) may round
the same arithmetic differently (a multiply-add contracted into an FMA in one
and not in the other, depending on the CPU's vector ISA): they are compared
one step at a time from the same params and state, to an ulp or two at the
scale of the operands, and along a run at a tolerance that still tells a
wrong step apart. Eagerly (op by op, the same ops) and within one program the
comparisons are bitwise, and so are rows that a step does not touch.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_bitwise
from tests._helpers import assert_tree_within_ulps

V, D = 40, 3
LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def _weights(params):
  """The scale of the weights: their largest magnitude."""
  return max(float(np.max(np.abs(np.asarray(x, np.float64))))
             for x in jax.tree.leaves(params))


def _assert_trees_close(actual, expected, atol, msg=""):
  """Leafwise |actual - expected| <= atol (two runs, each on its own)."""
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, f"{msg} structure {tree_a} != {tree_e}"
  for i, (a, e) in enumerate(zip(flat_a, flat_e)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0,
                               atol=atol, err_msg=f"{msg} leaf {i}")


def _batch(rng, num_ids=8, num_rows=V, dim=D):
  """Random ids (with duplicates) and the dense gradient of their lookup."""
  ids = rng.integers(0, num_rows, size=num_ids)
  ids[1] = ids[0]  # Always a duplicate.
  rows = rng.standard_normal((num_ids, dim)).astype(np.float32)
  grads = np.zeros((num_rows, dim), np.float32)
  np.add.at(grads, ids, rows)  # Duplicate ids are summed.
  return ids, grads


# The Adam arithmetic of one row, written out by hand and compiled with
# `jax.jit`, as the optimizer step is. It is another program than the step,
# which XLA may round differently (an FMA in one and not in the other), so
# each step is compared from the same state to an ulp or two.
@jax.jit
def _adam_rows(m, v, g, t):
  m = (1 - B1) * g + B1 * m
  v = (1 - B2) * g**2 + B2 * v
  m_hat = m / (1 - B1**t).astype(jnp.float32)
  v_hat = v / (1 - B2**t).astype(jnp.float32)
  return (m_hat / (jnp.sqrt(v_hat + 0.0) + EPS)) * -LR, m, v


def _reference_step(refs, rows, grad_rows, t):
  """LazyAdam by hand: Adam on `rows` of the reference (p, m, v), in place."""
  p_ref, m_ref, v_ref = refs
  u, m, v = _adam_rows(m_ref[rows], v_ref[rows], grad_rows, jnp.int32(t))
  p_ref[rows] += np.asarray(u)
  m_ref[rows], v_ref[rows] = m, v


def _assert_lazy_adam_step(params, adam, before, grads, rows, t):
  """One LazyAdam step (params, Adam state) against the hand one from the
  same params and state `before`: the touched `rows` to an ulp or two, the
  others bitwise unchanged; the global count."""
  p0, adam0 = before
  p0, mu0, nu0 = (np.array(x, np.float32) for x in (p0, adam0.mu, adam0.nu))
  want = (p0.copy(), mu0.copy(), nu0.copy())
  _reference_step(want, rows, grads[rows], t)
  got = tuple(np.asarray(x) for x in (params, adam.mu, adam.nu))
  untouched = np.setdiff1d(np.arange(len(p0)), rows)
  for name, g, w in zip(("params", "mu", "nu"), got, want):
    assert_bitwise(g[untouched], w[untouched], f"step {t} untouched {name}")
  # n = 2: one step of elementwise arithmetic (the params at the weights'
  # scale, a moment at its own or its value before the step); with one side
  # compiled without FMA (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2) the two agreed
  # to 1 ulp at these scales.
  assert_tree_within_ulps(got[0], want[0], 2, "leaf", _weights(p0),
                          f"step {t} params")
  assert_tree_within_ulps(got[1:], want[1:], 2, "leaf", (mu0, nu0),
                          f"step {t} moments")
  assert int(adam.count) == t  # Global step for bias correction.


def _assert_matches_reference_run(params, adam_state, refs, msg=""):
  """Against the hand reference run on its own, from the start.

  The two runs drift apart by the roundings of each step (a few 1e-7 at
  most); 1e-5 is a thousandth of one Adam step (LR = 1e-2), and a wrong
  moment decay or bias correction moves the moments by more than 1e-3.
  """
  _assert_trees_close((params, adam_state.mu, adam_state.nu), refs, 1e-5, msg)


def _jit_update(tx):
  return jax.jit(lambda g, s, p, ids=None: tx.update(g, s, p, touched_rows=ids))


@pytest.mark.parametrize("pass_ids", [False, True])
def test_matches_lazyadam_reference(pass_ids):
  """LazyAdam/SparseAdam by hand: only the rows in the batch move."""
  rng = np.random.default_rng(0)
  tx = lo.lazy(optax.adam(LR, B1, B2, EPS))
  update = _jit_update(tx)
  p_ref = rng.standard_normal((V, D)).astype(np.float32)
  m_ref, v_ref = np.zeros_like(p_ref), np.zeros_like(p_ref)
  params = jnp.asarray(p_ref)
  state = tx.init(params)
  for t in range(1, 13):
    ids, grads = _batch(rng)
    if pass_ids and t % 3 == 0:
      # A looked-up row whose gradient is exactly zero still counts.
      zero_row = int(np.setdiff1d(np.arange(V), ids)[0])
      ids = np.append(ids, zero_row)
    before = (np.asarray(params), jax.device_get(state.inner_state[0]))
    updates, state = update(jnp.asarray(grads), state, params,
                            jnp.asarray(ids) if pass_ids else None)
    params = np.asarray(params) + np.asarray(updates)
    rows = np.unique(ids)
    _assert_lazy_adam_step(params, state.inner_state[0], before, grads, rows,
                           t)
    untouched = np.setdiff1d(np.arange(V), rows)
    assert_bitwise(np.asarray(updates)[untouched],
                   np.zeros((untouched.size, D), np.float32))
    _reference_step((p_ref, m_ref, v_ref), rows, grads[rows], t)
    _assert_matches_reference_run(params, state.inner_state[0],
                                  (p_ref, m_ref, v_ref), f"step {t}")


def test_zero_gradient_row_counts_only_with_ids():
  tx = lo.lazy(optax.sgd(1.0, momentum=0.5))
  params = jnp.zeros((3, 2))
  state = tx.init(params)
  _, state = tx.update(jnp.ones((3, 2)), state, params)
  grads = jnp.zeros((3, 2))
  updates, frozen = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates, np.zeros((3, 2)))
  np.testing.assert_array_equal(frozen.inner_state[0].trace, np.ones((3, 2)))
  updates, moved = tx.update(grads, state, params, touched_rows=jnp.array([1]))
  np.testing.assert_array_equal(updates, [[0, 0], [-0.5, -0.5], [0, 0]])
  np.testing.assert_array_equal(
      moved.inner_state[0].trace, [[1, 1], [0.5, 0.5], [1, 1]])


def test_nan_gradient_row_is_touched():
  tx = lo.lazy(optax.sgd(1.0))
  grads = jnp.array([[0.0, jnp.nan], [0.0, -0.0], [jnp.inf, 0.0]])
  updates, _ = tx.update(grads, tx.init(jnp.zeros((3, 2))), jnp.zeros((3, 2)))
  np.testing.assert_array_equal(
      updates, [[-0.0, np.nan], [0.0, 0.0], [-np.inf, -0.0]])


def test_untouched_rows_bitwise_unchanged():
  rng = np.random.default_rng(1)
  tx = lo.lazy(optax.adamw(0.1, weight_decay=0.5))
  update = _jit_update(tx)
  params = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
  state = tx.init(params)
  _, grads = _batch(rng, num_ids=30)  # A dense-ish first step.
  updates, state = update(jnp.asarray(grads), state, params)
  params = optax.apply_updates(params, updates)
  for _ in range(4):
    ids, grads = _batch(rng)
    before_p, before_s = np.asarray(params), jax.tree.map(np.asarray, state)
    updates, state = update(jnp.asarray(grads), state, params)
    params = optax.apply_updates(params, updates)
    untouched = np.setdiff1d(np.arange(V), ids)
    # Params, first and second moments: bitwise, weight decay not applied.
    np.testing.assert_array_equal(
        np.asarray(params)[untouched], before_p[untouched])
    adam, old = state.inner_state[0], before_s.inner_state[0]
    np.testing.assert_array_equal(np.asarray(adam.mu)[untouched],
                                  old.mu[untouched])
    np.testing.assert_array_equal(np.asarray(adam.nu)[untouched],
                                  old.nu[untouched])
    assert not np.any(np.asarray(params)[np.unique(ids)]
                      == before_p[np.unique(ids)])


def _row_reference(inner, p0, batches):
  """Each row as its own optimizer, stepped only when touched.

  Integer scalar leaves of a row's state (step counts) are set to the global
  step before each update, as lazy optimizers count steps globally.
  """
  p = p0.copy()
  states = [inner.init(jnp.asarray(p0[r])) for r in range(len(p0))]
  row_update = jax.jit(inner.update)
  for t, (ids, grads) in enumerate(batches):
    for r in np.unique(ids):
      state = jax.tree.map(
          lambda x: jnp.full_like(x, t)
          if jnp.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.integer) else x,
          states[r])
      u, states[r] = row_update(jnp.asarray(grads[r]), state,
                                jnp.asarray(p[r]))
      p[r] = p[r] + np.asarray(u)
  return p


def _row_state(state, r, shape):
  """Row `r` of the table-shaped leaves of an inner state (scalars as they are)."""
  return jax.tree.map(lambda x: x[r] if np.shape(x) == shape else x, state)


@pytest.mark.parametrize("name", ["adamw", "radam", "sgd_momentum", "chain"])
def test_inner_optimizers_match_rowwise_reference(name):
  """Lazy `inner` on a table is `inner` on each touched row by itself.

  Each step against the rows' own steps from the same state (another
  program: to an ulp or two), and the run against each row run as its own
  optimizer from the start (at a tolerance).
  """
  inner = {
      "adamw": optax.adamw(0.05, weight_decay=0.1),
      "radam": optax.radam(0.05),
      "sgd_momentum": optax.sgd(0.1, momentum=0.9, nesterov=True),
      "chain": optax.chain(
          optax.scale_by_adam(), optax.add_decayed_weights(0.01),
          optax.scale_by_schedule(optax.linear_schedule(0.1, 0.01, 10)),
          optax.scale(-1.0)),
  }[name]
  num_rows, steps = 6, 8  # radam's rectified phase starts after step 5.
  rng = np.random.default_rng(2)
  p0 = rng.standard_normal((num_rows, D)).astype(np.float32)
  batches = [_batch(rng, num_ids=3, num_rows=num_rows) for _ in range(steps)]
  tx = lo.lazy(inner)
  update, row_update = _jit_update(tx), jax.jit(inner.update)
  params, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for t, (ids, grads) in enumerate(batches, start=1):
    before = jax.device_get(state.inner_state)
    updates, state = update(jnp.asarray(grads), state, params)
    after = jax.device_get(state.inner_state)
    touched = np.unique(ids)
    for r in range(num_rows):
      if r not in touched:  # Not computed: bitwise as before.
        assert_bitwise(np.asarray(updates)[r], np.zeros(D, np.float32))
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
          if np.shape(a) == p0.shape:  # (step counts advance)
            assert_bitwise(a[r], b[r], f"step {t} row {r} state")
        continue
      row_before = _row_state(before, r, p0.shape)
      u, row_after = row_update(jnp.asarray(grads[r]), row_before,
                                jnp.asarray(np.asarray(params)[r]))
      # n = 2: one step of elementwise arithmetic, the update at the weights'
      # scale (what it is added to), the state at its own or its value
      # before the step.
      assert_tree_within_ulps(np.asarray(updates)[r], u, 2,
                              "leaf", _weights(params),
                              f"step {t} row {r} update")
      assert_tree_within_ulps(_row_state(after, r, p0.shape), row_after,
                              2, "leaf", row_before, f"step {t} row {r} state")
    params = np.asarray(params) + np.asarray(updates)
  # The run against the rows run on their own: each step's roundings add up
  # to a few 1e-7 at most; 1e-5 is a thousandth of one step (lr >= 0.01).
  np.testing.assert_allclose(params, _row_reference(inner, p0, batches),
                             rtol=0, atol=1e-5)


def test_freeze_state_false_moves_state_densely():
  # Lazy and plain adam under jit are two programs: each step from the same
  # state to an ulp or two, and the two runs on their own close.
  rng = np.random.default_rng(3)
  adam = optax.adam(LR)
  tx = lo.lazy(adam, freeze_state=False)
  update, dense_update = _jit_update(tx), jax.jit(adam.update)
  p0 = rng.standard_normal((V, D)).astype(np.float32)
  params, state = p0.copy(), tx.init(jnp.asarray(p0))
  dense_state = adam.init(jnp.asarray(p0))
  for t in range(1, 6):
    ids, grads = _batch(rng)
    before = jax.device_get(state.inner_state)
    updates, state = update(jnp.asarray(grads), state, params)
    same_u, same_state = dense_update(jnp.asarray(grads), before)
    touched = np.isin(np.arange(V), ids)
    # Untouched rows: an update of exactly zero; touched rows, and the state
    # of every row, what adam gives from the same state (n = 2: one step of
    # elementwise arithmetic, the update at the weights' scale).
    assert_bitwise(np.asarray(updates)[~touched],
                   np.zeros(((~touched).sum(), D), np.float32))
    assert_tree_within_ulps(np.asarray(updates)[touched],
                            np.asarray(same_u)[touched], 2,
                            "leaf", _weights(params), f"step {t} updates")
    assert_tree_within_ulps(state.inner_state, same_state, 2, "leaf", before,
                            f"step {t} state")
    # Plain adam on its own (its moments drift by a few 1e-7 at most).
    dense_u, dense_state = dense_update(jnp.asarray(grads), dense_state)
    _assert_trees_close(state.inner_state, dense_state, 1e-5, f"step {t}")
    params = params + np.asarray(updates)


def _tree_params(rng):
  return {
      "emb": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
      "dense": {"w": jnp.asarray(rng.standard_normal((D, D)), jnp.float32),
                "b": jnp.asarray(rng.standard_normal((D,)), jnp.float32)},
  }


def _tree_grads(rng, params):
  ids, g_emb = _batch(rng)
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
      params)
  grads["emb"] = jnp.asarray(g_emb)
  grads["dense"]["w"] = grads["dense"]["w"].at[0].set(0.0)  # A zero row.
  return ids, grads


@pytest.mark.parametrize("mask", [
    None,  # Default: ndim >= 2, so "emb" and "dense/w".
    {"emb": True, "dense": False},  # A prefix of the params.
    lambda p: jax.tree.map(lambda x: x.shape[0] == V, p),  # From raw params.
])
def test_leaves_outside_mask_equal_plain_inner(mask):
  # Lazy and plain adam under jit are two programs: each step from the same
  # state to an ulp or two, and the two runs on their own close.
  rng = np.random.default_rng(4)
  params = _tree_params(rng)
  adam = optax.adam(LR)
  tx = lo.lazy(adam, mask=mask)
  update, dense_update = _jit_update(tx), jax.jit(adam.update)
  state, dense_state = tx.init(params), adam.init(params)
  lazy_w = mask is None
  for t in range(1, 4):
    ids, grads = _tree_grads(rng, params)
    before = jax.device_get(state.inner_state)
    updates, state = update(grads, state, params)
    same_u, same_state = dense_update(grads, before, params)
    # n = 2: one step of elementwise arithmetic (updates at the weights'
    # scale, moments at their own or their values before the step).
    close = lambda a, e, scale, what: assert_tree_within_ulps(  # pylint: disable=g-long-lambda,unnecessary-lambda-assignment
        a, e, 2, "leaf", scale, f"step {t} {what}")
    weights = _weights(params)
    close(updates["dense"]["b"], same_u["dense"]["b"], weights, "b")
    adam_state, same_adam = state.inner_state[0], same_state[0]
    for moment in ("mu", "nu"):
      close(getattr(adam_state, moment)["dense"]["b"],
            getattr(same_adam, moment)["dense"]["b"],
            getattr(before[0], moment)["dense"]["b"], f"{moment} b")
    if lazy_w:  # Row 0 of w has a zero gradient: frozen.
      assert_bitwise(updates["dense"]["w"][0], np.zeros(D, np.float32))
      close(updates["dense"]["w"][1:], same_u["dense"]["w"][1:], weights,
            "w")
    else:
      close(updates["dense"]["w"], same_u["dense"]["w"], weights, "w")
    untouched = np.setdiff1d(np.arange(V), ids)
    assert_bitwise(np.asarray(updates["emb"])[untouched],
                   np.zeros((untouched.size, D), np.float32))
    # Plain adam on its own: "b" outside the mask follows it (an update is
    # ~LR = 1e-2, the runs drift by a few 1e-8).
    dense_u, dense_state = dense_update(grads, dense_state, params)
    np.testing.assert_allclose(updates["dense"]["b"], dense_u["dense"]["b"],
                               rtol=0, atol=1e-6)
    params = optax.apply_updates(params, updates)
  # The second moment of "b" (no cancellation, so relative): a few ulps of
  # drift over the run; a wrong decay moves it by 1e-3 or more.
  np.testing.assert_allclose(state.inner_state[0].nu["dense"]["b"],
                             dense_state[0].nu["dense"]["b"], rtol=1e-5)


def test_lookahead_keeps_rows_untouched_during_a_cycle():
  rng = np.random.default_rng(5)
  k = 3
  tx = lo.lookahead(lo.lazy(optax.adam(0.1)), sync_period=k,
                    slow_step_size=0.5)
  update = _jit_update(tx)
  params = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
  p0 = np.asarray(params)
  state = tx.init(params)
  ever = set()
  for _ in range(4):
    start_p = np.asarray(params)
    start_slow = np.asarray(lo.slow_params(state))
    cycle = set()
    for _ in range(k):
      ids, grads = _batch(rng, num_ids=4)
      ids = ids % (V // 2)  # Rows V/2.. are never touched.
      grads = np.zeros((V, D), np.float32)
      np.add.at(grads, ids, rng.standard_normal((ids.size, D)))
      cycle.update(ids.tolist())
      updates, state = update(jnp.asarray(grads), state, params)
      params = optax.apply_updates(params, updates)
    ever |= cycle
    still = np.setdiff1d(np.arange(V), sorted(cycle))
    slow = np.asarray(lo.slow_params(state))
    # Synced, bitwise: the jitted step stores the slow weights as `p + u`
    # with the update it returns, and `apply_updates` here rounds that same
    # one addition.
    np.testing.assert_array_equal(np.asarray(params), slow)
    np.testing.assert_array_equal(slow[still], start_slow[still])
    np.testing.assert_array_equal(np.asarray(params)[still], start_p[still])
    moved = sorted(cycle)
    assert np.all(np.any(slow[moved] != start_slow[moved], axis=1))
  never = np.setdiff1d(np.arange(V), sorted(ever))
  assert never.size >= V // 2
  np.testing.assert_array_equal(np.asarray(params)[never], p0[never])


def test_touched_rows_pass_through_lookahead_and_chain():
  rng = np.random.default_rng(6)
  params = _tree_params(rng)
  inner = optax.chain(
      optax.clip_by_global_norm(1.0),
      lo.lazy(optax.adamw(1e-2), mask={"emb": True, "dense": False}))
  tx = lo.lookahead(inner, sync_period=5, slow_step_size=0.5)
  update = _jit_update(tx)
  state = tx.init(params)
  _, grads = _tree_grads(rng, params)
  grads["emb"] = grads["emb"].at[7].set(1.0)  # Row 7 gets momentum.
  updates, state = update(grads, state, params)
  params = optax.apply_updates(params, updates)
  grads = jax.tree.map(jnp.zeros_like, grads)
  without, _ = update(grads, state, params)
  with_ids, _ = update(grads, state, params, {"emb": jnp.array([7, 7])})
  np.testing.assert_array_equal(without["emb"], np.zeros((V, D)))
  assert np.all(np.asarray(with_ids["emb"][7]) < 0)  # Momentum step.
  np.testing.assert_array_equal(np.delete(np.asarray(with_ids["emb"]), 7, 0),
                                0.0)
  # Dense leaves are the same with or without ids: from the same state, but
  # the two calls trace two programs (ids or none), so to an ulp or two at
  # the weights' scale (n = 2: one adamw step of elementwise arithmetic).
  assert_tree_within_ulps(with_ids["dense"], without["dense"], 2,
                          "leaf", _weights(params["dense"]), "dense leaves")


def _group_state(state, k):
  """Group `k`'s state in an `optax.partition` state, as for `params[k]`."""
  inner = state.inner_states[k].inner_state
  return jax.tree.map(lambda x: x[k] if isinstance(x, dict) else x, inner,
                      is_leaf=lambda x: isinstance(x, dict))


def test_partition_with_two_lazy_groups():
  # The partition and each group's own optimizer are two programs: each
  # step from the same state to an ulp or two, and the runs on their own
  # close.
  rng = np.random.default_rng(7)
  params = {"a": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
            "w": jnp.asarray(rng.standard_normal((D, D)), jnp.float32)}
  lazy_a, lazy_b = lo.lazy(optax.adam(LR)), lo.lazy(optax.sgd(0.1, 0.9))
  tx = optax.partition(
      {"a": lazy_a, "b": lazy_b, "w": optax.adam(LR)},
      {"a": "a", "b": "b", "w": "w"})
  singles = {"a": lazy_a, "b": lazy_b, "w": lo.lazy(optax.adam(LR))}
  single_updates = {k: jax.jit(t.update) for k, t in singles.items()}
  update = _jit_update(tx)
  state = tx.init(params)
  single_states = {k: t.init(params[k]) for k, t in singles.items()}
  for t in range(1, 4):
    ids_a, g_a = _batch(rng)
    ids_b, g_b = _batch(rng)
    grads = {"a": jnp.zeros((V, D)), "b": jnp.asarray(g_b),
             "w": jnp.ones((D, D))}
    ids = {"a": jnp.asarray(ids_a), "b": jnp.asarray(ids_b)}
    before = jax.device_get(state)
    updates, state = update(grads, state, params, ids)
    for k in singles:
      # Group k's own optimizer from the partition's state for it ("w" is a
      # plain adam in the partition, a lazy one alone: all its rows move).
      group = _group_state(before, k)
      if k == "w":
        group = lo.LazyState(group)
      u, group_after = single_updates[k](grads[k], group, params[k],
                                         touched_rows=ids.get(k))
      got_after = _group_state(jax.device_get(state), k)
      if k == "w":
        got_after = lo.LazyState(got_after)
      # n = 2: one step of elementwise arithmetic (the update at the
      # weights' scale, the state at its own or its value before the step).
      assert_tree_within_ulps(updates[k], u, 2, "leaf", _weights(params[k]),
                              f"step {t} {k} update")
      assert_tree_within_ulps(got_after, group_after, 2, "leaf", group,
                              f"step {t} {k} state")
      # Each group's optimizer on its own (updates ~1e-2 to 0.3; the runs
      # drift by a few 1e-8).
      u, single_states[k] = single_updates[k](
          grads[k], single_states[k], params[k], touched_rows=ids.get(k))
      np.testing.assert_allclose(updates[k], u, rtol=0, atol=1e-6,
                                 err_msg=f"step {t} {k}")
    params = optax.apply_updates(params, updates)
  # "a" only ever had ids with zero gradients: adam moves by 0 / eps = 0.
  np.testing.assert_array_equal(updates["a"], 0.0)


def test_pmap_matches_per_device():
  n = jax.local_device_count()
  assert n == 8
  rng = np.random.default_rng(8)
  tx = lo.lazy(optax.adam(LR))
  params = jnp.asarray(rng.standard_normal((n, V, D)), jnp.float32)
  batches = [_batch(rng) for _ in range(n)]
  grads = jnp.stack([jnp.asarray(g) for _, g in batches])
  ids = jnp.stack([jnp.asarray(i) for i, _ in batches])
  state = jax.pmap(tx.init)(params)
  step = jax.pmap(lambda g, s, p, i: tx.update(g, s, p, touched_rows=i))
  updates, state = step(grads, state, params, ids)
  updates2, state2 = step(grads * 0, state, params, ids)
  # One device under jit is another program than pmap: each step from the
  # same state (the first from init, the second from pmap's state) to an
  # ulp or two (n = 2: one adam step of elementwise arithmetic, updates at
  # the weights' scale, the state at its own or its value before the step).
  single = _jit_update(tx)
  # Device d's inputs and outputs as NumPy: slicing them eagerly would
  # compile a program per device index, leaf shape and dtype.
  params, grads, ids, updates, state, updates2, state2 = jax.tree.map(
      np.asarray, (params, grads, ids, updates, state, updates2, state2))
  at = lambda tree, d: jax.tree.map(lambda x: x[d], tree)  # pylint: disable=unnecessary-lambda-assignment
  for d in range(n):
    weights = _weights(params[d])
    s0 = tx.init(params[d])
    u, s = single(grads[d], s0, params[d], ids[d])
    assert_tree_within_ulps(updates[d], u, 2, "leaf", weights, f"device {d}")
    assert_tree_within_ulps(at(state, d), s, 2, "leaf", s0, f"device {d}")
    u, s = single(grads[d] * 0, at(state, d), params[d], ids[d])
    assert_tree_within_ulps(updates2[d], u, 2, "leaf", weights, f"device {d}")
    assert_tree_within_ulps(at(state2, d), s, 2, "leaf", at(state, d),
                            f"device {d}")


def test_traced_ids_out_of_range_are_ignored():
  tx = lo.lazy(optax.sgd(1.0, momentum=0.5))
  params = jnp.zeros((4, 2))
  state = tx.init(params)
  _, state = tx.update(jnp.ones((4, 2)), state, params)
  update = _jit_update(tx)
  zeros = jnp.zeros((4, 2))
  u, _ = update(zeros, state, params, jnp.array([-1, 4, 100, 2]))
  np.testing.assert_array_equal(u, [[0, 0], [0, 0], [-0.5, -0.5], [0, 0]])


def test_jit_does_not_retrace_and_matches_eager_on_touched_rows():
  rng = np.random.default_rng(9)
  adam = optax.adam(LR)
  tx = lo.lazy(adam)
  params = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
  traces = []

  def step(g, s, p, ids):
    traces.append(1)
    return tx.update(g, s, p, touched_rows=ids)

  jitted = jax.jit(step)
  state = tx.init(params)
  for _ in range(3):
    ids, grads = _batch(rng)
    _, state = jitted(jnp.asarray(grads), state, params, jnp.asarray(ids))
  assert len(traces) == 1
  # Eager: bitwise what the eager dense inner gives on the touched rows (op
  # by op, the same ops: nothing is fused or contracted).
  ids, grads = _batch(rng)
  u, _ = tx.update(jnp.asarray(grads), state, params,
                   touched_rows=np.asarray(ids))
  dense_u, _ = adam.update(jnp.asarray(grads), state.inner_state, params)
  rows = np.unique(ids)
  np.testing.assert_array_equal(np.asarray(u)[rows], np.asarray(dense_u)[rows])


def test_state_is_lazy_state_and_donatable():
  tx = lo.lazy(optax.adam(LR))
  params = jnp.ones((V, D))
  state = tx.init(params)
  assert isinstance(state, lo.LazyState)
  step = jax.jit(lambda p, s, g: (lambda u, s: (p + u, s))(
      *tx.update(g, s, p)), donate_argnums=(0, 1))
  p, s = step(params, state, jnp.ones((V, D)))
  p, s = step(p, s, jnp.zeros((V, D)))
  assert int(s.inner_state[0].count) == 2


# Errors.


def test_error_mask_structure():
  params = {"emb": jnp.ones((V, D)), "w": jnp.ones((D, D))}
  with pytest.raises(ValueError, match=r"the params have \['w'\], the mask "
                     "does not"):
    lo.lazy(optax.adam(LR), mask={"emb": True}).init(params)
  with pytest.raises(ValueError, match=r"the mask has \['x'\], the params do "
                     "not"):
    lo.lazy(optax.adam(LR), mask={"emb": True, "w": False, "x": True}).init(
        params)
  with pytest.raises(ValueError, match="tree structure of the params"):
    lo.lazy(optax.adam(LR), mask=lambda p: [True, False]).init(params)


def test_error_mask_scalar_leaf():
  params = {"emb": jnp.ones((V, D)), "scale": jnp.ones(())}
  with pytest.raises(ValueError, match=r"selects leaf \['scale'\], which has "
                     "ndim 0"):
    lo.lazy(optax.adam(LR), mask={"emb": True, "scale": True}).init(params)
  # The default mask skips scalars.
  lo.lazy(optax.adam(LR)).init(params)


def test_error_mask_leaf_not_bool():
  params = {"emb": jnp.ones((V, D))}
  with pytest.raises(TypeError, match=r"`mask` leaf \['emb'\] must be a bool"):
    lo.lazy(optax.adam(LR), mask={"emb": "yes"}).init(params)


def test_error_touched_rows_outside_mask():
  params = {"emb": jnp.ones((V, D)), "w": jnp.ones((D, D))}
  tx = lo.lazy(optax.adam(LR), mask={"emb": True, "w": False})
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=r"ids for leaf \['w'\], which is "
                     "outside the mask"):
    tx.update(grads, state, params, touched_rows={"w": jnp.array([0])})
  with pytest.raises(ValueError, match=r"leaf \['x'\] does not match any "
                     "parameter leaf."):
    tx.update(grads, state, params, touched_rows={"x": jnp.array([0])})
  with pytest.raises(ValueError, match=r"leaf \['emb'\]\[0\] does not match "
                     r"any parameter leaf \(the ids of a leaf must be one "
                     r"integer array\)"):
    tx.update(grads, state, params, touched_rows={"emb": [1, 2]})


@pytest.mark.parametrize("bad", [V, -1])
def test_error_touched_rows_out_of_range(bad):
  params = {"emb": jnp.ones((V, D))}
  tx = lo.lazy(optax.adam(LR))
  state = tx.init(params)
  with pytest.raises(ValueError, match=(
      rf"`touched_rows` leaf \['emb'\] has id {bad} out of range: ids must be "
      rf"in \[0, {V}\)")):
    tx.update({"emb": jnp.zeros((V, D))}, state, params,
              touched_rows={"emb": np.array([[0, bad]])})


def test_error_touched_rows_not_integer():
  tx = lo.lazy(optax.adam(LR))
  params = jnp.ones((V, D))
  with pytest.raises(TypeError, match=r"`touched_rows` leaf <root> must hold "
                     "integer row ids, got dtype float32"):
    tx.update(params, tx.init(params), params,
              touched_rows=jnp.array([1.0]))


def test_error_bad_arguments():
  with pytest.raises(TypeError, match="`inner` must be an optax "
                     "GradientTransformation"):
    lo.lazy(lambda x: x)
  with pytest.raises(TypeError, match="`freeze_state` must be a bool, got 1."):
    lo.lazy(optax.adam(LR), freeze_state=1)
  tx = lo.lazy(optax.adam(LR))
  params = jnp.ones((V, D))
  with pytest.raises(TypeError, match="`state` must be a LazyState, got "
                     "tuple."):
    tx.update(params, optax.adam(LR).init(params), params)


# Row-sparse gradients: `SparseRows` at masked leaves.


def _sparse_batch(rng, num_ids=8, num_rows=V, dim=D, zero_row=False,
                  id_rows=None):
  """Ids (with a duplicate), their rows, and the dense gradient they give.

  The ids are drawn from `[0, id_rows)` (default: all `num_rows` rows).
  """
  ids = rng.integers(0, id_rows or num_rows, size=num_ids)
  ids[1] = ids[0]
  rows = rng.standard_normal((num_ids, dim)).astype(np.float32)
  if zero_row:
    rows[-1] = 0.0  # Looked up with an exactly-zero gradient.
  grads = np.zeros((num_rows, dim), np.float32)
  np.add.at(grads, ids, rows)
  return ids, rows, grads


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_nesterov", "chain"])
def test_sparse_path_matches_dense_lazy(name, use_jit):
  """SparseRows gradient == dense gradient + touched_rows.

  Bit for bit op by op (eager). Under `jax.jit` the two paths are two
  programs, which XLA may round differently (an FMA in one and not in the
  other): each step from the same params and state agrees to an ulp or two,
  and the two runs on their own stay close. Untouched rows are bitwise
  unchanged either way.
  """
  inner = {
      "adam": optax.adam(LR, B1, B2, EPS),
      "adamw": optax.adamw(0.05, weight_decay=0.3),
      "sgd_nesterov": optax.sgd(0.1, momentum=0.8, nesterov=True),
      "chain": optax.chain(
          optax.scale_by_adam(), optax.add_decayed_weights(0.01),
          optax.scale_by_schedule(optax.linear_schedule(0.1, 0.01, 10)),
          optax.scale(-1.0)),
  }[name]
  rng = np.random.default_rng(10)
  tx = lo.lazy(inner)
  if use_jit:
    update = _jit_update(tx)
  else:
    update = lambda g, s, p, ids=None: tx.update(g, s, p, touched_rows=ids)
  p0 = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
  dense_p, sparse_p = p0, p0
  dense_s, sparse_s = tx.init(p0), tx.init(p0)
  ever = set()
  for t in range(9):
    ids, rows, grads = _sparse_batch(rng, id_rows=V - 8,
                                     zero_row=t % 3 == 1)
    ever.update(ids.tolist())
    # The dense step from the row-sparse run's params and state.
    before = (sparse_p, jax.device_get(sparse_s))
    same_u, same_s = update(jnp.asarray(grads), sparse_s, sparse_p,
                            jnp.asarray(ids))
    u, dense_s = update(jnp.asarray(grads), dense_s, dense_p, jnp.asarray(ids))
    dense_p = optax.apply_updates(dense_p, u)
    su, sparse_s = update(lo.SparseRows(jnp.asarray(ids), jnp.asarray(rows)),
                          sparse_s, sparse_p)
    assert isinstance(su, lo.SparseRows)
    sparse_p = optax.apply_updates(sparse_p, su)
    if use_jit:
      # n = 2: one step of elementwise arithmetic, the update at the weights'
      # scale, the state at its own or its value before the step.
      assert_tree_within_ulps(su.todense(V), same_u, 2,
                              "leaf", _weights(before[0]),
                              f"step {t + 1} update")
      assert_tree_within_ulps(sparse_s, same_s, 2, "leaf", before[1],
                              f"step {t + 1} state")
      # The dense run on its own: the runs drift by a few 1e-7 at most; a
      # step here moves a weight by 1e-2 or more.
      _assert_trees_close((sparse_p, sparse_s), (dense_p, dense_s), 1e-5,
                          f"step {t + 1}")
    else:  # Eagerly the two runs are the same numbers.
      np.testing.assert_array_equal(su.todense(V), u)
      np.testing.assert_array_equal(sparse_p, dense_p)
      jax.tree.map(np.testing.assert_array_equal, sparse_s, dense_s)
      jax.tree.map(np.testing.assert_array_equal, sparse_s, same_s)
    untouched = np.setdiff1d(np.arange(V), ids)
    np.testing.assert_array_equal(su.todense(V)[untouched], 0.0)
  never = np.setdiff1d(np.arange(V), sorted(ever))
  assert never.size >= 8
  np.testing.assert_array_equal(np.asarray(sparse_p)[never],
                                np.asarray(p0)[never])
  for leaf in jax.tree.leaves(sparse_s):
    if jnp.shape(leaf) == (V, D):
      np.testing.assert_array_equal(np.asarray(leaf)[never], 0.0)


def test_sparse_path_matches_sparseadam_reference():
  """torch.optim.SparseAdam semantics by hand, with the sparse path.

  The jitted step and the hand step are two programs: each step from the
  same state to an ulp or two, the runs on their own close.
  """
  rng = np.random.default_rng(11)
  tx = lo.lazy(optax.adam(LR, B1, B2, EPS))
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)), donate_argnums=(0, 1))
  p_ref = rng.standard_normal((V, D)).astype(np.float32)
  m_ref, v_ref = np.zeros_like(p_ref), np.zeros_like(p_ref)
  params = jnp.asarray(p_ref)
  state = tx.init(params)
  never = np.arange(V - 10, V)  # Rows V-10.. are never looked up.
  for t in range(1, 25):
    ids, rows, _ = _sparse_batch(rng, id_rows=V - 10, zero_row=t % 4 == 0)
    before = jax.device_get((params, state.inner_state[0]))
    params, state = step(params, state,
                         lo.SparseRows(jnp.asarray(ids), jnp.asarray(rows)))
    uniq = np.unique(ids)
    summed = np.zeros((V, D), np.float32)
    np.add.at(summed, ids, rows)
    adam = state.inner_state[0]
    _assert_lazy_adam_step(params, adam, before, summed, uniq, t)
    _reference_step((p_ref, m_ref, v_ref), uniq, summed[uniq], t)
    _assert_matches_reference_run(params, adam, (p_ref, m_ref, v_ref),
                                  f"step {t}")
  np.testing.assert_array_equal(np.asarray(adam.mu)[never], 0.0)
  np.testing.assert_array_equal(np.asarray(adam.nu)[never], 0.0)


def test_sparse_path_mixed_tree_and_touched_rows():
  rng = np.random.default_rng(12)
  params = _tree_params(rng)
  tx = lo.lazy(optax.adamw(1e-2, weight_decay=0.2))
  # Eager: op by op, the same ops on the rows, so bitwise.
  update = lambda g, s, p, ids: tx.update(g, s, p, touched_rows=ids)
  dense_s = sparse_s = tx.init(params)
  for _ in range(3):
    ids, rows, g_emb = _sparse_batch(rng)
    extra = jnp.array([V - 1, V - 1])  # Looked up, no gradient.
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
        params)
    grads["emb"] = jnp.asarray(g_emb)
    grads["dense"]["w"] = grads["dense"]["w"].at[1].set(0.0)
    all_ids = jnp.concatenate([jnp.asarray(ids), extra])
    u, dense_s = update(grads, dense_s, params, {"emb": all_ids})
    grads["emb"] = lo.SparseRows(jnp.asarray(ids), jnp.asarray(rows))
    su, sparse_s = update(grads, sparse_s, params, {"emb": extra})
    np.testing.assert_array_equal(su["emb"].todense(V), u["emb"])
    _assert_tree_equal(su["dense"], u["dense"])  # w: row 1 frozen, b: dense.
    _assert_tree_equal(sparse_s, dense_s)
    params = optax.apply_updates(params, su)


def test_sparse_clip_by_global_norm_inside_lazy_sees_the_dense_norm():
  rng = np.random.default_rng(13)
  params = {"emb": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
            "w": jnp.asarray(rng.standard_normal((D, D)), jnp.float32)}
  inner = optax.chain(optax.clip_by_global_norm(0.3), optax.sgd(1.0))
  tx = lo.lazy(inner, mask={"emb": True, "w": False})
  ids, rows, g_emb = _sparse_batch(rng)  # A duplicate id: summed first.
  g_w = jnp.asarray(rng.standard_normal((D, D)), jnp.float32)
  u, _ = tx.update({"emb": jnp.asarray(g_emb), "w": g_w}, tx.init(params),
                   params)
  su, _ = tx.update({"emb": lo.SparseRows(jnp.asarray(ids),
                                          jnp.asarray(rows)), "w": g_w},
                    tx.init(params), params)
  norm = np.sqrt(np.sum(g_emb.astype(np.float64)**2)
                 + np.sum(np.asarray(g_w, np.float64)**2))
  assert norm > 0.3
  np.testing.assert_allclose(su["emb"].todense(V), -g_emb * 0.3 / norm,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(su["emb"].todense(V), u["emb"], rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(su["w"], u["w"], rtol=1e-6)


def test_sparse_step_jit_donated_no_retrace_and_no_table_temporary():
  rng = np.random.default_rng(14)
  big_v = 50_000
  tx = lo.lazy(optax.adam(LR))
  traces = []

  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  jitted = jax.jit(step, donate_argnums=(0, 1))
  params = jnp.zeros((big_v, D))
  state = tx.init(params)
  batch = lambda: lo.SparseRows(  # pylint: disable=g-long-lambda
      jnp.asarray(rng.integers(0, big_v, 16), jnp.int32),
      jnp.asarray(rng.standard_normal((16, D)), jnp.float32))
  memory = jitted.lower(params, state, batch()).compile().memory_analysis()
  # Temporaries scale with the ids, not with the table (big_v * D * 4 bytes).
  assert memory.temp_size_in_bytes < 100_000
  for _ in range(3):
    old = params
    params, state = jitted(params, state, batch())
    assert old.is_deleted()
  assert len(traces) == 1


def test_sparse_traced_ids_out_of_range_are_dropped():
  tx = lo.lazy(optax.sgd(1.0, momentum=0.5))
  params = jnp.zeros((4, 2))
  update = _jit_update(tx)
  grad = lo.SparseRows(jnp.array([-1, 4, 100, 2]), jnp.ones((4, 2)))
  u, state = update(grad, tx.init(params), params)
  np.testing.assert_array_equal(u.todense(4), [[0, 0], [0, 0], [-1, -1],
                                               [0, 0]])
  np.testing.assert_array_equal(state.inner_state[0].trace,
                                [[0, 0], [0, 0], [1, 1], [0, 0]])
  np.testing.assert_array_equal(optax.apply_updates(params, u),
                                [[0, 0], [0, 0], [-1, -1], [0, 0]])


def test_sparse_pmap_matches_per_device():
  n = jax.local_device_count()
  rng = np.random.default_rng(15)
  tx = lo.lazy(optax.adam(LR))
  params = jnp.asarray(rng.standard_normal((n, V, D)), jnp.float32)
  batches = [_sparse_batch(rng) for _ in range(n)]
  grads = lo.SparseRows(jnp.stack([jnp.asarray(b[0]) for b in batches]),
                        jnp.stack([jnp.asarray(b[1]) for b in batches]))
  assert grads.ids.shape == (n, 8)  # One (N,) set of ids per device.
  state = jax.pmap(tx.init)(params)
  step = jax.pmap(tx.update)
  updates, state = step(grads, state, params)
  # One device under jit is another program than pmap: from the same (initial)
  # state to an ulp or two (n = 2: one adam step of elementwise arithmetic,
  # the update at the weights' scale); the ids are the same.
  single = jax.jit(tx.update)
  # Device d's inputs and outputs as NumPy: slicing them eagerly would
  # compile a program per device index, leaf shape and dtype.
  params, updates, state = jax.tree.map(np.asarray, (params, updates, state))
  for d in range(n):
    g = lo.SparseRows(jnp.asarray(batches[d][0]), jnp.asarray(batches[d][1]))
    s0 = tx.init(params[d])
    u, s = single(g, s0, params[d])
    mine = jax.tree.map(lambda x: x[d], updates)  # pylint: disable=cell-var-from-loop
    assert_bitwise(mine.ids, u.ids)
    assert_tree_within_ulps(mine.todense(V), u.todense(V), 2,
                            "leaf", _weights(params[d]), f"device {d}")
    assert_tree_within_ulps(jax.tree.map(lambda x: x[d], state), s, 2,  # pylint: disable=cell-var-from-loop
                            "leaf", s0, f"device {d}")


def test_sparse_orbax_resume_is_bitwise(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  rng = np.random.default_rng(16)
  tx = lo.lazy(optax.adamw(0.05, weight_decay=0.1))
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  batches = [lo.SparseRows(jnp.asarray(i), jnp.asarray(r))
             for i, r, _ in (_sparse_batch(rng) for _ in range(8))]
  params = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
  state = tx.init(params)
  for g in batches[:4]:
    params, state = step(params, state, g)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": params, "state": state})
  ckpt.wait_until_finished()
  end_p, end_s = params, state
  for g in batches[4:]:
    end_p, end_s = step(end_p, end_s, g)
  restored = ckpt.restore(tmp_path / "ckpt",
                          {"params": params, "state": state})
  params, state = restored["params"], restored["state"]
  for g in batches[4:]:
    params, state = step(params, state, g)
  # The same jitted step before and after the restore: one program, bitwise.
  np.testing.assert_array_equal(params, end_p)
  _assert_tree_equal(state, end_s)


# Errors of the sparse path and of the gradients.


def test_error_sparse_at_leaf_outside_mask():
  params = {"emb": jnp.ones((V, D)), "w": jnp.ones((D, D))}
  tx = lo.lazy(optax.adam(LR), mask={"emb": True, "w": False})
  grads = {"emb": jnp.zeros((V, D)),
           "w": lo.SparseRows(jnp.array([0]), jnp.ones((1, D)))}
  with pytest.raises(ValueError, match=r"`updates` leaf \['w'\] is a "
                     "`SparseRows`, but the leaf is outside the mask"):
    tx.update(grads, tx.init(params), params)


def test_error_sparse_at_scalar_leaf():
  params = {"emb": jnp.ones((V, D)), "s": jnp.ones(())}
  tx = lo.lazy(optax.adam(LR))
  grads = {"emb": jnp.zeros((V, D)),
           "s": lo.SparseRows(jnp.array([0]), jnp.ones((1,)))}
  with pytest.raises(ValueError, match=r"`SparseRows` at leaf \['s'\] is the "
                     r"update of a scalar \(shape \(\)\)"):
    tx.update(grads, tx.init(params), params)


def test_error_sparse_row_shape_and_id_dtype_name_the_leaf():
  params = {"emb": jnp.ones((V, D))}
  tx = lo.lazy(optax.adam(LR))
  state = tx.init(params)
  bad_rows = {"emb": lo.SparseRows(jnp.array([0, 1]), jnp.ones((2, D + 1)))}
  with pytest.raises(ValueError, match=(
      r"`SparseRows` at leaf \['emb'\] has values of shape \(2, 4\), but the "
      r"table has shape \(40, 3\): values must have shape \(N, \*row\) = "
      r"\(2, 3\)")):
    tx.update(bad_rows, state, params)
  float_ids = {"emb": lo.SparseRows._make(  # pylint: disable=protected-access
      jnp.array([0.0, 1.0]), jnp.ones((2, D)))}
  with pytest.raises(TypeError, match=r"`SparseRows` at leaf \['emb'\] must "
                     "have integer `ids`, got dtype float32"):
    tx.update(float_ids, state, params)


@pytest.mark.parametrize("bad", [V + 1, -2])
def test_error_sparse_concrete_ids_out_of_range(bad):
  params = {"emb": jnp.ones((V, D))}
  tx = lo.lazy(optax.adam(LR))
  grads = {"emb": lo.SparseRows(np.array([3, bad]), np.ones((2, D),
                                                          np.float32))}
  with pytest.raises(ValueError, match=(
      rf"`updates` leaf \['emb'\] is a `SparseRows` with id {bad} out of "
      rf"range: ids must be in \[0, {V}\), the rows of the parameter, or be "
      rf"the fill id {V} \(padding, ignored\)")):
    tx.update(grads, tx.init(params), params)
  # The fill id V itself is padding: accepted and ignored.
  grads = {"emb": lo.SparseRows(np.array([3, V]), np.ones((2, D), np.float32))}
  u, _ = tx.update(grads, tx.init(params), params)
  assert np.count_nonzero(np.any(u["emb"].todense(V) != 0, axis=1)) == 1


def test_error_sparse_needs_params_and_freeze_state():
  params = jnp.ones((V, D))
  grad = lo.SparseRows(jnp.array([1]), jnp.ones((1, D)))
  tx = lo.lazy(optax.adam(LR))
  with pytest.raises(ValueError, match="needs `params` in `update` when a "
                     "gradient is a `SparseRows`"):
    tx.update(grad, tx.init(params))
  tx = lo.lazy(optax.adam(LR), freeze_state=False)
  with pytest.raises(ValueError, match=r"`lazy\(..., freeze_state=False\)`.*"
                     "needs `freeze_state=True`"):
    tx.update(grad, tx.init(params), params)


def test_error_sparse_with_factored_inner_state():
  params = jnp.ones((256, 160))
  tx = lo.lazy(optax.adafactor(1e-2, min_dim_size_to_factor=128))
  grad = lo.SparseRows(jnp.array([1, 5]), jnp.ones((2, 160)))
  with pytest.raises(ValueError, match="not parameter-shaped .*factored"):
    tx.update(grad, tx.init(params), params)


@pytest.mark.parametrize("outer", [optax.scale(0.5), optax.sgd(0.1),
                                   optax.clip(1.0)])
def test_error_transformation_outside_lazy_on_sparse(outer):
  params = {"emb": jnp.ones((V, D))}
  tx = optax.chain(outer, lo.lazy(optax.adam(LR)))
  grads = {"emb": lo.SparseRows(jnp.array([1, 2]), jnp.ones((2, D)))}
  with pytest.raises(TypeError, match=r"The `ids` of a `SparseRows` became "
                     r"non-integer .* Put it inside `lazy`"):
    tx.update(grads, tx.init(params), params)


def test_error_sparse_params_rejected():
  tx = lo.lazy(optax.adam(LR))
  with pytest.raises(TypeError, match=r"`params` leaf <root> is a "
                     "`SparseRows`"):
    tx.init(lo.SparseRows(jnp.array([0]), jnp.ones((1, D))))


def test_error_grads_wrong_shape_or_missing_leaf():
  params = {"emb": jnp.ones((V, D)), "w": jnp.ones((D, D))}
  tx = lo.lazy(optax.adam(LR))
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"`updates` leaf \['w'\] has shape "
                     r"\(3, 4\), but the parameter has shape \(3, 3\)"):
    tx.update({"emb": jnp.zeros((V, D)), "w": jnp.zeros((D, 4))}, state,
              params)
  with pytest.raises(ValueError, match=r"the params have leaf \['w'\], the "
                     "gradients do not"):
    tx.update({"emb": jnp.zeros((V, D))}, state, params)
  with pytest.raises(ValueError, match=r"the gradients have leaf \['x'\], the "
                     "params do not"):
    tx.update({"emb": jnp.zeros((V, D)), "w": jnp.zeros((D, D)),
               "x": jnp.zeros(2)}, state, params)


def test_error_lookahead_inside_lazy():
  tx = lo.lazy(lo.lookahead(optax.adam(LR)))
  with pytest.raises(ValueError, match=r"`inner` of `lazy` contains a "
                     r"`lookahead`.*lookahead goes outside lazy"):
    tx.init(jnp.ones((V, D)))


def test_cpu_copy_warning_once_for_large_dense_tables(monkeypatch):
  from lookahead_optax import _lazy  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_lazy, "_warned_cpu_copies", [])
  monkeypatch.setattr(_lazy, "_COPY_WARNING_MIN_SIZE", V * D)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  tx = lo.lazy(optax.adam(LR))
  params = jnp.ones((V, D))
  state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.update(params, state, params)  # Eager: no copies, no warning.
    sparse = lo.SparseRows(jnp.array([1]), jnp.ones((1, D)))
    jax.jit(tx.update)(sparse, state, params)  # Sparse path: no warning.
  # A jitted dense step warns (test_sparse_usage.py); donate a copy of the state.
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # pylint: disable=unnecessary-lambda-assignment
  with pytest.warns(RuntimeWarning, match=r"lazy: XLA:CPU copies the inner "
                    r"state's tables .*xla_cpu_copy_insertion_use_region_"
                    r"analysis.*lo.sparse_value_and_grad"):
    jax.jit(tx.update, donate_argnums=1)(params, copy(state), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(tx.update, donate_argnums=1)(params * 2, copy(state),
                                         params)  # Once.
  monkeypatch.setattr(_lazy, "_warned_cpu_copies", [])
  monkeypatch.setenv("XLA_FLAGS", "--" + _lazy._REGION_ANALYSIS + "=true")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=1)(
        params, copy(state), params)
