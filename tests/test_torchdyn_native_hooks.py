"""When torchdyn calls the registry itself (the upstream pull request), the plugin only
registers: tested on a copy of the installed torchdyn with the proposal's module and call
sites added, in a temporary directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torchdyn

ROOT = Path(__file__).resolve().parents[1]

# appended to the copy's core/problems.py: a stand-in for the pull request's inline edits at
# the call sites PULL_REQUEST.md names (ODEProblem.__init__, _autograd_func, odeint)
CALL_SITES = textwrap.dedent("""

    import inspect as _inspect
    from torchdyn.numerics import registry as _registry


    def _call_the_registry(cls):
        init, autograd_func, odeint_ = cls.__init__, cls._autograd_func, cls.odeint
        signature = _inspect.signature(init)

        def __init__(self, *args, **kwargs):
            sensitivity = signature.bind(self, *args, **kwargs).arguments.get('sensitivity', 'autograd')
            own = isinstance(self, MultipleShootingProblem)
            _registry.check_sensitivity(sensitivity, _registry.BUILTIN_SENSITIVITIES if own else None)
            init(self, *args, **kwargs)

        def _autograd_func(self):
            solve = _registry.sensitivity_function(self)
            return autograd_func(self) if solve is None else solve

        def odeint(self, x, t_span, save_at=(), args={}):
            if self.sensalg in _registry.BUILTIN_SENSITIVITIES and _registry.is_steady_state_span(t_span):
                return _registry.problem_steady_state(self, x, t_span, save_at, args)
            return odeint_(self, x, t_span, save_at, args)

        cls.__init__, cls._autograd_func, cls.odeint = __init__, _autograd_func, odeint


    _call_the_registry(ODEProblem)
""")

PROBE = textwrap.dedent("""
    import json, sys
    import torch, torch.nn as nn
    import torchdyn
    import torchdyn_deq as td
    from torchdyn.core import NeuralODE, ODEProblem
    from torchdyn.numerics import odeint
    from torchdyn.numerics.solvers.ode import SOLVER_DICT
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    model = NeuralODE(lambda t, z, args=None: f(z) - z, sensitivity="steady_state", atol=1e-6, rtol=1e-6)
    x = torch.randn(4, 3)
    _, sol = model(x, torch.tensor([0., float("inf")]))
    sol[-1].pow(2).sum().backward()
    try:
        NeuralODE(f, sensitivity="bogus")
        error = None
    except ValueError as err:
        error = str(err)
    _, finite = odeint(lambda t, z: -z, x, torch.linspace(0, 1, 2), "vcab3")
    print(json.dumps({
        "torchdyn": torchdyn.__file__, "hooks": td._torchdyn.hooks(),
        "shimmed": bool(getattr(ODEProblem.__init__, "_torchdyn_deq_hook", False)),
        "vcab3": SOLVER_DICT["vcab3"] is td.VCAB3Stepper, "error": error,
        "z_star": sol[-1].tolist(), "grad": f[0].weight.grad.tolist(), "finite": finite[-1].tolist(),
        "backward_iters": model.solution.backward_iters}))
""")


def probe(pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_plugin_uses_torchdyns_hooks_when_they_exist(tmp_path):
    copy = tmp_path / "torchdyn"
    shutil.copytree(Path(torchdyn.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "upstream" / "torchdyn" / "registry.py", copy / "numerics" / "registry.py")
    with open(copy / "core" / "problems.py", "a") as handle:
        handle.write(CALL_SITES)

    native = probe(os.pathsep.join([str(tmp_path), str(ROOT)]))
    shim = probe(str(ROOT))
    assert native["torchdyn"].startswith(str(copy)) and not shim["torchdyn"].startswith(str(tmp_path))
    assert (native["hooks"], native["shimmed"]) == ("torchdyn", False)  # registered only, nothing wrapped
    assert (shim["hooks"], shim["shimmed"]) == ("shim", True)
    for result in (native, shim):
        assert result["vcab3"] and "unknown sensitivity 'bogus'" in result["error"] and "'steady_state'" in result["error"]
        assert result["backward_iters"] > 0
    for key in ("z_star", "grad", "finite", "backward_iters", "error"):
        assert native[key] == shim[key], key  # both paths run the same code
