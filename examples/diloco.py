"""DiLoCo on 8 host devices: data parallelism, DiLoCo, Streaming DiLoCo.

Trains a small character-level language model (an MLP on the last 8
characters, four equal hidden layers) on the text of Python's pydoc topics
(ships with Python, no download) with 8 replicas, one per device, each
drawing its own batches:

* data-parallel AdamW: every step all-reduces (`lax.pmean`) the gradients,
  one parameter-sized message per step; and the same with the gradients'
  mean sent in int8 with error feedback
  (`optax.chain(lo.replica_mean(axis, jnp.int8, error_feedback=True),
  adamw)`);
* DiLoCo, k = 10, 20 and 50: `lo.diloco(adamw, k, axis_name=...)`. Each
  replica steps on its own gradients with its own AdamW state; every k steps
  the replicas average their pseudo-gradients (slow minus fast weights, one
  parameter-sized all-reduce) and the slow weights take a Nesterov step.
  Nothing is communicated on the other k - 1 steps;
* Streaming DiLoCo at k = 20: `fragments=4` (a quarter of the model syncs
  every 5 steps: the peak bandwidth drops fourfold), `fragments="slices"`
  (a twentieth of every leaf syncs at every step), and the pseudo-gradient
  sent as int8 or packed 4-bit values (with and without `error_feedback`).

The bytes of each run are read from the compiled HLO of its step
(`lo.communication_report`). The script evaluates the shared model (the
params of the data-parallel run, the slow weights of DiLoCo) on held-out
text, prints a table and saves `diloco.png`: validation loss against the
total bytes sent, and the final loss against the largest bytes one step
sends.

There is no GPU needed: the script asks XLA for 8 CPU devices before JAX
starts. On a machine with 8 accelerators, pass `--cpu-devices 0`.

  python examples/diloco.py                     # about 3 minutes on 2 cores
  python examples/diloco.py --smoke             # under a minute (CI)
  python examples/diloco.py --out docs/img      # the figure of docs/diloco.md
"""

import sys

# The examples' plumbing: flags, data, tables, figures. It imports no JAX.
import _common
from _common import plt


def _parse_args():
  parser = _common.parser(
      __doc__, "diloco.png",
      steps_help="training steps per run (default 1500, smoke 52)",
      smoke_help="a few steps (CI)")
  parser.set_defaults(out=".")
  _common.add_cpu_devices_flag(parser)
  parser.add_argument(
      "--faults", action="store_true",
      help="instead: DiLoCo with one replica's data giving NaN at chosen "
      "steps, with on_nonfinite='rollback' against 'propagate'")
  return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  _common.simulate_cpu_devices(ARGS.cpu_devices)  # before JAX is imported

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydoc_data import topics

import lookahead_optax as lo

AXIS = "replicas"
CONTEXT = 8  # characters the model sees
BATCH = 32  # windows per replica and step
EVAL_EVERY = 10
EVAL_WINDOWS = 4096
K = 20  # the sync period of the streaming and compressed runs


def load_text(valid_fraction=0.1):
  """Character ids of Python's pydoc topics (ships with Python).

  Returns:
    `(train ids, validation ids, vocabulary size)`: the last 10% of the
    text is held out.
  """
  text = "".join(topics.topics[k] for k in sorted(topics.topics))
  vocab = sorted(set(text))
  index = {c: i for i, c in enumerate(vocab)}
  ids = np.array([index[c] for c in text], np.int32)
  split = int(len(ids) * (1 - valid_fraction))
  return ids[:split], ids[split:], len(vocab)


def windows(ids, starts):
  """`(contexts, next characters)` of the windows starting at `starts`."""
  offsets = np.arange(CONTEXT)
  return ids[starts[..., None] + offsets], ids[starts + CONTEXT]


