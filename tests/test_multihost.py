"""Multi-controller training: 2 processes on localhost, one global mesh.

JAX's multi-controller runtime (`jax.distributed`) is the distributed engine:
each process runs the same program on its own devices, and XLA's collectives
(gloo on CPU) move data between processes. The processes here talk over the
loopback interface only, and are killed if they run past a time limit.
"""

import importlib.util
import pathlib

import jax
from jax.sharding import AxisType
import numpy as np
import pytest

from tests import _multiprocess

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "multihost_worker.py"
NUM_PROCESSES = _multiprocess.NUM_PROCESSES
DEVICES_PER_PROCESS = _multiprocess.DEVICES_PER_PROCESS


def _load_worker():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def multihost_results(tmp_path_factory):
  return _multiprocess.run_workers(
      WORKER, tmp_path_factory.mktemp("multihost"))


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
