"""Data-parallel training with `jax.pmap` and Lookahead on 8 host devices.

Trains an MLP on scikit-learn's 8x8 digits (no download) with AdamW and with
Lookahead(AdamW), splitting every batch over 8 devices: each device computes
the gradient of its shard, `lax.pmean` averages them, and every device runs
the same optimizer update on replicated params and state. The script checks
that the data-parallel run matches a single-device run on the full batches,
prints a table, and saves a figure of the loss curves.

There is no GPU needed: the script asks XLA for 8 CPU devices before JAX
starts. On a machine with 8 accelerators, drop `--cpu-devices` (pass 0).

  python examples/data_parallel.py            # about a minute on 2 cores
  python examples/data_parallel.py --smoke    # a few seconds (CI)
"""

import sys

# The examples' plumbing: flags, data, tables, figures. It imports no JAX.
import _common
from _common import plt


def _parse_args():
  parser = _common.parser(
      __doc__, "data_parallel.png",
      steps_help="training steps per run (default 603, smoke 23; not "
      "multiples of k = 5, so that the runs end between syncs)",
      smoke_help="a few steps (CI)")
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

import lookahead_optax as lo

AXIS = "batch"


def init_params(key, sizes=(64, 128, 10)):
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (n_in, n_out)) * np.sqrt(
        2.0 / n_in)
    params[f"b{i}"] = jnp.zeros(n_out)
  return params


def predict(params, x):
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y):
  logits = predict(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(tx):
  """The data-parallel step (pmap) and the single-device reference step."""

  @functools.partial(jax.pmap, axis_name=AXIS)
  def parallel_step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # Equal shards: the mean of the shard gradients is the full-batch one.
    grads = jax.lax.pmean(grads, axis_name=AXIS)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state,
            jax.lax.pmean(loss, axis_name=AXIS))

  @jax.jit
  def single_step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return parallel_step, single_step


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(predict(params, x), -1) == y)


def run(name, tx, data, steps, batch_size, n_dev, bar, seed=0):
  x_train, x_test, y_train, y_test = data
  parallel_step, single_step = make_steps(tx)
  params = init_params(jax.random.PRNGKey(seed))
  # Replicate: pmap splits its inputs along a leading device axis.
  replicate = lambda tree: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), tree)
  p_params = replicate(params)
  p_state = jax.pmap(tx.init)(p_params)
  s_params, s_state = params, tx.init(params)

  rng = np.random.default_rng(seed)
  curve = []
  start = time.time()
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    x, y = x_train[idx], y_train[idx]
    shard = lambda a: a.reshape((n_dev, -1) + a.shape[1:])
    p_params, p_state, loss = parallel_step(
        p_params, p_state, shard(x), shard(y))
    curve.append(float(loss[0]))
    s_params, s_state = single_step(s_params, s_state, x, y)
    bar.update()
  seconds = time.time() - start

  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  params, state = first(p_params), first(p_state)
  replicas_equal = all(
      bool(jnp.all(a == a[0])) for a in jax.tree.leaves((p_params, p_state)))
  max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(s_params)))
  row = dict(name=name, curve=np.array(curve), seconds=seconds,
             replicas_equal=replicas_equal, max_diff=max_diff,
             test_acc=float(accuracy(params, x_test, y_test)))
  if name != "adamw":
    slow = lo.eval_params(state, params)
    row["slow_test_acc"] = float(accuracy(slow, x_test, y_test))
  return row


def main(args):
  n_dev = jax.local_device_count()
  steps = args.steps or (23 if args.smoke else 603)
  batch_size = 8 * n_dev
  data = _common.digits_split()
  adamw = optax.adamw(3e-3, weight_decay=1e-4)
  optimizers = {
      "adamw": adamw,
      "lookahead(adamw)": lo.lookahead(adamw, sync_period=5,
                                       slow_step_size=0.5),
  }
  if not args.smoke:
    optimizers["lookahead(adamw), pullback"] = lo.lookahead(
        adamw, sync_period=5, slow_step_size=0.5, inner_state="pullback")
  bar = _common.progress(len(optimizers) * steps,
                         "training (pmap and one device)")
  rows = [run(name, tx, data, steps, batch_size, n_dev, bar)
          for name, tx in optimizers.items()]
  bar.close()

  print(f"digits MLP, {n_dev} {jax.devices()[0].platform.upper()} devices, "
        f"{steps} steps of global batch {batch_size} "
        f"({batch_size // n_dev} per device)")
  _common.print_table(
      [("optimizer", "<28"), ("test acc", ">9.4f"), ("slow acc", ">9.4f"),
       ("replicas equal", ">15"), ("|pmap - 1 dev|", ">15.1e"),
       ("s", ">6.1f")],
      [(r["name"], r["test_acc"], r.get("slow_test_acc"),
        str(r["replicas_equal"]), r["max_diff"], r["seconds"]) for r in rows])
  ok = all(r["replicas_equal"] and r["max_diff"] < 1e-4 for r in rows)

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for r, style in zip(rows, ("-", "--", ":")):
    ax.plot(*_common.smooth(r["curve"]), style, label=r["name"],
            **_common.few_points_marker(len(r["curve"])))
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (smoothed)")
  ax.set_title(f"pmap data parallelism on {n_dev} devices")
  ax.legend()
  fig.tight_layout()
  _common.save_figure(fig, args.out, "data_parallel.png")
  if not ok:
    print("data-parallel and single-device runs differ", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main(ARGS)
