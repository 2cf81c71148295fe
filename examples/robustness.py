"""Sensitivity to hyperparameters: Lookahead vs its inner optimizer.

The paper (Zhang et al. 2019, section 5) reports that Lookahead is less
sensitive than its inner optimizer to the inner learning rate, and robust to
its own `k` and `alpha`. This script measures it on scikit-learn's digits (an
MLP, SGD with momentum 0.9 as the inner optimizer): the final training loss
(evaluated on the slow weights) over a grid of inner learning rates x alpha
(k = 5; alpha = 1 is the inner optimizer alone) and learning rates x k
(alpha = 0.5). All learning rates of a row train at once under `jax.vmap`.

  python examples/robustness.py            # full run, about a minute
  python examples/robustness.py --smoke    # CI
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

import _common  # the examples' plumbing: flags, data, tables, figures
from _common import plt


def init_mlp(key, sizes=(64, 64, 10)):
  params = []
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    k = jax.random.fold_in(key, i)
    params.append({"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m),
                   "b": jnp.zeros(n)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
  logits = mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_sweep(x, y, steps, batch_size, sync_period, alpha):
  """A jitted function: learning rates -> final train loss on slow weights."""
  n = x.shape[0]
  idx = jax.random.randint(jax.random.key(1), (steps, batch_size), 0, n)
  params0 = init_mlp(jax.random.key(0))

  def train(lr):
    tx = optax.sgd(lr, momentum=0.9)
    if alpha != 1.0:
      tx = lo.lookahead(tx, sync_period=sync_period, slow_step_size=alpha)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(loss_fn)(params, x[batch], y[batch])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params0, tx.init(params0)), idx)
    if alpha != 1.0:
      params = lo.eval_params(state, params)
    loss = loss_fn(params, x, y)
    return jnp.where(jnp.isfinite(loss), loss, jnp.inf)

  return jax.jit(jax.vmap(train))


def table(title, row_name, rows, lrs, values):
  print(title)
  _common.print_table(
      [(row_name, ">10")] + [(f"{lr:.3g}", ">9.4f") for lr in lrs],
      [[str(r)] + [x if np.isfinite(x) else None for x in v]
       for r, v in zip(rows, values)], missing="diverged")


def heatmap(ax, values, rows, lrs, row_label, title):
  shown = np.log10(np.minimum(values, 10.0))
  im = ax.imshow(shown, cmap="viridis_r", aspect="auto", vmin=-4, vmax=1)
  ax.set_xticks(range(len(lrs)), [f"{lr:.2g}" for lr in lrs])
  ax.set_yticks(range(len(rows)), [str(r) for r in rows])
  ax.set_xlabel("inner learning rate (SGD, momentum 0.9)")
  ax.set_ylabel(row_label)
  ax.set_title(title)
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      v = values[i, j]
      text = f"{v:.2g}" if np.isfinite(v) else "div."
      # viridis_r is dark for high losses: white text there, black elsewhere.
      ax.text(j, i, text, ha="center", va="center", fontsize=11,
              color="white" if shown[i, j] > -1.5 else "black")
  return im


def main():
  args = _common.parser(
      __doc__, "robustness.png",
      steps_help="training steps per run (default 500, smoke 20)",
      smoke_help="tiny grid (CI)").parse_args()
  steps = args.steps or (20 if args.smoke else 500)
  if args.smoke:
    lrs, alphas, ks = [0.01, 0.3], [1.0, 0.5], [5]
  else:
    lrs = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    alphas, ks = [1.0, 0.8, 0.5, 0.2], [2, 5, 10, 20]
  x, y = map(jnp.asarray, _common.digits())  # all 1,797 images: train loss
  lr_array = jnp.asarray(lrs, jnp.float32)

  def sweep(k, alpha):
    with _common.busy(f"sweep k={k}, alpha={alpha} ({len(lrs)} learning "
                      f"rates, {steps} steps)"):
      return np.asarray(make_sweep(x, y, steps, 64, k, alpha)(lr_array))

  start = time.time()
  by_alpha = np.array([sweep(5, a) for a in alphas])
  by_k = np.array([
      by_alpha[alphas.index(0.5)] if k == 5 and 0.5 in alphas else
      sweep(k, 0.5) for k in ks])
  elapsed = time.time() - start

  print(f"digits MLP, {steps} steps of batch 64, final train loss on the slow "
        f"weights ({elapsed:.0f} s)")
  table("k = 5 (alpha = 1.0 is plain SGD with momentum):", "alpha", alphas,
        lrs, by_alpha)
  table("alpha = 0.5:", "k", ks, lrs, by_k)

  fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 8), layout="constrained")
  heatmap(ax0, by_alpha, alphas, lrs, "alpha (k = 5; 1.0 = SGD alone)",
          "final train loss, by alpha")
  im = heatmap(ax1, by_k, ks, lrs, "k (alpha = 0.5)", "final train loss, by k")
  fig.colorbar(im, ax=[ax0, ax1], label="log10 loss (capped at 10)",
               shrink=0.6)
  _common.save_figure(fig, args.out, "robustness.png")


if __name__ == "__main__":
  main()
