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


def test_readme_examples_run_and_usage_converges():
  namespace = {}
  for block in _python_blocks():  # In order, as a reader would paste them.
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  # 20 steps: the fast params approach the target 1.0, and after the sync on
  # step 20 they equal the slow weights exactly.
  params, eval_params = namespace["params"], namespace["eval_params"]
  np.testing.assert_array_equal(params["w"], eval_params["w"])
  assert float(jnp.max(jnp.abs(params["w"] - 1.0))) < 0.5
  assert namespace["state"].step == 20


def test_readme_lazy_example_builds_a_working_optimizer():
  namespace = {}
  for block in _python_blocks():
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  tx = namespace["tx"]
  params = {"embed": jnp.ones((4, 2)), "dense": jnp.ones((2, 2))}
  state = tx.init(params)
  grads = {"embed": jnp.zeros((4, 2)).at[1].set(1.0), "dense": jnp.ones((2, 2))}
  updates, _ = tx.update(grads, state, params)
  # Only row 1 of the table moves; the dense leaf moves everywhere.
  moved_rows = np.any(np.asarray(updates["embed"]) != 0, axis=1)
  np.testing.assert_array_equal(moved_rows, [False, True, False, False])
  assert np.all(np.asarray(updates["dense"]) != 0)
