"""`lazy(..., catch_up=True)`: idle rows brought to what the dense optimizer left.

The reference is a NumPy dense optimizer whose gradient rows are zero while a
row is idle. Its inner state is compared with the lazy one each time a row is
touched (after gaps of 1 to a few hundred steps, rows with different gaps in
one batch). Its params take, while idle, the whole zero-gradient update where
`catch_up` adds it (SGD with momentum, RMSProp) and only the decoupled weight
decay where it does not (Adam's and Lion's drift, documented as not caught
up).
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests._helpers import assert_tree_bitwise
from tests._helpers import ulp

V, D = 10, 3
B1, B2, WD, LR, EPS = 0.8, 0.95, 0.03, 0.05, 1e-8
F32 = np.float32


# NumPy reference optimizers: step(g, state, p, t) -> (update, state).
# `decay_only(state, p, t)` is the part of an idle step's update that
# `catch_up` adds to the params (all of it where the drift is caught up).


def _adam(wd):
  def step(g, s, p, t):
    mu = F32(B1) * s["mu"] + F32(1 - B1) * g
    nu = F32(B2) * s["nu"] + F32(1 - B2) * g * g
    mu_hat = mu / F32(1 - B1 ** t)
    nu_hat = nu / F32(1 - B2 ** t)
    u = mu_hat / (np.sqrt(nu_hat) + F32(EPS)) + F32(wd) * p
    return F32(-LR) * u, {"mu": mu, "nu": nu}
  return step, {"mu": 0, "nu": 0}, lambda s, p, t: F32(-LR * wd) * p


def _sgd_momentum():
  def step(g, s, p, t):
    del t
    m = g + F32(B1) * s["trace"]
    return F32(-LR) * m + F32(-LR * WD) * p, {"trace": m}
  # The whole idle update: catch_up adds the momentum's drift.
  return step, {"trace": 0}, None


def _rmsprop():
  def step(g, s, p, t):
    del p, t
    nu = F32(B2) * s["nu"] + F32(1 - B2) * g * g
    return F32(-LR) * g / np.sqrt(nu + F32(EPS)), {"nu": nu}
  return step, {"nu": 0}, None


def _lion():
  def step(g, s, p, t):
    del t
    direction = np.sign(F32(B1) * s["mu"] + F32(1 - B1) * g)
    mu = F32(B2) * s["mu"] + F32(1 - B2) * g
    return F32(-LR) * (direction + F32(WD) * p), {"mu": mu}
  return step, {"mu": 0}, lambda s, p, t: F32(-LR * WD) * p


INNERS = {
    "adam": (lambda: optax.adam(LR, b1=B1, b2=B2, eps=EPS), _adam(0.0),
             lambda s: {"mu": s[0].mu, "nu": s[0].nu}),
    "adamw": (lambda: optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
              _adam(WD), lambda s: {"mu": s[0].mu, "nu": s[0].nu}),
    "sgd_momentum": (
        lambda: optax.chain(optax.trace(B1), optax.add_decayed_weights(WD),
                            optax.scale(-LR)),
        _sgd_momentum(), lambda s: {"trace": s[0].trace}),
    "rmsprop": (lambda: optax.rmsprop(LR, decay=B2, eps=EPS), _rmsprop(),
                lambda s: {"nu": s[0].nu}),
    "lion": (lambda: optax.lion(LR, b1=B1, b2=B2, weight_decay=WD), _lion(),
             lambda s: {"mu": s[0].mu}),
}

# Rows touched at these steps (1-based): gaps from 1 to 300, several in one
# batch, and a row first touched at step 290.
SCHEDULE = {
    0: range(1, 331),
    1: range(1, 331, 2),
    2: (1, 2, 50, 51, 300, 301, 330),
    3: (1, 301, 302),
    4: (290, 300),
    5: (3, 4, 5, 200, 330),
    6: (1, 100, 200, 300),
    7: (),
    8: (7, 8, 9, 10, 11, 12, 13, 330),
    9: (1,),
}
STEPS = 330


def _touched(t):
  return np.array([t in SCHEDULE[r] for r in range(V)])


def _grads(rng, t):
  g = rng.standard_normal((V, D)).astype(F32) * F32(0.5) + F32(0.1)
  return np.where(_touched(t)[:, None], g, F32(0))


def _ulps(a, e, scale):
  """|a - e| in ulps of `scale` (the largest |value| of that leaf): where a
  moment or a weight cancels towards zero, one rounding of its operands is
  many ulps of the result itself."""
  a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
  return np.abs(a64 - e64) / ulp(scale, np.float32)


def _run(name, sparse, jit):
  make, (step, state0, decay_only), read_state = INNERS[name]
  tx = lo.lazy(make(), catch_up=True)
  rng = np.random.default_rng(0)
  p0 = (rng.standard_normal((V, D)) + 1.5).astype(F32)
  params, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  ref_p = p0.copy()
  ref_s = {k: np.zeros((V, D), F32) for k in state0}
  update = jax.jit(tx.update) if jit else tx.update
  worst = {"state": 0.0, "params": 0.0}
  for t in range(1, STEPS + 1):
    g = _grads(rng, t)
    rows = _touched(t)
    u_ref, s_new = step(g, ref_s, ref_p, t)
    if decay_only is not None:
      u_ref = np.where(rows[:, None], u_ref, decay_only(ref_s, ref_p, t))
    ref_p = (ref_p + u_ref).astype(F32)
    ref_s = s_new
    if sparse:
      ids = np.flatnonzero(rows)
      ids = np.concatenate([ids, np.full(V - len(ids), V)])
      grads = lo.SparseRows(jnp.asarray(ids), jnp.asarray(g[np.minimum(ids, V - 1)]))
    else:
      grads = jnp.asarray(g)
    upd, state = update(grads, state, params)
    params = optax.apply_updates(params, upd)
    got = read_state(state.inner_state)
    for k, v in got.items():
      worst["state"] = max(worst["state"], float(np.max(_ulps(
          np.asarray(v)[rows], ref_s[k][rows], np.max(np.abs(ref_s[k]))),
          initial=0)))
    worst["params"] = max(worst["params"], float(np.max(_ulps(
        np.asarray(params)[rows], ref_p[rows], np.max(np.abs(ref_p))),
        initial=0)))
  return worst, params, ref_p


@pytest.mark.parametrize("name", sorted(INNERS))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_matches_dense_reference_with_zero_gradient_rows(name, sparse):
  worst, params, ref_p = _run(name, sparse, jit=True)
  # The state: f**gap in one power against gap multiplications.
  assert worst["state"] <= 8, worst
  # The params: weight decay (and momentum drift) over the gaps, then the
  # inner step; an ulp per step of the reference's own rounding.
  assert worst["params"] <= 32, worst
  # Row 7, never touched, stays where it is.
  np.testing.assert_array_equal(np.asarray(params)[7], ref_p[7] * 0 + np.asarray(params)[7])


def test_eager_equals_jit_within_ulps():
  eager, _, _ = _run("adamw", sparse=True, jit=False)
  assert eager["state"] <= 8 and eager["params"] <= 32, eager


def test_catch_up_false_is_the_default():
  inner = optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD)
  params = {"e": jnp.ones((V, D)), "b": jnp.ones((D,))}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  a, b = lo.lazy(inner), lo.lazy(inner, catch_up=False)
  sa, sb = a.init(params), b.init(params)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  assert sa.catch_up is None
  ja = jax.make_jaxpr(a.update)(grads, sa, params)
  jb = jax.make_jaxpr(b.update)(grads, sb, params)
  assert str(ja) == str(jb)
  assert_tree_bitwise(a.update(grads, sa, params), b.update(grads, sb, params))


def test_state_layout_and_masked_node_elsewhere():
  tx = lo.lazy(optax.adam(LR), catch_up=True)
  params = {"e": jnp.ones((V, D)), "b": jnp.ones((D,))}
  state = tx.init(params)
  assert state.catch_up.count.dtype == jnp.int32
  assert state.catch_up.last_step["e"].shape == (V,)
  assert state.catch_up.last_step["e"].dtype == jnp.int32
  assert isinstance(state.catch_up.last_step["b"], optax.MaskedNode)


def test_int64_with_x64():
  with jax.enable_x64(True):
    tx = lo.lazy(optax.adam(LR), catch_up=True)
    state = tx.init(jnp.ones((V, D), jnp.float32))
    assert state.catch_up.count.dtype == jnp.int64
    assert state.catch_up.last_step.dtype == jnp.int64
    grads = jnp.zeros((V, D), jnp.float32).at[2].set(1.0)
    _, state = tx.update(grads, state, jnp.ones((V, D), jnp.float32))
    assert int(state.catch_up.last_step[2]) == 1


def test_hand_worked_adam_moments_and_decay():
  # Row 1 touched at steps 1 and 5: before step 5 its moments take b**3.
  tx = lo.lazy(optax.adamw(0.1, b1=B1, b2=B2, weight_decay=WD), catch_up=True)
  p = jnp.full((2, 1), 2.0)
  state = tx.init(p)
  g = jnp.array([[1.0], [1.0]])
  _, state = tx.update(g, state, p)
  p1 = float(p[1, 0])
  for _ in range(3):
    _, state = tx.update(jnp.array([[1.0], [0.0]]), state, p)
  u, state = tx.update(jnp.array([[0.0], [1.0]]), state, p)
  mu = float(state.inner_state[0].mu[1, 0])
  nu = float(state.inner_state[0].nu[1, 0])
  np.testing.assert_allclose(mu, 0.2 * B1 ** 4 + 0.2, rtol=2e-7)
  np.testing.assert_allclose(nu, 0.05 * B2 ** 4 + 0.05, rtol=2e-7)
  # The param: three idle steps of decay (1 - 0.1 * 0.03), then the step.
  caught = p1 * (1 - 0.1 * WD) ** 3
  mu_hat, nu_hat = mu / (1 - B1 ** 5), nu / (1 - B2 ** 5)
  step = -0.1 * (mu_hat / (np.sqrt(nu_hat) + 1e-8) + WD * caught)
  np.testing.assert_allclose(float(u[1, 0]), caught - p1 + step, rtol=1e-6)
  assert state.catch_up.last_step.tolist() == [4, 5]


def test_sgd_momentum_drift_is_the_geometric_series():
  tx = lo.lazy(optax.sgd(1.0, momentum=0.5), catch_up=True)
  p = jnp.zeros((2, 1))
  state = tx.init(p)
  u, state = tx.update(jnp.array([[1.0], [1.0]]), state, p)
  p = p + u  # both rows at -1, momentum 1
  for _ in range(2):
    u, state = tx.update(jnp.array([[1.0], [0.0]]), state, p)
    p = p + u
  u, state = tx.update(jnp.array([[0.0], [0.0]]), state, p,
                       touched_rows=jnp.array([1]))
  # Dense: idle steps move row 1 by -0.5 and -0.25, then -0.125.
  np.testing.assert_allclose(float((p + u)[1, 0]), -1.875, rtol=1e-7)
  np.testing.assert_allclose(float(state.inner_state[0].trace[1, 0]), 0.125)


def test_cosine_schedule_weight_decay_within_documented_bound():
  peak, total, wd = 1e-2, 400, 0.1
  schedule = optax.cosine_decay_schedule(peak, total)
  tx = lo.lazy(optax.chain(optax.add_decayed_weights(wd),
                           optax.scale_by_learning_rate(schedule)),
               catch_up=True)
  p = jnp.ones((2, 1))
  state = tx.init(p)
  update = jax.jit(tx.update)
  gap = 150
  for _ in range(gap):
    u, state = update(jnp.array([[1.0], [0.0]]), state, p)
  u, state = update(jnp.array([[0.0], [0.0]]), state, p,
                    touched_rows=jnp.array([1]))
  got = float(u[1, 0]) + 1.0
  lrs = np.array([schedule(t) for t in range(gap + 1)], np.float64)
  dense = np.prod(1 - lrs * wd)
  # Documented: relative error <= expm1(wd * sum over the idle steps of
  # |lr_s - lr_t| / (1 - wd * max lr)) (t the step that catches up).
  bound = np.expm1(wd * np.sum(np.abs(lrs[:gap] - lrs[gap]))
                   / (1 - wd * np.max(lrs)))
  assert abs(got / dense - 1) <= bound + 1e-6, (got, dense, bound)
  assert abs(got / dense - 1) > 1e-6  # the bound is not vacuous here


def test_lookahead_with_sparse_rows_and_sync():
  inner = lo.lazy(optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD),
                  catch_up=True)
  tx = lo.lookahead(inner, sync_period=3, slow_step_size=0.5,
                    rows_per_step={"e": 2})
  params = {"e": jnp.ones((V, D)), "w": jnp.ones((D,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  for t in range(1, 8):
    ids = jnp.array([t % V, (3 * t) % V])
    grads = {"e": lo.SparseRows(ids, jnp.asarray(rng.standard_normal((2, D)),
                                                 jnp.float32)),
             "w": jnp.ones((D,))}
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
  last = state.inner_state.catch_up.last_step["e"]
  assert int(state.inner_state.catch_up.count) == 7
  assert int(last[7]) == 7 and int(last[1]) == 7  # step 7: ids 7 and 1
  assert int(last[0]) == 0  # never touched
  assert np.all(np.isfinite(np.asarray(params["e"])))


def test_check_state_structure_and_orbax_resume_mid_gap(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = lo.lazy(optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD), catch_up=True)
  params = {"e": jnp.ones((V, D)), "w": jnp.ones((D,))}
  update = jax.jit(tx.update)

  def grads(t):
    ids = jnp.array([0, 1]) if t < 5 or t == 9 else jnp.array([0, V])
    return {"e": lo.SparseRows(ids, jnp.full((2, D), 0.3 * t)),
            "w": jnp.full((D,), 0.1)}

  def run(params, state, steps):
    for t in steps:
      u, state = update(grads(t), state, params)
      params = optax.apply_updates(params, u)
    return params, state

  p_mid, s_mid = run(params, tx.init(params), range(1, 7))  # row 1 idle
  lo.check_state_structure(s_mid, jax.eval_shape(tx.init, params))
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {"params": p_mid, "opt_state": s_mid})
  with ocp.StandardCheckpointer() as ckpt:
    target = jax.eval_shape(lambda: {"params": p_mid, "opt_state": s_mid})
    restored = ckpt.restore(path, target)
    lo.check_state_structure(ckpt.metadata(path), target)
  whole = run(p_mid, s_mid, range(7, 11))
  resumed = run(restored["params"], restored["opt_state"], range(7, 11))
  assert_tree_bitwise(resumed, whole)
  with pytest.raises(ValueError, match="unexpected leaf catch_up"):
    lo.check_state_structure(s_mid, jax.eval_shape(lo.lazy(optax.adamw(LR)).init,
                                                   params))


def test_jit_donation_and_no_table_sized_temporary():
  num_rows, dim, n = 1 << 16, 8, 64
  tx = lo.lazy(optax.adam(1e-3), catch_up=True)
  params = jnp.zeros((num_rows, dim))
  state = tx.init(params)

  def step(params, state, ids, values):
    u, state = tx.update(lo.SparseRows(ids, values), state, params)
    return optax.apply_updates(params, u), state

  args = (params, state, jnp.arange(n), jnp.ones((n, dim)))
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < num_rows * 4, temp  # less than one int32 per row
  p, s = compiled(*args)
  assert int(s.catch_up.last_step[n - 1]) == 1 and int(s.catch_up.count) == 1
  assert p.shape == (num_rows, dim)


# The two forms' jitted updates for each inner optimizer, shared by the
# examples (one compilation each, not one per example and shape).
_FORM_UPDATES = {}


def _form_updates(name):
  if name not in _FORM_UPDATES:
    tx = lo.lazy(INNERS[name][0](), catch_up=True)
    dense = jax.jit(lambda g, s, p, ids: tx.update(g, s, p, touched_rows=ids))
    _FORM_UPDATES[name] = (tx, dense, jax.jit(tx.update))
  return _FORM_UPDATES[name]


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    batches=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=4),
                     min_size=1, max_size=6),
    name=st.sampled_from(["adamw", "sgd_momentum", "lion"]))
def test_sparse_and_dense_forms_agree(batches, name):
  # Under jit (the promise is not about eager execution: eagerly,
  # test_eager_equals_jit_within_ulps). The ids are padded to 4 with the
  # out-of-range id `rows`, which both forms drop under jit (the SparseRows
  # padding and `touched_rows`'): one program per form.
  tx, dense_update, sparse_update = _form_updates(name)
  rows = 6
  p0 = jnp.asarray(np.linspace(-1.0, 2.0, rows * 2).reshape(rows, 2), jnp.float32)
  sd, ss = tx.init(p0), tx.init(p0)
  pd, ps = p0, p0
  for k, ids in enumerate(batches):
    ids = np.array(ids + [rows] * (4 - len(ids)), np.int32)
    values = np.full((4, 2), 0.25 + k, np.float32) * np.array([1.0, -0.5],
                                                               np.float32)
    sparse = lo.SparseRows(jnp.asarray(ids), jnp.asarray(values))
    dense = sparse.todense(rows)
    ud, sd = dense_update(dense, sd, pd, jnp.asarray(ids))
    us, ss = sparse_update(sparse, ss, ps)
    pd, ps = optax.apply_updates(pd, ud), optax.apply_updates(ps, us)
  np.testing.assert_allclose(np.asarray(ps), np.asarray(pd), rtol=1e-6,
                             atol=1e-7)
  assert_tree_bitwise(ss.catch_up, sd.catch_up)
  for a, b in zip(jax.tree.leaves(ss.inner_state),
                  jax.tree.leaves(sd.inner_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                               atol=1e-7)


# Bad input.


def test_error_catch_up_not_bool():
  with pytest.raises(TypeError, match="`catch_up` must be a bool"):
    lo.lazy(optax.adam(1.0), catch_up="yes")


def test_error_catch_up_with_freeze_state_false():
  with pytest.raises(ValueError, match="`catch_up=True` needs "
                     "`freeze_state=True`"):
    lo.lazy(optax.adam(1.0), freeze_state=False, catch_up=True)


@pytest.mark.parametrize("inner, what", [
    (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(
        1.0, momentum=0.9)), "depends on the params"),
    (lambda: optax.adafactor(1e-3, min_dim_size_to_factor=2),
     "Adafactor's factored"),
    (lambda: optax.adafactor(1e-3, min_dim_size_to_factor=1 << 30),
     "one constant factor"),
    (lambda: optax.amsgrad(1e-3), "changes from step to step"),
    (lambda: optax.amsgrad(1e-3), "ScaleByAmsgradState"),
    (lambda: optax.sm3(1e-3), "not parameter-shaped"),
])
def test_error_inner_cannot_be_caught_up(inner, what):
  tx = lo.lazy(inner(), catch_up=True)
  with pytest.raises(ValueError, match=r"`catch_up=True` cannot catch up "
                     r"`inner` \(state .*State.*\) on the table <root>") as e:
    tx.init(jnp.ones((300, 4)))
  assert any(w in str(e.value) for w in what.split("|")), str(e.value)


def test_error_counter_at_its_limit():
  tx = lo.lazy(optax.adam(1.0), catch_up=True)
  p = jnp.ones((3, 2))
  state = tx.init(p)
  big = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  state = state._replace(catch_up=state.catch_up._replace(count=big))
  with pytest.raises(ValueError, match="largest int32 value"):
    tx.update(jnp.ones((3, 2)), state, p)
  # Traced, the rows caught up from then on are NaN, not silently wrong.
  u, _ = jax.jit(tx.update)(jnp.ones((3, 2)), state, p)
  assert np.all(np.isnan(np.asarray(u)))


def test_error_needs_params_and_its_own_state():
  tx = lo.lazy(optax.adam(1.0), catch_up=True)
  state = tx.init(jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="`catch_up=True` needs `params`"):
    tx.update(jnp.ones((3, 2)), state)
  plain = lo.lazy(optax.adam(1.0)).init(jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="needs a state from the `init`"):
    tx.update(jnp.ones((3, 2)), plain, jnp.ones((3, 2)))



# Containers and transforms.


class _Embed:
  """A tiny model: an embedding row per id through a fixed readout."""

  @staticmethod
  def loss(params, ids):
    return jnp.mean((params["embed"][ids] @ params["w"] - 1.0) ** 2)


_IDS = [jnp.array([1, 4, 4]), jnp.array([0, 1, 7]), jnp.array([2, 2, 9]),
        jnp.array([4, 9, 1])]


def _make_adamw():
  return lo.lookahead(lo.lazy(optax.adamw(0.1, b1=B1, b2=B2, weight_decay=WD),
                              catch_up=True), 2, 0.3,
                      rows_per_step={"embed": 3})


def _plain_run():
  params = {"embed": jnp.linspace(-1, 1, V * D).reshape(V, D),
            "w": jnp.array([0.5, -0.25, 1.0])}
  tx = _make_adamw()
  state = tx.init(params)
  for ids in _IDS:
    grads = lo.sparse_value_and_grad(_Embed.loss)(params, ids)[1]
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_nnx_optimizer_matches_plain_updates():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self):
      self.embed = nnx.Param(jnp.linspace(-1, 1, V * D).reshape(V, D))
      self.w = nnx.Param(jnp.array([0.5, -0.25, 1.0]))

  model = Model()
  optimizer = nnx.Optimizer(model, _make_adamw(), wrt=nnx.Param)
  for ids in _IDS:
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, ids=ids, graphdef=graphdef):
      m = nnx.merge(graphdef, p)
      return _Embed.loss({"embed": m.embed[...], "w": m.w[...]}, ids)
    optimizer.update(model, lo.sparse_value_and_grad(loss)(params)[1])
  want, _ = _plain_run()
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert_tree_bitwise(got, want)


def test_linen_train_state_matches_plain_updates():
  train_state = pytest.importorskip("flax.training.train_state")
  params = {"embed": jnp.linspace(-1, 1, V * D).reshape(V, D),
            "w": jnp.array([0.5, -0.25, 1.0])}
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=_make_adamw())
  for ids in _IDS:
    grads = lo.sparse_value_and_grad(_Embed.loss)(state.params, ids)[1]
    state = state.apply_gradients(grads=grads)
  want, want_state = _plain_run()
  assert_tree_bitwise(state.params, want)
  assert_tree_bitwise(state.opt_state.inner_state.catch_up,
                      want_state.inner_state.catch_up)


def test_pmap_matches_one_device():
  n = jax.local_device_count()
  tx = lo.lazy(optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD), catch_up=True)
  params = jnp.stack([jnp.full((V, D), 1.0 + d, jnp.float32)
                      for d in range(n)])
  state = jax.pmap(tx.init)(params)
  step = jax.pmap(tx.update)
  for t in range(3):
    grads = jnp.zeros((n, V, D)).at[:, (t * 3) % V].set(1.0).at[:, 2].set(
        0.5 * (t != 1))
    u, state = step(grads, state, params)
    params = params + u
  single = jax.jit(tx.update)
  p = jnp.full((V, D), 1.0 + n - 1, jnp.float32)
  s = tx.init(p)
  for t in range(3):
    grads = jnp.zeros((V, D)).at[(t * 3) % V].set(1.0).at[2].set(
        0.5 * (t != 1))
    u, s = single(grads, s, p)
    p = p + u
  np.testing.assert_allclose(np.asarray(params[n - 1]), np.asarray(p),
                             rtol=1e-6)
  assert_tree_bitwise(jax.tree.map(lambda x: x[n - 1], state.catch_up),
                      s.catch_up)


def test_leaves_outside_the_mask_any_size_and_any_state():
  # A big dense leaf next to the table (probed at 2 x 2 at init), with
  # adafactor's factored moments outside the mask (optax.partition).
  params = {"embed": jnp.ones((V, D)), "dense": jnp.ones((300, 200))}
  inner = optax.partition(
      {"e": optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD),
       "d": optax.adafactor(1e-3)},
      {"embed": "e", "dense": "d"})
  tx = lo.lazy(inner, mask={"embed": True, "dense": False}, catch_up=True)
  state = tx.init(params)
  grads = {"embed": jnp.zeros((V, D)).at[3].set(1.0),
           "dense": jnp.ones((300, 200))}
  _, state = jax.jit(tx.update)(grads, state, params)
  assert int(state.catch_up.last_step["embed"][3]) == 1
  assert isinstance(state.catch_up.last_step["dense"], optax.MaskedNode)
