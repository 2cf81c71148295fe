"""Choosing DiLoCo's outer settings: a sweep on 8 host devices.

The model, the data and the training step of `examples/diloco.py` (a
character-level MLP language model on Python's pydoc topics, 8 replicas,
one per device, each drawing its own batches of 32 windows; AdamW inner
with a cosine decay from 3e-3), trained with

* `lo.diloco(adamw, k, ...)` over a grid of the outer learning rate
  (0.4, 0.7, 1.0) x the outer Nesterov momentum (0, 0.5, 0.9) x the sync
  period k (8, 32); `learning_rate=1.0, momentum=0.0` is plain averaging of
  the replicas' weights;
* Streaming DiLoCo with `fragments=4, overlap=True, mix=0.5` at two outer
  settings (the DiLoCo paper's 0.7 / 0.9, and plain averaging);

each at two run lengths (1024 steps and a quarter of that, 256, each with
its own cosine schedule), against two baselines on the same batches:

* data-parallel AdamW (`lax.pmean` of the gradients every step, a batch
  8 times as large);
* a lone replica: AdamW on one replica's batches, no communication (all 8
  replicas train alone; the table gives replica 0 and the spread of the 8).

Each run evaluates the shared model (the slow weights `lo.slow_params` of
DiLoCo, the params of data-parallel AdamW) on every window of the
held-out text, prints a table (plain and Markdown) and saves
`diloco_sweep.png`: the validation loss against the outer learning rate,
one line per momentum, one panel per sync period and run length, with the
two baselines as horizontal lines.

There is no GPU needed: the script asks XLA for 8 CPU devices before JAX
starts. On a machine with 8 accelerators, pass `--cpu-devices 0`.

  python examples/diloco_sweep.py                  # about 14 minutes, 2 cores
  python examples/diloco_sweep.py --smoke          # 4 configs, 8 runs (CI)
  python examples/diloco_sweep.py --out docs/img   # the docs' figure
"""

import sys

# The examples' plumbing: flags, data, tables, figures. It imports no JAX.
import _common
from _common import plt


def _parse_args():
  parser = _common.parser(
      __doc__, "diloco_sweep.png",
      steps_help="steps of the long runs, a multiple of 4 x 32 (default "
                 "1024, smoke 32); the short runs take a quarter",
      smoke_help="plain averaging and streaming at k = 8, 8 and 32 steps "
                 "(CI)")
  _common.add_cpu_devices_flag(parser)
  return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  _common.simulate_cpu_devices(ARGS.cpu_devices)  # before JAX is imported

# pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

# The model, the data and the step: examples/diloco.py's, unchanged.
import diloco

LEARNING_RATES = (0.4, 0.7, 1.0)  # outer
MOMENTA = (0.0, 0.5, 0.9)  # outer Nesterov
SYNC_PERIODS = (8, 32)
STREAMING = dict(fragments=4, overlap=True, mix=0.5)
STREAMING_AT = ((0.7, 0.9), (1.0, 0.0))  # (learning_rate, momentum)
LONG = 1024  # steps of the long runs; the short runs take a quarter
SMOKE = dict(learning_rates=(1.0,), momenta=(0.0,), sync_periods=(8,),
             streaming_at=((1.0, 0.0),), long=32)


def configs(adamw, grid):
  """`(kind, k, lr, momentum, streaming, tx)` of every run of one length."""
  rows = [("data parallel", None, None, None, False, adamw),
          ("alone", None, None, None, False, adamw)]
  for k in grid["sync_periods"]:
    for lr in grid["learning_rates"]:
      for mu in grid["momenta"]:
        rows.append(("diloco", k, lr, mu, False, lo.diloco(
            adamw, k, diloco.AXIS, learning_rate=lr, momentum=mu)))
    for lr, mu in grid["streaming_at"]:
      rows.append(("diloco", k, lr, mu, True, lo.diloco(
          adamw, k, diloco.AXIS, learning_rate=lr, momentum=mu,
          **STREAMING)))
  return rows


