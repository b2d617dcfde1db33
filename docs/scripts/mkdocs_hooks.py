"""MkDocs hooks of this site (``hooks:`` in mkdocs.yml).

MathJax offline: the site's math is typeset by MathJax 3, and the script is copied at build time
from the ``django-static-mathjax`` package (a plain copy of MathJax's files, in the ``docs``
extra), into ``assets/mathjax/``. Building and reading the site need no network.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

# what the CommonHTML output needs: the TeX-input bundle and its web fonts
MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2")


def mathjax_source() -> Path:
    """The ``es5`` folder of the installed MathJax copy."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None:
        raise RuntimeError("the docs need MathJax from the django-static-mathjax package: "
                           "pip install -e '.[docs]' (or pip install django-static-mathjax)")
    source = Path(spec.origin).parent / "static" / "mathjax" / "es5"
    if not (source / "tex-chtml.js").is_file():
        raise RuntimeError(f"no tex-chtml.js under {source}: reinstall django-static-mathjax")
    return source


def on_post_build(config, **kwargs) -> None:
    source, target = mathjax_source(), Path(config["site_dir"]) / "assets" / "mathjax"
    for name in MATHJAX_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)
