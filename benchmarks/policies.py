"""Cost of the inner-state and non-finite policies relative to the default.

``lookahead(adam)`` with ``inner_state="keep"`` (default), ``"reset"``,
``"pullback"`` and ``on_nonfinite="rollback"``, each in ``sync="select"`` and
``sync="cond"``, timed interleaved with plain adam (jit, donated params and
state, amortised over whole sync cycles).
"""

from typing import Sequence

import optax

import lookahead_optax as lo
from benchmarks import common
from benchmarks import step as step_bench

POLICIES = (
    ("keep", dict()),
    ("reset", dict(inner_state="reset")),
    ("pullback", dict(inner_state="pullback")),
    ("rollback", dict(on_nonfinite="rollback")),
)


def run(n: int = 10_000_000, layout: str = "leaf", rounds: int = 9,
        syncs: Sequence[str] = ("select", "cond"), donate: bool = True,
        min_block_s: float = 0.1, log=print) -> list:
  """Times every policy; rows with name, sync, median_ms, ratio, temp, state."""
  grads = common.make_params(layout, n, seed=1)
  variants = [step_bench.make_variant(step_bench.ADAM, layout, n, donate,
                                      grads=grads)]
  meta = {step_bench.ADAM: ("adam", "-")}
  for sync in syncs:
    for policy, kwargs in POLICIES:
      tx = lo.lookahead(optax.adam(step_bench.LEARNING_RATE),
                        step_bench.SYNC_PERIOD, step_bench.SLOW_STEP_SIZE,
                        sync=sync, **kwargs)
      v = step_bench.make_variant(step_bench.ADAM, layout, n, donate,
                                  grads=grads, tx=tx)
      v.name = f"{policy} ({sync})"
      meta[v.name] = (policy, sync)
      variants.append(v)
  log(f"  policies: {layout} {common.fmt_params(common.tree_size(grads))} "
      f"donate={donate} ({rounds} rounds)")
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=step_bench.SYNC_PERIOD,
      warmup_steps=2 * step_bench.SYNC_PERIOD, baseline=step_bench.ADAM,
      min_block_s=min_block_s)
  keep = {sync: t for t in timings
          for sync in syncs if t.name == f"keep ({sync})"}
  rows = []
  for t in timings:
    policy, sync = meta[t.name]
    vs_keep = None
    if sync in keep:
      vs_keep = t.median_s / keep[sync].median_s
    rows.append(dict(
        name=t.name, policy=policy, sync=sync, median_ms=t.median_s * 1e3,
        ratio=t.ratio, vs_keep=vs_keep, temp=t.memory.get("temp"),
        state_bytes=t.state_bytes, param_bytes=t.param_bytes,
        n=common.tree_size(grads), layout=layout, donate=donate))
  return rows
