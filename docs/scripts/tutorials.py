"""Run the tutorials (``docs/tutorials/*.md``) and write their outputs into the pages.

    python docs/scripts/tutorials.py                 # every tutorial, about a minute on one thread
    python docs/scripts/tutorials.py moons.md        # one

The python blocks of a page run in order in one namespace, with ``docs/tutorials/`` as the
working directory, so the figures a block saves under ``figures/`` are the ones the page shows.
What a block prints is written right after it, between ``<!-- output -->`` and
``<!-- /output -->`` (replaced on every run). ``tests/test_docs.py`` runs the same blocks, in a
temporary directory.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "docs" / "tutorials"
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the package of this checkout

FENCE = re.compile(r"^```python[^\n]*\n.*?^```[ \t]*\n", re.S | re.M)
OUTPUT = re.compile(r"\n<!-- output -->\n.*?<!-- /output -->\n", re.S)


def run_page(path: Path) -> str:
    """The page's text with each block's printed output after it."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    torch.set_num_threads(1)
    text = OUTPUT.sub("\n", path.read_text())
    namespace = {"__name__": f"tutorial_{path.stem.replace('-', '_')}"}
    pieces, end = [], 0
    previous = os.getcwd()
    os.chdir(path.parent)
    try:
        for match in FENCE.finditer(text):
            code = match.group(0).split("\n", 1)[1].rsplit("```", 1)[0]
            line = text.count("\n", 0, match.start()) + 1
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a page shows what it prints, not library hints
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
            pieces.append(text[end:match.end()])
            printed = buffer.getvalue().rstrip()
            if printed:
                pieces.append(f"\n<!-- output -->\n```text\n{printed}\n```\n<!-- /output -->\n")
            end = match.end()
    finally:
        os.chdir(previous)
    pieces.append(text[end:])
    return "".join(pieces)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help="tutorial file names (default: all)")
    args = parser.parse_args(argv)
    paths = [TUTORIALS / name for name in args.pages] or sorted(TUTORIALS.glob("*.md"))
    for path in paths:
        start = time.perf_counter()
        path.write_text(run_page(path))
        print(f"ran {path.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
