"""The docs site renders its markup: the build hook's checks, and the built site.

`find_raw_markup` (docs/raw_markup.py) is a pure function of a page's HTML, so
its tests need no mkdocs. `test_built_site_*` build the whole site and need the
docs extra (skipped without mkdocs).
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_hook():
  spec = importlib.util.spec_from_file_location(
      "raw_markup", ROOT / "docs" / "raw_markup.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


hook = _load_hook()
find = hook.find_raw_markup


def _kinds(page_html):
  return [p.split(" in #")[0].split(":")[0] for p in find(page_html)]


# What mkdocstrings renders from docstrings that still use Sphinx markup, as
# found on the API page before the docstrings were converted.
@pytest.mark.parametrize("page_html, kind", [
    ("<p>the slow weights :math:<code>\\phi</code> move</p>", "Sphinx role"),
    ("<p>see :func:<code>lookahead_optax.lookahead</code></p>", "Sphinx role"),
    ("<p>a :py:class:<code>LookaheadState</code></p>", "Sphinx role"),
    ("<p>see :class:`LookaheadState`</p>", "Sphinx role"),
    ("<p>Weights:\n.. math:: \\phi</p>", "reST directive"),
    ("<p>.. note::\n  careful</p>", "reST directive"),
    ("<p>Zhang et al., <code>Lookahead &lt;https://arxiv.org/abs/1907.08610"
     "&gt;</code>_, NeurIPS 2019.</p>", "reST link"),
    ("<p>Zhang et al., `Lookahead &lt;https://arxiv.org&gt;`_.</p>",
     "reST link"),
    ("<p>anonymous <code>link &lt;https://a.b&gt;</code>__ here</p>",
     "reST link"),
    # Markdown turns the underscores after two such links into emphasis.
    ("<p>Wright, <code>Ranger\n&lt;https://github.com/a/b&gt;</code><em>, "
     "2019; Zhang, <code>Lookahead &lt;https://arxiv.org/abs/1&gt;</code>"
     "</em>, 2019.</p>", "reST link"),
    ("<p>:param tx: the optimizer</p>", "reST field list"),
    ("<p>the ``sync_period`` argument</p>", "stray backquote (an unrendered "),
    ("<p>the `sync_period argument</p>", "stray backquote (an unrendered "),
    ("<p>$$\n\\phi = \\theta\n$$</p>", "display math `$$` that did not become a "
     "math block"),
    ("<p>the step size $\\alpha$ of the sync</p>", "`$...$` math outside a "
     "math span"),
    ("<p>the step size $a$ of the sync</p>", "`$...$` math outside a math span"),
    ("<p>restart: [ \\phi \\leftarrow \\theta ]</p>", "raw LaTeX outside a "
     "math span"),
    ("<p>\\(x\\)</p>", "raw LaTeX outside a math span"),
])
def test_flags_raw_markup(page_html, kind):
  problems = find(page_html)
  assert problems, page_html
  assert any(p.startswith(kind) for p in problems), problems


@pytest.mark.parametrize("page_html", [
    '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js">'
    "</script>",
    '<script src="//unpkg.com/katex/dist/katex.min.js"></script>',
    '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=R">',
    '<link rel="preconnect" href="https://fonts.gstatic.com">',
    '<img src="http://example.com/badge.svg"/>',
])
def test_flags_external_loads(page_html):
  problems = find(page_html)
  assert len(problems) == 1 and problems[0].startswith("external "), problems


@pytest.mark.parametrize("page_html", [
    # Math that arithmatex recognised (and KaTeX renders).
    '<p>the step size <span class="arithmatex">\\(\\alpha\\)</span></p>',
    '<div class="arithmatex">\\[\n\\phi \\leftarrow \\phi + \\alpha\n\\]</div>',
    # Code may hold anything: roles, dollars, backquotes, directives.
    "<pre><code>x = '$a$' + '``b``'  # :math:`c`\n.. math::\n\\phi</code></pre>",
    "<p>call <code>lo.lookahead(tx, sync_period=5)</code>_x</p>",
    "<p>compare <code>a &lt; b</code> and <code>x &gt; y</code></p>",
    '<p>see <a href="https://arxiv.org/abs/1907.08610">the paper</a></p>',
    "<p><code>`</code> and <kbd>$</kbd></p>",
    # Scripts and styles are not prose.
    "<script>var s = '$a$ :math:`b`';</script><style>a::before{}</style>",
    # Plain prose with colons, dots and underscores.
    "<p>Note: the params (e.g. <code>w</code>) go on... a_b: c. Example::</p>",
    "<p>steps k, 2k, ... and 1.5 * x; snake_case_name_ here</p>",
    # Links to other hosts are fine; loading from them is not.
    '<a href="https://arxiv.org/abs/1907.08610">paper</a>',
    '<link rel="canonical" href="https://example.com/docs/">',
    '<script src="../assets/katex/katex.min.js"></script>',
    '<link rel="stylesheet" href="assets/katex/katex.min.css">',
    # Nested elements inside a skipped element.
    "<pre><code><span>$a$</span><span>:math:</span></code></pre>"
    "<p>after</p>",
    '<span class="arithmatex"><span>\\(x\\)</span></span><p>ok</p>',
    # Void elements do not open a skipped region.
    "<p>a<br>b<img src='img/x.png'>c</p>",
])
def test_accepts_rendered_markup(page_html):
  assert find(page_html) == []


def test_text_after_a_skipped_element_is_checked():
  problems = find("<pre><code>$a$</code></pre><p>then :math:`x`</p>")
  assert len(problems) == 2  # the role and the stray backquotes
  assert problems[0].startswith("Sphinx role")


def test_messages_name_the_heading_and_count_repeats():
  page = ('<h2 id="lookahead_optax.lookahead">lookahead</h2>'
          "<p>a :math:<code>x</code> and :math:<code>y</code></p>"
          '<h2 id="lookahead_optax.lazy">lazy</h2><p>fine</p>')
  (problem,) = find(page)
  assert problem.startswith("Sphinx role in #lookahead_optax.lookahead: ")
  assert problem.endswith("(and 1 more)")


def test_cdn_references_in_files(tmp_path):
  (tmp_path / "index.html").write_text("<p>ok</p>")
  (tmp_path / "assets").mkdir()
  (tmp_path / "assets" / "extra.css").write_text(
      "@import url(https://fonts.googleapis.com/css?family=Roboto);")
  (tmp_path / "assets" / "javascripts").mkdir()
  # The Material bundle's on-demand loads (polyfill, mermaid) are allowed,
  # any other CDN URL in it is not.
  (tmp_path / "assets" / "javascripts" / "bundle.abc.min.js").write_text(
      '_t("https://unpkg.com/resize-observer-polyfill");'
      '_t("https://unpkg.com/mermaid@11/dist/mermaid.min.js");')
  assert hook.find_cdn_references(tmp_path) == [
      "assets/extra.css: fonts.googleapis.com"]
  (tmp_path / "assets" / "javascripts" / "bundle.abc.min.js").write_text(
      '_t("https://unpkg.com/something-else.js")')
  assert hook.find_cdn_references(tmp_path) == [
      "assets/extra.css: fonts.googleapis.com",
      "assets/javascripts/bundle.abc.min.js: unpkg.com"]


def test_katex_is_vendored_with_woff2_fonts_only():
  katex = ROOT / "docs" / "assets" / "katex"
  assert (katex / "LICENSE").read_text().startswith("The MIT License")
  css = (katex / "katex.min.css").read_text()
  fonts = {p.name for p in (katex / "fonts").iterdir()}
  referenced = set(__import__("re").findall(r"url\(fonts/([^)]+)\)", css))
  assert referenced == fonts  # every font the CSS names is shipped
  assert all(name.endswith(".woff2") for name in fonts)
  size = sum(p.stat().st_size for p in katex.rglob("*"))
  assert size < 700_000, size


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
  pytest.importorskip("mkdocs")
  pytest.importorskip("mkdocstrings")
  site = tmp_path_factory.mktemp("site")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
  return site, result


@pytest.mark.slow
def test_built_site_has_no_raw_markup(built_site):
  site, result = built_site
  errors = [l for l in result.stderr.splitlines() if "ERROR" in l]
  assert result.returncode == 0, "\n".join(errors) or result.stderr[-3000:]
  for page in sorted(site.rglob("*.html")):
    assert find(page.read_text()) == [], page


@pytest.mark.slow
def test_built_site_loads_nothing_from_other_hosts(built_site):
  site, _ = built_site
  assert (site / "assets" / "katex" / "katex.min.js").exists()
  assert hook.find_cdn_references(site) == []
  index = (site / "index.html").read_text()
  assert "assets/katex/katex.min.js" in index
  assert "fonts.googleapis" not in index and "mathjax" not in index.lower()
