"""Runs the benchmark suite and writes docs/benchmarks.md.

Usage::

  python -m benchmarks.run                      # full run (~10 minutes)
  python -m benchmarks.run --quick              # tiny sizes, seconds
  python -m benchmarks.run --sizes 1e6,1e7 --tree-sizes 2.5e7 \\
      --out docs/benchmarks.md --plot docs/img/benchmark_step_time.png

Prints the markdown report (and progress on stderr); with ``--out`` also
writes it to a file, with ``--plot`` draws step time vs param count.
"""

import argparse
import importlib
import os
import sys
import time
from typing import Optional, Sequence

import jax

from benchmarks import common
from benchmarks import communication
from benchmarks import e2e
from benchmarks import policies
from benchmarks import step

FULL_SIZES = (1_000_000, 10_000_000, 50_000_000)
# The tree layout also at ~25M params, the size of a small transformer.
FULL_TREE_SIZES = (1_000_000, 10_000_000, 25_000_000, 50_000_000)
QUICK_SIZES = (100_000,)
TARGET_N = 10_000_000


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _parse_sizes(text: str) -> list:
  return [int(float(s)) for s in text.split(",") if s.strip()]


def _x(ratio: Optional[float]) -> str:
  return "-" if ratio is None else f"{ratio:.2f}x"


def step_table(rows: list, donate: bool) -> str:
  """Step time per configuration: one line per (layout, size)."""
  header = ["layout", "params", "leaves"]
  for name in step.VARIANTS:
    header.append(f"{name} (ms)")
  header.append("optax.lookahead / select")
  lines = []
  keys = []
  for r in rows:
    key = (r["layout"], r["n"])
    if r["donate"] == donate and key not in keys:
      keys.append(key)
  for layout, n in keys:
    by = {r["name"]: r for r in rows
          if r["layout"] == layout and r["n"] == n and r["donate"] == donate}
    line = [layout, common.fmt_params(n), by[step.ADAM]["leaves"]]
    for name in step.VARIANTS:
      r = by.get(name)
      if r is None:
        line.append("-")
      elif name == step.ADAM:
        line.append(common.fmt_ms(r["median_ms"] / 1e3))
      else:
        line.append(f"{common.fmt_ms(r['median_ms'] / 1e3)} "
                    f"({_x(r['ratio'])})")
    if step.OPTAX_LA in by and step.LA_SELECT in by:
      line.append(_x(by[step.OPTAX_LA]["median_ms"]
                     / by[step.LA_SELECT]["median_ms"]))
    else:
      line.append("-")
    lines.append(line)
  return common.markdown_table(header, lines)


def memory_table(rows: list) -> str:
  """Compiled temp/output bytes and persistent bytes per variant."""
  header = ["layout", "params", "optimizer", "temp, donated (MB)",
            "temp, not donated (MB)", "output (MB)",
            "params + state (MB)", "beyond adam (bytes)",
            "= one params copy + int32?"]
  lines = []
  keys = []
  for r in rows:
    if (r["layout"], r["n"]) not in keys:
      keys.append((r["layout"], r["n"]))
  for layout, n in keys:
    sel = [r for r in rows if r["layout"] == layout and r["n"] == n]
    adam = next((r for r in sel if r["name"] == step.ADAM), None)
    for name in step.VARIANTS:
      d = next((r for r in sel if r["name"] == name and r["donate"]), None)
      nd = next((r for r in sel if r["name"] == name and not r["donate"]),
                None)
      r = d or nd
      if r is None:
        continue
      persistent = r["state_bytes"] + r["param_bytes"]
      extra = check = "-"
      if adam is not None:
        extra_bytes = persistent - (adam["state_bytes"] + adam["param_bytes"])
        extra = f"{extra_bytes:,}"
        check = "yes" if extra_bytes == adam["param_bytes"] + 4 else "no"
        if name == step.ADAM:
          check = "-"
      lines.append([
          layout, common.fmt_params(n), name,
          common.fmt_mb(d["temp"]) if d else "-",
          common.fmt_mb(nd["temp"]) if nd else "-",
          common.fmt_mb(r["output"]), common.fmt_mb(persistent), extra,
          check])
  return common.markdown_table(header, lines)