def train(kind, tx, steps, data, n_dev, seed=0):
  """Trains on `n_dev` replicas; returns the held-out loss(es) and seconds.

  The loss of the shared model: data parallel's params, DiLoCo's slow
  weights; for `"alone"` (no communication) one loss per replica.
  """
  train_ids, (x_valid, y_valid), vocab = data
  step = diloco.make_step(tx, data_parallel=kind == "data parallel")
  params = jax.tree.map(
      lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape),
      diloco.init_params(jax.random.PRNGKey(seed), vocab))
  state = jax.pmap(tx.init)(params)
  # The same batches for every run: replica m's stream is the same in all.
  starts = np.random.default_rng(seed + 1).integers(
      0, len(train_ids) - diloco.CONTEXT, size=(steps, n_dev, diloco.BATCH))
  bar = _common.progress(steps, f"{kind} {steps}")
  start = time.time()
  for t in range(steps):
    # One step at a time, as in diloco.py (XLA:CPU's collectives time out
    # when steps queue up on 8 devices sharing few cores).
    params, state = jax.block_until_ready(
        step(params, state, *diloco.windows(train_ids, starts[t])))
    bar.update()
  bar.close()
  seconds = time.time() - start
  if kind == "alone":
    losses = [float(diloco.evaluate(jax.tree.map(lambda a: a[m], params),
                                    x_valid, y_valid)) for m in range(n_dev)]
    return losses, seconds
  shared = params if kind == "data parallel" else lo.slow_params(state)
  if not all(bool(jnp.all(a == a[0])) for a in jax.tree.leaves(shared)):
    sys.exit(f"the replicas' shared weights differ ({kind})")
  loss = diloco.evaluate(jax.tree.map(lambda a: a[0], shared),
                         x_valid, y_valid)
  return float(loss), seconds


def name(r):
  if r["kind"] != "diloco":
    return r["kind"]
  extra = ", P = 4, overlap, mix 0.5" if r["streaming"] else ""
  return f"k = {r['k']}, lr {r['lr']}, mom {r['mu']}{extra}"


def report(rows, lengths):
  """The plain table, then the same as Markdown, against both baselines."""
  short, long = lengths
  dp, alone = rows[0], rows[1]
  lone = {n: alone["loss"][n][0] for n in lengths}  # replica 0
  def rel(r, base, n):
    return 100 * (r["loss"][n] / base[n] - 1)
  dp_loss = dp["loss"]
  table = []
  for r in rows:
    if r["kind"] == "alone":
      table.append([f"alone (replica 0; 8 replicas: "
                    f"{min(r['loss'][short]):.3f}-{max(r['loss'][short]):.3f}"
                    f", {min(r['loss'][long]):.3f}-{max(r['loss'][long]):.3f})",
                    lone[short], lone[long], None, None, None, None])
      continue
    table.append([name(r), r["loss"][short], r["loss"][long],
                  rel(r, lone, short), rel(r, lone, long),
                  rel(r, dp_loss, short), rel(r, dp_loss, long)])
  cols = [("run", "<44"), (f"{short} steps", ">10.4f"),
          (f"{long} steps", ">11.4f"), ("vs alone", ">+9.1f"),
          ("", ">+7.1f"), ("vs DP %", ">+9.1f"), ("", ">+7.1f")]
  _common.print_table(cols, table)
  print(f"\n| run | {short} steps | {long} steps | vs alone, {short} | "
        f"vs alone, {long} | vs data parallel, {short} | "
        f"vs data parallel, {long} |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for row in table:
    cells = [row[0], f"{row[1]:.3f}", f"{row[2]:.3f}"] + [
        "" if v is None else f"{v:+.1f}%" for v in row[3:]]
    print("| " + " | ".join(cells) + " |")


def plot(rows, lengths, grid, out):
  """Loss against the outer learning rate: a panel per length and k."""
  ks = grid["sync_periods"]
  fig, axes = plt.subplots(len(lengths), len(ks), sharex=True,
                           figsize=(11, 3.6 * len(lengths) + 1),
                           squeeze=False)
  dp, alone = rows[0], rows[1]
  colors = {mu: plt.cm.viridis(i / max(1, len(grid["momenta"]) - 1) * 0.85)
            for i, mu in enumerate(grid["momenta"])}
  for i, n in enumerate(lengths):
    lone = alone["loss"][n]
    top = max(lone) + 0.15  # runs worse than this are marked at the top
    bottom = dp["loss"][n] - 0.05
    for j, k in enumerate(ks):
      ax = axes[i, j]
      ax.axhspan(min(lone), max(lone), color="tab:red", alpha=0.12,
                 label="alone: 8 replicas' range")
      ax.axhline(lone[0], color="tab:red", ls="--",
                 label="alone (one replica, no communication)")
      ax.axhline(dp["loss"][n], color="black",
                 label="data-parallel AdamW (8 replicas)")
      for mu in grid["momenta"]:
        pts = [(r["lr"], r["loss"][n]) for r in rows
               if r["kind"] == "diloco" and r["k"] == k and r["mu"] == mu
               and not r["streaming"]]
        lrs, losses = np.array(pts).T
        ax.plot(lrs, np.minimum(losses, top), "o-", color=colors[mu],
                label=f"DiLoCo, momentum {mu}")
        for lr, loss in pts:
          if loss > top:
            ax.annotate(f"{loss:.2f}", (lr, top), xytext=(-7, -4),
                        textcoords="offset points", fontsize=9, ha="right",
                        va="top", color=colors[mu])
      for r in rows:
        if r["kind"] == "diloco" and r["k"] == k and r["streaming"]:
          ax.plot([r["lr"]], [min(r["loss"][n], top)], "*", ms=13,
                  mfc="none", mew=1.5, color=colors.get(r["mu"], "gray"),
                  label="streaming (P = 4, overlap, mix 0.5),\n"
                        "colour: its momentum"
                  if r["lr"] == grid["streaming_at"][0][0] else None)
      ax.set_ylim(bottom, top + 0.03)
      ax.set_xticks(grid["learning_rates"])
      ax.set_title(f"sync period {k}, {n} steps ({n // k} syncs)")
      ax.grid(alpha=0.3)
      if i == len(lengths) - 1:
        ax.set_xlabel("outer learning rate")
      if j == 0:
        ax.set_ylabel("validation loss (nats/char)")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=10,
             frameon=False)
  fig.suptitle("DiLoCo's outer settings: the slow weights' held-out loss, "
               "8 replicas, AdamW inner")
  fig.tight_layout(rect=(0, 0.04 + 0.05 * (len(labels) > 3), 1, 1))
  _common.save_figure(fig, out, "diloco_sweep.png")


