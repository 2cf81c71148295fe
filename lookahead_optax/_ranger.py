"""Ranger: RAdam inside Lookahead, with the reference implementation's rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax._lookahead import lookahead


def _log(b):
  """log(b), in float64 when `b` is concrete (float32 rounds 0.999 by 1e-8)."""
  if _checks.is_traced(b):
    return jnp.log(b)
  b = float(b)
  return math.log(b) if b > 0 else -math.inf


def _one_minus_pow(log_b, t):
  """1 - b**t without cancellation: -expm1(t log b)."""
  return -jnp.expm1(t * log_b)


def _sma_length(t, rho_inf, log_b2):
  r"""The SMA length $\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)$,
  accurate in float32.

  The direct formula subtracts two numbers close to $\rho_\infty$ (~2000 for
  $\beta_2 = 0.999$) and loses ~0.5% of $\rho_t$ in float32 at the steps
  where it crosses the threshold. With $L = -\log \beta_2$, $x = t L$ and
  $B(x) = x / \operatorname{expm1}(x)$,
  $2 t \beta_2^t / (1 - \beta_2^t) = (2 / L) B(x)$, so

  $$\rho_t = (\rho_\infty - 2 / L) + (2 / L) (1 - B(x)),$$

  whose first term is a constant and whose second is
  $t (1 - x/6 + x^3/360 - \dots)$ for $x < 1$ (the Bernoulli series) and
  well conditioned for $x \ge 1$.
  """
  neg_log_b2 = -log_b2
  x = t * neg_log_b2
  series = t * (1.0 - x / 6.0 + x**3 / 360.0 - x**5 / 15120.0
                + x**7 / 604800.0 - x**9 / 23950080.0)
  direct = (2.0 / neg_log_b2) * (1.0 - x / jnp.expm1(jnp.maximum(x, 1.0)))
  return (rho_inf - 2.0 / neg_log_b2) + jnp.where(x < 1.0, series, direct)


def _check_radam_args(b1, b2, eps, threshold):
  """Checks the RAdam arguments (traced values are accepted as they are)."""
  _checks.check_scalar("b1", b1, low=0.0, high=1.0, high_open=True)
  _checks.check_scalar("b2", b2, low=0.0, high=1.0, high_open=True)
  _checks.check_scalar("eps", eps, low=0.0)
  # The rectification sqrt((rho - 4) (rho - 2) / rho) needs rho > 4.
  _checks.check_scalar("threshold", threshold, low=4.0)


def scale_by_ranger_radam(
    b1: float = 0.95,
    b2: float = 0.999,
    eps: float = 1e-5,
    threshold: float = 5.0,
) -> optax.GradientTransformation:
  r"""Rescales updates by Rectified Adam exactly as the Ranger optimizer does.

  With moments $m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t$ and
  $v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2$, the update is

  $$u_t = \frac{r_t}{1 - \beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon}$$

  when the SMA length $\rho_t$ exceeds `threshold`, with the rectification
  $r_t = \sqrt{(1 - \beta_2^t) \frac{(\rho_t - 4)(\rho_t - 2)
  \rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2) \rho_t}}$, and the
  bias-corrected momentum $m_t / (1 - \beta_1^t)$ otherwise.

  Differs from `optax.scale_by_radam` in two details of the reference Ranger
  code: `eps` is added to the square root of the *uncorrected* second moment
  (the bias correction is folded into the step size), and the adaptive step is
  taken when the SMA length is strictly greater than `threshold`. The step
  size is computed without cancellation (the reference computes it with
  Python floats): evaluated directly in float32 it would be off by up to ~0.5%
  in the first steps after the threshold.

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: term added to the denominator.
    threshold: SMA length above which the adaptive (rectified) step is used;
      below it the step is bias-corrected momentum.

  Returns:
    An `optax.GradientTransformation` whose state is an
    `optax.ScaleByAdamState`.

  Raises:
    TypeError: if an argument is not a real number (or scalar array).
    ValueError: if `b1` or `b2` is outside $[0, 1)$, `eps` is negative,
      `threshold` is below 4 (the rectification needs $\rho_t > 4$), or a
      value is not finite.

  Example:
    >>> import jax.numpy as jnp
    >>> import lookahead_optax as lo
    >>> tx = lo.scale_by_ranger_radam()
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([1.0, -2.0]), state)
    >>> print(updates)  # bias-corrected momentum at the first step
    [ 1. -2.]

  References:
    Liu et al., [On the Variance of the Adaptive Learning Rate and
    Beyond](https://arxiv.org/abs/1908.03265), 2020.
  """
  _check_radam_args(b1, b2, eps, threshold)
  rho_inf = 2.0 / (1.0 - b2) - 1.0
  log_b1, log_b2 = _log(b1), _log(b2)

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    # 1 - b^t and rho_t computed without cancellation, as the reference
    # computes them in float64 (Python floats).
    one_minus_b1t = _one_minus_pow(log_b1, t)
    one_minus_b2t = _one_minus_pow(log_b2, t)
    rho = _sma_length(t, rho_inf, log_b2)
    rectified = rho > threshold
    # Guard the square root on the steps where it is not used.
    safe_rho = jnp.where(rectified, rho, rho_inf)
    r = jnp.sqrt(
        one_minus_b2t * (safe_rho - 4.0) / (rho_inf - 4.0)
        * (safe_rho - 2.0) / safe_rho * rho_inf / (rho_inf - 2.0)
    ) / one_minus_b1t
    plain = 1.0 / one_minus_b1t

    def step(m, v):
      adaptive = (r * m / (jnp.sqrt(v) + eps)).astype(m.dtype)
      return jnp.where(rectified, adaptive, (plain * m).astype(m.dtype))

    new_updates = jax.tree.map(step, mu, nu)
    return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def ranger(
    learning_rate: optax.ScalarOrSchedule,
    *,
    sync_period: int = 6,
    slow_step_size: optax.ScalarOrSchedule = 0.5,
    b1: float = 0.95,
    b2: float = 0.999,
    eps: float = 1e-5,
    weight_decay: float = 0.0,
    centralize: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The Ranger optimizer: RAdam inside Lookahead, with Ranger's defaults.

  Follows the reference Ranger implementation (lessw2020): Rectified Adam with
  $\beta_1 = 0.95$, $\epsilon = 10^{-5}$ and an SMA threshold of 5 (see
  `scale_by_ranger_radam`), weight decay applied as
  $p \leftarrow p - \eta \lambda p$ before the step ($\eta$ the learning
  rate, $\lambda$ `weight_decay`), and Lookahead with $k = 6$,
  $\alpha = 0.5$ whose slow weights start at the initial params. With
  `centralize=True` gradients of params with more than one axis are centred
  first (Gradient Centralization, as in Ranger's 2020 versions).

  Args:
    learning_rate: a finite float $\ge 0$, or an optax schedule.
    sync_period: Lookahead's `k`.
    slow_step_size: Lookahead's `alpha`.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: term added to the denominator.
    weight_decay: decoupled weight decay rate, a finite float $\ge 0$.
    centralize: whether to apply gradient centralization.

  Returns:
    A `lookahead` transformation around the RAdam chain.

  Raises:
    TypeError: if an argument has the wrong type (e.g. `learning_rate=None`).
    ValueError: if a float argument is not finite or out of its range
      (`learning_rate`, `eps`, `weight_decay` $\ge 0$; `b1`, `b2` in
      $[0, 1)$), or `sync_period` or `slow_step_size` is invalid (see
      `lookahead`).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> tx = lo.ranger(1e-3)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((3, 2))}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> float(params["w"][0, 0])
    0.999000...

  References:
    Wright, [Ranger: a synergistic
    optimizer](https://github.com/lessw2020/Ranger-Deep-Learning-Optimizer),
    2019; Zhang et al., [Lookahead
    Optimizer](https://arxiv.org/abs/1907.08610), 2019; Liu et al.,
    [RAdam](https://arxiv.org/abs/1908.03265), 2020; Yong et al., [Gradient
    Centralization](https://arxiv.org/abs/2004.01461), 2020.
  """
  _checks.check_scalar("learning_rate", learning_rate, low=0.0,
                       allow_schedule=True)
  _check_radam_args(b1, b2, eps, 5.0)
  _checks.check_scalar("weight_decay", weight_decay, low=0.0)
  if not isinstance(centralize, (bool, np.bool_)):
    raise TypeError(f"`centralize` must be a bool, got {centralize!r}.")
  # A scalar array is accepted (optax.inject_hyperparams passes one, traced in
  # `update`); the decay term is then always in the chain, so that `init` and
  # `update` build the same state.
  is_array = isinstance(weight_decay, (jax.Array, np.ndarray))
  parts = [optax.centralize()] if centralize else []
  parts.append(scale_by_ranger_radam(b1=b1, b2=b2, eps=eps))
  if is_array or weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return lookahead(
      optax.chain(*parts), sync_period=sync_period,
      slow_step_size=slow_step_size,
  )
