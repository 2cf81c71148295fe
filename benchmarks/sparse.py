"""Cost of row-sparse embedding updates (`SparseRows`) against dense Adam.

A (V, 32) float32 table, a batch of N looked-up ids a step (8,192 unless
said), `jax.jit` with params and state donated (update +
`optax.apply_updates`), on the default XLA flags. Variants:

* `adam (dense)`: `optax.adam` on the dense (V, 32) gradient (what `jax.grad`
  of a lookup gives; building that gradient is not timed here);
* `lazy(adam), SparseRows`: `lo.lazy(optax.adam)` on a `SparseRows` gradient;
* `lookahead(lazy(adam)), SparseRows`: the same inside `lo.lookahead` (k = 4,
  alpha = 0.5, `rows_per_step=N` so that a sync touches only the rows of its
  cycle); its blocks hold whole sync cycles.

Three measurements: the step at V = 1M against dense adam (interleaved,
median of per-round ratios); the sparse steps at V = 4M and 16M against the
same step at V = 1M (interleaved, one V at a time next to V = 1M, so the
ratio says whether the cost is flat in V); the sparse step at N = 1k, 8k and
64k at V = 1M (cost per id), also in a child process whose C allocator keeps
the memory it frees (`common.KEEP_FREED_MEMORY`: a step whose temporaries
outgrow what glibc keeps for reuse page-faults fresh memory in at every call,
which the "page faults/step" column counts). Plus an end-to-end training step of the
language-model example (`examples/language_model.py`: forward, gradient,
update) with a 1M-row hashed-bigram input table, sparse path
(`lo.sparse_value_and_grad` + `lo.lazy`) against the dense path (`jax.grad`
+ `optax.adam`), with XLA's memory figures for each.

Catching up idle rows (`lo.lazy(adam, catch_up=True)`, section `catch_up`):
its step against `lazy(adam)` at V = 1M (interleaved, median of per-round
ratios), and at V = 4M against V = 1M (flat in V?), with XLA's temp bytes
and the bytes of its per-row steps (one int32 per row).

Run ``python -m benchmarks.sparse`` (``--quick`` for small sizes; the full
run holds up to ~7 GiB at V = 16M).
"""

import argparse
import importlib
import inspect
import os
import sys
from typing import Optional
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo
from benchmarks import common

DIM = 32
NUM_IDS = 8192
SYNC_PERIOD = 4
LEARNING_RATE = 1e-3

ADAM = "adam (dense)"
LAZY = "lazy(adam), SparseRows"
LOOKAHEAD = "lookahead(lazy(adam)), SparseRows"
SPARSE_VARIANTS = (LAZY, LOOKAHEAD)
CATCH_UP = "lazy(adam, catch_up=True), SparseRows"


def _lookahead_rows_kwargs(num_ids: int) -> dict:
  """`rows_per_step=num_ids` where `lookahead` takes it (row-sparse syncs)."""
  if "rows_per_step" in inspect.signature(lo.lookahead).parameters:
    return {"rows_per_step": num_ids}  # The table is the root leaf.
  return {}


def make_tx(name: str, num_ids: int = NUM_IDS) -> optax.GradientTransformation:
  adam = optax.adam(LEARNING_RATE)
  if name == ADAM:
    return adam
  if name == LAZY:
    return lo.lazy(adam)
  if name == CATCH_UP:
    return lo.lazy(adam, catch_up=True)
  if name == LOOKAHEAD:
    return lo.lookahead(lo.lazy(adam), sync_period=SYNC_PERIOD,
                        slow_step_size=0.5, **_lookahead_rows_kwargs(num_ids))
  raise ValueError(f"unknown variant {name!r}")


def supported(name: str) -> Optional[str]:
  """None if the variant runs on `SparseRows`, else why not (one line).

  A cycle of jitted steps, as the benchmark runs them (one compilation;
  eagerly every step's row-sparse sync would compile its own).
  """
  tx = make_tx(name, num_ids=2)
  params = jnp.zeros((8, DIM))
  grads = lo.SparseRows(jnp.array([1, 3]), jnp.ones((2, DIM)))
  step = jax.jit(common.optimizer_step(tx))
  try:
    state = tx.init(params)
    for _ in range(SYNC_PERIOD):
      params, state = step(params, state, grads)
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return None


