"""VCAB3 as a torchdyn stepper: ``solver='vcab3'`` in torchdyn's own finite-time ``odeint``."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torchdyn.numerics.solvers.templates import DiffEqSolver

from ._ode import adams_bashforth_weights


def _combine(base: Tensor, weights: List[float], tensors: List[Tensor]) -> Tensor:
    """``base + sum_i weights[i] * tensors[i]`` in fused adds."""
    for w, k in zip(weights, tensors):
        base = torch.add(base, k, alpha=w)
    return base


class VCAB3Stepper(DiffEqSolver):
    """Variable-step Adams-Bashforth 3 with torchdyn's stepper interface
    (``step(f, x, t, dt, k1) -> (f_new, x_new, x_err, stages)``), for torchdyn's adaptive loop.

    The step ``x_new = x + sum_i w_i f(t_i, x_i)`` integrates the polynomial through the last
    three accepted evaluations exactly, whatever their spacing (`adams_bashforth_weights`);
    the error estimate is the difference to the order-2 formula on the last two (the first
    step: Heun minus Euler, with the evaluation at the new point). One evaluation per step.

    A multistep method needs the history of its trajectory, and torchdyn's loop tells a
    stepper neither that a solve starts nor whether a step was accepted. Both are read from
    the call: torchdyn passes the returned ``x_new`` back as the next ``x`` exactly when it
    accepted the step, and the same ``x`` again after a rejection. Any other state starts a
    new history (a new solve, the adjoint's backward solve, a jump of a hybrid model), so
    a stepper instance can be reused, and rejected steps never enter the history.

    Held tensors are dropped on copies and pickles (``copy.deepcopy`` of a model with this
    stepper works after a forward pass).
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__(order=3, stepping_class='adaptive')
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next step starts a new trajectory."""
        self._times: List[float] = []   # accepted times, newest first
        self._evals: List[Tensor] = []  # f at those times
        self._x: Optional[Tensor] = None       # the state the last step started from
        self._x_new: Optional[Tensor] = None   # the state it returned
        self._t_new: Optional[float] = None

    def _remember(self, x: Tensor, t: float, k1: Tensor) -> None:
        if x is self._x_new and t == self._t_new:  # the last step was accepted: x_new is its result
            if t > self._times[0]:
                self._times, self._evals = ([t] + self._times)[:3], ([k1] + self._evals)[:3]
        elif not (x is self._x and self._times and t == self._times[0] and k1 is self._evals[0]):
            # not a retry after a rejection (torchdyn passes the same x and k1 again): a new history
            self._times, self._evals = [t], [k1]

    def step(self, f, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        if k1 is None:
            k1 = f(t, x)
        t_now = float(t.detach())
        self._remember(x, t_now, k1)
        h = float(dt.detach())
        nodes = [s - t_now for s in self._times]
        weights = adams_bashforth_weights(nodes, h)
        x_new = _combine(x, weights, self._evals)
        t_new = t + dt
        f_new = f(t_new, x_new)
        if len(self._evals) == 1:
            x_err = 0.5 * h * (f_new - k1)  # Heun minus Euler
        else:
            low = adams_bashforth_weights(nodes[:-1], h) + [0.0]
            x_err = _combine(torch.zeros_like(x), [w - w_low for w, w_low in zip(weights, low)], self._evals)
        self._x, self._x_new, self._t_new = x, x_new, float(t_new.detach())
        return f_new, x_new, x_err, (k1, f_new)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_times=[], _evals=[], _x=None, _x_new=None, _t_new=None)
        return state
