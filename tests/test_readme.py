"""The README's Python example runs; its Quickstart is what CI runs."""

import importlib.util
import os
import pathlib
import re
import tomllib

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# The README's Quickstart and the packaging metadata that CI (.ci/run) checks.

ROOT = README.parent


def _ci_module(name):
  """A helper script of .ci/ (not a package), loaded as a module."""
  spec = importlib.util.spec_from_file_location(
      name, ROOT / ".ci" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pyproject():
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]


def test_quickstart_has_the_two_commands_ci_runs():
  commands = _ci_module("readme_commands").quickstart_commands(
      README.read_text())
  assert len(commands) == 2
  demo, tests = commands
  assert demo.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
  assert 'pip install -e ".[examples]"' in demo
  assert demo.endswith("python examples/quickstart.py")
  assert 'pip install -e ".[test]"' in tests
  assert tests.endswith("&& python -m pytest -n auto")
  extras = _pyproject()["optional-dependencies"]
  assert {"examples", "test", "docs"} <= set(extras)


def test_quickstart_block_errors_are_loud():
  module = _ci_module("readme_commands")
  with pytest.raises(SystemExit, match="no '## Quickstart' section"):
    module.quickstart_commands("# x\n\n## Usage\n")
  with pytest.raises(SystemExit, match="no ```bash block"):
    module.quickstart_commands(
        "## Quickstart\n\ntext\n\n## Next\n```bash\nls\n```\n")
  with pytest.raises(SystemExit, match="has 1 commands, expected 2"):
    module.quickstart_commands("## Quickstart\n```bash\n# one\nls\n```\n")


def test_readme_python_version_is_requires_python():
  quickstart = README.read_text().split("## Quickstart", 1)[1]
  version = re.search(r"Python >= (3\.\d+)", quickstart).group(1)
  assert _pyproject()["requires-python"] == f">={version}"


def test_every_requirement_has_a_floor_ci_installs(tmp_path):
  module = _ci_module("pins")
  extras = sorted(_pyproject()["optional-dependencies"])
  pins = module.pins(extras)
  names = [re.split(r"[\[=]", pin)[0] for pin in pins]
  assert {"jax", "numpy", "optax", "flax", "pytest"} <= set(names)
  assert len(names) == len(set(names))
  for pin in pins:
    assert re.fullmatch(
        r"[A-Za-z0-9._-]+(\[[a-z,]+\])?==[0-9][0-9.]*", pin), pin
  # chex is only used by the tests.
  assert "chex" not in " ".join(_pyproject()["dependencies"])
  test_extra = _pyproject()["optional-dependencies"]["test"]
  assert any(r.startswith("chex>=") for r in test_extra)


@pytest.mark.parametrize("requirements, message", [
    (["jax"], "'jax' is not of the form 'name>=X'"),
    (["jax>=0.9,<1"], "is not of the form 'name>=X'"),
    (["jax>=0.9.1", "jax>=0.8"], "jax has two floors, 0.9.1 and 0.8"),
])
def test_pins_reject_requirements_ci_cannot_pin(tmp_path, requirements,
                                               message):
  pyproject = tmp_path / "pyproject.toml"
  pyproject.write_text(
      "[project]\ndependencies = [" +
      ", ".join(f'"{r}"' for r in requirements) + "]\n")
  with pytest.raises(SystemExit, match=re.escape(message)):
    _ci_module("pins").pins((), pyproject=pyproject)


def test_pins_turn_floors_into_exact_versions(tmp_path):
  pyproject = tmp_path / "pyproject.toml"
  pyproject.write_text(
      '[project]\ndependencies = ["jax>=0.9.1", "numpy >= 2.0.0"]\n'
      '[project.optional-dependencies]\n'
      'docs = ["mkdocstrings[python]>=1.0.7", "Jax>=0.9.1"]\n')
  module = _ci_module("pins")
  assert module.pins((), pyproject=pyproject) == [
      "jax==0.9.1", "numpy==2.0.0"]
  assert module.pins(("docs",), pyproject=pyproject) == [
      "jax==0.9.1", "numpy==2.0.0", "mkdocstrings[python]==1.0.7"]
  with pytest.raises(SystemExit, match="no extra 'test'"):
    module.pins(("test",), pyproject=pyproject)


def test_the_suite_compiles_as_conftest_says():
  """8 host devices; the classic emitters where they work; a fresh cache."""
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" in flags
  classic = "--xla_cpu_use_fusion_emitters=false"
  if os.environ.get("LOOKAHEAD_TEST_XLA_DEFAULTS"):
    assert classic not in flags
  else:
    assert (classic in flags) == conftest.classic_emitters_work()
  cache = pathlib.Path(jax.config.jax_compilation_cache_dir)
  assert cache == pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  assert cache.is_dir()
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