def policies_table(rows: list) -> str:
  header = ["option", "sync", "runs as", "step (ms)", "vs adam",
            "vs keep (same sync)", "temp (MB)", "page faults/step",
            "state (MB)"]
  return common.markdown_table(header, [
      [r["policy"], r["sync"], r.get("formulation", "-"),
       common.fmt_ms(r["median_ms"] / 1e3), _x(r["ratio"]), _x(r["vs_keep"]),
       common.fmt_mb(r["temp"]), common.fmt_faults(r.get("faults")),
       common.fmt_mb(r["state_bytes"])]
      for r in rows])


# Issue targets for each option's default (`sync="auto"`) step, CPU.
POLICY_TARGETS = {"keep": 1.1, "reset": 1.25, "pullback": 1.45,
                  "rollback": 2.0, "snoo": 1.45}


def policy_targets_table(rows: list, kept_rows: Optional[list] = None) -> str:
  """The default (`sync="auto"`) step of each option against its target.

  `kept_rows`: the same steps timed with the C allocator keeping the memory
  it frees (`policies.run_kept`), shown in a column of their own.
  """
  kept = {r["policy"]: r for r in kept_rows or ()}
  lines = []
  for r in rows:
    if r["sync"] != "auto" or r["policy"] not in POLICY_TARGETS:
      continue
    target = POLICY_TARGETS[r["policy"]]
    line = [r["policy"], r.get("formulation", "-"), f"<= {target}x",
            _x(r["ratio"]), "yes" if r["ratio"] <= target else "no",
            common.fmt_faults(r.get("faults"))]
    if kept_rows is not None:
      k = kept.get(r["policy"])
      line += [_x(k["ratio"]) if k else "-",
               common.fmt_faults(k.get("faults")) if k else "-"]
    lines.append(line)
  header = ["option", "auto runs as", "wanted", "measured", "met",
            "page faults/step"]
  if kept_rows is not None:
    header += ["measured, freed memory kept", "page faults/step (kept)"]
  return common.markdown_table(header, lines)


def e2e_table(rows: list) -> str:
  header = ["model", "params", "batch", "optimizer", "train step (ms)",
            "overhead vs adam", "temp (MB)"]
  return common.markdown_table(header, [
      [r["model"], common.fmt_params(r["n"]), r["batch"], r["name"],
       common.fmt_ms(r["median_ms"] / 1e3), f"{r['overhead_pct']:+.1f}%",
       common.fmt_mb(r["temp"])] for r in rows])


def formulations_table(rows: list) -> str:
  header = ["formulation", "step (ms)", "vs adam", "temp (MB)",
            "trajectory vs the library"]
  return common.markdown_table(header, [
      [r["name"], common.fmt_ms(r["median_ms"] / 1e3), _x(r["ratio"]),
       common.fmt_mb(r["temp"]), r.get("exact", "-")] for r in rows])


def snippet(name: str, text: str) -> str:
  """`text` marked as section `name` for pymdownx.snippets.

  Other pages include it (`--8<-- "docs/benchmarks.md:NAME"`), so that each
  figure is written in this report alone.
  """
  return (f"<!-- --8<-- [start:{name}] -->\n{text}\n"
          f"<!-- --8<-- [end:{name}] -->")


def generic_table(rows: list) -> str:
  if not rows:
    return "(no rows)"
  header = list(rows[0])

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}"
    return str(v)

  return common.markdown_table(header,
                               [[fmt(r.get(k)) for k in header] for r in rows])


