// Renders the math that pymdownx.arithmatex (generic mode) marked up:
// <span class="arithmatex">\(...\)</span> inline and
// <div class="arithmatex">\[...\]</div> display. Only those elements are
// rendered, so a stray "$" in prose stays text (and the docs build flags it).
(function () {
  "use strict";
  function render() {
    document.querySelectorAll(".arithmatex").forEach(function (el) {
      var tex = el.textContent.trim();
      var display = tex.startsWith("\\[");
      if (display || tex.startsWith("\\(")) {
        tex = tex.slice(2, -2);
      }
      katex.render(tex, el, {displayMode: display, throwOnError: false});
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(render);  // Material's instant navigation
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", render);
  } else {
    render();
  }
})();
