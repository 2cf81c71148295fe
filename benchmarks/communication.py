"""Bytes that DiLoCo's collectives carry, from the compiled HLO of a step.

For `lo.diloco(adamw, k, axis_name)` on 8 replicas (`jax.pmap` over 8 host
CPU devices), each option of Streaming DiLoCo (`fragments`,
`communication_dtype`, `error_feedback`) is compiled and its HLO read: every
collective (all-reduce, all-to-all, all-gather, ...) with the bytes of its
operands (one replica's), grouped by the conditional of the entry
computation it sits in. Each fragment's sync is one conditional, taken on
that fragment's sync steps only, so:

* bytes of the largest single step: the most any one conditional carries;
* bytes per `sync_period` steps: the sum over the conditionals (each is
  taken once per period);
* a step that syncs nothing communicates nothing: no collective sits
  outside a conditional (checked);
* with `fragments="slices"` a slice of every leaf syncs at every step, with
  its collectives in the entry computation (no conditional): every step
  carries 1 / `sync_period` of a period's bytes.

The byte counts are static counts of one compiled program; the step times
(interleaved, as ratios to DiLoCo's) measure the compute that the options
add. Run
``python -m benchmarks.communication`` (``--out docs/benchmarks.md`` splices
the table into the report).
"""

import argparse
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

if __name__ == "__main__" and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

AXIS = "replicas"
REPLICAS = 8
SYNC_PERIOD = 8
START = "<!-- communication table: start -->"
END = "<!-- communication table: end -->"

# The HLO reading lives in the package (`lo.communication_report`); the
# names are re-exported for the tests.
from lookahead_optax._report import COLLECTIVE  # noqa: F401
from lookahead_optax._report import bytes_by_conditional
from lookahead_optax._report import callees  # noqa: F401
from lookahead_optax._report import collectives  # noqa: F401
from lookahead_optax._report import operand_bytes
from lookahead_optax._report import parse_hlo  # noqa: F401
from lookahead_optax._report import reachable  # noqa: F401
from lookahead_optax._report import ring_bytes
from lookahead_optax import _report as lo_report


def model_params(width: int = 128, blocks: int = 4) -> dict:
  """`blocks` equal matrices: a model whose leaves split evenly."""
  keys = jax.random.split(jax.random.key(0), blocks)
  return {f"w{i}": jax.random.normal(k, (width, width)) / width**0.5
          for i, k in enumerate(keys)}


def compiled_step_text(tx: Any, params: dict) -> str:
  """The compiled HLO of a pmapped DiLoCo step on `REPLICAS` devices."""
  fn, carry = _pmapped(tx, params)
  return fn.lower(*carry).compile().as_text()


CONFIGS = (
    ("DiLoCo, float32", dict()),
    ("streaming, P = 2", dict(fragments=2)),
    ("streaming, P = 4", dict(fragments=4)),
    ("bfloat16", dict(communication_dtype=jnp.bfloat16)),
    ("float8 e4m3", dict(communication_dtype=jnp.float8_e4m3fn)),
    ("int8", dict(communication_dtype=jnp.int8)),
    ("int4", dict(communication_dtype="int4")),
    ("int4 + error feedback", dict(communication_dtype="int4",
                                   error_feedback=True)),
    ("P = 4, int4 + error feedback", dict(fragments=4,
                                          communication_dtype="int4",
                                          error_feedback=True)),
    ("slices", dict(fragments="slices")),
    ("slices, int8, overlap", dict(fragments="slices",
                                   communication_dtype=jnp.int8,
                                   overlap=True)),
)


def run(params: Optional[dict] = None,
        names: Optional[Sequence[str]] = None) -> list:
  """Rows: name, bytes of the largest step, per period, outside syncs.

  `names` picks some of `CONFIGS` (the first is the baseline of `markdown`).
  """
  params = model_params() if params is None else params
  rows = []
  for name, kwargs in CONFIGS:
    if names is not None and name not in names:
      continue
    tx = lo.diloco(optax.adamw(1e-3), SYNC_PERIOD, AXIS, **kwargs)
    text = compiled_step_text(tx, params)
    report = lo_report.report_of_text(text, SYNC_PERIOD)
    ring, ring_outside = bytes_by_conditional(text, ring_bytes)
    rows.append(dict(name=name, peak=report.largest_step,
                     period=report.per_period, outside=report.every_step,
                     conditionals=len(report.per_conditional),
                     ring_period=round(sum(ring)
                                       + SYNC_PERIOD * ring_outside)))
  return rows