def targets_table(step_rows: list, e2e_rows: list) -> Optional[str]:
  """The issue's targets at 10M params in one leaf, measured in this run."""

  def find(name, donate, layout="leaf"):
    for r in step_rows:
      if (r["name"] == name and r["donate"] == donate
          and r["layout"] == layout
          and abs(r["n"] - TARGET_N) <= TARGET_N // 10):
        return r
    return None

  sel_d, adam_d = find(step.LA_SELECT, True), find(step.ADAM, True)
  if sel_d is None or adam_d is None:
    return None
  sel_n = find(step.LA_SELECT, False)
  optax_d = find(step.OPTAX_LA, True)
  lines = []

  def add(what, target, value, ok):
    lines.append([what, target, value, "yes" if ok else "**no**"])

  add("lookahead(adam) step / adam step, donated", "<= 1.3x (stretch 1.15x)",
      _x(sel_d["ratio"]), sel_d["ratio"] <= 1.3)
  if sel_n is not None:
    add("same, not donated", "<= 1.5x", _x(sel_n["ratio"]),
        sel_n["ratio"] <= 1.5)
  if optax_d is not None:
    speedup = optax_d["median_ms"] / sel_d["median_ms"]
    add("optax.lookahead(adam) / lookahead(adam), donated", ">= 2x",
        _x(speedup), speedup >= 2)
  extra_temp = (sel_d["temp"] or 0) - (adam_d["temp"] or 0)
  add("compiled temp memory beyond adam's", "<= one params copy "
      f"({common.fmt_mb(adam_d['param_bytes'])} MB)",
      f"{extra_temp:,} bytes", extra_temp <= adam_d["param_bytes"])
  extra_state = sel_d["state_bytes"] - adam_d["state_bytes"]
  add("persistent state beyond adam's", "one params copy + int32 "
      f"({adam_d['param_bytes'] + 4:,} bytes)", f"{extra_state:,} bytes",
      extra_state == adam_d["param_bytes"] + 4)
  e2e_sel = next((r for r in e2e_rows if r["name"] == step.LA_SELECT), None)
  if e2e_sel is not None:
    add(f"end-to-end train step overhead ({e2e_sel['model']})", "<= 3%",
        f"{e2e_sel['overhead_pct']:+.1f}%", e2e_sel["overhead_pct"] <= 3.0)
  return common.markdown_table(["target", "wanted", "measured", "met"],
                               lines)


def plot(step_rows: list, path: str) -> bool:
  """Draws step time vs param count to `path`; False without matplotlib.

  matplotlib is optional (the `examples` extra): without it the figure is
  skipped with a message on stderr and the report is written without it.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    _log(f"  plot: matplotlib is not installed, skipping the figure {path} "
         "(pip install matplotlib, or the `examples` extra, to draw it)")
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  colors = {step.ADAM: "black", step.LA_SELECT: "tab:blue",
            step.LA_COND: "tab:orange", step.OPTAX_LA: "tab:red"}
  for ax, donate in zip(axes, (True, False)):
    for name in step.VARIANTS:
      for layout, style in (("leaf", "-o"), ("tree", "--s")):
        pts = sorted((r["n"], r["median_ms"]) for r in step_rows
                     if r["name"] == name and r["layout"] == layout
                     and r["donate"] == donate)
        if not pts:
          continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                color=colors[name], label=f"{name}, {layout}", markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("float32 params")
    ax.set_title("params and state donated" if donate else "not donated")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("amortised step time (ms), median")
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    axes[0].legend(handles, labels, fontsize=7, loc="upper left")
  fig.suptitle(f"Optimizer step, jit, k = {step.SYNC_PERIOD} "
               "(leaf: one array, tree: 148-leaf transformer-like)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


_INTRO = """\
# Benchmarks

Lookahead's promise is *negligible computation*: the paper's overhead is
(k+1)/k of the inner update plus one extra copy of the params. This page
measures how close `lookahead_optax` gets, against plain `optax.adam` and
`optax.lookahead(adam)`, and explains the choice of the default `sync` mode.

## How to run

```bash
python -m benchmarks.run --out docs/benchmarks.md \\
    --plot docs/img/benchmark_step_time.png     # full run, ~10 minutes
python -m benchmarks.run --quick                 # tiny sizes, seconds
python -m benchmarks.run --sizes 1e6,1e7         # choose the sizes
python -m benchmarks.formulations                # the sync formulation study
python -m benchmarks.lazy                        # lazy(adam) vs adam only
python -m benchmarks.muon                        # every option, Muon inner
python -m benchmarks.run --accelerator           # on a GPU/TPU: < 8 minutes
```

`--accelerator` runs only the decisive comparisons (every option and
formulation against the inner optimizer, Adam and Muon) and writes them into
the "Accelerator" section of `--out` (the CPU tables stay as they are).

Method (`benchmarks/common.py`): every variant is a jitted
`params, state = step(params, state, grads)` (`tx.update` followed by
`optax.apply_updates`), compiled and warmed up first. A timed block is a whole
number of sync cycles (k = 5 steps, so every block holds the same share of
syncs) ended by `jax.block_until_ready`; the variants are timed round-robin, one
block each per round, rotating the order, for several rounds in one process.
Times are medians over rounds; a ratio is the median of the per-round ratios to
the baseline measured in the same round. `optax.lookahead` gets separately
allocated slow params (`LookaheadParams(fast=p, slow=copy of p)`), which
donation requires. Memory is XLA's own account of the compiled step
(`jax.jit(step).lower(...).compile().memory_analysis()`); persistent bytes are
counted from the actual params and state pytrees.
"""

_WHY_SELECT = """\
## Why `sync="select"` on CPU

`sync="select"` computes the sync update at every step and picks it with
`jnp.where` on sync steps; `sync="cond"` runs the sync inside `jax.lax.cond`.
The cond does less arithmetic, yet on CPU its step costs 1.4-3x adam's where
select costs about 1.1x (the higher figures when the machine is busy). The
compiled HLO shows why: XLA does not fuse across a conditional, so the inner
update is written to a buffer of its own (the temp column: one params copy), the
conditional passes its operands through, and `optax.apply_updates` becomes a
separate pass over memory. On CPU a fresh temporary buffer of that size is also
page-faulted in at every call, which is what makes the cond so sensitive to
load. With select, the Adam moments, the update, the sync blend, the new params
and the slow weights come out of a few fused loops with no temporary buffer at
all, so the extra cost is one read and one write of the slow weights per step.

`benchmarks/formulations.py` tried other ways to compile a conditional sync
(table below: {n} params in one leaf, donated, interleaved with adam). Each
keeps the exact sync (the params equal the slow weights bitwise at every sync,
checked before timing). Those that fuse like the library reproduce its
trajectory bitwise; the others differ in the last bit of some fast steps,
because XLA contracts `p + x * (-lr)` into an FMA inside a fusion and a
conditional ends the fusion (so `sync="select"` and `sync="cond"` agree bitwise
op by op, not under jit). The best conditional form, a `lax.fori_loop` of 0 or
1 trips that writes the slow weights in place (while loops update their carry
in place, conditionals copy), still trails the select; putting the whole step
in the conditional is the worst, since every branch output is a fresh buffer.

The `reset:` rows time `inner_state="reset"`, the most expensive policy in
select mode (next section). A *deferred* reset, which applies the reset of a
sync on the way into the next update (the step counter says a sync just
happened) where it fuses into the moment update, costs about what `"keep"`
costs and gives bitwise the same params and slow weights; the difference is
that the inner state stored right after a sync still holds the un-reset
moments. The library does not do this; the row shows what it would gain.
"""

_POLICIES = """\
## Cost of the options: inner-state policies, rollback, SNOO

`lookahead(adam, ...)` at {n} params in 100 leaves (a transformer-like tree),
donated, interleaved with adam, with `sync="auto"` (the default; "runs as" says
what it picks here) and with `"select"` and `"cond"` forced.

With `sync="select"`, a policy or an outer step makes the stored state differ
from what the inner step computed; XLA:CPU makes each state output its own
fusion that recomputes the inner step from the *old* state, so it copies the
old moments before overwriting them in place (the temp column), several times
the `"keep"` step. A conditional copies everything it carries. `sync="loop"`
(what `"auto"` picks on one CPU device) runs the policy, and the outer step,
in loops that run once on the steps that need them and not at all otherwise,
updating the state in place after the params' pass. `"pullback"` must still
read and write both moments and their synced copy at a sync. SNOO needs one
full-size temporary at a sync (the pseudo-gradient, which its momentum and
the slow weights both read; XLA does not recompute the inner update's square
root and division for a second reader). `on_nonfinite="rollback"` needs a
whole-tree answer (is anything non-finite?) before any update can be written:
under `"loop"` it computes the inner step a second time inside that
reduction, ahead of the real one, which costs one more read of the gradients,
params and moments but keeps no buffer of updates (before, every leaf's update
waited in a temporary as large as the params); it does so only for an
elementwise inner optimizer (Adam here; with Muon the check reads the inner
updates, see the Muon table). Those three are the dearest options: without
multi-output fusion on XLA:CPU each already does the least memory traffic its
generic form allows (pullback: read both copies of each moment and write
both; rollback: one more read of what the inner step reads; SNOO: one
temporary the size of the params). SNOO's figure varies most between runs
(1.39x to 1.76x in runs on machines of this kind).

A step's temporaries come from the C allocator at every call. Past what glibc
keeps for reuse (blocks over 32 MiB are mapped afresh, and thread arenas
give memory back), each first touch of a 4 KiB page is a page fault: the
"page faults/step" column counts them. They are costly on this machine (a
virtual machine, about 1 us each), and they are why the options with a large
temporary vary most between runs. The last two columns of the targets table
time the same steps in a process whose allocator keeps the memory it frees
({keep_freed}): there no step faults, and the ratios show the work itself
(one arena for all threads can also slow a step: compare the keep rows).
"""

_MUON = """\
## Inner optimizer with matrix products: Muon

`lookahead(muon)` ({desc}, k = 5, donated) against a step of
`optax.contrib.muon` alone, interleaved, with the FLOPs that XLA's cost
analysis counts for each compiled step. The inner update is computed once in
every option and formulation (`tests/test_inner_cost.py` holds the FLOPs to
1.05x); `"loop"` computes it twice only for an elementwise inner optimizer
(how_it_works.md, "How the sync is compiled").
"""

ACCELERATOR_START = "<!-- accelerator tables: start -->"
ACCELERATOR_END = "<!-- accelerator tables: end -->"
_NOT_TIMED = ("No accelerator has been lent for these measurements yet: on "
              "GPU and TPU nothing here was timed, and `sync=\"auto\"` picks "
              "`\"select\"` there without a "
              "measurement. Run `python -m benchmarks.run --accelerator --out "
              "docs/benchmarks.md` on one to fill this section.")

_TRAFFIC = """\
## Memory traffic of each formulation (accelerators: not timed)

No accelerator was available for these measurements. The memory traffic in
XLA's own cost analysis of the compiled step ("bytes accessed", a static
count with a loop body or a conditional branch counted once;
`benchmarks/traffic.py`) agrees with the CPU timings above: the select for
the default options, the loop otherwise.
Off CPU `sync="auto"` picks the select and never
the loop, whose steering was tuned for XLA:CPU (how_it_works.md, "How the
sync is compiled"); the last column is what it picks on one CPU device.
"""


_COMMUNICATION = """\
## DiLoCo communication (bytes from the compiled HLO)

The bytes each replica's collectives carry in a DiLoCo step
(`benchmarks/communication.py`): each fragment's collectives sit in its sync
conditional, so the largest step is the largest conditional and a
`sync_period` holds each once; a step that syncs nothing sends nothing (no
collective outside a conditional). Static counts, not timings; the
float32 row is today's DiLoCo sync, one all-reduce of the whole model.
"""
_COMMUNICATION_NOT_RUN = (
    "Not run here (it needs 8 devices): `python -m benchmarks.communication "
    "--out docs/benchmarks.md` fills this table.")


def communication_table(out: Optional[str]) -> Optional[str]:
  """The table on 8 devices, else the one already in `out` (or None)."""
  if jax.device_count() >= communication.REPLICAS:
    params = communication.model_params()
    return communication.markdown(communication.run(params), params)
  if out and os.path.exists(out):
    with open(out, encoding="utf-8") as f:
      text = f.read()
    if communication.START in text and communication.END in text:
      return text.split(communication.START, 1)[1].split(
          communication.END, 1)[0].strip()
  return None


def build_report(info: dict, sections: dict, quick: bool) -> str:
  parts = [_INTRO]
  load = info.get("load")
  load_text = ("-" if load is None
               else ", ".join(f"{x:.2f}" for x in load))
  parts.append(
      "## Machine\n\n"
      f"{info['date']}; {info['cpu']}, {info['cores']} cores, "
      f"{info['memory_gib']} GiB; JAX backend `{info['backend']}` "
      f"({info['devices']} device); jax {info['jax']}, optax "
      f"{info['optax']}, flax {info['flax']}, Python {info['python']}; "
      f"commit {info['commit']}. Load average at the start of the run "
      f"(1, 5, 15 min): {load_text}; at the end: {sections['load_end']}. "
      "The machine was shared with other jobs while these numbers were taken, "
      "so absolute times are noisy; the ratios, measured interleaved in one "
      "process, are the numbers to read."
      + (" **Quick run (tiny sizes): not representative.**" if quick else "")
      + "\n")
  if sections.get("targets"):
    parts.append("## Targets (10M float32 params, one leaf, k = 5)\n\n"
                 + sections["targets"] + "\n")
  parts.append(
      "## Optimizer step, params and state donated\n\n"
      "Amortised step time, median ms (ratio to adam in the same rounds).\n\n"
      + sections["step_donated"] + "\n")
  if sections.get("plot"):
    parts.append(f"![step time vs param count]({sections['plot']})\n")
  if sections.get("step_not_donated"):
    parts.append("## Optimizer step, not donated\n\n"
                 "Without donation every step allocates fresh output buffers; "
                 "on CPU the page faults on that new memory cost more than "
                 "the arithmetic (the system time of the run is about half "
                 "its user time), most of all for one huge leaf.\n\n" + sections["step_not_donated"] + "\n")
  parts.append(
      "## Memory\n\n"
      "`temp`: XLA's temporary buffers of the compiled step; `output`: its "
      "outputs (with donation they reuse the input buffers); persistent: "
      "params + optimizer state as stored between steps. lookahead's state "
      "must be exactly adam's state + one params copy + an int32 step "
      "counter; `optax.lookahead` instead doubles the params.\n\n"
      + sections["memory"] + "\n")
  if sections.get("e2e"):
    parts.append(
        "## End-to-end training step (Flax)\n\n"
        "`flax.training.train_state.TrainState` with donated state, forward "
        "+ backward (softmax cross-entropy) + update, one jitted step.\n\n"
        + sections["e2e"] + "\n")
  if sections.get("formulations"):
    parts.append(_WHY_SELECT.format(n=sections["formulations_n"]) + "\n"
                 + sections["formulations"] + "\n")
  if sections.get("policies"):
    parts.append(_POLICIES.format(
        n=sections["policies_n"], keep_freed=common.keep_freed_memory_note())
                 + "\nEach option's default step against its target:\n\n"
                 + sections["policy_targets"] + "\n\nAll rows:\n\n"
                 + sections["policies"] + "\n")
  if sections.get("muon"):
    parts.append(_MUON.format(desc=sections["muon_desc"]) + "\n"
                 + sections["muon"] + "\n")
  if sections.get("traffic"):
    parts.append(_TRAFFIC + "\n" + sections["traffic"] + "\n")
  parts.append(_COMMUNICATION + "\n" + communication.START + "\n"
               + sections.get("communication", _COMMUNICATION_NOT_RUN) + "\n"
               + communication.END + "\n")
  parts.append("## Accelerator\n\n" + ACCELERATOR_START + "\n"
               + sections.get("accelerator", _NOT_TIMED) + "\n"
               + ACCELERATOR_END + "\n")
  if sections.get("lazy"):
    parts.append("## Lazy updates on an embedding table\n\n"
                 + sections["lazy"] + "\n")
  if sections.get("sparse"):
    parts.append("## Row-sparse embedding updates (`SparseRows`)\n\n"
                 + sections["sparse"] + "\n")
  parts.append(f"Total benchmark time: {sections['elapsed']}.\n")
  return "\n".join(parts)


def splice_accelerator(path: str, text: str) -> None:
  """Replaces the Accelerator section of the report at `path` with `text`."""
  with open(path) as f:
    report = f.read()
  if ACCELERATOR_START in report and ACCELERATOR_END in report:
    head, rest = report.split(ACCELERATOR_START, 1)
    tail = rest.split(ACCELERATOR_END, 1)[1]
  else:
    head, tail = report.rstrip() + "\n\n## Accelerator\n\n", "\n"
  with open(path, "w") as f:
    f.write(head + ACCELERATOR_START + "\n" + text + "\n" + ACCELERATOR_END
            + tail)


def accelerator(out: Optional[str], quick: bool = False) -> str:
  """Every option and formulation against Adam and Muon (see `--accelerator`)."""
  from benchmarks import muon  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  info = common.machine_info()
  n = 100_000 if quick else TARGET_N
  policy_rows = policies.run(
      n=n, rounds=3 if quick else 7, layers=1 if quick else 8,
      syncs=("auto", "select", "cond", "loop"),
      min_block_s=0.0 if quick else 0.1, log=_log)
  size = 64 if quick else 512
  muon_rows = muon.run(matrices=8, size=size, rounds=3 if quick else 7,
                       min_block_s=0.0 if quick else 0.1, log=_log)
  text = (
      f"{info['date']}; JAX backend `{info['backend']}` ({info['devices']} "
      f"device), {info['cpu']}; jax {info['jax']}; commit {info['commit']}; "
      f"{(time.time() - t0) / 60:.1f} min.\n\n"
      f"`lookahead(adam)`, {common.fmt_params(n)} params in 100 leaves:\n\n"
      + policies_table(policy_rows)
      + f"\n\n`lookahead(muon)`, 8 matrices of {size} x {size}:\n\n"
      + muon.markdown(muon_rows))
  if out:
    splice_accelerator(out, text)
    _log(f"wrote the Accelerator section of {out}")
  print(text)
  return text


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(
      description="lookahead_optax benchmark suite (markdown report).")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few rounds (seconds)")
  parser.add_argument("--sizes", type=_parse_sizes, default=None,
                      help="comma-separated param counts, e.g. 1e6,1e7")
  parser.add_argument("--tree-sizes", type=_parse_sizes, default=None,
                      help="param counts for the tree layout (default: "
                      "--sizes, or 1e6,1e7,2.5e7,5e7 in a full run)")
  parser.add_argument("--layouts", default="leaf,tree",
                      help="comma-separated: leaf, tree")
  parser.add_argument("--rounds", type=int, default=None,
                      help="round-robin rounds for the step benchmark")
  parser.add_argument("--skip", default="",
                      help="comma-separated sections to skip: e2e, "
                      "formulations, policies, muon, traffic, communication, "
                      "lazy, sparse, nodonate")
  parser.add_argument("--accelerator", action="store_true",
                      help="only the options against Adam and Muon, for a "
                      "GPU/TPU; writes the Accelerator section of --out")
  parser.add_argument("--out", default=None, help="write the report here")
  parser.add_argument("--plot", default=None,
                      help="write the step-time plot (PNG) here")
  args = parser.parse_args(argv)
  if args.accelerator:
    return accelerator(args.out, quick=args.quick)
  t0 = time.time()
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  quick = args.quick
  sizes = args.sizes or (QUICK_SIZES if quick else FULL_SIZES)
  layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
  tree_sizes = args.tree_sizes or (
      args.sizes or (QUICK_SIZES if quick else FULL_TREE_SIZES))
  rounds = args.rounds or (3 if quick else 9)
  info = common.machine_info()
  _log(f"benchmarks: {info['cpu']}, load {info['load']}, sizes {sizes}, "
       f"tree sizes {tree_sizes}")
  sections = {}

  donate_modes = (True,) if "nodonate" in skip else (True, False)
  # Fewer rounds at 50M+ (each round there takes seconds).
  step_rows = []
  for layout in layouts:
    layout_sizes = tree_sizes if layout == "tree" else sizes
    rounds_for = {n: max(3, rounds * 2 // 3) for n in layout_sizes
                  if n >= 40_000_000}
    step_rows += step.run(
        sizes=layout_sizes, layouts=[layout], donate_modes=donate_modes,
        rounds=rounds, min_block_s=0.0 if quick else 0.1,
        rounds_for=rounds_for, tree_layers=2 if quick else 12, log=_log)
  sections["step_donated"] = step_table(step_rows, donate=True)
  if False in donate_modes:
    sections["step_not_donated"] = step_table(step_rows, donate=False)
  sections["memory"] = memory_table(step_rows)
  if args.plot and plot(step_rows, args.plot):
    if args.out:
      sections["plot"] = os.path.relpath(
          args.plot, os.path.dirname(os.path.abspath(args.out)))
    else:
      sections["plot"] = args.plot

  e2e_rows = []
  if "e2e" not in skip:
    e2e_rows = e2e.run(quick=quick, rounds=3 if quick else 11, log=_log)
    sections["e2e"] = e2e_table(e2e_rows)
  sections["targets"] = targets_table(step_rows, e2e_rows)

  if "formulations" not in skip:
    from benchmarks import formulations  # pylint: disable=g-import-not-at-top
    n = 100_000 if quick else TARGET_N
    sections["formulations_n"] = common.fmt_params(n)
    _log(f"  formulations: leaf {common.fmt_params(n)}")
    sections["formulations"] = formulations_table(
        formulations.run(n=n, rounds=3 if quick else 9, log=_log))

  if "policies" not in skip:
    n = 100_000 if quick else TARGET_N
    sections["policies_n"] = common.fmt_params(n)
    policy_rows = policies.run(
        n=n, rounds=3 if quick else 9, layers=1 if quick else 8,
        min_block_s=0.0 if quick else 0.1, log=_log)
    sections["policies"] = policies_table(policy_rows)
    kept_rows = None if quick else policies.run_kept(
        n=n, rounds=9, layers=8, min_block_s=0.1, log=_log)
    sections["policy_targets"] = policy_targets_table(policy_rows, kept_rows)

  if "muon" not in skip:
    from benchmarks import muon  # pylint: disable=g-import-not-at-top
    size = 64 if quick else 384
    sections["muon_desc"] = (f"4 matrices of {size} x {size}; `auto` is "
                             "`loop` here for every option but keep")
    sections["muon"] = muon.markdown(muon.run(
        matrices=4, size=size, rounds=3 if quick else 9,
        syncs=("auto", "select"), min_block_s=0.0 if quick else 0.1,
        log=_log))

  if "traffic" not in skip:
    from benchmarks import traffic  # pylint: disable=g-import-not-at-top
    n = 100_000 if quick else 1_000_000
    # Quick: one leaf (15 compiled steps of a tree are most of a quick run).
    sections["traffic"] = traffic.markdown(
        traffic.run(n=n, layers=1 if quick else 8, log=_log,
                    layout="leaf" if quick else "tree"),
        common.fmt_params(n))

  if "communication" not in skip:
    table = communication_table(args.out)
    if table:
      sections["communication"] = table

  if "lazy" not in skip:
    try:
      lazy = importlib.import_module("benchmarks.lazy")
    except ImportError as e:
      _log(f"  lazy: benchmarks/lazy.py not available ({e}); skipped")
      sections["lazy"] = ("Not run: `benchmarks/lazy.py` is not available "
                          f"({e}).")
    else:
      _log("  lazy: lazy(adam) vs adam")
      lazy_rows = lazy.run(quick=quick)
      if hasattr(lazy, "markdown"):
        sections["lazy"] = snippet("lazy", lazy.markdown(lazy_rows))
      else:
        sections["lazy"] = snippet("lazy", generic_table(lazy_rows))
      doc = (lazy.__doc__ or "").strip()
      if doc:
        sections["lazy"] = doc.split("\n\nRun ")[0] + "\n\n" + sections["lazy"]

  if "sparse" not in skip:
    from benchmarks import sparse  # pylint: disable=g-import-not-at-top
    _log("  sparse: SparseRows steps vs dense adam")
    # Quick runs time only the step against dense adam (seconds).
    sparse_out = sparse.run(quick=quick, log=_log,
                            sections=("dense",) if quick else
                            ("dense", "v", "ids", "ids_kept", "e2e"))
    sections["sparse"] = (sparse.__doc__.strip().split("\n\nRun ")[0]
                          + "\n\n" + snippet("sparse",
                                               sparse.markdown(sparse_out)))

  load_end = common.machine_info()["load"]
  sections["load_end"] = ("-" if load_end is None
                          else ", ".join(f"{x:.2f}" for x in load_end))
  elapsed = time.time() - t0
  sections["elapsed"] = f"{elapsed / 60:.1f} min"
  report = build_report(info, sections, quick)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report)
    _log(f"wrote {args.out}")
  print(report)
  return report


if __name__ == "__main__":
  main()
