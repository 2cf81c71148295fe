"""One process of a multi-controller DiLoCo run (`lo.diloco`).

Run by tests/test_diloco.py as 2 processes on localhost, each with 4 CPU
devices; the 8 devices form one global mesh with a "data" axis of 8 DiLoCo
replicas. Every replica trains the same regression model on its own data
with its own AdamW state, and at every sync the replicas average their
pseudo-gradients over the mesh (across the two processes) before the outer
Nesterov step. The same script runs one process per host on a cluster:

  python tests/diloco_worker.py --coordinator 10.0.0.1:1234 \
      --num-processes 2 --process-id 0 --out /tmp/run  # on host 0

This module is importable without side effects: the test imports `train` to
compute the single-process reference on 8 local devices.
"""

import os
import sys

import numpy as np

REPLICAS = 8
SYNC_PERIOD = 3
STEPS = 7  # 2 syncs at k = 3, then one step into the third cycle
BATCH = 6  # examples per replica and step
MAX_STEPS = 8  # the data of the first `steps` steps do not depend on `steps`


def make_data(steps=STEPS):
  """Every replica's batches, the same in every process (a fixed seed).

  Returns:
    `(xs, ys)` of shapes `(REPLICAS, steps, BATCH, 4)` and
    `(REPLICAS, steps, BATCH, 3)`: each replica regresses onto its own
    linear map, so the replicas' fast weights drift apart within a cycle.
  """
  assert steps <= MAX_STEPS, steps
  rng = np.random.default_rng(7)
  xs = rng.normal(size=(REPLICAS, MAX_STEPS, BATCH, 4)).astype(np.float32)
  maps = rng.normal(size=(REPLICAS, 1, 4, 3)).astype(np.float32)
  ys = (xs @ maps + 0.1 * rng.normal(size=(REPLICAS, MAX_STEPS, BATCH, 3))
        ).astype(np.float32)
  return xs[:, :steps], ys[:, :steps]


def init_params():
  """Weights in [1, 2]: no weight moves by 2x in a cycle (exact landing)."""
  rng = np.random.default_rng(3)
  return {"w": rng.uniform(1.0, 2.0, size=(4, 3)).astype(np.float32),
          "b": rng.uniform(1.0, 2.0, size=(3,)).astype(np.float32)}


# Streaming DiLoCo's compressed mean (all-to-all, then all-gather) with
# error feedback and overlap, across the processes too.
STREAMING = dict(communication_dtype="int8", error_feedback=True,
                 overlap=True)
# A slice of every leaf at every step, int8, with overlap and a mix: its
# collectives outside any conditional, across the processes.
SLICES = dict(fragments="slices", communication_dtype="int8", overlap=True,
              mix=0.25)
# Replicas that go wrong: replica 5 starts apart in one weight (repaired at
# the first sync), replica 2's data gives a NaN at the second sync's step
# (rolled back, it sits that sync out).
FAULTS = dict(on_nonfinite="rollback", check_replicas="repair")
APART = (5, (0, 0), 1e-3)  # replica, index of "w", offset
NAN_AT = (2, 5)  # replica, step index (step 6, a sync)


def train(mesh, steps=STEPS, streaming=False, faults=False, slices=False):
  """DiLoCo over the "data" axis of `mesh` with `jax.shard_map`.

  With `streaming`, the pseudo-gradient travels as int8 (`STREAMING`);
  with `slices`, a slice of every leaf syncs at every step (`SLICES`);
  with `faults`, replicas go wrong (`FAULTS`, `APART`, `NAN_AT`) and the
  results end with the `ReplicaCounts`.

  Every array carries a leading replica axis of size 8, split over the mesh;
  each process builds only the blocks its own devices hold.

  Returns:
    (params, slow params, outer momentum, step count), as numpy arrays with
    the leading replica axis, gathered from all processes.
  """
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import lookahead_optax as lo

  tx = lo.diloco(
      optax.adamw(0.03, b1=0.8, b2=0.95, weight_decay=0.05), SYNC_PERIOD,
      "data", outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
      **(STREAMING if streaming else {}), **(FAULTS if faults else {}),
      **(SLICES if slices else {}))
  sharding = NamedSharding(mesh, P("data"))

  def to_global(host_array):
    return jax.make_array_from_callback(
        host_array.shape, sharding, lambda index: host_array[index])

  def loss_fn(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  def local_step(params, state, x, y):
    # No pmean of the gradients: each replica steps on its own.
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)
  expand = lambda tree: jax.tree.map(lambda a: a[None], tree)

  def block_step(params, state, x, y):  # one replica's block: leading dim 1
    return expand(local_step(*squeeze((params, state, x, y))))

  step = jax.jit(jax.shard_map(block_step, mesh=mesh, in_specs=P("data"),
                               out_specs=P("data")), donate_argnums=(0, 1))
  init = jax.jit(jax.shard_map(lambda p: expand(tx.init(squeeze(p))),
                               mesh=mesh, in_specs=P("data"),
                               out_specs=P("data")))

  host_params = {k: np.broadcast_to(v, (REPLICAS,) + v.shape).copy()
                 for k, v in init_params().items()}
  if faults:
    host_params["w"][APART[0]][APART[1]] += APART[2]
  params = {k: to_global(v) for k, v in host_params.items()}
  state = init(params)
  xs, ys = make_data(steps)
  if faults:
    xs = xs.copy()
    xs[NAN_AT[0], NAN_AT[1], 0, 0] = np.nan
  for i in range(steps):
    params, state = step(params, state, to_global(xs[:, i]),
                         to_global(ys[:, i]))

  gather = lambda tree: jax.tree.map(
      np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  momentum = state.outer_state.outer_states[0][0].trace
  out = (gather(params), gather(lo.slow_params(state)), gather(momentum),
         gather(state.step))
  if faults:
    out += (gather(state.outer_state.counts._asdict()),)
  return out


def main(argv=None):
  # The command line, JAX's start-up and the results file are those of the
  # multi-host worker beside this file.
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import multihost_worker as worker  # pylint: disable=g-import-not-at-top

  args = worker.parse_args(argv, __doc__.splitlines()[0])
  jax = worker.start_jax(args)
  try:
    mesh = worker.data_mesh(jax)
    params, slow, momentum, step = train(mesh)
    results = {"params": params, "slow": slow, "momentum": momentum}
    params, slow, momentum, _ = train(mesh, streaming=True)
    results.update({"streaming_params": params, "streaming_slow": slow,
                    "streaming_momentum": momentum})
    params, slow, momentum, _ = train(mesh, slices=True)
    results.update({"slices_params": params, "slices_slow": slow,
                    "slices_momentum": momentum})
    params, slow, _, _, counts = train(mesh, faults=True)
    results.update({"faults_params": params, "faults_slow": slow,
                    "faults_counts": counts})
    worker.save(jax, args, step, results, f"{STEPS} DiLoCo steps")
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
