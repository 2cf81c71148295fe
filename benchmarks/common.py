"""Timing, memory and size helpers shared by the benchmarks.

Timings on a shared machine are noisy, so every benchmark here follows the same
protocol:

* each variant is a jitted function ``step(params, state, grads) -> (params,
  state)``, compiled and warmed up before any timing;
* a *block* is ``steps_per_block`` consecutive calls (a multiple of the sync
  period, so each block holds the same number of syncs) followed by
  `jax.block_until_ready`; its time divided by the number of steps is the
  amortised step time;
* the variants are timed round-robin, one block each per round, for several
  rounds (the order rotates each round), so load spikes hit all variants alike;
* the reported time is the median over rounds, and a ratio to a baseline is
  the median of the per-round ratios (paired within a round).
"""

import dataclasses
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

MB = 1 << 20


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of `tree`."""
  return sum(
      int(np.prod(jnp.shape(x))) * jnp.result_type(x).itemsize
      for x in jax.tree.leaves(tree)
  )


def tree_size(tree: Any) -> int:
  """Total number of elements of the array leaves of `tree`."""
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(tree))


def _normal(rng: np.random.Generator, shape: tuple) -> jax.Array:
  # NumPy, not jax.random: no compilation per shape.
  return jnp.asarray(0.02 * rng.standard_normal(shape, dtype=np.float32))


def one_leaf_params(n: int, seed: int = 0) -> dict:
  """Float32 params with `n` elements in a single leaf."""
  return {"w": _normal(np.random.default_rng(seed), (n,))}


def _transformer_shapes(d: int, layers: int = 12, vocab: int = 8192,
                        seq: int = 512) -> dict:
  """Leaf shapes of a GPT-like decoder of width `d` (12 leaves per layer)."""
  shapes = {"embed": (vocab, d), "pos_embed": (seq, d)}
  for i in range(layers):
    shapes[f"layer_{i:02d}"] = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "attn": {"qkv": {"kernel": (d, 3 * d), "bias": (3 * d,)},
                 "out": {"kernel": (d, d), "bias": (d,)}},
        "ln2": {"scale": (d,), "bias": (d,)},
        "mlp": {"fc1": {"kernel": (d, 4 * d), "bias": (4 * d,)},
                "fc2": {"kernel": (4 * d, d), "bias": (d,)}},
    }
  shapes["ln_f"] = {"scale": (d,), "bias": (d,)}
  return shapes


def _count(shapes: Any) -> int:
  return sum(int(np.prod(s)) for s in
             jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


@functools.lru_cache(maxsize=None)
def transformer_width(n: int, layers: int = 12) -> int:
  """The width (a multiple of 8) whose `_transformer_shapes` is closest to n."""
  return min(range(8, 4096, 8),
             key=lambda d: abs(_count(_transformer_shapes(d, layers)) - n))


def transformer_params(n: int, seed: int = 0, layers: int = 12) -> dict:
  """A transformer-like float32 params tree of about `n` params.

  12 leaves per layer plus 4 (148 leaves with the default 12 layers).
  """
  shapes = _transformer_shapes(transformer_width(n, layers), layers)
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [_normal(rng, s) for s in leaves])


def make_params(layout: str, n: int, seed: int = 0, layers: int = 12) -> dict:
  """Params of about `n` float32 elements: "leaf" (one array) or "tree"."""
  if layout == "leaf":
    return one_leaf_params(n, seed)
  if layout == "tree":
    return transformer_params(n, seed, layers)
  raise ValueError(f"`layout` must be 'leaf' or 'tree', got {layout!r}.")


def fresh_copy(tree: Any) -> Any:
  """A copy of `tree` in new buffers (inputs that will be donated)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def optimizer_step(tx: optax.GradientTransformation) -> Callable:
  """``step(params, state, grads) -> (params, state)``: update and apply."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@dataclasses.dataclass
class Variant:
  """One timed configuration.

  Attributes:
    name: label in the tables.
    fn: the un-jitted ``step(params, state, grads) -> (params, state)``.
    init: ``() -> (params, state, grads)``, fresh buffers.
    donate: whether params and state are donated to the jitted step.
    compiler_options: XLA options for this step's compilation, or None.
  """

  name: str
  fn: Callable
  init: Callable[[], tuple]
  donate: bool = True
  compiler_options: Optional[dict] = None
  # Filled by `prepare`.
  jitted: Any = None
  carry: Any = None
  grads: Any = None
  memory: Optional[dict] = None
  state_bytes: Optional[int] = None
  param_bytes: Optional[int] = None
  faults: list = dataclasses.field(default_factory=list)

  def prepare(self, warmup_steps: int) -> None:
    params, state, grads = self.init()
    self.param_bytes = tree_bytes(params)
    self.state_bytes = tree_bytes(state)
    self.jitted = jax.jit(
        self.fn, donate_argnums=(0, 1) if self.donate else (),
        compiler_options=self.compiler_options)
    compiled = self.jitted.lower(params, state, grads).compile()
    self.memory = memory_of(compiled)
    self.grads = grads
    for _ in range(warmup_steps):
      params, state = self.jitted(params, state, grads)
    jax.block_until_ready((params, state))
    self.carry = (params, state)

  def run_block(self, steps: int) -> float:
    """Seconds per step over `steps` consecutive steps."""
    params, state = self.carry
    self.carry = None
    f, grads = self.jitted, self.grads
    faults0 = minor_faults()
    t0 = time.perf_counter()
    for _ in range(steps):
      params, state = f(params, state, grads)
    jax.block_until_ready((params, state))
    dt = time.perf_counter() - t0
    if faults0 is not None:
      self.faults.append((minor_faults() - faults0) / steps)
    self.carry = (params, state)
    return dt / steps

  def release(self) -> None:
    self.carry = self.grads = self.jitted = None


# glibc's allocator told to keep the memory it frees for reuse: one arena,
# no mmap'd blocks, no trimming. Then a step's temporaries reuse pages that
# are already mapped instead of faulting in fresh ones at every call.
KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                     "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def keep_freed_memory_note() -> str:
  return ", ".join(f"`{k}={v}`" for k, v in KEEP_FREED_MEMORY.items())


def run_with_freed_memory_kept(code: str) -> Any:
  """Runs `code` (which prints one JSON line last) with `KEEP_FREED_MEMORY`.

  In a child process, since glibc reads these variables at start-up.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root,
                       env=dict(os.environ, **KEEP_FREED_MEMORY),
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def minor_faults() -> Optional[int]:
  """This process's minor page faults so far (None where not reported).

  A step whose compiled temporaries exceed what the C allocator keeps for
  reuse gets fresh memory at every call, and pays a page fault for each
  4 KiB page it first touches; the count tells those steps apart.
  """
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not on Windows
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def memory_of(compiled: Any) -> dict:
  """Temp, output, argument and alias bytes of a compiled function."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {}
  return {
      "temp": int(m.temp_size_in_bytes),
      "output": int(m.output_size_in_bytes),
      "argument": int(m.argument_size_in_bytes),
      "alias": int(m.alias_size_in_bytes),
  }


@dataclasses.dataclass
class Timing:
  name: str
  median_s: float
  times_s: list
  ratio: Optional[float]  # median of per-round ratios to the baseline
  memory: dict
  state_bytes: int
  param_bytes: int
  faults_per_step: Optional[float] = None  # median over the timed blocks


def interleaved(
    variants: Sequence[Variant],
    *,
    rounds: int,
    steps_per_block: int,
    warmup_steps: int,
    baseline: Optional[str] = None,
    min_block_s: float = 0.0,
) -> list:
  """Times `variants` round-robin; returns a `Timing` per variant.

  All variants are compiled and warmed up first and keep their buffers for the
  whole run, so memory use is the sum of the variants' footprints.

  Args:
    variants: the configurations.
    rounds: number of rounds; each round times one block of each variant.
    steps_per_block: steps per block (use a multiple of the sync period).
    warmup_steps: untimed steps after compiling.
    baseline: name of the variant the ratios are taken to.
    min_block_s: blocks are repeated (whole blocks, so syncs stay amortised)
      until a block lasts at least this long.

  Returns:
    A list of `Timing`, in the order of `variants`.
  """
  for v in variants:
    v.prepare(warmup_steps)
  # Calibrate: whole blocks per timing so that the slowest variant's timing
  # lasts >= min_block_s.
  probe = max(v.run_block(steps_per_block) for v in variants)
  reps = max(1, int(np.ceil(min_block_s / max(probe * steps_per_block, 1e-9))))
  steps = steps_per_block * reps
  for v in variants:
    v.faults = []  # the timed blocks only
  times = {v.name: [] for v in variants}
  order = list(variants)
  for r in range(rounds):
    rot = order[r % len(order):] + order[:r % len(order)]
    for v in rot:
      times[v.name].append(v.run_block(steps))
  out = []
  for v in variants:
    ratio = None
    if baseline is not None:
      ratio = statistics.median(
          a / b for a, b in zip(times[v.name], times[baseline]))
    out.append(Timing(
        name=v.name, median_s=statistics.median(times[v.name]),
        times_s=times[v.name], ratio=ratio, memory=v.memory or {},
        state_bytes=v.state_bytes or 0, param_bytes=v.param_bytes or 0,
        faults_per_step=statistics.median(v.faults) if v.faults else None))
  for v in variants:
    v.release()
  gc.collect()
  return out


def machine_line() -> str:
  """One line for a standalone benchmark's output: machine, versions, flags."""
  info = machine_info()
  return (f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}, "
          f"optax {info['optax']}, load {info['load']}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def machine_info() -> dict:
  """A short description of the machine and the library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  try:
    import flax  # pylint: disable=g-import-not-at-top
    flax_version = flax.__version__
  except ImportError:
    flax_version = "-"
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem = float("nan")
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True, timeout=5, check=False).stdout.strip() or "-"
  except (OSError, subprocess.SubprocessError):
    commit = "-"
  return {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "memory_gib": round(mem, 1),
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax_version,
      "python": platform.python_version(),
      "load": load,
      "commit": commit,
      "date": time.strftime("%Y-%m-%d %H:%M %Z"),
  }


def fmt_ms(seconds: float) -> str:
  ms = seconds * 1e3
  if ms >= 100:
    return f"{ms:.0f}"
  if ms >= 10:
    return f"{ms:.1f}"
  if ms >= 1:
    return f"{ms:.2f}"
  return f"{ms:.3f}"


def fmt_faults(per_step: Optional[float]) -> str:
  """Page faults per step ("-" where not counted)."""
  return "-" if per_step is None else f"{per_step:,.0f}"


def fmt_mb(nbytes: Optional[int]) -> str:
  if nbytes is None:
    return "-"
  return f"{nbytes / MB:.1f}"


def fmt_params(n: int) -> str:
  if n >= 1_000_000:
    return f"{n / 1e6:.1f}M"
  if n >= 1_000:
    return f"{n / 1e3:.0f}k"
  return str(n)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
