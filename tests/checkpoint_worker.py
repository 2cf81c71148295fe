"""Training runs that tests/test_checkpoint.py interrupts, saves and resumes.

The test trains each case for `SAVE_AT` steps, saves params + optimizer state
with orbax-checkpoint (mid-cycle: `SAVE_AT` is not a multiple of the sync
period), trains on to `TOTAL` steps, then runs this file in a fresh Python
process, which restores every checkpoint and trains from `SAVE_AT` to `TOTAL`:

  python tests/checkpoint_worker.py --ckpt-dir DIR --out DIR CASE [CASE ...]

Both processes build the cases from this module, so the data, the model and
the compiled steps are the same. Importing it has no side effects.
"""

import argparse
import os
import sys

import numpy as np

SAVE_AT = 6
TOTAL = 12
SYNC_PERIOD = 4  # syncs at steps 4, 8 and 12: the save is mid-cycle
CASES = ("keep", "pullback", "lazy", "sharded")


def _mlp_params(rng):
  return {
      "w1": (rng.normal(size=(8, 16)) / np.sqrt(8.0)).astype(np.float32),
      "b1": np.zeros(16, np.float32),
      "w2": (rng.normal(size=(16, 4)) / 4.0).astype(np.float32),
  }


def make_case(name):
  """Returns (tx, host params, batch_fn, step_fn, shardings or None)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import lookahead_optax as lo

  rng = np.random.default_rng(0)

  def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)

  def mlp_batch(step):
    r = np.random.default_rng(100 + step)
    x = r.normal(size=(16, 8)).astype(np.float32)
    return x, np.cos(x[:, :4]).astype(np.float32)

  shardings = None
  extra = lambda batch: {}
  if name == "keep":
    tx = lo.lookahead(optax.adam(0.05), SYNC_PERIOD, 0.5)
    params, loss_fn, batch_fn = _mlp_params(rng), mlp_loss, mlp_batch
  elif name == "pullback":
    tx = lo.lookahead(optax.sgd(0.1, momentum=0.9), SYNC_PERIOD, 0.5,
                      inner_state="pullback")
    params, loss_fn, batch_fn = _mlp_params(rng), mlp_loss, mlp_batch
  elif name == "lazy":
    # An embedding table updated lazily: only the rows looked up move.
    tx = lo.lookahead(
        lo.lazy(optax.adam(0.05), mask={"embed": True, "out": False}),
        SYNC_PERIOD, 0.5)
    params = {
        "embed": rng.normal(size=(32, 4)).astype(np.float32),
        "out": (rng.normal(size=(4, 3)) / 2.0).astype(np.float32),
    }

    def loss_fn(params, batch):
      ids, y = batch
      return jnp.mean((params["embed"][ids] @ params["out"] - y) ** 2)

    def batch_fn(step):
      r = np.random.default_rng(200 + step)
      ids = r.integers(0, 12, size=(6,)).astype(np.int32)  # rows 12+ never
      return ids, r.normal(size=(6, 3)).astype(np.float32)

    extra = lambda batch: {"touched_rows": {"embed": batch[0]}}
  elif name == "sharded":
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    specs = {"w1": P("data", None), "b1": P("data"), "w2": P("data", None)}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    tx = lo.lookahead(optax.adamw(0.05), SYNC_PERIOD, 0.5,
                      inner_state="pullback")
    params, loss_fn, batch_fn = _mlp_params(rng), mlp_loss, mlp_batch
  else:
    raise ValueError(f"unknown case {name!r}")

  if shardings is None:
    step_fn = jax.jit(_make_step(tx, loss_fn, extra))
  else:
    state_shardings = state_shardings_for(tx, params, shardings)
    step_fn = jax.jit(_make_step(tx, loss_fn, extra),
                      out_shardings=(shardings, state_shardings))
  return tx, params, batch_fn, step_fn, shardings


def _make_step(tx, loss_fn, extra):
  import jax
  import optax

  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, **extra(batch))
    return optax.apply_updates(params, updates), state

  return step


def state_shardings_for(tx, params, shardings):
  """Param-shaped state leaves sharded like the params, the rest replicated."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  mesh = next(iter(shardings.values())).mesh
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()))


def init(name):
  """(params, state, step_fn, batch_fn) at step 0 of case `name`."""
  import jax

  tx, params, batch_fn, step_fn, shardings = make_case(name)
  if shardings is None:
    params = jax.device_put(params)
    state = jax.jit(tx.init)(params)
  else:
    params = jax.device_put(params, shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings_for(
        tx, params, shardings))(params)
  return params, state, step_fn, batch_fn


def train(params, state, step_fn, batch_fn, start, stop):
  for step in range(start, stop):
    params, state = step_fn(params, state, batch_fn(step))
  return params, state


def flat(tree):
  """{key path: numpy array} of a pytree, to compare runs leaf by leaf."""
  import jax

  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def resume(name, ckpt_dir):
  """Restores case `name` from `ckpt_dir` and trains it to `TOTAL` steps."""
  import jax
  import orbax.checkpoint as ocp

  import lookahead_optax as lo

  params, state, step_fn, batch_fn = init(name)
  # The restore target: shapes, dtypes and shardings of a fresh state.
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        {"params": params, "opt_state": state})
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(ckpt_dir, name)
  lo.check_state_structure(checkpointer.metadata(path), target,
                           name="checkpoint")
  restored = checkpointer.restore(path, target)
  shardings_ok = all(
      leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
      for leaf, want in zip(jax.tree.leaves(restored),
                            jax.tree.leaves(target)))
  params, state = train(restored["params"], restored["opt_state"], step_fn,
                        batch_fn, SAVE_AT, TOTAL)
  return {"params": params, "opt_state": state}, shardings_ok, type(
      restored["opt_state"]).__name__


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt-dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("cases", nargs="+", choices=CASES)
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))  # the checkout, for `import lookahead_optax`
  for name in args.cases:
    final, shardings_ok, state_type = resume(name, args.ckpt_dir)
    np.savez(os.path.join(args.out, f"{name}.npz"),
             __shardings_ok__=shardings_ok, __state_type__=state_type,
             **flat(final))
    print(f"{name}: resumed at step {SAVE_AT}, trained to {TOTAL}",
          flush=True)


if __name__ == "__main__":
  main()
