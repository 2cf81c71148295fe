"""Presets of `lookahead` with an outer optimizer: SNOO and DiLoCo."""

from typing import Any

import optax

from lookahead_optax import _arguments
from lookahead_optax._lookahead import lookahead


def snoo(
    inner: optax.GradientTransformation,
    sync_period: int = 28,
    learning_rate: optax.ScalarOrSchedule = 0.68,
    momentum: float = 0.37,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""SNOO: Lookahead whose outer step is SGD with Nesterov momentum.

  Every `sync_period` inner steps, the slow weights $w$ take a Nesterov
  momentum step on the pseudo-gradient $s = w - \tilde w$ (slow minus fast):

  $$b \leftarrow \mu b + s, \qquad w \leftarrow w - \eta (\mu b + s),$$

  with the momentum buffer $b$ starting at zero, and the params restart from
  the new $w$. This is `lookahead(inner, sync_period,
  outer=optax.sgd(learning_rate, momentum=momentum, nesterov=True))`; with
  `momentum=0` it is Lookahead with `slow_step_size=learning_rate`.

  Three published settings, none of them universal (the optimum moves with
  model scale):

  | source | $\eta$ | $\mu$ | $K$ |
  |---|---|---|---|
  | modded-nanogpt GPT-2 medium speedrun record, AdamW and Muon inner (`Snoo(model, lr=0.68, momentum=0.37, k=28)`): **the defaults here** | 0.68 | 0.37 | 28 |
  | the authors' torchtitan integration, its defaults | 0.7 | 0.9 | 10 |
  | summaries of the paper, at 125M params | 0.8 | 0.75 | 100 |

  The defaults are the speedrun's because it is the one public run whose
  code and result anyone can check; they are a record's tuning, not the
  paper's. The paper's summaries also report $K$ from 5 to 100 working about
  equally well. Treat any of them as a starting point and tune $\eta$ and
  $\mu$ for your scale.

  Args:
    inner: the inner optimizer (e.g. `optax.adamw`, Muon).
    sync_period: `K`, inner steps between outer steps.
    learning_rate: the outer learning rate $\eta$ (a float or a schedule of
      the number of outer steps).
    momentum: the outer Nesterov momentum $\mu$, in [0, 1).
    **kwargs: passed on to `lookahead` (e.g. `axis_name`, `inner_state`,
      `slow_dtype`); not `outer` or `slow_step_size`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`; `outer_state` holds the momentum buffer.

  Raises:
    TypeError: if `momentum` or `learning_rate` is not a real number (a
      schedule is fine for `learning_rate`), and as `lookahead`.
    ValueError: if `momentum` is outside [0, 1) or `learning_rate` is not a
      finite number >= 0, and as `lookahead`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.snoo(optax.sgd(0.5), sync_period=2, learning_rate=0.5,
    ...              momentum=0.5)
    >>> params = jnp.array([4.0])
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update(params, state, params)  # loss 0.5 p**2
    ...   params = optax.apply_updates(params, updates)
    >>> print(params)
    [0.390625]

    First cycle: the fast params go 4 -> 2 -> 1, so $s = 3$, $b = 3$ and
    $w = 4 - 0.5 (0.5 \cdot 3 + 3) = 1.75$. Second cycle: 1.75 -> 0.875 ->
    0.4375, so $s = 1.3125$, $b = 0.5 \cdot 3 + 1.3125 = 2.8125$ and
    $w = 1.75 - 0.5 (0.5 \cdot 2.8125 + 1.3125) = 0.390625$.

  References:
    Kallusky, Rao, Nandavanam, Shi, [SNOO: Step-K Nesterov Outer Optimizer -
    The Surprising Effectiveness of Nesterov Momentum Applied to
    Pseudo-Gradients](https://arxiv.org/abs/2510.15830), 2025.
  """
  for name in ("outer", "slow_step_size"):
    if name in kwargs:
      raise TypeError(f"`snoo` sets `{name}` itself; use `lookahead` to pass "
                      "your own.")
  _arguments.check_snoo_args(learning_rate, momentum)
  outer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return lookahead(inner, sync_period, outer=outer, **kwargs)


def diloco(
    inner: optax.GradientTransformation,
    sync_period: int,
    axis_name: str,
    learning_rate: optax.ScalarOrSchedule = 0.7,
    momentum: float = 0.9,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: replicas train apart and average the pseudo-gradient at a sync.

  Each replica of the mapped axis `axis_name` (`jax.pmap`, `shard_map`)
  runs `inner` on its own gradients with its own inner state; every
  `sync_period` steps the pseudo-gradients $\Delta_m = \phi - \theta_m$ are
  averaged over the axis (the only collective) and the slow weights take a
  Nesterov step on the mean, with the DiLoCo paper's outer settings
  ($\eta = 0.7$, $\mu = 0.9$):

  $$\Delta = \tfrac{1}{M} \textstyle\sum_m \Delta_m, \qquad
  b \leftarrow \mu b + \Delta, \qquad
  \phi \leftarrow \phi - \eta (\mu b + \Delta).$$

  This is `lookahead(inner, sync_period, outer=optax.sgd(learning_rate,
  momentum=momentum, nesterov=True), axis_name=axis_name)`. The initial
  params must be the same on every replica (`check_replicas_agree`).

  Args:
    inner: the inner optimizer (the paper: AdamW).
    sync_period: $H$, inner steps between syncs (the paper: 500).
    axis_name: the mapped axis of the replicas.
    learning_rate: the outer learning rate $\eta$ (a float or a schedule of
      the number of outer steps).
    momentum: the outer Nesterov momentum $\mu$, in [0, 1).
    **kwargs: passed on to `lookahead` (e.g. `inner_state`, `slow_dtype`,
      and Streaming DiLoCo's `fragments`, `communication_dtype`,
      `error_feedback`, `overlap`, `mix`); not `outer` or `slow_step_size`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`; `outer_state` holds the momentum buffer (with the
    streaming arguments, a `StreamingState` with one per fragment).

  Raises:
    TypeError: if `momentum` or `learning_rate` is not a real number, or
      `axis_name` is not a string, and as `lookahead`.
    ValueError: if `momentum` is outside [0, 1) or `learning_rate` is not a
      finite number >= 0, and as `lookahead`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lookahead_optax as lo
    >>> tx = lo.diloco(optax.sgd(0.5), sync_period=2, axis_name="r")
    >>> params = jnp.stack([jnp.array([4.0])] * 2)  # 2 replicas, one start
    >>> state = jax.pmap(tx.init, devices=jax.devices()[:2])(params)
    >>> def step(p, s, target):
    ...   u, s = tx.update(p - target, s, p)  # loss 0.5 (p - target)**2
    ...   return optax.apply_updates(p, u), s
    >>> step = jax.pmap(step, axis_name="r", devices=jax.devices()[:2])
    >>> targets = jnp.array([[0.0], [2.0]])  # each replica its own data
    >>> for _ in range(2):
    ...   params, state = step(params, state, targets)
    >>> print(params[:, 0])
    [1.0075 1.0075]

    The fast weights went 4 -> 2 -> 1 and 4 -> 3 -> 2.5, so
    $\Delta = (3 + 1.5) / 2 = 2.25$, $b = 2.25$ and
    $\phi = 4 - 0.7 (0.9 \cdot 2.25 + 2.25) = 1.0075$, on both replicas.

    Streaming: two fragments (`{"a": 0, "b": 1}`) of a 4-step cycle sync
    after steps 2 and 4; fragment `a` moved at step 2, `b` not yet:

    >>> tx = lo.diloco(optax.sgd(0.5), 4, "r", fragments={"a": 0, "b": 1})
    >>> def step(p, s, target):
    ...   u, s = tx.update(jax.tree.map(lambda x: x - target, p), s, p)
    ...   return optax.apply_updates(p, u), s
    >>> step = jax.pmap(step, axis_name="r", devices=jax.devices()[:2])
    >>> params = {"a": jnp.full((2, 1), 4.0), "b": jnp.full((2, 1), 4.0)}
    >>> state = jax.pmap(tx.init, devices=jax.devices()[:2])(params)
    >>> for _ in range(2):
    ...   params, state = step(params, state, targets)
    >>> print(params["a"][:, 0], params["b"][:, 0])
    [1.0075 1.0075] [1.  2.5]

  References:
    Douillard et al., [DiLoCo: Distributed Low-Communication Training of
    Language Models](https://arxiv.org/abs/2311.08105), 2023.
  """
  for name in ("outer", "slow_step_size"):
    if name in kwargs:
      raise TypeError(f"`diloco` sets `{name}` itself; use `lookahead` to "
                      "pass your own.")
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError("`axis_name` of `diloco` must be a non-empty string (the "
                    f"mapped axis of the replicas), got {axis_name!r}.")
  _arguments.check_snoo_args(learning_rate, momentum)
  outer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return lookahead(inner, sync_period, outer=outer, axis_name=axis_name,
                   **kwargs)
