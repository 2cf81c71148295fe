"""End-to-end training step: a Flax MLP with adam vs lookahead(adam).

One jitted step = forward + backward (softmax cross-entropy on a fixed random
batch) + optimizer update, on a `flax.training.train_state.TrainState` with
donated state: lookahead drops into `TrainState` unchanged. Timed round-robin
over whole sync cycles like the step benchmark.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

import lookahead_optax as lo
from benchmarks import common

SYNC_PERIOD = 5


def _mlp(hidden: Sequence[int], classes: int):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      for h in hidden:
        x = nn.relu(nn.Dense(h)(x))
      return nn.Dense(classes)(x)

  return MLP()


def make_variant(name: str, tx: optax.GradientTransformation, *,
                 features: int, hidden: Sequence[int], classes: int,
                 batch: int) -> common.Variant:
  from flax.training import train_state  # pylint: disable=g-import-not-at-top

  model = _mlp(hidden, classes)
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, features), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, classes)

  def init():
    params = model.init(kp, x[:1])["params"]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=tx)
    # `step(params, state, grads)` protocol of common.Variant: the TrainState
    # is the "params", the batch plays the "grads" (not donated).
    return state, jnp.zeros([], jnp.int32), (x, y)

  def train_step(state, aux, batch):
    bx, by = batch

    def loss_fn(params):
      logits = state.apply_fn({"params": params}, bx)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, by).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), aux + (loss > 0)

  return common.Variant(name=name, fn=train_step, init=init, donate=True)


def run(quick: bool = False, rounds: int = 11, log=print) -> list:
  """Times the MLP train step; rows with name, median_ms, overhead_pct."""
  if quick:
    cfg = dict(features=32, hidden=(64, 64), classes=10, batch=16)
    rounds = min(rounds, 3)
  else:
    cfg = dict(features=784, hidden=(2048, 2048, 2048), classes=10,
               batch=128)
  adam = lambda: optax.adam(1e-3)
  variants = [
      make_variant("adam", adam(), **cfg),
      make_variant("lookahead(adam) select",
                   lo.lookahead(adam(), SYNC_PERIOD, 0.5, sync="select"),
                   **cfg),
      make_variant("lookahead(adam) cond",
                   lo.lookahead(adam(), SYNC_PERIOD, 0.5, sync="cond"),
                   **cfg),
  ]
  n_params = None
  state, _, _ = variants[0].init()
  n_params = common.tree_size(state.params)
  del state
  log(f"  e2e: MLP {cfg['features']}-{'-'.join(map(str, cfg['hidden']))}-"
      f"{cfg['classes']} ({common.fmt_params(n_params)} params), batch "
      f"{cfg['batch']} ({rounds} rounds)")
  timings = common.interleaved(
      variants, rounds=rounds, steps_per_block=SYNC_PERIOD,
      warmup_steps=2 * SYNC_PERIOD, baseline="adam",
      min_block_s=0.0 if quick else 0.3)
  rows = []
  for t in timings:
    rows.append(dict(
        name=t.name, median_ms=t.median_s * 1e3, ratio=t.ratio,
        overhead_pct=(t.ratio - 1.0) * 100.0, n=n_params,
        model=(f"MLP {cfg['features']}-"
               f"{'-'.join(map(str, cfg['hidden']))}-{cfg['classes']}"),
        batch=cfg["batch"], temp=t.memory.get("temp")))
  return rows
