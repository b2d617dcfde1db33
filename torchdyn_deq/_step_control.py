"""Step-size control for steady states: local error control, bounded by a stability limit that
the solver estimates from its own evaluations.

Why a stability limit. Near a steady state the local error estimate shrinks with the residual,
so error control alone lets the step grow until ``h lambda`` leaves the method's region of
absolute stability for some eigenvalue ``lambda`` of ``dg/dz``; the residual then stops falling
and hovers near the tolerance (the classic steady-state stall of explicit solvers). Here each
step also estimates the eigenvalues that matter (a two-dimensional Rayleigh-Ritz projection of
``dg/dz`` from pairs ``(dz, dg)`` of nearby points, ``dg ~ J dz``) and the next step is at most

    h <= safety * r(arg lambda) / |lambda|       for every estimated lambda with Re lambda < 0,

with ``r(phi)`` the distance from 0 to the edge of the method's stability region in the
direction ``phi`` (tabulated once per method from its stability function). The projection uses
moments summed over the batch (the direction of the dominant modes) and the largest per-sample
ratio ``||dg|| / ||dz||`` (their size), read on the host with the step's one synchronisation and
finished there in plain Python: a handful of tensor operations per step. Eigenvalues with
``Re lambda >= 0`` impose nothing: such a mode grows at any step, and the solve loop's
divergence test reports it.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

ANGLES = 361  # directions from pi/2 (imaginary axis) to pi (negative real axis), 0.25 degree apart
REACH = 0.25  # a step above this fraction of the last stability limit estimates the eigenvalues again
STALE = 4  # and so does every step once the last estimate is this many steps old


def _radii(unstable: Callable[[Tensor], Tensor], r_max: float, n_r: int) -> Tensor:
    """``r(phi)`` on the angle grid: the largest radius before ``unstable(z)`` first holds,
    scanning outwards from 0 on each ray."""
    phi = torch.linspace(math.pi / 2, math.pi, ANGLES, dtype=torch.float64)
    r = torch.linspace(0, r_max, n_r + 1, dtype=torch.float64)[1:]
    z = r[None, :] * torch.exp(1j * phi.to(torch.complex128))[:, None]
    bad = unstable(z)
    first = torch.where(bad.any(1), bad.float().argmax(1), torch.full((ANGLES,), n_r))
    return torch.cat([torch.zeros(1, dtype=torch.float64), r])[first]


class StabilityRegion:
    """Where ``|growth factor| <= 1`` for ``h lambda``, as a table ``r(phi)`` over the left half-plane.

    Args:
        radii: ``r(phi)`` at ``ANGLES`` directions from ``pi/2`` to ``pi``.
    """

    def __init__(self, radii: Tensor):
        self.radii = radii.to(torch.float32)
        self._list = None  # the table as Python floats, made on first use

    @classmethod
    def runge_kutta(cls, a: Sequence[Sequence[float]], b: Sequence[float]) -> "StabilityRegion":
        """Explicit RK with stage matrix ``a`` (rows of the strictly lower part, stage 2 on) and
        weights ``b``: ``R(z) = 1 + sum_k (b^T A^(k-1) 1) z^k``, a polynomial of degree ``s``."""
        coeffs = [1.0] + linear_coefficients(a, b)

        def unstable(z):
            R = torch.zeros_like(z)
            for c in reversed(coeffs):
                R = R * z + c
            return R.abs() > 1 + 1e-9

        return cls(_radii(unstable, 8.0, 3200))

    @classmethod
    def adams_bashforth3(cls) -> "StabilityRegion":
        """Constant-step AB3: stable where every root of ``zeta^3 - zeta^2 - z (23 zeta^2 - 16 zeta + 5) / 12``
        has modulus ``<= 1``."""
        def unstable(z):
            shape = z.shape
            z = z.reshape(-1)
            companion = torch.zeros(z.numel(), 3, 3, dtype=torch.complex128)
            companion[:, 0, 0] = 1 + 23 * z / 12
            companion[:, 0, 1] = -16 * z / 12
            companion[:, 0, 2] = 5 * z / 12
            companion[:, 1, 0] = companion[:, 2, 1] = 1
            return (torch.linalg.eigvals(companion).abs().amax(1) > 1 + 1e-9).reshape(shape)

        return cls(_radii(unstable, 1.0, 400))

    def step_limit(self, eigenvalues: Sequence[complex], magnitude: float, safety: float) -> float:
        """Largest ``h`` with ``h |lambda| <= safety r(arg lambda)`` for every estimate ``lambda``
        with ``Re lambda < 0``; ``magnitude`` (a per-sample bound of ``|lambda|``) applies in the
        direction of the largest estimate. ``inf`` where nothing decays. Plain Python: the
        estimates arrive on the host with the step's synchronisation."""
        if self._list is None:
            self._list = self.radii.tolist()
        limit, largest = math.inf, None
        for lam in eigenvalues:
            if not lam.real < 0:  # NaN too
                continue
            r = self._radius(math.atan2(abs(lam.imag), lam.real))
            limit = min(limit, safety * r / abs(lam))
            if largest is None or abs(lam) > abs(largest[0]):
                largest = (lam, r)
        if largest is not None and magnitude > abs(largest[0]):
            limit = min(limit, safety * largest[1] / magnitude)
        return limit

    def _radius(self, phi: float) -> float:
        """``r(phi)``, linear between the tabulated directions (``phi`` in ``[pi/2, pi]``)."""
        pos = min(max((phi - math.pi / 2) / (math.pi / 2) * (ANGLES - 1), 0.0), ANGLES - 1.0)
        lo = int(pos)
        hi = min(lo + 1, ANGLES - 1)
        return self._list[lo] + (self._list[hi] - self._list[lo]) * (pos - lo)