def sparse_batch(num_rows: int, num_ids: int, seed: int = 1) -> lo.SparseRows:
  """`num_ids` uniformly drawn ids (repeats allowed) and gradient rows."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, num_rows, num_ids, dtype=np.int32)
  values = rng.standard_normal((num_ids, DIM), dtype=np.float32)
  return lo.SparseRows(jnp.asarray(ids), jnp.asarray(values))


POOL = 16  # batches of distinct ids, cycled through step after step


def make_variant(name: str, num_rows: int, num_ids: int,
                 label: Optional[str] = None) -> common.Variant:
  """A jitted step; sparse variants look up new ids at every step.

  Reusing one batch of ids would keep its rows in the CPU caches from one
  step to the next and flatter small batches; the sparse steps cycle through
  `POOL` batches of independently drawn ids instead (the pool and a step
  counter ride in the state; picking a batch costs one (N,)-sized slice).
  """
  tx = make_tx(name, num_ids)

  def init():
    params = jnp.asarray(
        0.02 * np.random.default_rng(0).standard_normal(
            (num_rows, DIM), dtype=np.float32))
    if name == ADAM:
      return params, tx.init(params), sparse_batch(num_rows, num_ids).todense(
          num_rows)
    pool = [sparse_batch(num_rows, num_ids, seed=1 + i) for i in range(POOL)]
    pool = jax.tree.map(lambda *xs: jnp.stack(xs), *pool)
    return params, (tx.init(params), jnp.zeros((), jnp.int32)), pool

  if name == ADAM:
    fn = common.optimizer_step(tx)
  else:
    def fn(params, state, pool):
      opt_state, step = state
      grads = jax.tree.map(lambda x: x[step % POOL], pool)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), (opt_state, step + 1)

  return common.Variant(name=label or name, fn=fn, init=init, donate=True)


def _rounds(quick: bool, rounds: Optional[int]) -> int:
  return rounds or (3 if quick else 9)


def run_vs_dense(num_rows: int, variants: tuple, *, rounds: int,
                 min_block_s: float, log=None) -> list:
  names = (ADAM,) + variants
  timings = common.interleaved(
      [make_variant(n, num_rows, NUM_IDS) for n in names], rounds=rounds,
      steps_per_block=SYNC_PERIOD * 2, warmup_steps=SYNC_PERIOD,
      baseline=ADAM, min_block_s=min_block_s)
  rows = []
  for t in timings:
    rows.append({"name": t.name, "rows": num_rows, "ids": NUM_IDS,
                 "median_ms": t.median_s * 1e3, "ratio": t.ratio,
                 "temp": t.memory.get("temp"),
                 "state_bytes": t.state_bytes})
    if log:
      log(f"  {t.name} V={num_rows}: {t.median_s * 1e3:.3f} ms, "
          f"x{t.ratio:.3f} adam")
  return rows


def run_scaling_in_v(sizes: tuple, variants: tuple, *, base_rows: int,
                     rounds: int, min_block_s: float, log=None) -> list:
  """Each size next to `base_rows`, interleaved; ratio to the base size."""
  rows = []
  for name in variants:
    for num_rows in sizes:
      base = f"{name} V={base_rows}"
      label = f"{name} V={num_rows}"
      timings = common.interleaved(
          [make_variant(name, base_rows, NUM_IDS, base),
           make_variant(name, num_rows, NUM_IDS, label)],
          rounds=rounds, steps_per_block=SYNC_PERIOD * 2,
          warmup_steps=SYNC_PERIOD, baseline=base, min_block_s=min_block_s)
      t = timings[1]
      rows.append({"name": name, "rows": num_rows, "ids": NUM_IDS,
                   "median_ms": t.median_s * 1e3,
                   "base_ms": timings[0].median_s * 1e3,
                   "ratio_vs_base": t.ratio, "temp": t.memory.get("temp")})
      if log:
        log(f"  {label}: {t.median_s * 1e3:.3f} ms, x{t.ratio:.3f} "
            f"V={base_rows}")
  return rows


def run_scaling_in_ids(num_rows: int, id_counts: tuple, variants: tuple, *,
                       rounds: int, min_block_s: float, log=None) -> list:
  rows = []
  for name in variants:
    vs = [make_variant(name, num_rows, n, f"{name} N={n}") for n in id_counts]
    timings = common.interleaved(
        vs, rounds=rounds, steps_per_block=SYNC_PERIOD * 2,
        warmup_steps=SYNC_PERIOD, min_block_s=min_block_s)
    for n, t in zip(id_counts, timings):
      rows.append({"name": name, "rows": num_rows, "ids": n,
                   "median_ms": t.median_s * 1e3,
                   "us_per_id": t.median_s * 1e6 / n,
                   "temp": t.memory.get("temp"),
                   "faults": t.faults_per_step})
      if log:
        log(f"  {t.name}: {t.median_s * 1e3:.3f} ms")
  return rows


def run_scaling_in_ids_kept(num_rows: int, id_counts: tuple, variants: tuple,
                            *, rounds: int, min_block_s: float,
                            log=None) -> list:
  """`run_scaling_in_ids` with `common.KEEP_FREED_MEMORY` (a child process)."""
  code = ("import json; from benchmarks import sparse; print(json.dumps("
          f"sparse.run_scaling_in_ids({num_rows}, {tuple(id_counts)!r}, "
          f"{tuple(variants)!r}, rounds={rounds}, "
          f"min_block_s={min_block_s})))")
  rows = common.run_with_freed_memory_kept(code)
  if log:
    for r in rows:
      log(f"  {r['name']} N={r['ids']} (freed memory kept): "
          f"{r['median_ms']:.3f} ms")
  return rows


def _language_model():
  """The example's module (examples/ is not a package)."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  examples = os.path.join(here, "examples")
  if examples not in sys.path:
    sys.path.insert(0, examples)
  return importlib.import_module("language_model")


