"""The documentation runs and states the code's defaults.

Every fenced ``python`` block of ``docs/*.md`` is executed; the blocks of one page share a
namespace, in order. A block preceded by a ``<!-- skip -->`` line is not run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str):
    """(line number, code) of each python block not marked ``<!-- skip -->``."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        if before and before[-1].strip() == "<!-- skip -->":
            continue
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"index.md", "from-neuralode.md", "choosing.md", "skip.md", "jacobian.md", "discrete.md",
            "solution.md", "faq.md", "api.md", "citation.md"} <= names


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n<!-- skip -->\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n")]


def run_blocks(page: Path) -> dict:
    """Run the python blocks of ``page`` in order in one namespace; return it."""
    name = page.relative_to(ROOT).as_posix()
    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, code in python_blocks(page.read_text()):
        try:
            exec(compile(code, f"{name}:{line}", "exec"), namespace)
        except Exception as err:  # name the block in the failure
            raise AssertionError(f"the python block at {name}:{line} failed: {err!r}") from err
    return namespace


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_code_runs(page, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # Lightning and friends write files: keep them out of the repo
    run_blocks(page)


def test_readme_blocks_run_in_order(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert len(python_blocks((ROOT / "README.md").read_text())) >= 2
    namespace = run_blocks(ROOT / "README.md")
    assert namespace["model"].solution.converged


# ---------------------------------------------------------------------------- defaults
def _layer(z, x):
    return torch.tanh(0.5 * z + x)


def test_code_defaults():
    deq = td.DEQ(_layer)
    assert deq.atol == 1e-3 and deq.rtol == 1e-3
    assert deq.max_steps == 100 and deq.on_failure == "warn"
    assert isinstance(deq.initializer, td.ZerosInitializer)
    assert isinstance(deq.solver, td.ODESteadyStateSolver) and deq.solver.stepper == "tsit5"
    assert isinstance(deq.sensitivity, td.SteadyStateSensitivity)
    assert isinstance(deq.sensitivity.linear_solver, td.GMRES)
    assert deq.sensitivity.linear_solver.rtol == 1e-5 and deq.sensitivity.linear_solver.atol == 1e-10
    node = td.InfiniteTimeNeuralODE(nn.Linear(3, 3))
    assert node.max_steps == 100 and node.atol == 1e-3 and node.rtol == 1e-3
    assert isinstance(node.initializer, td.InputInitializer)
    gmres = td.GMRES()
    assert (gmres.rtol, gmres.atol, gmres.restart, gmres.max_iters) == (1e-5, 1e-10, 20, 200)
    fixed = td.FixedPointSolver()
    assert (fixed.rtol, fixed.atol, fixed.max_iters) == (1e-5, 1e-10, 200)
    assert td.DirectSolver().max_size == 4096
    assert td.SkipRegInitializer().weight == 0.01
    assert td.SkipInitializer(nn.Identity()).weight == 0.01
    assert td.JacobianPenalty().weight == 1.0 and td.JacobianPenalty().n_probes == 1
    ode = td.ODESteadyStateSolver()
    assert (ode.step_tol_factor, ode.max_step, ode.min_step_tol, ode.step_size) == (0.3, 2.0, 1e-6, 1.0)
    vcab3 = td.VCAB3()
    assert (vcab3.step_tol_factor, vcab3.max_step, vcab3.min_step_tol, vcab3.max_factor) == (0.3, 0.4, 1e-6, 2.0)
    anderson = td.AndersonAcceleration()
    assert (anderson.stall_patience, anderson.divergence_factor) == (30, 1e4)
    assert td.SteadyStateSensitivity().on_failure == "warn"


def _page(name: str) -> str:
    return " ".join((DOCS / name).read_text().split())


# (page, phrases that state a default; each is checked against the code in test_code_defaults)
DOCUMENTED = [
    ("from-neuralode.md", ["`atol`, `rtol` (default `1e-3` each", "`max_steps` solver steps (default `100`"]),
    ("choosing.md", ["`atol = rtol = 1e-3`", "`GMRES(rtol=1e-5, atol=1e-10, restart=20, max_iters=200)`",
                     "`step_tol_factor=0.3`", "`max_step=2.0`", "`VCAB3(max_step=0.4)`", "`max_steps=100`"]),
    ("skip.md", ["`weight=0.01`"]),
    ("jacobian.md", ["`weight=1.0`", "`n_probes=1`"]),
    ("solution.md", ["`on_failure='warn'` (the default)", "`max_steps=100`"]),
]


@pytest.mark.parametrize("name, phrases", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_pages_state_the_defaults(name, phrases):
    text = _page(name)
    missing = [phrase for phrase in phrases if phrase not in text]
    assert not missing, f"{name} does not state: {missing}"


def test_api_page_lists_every_public_name():
    listed = set(re.findall(r"^::: torchdyn_deq\.(\w+)", (DOCS / "api.md").read_text(), re.M))
    missing = sorted(set(td.__all__) - {"__version__"} - listed)
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"
