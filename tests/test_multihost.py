"""Multi-controller training: 2 processes on localhost, one global mesh.

JAX's multi-controller runtime (`jax.distributed`) is the distributed engine:
each process runs the same program on its own devices, and XLA's collectives
(gloo on CPU) move data between processes. The processes here talk over the
loopback interface only, and are killed if they run past a time limit.
"""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax
from jax.sharding import AxisType
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "multihost_worker.py"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 120


def _load_worker():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir):
  """Runs the worker as 2 processes; returns (return codes, logs)."""
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  procs, logs = [], []
  try:
    for pid in range(NUM_PROCESSES):
      log = open(out_dir / f"log_{pid}.txt", "w+")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER),
           "--coordinator", f"127.0.0.1:{port}", "--bind-loopback",
           "--num-processes", str(NUM_PROCESSES), "--process-id", str(pid),
           "--local-cpu-devices", str(DEVICES_PER_PROCESS),
           "--out", str(out_dir)],
          stdout=log, stderr=subprocess.STDOUT, env=env,
          cwd=str(HERE.parent)))
    codes = []
    for proc in procs:
      try:
        codes.append(proc.wait(timeout=TIMEOUT_S))
      except subprocess.TimeoutExpired:
        codes.append("timeout")
        break
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    texts = []
    for log in logs:
      log.seek(0)
      texts.append(log.read())
      log.close()
  return codes, texts


@pytest.fixture(scope="module")
def multihost_results(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("multihost")
  codes, logs = _launch(out_dir)
  if codes != [0] * NUM_PROCESSES and any(
      "address already in use" in t.lower() for t in logs):
    codes, logs = _launch(out_dir)  # the free port was taken meanwhile
  report = "\n".join(f"--- process {i} (exit {c}):\n{t[-3000:]}"
                     for i, (c, t) in enumerate(zip(codes, logs)))
  assert codes == [0] * NUM_PROCESSES, report
  return [dict(np.load(out_dir / f"process_{i}.npz"))
          for i in range(NUM_PROCESSES)]


def test_two_processes_form_one_global_mesh(multihost_results):
  for i, result in enumerate(multihost_results):
    assert int(result["process_count"]) == NUM_PROCESSES
    assert int(result["device_count"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert int(result["local_device_count"]) == DEVICES_PER_PROCESS
    assert int(result["step"]) == 7, i


def test_processes_agree_bitwise(multihost_results):
  first, second = multihost_results
  assert sorted(first) == sorted(second)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_matches_single_process_run(multihost_results):
  if jax.device_count() < NUM_PROCESSES * DEVICES_PER_PROCESS:
    pytest.skip("needs 8 devices in the test process (see conftest.py)")
  worker = _load_worker()
  mesh = jax.make_mesh((NUM_PROCESSES * DEVICES_PER_PROCESS,), ("data",),
                       axis_types=(AxisType.Auto,))
  params, slow, step = worker.train(mesh)
  assert step == 7
  result = multihost_results[0]
  for name in params:
    np.testing.assert_allclose(
        result[f"params/{name}"], params[name], rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        result[f"slow/{name}"], slow[name], rtol=0, atol=1e-6)
  # 7 = 2 * 3 + 1: the params took one step from the slow weights.
  assert not np.array_equal(result["params/w1"], result["slow/w1"])
  # Training moved the weights.
  rng = np.random.default_rng(1)
  w1_0 = (rng.normal(size=(16, 32)) / 4.0).astype(np.float32)
  assert np.max(np.abs(result["params/w1"] - w1_0)) > 0.05