def run_e2e(table_rows: int, *, rounds: int, min_block_s: float,
            log=None) -> list:
  """One training step of the language-model example, sparse vs dense."""
  lm = _language_model()
  setup = lm.benchmark_setup(table_rows)
  variants = []
  warnings.filterwarnings("ignore", message="lazy: XLA:CPU")
  for name in (lm.DENSE_STEP, lm.SPARSE_STEP):
    step, init, options = setup(name)
    variants.append(common.Variant(name=name, fn=step, init=init,
                                   donate=True, compiler_options=options))
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=SYNC_PERIOD,
      warmup_steps=2, baseline=lm.DENSE_STEP, min_block_s=min_block_s)
  rows = []
  for t in timings:
    rows.append({"name": t.name, "rows": table_rows,
                 "median_ms": t.median_s * 1e3, "ratio": t.ratio,
                 "temp": t.memory.get("temp"),
                 "output": t.memory.get("output"),
                 "state_bytes": t.state_bytes + t.param_bytes})
    if log:
      log(f"  e2e {t.name}: {t.median_s * 1e3:.2f} ms, x{t.ratio:.3f}")
  return rows


def run_catch_up(base_rows: int, big_rows: int, *, rounds: int,
                 min_block_s: float, log=None) -> list:
  """`catch_up=True` against `lazy(adam)` at `base_rows`, then at
  `big_rows` against itself at `base_rows` (both interleaved)."""
  timings = common.interleaved(
      [make_variant(n, base_rows, NUM_IDS) for n in (LAZY, CATCH_UP)],
      rounds=rounds, steps_per_block=SYNC_PERIOD * 2,
      warmup_steps=SYNC_PERIOD, baseline=LAZY, min_block_s=min_block_s)
  rows = [{"name": t.name, "rows": base_rows, "median_ms": t.median_s * 1e3,
           "ratio": t.ratio, "vs": LAZY, "temp": t.memory.get("temp"),
           "state_bytes": t.state_bytes} for t in timings]
  base = f"{CATCH_UP} V={base_rows}"
  timings = common.interleaved(
      [make_variant(CATCH_UP, base_rows, NUM_IDS, base),
       make_variant(CATCH_UP, big_rows, NUM_IDS)],
      rounds=rounds, steps_per_block=SYNC_PERIOD * 2,
      warmup_steps=SYNC_PERIOD, baseline=base, min_block_s=min_block_s)
  t = timings[1]
  rows.append({"name": t.name, "rows": big_rows,
               "median_ms": t.median_s * 1e3, "ratio": t.ratio,
               "vs": f"itself at V = {_fmt_rows(base_rows)}",
               "temp": t.memory.get("temp"), "state_bytes": t.state_bytes})
  if log:
    for r in rows:
      log(f"  {r['name']} V={r['rows']}: {r['median_ms']:.3f} ms, "
          f"x{r['ratio']:.3f} {r['vs']}")
  return rows


