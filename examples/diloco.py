"""DiLoCo on 8 host devices: data-parallel AdamW vs DiLoCo at k = 10 and 50.

Trains a small character-level language model (an MLP on the last 8
characters) on the text of Python's pydoc topics (ships with Python, no
download) with 8 replicas, one per device, each drawing its own batches:

* data-parallel AdamW: every step all-reduces (`lax.pmean`) the gradients,
  one parameter-sized message per step;
* DiLoCo: `lo.lookahead(adamw, k, outer=optax.sgd(0.7, momentum=0.9,
  nesterov=True), axis_name=...)`. Each replica steps on its own gradients
  with its own AdamW state; every k steps the replicas average their
  pseudo-gradients (slow minus fast weights, one parameter-sized all-reduce)
  and the slow weights take a Nesterov step. Nothing is communicated on the
  other k - 1 steps.

The script counts the bytes each run all-reduces, evaluates the shared model
(the params of the data-parallel run, the slow weights of DiLoCo) on held-out
text, prints a table and saves `diloco.png`: validation loss against steps
and against bytes communicated.

There is no GPU needed: the script asks XLA for 8 CPU devices before JAX
starts. On a machine with 8 accelerators, pass `--cpu-devices 0`.

  python examples/diloco.py                     # about a minute on 2 cores
  python examples/diloco.py --smoke             # a few seconds (CI)
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


def init_params(key, vocab, embed=24, hidden=256):
  k1, k2, k3 = jax.random.split(key, 3)
  n_in = CONTEXT * embed
  return {
      "embed": jax.random.normal(k1, (vocab, embed)) * 0.5,
      "w0": jax.random.normal(k2, (n_in, hidden)) * np.sqrt(2.0 / n_in),
      "b0": jnp.zeros(hidden),
      "w1": jax.random.normal(k3, (hidden, vocab)) * np.sqrt(1.0 / hidden),
      "b1": jnp.zeros(vocab),
  }


def predict(params, contexts):
  """Logits of the next character: embed, concatenate, one hidden layer."""
  x = params["embed"][contexts].reshape(contexts.shape[:-1] + (-1,))
  x = jax.nn.relu(x @ params["w0"] + params["b0"])
  return x @ params["w1"] + params["b1"]


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


def run(name, tx, sync_period, data, steps, n_dev, seed=0):
  """Trains on `n_dev` replicas; returns the validation curve and the bytes.

  `sync_period` is None for data parallelism (an all-reduce every step).
  """
  train_ids, (x_valid, y_valid), vocab = data
  step = make_step(tx, data_parallel=sync_period is None)
  params = init_params(jax.random.PRNGKey(seed), vocab)
  param_bytes = sum(a.size * a.dtype.itemsize
                    for a in jax.tree.leaves(params))
  replicated = jax.tree.map(
      lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), params)
  state = jax.pmap(tx.init)(replicated)
  params = replicated

  # Each replica draws its own batches (i.i.d. from the training text).
  starts = np.random.default_rng(seed + 1).integers(
      0, len(train_ids) - CONTEXT, size=(steps, n_dev, BATCH))

  shared = lambda params, state: jax.tree.map(
      lambda a: a[0], params if sync_period is None else lo.slow_params(
          state))
  curve = [(0, float(evaluate(shared(params, state), x_valid, y_valid)))]
  bar = _common.progress(steps, name)
  start = time.time()
  for t in range(steps):
    x, y = windows(train_ids, starts[t])
    params, state = step(params, state, x, y)
    if (t + 1) % EVAL_EVERY == 0 or t + 1 == steps:
      loss = evaluate(shared(params, state), x_valid, y_valid)
      curve.append((t + 1, float(loss)))
    bar.update()
  bar.close()
  seconds = time.time() - start

  steps_done = np.array([s for s, _ in curve])
  syncs = steps_done if sync_period is None else steps_done // sync_period
  slow_agree = sync_period is None or all(
      bool(jnp.all(a == a[0])) for a in jax.tree.leaves(
          lo.slow_params(state)))
  return dict(name=name, steps=steps_done, bytes=syncs * param_bytes,
              loss=np.array([l for _, l in curve]), final_loss=curve[-1][1],
              total_bytes=int(syncs[-1] * param_bytes),
              param_bytes=param_bytes, seconds=seconds, agree=slow_agree)


def main(args):
  n_dev = jax.local_device_count()
  steps = args.steps or (52 if args.smoke else 1500)
  train_ids, valid_ids, vocab = load_text()
  valid_starts = np.random.default_rng(0).integers(
      0, len(valid_ids) - CONTEXT, EVAL_WINDOWS)
  data = (train_ids, windows(valid_ids, valid_starts), vocab)
  adamw = optax.adamw(3e-3, weight_decay=1e-4)
  outer = lambda: optax.sgd(0.7, momentum=0.9, nesterov=True)
  runs = [("data-parallel AdamW", adamw, None)] + [
      (f"DiLoCo, k = {k}",
       lo.lookahead(adamw, k, outer=outer(), axis_name=AXIS), k)
      for k in (10, 50)]
  rows = [run(name, tx, k, data, steps, n_dev) for name, tx, k in runs]

  print(f"char MLP LM on pydoc topics, {n_dev} replicas of batch {BATCH}, "
        f"{steps} steps, {rows[0]['param_bytes']:,} parameter bytes")
  _common.print_table(
      [("run", "<22"), ("valid loss", ">11.4f"), ("MB all-reduced", ">15.2f"),
       ("less traffic", ">13.0f"), ("s", ">6.1f")],
      [(r["name"], r["final_loss"], r["total_bytes"] / 1e6,
        rows[0]["total_bytes"] / max(r["total_bytes"], 1), r["seconds"])
       for r in rows])
  for r in rows[1:]:
    if not r["total_bytes"]:
      print(f"{r['name']}: no sync in {steps} steps")
      continue
    print(f"{r['name']}: {rows[0]['total_bytes'] / r['total_bytes']:.0f}x "
          f"fewer bytes than data-parallel AdamW, validation loss "
          f"{r['final_loss']:.4f} vs {rows[0]['final_loss']:.4f}")

  styles = ["-", "--", "-."]
  colors = ["tab:gray", "tab:blue", "tab:orange"]
  fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(10, 3.8))
  for r, ls, c in zip(rows, styles, colors):
    ax_steps.plot(r["steps"], r["loss"], ls, color=c, label=r["name"])
    sent = r["bytes"] > 0  # log axis: from the first message on
    ax_bytes.plot(r["bytes"][sent], r["loss"][sent], ls, color=c,
                  label=r["name"])
  for ax in (ax_steps, ax_bytes):
    ax.set_ylabel("validation loss (nats/char)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
  ax_steps.set_xlabel("step")
  ax_steps.set_title(f"{n_dev} replicas, batch {BATCH} each")
  ax_bytes.set_xscale("log")
  ax_bytes.set_xlabel("bytes all-reduced per replica")
  ax_bytes.set_title("communication")
  fig.tight_layout()
  _common.save_figure(fig, args.out, "diloco.png")
  if not all(r["agree"] for r in rows):
    print("the replicas' slow weights differ", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main(ARGS)
