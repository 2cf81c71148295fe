"""The README's Python example runs as written."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_example():
  assert len(_python_blocks()) >= 1


def test_readme_usage_example_runs_and_converges():
  namespace = {}
  exec(compile(_python_blocks()[0], str(README), "exec"), namespace)  # pylint: disable=exec-used
  # 20 steps: the fast params approach the target 1.0, and after the sync on
  # step 20 they equal the slow weights exactly.
  params, eval_params = namespace["params"], namespace["eval_params"]
  np.testing.assert_array_equal(params["w"], eval_params["w"])
  assert float(jnp.max(jnp.abs(params["w"] - 1.0))) < 0.5
  assert namespace["state"].step == 20
