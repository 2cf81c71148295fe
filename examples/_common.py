"""Plumbing shared by the example scripts (not part of the library).

The scripts import it as `import _common`: `python examples/NAME.py` puts
`examples/` on `sys.path`. Everything here is the same for every example: the
command line, a progress bar, the digits data set, printing a table and saving
the figure. The models, the optimizers and everything Lookahead-specific stay
in the scripts, where they are the point of the example.

This module imports neither JAX nor anything that imports it, so that
`data_parallel.py` can parse its flags and set `XLA_FLAGS` before JAX starts.
"""

import argparse
import contextlib
import os
import re
import sys
import threading
import time

import matplotlib

matplotlib.use("Agg")  # no display needed: the figures go to files
# The docs show the figures about 700 pixels wide (a 10-inch figure at 100 dpi
# shrunk by 0.7): fonts this size stay readable there.
matplotlib.rcParams.update({
    "font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12,
    "xtick.labelsize": 11, "ytick.labelsize": 11, "legend.fontsize": 11,
    "figure.titlesize": 13, "lines.linewidth": 1.6,
})
# The scripts take pyplot from here (`from _common import plt`), after the
# backend is set.
import matplotlib.pyplot as plt  # noqa: F401  # pylint: disable=g-import-not-at-top
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

try:
  from tqdm import tqdm
except ImportError:  # tqdm is in the `examples` extra; fall back to a line.
  tqdm = None


def parser(doc, figure, steps_help, smoke_help="short run (CI)"):
  """The command line every example takes: `--smoke`, `--steps`, `--out`.

  Args:
    doc: the script's `__doc__`; its first line describes the script.
    figure: the file name of the figure that `--out` is the directory for.
    steps_help: the help of `--steps` (which defaults to None: the script
      picks its own number of steps, fewer with `--smoke`).
    smoke_help: the help of `--smoke`.

  Returns:
    An `argparse.ArgumentParser`; add the script's own flags, then parse.
  """
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help=smoke_help)
  p.add_argument("--steps", type=int, default=None, help=steps_help)
  p.add_argument(
      "--out", default=".",
      help=f"directory for {figure} (default: the current directory)")
  return p


def add_cpu_devices_flag(p, default=8):
  """`--cpu-devices`: how many CPU devices to simulate (0: the real ones)."""
  p.add_argument("--cpu-devices", type=int, default=default,
                 help="simulated CPU devices (0: use the real devices)")


def simulate_cpu_devices(count):
  """Makes JAX's CPU backend show `count` devices (nothing if 0).

  XLA reads this when its CPU backend starts: call it before the first JAX
  import.
  """
  if not count:
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={count}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


HEARTBEAT_SECONDS = 3.0  # the longest a script stays silent


def _say(message):
  print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def busy(what):
  """Says `what` is being done, and then every few seconds that it still is.

  For the steps that print nothing for a while: compiling, a whole sweep under
  one `jit`, an evaluation.

  Args:
    what: what is being done, e.g. `"compiling and running the sweep"`.

  Yields:
    Nothing; prints `what ... done (N s)` when the block ends.
  """
  start = time.time()
  _say(f"{what} ...")
  stop = threading.Event()

  def beat():
    while not stop.wait(HEARTBEAT_SECONDS):
      _say(f"  {what}: {time.time() - start:.0f} s")

  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
  _say(f"{what} ... done ({time.time() - start:.1f} s)")


