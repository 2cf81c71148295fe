"""An mkdocs hook (mkdocs.yml `hooks:`) that fails the build on unrendered markup.

The API reference renders docstrings as Markdown with `$...$` math. Sphinx
markup written in a docstring (`:math:` roles, `.. math::` directives, reST
links written as a backquoted "text <url>" followed by an underscore, double
backquoted literals) does not fail a build: it reaches the page as raw text.
Nor does math that the Markdown did not recognise (a display equation inside a
paragraph), or a script loaded from a CDN that offline readers cannot reach.
This hook reads every rendered page and reports each of these as an error, so
`mkdocs build` fails.

`find_raw_markup` is a pure function of the page's HTML (no mkdocs needed), so
tests can check it directly.
"""

from __future__ import annotations

import html.parser
import logging
import pathlib
import re

# Elements whose text is not prose: code, scripts, and math that arithmatex
# recognised (rendered by KaTeX in the browser).
_CODE_TAGS = frozenset({"code", "pre", "kbd", "samp"})
_HIDDEN_TAGS = frozenset({"script", "style", "textarea", "template"})
_MATH_CLASSES = frozenset({"arithmatex", "katex", "katex-display"})
# Placeholders for skipped elements in the flattened text, so that patterns
# can see "a role name right before a code span" (`:math:` + <code>).
_CODE = "\x01"
_MATH = "\x02"
# A code span holding "text <url>": a reST link whose backquotes became code
# (its trailing underscore may have become emphasis, so it is not always there).
_LINK_CODE = "\x03"
_LINK_TEXT = re.compile(r"<\s*(?:https?|ftp)://[^>]*>\s*$")
_VOID = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link",
    "meta", "source", "track", "wbr",
})
_RESOURCE_ATTRS = {
    "script": "src", "img": "src", "iframe": "src", "source": "src",
    "audio": "src", "video": "src", "embed": "src",
}
_LINK_LOADS = frozenset({
    "stylesheet", "preconnect", "preload", "prefetch", "modulepreload",
    "dns-prefetch", "icon",
})
_EXTERNAL = re.compile(r"^\s*(?:https?:)?//", re.I)

_TEXT_CHECKS = (
    ("Sphinx role",
     re.compile(r"(?<![\w:]):[a-z]+(?::[a-z]+)*:(?=[`" + _CODE + "])")),
    ("reST field list",
     re.compile(r"(?m)^\s*:(?:param|type|returns?|rtype|raises?|ivar|var)"
                r"\b[^:\n]*:")),
    ("reST directive", re.compile(r"(?m)(?:^|\s)\.\. [A-Za-z][\w-]*::")),
    ("reST link", re.compile(
        r"`[^`\n]*<[^>\n]+>`__?|" + _CODE + r"__?(?![\w])|" + _LINK_CODE)),
    ("display math `$$` that did not become a math block",
     re.compile(r"\$\$")),
    ("`$...$` math outside a math span",
     re.compile(r"(?<!\$)\$(?!\$)[^$\n]+(?<!\$)\$(?!\$)")),
    ("raw LaTeX outside a math span",
     re.compile(r"\\(?:[A-Za-z]{2,}|[()\[\]{}])")),
    ("stray backquote (an unrendered ``literal``?)", re.compile(r"`+")),
)