def init_params(key, vocab, embed=16, layers=4):
  """An MLP on the concatenated embeddings, the output tied to them.

  Its four hidden matrices (128 x 128) are the same size and hold 94% of
  the params, so four fragments of Streaming DiLoCo split it evenly.
  """
  width = CONTEXT * embed
  keys = jax.random.split(key, layers + 2)
  params = {"embed": jax.random.normal(keys[0], (vocab, embed)) * 0.5,
            "out": jax.random.normal(keys[1], (width, embed))
                   * np.sqrt(1.0 / width),
            "bias": jnp.zeros(vocab)}
  for i in range(layers):
    params[f"w{i}"] = (jax.random.normal(keys[i + 2], (width, width))
                       * np.sqrt(1.0 / width))
    params[f"b{i}"] = jnp.zeros(width)
  return params


def predict(params, contexts):
  """Logits of the next character: embed, concatenate, residual layers."""
  x = params["embed"][contexts].reshape(contexts.shape[:-1] + (-1,))
  for i in range(sum(k.startswith("w") for k in params)):
    h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(
        x.var(-1, keepdims=True) + 1e-5)  # a layer norm without params
    x = x + jax.nn.relu(h @ params[f"w{i}"] + params[f"b{i}"])
  return (x @ params["out"]) @ params["embed"].T + params["bias"]


def loss_fn(params, x, y):
  logits = predict(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


evaluate = jax.jit(loss_fn)  # validation loss (nats per character)


def make_step(tx, data_parallel):
  """One training step on every replica (`jax.pmap` over the devices)."""

  @functools.partial(jax.pmap, axis_name=AXIS, donate_argnums=(0, 1))
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    if data_parallel:
      # The one all-reduce of a data-parallel step: the mean gradient.
      grads = jax.lax.pmean(grads, axis_name=AXIS)
    # DiLoCo: each replica keeps its own gradients; lookahead averages the
    # pseudo-gradients over AXIS at a sync, and only then.
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def step_bytes(step, params, state, x, y, sync_period):
  """Bytes one replica sends: (per sync period, largest single step).

  Read from the compiled HLO of the step (`lo.communication_report`): a
  data-parallel step's all-reduce (every step), each fragment's
  collectives (in that fragment's sync conditional, once a period), or the
  slices' (every step).
  """
  report = lo.communication_report(step, params, state, x, y,
                                   sync_period=sync_period or 1)
  return report.per_period, report.largest_step


def run(name, tx, sync_period, data, steps, n_dev, fragments=1, seed=0,
        pmean=None):
  """Trains on `n_dev` replicas; returns the validation curve and the bytes.

  `sync_period` is None for data parallelism (a mean of the gradients every
  step: `jax.lax.pmean` in the step, unless `pmean=False`, where `tx`
  averages them itself with `lo.replica_mean`).
  """
  train_ids, (x_valid, y_valid), vocab = data
  if pmean is None:
    pmean = sync_period is None
  step = make_step(tx, data_parallel=pmean)
  params = init_params(jax.random.PRNGKey(seed), vocab)
  replicated = jax.tree.map(
      lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), params)
  state = jax.pmap(tx.init)(replicated)
  params = replicated

  # Each replica draws its own batches (i.i.d. from the training text).
  starts = np.random.default_rng(seed + 1).integers(
      0, len(train_ids) - CONTEXT, size=(steps, n_dev, BATCH))
  per_period, peak = step_bytes(step, params, state,
                                *windows(train_ids, starts[0]), sync_period)

  shared = lambda params, state: jax.tree.map(
      lambda a: a[0], params if sync_period is None else lo.slow_params(
          state))
  curve = [(0, float(evaluate(shared(params, state), x_valid, y_valid)))]
  bar = _common.progress(steps, name)
  start = time.time()
  for t in range(steps):
    x, y = windows(train_ids, starts[t])
    # One step at a time: on 8 host CPU devices sharing few cores, steps
    # queued on some devices can hold up the eighth thread a collective of
    # another step waits for (XLA:CPU gives up after 40 s).
    params, state = jax.block_until_ready(step(params, state, x, y))
    if (t + 1) % EVAL_EVERY == 0 or t + 1 == steps:
      loss = evaluate(shared(params, state), x_valid, y_valid)
      curve.append((t + 1, float(loss)))
    bar.update()
  bar.close()
  seconds = time.time() - start

  steps_done = np.array([s for s, _ in curve])
  # The syncs done by each point: fragment syncs, sync_period / fragments
  # steps apart, each a fragment's share of the period's bytes.
  interval = 1 if sync_period is None else sync_period // fragments
  sent = steps_done // interval * (per_period / (1 if sync_period is None
                                                 else fragments))
  slow_agree = sync_period is None or all(
      bool(jnp.all(a == a[0])) for a in jax.tree.leaves(
          lo.slow_params(state)))
  return dict(name=name, steps=steps_done, bytes=sent, peak=peak,
              loss=np.array([l for _, l in curve]), final_loss=curve[-1][1],
              total_bytes=int(sent[-1]), seconds=seconds, agree=slow_agree)


