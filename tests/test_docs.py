"""The code in the documentation runs.

Each page's ```python blocks run in order in one namespace, as a reader would
paste them. Blocks written as doctests (``>>>``) are run by pytest's doctest
collection instead (`--doctest-glob` in pyproject.toml).
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _blocks(page):
  blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
  return [b for b in blocks if not b.lstrip().startswith(">>>")]


def test_there_are_pages_with_code():
  assert sum(len(_blocks(p)) for p in PAGES) >= 20


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_page_code_runs(page):
  _run_page(page.name)


# The pages whose whole run the tests below read (only read): each runs once
# in a process, for test_page_code_runs and for them.
_SHARED_PAGES = ("migrating.md", "multi_device.md")
_PAGE_RUNS = {}


def _run_page(name, blocks=None):
  if blocks is None and name in _PAGE_RUNS:
    return _PAGE_RUNS[name]
  page = DOCS / name
  namespace = {"__name__": f"docs_{page.stem}"}
  for i, block in enumerate(_blocks(page)[:blocks]):
    exec(compile(block, f"{page}:block{i}", "exec"), namespace)  # pylint: disable=exec-used
  if blocks is None and name in _SHARED_PAGES:
    _PAGE_RUNS[name] = namespace
  return namespace


def test_migrated_pullback_state_is_donated_in_a_jitted_step():
  """The migrating page's optax.lookahead -> pullback recipe can be donated."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import lookahead_optax as lo  # pylint: disable=import-outside-toplevel

  ns = _run_page("migrating.md")  # the whole page runs (its donated step too)
  assert isinstance(ns["state"].inner_state, lo.PullbackState)
  assert int(ns["state"].step) == 3
  tx = ns["tx"]  # the pullback lookahead of the page's last block
  # The page's old run again, up to the keep-policy migration (the pullback
  # block donated the old state's arrays, which the migration shares).
  ns = _run_page("migrating.md", blocks=3)
  old_state, old_params, loss_fn = (
      ns["old_state"], ns["old_params"], ns["loss_fn"])
  state = lo.migrate_optax_state(
      tx, old_state.fast_state, old_params.slow,
      step=int(old_state.steps_since_sync))
  pullback = state.inner_state
  assert isinstance(pullback, lo.PullbackState)
  # Equal values, separate buffers.
  for a, b in zip(jax.tree.leaves(pullback.inner_state),
                  jax.tree.leaves(pullback.synced_inner_state)):
    assert jnp.array_equal(a, b)
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  assert int(state.step) == 2  # 7 steps with k=5: two since the last sync
  assert jnp.array_equal(lo.slow_params(state)["w"], old_params.slow["w"])

  def train_step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    return jax.tree.map(jnp.add, params, updates), state

  step = jax.jit(train_step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, old_params.fast)
  for _ in range(3):  # steps 8, 9, 10 (a sync): fast == slow after it
    params, state = step(params, state)
  assert int(state.step) == 5
  assert jnp.array_equal(params["w"], lo.slow_params(state)["w"])

  # The recipe the page warns against fails exactly so.
  inner = jax.tree.map(jnp.copy, state.inner_state.inner_state)
  shared = state._replace(inner_state=lo.PullbackState(inner, inner))
  with pytest.raises(Exception, match="donate the same buffer twice"):
    step(jax.tree.map(jnp.copy, old_params.fast), shared)


def test_nnx_checkpoint_recipe_restores_mid_cycle():
  """The multi-device page's nnx.Optimizer recipe restores a mid-cycle state."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  ns = _run_page("multi_device.md")
  lo, nnx = ns["lo"], ns["nnx"]
  model, optimizer = ns["model"], ns["optimizer"]
  optimizer2 = ns["optimizer2"]
  leaves = jax.tree.leaves(nnx.state((model, optimizer)))
  assert len(leaves) >= 9  # params, mu, nu, count, slow weights, step...
  assert int(optimizer2.opt_state.step[...]) == 10  # 7 restored + 3
  # The restored optimizer's slow weights are the uninterrupted run's.
  for a, b in zip(jax.tree.leaves(lo.slow_params(optimizer)),
                  jax.tree.leaves(lo.slow_params(optimizer2))):
    assert jnp.array_equal(a, b)


def _examples_common():
  pytest.importorskip("matplotlib")
  pytest.importorskip("sklearn")
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = DOCS.parent / "examples" / "_common.py"
  spec = importlib.util.spec_from_file_location("examples_common", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_examples_save_figures_in_the_current_directory_by_default():
  common = _examples_common()
  args = common.parser("doc", "x.png", steps_help="steps").parse_args([])
  assert args.out == "."
  assert common.parser("doc", "x.png", steps_help="").parse_args(
      ["--out", "docs/img"]).out == "docs/img"


def test_examples_smooth_short_curves_keeps_points():
  common = _examples_common()
  steps, values = common.smooth([4.0, 3.0, 2.0, 1.0, 0.0] * 5)  # 25 steps
  assert len(steps) == len(values) == 21  # window 5 (25 // 5), not 25
  assert steps[0] == 4 and values[0] == pytest.approx(2.0)
  steps, values = common.smooth(list(range(1000)))
  assert len(values) == 976 and steps[-1] == 999  # window 25
  assert common.few_points_marker(23) and not common.few_points_marker(800)
