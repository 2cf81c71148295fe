"""Cost of lazy (row-sparse) updates: `lazy(adam)` vs dense `adam`.

One embedding table of shape (V, D) float32 with 1% of its rows touched per
step (a dense gradient whose other rows are zero, as `jax.grad` of a lookup
gives). Each variant is ``params, state = step(params, state, batch)`` under
`jax.jit` with params and state donated (update + `optax.apply_updates`). The
variants are timed round-robin in one process (see `benchmarks.common`); the
ratio is the median of the per-round ratios to dense adam. The `SparseRows`
variant takes the touched rows of that gradient as `lo.SparseRows(ids, rows)`
(the gather is inside the timed step); `benchmarks/sparse.py` measures that
path in more detail.

Run ``python -m benchmarks.lazy`` (``--quick`` for a small table).
"""

import argparse
import os
from typing import Optional
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo
from benchmarks import common

# XLA:CPU's default copy insertion copies the donated moments when a fused
# consumer reads them after they are selected in place (2 table-sized copies
# per step for lazy(adam)); region analysis proves the order and drops them.
REGION_ANALYSIS_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
# The same, for one jitted function (what docs/lazy.md recommends).
REGION_ANALYSIS_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}

LEARNING_RATE = 1e-3
TOUCHED_FRACTION = 0.01
FULL_SHAPE = (1_000_000, 64)
QUICK_SHAPE = (20_000, 64)

ADAM = "adam"
LAZY = "lazy(adam)"
LAZY_IDS = "lazy(adam) + touched_rows"
LAZY_NOFREEZE = "lazy(adam, freeze_state=False)"
LOOKAHEAD_LAZY = "lookahead(lazy(adam))"
LAZY_REGION = "lazy(adam), jit region analysis"
LOOKAHEAD_LAZY_REGION = "lookahead(lazy(adam)), jit region analysis"
LAZY_SPARSE = "lazy(adam), SparseRows gradient"
VARIANTS = (ADAM, LAZY, LAZY_IDS, LAZY_NOFREEZE, LOOKAHEAD_LAZY, LAZY_REGION,
            LOOKAHEAD_LAZY_REGION, LAZY_SPARSE)


def make_tx(name: str) -> optax.GradientTransformation:
  adam = optax.adam(LEARNING_RATE)
  if name == ADAM:
    return adam
  if name in (LAZY, LAZY_IDS, LAZY_REGION, LAZY_SPARSE):
    return lo.lazy(adam)
  if name == LAZY_NOFREEZE:
    return lo.lazy(adam, freeze_state=False)
  if name in (LOOKAHEAD_LAZY, LOOKAHEAD_LAZY_REGION):
    return lo.lookahead(lo.lazy(adam), sync_period=5, slow_step_size=0.5)
  raise ValueError(f"unknown variant {name!r}")


def make_batch(shape: tuple, seed: int = 1) -> tuple:
  """A dense gradient with `TOUCHED_FRACTION` of its rows non-zero, and ids."""
  num_rows, dim = shape
  rng = np.random.default_rng(seed)
  ids = rng.choice(num_rows, size=max(1, int(num_rows * TOUCHED_FRACTION)),
                   replace=False).astype(np.int32)
  rows = rng.standard_normal((ids.size, dim), dtype=np.float32)
  grads = jnp.zeros(shape, jnp.float32).at[ids].set(rows)
  return grads, jnp.asarray(ids)


def make_variant(name: str, shape: tuple) -> common.Variant:
  tx = make_tx(name)
  use_ids = name == LAZY_IDS

  def step(params, state, batch):
    grads, ids = batch
    if name == LAZY_SPARSE:  # The rows of the touched ids only.
      grads = lo.SparseRows(ids, grads.at[ids].get(mode="promise_in_bounds"))
    extra = {"touched_rows": ids} if use_ids else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  def init():
    key = jax.random.PRNGKey(0)
    params = 0.02 * jax.random.normal(key, shape, jnp.float32)
    return params, tx.init(params), make_batch(shape)

  options = (REGION_ANALYSIS_OPTIONS
             if name in (LAZY_REGION, LOOKAHEAD_LAZY_REGION) else None)
  return common.Variant(name=name, fn=step, init=init, donate=True,
                        compiler_options=options)


def run(quick: bool = False, *, rounds: Optional[int] = None,
        log=None) -> list:
  """Times the variants; returns one dict per variant.

  Args:
    quick: use a small (20000, 64) table and few rounds (runs in seconds).
    rounds: rounds of the round-robin (default 3 quick, 15 full).
    log: optional ``print``-like callable for progress.

  Returns:
    A list of dicts with keys name, shape, median_ms, ratio_vs_adam,
    temp_bytes (XLA's temporary buffer bytes of the compiled step), and
    region_analysis (whether `REGION_ANALYSIS_FLAG` was in XLA_FLAGS when
    this process started JAX).
  """
  shape = QUICK_SHAPE if quick else FULL_SHAPE
  # The slow default-flag case is measured on purpose: no warning about it.
  warnings.filterwarnings("ignore", message="lazy: XLA:CPU")
  if rounds is None:
    rounds = 3 if quick else 15
  variants = [make_variant(name, shape) for name in VARIANTS]
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=5, warmup_steps=2,
      baseline=ADAM, min_block_s=0.05 if quick else 0.5)
  rows = []
  for t in timings:
    rows.append({
        "name": t.name,
        "shape": shape,
        "median_ms": t.median_s * 1e3,
        "ratio_vs_adam": t.ratio,
        "temp_bytes": t.memory.get("temp"),
        "region_analysis": region_analysis_enabled(),
    })
    if log is not None:
      log(f"{t.name}: {t.median_s * 1e3:.2f} ms, x{t.ratio:.3f}")
  return rows


def region_analysis_enabled() -> bool:
  return REGION_ANALYSIS_FLAG in os.environ.get("XLA_FLAGS", "")


def markdown(rows: list) -> str:
  return common.markdown_table(
      ["optimizer", "table", "step (ms)", "vs adam", "temp (MB)"],
      [[r["name"], "x".join(str(s) for s in r["shape"]),
        common.fmt_ms(r["median_ms"] / 1e3), f"{r['ratio_vs_adam']:.2f}x",
        common.fmt_mb(r["temp_bytes"])] for r in rows])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="small table, few rounds")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--region-analysis", action="store_true",
                      help=f"run with XLA_FLAGS={REGION_ANALYSIS_FLAG}")
  args = parser.parse_args()
  if args.region_analysis and not region_analysis_enabled():
    # JAX reads XLA_FLAGS when its backend starts, i.e. at the first
    # computation, which has not happened yet.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + REGION_ANALYSIS_FLAG).strip()
  rows = run(quick=args.quick, rounds=args.rounds)
  print(common.machine_line())
  print(markdown(rows))


if __name__ == "__main__":
  main()