def runs(adamw):
  """(name, tx, sync_period, fragments) of every run."""
  diloco = lambda k, **kw: lo.diloco(adamw, k, AXIS, **kw)  # pylint: disable=unnecessary-lambda-assignment
  return [
      ("data-parallel AdamW", adamw, None, 1),
      # The gradients' mean in int8 with error feedback, in the optimizer.
      ("data-parallel, int8 mean", optax.chain(
          lo.replica_mean(AXIS, jnp.int8, error_feedback=True), adamw),
       None, 1),
      ("DiLoCo, k = 10", diloco(10), 10, 1),
      ("DiLoCo, k = 50", diloco(50), 50, 1),
      (f"DiLoCo, k = {K}", diloco(K), K, 1),
      (f"streaming, k = {K}, P = 4", diloco(K, fragments=4), K, 4),
      (f"slices, k = {K}", diloco(K, fragments="slices"), K, K),
      (f"int8, k = {K}", diloco(K, communication_dtype=jnp.int8), K, 1),
      (f"int4, k = {K}", diloco(K, communication_dtype="int4"), K, 1),
      (f"int4 + feedback, k = {K}",
       diloco(K, communication_dtype="int4", error_feedback=True), K, 1),
  ]


def report(rows, reference):
  """The table, and each run against float32 DiLoCo at the same k."""
  base = rows[0]
  _common.print_table(
      [("run", "<26"), ("valid loss", ">11.4f"), ("vs DiLoCo", ">10"),
       ("MB sent", ">9.2f"), ("peak KB/step", ">13.1f"), ("s", ">6.1f")],
      [(r["name"], r["final_loss"],
        f"{100 * (r['final_loss'] / reference['final_loss'] - 1):+.2f}%"
        if r["name"].endswith(f"k = {K}") or ", k = " + str(K) in r["name"]
        else "", r["total_bytes"] / 1e6, r["peak"] / 1e3, r["seconds"])
       for r in rows])
  for r in rows[1:]:
    print(f"{r['name']}: {base['total_bytes'] / max(r['total_bytes'], 1):.0f}x"
          f" fewer bytes than data-parallel AdamW, peak step "
          f"{r['peak'] / reference['peak']:.3f}x DiLoCo's")


def plot(rows, out):
  """Validation loss against total bytes, and against peak bytes per step."""
  fig, (ax_total, ax_peak) = plt.subplots(1, 2, figsize=(11, 4))
  for i, r in enumerate(rows):
    color = plt.cm.tab10(i)
    sent = r["bytes"] > 0  # log axis: from the first message on
    ax_total.plot(r["bytes"][sent], r["loss"][sent], "-" if i < 5 else "--",
                  color=color, label=r["name"])
    ax_peak.plot([r["peak"]], [r["final_loss"]], "o", color=color)
    ax_peak.annotate(r["name"], (r["peak"], r["final_loss"]), fontsize=7,
                     xytext=(5, 3), textcoords="offset points")
  best = min(r["final_loss"] for r in rows)
  ax_total.set_ylim(best - 0.05, best + 1.0)
  for ax in (ax_total, ax_peak):
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylabel("validation loss (nats/char)")
    ax.grid(alpha=0.3, which="both")
  ax_total.set_xlabel("bytes sent per replica (total)")
  ax_total.set_title("communication, total")
  ax_total.legend(fontsize=7)
  ax_peak.set_xlabel("largest bytes sent in one step, per replica")
  ax_peak.set_title("final loss against peak bandwidth")
  fig.tight_layout()
  _common.save_figure(fig, out, "diloco.png")


