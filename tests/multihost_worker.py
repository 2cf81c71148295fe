"""One process of a multi-controller (multi-host) training run with lookahead.

Run by tests/test_multihost.py as 2 processes on localhost, each with 4 CPU
devices; the 8 devices form one global mesh. The same script runs on a real
cluster, one process per host (see docs/multi_device.md)::

  python tests/multihost_worker.py --coordinator 10.0.0.1:1234 \
      --num-processes 2 --process-id 0 --out /tmp/run  # on host 0
  python tests/multihost_worker.py --coordinator 10.0.0.1:1234 \
      --num-processes 2 --process-id 1 --out /tmp/run  # on host 1

On Cloud TPU, or under Slurm or Open MPI, pass `--auto` instead:
`jax.distributed.initialize()` then finds the coordinator and process ids
itself. This module is importable without side effects: the test imports
`train` to compute the single-process reference.
"""

import argparse
import os
import sys

import numpy as np

STEPS = 7  # 2 syncs at k = 3, then one step into the third cycle
GLOBAL_BATCH = 32


def make_data(steps=STEPS):
  """The global batches, the same in every process (a fixed seed)."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, GLOBAL_BATCH, 16)).astype(np.float32)
  ys = (np.sin(xs[..., :8]) + 0.1 * rng.normal(
      size=(steps, GLOBAL_BATCH, 8))).astype(np.float32)
  return xs, ys


def train(mesh, steps=STEPS):
  """Trains an MLP with lookahead(adam), FSDP over `mesh` (axis "data").

  Every process calls this with the same global mesh; each process feeds
  only the shards of the batch that its own devices hold.

  Returns:
    (params, slow params, step count), as numpy arrays gathered from all
    processes.
  """
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import lookahead_optax as lo

  specs = {"w1": P("data", None), "b1": P("data"), "w2": P("data", None)}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  rng = np.random.default_rng(1)
  host_params = {
      "w1": (rng.normal(size=(16, 32)) / 4.0).astype(np.float32),
      "b1": np.zeros(32, np.float32),
      "w2": (rng.normal(size=(32, 8)) / np.sqrt(32.0)).astype(np.float32),
  }

  def to_global(host_array, sharding):
    # Each process builds only the shards its devices hold.
    return jax.make_array_from_callback(
        host_array.shape, sharding, lambda index: host_array[index])

  params = {k: to_global(v, shardings[k]) for k, v in host_params.items()}
  tx = lo.lookahead(optax.adam(0.05), sync_period=3, slow_step_size=0.5)
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, shardings,
      transform_non_params=lambda _: replicated)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  xs, ys = make_data(steps)
  for x, y in zip(xs, ys):
    params, state = step(params, state, to_global(x, batch_sharding),
                         to_global(y, batch_sharding))

  gather = lambda tree: jax.tree.map(
      np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return gather(params), gather(lo.slow_params(state)), int(
      gather(state.step))


def parse_args(argv=None, description=__doc__.splitlines()[0]):
  """The worker's command line (also used by tests/diloco_worker.py)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--coordinator", help="host:port of process 0")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--auto", action="store_true",
                      help="let jax.distributed.initialize() detect the "
                      "cluster (Cloud TPU, Slurm, Open MPI)")
  parser.add_argument("--local-cpu-devices", type=int, default=0,
                      help="simulate this many CPU devices per process "
                      "(tests); 0 uses the real accelerators")
  parser.add_argument("--bind-loopback", action="store_true",
                      help="bind the coordinator to 127.0.0.1 only")
  parser.add_argument("--out", required=True, help="where to write results")
  return parser.parse_args(argv)


def start_jax(args):
  """Imports JAX, joins the processes (`jax.distributed`); returns `jax`."""
  if args.local_cpu_devices:
    # Must happen before JAX starts its CPU backend.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.local_cpu_devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))  # the checkout, for `import lookahead_optax`
  import jax

  if args.local_cpu_devices:
    # Cross-process collectives on CPU (the default in recent JAX).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.auto:
    jax.distributed.initialize()
  else:
    port = args.coordinator.rsplit(":", 1)[1]
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=(
            f"127.0.0.1:{port}" if args.bind_loopback else None),
        initialization_timeout=60,
    )
  return jax


def data_mesh(jax):
  """One global mesh over every process's devices, axis "data"."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def save(jax, args, step, trees, what):
  """Writes `process_<i>.npz` (the step, the device counts, `trees`)."""
  os.makedirs(args.out, exist_ok=True)
  np.savez(
      os.path.join(args.out, f"process_{jax.process_index()}.npz"),
      step=step, process_count=jax.process_count(),
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      **{f"{name}/{k}": v for name, tree in trees.items()
         for k, v in tree.items()})
  print(f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices, "
        f"{what}, done", flush=True)


def main(argv=None):
  args = parse_args(argv)
  jax = start_jax(args)
  try:
    params, slow, step = train(data_mesh(jax))
    save(jax, args, step, {"params": params, "slow": slow}, f"{step} steps")
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
