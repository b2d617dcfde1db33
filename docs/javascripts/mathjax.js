// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only its spans and divs.
// The script itself is copied into the site at build time from an installed package
// (docs/scripts/mkdocs_hooks.py), so no page loads anything from the network.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};
