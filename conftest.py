"""Test configuration shared by the test suite and the doctests.

JAX reads XLA_FLAGS when its CPU backend starts, so the 8 host devices used by
the multi-device tests are requested here, before any test imports JAX.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A mkdocs build extension, not library code (needs griffe from the docs extra).
collect_ignore = ["docs/griffe_doctest_examples.py"]

# Opt-in: compiles and CPU time per test (tests/_compile_counter.py).
if os.environ.get("LOOKAHEAD_COUNT_COMPILES"):
  pytest_plugins = ["tests._compile_counter"]