def _pmapped(tx: Any, params: dict) -> tuple:
  """A donated pmapped step of `tx` and its first (params, state, grads)."""
  devices = jax.devices()[:REPLICAS]
  stacked = jax.tree.map(lambda a: jnp.stack([a] * REPLICAS), params)
  grads = jax.tree.map(lambda a: 1e-3 * jnp.ones_like(a), stacked)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  fn = jax.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=(0, 1))
  return fn, (jax.tree.map(jnp.copy, stacked),
              jax.pmap(tx.init, devices=devices)(stacked), grads)


CHECK_CONFIGS = (
    ("DiLoCo, float32", dict()),
    ("check_replicas='detect'", dict(check_replicas="detect")),
    ("check_replicas='repair'", dict(check_replicas="repair")),
)


REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"


def step_times(params: dict, names: Sequence[str], rounds: int = 7,
               blocks: int = 4, configs: Sequence = CONFIGS,
               clock: Any = time.perf_counter,
               region_analysis: bool = False) -> dict:
  """Median step time of each config over DiLoCo's, timed round-robin.

  A block is `blocks * SYNC_PERIOD` steps (every fragment syncs `blocks`
  times); the ratio is the median of the per-round ratios. `clock` is the
  wall clock, or `time.process_time` (the CPU time of all this process's
  threads: steadier where other work shares the cores). With
  `region_analysis`, every step is compiled with XLA:CPU's region-analysis
  copy insertion (`REGION_ANALYSIS`), which updates donated buffers in place
  where the default copies them (the slices' dynamic updates).
  """
  configs = dict(configs)
  runs = {}
  for name in names:
    fn, carry = _pmapped(lo.diloco(optax.adamw(1e-3), SYNC_PERIOD, AXIS,
                                   **configs[name]), params)
    if region_analysis:
      fn = fn.lower(*carry).compile(compiler_options={REGION_ANALYSIS: True})
    for _ in range(SYNC_PERIOD):  # compile and warm up
      carry = (*fn(*carry), carry[2])
    runs[name] = [fn, carry]
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, carry = runs[name]
      jax.block_until_ready(carry)
      t0 = clock()
      for _ in range(blocks * SYNC_PERIOD):
        carry = (*fn(*carry), carry[2])
      jax.block_until_ready(carry)
      times[name].append(clock() - t0)
      runs[name][1] = carry
  base = names[0]
  return {name: statistics.median(a / b for a, b in zip(times[name],
                                                        times[base]))
          for name in names}


