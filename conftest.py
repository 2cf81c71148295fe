"""Test configuration shared by the test suite and the doctests.

JAX reads XLA_FLAGS when its CPU backend starts, so the settings below are made
here, before any test imports JAX, once in the process that pytest starts; the
pytest-xdist workers it spawns inherit them.

- 8 host devices, for the multi-device tests.
- XLA:CPU's classic elemental emitters (`--xla_cpu_use_fusion_emitters=false`),
  which compile the suite's several thousand small programs in half the time of
  the default MLIR fusion emitters. They run the same HLO: every promise the
  tests check (bitwise equality within one program, ulps against references)
  holds under either. `.ci/run` runs the fast tests once more with XLA's
  defaults (`LOOKAHEAD_TEST_XLA_DEFAULTS=1` does that here). The flag is only
  set where a probe compiles the float8 conversions with it: XLA aborts on a
  flag its jaxlib does not know, and the classic emitters cannot convert
  float8 for an ISA without AVX (`--xla_cpu_max_isa=SSE4_2`), where the
  default emitters can.
- A compilation cache in a temporary directory of this run
  (`JAX_COMPILATION_CACHE_DIR`), so that a program that both xdist workers (or a
  test's subprocesses) build is compiled once. It starts empty and is removed
  at the end: nothing is reused between runs.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
_CONFIGURED = "LOOKAHEAD_TEST_CONFIGURED"  # set once, seen by the workers


def _with_flag(flag):
  """XLA_FLAGS with `flag` added, unless they already set its name."""
  flags = os.environ.get("XLA_FLAGS", "")
  if flag.split("=")[0] in flags:
    return flags
  return (flags + " " + flag).strip()


_PROBE = """
import jax, jax.numpy as jnp
x = jnp.linspace(-2.0, 2.0, 8)
for dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16):
  jax.jit(lambda x: x.astype(dtype).astype(jnp.float32))(x).block_until_ready()
"""


def classic_emitters_work():
  """Whether XLA starts with the classic emitters and compiles float8 there."""
  env = dict(os.environ, XLA_FLAGS=_with_flag(_FAST_COMPILE_FLAG),
             JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  probe = subprocess.run([sys.executable, "-c", _PROBE], env=env,
                         capture_output=True, check=False)
  return probe.returncode == 0


def _configure_once():
  os.environ[_CONFIGURED] = "1"
  os.environ["XLA_FLAGS"] = _with_flag(_DEVICES_FLAG)
  if (not os.environ.get("LOOKAHEAD_TEST_XLA_DEFAULTS")
      and classic_emitters_work()):
    os.environ["XLA_FLAGS"] = _with_flag(_FAST_COMPILE_FLAG)
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.mkdtemp(prefix="lookahead-optax-jax-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


if not os.environ.get(_CONFIGURED):
  _configure_once()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A mkdocs build extension, not library code (needs griffe from the docs extra).
collect_ignore = ["docs/griffe_doctest_examples.py"]

# Opt-in: compiles and CPU time per test (tests/_compile_counter.py).
if os.environ.get("LOOKAHEAD_COUNT_COMPILES"):
  pytest_plugins = ["tests._compile_counter"]
