"""Independent NumPy reference implementations for the test suite.

Nothing here imports JAX, optax or lookahead_optax (only ml_dtypes, for
NumPy's bfloat16 and float8): the algorithms are written from their papers
(and, for the inner optimizers, from optax's documented update rules) as
plain loops over NumPy arrays, so the library can be checked against them
step by step.

Params, gradients and optimizer moments are dicts of NumPy arrays with the
same keys. An inner optimizer is an object with ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``; its state is a dict
whose entry ``"count"`` (if any) is the step counter and whose other entries
are dicts of param-shaped arrays (the moments).
"""

import math
from typing import Any, Callable, Dict, List, Tuple, Union

import ml_dtypes
import numpy as np

Tree = Dict[str, np.ndarray]


def tree_map(fn: Callable[..., np.ndarray], *trees: Tree) -> Tree:
  return {key: fn(*(t[key] for t in trees)) for key in trees[0]}


def tree_copy(tree: Tree) -> Tree:
  return {key: np.array(value, copy=True) for key, value in tree.items()}


def _zeros(params: Tree) -> Tree:
  return tree_map(np.zeros_like, params)


class SGD:
  """optax.sgd(lr, momentum): trace = g + momentum * trace; u = -lr * trace."""

  def __init__(self, lr: float, momentum: float = 0.0):
    self.lr, self.momentum = lr, momentum

  def init(self, params: Tree) -> Dict[str, Any]:
    return {"trace": _zeros(params)} if self.momentum else {}

  def update(self, grads, state, params):
    del params
    if not self.momentum:
      return tree_map(lambda g: -self.lr * g, grads), state
    trace = tree_map(lambda g, t: g + self.momentum * t, grads, state["trace"])
    return tree_map(lambda t: -self.lr * t, trace), {"trace": trace}


class Adam:
  """optax.adam / optax.adamw (decoupled weight decay, added before -lr)."""

  def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 0.0):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.weight_decay = weight_decay

  def init(self, params: Tree) -> Dict[str, Any]:
    return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

  def _moments(self, grads, state):
    mu = tree_map(lambda g, m: (1 - self.b1) * g + self.b1 * m,
                  grads, state["mu"])
    nu = tree_map(lambda g, v: (1 - self.b2) * g * g + self.b2 * v,
                  grads, state["nu"])
    count = state["count"] + 1
    mu_hat = tree_map(lambda m: m / (1 - self.b1**count), mu)
    nu_hat = tree_map(lambda v: v / (1 - self.b2**count), nu)
    return count, mu, nu, mu_hat, nu_hat

  def _direction(self, count, mu_hat, nu_hat):
    del count
    return tree_map(lambda m, v: m / (np.sqrt(v) + self.eps), mu_hat, nu_hat)

  def update(self, grads, state, params):
    count, mu, nu, mu_hat, nu_hat = self._moments(grads, state)
    direction = self._direction(count, mu_hat, nu_hat)
    if self.weight_decay:
      direction = tree_map(lambda d, p: d + self.weight_decay * p,
                           direction, params)
    updates = tree_map(lambda d: -self.lr * d, direction)
    return updates, {"count": count, "mu": mu, "nu": nu}