class _Page(html.parser.HTMLParser):
  """Collects the page's visible prose and its external resource loads."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.chunks = []  # (heading anchor, text)
    self.external = []  # (tag, url)
    self._skip = None  # [tag, depth, placeholder, text] inside skipped text
    self._anchor = ""

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self._check_load(tag, attrs)
    if tag in {"h1", "h2", "h3", "h4", "h5", "h6"} and attrs.get("id"):
      self._anchor = attrs["id"]
    if tag in _VOID:
      return
    if self._skip is not None:
      if tag == self._skip[0]:
        self._skip[1] += 1
      return
    classes = set((attrs.get("class") or "").split())
    if tag in _CODE_TAGS:
      self._skip = [tag, 1, _CODE, []]
    elif tag in _HIDDEN_TAGS:
      self._skip = [tag, 1, "", []]
    elif classes & _MATH_CLASSES:
      self._skip = [tag, 1, _MATH, []]

  def handle_startendtag(self, tag, attrs):
    self._check_load(tag, dict(attrs))

  def handle_endtag(self, tag):
    if self._skip is not None and tag == self._skip[0]:
      self._skip[1] -= 1
      if self._skip[1] == 0:
        placeholder = self._skip[2]
        if placeholder == _CODE and _LINK_TEXT.search("".join(self._skip[3])):
          placeholder = _LINK_CODE
        self.chunks.append((self._anchor, placeholder))
        self._skip = None

  def handle_data(self, data):
    if self._skip is None:
      self.chunks.append((self._anchor, data))
    else:
      self._skip[3].append(data)

  def _check_load(self, tag, attrs):
    url = None
    if tag in _RESOURCE_ATTRS:
      url = attrs.get(_RESOURCE_ATTRS[tag])
    elif tag == "link":
      rels = set((attrs.get("rel") or "").lower().split())
      if rels & _LINK_LOADS:
        url = attrs.get("href")
    if url and _EXTERNAL.match(url):
      self.external.append((tag, url))


def _snippet(text, start, end, width=40):
  left = max(0, start - width)
  right = min(len(text), end + width)
  out = (text[left:right].replace(_CODE, "`...`").replace(_MATH, "<math>")
         .replace(_LINK_CODE, "`... <url>`"))
  return " ".join(out.split())


def find_raw_markup(page_html: str) -> list[str]:
  """Returns one message per piece of unrendered markup in a rendered page.

  Args:
    page_html: the HTML of one built page.

  Returns:
    Messages naming the problem, the nearest heading anchor and the text
    around it; empty when the page is clean.

  Example:
    >>> find_raw_markup("<p>the <code>alpha</code> of Lookahead</p>")
    []
    >>> find_raw_markup("<h2 id='f'>f</h2><p>a :math:<code>x</code></p>")
    ['Sphinx role in #f: "fa :math:`...`"']
  """
  parser = _Page()
  parser.feed(page_html)
  parser.close()
  problems = [
      f"external {tag} load (serve it from the site): {url}"
      for tag, url in parser.external
  ]
  # Join the text per heading section, so that messages name the object.
  sections = []
  for anchor, text in parser.chunks:
    if sections and sections[-1][0] == anchor:
      sections[-1][1].append(text)
    else:
      sections.append((anchor, [text]))
  for anchor, texts in sections:
    text = "".join(texts)
    where = f" in #{anchor}" if anchor else ""
    for name, pattern in _TEXT_CHECKS:
      matches = list(pattern.finditer(text))
      if matches:
        first = matches[0]
        more = f" (and {len(matches) - 1} more)" if len(matches) > 1 else ""
        problems.append(f'{name}{where}: '
                        f'"{_snippet(text, first.start(), first.end())}"{more}')
  return problems


# CDN hosts that must not appear anywhere in the built site (any file type).
CDN_HOSTS = (
    "cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com",
    "fonts.googleapis.com", "fonts.gstatic.com", "polyfill.io",
    "cdn.mathjax.org", "ajax.googleapis.com",
)


# The Material theme's bundle names two scripts it loads only on demand: a
# ResizeObserver polyfill for browsers without one, and mermaid for pages with
# mermaid diagrams (this site has none). Those two are not counted.
_THEME_ON_DEMAND = re.compile(
    r"https://unpkg\.com/(?:resize-observer-polyfill|mermaid@[\w.]+/dist/"
    r"mermaid\.min\.js)")


def find_cdn_references(site_dir) -> list[str]:
  """Returns `file: host` for each CDN host named in the built site's files."""
  found = []
  for path in sorted(pathlib.Path(site_dir).rglob("*")):
    if path.suffix not in {".html", ".js", ".css", ".json", ".xml"}:
      continue
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.parent.name == "javascripts" and path.name.startswith("bundle."):
      text = _THEME_ON_DEMAND.sub("", text)
    for host in CDN_HOSTS:
      if host in text:
        found.append(f"{path.relative_to(site_dir)}: {host}")
  return found


# ---------------------------------------------------------------------------
# mkdocs hook events (mkdocs is imported only when a build runs them).

_log = logging.getLogger("mkdocs.hooks.raw_markup")
_problems = []


def on_pre_build(config):  # pylint: disable=unused-argument
  _problems.clear()


def on_post_page(output, page, config):  # pylint: disable=unused-argument
  for problem in find_raw_markup(output):
    message = f"{page.file.src_uri}: {problem}"
    _log.error(message)
    _problems.append(message)
  return output


def on_post_build(config):
  for reference in find_cdn_references(config["site_dir"]):
    message = f"CDN reference in the built site: {reference}"
    _log.error(message)
    _problems.append(message)
  if _problems:
    from mkdocs.exceptions import PluginError  # pylint: disable=import-outside-toplevel
    raise PluginError(
        f"{len(_problems)} piece(s) of unrendered markup or CDN loads in the "
        "built site (listed above).")
