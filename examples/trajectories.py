"""Fast and slow weight trajectories of Lookahead vs its inner optimizer.

The picture of the paper (Zhang et al. 2019, figure 1) on 2-D test surfaces: a
narrow curved valley (Rosenbrock) and a bumpy surface with many basins, with
noisy gradients (Gaussian noise of scale sigma added to the exact gradient, the
same noise for both optimizers). The inner optimizer is SGD with heavy-ball
momentum; Lookahead runs it for k steps (thin line, the fast weights), then
moves the slow weights (dots) a fraction alpha of the way to where the fast
weights got, and restarts them from there. The table gives the mean loss over
the last third of the run (of the params for SGD, of the slow weights for
Lookahead).

  python examples/trajectories.py            # full run, a few seconds
  python examples/trajectories.py --smoke    # CI
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

import _common  # the examples' plumbing: flags, tables, figures
from _common import plt


def rosenbrock(p):
  x, y = p[0], p[1]
  return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def basins(p):
  # A wide bowl with a cosine ripple: many local minima, the global one at 0.
  x, y = p[0], p[1]
  return (0.05 * (x**2 + y**2)
          + 0.6 * (2.0 - jnp.cos(2.5 * x) - jnp.cos(2.5 * y)))


SURFACES = {
    # name: (function, start, optimum, inner learning rate, momentum,
    #        gradient noise sigma, plot extent)
    "narrow valley (Rosenbrock)": (
        rosenbrock, (-1.6, 2.2), (1.0, 1.0), 2e-3, 0.9, 10.0,
        (-2.0, 2.0, -1.0, 3.0)),
    "many basins": (
        basins, (-4.6, 4.0), (0.0, 0.0), 0.05, 0.9, 2.0,
        (-5.5, 5.5, -5.0, 5.5)),
}


def trajectory(f, tx, start, steps, sigma, seed=0):
  """Runs `tx` on `f` from `start` with noisy gradients.

  Returns the params after each step (the start first) and the optimizer
  states after each step.
  """
  grad = jax.grad(f)

  def step(carry, key):
    params, state = carry
    g = grad(params) + sigma * jax.random.normal(key, params.shape)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, state)

  params = jnp.asarray(start, jnp.float32)
  keys = jax.random.split(jax.random.key(seed), steps)
  _, (path, states) = jax.jit(
      lambda p: jax.lax.scan(step, (p, tx.init(p)), keys))(params)
  return np.concatenate([params[None], np.asarray(path)]), states


def paths(f, start, lr, momentum, sigma, steps, k, alpha, ext, grid):
  """The SGD, fast and slow paths, and the surface on a grid for contours."""
  inner = optax.sgd(lr, momentum=momentum)
  plain, _ = trajectory(f, inner, start, steps, sigma)
  fast, states = trajectory(
      f, lo.lookahead(inner, sync_period=k, slow_step_size=alpha),
      start, steps, sigma)
  # The slow weights after every step, the start first.
  slow_all = np.concatenate([np.asarray(start, np.float32)[None],
                             np.asarray(lo.slow_params(states))])
  slow = slow_all[::k]  # they move only at syncs
  xs = np.linspace(ext[0], ext[1], grid)
  ys = np.linspace(ext[2], ext[3], grid)
  xx, yy = np.meshgrid(xs, ys)
  zz = np.asarray(jax.vmap(f)(jnp.stack([xx.ravel(), yy.ravel()])
                              .T)).reshape(xx.shape)
  return plain, fast, slow_all, slow, zz, xx, yy


def main():
  parser = _common.parser(
      __doc__, "trajectories.png",
      steps_help="steps per trajectory (default 300, smoke 30)")
  parser.add_argument("--sync-period", type=int, default=10, help="k")
  parser.add_argument("--slow-step-size", type=float, default=0.5,
                      help="alpha")
  args = parser.parse_args()
  steps = args.steps or (30 if args.smoke else 300)
  k, alpha = args.sync_period, args.slow_step_size
  grid = 80 if args.smoke else 300

  fig, axes = plt.subplots(1, len(SURFACES), figsize=(10, 5.4),
                           layout="constrained")
  rows = []  # (surface, optimizer, mean f over the last third, final f)
  for ax, (name, (f, start, opt, lr, momentum, sigma, ext)) in zip(
      axes, SURFACES.items()):
    with _common.busy(f"{name}: compiling and running {steps} steps"):
      plain, fast, slow_all, slow, zz, xx, yy = paths(
          f, start, lr, momentum, sigma, steps, k, alpha, ext, grid)
    ax.contour(xx, yy, zz, levels=np.unique(
        np.quantile(zz, np.linspace(0.0, 1.0, 20) ** 2)), cmap="Greys",
               linewidths=0.6, alpha=0.5)
    # Drawn in this order so that none hides another: the SGD path under
    # the fast weights (thin, on top of it) under the slow weights (dots).
    ax.plot(plain[:, 0], plain[:, 1], color="tab:orange", lw=1.4,
            label="SGD momentum")
    ax.plot(fast[:, 0], fast[:, 1], color="tab:blue", lw=0.9,
            label="Lookahead fast weights")
    ax.plot(slow[:, 0], slow[:, 1], "o-", color="tab:red", ms=4, lw=1.6,
            label="Lookahead slow weights (at syncs)")
    ax.plot(*start, "k^", ms=9, label="start")
    ax.plot(*opt, "k*", ms=13, label="minimum")
    ax.set_xlim(ext[0], ext[1])
    ax.set_ylim(ext[2], ext[3])
    ax.set_title(f"{name}\nlr={lr:g}, momentum={momentum}, sigma={sigma:g}")
    for label, path in (("SGD momentum", plain),
                        ("Lookahead fast", fast),
                        ("Lookahead slow", slow_all)):
      values = np.asarray(jax.vmap(f)(jnp.asarray(path)))
      tail = values[-max(1, steps // 3):]
      rows.append((name, label, tail.mean(), values[-1]))
  print(f"{steps} steps, lookahead k={k}, alpha={alpha}")
  _common.print_table(
      [("surface", "<28"), ("optimizer", "<22"),
       ("mean f, last third", ">20.4g"), ("final f", ">10.4g")], rows)

  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=3,
             frameon=False)
  fig.suptitle(f"Lookahead (k={k}, alpha={alpha}) around SGD with momentum, "
               f"{steps} steps")
  _common.save_figure(fig, args.out, "trajectories.png")


if __name__ == "__main__":
  main()
