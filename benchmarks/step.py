"""Optimizer step alone: adam vs lookahead(adam) vs optax.lookahead(adam).

Each variant is ``params, state = step(params, state, grads)`` under `jax.jit`
(update + `optax.apply_updates`), with or without donating params and state.
`optax.lookahead` gets separately allocated slow params
(``LookaheadParams(fast=p, slow=copy of p)``), as donation requires.
"""

from typing import Optional, Sequence

import jax
import optax

import lookahead_optax as lo
from benchmarks import common

SYNC_PERIOD = 5
SLOW_STEP_SIZE = 0.5
LEARNING_RATE = 1e-3

# Variant names, in table order.
ADAM = "adam"
LA_SELECT = "lookahead(adam) select"
LA_COND = "lookahead(adam) cond"
OPTAX_LA = "optax.lookahead(adam)"
VARIANTS = (ADAM, LA_SELECT, LA_COND, OPTAX_LA)


def make_tx(name: str, **lookahead_kwargs) -> optax.GradientTransformation:
  adam = optax.adam(LEARNING_RATE)
  if name == ADAM:
    return adam
  if name == LA_SELECT:
    return lo.lookahead(adam, SYNC_PERIOD, SLOW_STEP_SIZE, sync="select",
                        **lookahead_kwargs)
  if name == LA_COND:
    return lo.lookahead(adam, SYNC_PERIOD, SLOW_STEP_SIZE, sync="cond",
                        **lookahead_kwargs)
  if name == OPTAX_LA:
    return optax.lookahead(adam, SYNC_PERIOD, SLOW_STEP_SIZE)
  raise ValueError(f"unknown variant {name!r}")


def make_variant(name: str, layout: str, n: int, donate: bool,
                 grads=None, tx=None, layers: int = 12) -> common.Variant:
  """A `common.Variant` for optimizer `name` on params of the given size."""
  tx = make_tx(name) if tx is None else tx

  def init():
    params = common.make_params(layout, n, seed=0, layers=layers)
    g = grads if grads is not None else common.make_params(
        layout, n, seed=1, layers=layers)
    if name == OPTAX_LA:
      params = optax.LookaheadParams(
          fast=params, slow=common.fresh_copy(params))
    return params, tx.init(params), g

  return common.Variant(name=name, fn=common.optimizer_step(tx), init=init,
                        donate=donate)


def run(
    sizes: Sequence[int] = (1_000_000, 10_000_000, 50_000_000),
    layouts: Sequence[str] = ("leaf", "tree"),
    donate_modes: Sequence[bool] = (True, False),
    rounds: int = 15,
    min_block_s: float = 0.1,
    variants: Sequence[str] = VARIANTS,
    rounds_for: Optional[dict] = None,
    tree_layers: int = 12,
    log=print,
) -> list:
  """Runs the step benchmark; one row (a dict) per variant and configuration.

  Args:
    sizes: numbers of float32 params.
    layouts: "leaf" (one array) and/or "tree" (148-leaf transformer-like).
    donate_modes: donation on and/or off.
    rounds: rounds of the round-robin.
    min_block_s: minimum duration of one timed block (whole sync cycles).
    variants: which optimizers.
    rounds_for: optional ``{n: rounds}`` overriding `rounds` for big sizes.
    tree_layers: layers of the "tree" layout (12 leaves each, plus 4).
    log: progress printer.

  Returns:
    A list of dicts with keys layout, n, leaves, donate, name, median_ms,
    ratio (to adam in the same group), temp, output, alias, state_bytes,
    param_bytes.
  """
  rows = []
  for layout in layouts:
    for n in sizes:
      grads = common.make_params(layout, n, seed=1, layers=tree_layers)
      actual_n = common.tree_size(grads)
      leaves = len(jax.tree.leaves(grads))
      for donate in donate_modes:
        vs = [make_variant(v, layout, n, donate, grads=grads,
                           layers=tree_layers) for v in variants]
        r = (rounds_for or {}).get(n, rounds)
        log(f"  step: {layout} {common.fmt_params(actual_n)} "
            f"donate={donate} ({r} rounds)")
        timings = common.interleaved(
            vs, rounds=r, steps_per_block=SYNC_PERIOD,
            warmup_steps=2 * SYNC_PERIOD, baseline=variants[0],
            min_block_s=min_block_s)
        for t in timings:
          rows.append(dict(
              layout=layout, n=actual_n, leaves=leaves, donate=donate,
              name=t.name, median_ms=t.median_s * 1e3, ratio=t.ratio,
              temp=t.memory.get("temp"), output=t.memory.get("output"),
              alias=t.memory.get("alias"), state_bytes=t.state_bytes,
              param_bytes=t.param_bytes))
      del grads
  return rows