def run(quick: bool = False, *, rounds: Optional[int] = None, log=None,
        sections: tuple = ("dense", "v", "ids", "e2e")) -> dict:
  """Runs the measurements; returns a dict of row lists (and skips)."""
  rounds = _rounds(quick, rounds)
  min_block_s = 0.02 if quick else 0.2
  base = 50_000 if quick else 1_000_000
  sizes = (200_000, 800_000) if quick else (4_000_000, 16_000_000)
  id_counts = (1024, 8192, 65536)
  variants, skipped = [], {}
  for name in SPARSE_VARIANTS:
    why = supported(name)
    if why is None:
      variants.append(name)
    else:
      skipped[name] = why
      if log:
        log(f"  {name}: not available ({why})")
  variants = tuple(variants)
  out = {"base_rows": base, "skipped": skipped}
  if "dense" in sections:
    out["dense"] = run_vs_dense(base, variants, rounds=rounds,
                                min_block_s=min_block_s, log=log)
  if "v" in sections:
    out["v"] = run_scaling_in_v(sizes, variants, base_rows=base,
                                rounds=rounds, min_block_s=min_block_s,
                                log=log)
  if "ids" in sections:
    out["ids"] = run_scaling_in_ids(base, id_counts, variants, rounds=rounds,
                                    min_block_s=min_block_s, log=log)
  if "ids_kept" in sections:
    out["ids_kept"] = run_scaling_in_ids_kept(
        base, id_counts, variants, rounds=rounds, min_block_s=min_block_s,
        log=log)
  if "catch_up" in sections:
    out["catch_up"] = run_catch_up(base, sizes[0], rounds=rounds,
                                   min_block_s=min_block_s, log=log)
  if "e2e" in sections:
    out["e2e"] = run_e2e(base, rounds=max(3, rounds // 2),
                         min_block_s=min_block_s, log=log)
  return out


def _fmt_rows(n: int) -> str:
  return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def markdown(out: dict) -> str:
  """The tables of `run`'s result."""
  parts = []
  if out.get("dense"):
    parts.append(common.markdown_table(
        ["step", "table", "ids/step", "step (ms)", "vs dense adam",
         "temp (MB)", "params+state (MB)"],
        [[r["name"], f"{_fmt_rows(r['rows'])} x {DIM}", r["ids"],
          f"{r['median_ms']:.3f}", f"{r['ratio']:.3f}x",
          common.fmt_mb(r["temp"]),
          common.fmt_mb(r["state_bytes"])] for r in out["dense"]]))
  if out.get("v"):
    parts.append(common.markdown_table(
        ["step", "table", "step (ms)",
         f"V = {_fmt_rows(out['base_rows'])}, same rounds (ms)",
         f"vs V = {_fmt_rows(out['base_rows'])}", "temp (MB)"],
        [[r["name"], f"{_fmt_rows(r['rows'])} x {DIM}",
          f"{r['median_ms']:.3f}", f"{r['base_ms']:.3f}",
          f"{r['ratio_vs_base']:.2f}x", common.fmt_mb(r["temp"])]
         for r in out["v"]]))
  for key in ("ids", "ids_kept"):
    if out.get(key):
      if key == "ids_kept":
        parts.append("The same, in a process whose C allocator keeps the "
                     "memory it frees (" + common.keep_freed_memory_note()
                     + "):")
      parts.append(common.markdown_table(
          ["step", "table", "ids/step", "step (ms)", "us per id",
           "temp (MB)", "page faults/step"],
          [[r["name"], f"{_fmt_rows(r['rows'])} x {DIM}", r["ids"],
            f"{r['median_ms']:.3f}", f"{r['us_per_id']:.3f}",
            common.fmt_mb(r["temp"]), common.fmt_faults(r.get("faults"))]
           for r in out[key]]))
  if out.get("catch_up"):
    parts.append(common.markdown_table(
        ["step", "table", "ids/step", "step (ms)", "ratio", "to",
         "temp (MB)", "params+state (MB)"],
        [[r["name"], f"{_fmt_rows(r['rows'])} x {DIM}", NUM_IDS,
          f"{r['median_ms']:.3f}", f"{r['ratio']:.3f}x", r["vs"],
          common.fmt_mb(r["temp"]), common.fmt_mb(r["state_bytes"])]
         for r in out["catch_up"]]))
  if out.get("e2e"):
    parts.append(common.markdown_table(
        ["language-model train step", "input table", "step (ms)",
         "vs dense", "temp (MB)", "output (MB)", "params+state (MB)"],
        [[r["name"], f"{_fmt_rows(r['rows'])} rows",
          f"{r['median_ms']:.2f}", f"{r['ratio']:.3f}x",
          common.fmt_mb(r["temp"]), common.fmt_mb(r["output"]),
          common.fmt_mb(r["state_bytes"])] for r in out["e2e"]]))
  for name, why in out.get("skipped", {}).items():
    parts.append(f"`{name}`: not run, it does not take `SparseRows` in this "
                 f"build ({why}).")
  return "\n\n".join(parts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument(
      "--sections", default="dense,v,ids,ids_kept,catch_up,e2e",
      help="comma-separated: dense, v, ids, ids_kept, catch_up, e2e")
  args = parser.parse_args()
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  out = run(quick=args.quick, rounds=args.rounds, log=log,
            sections=tuple(s.strip() for s in args.sections.split(",")))
  print(common.machine_line() + "\n")
  print(markdown(out))


if __name__ == "__main__":
  main()