class progress:  # pylint: disable=invalid-name
  """A tqdm bar (or a printed line without tqdm) that never goes quiet.

  When no step has finished for a few seconds (the first step of a run
  compiles), it says so, with the time waited, instead of standing still.

  Args:
    total: the number of steps to count to.
    desc: the label in front of the count.
  """

  def __init__(self, total, desc):
    self.total, self.desc, self.n = total, desc, 0
    self._last = self._start = time.time()
    self._lock = threading.Lock()
    self._bar = (tqdm(total=total, desc=desc, leave=False)
                 if tqdm is not None else None)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def update(self, k=1):
    """Counts `k` more steps done."""
    with self._lock:
      before, self.n = self.n, self.n + k
      self._last = time.time()
      if self._bar is not None:
        self._bar.set_postfix_str("", refresh=False)
        self._bar.update(k)
        return
      every = max(1, self.total // 10)  # print about ten times in all
      if self.n == self.total or before // every != self.n // every:
        _say(f"{self.desc}: {self.n}/{self.total} "
             f"({time.time() - self._start:.0f} s)")

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS / 3):
      with self._lock:
        idle = time.time() - self._last
        if idle < HEARTBEAT_SECONDS:
          continue
        self._last = time.time()
        note = "compiling" if self.n == 0 else "waiting for a step"
        if self._bar is not None:
          self._bar.set_postfix_str(f"{note}, {idle:.0f} s")
        else:
          _say(f"{self.desc}: {self.n}/{self.total} ({note}, {idle:.0f} s)")

  def close(self):
    """Stops the bar (call it once all steps are done)."""
    self._stop.set()
    self._thread.join()
    if self._bar is not None:
      self._bar.close()


def digits():
  """scikit-learn's 8x8 digits (ships with it, no download).

  Returns:
    `(x, y)`: 1,797 images as float32 rows of 64 pixels scaled to [0, 1], and
    their int32 labels 0-9.
  """
  data = load_digits()
  return ((data.data / 16.0).astype(np.float32),
          data.target.astype(np.int32))


def digits_split():
  """The digits split 75/25 into train and test sets (a fixed split).

  Returns:
    `(x_train, x_test, y_train, y_test)`: 1,347 train and 450 test images.
  """
  return train_test_split(*digits(), test_size=0.25, random_state=0)


def smooth(x, n=25):
  """The running mean of `x` over up to `n` values, and the steps it is at.

  Short curves (a `--smoke` run) are smoothed over fewer values, so that they
  still have points to plot.

  Args:
    x: one value per step.
    n: the largest window.

  Returns:
    `(steps, values)`: 0-based step indices (the window's last step) and the
    running means, ready for `ax.plot(*smooth(x))`.
  """
  n = max(1, min(n, len(x) // 5))
  values = np.convolve(x, np.ones(n) / n, mode="valid")
  return np.arange(n - 1, len(x)), values


def few_points_marker(n, marker="o"):
  """`{"marker": marker}` for a curve of few points (a `--smoke` run), else {}.

  Markers make a curve of a handful of points visible, where a bare line of
  one or two points would not show.
  """
  return {"marker": marker, "markersize": 4} if n < 40 else {}


def print_table(columns, rows, missing="-"):
  """Prints a plain-text table with a header line.

  Args:
    columns: `(header, spec)` pairs; `spec` is a format spec that starts with
      its alignment and width, e.g. `"<18"` or `">8.0e"`. The header is
      aligned like the column.
    rows: sequences of values, one per column; None prints `missing`.
    missing: the text of a missing value (right-aligned like the column).
  """
  def width(spec):
    align, rest = spec[0], spec[1:]
    return align + "".join(c for c in rest.split(".")[0] if c.isdigit())

  print("".join(format(str(h), width(s)) for h, s in columns))
  for row in rows:
    print("".join(format(missing, width(s)) if v is None else format(v, s)
                  for (_, s), v in zip(columns, row)))


def save_figure(fig, out, name, dpi=100, **kwargs):
  """Saves `fig` as `out/name` (creating `out`) and prints the path.

  Args:
    fig: a matplotlib figure.
    out: the directory (the script's `--out`).
    name: the file name, e.g. `"quickstart.png"`.
    dpi: the resolution.
    **kwargs: more arguments of `fig.savefig` (e.g. `bbox_inches="tight"`).
  """
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, name)
  fig.savefig(path, dpi=dpi, **kwargs)
  print(f"saved {path}")