def linear_coefficients(a: Sequence[Sequence[float]], weights: Sequence[float]) -> List[float]:
    """``w^T A^(k-1) 1`` for ``k = 1..s``: a step of an explicit RK method (stage matrix ``a`` as
    in `StabilityRegion.runge_kutta`) on a linear field ``g = J (z - z*)`` combines its stages
    with ``weights`` into ``sum_k (w^T A^(k-1) 1) h^k J^(k-1) g(z)``. With the weights ``b`` these
    are the stability polynomial's coefficients (after its 1), with the error weights the error
    estimate's (zero below the estimate's order, by the order conditions)."""
    s = len(weights)
    A = torch.zeros(s, s, dtype=torch.float64)
    for i, row in enumerate(a[: s - 1]):
        A[i + 1, : len(row)] = torch.tensor(row, dtype=torch.float64)
    w, v, coeffs = torch.tensor(weights, dtype=torch.float64), torch.ones(s, dtype=torch.float64), []
    for _ in range(s):
        coeffs.append(float(w @ v))
        v = A @ v
    return coeffs


def spectral_moments(pairs: Sequence[Tuple[Tensor, Tensor]]) -> Tensor:
    """What the host needs to estimate the eigenvalues of ``J`` from two pairs ``(dz_i, dg_i)``
    with ``dg_i ~ J dz_i`` (flattened ``(batch, n)``): the batch sums of ``dz_i . dz_j`` and
    ``dz_i . dg_j`` (a ``2 x 4`` block) and ``max_samples ||dg_1|| / ||dz_1||``; 9 numbers, from
    one batched product."""
    (z1, g1), (z2, g2) = pairs
    vectors = torch.stack([z1, z2, g1, g2], 1)
    m = torch.bmm(vectors[:, :3], vectors.transpose(1, 2))  # (batch, 3, 4)
    squares = m.diagonal(dim1=1, dim2=2)  # dz_1 . dz_1, dz_2 . dz_2, dg_1 . dg_1
    dz2, dg2 = squares[:, 0], squares[:, 2]
    # samples whose dz is at rounding level against the batch's largest (a sample at its steady state
    # under a time-dependent field) would make ||dg|| / ||dz|| meaningless and huge: left out (their
    # quotient, inf or NaN where dz = 0, is not selected)
    moving = dz2 > torch.finfo(m.dtype).eps ** 2 * dz2.amax()
    ratio = torch.where(moving, dg2 / dz2, 0.0).amax().sqrt()
    return torch.cat([m[:, :2].sum(0).flatten(), ratio.reshape(1)])


def ritz_values(moments: Sequence[float]) -> Tuple[complex, complex]:
    """The two Rayleigh-Ritz values of ``J`` on the plane spanned by the ``dz`` of
    `spectral_moments` (summed over the batch: the operator ``J`` of the whole batch, block
    diagonal): the eigenvalues ``lambda`` of ``C y = lambda G y`` with ``G_ij = dz_i . dz_j`` and
    ``C_ij = dz_i . dg_j``. Where the two ``dz`` are (nearly) parallel the plane is a line and
    both values are its Rayleigh quotient ``dz.dg / dz.dz``."""
    a, b, p, q, _, d, r, s_ = moments[:8]
    det_g = a * d - b * b
    if not a > 0:
        return (complex(math.nan), complex(math.nan))
    if not det_g > 1e-6 * a * d:
        lam = complex(p / a)
        return (lam, lam)
    trace = (d * p - b * r - b * q + a * s_) / det_g
    det = (p * s_ - q * r) / det_g
    root = (complex(trace * trace / 4 - det)) ** 0.5
    return (trace / 2 + root, trace / 2 - root)


