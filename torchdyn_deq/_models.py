"""InfiniteTimeNeuralODE (a torchdyn NeuralODE solved to t = infinity) and the DEQ form."""
from __future__ import annotations

import contextlib
import io
from inspect import getfullargspec
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.core.defunc import DEFuncBase

from ._checks import non_negative_float, optional, positive_float, positive_int
from ._compile import with_compile
from ._field import Field, check_output, layer_field, module_field
from ._implicit import implicit_solve, per_solve
from ._initializers import Initializer
from ._loop import SteadyStateSolver
from ._regularizers import JacobianPenalty
from ._registry import make_initializer, make_sensitivity, make_solver, torchdyn_stepper
from ._sensitivity import Sensitivity
from ._solution import SavedState, SolveOptions, SteadyStateSolution
from ._trajectory import TrajectorySupervision


def _standardize(vector_field):
    """torchdyn's call-signature wrapping, without its print."""
    target = vector_field.forward if isinstance(vector_field, nn.Module) else vector_field
    if "t" not in getfullargspec(target).args:
        return DEFuncBase(vector_field, has_time_arg=False)
    return vector_field


class InfiniteTimeNeuralODE(NeuralODE):
    """A torchdyn ``NeuralODE`` integrated from ``t = 0`` to ``t = infinity``.

    Integrates ``dz/dt = vector_field(t, z)`` with an adaptive solver and stops once every
    sample of the batch is at a steady state,

        rms( dz/dt / (atol + rtol |z|) ) <= 1        (per sample, Hairer RMS norm),

    then differentiates through the steady state implicitly (`SteadyStateSensitivity`):
    no backpropagation through the solver steps. Same constructor keywords, vector fields,
    ``(t_eval, sol)`` return and Lightning use as ``NeuralODE``; ``sol[-1]`` is the steady
    state, ``sol[0]`` the start, ``t_eval = [t0, t_reached]``. The last solve's
    `SteadyStateSolution` is ``model.solution``.

    Args:
        vector_field: ``forward(t, x, args=None)`` or ``forward(x)``; torchdyn's ``DataControl``
            injection works, and the injected input receives its true gradient.
        solver: ``'tsit5'`` (default), ``'dopri5'``, fixed-step ``'euler'``/``'midpoint'``/``'rk4'``
            (step 1.0), the discrete ``'anderson'``/``'broyden'``/``'fixed_point'``, a torchdyn
            stepper instance, or a `SteadyStateSolver`.
        atol: absolute steady-state tolerance, positive. Default ``1e-3`` (``NeuralODE``'s).
        rtol: relative steady-state tolerance, non-negative. Default ``1e-3`` (``NeuralODE``'s).
        sensitivity: ``'steady_state'`` (default, implicit), ``'autograd'`` (backprop through
            the solver), ``'jacobian_free'`` (approximate: no linear solve, see
            `JacobianFreeSensitivity`), or a `Sensitivity` instance.
        atol_adjoint: absolute floor of the backward GMRES residual when
            ``sensitivity='steady_state'``. Default ``0.0``: the tolerance is relative to each
            sample's cotangent, so the gradient's relative accuracy does not depend on the scale
            of the loss.
        rtol_adjoint: its relative tolerance. Default ``None``: the forward tolerance
            ``max(atol, rtol)``, as the paper's code does. The gradient's accuracy is set by the
            forward tolerance (the steady state is only that accurate), and a tighter backward
            solve costs iterations without changing it: measured on the MNIST model in
            ``benchmarks/results/backward_tolerance.md``.
        return_t_eval: return ``(t_eval, sol)`` (default) or ``sol`` alone.
        initializer: starting state: ``'input'`` (default: ``z0 = x`` as in ``NeuralODE``),
            ``'zeros'``, ``'skip_reg'``, or an `Initializer` such as ``SkipInitializer``.
        state_shape: per-sample state shape when it differs from the input's (zeros / Skip
            initializers). Default: the input's.
        max_steps: bound on solver steps (accepted + rejected) or iterations. Default ``100``.
        on_failure: ``'warn'`` (default) or ``'raise'`` when a solve does not converge.
        jacobian_penalty: a `JacobianPenalty`, computed in training mode when gradients
            are enabled. Default ``None``.
        eval_tol_factor: in eval mode (``model.eval()``) the tolerances are multiplied by
            this. Default ``1.0`` (same accuracy as training).
        eval_max_steps: in eval mode, a fixed step budget. Reaching it is the point of a
            budget, so it is recorded (``solution.reason == 'budget'``) instead of warned.
            Default ``None`` (``max_steps``, reported as non-convergence).
        trajectory: a `TrajectorySupervision`: return intermediate states of the solve with
            gradients (``sol[1:-1]``, at ``t_eval[1:-1]``) besides ``z*`` (fixed-point
            correction). Default ``None``: ``(t_eval, sol)`` holds ``[t0, t*]`` and ``[z0, z*]``.
        termination: the stop rule (`SolveOptions`): ``'per_sample'`` (default, the test
            above), ``'elementwise'`` (every element ``|dz/dt| <= atol`` or ``<= rtol |z|``)
            or ``'batch_relative'`` (``||dz/dt||_2 <= rtol ||dz/dt + z||_2`` over the batch, the
            paper's code; the batch stops as one).
        compile: the solver's ``compile`` option (a compiled step, ``'tsit5'``/``'dopri5'``/
            ``'vcab3'``; see `ODESteadyStateSolver`). Default ``None``: the solver's own (off).

    ``order > 1``, ``solver_adjoint``, ``interpolator``, ``integral_loss``, ``seminorm`` and
    ``save_at`` belong to finite-time integration and are refused with an error.

    Examples:
        >>> import torch, torch.nn as nn, torchdyn_deq as td
        >>> from torchdyn.nn import DataControl
        >>> class Field(nn.Module):                  # dz/dt = tanh(W [z, x] + b) - z
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(DataControl(), nn.Linear(8, 4), nn.Tanh())
        ...     def forward(self, t, z, args=None):
        ...         return self.net(z) - z           # DataControl puts the input x next to z
        >>> model = td.InfiniteTimeNeuralODE(Field())
        >>> t_eval, sol = model(torch.randn(16, 4))
        >>> len(t_eval), model.solution.converged       # [0, t reached]; sol[-1] is the steady state
        (2, True)
    """

    def __init__(self, vector_field: Union[Callable, nn.Module], solver: Union[str, nn.Module, SteadyStateSolver] = "tsit5",
                 order: int = 1, atol: float = 1e-3, rtol: float = 1e-3,
                 sensitivity: Union[str, Sensitivity] = "steady_state", solver_adjoint=None,
                 atol_adjoint: Optional[float] = None, rtol_adjoint: Optional[float] = None, interpolator=None,
                 integral_loss=None, seminorm: bool = False, return_t_eval: bool = True, optimizable_params: Sequence = (), *,
                 initializer: Union[str, Initializer] = "input", state_shape: Optional[Tuple[int, ...]] = None,
                 max_steps: int = 100, on_failure: Optional[str] = None, jacobian_penalty: Optional[JacobianPenalty] = None,
                 eval_tol_factor: float = 1.0, eval_max_steps: Optional[int] = None,
                 trajectory: Optional[TrajectorySupervision] = None, termination: str = "per_sample",
                 compile: Optional[bool] = None):
        for name, value, default in (("solver_adjoint", solver_adjoint, None), ("interpolator", interpolator, None),
                                     ("integral_loss", integral_loss, None), ("seminorm", seminorm, False)):
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported by InfiniteTimeNeuralODE: it belongs to "
                                 "finite-time integration; the steady state needs none of it")
        order = positive_int("order", order)
        atol, rtol = non_negative_float("atol", atol), non_negative_float("rtol", rtol)
        if atol == 0:
            raise ValueError("atol must be positive: with atol=0 the test |dz/dt| <= rtol |z| cannot be met "
                             "where a component of z is 0 (the DEQ start z0 = 0); rtol=0 is allowed")
        max_steps, eval_max_steps = positive_int("max_steps", max_steps), optional(positive_int, "eval_max_steps", eval_max_steps)
        eval_tol_factor = positive_float("eval_tol_factor", eval_tol_factor)
        if trajectory is not None and not isinstance(trajectory, TrajectorySupervision):
            raise TypeError(f"trajectory must be a TrajectorySupervision or None, got {trajectory!r}")
        if jacobian_penalty is not None and not isinstance(jacobian_penalty, JacobianPenalty):
            raise TypeError(f"jacobian_penalty must be a JacobianPenalty or None, got {jacobian_penalty!r}")
        SolveOptions(atol, rtol, max_steps, termination=termination)  # validates the rule (and rtol > 0 for batch_relative)
        steady_solver = with_compile(make_solver(solver), compile)
        sens, on_failure = make_sensitivity(
            sensitivity, rtol_adjoint=optional(non_negative_float, "rtol_adjoint", rtol_adjoint),
            atol_adjoint=optional(non_negative_float, "atol_adjoint", atol_adjoint), on_failure=on_failure,
            forward_tol=max(atol, rtol))
        init = make_initializer(initializer)
        with contextlib.redirect_stdout(io.StringIO()):  # torchdyn prints about parameter-less fields
            super().__init__(_standardize(vector_field), solver=steady_solver, order=order, atol=atol, rtol=rtol,
                             sensitivity=sens, atol_adjoint=atol_adjoint, rtol_adjoint=rtol_adjoint,
                             return_t_eval=return_t_eval, optimizable_params=optimizable_params)
        # torchdyn keeps torch.cat(parameters) for its adjoint, a non-leaf tensor that blocks
        # copy.deepcopy; we never use it
        self.vf_params = self.vf_params.detach()
        # the solver the loop runs; a torchdyn stepper module (a hypersolver) is, as in NeuralODE,
        # the registered submodule ``solver``: its parameters train, save and move with the model
        self.steady_solver = steady_solver
        if isinstance(solver, nn.Module):
            self.solver = solver
        self.initializer = init
        self.state_shape = None if state_shape is None else tuple(int(s) for s in state_shape)
        self.max_steps, self.on_failure, self.jacobian_penalty = max_steps, on_failure, jacobian_penalty
        self.eval_tol_factor, self.eval_max_steps = float(eval_tol_factor), eval_max_steps
        self.trajectory_supervision = trajectory
        self.termination = termination
        self.solution: Optional[SteadyStateSolution] = None

    # ---------------------------------------------------------------- torchdyn interface
    def _prep_integration(self, x: Tensor, t_span: Optional[Tensor]):
        if not isinstance(x, Tensor):
            raise TypeError(f"the input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"the input needs a non-empty batch dimension, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"the input must be a floating-point tensor, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the input contains NaN or inf values")
        if t_span is None:
            t_span = self.t_span if self.t_span is not None else torch.zeros(1)
        t_span = torch.as_tensor(t_span, dtype=x.dtype, device=x.device).reshape(-1)
        for _, module in self.vf.named_modules():
            if hasattr(module, "_control"):  # torchdyn DataControl: keep the graph (the input's true gradient)
                self.controlled = True
                module._control = x
        return x, t_span

    def forward(self, x: Tensor, t_span: Optional[Tensor] = None, save_at: Sequence = (), args: Optional[dict] = None):
        """Solve to the steady state. ``t_span`` is accepted for ``NeuralODE`` compatibility:
        only its first entry (the start time) is used."""
        if len(save_at):
            raise ValueError("save_at is not supported: the solve runs to a steady state, not to fixed times")
        x, t_span = self._prep_integration(x, t_span)
        states = self._solve(x, {} if args is None else args)
        between = len(states) - 2  # intermediate states (trajectory supervision), padded as unroll pads them
        kept = ([s.t for s in self.solution.states] or [0.0])[:between] if between else []
        times = [0.0] + kept + kept[-1:] * (between - len(kept)) + [self.solution.t]
        t_eval = t_span[0] + torch.tensor(times, dtype=t_span.dtype, device=t_span.device)
        trajectory = torch.stack([states[0].to(states[-1].dtype), *states[1:]])
        return (t_eval, trajectory) if self.return_t_eval else trajectory

    def odeint(self, x: Tensor, t_span: Optional[Tensor] = None, save_at: Sequence = (), args: Optional[dict] = None):
        """torchdyn's ``ODEProblem.odeint``: the same solve as ``forward``, always returning
        ``(t_eval, sol)`` (this model's initializer, state shape, tolerances and sensitivity)."""
        return_t_eval, self.return_t_eval = self.return_t_eval, True
        try:
            return self.forward(x, t_span, save_at, args)
        finally:
            self.return_t_eval = return_t_eval

    def trajectory(self, x: Tensor, t_span: Tensor) -> Tensor:
        """The states at the finite times ``t_span`` (``(len(t_span), batch, *state)``, as torchdyn's
        ``NeuralODE.trajectory``, for its plotting utilities): ``dz/dt = g(t, z)`` integrated from
        this model's start ``z0`` with torchdyn's ``odeint`` and this model's tolerances (the
        stepper of an ODE solver; ``'tsit5'`` for the discrete ones). The steady state is
        ``forward``'s job."""
        from torchdyn.numerics import odeint

        t_span = torch.as_tensor(t_span)
        if t_span.dim() != 1 or t_span.numel() < 2 or not bool(torch.isfinite(t_span).all()):
            raise ValueError(f"trajectory integrates over finite times: t_span must be 1-d with at least two finite "
                             f"entries, got {t_span.tolist()}; forward(x) solves to the steady state (t = inf)")
        x, t_span = self._prep_integration(x, t_span)
        with per_solve(self):
            field = self._field(x, {})
            z0 = self.initializer(x, field, self.state_shape or tuple(x.shape[1:]))
            try:
                _, states = odeint(field, z0, t_span, torchdyn_stepper(self.steady_solver), atol=self.atol, rtol=self.rtol)
            finally:
                self.vf.nfe += field.nfe
                self._release()
        return states

    # ---------------------------------------------------------------- the door into implicit_solve
    def _field(self, x: Tensor, args: dict) -> Field:
        """This model's `Field`: torchdyn's ``DEFunc`` call (time on ``DepthCat``-like modules,
        the order), the injected inputs and dropout masks restricted with the batch."""
        return module_field(self.vf.vf, x, args, order=self.vf.order, module=self)

    def _solve(self, x: Tensor, args: dict) -> List[Tensor]:
        with per_solve(self):  # a new dropout mask (field and initializer), norms computed once
            field = self._field(x, args)
            try:
                return self._solve_with(field, x)
            finally:
                self.vf.nfe += field.nfe  # torchdyn's cumulative count, read from the solve's one count
                self._release()

    def _options(self) -> SolveOptions:
        """The stop test, budget and kept iterates of this forward pass: training, or eval mode
        with its factor and budget."""
        supervision, keep = self.trajectory_supervision, {}
        if supervision is not None and supervision.n_states > 1:
            keep = ({"save_steps": supervision.indexing} if supervision.indexing is not None
                    else {"save_evenly": supervision.n_states - 1})
        keep["termination"] = self.termination
        if self.training:
            return SolveOptions(self.atol, self.rtol, self.max_steps, **keep)
        budget = self.eval_max_steps is not None
        return SolveOptions(self.atol * self.eval_tol_factor, self.rtol * self.eval_tol_factor,
                            self.eval_max_steps if budget else self.max_steps, budget=budget, **keep)

    def _losses(self, z0: Tensor):
        """The record's auxiliary losses at ``z*``, or ``None`` when there are none to compute."""
        has_skip = type(self.initializer).aux_loss is not Initializer.aux_loss
        penalty = self.jacobian_penalty if self.training else None
        if not has_skip and penalty is None:
            return None

        def losses(gz: Tensor, z_leaf: Tensor):
            return {"skip_loss": self.initializer.aux_loss(z_leaf.detach() + gz, z0) if has_skip else None,
                    "jacobian_loss": penalty(gz, z_leaf) if penalty is not None else None}
        return losses

    def _solve_with(self, field: Field, x: Tensor) -> List[Tensor]:
        """``[z0, (intermediate states,) z*]``: the start (with its graph, for a Skip predictor),
        the supervised states if any, and the steady state with the sensitivity's gradients;
        the record goes to ``self.solution``."""
        state_shape = self.state_shape or tuple(x.shape[1:])
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        z0 = self.initializer(x, field, state_shape)
        z_star, sol = implicit_solve(field, z0, self.steady_solver, self._options(), self.sensitivity,
                                     on_failure=self.on_failure, differentiate=needs_grad, losses=self._losses(z0),
                                     keep=lambda record: setattr(self, "solution", record))
        intermediate = []
        supervision = self.trajectory_supervision
        if supervision is not None and supervision.n_states > 1:
            # the start stands in when a solve kept nothing (converged at its first iterate)
            kept = sol.states or [SavedState(0, 0.0, sol.z0.detach())]
            with torch.enable_grad() if needs_grad else torch.no_grad():
                intermediate = supervision.unroll(field, kept, x)
        return [z0, *intermediate, z_star]

    def _release(self) -> None:
        """Keep the injected data, not its graph: copies and pickles of the model work."""
        for module in self._controlled():
            module._control = module._control.detach()

    def _controlled(self) -> list:
        """Modules holding an injected input (torchdyn's ``DataControl``)."""
        return [m for _, m in self.vf.named_modules() if getattr(m, "_control", None) is not None]

    def __getstate__(self):
        """Pickles and deep copies leave out the last solution record (it holds the graph of
        the last forward pass)."""
        state = super().__getstate__()
        return {**state, "solution": None}

    def aux_loss(self) -> Tensor:
        """The weighted auxiliary losses of the last solve (Skip / Skip Reg., Jacobian penalty)."""
        if self.solution is None:
            raise RuntimeError("aux_loss() is available after a forward pass")
        return self.solution.aux_loss

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"{type(self).__name__}(solver={self.solver!r}, atol={self.atol}, rtol={self.rtol}, "
                f"sensitivity={self.sensitivity!r}, initializer={type(self.initializer).__name__}, "
                f"max_steps={self.max_steps}, parameters={n}, nfe={int(self.vf.nfe)})")


