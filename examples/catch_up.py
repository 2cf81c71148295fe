"""Does catching up idle rows matter? Lazy AdamW on a Zipf-distributed item table.

Synthetic matrix factorisation with a known ground truth: users and items have
rank-16 factors, a rating is their dot product plus noise, and the items of the
training pairs follow a Zipf law (exponent 1.1), so the rare items of the
table come back after long gaps. Three optimizers train the same model (user
and item tables, 32 columns) from the same start on the same batches:

* dense AdamW (`optax.adamw` on the dense gradients of `jax.grad`): every row
  of both tables moves every step (moments decay, weight decay applies);
* `lo.lazy(adamw)` on `SparseRows` gradients (`lo.sparse_value_and_grad`):
  only the looked-up rows move, the others keep stale moments and skip the
  weight decay;
* `lo.lazy(adamw, catch_up=True)`: the same rows move, but a row that comes
  back after idle steps first takes the moment decay and the weight decay of
  the dense optimizer's zero-gradient steps it missed (not Adam's own drift).

The figure shows the validation loss against steps (held-out pairs drawn
from the same Zipf law, and those whose item is rare) and the step time of
each. The table says which wins here; catching up is not always a gain.

  python examples/catch_up.py            # full run, a few minutes on 2 cores
  python examples/catch_up.py --smoke    # CI
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

import _common  # the examples' plumbing: flags, tables, figures
from _common import plt

RANK, DIM, NOISE, ZIPF = 16, 32, 0.1, 1.1
LR = 1e-2

DENSE = "dense AdamW"
LAZY = "lazy(adamw)"
CATCH_UP = "lazy(adamw, catch_up=True)"
NAMES = (DENSE, LAZY, CATCH_UP)


def make_problem(num_users, num_items, seed=0):
  """Ground-truth factors and the Zipf item distribution (rank = item id)."""
  rng = np.random.default_rng(seed)
  users = rng.standard_normal((num_users, RANK)).astype(np.float32)
  items = rng.standard_normal((num_items, RANK)).astype(np.float32)
  users /= np.sqrt(RANK)
  p = 1.0 / np.arange(1, num_items + 1) ** ZIPF
  return users, items, np.cumsum(p / p.sum())


def sample(rng, problem, n):
  """`n` (user, item, rating) triples, items Zipf-distributed."""
  users, items, cdf = problem
  u = rng.integers(0, len(users), n).astype(np.int32)
  i = np.minimum(np.searchsorted(cdf, rng.random(n)), len(items) - 1)
  i = i.astype(np.int32)
  r = np.sum(users[u] * items[i], -1) + NOISE * rng.standard_normal(n)
  return u, i, r.astype(np.float32)


def loss_fn(params, users, items, ratings):
  pred = jnp.sum(params["users"][users] * params["items"][items], -1)
  return jnp.mean((pred - ratings) ** 2)


def make_step(name, weight_decay):
  """A jitted step (params and state donated) and its optimizer."""
  adamw = optax.adamw(LR, weight_decay=weight_decay)
  if name == DENSE:
    tx = adamw

    def grads_of(params, *batch):
      return jax.value_and_grad(loss_fn)(params, *batch)
  else:
    tx = lo.lazy(adamw, catch_up=name == CATCH_UP)
    grads_of = lo.sparse_value_and_grad(loss_fn)

  def step(params, state, *batch):
    loss, grads = grads_of(params, *batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def train(name, weight_decay, init, batches, val, rare, eval_every, bar):
  """Trains one optimizer; returns (eval steps, val losses, rare, step ms)."""
  tx, step = make_step(name, weight_decay)
  params = jax.tree.map(jnp.array, init)  # own copies: they are donated
  state = tx.init(params)
  evaluate = jax.jit(loss_fn)
  curve, curve_rare, times, at = [], [], [], []
  for k, batch in enumerate(batches):
    start = time.perf_counter()
    params, state, loss = step(params, state, *batch)
    loss.block_until_ready()
    if k >= 3:  # past compilation and warm-up
      times.append(time.perf_counter() - start)
    bar.update()
    if (k + 1) % eval_every == 0 or k + 1 == len(batches):
      at.append(k + 1)
      curve.append(float(evaluate(params, *val)))
      curve_rare.append(float(evaluate(params, *rare)))
  return at, curve, curve_rare, 1e3 * float(np.median(times))


def main():
  p = _common.parser(__doc__, "catch_up.png", "training steps")
  p.add_argument("--items", type=int, default=None,
                 help="rows of the item table (default 200,000; smoke 5,000)")
  p.add_argument("--weight-decay", type=float, default=0.1,
                 help="AdamW's decoupled weight decay (default 0.1)")
  args = p.parse_args()
  steps = args.steps or (40 if args.smoke else 2000)
  num_items = args.items or (5_000 if args.smoke else 200_000)
  num_users, batch = (500, 256) if args.smoke else (2_000, 1024)
  eval_every = max(1, steps // 20)

  problem = make_problem(num_users, num_items)
  rng = np.random.default_rng(1)
  batches = [tuple(jnp.asarray(x) for x in sample(rng, problem, batch))
             for _ in range(steps)]
  val_np = sample(np.random.default_rng(2), problem, 20_000)
  val = tuple(jnp.asarray(x) for x in val_np)
  # Rare items: those outside the 1% most frequent (they come back after
  # long gaps); held-out pairs drawn uniformly among them.
  rare_rng = np.random.default_rng(3)
  first_rare = max(1, num_items // 100)
  u = rare_rng.integers(0, num_users, 20_000).astype(np.int32)
  i = rare_rng.integers(first_rare, num_items, 20_000).astype(np.int32)
  r = (np.sum(problem[0][u] * problem[1][i], -1)
       + NOISE * rare_rng.standard_normal(20_000)).astype(np.float32)
  rare = (jnp.asarray(u), jnp.asarray(i), jnp.asarray(r))
  seen = np.zeros(num_items, bool)
  for b in batches:
    seen[np.asarray(b[1])] = True

  init_rng = np.random.default_rng(4)
  init = {"users": 0.1 * init_rng.standard_normal((num_users, DIM)),
          "items": 0.1 * init_rng.standard_normal((num_items, DIM))}
  init = jax.tree.map(lambda x: np.asarray(x, np.float32), init)

  results = {}
  bar = _common.progress(len(NAMES) * steps, "training")
  for name in NAMES:
    results[name] = train(name, args.weight_decay, init, batches, val, rare,
                          eval_every, bar)
  bar.close()

  print(f"{num_items:,} items (Zipf {ZIPF}), {num_users:,} users, batch "
        f"{batch}, {steps} steps; {seen.mean():.0%} of the items seen in "
        "training")
  _common.print_table(
      [("optimizer", "<30"), ("val loss", ">10.4f"), ("rare items", ">12.4f"),
       ("best val", ">10.4f"), ("step (ms)", ">10.2f")],
      [(name, r[1][-1], r[2][-1], min(r[1]), r[3])
       for name, r in results.items()])
  print(f"noise floor (the loss of the true factors): {NOISE ** 2:.4f}")

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  colors = {DENSE: "tab:gray", LAZY: "tab:blue", CATCH_UP: "tab:orange"}
  for name, (at, curve, curve_rare, _) in results.items():
    axes[0].plot(at, curve, label=name, color=colors[name],
                 **_common.few_points_marker(len(at)))
    axes[1].plot(at, curve_rare, label=name, color=colors[name],
                 **_common.few_points_marker(len(at)))
  axes[0].set(title="validation loss (Zipf-drawn pairs)", xlabel="step",
              ylabel="mean squared error", yscale="log")
  axes[1].set(title="validation loss, rare items (outside the top 1%)",
              xlabel="step", yscale="log")
  axes[0].legend()
  names = list(results)
  axes[2].barh(names, [results[n][3] for n in names],
               color=[colors[n] for n in names])
  axes[2].set(title="median step time (ms)", xlabel="ms")
  axes[2].invert_yaxis()
  fig.suptitle(f"Lazy AdamW with and without catching up: {num_items:,}-row "
               f"item table, Zipf {ZIPF}, AdamW lr {LR}, weight decay "
               f"{args.weight_decay}")
  fig.tight_layout()
  _common.save_figure(fig, args.out, "catch_up.png")


if __name__ == "__main__":
  main()
