"""The public API: every exported name imports and is documented."""

import importlib
import inspect
import pathlib
import pkgutil
import re
import tomllib

import pytest

import lookahead_optax as lo

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_all_is_unique_and_sorted():
  assert len(set(lo.__all__)) == len(lo.__all__)
  assert list(lo.__all__) == sorted(lo.__all__)


@pytest.mark.parametrize("name", lo.__all__)
def test_name_imports_and_is_documented(name):
  obj = getattr(lo, name)
  # `from lookahead_optax import name` works too.
  assert getattr(importlib.import_module("lookahead_optax"), name) is obj
  # Implemented in a private module, re-exported here.
  assert obj.__module__.startswith("lookahead_optax._"), obj.__module__
  doc = inspect.getdoc(obj)
  assert doc and doc.strip(), f"{name} has no docstring"
  summary = doc.splitlines()[0]
  assert summary.endswith("."), f"{name}: summary line {summary!r}"
  if inspect.isclass(obj):
    # States are NamedTuples whose fields are all documented.
    assert "Attributes:" in doc, name
    for field in getattr(obj, "_fields", ()):
      assert re.search(rf"^\s+{field}:", doc, re.M), f"{name}.{field}"
  else:
    assert inspect.isfunction(obj), name
    signature = inspect.signature(obj)
    sections = ["Args:", "Example:"]
    if signature.return_annotation not in (None, "None"):
      sections.append("Returns:")
    for section in sections:
      assert section in doc, f"{name} has no {section} section"
    assert ">>> " in doc.split("Example:", 1)[1], f"{name}: no doctest"
    for param in signature.parameters.values():
      if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        continue
      assert re.search(rf"^\s+{param.name}( \(.*\))?:", doc, re.M), (
          f"{name}: argument `{param.name}` is not documented")


def test_public_names_are_all_exported():
  public = {n for n in vars(lo) if not n.startswith("_")}
  modules = {n for n in public if inspect.ismodule(getattr(lo, n))}
  assert public - modules == set(lo.__all__)


def test_version_matches_pyproject():
  with open(ROOT / "pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)
  assert "version" in pyproject["project"]["dynamic"]
  attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  module_name, _, attr_name = attr.rpartition(".")
  version = getattr(importlib.import_module(module_name), attr_name)
  assert version is lo.__version__
  assert isinstance(version, str)
  # PEP 440 release (with optional pre/post/dev parts).
  assert re.fullmatch(
      r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", version), version


def test_lookahead_doc_cites_the_paper():
  assert "1907.08610" in inspect.getdoc(lo.lookahead)


# Docstrings are rendered by mkdocstrings as Markdown: `$...$` math, Markdown
# links and single backticks; no Sphinx roles or reST markup.
_SPHINX_MARKUP = re.compile(
    r":math:|\.\. math::|``|`[^`]*<https?://[^>]*>`_|:(func|class|meth|mod):`")
_NOT_YET_MARKDOWN = set()


def _package_modules():
  """Every module of the package (found, not listed: a new one is checked)."""
  return sorted(info.name for info in pkgutil.iter_modules(lo.__path__))


def test_package_modules_are_found():
  modules = _package_modules()
  assert {"_lookahead", "_lazy", "_step", "_sync", "_streaming"} <= set(
      modules), modules
  assert len(modules) == len(list(pathlib.Path(lo.__file__).parent.glob(
      "[!_]*.py"))) + len(list(pathlib.Path(lo.__file__).parent.glob(
          "_[!_]*.py"))), modules


def _markdown_cases():
  cases = []
  for name in lo.__all__:
    marks = ()
    if name in _NOT_YET_MARKDOWN:
      marks = pytest.mark.xfail(
          strict=True, reason="docstring not converted to Markdown yet")
    cases.append(pytest.param(name, getattr(lo, name), id=name, marks=marks))
  for module_name in _package_modules():
    module = importlib.import_module(f"lookahead_optax.{module_name}")
    cases.append(pytest.param(module_name, module, id=module_name))
    for attr, obj in vars(module).items():
      if ((inspect.isfunction(obj) or inspect.isclass(obj))
          and obj.__module__ == module.__name__):
        cases.append(pytest.param(f"{module_name}.{attr}", obj,
                                  id=f"{module_name}.{attr}"))
  return cases


@pytest.mark.parametrize("name,obj", _markdown_cases())
def test_docstrings_use_markdown_not_sphinx(name, obj):
  doc = inspect.getdoc(obj) or ""
  found = _SPHINX_MARKUP.search(doc)
  assert found is None, f"{name}: {found.group(0)!r} in its docstring"
