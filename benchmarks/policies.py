"""Cost of the inner-state and non-finite policies, and of SNOO's outer step.

``lookahead(adam)`` with ``inner_state="keep"`` (default), ``"reset"``,
``"pullback"``, ``on_nonfinite="rollback"``, and SNOO's outer step
(``outer=optax.sgd(0.68, momentum=0.37, nesterov=True)``), each with the
``sync`` modes asked for (``"auto"`` picks a formulation per option, shown in
the ``formulation`` column), timed interleaved with plain adam (jit, donated
params and state, amortised over whole sync cycles). The default layout is a
transformer-like tree of 100 leaves.
"""

from typing import Sequence

import jax
import optax

import lookahead_optax as lo
from lookahead_optax import _formulation
from benchmarks import common
from benchmarks import step as step_bench

SNOO_OUTER = dict(learning_rate=0.68, momentum=0.37, nesterov=True)

POLICIES = (
    ("keep", dict()),
    ("reset", dict(inner_state="reset")),
    ("pullback", dict(inner_state="pullback")),
    ("rollback", dict(on_nonfinite="rollback")),
    ("snoo", dict(outer=None)),  # outer filled in by `make_tx`
)


def make_tx(kwargs: dict, sync: str) -> optax.GradientTransformation:
  """`lookahead(adam)` with the policy's options and `sync`."""
  kwargs = dict(kwargs)
  if "outer" in kwargs:
    kwargs["outer"] = optax.sgd(**SNOO_OUTER)
  else:
    kwargs["slow_step_size"] = step_bench.SLOW_STEP_SIZE
  return lo.lookahead(optax.adam(step_bench.LEARNING_RATE),
                      step_bench.SYNC_PERIOD, sync=sync, **kwargs)


def formulation(kwargs: dict, sync: str) -> str:
  """What `sync` resolves to for these options (on this backend)."""
  return _formulation.resolve(sync, default_options=(
      kwargs.get("inner_state", "keep") == "keep" and "outer" not in kwargs
      and kwargs.get("on_nonfinite", "propagate") == "propagate"))


def run(n: int = 10_000_000, layout: str = "tree", rounds: int = 9,
        syncs: Sequence[str] = ("auto", "select", "cond"),
        donate: bool = True, min_block_s: float = 0.1, layers: int = 8,
        policies: Sequence[str] = tuple(p for p, _ in POLICIES),
        log=print) -> list:
  """Times every policy; rows with name, sync, median_ms, ratio, temp, state.

  Args:
    n: number of float32 params.
    layout: "tree" (`layers` * 12 + 4 leaves) or "leaf" (one array).
    rounds: rounds of the round-robin.
    syncs: the `sync` modes to time each policy in.
    donate: donate params and state.
    min_block_s: minimum duration of one timed block (whole sync cycles).
    layers: layers of the "tree" layout (8 gives 100 leaves).
    policies: which rows of `POLICIES`.
    log: progress printer.

  Returns:
    A list of dicts with keys name, policy, sync, formulation, median_ms,
    ratio (to adam), vs_keep (to "keep" with the same sync), temp,
    state_bytes, param_bytes, n, leaves, layout, donate.
  """
  grads = common.make_params(layout, n, seed=1, layers=layers)
  variants = [step_bench.make_variant(step_bench.ADAM, layout, n, donate,
                                      grads=grads, layers=layers)]
  meta = {step_bench.ADAM: ("adam", "-", "-")}
  for sync in syncs:
    for policy, kwargs in POLICIES:
      if policy not in policies:
        continue
      v = step_bench.make_variant(step_bench.ADAM, layout, n, donate,
                                  grads=grads, tx=make_tx(kwargs, sync),
                                  layers=layers)
      v.name = f"{policy} ({sync})"
      meta[v.name] = (policy, sync, formulation(kwargs, sync))
      variants.append(v)
  leaves = len(jax.tree.leaves(grads))
  log(f"  policies: {layout} {common.fmt_params(common.tree_size(grads))} "
      f"({leaves} leaves) donate={donate} ({rounds} rounds)")
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=step_bench.SYNC_PERIOD,
      warmup_steps=2 * step_bench.SYNC_PERIOD, baseline=step_bench.ADAM,
      min_block_s=min_block_s)
  keep = {sync: t for t in timings
          for sync in syncs if t.name == f"keep ({sync})"}
  rows = []
  for t in timings:
    policy, sync, form = meta[t.name]
    vs_keep = None
    if sync in keep:
      vs_keep = t.median_s / keep[sync].median_s
    rows.append(dict(
        name=t.name, policy=policy, sync=sync, formulation=form,
        median_ms=t.median_s * 1e3, ratio=t.ratio, vs_keep=vs_keep,
        temp=t.memory.get("temp"), faults=t.faults_per_step,
        state_bytes=t.state_bytes,
        param_bytes=t.param_bytes, n=common.tree_size(grads), leaves=leaves,
        layout=layout, donate=donate))
  return rows


def run_kept(n: int, rounds: int, layers: int, min_block_s: float,
             log=print) -> list:
  """`run` of the default (`sync="auto"`) steps, with the C allocator keeping
  the memory it frees (`common.KEEP_FREED_MEMORY`, a child process)."""
  rows = common.run_with_freed_memory_kept(
      "import json; from benchmarks import policies; print(json.dumps("
      f"policies.run(n={n}, rounds={rounds}, layers={layers}, "
      f"min_block_s={min_block_s}, syncs=('auto',), log=lambda m: None)))")
  for r in rows:
    log(f"  {r['name']} (freed memory kept): {r['median_ms']:.2f} ms")
  return rows


def main() -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000_000)
  parser.add_argument("--layout", default="tree")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--syncs", default="auto,select,cond")
  parser.add_argument("--policies", default=",".join(p for p, _ in POLICIES))
  args = parser.parse_args()
  rows = run(n=args.n, layout=args.layout, rounds=args.rounds,
             syncs=args.syncs.split(","), policies=args.policies.split(","))
  print(common.markdown_table(
      ["policy", "sync", "formulation", "step (ms)", "vs adam", "vs keep",
       "temp (MB)", "page faults/step"],
      [[r["policy"], r["sync"], r["formulation"],
        common.fmt_ms(r["median_ms"] / 1e3),
        "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
        "-" if r["vs_keep"] is None else f"{r['vs_keep']:.2f}x",
        common.fmt_mb(r["temp"]), common.fmt_faults(r["faults"])]
       for r in rows]))


if __name__ == "__main__":
  main()