def main(args):
  grid = dict(learning_rates=LEARNING_RATES, momenta=MOMENTA,
              sync_periods=SYNC_PERIODS, streaming_at=STREAMING_AT,
              long=LONG)
  if args.smoke:
    grid = SMOKE
  long = args.steps or grid["long"]
  lengths = (long // 4, long)
  for n in lengths:
    for k in grid["sync_periods"]:
      if n % k:
        sys.exit(f"--steps {long}: {n} steps are not a multiple of the sync "
                 f"period {k}")
  n_dev = jax.local_device_count()
  train_ids, valid_ids, vocab = diloco.load_text()
  every = np.arange(len(valid_ids) - diloco.CONTEXT)  # all held-out windows
  data = (train_ids, diloco.windows(valid_ids, every), vocab)
  rows = None
  start = time.time()
  for n in lengths:
    # diloco.py's inner optimizer; its cosine decay ends with each run.
    adamw = optax.adamw(optax.cosine_decay_schedule(3e-3, n, alpha=0.1),
                        weight_decay=1e-4)
    runs = configs(adamw, grid)
    rows = rows or [dict(kind=c[0], k=c[1], lr=c[2], mu=c[3],
                         streaming=c[4], loss={}, seconds=0.0) for c in runs]
    for row, (kind, *_, tx) in zip(rows, runs):
      row["loss"][n], seconds = train(kind, tx, n, data, n_dev)
      row["seconds"] += seconds
      loss = np.ravel(row["loss"][n])[0]  # alone: replica 0
      print(f"{name(row)}, {n} steps: {loss:.4f} ({seconds:.0f} s)",
            flush=True)
  print(f"\nchar MLP LM on pydoc topics, {n_dev} replicas of batch "
        f"{diloco.BATCH}, AdamW inner (3e-3, cosine), runs of {lengths[0]} "
        f"and {lengths[1]} steps, validation on {len(every):,} windows; "
        f"{len(rows)} runs per length in {time.time() - start:.0f} s")
  report(rows, lengths)
  plot(rows, lengths, grid, args.out)


if __name__ == "__main__":
  main(ARGS)