class RAdam(Adam):
  """optax.radam: the rectified step when rho_t >= threshold, else mu_hat."""

  def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, threshold: float = 5.0):
    super().__init__(lr, b1, b2, eps)
    self.threshold = threshold

  def _direction(self, count, mu_hat, nu_hat):
    rho_inf = 2 / (1 - self.b2) - 1
    b2t = self.b2**count
    rho = rho_inf - 2 * count * b2t / (1 - b2t)
    if rho < self.threshold:
      return tree_copy(mu_hat)
    r = math.sqrt((rho - 4) * (rho - 2) * rho_inf
                  / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return tree_map(lambda m, v: r * m / (np.sqrt(v) + self.eps),
                    mu_hat, nu_hat)


class ClipByGlobalNorm:
  """optax.chain(optax.clip_by_global_norm(max_norm), inner)."""

  def __init__(self, max_norm: float, inner: Any):
    self.max_norm, self.inner = max_norm, inner

  def init(self, params: Tree) -> Dict[str, Any]:
    return self.inner.init(params)

  def update(self, grads, state, params):
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    if norm >= self.max_norm:
      grads = tree_map(lambda g: g / norm * self.max_norm, grads)
    return self.inner.update(grads, state, params)


def _param_shaped(state: Dict[str, Any]) -> List[str]:
  return [key for key in state if key != "count"]


def run_lookahead(
    inner: Any,
    params0: Tree,
    grad_fn: Callable[[int, Tree], Tree],
    sync_period: int,
    slow_step_size: Union[float, Callable[[int], float]],
    num_steps: int,
    inner_state: str = "keep",
) -> Tuple[List[Tree], List[Tree], List[Dict[str, Any]]]:
  """Lookahead (Zhang et al. 2019, Algorithm 1) as two nested loops.

  Args:
    inner: a reference inner optimizer (e.g. `Adam(1e-2)`).
    params0: the initial params theta_0.
    grad_fn: ``grad_fn(t, fast)``, the gradient used at step t (0-based).
    sync_period: k.
    slow_step_size: alpha, or a function of the 0-based cycle number.
    num_steps: the number of inner steps to run (the last cycle may be cut
      short, then it ends without a sync).
    inner_state: "keep", "reset" (moments back to zero, count kept) or
      "pullback" (moments <- c + alpha * (m - c), c their value at the last
      sync, as in the paper authors' PyTorch code).

  Returns:
    (fast, slow, states): after every step t, the params the model holds
    (the fast weights, equal to the slow weights after a sync), the slow
    weights, and the inner state.
  """
  slow = tree_copy(params0)
  fast = tree_copy(params0)
  state = inner.init(fast)
  synced = {key: tree_copy(state[key]) for key in _param_shaped(state)}
  fast_hist, slow_hist, state_hist = [], [], []
  step = 0
  cycle = 0
  while step < num_steps:
    # k steps forward ...
    for i in range(sync_period):
      grads = grad_fn(step, fast)
      updates, state = inner.update(grads, state, fast)
      fast = tree_map(lambda p, u: p + u, fast, updates)
      step += 1
      if i == sync_period - 1:
        # ... one step back.
        alpha = (slow_step_size(cycle) if callable(slow_step_size)
                 else slow_step_size)
        slow = tree_map(lambda s, f: s + alpha * (f - s), slow, fast)
        fast = tree_copy(slow)
        if inner_state == "reset":
          for key in _param_shaped(state):
            state[key] = _zeros(state[key])
        elif inner_state == "pullback":
          for key in _param_shaped(state):
            state[key] = tree_map(lambda c, m: c + alpha * (m - c),
                                  synced[key], state[key])
            synced[key] = tree_copy(state[key])
        cycle += 1
      fast_hist.append(tree_copy(fast))
      slow_hist.append(tree_copy(slow))
      state_hist.append({key: (tree_copy(value) if isinstance(value, dict)
                               else value) for key, value in state.items()})
      if step == num_steps:
        break
  return fast_hist, slow_hist, state_hist


def run_ranger(
    params0: Tree,
    grad_fn: Callable[[int, Tree], Tree],
    num_steps: int,
    lr: float = 1e-3,
    alpha: float = 0.5,
    k: int = 6,
    betas: Tuple[float, float] = (0.95, 0.999),
    eps: float = 1e-5,
    weight_decay: float = 0.0,
    use_gc: bool = False,
    n_sma_threshold: float = 5.0,
) -> Tuple[List[Tree], List[Tree]]:
  """Ranger 20.4.11 (lessw2020), per parameter, in float64.

  Returns:
    (params, slow): the params and the slow weights after every step.
  """
  b1, b2 = betas
  params = tree_copy(params0)
  slow = tree_copy(params0)
  exp_avg, exp_avg_sq = _zeros(params), _zeros(params)
  params_hist, slow_hist = [], []
  for t in range(num_steps):
    grads = grad_fn(t, params)
    step = t + 1
    for key in params:
      p, g = params[key], grads[key]
      if use_gc and g.ndim > 1:
        g = g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)
      exp_avg_sq[key] = b2 * exp_avg_sq[key] + (1 - b2) * g * g
      exp_avg[key] = b1 * exp_avg[key] + (1 - b1) * g
      m, v = exp_avg[key], exp_avg_sq[key]
      b2t = b2**step
      n_sma_max = 2 / (1 - b2) - 1
      n_sma = n_sma_max - 2 * step * b2t / (1 - b2t)
      if n_sma > n_sma_threshold:
        step_size = math.sqrt(
            (1 - b2t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
            * n_sma_max / (n_sma_max - 2)) / (1 - b1**step)
      else:
        step_size = 1.0 / (1 - b1**step)
      if weight_decay:
        p = p - weight_decay * lr * p
      if n_sma > n_sma_threshold:
        p = p - step_size * lr * m / (np.sqrt(v) + eps)
      else:
        p = p - step_size * lr * m
      if step % k == 0:
        slow[key] = slow[key] + alpha * (p - slow[key])
        p = np.array(slow[key], copy=True)
      params[key] = p
    params_hist.append(tree_copy(params))
    slow_hist.append(tree_copy(slow))
  return params_hist, slow_hist


def streaming_sync_slots(num_fragments: int, sync_period: int) -> List[int]:
  """Streaming DiLoCo: `t % sync_period` at fragment f's sync, per f."""
  return [((f + 1) * sync_period // num_fragments) % sync_period
          for f in range(num_fragments)]


def run_streaming_diloco(
    inner: Any,
    params0: Tree,
    grad_fn: Callable[[int, int, Tree], Tree],
    replicas: int,
    sync_period: int,
    fragment_of: Dict[str, int],
    num_steps: int,
    outer_lr: float,
    outer_momentum: float,
    overlap: bool = False,
    mix: float = 0.0,
    alpha: Union[float, Callable[[int], float], None] = None,
) -> Dict[str, Any]:
  """Streaming DiLoCo (Douillard et al. 2025) over simulated replicas.

  Every replica runs `inner` on its own gradients `grad_fn(t, replica,
  params)` with its own state. Fragment f (the keys with `fragment_of[key]
  == f`) syncs after the 1-based step t when `t % sync_period` is its slot
  (`streaming_sync_slots`): the replicas' pseudo-gradients `slow - source`
  of its keys are averaged (source: the fast weights after step t, or with
  `overlap` the params entering step t), the fragment's own Nesterov
  momentum `b <- mu b + d; slow <- slow - lr (mu b + d)` moves (or with
  `alpha`, the interpolation `slow <- slow - alpha d`; a callable `alpha`
  gets the number of that fragment's syncs before this one), and every
  replica's params of those keys become `mix * fast + (1 - mix) * slow`.

  Returns:
    A dict: `params` (a list per replica), `slow`, `momentum` (per key),
    `slow_history` (the slow weights after every step) and `syncs` (the
    list of (t, f) syncs done).
  """
  num = max(fragment_of.values()) + 1
  slots = streaming_sync_slots(num, sync_period)
  params = [tree_copy(params0) for _ in range(replicas)]
  states = [inner.init(params0) for _ in range(replicas)]
  slow = tree_copy(params0)
  momentum = _zeros(params0)
  slow_history, syncs, counts = [], [], [0] * num
  for t in range(1, num_steps + 1):
    entering = [tree_copy(p) for p in params]
    for r in range(replicas):
      updates, states[r] = inner.update(grad_fn(t - 1, r, params[r]),
                                        states[r], params[r])
      params[r] = tree_map(lambda p, u: p + u, params[r], updates)
    for f in range(num):
      if t % sync_period != slots[f]:
        continue
      syncs.append((t, f))
      source = entering if overlap else params
      for key in [k for k in params0 if fragment_of[k] == f]:
        d = np.mean([slow[key] - s[key] for s in source], axis=0)
        if alpha is None:
          momentum[key] = outer_momentum * momentum[key] + d
          slow[key] = slow[key] - outer_lr * (outer_momentum * momentum[key]
                                              + d)
        else:
          a = alpha(counts[f]) if callable(alpha) else alpha
          slow[key] = slow[key] - a * d
        for p in params:
          p[key] = mix * p[key] + (1 - mix) * slow[key]
      counts[f] += 1
    slow_history.append(tree_copy(slow))
  return dict(params=params, slow=slow, momentum=momentum,
              slow_history=slow_history, syncs=syncs)


# The wire formats of the compressed means (`lo.replica_mean`, DiLoCo's
# `communication_dtype`), for finite values: a float32 scale per block of
# WIRE_BLOCK values, `max |x|` over the largest finite code.
WIRE_BLOCK = 256
WIRE_LIMITS = {"float8_e4m3fn": 416.0, "int8": 126.0, "int4": 6.0}


def wire_round_trip(x: np.ndarray, fmt: str) -> np.ndarray:
  """What a block (last axis) of finite float32 values decodes to."""
  x = np.asarray(x, np.float32)
  if fmt == "bfloat16":
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)
  limit = np.float32(WIRE_LIMITS[fmt])
  scale = np.max(np.abs(x), axis=-1, keepdims=True) / limit
  scale = np.where(scale > 0, scale, np.float32(1.0))
  y = np.clip(x / scale, -limit, limit)
  if fmt == "float8_e4m3fn":
    y = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  else:
    y = np.round(y)  # to nearest, ties to even
  return y * scale


def compressed_mean(vectors: List[np.ndarray], fmt: str
                    ) -> Tuple[np.ndarray, List[np.ndarray]]:
  """The two-stage compressed mean of one float32 vector per replica.

  Each of the M replicas pads its vector to whole `M * WIRE_BLOCK` chunks
  and encodes it; replica j sums shard j of every replica's decoded vector
  (in replica order, float32), divides by M, and encodes that shard of the
  mean, which every replica decodes. Returns the mean and, per replica,
  what its encodings dropped: of its own vector, plus M times what the
  encoding of its shard of the mean dropped (error feedback's residual).
  """
  m, n = len(vectors), len(vectors[0])
  chunk = m * WIRE_BLOCK
  padded = -(-n // chunk) * chunk
  blocks = [np.pad(np.asarray(v, np.float32), (0, padded - n)).reshape(
      m, -1, WIRE_BLOCK) for v in vectors]
  sent = [wire_round_trip(b, fmt) for b in blocks]
  dropped = [b - s for b, s in zip(blocks, sent)]
  shards = []
  for j in range(m):
    total = sent[0][j]
    for r in range(1, m):
      total = total + sent[r][j]
    shard = total / np.float32(m)
    shards.append(wire_round_trip(shard, fmt))
    dropped[j][j] += np.float32(m) * (shard - shards[-1])
  return (np.stack(shards).reshape(-1)[:n],
          [d.reshape(-1)[:n] for d in dropped])
