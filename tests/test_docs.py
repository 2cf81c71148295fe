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
  namespace = {"__name__": f"docs_{page.stem}"}
  for i, block in enumerate(_blocks(page)):
    exec(compile(block, f"{page}:block{i}", "exec"), namespace)  # pylint: disable=exec-used
