"""Launching a worker script as several JAX processes on localhost.

Used by the multi-controller tests (`jax.distributed` over 127.0.0.1, gloo on
CPU): each process gets its own CPU devices, the processes talk over the
loopback interface only, and are killed if they run past a time limit.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 120
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(worker: pathlib.Path, out_dir: pathlib.Path) -> tuple:
  """Runs `worker` as the processes; returns (return codes, logs)."""
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  procs, logs = [], []
  try:
    for pid in range(NUM_PROCESSES):
      log = open(out_dir / f"log_{pid}.txt", "w+")  # pylint: disable=consider-using-with
      logs.append(log)
      procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, str(worker),
           "--coordinator", f"127.0.0.1:{port}", "--bind-loopback",
           "--num-processes", str(NUM_PROCESSES), "--process-id", str(pid),
           "--local-cpu-devices", str(DEVICES_PER_PROCESS),
           "--out", str(out_dir)],
          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)))
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


def run_workers(worker: pathlib.Path, out_dir: pathlib.Path) -> list:
  """Runs `worker` as `NUM_PROCESSES` processes; each one's `process_<i>.npz`.

  Retries once if the free port was taken meanwhile; fails the test with the
  end of every process's log otherwise.
  """
  codes, logs = _launch(worker, out_dir)
  if codes != [0] * NUM_PROCESSES and any(
      "address already in use" in t.lower() for t in logs):
    codes, logs = _launch(worker, out_dir)
  report = "\n".join(f"--- process {i} (exit {c}):\n{t[-3000:]}"
                     for i, (c, t) in enumerate(zip(codes, logs)))
  assert codes == [0] * NUM_PROCESSES, report
  return [dict(np.load(out_dir / f"process_{i}.npz"))
          for i in range(NUM_PROCESSES)]
