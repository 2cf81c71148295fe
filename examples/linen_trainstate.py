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

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import lookahead_optax as lo

import _common  # the examples' plumbing: flags, data, tables, figures
from _common import plt

SYNC_PERIOD = 5


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
  args = _common.parser(
      __doc__, "linen_trainstate.png",
      steps_help="training steps per run (default 603, smoke 23)",
      smoke_help="a few steps, one learning rate (CI)").parse_args()
  steps = args.steps or (23 if args.smoke else 603)
  lrs = [1e-2] if args.smoke else [1e-3, 3e-3, 1e-2, 3e-2]
  trace_last = min(steps, 40)
  data = _common.digits_split()

  start = time.time()
  bar = _common.progress(len(lrs) * steps, "training")
  rows = [run(lr, steps, data, bar, trace_last) for lr in lrs]
  bar.close()
  print(f"digits CNN, linen TrainState, lookahead(adamw, k={SYNC_PERIOD}, "
        f"alpha=0.5), {steps} steps of batch 64 ({time.time() - start:.0f} s)")
  _common.print_table(
      [("lr", ">8.0e"), ("train loss fast", ">17.4f"),
       ("train loss slow", ">17.4f"), ("test acc fast", ">15.4f"),
       ("test acc slow", ">15.4f")],
      [(r["lr"], r["train_fast"], r["train_slow"], r["acc_fast"],
        r["acc_slow"]) for r in rows])

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.6),
                                 layout="constrained")
  r = rows[len(rows) // 2]
  t = r["trace"]
  ax0.plot(t[:, 0], t[:, 1], "o-", ms=4, label="fast weights (state.params)")
  ax0.plot(t[:, 0], t[:, 2], "s--", ms=4, markerfacecolor="none",
           label="slow weights (eval_train_state)")
  for step in t[:, 0]:
    if step % SYNC_PERIOD == 0:
      ax0.axvline(step, color="grey", lw=0.8, ls=":")
  ax0.set_xlabel("step (dotted: syncs)")
  ax0.set_ylabel("test loss")
  ax0.set_title(f"last {len(t)} steps, lr={r['lr']:.0e}")
  ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1,
             frameon=False)
  ax1.plot(lrs, [r["acc_fast"] for r in rows], "o-", ms=8,
           label="fast weights")
  ax1.plot(lrs, [r["acc_slow"] for r in rows], "s--", ms=8,
           markerfacecolor="none", markeredgewidth=1.5, label="slow weights")
  ax1.set_xscale("log")
  ax1.set_xlabel("AdamW learning rate")
  ax1.set_ylabel("test accuracy")
  ax1.set_title("after training")
  ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
             frameon=False)
  _common.save_figure(fig, args.out, "linen_trainstate.png")


if __name__ == "__main__":
  main()
