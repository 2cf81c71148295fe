"""Smoke tests of the benchmark suite (benchmarks/): no timed assertions."""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks import common
from benchmarks import run as bench_run
from benchmarks import step


def _table(report: str, first_header: str) -> list:
  """The rows (lists of cells) of the markdown table whose header starts so."""
  lines = report.splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith(f"| {first_header} |"))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


def _section(report: str, title: str) -> str:
  return report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  md, png = out / "benchmarks.md", out / "img" / "step.png"
  png.parent.mkdir()
  report = bench_run.main([
      "--quick", "--skip",
      "formulations,policies,muon,communication,lazy,nodonate",
      "--out", str(md), "--plot", str(png)])
  return report, md, png


def test_quick_run_writes_report(quick_report):
  report, md, _ = quick_report
  assert md.read_text() == report
  assert "Quick run (tiny sizes): not representative." in report
  for title in ("How to run", "Machine",
                "Optimizer step, params and state donated", "Memory",
                "End-to-end training step (Flax)"):
    assert f"## {title}" in report
  # Skipped sections are absent; no 10M row, so no targets table.
  assert "## Optimizer step, not donated" not in report
  assert "## Why `sync=\"select\"` on CPU" not in report
  assert "## Targets" not in report


def test_quick_run_draws_the_plot_and_links_it(quick_report):
  pytest.importorskip("matplotlib")
  report, _, png = quick_report
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "![step time vs param count](img/step.png)" in report


def test_report_keeps_the_communication_table_it_cannot_rebuild(
    quick_report, tmp_path, monkeypatch):
  report, _, _ = quick_report  # skipped: the placeholder, between markers
  from benchmarks import communication  # pylint: disable=import-outside-toplevel
  assert (communication.START + "\n" + bench_run._COMMUNICATION_NOT_RUN  # pylint: disable=protected-access
          + "\n" + communication.END) in report
  old = tmp_path / "old.md"
  old.write_text(f"x\n{communication.START}\n| kept |\n{communication.END}\n")
  monkeypatch.setattr(bench_run.jax, "device_count", lambda: 1)
  assert bench_run.communication_table(str(old)) == "| kept |"
  assert bench_run.communication_table(str(tmp_path / "none.md")) is None