class Stability(NamedTuple):
    """The controller's stability state between steps: the latest limit ``h_stable`` and the
    number of steps since it was estimated."""

    limit: float
    age: int


class StepController:
    """Error control with a stability limit, for every adaptive steady-state solver.

    The proposed next step after an error ratio ``e`` (``<= 1`` accepts) is

        h_next = min(h * clip(safety * (e d)^(-1/order), min_factor, max_factor), h_stable, max_step)

    where ``d`` is the fall of the speed ``||g||`` over an accepted step (1 after a rejected one:
    the retry starts where the step did), an accepted step is shrunk by the error term only
    where the predicted ratio ``e d`` exceeds 1 (a speed that grows), and ``h_stable`` is
    `StabilityRegion.step_limit` of the latest eigenvalue estimates (`ritz_values`). The first
    step comes from a probe of the field (`first_step`).

    Args:
        order: the exponent's order (the error estimate's order plus one).
        region: the method's `StabilityRegion`, or ``None`` for no stability limit.
        safety: error-control safety factor. Default ``0.9`` (torchdyn's and Hairer's).
        min_factor: smallest step change. Default ``0.2`` (torchdyn's).
        max_factor: largest step change. Default ``10.0`` (torchdyn's).
        stability_safety: fraction of the stability radius used. Default ``0.8``: the estimates
            are approximate, and at ``|growth| = 1`` a mode would not decay at all.
        max_step: largest step. Default ``inf`` (the stability limit bounds it).
    """

    def __init__(self, order: int, region: Optional[StabilityRegion], safety: float = 0.9, min_factor: float = 0.2,
                 max_factor: float = 10.0, stability_safety: float = 0.8, max_step: float = math.inf):
        self.order, self.region = order, region
        self.safety, self.min_factor, self.max_factor = safety, min_factor, max_factor
        self.stability_safety, self.max_step = stability_safety, max_step

    def stable_step(self, moments: Sequence[float]) -> float:
        """``h_stable`` from the host copy of `spectral_moments` (``inf`` without a region or
        estimates)."""
        if self.region is None or len(moments) < 9:
            return math.inf
        return self.region.step_limit(ritz_values(moments), moments[8], self.stability_safety)

    def start(self) -> Stability:
        """The stability state before any estimate: no limit, and due for an estimate."""
        return Stability(math.inf, STALE)

    def wants_estimate(self, dt: float, stability: Stability) -> bool:
        """Whether the next step should estimate the eigenvalues again: when the step is within
        ``REACH`` of the last limit (the limit may bind), or that estimate is ``STALE`` steps old.
        A transient whose steps are far below the limit, set by accuracy, skips the estimate."""
        return self.region is not None and (dt > REACH * stability.limit or stability.age >= STALE)

    def refresh(self, stability: Stability, moments: Sequence[float]) -> Stability:
        """The stability state after a step that did (``moments``) or did not (empty) estimate."""
        return Stability(self.stable_step(moments), 0) if moments else Stability(stability.limit, stability.age + 1)

    def rate(self, mu: float, moments: Sequence[float]) -> float:
        """The rate at which ``||J^k g0||`` grows with ``k`` beyond its first factor ``mu``: the
        largest of ``mu`` and the moduli of the Ritz values of the probe's Krylov pairs
        (`ritz_values`). ``||J^k g0||^(1/k)`` rises with ``k`` towards the spectral radius (for a
        normal ``J`` it is a power mean of the ``|lambda|`` weighted by ``g0``'s components), so
        ``mu`` alone predicts too little error for the high powers that dominate a long step:
        on a trained Skip Reg. DEQ at its predicted start, ``mu = 0.81`` against a rate of 0.93
        for the fourth power, and its first step was rejected."""
        if len(moments) < 9:  # no estimates: as in `stable_step`
            return mu
        moduli = [abs(lam) for lam in ritz_values(moments) if math.isfinite(abs(lam))]
        return max([mu] + moduli)

    def first_step(self, guess: float, d1: float, mu: float, rate: float, error: Sequence[float]) -> float:
        """The first step from a probe of the field at the start: the step whose predicted error
        ratio is ``safety^order``, the ratio at which `next_step` keeps a step, so that the first
        step is already the one the control settles on instead of the first of several growths.

        The prediction is the error estimate of the step on the field linearised at the start,
        ``err = sum_k e_k h^k J^(k-1) g0`` (``error``: the ``e_k`` of `linear_coefficients`), with
        ``||J^(k-1) g0|| ~ mu rate^(k-2) ||g0||``: ``ratio(h) ~ d1 sum_k |e_k| h^k mu rate^(k-2)``,
        where ``d1 = rms(g0 / (atol + rtol |z0|))``, ``mu = ||J g0|| / ||g0||`` and ``rate`` of
        `rate` (two evaluations of ``g`` near the start). Hairer's ``guess`` (`first_step`)
        assumes instead a unit time scale and a ratio of 0.01: on the paper's MNIST layer at
        random init its ratio is 3e-5, a step 7x too short, and the model's 0.4. The model only
        lengthens the guess, by at most ``max_factor`` (the controller's largest growth; where
        ``mu ~ 0`` the linear model predicts no error at all): at a start where the field is far
        from linear (a normalisation at ``z0 = 0``) ``mu`` is the Jacobian of a tiny
        neighbourhood and the model's step 100x too short. Terms below the estimate's order are
        zero by the order conditions (their values are rounding) and left out. Plain Python: the
        inputs arrive with the probe's one synchronisation."""
        terms = [(abs(e), k + 1) for k, e in enumerate(error) if k + 1 >= self.order]
        target = self.safety ** self.order
        lo, hi = min(guess, self.max_step), min(self.max_factor * guess, self.max_step)

        def ratio(h):
            return d1 * sum(e * h ** k * mu * rate ** (k - 2) for e, k in terms)
        if not (math.isfinite(d1) and math.isfinite(mu) and math.isfinite(rate)) or ratio(lo) >= target:
            return lo
        if ratio(hi) <= target:
            return hi
        for _ in range(30):  # ratio(h) increases with h: bisection, to 1e-9 of the interval
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ratio(mid) <= target else (lo, mid)
        return lo

    def next_step(self, dt: float, ratio: float, stable: float, order: Optional[int] = None,
                  decay: float = 1.0) -> float:
        """The next step after a step ``dt`` with error ratio ``ratio`` and stability limit
        ``stable`` (``order`` overrides the controller's, for a multistep start-up). ``decay``:
        ``||g(z_new)|| / ||g(z)||`` over an accepted step. A step's local error is proportional to
        the speed at its start (``err = sum_k e_k h^k J^(k-1) g(z)`` on a linear field), so the next
        step's error at the same ``h`` is ``ratio * decay``: towards a steady state the speed falls
        by a factor each step, and the error ratio with it."""
        order = self.order if order is None else order
        if ratio <= 1 and math.isfinite(decay):
            ratio = ratio * decay
        if ratio == 0:
            factor = self.max_factor
        elif not math.isfinite(ratio):
            factor = self.min_factor
        else:
            lower = 1.0 if ratio <= 1 else self.min_factor
            factor = min(self.max_factor, max(self.safety * ratio ** (-1.0 / order), lower))
        return min(dt * factor, stable, self.max_step)


