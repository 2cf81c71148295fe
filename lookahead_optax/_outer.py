"""SNOO: `lookahead` with SGD with Nesterov momentum as the outer step."""

from typing import Any, Optional

import optax

from lookahead_optax import _arguments
from lookahead_optax._lookahead import lookahead
from lookahead_optax._lookahead import redirects_replica_arguments


@redirects_replica_arguments
def snoo(
    inner: optax.GradientTransformation,
    sync_period: int = 28,
    learning_rate: optax.ScalarOrSchedule = 0.68,
    momentum: float = 0.37,
    *,
    inner_state: str = "keep",
    sync: str = "auto",
    on_nonfinite: str = "propagate",
    slow_dtype: Optional[Any] = None,
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
    inner_state: as in `lookahead`: `"keep"` or `"reset"` (`"pullback"`
      needs the interpolation and is rejected).
    sync: as in `lookahead`.
    on_nonfinite: as in `lookahead`.
    slow_dtype: as in `lookahead`.

  SNOO runs on one device; across replicas the same outer step is
  `diloco(inner, sync_period, axis_name, learning_rate, momentum)`.
  Under `optax.inject_hyperparams(lo.snoo)`, `sync_period`, `learning_rate`
  and `momentum` may all be injected.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookaheadState`; `outer_state` holds the momentum buffer.

  Raises:
    TypeError: if `momentum` or `learning_rate` is not a real number (a
      schedule is fine for `learning_rate`), an argument of `diloco` such as
      `axis_name` is given (the message shows the `diloco` call), and as
      `lookahead`.
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
  _arguments.check_snoo_args(learning_rate, momentum)
  outer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return lookahead(inner, sync_period, outer=outer, inner_state=inner_state,
                   sync=sync, on_nonfinite=on_nonfinite, slow_dtype=slow_dtype)
