"""`lo.communication_report`: the collectives of a compiled step, counted."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lookahead_optax as lo

AXIS = "data"

pytestmark = pytest.mark.skipif(
    jax.device_count() < 2, reason="needs 2 devices (see conftest.py)")


def pmapped(fn):
  return jax.pmap(fn, axis_name=AXIS, devices=jax.devices()[:2])


def test_a_pmean_every_step():
  report = lo.communication_report(
      pmapped(lambda g: jax.lax.pmean(g, AXIS)), jnp.ones((2, 1000)),
      sync_period=4, link_bytes_per_s=1e6, step_seconds=0.01)
  assert [c[:2] + c[3:] for c in report.collectives] == [
      ("all-reduce", 4000, "step")]
  assert report.collectives[0].ring_bytes == 4000.0  # 2 (M - 1) / M, M = 2
  assert (report.every_step, report.largest_step, report.per_period) == (
      4000, 4000, 16000)
  assert report.per_conditional == ()
  assert report.seconds_largest_step == pytest.approx(4e-3)
  assert report.hidden is True
  assert lo.communication_report(
      pmapped(lambda g: jax.lax.pmean(g, AXIS)), jnp.ones((2, 1000)),
      link_bytes_per_s=1e6, step_seconds=0.001).hidden is False
  assert "| all-reduce | 4,000 | 4,000 | step |" in report.table()


def test_diloco_fragments_sync_in_conditionals():
  tx = lo.diloco(optax.sgd(0.1), 4, AXIS, fragments=2)
  params = {"a": jnp.zeros((2, 64)), "b": jnp.zeros((2, 32))}

  def step(p, s):
    u, s = tx.update(p, s, p)
    return optax.apply_updates(p, u), s
  report = lo.communication_report(pmapped(step), params,
                                   pmapped(tx.init)(params), sync_period=4,
                                   link_bytes_per_s=1e9, step_seconds=1.0)
  # Fragment 0 is "a" (64 float32), fragment 1 "b" (32), each one pmean.
  assert sorted(report.per_conditional) == [128, 256]
  assert report.every_step == 0
  assert (report.largest_step, report.per_period) == (256, 384)
  assert {c.where for c in report.collectives} == {"conditional"}
  assert report.hidden is False  # in conditionals: nothing overlaps them


def test_replica_mean_int8_bytes():
  tx = lo.replica_mean(AXIS, jnp.int8)
  grads = jnp.ones((2, 1000))
  report = lo.communication_report(
      pmapped(lambda g, s: tx.update(g, s)), grads, pmapped(tx.init)(grads))
  # 1,000 values padded to 2 replicas x 2 blocks of 256: the all-to-all
  # sends 1,024 int8 values and 4 float32 scales, the all-gather this
  # replica's shard (512 values, 2 scales).
  assert report.every_step == 1024 + 16 + 512 + 8
  assert sorted(c.op for c in report.collectives) == [
      "all-gather", "all-gather", "all-to-all", "all-to-all"]


def test_a_collective_in_a_loop():
  def step(g):
    return jax.lax.fori_loop(
        0, 3, lambda i, x: jax.lax.psum(x, AXIS) * 0.5, g)
  report = lo.communication_report(pmapped(step), jnp.ones((2, 10)),
                                   link_bytes_per_s=1e6)
  assert [(c.op, c.operand_bytes, c.where) for c in report.collectives] == [
      ("all-reduce", 40, "loop")]
  assert report.every_step == 0
  assert report.seconds_largest_step == 0.0  # loops count in neither


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sync_period=0), ValueError, r"`sync_period` must be an integer > 0"),
    (dict(sync_period=2.5), ValueError, r"`sync_period` must be an integer"),
    (dict(link_bytes_per_s=-1.0), ValueError,
     r"`link_bytes_per_s` must be a number > 0 or None, got -1.0"),
    (dict(step_seconds="1"), ValueError, r"`step_seconds` must be a number"),
])
def test_bad_arguments_are_named(kwargs, error, match):
  with pytest.raises(error, match=match):
    lo.communication_report(pmapped(lambda g: g), jnp.ones((2, 3)), **kwargs)


def test_a_step_that_is_not_jitted_is_named():
  with pytest.raises(TypeError, match=r"`step` must be a jitted function "
                     r"\(`jax.jit\(f\)` or `jax.pmap\(f\)`\).*got function"):
    lo.communication_report(lambda g: g, jnp.ones(3))
