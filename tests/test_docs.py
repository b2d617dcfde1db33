"""The documentation runs, states the code's defaults, and quotes the committed results.

Every fenced ``python`` block of ``docs/**/*.md`` (the tutorials included) and of the README is
executed; the blocks of one page share a namespace, in order. A block preceded by a
``<!-- skip -->`` line is not run; a page whose first line is ``<!-- slow -->`` is a slow test.
The generated blocks (``docs/scripts/tables.py``) must equal what the benchmark JSON gives.
"""
from __future__ import annotations

import inspect
import math
import re
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _load(name: str):
    """docs/scripts/<name>.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_scripts_{name}", DOCS / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load("tables")
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
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "concepts.md", "from-neuralode.md", "choosing.md", "skip.md", "jacobian.md", "discrete.md",
            "solution.md", "faq.md", "benchmarks.md", "changelog.md", "citation.md", "api/index.md",
            "tutorials/moons.md", "tutorials/mnist-table1.md", "tutorials/skip-reg.md",
            "tutorials/non-convergence.md"} <= names


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


def _page_param(page: Path):
    slow = page.read_text().startswith("<!-- slow -->")
    return pytest.param(page, id=page.relative_to(DOCS).as_posix(), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
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
    assert deq.sensitivity.linear_solver is None  # derived from the forward tolerance at each solve
    backward = deq.sensitivity.solver_for(td.SolveOptions(deq.atol, deq.rtol, deq.max_steps))
    assert isinstance(backward, td.GMRES) and backward.rtol == 1e-3 and backward.atol == 0.0  # the forward tolerance
    assert td.SteadyStateSensitivity().solver_for(td.SolveOptions(1e-6, 1e-8, 10)).rtol == 1e-6
    node = td.InfiniteTimeNeuralODE(nn.Linear(3, 3))
    assert node.max_steps == 100 and node.atol == 1e-3 and node.rtol == 1e-3
    assert isinstance(node.initializer, td.InputInitializer)
    gmres = td.GMRES()
    assert (gmres.rtol, gmres.atol, gmres.restart, gmres.max_iters) == (1e-5, 0.0, 20, 200)
    fixed = td.FixedPointSolver()
    assert (fixed.rtol, fixed.atol, fixed.max_iters) == (1e-5, 0.0, 200)
    assert td.DirectSolver().max_size == 4096
    assert td.SkipRegInitializer().weight == 0.01
    assert td.SkipInitializer(nn.Identity()).weight == 0.01
    assert td.JacobianPenalty().weight == 1.0 and td.JacobianPenalty().n_probes == 1
    ode = td.ODESteadyStateSolver()
    assert (ode.step_tol_factor, ode.max_step, ode.min_step_tol, ode.step_size, ode.stall_time) == \
        (1.0, math.inf, 1e-6, 1.0, 10.0)
    vcab3 = td.VCAB3()
    assert (vcab3.step_tol_factor, vcab3.max_step, vcab3.min_step_tol, vcab3.max_factor) == (1.0, math.inf, 1e-6, 2.0)
    anderson = td.AndersonAcceleration()
    assert (anderson.stall_patience, anderson.divergence_factor, anderson.per_sample) == (30, 1e4, False)
    assert td.SteadyStateSensitivity().on_failure == "warn"
    phantom = td.PhantomSensitivity()
    assert (phantom.steps, phantom.damping) == (5, 0.5)
    named = td.DEQ(_layer, sensitivity="phantom").sensitivity
    assert (named.steps, named.damping) == (5, 0.5)
    assert td.VariationalDropout().p == 0.5 and td.VariationalDropout().shared_dims == ()
    assert inspect.signature(td.reset_norm).parameters["n_power_iterations"].default == 15
    assert inspect.signature(td.apply_norm).parameters["norm"].default == "weight_norm"
    spectral = inspect.signature(torch.nn.utils.parametrizations.spectral_norm).parameters
    assert spectral["n_power_iterations"].default == 1  # apply_norm passes torch's default on


def _page(name: str) -> str:
    return " ".join((DOCS / name).read_text().split())


# (page, phrases that state a default; each is checked against the code in test_code_defaults)
DOCUMENTED = [
    ("from-neuralode.md", ["`atol`, `rtol` (default `1e-3` each", "`max_steps` solver steps (default `100`"]),
    ("choosing.md", ["`atol = rtol = 1e-3`", "`GMRES(rtol=1e-5, atol=0.0, restart=20, max_iters=200)`",
                     "`step_tol_factor=1.0`", "`min_step_tol=1e-6`", "`stall_patience=30`", "`stall_time=10.0`",
                     "`max_steps=100`"]),
    ("skip.md", ["`weight=0.01`"]),
    ("jacobian.md", ["`weight=1.0`", "`n_probes=1`"]),
    ("solution.md", ["`on_failure='warn'` (the default)", "`max_steps=100`"]),
    ("torchdeq.md", ["`sensitivity='phantom'` (`steps=5, damping=0.5`)", "`max_steps` (default `100`)",
                     "`atol`, `rtol` (default `1e-3` each)", "`n_power_iterations` (default `1`, torch's)"]),
    ("choosing.md", ["`PhantomSensitivity(steps=5, damping=0.5)`"]),
]


@pytest.mark.parametrize("name, phrases", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_pages_state_the_defaults(name, phrases):
    text = _page(name)
    missing = [phrase for phrase in phrases if phrase not in text]
    assert not missing, f"{name} does not state: {missing}"


def test_api_pages_list_every_public_name():
    listed = set()
    for page in (DOCS / "api").glob("*.md"):
        listed |= set(re.findall(r"^::: torchdyn_deq\.(\w+)$", page.read_text(), re.M))
    missing = sorted(set(td.__all__) - {"__version__"} - listed)
    assert not missing, f"docs/api/*.md lack ::: entries for {missing}"
    # and no top-level entry for a name the package does not export (internals are documented by module path)
    assert listed <= set(td.__all__), f"docs/api/*.md document non-public top-level names {sorted(listed - set(td.__all__))}"


# ---------------------------------------------------------------------------- generated numbers
def test_generated_blocks_match_the_committed_results():
    stale = [p.relative_to(DOCS).as_posix() for p in PAGES if tables.stale(p)]
    assert not stale, f"pages whose generated blocks differ from benchmarks/results: {stale}; " \
                      "run python docs/scripts/tables.py"


def test_every_generator_is_used():
    used = set()
    for page in PAGES:
        used |= {m.group("name") for m in tables.BLOCK.finditer(page.read_text())}
    assert used == set(tables.GENERATORS), f"unused: {set(tables.GENERATORS) - used}, unknown: {used - set(tables.GENERATORS)}"


def test_a_hand_edited_number_is_caught():
    page = (DOCS / "choosing.md").read_text()
    assert "<!-- generated: mnist_step_summary -->" in page and tables.render(page) == page
    start = page.index("<!-- generated: mnist_step_summary -->")
    edited = page[:start] + page[start:].replace("| DEQ continuous vanilla (tsit5) | ", "| DEQ continuous vanilla (tsit5) | 1", 1)
    assert edited != page and tables.render(edited) == page  # the regenerated text undoes the edit
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        tables.render("<!-- generated: nope -->\nx\n<!-- /generated -->")


def test_generated_numbers_come_from_the_json():
    rows = {r["method"]: r for r in tables.load("mnist_step")["rows"]}
    vanilla = rows["DEQ continuous vanilla (tsit5)"]
    summary = tables.mnist_step_summary()
    assert f"| DEQ continuous vanilla (tsit5) | {1e3 * vanilla['forward_s']:.2f} | {1e3 * vanilla['backward_s']:.2f} |" \
        in summary
    # the findings name the fastest exact training step as the table has it
    exact = {k: r for k, r in rows.items() if "approximate" not in k}
    fastest = min(exact, key=lambda k: exact[k]["step_s"])
    assert f"Fastest training step with an exact gradient: {fastest} (" in tables.mnist_step_findings()


def test_every_image_exists():
    missing = []
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            if not (page.parent / target).is_file():
                missing.append(f"{page.relative_to(DOCS)}: {target}")
    assert not missing, f"images not found: {missing}"


# ---------------------------------------------------------------------------- docstring examples
DOCTESTED = ["torchdyn_deq._models", "torchdyn_deq._initializers", "torchdyn_deq._regularizers",
             "torchdyn_deq.multiscale.zoo", "torchdyn_deq._baselines"]


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_run(module):
    """The ``Examples:`` of the public classes run and print what they show."""
    import doctest
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained MDEQ's capped solve warns
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, f"{module}: {result}"