def test_plot_is_skipped_with_a_message_without_matplotlib(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
  png = tmp_path / "step.png"
  rows = [{"name": step.ADAM, "layout": "leaf", "donate": True, "n": 10,
           "median_ms": 1.0}]
  assert bench_run.plot(rows, str(png)) is False
  assert not png.exists()
  assert "matplotlib is not installed, skipping the figure" in (
      capsys.readouterr().err)


def test_quick_step_table_has_every_layout_and_variant(quick_report):
  report, _, _ = quick_report
  rows = _table(_section(report, "Optimizer step, params and state donated"),
                "layout")
  assert [r[0] for r in rows] == ["leaf", "tree"]
  assert rows[0][2] == "1"
  assert rows[1][2] == str(2 * 12 + 4)  # the quick tree has 2 layers
  for r in rows:
    assert len(r) == 3 + len(step.VARIANTS) + 1
    assert float(r[3]) > 0  # adam, ms
    for cell in r[4:4 + len(step.VARIANTS) - 1]:
      assert re.fullmatch(r"[0-9.]+ \([0-9.]+x\)", cell), cell
    assert re.fullmatch(r"[0-9.]+x", r[-1])


def test_quick_memory_table_counts_state_exactly(quick_report):
  report, _, _ = quick_report
  rows = _table(_section(report, "Memory"), "layout")
  assert [(r[0], r[2]) for r in rows] == [
      (layout, name) for layout in ("leaf", "tree") for name in step.VARIANTS]
  params = common.make_params("leaf", bench_run.QUICK_SIZES[0])
  n = common.tree_size(params)
  by_name = {r[2]: r for r in rows if r[0] == "leaf"}
  # Beyond adam: one float32 params copy and one int32 counter, to the byte.
  for name in (step.LA_SELECT, step.LA_COND, step.OPTAX_LA):
    assert by_name[name][7] == f"{4 * n + 4:,}"
    assert by_name[name][8] == "yes"
  assert by_name[step.ADAM][7] == "0"


def test_quick_e2e_table_rows(quick_report):
  report, _, _ = quick_report
  rows = _table(_section(report, "End-to-end training step (Flax)"), "model")
  assert [r[3] for r in rows] == [
      "adam", "lookahead(adam) select", "lookahead(adam) cond"]
  assert rows[0][5] == "+0.0%"
  for r in rows:
    assert r[0] == "MLP 32-64-64-10"
    assert re.fullmatch(r"[+-][0-9.]+%", r[5])


def test_quick_traffic_table_has_every_option_and_formulation(quick_report):
  # The quick run counts the traffic of one leaf (a full run: 100 leaves).
  from benchmarks import traffic  # pylint: disable=import-outside-toplevel
  report, _, _ = quick_report
  section = _section(report, "Memory traffic of each formulation")
  assert "100k float32 params in 1 leaf, donated step." in section
  rows = _table(section, "option")
  assert [r[0] for r in rows] == [name for name, _ in traffic.OPTIONS]
  for r in rows:
    assert len(r) == 2 + len(traffic.FORMULATIONS), r
    for cell in r[1:-1]:
      assert re.fullmatch(r"[0-9.]+x \([0-9.]+\)", cell), cell
    assert r[-1] == ("select" if r[0] == "keep" else "loop")


def test_lookahead_state_is_adam_state_plus_params_plus_int32():
  # One state layout for every formulation: tests/test_formulations.py.
  params = common.transformer_params(100_000, layers=1)
  adam = optax.adam(1e-3)
  tx = lo.lookahead(adam, 5, 0.5)
  adam_bytes = common.tree_bytes(jax.eval_shape(adam.init, params))
  la_bytes = common.tree_bytes(jax.eval_shape(tx.init, params))
  assert la_bytes - adam_bytes == common.tree_bytes(params) + 4


def test_transformer_tree_sizes():
  for n, width in ((1_000_000, 56), (10_000_000, 232), (25_000_000, 384),
                   (50_000_000, 560)):
    assert common.transformer_width(n) == width
    shapes = common._transformer_shapes(width)  # pylint: disable=protected-access
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(leaves) == 148
    count = sum(int(np.prod(s)) for s in leaves)
    assert abs(count - n) / n < 0.06


def test_interleaved_ratio_is_the_median_of_paired_rounds():
  def variant(name, reps):
    def fn(x, state, g):
      for _ in range(reps):
        x = jnp.sin(x) + g
      return x, state + 1

    return common.Variant(
        name, fn, lambda: (jnp.ones(1000), jnp.zeros([], jnp.int32),
                           jnp.ones(1000)), donate=True)

  timings = common.interleaved(
      [variant("a", 1), variant("b", 3)], rounds=3, steps_per_block=5,
      warmup_steps=1, baseline="a")
  a, b = timings
  assert (a.name, b.name) == ("a", "b")
  assert a.ratio == 1.0
  assert len(a.times_s) == len(b.times_s) == 3
  paired = sorted(y / x for x, y in zip(a.times_s, b.times_s))
  assert b.ratio == paired[1]
  assert b.state_bytes == 4 and b.param_bytes == 4000
  assert b.memory["argument"] == 4000 + 4 + 4000


def test_markdown_table():
  assert common.markdown_table(["a", "b"], [[1, "x"]]) == (
      "| a | b |\n|---|---|\n| 1 | x |")


def test_muon_rows_count_flops_against_muon():
  from benchmarks import muon  # pylint: disable=g-import-not-at-top
  rows = muon.run(matrices=2, size=128, rounds=1, syncs=("loop",),
                  min_block_s=0.0, log=lambda m: None)
  assert [r["option"] for r in rows] == ["muon"] + [o for o, _ in muon.OPTIONS]
  assert rows[0]["flops_ratio"] == 1.0
  for r in rows[1:]:  # the inner update computed once, also under "loop"
    assert 1.0 <= r["flops_ratio"] <= 1.05, r
  table = muon.markdown(rows)
  assert table.splitlines()[0].startswith("| option | sync |")


def test_accelerator_section_is_spliced_into_the_report(tmp_path):
  page = tmp_path / "benchmarks.md"
  page.write_text("# Benchmarks\n\nCPU tables.\n")
  bench_run.splice_accelerator(str(page), "first")
  bench_run.splice_accelerator(str(page), "second run")
  text = page.read_text()
  assert text.startswith("# Benchmarks\n\nCPU tables.\n")
  assert text.count("## Accelerator") == 1
  assert "second run" in text and "first" not in text
  assert text.index(bench_run.ACCELERATOR_START) < text.index("second run")


def test_report_says_accelerators_were_not_timed(quick_report):
  report, _, _ = quick_report
  section = _section(report, "Accelerator")
  assert "nothing here was timed" in section
  assert bench_run.ACCELERATOR_START in section