def error_ratio(err: Tensor, z: Tensor, z_new: Tensor, atol: float, rtol: float) -> Tensor:
    """``rms(err / (atol + rtol max(|z|, |z_new|)))`` over the whole batch, a 0-dim tensor."""
    scale = torch.maximum(z.abs(), z_new.abs()).mul_(rtol).add_(atol)  # in place: fewer allocations
    return torch.linalg.vector_norm(torch.div(err, scale, out=scale)).mul_(1 / max(err.numel(), 1) ** 0.5)


def start_ratio(g0: Tensor, z0: Tensor, atol: float, rtol: float) -> Tensor:
    """``d1 = rms(g0 / (atol + rtol |z0|))``, the start's speed in units of the tolerance (a 0-dim tensor)."""
    return torch.linalg.vector_norm(g0 / (atol + rtol * z0.abs())) / max(g0.numel(), 1) ** 0.5


def first_step(d1: float, order: int) -> float:
    """Hairer's first-step guess ``(0.01 / d1)^(1/(order+1))`` (``d1`` of `start_ratio`) without
    its ``||z0||`` bound (zero for the DEQ start ``z0 = 0``, where it forced a first step of
    1e-4 and several wasted steps of growth)."""
    return (0.01 / max(d1, 1e-15)) ** (1.0 / (order + 1))