class DEQVectorField(nn.Module):
    """``g(z) = f(z, x) - z``: the continuous DEQ's vector field, the ``vf`` of its torchdyn
    structure (``model.vf.vf.f`` is the layer). The model injects ``x`` (the ``_control``
    attribute, as torchdyn's ``DataControl``) before each solve; the solve itself evaluates
    ``f`` through its `Field`."""

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.f = f
        self._control: Optional[Tensor] = None

    def forward(self, t: Tensor, z: Tensor, args=None) -> Tensor:
        fz = self.f(z, self._control)
        check_output(fz, z, residual=True, label="the DEQ layer f")
        return fz - z


class DEQ(InfiniteTimeNeuralODE):
    """The Deep Equilibrium Model ``z* = f(z*, x)`` in one line.

    Continuous (the paper's infinite-time Neural ODE ``dz/dt = f(z, x) - z``) with an ODE
    solver, discrete with a root solver (``solver='anderson'`` / ``'broyden'`` /
    ``'fixed_point'``); the same sensitivity, initializers and solution record either way.
    ``forward(x)`` takes the injected input ``x``; the state starts at ``z0 = 0``.

    Args:
        f: the layer, called ``f(z, x)``, returning a tensor shaped like ``z``.
        initializer: default ``'zeros'``; ``'skip_reg'`` or ``SkipInitializer(predictor)``
            for the Skip variants.
        **kwargs: every other keyword of `InfiniteTimeNeuralODE`.

    Examples:
        >>> import torch, torch.nn as nn, torchdyn_deq as td
        >>> lin, inj = nn.Linear(8, 8), nn.Linear(3, 8)
        >>> model = td.DEQ(lambda z, x: torch.tanh(lin(z) + inj(x)), state_shape=(8,))
        >>> t_eval, sol = model(torch.randn(4, 3))
        >>> sol[-1].sum().backward()            # implicit gradients into lin and inj
        >>> tuple(sol.shape), model.solution.converged, model.solution.backward_iters > 0
        ((2, 4, 8), True, True)
    """

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], solver="tsit5", *, initializer="zeros", **kwargs):
        if kwargs.get("order", 1) != 1:
            raise ValueError(f"order={kwargs['order']!r}: the DEQ form dz/dt = f(z, x) - z is first order; for the "
                             "steady state of a second-order system use InfiniteTimeNeuralODE(vector_field, order=2)")
        super().__init__(DEQVectorField(f), solver=solver, initializer=initializer, **kwargs)

    @property
    def f(self):
        """The layer ``f(z, x)``."""
        return self.vf.vf.f

    def _field(self, x: Tensor, args: dict) -> Field:
        return layer_field(self.f, x, x, module=self)
