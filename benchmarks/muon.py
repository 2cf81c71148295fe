"""Every option of ``lookahead(muon)`` against a step of Muon alone.

Muon (`optax.contrib.muon`) orthogonalises each matrix update with
Newton-Schulz iterations, matrix products that dominate its step: a design
that computed the inner update twice would show up here at 2x. Each option
(keep, reset, pullback, rollback, SNOO, SNOO with rollback) and formulation is
timed interleaved with plain Muon (jit, donated params and state, whole sync
cycles of k = 5), next to the FLOPs that XLA's cost analysis counts for the
compiled step, as a ratio to Muon's.

Run ``python -m benchmarks.muon [--matrices 6] [--size 448] [--rounds 9]``.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo
from benchmarks import common

SYNC_PERIOD = 5
LEARNING_RATE = 0.02
MUON = "muon"
NESTEROV = dict(learning_rate=0.68, momentum=0.37, nesterov=True)
OPTIONS = (
    ("keep", dict()),
    ("reset", dict(inner_state="reset")),
    ("pullback", dict(inner_state="pullback")),
    ("rollback", dict(on_nonfinite="rollback")),
    ("snoo", dict(outer=True)),
    ("snoo + rollback", dict(outer=True, on_nonfinite="rollback")),
)


def _params(matrices: int, size: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {f"w{i}": jnp.asarray(rng.normal(size=(size, size)) / size ** 0.5,
                               jnp.float32) for i in range(matrices)}


def make_tx(kwargs: dict, sync: str) -> optax.GradientTransformation:
  """`lookahead(muon)` with an option's arguments (SNOO's outer filled in)."""
  kwargs = dict(kwargs)
  if kwargs.pop("outer", None):
    kwargs["outer"] = optax.sgd(**NESTEROV)
  return lo.lookahead(optax.contrib.muon(LEARNING_RATE), SYNC_PERIOD,
                      sync=sync, **kwargs)


def _variant(name: str, tx, matrices: int, size: int) -> common.Variant:
  def init():
    params = _params(matrices, size, 0)
    return params, tx.init(params), _params(matrices, size, 1)
  return common.Variant(name=name, fn=common.optimizer_step(tx), init=init)


def _flops(variant: common.Variant, tx, matrices: int, size: int) -> float:
  # The variant's own step function, jitted as `Variant.prepare` jits it: one
  # compilation for the FLOPs and the timing.
  params = _params(matrices, size, 0)
  compiled = jax.jit(variant.fn, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def run(matrices: int = 6, size: int = 448, rounds: int = 9,
        syncs: Sequence[str] = ("auto", "select", "cond", "loop"),
        min_block_s: float = 0.1, log=print) -> list:
  """Times every option in every formulation; one dict per row.

  Keys: option, sync, median_ms, ratio (time, to muon), flops_ratio.
  """
  base = optax.contrib.muon(LEARNING_RATE)
  variants = [_variant(MUON, base, matrices, size)]
  meta = {MUON: ("muon", "-", 1.0)}
  base_flops = _flops(variants[0], base, matrices, size)
  for sync in syncs:
    for option, kwargs in OPTIONS:
      tx = make_tx(kwargs, sync)
      name = f"{option} ({sync})"
      variants.append(_variant(name, tx, matrices, size))
      meta[name] = (option, sync,
                    _flops(variants[-1], tx, matrices, size) / base_flops)
  log(f"  muon: {matrices} matrices of {size} x {size}, k = {SYNC_PERIOD} "
      f"({rounds} rounds)")
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=SYNC_PERIOD,
      warmup_steps=2 * SYNC_PERIOD, baseline=MUON, min_block_s=min_block_s)
  return [dict(option=meta[t.name][0], sync=meta[t.name][1],
               median_ms=t.median_s * 1e3, ratio=t.ratio,
               flops_ratio=meta[t.name][2], matrices=matrices, size=size)
          for t in timings]


def markdown(rows: list) -> str:
  return common.markdown_table(
      ["option", "sync", "step (ms)", "vs muon (time)", "vs muon (FLOPs)"],
      [[r["option"], r["sync"], f"{r['median_ms']:.2f}",
        f"{r['ratio']:.2f}x", f"{r['flops_ratio']:.3f}x"] for r in rows])


def main() -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--matrices", type=int, default=6)
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--syncs", default="auto,select,cond,loop")
  args = parser.parse_args()
  print(markdown(run(matrices=args.matrices, size=args.size,
                     rounds=args.rounds, syncs=args.syncs.split(","))))


if __name__ == "__main__":
  main()
