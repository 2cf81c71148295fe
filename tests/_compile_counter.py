"""Opt-in pytest plugin: XLA compiles and CPU time per test and per file.

`LOOKAHEAD_COUNT_COMPILES=1 python -m pytest -p no:xdist ...` prints, at the
end of the session, the files and the tests that compiled the most (backend
compiles, their seconds, and the process CPU seconds of each test, its
subprocesses included). `LOOKAHEAD_COUNT_COMPILES=path.json` also writes
every test's numbers there (one file per xdist worker: `path.json.gw0`...;
under xdist only the files have them, pytest shows no worker's summary).
Loaded by the root conftest.py only when the variable is set.
"""

import collections
import json
import os
import resource
import time

import pytest

_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration")
_now = {"compiles": 0, "compile_s": 0.0, "trace_s": 0.0}
_per_test: dict = {}


def _listener(event, duration, **_):
  if event == _EVENT:
    _now["compiles"] += 1
    _now["compile_s"] += duration
  elif event in _TRACE_EVENTS:
    _now["trace_s"] += duration


def _cpu():
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


def pytest_configure(config):  # pylint: disable=unused-argument
  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  before, cpu = dict(_now), _cpu()
  yield
  entry = {k: _now[k] - before[k] for k in _now}
  entry["cpu_s"] = _cpu() - cpu
  _per_test[item.nodeid] = entry


def _by_file():
  files = collections.defaultdict(collections.Counter)
  for nodeid, entry in _per_test.items():
    files[nodeid.split("::")[0]].update(entry)
  return files


def pytest_terminal_summary(terminalreporter):
  if not _per_test:  # an xdist controller: its workers ran the tests
    return
  path = os.environ.get("LOOKAHEAD_COUNT_COMPILES", "")
  if path not in ("", "1"):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    with open(f"{path}.{worker}" if worker else path, "w") as f:
      json.dump(_per_test, f, indent=1)
  write = terminalreporter.write_line
  row = "{:>6} {:>9.1f} {:>8.1f} {:>8.1f}  {}"
  write("")
  write("compiles  compile_s  trace_s    cpu_s  file")
  files = _by_file()
  for name, e in sorted(files.items(), key=lambda kv: -kv[1]["cpu_s"]):
    write(row.format(e["compiles"], e["compile_s"], e["trace_s"], e["cpu_s"],
                     name))
  total = sum(files.values(), collections.Counter())
  write(row.format(total["compiles"], total["compile_s"], total["trace_s"],
                   total["cpu_s"], "TOTAL"))
  write("")
  write("compiles  compile_s  trace_s    cpu_s  test (top 40 by cpu_s)")
  for nodeid, e in sorted(_per_test.items(),
                          key=lambda kv: -kv[1]["cpu_s"])[:40]:
    write(row.format(e["compiles"], e["compile_s"], e["trace_s"], e["cpu_s"],
                     nodeid))