def setup(args, default_steps):
  """The replicas, the steps, the data and the inner AdamW of a run."""
  steps = args.steps or (2 * K + 12 if args.smoke else default_steps)
  train_ids, valid_ids, vocab = load_text()
  valid_starts = np.random.default_rng(0).integers(
      0, len(valid_ids) - CONTEXT, EVAL_WINDOWS)
  data = (train_ids, windows(valid_ids, valid_starts), vocab)
  # A decaying learning rate: the runs end at a settled loss to compare.
  adamw = optax.adamw(optax.cosine_decay_schedule(3e-3, steps, alpha=0.1),
                      weight_decay=1e-4)
  return jax.local_device_count(), steps, data, adamw


def fault_steps(steps):
  """(step index, replica) of the injected NaNs: off a sync, on a sync."""
  return [(7, 3), (K - 1, 5), (steps // 2 + 3, 3)]


def faulty_run(name, tx, data, steps, n_dev, seed=0):
  """DiLoCo at k = K where a replica's gradients are NaN at chosen steps."""
  train_ids, (x_valid, y_valid), vocab = data

  @functools.partial(jax.pmap, axis_name=AXIS, donate_argnums=(0, 1))
  def step(params, state, x, y, poison):
    grads = jax.grad(loss_fn)(params, x, y)
    grads = jax.tree.map(lambda g: g * poison, grads)  # NaN: a bad shard
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = init_params(jax.random.PRNGKey(seed), vocab)
  params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape),
                        params)
  state = jax.pmap(tx.init)(params)
  starts = np.random.default_rng(seed + 1).integers(
      0, len(train_ids) - CONTEXT, size=(steps, n_dev, BATCH))
  faults = dict(fault_steps(steps))
  for t in range(steps):
    poison = np.ones(n_dev, np.float32)
    if t in faults:
      poison[faults[t]] = np.nan
    x, y = windows(train_ids, starts[t])
    params, state = jax.block_until_ready(step(params, state, x, y, poison))
  slow = jax.tree.map(lambda a: a[0], lo.slow_params(state))
  counts = jax.tree.map(lambda a: int(a[0]), state.outer_state.counts)
  finite = all(bool(jnp.all(jnp.isfinite(a)))
               for a in jax.tree.leaves(params))
  return (name, float(evaluate(slow, x_valid, y_valid)), counts.sat_out,
          "yes" if finite else "no")


def main_faults(args):
  """`--faults`: a replica's NaN stops DiLoCo, or rolls back on its own."""
  n_dev, steps, data, adamw = setup(args, 600)
  print(f"NaN gradients on one replica at steps (index, replica) "
        f"{fault_steps(steps)}; DiLoCo, k = {K}, {n_dev} replicas")
  rows = [faulty_run(f"on_nonfinite={mode!r}", lo.diloco(
      adamw, K, AXIS, on_nonfinite=mode), data, steps, n_dev)
          for mode in ("propagate", "rollback")]
  clean = run(f"DiLoCo, k = {K}, no faults", lo.diloco(adamw, K, AXIS), K,
              data, steps, n_dev)
  rows.append((clean["name"], clean["final_loss"], 0, "yes"))
  _common.print_table(
      [("run", "<30"), ("valid loss", ">11.4f"), ("sat out", ">8"),
       ("params finite", ">14")], rows)
  if rows[1][3] != "yes" or not np.isfinite(rows[1][1]):
    print("rollback did not heal the replicas", file=sys.stderr)
    sys.exit(1)


def main(args):
  n_dev, steps, data, adamw = setup(args, 1500)
  rows = [run(name, tx, k, data, steps, n_dev, fragments=p,
              pmean=False if "int8 mean" in name else None)
          for name, tx, k, p in runs(adamw)]
  n_params = sum(a.size for a in jax.tree.leaves(
      init_params(jax.random.PRNGKey(0), data[2])))
  print(f"char MLP LM on pydoc topics, {n_dev} replicas of batch {BATCH}, "
        f"{steps} steps, {n_params:,} params")
  report(rows, rows[4])
  plot(rows, args.out)
  if not all(r["agree"] for r in rows):
    print("the replicas' slow weights differ", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  if ARGS.faults:
    main_faults(ARGS)
  else:
    main(ARGS)
