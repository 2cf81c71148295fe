"""Quickstart: AdamW vs Lookahead(AdamW) on scikit-learn's digits, with Flax NNX.

Trains a small MLP on the 8x8 digits data set (it ships with scikit-learn, no
download) over a small learning-rate sweep, evaluates the Lookahead runs on
both their fast and their slow weights (`lookahead_optax.eval_model`), prints a
table and saves a figure.

  python examples/quickstart.py            # full run, about a minute on 2 cores
  python examples/quickstart.py --smoke    # a few seconds (CI)
"""

import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lookahead_optax as lo

import _common  # the examples' plumbing: flags, data, tables, figures
from _common import plt


class MLP(nnx.Module):

  def __init__(self, rngs, hidden=128):
    self.l1 = nnx.Linear(64, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.l3 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.l1(x))
    x = nnx.relu(self.l2(x))
    return self.l3(x)


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def evaluate(model, x, y):
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


@nnx.jit
def evaluate_slow(model, optimizer, x, y):
  # The model on the slow weights: a copy, the training goes on unchanged.
  return evaluate(lo.eval_model(model, optimizer), x, y)


def run(name, learning_rate, steps, data, batch_size, bar, seed=0):
  x_train, x_test, y_train, y_test = data
  tx = optax.adamw(learning_rate, weight_decay=1e-4)
  if name == "lookahead":
    tx = lo.lookahead(tx, sync_period=5, slow_step_size=0.5)
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  curve = []
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    curve.append(float(train_step(model, optimizer, x_train[idx],
                                  y_train[idx])))
    bar.update()
  train_loss, _ = evaluate(model, x_train, y_train)
  _, test_acc = evaluate(model, x_test, y_test)
  row = dict(name=name, lr=learning_rate, train_loss=float(train_loss),
             test_acc=float(test_acc), curve=np.array(curve))
  if name == "lookahead":
    slow_loss, slow_acc = evaluate_slow(model, optimizer, x_train, y_train)
    _, slow_acc = evaluate_slow(model, optimizer, x_test, y_test)
    row.update(slow_train_loss=float(slow_loss), slow_test_acc=float(slow_acc))
  return row


def main():
  args = _common.parser(
      __doc__, "quickstart.png",
      steps_help="training steps per run (default 803, smoke 23: not "
      "multiples of k = 5, so that the runs end between syncs, where fast "
      "and slow weights differ)",
      smoke_help="a few steps and two learning rates (CI)").parse_args()
  steps = args.steps or (23 if args.smoke else 803)
  lrs = [1e-3, 1e-2] if args.smoke else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
  data = _common.digits_split()

  start = time.time()
  rows = []
  bar = _common.progress(2 * len(lrs) * steps, "training")
  for lr in lrs:
    for name in ("adamw", "lookahead"):
      rows.append(run(name, lr, steps, data, batch_size=64, bar=bar))
  bar.close()

  print(f"digits MLP, {steps} steps of batch 64 per run "
        f"({time.time() - start:.0f} s); lookahead: k=5, alpha=0.5")
  _common.print_table(
      [("optimizer", "<18"), ("lr", ">8.0e"), ("train loss", ">12.4f"),
       ("test acc fast", ">15.4f"), ("test acc slow", ">15.4f")],
      [("adamw" if r["name"] == "adamw" else "lookahead(adamw)", r["lr"],
        r["train_loss"], r["test_acc"], r.get("slow_test_acc"))
       for r in rows])

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 5),
                                 layout="constrained")
  colors = plt.cm.Dark2(np.arange(len(lrs)))  # distinct hues, one per lr
  for r in rows:
    c = colors[lrs.index(r["lr"])]
    style = "-" if r["name"] == "lookahead" else "--"
    ax0.plot(*_common.smooth(r["curve"]), style, color=c,
             **_common.few_points_marker(len(r["curve"])))
  ax0.set_yscale("log")
  ax0.set_xlabel("step")
  ax0.set_ylabel("train loss (smoothed)")
  ax0.set_title("train loss")
  # One legend entry per colour (learning rate) and per line style.
  handles = [plt.Line2D([], [], color=c, lw=3) for c in colors]
  handles += [plt.Line2D([], [], color="k", ls="--"),
              plt.Line2D([], [], color="k", ls="-")]
  labels = [f"lr={lr:.0e}" for lr in lrs] + ["AdamW", "Lookahead"]
  ax0.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16),
             ncol=3, frameon=False, handlelength=1.6, columnspacing=1.0)
  for name, key, fmt, face in (("AdamW", "test_acc", "o-", None),
                               ("Lookahead fast", "test_acc", "s--", "none"),
                               ("Lookahead slow", "slow_test_acc", "^:",
                                "none")):
    want = "adamw" if name == "AdamW" else "lookahead"
    ax1.plot(lrs, [r[key] for r in rows if r["name"] == want], fmt,
             markersize=8, markerfacecolor=face, markeredgewidth=1.5,
             label=name)
  ax1.set_xscale("log")
  ax1.set_xlabel("learning rate")
  ax1.set_ylabel("test accuracy")
  ax1.set_title("test accuracy after training")
  ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
             frameon=False, handlelength=2.4)
  _common.save_figure(fig, args.out, "quickstart.png")


if __name__ == "__main__":
  main()