def markdown(rows: list, params: dict, times: Optional[dict] = None,
             region_times: Optional[dict] = None) -> str:
  """The table, relative to DiLoCo's float32 sync."""
  base, ring_base = rows[0]["peak"], rows[0]["ring_period"]
  n = _size(params)
  lines = [f"{len(params)} float32 matrices, {n:,} params, {REPLICAS} "
           f"replicas (`jax.pmap`), `sync_period = {SYNC_PERIOD}`; bytes are "
           "one replica's collective operand bytes, from the compiled HLO "
           "(`python -m benchmarks.communication`), and the bytes one "
           "replica sends with ring algorithms (all-reduce 2 (M - 1) / M "
           "of its operand, all-to-all (M - 1) / M, all-gather M - 1 times "
           "its shard).", "",
           "| option | largest step | vs DiLoCo | per `sync_period` steps "
           "| vs DiLoCo | ring, per `sync_period` | vs DiLoCo "
           "| on other steps | step time vs DiLoCo | with region analysis |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = (times or {}).get(r["name"])
    region = (region_times or {}).get(r["name"])
    lines.append(f"| {r['name']} | {r['peak']:,} B | {r['peak'] / base:.3f}x"
                 f" | {r['period']:,} B | {r['period'] / base:.3f}x | "
                 f"{r['ring_period']:,} B | "
                 f"{r['ring_period'] / ring_base:.3f}x | {r['outside']:,} B | "
                 f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                 f"{'-' if region is None else f'{region:.2f}x'} |")
  if times:
    lines += ["", TIMING_NOTE.format(n=_size(TIMING_PARAMS()))]
  return "\n".join(lines)


TIMING_PARAMS = lambda: model_params(512, 4)  # pylint: disable=unnecessary-lambda-assignment
TIMING_NOTE = (
    "Step time: `lo.diloco(adamw)` on {n:,} params (4 matrices of 512 x "
    "512), 8 replicas as 8 host CPU devices sharing this machine's cores, "
    "donated `jax.pmap` steps amortised over whole sync periods, median of "
    "7 interleaved rounds. The collectives here are copies in one "
    "process, so this is the cost of the extra compute (encoding, the "
    "fragments' conditionals), not of a network. The last column compiles "
    "every step with `compiler_options={{'" + REGION_ANALYSIS + "': True}}`"
    " (each ratio against DiLoCo compiled so too): XLA:CPU's default copy "
    "insertion copies the slow weights and the stacked outer state of "
    "`fragments=\"slices\"` at every step instead of updating their slice "
    "in place.")


def _size(params: dict) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


REPLICA_MEAN_FORMATS = (
    ("float32", None),
    ("bfloat16", jnp.bfloat16),
    ("float8 e4m3", jnp.float8_e4m3fn),
    ("int8", jnp.int8),
    ("int4", "int4"),
)


def replica_mean_rows(params: Optional[dict] = None,
                      names: Optional[Sequence[str]] = None) -> list:
  """Rows: name, collective operand bytes of a data-parallel step.

  The step is `lo.replica_mean(AXIS, communication_dtype)` on `REPLICAS`
  replicas (a donated `jax.pmap` of the update and `apply_updates`), for
  each of `REPLICA_MEAN_FORMATS` (or the `names` among them); the first is
  float32's `pmean`. `ring` is what a ring algorithm sends per replica
  (`ring_bytes`).
  """
  params = model_params() if params is None else params
  rows = []
  for name, dtype in REPLICA_MEAN_FORMATS:
    if names is not None and name not in names:
      continue
    text = compiled_step_text(lo.replica_mean(AXIS, dtype), params)
    computations, entry = parse_hlo(text)
    lines = [line for comp in reachable(computations, entry)
             for line in computations[comp] if COLLECTIVE.search(line)]
    operand = sum(operand_bytes(line) for line in lines)
    ring = sum(ring_bytes(line) for line in lines)
    rows.append(dict(name=name, operand=operand, ring=ring))
  return rows


def replica_mean_markdown(rows: list, params: dict) -> str:
  """The table of `replica_mean_rows`, relative to float32's `pmean`."""
  base = rows[0]
  lines = [f"`lo.replica_mean`, {_size(params):,} float32 params, "
           f"{REPLICAS} replicas (`jax.pmap`): one replica's collective "
           "operand bytes per step, from the compiled HLO, and what a ring "
           "algorithm sends.", "",
           "| communication_dtype | operand bytes | vs float32 | ring sends "
           "| vs float32 |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['operand']:,} B | "
                 f"{r['operand'] / base['operand']:.3f}x | "
                 f"{r['ring']:,.0f} B | {r['ring'] / base['ring']:.3f}x |")
  return "\n".join(lines)


def splice(path: str, text: str) -> None:
  """Replaces the table between the markers in `path`."""
  with open(path, encoding="utf-8") as f:
    doc = f.read()
  head, rest = doc.split(START, 1)
  _, tail = rest.split(END, 1)
  with open(path, "w", encoding="utf-8") as f:
    f.write(head + START + "\n" + text + "\n" + END + tail)


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="a markdown file with the markers")
  parser.add_argument("--no-timing", action="store_true",
                      help="the byte counts only")
  parser.add_argument("--replica-mean", action="store_true",
                      help="the bytes of `lo.replica_mean` per format only "
                      "(on 4 matrices of 512 x 512)")
  parser.add_argument("--check", action="store_true",
                      help="the step time of `check_replicas` only (on 4 "
                      "matrices of 1600 x 1600: 10M params)")
  parser.add_argument("--cpu-time", action="store_true",
                      help="with --check: time the process's CPU time (all "
                      "threads), not the wall clock")
  args = parser.parse_args(argv)
  if args.check:
    names = [name for name, _ in CHECK_CONFIGS]
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = step_times(model_params(1600, 4), names, rounds=5, blocks=1,
                       configs=CHECK_CONFIGS, clock=clock)
    text = "\n".join(f"{name}: {times[name]:.3f}x" for name in names)
    print(text)
    return text
  if args.replica_mean:
    params = model_params(512, 4)
    text = replica_mean_markdown(replica_mean_rows(params), params)
    print(text)
    return text
  params = model_params()
  rows = run(params)
  names = [r["name"] for r in rows]
  times = None if args.no_timing else step_times(TIMING_PARAMS(), names)
  region_times = None if args.no_timing else step_times(
      TIMING_PARAMS(), names, region_analysis=True)
  text = markdown(rows, params, times, region_times)
  print(text)
  if args.out:
    splice(args.out, text)
  return text


if __name__ == "__main__":
  main()
