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
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed: the figures go to files
# The scripts take pyplot from here (`from _common import plt`), after the
# backend is set.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  p.add_argument("--out", default="docs/img", help=f"directory for {figure}")
  return p


def progress(total, desc):
  """A tqdm bar, or a printed progress line when tqdm is not installed.

  Args:
    total: the number of steps to count to.
    desc: the label in front of the count.

  Returns:
    An object with `update(k=1)` (k more steps done) and `close()`.
  """
  if tqdm is not None:
    return tqdm(total=total, desc=desc, leave=False)

  class Line:
    n = 0

    def update(self, k=1):
      before, self.n = self.n, self.n + k
      every = max(1, total // 10)  # print about ten times in all
      if self.n == total or before // every != self.n // every:
        print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr,
              flush=True)

    def close(self):
      print(file=sys.stderr)

  return Line()


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
  """The running mean of `x` over `n` values (fewer when `x` is shorter)."""
  n = min(n, len(x))
  return np.convolve(x, np.ones(n) / n, mode="valid")


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
