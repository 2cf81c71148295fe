"""Lookahead in a Flax linen `TrainState`, evaluated on its slow weights.

A small CNN on scikit-learn's 8x8 digits (no download). The optimizer goes
into `TrainState.create(..., tx=lookahead(adamw))` unchanged and trains with
`apply_gradients`; `lookahead_optax.eval_train_state(state)` gives the state to
evaluate (the slow weights). The figure shows the test loss of the fast and of
the slow weights over the last steps of training (the fast weights jump back
to the slow ones at every sync) and the final test accuracy over a
learning-rate sweep.

  python examples/linen_trainstate.py            # full run, about a minute
  python examples/linen_trainstate.py --smoke    # CI
"""

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lookahead_optax as lo

try:
  from tqdm import tqdm
except ImportError:  # tqdm is in the `examples` extra; fall back to a line.
  tqdm = None

SYNC_PERIOD = 5


def progress(total, desc):
  """A tqdm bar, or a printed progress line when tqdm is not installed."""
  if tqdm is not None:
    return tqdm(total=total, desc=desc, leave=False)

  class Line:
    n = 0

    def update(self, k=1):
      self.n += k
      if self.n == total or self.n % max(1, total // 10) == 0:
        print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr,
              flush=True)

    def close(self):
      print(file=sys.stderr)

  return Line()


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape((-1, 8, 8, 1))
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def cross_entropy(params, apply_fn, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def train_step(state, x, y):
  loss, grads = jax.value_and_grad(cross_entropy)(
      state.params, state.apply_fn, x, y)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def evaluate(state, x, y):
  """(loss, accuracy) of the fast weights and of the slow weights."""
  out = []
  for s in (state, lo.eval_train_state(state)):
    logits = s.apply_fn({"params": s.params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    out.append((loss, jnp.mean(jnp.argmax(logits, -1) == y)))
  return out


def load_data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.25, random_state=0)


def run(learning_rate, steps, data, bar, trace_last, seed=0):
  x_train, x_test, y_train, y_test = data
  model = CNN()
  state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=model.init(jax.random.key(seed), x_train[:1])["params"],
      tx=lo.lookahead(optax.adamw(learning_rate, weight_decay=1e-4),
                      sync_period=SYNC_PERIOD, slow_step_size=0.5))
  rng = np.random.default_rng(seed)
  trace = []
  for i in range(steps):
    idx = rng.integers(0, len(x_train), 64)
    state, _ = train_step(state, x_train[idx], y_train[idx])
    if i >= steps - trace_last:
      (fast_loss, _), (slow_loss, _) = evaluate(state, x_test, y_test)
      trace.append((int(state.step), float(fast_loss), float(slow_loss)))
    bar.update()
  (train_fast, _), (train_slow, _) = evaluate(state, x_train, y_train)
  (_, acc_fast), (_, acc_slow) = evaluate(state, x_test, y_test)
  return dict(lr=learning_rate, train_fast=float(train_fast),
              train_slow=float(train_slow), acc_fast=float(acc_fast),
              acc_slow=float(acc_slow), trace=np.array(trace))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="a few steps, one learning rate (CI)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per run (default 603, smoke 23)")
  parser.add_argument("--out", default="docs/img",
                      help="directory for linen_trainstate.png")
  args = parser.parse_args()
  steps = args.steps or (23 if args.smoke else 603)
  lrs = [1e-2] if args.smoke else [1e-3, 3e-3, 1e-2, 3e-2]
  trace_last = min(steps, 40)
  data = load_data()

  start = time.time()
  bar = progress(len(lrs) * steps, "training")
  rows = [run(lr, steps, data, bar, trace_last) for lr in lrs]
  bar.close()
  print(f"digits CNN, linen TrainState, lookahead(adamw, k={SYNC_PERIOD}, "
        f"alpha=0.5), {steps} steps of batch 64 ({time.time() - start:.0f} s)")
  print(f"{'lr':>8}{'train loss fast':>17}{'train loss slow':>17}"
        f"{'test acc fast':>15}{'test acc slow':>15}")
  for r in rows:
    print(f"{r['lr']:>8.0e}{r['train_fast']:>17.4f}{r['train_slow']:>17.4f}"
          f"{r['acc_fast']:>15.4f}{r['acc_slow']:>15.4f}")

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
  r = rows[len(rows) // 2]
  t = r["trace"]
  ax0.plot(t[:, 0], t[:, 1], ".-", label="fast weights (state.params)")
  ax0.plot(t[:, 0], t[:, 2], ".-", label="slow weights (eval_train_state)")
  for step in t[:, 0]:
    if step % SYNC_PERIOD == 0:
      ax0.axvline(step, color="grey", lw=0.5, ls=":")
  ax0.set_xlabel("step (dotted: syncs)")
  ax0.set_ylabel("test loss")
  ax0.set_title(f"last {len(t)} steps, lr={r['lr']:.0e}")
  ax0.legend(fontsize=8)
  ax1.plot(lrs, [r["acc_fast"] for r in rows], "s-", label="fast weights")
  ax1.plot(lrs, [r["acc_slow"] for r in rows], "^-", label="slow weights")
  ax1.set_xscale("log")
  ax1.set_xlabel("AdamW learning rate")
  ax1.set_ylabel("test accuracy")
  ax1.set_title("after training")
  ax1.legend()
  fig.tight_layout()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "linen_trainstate.png")
  fig.savefig(path, dpi=100)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
