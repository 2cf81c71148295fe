"""A griffe extension for the API reference (used by mkdocs.yml, not a page).

The docstrings follow optax's Google style with an ``Example:`` section of
doctests. Griffe renders only a section titled ``Examples:`` as code (any
other title becomes a Markdown admonition, where ``>>>`` lines turn into
quotes and printed arrays into broken links), so this renames the section.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^Example:$", re.MULTILINE)


class DoctestExamples(griffe.Extension):
  """Renders ``Example:`` sections as ``Examples:`` (doctest code blocks)."""

  def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE.sub("Examples:", obj.docstring.value)
