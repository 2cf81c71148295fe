"""The inner optimizer is computed once where a second computation is costly.

XLA's cost analysis of a jitted, donated step of `lookahead(muon)` (matrix
products: Newton-Schulz iterations) must count about the FLOPs of a step of
`muon` alone, for every option and formulation. Computing the inner update
twice (which the `"loop"` formulation does for an elementwise inner optimizer
such as Adam, where it saves a params-sized buffer) would count 2x or 3x.
Building an optimizer never starts the JAX backend: checked in the
single-device process of tests/test_formulations.py (one_device_worker.py).
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import lookahead_optax as lo
from lookahead_optax import _formulation

K = 5
NESTEROV = optax.sgd(0.7, momentum=0.9, nesterov=True)
OPTIONS = {
    "keep": {},
    "reset": dict(inner_state="reset"),
    "pullback": dict(inner_state="pullback"),
    "rollback": dict(on_nonfinite="rollback"),
    "snoo": dict(outer=NESTEROV),
    "snoo_rollback": dict(outer=NESTEROV, on_nonfinite="rollback"),
    "snoo_reset": dict(outer=NESTEROV, inner_state="reset"),
    "reset_rollback": dict(inner_state="reset", on_nonfinite="rollback"),
}
# 1.05x in the terms; a second inner update would be >= 2x.
MOST = 1.05


def _params():
  params = {f"w{i}": jnp.full((192, 192), 0.01 * (i + 1)) for i in range(4)}
  params["b"] = jnp.ones(192)
  return params


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


# The FLOPs of each compiled program, by its lowered text: "auto" lowers to
# the very program of the formulation it picks ("select" here, and "loop" is
# "select" for the default options), compiled once.
_FLOPS_BY_PROGRAM = {}


def _step_flops(tx, params):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params)
  text = lowered.as_text()
  if text not in _FLOPS_BY_PROGRAM:
    _FLOPS_BY_PROGRAM[text] = _flops(lowered.compile())
  return _FLOPS_BY_PROGRAM[text]


@functools.lru_cache(maxsize=None)
def _muon_flops():
  return _step_flops(optax.contrib.muon(0.02), _params())


# "loop" is where a recomputation can be; "select" and "cond" never
# recompute, two options each pin that down.
CASES = [(name, sync) for name in sorted(OPTIONS) for sync in ("auto", "loop")
         ] + [(name, sync) for name in ("rollback", "snoo_rollback")
              for sync in ("select", "cond")]


@pytest.mark.parametrize("name,sync", CASES)
def test_muon_inner_is_computed_once(name, sync):
  tx = lo.lookahead(optax.contrib.muon(0.02), K, sync=sync, **OPTIONS[name])
  ratio = _step_flops(tx, _params()) / _muon_flops()
  assert 1.0 <= ratio <= MOST, (name, sync, ratio)


def test_forced_recompute_would_double_muon(monkeypatch):
  # The test above would catch a recomputation: forcing it costs 2x and 3x.
  monkeypatch.setattr(_formulation, "recompute_is_cheap",
                      lambda *args, **kwargs: True)
  for name, most in (("rollback", 2.0), ("snoo_rollback", 3.0)):
    tx = lo.lookahead(optax.contrib.muon(0.02), K, sync="loop",
                      **OPTIONS[name])
    ratio = _step_flops(tx, _params()) / _muon_flops()
    assert ratio >= 0.98 * most, (name, ratio)


def test_muon_inner_with_axis_name_is_computed_once():
  params = _params()
  replicated = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  devices = jax.devices()[:2]

  def flops(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    state = jax.pmap(tx.init, devices=devices)(replicated)
    return _flops(jax.pmap(step, axis_name="data", devices=devices,
                           donate_argnums=(0, 1)).lower(
                               replicated, state, replicated).compile())

  muon = optax.contrib.muon(0.02)
  base = _step_flops(muon, params)
  for kwargs in (dict(outer=NESTEROV), dict(inner_state="reset")):
    tx = lo.diloco(muon, K, "data", **kwargs)
    assert 1.0 <= flops(tx) / base <= MOST, kwargs


def test_recompute_is_decided_from_the_inner_update():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}

  def cheap(tx):
    tx = optax.with_extra_args_support(tx)
    return _formulation.recompute_is_cheap(tx, params, tx.init(params),
                                           params, {})

  assert cheap(optax.adam(0.1))
  assert cheap(optax.sgd(0.1, momentum=0.9))
  assert cheap(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1)))
  assert not cheap(optax.contrib.muon(0.02))

  def matmul_in_cond(updates, state, params=None):
    del params
    flip = lambda u: jax.lax.cond(  # pylint: disable=unnecessary-lambda-assignment
        jnp.sum(u) > 0, lambda v: v @ v.T if v.ndim == 2 else v,
        lambda v: v, u)
    return jax.tree.map(flip, updates), state

  assert not cheap(optax.GradientTransformation(lambda p: (), matmul_in_cond))
